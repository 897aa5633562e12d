"""Expert parallelism: shard each MoE layer's experts over the EP group.

Applied from outside to a model built the ordinary way (all E experts, same
seed on every rank): each rank keeps only the experts of its block
``[ep_rank*L, (ep_rank+1)*L)``, L = E/ep, and swaps the layer's dispatcher
for an :class:`AllToAllDispatcher`. Because every rank initialised all E
experts from the same seed, the kept experts hold exactly the weights the
EP=1 model has, so EP=N starts from the EP=1 model and computes the same
function. (The full init costs E experts of memory per rank for a moment; a
meta-device init can come later without changing this contract.)

The experts' weights are stacked (``w1``, ``w3`` ``[E, D, F]``, ``w2``
``[E, F, D]``), so an EP rank holds the slice ``[ep_rank*L, (ep_rank+1)*L)``
of dimension 0. :func:`logical_entries` names each expert's slice by its
global index, the layout-free form checkpoints and tests use.

Expert parameters are marked ``param.is_expert = True`` and
``param.allreduce = False`` (DeepSpeed's and megatron-core's attribute), and
:func:`is_expert_param` recognises them by name too, so gradient sync and
checkpoints can tell them from dense parameters with or without EP applied.
"""
from __future__ import annotations

import re
from typing import Iterator, List, Tuple, Union

import torch
from torch import nn

from moe_train.moe.all_to_all import AllToAllDispatcher
from moe_train.moe.layer import MoELayer

# ``<...>.experts.w1|w2|w3``: the stacked weights of a layer's routed experts
# (not ``shared_experts``, which every rank holds whole). Group 1 is the
# prefix up to and including ``experts.``, group 2 the weight name.
_EXPERT_NAME = re.compile(r"^((?:.*\.)?experts\.)(w1|w2|w3)$")


def _match_expert_name(name: str):
    return _EXPERT_NAME.match(name)


def is_expert_param(param_or_name: Union[str, torch.Tensor]) -> bool:
    """True for a routed expert's parameter: by name (``...experts.w1``,
    ``w2``, ``w3``: the stacked ``[E_local, ...]`` tensors) or by the
    ``is_expert`` attribute :func:`apply_expert_parallel` sets. Shared
    experts are dense parameters."""
    if isinstance(param_or_name, str):
        return _match_expert_name(param_or_name) is not None
    return bool(getattr(param_or_name, "is_expert", False))


def logical_entries(model: nn.Module, name: str, tensor: torch.Tensor
                    ) -> List[Tuple[str, torch.Tensor]]:
    """The layout-free (EP=1) entries of parameter ``name`` of this (possibly
    expert-parallel) model, for checkpoints and for tests that compare
    layouts.

    A dense parameter is one entry, ``(name, tensor)``. A stacked expert
    weight ``<prefix>experts.w1`` ``[E_local, ...]`` is one entry per expert,
    ``(<prefix>experts.<g>.w1, tensor[i])`` with ``g = expert_offset + i`` the
    global expert index: a view, so copying into it writes the parameter.
    ``tensor`` may also be state shaped like the parameter (AdamW's moments);
    a 0-d tensor (AdamW's ``step``) is repeated under every expert's key."""
    match = _match_expert_name(name)
    if match is None:
        return [(name, tensor)]
    experts = model.get_submodule(match.group(1)[:-1])  # the Experts module
    offset = int(getattr(experts, "expert_offset", 0))
    count = int(getattr(experts, "num_experts"))
    return [(f"{match.group(1)}{offset + i}.{match.group(2)}",
             tensor if tensor.dim() == 0 else tensor[i]) for i in range(count)]


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
    if topology.ep_size > 1:
        for name, layer in moe_layers(model):
            if layer.cfg.expert_impl == "reference":
                raise ValueError(f"{name or 'MoELayer'}: moe.expert_impl = reference runs every "
                                 "expert on the local tokens and cannot be expert-parallel; use "
                                 "auto, grouped_mm or loop with parallel.expert_parallel_size > 1")
            experts = layer.experts
            E = layer.cfg.num_experts
            if experts.num_experts != E or experts.expert_offset != 0:
                raise ValueError(f"{name or 'MoELayer'} is already expert-parallel "
                                 f"({experts.num_experts} of {E} experts held)")
            keep = local_expert_range(E, topology.ep_size, topology.ep_rank)
            # Slice the stacked weights along dim 0 (no new init, so the RNG
            # stream of the caller is untouched); the other experts' memory goes.
            experts.keep_experts(keep.start, len(keep))
            layer.dispatcher = AllToAllDispatcher(topology.ep_group, E)
    mark_expert_params(model)
    return model
