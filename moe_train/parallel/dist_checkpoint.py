"""Model and optimizer checkpoints that do not depend on how the model is split.

The format is torch.distributed.checkpoint (DCP), in a *logical* layout: every
entry is keyed by the name it has in the single-device model (EP=1, TP=1).

- Routed experts: the model holds them stacked (``<layer>.experts.w1``
  ``[E_local, D, F]``, ``w3`` the same, ``w2`` ``[E_local, F, D]``); the
  checkpoint holds one entry per expert, ``<layer>.experts.<g>.w1`` (``w2``,
  ``w3``), the expert's slice (``[D, F]`` / ``[F, D]``) under its global
  index g (``logical_entries``: local expert i of EP rank r is expert
  ``r*E/ep + i``). So the keys do not depend on the EP size, the keys of
  different EP ranks do not overlap, every rank writes its own experts and
  nothing is gathered for EP. (Mixtral's ``experts.<g>.w1.weight`` is the
  transpose, made only by the HF export.)
- Tensor-parallel shards are gathered to the full tensor over the TP group
  before the save (every TP rank then holds the same full tensor) and sliced
  on load. The saved tensor is the TP=1 tensor, so a checkpoint loads at any
  TP size.
- Replicated entries (dense weights on every data-parallel rank, experts on
  every expert-data-parallel rank, gathered TP tensors on every TP rank) are
  written once: DCP's save planner deduplicates equal keys across ranks.

AdamW's per-parameter state is keyed the same way (``state/<name>/exp_avg``,
``.../exp_avg_sq``, ``.../step``; per expert for the stacked weights, the
step repeated under each), so loading at another EP size moves expert
weights *and* their optimizer state to whichever rank now holds the expert.
Parameter-group hyperparameters (lr, betas, weight decay, the scheduler's
``initial_lr``) are saved as ``param_groups/<group name>/<field>``.

Layout of a checkpoint directory (the files of one DCP checkpoint each)::

    CKPT/model/       .metadata, __<rank>_0.distcp ...
    CKPT/optimizer/   .metadata, __<rank>_0.distcp ...

Every rank writes its own ``__<rank>_0.distcp`` files (fsynced by DCP) and
rank 0 writes ``.metadata``: ranks on several nodes must see one shared
filesystem. DCP needs no process group: in a single process the same calls
read and write the same format, so a world-1 run, ``load_model`` and a
256-rank job read each other's checkpoints.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional

import torch
from torch import nn

from moe_train.parallel.collectives import gather_tensor_parallel
from moe_train.parallel.expert_parallel import is_expert_param, logical_entries
from moe_train.parallel.tensor_parallel import full_weight_shard, is_tensor_parallel_param

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
METADATA_FILE = ".metadata"
_STATE, _GROUPS = "state", "param_groups"


class CheckpointError(ValueError):
    """A checkpoint that does not hold what the model or optimizer needs."""


# ----------------------------------------------------------------------------
# DCP calls: with or without a process group


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


def _call_dcp(fn, state: Dict[str, Any], path: str, topology) -> None:
    """``dcp.save`` / ``dcp.load`` over the job's ranks, or alone for a
    single-process topology (even inside a job: ``load_model`` on one rank
    must not wait for the others)."""
    single = not topology.distributed
    with warnings.catch_warnings():
        if single:  # DCP warns that it "assumes" single-process use: that is the intent
            warnings.filterwarnings("ignore", message=".*unavailable or uninitialized.*")
        fn(state, checkpoint_id=path, no_dist=single)


def _metadata(path: str):
    if not os.path.isfile(os.path.join(path, METADATA_FILE)):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {METADATA_FILE})")
    return _dcp().FileSystemReader(path).read_metadata()


def has_state(ckpt_dir: str, what: str = MODEL_DIR) -> bool:
    """True when ``ckpt_dir/<what>`` (``model`` or ``optimizer``) is a complete DCP checkpoint."""
    return os.path.isfile(os.path.join(ckpt_dir, what, METADATA_FILE))


def _placeholder(meta, device: torch.device) -> Any:
    """An empty value DCP can load entry ``meta`` into."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if isinstance(meta, TensorStorageMetadata):
        return torch.empty(meta.size, dtype=meta.properties.dtype, device=device)
    return None  # a pickled object: DCP replaces the placeholder


def read_state(path: str) -> Dict[str, Any]:
    """Every entry of the DCP checkpoint at ``path`` (e.g. ``CKPT/model``),
    by logical name, on the CPU. Single process, no model needed: for tools
    and tests that look inside a checkpoint."""
    md = _metadata(path)
    state = {k: _placeholder(m, torch.device("cpu")) for k, m in md.state_dict_metadata.items()}
    from moe_train.parallel.topology import Topology

    _call_dcp(_dcp().load, state, path, Topology())
    return state


# ----------------------------------------------------------------------------
# Logical (parallelism-free) state


