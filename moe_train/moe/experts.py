"""The routed experts of one MoE layer (those held by this rank).

Legend: T tokens, D hidden, F expert ffn, E experts held here (local),
N routed rows (kept assignments), grouped by local expert.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from moe_train.model.mlp import MLP
from moe_train.moe.routing import RoutingDecision


class Experts(nn.Module):
    """``num_experts`` independent MLPs: global experts
    ``expert_offset .. expert_offset + num_experts - 1``.

    One module per expert on purpose, not a stacked [E,D,F] weight: indexing
    or slicing a stacked weight inside autograd makes every backward write a
    full-size gradient, which dominates the step on CPU. It also gives each
    expert Mixtral's names (``experts[i].w1/w2/w3``) for export.

    ``forward`` is the fast grouped path (per-expert blocks in, blocks out; or
    one grouped tensor in, one out); ``reference_forward`` the slow masked
    loop that tests hold it equal to (``moe.expert_impl`` picks one).
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: str = "swiglu", init_std: float = 0.02,
                 output_std: Optional[float] = None, expert_offset: int = 0):
        super().__init__()
        self.num_experts = num_experts
        self.expert_offset = expert_offset
        self.experts = nn.ModuleList(
            MLP(hidden_size, ffn_hidden_size, activation, init_std, output_std)
            for _ in range(num_experts))

    def forward(self, x_routed: Union[Sequence[torch.Tensor], torch.Tensor],
                tokens_per_local_expert: torch.Tensor
                ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Run each local expert on its rows.

        ``x_routed`` is either

        - a list of E blocks, block e ``[n_e, D]`` the rows of local expert e
          (what ``LocalDispatcher.dispatch`` returns): the result is the list
          of E output blocks, not concatenated, because combine consumes them
          block by block and a cat would make a whole [N,D] temporary; the
          block lengths are the counts, so ``tokens_per_local_expert`` is not
          read (no host sync here); or
        - one tensor ``[N,D]`` grouped by local expert (what the all-to-all
          dispatcher passes: its exchange needs one contiguous buffer), split
          by ``tokens_per_local_expert [E]`` (one host sync): the result is
          the ``[N,D]`` tensor of outputs in the same order.

        Experts with no rows still run on their empty block: that costs
        nothing, and it gives every expert weight a (zero) gradient each step,
        so optimizers and gradient reducers never see a None gradient that
        depends on routing.
        """
        if isinstance(x_routed, torch.Tensor):
            counts = tokens_per_local_expert.tolist()
            if len(counts) != self.num_experts:
                raise ValueError(f"tokens_per_local_expert has {len(counts)} entries, "
                                 f"expected {self.num_experts} (one per local expert)")
            chunks = torch.split(x_routed, counts)
            return torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])
        if len(x_routed) != self.num_experts:
            raise ValueError(f"x_routed has {len(x_routed)} blocks, expected "
                             f"{self.num_experts} (one per local expert)")
        return [expert(chunk) for expert, chunk in zip(self.experts, x_routed)]

    def reference_forward(self, x_TD: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
        """The obviously-right slow path, returning the combined ``y_TD [T,D]``.

        For each local expert e: take the assignments routed to it, run it on
        their tokens and add ``weight * expert_e(x)`` to those tokens.
        Assignments to experts held elsewhere are ignored. Sums in the
        promoted dtype of expert outputs and gates, as combine does.
        """
        y_TD = None
        for i, expert in enumerate(self.experts):
            sel_n = (decision.expert_index == self.expert_offset + i).nonzero().squeeze(-1)
            tokens_n = decision.token_index[sel_n]
            out_nD = expert(x_TD[tokens_n])
            dtype = torch.promote_types(out_nD.dtype, decision.weight.dtype)
            contrib_nD = decision.weight[sel_n].to(dtype).unsqueeze(-1) * out_nD.to(dtype)
            if y_TD is None:
                y_TD = contrib_nD.new_zeros(x_TD.shape[0], x_TD.shape[1])
            y_TD = y_TD.index_add(0, tokens_n, contrib_nD)
        if y_TD is None:  # no local experts
            y_TD = x_TD.new_zeros(x_TD.shape)
        return y_TD
