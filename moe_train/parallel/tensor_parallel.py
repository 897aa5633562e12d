"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) applied from outside.

Swaps, in a model built the ordinary way on every TP rank (same seed):

- attention ``wq``, ``wk``, ``wv`` -> column-parallel (each rank computes its
  own heads), ``wo`` -> row-parallel (partial sums all-reduced over TP);
  the attention's ``num_heads``/``num_kv_heads``/``head_offset`` become the
  local ones, so ALiBi takes the slopes of the global heads this rank holds
  and GQA pairs local query heads with local kv heads;
- dense MLP and shared experts ``w1``, ``w3`` -> column-parallel, ``w2`` ->
  row-parallel.

The layers are megatron-core's ``ColumnParallelLinear(gather_output=False)``
and ``RowParallelLinear(input_is_parallel=True)``, subclassed only to return a
tensor instead of ``(output, bias)`` and to keep the state-dict keys of
``nn.Linear``. Each rank copies its shard of the full weight, so TP=N holds
the TP=1 model exactly.

Not sharded: embeddings, LM head, norms, routers and routed experts. Routed
experts are replicated over TP: every TP rank of an EP group receives the same
(TP-replicated) tokens and computes the same experts. With sequence
parallelism off, the gradients of every replicated parameter are identical on
the TP ranks (tests/distributed/test_tp.py checks it), so gradient sync
reduces them over the data-parallel group only, as megatron-core does.
"""
from __future__ import annotations

import torch
from torch import nn

from moe_train.model.attention import Attention
from moe_train.model.mlp import MLP
from moe_train.parallel.expert_parallel import moe_layers

_COLUMN, _ROW = 0, 1  # partition_dim of nn.Linear.weight [out, in]


def _megatron_config(tp_size: int, dtype: torch.dtype):
    from megatron.core.model_parallel_config import ModelParallelConfig

    # CPU init with initialisation off: we copy the shard of an existing
    # weight, so megatron must neither touch CUDA nor draw random numbers.
    return ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=dtype,
                               sequence_parallel=False)


def _no_init(_weight):  # megatron requires an init_method; perform_initialization=False skips it
    return None


def _as_plain_linear_state(module: nn.Module) -> None:
    # megatron's layers add an ``_extra_state`` entry (for Transformer Engine)
    # and a load hook that inserts one; drop both so a TP model's state dict
    # has exactly nn.Linear's keys.
    module._load_state_dict_pre_hooks.clear()


def _shard(weight: torch.Tensor, dim: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    if weight.shape[dim] % tp_size:
        raise ValueError(f"dimension {dim} of a {tuple(weight.shape)} weight is not divisible "
                         f"by parallel.tensor_parallel_size ({tp_size})")
    return weight.detach().chunk(tp_size, dim=dim)[tp_rank].clone().contiguous()


def _set_weight(layer: nn.Module, shard: torch.Tensor, dim: int) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if tuple(layer.weight.shape) != tuple(shard.shape):
        raise ValueError(f"shard shape {tuple(shard.shape)} != layer weight {tuple(layer.weight.shape)}")
    # Replace the data so the weight lands on the source's device and dtype
    # while keeping the Parameter (and megatron's attributes on it).
    layer.weight.data = shard
    if not hasattr(layer.weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(layer.weight, True, dim, 1)


def _tensor_only(base: type, name: str) -> type:
    """A subclass of megatron-core's ``base`` linear that returns the output
    tensor only (megatron returns ``(output, bias)``), with nn.Module's
    extra-state hooks so state-dict keys match ``nn.Linear``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return base.forward(self, x)[0]

    return type(name, (base,), {
        "__doc__": f"megatron-core {base.__name__} that returns the output tensor only.",
        "get_extra_state": nn.Module.get_extra_state,
        "set_extra_state": nn.Module.set_extra_state,
        "forward": forward,
    })


_CLASSES = {}


def _cls(kind: str):
    # Built once, on first use, so importing this module does not import
    # megatron-core (seconds of import time for single-process runs).
    if kind not in _CLASSES:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        cls = (_tensor_only(ColumnParallelLinear, "ColumnParallel") if kind == "column"
               else _tensor_only(RowParallelLinear, "RowParallel"))
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        _CLASSES[kind] = cls
    return _CLASSES[kind]


def __getattr__(name: str):
    # ``tensor_parallel.ColumnParallel`` / ``.RowParallel`` resolve lazily, so
    # pickle and deepcopy find the classes by name in any process.
    if name in ("ColumnParallel", "RowParallel"):
        return _cls("column" if name == "ColumnParallel" else "row")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _parallel_copy(linear: nn.Linear, topology, kind: str, dim: int, **direction) -> nn.Module:
    """A megatron-core ``kind`` ("column" | "row") linear holding this rank's
    slice of ``linear.weight`` along ``dim``."""
    if linear.bias is not None:
        raise ValueError("tensor parallelism here expects bias-free linears")
    w = linear.weight
    layer = _cls(kind)(w.shape[1], w.shape[0], config=_megatron_config(topology.tp_size, w.dtype),
                       init_method=_no_init, bias=False, skip_bias_add=False,
                       tp_group=topology.tp_group, **direction)
    _as_plain_linear_state(layer)
    _set_weight(layer, _shard(w, dim, topology.tp_size, topology.tp_rank), dim)
    layer.weight.requires_grad_(w.requires_grad)
    return layer


