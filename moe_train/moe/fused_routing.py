"""Token-choice routing (softmax, then top-K) with its balancing and z-losses
as one autograd Function.

Why: after the logits matmul the router is a chain of some thirty tiny ops
and their autograd nodes (two softmaxes, top-K, the renormalisation, the
counts, the balancing loss, the z-loss), each with a fixed cost before any
work is done. Here the forward computes the softmax once and the backward
is one closed form (docs/performance.md §4 has the measured gain). It is
written out by hand from three facts:

- top-K's backward scatters the gate gradient into a zero [T, E];
- softmax's backward is ``p * (g - sum(g * p))``;
- d logsumexp(l) / dl = softmax(l), so the z-loss adds ``2 c lse_t / T * p``.

The z-loss reuses the softmax: the top-1 probability is the largest, so
``lse = l_max - log(p_max)`` with ``l_max`` the logit of the top-1 expert.

The plain autograd path (``TokenChoiceRouter`` with ``fused = False``) is the
reference; tests/unit/test_fused_routing.py holds the two to fp32 rounding on
every output and gradient.

Legend: T tokens, E experts, K top-k, G balancing groups (1 for
Switch, the batch rows for the per-sequence loss), n = T / G.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class FusedRouting:
    """What :func:`softmax_topk_routing` returns."""

    expert_ids_TK: torch.Tensor
    """[T, K] long, no gradient."""
    gates_TK: torch.Tensor
    """[T, K] fp32: the chosen probabilities, renormalised if asked."""
    probs_TE: torch.Tensor
    """[T, E] fp32 softmax(logits), detached."""
    selected_E: torch.Tensor
    """[E] long: top-K selections per expert, no gradient."""
    balance_loss: Optional[torch.Tensor]
    """0-d weighted balancing loss (Switch or per-sequence), or None."""
    z_loss: Optional[torch.Tensor]
    """0-d weighted z-loss, or None."""


class _SoftmaxTopK(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits_TE, top_k, normalize, groups, balance_coef, z_coef):
        T, E = logits_TE.shape
        probs_TE = logits_TE.softmax(-1)
        top_TK, ids_TK = probs_TE.topk(top_k, dim=-1)
        gates_TK = top_TK / top_TK.sum(-1, keepdim=True) if normalize else top_TK
        ids_GN = ids_TK.view(groups, -1)
        counts_GE = torch.zeros(groups, E, dtype=torch.long, device=logits_TE.device)
        counts_GE.scatter_add_(1, ids_GN, torch.ones_like(ids_GN))
        selected_E = counts_GE[0] if groups == 1 else counts_GE.sum(0)
        f_GE = None
        balance = logits_TE.new_zeros(())
        if balance_coef is not None:
            # DeepSeek's f (Switch's f times E, per group): E/(K n) * count.
            f_GE = counts_GE.to(probs_TE.dtype) * (E / (top_k * (T // groups)))
            P_GE = probs_TE.view(groups, T // groups, E).mean(1)
            balance = balance_coef * (f_GE * P_GE).sum(-1).mean()
        lse_T = None
        z = logits_TE.new_zeros(())
        if z_coef is not None:
            lse_T = logits_TE.gather(-1, ids_TK[:, :1]).squeeze(1) - top_TK[:, 0].log()
            z = z_coef * lse_T.square().mean()
        ctx.mark_non_differentiable(ids_TK, probs_TE, selected_E)
        ctx.save_for_backward(probs_TE, ids_TK, top_TK, gates_TK, f_GE, lse_T)
        ctx.cfg = (normalize, groups, balance_coef, z_coef)
        return gates_TK, ids_TK, probs_TE, selected_E, balance, z

    @staticmethod
    def backward(ctx, grad_gates_TK, _ids, _probs, _selected, grad_balance, grad_z):
        probs_TE, ids_TK, top_TK, gates_TK, f_GE, lse_T = ctx.saved_tensors
        normalize, groups, balance_coef, z_coef = ctx.cfg
        T, E = probs_TE.shape
        grad_top_TK = grad_gates_TK
        if normalize:
            # g = p / s with s = sum p: dg_j/dp_i = (delta_ij - g_j) / s.
            grad_top_TK = ((grad_gates_TK - (grad_gates_TK * gates_TK).sum(-1, keepdim=True))
                           / top_TK.sum(-1, keepdim=True))
        grad_probs_TE = torch.zeros_like(probs_TE).scatter_(-1, ids_TK, grad_top_TK)
        if f_GE is not None:
            # d/dp_te of coef * mean_g sum_e f_ge * mean_{t in g} p_te.
            per_row_GE = f_GE * (grad_balance * balance_coef / T)
            grad_probs_TE.view(groups, T // groups, E).add_(per_row_GE.unsqueeze(1))
        inner_TE = grad_probs_TE - (grad_probs_TE * probs_TE).sum(-1, keepdim=True)
        if lse_T is not None:
            inner_TE += (lse_T * (grad_z * 2.0 * z_coef / T)).unsqueeze(-1)
        return probs_TE * inner_TE, None, None, None, None, None


def softmax_topk_routing(logits_TE: torch.Tensor, top_k: int, normalize: bool,
                         balance_groups: int = 1, balance_coef: Optional[float] = None,
                         z_coef: Optional[float] = None) -> FusedRouting:
    """Route by fp32 router logits ``logits_TE`` (which keep their autograd
    graph: the router's matmul). Gates are the top ``top_k`` of
    softmax(logits), divided by their sum if ``normalize``. ``balance_coef``
    adds the balancing loss over ``balance_groups`` equal runs of rows (1:
    Switch Eq 4-6 with K choices; the batch rows: DeepSeek-V3's per-sequence
    loss); ``z_coef`` the ST-MoE z-loss."""
    T = logits_TE.shape[0]
    if T % balance_groups:
        raise ValueError(f"{T} tokens do not split into {balance_groups} balancing groups")
    gates, ids, probs, selected, balance, z = _SoftmaxTopK.apply(
        logits_TE, top_k, normalize, balance_groups, balance_coef, z_coef)
    return FusedRouting(expert_ids_TK=ids, gates_TK=gates, probs_TE=probs,
                        selected_E=selected,
                        balance_loss=balance if balance_coef is not None else None,
                        z_loss=z if z_coef is not None else None)
