"""Export a trained model to the Hugging Face ecosystem as a Mixtral checkpoint.

``moe-train export --checkpoint PATH --format hf --output DIR`` writes a
directory that ``transformers.AutoModelForCausalLM.from_pretrained(DIR)``
loads as ``MixtralForCausalLM`` and that gives the same logits as our model.

The weights are written in the classic Mixtral layout
(``model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight``, ...): the
layout of the published Mixtral checkpoints, read by every transformers
version (5.x fuses the experts on load, and writes this same layout from its
own ``save_pretrained``), vLLM and llama.cpp's converter. Our module names
were chosen so that this is a rename (see :func:`hf_state_dict`).

Only models that Mixtral can express exactly are exported; anything else
raises :class:`ExportError` naming the config field (:func:`check_exportable`).
This module needs no transformers import: config.json is written by hand,
and the tests check it against transformers itself.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file
from torch import nn

from moe_train.config import Config, ConfigError, moe_for_model
from moe_train.train.export_files import write_export_files

FORMATS = ("hf",)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
"""Shard size of model-XXXXX-of-YYYYY.safetensors (transformers' classic 5 GB)."""

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ExportError(ValueError):
    """The model cannot be exported; the one-line message names the config
    field (or the path) and the reason."""


def _refuse(field: str, value, why: str) -> None:
    if isinstance(value, bool):
        value = str(value).lower()
    raise ExportError(f"cannot export to Mixtral: {field} is {value}; {why}")


# ----------------------------------------------------------------------------
# What Mixtral can express


def check_exportable(cfg: Config) -> None:
    """Raise :class:`ExportError` unless transformers' Mixtral computes exactly
    what the model of ``cfg`` computes at inference.

    Mixtral is: RoPE on every dim of each head (default, linear or YaRN
    frequencies; transformers' dynamic NTK is stateful, see docs/export.md),
    RMSNorm, an MoE feed-forward in every block, token-choice top-k routing
    with gates = softmax over experts, top-k, renormalised to sum 1 (so at
    top_k 1 the gate is 1, not Switch's raw probability), SwiGLU experts, no
    shared experts, no capacity (dropless).

    Accepted although Mixtral has no such field: ``model.rope.layout``
    interleaved (the q/k weights are permuted into the half layout, which
    leaves every attention score unchanged), ``model.rope.scaling.type`` ntk
    (a static NTK base change is the default RoPE with a larger theta),
    ``moe.score_order`` topk_then_softmax (softmax over the K largest logits
    equals the renormalised top-K softmax probabilities: same experts, same
    gates), and the training-only knobs ``moe.jitter_eps``, ``moe.z_loss_coef``
    and ``moe.aux_loss``, which do not change the inference forward.
    """
    m, e = cfg.model, cfg.moe
    if m.position_embedding != "rope":
        _refuse("model.position_embedding", m.position_embedding,
                "transformers' Mixtral only has RoPE")
    if m.rope.rotary_fraction != 1.0:
        _refuse("model.rope.rotary_fraction", m.rope.rotary_fraction,
                "transformers' Mixtral rotates every dim of each head (fraction 1)")
    if m.rope.scaling is not None and m.rope.scaling.type == "dynamic":
        _refuse("model.rope.scaling.type", "dynamic",
                "transformers' dynamic NTK keeps the frequencies of the longest sequence it has "
                "seen, so its logits depend on earlier calls and differ from ours")
    if m.norm != "rmsnorm":
        _refuse("model.norm", m.norm, "Mixtral's norms are RMSNorm")
    if not e.enabled:
        _refuse("moe.num_experts", e.num_experts,
                "this is a dense model and Mixtral has an MoE feed-forward in every block")
    if e.layer_freq != 1:
        _refuse("moe.layer_freq", e.layer_freq,
                "Mixtral has an MoE feed-forward in every block, with no dense blocks between")
    if e.router != "token_choice":
        _refuse("moe.router", e.router,
                "Mixtral routes by token choice (each token picks its top-k experts)")
    if e.capacity_factor is not None:
        _refuse("moe.capacity_factor", e.capacity_factor,
                "Mixtral is dropless, so its outputs would differ wherever an expert overflows "
                "(export needs capacity_factor null)")
    if e.num_shared_experts != 0:
        _refuse("moe.num_shared_experts", e.num_shared_experts, "Mixtral has no shared experts")
    if e.noisy_gating:
        _refuse("moe.noisy_gating", e.noisy_gating,
                "Mixtral's router has no noise weights, so the learned W_noise would be lost")
    if e.expert_bias_update_rate > 0:
        _refuse("moe.expert_bias_update_rate", e.expert_bias_update_rate,
                "Mixtral's router has no selection bias, so the exported model would route "
                "differently")
    if e.score_order == "softmax_then_topk" and not e.normalize_topk:
        _refuse("moe.normalize_topk", e.normalize_topk,
                "Mixtral renormalises its top-k gates to sum to 1")
    if e.score_order == "softmax_then_topk" and e.top_k == 1:
        # Our router keeps Switch's raw probability as the single gate there;
        # Mixtral's renormalisation turns it into 1.
        _refuse("moe.top_k", "1 with moe.score_order softmax_then_topk",
                "the gate is the raw softmax probability (Switch) while Mixtral's is 1 "
                "(topk_then_softmax at top_k 1 is exportable)")
    resolved = moe_for_model(e, m)
    if resolved.activation != "swiglu":
        field = "moe.activation" if e.activation is not None else "model.activation"
        _refuse(field, resolved.activation, "Mixtral's experts are SwiGLU")
    if resolved.hidden_size != m.hidden_size:
        _refuse("moe.hidden_size", resolved.hidden_size,
                f"Mixtral's experts have the model width model.hidden_size ({m.hidden_size})")


def _rope_parameters(cfg: Config) -> Tuple[dict, int]:
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
    raise ExportError(f"cannot export to Mixtral: model.rope.scaling.type is {s.type}; "
                      "transformers has no exact equivalent")


def mixtral_config(cfg: Config, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of the exported ``MixtralForCausalLM`` (a plain dict).

    RoPE is written twice: ``rope_parameters`` (transformers 5.x) and
    ``rope_theta`` + ``rope_scaling`` (transformers 4.x, vLLM); 5.x reads
    either. No bos/eos ids: the byte tokenizer has no special tokens.
    """
    check_exportable(cfg)
    m, e = cfg.model, moe_for_model(cfg.moe, cfg.model)
    rope_parameters, max_positions = _rope_parameters(cfg)
    scaling = None if rope_parameters["rope_type"] == "default" else {
        k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": e.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": rope_parameters,
        "rope_theta": rope_parameters["rope_theta"],
        "rope_scaling": scaling,
        "tie_word_embeddings": m.tie_embeddings,
        "num_local_experts": e.num_experts,
        "num_experts_per_tok": e.top_k,
        # Our jitter multiplies the router input only; transformers' also
        # multiplies the experts' input, so carrying it over would change
        # fine-tuning. It never acts at inference.
        "router_jitter_noise": 0.0,
        # Used by transformers only when fine-tuning with output_router_logits;
        # its loss is Switch-style but counts the K choices without dividing by K.
        "router_aux_loss_coef": e.aux_loss_coef if e.aux_loss == "switch" else 0.0,
        "output_router_logits": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": m.init_std,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", "")),
        "torch_dtype": _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", "")),
    }


# ----------------------------------------------------------------------------
# Weights


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DeepSpeed hold the model in .module, torch.compile in ._orig_mod.
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def interleaved_to_half(weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Permute the output rows of a q or k projection ``[num_heads*head_dim, D]``
    from the interleaved RoPE layout to the half (``rotate_half``) layout.

    Interleaved RoPE rotates the pairs (2i, 2i+1) of each head by theta_i, the
    half layout rotates (i, i + d/2). Reordering each head's dims to
    ``0, 2, 4, ..., 1, 3, 5, ...`` puts pair i at (i, i + d/2), so the rotated
    query and key come out permuted the same way, and q.k, hence every
    attention score, is unchanged (the inverse of the permutation that
    transformers' LLaMA converter applies to Meta's checkpoints).
    """
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return weight.reshape(num_heads, head_dim, -1)[:, perm].reshape(num_heads * head_dim, -1)


def _expected_shapes(cfg: Config) -> Dict[str, Tuple[int, ...]]:
    m, e = cfg.model, moe_for_model(cfg.moe, cfg.model)
    D, V, d, F = m.hidden_size, m.vocab_size, m.head_dim, e.ffn_hidden_size
    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (m.num_heads * d, D)
        shapes[p + "self_attn.k_proj.weight"] = (m.kv_heads * d, D)
        shapes[p + "self_attn.v_proj.weight"] = (m.kv_heads * d, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, m.num_heads * d)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "block_sparse_moe.gate.weight"] = (e.num_experts, D)
        for j in range(e.num_experts):
            q = f"{p}block_sparse_moe.experts.{j}."
            shapes[q + "w1.weight"] = (F, D)
            shapes[q + "w2.weight"] = (D, F)
            shapes[q + "w3.weight"] = (F, D)
    shapes["model.norm.weight"] = (D,)
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def hf_state_dict(model: nn.Module, cfg: Config) -> Dict[str, torch.Tensor]:
    """Our weights under Mixtral's checkpoint names (CPU, contiguous, detached).

    ``embed`` -> ``model.embed_tokens``; ``blocks[i].attn_norm`` ->
    ``model.layers.{i}.input_layernorm``; ``attn.wq/wk/wv/wo`` ->
    ``self_attn.q_proj/k_proj/v_proj/o_proj``; ``ffn_norm`` ->
    ``post_attention_layernorm``; ``ffn.router.weight`` ->
    ``block_sparse_moe.gate.weight``; the stacked ``ffn.experts.w1/w3[j]``
    ``[D, F]`` and ``w2[j]`` ``[F, D]`` -> ``block_sparse_moe.experts.{j}.w1/w3``
    ``[F, D]`` and ``w2`` ``[D, F]`` (transposed: nn.Linear's layout); ``final_norm`` ->
    ``model.norm``; ``lm_head`` -> ``lm_head`` (left out when tied, as
    transformers does). Raises :class:`ExportError` when the model does not
    match ``cfg`` (e.g. a rank's shard under expert or tensor parallelism).
    """
    check_exportable(cfg)
    model = _unwrap(model)
    m, e = cfg.model, cfg.moe
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) != m.num_layers:
        raise ExportError(f"cannot export: the model has {0 if blocks is None else len(blocks)} "
                          f"blocks but model.num_layers is {m.num_layers}")
    interleaved = m.rope.layout == "interleaved"

    def w(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu").contiguous()

    out: Dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(model.embed.weight)}
    for i, block in enumerate(blocks):
        p = f"model.layers.{i}."
        if not getattr(block, "is_moe", False):
            raise ExportError(f"cannot export to Mixtral: block {i} is dense; Mixtral has an MoE "
                              "feed-forward in every block")
        experts = block.ffn.experts
        if experts.num_experts != e.num_experts:
            raise ExportError(f"cannot export: block {i} holds {experts.num_experts} experts but "
                              f"moe.num_experts is {e.num_experts} (export the full, unsharded model)")
        wq, wk = w(block.attn.wq.weight), w(block.attn.wk.weight)
        if interleaved:
            wq = interleaved_to_half(wq, m.num_heads, m.head_dim)
            wk = interleaved_to_half(wk, m.kv_heads, m.head_dim)
        out[p + "input_layernorm.weight"] = w(block.attn_norm.weight)
        out[p + "self_attn.q_proj.weight"] = wq
        out[p + "self_attn.k_proj.weight"] = wk
        out[p + "self_attn.v_proj.weight"] = w(block.attn.wv.weight)
        out[p + "self_attn.o_proj.weight"] = w(block.attn.wo.weight)
        out[p + "post_attention_layernorm.weight"] = w(block.ffn_norm.weight)
        out[p + "block_sparse_moe.gate.weight"] = w(block.ffn.router.weight)
        for j in range(experts.num_experts):
            q = f"{p}block_sparse_moe.experts.{j}."
            out[q + "w1.weight"] = w(experts.w1[j].t())
            out[q + "w2.weight"] = w(experts.w2[j].t())
            out[q + "w3.weight"] = w(experts.w3[j].t())
    out["model.norm.weight"] = w(model.final_norm.weight)
    if not m.tie_embeddings:
        out["lm_head.weight"] = w(model.lm_head.weight)

    for name, shape in _expected_shapes(cfg).items():
        got = tuple(out[name].shape)
        if got != shape:
            raise ExportError(f"cannot export: {name} has shape {list(got)} but the config "
                              f"implies {list(shape)} (a sharded model, or a config that "
                              "does not belong to these weights)")
    return out


