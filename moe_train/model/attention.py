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
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.config import ModelConfig, check_choice
from moe_train.model.norm import RMSNorm
from moe_train.model.document_mask import document_bias
from moe_train.model.positional import RotaryEmbedding, alibi_bias, alibi_slopes


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

    def alibi_slopes(self) -> torch.Tensor:
        """fp32 slopes ``[H]`` of the global heads this module holds."""
        return alibi_slopes(self.total_heads)[self.head_offset: self.head_offset + self.num_heads]

    def attn_bias(self, seq_len: int, device: torch.device) -> Optional[torch.Tensor]:
        """fp32 ``[H, S, S]`` ALiBi + causal bias, or None for RoPE (causal
        then comes from SDPA's ``is_causal``)."""
        if self.rotary is not None:
            return None
        return alibi_bias(self.alibi_slopes().to(device), seq_len, device)

    def _qkv(self, x_BSD: torch.Tensor, positions: Optional[torch.Tensor], cache=None):
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
            q, k = self.rotary(q, k, positions)
        if cache is not None:  # a LayerKVCache: attend to every key so far
            k, v = cache.update(k, v)
        # GQA: each kv head serves H/G consecutive query heads.
        k = k.repeat_interleave(H // G, dim=2)
        v = v.repeat_interleave(H // G, dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, d]

    def _out(self, y_BHSd: torch.Tensor) -> torch.Tensor:
        B, H, S, d = y_BHSd.shape
        return _project(self.wo, y_BHSd.transpose(1, 2).reshape(B, S, H * d))

    def forward(self, x_BSD: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cache=None, document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [B, S, D] -> [B, S, D]``; ``positions`` ``[S]`` or ``[B, S]``
        (default ``arange(S)``, after the cached ones) only matter for RoPE.
        ``cache``: a :class:`~moe_train.model.kv_cache.LayerKVCache` for
        incremental decoding; the S tokens follow the cached ones.
        ``document_ids`` ``[B, S]``: attend within a document only
        (:mod:`moe_train.model.document_mask`)."""
        q, k, v = self._qkv(x_BSD, positions, cache)
        if cache is None:
            bias, causal = self.attn_bias(x_BSD.shape[1], x_BSD.device), True
            if document_ids is not None:
                docs = document_bias(document_ids)  # [B, 1, S, S], causal included
                bias = docs if bias is None else bias + docs
        else:
            bias, causal = cache.attn_bias(self, x_BSD.shape[1], x_BSD.device), False
        if bias is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            # SDPA wants a float mask in the query dtype; -inf stays -inf.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self._out(y)

    def attention_probs(self, x_BSD: torch.Tensor,
                        positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Slow reference: fp32 probabilities ``[B, H, S, S]`` =
        ``softmax(q k^T / sqrt(d) + bias)`` with the causal mask, written out."""
        q, k, _ = self._qkv(x_BSD, positions)
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
        probs = self.attention_probs(x_BSD, positions)
        return self._out((probs @ v.float()).to(v.dtype))
