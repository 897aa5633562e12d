"""Weights between transformers' checkpoint names and a moe_train model.

``hf_to_model`` fills a freshly built :class:`~moe_train.model.transformer.
Transformer` from HF tensors (import, upcycling); ``model_to_hf`` gives the
model's weights under one MoE architecture's names (export). Both walk the
same name table, so an export re-imports exactly.

Experts go through :mod:`moe_train.hf.experts_io`: HF keeps one ``[F, D]``
matrix per expert (``experts.{j}.gate_proj.weight``; Mixtral ``w1``) or, in
transformers 5's memory layout, fused ``experts.gate_up_proj [E, 2F, D]``
and ``experts.down_proj [E, D, F]``; both are read.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from moe_train.hf.architectures import DENSE_MLP, FFN_NAMES
from moe_train.hf.experts_io import get_expert_weights, set_expert_weights


class ConversionError(ValueError):
    """Weights that do not fit the config; the message names the tensor."""


def _common_names(model: nn.Module) -> List[Tuple[str, str]]:
    """(HF name, our parameter name) for everything outside the feed-forwards."""
    pairs = [("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "final_norm.weight")]
    if model.lm_head.weight is not model.embed.weight:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    for i, block in enumerate(model.blocks):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        pairs += [(p + "input_layernorm.weight", q + "attn_norm.weight"),
                  (p + "post_attention_layernorm.weight", q + "ffn_norm.weight")]
        for hf, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            pairs.append((f"{p}self_attn.{hf}.weight", f"{q}attn.{ours}.weight"))
        if block.attn.q_norm is not None:
            pairs += [(p + "self_attn.q_norm.weight", q + "attn.q_norm.weight"),
                      (p + "self_attn.k_norm.weight", q + "attn.k_norm.weight")]
        if not block.is_moe:
            for hf, ours in zip(DENSE_MLP, ("w1", "w3", "w2")):
                pairs.append((f"{p}mlp.{hf}.weight", f"{q}ffn.{ours}.weight"))
    return pairs


def _take(tensors, name: str) -> torch.Tensor:
    if name not in tensors:
        raise ConversionError(f"weights have no tensor {name}")
    return tensors.pop(name)


def _read_experts(tensors, layer: int, model_type: str,
                  num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    prefix, (g, u, d) = FFN_NAMES[model_type]
    base = f"model.layers.{layer}.{prefix}.experts."
    if base + "gate_up_proj" in tensors:  # transformers 5 fused layout
        gate_up, down = _take(tensors, base + "gate_up_proj"), _take(tensors, base + "down_proj")
        F = gate_up.shape[1] // 2
        return gate_up[:, :F], gate_up[:, F:], down
    w1, w3, w2 = ([_take(tensors, f"{base}{j}.{n}.weight") for j in range(num_experts)]
                  for n in (g, u, d))
    return torch.stack(w1), torch.stack(w3), torch.stack(w2)


@torch.no_grad()
def hf_to_model(tensors, model: nn.Module, model_type: str, upcycle: bool = False) -> None:
    """Copy HF ``tensors`` into ``model``: a dict (copied, left as it was) or
    anything with ``in``, ``pop``, ``len`` and iteration that hands each
    tensor over once (:class:`moe_train.hf.importer.LazyTensors`).

    ``upcycle``: ``model_type`` is dense; each MoE block's experts all become
    copies of that layer's dense MLP (sparse upcycling, Komatsuzaki et al.
    2022) and its router keeps the model's random init. Raises
    :class:`ConversionError` for a missing, misshapen or unused tensor.
    """
    if isinstance(tensors, dict):
        tensors = dict(tensors)
    params = dict(model.named_parameters())
    assigned = set()

    def put(our_name: str, value: torch.Tensor, hf_name: str) -> None:
        dst = params[our_name]
        if tuple(dst.shape) != tuple(value.shape):
            raise ConversionError(f"{hf_name} has shape {list(value.shape)}, the config implies "
                                  f"{list(dst.shape)}")
        dst.copy_(value)
        assigned.add(our_name)

    for hf_name, ours in _common_names(model):
        put(ours, _take(tensors, hf_name), hf_name)
    if model.lm_head.weight is model.embed.weight and "lm_head.weight" in tensors:
        # Tied: some checkpoints still store the head; it is the embedding.
        _take(tensors, "lm_head.weight")
    for i, block in enumerate(model.blocks):
        if not block.is_moe:
            continue
        layer = block.ffn
        E = layer.cfg.num_experts
        if upcycle:
            p = f"model.layers.{i}.mlp."
            w1, w3, w2 = (_take(tensors, f"{p}{n}.weight") for n in DENSE_MLP)
            w1, w3, w2 = (w.unsqueeze(0).expand(E, *w.shape) for w in (w1, w3, w2))
        else:
            prefix = FFN_NAMES[model_type][0]
            router = f"model.layers.{i}.{prefix}.gate.weight"
            put(f"blocks.{i}.ffn.router.weight", _take(tensors, router), router)
            w1, w3, w2 = _read_experts(tensors, i, model_type, E)
        try:
            set_expert_weights(layer.experts, w1, w3, w2)
        except ValueError as exc:
            raise ConversionError(f"model.layers.{i} experts: {exc}")
        assigned.update(f"blocks.{i}.ffn.experts.{n}" for n, _ in layer.experts.named_parameters())
        if upcycle:
            assigned.add(f"blocks.{i}.ffn.router.weight")
    if tensors:
        names = sorted(tensors)
        raise ConversionError(f"{len(names)} tensors have no place in the model, e.g. {names[0]}")
    missing = sorted(set(params) - assigned)
    if missing:
        raise ConversionError(f"no weights for {missing[0]} (and {len(missing) - 1} more)")


def model_to_hf(model: nn.Module, model_type: str,
                transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None
                ) -> Dict[str, torch.Tensor]:
    """The model's weights under ``model_type``'s names (classic per-expert
    layout, CPU, contiguous). ``transform(hf_name, tensor)`` may rewrite a
    tensor (export permutes interleaved-RoPE q/k rows)."""
    params = dict(model.named_parameters())
    out: Dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        t = t.detach()
        if not t.is_meta:  # export checks shapes on a meta-device build
            t = t.to("cpu")
        out[name] = (transform(name, t) if transform else t).contiguous()

    for hf_name, ours in _common_names(model):
        put(hf_name, params[ours])
    prefix, (g, u, d) = FFN_NAMES[model_type]
    for i, block in enumerate(model.blocks):
        if not block.is_moe:
            continue
        base = f"model.layers.{i}.{prefix}."
        put(base + "gate.weight", block.ffn.router.weight)
        w1, w3, w2 = get_expert_weights(block.ffn.experts)
        for j in range(w1.shape[0]):
            for name, w in ((g, w1), (u, w3), (d, w2)):
                put(f"{base}experts.{j}.{name}.weight", w[j])
    return out
