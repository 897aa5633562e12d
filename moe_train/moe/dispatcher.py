"""Dispatch tokens to experts and combine their outputs, on one device (EP=1).

Legend: T tokens, D hidden, E experts, N kept (token, expert) assignments.
"""
from __future__ import annotations

from typing import Tuple

import torch

from moe_train.moe.permute import Permutation, make_permutation, permute, unpermute
from moe_train.moe.routing import RoutingDecision


class LocalDispatcher:
    """The EP=1 dispatcher: every expert is local, so dispatch is a sort by
    expert and combine its inverse. Holds no parameters and no state between
    calls; the all-to-all dispatcher keeps the same two methods and adds only
    the exchanges.
    """

    def dispatch(self, x_TD: torch.Tensor, decision: RoutingDecision
                 ) -> Tuple[torch.Tensor, torch.Tensor, Permutation]:
        """Return ``(x_routed [N,D], tokens_per_local_expert [E] long, meta)``;
        routed rows are grouped by expert in increasing order."""
        perm = make_permutation(decision, x_TD.shape[0])
        return permute(x_TD, perm), perm.tokens_per_expert_E, perm

    def combine(self, y_routed_ND: torch.Tensor, meta: Permutation) -> torch.Tensor:
        """Gate-weight the expert outputs and scatter-add them to ``y_TD [T,D]``
        (in the promoted dtype of outputs and gates: fp32 under autocast)."""
        return unpermute(y_routed_ND, meta)

    def __repr__(self) -> str:
        return "LocalDispatcher()"
