"""A whole model in bf16 (autocast, or cast with .to(bfloat16)) stays within
the bf16 error of its fp32 twin, and the two places that must stay fp32 do:
the router (Switch Table 2) and the RoPE tables (at position 4000 bf16 cannot
tell neighbouring positions apart). Each check is shown to fail when the
router or the RoPE tables run in bf16 (negative controls by monkeypatching).

Tolerances: tests/bf16_tolerance.py derives them from bf16's epsilon 2^-8
and the reduction lengths.
"""
import copy

import pytest
import torch

from bf16_tolerance import bf16_atol, rms
from moe_train.config import ModelConfig, MoEConfig
from moe_train.model import positional
from moe_train.model.transformer import build_model
from moe_train.moe import router as router_mod

B, S, START = 2, 12, 4000


def _model():
    torch.manual_seed(0)
    # init_std 0.25 at width 32: O(1) activations and attention scores, so
    # the RoPE angles decide the attention pattern and errors are relative
    # to O(1) outputs. top_k = num_experts: gates are continuous (no top-k
    # tie can flip between the bf16 and the fp32 run).
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=32, max_seq_len=64, init_std=0.25)
    return build_model(cfg, MoEConfig(num_experts=4, top_k=4, aux_loss="none"))


def _run(model, ids, positions, autocast):
    calls = []

    def hook(module, args, decision):
        calls.append((module, args[0].detach(), decision.logits.detach()))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, router_mod.TokenChoiceRouter)]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids, positions).logits.float()
    finally:
        for h in handles:
            h.remove()
    return logits, calls


def _router_error(calls):
    """Largest |router logits - fp64 logits of the same input| over calls,
    relative to the logits' rms."""
    worst = 0.0
    for module, x, logits in calls:
        ref = x.double() @ module.weight.detach().double().t()
        worst = max(worst, float((logits.double() - ref).abs().max()) / rms(ref))
    return worst


def _record_tables(tables):
    """Wrap RotaryEmbedding.cos_sin (whatever it is now) to record its output."""
    inner = positional.RotaryEmbedding.cos_sin

    def spy(self, positions, dtype):
        cos, sin = inner(self, positions, dtype)
        tables.append((self, positions, cos, sin))
        return cos, sin
    return spy


def _table_error(tables):
    """Largest |RoPE table - fp64 formula| (theta_i = base^(-2i/r), RoFormer)."""
    worst = 0.0
    for rotary, positions, cos, sin in tables:
        r = rotary.rotary_dim
        inv_freq = 1.0 / rotary.base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
        angles = positions.double()[..., None] * inv_freq
        worst = max(worst, float((cos.double() - angles.cos()).abs().max()),
                    float((sin.double() - angles.sin()).abs().max()))
    return worst


def _check(mode):
    """(logits error / tolerance, router relative error, RoPE table error)."""
    fp32 = _model().eval()
    ids = torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(START, START + S)
    if mode == "cast":
        low = copy.deepcopy(fp32).to(torch.bfloat16)
        # The reference holds the same bf16-rounded weights in fp32, so that
        # only the arithmetic differs.
        fp32 = copy.deepcopy(low).float()
        assert low.blocks[0].attn.rotary.inv_freq.dtype == torch.float32
    else:
        low = fp32
    want, _ = _run(fp32, ids, positions, autocast=False)
    tables = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(positional.RotaryEmbedding, "cos_sin", _record_tables(tables))
        got, calls = _run(low, ids, positions, autocast=(mode == "autocast"))
    assert tables and tables[0][2].dtype == torch.bfloat16
    assert len(calls) == 2 and calls[0][2].dtype == torch.float32
    assert rms(want) > 0.5
    # Path of one logit: per block attention (q/k/v, q.k, p.v, wo) and a
    # SwiGLU expert (w1, w3, w2): 7 matmuls, 2 blocks, the LM head: 15.
    # Roundings of intermediate results: autocast rounds the matmul outputs
    # (3 attention + 3 expert per block) and silu*product (2): 16 and the
    # logits; .to(bfloat16) also rounds every norm, RoPE product, softmax,
    # residual add and gate product: about 18 per block, 38 in all.
    roundings = 17 if mode == "autocast" else 38
    tol = bf16_atol(want, matmuls=15, roundings=roundings)
    return float((got - want).abs().max()) / tol, _router_error(calls), _table_error(tables)


@pytest.mark.parametrize("mode", ["autocast", "cast"])
def test_bf16_model_within_bf16_error_with_fp32_router_and_rope(mode):
    logits_ratio, router_err, table_err = _check(mode)
    assert logits_ratio <= 1.0
    # fp32 router: only fp32 summation order separates it from fp64.
    assert router_err < 1e-5
    # fp32 angles (|angle| <= 4011: error <= 4011 * 2^-24 = 2.4e-4) then one
    # rounding of cos/sin to bf16 (<= 2^-8 * 1): within 2^-8 + 2.4e-4.
    assert table_err <= 2 ** -8 + 2.4e-4


def _bf16_cos_sin(self, positions, dtype):
    # What a bf16 table computes: positions and frequencies rounded to bf16
    # (4000..4011 collapse onto 4000 and 4032: spacing 32 there).
    pos = positions.to(torch.bfloat16)
    angles = pos[..., None] * self.inv_freq_for(None, positions.device).to(torch.bfloat16)
    return ((angles.float().cos() * self.attention_factor).to(dtype),
            (angles.float().sin() * self.attention_factor).to(dtype))


def _bf16_logits(x_TD, weight_ED):
    return (x_TD.bfloat16() @ weight_ED.bfloat16().t()).float()


@pytest.mark.parametrize("mode", ["autocast", "cast"])
def test_the_checks_fail_when_router_or_rope_run_in_bf16(mode, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(positional.RotaryEmbedding, "cos_sin", _bf16_cos_sin)
        _, _, table_err = _check(mode)
    assert table_err > 0.1, "a bf16 RoPE table went unnoticed"
    with monkeypatch.context() as m:
        m.setattr(router_mod, "_fp32_logits", _bf16_logits)
        _, router_err, _ = _check(mode)
    assert router_err > 1e-3, "a bf16 router went unnoticed"
