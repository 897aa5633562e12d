"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437,
Sec 2.1.2; Wang et al. 2024, arXiv 2408.15664).

Each token-choice router built with ``moe.expert_bias_update_rate`` (gamma)
> 0 holds a bias b [E] that is added to its scores to choose the top K (the
gates stay unbiased). After every optimizer step the bias moves against the
load of the step that just ran:

    b_i <- b_i + gamma * sign(mean_j(load_j) - load_i)

so overloaded experts become less likely to be chosen and underloaded ones
more. The load must be that of the whole global batch (summed over
data-parallel ranks), so that every rank applies the same update and the
replicated routers stay identical. Everything here is local; the caller
does the sum.

Legend: E experts.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from moe_train.moe.router import TokenChoiceRouter


def expert_bias_routers(model: nn.Module) -> List[TokenChoiceRouter]:
    """The routers of ``model`` that carry an expert bias, in module order
    (layer order for the transformer, matching its per-layer MoE stats).
    Empty when aux-loss-free balancing is off."""
    return [m for m in model.modules()
            if isinstance(m, TokenChoiceRouter) and m.expert_bias is not None]


@torch.no_grad()
def update_expert_bias(router: TokenChoiceRouter, load_E: torch.Tensor, rate: float) -> None:
    """One DeepSeek-V3 bias update of ``router`` in place:
    ``b_i += rate * sign(mean(load_E) - load_i)``.

    ``load_E`` [E]: top-K selections per expert (before capacity drops) over
    the global batch of the step, i.e. ``RoutingDecision.selected_per_expert``
    summed over micro-batches and data-parallel ranks. An expert exactly at
    the mean is left alone. A pure function of its arguments, so identical
    inputs on every rank give identical biases.
    """
    bias = router.expert_bias
    if bias is None:
        raise ValueError("this router has no expert bias: build it with "
                         "moe.expert_bias_update_rate > 0")
    if rate < 0:
        raise ValueError(f"moe.expert_bias_update_rate ({rate}) must be >= 0")
    if load_E.shape != bias.shape:
        raise ValueError(f"load has shape {tuple(load_E.shape)}, the router has "
                         f"{bias.shape[0]} experts")
    # fp64: counts up to 2^53 stay exact, so the comparison with the mean
    # (and hence the sign) is the same on every rank and every device.
    load = load_E.detach().to(device=bias.device, dtype=torch.float64)
    step = torch.sign(load.mean() - load) * rate
    bias.add_(step.to(bias.dtype))


def update_expert_biases(model: nn.Module, loads: Sequence[torch.Tensor], rate: float) -> None:
    """:func:`update_expert_bias` for every router of :func:`expert_bias_routers`,
    ``loads`` one [E] tensor per router in the same (layer) order. Does
    nothing when the model has no expert bias."""
    routers = expert_bias_routers(model)
    if not routers:
        return
    if len(loads) != len(routers):
        raise ValueError(f"got {len(loads)} per-layer loads for {len(routers)} routers with "
                         "an expert bias")
    for router, load_E in zip(routers, loads):
        update_expert_bias(router, load_E, rate)
