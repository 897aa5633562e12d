"""permute.py and LocalDispatcher against plain Python loops; the per-expert
block versions (permute_chunks / unpermute_chunks) against permute / unpermute."""
import pytest
import torch

from moe_train.moe.dispatcher import LocalDispatcher
from moe_train.moe.permute import (chunk_sort_index, inverse_index, make_permutation, permute,
                                   permute_chunks, sort_by_expert, unpermute, unpermute_chunks)
from moe_train.moe.routing import RoutingDecision


def make_decision(token_index, expert_index, num_tokens, num_experts, seed=0, weight=None):
    g = torch.Generator().manual_seed(seed)
    token_index = torch.tensor(token_index, dtype=torch.long)
    expert_index = torch.tensor(expert_index, dtype=torch.long)
    if weight is None:
        weight = torch.rand(len(token_index), generator=g) + 0.1
    logits = torch.randn(num_tokens, num_experts, generator=g)
    return RoutingDecision(token_index=token_index, expert_index=expert_index,
                           weight=weight.clone().requires_grad_(True), logits=logits,
                           probs=logits.softmax(-1), num_experts=num_experts,
                           dropped_fraction=torch.tensor(0.0))


def random_assignments(T, E, K, seed, keep=1.0):
    """K distinct experts per token, then a random subset kept (like capacity drops)."""
    g = torch.Generator().manual_seed(seed)
    tok, exp = [], []
    for t in range(T):
        for e in torch.randperm(E, generator=g)[:K].tolist():
            if torch.rand((), generator=g).item() < keep:
                tok.append(t)
                exp.append(e)
    return tok, exp


def loop_sorted(token_index, expert_index, num_experts):
    """Assignment ids grouped by expert, decision order inside each expert."""
    return [n for e in range(num_experts) for n in range(len(expert_index)) if expert_index[n] == e]


@pytest.mark.parametrize("T,E,K,keep", [(7, 4, 2, 1.0), (12, 5, 3, 0.6), (5, 8, 1, 1.0)])
def test_sort_is_stable_and_counts_match_loop(T, E, K, keep):
    tok, exp = random_assignments(T, E, K, seed=T + E, keep=keep)
    order, counts = sort_by_expert(torch.tensor(exp, dtype=torch.long), E)
    assert order.tolist() == loop_sorted(tok, exp, E)
    assert counts.tolist() == [exp.count(e) for e in range(E)]
    assert counts.dtype == torch.long


@pytest.mark.parametrize("T,E,K,keep", [(7, 4, 2, 1.0), (12, 5, 3, 0.6), (6, 16, 4, 0.8)])
def test_permute_and_unpermute_match_loops_with_gradients(T, E, K, keep):
    D = 3
    tok, exp = random_assignments(T, E, K, seed=3 * T + K, keep=keep)
    decision = make_decision(tok, exp, T, E, seed=1)
    x = torch.randn(T, D, requires_grad=True)
    perm = make_permutation(decision, T)
    x_routed = permute(x, perm)
    order = loop_sorted(tok, exp, E)
    expected_rows = torch.stack([x[tok[n]] for n in order]) if order else x.new_zeros(0, D)
    torch.testing.assert_close(x_routed, expected_rows, rtol=0, atol=0)

    # A function of the rows that differs per row, so un-sorting to the wrong
    # token would change the result.
    y_routed = x_routed * torch.arange(1, len(order) + 1, dtype=x.dtype).unsqueeze(-1)
    y = unpermute(y_routed, perm)
    y_loop = [torch.zeros(D) for _ in range(T)]
    for i, n in enumerate(order):
        y_loop[tok[n]] = y_loop[tok[n]] + decision.weight[n] * x[tok[n]] * (i + 1)
    y_loop = torch.stack(y_loop)
    torch.testing.assert_close(y, y_loop)

    probe = torch.randn(T, D)
    gx, gw = torch.autograd.grad((y * probe).sum(), (x, decision.weight))
    gx_ref, gw_ref = torch.autograd.grad((y_loop * probe).sum(), (x, decision.weight))
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
    assert gw.abs().sum() > 0  # the router learns through the gates


