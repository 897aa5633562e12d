"""The one type every router returns and every dispatcher consumes.

Legend: T tokens (flattened [B,S] in row-major order, t = b*S + s),
D hidden, E experts, N kept (token, expert) assignments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch


def count_per_expert(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] long: how often each expert appears in ``expert_index`` (any shape).

    A scatter-add on the device, where ``torch.bincount`` reads the maximum
    on the host first (a device-to-host sync on CUDA)."""
    flat = expert_index.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.long))


@dataclass
class RoutingDecision:
    """Which (token, expert) pairs are computed, with their gate weights.

    Token choice and expert choice both produce this, so the dispatcher and
    the experts never know which router ran. Assignments dropped by capacity
    are simply absent.
    """

    token_index: torch.Tensor
    """[N] long: row of the flattened input x_TD each assignment reads."""
    expert_index: torch.Tensor
    """[N] long in [0, E): the global expert of each assignment."""
    weight: torch.Tensor
    """[N] fp32: gate that scales the expert's output in combine."""
    logits: torch.Tensor
    """[T, E] fp32 router logits (before noise)."""
    probs: torch.Tensor
    """[T, E] fp32 router probabilities softmax(logits). From token choice
    they carry no gradient (its losses are computed inside the router);
    expert choice's are the tensor its gates are taken from."""
    num_experts: int
    """E."""
    dropped_fraction: torch.Tensor
    """0-d: share of requested assignments dropped by capacity (token choice),
    or share of tokens that no expert chose (expert choice)."""
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Weighted auxiliary losses, one entry per enabled loss (e.g.
    "load_balancing", "z_loss"); their sum is added to the LM loss."""
    selected_per_expert: Optional[torch.Tensor] = None
    """[E] long: the router's top-K selections per expert before capacity
    drops (token choice; the load that aux-loss-free balancing corrects).
    None for routers that make no per-token selection (expert choice)."""

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]

    def tokens_per_expert(self) -> torch.Tensor:
        """[E] long: assignments kept per expert."""
        return count_per_expert(self.expert_index, self.num_experts)
