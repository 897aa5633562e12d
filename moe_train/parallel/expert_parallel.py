"""Expert parallelism: shard each MoE layer's experts over the EP group.

Applied from outside to a model built the ordinary way (all E experts, same
seed on every rank): each rank keeps only the experts of its block
``[ep_rank*L, (ep_rank+1)*L)``, L = E/ep, and swaps the layer's dispatcher
for an :class:`AllToAllDispatcher`. Because every rank initialised all E
experts from the same seed, the kept experts hold exactly the weights the
EP=1 model has, so EP=N starts from the EP=1 model and computes the same
function. (The full init costs E experts of memory per rank for a moment; a
meta-device init can come later without changing this contract.)

Expert parameters are marked ``param.is_expert = True`` and
``param.allreduce = False`` (DeepSpeed's and megatron-core's attribute), and
:func:`is_expert_param` recognises them by name too, so gradient sync and
checkpoints can tell them from dense parameters with or without EP applied.
"""
from __future__ import annotations

import re
from typing import Iterator, Tuple, Union

import torch
from torch import nn

from moe_train.moe.all_to_all import AllToAllDispatcher
from moe_train.moe.layer import MoELayer

# ``<...>.experts.experts.<i>.<rest>``: the routed experts of a layer (not
# ``shared_experts``, which every rank holds whole). Group 1 is the prefix up
# to the layer's Experts module, group 2 the local index, group 3 the rest.
_EXPERT_NAME = re.compile(r"^((?:.*\.)?experts\.experts\.)(\d+)(\..*)$")


def _match_expert_name(name: str):
    return _EXPERT_NAME.match(name)


def is_expert_param(param_or_name: Union[str, torch.Tensor]) -> bool:
    """True for a routed expert's parameter: by name (``...experts.experts.<i>...``)
    or by the ``is_expert`` attribute :func:`apply_expert_parallel` sets.
    Shared experts are dense parameters."""
    if isinstance(param_or_name, str):
        return _match_expert_name(param_or_name) is not None
    return bool(getattr(param_or_name, "is_expert", False))


def local_expert_range(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """Global expert indices that EP rank ``ep_rank`` holds."""
    if num_experts % ep_size:
        raise ValueError(f"moe.num_experts ({num_experts}) must be divisible by "
                         f"parallel.expert_parallel_size ({ep_size})")
    local = num_experts // ep_size
    return range(ep_rank * local, (ep_rank + 1) * local)


def moe_layers(model: nn.Module) -> Iterator[Tuple[str, MoELayer]]:
    """``(name, layer)`` for every MoELayer of ``model`` (the model itself included)."""
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            yield name, module


def global_param_name(model: nn.Module, name: str) -> str:
    """The name parameter ``name`` of this (possibly EP-sharded) model has in
    the EP=1 model: a local expert index becomes ``expert_offset + i``.
    Dense names come back unchanged. For checkpoints that must not depend on
    the EP size."""
    match = _match_expert_name(name)
    if match is None:
        return name
    experts = model.get_submodule(match.group(1)[:-len(".experts.")])  # the Experts module
    offset = int(getattr(experts, "expert_offset", 0))
    return f"{match.group(1)}{offset + int(match.group(2))}{match.group(3)}"


def mark_expert_params(model: nn.Module) -> None:
    """Set ``is_expert`` / ``allreduce`` on every routed-expert parameter."""
    for _, layer in moe_layers(model):
        for param in layer.experts.parameters():
            param.is_expert = True
            # megatron-core / DeepSpeed read this as "reduce over the full DP group".
            param.allreduce = False


def apply_expert_parallel(model: nn.Module, topology) -> nn.Module:
    """Keep only this EP rank's experts in every MoELayer and give each layer
    an :class:`AllToAllDispatcher` over ``topology.ep_group``.

    The model must hold all E experts, initialised identically on every rank
    (same seed). A model with ``ep_size == 1`` only gets its expert
    parameters marked. Returns ``model`` (changed in place).
    """
    mark_expert_params(model)
    if topology.ep_size == 1:
        return model
    for name, layer in moe_layers(model):
        if layer.cfg.expert_impl == "reference":
            raise ValueError(f"{name or 'MoELayer'}: moe.expert_impl = reference runs every "
                             "expert on the local tokens and cannot be expert-parallel; "
                             "use moe.expert_impl = grouped with parallel.expert_parallel_size > 1")
        experts = layer.experts
        E = layer.cfg.num_experts
        if experts.num_experts != E or experts.expert_offset != 0:
            raise ValueError(f"{name or 'MoELayer'} is already expert-parallel "
                             f"({experts.num_experts} of {E} experts held)")
        keep = local_expert_range(E, topology.ep_size, topology.ep_rank)
        # Reuse the modules (no new init, so the RNG stream of the caller is
        # untouched) and drop the others; their memory goes with them.
        experts.experts = nn.ModuleList(experts.experts[i] for i in keep)
        experts.num_experts = len(keep)
        experts.expert_offset = keep.start
        layer.dispatcher = AllToAllDispatcher(topology.ep_group, E)
    return model
