"""Causal self-attention with grouped-query heads (GQA, Ainslie et al. 2023)
through ``torch.nn.functional.scaled_dot_product_attention``.

Legend: B batch, S sequence, D hidden, H local query heads, G local key/value
heads, d head dim.

Local heads and tensor parallelism. The module holds ``num_heads`` and
``num_kv_heads`` (the heads THIS module computes), ``head_offset`` (the global
index of its first query head) and ``total_heads`` / ``total_kv_heads`` (the
model's). Built from a ModelConfig, local = total and head_offset = 0. Tensor
parallelism, applied from outside, swaps wq/wk/wv for column-parallel and wo
for row-parallel layers and sets ``num_heads = total_heads // tp``,
``num_kv_heads = total_kv_heads // tp``, ``head_offset = tp_rank * num_heads``
(see :meth:`Attention.shard_heads`). The forward reshapes by these attributes,
so a projection whose width disagrees with them fails loudly, and ALiBi takes
``alibi_slopes(total_heads)[head_offset : head_offset + num_heads]``: the
slopes of the global heads this rank holds.

Work shared by the layers of one forward. ``Transformer.forward`` computes the
RoPE cos/sin tables and the attention mask (ALiBi bias or causal rows) once
and passes them to every layer (:class:`AttentionInputs`); a layer called on
its own computes them itself. ALiBi slopes are computed once, in fp32, and
kept per device; the bias is fp32 and is added in fp32 even under bf16
autocast (SDPA then runs in fp32 for ALiBi: in bf16 the bias of neighbouring
distances near 4000 would merge). GQA goes through SDPA's ``enable_gqa``:
keys and values keep their G heads, no ``repeat_interleave`` copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.config import ModelConfig, check_choice
from moe_train.model.norm import RMSNorm
from moe_train.model.document_mask import document_bias
from moe_train.model.positional import RotaryEmbedding, alibi_bias_rows, alibi_slopes


@dataclass
class AttentionInputs:
    """What every attention layer of one forward shares, computed once by
    :meth:`Attention.shared_inputs` (``Transformer.forward`` does it)."""

    mask: Optional[torch.Tensor]
    """fp32 additive mask ``[H, S, L]`` (ALiBi + causal) or ``[S, L]``
    (causal rows after cached keys), or None (``is_causal`` or no mask)."""
    is_causal: bool
    """SDPA's ``is_causal`` (only with ``mask`` None)."""
    cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    """RoPE tables for the positions of this forward (None for ALiBi)."""
    fp32_mask: bool = False
    """The mask holds ALiBi's linear bias, which must be added in fp32 (a
    0 / -inf mask is exact in any dtype)."""


