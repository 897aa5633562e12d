"""Parallelism applied from outside a plain single-device model.

``parallelize(model, topology)`` shards a model that every rank built from
the same seed: tensor parallelism first (attention, dense MLP, shared
experts), then expert parallelism (routed experts + all-to-all dispatcher).
After backward, ``sync_gradients`` reduces dense and expert gradients over
their own groups and ``clip_grad_norm`` clips by the global norm; the
trainer reduces the dense ones with torch DDP during the backward instead
(:mod:`moe_train.parallel.ddp`).
:mod:`moe_train.parallel.collectives` holds the training loop's other
collectives (barrier, broadcast, metric reductions) and
:mod:`moe_train.parallel.dist_checkpoint` the layout-independent sharded
checkpoints (imported on use: torch.distributed.checkpoint is slow to import).
See docs/parallelism.md.
"""
from __future__ import annotations

from torch import nn

from moe_train.parallel.expert_parallel import (apply_expert_parallel, logical_entries,
                                                is_expert_param, local_expert_range)
from moe_train.parallel.grad_sync import clip_grad_norm, grad_norm, sync_gradients
from moe_train.parallel.tensor_parallel import apply_tensor_parallel, is_tensor_parallel_param


def parallelize(model: nn.Module, topology) -> nn.Module:
    """Apply TP then EP to ``model`` for ``topology`` (in place; returns it).

    Every rank must have built ``model`` identically (same config and seed):
    each keeps its shard of the full weights, so the parallel model computes
    the single-device one. In a single process only the expert parameters get
    marked (``param.is_expert``).
    """
    apply_tensor_parallel(model, topology)
    apply_expert_parallel(model, topology)
    return model


__all__ = ["parallelize", "apply_tensor_parallel", "apply_expert_parallel", "sync_gradients",
           "clip_grad_norm", "grad_norm", "is_expert_param", "is_tensor_parallel_param",
           "logical_entries", "local_expert_range"]
