"""Replicated data parallelism (``parallel.dp_shard_size`` 1) through torch DDP.

:func:`replicate` wraps a parallelized model in
``torch.nn.parallel.DistributedDataParallel`` over the data-parallel group,
so the dense gradients are all-reduced in buckets from autograd hooks while
the backward is still running (communication overlapped with compute),
instead of all at once after it (:func:`moe_train.parallel.sync_gradients`,
kept as the reference the tests compare with).

The math is :mod:`moe_train.parallel.grad_sync`'s: DDP's reducer multiplies
each gradient by ``1/dp`` as it copies it into a bucket and then sums the
bucket over ``dp_group``, which is the hand-written ``scale then sum``.
Routed-expert parameters are left out of DDP when expert parallelism splits
them (``ep > 1``): their gradient must be summed over the expert-data-
parallel group instead, which :meth:`Replicated.sync_experts` does after the
backward, scaled by the same ``1/dp``. With ``ep`` 1 that group holds the
same ranks as the data-parallel one, so DDP reduces the experts too.

Every dense parameter (and stacked expert weight) gets a gradient in every
step for every router / loss / gating combination (a forward + backward of
644 configurations found none without one: docs/parallelism.md), so DDP
runs with ``find_unused_parameters=False``.
Buffers are not broadcast: the only one, the aux-loss-free expert bias, is
updated identically on every rank from the global load. Parameters start
identical on every rank (each is initialized from the seed and its
unsharded name), so DDP's initial broadcast is skipped.
"""
from __future__ import annotations

import contextlib
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moe_train.parallel.grad_sync import split_params, sync_expert_gradients


def _same_ranks(a, b) -> bool:
    return dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


class Replicated:
    """``model`` under DDP over ``topology.dp_group``, with the routed
    experts reduced by hand where expert parallelism splits them.

    ``module`` is the DDP wrapper: the training forward must go through it
    (its hooks reduce in the backward). ``model`` stays the plain module for
    evaluation, checkpoints and export (no ``module.`` key prefix)."""

    def __init__(self, model: nn.Module, topology):
        self.model, self.topology = model, topology
        _, expert = split_params(model)
        self.experts_by_hand = bool(expert) and not _same_ranks(topology.dp_group,
                                                                topology.expert_dp_group)
        if self.experts_by_hand:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, [name for name, _ in expert])
        self.module = DistributedDataParallel(
            model, process_group=topology.dp_group, find_unused_parameters=False,
            forward_sync_buffers=False, init_sync=False)

    def forward_context(self, sync: bool):
        """Around one micro-batch's forward: with ``sync`` False (every
        micro-batch but the last of a step) DDP only accumulates gradients
        locally, as the hand-written path does before its one reduction."""
        return contextlib.nullcontext() if sync else self.module.no_sync()

    def __call__(self, inputs: torch.Tensor, sync: bool = True, **kwargs):
        with self.forward_context(sync):
            return self.module(inputs, **kwargs)

    def sync_experts(self) -> None:
        """After the last micro-batch's backward: the expert gradients DDP
        left out, summed over the expert-data-parallel group and scaled by
        ``1/dp`` (grad_sync.py)."""
        if self.experts_by_hand:
            sync_expert_gradients(self.model, self.topology)


def replicate(model: nn.Module, topology) -> Replicated:
    """:class:`Replicated` around ``model`` (built and parallelized, on its
    device). Needs ``topology.dp_size > 1``."""
    if topology.dp_size < 2:
        raise ValueError(f"replicate needs a data-parallel size > 1, got {topology.dp_size}")
    return Replicated(model, topology)


__all__ = ["Replicated", "replicate"]
