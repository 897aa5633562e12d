"""Dispatch tokens to the EP rank that owns their expert, and bring the outputs back.

Legend: T tokens of this rank, D hidden, E experts (global), L = E/R local
experts per rank, R ranks of the expert-parallel group, N kept (token, expert)
assignments of this rank, M rows this rank's experts compute (from all ranks).

Expert parallelism shards each MoE layer's experts over the R ranks of an EP
group: rank r holds global experts [r*L, (r+1)*L). Every rank routes its own
tokens with its own (replicated) router; the dispatcher then

    dispatch:  permute (local sort by global expert, permute.py)
               -> exchange counts   all_to_all_single of [R, L] ints
               -> exchange tokens   all_to_all_single of rows, uneven splits
               -> regroup received rows from (source rank, expert) order to
                  (expert, source rank) order, the layout the experts need
    combine:   the exact inverse: un-regroup -> exchange rows back ->
               gate-weighted scatter-add into this rank's tokens (unpermute)

Permutation and communication are separate steps (the permute code is the
LocalDispatcher's), so overlapping them can come later without touching the
math. The token exchange is an autograd all_to_all_single (``_AllToAll``
below: torch.distributed.nn's version is deprecated and warns on every call)
whose backward is the reverse exchange, so gradients
flow to the sending rank's tokens and gates and to the receiving rank's
experts. The gates never travel: the weighting happens on the rank that owns
the token, after the outputs come back.

Every rank of the EP group must call dispatch and combine the same number of
times in the same order (they are collectives), even when it routes no token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.distributed as dist

from moe_train.moe.permute import (Permutation, chunk_sort_index, inverse_index,
                                   make_permutation, permute, unpermute)
from moe_train.moe.routing import RoutingDecision


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends the gradients back
    along the same routes (the splits swap roles)."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_splits,
                               input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = _AllToAll.apply(grad_out.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group)
        return grad_in, None, None, None


@dataclass
class AllToAllMeta:
    """What combine needs to undo a dispatch."""

    perm: Permutation
    """The local sort by global expert (gates, token rows, counts per expert)."""
    send_splits: List[int]
    """Rows this rank sent to each EP rank (its own permuted rows, per destination)."""
    recv_splits: List[int]
    """Rows this rank received from each EP rank."""
    regroup_M: torch.Tensor
    """[M] long gather index from (source rank, expert) order to (expert, source rank) order."""


class AllToAllDispatcher:
    """The EP>1 dispatcher: LocalDispatcher's permute plus two all-to-alls.

    ``ep_group`` is the expert-parallel process group (its rank r owns global
    experts ``[r*E/R, (r+1)*E/R)``); ``num_experts`` is E, the global count.
    Holds no parameters. ``dispatch``/``combine`` have LocalDispatcher's
    signatures, so MoELayer does not know which one it holds; routed rows come
    back grouped by local expert, and within one expert by source rank.
    """

    def __init__(self, ep_group, num_experts: int):
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"moe.num_experts ({num_experts}) must be divisible by the "
                             f"expert-parallel size ({self.ep_size})")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size

    @property
    def expert_offset(self) -> int:
        """Global index of this rank's first expert."""
        return self.ep_rank * self.num_local_experts

    # -- communication steps (nothing else in this class talks to other ranks)

    def _exchange_counts(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Send row counts per (destination rank, its local expert); return the
        ``[R, L]`` counts this rank will receive per (source rank, local expert)."""
        recv_RL = torch.empty_like(tokens_per_expert_E)
        dist.all_to_all_single(recv_RL, tokens_per_expert_E.contiguous(), group=self.ep_group)
        return recv_RL.view(self.ep_size, self.num_local_experts)

    def _exchange_rows(self, rows: torch.Tensor, send_splits: List[int],
                       recv_splits: List[int]) -> torch.Tensor:
        """Autograd all-to-all of rows with uneven splits (backward: the reverse)."""
        return _AllToAll.apply(rows, send_splits, recv_splits, self.ep_group)

    # -- the dispatcher interface

    def dispatch(self, x_TD: torch.Tensor, decision: RoutingDecision, blocks: bool = False
                 ) -> Tuple[torch.Tensor, torch.Tensor, AllToAllMeta]:
        """Return ``(x_routed [M,D], tokens_per_local_expert [L] long, meta)``:
        the rows every rank of the group routed to this rank's experts,
        grouped by local expert. ``blocks`` is ignored: the exchange needs
        one contiguous buffer, so the rows always come as one tensor."""
        if decision.num_experts != self.num_experts:
            raise ValueError(f"decision has {decision.num_experts} experts, dispatcher "
                             f"expects {self.num_experts}")
        # 1. Local permute: rows sorted by global expert, so the rows for EP
        #    rank r are one contiguous run (its experts are one block).
        perm = make_permutation(decision, x_TD.shape[0])
        x_ND = permute(x_TD, perm)
        send_E = perm.tokens_per_expert_E
        # 2. Counts, then rows.
        recv_RL = self._exchange_counts(send_E)
        # The one host sync of an EP layer: all_to_all_single needs the split
        # sizes on the host. Both lists come over in one copy.
        send_splits, recv_splits = torch.stack(
            [send_E.view(self.ep_size, self.num_local_experts).sum(1), recv_RL.sum(1)]).tolist()
        x_recv_MD = self._exchange_rows(x_ND, send_splits, recv_splits)
        # 3. Local regroup: rows arrive by (source rank, expert); experts
        #    want (expert, source rank).
        regroup_M = chunk_sort_index(recv_RL, total=sum(recv_splits))
        x_routed_MD = x_recv_MD.index_select(0, regroup_M)
        meta = AllToAllMeta(perm=perm, send_splits=send_splits, recv_splits=recv_splits,
                            regroup_M=regroup_M)
        return x_routed_MD, recv_RL.sum(0), meta

    def combine(self, y_routed_MD: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        """Undo dispatch: back to (source rank, expert) order, send each row
        home, then gate-weight and scatter-add into ``y_TD [T,D]`` locally
        (in the promoted dtype of outputs and gates, as LocalDispatcher)."""
        y_recv_MD = y_routed_MD.index_select(0, inverse_index(meta.regroup_M))
        y_ND = self._exchange_rows(y_recv_MD, meta.recv_splits, meta.send_splits)
        return unpermute(y_ND, meta.perm)

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"num_experts={self.num_experts})")
