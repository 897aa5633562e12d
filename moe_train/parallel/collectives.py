"""The few collectives the training loop needs outside gradient sync.

The trainer never imports ``torch.distributed``: it calls these functions,
which do nothing (or the obvious local thing) in a single process, so the
loop reads the same with or without a process group. Gradient sync and
clipping are in :mod:`moe_train.parallel.grad_sync`, the token all-to-all
in the MoE dispatcher, checkpoint I/O in :mod:`moe_train.parallel.dist_checkpoint`.
"""
from __future__ import annotations

from typing import Any, List

import torch
import torch.distributed as dist


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def process_group_exists() -> bool:
    """True once a default process group has been created (by a launcher's
    caller or by :func:`moe_train.parallel.topology.init_topology`)."""
    return dist.is_available() and dist.is_initialized()


def group_ranks(group) -> List[int]:
    """Global ranks of a process group, in group order."""
    return list(dist.get_process_group_ranks(group))


def barrier(topology) -> None:
    """Wait for every rank of the job (no-op in a single process)."""
    if topology.distributed:
        dist.barrier()


def broadcast_object(obj: Any, topology, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable value), returned on every rank.
    Used so that every rank agrees on what one rank decided (a run directory,
    an input error)."""
    if not topology.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any, topology) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a list of one in a
    single process)."""
    if not topology.distributed:
        return [obj]
    out: List[Any] = [None] * topology.world_size
    dist.all_gather_object(out, obj)
    return out


def reduce_mean(values: torch.Tensor, topology) -> torch.Tensor:
    """Mean of ``values`` over the data-parallel ranks (a new tensor; the
    input is not changed). Metrics only: TP ranks hold identical values, so
    the data-parallel group (ranks of one TP rank) counts each batch once."""
    if topology.dp_size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, group=topology.dp_group)
    return values / topology.dp_size


def reduce_sum(values: torch.Tensor, topology) -> torch.Tensor:
    """Sum of ``values`` over the data-parallel ranks (a new tensor), e.g.
    per-expert token counts of the whole global batch."""
    if topology.dp_size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, group=topology.dp_group)
    return values


def any_rank(values: torch.Tensor, topology) -> torch.Tensor:
    """Elementwise maximum of ``values`` over every rank of the job (a new
    tensor): one small all-reduce through which all ranks agree on flags one
    rank raised (a stop signal, a non-finite step)."""
    if not topology.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def gather_tensor_parallel(shard: torch.Tensor, dim: int, topology) -> torch.Tensor:
    """The full tensor whose slices along ``dim`` the TP ranks hold (rank
    order), on every rank of the TP group. Returns ``shard`` itself when TP is 1."""
    if _group_size(topology.tp_group) == 1:
        return shard
    shard = shard.detach().contiguous()
    parts: List[torch.Tensor] = [torch.empty_like(shard) for _ in range(topology.tp_size)]
    dist.all_gather(parts, shard, group=topology.tp_group)
    return torch.cat(parts, dim=dim)


__all__ = ["process_group_exists", "group_ranks", "barrier", "broadcast_object", "all_gather_object", "reduce_mean", "reduce_sum", "any_rank",
           "gather_tensor_parallel"]
