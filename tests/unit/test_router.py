"""Routers against loop references, Mixtral's router, precision, noise and
causal safety."""
import math
import warnings
from fractions import Fraction

import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.moe.router import ExpertChoiceRouter, TokenChoiceRouter, build_router

B, S, D, E = 2, 6, 8, 4


def _cfg(**kw):
    base = dict(num_experts=E, top_k=2, hidden_size=D)
    base.update(kw)
    return MoEConfig(**base)


def _as_dict(d):
    return {(t, e): w for t, e, w in zip(d.token_index.tolist(), d.expert_index.tolist(),
                                         d.weight.tolist())}


def _topk_loop(logits, K, order, normalize):
    """Per token, by hand: sort experts by score, keep K, form the gates."""
    out = {}
    for t, row in enumerate(logits.tolist()):
        chosen = sorted(range(len(row)), key=lambda e: -row[e])[:K]
        if order == "softmax_then_topk":
            z = sum(math.exp(v) for v in row)
            gates = [math.exp(row[e]) / z for e in chosen]
            if normalize and K > 1:  # Switch top-1 keeps the raw probability
                gates = [g / sum(gates) for g in gates]
        else:
            z = sum(math.exp(row[e]) for e in chosen)
            gates = [math.exp(row[e]) / z for e in chosen]
        out.update({(t, e): g for e, g in zip(chosen, gates)})
    return out


def _assert_same_routing(got, want, tol=1e-5):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol), key


@pytest.mark.parametrize("order,normalize", [("softmax_then_topk", True), ("softmax_then_topk", False),
                                             ("topk_then_softmax", True)])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_token_choice_matches_loop(order, normalize, K):
    torch.manual_seed(K)
    router = TokenChoiceRouter(_cfg(top_k=K, score_order=order, normalize_topk=normalize))
    x = torch.randn(B * S, D)
    d = router(x, B, S)
    want = _topk_loop(x.double() @ router.weight.double().t(), K, order, normalize)
    _assert_same_routing(_as_dict(d), want)
    assert d.probs.shape == (B * S, E) and d.num_experts == E


def test_topk_then_softmax_matches_transformers_mixtral():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    torch.manual_seed(0)
    mix = MixtralTopKRouter(MixtralConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=2))
    ours = TokenChoiceRouter(_cfg(score_order="topk_then_softmax"))
    with torch.no_grad():
        mix.weight.copy_(ours.weight)
    x = torch.randn(B * S, D)
    logits, scores, indices = mix(x)
    want = {(t, int(indices[t, k])): float(scores[t, k].detach()) for t in range(B * S) for k in range(2)}
    _assert_same_routing(_as_dict(ours(x, B, S)), want)
    # Mixtral's own route (softmax over all, top-k, renormalise) is the same
    # function as ours with softmax_then_topk + normalize_topk.
    same = TokenChoiceRouter(_cfg(score_order="softmax_then_topk", normalize_topk=True))
    with torch.no_grad():
        same.weight.copy_(ours.weight)
    _assert_same_routing(_as_dict(same(x, B, S)), want)


def test_token_choice_gradients_match_loop():
    torch.manual_seed(1)
    router = TokenChoiceRouter(_cfg(top_k=2, aux_loss="none"))
    x = torch.randn(B * S, D)
    d = router(x, B, S)
    coeffs = torch.randn(d.weight.shape)
    (d.weight * coeffs).sum().backward()
    W = router.weight.detach().clone().requires_grad_(True)
    total = 0.0
    for i, (t, e) in enumerate(zip(d.token_index.tolist(), d.expert_index.tolist())):
        p = torch.softmax(x[t] @ W.t(), -1)
        top = p.topk(2).indices.tolist()
        total = total + coeffs[i] * p[e] / sum(p[j] for j in top)
    total.backward()
    assert torch.allclose(router.weight.grad, W.grad, atol=1e-6)