def _full(tensor: torch.Tensor, param: torch.Tensor, topology) -> torch.Tensor:
    """``tensor`` (``param`` itself or a tensor shaped like it) as the TP=1 tensor."""
    tensor = tensor.detach()
    if is_tensor_parallel_param(param) and tensor.shape == param.shape:
        return gather_tensor_parallel(tensor, param.partition_dim, topology)
    return tensor


def _full_shape(tensor: torch.Tensor, param: torch.Tensor, topology) -> torch.Size:
    shape = list(tensor.shape)
    if is_tensor_parallel_param(param) and tensor.shape == param.shape:
        shape[param.partition_dim] *= topology.tp_size
    return torch.Size(shape)


def model_state(model: nn.Module, topology) -> Dict[str, torch.Tensor]:
    """This rank's entries of the logical state dict: every key of
    ``model.state_dict()`` under its EP=1 name, TP shards gathered to full.
    A collective over the TP group when TP > 1 (every rank must call it)."""
    return {key: _full(view, t, topology)
            for name, t in model.state_dict(keep_vars=True).items()
            for key, view in logical_entries(model, name, t)}


def _group_key(group: Dict[str, Any], index: int) -> str:
    # moe_train's optimizer names its groups (decay / no_decay); any other
    # optimizer's groups are keyed by position.
    return str(group.get("name", index))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                    topology) -> Dict[str, Any]:
    """This rank's entries of the logical optimizer state:
    ``state/<EP=1 name>/<key>`` for every per-parameter state entry (TP
    shards gathered) and ``param_groups/<group>/<field>`` for the
    hyperparameters. A collective over the TP group when TP > 1."""
    names = {id(p): name for name, p in model.named_parameters()}
    out: Dict[str, Any] = {}
    for index, group in enumerate(optimizer.param_groups):
        for field, value in group.items():
            if field != "params":
                out[f"{_GROUPS}/{_group_key(group, index)}/{field}"] = value
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError("the optimizer holds a parameter that is not the model's")
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    for gname, _ in logical_entries(model, names[id(p)], p):
                        out[f"{_STATE}/{gname}/{key}"] = value
                    continue
                for gname, view in logical_entries(model, names[id(p)], value):
                    out[f"{_STATE}/{gname}/{key}"] = _full(view, p, topology)
    return out


# ----------------------------------------------------------------------------
# Save and load


def save(ckpt_dir: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
         topology) -> None:
    """Write ``model`` (and ``optimizer``) into ``ckpt_dir/model`` (and
    ``ckpt_dir/optimizer``) in the logical layout. A collective: every rank
    of the job calls it with its own shard and writes its own files."""
    _call_dcp(_dcp().save, model_state(model, topology), os.path.join(ckpt_dir, MODEL_DIR),
              topology)
    if optimizer is not None:
        _call_dcp(_dcp().save, optimizer_state(model, optimizer, topology),
                  os.path.join(ckpt_dir, OPTIMIZER_DIR), topology)


def _check_entries(path: str, md, wanted: Dict[str, Any]) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = md.state_dict_metadata
    missing = [k for k in wanted if k not in saved]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} entries the model needs, "
                              f"e.g. {missing[0]}")
    for key, target in wanted.items():
        meta = saved[key]
        if torch.is_tensor(target) and (not isinstance(meta, TensorStorageMetadata)
                                        or tuple(meta.size) != tuple(target.shape)):
            size = tuple(meta.size) if isinstance(meta, TensorStorageMetadata) else "an object"
            raise CheckpointError(f"{path}: {key} has shape {size}, the model needs "
                                  f"{tuple(target.shape)}")


def _local(full: torch.Tensor, param: torch.Tensor, topology) -> torch.Tensor:
    """This rank's slice of the TP=1 tensor ``full`` for ``param``'s layout."""
    if is_tensor_parallel_param(param) and full.dim() == param.dim() and \
            full.shape != param.shape:
        return full_weight_shard(full, param, topology)
    return full


def load_logical_state_dict(model: nn.Module, full: Dict[str, torch.Tensor], topology) -> None:
    """Copy this rank's part of a logical (EP=1, TP=1) state dict ``full``
    into ``model``: its own experts by global name, its TP slices. Every key
    of ``model.state_dict()`` must be there (CheckpointError otherwise)."""
    own = [(key, view, t) for name, t in model.state_dict(keep_vars=True).items()
           for key, view in logical_entries(model, name, t)]
    missing = [key for key, _, _ in own if key not in full]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} entries the model needs, "
                              f"e.g. {missing[0]}")
    with torch.no_grad():
        for key, view, t in own:
            value = _local(full[key], t, topology) if view is t else full[key]
            if value.shape != view.shape:
                raise CheckpointError(f"checkpoint entry {key} has shape "
                                      f"{tuple(value.shape)}, the model needs {tuple(view.shape)}")
            view.copy_(value)


