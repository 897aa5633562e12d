"""Feed-forward block used by dense layers, routed experts and shared experts.

The weight names are Mixtral's (w1 gate, w3 up, w2 down) so that export maps
them one to one onto Hugging Face checkpoints.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("swiglu", "gelu")


class MLP(nn.Module):
    """Bias-free MLP.

    swiglu: ``w2(silu(w1 x) * w3 x)`` (Shazeer 2020, LLaMA/Mixtral);
    gelu:   ``w2(gelu(w1 x))`` with the exact erf GELU; there is no w3.

    Weights are drawn from N(0, init_std); w2 from N(0, output_std), which
    defaults to init_std (Megatron scales output projections by
    1/sqrt(2*num_layers); the caller passes that in).

    Tensor parallelism swaps w1/w3 for column-parallel and w2 for row-parallel
    linears from outside, so forward only ever calls the three submodules.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "swiglu",
                 init_std: float = 0.02, output_std: Optional[float] = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation ({activation!r}) must be one of: {', '.join(ACTIVATIONS)}")
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        self.init_std = init_std
        self.output_std = init_std if output_std is None else output_std
        self.w1 = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_hidden_size, bias=False) if activation == "swiglu" else None
        self.w2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init: init_std for w1 (and w3), output_std for w2."""
        nn.init.normal_(self.w1.weight, std=self.init_std)
        if self.w3 is not None:
            nn.init.normal_(self.w3.weight, std=self.init_std)
        nn.init.normal_(self.w2.weight, std=self.output_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