def _compute_dtype(device: torch.device, param: torch.Tensor) -> torch.dtype:
    """The dtype the projections produce: autocast's when it is on."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param.dtype


def _project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # megatron-core's Column/RowParallelLinear return (output, bias): accept both
    # so that swapping the projections in for tensor parallelism needs no wrapper.
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


class Attention(nn.Module):
    """Causal multi-head / grouped-query self-attention.

    Projections ``wq [H*d, D]``, ``wk``, ``wv [G*d, D]``, ``wo [D, H*d]`` are
    bias-free and separate, so a HF Llama/Mixtral export maps them to
    ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``. Query head h reads
    key/value head ``h // (H/G)``. Positions come from RoPE (``rotary``) or
    ALiBi, chosen by ``ModelConfig.position_embedding``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.total_heads = cfg.num_heads
        self.total_kv_heads = cfg.kv_heads
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.kv_heads
        self.head_offset = 0
        self.head_dim = cfg.head_dim
        self.position_embedding = cfg.position_embedding
        if self.total_heads % self.total_kv_heads:
            raise ValueError(f"model.num_kv_heads ({cfg.kv_heads}) must divide "
                             f"model.num_heads ({cfg.num_heads})")

        D, d = cfg.hidden_size, cfg.head_dim
        self.wq = nn.Linear(D, self.num_heads * d, bias=False)
        self.wk = nn.Linear(D, self.num_kv_heads * d, bias=False)
        self.wv = nn.Linear(D, self.num_kv_heads * d, bias=False)
        self.wo = nn.Linear(self.num_heads * d, D, bias=False)

        # QK-norm (Qwen3: per head, weight [d]; OLMoE: over the whole q and k
        # projections, weights [H*d] and [G*d]), before RoPE in both.
        check_choice("model.qk_norm", cfg.qk_norm)
        self.qk_norm = cfg.qk_norm
        self.q_norm: Optional[nn.Module] = None
        self.k_norm: Optional[nn.Module] = None
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
        elif cfg.qk_norm == "projection":
            self.q_norm = RMSNorm(self.num_heads * d, cfg.norm_eps)
            self.k_norm = RMSNorm(self.num_kv_heads * d, cfg.norm_eps)

        if cfg.position_embedding == "rope":
            r = cfg.rope
            self.rotary: Optional[RotaryEmbedding] = RotaryEmbedding(
                d, base=r.base, layout=r.layout, rotary_fraction=r.rotary_fraction,
                scaling=r.scaling, max_seq_len=cfg.max_seq_len)
        elif cfg.position_embedding == "alibi":
            self.rotary = None
        else:
            raise ValueError(f"model.position_embedding ({cfg.position_embedding!r}) "
                             "must be one of: rope, alibi")

    def shard_heads(self, tp_size: int, tp_rank: int) -> None:
        """Set the local head attributes for tensor parallelism (the caller
        swaps the projections for sharded ones)."""
        if self.total_heads % tp_size or self.total_kv_heads % tp_size:
            raise ValueError(f"parallel.tensor_parallel_size ({tp_size}) must divide "
                             f"num_heads ({self.total_heads}) and num_kv_heads ({self.total_kv_heads})")
        self.num_heads = self.total_heads // tp_size
        self.num_kv_heads = self.total_kv_heads // tp_size
        self.head_offset = tp_rank * self.num_heads

    def alibi_slopes(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """fp32 slopes ``[H]`` of the global heads this module holds, on
        ``device`` (default CPU). Computed once per device and kept as a
        plain attribute (not a buffer, so ``model.to(bfloat16)`` cannot cast
        it) instead of being rebuilt and copied in every forward."""
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (device, self.total_heads, self.head_offset, self.num_heads)
        cache: Dict[tuple, torch.Tensor] = self.__dict__.setdefault("_slopes", {})
        if key not in cache:
            cache[key] = alibi_slopes(self.total_heads)[
                self.head_offset: self.head_offset + self.num_heads].to(device)
        return cache[key]

    def attn_bias(self, seq_len: int, device: torch.device) -> Optional[torch.Tensor]:
        """fp32 ``[H, S, S]`` ALiBi + causal bias, or None for RoPE (causal
        then comes from SDPA's ``is_causal``)."""
        if self.rotary is not None:
            return None
        return alibi_bias_rows(self.alibi_slopes(device), seq_len, seq_len, device)

    def shared_inputs(self, q_len: int, kv_len: int, positions: torch.Tensor,
                      dtype: torch.dtype, document_ids: Optional[torch.Tensor] = None
                      ) -> AttentionInputs:
        """The mask and RoPE tables for ``q_len`` queries at positions
        ``kv_len - q_len .. kv_len - 1`` against ``kv_len`` keys (``kv_len >
        q_len`` after cached keys), valid for every layer built from the same
        config (same heads, same RoPE); ``dtype`` is the dtype of q.
        ``document_ids [B, S]`` (no cached keys) adds the document mask."""
        device = positions.device
        cos_sin = None if self.rotary is None else self.rotary.cos_sin(positions, dtype)
        alibi = self.rotary is None
        if alibi:
            mask = alibi_bias_rows(self.alibi_slopes(device), q_len, kv_len, device)
            causal = False
        elif q_len == kv_len:
            mask, causal = None, True
        elif q_len == 1:   # one new query sees every key
            mask, causal = None, False
        else:
            future = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).triu(
                kv_len - q_len + 1)
            mask = torch.zeros(q_len, kv_len, device=device).masked_fill(future, float("-inf"))
            causal = False
        if document_ids is not None:
            if q_len != kv_len:
                raise ValueError("document_ids apply to a forward without cached keys")
            docs = document_bias(document_ids)  # [B, 1, S, S] fp32, causal included
            mask, causal = (docs if mask is None else mask + docs), False
        return AttentionInputs(mask=mask, is_causal=causal, cos_sin=cos_sin, fp32_mask=alibi)

    def _qkv(self, x_BSD: torch.Tensor, positions: Optional[torch.Tensor], cache=None,
             cos_sin=None):
        """q ``[B, H, S, d]`` and k, v ``[B, G, L, d]`` (G heads: SDPA's
        ``enable_gqa`` maps query head h to kv head ``h // (H/G)``)."""
        B, S, _ = x_BSD.shape
        H, G, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = _project(self.wq, x_BSD)
        k = _project(self.wk, x_BSD)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, S, H, d), k.view(B, S, G, d)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = _project(self.wv, x_BSD).view(B, S, G, d)
        if self.rotary is not None:
            if positions is None:
                start = cache.length if cache is not None else 0
                positions = torch.arange(start, start + S, device=x_BSD.device)
            q, k = self.rotary(q, k, positions, cos_sin)
        if cache is not None:  # a LayerKVCache: attend to every key so far
            k, v = cache.update(k, v)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _out(self, y_BHSd: torch.Tensor) -> torch.Tensor:
        B, H, S, d = y_BHSd.shape
        return _project(self.wo, y_BHSd.transpose(1, 2).reshape(B, S, H * d))

    def forward(self, x_BSD: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cache=None, document_ids: Optional[torch.Tensor] = None,
                shared: Optional[AttentionInputs] = None) -> torch.Tensor:
        """``x [B, S, D] -> [B, S, D]``; ``positions`` ``[S]`` or ``[B, S]``
        (default ``arange(S)``, after the cached ones) only matter for RoPE.
        ``cache``: a :class:`~moe_train.model.kv_cache.LayerKVCache` for
        incremental decoding; the S tokens follow the cached ones.
        ``document_ids`` ``[B, S]``: attend within a document only
        (:mod:`moe_train.model.document_mask`).
        ``shared``: the mask and RoPE tables of this forward, computed once
        for all layers (:meth:`shared_inputs`, which then already holds the
        document mask); computed here when None."""
        S = x_BSD.shape[1]
        if shared is None:
            kv_len = S + (cache.length if cache is not None else 0)
            if positions is None:
                positions = torch.arange(kv_len - S, kv_len, device=x_BSD.device)
            dtype = _compute_dtype(x_BSD.device, self.wq.weight)
            shared = self.shared_inputs(S, kv_len, positions, dtype,
                                        document_ids if cache is None else None)
        q, k, v = self._qkv(x_BSD, positions, cache, shared.cos_sin)
        mask, causal = shared.mask, shared.is_causal
        gqa = self.num_heads != self.num_kv_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        elif mask.dtype == q.dtype or not shared.fp32_mask:
            # A 0 / -inf mask is exact in any dtype.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), enable_gqa=gqa)
        else:
            # SDPA wants the mask in the query dtype. Rather than round the
            # fp32 ALiBi bias to bf16, run this attention in fp32 (autocast
            # off, so the bias is added in fp32) and cast the output back.
            with torch.autocast(device_type=q.device.type, enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                   attn_mask=mask.float(),
                                                   enable_gqa=gqa).to(q.dtype)
        return self._out(y)

    def attention_probs(self, x_BSD: torch.Tensor,
                        positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Slow reference: fp32 probabilities ``[B, H, S, S]`` =
        ``softmax(q k^T / sqrt(d) + bias)`` with the causal mask, written out."""
        q, k, _ = self._qkv(x_BSD, positions)
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)  # GQA, written out
        S = x_BSD.shape[1]
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        bias = self.attn_bias(S, x_BSD.device)
        if bias is None:
            future = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).triu(1)
            bias = torch.zeros(S, S, device=x_BSD.device).masked_fill(future, float("-inf"))
        return torch.softmax(scores + bias, dim=-1)

    def forward_reference(self, x_BSD: torch.Tensor,
                          positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Slow reference of :meth:`forward` through :meth:`attention_probs`."""
        _, _, v = self._qkv(x_BSD, positions)
        v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)  # GQA, written out
        probs = self.attention_probs(x_BSD, positions)
        return self._out((probs @ v.float()).to(v.dtype))