def test_round_trip_with_unit_weights_returns_tokens():
    # Every token once, weight 1: combine(dispatch(x)) == x, rows in expert order.
    T, E, D = 9, 4, 5
    exp = [(3 * t) % E for t in range(T)]
    decision = make_decision(list(range(T)), exp, T, E, weight=torch.ones(T))
    x = torch.randn(T, D)
    d = LocalDispatcher()
    x_routed, counts, meta = d.dispatch(x, decision)
    assert counts.tolist() == [exp.count(e) for e in range(E)]
    # One block per expert, block e as long as expert e's count.
    assert [b.shape[0] for b in x_routed] == counts.tolist()
    rows = torch.cat(x_routed)
    assert [int(torch.nonzero((x == r).all(-1))) for r in rows] == loop_sorted(range(T), exp, E)
    torch.testing.assert_close(d.combine(x_routed, meta), x, rtol=0, atol=0)
    # combine still takes the packed [N,D] layout (the all-to-all path's).
    torch.testing.assert_close(d.combine(rows, meta), x, rtol=0, atol=0)

    # K experts per token with weight 1/K each also gives x back.
    K = 3
    tok, exp = random_assignments(T, E, K, seed=5)
    decision = make_decision(tok, exp, T, E, weight=torch.full((len(tok),), 1.0 / K))
    x_routed, counts, meta = d.dispatch(x, decision)
    assert int(counts.sum()) == T * K
    torch.testing.assert_close(d.combine(x_routed, meta), x)


def test_dropped_tokens_get_zero_and_empty_decision_works():
    T, E, D = 4, 3, 2
    decision = make_decision([0, 2, 2], [1, 0, 2], T, E)
    x = torch.randn(T, D)
    d = LocalDispatcher()
    x_routed, counts, meta = d.dispatch(x, decision)
    y = d.combine(x_routed, meta)
    assert y[1].abs().sum() == 0 and y[3].abs().sum() == 0
    assert y[0].abs().sum() > 0

    empty = make_decision([], [], T, E)
    x_routed, counts, meta = d.dispatch(x, empty)
    assert [b.shape for b in x_routed] == [(0, D)] * E and counts.tolist() == [0, 0, 0]
    y = d.combine(x_routed, meta)
    assert y.shape == (T, D) and y.abs().sum() == 0


def test_combine_sums_in_fp32_when_gates_are_fp32():
    T, E, D = 3, 2, 4
    decision = make_decision([0, 0, 1], [0, 1, 1], T, E)
    x = torch.randn(T, D, dtype=torch.bfloat16)
    d = LocalDispatcher()
    x_routed, _, meta = d.dispatch(x, decision)
    y = d.combine(x_routed, meta)
    assert y.dtype == torch.float32
    expected = decision.weight[0] * x[0].float() + decision.weight[1] * x[0].float()
    torch.testing.assert_close(y[0], expected)
    # The packed path sums in fp32 too, to the same values.
    y_packed = unpermute(torch.cat(x_routed), meta)
    assert y_packed.dtype == torch.float32
    torch.testing.assert_close(y, y_packed)


# ---------------------------------------------------------------------------- per-expert blocks

# Hand-built: experts 1 and 4 get no rows, token 0 has three experts, token 5
# two, token 3 none; assignments deliberately not in expert order.
HAND = ([0, 2, 0, 5, 1, 0, 5, 4], [3, 0, 2, 2, 3, 0, 0, 2], 6, 5)


def chunk_cases():
    yield "hand", HAND
    for T, E, K, keep in [(7, 4, 2, 1.0), (12, 5, 3, 0.6), (6, 16, 4, 0.8), (3, 8, 1, 1.0)]:
        tok, exp = random_assignments(T, E, K, seed=7 * T + E, keep=keep)
        yield f"T{T}E{E}K{K}keep{keep}", (tok, exp, T, E)
    yield "empty", ([], [], 4, 3)


