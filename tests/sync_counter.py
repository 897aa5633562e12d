"""Count the ops that make a device-to-host sync on CUDA, on any device.

``SyncCounter`` is a TorchDispatchMode: on CPU nothing waits, but the same
ops are dispatched, so counting them proves the CUDA path's sync budget
without a GPU (``torch.cuda.set_sync_debug_mode("error")`` is the GPU check).
Counted: ``_local_scalar_dense`` (``.item()``, ``int(t)``), ``nonzero``,
``masked_select``, indexing or index_put with a boolean mask,
``repeat_interleave`` without ``output_size``, ``unique`` (all variants),
``bincount``; and ``Tensor.tolist`` (on CPU it reads memory directly
without dispatching, so it is counted by a patch of the Python method).
"""
from __future__ import annotations

import collections
from typing import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_ALWAYS = {
    aten._local_scalar_dense.default: "_local_scalar_dense",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.bincount.default: "bincount",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
              aten._index_put_impl_.default}
_REPEAT = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}


def _has_bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as c: ...`` then ``c.counts`` (a Counter by kind)
    and ``c.total``."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = collections.Counter()
        self._tolist = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter, original = self.counts, self._tolist

        def tolist(t):
            counter["tolist"] += 1
            return original(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALWAYS:
            self.counts[_ALWAYS[func]] += 1
        elif func in _INDEX_OPS and _has_bool_index(args[1]):
            self.counts["bool_index"] += 1
        elif func in _REPEAT and kwargs.get("output_size") is None:
            self.counts["repeat_interleave_without_output_size"] += 1
        return func(*args, **kwargs)
