"""Routing noise (Switch jitter, Shazeer noisy gating) from a generator of its own.

The noise that decides routing must be

- identical on the tensor-parallel replicas of a layer (they route the same
  tokens and must pick the same experts, or their outputs silently diverge),
- independent across data-parallel ranks (they route different rows),
- the same after a resume at any world size as a fresh run at that world
  size would draw at that step,
- replayable: activation recompute re-runs a block's forward and must draw
  the same noise again.

A stateful stream (torch's global generator, reseeded at a resume) gives
none of these for free. So each router forward builds a fresh generator whose
seed is a hash of a :class:`RoutingNoiseKey` (seed, step, micro-batch) and the
layer index. The trainer sets the key for each micro-batch (forward and
backward, so a recompute during backward sees it too); the micro-batch field
is the micro-batch's index in the global batch, ``dp_rank * accum + m``: it
names the rows being routed, so tensor-parallel replicas (same dp rank) agree
and data-parallel ranks differ, and a data-parallel world routes like one
process that accumulates the same micro-batches.

The key lives in a process-wide variable, not a ``contextvars.ContextVar``:
autograd runs recompute on its own threads, which would not see a context
variable. Model code only reads it; only the training loop (or a test) sets it.
Outside any key (a module used on its own) the routers fall back to torch's
global generator, as plain torch code would.
"""
from __future__ import annotations

import contextlib
import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Tuple, TypeVar

import torch

__all__ = ["RoutingNoiseKey", "current_key", "set_key", "use_key", "noise_generator",
           "keyed_micro_batches", "checkpoint_context_fn"]


@dataclass(frozen=True)
class RoutingNoiseKey:
    """Which draw of routing noise a forward makes (the layer adds itself)."""

    seed: int
    """train.seed."""
    step: int
    """Optimizer step (0-based)."""
    micro_batch: int
    """Index of the micro-batch in the step's global batch: dp_rank * accum + m."""

    def layer_seed(self, layer: int) -> int:
        """A 63-bit seed for ``layer``: a hash, so that nearby keys give
        unrelated streams (seed+1 is not step+1 shifted)."""
        packed = struct.pack("<4q", self.seed, self.step, self.micro_batch, layer)
        digest = hashlib.blake2b(packed, digest_size=8, person=b"moe-route-noise").digest()
        return int.from_bytes(digest, "little") & (2 ** 63 - 1)


_KEY: Optional[RoutingNoiseKey] = None


def current_key() -> Optional[RoutingNoiseKey]:
    """The key routers draw from now, or None (global generator)."""
    return _KEY


def set_key(key: Optional[RoutingNoiseKey]) -> Optional[RoutingNoiseKey]:
    """Set the key (None clears it); returns the previous one."""
    global _KEY
    previous, _KEY = _KEY, key
    return previous


@contextlib.contextmanager
def use_key(key: Optional[RoutingNoiseKey]) -> Iterator[None]:
    """Route under ``key`` inside the block, then restore the previous key."""
    previous = set_key(key)
    try:
        yield
    finally:
        set_key(previous)


def noise_generator(layer: int, device: torch.device) -> Optional[torch.Generator]:
    """A fresh generator on ``device`` for ``layer`` under the current key,
    or None without a key (torch ops then use the global generator)."""
    key = _KEY
    if key is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(key.layer_seed(layer))
    return gen


T_ = TypeVar("T_")


def keyed_micro_batches(micro_batches: Iterable[T_], seed: int, step: int, dp_rank: int,
                        accum: int) -> Iterator[T_]:
    """Yield the micro-batches of one optimizer step, each with its key set
    while the caller runs its forward and backward; the key is cleared when
    the loop ends or breaks (the generator's ``finally``)."""
    previous = current_key()
    try:
        for m, micro in enumerate(micro_batches):
            set_key(RoutingNoiseKey(seed, step, dp_rank * accum + m))
            yield micro
    finally:
        set_key(previous)


def checkpoint_context_fn() -> Tuple[contextlib.AbstractContextManager,
                                     contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``:
    the recompute runs under the key that was current at the first forward,
    whatever is set when backward runs."""
    return contextlib.nullcontext(), use_key(current_key())
