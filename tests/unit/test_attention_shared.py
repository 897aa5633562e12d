"""Work shared by the attention layers of one forward (issue 10, part 3):
ALiBi slopes once per device in fp32, the bias once per forward in fp32 and
added in fp32 under bf16 autocast, RoPE cos/sin once per forward, GQA through
SDPA's enable_gqa. Outputs are held to the slow references (written-out
probabilities, GQA by repetition)."""
import pytest
import torch
import torch.nn.functional as F

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model import attention as attention_mod
from moe_train.model import positional
from moe_train.model.attention import Attention
from moe_train.model.transformer import Transformer


def model_cfg(position_embedding, **kw):
    base = dict(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                max_seq_len=64, position_embedding=position_embedding)
    base.update(kw)
    return ModelConfig(**base)


def test_alibi_bias_at_distance_4095_and_4096_stays_distinct_under_bf16_autocast():
    # One head: slope 2^-8. Distances 4095 and 4096 give biases -15.996 and
    # -16.0; bf16 (8 mantissa bits, spacing 0.0625 below 16) rounds both to
    # -16, which is the failure this guards against.
    assert torch.tensor(-4095 / 256).bfloat16() == torch.tensor(-16.0).bfloat16()
    attn = Attention(model_cfg("alibi", hidden_size=8, num_heads=1, num_kv_heads=1,
                               max_seq_len=8192))
    positions = torch.arange(4095, 4097)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared = attn.shared_inputs(q_len=2, kv_len=4097, positions=positions,
                                    dtype=torch.bfloat16)
    mask = shared.mask                            # [H=1, 2 queries (4095, 4096), 4097 keys]
    assert mask.dtype == torch.float32 and mask.shape == (1, 2, 4097)
    d4096, d4095 = mask[0, 1, 0], mask[0, 1, 1]   # query 4096 against keys 0 and 1
    assert d4096 == -16.0 and d4095 == -4095 / 256 and d4096 != d4095
    assert mask[0, 0, 4096] == float("-inf")      # causal: query 4095 does not see key 4096


class Recorder:
    """Wraps a function and records its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


def test_alibi_added_in_fp32_under_autocast_and_built_once_per_forward(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(model_cfg("alibi"), MoEConfig())
    sdpa = Recorder(F.scaled_dot_product_attention)
    bias = Recorder(attention_mod.alibi_bias_rows)
    slopes = Recorder(attention_mod.alibi_slopes)
    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(attention_mod, "alibi_bias_rows", bias)
    monkeypatch.setattr(attention_mod, "alibi_slopes", slopes)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids).logits
            model(ids)
    assert len(bias.calls) == 3           # once per forward, not once per layer
    assert len(slopes.calls) == 1         # once, then cached on the device
    assert len(sdpa.calls) == 9
    for args, kwargs in sdpa.calls:       # q, k, v and the bias all fp32, also under autocast
        assert kwargs["attn_mask"].dtype == torch.float32
        assert all(t.dtype == torch.float32 for t in args[:3])
    # bf16 projections around an fp32 attention: the logits stay within bf16
    # rounding of the fp32 model (3 layers of bf16 matmuls of width 32,
    # relative error a few 2^-8 each; logits are O(0.1) at init_std 0.02).
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.02)


def test_rope_tables_once_per_forward(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(model_cfg("rope"), MoEConfig())
    calls = Recorder(positional.RotaryEmbedding.cos_sin)
    monkeypatch.setattr(positional.RotaryEmbedding, "cos_sin",
                        lambda self, *a, **kw: calls(self, *a, **kw))
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        model(ids)
    assert len(calls.calls) == 1
    # The same layer alone computes its own tables: same output as inside the model.
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        shared = attn.shared_inputs(10, 10, torch.arange(10), torch.float32)
        torch.testing.assert_close(attn(x, shared=shared), attn(x), rtol=0, atol=0)


@pytest.mark.parametrize("position_embedding", ["rope", "alibi"])
def test_gqa_goes_through_enable_gqa_and_equals_the_repeated_reference(monkeypatch,
                                                                       position_embedding):
    torch.manual_seed(1)
    attn = Attention(model_cfg(position_embedding, num_heads=4, num_kv_heads=2))
    sdpa = Recorder(F.scaled_dot_product_attention)
    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", sdpa)
    x = torch.randn(2, 7, 32)
    out = attn(x)
    (q, k, v), kwargs = sdpa.calls[0][0][:3], sdpa.calls[0][1]
    assert kwargs["enable_gqa"] is True
    assert q.shape[1] == 4 and k.shape[1] == 2 and v.shape[1] == 2   # no repeated copy
    # forward_reference repeats K and V and writes the softmax out.
    torch.testing.assert_close(out, attn.forward_reference(x), rtol=1e-5, atol=1e-6)
