"""A decoder-only transformer whose feed-forward layers may be Mixture-of-Experts.

Legend: B batch, S sequence, D hidden, V vocabulary.

    input_ids [B,S] -> embed -> [B,S,D]
      -> blocks: x = x + attn(attn_norm(x)); x = x + ffn(ffn_norm(x))
      -> final_norm -> lm_head -> logits [B,S,V]

Submodule names follow HF Llama/Mixtral closely so that export is a rename:
``embed``, ``blocks[i].{attn_norm, attn.{wq,wk,wv,wo}, ffn_norm, ffn}``,
``final_norm``, ``lm_head``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from moe_train.config import ModelConfig, MoEConfig, moe_for_model
from moe_train.model.attention import Attention, AttentionInputs, _compute_dtype
from moe_train.model.mlp import MLP
from moe_train.model.norm import build_norm
from moe_train.moe.layer import MoELayer, MoEOutput


@dataclass
class ModelOutput:
    """What :meth:`Transformer.forward` returns."""

    logits: torch.Tensor
    """[B,S,V] next-token logits."""
    aux_loss: torch.Tensor
    """0-d fp32: the sum of every MoE layer's weighted router losses (zero without MoE)."""
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Each weighted router loss by name, summed over the MoE layers."""
    moe_stats: List[Dict[str, torch.Tensor]] = field(default_factory=list)
    """One stats dict per MoE layer, in layer order (tokens_per_expert, dropped_fraction)."""


def is_moe_block(layer_index: int, moe_cfg: MoEConfig) -> bool:
    """Block ``layer_index`` (0-based) is MoE when ``(i + 1) % layer_freq == 0``
    and ``i >= first_k_dense``: layer_freq=1 makes every block MoE, layer_freq=2
    blocks 1, 3, 5, ...; first_k_dense=1 keeps block 0 dense (DeepSeekMoE)."""
    return (moe_cfg.enabled and layer_index >= moe_cfg.first_k_dense
            and (layer_index + 1) % moe_cfg.layer_freq == 0)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(attn_norm(x))`` then ``x + ffn(ffn_norm(x))``.

    ``ffn`` is a :class:`MoELayer` when ``is_moe`` and a dense :class:`MLP`
    otherwise.
    """

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, layer_index: int):
        super().__init__()
        init_std = model_cfg.init_std
        output_std = init_std / math.sqrt(2 * model_cfg.num_layers)
        self.layer_index = layer_index
        self.is_moe = is_moe_block(layer_index, moe_cfg)
        self.attn_norm = build_norm(model_cfg.norm, model_cfg.hidden_size, model_cfg.norm_eps)
        self.attn = Attention(model_cfg)
        self.ffn_norm = build_norm(model_cfg.norm, model_cfg.hidden_size, model_cfg.norm_eps)
        if self.is_moe:
            moe_cfg = moe_for_model(moe_cfg, model_cfg)
            self.ffn: nn.Module = MoELayer(moe_cfg, hidden_size=moe_cfg.hidden_size,
                                           ffn_hidden_size=moe_cfg.ffn_hidden_size,
                                           activation=moe_cfg.activation,
                                           init_std=init_std, output_std=output_std,
                                           layer_index=layer_index)
        else:
            self.ffn = MLP(model_cfg.hidden_size, model_cfg.ffn_size, model_cfg.activation,
                           init_std=init_std, output_std=output_std)
        # Megatron init: N(0, init_std), output projections N(0, init_std/sqrt(2L))
        # so the residual stream's variance does not grow with depth.
        nn.init.normal_(self.attn.wq.weight, std=init_std)
        nn.init.normal_(self.attn.wk.weight, std=init_std)
        nn.init.normal_(self.attn.wv.weight, std=init_std)
        nn.init.normal_(self.attn.wo.weight, std=output_std)

    def forward(self, x_BSD: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cache=None, document_ids: Optional[torch.Tensor] = None,
                shared: Optional[AttentionInputs] = None
                ) -> Tuple[torch.Tensor, Optional[MoEOutput]]:
        """Returns the new residual stream and the MoEOutput (None for a dense
        block). ``cache``: this block's LayerKVCache, when decoding;
        ``document_ids``: attention within documents only; ``shared``: the
        attention mask and RoPE tables of this forward (already holding the
        document mask)."""
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), positions, cache, document_ids, shared)
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:
            moe_out = self.ffn(h_BSD, positions)
            return x_BSD + moe_out.output, moe_out
        return x_BSD + self.ffn(h_BSD), None


