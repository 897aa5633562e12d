"""Layout-independent initialization: each parameter from (seed, its name).

A parameter's initial value depends only on ``train.seed`` and the name it
has in the unsharded (EP=1, TP=1) model, never on the world size, the layout
or the order in which modules were built. So a rank can materialize exactly
the slice it holds, and world 1, DP, EP, TP and FSDP start from the same
model.

How: the model is built once on the meta device inside :func:`recording_init`,
which notes, for every ``torch.nn.init`` call a module makes, the
distribution it draws from (:class:`InitSpec`; the last call wins, as it does
for the values). Parameters no init function touched are norm gains (1) and
biases (0). :func:`init_values` then draws any region of a parameter: row
``i`` (index ``i`` along dimension 0; for stacked expert weights [E, ...],
expert ``i``) from a CPU generator seeded with a hash of (seed, name, i), so
a rank holding rows a..b draws only those rows, and a rank holding a column
slice draws one full row at a time and keeps its columns. The draws are made
in fp32 on the CPU, so the values are the same on every device.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from moe_train.model.norm import RMSNorm

_SPEC_ATTR = "_moe_init_spec"


@dataclass(frozen=True)
class InitSpec:
    """The distribution one parameter starts from, with its full shape."""

    kind: str
    """normal | uniform | trunc_normal | constant."""
    shape: Tuple[int, ...]
    """Shape in the unsharded model."""
    a: float = 0.0
    """normal/trunc_normal: mean; uniform: low; constant: the value."""
    b: float = 0.0
    """normal/trunc_normal: std; uniform: high."""
    low: float = -math.inf
    """trunc_normal: lower cut."""
    high: float = math.inf
    """trunc_normal: upper cut."""


def _note(tensor: torch.Tensor, kind: str, **kw) -> None:
    setattr(tensor, _SPEC_ATTR, InitSpec(kind, tuple(tensor.shape), **kw))


def _uniform_bound(tensor, gain: float, fan: float) -> float:
    return math.sqrt(3.0) * gain / math.sqrt(fan)


def _recorders(original):
    init = nn.init

    def normal_(tensor, mean=0.0, std=1.0, generator=None):
        _note(tensor, "normal", a=float(mean), b=float(std))
        return original["normal_"](tensor, mean, std)

    def uniform_(tensor, a=0.0, b=1.0, generator=None):
        _note(tensor, "uniform", a=float(a), b=float(b))
        return original["uniform_"](tensor, a, b)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        _note(tensor, "trunc_normal", a=float(mean), b=float(std), low=float(a), high=float(b))
        return original["trunc_normal_"](tensor, mean, std, a, b)

    def constant_(tensor, val):
        _note(tensor, "constant", a=float(val))
        return original["constant_"](tensor, val)

    def zeros_(tensor):
        _note(tensor, "constant", a=0.0)
        return original["zeros_"](tensor)

    def ones_(tensor):
        _note(tensor, "constant", a=1.0)
        return original["ones_"](tensor)

    def kaiming_uniform_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu",
                         generator=None):
        fan = init._calculate_correct_fan(tensor, mode)
        bound = _uniform_bound(tensor, init.calculate_gain(nonlinearity, a), fan)
        _note(tensor, "uniform", a=-bound, b=bound)
        return original["kaiming_uniform_"](tensor, a, mode, nonlinearity)

    def kaiming_normal_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu",
                        generator=None):
        fan = init._calculate_correct_fan(tensor, mode)
        _note(tensor, "normal", b=init.calculate_gain(nonlinearity, a) / math.sqrt(fan))
        return original["kaiming_normal_"](tensor, a, mode, nonlinearity)

    def xavier_uniform_(tensor, gain=1.0, generator=None):
        fan_in, fan_out = init._calculate_fan_in_and_fan_out(tensor)
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        _note(tensor, "uniform", a=-bound, b=bound)
        return original["xavier_uniform_"](tensor, gain)

    def xavier_normal_(tensor, gain=1.0, generator=None):
        fan_in, fan_out = init._calculate_fan_in_and_fan_out(tensor)
        _note(tensor, "normal", b=gain * math.sqrt(2.0 / (fan_in + fan_out)))
        return original["xavier_normal_"](tensor, gain)

    return {f.__name__: f for f in (normal_, uniform_, trunc_normal_, constant_, zeros_, ones_,
                                    kaiming_uniform_, kaiming_normal_, xavier_uniform_,
                                    xavier_normal_)}


@contextlib.contextmanager
def recording_init() -> Iterator[None]:
    """Inside the block, every ``torch.nn.init`` function also records on its
    tensor the distribution it draws from (read back by :func:`init_specs`).
    Meant for building a model on the meta device, where nothing is drawn."""
    names = ("normal_", "uniform_", "trunc_normal_", "constant_", "zeros_", "ones_",
             "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")
    original = {n: getattr(nn.init, n) for n in names}
    for name, fn in _recorders(original).items():
        setattr(nn.init, name, fn)
    try:
        yield
    finally:
        for name, fn in original.items():
            setattr(nn.init, name, fn)


_NORMS = (RMSNorm, nn.LayerNorm)


def init_specs(model: nn.Module) -> Dict[str, InitSpec]:
    """Name -> :class:`InitSpec` for every parameter and buffer of ``model``,
    built (unsharded) inside :func:`recording_init`. Parameters no init
    function touched must be norm gains (1) or biases (0); buffers start at
    0 (the expert bias of aux-loss-free balancing, the only buffer a model
    holds). Anything else raises
    ValueError naming it, so a new module cannot start from garbage."""
    specs: Dict[str, InitSpec] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, p in module.named_parameters(recurse=False):
            spec = getattr(p, _SPEC_ATTR, None)
            if spec is None or tuple(spec.shape) != tuple(p.shape):
                if isinstance(module, _NORMS) and pname == "weight":
                    spec = InitSpec("constant", tuple(p.shape), a=1.0)
                elif pname == "bias":
                    spec = InitSpec("constant", tuple(p.shape), a=0.0)
                else:
                    raise ValueError(f"parameter {prefix}{pname} of {type(module).__name__} is "
                                     "not initialized by a torch.nn.init function; give it one "
                                     "(moe_train/model/init.py)")
            specs.setdefault(prefix + pname, spec)
        for bname, b in module.named_buffers(recurse=False):
            if b is None:
                continue
            if bname != "expert_bias":
                raise ValueError(f"buffer {prefix}{bname} of {type(module).__name__} has no "
                                 "init rule for a meta-device build (moe_train/model/init.py)")
            specs[prefix + bname] = InitSpec("constant", tuple(b.shape), a=0.0)
    return specs


def row_seed(seed: int, name: str, row: int) -> int:
    """63-bit seed of row ``row`` (-1: the whole tensor) of parameter ``name``."""
    digest = hashlib.blake2b(struct.pack("<qq", seed, row) + name.encode(), digest_size=8,
                             person=b"moe-param-init").digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def _draw(spec: InitSpec, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(tuple(shape), dtype=torch.float32)
    if spec.kind == "normal":
        return out.normal_(spec.a, spec.b, generator=gen)
    if spec.kind == "uniform":
        return out.uniform_(spec.a, spec.b, generator=gen)
    if spec.kind == "trunc_normal":
        return nn.init.trunc_normal_(out, spec.a, spec.b, spec.low, spec.high, generator=gen)
    raise ValueError(f"unknown init kind {spec.kind!r}")


def init_values(spec: InitSpec, seed: int, name: str,
                region: Optional[Sequence[Tuple[int, int]]] = None) -> torch.Tensor:
    """The initial values of ``region`` (``(start, stop)`` per dimension of
    ``spec.shape``; None: all) of parameter ``name``, fp32 on the CPU. Only
    the region is allocated, plus one full row (dimension 0 index) at a time."""
    full = tuple(spec.shape)
    region = [(0, n) for n in full] if region is None else [tuple(r) for r in region]
    shape = tuple(stop - start for start, stop in region)
    if spec.kind == "constant":
        return torch.full(shape, spec.a, dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    if len(full) < 2:
        gen.manual_seed(row_seed(seed, name, -1))
        whole = _draw(spec, full, gen)
        return whole[tuple(slice(a, b) for a, b in region)].clone()
    out = torch.empty(shape, dtype=torch.float32)
    rest = tuple(slice(a, b) for a, b in region[1:])
    for j, row in enumerate(range(*region[0])):
        gen.manual_seed(row_seed(seed, name, row))
        out[j] = _draw(spec, full[1:], gen)[rest]
    return out


def init_model(model: nn.Module, specs: Dict[str, InitSpec], seed: int) -> nn.Module:
    """Set every parameter and buffer of an unsharded ``model`` (on any
    device) to its per-name initial value. Returns ``model``."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name in specs and t is not None:
                t.copy_(init_values(specs[name], seed, name))
    return model


__all__ = ["InitSpec", "recording_init", "init_specs", "init_values", "init_model", "row_seed"]
