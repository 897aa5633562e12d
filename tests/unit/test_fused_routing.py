"""The fused token-choice router (moe/fused_routing.py) against the plain
autograd router it replaces, on every output and gradient."""
import itertools

import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.moe import fused_routing
from moe_train.moe.router import TokenChoiceRouter

B, S, D, E = 3, 5, 8, 6


def _route(router, x, fused, upstream_seed=1):
    """Decision and the gradients of x and the router weight under a random
    upstream gradient on the gates plus 3x each loss."""
    router.fused = fused
    router.zero_grad()
    x = x.detach().clone().requires_grad_()
    d = router(x, B, S)
    g = torch.randn(d.weight.shape, generator=torch.Generator().manual_seed(upstream_seed))
    loss = (d.weight * g).sum() + 3 * sum(d.losses.values(), torch.zeros(()))
    loss.backward()
    return d, x.grad, router.weight.grad.clone()


CASES = list(itertools.product([1, 2, 3], [True, False], ["switch", "sequence", "none"],
                               [0.0, 1e-2], [None, 1.0]))


@pytest.mark.parametrize("K,normalize,aux,z,capacity", CASES)
def test_fused_router_matches_plain_autograd(K, normalize, aux, z, capacity):
    torch.manual_seed(K)
    cfg = MoEConfig(num_experts=E, top_k=K, hidden_size=D, normalize_topk=normalize,
                    aux_loss=aux, z_loss_coef=z, capacity_factor=capacity, aux_loss_coef=0.1)
    router = TokenChoiceRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 1)  # logits of order 1: gradients well away from zero
    x = torch.randn(B * S, D)
    fused, gx_f, gw_f = _route(router, x, True)
    plain, gx_p, gw_p = _route(router, x, False)
    for name in ("token_index", "expert_index", "selected_per_expert"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    for name in ("weight", "logits", "probs", "dropped_fraction"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), rtol=1e-5, atol=1e-7)
    assert list(fused.losses) == list(plain.losses)
    for name in plain.losses:
        torch.testing.assert_close(fused.losses[name], plain.losses[name], rtol=1e-5, atol=1e-8)
    # Each gradient entry sums O(1) terms that cancel: the error bound is
    # fp32 rounding of the largest terms, not of the entry itself.
    for got, want in ((gx_f, gx_p), (gw_f, gw_p)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_default_router_takes_the_fused_path(monkeypatch):
    calls = []
    real = fused_routing._SoftmaxTopK.apply
    monkeypatch.setattr(fused_routing._SoftmaxTopK, "apply",
                        lambda *a: calls.append(1) or real(*a))
    router = TokenChoiceRouter(MoEConfig(num_experts=E, top_k=2, hidden_size=D))
    router(torch.randn(B * S, D), B, S)
    assert calls == [1]
    router.fused = False
    router(torch.randn(B * S, D), B, S)
    assert calls == [1]


def test_z_loss_from_the_top_probability_is_exact_for_large_logits():
    # lse = l_max - log(p_max) must agree with logsumexp where exp(l) overflows.
    x = torch.randn(64, D, dtype=torch.float64).float()
    w = (torch.randn(E, D) * 40).requires_grad_()
    logits = x @ w.t()
    r = fused_routing.softmax_topk_routing(logits, 2, True, z_coef=1.0)
    lse = torch.logsumexp((x.double() @ w.detach().double().t()), -1)
    assert logits.abs().max() > 100  # exp overflows fp32 here
    torch.testing.assert_close(r.z_loss.double(), lse.square().mean(), rtol=1e-5, atol=0)
    r.z_loss.backward()
    w_ref = w.detach().double().requires_grad_()
    torch.logsumexp(x.double() @ w_ref.t(), -1).square().mean().backward()
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=1e-4, atol=1e-6)


def test_groups_must_divide_the_tokens():
    with pytest.raises(ValueError, match="balancing groups"):
        fused_routing.softmax_topk_routing(torch.randn(10, E), 2, True,
                                           balance_groups=3, balance_coef=0.1)
