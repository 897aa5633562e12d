"""Dispatch tokens to experts and combine their outputs, on one device (EP=1).

Legend: T tokens, D hidden, E experts, N kept (token, expert) assignments,
n_e the rows of expert e.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

from moe_train.moe.permute import (Permutation, make_permutation, permute, permute_chunks,
                                   unpermute, unpermute_chunks)
from moe_train.moe.routing import RoutingDecision


class LocalDispatcher:
    """The EP=1 dispatcher: every expert is local, so dispatch is a sort by
    expert and combine its inverse. Holds no parameters and no state between
    calls; the all-to-all dispatcher keeps the same two methods and adds only
    the exchanges.

    The routed rows travel as one block per expert rather than one [N,D]
    tensor: nothing here needs them contiguous (the all-to-all dispatcher
    does, for its exchange), and on CPU every [N,D] temporary of a large
    layer is a fresh mmap that page-faults in each step, where per-expert
    blocks are recycled by the heap (docs/performance.md).
    """

    def dispatch(self, x_TD: torch.Tensor, decision: RoutingDecision, blocks: bool = True
                 ) -> Tuple[Union[List[torch.Tensor], torch.Tensor], torch.Tensor, Permutation]:
        """Return ``(x_routed, tokens_per_local_expert [E] long, meta)``.

        With ``blocks``, ``x_routed`` is a list of E blocks, block e
        ``[n_e, D]`` holding the rows routed to expert e (``torch.cat`` of the
        list is the [N,D] layout grouped by expert in increasing order); the
        split reads the counts on the host (one sync). Without, it is that
        [N,D] tensor itself, and nothing here reads a device value on the
        host (the grouped_mm path)."""
        perm = make_permutation(decision, x_TD.shape[0])
        if not blocks:
            return permute(x_TD, perm), perm.tokens_per_expert_E, perm
        return permute_chunks(x_TD, perm), perm.tokens_per_expert_E, perm

    def combine(self, y_routed: Union[Sequence[torch.Tensor], torch.Tensor],
                meta: Permutation) -> torch.Tensor:
        """Gate-weight the expert outputs and scatter-add them to ``y_TD [T,D]``
        (in the promoted dtype of outputs and gates: fp32 under autocast).

        ``y_routed`` is either a list of per-expert blocks (what the experts
        return for dispatch's list) or one [N,D] tensor grouped by expert."""
        if isinstance(y_routed, torch.Tensor):
            return unpermute(y_routed, meta)
        return unpermute_chunks(y_routed, meta)

    def __repr__(self) -> str:
        return "LocalDispatcher()"
