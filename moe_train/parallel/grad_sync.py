"""Gradient all-reduce and global-norm clipping for dense and expert parameters.

Which ranks hold a copy of a parameter decides where its gradient is reduced:

- dense parameters (attention, dense MLP, norms, router, embeddings, shared
  experts) exist on every rank of the data-parallel group (ranks with the same
  TP rank): average over ``dp_group``;
- routed-expert parameters exist only on the ranks that hold the same expert
  shard, the expert-data-parallel group (size dp/ep): sum over
  ``expert_dp_group``. Their local gradient already sums the contributions of
  every rank of the EP group (the backward all-to-all brought those tokens'
  gradients here), so both kinds are scaled by 1/dp: after sync, every
  gradient is that of the mean of the dp ranks' losses, as megatron-core's
  DDP does (gradient_scaling_factor = 1/dp for dense and expert buckets).

TP-replicated parameters (norms, router, embeddings, routed experts) need no
TP reduction: with sequence parallelism off every TP rank sees the same
activations and computes the same gradient (tests/distributed/test_tp.py).

Gradients are flattened into buckets per (group, dtype, device) so a step
makes a handful of collectives, not one per parameter.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterable, List, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_train.parallel.expert_parallel import is_expert_param
from moe_train.parallel.tensor_parallel import is_tensor_parallel_param

DEFAULT_BUCKET_NUMEL = 25_000_000
"""Elements per flattened bucket (megatron-core's default bucket is 40M)."""


def _is_expert(name: str, param: torch.Tensor) -> bool:
    return is_expert_param(param) or is_expert_param(name)


def split_params(model: nn.Module) -> Tuple[List[Tuple[str, nn.Parameter]],
                                              List[Tuple[str, nn.Parameter]]]:
    """``(dense, expert)``: the trainable ``(name, param)`` pairs of ``model``
    split by where their gradient is reduced."""
    dense, expert = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (expert if _is_expert(name, param) else dense).append((name, param))
    return dense, expert


def _buckets(tensors: Iterable[torch.Tensor], bucket_numel: int) -> List[List[torch.Tensor]]:
    # Same order on every rank (parameter order), split per dtype and device
    # since a flat buffer has one of each.
    by_kind: Dict[Tuple[torch.dtype, torch.device], List[List[torch.Tensor]]] = OrderedDict()
    filled: Dict[Tuple[torch.dtype, torch.device], int] = {}
    for t in tensors:
        kind = (t.dtype, t.device)
        lists = by_kind.setdefault(kind, [[]])
        if lists[-1] and filled[kind] + t.numel() > bucket_numel:
            lists.append([])
            filled[kind] = 0
        lists[-1].append(t)
        filled[kind] = filled.get(kind, 0) + t.numel()
    return [b for lists in by_kind.values() for b in lists if b]


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_bucketed(tensors: List[torch.Tensor], group, scale: float = 1.0,
                        bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
    """In place: ``t = scale * sum over group of t`` for every tensor, through
    flattened buckets. The scale is applied before the sum (as megatron-core)
    so fp16/bf16 sums do not overflow. A group of one only scales."""
    size = _group_size(group)
    for bucket in _buckets(tensors, bucket_numel):
        flat = _flatten_dense_tensors(bucket)
        if scale != 1.0:
            flat.mul_(scale)
        if size > 1:
            dist.all_reduce(flat, group=group)
        for t, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(synced)


def _grads(params: List[Tuple[str, nn.Parameter]]) -> List[torch.Tensor]:
    # A parameter without a gradient on one rank but not another would shift
    # every later bucket and hang the collective: give it zeros, as DDP does.
    out = []
    for _, p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out


def sync_gradients(model: nn.Module, topology,
                   bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
    """Reduce the gradients of ``model`` after backward (see the module doc):
    dense ones averaged over ``topology.dp_group``, expert ones summed over
    ``topology.expert_dp_group``, both scaled by ``1/topology.dp_size``.
    Parameters that require grad but have none get zeros. No-op with dp 1.

    The trainer reduces the dense part with torch DDP during the backward
    instead (:mod:`moe_train.parallel.ddp`); this all-at-once reduction is
    the reference tests compare it with."""
    if topology.dp_size == 1:
        return
    dense, _ = split_params(model)
    all_reduce_bucketed(_grads(dense), topology.dp_group, 1.0 / topology.dp_size, bucket_numel)
    sync_expert_gradients(model, topology, bucket_numel)


def sync_expert_gradients(model: nn.Module, topology,
                          bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
    """The expert half of :func:`sync_gradients`: routed-expert gradients
    summed over ``topology.expert_dp_group`` and scaled by
    ``1/topology.dp_size`` (only scaled where that group is one rank, EP =
    dp). No-op with dp 1."""
    if topology.dp_size == 1:
        return
    _, expert = split_params(model)
    all_reduce_bucketed(_grads(expert), topology.expert_dp_group, 1.0 / topology.dp_size,
                        bucket_numel)


def _sum_of_squares(grads: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in grads])
    return norms.pow(2).sum()


def grad_norm(model: nn.Module, topology) -> torch.Tensor:
    """0-d fp32: the L2 norm of the whole model's gradient, every parameter
    counted once however it is spread: replicated ones once, TP shards summed
    over the TP group, expert shards summed over the EP group. Call after
    :func:`sync_gradients` (then every replica holds the same gradient)."""
    replicated, tp_sharded, expert = [], [], []
    device = torch.device("cpu")
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        device = p.grad.device
        if _is_expert(name, p):
            expert.append(p.grad)       # experts are never TP-sharded
        elif is_tensor_parallel_param(p):
            tp_sharded.append(p.grad)
        else:
            replicated.append(p.grad)
    total = _sum_of_squares(replicated, device)
    tp_sq = _sum_of_squares(tp_sharded, device)
    expert_sq = _sum_of_squares(expert, device)
    if _group_size(topology.tp_group) > 1:
        dist.all_reduce(tp_sq, group=topology.tp_group)
    if _group_size(topology.ep_group) > 1:
        dist.all_reduce(expert_sq, group=topology.ep_group)
    return (total + tp_sq + expert_sq).sqrt()


def clip_grad_norm(model: nn.Module, max_norm: float, topology) -> torch.Tensor:
    """Scale every gradient by ``min(1, max_norm / (norm + 1e-6))`` where norm
    is :func:`grad_norm` (the global norm, identical on every rank), and return
    that norm (before clipping). ``max_norm <= 0`` only measures. Like
    ``torch.nn.utils.clip_grad_norm_``, a non-finite norm is returned, not
    raised; the multiply stays on device (no host sync)."""
    total = grad_norm(model, topology)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return total
