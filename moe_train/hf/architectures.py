"""The Hugging Face architectures moe_train reads and writes, and how their
``config.json`` maps onto a moe_train config.

MoE (import and export): Mixtral, OLMoE, Qwen3-MoE. Dense (import by
upcycling only): Llama, Mistral, Qwen3. All six share the Llama skeleton
(``model.embed_tokens``, ``model.layers.{i}.{input_layernorm, self_attn.
{q,k,v,o}_proj, post_attention_layernorm}``, ``model.norm``, ``lm_head``);
they differ in the feed-forward names (:data:`FFN_NAMES`), QK-norm and the
routing of the top-k gates.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

MOE_TYPES = ("mixtral", "olmoe", "qwen3_moe")
DENSE_TYPES = ("llama", "mistral", "qwen3")

# model_type -> (prefix of the MoE block under model.layers.{i}., names of
# gate / up / down in each expert). Dense MLPs are mlp.{gate,up,down}_proj.
FFN_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")

QK_NORM = {"olmoe": "projection", "qwen3_moe": "head", "qwen3": "head"}
"""QK-norm form of each model_type (the others have none)."""

CLASS_NAMES = {"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM"}


class UnsupportedError(ValueError):
    """A config.json moe_train cannot express; the message names the field."""


def _get(hf: Dict[str, Any], *names, default=None):
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    return default


def rope_theta(hf: Dict[str, Any]) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (4.x); refuses scaled RoPE, which import does not map."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise UnsupportedError(f"config.json rope type {kind!r} is not supported by import "
                               "(only unscaled RoPE)")
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def _refuse_if(cond: bool, msg: str) -> None:
    if cond:
        raise UnsupportedError(msg)


def config_from_hf(hf: Dict[str, Any], upcycle_experts: Optional[int] = None) -> Dict[str, Any]:
    """The ``model`` and ``moe`` sections of a moe_train config for a
    transformers ``config.json`` (a dict). ``upcycle_experts`` turns a dense
    model into an MoE of that many experts, each the dense MLP.
    Raises :class:`UnsupportedError` naming the field it cannot express."""
    mt = hf.get("model_type")
    _refuse_if(_get(hf, "hidden_act", "hidden_activation", default="silu") != "silu",
               f"config.json hidden_act {hf.get('hidden_act')!r}: only silu (SwiGLU) is supported")
    _refuse_if(bool(hf.get("attention_bias")), "config.json attention_bias is true: moe_train's "
               "attention projections have no bias")
    _refuse_if(bool(hf.get("mlp_bias")), "config.json mlp_bias is true: moe_train's MLPs have no bias")
    _refuse_if(hf.get("clip_qkv") is not None, f"config.json clip_qkv ({hf.get('clip_qkv')}) is "
               "not supported (moe_train does not clip q/k/v)")
    D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    max_len = int(_get(hf, "max_position_embeddings", default=4096))
    window = hf.get("sliding_window")
    use_window = hf.get("use_sliding_window", mt in ("mistral", "mixtral"))
    if window is not None and use_window:
        # Causal attention equals sliding-window attention on sequences no
        # longer than the window: cap the context there.
        max_len = min(max_len, int(window))
    model = {
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": D,
        "num_layers": int(hf["num_hidden_layers"]),
        "num_heads": H,
        "num_kv_heads": int(_get(hf, "num_key_value_heads", default=H)),
        "kv_channels": int(head_dim) if head_dim and int(head_dim) * H != D else None,
        "qk_norm": QK_NORM.get(mt),
        "norm": "rmsnorm",
        "norm_eps": float(_get(hf, "rms_norm_eps", default=1e-6)),
        "activation": "swiglu",
        "position_embedding": "rope",
        "rope": {"base": rope_theta(hf), "layout": "half", "rotary_fraction": 1.0},
        "max_seq_len": max_len,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(_get(hf, "initializer_range", default=0.02)),
    }
    if mt == "olmoe":
        _refuse_if(model["kv_channels"] is not None,
                   "config.json head_dim differs from hidden_size / num_attention_heads, "
                   "which OLMoE's q_norm over hidden_size cannot have")
    if upcycle_experts is not None:
        F = int(hf["intermediate_size"])
        model["ffn_hidden_size"] = F
        moe = {"num_experts": upcycle_experts, "top_k": min(2, upcycle_experts),
               "score_order": "softmax_then_topk", "normalize_topk": True,
               "ffn_hidden_size": F, "capacity_factor": None}
        return {"model": model, "moe": moe}

    E = int(_get(hf, "num_local_experts", "num_experts"))
    K = int(hf["num_experts_per_tok"])
    moe = {"num_experts": E, "top_k": K, "capacity_factor": None,
           "aux_loss_coef": float(_get(hf, "router_aux_loss_coef", default=0.01))}
    if mt == "mixtral":
        # softmax over the K largest logits (same experts and gates as the
        # renormalised top-K softmax, also at K = 1)
        moe.update(score_order="topk_then_softmax", ffn_hidden_size=int(hf["intermediate_size"]))
    else:
        moe.update(score_order="softmax_then_topk",
                   normalize_topk=bool(hf.get("norm_topk_prob", False)))
        moe["ffn_hidden_size"] = int(_get(hf, "moe_intermediate_size", "intermediate_size"))
    if mt == "qwen3_moe":
        model["ffn_hidden_size"] = int(hf["intermediate_size"])
        moe["layer_freq"] = int(_get(hf, "decoder_sparse_step", default=1))
        dense = list(hf.get("mlp_only_layers") or [])
        _refuse_if(dense != list(range(len(dense))), f"config.json mlp_only_layers {dense}: "
                   "moe_train's dense layers are the first k (moe.first_k_dense)")
        moe["first_k_dense"] = len(dense)
    return {"model": model, "moe": moe}
