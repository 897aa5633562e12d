"""The routed experts of one MoE layer (those held by this rank), as stacked weights.

Legend: T tokens, D hidden, F expert ffn, E experts held here (local),
N routed rows (kept assignments), grouped by local expert; n_e the rows of
local expert e.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from moe_train.config import check_choice
from moe_train.model.mlp import ACTIVATIONS
from moe_train.moe.expert_impls import (compute_dtype, grouped_mm_experts,
                                        grouped_mm_unavailable_reason, loop_experts,
                                        loop_experts_packed, resolve_impl)
from moe_train.moe.routing import RoutingDecision


BLOCKS_MIN_BYTES = 32 * 2 ** 20
"""glibc serves blocks of this size and more (its largest dynamic mmap
threshold on 64-bit) with a fresh mmap that page-faults in every step, so
above it the routed rows travel as per-expert blocks, which its heap
recycles. Measured on CPU (docs/performance.md): blocks win at T=8192, K=2,
D=512 (an [N, D] fp32 tensor of exactly 32 MiB); one [N, D] tensor saves
0.6 to 1.4 ms of a 32 ms layer at the tiny config (E=8, D=128)."""


class Experts(nn.Module):
    """``num_experts`` SwiGLU (or GELU) MLPs held as stacked weights: global
    experts ``expert_offset .. expert_offset + num_experts - 1``.

    Parameters: ``w1`` and ``w3`` ``[E, D, F]``, ``w2`` ``[E, F, D]`` (no w3
    for GELU); expert e computes ``(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]``.
    Expert parallelism and FSDP shard them along dimension 0. Mixtral's
    per-expert names (``experts.{i}.w1.weight``, the transpose ``[F, D]``)
    exist only at the import/export boundary.

    ``impl`` (``moe.expert_impl``) picks the math: ``grouped_mm``
    (``torch._grouped_mm``, group offsets on the device, no host sync),
    ``loop`` (one autograd Function, one stacked gradient per weight),
    ``reference`` (the masked loop of :meth:`reference_forward`) or ``auto``
    (grouped_mm on CUDA, loop elsewhere).
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: str = "swiglu", init_std: float = 0.02,
                 output_std: Optional[float] = None, expert_offset: int = 0,
                 impl: str = "auto"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation ({activation!r}) must be one of: {', '.join(ACTIVATIONS)}")
        check_choice("moe.expert_impl", impl)
        if impl == "grouped_mm":
            reason = grouped_mm_unavailable_reason(hidden_size, ffn_hidden_size)
            if reason is not None:
                raise ValueError(reason)
        self.num_experts = num_experts
        self.expert_offset = expert_offset
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        self.impl = impl
        self.init_std = init_std
        self.output_std = init_std if output_std is None else output_std
        E, D, Fh = num_experts, hidden_size, ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(E, D, Fh))
        self.w3 = nn.Parameter(torch.empty(E, D, Fh)) if activation == "swiglu" else None
        self.w2 = nn.Parameter(torch.empty(E, Fh, D))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init: init_std for w1 (and w3), output_std for w2."""
        nn.init.normal_(self.w1, std=self.init_std)
        if self.w3 is not None:
            nn.init.normal_(self.w3, std=self.init_std)
        nn.init.normal_(self.w2, std=self.output_std)

    def keep_experts(self, start: int, count: int) -> None:
        """Hold only local experts ``start .. start+count-1`` (a block of the
        current ones), e.g. one expert-parallel rank's share. The kept slices
        are copied into new parameters, so the others' memory goes."""
        if start < 0 or count < 0 or start + count > self.num_experts:
            raise ValueError(f"cannot keep experts {start}..{start + count - 1} of "
                             f"{self.num_experts}")
        for name in ("w1", "w3", "w2"):
            p = getattr(self, name)
            if p is not None:
                kept = nn.Parameter(p.detach()[start:start + count].clone(),
                                    requires_grad=p.requires_grad)
                kept.__dict__.update({k: v for k, v in p.__dict__.items() if k != "_is_param"})
                setattr(self, name, kept)
        self.num_experts = count
        self.expert_offset += start

    def resolved_impl(self, device: torch.device,
                      dtype: torch.dtype = torch.bfloat16) -> str:
        """The implementation this module runs on ``device`` with matmuls in
        ``dtype`` (``auto`` resolved)."""
        return resolve_impl(self.impl, device, self.hidden_size, self.ffn_hidden_size, dtype)

    def impl_for(self, x: torch.Tensor) -> str:
        """The implementation that runs on rows like ``x`` (its device, and
        the autocast dtype or the promoted dtype of rows and weights)."""
        return self.resolved_impl(x.device, compute_dtype(x, self.w1))

    def wants_blocks(self, x: torch.Tensor, num_rows: Optional[int] = None) -> bool:
        """True when the implementation for ``num_rows`` routed rows like
        ``x`` prefers one block per expert to one ``[N, D]`` tensor: the loop
        on CPU once an ``[N, D]`` tensor would reach glibc's largest mmap
        threshold (see :data:`BLOCKS_MIN_BYTES`). Below it one gather and one
        scatter beat E of each; grouped_mm always takes the tensor."""
        if self.impl_for(x) != "loop":
            return False
        if x.device.type != "cpu" or num_rows is None:
            return True
        return num_rows * x.shape[-1] * x.element_size() >= BLOCKS_MIN_BYTES

    def forward(self, x_routed: Union[Sequence[torch.Tensor], torch.Tensor],
                tokens_per_local_expert: torch.Tensor
                ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Run each local expert on its rows.

        ``x_routed`` is either a list of E blocks, block e ``[n_e, D]`` (what
        ``LocalDispatcher.dispatch`` returns for ``loop``), giving the list of
        E output blocks, or one tensor ``[N, D]`` grouped by local expert,
        giving the ``[N, D]`` outputs in the same order.
        ``tokens_per_local_expert [E]`` (long, on the device) gives the group
        sizes of the tensor form; grouped_mm reads it on the device, the loop
        needs it on the host (one sync) to split.

        Experts with no rows get a zero weight gradient, never None, so
        optimizers and gradient reducers never see a gradient that depends
        on routing.
        """
        if tokens_per_local_expert.numel() != self.num_experts:
            raise ValueError(f"tokens_per_local_expert has {tokens_per_local_expert.numel()} "
                             f"entries, expected {self.num_experts} (one per local expert)")
        as_list = not isinstance(x_routed, torch.Tensor)
        if as_list and len(x_routed) != self.num_experts:
            raise ValueError(f"x_routed has {len(x_routed)} blocks, expected "
                             f"{self.num_experts} (one per local expert)")
        impl = self.impl_for(x_routed[0] if as_list else x_routed)
        if impl == "reference":
            raise ValueError("moe.expert_impl = reference runs on the routing decision "
                             "(reference_forward), not on dispatched rows")
        if impl == "grouped_mm":
            x_ND = torch.cat(list(x_routed)) if as_list else x_routed
            y_ND = grouped_mm_experts(x_ND, tokens_per_local_expert, self.w1, self.w3, self.w2,
                                      self.activation)
            if as_list:
                return list(torch.split(y_ND, [x.shape[0] for x in x_routed]))
            return y_ND
        if as_list:
            return list(loop_experts(x_routed, self.w1, self.w3, self.w2, self.activation))
        return loop_experts_packed(x_routed, tokens_per_local_expert.tolist(), self.w1, self.w3,
                                   self.w2, self.activation)

    def expert_forward(self, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        """Local expert ``e`` on rows ``x_nD`` with plain autograd ops (for
        references and tests; indexes the stacked weights)."""
        return self._mlp(x_nD, self.w1[e], None if self.w3 is None else self.w3[e], self.w2[e])

    def _mlp(self, x_nD, w1_DF, w3_DF, w2_FD) -> torch.Tensor:
        if w3_DF is not None:
            return (nn.functional.silu(x_nD @ w1_DF) * (x_nD @ w3_DF)) @ w2_FD
        return nn.functional.gelu(x_nD @ w1_DF) @ w2_FD

    def reference_forward(self, x_TD: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
        """The obviously-right slow path, returning the combined ``y_TD [T,D]``.

        For each local expert e: take the assignments routed to it (a mask),
        run it on their tokens and add ``weight * expert_e(x)`` to those
        tokens. Assignments to experts held elsewhere are ignored. Sums in
        the promoted dtype of expert outputs and gates, as combine does.
        """
        y_TD = None
        w1s = self.w1.unbind(0)
        w3s = self.w3.unbind(0) if self.w3 is not None else [None] * self.num_experts
        w2s = self.w2.unbind(0)
        for i in range(self.num_experts):
            sel_n = (decision.expert_index == self.expert_offset + i).nonzero().squeeze(-1)
            tokens_n = decision.token_index[sel_n]
            out_nD = self._mlp(x_TD[tokens_n], w1s[i], w3s[i], w2s[i])
            dtype = torch.promote_types(out_nD.dtype, decision.weight.dtype)
            contrib_nD = decision.weight[sel_n].to(dtype).unsqueeze(-1) * out_nD.to(dtype)
            if y_TD is None:
                y_TD = contrib_nD.new_zeros(x_TD.shape[0], x_TD.shape[1])
            y_TD = y_TD.index_add(0, tokens_n, contrib_nD)
        if y_TD is None:  # no local experts
            y_TD = x_TD.new_zeros(x_TD.shape)
        return y_TD

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, expert_offset={self.expert_offset}, "
                f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
                f"activation={self.activation}, impl={self.impl}")