def column_parallel(linear: nn.Linear, topology) -> nn.Module:
    """A column-parallel copy of ``linear`` holding output rows
    ``[tp_rank*out/tp, (tp_rank+1)*out/tp)``; its output is this rank's slice."""
    return _parallel_copy(linear, topology, "column", _COLUMN, gather_output=False)


def row_parallel(linear: nn.Linear, topology) -> nn.Module:
    """A row-parallel copy of ``linear`` holding input columns
    ``[tp_rank*in/tp, (tp_rank+1)*in/tp)``; it takes this rank's input slice
    and returns the full output, summed over the TP group."""
    return _parallel_copy(linear, topology, "row", _ROW, input_is_parallel=True)


def is_tensor_parallel_param(param: torch.Tensor) -> bool:
    """True for a weight sharded over the TP group (each rank holds a different slice)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def shard_attention(attn: Attention, topology) -> None:
    """Shard ``attn``'s heads over the TP group (in place)."""
    if attn.num_heads != attn.total_heads:
        raise ValueError("attention is already tensor-parallel "
                         f"({attn.num_heads} of {attn.total_heads} heads held)")
    attn.shard_heads(topology.tp_size, topology.tp_rank)
    attn.wq = column_parallel(attn.wq, topology)
    attn.wk = column_parallel(attn.wk, topology)
    attn.wv = column_parallel(attn.wv, topology)
    attn.wo = row_parallel(attn.wo, topology)


def shard_mlp(mlp: MLP, topology) -> None:
    """Shard ``mlp``'s hidden units over the TP group (in place): the gate and
    up projections by output rows, the down projection by input columns, so the
    elementwise activation needs no communication."""
    mlp.w1 = column_parallel(mlp.w1, topology)
    if mlp.w3 is not None:
        mlp.w3 = column_parallel(mlp.w3, topology)
    mlp.w2 = row_parallel(mlp.w2, topology)


def apply_tensor_parallel(model: nn.Module, topology) -> nn.Module:
    """Shard every attention, dense MLP and shared expert of ``model`` over
    ``topology.tp_group``; routed experts, routers, norms and embeddings stay
    replicated. The model must be initialised identically on every TP rank.
    No-op when ``tp_size == 1``. Returns ``model`` (changed in place)."""
    if topology.tp_size == 1:
        return model
    experts = {id(m) for _, layer in moe_layers(model) for m in layer.experts.modules()}
    for module in list(model.modules()):
        if isinstance(module, Attention):
            shard_attention(module, topology)
        elif isinstance(module, MLP) and id(module) not in experts:
            shard_mlp(module, topology)
    return model


def tensor_parallel_marks(param: torch.Tensor) -> dict:
    """megatron's TP attributes of ``param`` (``tensor_model_parallel``,
    ``partition_dim``, ``partition_stride``), empty for a replicated one."""
    return {k: getattr(param, k) for k in ("tensor_model_parallel", "partition_dim",
                                            "partition_stride") if hasattr(param, k)}


def mark_tensor_parallel_params(model: nn.Module) -> nn.Module:
    """Put megatron's TP attributes back on the weight of every column- and
    row-parallel linear of ``model``. Wrappers that replace the Parameter
    objects (FSDP2's ``fully_shard``, ``to_empty``) drop them, and
    :func:`is_tensor_parallel_param` reads them. Returns ``model``."""
    kinds = {cls: _COLUMN if kind == "column" else _ROW for kind, cls in _CLASSES.items()}
    for module in model.modules():
        dim = kinds.get(type(module))
        weight = getattr(module, "weight", None)
        if dim is not None and weight is not None and not is_tensor_parallel_param(weight):
            weight.tensor_model_parallel, weight.partition_dim = True, dim
            weight.partition_stride = 1
    return model


def full_weight_shard(weight: torch.Tensor, param: torch.Tensor, topology) -> torch.Tensor:
    """The slice of a full (TP=1) tensor ``weight`` that the TP-sharded
    ``param`` of this rank corresponds to (``weight`` itself if ``param`` is
    replicated). Tests and checkpoints use it to compare shards with the
    unsharded model."""
    if not is_tensor_parallel_param(param):
        return weight
    return weight.chunk(topology.tp_size, dim=param.partition_dim)[topology.tp_rank]


__all__ = ["apply_tensor_parallel", "column_parallel", "row_parallel", "shard_attention",
           "shard_mlp", "is_tensor_parallel_param", "full_weight_shard", "tensor_parallel_marks",
           "mark_tensor_parallel_params"]
