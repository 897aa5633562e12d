"""Capacity formula and the keep-mask of each priority order."""
import math

import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.moe.capacity import (capacity_keep_mask, capacity_keep_mask_reference,
                                    expert_choice_k, priority_order, token_capacity)
from moe_train.moe.router import TokenChoiceRouter


def test_token_capacity_formula():
    # ceil(c*T*K/E), floored at min_capacity; None is dropless.
    assert token_capacity(64, 2, 8, 1.0) == 16
    assert token_capacity(64, 2, 8, 1.25) == 20
    assert token_capacity(10, 1, 4, 1.0) == 3             # ceil(2.5)
    assert token_capacity(10, 1, 4, 1.0, min_capacity=4) == 4
    assert token_capacity(10, 1, 4, None) is None
    # 1.1 * 10 is 11.000000000000002 in floats: must still be 11.
    assert token_capacity(10, 1, 1, 1.1) == 11


def test_expert_choice_k_rounding():
    assert expert_choice_k(8, 4, None) == 4                # paper default c = 2
    assert expert_choice_k(10, 4, 1.1) == 3               # ceil(2.75)
    assert expert_choice_k(3, 4, 1.0) == 1                # ceil(0.75)
    assert expert_choice_k(2, 4, 0.1) == 1                # clamped up to 1
    assert expert_choice_k(2, 1, 2.0) == 2                # clamped down to the group size


def test_priority_order_position_and_gshard():
    B, S, K = 2, 3, 2
    pos = priority_order(B, S, K, "position").tolist()
    expected = [(b * S + s) * K + k for s in range(S) for k in range(K) for b in range(B)]
    assert pos == expected
    gsh = priority_order(B, S, K, "gshard").tolist()
    assert gsh == [t * K + k for k in range(K) for t in range(B * S)]
    assert sorted(pos) == sorted(gsh) == list(range(B * S * K))


def test_hand_example_each_order():
    # B=1, S=3, K=2, E=2, two slots per expert.
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    # position: s0 takes e0,e1; s1 takes e1,e0 (both now full); s2 loses both.
    want_pos = torch.tensor([[True, True], [True, True], [False, False]])
    # gshard: first choices t0:e0 t1:e1 t2:e0, then t0's e1 fills e1; t1's e0 and t2's e1 drop.
    want_gsh = torch.tensor([[True, True], [True, False], [True, False]])
    for fn in (capacity_keep_mask, capacity_keep_mask_reference):
        assert torch.equal(fn(ids, 2, 2, 1, 3, "position"), want_pos)
        assert torch.equal(fn(ids, 2, 2, 1, 3, "gshard"), want_gsh)


@pytest.mark.parametrize("priority", ["position", "gshard"])
def test_vectorised_keep_mask_matches_loop(priority):
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        B = int(torch.randint(1, 4, (1,), generator=g))
        S = int(torch.randint(1, 7, (1,), generator=g))
        E = int(torch.randint(2, 6, (1,), generator=g))
        K = int(torch.randint(1, E + 1, (1,), generator=g))
        # Distinct experts per token, as top-k gives.
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * S)])
        cap = int(torch.randint(0, B * S + 1, (1,), generator=g))
        fast = capacity_keep_mask(ids, E, cap, B, S, priority)
        slow = capacity_keep_mask_reference(ids, E, cap, B, S, priority)
        assert torch.equal(fast, slow), (trial, priority)
        # Each expert keeps min(capacity, requested) assignments.
        for e in range(E):
            asked = int((ids == e).sum())
            assert int(((ids == e) & fast).sum()) == min(cap, asked)


def test_dropless_keeps_all():
    ids = torch.randint(0, 4, (12, 2))
    assert capacity_keep_mask(ids, 4, None, 3, 4).all()


@pytest.mark.parametrize("priority", ["position", "gshard"])
def test_router_drops_exactly_what_the_rule_says(priority):
    torch.manual_seed(1)
    B, S, D, E, K, c = 3, 5, 8, 4, 2, 0.75
    cfg = MoEConfig(num_experts=E, top_k=K, hidden_size=D, capacity_factor=c,
                    capacity_priority=priority, min_capacity=1)
    router = TokenChoiceRouter(cfg).eval()
    x = torch.randn(B * S, D)
    d = router(x, B, S)
    # Independent top-K: loop over tokens, sort the softmax by hand.
    logits = (x.double() @ router.weight.double().t())
    ids = []
    for t in range(B * S):
        p = torch.softmax(logits[t], -1).tolist()
        ids.append(sorted(range(E), key=lambda e: -p[e])[:K])
    ids = torch.tensor(ids)
    cap = max(1, math.ceil(c * B * S * K / E))
    keep = capacity_keep_mask_reference(ids, E, cap, B, S, priority)
    want = {(t, int(ids[t, k])) for t in range(B * S) for k in range(K) if keep[t, k]}
    got = set(zip(d.token_index.tolist(), d.expert_index.tolist()))
    assert got == want and len(got) == d.token_index.numel()
    n_dropped = B * S * K - int(keep.sum())
    assert n_dropped > 0  # the setting must actually exercise dropping
    assert d.dropped_fraction.item() == pytest.approx(n_dropped / (B * S * K))
    assert int(d.tokens_per_expert().max()) <= cap


def test_router_dropless_keeps_every_assignment():
    torch.manual_seed(2)
    B, S, D, E, K = 2, 6, 8, 4, 2
    router = TokenChoiceRouter(MoEConfig(num_experts=E, top_k=K, hidden_size=D))
    d = router(torch.randn(B * S, D), B, S)
    assert d.token_index.numel() == B * S * K
    assert d.dropped_fraction.item() == 0.0
    assert torch.equal(torch.bincount(d.token_index, minlength=B * S), torch.full((B * S,), K))