CHUNK_CASES = dict(chunk_cases())


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_permute_chunks_equals_permute_split_with_gradients(case):
    tok, exp, T, E = CHUNK_CASES[case]
    D = 3
    decision = make_decision(tok, exp, T, E, seed=2)
    perm = make_permutation(decision, T)
    counts = perm.tokens_per_expert_E.tolist()
    x = torch.randn(T, D, requires_grad=True)
    blocks = permute_chunks(x, perm)
    assert [b.shape for b in blocks] == [(n, D) for n in counts]
    ref_blocks = torch.split(permute(x, perm), counts)
    for b, r in zip(blocks, ref_blocks):
        torch.testing.assert_close(b, r, rtol=0, atol=0)

    # A different probe per block, so a gradient sent back to the wrong token
    # (or from the wrong block) changes the result.
    probes = [torch.randn(n, D) for n in counts]
    gx = torch.autograd.grad(sum((b * p).sum() for b, p in zip(blocks, probes)), x)[0]
    gx_ref = torch.autograd.grad((permute(x, perm) * torch.cat(probes)).sum(), x)[0]
    torch.testing.assert_close(gx, gx_ref)
    dropped = sorted(set(range(T)) - set(tok))
    assert gx[dropped].abs().sum() == 0  # tokens nobody routed get no gradient


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_unpermute_chunks_equals_unpermute_with_gradients(case):
    tok, exp, T, E = CHUNK_CASES[case]
    D = 3
    decision = make_decision(tok, exp, T, E, seed=3)
    perm = make_permutation(decision, T)
    counts = perm.tokens_per_expert_E.tolist()
    blocks = [torch.randn(n, D, requires_grad=True) for n in counts]
    packed = torch.cat([b.detach() for b in blocks]).requires_grad_(True)

    y = unpermute_chunks(blocks, perm)
    y_ref = unpermute(packed, perm)
    torch.testing.assert_close(y, y_ref)

    probe = torch.randn(T, D)
    # retain_graph: both paths read the gates through perm.weight_N, one graph.
    g_blocks = torch.autograd.grad((y * probe).sum(), blocks + [decision.weight],
                                   allow_unused=True, retain_graph=True)
    g_packed, g_w_ref = torch.autograd.grad((y_ref * probe).sum(), (packed, decision.weight),
                                            allow_unused=True)
    *g_blocks, g_w = g_blocks
    # Every block gets a gradient, empty ones included: an expert with no
    # rows must still reach its weights (zero gradient, not None).
    assert all(g is not None for g in g_blocks)
    for g, r in zip(g_blocks, torch.split(g_packed, counts)):
        torch.testing.assert_close(g, r)
    if tok:
        torch.testing.assert_close(g_w, g_w_ref)
        assert g_w.abs().sum() > 0  # the gates learn


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_chunked_round_trip_equals_packed_round_trip(case):
    # The whole local path with a row-dependent function between dispatch and
    # combine, blocks against packed, outputs and gradients wrt x and gates.
    tok, exp, T, E = CHUNK_CASES[case]
    D = 4
    decision = make_decision(tok, exp, T, E, seed=4)
    x = torch.randn(T, D, requires_grad=True)
    perm = make_permutation(decision, T)
    counts = perm.tokens_per_expert_E.tolist()
    scale_N = torch.arange(1, sum(counts) + 1, dtype=x.dtype).unsqueeze(-1)
    scale_blocks = torch.split(scale_N, counts)

    y = unpermute_chunks([torch.tanh(b) * s for b, s in zip(permute_chunks(x, perm), scale_blocks)],
                         perm)
    y_ref = unpermute(torch.tanh(permute(x, perm)) * scale_N, perm)
    torch.testing.assert_close(y, y_ref)
    if not tok:
        assert y.abs().sum() == 0
        return
    probe = torch.randn(T, D)
    g = torch.autograd.grad((y * probe).sum(), (x, decision.weight), retain_graph=True)
    g_ref = torch.autograd.grad((y_ref * probe).sum(), (x, decision.weight))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_unpermute_chunks_sums_in_fp32_like_unpermute():
    tok, exp, T, E = HAND
    D = 6
    decision = make_decision(tok, exp, T, E, seed=5)
    perm = make_permutation(decision, T)
    counts = perm.tokens_per_expert_E.tolist()
    blocks = [torch.randn(n, D).to(torch.bfloat16) for n in counts]
    y = unpermute_chunks(blocks, perm)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, unpermute(torch.cat(blocks), perm))
    # All-bf16 (bf16 gates too) stays bf16, as unpermute.
    perm.weight_N = perm.weight_N.detach().to(torch.bfloat16)
    assert unpermute_chunks(blocks, perm).dtype == torch.bfloat16


def test_unpermute_chunks_rejects_wrong_blocks():
    tok, exp, T, E = HAND
    perm = make_permutation(make_decision(tok, exp, T, E), T)
    counts = perm.tokens_per_expert_E.tolist()
    blocks = [torch.randn(n, 2) for n in counts]
    with pytest.raises(ValueError, match="one block per expert"):
        unpermute_chunks(blocks[:-1], perm)
    with pytest.raises(ValueError, match="rows"):
        unpermute_chunks(blocks[:-1] + [torch.randn(counts[-1] + 1, 2)], perm)


@pytest.mark.parametrize("counts", [[[2, 0, 1], [1, 3, 0]], [[0, 0], [0, 0]], [[1], [2], [3], [0]],
                                    [[4, 1, 0, 2]]])
def test_chunk_sort_index_regroups_rank_major_to_expert_major(counts):
    counts_RL = torch.tensor(counts, dtype=torch.long)
    R, L = counts_RL.shape
    # Label each received row by (source rank, local expert, position in its chunk).
    labels = [(r, l, i) for r in range(R) for l in range(L) for i in range(counts[r][l])]
    expected = sorted(range(len(labels)), key=lambda j: (labels[j][1], labels[j][0], labels[j][2]))
    index = chunk_sort_index(counts_RL)
    assert index.tolist() == expected
    rows = torch.arange(len(labels)) * 10
    assert rows[index][inverse_index(index)].tolist() == rows.tolist()
