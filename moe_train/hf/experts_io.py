"""Read and write the routed experts of one MoE layer as three stacked
tensors in transformers' orientation (``[out, in]`` per expert):

    gate w1 [E, F, D], up w3 [E, F, D], down w2 [E, D, F]

whatever the layout of :class:`moe_train.moe.experts.Experts` (stacked
``w1, w3 [E, D, F]``, ``w2 [E, F, D]``, or one MLP per expert). HF names stay
at this boundary; the model never sees them.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def _stacked(experts: nn.Module) -> bool:
    return isinstance(getattr(experts, "w1", None), torch.Tensor)


def get_expert_weights(experts: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w1 [E,F,D], w3 [E,F,D], w2 [E,D,F])`` detached copies (w3 is None for gelu)."""
    if _stacked(experts):
        w3 = getattr(experts, "w3", None)
        return (experts.w1.detach().transpose(1, 2).contiguous(),
                None if w3 is None else w3.detach().transpose(1, 2).contiguous(),
                experts.w2.detach().transpose(1, 2).contiguous())
    mlps = list(experts.experts)
    w3 = None if mlps[0].w3 is None else torch.stack([m.w3.weight.detach() for m in mlps])
    return (torch.stack([m.w1.weight.detach() for m in mlps]), w3,
            torch.stack([m.w2.weight.detach() for m in mlps]))


@torch.no_grad()
def set_expert_weights(experts: nn.Module, w1: torch.Tensor, w3: torch.Tensor,
                       w2: torch.Tensor) -> None:
    """Copy ``w1, w3 [E,F,D]`` and ``w2 [E,D,F]`` (HF orientation) into ``experts``;
    a shape that does not fit raises ValueError naming the tensor."""
    if _stacked(experts):
        pairs = [(experts.w1, w1.transpose(1, 2), "w1"), (experts.w2, w2.transpose(1, 2), "w2")]
        if getattr(experts, "w3", None) is not None:
            pairs.append((experts.w3, w3.transpose(1, 2), "w3"))
    else:
        mlps = list(experts.experts)
        pairs = []
        for j, m in enumerate(mlps):
            pairs += [(m.w1.weight, w1[j], f"w1[{j}]"), (m.w2.weight, w2[j], f"w2[{j}]")]
            if m.w3 is not None:
                pairs.append((m.w3.weight, w3[j], f"w3[{j}]"))
        if w1.shape[0] != len(mlps):
            raise ValueError(f"{w1.shape[0]} experts given, the layer holds {len(mlps)}")
    for dst, src, name in pairs:
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"expert weight {name}: shape {list(src.shape)} does not fit "
                             f"{list(dst.shape)}")
        dst.copy_(src)
