"""FSDP2 (``torch.distributed.fsdp.fully_shard``) composed with EP and TP.

``parallel.dp_shard_size`` equal to the data-parallel size shards parameters,
gradients and optimizer state over the data-parallel ranks (ZeRO-3 class).
A divisor S strictly between 1 and dp gives HSDP: a 2-D mesh (replicate,
shard) of dp/S rows of S consecutive data-parallel ranks; each parameter is
sharded within a row and replicated down the columns (FSDP2 reduce-scatters
in the row, then all-reduces the shard down the column). Experts use the
same construction over their expert-data-parallel group with
``gcd(S, dp / ep)`` ranks per row (all of them when dp / ep divides S);
a gcd of 1 with more than one expert-data-parallel rank is refused
(trainer ``_refuse_unbuilt``).

- each MoE layer's routed experts (stacked ``[E_local, ...]`` weights) are
  their own FSDP unit over the expert-data-parallel group, sharded along
  dimension 0 (the expert dimension), as torchtitan does;
- each transformer block (attention, norms, router, shared experts), then
  the root (embedding, final norm, LM head) are units over the data-parallel
  group.

Gradients: FSDP reduce-scatters in the backward and averages over its mesh.
Dense units average over dp, as the replicated path does. An expert unit's
mesh is the expert-data-parallel group (dp/ep ranks) while its gradient must
be scaled by 1/dp like every other (grad_sync.py explains why): FSDP's
average leaves a factor ep, which :func:`fsdp_clip_grad_norm` divides out
before measuring (a custom divide factor would need ReduceOp.PREMUL_SUM,
which gloo lacks). The global norm sums the squares of every rank's
local shards over the data-parallel group, where each element of this TP
rank's model lives on exactly one rank; under HSDP only the first row of
each mesh (replicate coordinate 0) contributes, as the other rows hold
copies. Then over the TP group: TP-sharded weights from every TP rank,
TP-replicated parameters (norms, router, embeddings, experts) from TP rank
0 only.

Tensor parallelism composes: TP is applied first (megatron-core layers
whose plain weights hold the TP shard), then FSDP shards those TP-local
tensors over the data-parallel group (the ranks with the same TP rank).
FSDP's parameters lose megatron's TP attributes; they are put back
(``mark_tensor_parallel_params``) so that the per-name initialization,
the norm and the checkpoints know which weights are TP shards.

Checkpoints keep the logical, layout-free format: :func:`gathered` swaps in
full tensors (one all-gather per parameter and optimizer-state tensor; under
TP the TP-local full tensor, still marked, which the checkpoint gathers over
TP) around the existing save and load, so a checkpoint moves between FSDP
and replicated runs at any EP and TP size. The saving rank then holds the
full model for the duration of the save: a known limit of this first version.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from collections import defaultdict
from typing import Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

from moe_train.parallel.collectives import group_ranks
from moe_train.parallel.expert_parallel import moe_layers
from moe_train.parallel.tensor_parallel import (is_tensor_parallel_param,
                                                 mark_tensor_parallel_params,
                                                 tensor_parallel_marks)


# DTensor caches sharding decisions under keys that compare meshes by ranks,
# layout and dimension names, not by process group: a second build in the
# same process (train() after train(), new process groups) would otherwise
# be handed the first build's mesh and its destroyed groups. A fresh name
# per build keeps the meshes of different builds unequal.
_BUILDS = itertools.count()


def _mesh(topology, group, name: str):
    # From the existing megatron-core group: building a mesh from a rank list
    # would create a new group, a collective that ranks of different
    # expert-data-parallel groups would call with different lists (a hang).
    from torch.distributed.device_mesh import DeviceMesh

    if group is None:
        group = dist.group.WORLD
    return DeviceMesh.from_group(group, topology.device.type, mesh=group_ranks(group),
                                 mesh_dim_names=(name,))


def _all_group_lists(topology, group) -> List[List[int]]:
    # Every rank's member list of its ``group`` kind (dp or expert-dp), the
    # same sorted list on every rank.
    mine = group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    lists: List[List[int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(lists, mine)
    return sorted({tuple(x) for x in lists})  # type: ignore[return-value]


def _hsdp_mesh(topology, group, shard: int, name: str):
    """A 2-D (replicate, shard) mesh over ``group``'s ranks, rows of
    ``shard`` consecutive members. Every rank creates every row and column
    group of every such group in the same order (new_group is collective
    over the world even for non-members)."""
    from torch.distributed.device_mesh import DeviceMesh

    me = dist.get_rank()
    mine_rows, replicate, shard_group = None, None, None
    for members in _all_group_lists(topology, group):
        rows = [list(members[i:i + shard]) for i in range(0, len(members), shard)]
        groups_rows = [dist.new_group(r) for r in rows]
        groups_cols = [dist.new_group([r[j] for r in rows]) for j in range(shard)]
        for i, r in enumerate(rows):
            if me in r:
                mine_rows, shard_group = rows, groups_rows[i]
                replicate = groups_cols[r.index(me)]
    return DeviceMesh.from_group([replicate, shard_group], topology.device.type,
                                 mesh=torch.tensor(mine_rows, dtype=torch.int),
                                 mesh_dim_names=(f"{name}_replicate", f"{name}_shard"))


def _mesh_for(topology, group, size: int, shard: int, name: str):
    # 1-D (full sharding) when the shard spans the group, else HSDP's 2-D.
    if shard >= size:
        return _mesh(topology, group, name)
    return _hsdp_mesh(topology, group, shard, name)


def expert_shard_size(dp_shard_size: int, expert_dp_size: int) -> int:
    """Ranks each expert parameter is sharded over: ``gcd(dp_shard_size,
    expert_dp_size)`` (all expert-data-parallel ranks under full sharding)."""
    return math.gcd(dp_shard_size, expert_dp_size)


def apply_fsdp(model: nn.Module, topology, dp_shard_size: int = 0) -> nn.Module:
    """Shard ``model`` (already TP/EP-parallelized, possibly on the meta
    device) over the data-parallel ranks: experts per MoE layer over the
    expert-data-parallel group along dim 0, blocks and root over dp. Fully
    (``dp_shard_size`` 0 or dp) or HSDP (a divisor between: shard within
    rows of that many ranks, replicate across rows)."""
    from torch.distributed.fsdp import fully_shard

    shard, build = dp_shard_size or topology.dp_size, next(_BUILDS)
    dp_mesh = _mesh_for(topology, topology.dp_group, topology.dp_size, shard, f"dp{build}")
    expert_mesh = _mesh_for(topology, topology.expert_dp_group, topology.expert_dp_size,
                            expert_shard_size(shard, topology.expert_dp_size), f"edp{build}")
    for _, layer in moe_layers(model):
        fully_shard(layer.experts, mesh=expert_mesh)
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    # FSDP's new Parameter objects lack megatron's TP marks, which the
    # materialization, the norm and the checkpoints read.
    return mark_tensor_parallel_params(model)


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` went through :func:`apply_fsdp`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_region(param) -> List[Tuple[int, int]]:
    """``(start, stop)`` per dimension of the slice of ``param`` (a DTensor)
    this rank holds, in the coordinates of its global shape."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
    return [(o, o + n) for o, n in zip(offset, shape)]


