"""Read and write the routed experts of one MoE layer as three stacked
tensors in transformers' orientation (``[out, in]`` per expert):

    gate w1 [E, F, D], up w3 [E, F, D], down w2 [E, D, F]

:class:`moe_train.moe.experts.Experts` holds ``w1, w3 [E, D, F]`` and
``w2 [E, F, D]`` (``x @ w``); HF keeps ``nn.Linear`` weights (``x @ w.T``).
The transpose happens here, at the boundary, and nowhere in the model.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


def get_expert_weights(experts: nn.Module
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """``(w1 [E,F,D], w3 [E,F,D], w2 [E,D,F])`` detached views (w3 is None for gelu)."""
    w3 = experts.w3
    return (experts.w1.detach().transpose(1, 2),
            None if w3 is None else w3.detach().transpose(1, 2),
            experts.w2.detach().transpose(1, 2))


@torch.no_grad()
def set_expert_weights(experts: nn.Module, w1: torch.Tensor, w3: Optional[torch.Tensor],
                       w2: torch.Tensor) -> None:
    """Copy ``w1, w3 [E,F,D]`` and ``w2 [E,D,F]`` (HF orientation) into
    ``experts``; a shape that does not fit raises ValueError naming the tensor."""
    pairs = [(experts.w1, w1, "gate (w1)"), (experts.w2, w2, "down (w2)")]
    if experts.w3 is not None:
        pairs.append((experts.w3, w3, "up (w3)"))
    for dst, src, name in pairs:
        src = src.transpose(1, 2)
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"expert weights {name}: shape {list(src.transpose(1, 2).shape)} "
                             f"does not fit {list(dst.transpose(1, 2).shape)}")
        dst.copy_(src)
