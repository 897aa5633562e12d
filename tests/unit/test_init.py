"""Per-name initialization: each module's own init distribution, recorded on
the meta device, replayed from (seed, name, row) so that any slice of a
parameter can be drawn alone."""
import pytest
import torch
from torch import nn

from moe_train.config import load_config
from moe_train.model.init import InitSpec, init_specs, init_values, recording_init
from moe_train.model.transformer import build_model
from moe_train.parallel.build import build_meta_model


@pytest.mark.parametrize("overrides", [
    [],
    ["model.norm=layernorm", "model.position_embedding=alibi", "moe.noisy_gating=true",
     "moe.num_shared_experts=1", "moe.expert_bias_update_rate=0.001", "model.qk_norm=head"],
])
def test_recorded_specs_match_the_eager_init(overrides):
    """The eager build (torch's global generator) draws every parameter from
    the distribution the meta build recorded: constants exactly, normal and
    uniform draws by their moments (4 standard errors)."""
    cfg = load_config(None, ["model.vocab_size=256", "model.hidden_size=64",
                            "model.ffn_hidden_size=128"] + overrides)
    torch.manual_seed(0)
    eager = build_model(cfg.model, cfg.moe)
    meta, specs = build_meta_model(cfg.model, cfg.moe)
    assert all(p.is_meta for p in meta.parameters())
    tensors = dict(eager.named_parameters())
    tensors.update(dict(eager.named_buffers()))
    assert set(specs) == set(tensors)
    for name, spec in specs.items():
        value = tensors[name].detach().double()
        assert tuple(value.shape) == spec.shape, name
        if spec.kind == "constant":
            assert torch.all(value == spec.a), name
            continue
        mean, std = (spec.a, spec.b) if spec.kind == "normal" else \
            ((spec.a + spec.b) / 2, (spec.b - spec.a) / 12 ** 0.5)
        n = value.numel()
        assert abs(value.mean().item() - mean) < 4 * std / n ** 0.5, name
        assert abs(value.std().item() / std - 1) < 4 / (2 * n) ** 0.5, name


def test_any_region_is_the_slice_of_the_whole():
    for spec in (InitSpec("normal", (6, 10), b=0.02), InitSpec("uniform", (9,), a=-1, b=1),
                 InitSpec("normal", (4, 3, 5), b=1.0)):
        whole = init_values(spec, 7, "w")
        region = [(1, 3)] + [(1, len_) for len_ in spec.shape[1:]]
        part = init_values(spec, 7, "w", region)
        assert torch.equal(part, whole[tuple(slice(a, b) for a, b in region)])
        # The seed and the name both matter; rows differ from each other.
        assert not torch.equal(whole, init_values(spec, 8, "w"))
        assert not torch.equal(whole, init_values(spec, 7, "w2"))
    rows = init_values(InitSpec("normal", (2, 50), b=1.0), 7, "w")
    assert not torch.equal(rows[0], rows[1])


def test_a_parameter_without_an_init_function_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.empty(3))

    with recording_init(), torch.device("meta"):
        module = Odd()
    with pytest.raises(ValueError, match="scale"):
        init_specs(module)
