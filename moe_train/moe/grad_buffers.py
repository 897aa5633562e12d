"""Reused CPU buffers for the stacked expert weight gradients.

Why: on CPU, glibc serves every block above 32 MiB with a fresh ``mmap``, and
the kernel zero-fills each of its pages on first write. The loop
implementation writes each weight's gradient into one stacked ``[E, ...]``
tensor (128 MiB per weight at E=64, D=512, F=1024 in fp32), so a fresh one
per step costs 0.1 to 0.2 s of page faults per weight on a 2-core machine,
as much as the per-expert weight-gradient GEMMs themselves
(docs/performance.md). CUDA's caching allocator already recycles such
blocks; this does the same for the one allocation on CPU that dominates.

A buffer is handed out only while nothing but this cache references its
storage: after ``optimizer.zero_grad(set_to_none=True)`` dropped the
``.grad`` that aliased it. Otherwise (``.grad`` still alive during gradient
accumulation, or a caller keeping a reference) a fresh tensor is made, and
kept for the next step if the weight has fewer than two cached already.
Autograd's AccumulateGrad adopts the handed-out alias as ``.grad`` without a
copy (it steals a gradient no other tensor object references).
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

MAX_PER_WEIGHT = 2
"""One for ``.grad`` and one for the incoming gradient of a later
micro-batch, which AccumulateGrad adds into ``.grad`` and releases."""

# weight -> [(buffer, storage references when idle)]; keys compare by identity.
_cache = WeakTensorKeyDictionary()


def _storage_refs(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _reusable() -> bool:
    return hasattr(torch._C, "_storage_Use_Count")


def stacked_grad_buffer(weight: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor shaped like ``weight`` to write its whole
    gradient into (every element must be written). On CPU it reuses a
    cached block when none of its earlier hand-outs is still alive."""
    if weight.device.type != "cpu" or not _reusable():
        return torch.empty_like(weight, memory_format=torch.contiguous_format)
    entries = _cache.setdefault(weight, [])
    for buf, idle_refs in entries:
        if buf.shape == weight.shape and buf.dtype == weight.dtype \
                and _storage_refs(buf) == idle_refs:
            return buf.detach()
    buf = torch.empty_like(weight, memory_format=torch.contiguous_format)
    if len(entries) < MAX_PER_WEIGHT:
        entries.append((buf, _storage_refs(buf)))
    return buf.detach()


def clear() -> None:
    """Drop every cached buffer (their memory goes back to the allocator)."""
    _cache.clear()