def fsdp_clip_grad_norm(model: nn.Module, max_norm: float, topology) -> torch.Tensor:
    """Finish the reduced gradients of a sharded model (experts: the 1/ep
    FSDP's expert-data-parallel average leaves out), then return the global
    gradient norm (before clipping) and clip every local gradient shard by
    ``min(1, max_norm / (norm + 1e-6))``. Call once per step.

    Squares are summed over the data-parallel group, where every element of
    a TP rank's model lives on exactly one rank (HSDP: the first row), then
    over the TP group: TP-sharded weights on every TP rank, TP-replicated
    parameters and experts on TP rank 0 only (the other TP ranks hold
    copies). The norm is the same on every rank."""
    from moe_train.parallel.expert_parallel import is_expert_param

    grads = []
    replicas = topology.tp_size > 1 and topology.tp_rank != 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if _is_dtensor(p.grad) else p.grad
        if topology.ep_size > 1 and is_expert_param(name):
            g.mul_(1.0 / topology.ep_size)
        counted = _first_copy(p) and (is_tensor_parallel_param(p) or not replicas)
        grads.append((g, counted))
    device = grads[0][0].device if grads else topology.device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g, counted in grads:
        if counted:
            sq = sq + torch.linalg.vector_norm(g.detach(), dtype=torch.float32).pow(2)
    if topology.dp_group is not None and topology.dp_size > 1:
        dist.all_reduce(sq, group=topology.dp_group)
    if topology.tp_group is not None and topology.tp_size > 1:
        dist.all_reduce(sq, group=topology.tp_group)
    total = sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g, _ in grads:
            g.mul_(coef.to(g.dtype))
    return total