def load_model_state(path: str, model: nn.Module, topology) -> None:
    """Load the DCP model checkpoint at ``path`` (a ``CKPT/model`` dir)
    into ``model`` as laid out for ``topology``: each rank reads only the
    experts it holds and the full dense tensors, then keeps its TP slice."""
    md = _metadata(path)
    own = model.state_dict(keep_vars=True)
    targets = {key: torch.empty(_full_shape(view, t, topology), dtype=t.dtype, device=t.device)
               for name, t in own.items() for key, view in logical_entries(model, name, t)}
    _check_entries(path, md, targets)
    _call_dcp(_dcp().load, targets, path, topology)
    load_logical_state_dict(model, targets, topology)


def load_optimizer_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                         topology) -> None:
    """Load the DCP optimizer checkpoint at ``path`` (a ``CKPT/optimizer``
    dir) into ``optimizer``, whose parameters are ``model``'s as laid out
    for ``topology``: each parameter gets the state saved under its EP=1
    name (TP-sliced); a parameter without saved state (it never had a
    gradient) starts fresh. Group hyperparameters are restored by group name."""
    md = _metadata(path)
    saved = md.state_dict_metadata
    # "<state|param_groups>/<parameter or group>/<field>" -> {owner: {field: key}};
    # names never contain "/".
    index_of: Dict[str, Dict[str, Dict[str, str]]] = {_STATE: {}, _GROUPS: {}}
    for key in saved:
        kind, owner, field = key.split("/", 2)
        index_of[kind].setdefault(owner, {})[field] = key
    names = {id(p): name for name, p in model.named_parameters()}
    targets: Dict[str, Any] = {}
    keys_of: Dict[int, Dict[str, str]] = {}
    group_keys = []
    for index, group in enumerate(optimizer.param_groups):
        gkey = _group_key(group, index)
        if gkey not in index_of[_GROUPS]:
            raise CheckpointError(f"{path} has no parameter group {gkey!r}; it holds "
                                  + ", ".join(sorted(index_of[_GROUPS])))
        group_keys.append((group, index_of[_GROUPS][gkey]))
        for p in group["params"]:
            # One {field: key} per logical entry (one per expert for a
            # stacked expert weight); empty when nothing was saved.
            per_entry = [index_of[_STATE].get(gname, {})
                         for gname, _ in logical_entries(model, names[id(p)], p)]
            keys_of[id(p)] = per_entry if all(per_entry) else []
    for fields in [f for _, f in group_keys] + [f for e in keys_of.values() for f in e]:
        for key in fields.values():
            # On the CPU: load_state_dict below moves each value where this
            # optimizer keeps it.
            targets[key] = _placeholder(saved[key], torch.device("cpu"))
    _call_dcp(_dcp().load, targets, path, topology)

    # Through optimizer.load_state_dict, which casts and places each value
    # the way this optimizer keeps it (e.g. AdamW's step stays on the CPU).
    state: Dict[int, Dict[str, Any]] = {}
    groups = []
    index = 0
    for group, fields in group_keys:
        restored = {field: targets[key] for field, key in fields.items()}
        ids = []
        for p in group["params"]:
            entries = keys_of[id(p)]
            if entries:
                stacked = is_expert_param(names[id(p)])
                state[index] = {k: _restore(p, stacked, [targets[e[k]] for e in entries], topology)
                                for k in entries[0]}
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, **restored,
                       "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _restore(param: torch.Tensor, stacked: bool, values, topology):
    """One optimizer state entry of ``param`` from its logical entries'
    values: the value itself for a dense parameter (TP-sliced), the stack of
    the per-expert slices for a stacked expert weight (a 0-d value such as
    AdamW's step is the same under every expert: the first is taken)."""
    if not stacked:
        value = values[0]
        # Contiguous like the parameter: a row-parallel slice is a strided
        # view, which torch's fused AdamW kernel would read as if dense.
        return _local(value, param, topology).contiguous() if torch.is_tensor(value) else value
    first = values[0]
    if not torch.is_tensor(first) or first.dim() == 0:
        return first
    return torch.stack(values)


def load(ckpt_dir: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
         topology) -> None:
    """Load ``ckpt_dir/model`` into ``model`` (and ``ckpt_dir/optimizer``
    into ``optimizer``) for this rank's place in ``topology``. Any EP or TP
    size loads any checkpoint of the same model shapes. A collective for a
    distributed topology (every rank calls it); raises CheckpointError for
    a checkpoint that does not fit."""
    load_model_state(os.path.join(ckpt_dir, MODEL_DIR), model, topology)
    if optimizer is not None:
        load_optimizer_state(os.path.join(ckpt_dir, OPTIMIZER_DIR), model, optimizer, topology)


__all__ = ["MODEL_DIR", "OPTIMIZER_DIR", "CheckpointError", "has_state", "read_state",
           "model_state", "optimizer_state", "save", "load", "load_model_state",
           "load_optimizer_state", "load_logical_state_dict"]
