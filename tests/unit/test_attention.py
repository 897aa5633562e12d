"""ALiBi slopes, attention probabilities against explicit loops, GQA and
tensor-parallel-style head slices."""
import math

import pytest
import torch
from torch import nn

from moe_train.config import ModelConfig, RopeConfig
from moe_train.model.attention import Attention
from moe_train.model.positional import alibi_slopes


def reference_slopes(n):
    # The rule of Press et al.'s get_slopes, written as the card states it.
    def pow2(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
    if math.log2(n).is_integer():
        return pow2(n)
    p = 2 ** int(math.floor(math.log2(n)))
    return pow2(p) + pow2(2 * p)[0::2][: n - p]


@pytest.mark.parametrize("n,expected", [
    (8, [2.0 ** -h for h in range(1, 9)]),
    (12, [2.0 ** -h for h in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]),
    (16, [2.0 ** (-h / 2) for h in range(1, 17)]),
    (20, [2.0 ** (-h / 2) for h in range(1, 17)] + [2 ** -0.25, 2 ** -0.75, 2 ** -1.25, 2 ** -1.75]),
])
def test_alibi_slopes(n, expected):
    assert alibi_slopes(n).dtype == torch.float32
    torch.testing.assert_close(alibi_slopes(n), torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(alibi_slopes(n), torch.tensor(reference_slopes(n), dtype=torch.float32))


def cfg(**kw):
    base = dict(hidden_size=24, num_heads=6, num_kv_heads=3, position_embedding="alibi",
                max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def loop_attention(attn, x, bias_form="reference"):
    """Explicit loops over heads, queries i and keys j <= i:
    p_ij = softmax_j(q_i . k_j / sqrt(d) + bias), out = sum_j p_ij v_j, then wo.
    ALiBi uses the reference code's +m*j form (same softmax as -m*(i-j))."""
    B, S, _ = x.shape
    H, G, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.wq.weight.T).view(B, S, H, d)
    k = (x @ attn.wk.weight.T).view(B, S, G, d)
    v = (x @ attn.wv.weight.T).view(B, S, G, d)
    slopes = reference_slopes(attn.total_heads)[attn.head_offset: attn.head_offset + H]
    probs = torch.zeros(B, H, S, S, dtype=x.dtype)
    heads_out = []
    for b in range(B):
        rows = []
        for i in range(S):
            cols = []
            for h in range(H):
                g = h // (H // G)
                scores = torch.stack([(q[b, i, h] * k[b, j, g]).sum() / math.sqrt(d)
                                      + slopes[h] * j for j in range(i + 1)])
                p = torch.softmax(scores, dim=0)
                probs[b, h, i, : i + 1] = p.detach()
                cols.append(sum(p[j] * v[b, j, g] for j in range(i + 1)))
            rows.append(torch.cat(cols))
        heads_out.append(torch.stack(rows))
    return torch.stack(heads_out) @ attn.wo.weight.T, probs


def test_alibi_attention_probs_and_output_match_loops():
    torch.manual_seed(0)
    attn = Attention(cfg()).double()
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    want_out, want_probs = loop_attention(attn, x)
    torch.testing.assert_close(attn.attention_probs(x).double(), want_probs, rtol=1e-6, atol=1e-6)
    out = attn(x)  # the SDPA path
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)

    g = torch.randn_like(out)
    params = [x, attn.wq.weight, attn.wk.weight, attn.wv.weight, attn.wo.weight]
    fast = torch.autograd.grad((out * g).sum(), params)
    slow = torch.autograd.grad((want_out * g).sum(), params)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_sdpa_path_equals_reference_path_outputs_and_grads(pe):
    torch.manual_seed(1)
    attn = Attention(cfg(position_embedding=pe,
                         rope=RopeConfig(layout="interleaved", rotary_fraction=0.5)))
    x = torch.randn(2, 9, 24, requires_grad=True)
    out, ref = attn(x), attn.forward_reference(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [x] + list(attn.parameters())
    for a, b in zip(torch.autograd.grad((out * g).sum(), params),
                    torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_attention_is_causal(pe):
    torch.manual_seed(2)
    attn = Attention(cfg(position_embedding=pe))
    x = torch.randn(1, 8, 24)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 24)
    torch.testing.assert_close(attn(x)[:, :5], attn(y)[:, :5])
    assert not torch.allclose(attn(x)[:, 5:], attn(y)[:, 5:])


def test_grouped_query_attention_equals_mha_with_repeated_kv():
    torch.manual_seed(3)
    gqa = Attention(cfg(position_embedding="rope", num_kv_heads=2))
    assert gqa.wk.weight.shape == (2 * 4, 24) and gqa.wq.weight.shape == (6 * 4, 24)
    mha = Attention(cfg(position_embedding="rope", num_kv_heads=6))
    d = gqa.head_dim
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(2, d, 24)
            getattr(mha, name).weight.copy_(w.repeat_interleave(3, dim=0).reshape(6 * d, 24))
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-6)


def shard(full, tp_size, rank):
    """Mimic tensor parallelism: keep this rank's heads in smaller projections."""
    part = Attention(cfg())
    part.shard_heads(tp_size, rank)
    d, H, G = full.head_dim, part.num_heads, part.num_kv_heads
    q_rows = slice(rank * H * d, (rank + 1) * H * d)
    kv_rows = slice(rank * G * d, (rank + 1) * G * d)
    D = full.wq.weight.shape[1]
    part.wq, part.wk, part.wv = (nn.Linear(D, H * d, bias=False), nn.Linear(D, G * d, bias=False),
                                 nn.Linear(D, G * d, bias=False))
    part.wo = nn.Linear(H * d, D, bias=False)
    with torch.no_grad():
        part.wq.weight.copy_(full.wq.weight[q_rows])
        part.wk.weight.copy_(full.wk.weight[kv_rows])
        part.wv.weight.copy_(full.wv.weight[kv_rows])
        part.wo.weight.copy_(full.wo.weight[:, q_rows])
    return part


def test_head_offset_slice_matches_full_module():
    torch.manual_seed(4)
    full = Attention(cfg())  # 6 heads: non-power-of-two slopes
    x = torch.randn(2, 6, 24)
    parts = [shard(full, 3, r) for r in range(3)]
    assert [(p.num_heads, p.num_kv_heads, p.head_offset) for p in parts] == [(2, 1, 0), (2, 1, 2), (2, 1, 4)]
    full_probs = full.attention_probs(x)
    for r, part in enumerate(parts):
        torch.testing.assert_close(part.alibi_slopes(), alibi_slopes(6)[2 * r: 2 * r + 2])
        torch.testing.assert_close(part.attention_probs(x), full_probs[:, 2 * r: 2 * r + 2])
    # Row-parallel wo: the partial outputs add up to the full output.
    torch.testing.assert_close(sum(p(x) for p in parts), full(x), rtol=1e-5, atol=1e-6)
    # A shard that forgot its offset would take the wrong slopes.
    parts[2].head_offset = 0
    assert not torch.allclose(parts[2].attention_probs(x), full_probs[:, 4:6])


def test_projection_width_disagreeing_with_head_counts_fails_loudly():
    attn = Attention(cfg())
    attn.num_heads = 3  # e.g. a TP wrapper that swapped layers but not counts
    with pytest.raises(RuntimeError):
        attn(torch.randn(1, 4, 24))


def test_megatron_style_tuple_outputs_are_accepted():
    class TupleLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x), None

    torch.manual_seed(5)
    attn = Attention(cfg(position_embedding="rope"))
    x = torch.randn(1, 4, 24)
    want = attn(x)
    for name in ("wq", "wk", "wv", "wo"):
        old = getattr(attn, name)
        new = TupleLinear(old.in_features, old.out_features, bias=False)
        new.weight = old.weight
        setattr(attn, name, new)
    torch.testing.assert_close(attn(x), want)


def test_bf16_attention_runs_and_matches_fp32():
    from bf16_tolerance import bf16_atol, rms

    torch.manual_seed(6)
    for pe in ("rope", "alibi"):
        attn = Attention(cfg(position_embedding=pe))
        for lin in (attn.wq, attn.wk, attn.wv, attn.wo):
            # Weights of std 1/sqrt(fan_in): O(1) activations and scores, so
            # that a relative error means something (the 0.02 init gives
            # outputs ~1e-2, under any absolute tolerance worth writing).
            torch.nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
        x = torch.randn(2, 16, 24)
        want = attn(x)
        assert rms(want) > 0.3
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = attn(x)
        # Path of one output: q/k/v projection, q.k, p.v, wo = 4 matmuls
        # (reductions 24, 4, <= 16, 24); roundings of q, k, v after RoPE and
        # of the probabilities: 4 (bf16_tolerance.py has the derivation).
        tol = bf16_atol(want, matmuls=4, roundings=4, reduction=24)
        torch.testing.assert_close(got.float(), want, rtol=0, atol=tol)
