"""Activation recompute (``train.recompute``), applied from outside a built model.

- ``full``: each transformer block's forward runs under
  ``torch.utils.checkpoint``: only the block's input is kept, and the whole
  block (attention, routing, dispatch, experts, combine) runs again in the
  backward.
- ``selective``: only the attention modules and the routed experts' MLPs
  are recomputed, the parts whose saved activations grow with the sequence
  (SDPA's scores) and with top-k (the experts' [N, F] hidden rows). The
  router, dispatch and combine run once, so routing is never recomputed.
- ``none``: nothing (the default).

Recompute must replay exactly the forward it replaces, routing noise
included: the non-reentrant checkpoint restores torch's RNG state, and its
``context_fn`` (moe/routing_noise.py ``checkpoint_context_fn``) re-enters the
routing-noise key that was current at the first forward, whatever key is set
when the backward runs. Under ``torch.no_grad`` (evaluation, decoding) the
forwards run plainly.

The forwards are wrapped per instance, so parameter names, state dicts and
checkpoints do not change.
"""
from __future__ import annotations

import functools
from typing import Callable, List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_train.config import check_choice
from moe_train.model.attention import Attention
from moe_train.moe.experts import Experts
from moe_train.moe.routing_noise import checkpoint_context_fn


def _recomputed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=checkpoint_context_fn, **kwargs)

    run.recomputed = True
    return run


def recompute_targets(model: nn.Module, mode: str) -> List[nn.Module]:
    """The modules whose forward ``mode`` recomputes."""
    check_choice("train.recompute", mode)
    if mode == "none":
        return []
    if mode == "full":
        return list(model.blocks)
    return [m for m in model.modules() if isinstance(m, (Attention, Experts))]


def apply_recompute(model: nn.Module, mode: str) -> nn.Module:
    """Make ``model`` (a Transformer) recompute per ``mode`` (none | full |
    selective) in its backward. In place; returns ``model``."""
    for module in recompute_targets(model, mode):
        if not getattr(module.forward, "recomputed", False):
            module.forward = _recomputed(module.forward)
    return model


__all__ = ["apply_recompute", "recompute_targets"]
