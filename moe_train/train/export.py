"""Export a trained model to the Hugging Face ecosystem as a Mixtral, OLMoE or
Qwen3-MoE checkpoint.

``moe-train export --checkpoint PATH --format hf --output DIR`` writes a
directory that ``transformers.AutoModelForCausalLM.from_pretrained(DIR)``
loads as ``MixtralForCausalLM``, ``OlmoeForCausalLM`` or
``Qwen3MoeForCausalLM`` (the one that computes what the model computes:
:func:`moe_train.hf.export_arch.check_exportable`) and that gives the same
logits as our model.

The weights are written in the classic per-expert layout
(``model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight`` for Mixtral,
``model.layers.{i}.mlp.experts.{j}.gate_proj.weight`` for the others): the
layout of the published checkpoints, read by every transformers version
(5.x fuses the experts on load, and writes this same layout from its own
``save_pretrained``), vLLM and llama.cpp's converter. The stacked expert
weights are split at this boundary (see :func:`hf_state_dict`).

Only models that one of the three can express exactly are exported; anything
else raises :class:`ExportError` naming the config field and the reason.
This module needs no transformers import: config.json is written by hand,
and the tests check it against transformers itself.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file
from torch import nn

from moe_train.config import Config, ConfigError
from moe_train.hf.convert import model_to_hf
from moe_train.hf.export_arch import (CLASSES, ExportError, check_exportable,  # noqa: F401
                                      hf_config, rope_parameters)
from moe_train.train.export_files import write_export_files

FORMATS = ("hf",)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
"""Shard size of model-XXXXX-of-YYYYY.safetensors (transformers' classic 5 GB)."""

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# What HF can express, and the config.json of each architecture, live in
# moe_train.hf.export_arch; re-exported here for callers of this module.
mixtral_config = hf_config  # the name from when Mixtral was the only target


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
    # Shapes of the unsharded model of cfg, from a meta-device build.
    from moe_train.model.transformer import build_model

    with torch.device("meta"):
        ref = build_model(cfg.model, cfg.moe)
    return {k: tuple(v.shape) for k, v in model_to_hf(ref, check_exportable(cfg)).items()}


def hf_state_dict(model: nn.Module, cfg: Config) -> Dict[str, torch.Tensor]:
    """Our weights under the chosen architecture's checkpoint names (CPU,
    contiguous, detached; :func:`moe_train.hf.convert.model_to_hf`).

    ``embed`` -> ``model.embed_tokens``; ``blocks[i].attn_norm`` ->
    ``model.layers.{i}.input_layernorm``; ``attn.wq/wk/wv/wo`` ->
    ``self_attn.q_proj/k_proj/v_proj/o_proj`` (``attn.q_norm/k_norm`` ->
    ``self_attn.q_norm/k_norm``); ``ffn_norm`` -> ``post_attention_layernorm``;
    the router -> ``block_sparse_moe.gate`` (Mixtral) or ``mlp.gate``; expert
    j of the stacked experts -> ``experts.{j}.w1/w3/w2`` (Mixtral) or
    ``experts.{j}.gate_proj/up_proj/down_proj``; a dense block's MLP ->
    ``mlp.gate_proj/up_proj/down_proj``; ``final_norm`` -> ``model.norm``;
    ``lm_head`` (left out when tied, as transformers does). Raises
    :class:`ExportError` when the model does not match ``cfg`` (e.g. a
    rank's shard under expert or tensor parallelism).
    """
    arch = check_exportable(cfg)
    model = _unwrap(model)
    m = cfg.model
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) != m.num_layers:
        raise ExportError(f"cannot export: the model has {0 if blocks is None else len(blocks)} "
                          f"blocks but model.num_layers is {m.num_layers}")
    interleaved = m.rope.layout == "interleaved"

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        if interleaved and name.endswith("self_attn.q_proj.weight"):
            return interleaved_to_half(t, m.num_heads, m.head_dim)
        if interleaved and name.endswith("self_attn.k_proj.weight"):
            return interleaved_to_half(t, m.kv_heads, m.head_dim)
        return t

    try:
        out = model_to_hf(model, arch, transform)
    except (KeyError, IndexError, AttributeError) as exc:
        raise ExportError(f"cannot export: the model does not match its config ({exc})")
    expected = _expected_shapes(cfg)
    if sorted(expected) != sorted(out):
        extra = sorted(set(expected) ^ set(out))
        raise ExportError(f"cannot export: {extra[0]} is not where the config puts it (a sharded "
                          "model, or a config that does not belong to these weights; export "
                          "the full, unsharded model)")
    for name, shape in expected.items():
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
    """Write ``model`` (built from ``cfg``) as a transformers Mixtral, OLMoE or
    Qwen3-MoE directory at ``output_dir``; return its absolute path.

    Writes ``config.json`` (:func:`hf_config`), the weights as
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
    config = hf_config(cfg, tensors["model.embed_tokens.weight"].dtype)

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
                            "(Mixtral, OLMoE or Qwen3-MoE, whichever expresses the model).")
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
                              "(a transformers model directory)")
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
    print(f"exported {args.checkpoint} -> {out} (transformers {CLASSES[check_exportable(cfg)]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
