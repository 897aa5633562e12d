"""Permutation between token order and expert order: pure local index math.

Nothing here communicates. The local dispatcher is just `permute_chunks`
then `unpermute_chunks` (the same math as `permute` / `unpermute`, kept as
one block per expert); the all-to-all dispatcher needs one contiguous buffer
for its exchanges, so it puts them between `permute` and `unpermute` and
reuses `chunk_sort_index` to regroup what it receives.

Legend: T tokens, D hidden, E experts (global), L local experts of a rank,
R ranks, N kept (token, expert) assignments, M rows received by a rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from moe_train.moe.routing import RoutingDecision, count_per_expert


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
    tokens_per_expert_E = count_per_expert(expert_index_N, num_experts)
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
    # In place: the out-of-place index_add would copy the fresh zeros into a
    # second [T,D] block. Autograd allows it: the zeros do not require grad
    # before the call, and index_add_'s backward needs neither their old
    # value nor the new one.
    return y_TD.index_add_(0, perm.token_index_N, weighted_ND)


class _GatherChunks(torch.autograd.Function):
    """``x_TD.index_select(0, t)`` for each expert's token chunk ``t``, with one
    backward buffer shared by all chunks.

    Separate autograd index_selects would each zero-fill a [T,D] gradient in
    the backward (E of them, summed); one index_select of all N rows followed
    by ``torch.split`` would allocate the [N,D] gradient whole (the backward
    of split is a cat). Here the backward makes a single zeros [T,D] and
    ``index_add_``s each chunk's [n_e,D] gradient into it.
    """

    @staticmethod
    def forward(ctx, x_TD, *token_chunks):
        ctx.save_for_backward(*token_chunks)
        ctx.x_shape = x_TD.shape
        return tuple(x_TD.index_select(0, t_n) for t_n in token_chunks)

    @staticmethod
    def backward(ctx, *grad_chunks):
        # Autograd materialises the gradient of an unused output as zeros, so
        # every entry is a tensor; they all have x's dtype and device.
        grad_TD = grad_chunks[0].new_zeros(ctx.x_shape)
        for t_n, g_nD in zip(ctx.saved_tensors, grad_chunks):
            grad_TD.index_add_(0, t_n, g_nD)
        return (grad_TD,) + (None,) * len(grad_chunks)


def permute_chunks(x_TD: torch.Tensor, perm: Permutation) -> List[torch.Tensor]:
    """``permute`` split by expert: a list of E blocks, block e ``[n_e, D]``
    holding the rows routed to global expert e (``n_e`` from
    ``tokens_per_expert_E``, one host sync), in ``permute``'s order.

    Same values as ``torch.split(permute(x_TD, perm), counts)``, but no [N,D]
    tensor exists in the forward or the backward. Why that matters on CPU:
    glibc serves blocks of 32 MiB and more with a fresh mmap that page-faults
    in every step, and at T=8192, K=2, D=512 an [N,D] fp32 block is exactly
    that size; per-expert blocks are recycled by the heap
    (docs/performance.md, "What limits the speed").
    """
    counts = perm.tokens_per_expert_E.tolist()
    token_chunks = torch.split(perm.token_index_N, counts)
    return list(_GatherChunks.apply(x_TD, *token_chunks))


def unpermute_chunks(y_chunks: Sequence[torch.Tensor], perm: Permutation) -> torch.Tensor:
    """``unpermute`` over per-expert blocks: ``y_chunks[e]`` ``[n_e, D]`` holds
    the outputs for the rows of global expert e, in ``permute_chunks``' order.

    Each block is weighted by its own gates and ``index_add_``ed in place into
    one ``[T, D]`` buffer, in the promoted dtype of outputs and gates (fp32
    under autocast, as ``unpermute``). No [N,D] temporary is made: neither
    the cat of the blocks, nor the weighted rows, nor, in the backward, the
    gathered gradient and its two products (for the rows and for the gates).
    Gradients reach every block, empty ones included (so an expert that got
    no rows still receives a zero weight gradient), and the gates.
    """
    num_experts = perm.tokens_per_expert_E.numel()
    if len(y_chunks) != num_experts or num_experts == 0:
        raise ValueError(f"unpermute_chunks needs one block per expert ({num_experts}), "
                         f"got {len(y_chunks)}")
    counts = [y_nD.shape[0] for y_nD in y_chunks]
    if sum(counts) != perm.token_index_N.numel():
        raise ValueError(f"the blocks hold {sum(counts)} rows, the permutation "
                         f"{perm.token_index_N.numel()}")
    token_chunks = torch.split(perm.token_index_N, counts)
    weight_chunks = torch.split(perm.weight_N, counts)
    dtype = torch.promote_types(y_chunks[0].dtype, perm.weight_N.dtype)
    y_TD = y_chunks[0].new_zeros(perm.num_tokens, y_chunks[0].shape[-1], dtype=dtype)
    for y_nD, t_n, w_n in zip(y_chunks, token_chunks, weight_chunks):
        # Empty blocks are added too (a no-op): skipping them would cut the
        # autograd path to that expert, and its weights would get None.
        y_TD.index_add_(0, t_n, y_nD.to(dtype) * w_n.to(dtype).unsqueeze(-1))
    return y_TD


def inverse_index(index_M: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation index: ``inverse[index[i]] = i``."""
    inverse_M = torch.empty_like(index_M)
    inverse_M[index_M] = torch.arange(index_M.numel(), device=index_M.device, dtype=index_M.dtype)
    return inverse_M


def chunk_sort_index(counts_RL: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """Gather index that regroups rank-major chunks into expert-major order.

    After the all-to-all, a rank holds the rows of source rank 0 (grouped by
    local expert 0..L-1), then those of source rank 1, and so on: chunk
    (r, l) holds ``counts_RL[r, l]`` rows. ``rows[index]`` lists expert 0's
    rows from every source rank, then expert 1's, ... (source order kept), the
    layout the experts need. ``inverse_index(index)`` undoes it before the
    return exchange. ``total`` (the sum of the counts, when the caller knows
    it on the host) spares a device-to-host sync.
    """
    R, L = counts_RL.shape
    counts_flat = counts_RL.reshape(-1)
    starts_flat = torch.cumsum(counts_flat, 0) - counts_flat
    # Chunk ids in expert-major order: (l, r) -> r*L + l.
    chunk_ids = torch.arange(R * L, device=counts_RL.device).view(R, L).t().reshape(-1)
    counts_new = counts_flat.index_select(0, chunk_ids)
    starts_new = starts_flat.index_select(0, chunk_ids)
    if total is None:
        total = int(counts_flat.sum())
    chunk_start_in_new = torch.cumsum(counts_new, 0) - counts_new
    offset_within_chunk = (torch.arange(total, device=counts_RL.device)
                           - torch.repeat_interleave(chunk_start_in_new, counts_new,
                                                     output_size=total))
    return torch.repeat_interleave(starts_new, counts_new, output_size=total) + offset_within_chunk
