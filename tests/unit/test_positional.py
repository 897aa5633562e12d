"""RoPE against the pairwise rotation formula and transformers' reference code."""
import math

import pytest
import torch
from torch import nn

from moe_train.config import RopeScalingConfig
from moe_train.model.positional import RotaryEmbedding, rope

BASE = 10000.0


def reference_rope(x, positions, rotary_dim, layout, thetas=None, base=BASE, attn_factor=1.0):
    """Slow reference: loop over positions and rotary pairs, rotate each pair
    (a, b) by angle p*theta_i with cos/sin in float64 Python math."""
    B, S, H, d = x.shape
    if positions.dim() == 1:
        positions = positions.expand(B, S)
    if thetas is None:
        thetas = [base ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)]
    out = x.clone()
    for b in range(B):
        for s in range(S):
            p = float(positions[b, s])
            for i, theta in enumerate(thetas):
                ia, ib = (i, i + rotary_dim // 2) if layout == "half" else (2 * i, 2 * i + 1)
                c, sn = math.cos(p * theta) * attn_factor, math.sin(p * theta) * attn_factor
                xa, xb = x[b, s, :, ia], x[b, s, :, ib]
                out[b, s, :, ia] = xa * c - xb * sn
                out[b, s, :, ib] = xa * sn + xb * c
    return out


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("batched_positions", [False, True])
def test_rope_matches_pairwise_formula_outputs_and_grads(layout, batched_positions):
    torch.manual_seed(0)
    B, S, Hq, Hk, d = 2, 5, 3, 1, 8
    q = torch.randn(B, S, Hq, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, S, Hk, d, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[0, 1, 2, 7, 40], [3, 4, 5, 6, 1000]]) if batched_positions \
        else torch.tensor([0, 1, 2, 7, 1000])
    rq, rk = RotaryEmbedding(d, layout=layout)(q, k, positions)
    eq, ek = reference_rope(q, positions, d, layout), reference_rope(k, positions, d, layout)
    torch.testing.assert_close(rq, eq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rk, ek, rtol=1e-5, atol=1e-5)

    gq, gk = torch.randn_like(rq), torch.randn_like(rk)
    fast = torch.autograd.grad((rq * gq).sum() + (rk * gk).sum(), (q, k))
    slow = torch.autograd.grad((eq * gq).sum() + (ek * gk).sum(), (q, k))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layouts_differ_and_functional_rope_matches_module():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    pos = torch.arange(4)
    half = rope(q, k, pos, layout="half")
    inter = rope(q, k, pos, layout="interleaved")
    assert not torch.allclose(half[0], inter[0])
    mod = RotaryEmbedding(8, layout="interleaved")(q, k, pos)
    torch.testing.assert_close(inter[0], mod[0], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_scores_depend_only_on_relative_position(layout):
    torch.manual_seed(0)
    d = 16
    rotary = RotaryEmbedding(d, layout=layout)
    q = torch.randn(1, 1, 1, d, dtype=torch.float64)
    k = torch.randn(1, 1, 1, d, dtype=torch.float64)

    def score(m, n):
        rq, _ = rotary(q, q, torch.tensor([m]))
        _, rk = rotary(k, k, torch.tensor([n]))
        return (rq * rk).sum().item()

    for m, n, shift in [(5, 2, 7), (3, 3, 100), (0, 9, 31)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-6, abs=1e-6)  # fp32 tables
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_partial_rotary_leaves_the_rest_untouched(layout):
    torch.manual_seed(0)
    d, fraction = 16, 0.5  # ChatGLM: half the head dims rotate
    q, k = torch.randn(2, 6, 2, d), torch.randn(2, 6, 2, d)
    pos = torch.arange(6) * 3
    rq, rk = rope(q, k, pos, layout=layout, rotary_fraction=fraction)
    r = int(d * fraction)
    assert torch.equal(rq[..., r:], q[..., r:]) and torch.equal(rk[..., r:], k[..., r:])
    # theta_i = base^(-2i/r) with r the rotary dims, not the head dim.
    torch.testing.assert_close(rq, reference_rope(q, pos, r, layout), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rq[..., :r], q[..., :r])


def test_bf16_autocast_keeps_neighbouring_positions_apart():
    torch.manual_seed(0)
    d = 8
    model = nn.Module()
    model.rotary = RotaryEmbedding(d)
    model.proj = nn.Linear(d, d)
    model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert "rotary.inv_freq" not in model.state_dict()

    q = torch.randn(1, 1, 1, d).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r256, _ = model.rotary(q, q, torch.tensor([256]))
        r257, _ = model.rotary(q, q, torch.tensor([257]))
    assert r256.dtype == torch.bfloat16
    # The fastest pair turns by 1 radian between 256 and 257: a bf16 table
    # (where 257 == 256) would give identical outputs.
    assert not torch.equal(r256, r257)
    ref257 = reference_rope(q.double(), torch.tensor([257]), d, "half")
    ref256 = reference_rope(q.double(), torch.tensor([256]), d, "half")
    torch.testing.assert_close(r257.double(), ref257, rtol=2e-2, atol=2e-2)
    assert (r257.double() - ref256).abs().max() > 0.1


# ----------------------------------------------------------------------------
# Scaling: against the formulas and against transformers

HEAD_DIM, L0 = 16, 32


def hf_config(rope_parameters, max_position_embeddings=L0, head_dim=HEAD_DIM):
    from transformers import LlamaConfig
    params = dict(rope_theta=BASE, **rope_parameters)
    return LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                       max_position_embeddings=max_position_embeddings, vocab_size=8,
                       intermediate_size=8, num_hidden_layers=1, rope_parameters=params)


