"""Expert capacity and who keeps a slot when an expert overflows.

Legend: T tokens (t = b*S + s for batch row b and position s), B batch rows,
S positions, K top-k, E experts, C capacity (slots per expert).

Two priority orders decide which (token, choice) assignments survive:

- ``position`` (causal-safe): every choice of position s, first choices
  first, then second choices..., before any choice of position s+1; inside one
  (position, choice rank) lower batch rows first. A slot taken at position s
  depends only on tokens at positions <= s, so the future cannot evict the past.
- ``gshard`` (GShard / fairseq Top2Gate): all first choices of the group, in
  token order, before any second choice. A later token's first choice beats an
  earlier token's second choice, so in a causal LM it leaks the future.

``capacity_keep_mask`` is the vectorised rule; ``capacity_keep_mask_reference``
is the same rule as a plain Python loop, kept for the tests.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from moe_train.config import check_choice


def _ceil(x: float) -> int:
    # Round first so that e.g. 1.1 * 10 = 11.000000000000002 gives 11, not 12.
    return math.ceil(round(x, 9))


def token_capacity(num_tokens: int, top_k: int, num_experts: int,
                   capacity_factor: Optional[float], min_capacity: int = 0) -> Optional[int]:
    """Slots per expert for token choice: ``max(min_capacity, ceil(c*T*K/E))``
    (Switch Eq 3 with K choices per token); None when ``capacity_factor`` is
    None (dropless)."""
    if capacity_factor is None:
        return None
    return max(int(min_capacity), _ceil(capacity_factor * num_tokens * top_k / num_experts))


def expert_choice_k(group_size: int, num_experts: int, capacity_factor: Optional[float]) -> int:
    """Tokens each expert picks per routing group (Zhou et al. 2022, k = T*c/E):
    ``ceil(T_group*c/E)`` clamped to [1, T_group]; c None means the paper's 2."""
    c = 2.0 if capacity_factor is None else capacity_factor
    return min(group_size, max(1, _ceil(group_size * c / num_experts)))


def priority_order(batch: int, seq: int, top_k: int, priority: str,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """[T*K] long: indices into the flattened [T, K] assignments (t*K + k),
    listed from the highest priority to the lowest."""
    check_choice("moe.capacity_priority", priority)
    b = torch.arange(batch, device=device)
    s = torch.arange(seq, device=device)
    k = torch.arange(top_k, device=device)
    if priority == "position":
        # Nested order (s, k, b): position-major, then choice rank, then batch row.
        t = b[None, None, :] * seq + s[:, None, None]              # [S, 1, B]
        return (t * top_k + k[None, :, None]).reshape(-1)           # [S*K*B]
    t = torch.arange(batch * seq, device=device)
    return (t[None, :] * top_k + k[:, None]).reshape(-1)            # (k, t): [K*T]


def capacity_keep_mask(expert_ids_TK: torch.Tensor, num_experts: int, capacity: Optional[int],
                       batch: int, seq: int, priority: str = "position") -> torch.Tensor:
    """[T, K] bool: which top-K assignments fit in their expert's ``capacity``
    slots when slots are handed out in ``priority`` order. None keeps all."""
    T, K = expert_ids_TK.shape
    if capacity is None:
        return torch.ones(T, K, dtype=torch.bool, device=expert_ids_TK.device)
    order = priority_order(batch, seq, K, priority, expert_ids_TK.device)
    ids_sorted = expert_ids_TK.reshape(-1).index_select(0, order)              # [T*K] in priority order
    # A scatter rather than F.one_hot, which checks the index range on the host.
    onehot = torch.zeros(T * K, num_experts, dtype=torch.int32, device=ids_sorted.device)
    onehot.scatter_(1, ids_sorted[:, None], 1)                                 # [T*K, E]
    # Running count per expert along the priority order = the slot each assignment asks for.
    slot = (onehot.cumsum(0, dtype=torch.int32) * onehot).sum(-1) - 1          # [T*K]
    keep = torch.empty(T * K, dtype=torch.bool, device=expert_ids_TK.device)
    keep[order] = slot < capacity
    return keep.view(T, K)


def capacity_keep_mask_reference(expert_ids_TK: torch.Tensor, num_experts: int,
                                 capacity: Optional[int], batch: int, seq: int,
                                 priority: str = "position") -> torch.Tensor:
    """Slow loop of the same rule as ``capacity_keep_mask`` (for tests)."""
    T, K = expert_ids_TK.shape
    ids = expert_ids_TK.tolist()
    if capacity is None:
        return torch.ones(T, K, dtype=torch.bool)
    if priority == "position":
        order = [(b * seq + s, k) for s in range(seq) for k in range(K) for b in range(batch)]
    elif priority == "gshard":
        order = [(t, k) for k in range(K) for t in range(T)]
    else:
        raise ValueError(priority)
    used = [0] * num_experts
    keep = [[False] * K for _ in range(T)]
    for t, k in order:
        e = ids[t][k]
        if used[e] < capacity:
            used[e] += 1
            keep[t][k] = True
    return torch.tensor(keep, dtype=torch.bool)
