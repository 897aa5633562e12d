"""Which transformers architecture an export writes, and its ``config.json``.

:func:`check_exportable` picks the one HF MoE architecture that computes
exactly what the model computes at inference, by QK-norm first (the only
feature that tells the three apart in both directions):

- no QK-norm -> Mixtral: an MoE feed-forward in every block, renormalised
  top-k gates;
- ``model.qk_norm: projection`` -> OLMoE: RMSNorm over the whole q and k
  projections, an MoE in every block, gates renormalised or not
  (``norm_topk_prob``), head dim = hidden / heads;
- ``model.qk_norm: head`` -> Qwen3-MoE: per-head RMSNorm, any head dim,
  gates renormalised or not, and dense blocks (``mlp_only_layers`` for the
  first k, ``decoder_sparse_step`` for layer_freq).

What none of them can express (shared experts, expert choice, capacity
dropping, ALiBi, LayerNorm, GELU experts, partial rotary, ...) is refused
with a one-line :class:`ExportError` naming the field and the reason.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from moe_train.config import Config, moe_for_model

NAMES = {"mixtral": "Mixtral", "olmoe": "OLMoE", "qwen3_moe": "Qwen3-MoE"}
CLASSES = {"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
           "qwen3_moe": "Qwen3MoeForCausalLM"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ExportError(ValueError):
    """The model cannot be exported; the one-line message names the config
    field (or the path) and the reason."""


def _refuse(arch: str, field: str, value, why: str) -> None:
    if isinstance(value, bool):
        value = str(value).lower()
    raise ExportError(f"cannot export to {NAMES[arch]}: {field} is {value}; {why}")


def target_architecture(cfg: Config) -> str:
    """The model_type an export of ``cfg`` would write (before any check)."""
    return {"projection": "olmoe", "head": "qwen3_moe"}.get(cfg.model.qk_norm, "mixtral")


def check_exportable(cfg: Config) -> str:
    """The HF ``model_type`` (mixtral, olmoe, qwen3_moe) that computes
    exactly what the model of ``cfg`` computes at inference; raises
    :class:`ExportError` naming the first field none can express.

    Accepted although no HF config has such a field: ``model.rope.layout``
    interleaved (q/k rows are permuted into the half layout, which leaves
    every attention score unchanged), ``model.rope.scaling.type`` ntk (a
    static NTK base change is the default RoPE with a larger theta),
    ``moe.score_order`` topk_then_softmax (softmax over the K largest logits
    equals the renormalised top-K softmax probabilities), and the
    training-only ``moe.jitter_eps``, ``moe.z_loss_coef`` and ``moe.aux_loss``.
    """
    m, e = cfg.model, cfg.moe
    arch = target_architecture(cfg)
    name = NAMES[arch]

    def refuse(field, value, why):
        _refuse(arch, field, value, why)

    if m.position_embedding != "rope":
        refuse("model.position_embedding", m.position_embedding,
               f"transformers' {name} only has RoPE")
    if m.rope.rotary_fraction != 1.0:
        refuse("model.rope.rotary_fraction", m.rope.rotary_fraction,
               f"transformers' {name} rotates every dim of each head (fraction 1)")
    if m.rope.scaling is not None and m.rope.scaling.type == "dynamic":
        refuse("model.rope.scaling.type", "dynamic",
               "transformers' dynamic NTK keeps the frequencies of the longest sequence it has "
               "seen, so its logits depend on earlier calls and differ from ours")
    if m.norm != "rmsnorm":
        refuse("model.norm", m.norm, f"{name}'s norms are RMSNorm")
    if not e.enabled:
        refuse("moe.num_experts", e.num_experts,
               f"this is a dense model and {name} is an MoE (import with --upcycle-experts "
               "turns a dense model into one)")
    dense_why = (f"{name} has an MoE feed-forward in every block, with no dense blocks "
                 "(Qwen3-MoE has dense blocks, and per-head QK-norm: model.qk_norm head)")
    if arch != "qwen3_moe":
        if e.layer_freq != 1:
            refuse("moe.layer_freq", e.layer_freq, dense_why)
        if e.first_k_dense and e.first_k_dense < m.num_layers:
            refuse("moe.first_k_dense", e.first_k_dense, dense_why)
    if e.router != "token_choice":
        refuse("moe.router", e.router,
               f"{name} routes by token choice (each token picks its top-k experts)")
    if e.capacity_factor is not None:
        refuse("moe.capacity_factor", e.capacity_factor,
               f"{name} is dropless, so its outputs would differ wherever an expert overflows "
               "(export needs capacity_factor null)")
    if e.num_shared_experts != 0:
        refuse("moe.num_shared_experts", e.num_shared_experts,
               "Mixtral, OLMoE and Qwen3-MoE have no shared experts")
    if e.noisy_gating:
        refuse("moe.noisy_gating", e.noisy_gating,
               f"{name}'s router has no noise weights, so the learned W_noise would be lost")
    if e.expert_bias_update_rate > 0:
        refuse("moe.expert_bias_update_rate", e.expert_bias_update_rate,
               f"{name}'s router has no selection bias, so the exported model would route "
               "differently")
    if arch == "mixtral":
        if e.score_order == "softmax_then_topk" and not e.normalize_topk:
            refuse("moe.normalize_topk", e.normalize_topk,
                   "Mixtral renormalises its top-k gates to sum to 1 (OLMoE and Qwen3-MoE can "
                   "leave them raw, with their QK-norm)")
        if e.score_order == "softmax_then_topk" and e.top_k == 1:
            # Our router keeps Switch's raw probability as the single gate;
            # Mixtral's renormalisation turns it into 1.
            refuse("moe.top_k", "1 with moe.score_order softmax_then_topk",
                   "the gate is the raw softmax probability (Switch) while Mixtral's is 1 "
                   "(topk_then_softmax at top_k 1 would match it, but there every gate is 1 "
                   "and the router learns nothing, so the config refuses it)")
    resolved = moe_for_model(e, m)
    if resolved.activation != "swiglu":
        field = "moe.activation" if e.activation is not None else "model.activation"
        refuse(field, resolved.activation, f"{name}'s experts are SwiGLU")
    if arch == "qwen3_moe" and m.activation != "swiglu" and e.first_k_dense + e.layer_freq > 1:
        refuse("model.activation", m.activation, "Qwen3-MoE's dense MLPs are SwiGLU")
    if resolved.hidden_size != m.hidden_size:
        refuse("moe.hidden_size", resolved.hidden_size,
               f"{name}'s experts have the model width model.hidden_size ({m.hidden_size})")
    if arch == "olmoe" and m.head_dim * m.num_heads != m.hidden_size:
        refuse("model.kv_channels", m.kv_channels,
               "OLMoE's q_norm spans hidden_size, so its head dim is hidden_size / num_heads")
    return arch


def rope_parameters(cfg: Config) -> Tuple[dict, int]:
    """transformers' ``rope_parameters`` for our RoPE, and the
    ``max_position_embeddings`` that goes with it."""
    m = cfg.model
    base, s, d = float(m.rope.base), m.rope.scaling, m.head_dim
    if s is None:
        return {"rope_type": "default", "rope_theta": base}, m.max_seq_len
    if s.type == "linear":
        return {"rope_type": "linear", "rope_theta": base, "factor": s.factor}, m.max_seq_len
    if s.type == "ntk":
        # Static NTK-aware scaling only changes the base; written exactly as
        # positional.RotaryEmbedding computes it, so the floats agree bit for bit.
        return {"rope_type": "default", "rope_theta": base * s.factor ** (d / (d - 2))}, m.max_seq_len
    original = int(s.original_max_position_embeddings or m.max_seq_len)
    if s.type == "yarn":
        attention_factor = (s.attention_factor if s.attention_factor is not None
                            else 0.1 * math.log(s.factor) + 1.0)
        return {"rope_type": "yarn", "rope_theta": base, "factor": s.factor,
                "original_max_position_embeddings": original,
                "beta_fast": s.beta_fast, "beta_slow": s.beta_slow,
                "attention_factor": attention_factor, "truncate": True}, m.max_seq_len
    raise ExportError(f"cannot export: model.rope.scaling.type is {s.type}; "
                      "transformers has no exact equivalent")


def _norm_topk_prob(cfg: Config) -> bool:
    # Our gates are renormalised with topk_then_softmax, or softmax_then_topk
    # with normalize_topk at top_k > 1 (at top_k 1 Switch keeps the raw probability).
    e = cfg.moe
    return e.score_order == "topk_then_softmax" or (e.normalize_topk and e.top_k > 1)


def hf_config(cfg: Config, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of the exported model (a plain dict) for the
    architecture :func:`check_exportable` picks.

    RoPE is written twice: ``rope_parameters`` (transformers 5.x) and
    ``rope_theta`` + ``rope_scaling`` (transformers 4.x, vLLM); 5.x reads
    either. No bos/eos ids: the byte tokenizer has no special tokens.
    """
    arch = check_exportable(cfg)
    m, e = cfg.model, moe_for_model(cfg.moe, cfg.model)
    rope, max_positions = rope_parameters(cfg)
    scaling = None if rope["rope_type"] == "default" else {
        k: v for k, v in rope.items() if k != "rope_theta"}
    dtype_name = _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))
    out = {
        "architectures": [CLASSES[arch]],
        "model_type": arch,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
        "rope_scaling": scaling,
        "tie_word_embeddings": m.tie_embeddings,
        "num_experts_per_tok": e.top_k,
        # Used by transformers only when fine-tuning with output_router_logits.
        "router_aux_loss_coef": e.aux_loss_weight if e.aux_loss == "switch" else 0.0,
        "output_router_logits": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    if arch == "mixtral":
        out.update({
            "intermediate_size": e.ffn_hidden_size,
            "num_local_experts": e.num_experts,
            # Our jitter multiplies the router input only; transformers' also
            # multiplies the experts' input. It never acts at inference.
            "router_jitter_noise": 0.0,
            "sliding_window": None,
        })
    elif arch == "olmoe":
        out.update({"intermediate_size": e.ffn_hidden_size, "num_experts": e.num_experts,
                    "norm_topk_prob": _norm_topk_prob(cfg), "clip_qkv": None,
                    "attention_bias": False})
    else:
        out.update({"intermediate_size": m.ffn_size, "moe_intermediate_size": e.ffn_hidden_size,
                    "num_experts": e.num_experts, "norm_topk_prob": _norm_topk_prob(cfg),
                    "decoder_sparse_step": cfg.moe.layer_freq,
                    "mlp_only_layers": list(range(min(cfg.moe.first_k_dense, m.num_layers))),
                    "attention_bias": False, "use_sliding_window": False,
                    "sliding_window": None, "max_window_layers": m.num_layers})
    return out
