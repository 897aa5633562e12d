"""Build a model for this rank: on the meta device, parallelized, then only
this rank's shards materialized and initialized.

    with recording_init(), meta:  model = build_model(...)   # nothing allocated
    specs = init_specs(model)                                  # by unsharded name
    with meta:                    parallelize(model, topology) # TP, then EP
    materialize(model, specs, seed, device, topology)          # own shards only

No rank allocates an expert it does not own or a full dense weight it holds
only a shard of. Every value comes from (seed, unsharded name, row)
(:mod:`moe_train.model.init`), so any layout starts from the world-1 model.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.init import InitSpec, init_specs, init_values, recording_init
from moe_train.parallel import parallelize
from moe_train.parallel.expert_parallel import is_expert_param
from moe_train.parallel.tensor_parallel import is_tensor_parallel_param

META = torch.device("meta")


def build_meta_model(model_cfg: ModelConfig, moe_cfg: MoEConfig
                     ) -> Tuple[nn.Module, Dict[str, InitSpec]]:
    """The unsharded model on the meta device and the init spec of each of
    its parameters and buffers (by name)."""
    from moe_train.model.transformer import build_model

    with recording_init(), META:
        model = build_model(model_cfg, moe_cfg)
    return model, init_specs(model)


def _region(model: nn.Module, name: str, local: torch.Tensor, full: Tuple[int, ...],
            topology) -> List[Tuple[int, int]]:
    """This rank's ``(start, stop)`` in every dimension of the full tensor."""
    region = []
    for dim, (n_full, n_local) in enumerate(zip(full, local.shape)):
        if n_full == n_local:
            region.append((0, n_full))
        elif getattr(local, "partition_dim", None) == dim and \
                getattr(local, "tensor_model_parallel", False):
            region.append((topology.tp_rank * n_local, (topology.tp_rank + 1) * n_local))
        elif dim == 0 and (is_expert_param(local) or is_expert_param(name)):
            # A stacked expert weight [E_local, ...]: rows are experts.
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            start = int(getattr(owner, "expert_offset", 0))
            region.append((start, start + n_local))
        else:
            raise ValueError(f"{name}: cannot tell which slice of the full {full} tensor "
                             f"the local {tuple(local.shape)} one holds")
    return region


def materialize(model: nn.Module, specs: Dict[str, InitSpec], seed: int,
                device: torch.device, topology) -> nn.Module:
    """Replace every meta parameter and buffer of the parallelized ``model``
    by this rank's slice of its initial value, on ``device`` (attributes such
    as ``is_expert`` and megatron's TP marks kept; tied parameters stay tied)."""
    done: Dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for pname, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done:
                    # Names do not change under TP or EP (stacked experts keep
                    # theirs; the slice is the expert range).
                    name = prefix + pname
                    spec = specs[name]
                    values = init_values(spec, seed, name,
                                         _region(model, name, p, spec.shape, topology))
                    new = nn.Parameter(values.to(device=device, dtype=p.dtype),
                                       requires_grad=p.requires_grad)
                    new.__dict__.update(p.__dict__)
                    done[id(p)] = new
                module._parameters[pname] = done[id(p)]
            for bname, b in list(module._buffers.items()):
                if b is None or not b.is_meta:
                    continue
                name = prefix + bname
                module._buffers[bname] = init_values(specs[name], seed, name).to(
                    device=device, dtype=b.dtype)
    for mod_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if torch.is_tensor(value) and value.is_meta:
                raise ValueError(f"{mod_name}.{attr}: a tensor made in __init__ on the meta "
                                 "device; create such tables with device=\"cpu\"")
    return model


def materialize_sharded(model: nn.Module, specs: Dict[str, InitSpec], seed: int,
                        device: torch.device, topology=None) -> nn.Module:
    """:func:`materialize` for a model under FSDP2: ``to_empty`` allocates
    each rank's shards, which are filled in place (FSDP keeps its parameter
    objects); every buffer is re-initialized. A shard's region in the
    unsharded tensor is its FSDP region within this rank's TP shard (offset
    by the TP rank along the partition dimension) or expert range."""
    from moe_train.parallel.fsdp import local_region
    from moe_train.parallel.tensor_parallel import mark_tensor_parallel_params

    model.to_empty(device=device)
    mark_tensor_parallel_params(model)
    tp_rank = topology.tp_rank if topology is not None else 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            region, full = local_region(p), specs[name].shape
            if tuple(p.shape) != full and (is_expert_param(p) or is_expert_param(name)):
                start = int(getattr(model.get_submodule(name.rsplit(".", 1)[0]),
                                    "expert_offset", 0))
                region[0] = (region[0][0] + start, region[0][1] + start)
            elif tuple(p.shape) != full and is_tensor_parallel_param(p):
                dim, start = p.partition_dim, tp_rank * p.shape[p.partition_dim]
                region[dim] = (region[dim][0] + start, region[dim][1] + start)
            p.to_local().copy_(init_values(specs[name], seed, name, region))
        for name, b in model.named_buffers():
            b.copy_(init_values(specs[name], seed, name))
    return model


def build_parallel_model(model_cfg: ModelConfig, moe_cfg: MoEConfig, topology, seed: int,
                         device: torch.device, dp_shard_size: int = 1) -> nn.Module:
    """The model this rank trains: built on meta, TP and EP applied (and
    FSDP2 when ``dp_shard_size`` > 1), then its own shards materialized on
    ``device`` from (``seed``, unsharded name)."""
    model, specs = build_meta_model(model_cfg, moe_cfg)
    with META:
        model = parallelize(model, topology)
    if dp_shard_size > 1:
        from moe_train.parallel.fsdp import apply_fsdp

        return materialize_sharded(apply_fsdp(model, topology, dp_shard_size), specs, seed,
                                   device, topology)
    return materialize(model, specs, seed, device, topology)


__all__ = ["build_meta_model", "materialize", "materialize_sharded", "build_parallel_model"]