def hf_init(rope_parameters, **kw):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    seq_len = kw.pop("seq_len", None)
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](
        hf_config(rope_parameters, **kw), "cpu", seq_len=seq_len)


def formula_inv_freq(base, r):
    return torch.tensor([base ** (-2 * i / r) for i in range(r // 2)], dtype=torch.float64)


def test_linear_scaling_divides_positions():
    s = 4.0
    rotary = RotaryEmbedding(HEAD_DIM, scaling={"type": "linear", "factor": s})
    torch.testing.assert_close(rotary.inv_freq.double(), formula_inv_freq(BASE, HEAD_DIM) / s)
    hf_inv_freq, hf_factor = hf_init({"rope_type": "linear", "factor": s})
    torch.testing.assert_close(rotary.inv_freq, hf_inv_freq)
    assert rotary.attention_factor == hf_factor == 1.0
    # Position interpolation: position p under factor s is position p/s unscaled.
    q = torch.randn(1, 3, 1, HEAD_DIM)
    scaled, _ = rotary(q, q, torch.tensor([4, 8, 12]))
    plain, _ = rope(q, q, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(scaled, plain)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_ntk_scaling_base_formula_and_transformers_dynamic_equivalent(fraction):
    s = 3.0
    r = int(HEAD_DIM * fraction)
    rotary = RotaryEmbedding(HEAD_DIM, rotary_fraction=fraction,
                             scaling=RopeScalingConfig(type="ntk", factor=s))
    torch.testing.assert_close(rotary.inv_freq.double(),
                               formula_inv_freq(BASE * s ** (r / (r - 2)), r))
    # transformers has no static NTK; its dynamic NTK at length L uses the
    # static formula with s_eff = s_dyn*L/L0 - (s_dyn - 1): s_dyn=2, L=2*L0 -> 3.
    hf_inv_freq, _ = hf_init({"rope_type": "dynamic", "factor": 2.0,
                              "partial_rotary_factor": fraction}, seq_len=2 * L0)
    torch.testing.assert_close(rotary.inv_freq, hf_inv_freq)


def test_dynamic_ntk_grows_base_with_length_like_transformers():
    s = 2.0
    rotary = RotaryEmbedding(HEAD_DIM, scaling={"type": "dynamic", "factor": s,
                                                "original_max_position_embeddings": L0})
    plain = formula_inv_freq(BASE, HEAD_DIM)
    for length in (8, L0):  # up to the trained length nothing changes
        torch.testing.assert_close(rotary.inv_freq_for(length).double(), plain)
    for length in (L0 + 1, 3 * L0):
        base = BASE * (s * length / L0 - (s - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
        ours = rotary.inv_freq_for(length)
        torch.testing.assert_close(ours.double(), formula_inv_freq(base, HEAD_DIM))
        hf_inv_freq, _ = hf_init({"rope_type": "dynamic", "factor": s}, seq_len=length)
        torch.testing.assert_close(ours, hf_inv_freq)
    # The module picks the length from the positions it sees.
    q = torch.randn(1, 3 * L0, 1, HEAD_DIM)
    pos = torch.arange(3 * L0)
    thetas = rotary.inv_freq_for(3 * L0).double().tolist()
    torch.testing.assert_close(rotary(q, q, pos)[0],
                               reference_rope(q, pos, HEAD_DIM, "half", thetas=thetas),
                               rtol=1e-4, atol=1e-4)


def test_dynamic_takes_trained_length_from_max_seq_len():
    a = RotaryEmbedding(HEAD_DIM, scaling={"type": "dynamic", "factor": 2.0}, max_seq_len=L0)
    b = RotaryEmbedding(HEAD_DIM, scaling={"type": "dynamic", "factor": 2.0,
                                           "original_max_position_embeddings": L0})
    torch.testing.assert_close(a.inv_freq_for(100), b.inv_freq_for(100))
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RotaryEmbedding(HEAD_DIM, scaling={"type": "yarn", "factor": 2.0})


def yarn_formula(base, r, s, original, beta_fast, beta_slow):
    """YaRN NTK-by-parts written from the paper (Sec 3.2, Eq 17-18) with the
    reference code's floor/ceil of the ramp ends."""
    def dim_of(rotations):  # dim whose wavelength fits `rotations` times in L
        return r * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))
    lo, hi = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), r - 1)
    out = []
    for i in range(r // 2):
        theta = base ** (-2 * i / r)
        gamma = 1.0 - min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 1 keeps theta, 0 interpolates
        out.append((1 - gamma) * theta / s + gamma * theta)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("attention_factor", [None, 1.3])
def test_yarn_inv_freq_and_attention_factor(fraction, attention_factor):
    s, original, d = 8.0, 64, 64
    r = int(d * fraction)
    cfg = RopeScalingConfig(type="yarn", factor=s, original_max_position_embeddings=original,
                            beta_fast=32.0, beta_slow=1.0, attention_factor=attention_factor)
    rotary = RotaryEmbedding(d, rotary_fraction=fraction, scaling=cfg)
    expected = yarn_formula(BASE, r, s, original, 32.0, 1.0)
    torch.testing.assert_close(rotary.inv_freq.double(), expected)
    # the ramp really mixes: some dims keep theta, some are divided by s
    plain = formula_inv_freq(BASE, r)
    assert torch.isclose(expected[0], plain[0]) and torch.isclose(expected[-1], plain[-1] / s)
    want_factor = 0.1 * math.log(s) + 1.0 if attention_factor is None else attention_factor
    assert rotary.attention_factor == pytest.approx(want_factor)

    params = {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": original,
              "beta_fast": 32.0, "beta_slow": 1.0, "partial_rotary_factor": fraction}
    if attention_factor is not None:
        params["attention_factor"] = attention_factor
    hf_inv_freq, hf_factor = hf_init(params, max_position_embeddings=int(original * s), head_dim=d)
    torch.testing.assert_close(rotary.inv_freq, hf_inv_freq)
    assert rotary.attention_factor == pytest.approx(hf_factor)

    # cos/sin carry the factor, the pass-through dims do not.
    q = torch.randn(1, 2, 1, d)
    out, _ = rotary(q, q, torch.tensor([0, 0]))
    torch.testing.assert_close(out[..., :r], q[..., :r] * want_factor)
    assert torch.equal(out[..., r:], q[..., r:])


@pytest.mark.parametrize("params", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L0},
], ids=lambda p: p["rope_type"])
def test_half_layout_end_to_end_against_transformers_llama(params):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    torch.manual_seed(0)
    S = 3 * L0  # beyond the trained length, so dynamic NTK kicks in
    hf_rotary = LlamaRotaryEmbedding(hf_config(params, max_position_embeddings=L0 if
                                               params["rope_type"] != "yarn" else 4 * L0))
    pos = torch.arange(S)
    q, k = torch.randn(2, S, 2, HEAD_DIM), torch.randn(2, S, 1, HEAD_DIM)
    cos, sin = hf_rotary(q, pos[None].expand(2, S))
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)

    scaling = None
    if params["rope_type"] != "default":
        scaling = {"type": params["rope_type"], "factor": params["factor"],
                   "original_max_position_embeddings": params.get("original_max_position_embeddings")}
    ours_q, ours_k = RotaryEmbedding(HEAD_DIM, scaling=scaling, max_seq_len=L0)(q, k, pos)
    torch.testing.assert_close(ours_q, hf_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_k, hf_k, rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="layout"):
        RotaryEmbedding(8, layout="neox")
    with pytest.raises(ValueError, match="rotary"):
        RotaryEmbedding(8, rotary_fraction=0.1)
    with pytest.raises(ValueError, match="unknown keys"):
        RotaryEmbedding(8, scaling={"type": "linear", "factor": 2.0, "alpha": 1})
    with pytest.raises(ValueError, match="scaling type"):
        RotaryEmbedding(8, scaling={"type": "longrope", "factor": 2.0})