def test_router_logits_fp32_under_bf16_autocast():
    torch.manual_seed(2)
    x = torch.randn(B * S, D).bfloat16()
    for router in (TokenChoiceRouter(_cfg()), ExpertChoiceRouter(_cfg(router="expert_choice"))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d = router(x, B, S)
        ref = x.float() @ router.weight.t()
        assert d.logits.dtype == d.probs.dtype == d.weight.dtype == torch.float32
        assert torch.allclose(d.logits, ref, atol=1e-6, rtol=1e-6)
        # A bf16 router would have failed the check above.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = (x @ router.weight.t()).float()
        assert not torch.allclose(low, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("router_kind", ["token_choice", "expert_choice"])
def test_jitter_only_in_training(router_kind):
    torch.manual_seed(3)
    router = build_router(_cfg(router=router_kind, jitter_eps=0.2))
    x = torch.randn(B * S, D)
    clean = x @ router.weight.t()
    router.train()
    a, b = router(x, B, S), router(x, B, S)
    assert not torch.equal(a.logits, b.logits)
    # Multiplicative jitter within [1-eps, 1+eps] moves logits at most eps*|x||w|.
    bound = 0.2 * (x.abs() @ router.weight.abs().t())
    assert ((a.logits - clean).abs() <= bound + 1e-6).all()
    router.eval()
    c, d = router(x, B, S), router(x, B, S)
    assert torch.equal(c.logits, d.logits) and torch.equal(c.weight, d.weight)
    assert torch.allclose(c.logits, clean, atol=1e-6)


def test_noisy_gating_zero_init_formula_and_eval_determinism():
    router = TokenChoiceRouter(_cfg(noisy_gating=True, aux_loss="none"))
    assert (router.weight == 0).all() and (router.noise_weight == 0).all()
    torch.manual_seed(4)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.noise_weight.normal_(0, 0.3)
    x = torch.randn(B * S, D)
    clean = x @ router.weight.t()
    std = torch.nn.functional.softplus(x @ router.noise_weight.t())
    router.train()
    torch.manual_seed(5)
    d = router(x, B, S)
    torch.manual_seed(5)
    H = clean + torch.randn(B * S, E) * std  # Shazeer Eq 4
    _assert_same_routing(_as_dict(d), _topk_loop(H.double(), 2, "topk_then_softmax", True))
    assert torch.allclose(d.logits, clean, atol=1e-6)  # logits are reported before noise
    assert _as_dict(d) != _as_dict(router(x, B, S))  # fresh noise each call
    router.eval()
    e1, e2 = router(x, B, S), router(x, B, S)
    assert _as_dict(e1) == _as_dict(e2)
    _assert_same_routing(_as_dict(e1), _topk_loop(clean.double(), 2, "topk_then_softmax", True))


# ---------------------------------------------------------------- expert choice

def _ec_slots(p, batch, n_exp, c):
    """Tokens each expert takes at absolute position p, by walking the
    assignment slots: slot j of the sequence belongs to expert j mod E and
    position p owns slots [floor(p*B*c), floor((p+1)*B*c)) (exact fractions)."""
    rate = batch * Fraction(str(c))
    k = [0] * n_exp
    for j in range(math.floor(p * rate), math.floor((p + 1) * rate)):
        k[j % n_exp] += 1
    return [min(v, batch) for v in k]


def _ec_loop(probs, batch, seq, group, c, offset=0):
    """Each expert takes its k highest-scoring tokens of each group, by sorting."""
    T, n_exp = probs.shape
    groups = ([[b * seq + s for b in range(batch)] for s in range(seq)] if group == "position"
              else [list(range(T))])
    out, ks = {}, []
    for s, members in enumerate(groups):
        if group == "position":
            k_e = _ec_slots(offset + s, batch, n_exp, c)
        else:
            k_e = [min(len(members), max(1, math.ceil(len(members) * c / n_exp)))] * n_exp
        ks.append(k_e)
        for e in range(n_exp):
            best = sorted(members, key=lambda t: -float(probs[t, e]))[:k_e[e]]
            out.update({(t, e): float(probs[t, e]) for t in best})
    return out, groups, ks


@pytest.mark.parametrize("group", ["position", "batch"])
@pytest.mark.parametrize("c", [None, 1.0, 0.5, 1.25])
def test_expert_choice_top_k_per_expert_per_group(group, c):
    torch.manual_seed(6)
    batch, seq, offset = 5, 4, 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        router = ExpertChoiceRouter(_cfg(router="expert_choice", expert_choice_group=group,
                                         capacity_factor=c))
    x = torch.randn(batch * seq, D)
    d = router(x, batch, seq, torch.arange(offset, offset + seq))
    probs = torch.softmax(x.double() @ router.weight.detach().double().t(), -1)
    want, groups, ks = _ec_loop(probs, batch, seq, group, 2.0 if c is None else c, offset)
    got = _as_dict(d)
    _assert_same_routing(got, want)
    assert len(got) == d.token_index.numel()  # no duplicate (token, expert) pairs
    for members, k_e in zip(groups, ks):
        for e in range(E):
            assert sum(1 for (t, ee) in got if ee == e and t in members) == k_e[e]
    unchosen = sum(1 for t in range(batch * seq) if not any((t, e) in got for e in range(E)))
    assert d.dropped_fraction.item() == pytest.approx(unchosen / (batch * seq))


@pytest.mark.parametrize("n_exp", [8, 64])
@pytest.mark.parametrize("batch", [1, 2, 4, 8])
@pytest.mark.parametrize("c", [1.0, 2.0])
def test_expert_choice_costs_c_experts_per_token(n_exp, batch, c):
    # Zhou et al.: E experts x k tokens = T*c assignments, i.e. c expert MLPs
    # per token. Rounding k = B*c/E up to 1 at every position used to give
    # E*k/B (64 experts per token at E=64, B=1). Over a sequence the mean must
    # be c within 1/E, and every expert must get its share within one token.
    seq = 32
    torch.manual_seed(batch)
    router = ExpertChoiceRouter(MoEConfig(num_experts=n_exp, hidden_size=D, router="expert_choice",
                                          capacity_factor=c))
    d = router(torch.randn(batch * seq, D), batch, seq)
    per_token = d.token_index.numel() / (batch * seq)
    assert abs(per_token - c) <= 1 / n_exp, per_token
    load = torch.bincount(d.expert_index, minlength=n_exp).float()
    assert (load - batch * seq * c / n_exp).abs().max() <= 1.0
    # Every position stays causal-safe and never gives one expert a token twice.
    pairs = set(zip(d.token_index.tolist(), d.expert_index.tolist()))
    assert len(pairs) == d.token_index.numel()


@pytest.mark.parametrize("batch", [1, 3])
def test_expert_choice_decode_step_routes_like_full_forward(batch):
    # Generation runs one position at a time (B rows, S=1) at absolute
    # position s; it must route exactly as position s of one full forward.
    torch.manual_seed(10)
    seq, n_exp = 12, 8
    router = ExpertChoiceRouter(MoEConfig(num_experts=n_exp, hidden_size=D, router="expert_choice",
                                          capacity_factor=1.0)).eval()
    x = torch.randn(batch, seq, D)
    full = _as_dict(router(x.reshape(-1, D), batch, seq))
    for s in range(seq):
        step = router(x[:, s].reshape(-1, D), batch, 1, torch.tensor([s]))
        got = {(b * seq + s, e): w for (b, e), w in _as_dict(step).items()}
        want = {(t, e): w for (t, e), w in full.items() if t % seq == s}
        # Same (token, expert) pairs; gates equal up to the matmul's blocking.
        _assert_same_routing(got, want, tol=1e-6)


def test_expert_choice_gates_carry_gradient():
    torch.manual_seed(7)
    router = ExpertChoiceRouter(_cfg(router="expert_choice"))
    x = torch.randn(B * S, D)
    d = router(x, B, S)
    coeffs = torch.randn(d.weight.shape)
    (d.weight * coeffs).sum().backward()
    W = router.weight.detach().clone().requires_grad_(True)
    probs = torch.softmax(x @ W.t(), -1)
    (probs[d.token_index, d.expert_index] * coeffs).sum().backward()
    assert torch.allclose(router.weight.grad, W.grad, atol=1e-6)


def test_expert_choice_batch_group_warns():
    with pytest.warns(UserWarning, match="leaks the future"):
        ExpertChoiceRouter(_cfg(router="expert_choice", expert_choice_group="batch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ExpertChoiceRouter(_cfg(router="expert_choice", expert_choice_group="position"))


# ---------------------------------------------------------------- causal safety

def _past_routing(d, seq, s):
    keep = (d.token_index % seq) <= s
    rows = zip(d.token_index[keep].tolist(), d.expert_index[keep].tolist(), d.weight[keep].tolist())
    return sorted(rows)


def _future_changes_past(router, batch=3, seq=8, seed=0):
    """For each s, rewrite every token after position s (all rows) and report
    whether any (token, expert, weight) at positions <= s changed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, D, generator=g)
    base = router(x.view(-1, D), batch, seq)
    changed = []
    for s in range(seq - 1):
        y = x.clone()
        # Large future inputs give confident routing: they compete hard for slots.
        y[:, s + 1:] = 4 * torch.randn(batch, seq - s - 1, D, generator=g)
        after = router(y.view(-1, D), batch, seq)
        a, b = _past_routing(base, seq, s), _past_routing(after, seq, s)
        same = len(a) == len(b) and all(
            r1[:2] == r2[:2] and abs(r1[2] - r2[2]) < 1e-6 for r1, r2 in zip(a, b))
        changed.append(not same)
    return changed


def _leaky(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_router(cfg).eval()


def test_causal_safe_token_choice_position_priority():
    torch.manual_seed(8)
    router = build_router(_cfg(capacity_factor=0.5, capacity_priority="position")).eval()
    assert not any(_future_changes_past(router))


def test_causal_test_detects_gshard_priority_leak():
    torch.manual_seed(8)
    router = _leaky(_cfg(capacity_factor=0.5, capacity_priority="gshard"))
    assert any(_future_changes_past(router))


@pytest.mark.parametrize("n_exp,c", [(E, None), (8, 1.0), (8, 0.5)])
def test_causal_safe_expert_choice_position_group(n_exp, c):
    # (8, 1.0) and (8, 0.5): B*c/E < 1, experts take turns by position.
    torch.manual_seed(9)
    router = build_router(_cfg(router="expert_choice", expert_choice_group="position",
                               num_experts=n_exp, capacity_factor=c)).eval()
    assert not any(_future_changes_past(router))


def test_causal_test_detects_expert_choice_batch_group_leak():
    torch.manual_seed(9)
    router = _leaky(_cfg(router="expert_choice", expert_choice_group="batch"))
    assert any(_future_changes_past(router))


def test_build_router_rejects_unknown_and_checks_tokens():
    with pytest.raises(ValueError, match="moe.router"):
        build_router(_cfg(router="hash"))
    with pytest.raises(ValueError, match="batch\\*seq"):
        build_router(_cfg())(torch.randn(5, D), 2, 3)
