"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019) and LayerNorm."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in fp32.

    Written out rather than ``nn.RMSNorm`` because the statistics must be fp32
    even when the model is cast to bf16 (the mean of squares loses most of its
    digits in bf16); the normalised value is cast back before the weight, as in
    transformers' ``LlamaRMSNorm``, so a HF export reproduces the numbers.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def build_norm(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """``"rmsnorm"`` -> :class:`RMSNorm`, ``"layernorm"`` -> ``nn.LayerNorm``
    (weight 1, bias 0; autocast already runs layer_norm in fp32)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"model.norm ({kind!r}) must be one of: rmsnorm, layernorm")