def _first_copy(param) -> bool:
    # HSDP: rows of the (replicate, shard) mesh hold the same shards; the
    # norm counts the row at replicate coordinate 0 only.
    if not _is_dtensor(param) or param.device_mesh.ndim < 2:
        return True
    coordinate = param.device_mesh.get_coordinate()
    return coordinate is None or coordinate[0] == 0


@contextlib.contextmanager
def gathered(model: nn.Module, optimizer=None, write_back: bool = False) -> Iterator[None]:
    """Inside the block, every sharded parameter of ``model`` (and its
    optimizer state) is a full plain tensor, as in a replicated model. With
    ``write_back`` (a load), this rank's slices of the full values are
    copied back into the shards on exit. A collective."""
    from torch.distributed.tensor import DTensor

    swapped: List[Tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    full_of: Dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not _is_dtensor(p):
                continue
            if id(p) not in full_of:
                # The TP-local full tensor, still marked as a TP shard so
                # that the checkpoint gathers (or slices) it over TP.
                full = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
                full.__dict__.update(tensor_parallel_marks(p))
                full_of[id(p)] = full
            swapped.append((module, name, p, full_of[id(p)]))
            module._parameters[name] = full_of[id(p)]
    saved_groups, saved_state = None, None
    if optimizer is not None:
        saved_groups = [list(g["params"]) for g in optimizer.param_groups]
        saved_state = optimizer.state
        state = {}
        for group in optimizer.param_groups:
            group["params"] = [full_of.get(id(p), p) for p in group["params"]]
        for p, entries in saved_state.items():
            state[full_of.get(id(p), p)] = {
                k: v.full_tensor() if _is_dtensor(v) else v for k, v in entries.items()}
        optimizer.state = defaultdict(dict, state)
    try:
        yield
    finally:
        originals = {id(full): sharded for _, _, sharded, full in swapped}
        if write_back:
            with torch.no_grad():
                for _, _, sharded, full in swapped:
                    region = local_region(sharded)
                    sharded.to_local().copy_(full[tuple(slice(a, b) for a, b in region)])
        for module, name, sharded, _ in swapped:
            module._parameters[name] = sharded
        if optimizer is not None:
            if write_back:
                new_state = {}
                for p, entries in optimizer.state.items():
                    sharded = originals.get(id(p), p)
                    if sharded is not p:
                        region = tuple(slice(a, b) for a, b in local_region(sharded))
                        entries = {k: DTensor.from_local(v[region].clone(), sharded.device_mesh,
                                                         sharded.placements, run_check=False,
                                                         shape=sharded.shape,
                                                         stride=sharded.stride())
                                   if torch.is_tensor(v) and v.dim() > 0 else v
                                   for k, v in entries.items()}
                    new_state[sharded] = entries
                saved_state = defaultdict(dict, new_state)
            for group, params in zip(optimizer.param_groups, saved_groups):
                group["params"] = params
            optimizer.state = saved_state


__all__ = ["apply_fsdp", "expert_shard_size", "is_sharded", "local_region", "fsdp_clip_grad_norm", "gathered"]