# ----------------------------------------------------------------------------
# Writing


def _write_safetensors(tensors: Dict[str, torch.Tensor], directory: str,
                       max_shard_bytes: int) -> List[str]:
    """One ``model.safetensors``, or shards plus ``model.safetensors.index.json``
    (transformers' names) when the total exceeds ``max_shard_bytes``."""
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    # transformers refuses safetensors files whose metadata lacks format=pt.
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    names, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, fname), metadata=metadata)
        names.append(fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, INDEX_FILE), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return names + [INDEX_FILE]


def check_output(output_dir: str, overwrite: bool = False) -> str:
    """The absolute output path; :class:`ExportError` if it exists (and
    ``overwrite`` is off) or is not a directory."""
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ExportError(f"output {output_dir} exists and is not a directory")
    if os.path.exists(output_dir) and not overwrite:
        raise ExportError(f"output {output_dir} already exists (pass --overwrite to replace it)")
    return output_dir


def export_hf(model: nn.Module, cfg: Config, output_dir: str, *, overwrite: bool = False,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Write ``model`` (built from ``cfg``) as a transformers
    ``MixtralForCausalLM`` directory at ``output_dir``; return its absolute path.

    Writes ``config.json`` (:func:`mixtral_config`), the weights as
    safetensors in the model's dtype (:func:`hf_state_dict`; sharded with an
    index beyond ``max_shard_bytes``), the tokenizer and
    ``generation_config.json`` (:mod:`moe_train.train.export_files`). Everything is written to a
    temporary sibling directory first and renamed into place, so a failed
    export never leaves a half-written model where a loader would find it.
    An existing ``output_dir`` is an error unless ``overwrite``.
    Raises :class:`ExportError`.
    """
    output_dir = check_output(output_dir, overwrite)
    if max_shard_bytes < 1:
        raise ExportError(f"max_shard_bytes ({max_shard_bytes}) must be >= 1")
    tensors = hf_state_dict(model, cfg)
    config = mixtral_config(cfg, tensors["model.embed_tokens.weight"].dtype)

    parent = os.path.dirname(output_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    except OSError as exc:
        raise ExportError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    try:
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(config, fh, indent=2)
            fh.write("\n")
        _write_safetensors(tensors, tmp, max_shard_bytes)
        write_export_files(cfg, tmp)  # tokenizer, generation_config.json, 0644/0755
        if os.path.exists(output_dir):
            # Swap in two renames; the old export is deleted only after the new one is in place.
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(output_dir, old)
            os.rename(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write {output_dir}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


# ----------------------------------------------------------------------------
# Loading and the command line


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; the CLI contract is one
    # line "error: ..." and exit status 2, so main() turns this into that.
    def error(self, message: str):
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moe-train export",
                description="Export a checkpoint to a Hugging Face transformers model directory "
                            "(MixtralForCausalLM).")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--format", default="hf", help="output format; only hf is supported")
    p.add_argument("--output", required=True, help="directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``moe-train export --checkpoint PATH --format hf --output DIR``.
    Returns the exit status: 0, or 2 after one line ``error: ...`` on stderr."""
    try:
        args = _parser().parse_args(argv)
        if args.format not in FORMATS:
            raise ExportError(f"--format {args.format} is not supported; the only format is hf "
                              "(a transformers MixtralForCausalLM directory)")
        check_output(args.output, args.overwrite)  # before the slow load
        # Imported here: export_hf on an in-memory model needs none of the
        # checkpoint machinery.
        from moe_train.train.checkpoint import load_model

        model, cfg = load_model(args.checkpoint)
        out = export_hf(model, cfg, args.output, overwrite=args.overwrite)
    except (_UsageError, ExportError, ConfigError, OSError, ValueError, KeyError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out} (transformers MixtralForCausalLM)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
