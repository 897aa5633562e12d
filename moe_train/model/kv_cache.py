"""Key/value cache for incremental decoding.

Legend: B batch, S new tokens of this call, L cached + new tokens, G local
key/value heads, d head dim, H local query heads.

A forward with a cache attends the S new queries to every key written so far
(earlier calls and this one). Keys are cached after RoPE, before the GQA
repetition: a key's rotation depends only on its own position, so it never
needs to be recomputed, and storing G heads instead of H saves H/G of the
memory. The new queries sit at positions ``L - S .. L - 1``; the causal mask
and the ALiBi distances are offset by that (``Attention.shared_inputs``), so
a cached forward computes what the same positions get in one full forward
(tests/unit/test_kv_cache.py).

Dynamic NTK RoPE (the base grows with the sequence length) is the exception:
cached keys keep the base of the call that wrote them, as in transformers.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch



class LayerKVCache:
    """The keys and values of one attention layer, preallocated for
    ``max_len`` positions on the first :meth:`update` (in the keys' dtype and
    device, so bf16 autocast caches bf16)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k_BLGd: Optional[torch.Tensor] = None
        self.v_BLGd: Optional[torch.Tensor] = None

    def update(self, k_BSGd: torch.Tensor, v_BSGd: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys and values; return all of them ``[B, L, G, d]``."""
        B, S, G, d = k_BSGd.shape
        if self.length + S > self.max_len:
            raise ValueError(f"kv cache holds {self.max_len} positions (model.max_seq_len); "
                             f"{self.length} cached + {S} new do not fit")
        if self.k_BLGd is None:
            self.k_BLGd = k_BSGd.new_empty(B, self.max_len, G, d)
            self.v_BLGd = v_BSGd.new_empty(B, self.max_len, G, v_BSGd.shape[-1])
        end = self.length + S
        self.k_BLGd[:, self.length:end] = k_BSGd
        self.v_BLGd[:, self.length:end] = v_BSGd
        self.length = end
        return self.k_BLGd[:, :end], self.v_BLGd[:, :end]


class KVCache:
    """One :class:`LayerKVCache` per block of a model; ``length`` tokens are
    cached. Pass it to ``Transformer.forward(ids, cache=cache)`` for every
    call of one decode; build a new one for the next sequence."""

    def __init__(self, num_layers: int, max_len: int):
        self.layers: List[LayerKVCache] = [LayerKVCache(max_len) for _ in range(num_layers)]
        self.max_len = max_len

    @property
    def length(self) -> int:
        """Positions cached so far (the position of the next token)."""
        return self.layers[0].length if self.layers else 0

    @classmethod
    def for_model(cls, model, max_len: Optional[int] = None) -> "KVCache":
        """A cache for ``model`` (a Transformer) of ``max_len`` positions,
        default ``model.max_seq_len``."""
        return cls(len(model.blocks), max_len or model.model_cfg.max_seq_len)
