"""Permutation between token order and expert order: pure local index math.

Nothing here communicates. The local dispatcher is just `permute` then
`unpermute`; the all-to-all dispatcher puts its two exchanges between them
and reuses `chunk_sort_index` to regroup what it receives.

Legend: T tokens, D hidden, E experts (global), L local experts of a rank,
R ranks, N kept (token, expert) assignments, M rows received by a rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_train.moe.routing import RoutingDecision


@dataclass
class Permutation:
    """How a decision's assignments were sorted by expert, so combine can undo it.

    Routed row i is assignment ``order_N[i]`` of the decision; it reads token
    ``token_index_N[i]`` and is scaled by ``weight_N[i]`` in combine. Rows are
    grouped by global expert in increasing order, so the experts of EP rank r
    (the block [r*E/ep, (r+1)*E/ep)) form one contiguous run of rows.
    """

    order_N: torch.Tensor
    """[N] long: decision assignment held by each routed row."""
    token_index_N: torch.Tensor
    """[N] long: token each routed row reads, in routed order."""
    weight_N: torch.Tensor
    """[N] gate of each routed row, in routed order (keeps its autograd graph)."""
    tokens_per_expert_E: torch.Tensor
    """[E] long: routed rows per global expert."""
    num_tokens: int
    """T: rows of the output of unpermute."""


def sort_by_expert(expert_index_N: torch.Tensor, num_experts: int):
    """Stable sort of assignments by expert.

    Returns ``(order_N, tokens_per_expert_E)``. Stability keeps assignments of
    one expert in decision order, which makes the routed layout deterministic
    and lets tests compare it with a plain loop.
    """
    order_N = torch.argsort(expert_index_N, stable=True)
    tokens_per_expert_E = torch.bincount(expert_index_N, minlength=num_experts)
    return order_N, tokens_per_expert_E


def make_permutation(decision: RoutingDecision, num_tokens: int) -> Permutation:
    """Sort the kept assignments of ``decision`` by global expert."""
    order_N, tokens_per_expert_E = sort_by_expert(decision.expert_index, decision.num_experts)
    return Permutation(
        order_N=order_N,
        token_index_N=decision.token_index.index_select(0, order_N),
        weight_N=decision.weight.index_select(0, order_N),
        tokens_per_expert_E=tokens_per_expert_E,
        num_tokens=num_tokens,
    )


def permute(x_TD: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """Gather the rows each assignment reads: ``x_routed[i] = x_TD[token_index_N[i]]``.

    A token with several experts is copied once per expert; the backward of
    index_select sums their gradients back into x.
    """
    return x_TD.index_select(0, perm.token_index_N)


def unpermute(y_routed_ND: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """Weight each routed row by its gate and scatter-add it to its token.

    ``y_TD[t] = sum_i weight_N[i] * y_routed[i]`` over rows i with token t;
    tokens no expert computed get zeros (the residual carries them).
    The sum is done in the promoted dtype of rows and gates (fp32 under bf16
    autocast, where gates stay fp32), so the K contributions of a token are
    not rounded to bf16 one by one; the caller casts the result.
    """
    dtype = torch.promote_types(y_routed_ND.dtype, perm.weight_N.dtype)
    weighted_ND = y_routed_ND.to(dtype) * perm.weight_N.to(dtype).unsqueeze(-1)
    y_TD = weighted_ND.new_zeros(perm.num_tokens, y_routed_ND.shape[-1])
    return y_TD.index_add(0, perm.token_index_N, weighted_ND)


def inverse_index(index_M: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation index: ``inverse[index[i]] = i``."""
    inverse_M = torch.empty_like(index_M)
    inverse_M[index_M] = torch.arange(index_M.numel(), device=index_M.device, dtype=index_M.dtype)
    return inverse_M


def chunk_sort_index(counts_RL: torch.Tensor) -> torch.Tensor:
    """Gather index that regroups rank-major chunks into expert-major order.

    After the all-to-all, a rank holds the rows of source rank 0 (grouped by
    local expert 0..L-1), then those of source rank 1, and so on: chunk
    (r, l) holds ``counts_RL[r, l]`` rows. ``rows[index]`` lists expert 0's
    rows from every source rank, then expert 1's, ... (source order kept), the
    layout the experts need. ``inverse_index(index)`` undoes it before the
    return exchange.
    """
    R, L = counts_RL.shape
    counts_flat = counts_RL.reshape(-1)
    starts_flat = torch.cumsum(counts_flat, 0) - counts_flat
    # Chunk ids in expert-major order: (l, r) -> r*L + l.
    chunk_ids = torch.arange(R * L, device=counts_RL.device).view(R, L).t().reshape(-1)
    counts_new = counts_flat.index_select(0, chunk_ids)
    starts_new = starts_flat.index_select(0, chunk_ids)
    total = int(counts_flat.sum())
    chunk_start_in_new = torch.cumsum(counts_new, 0) - counts_new
    offset_within_chunk = (torch.arange(total, device=counts_RL.device)
                           - torch.repeat_interleave(chunk_start_in_new, counts_new))
    return torch.repeat_interleave(starts_new, counts_new) + offset_within_chunk