class Transformer(nn.Module):
    """Decoder-only LM: token embedding, pre-norm blocks, final norm, LM head.

    Block i (0-based) has an MoE feed-forward when ``moe_cfg.num_experts > 0``
    and ``(i + 1) % moe_cfg.layer_freq == 0`` (layer_freq=1: every block;
    layer_freq=2: blocks 1, 3, ...); every other block has a dense MLP. There
    is no absolute position embedding: RoPE or ALiBi acts inside attention.
    With ``tie_embeddings`` the LM head shares the embedding's weight tensor.
    """

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        self.model_cfg = model_cfg
        self.moe_cfg = moe_cfg
        D, V = model_cfg.hidden_size, model_cfg.vocab_size
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block(model_cfg, moe_cfg, i) for i in range(model_cfg.num_layers))
        self.final_norm = build_norm(model_cfg.norm, D, model_cfg.norm_eps)
        self.lm_head = nn.Linear(D, V, bias=False)
        nn.init.normal_(self.embed.weight, std=model_cfg.init_std)
        if model_cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=model_cfg.init_std)

    def _shared_attention_inputs(self, q_len: int, positions: torch.Tensor, cache,
                                 document_ids: Optional[torch.Tensor]
                                 ) -> Optional[AttentionInputs]:
        """RoPE cos/sin and the attention mask, once per forward for every
        layer (all blocks share heads, head offset and RoPE settings)."""
        if not self.blocks:
            return None
        attn = self.blocks[0].attn
        kv_len = q_len + (cache.length if cache is not None else 0)
        dtype = _compute_dtype(positions.device, attn.wq.weight)
        return attn.shared_inputs(q_len, kv_len, positions, dtype,
                                  document_ids if cache is None else None)

    @property
    def moe_blocks(self) -> List[Block]:
        """The blocks whose ffn is an MoELayer, in layer order."""
        return [b for b in self.blocks if b.is_moe]

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cache=None, document_ids: Optional[torch.Tensor] = None) -> ModelOutput:
        """``input_ids [B,S]`` (``positions`` ``[S]`` or ``[B,S]``, default
        ``arange(S)``, used by RoPE) -> :class:`ModelOutput`. With ``cache``
        (a :class:`~moe_train.model.kv_cache.KVCache`) the S tokens follow the
        cached ones (default positions ``cache.length + arange(S)``).
        ``document_ids [B,S]`` (:func:`moe_train.model.document_mask.document_ids`)
        limits attention to within each document."""
        B, S = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + S, device=input_ids.device)
        x_BSD = self.embed(input_ids)
        shared = self._shared_attention_inputs(S, positions, cache, document_ids)
        aux_loss = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        losses: Dict[str, torch.Tensor] = {}
        moe_stats: List[Dict[str, torch.Tensor]] = []
        for i, block in enumerate(self.blocks):
            x_BSD, moe_out = block(x_BSD, positions, None if cache is None else cache.layers[i],
                                   document_ids, shared)
            if moe_out is not None:
                aux_loss = aux_loss + moe_out.aux_loss
                for name, value in moe_out.losses.items():
                    losses[name] = losses[name] + value if name in losses else value
                moe_stats.append(moe_out.stats)
        logits_BSV = self.lm_head(self.final_norm(x_BSD))
        return ModelOutput(logits=logits_BSV, aux_loss=aux_loss, losses=losses, moe_stats=moe_stats)


def build_model(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> Transformer:
    """Build the :class:`Transformer` for these configs (on the default device)."""
    return Transformer(model_cfg, moe_cfg)
