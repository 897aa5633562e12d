"""``moe-train import``: a local transformers checkpoint -> a moe_train
checkpoint directory, optionally upcycling a dense model into an MoE.

    moe-train import --hf DIR --output OUT [--set section.key=value ...]
    moe-train import --hf DENSE_DIR --upcycle-experts N --output OUT [--set moe.top_k=K]

OUT holds ``model/`` (the DCP layout every checkpoint has), ``config.yaml``,
``import.json`` (where it came from) and copies of the tokenizer files, so
``moe_train.load_model(OUT)`` loads it and ``--set train.init_from=OUT``
starts a training run from its weights. Every input is checked before
anything is written; errors are one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch

from moe_train.config import Config, ConfigError, config_from_dict, save_config
from moe_train.hf.architectures import DENSE_TYPES, MOE_TYPES, UnsupportedError, config_from_hf
from moe_train.hf.convert import ConversionError, hf_to_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")
PROVENANCE_FILE = "import.json"


class ImportInputError(ValueError):
    """Bad import input; the one-line message names the file or option."""


def read_hf_config(hf_dir: str) -> Dict:
    """``config.json`` of ``hf_dir`` as a dict; ImportInputError when absent or unreadable."""
    if not os.path.isdir(hf_dir):
        raise ImportInputError(f"--hf {hf_dir} is not a directory")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ImportInputError(f"{hf_dir} has no config.json (expected a transformers "
                               "checkpoint directory)")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ImportInputError(f"cannot read {path}: {exc}")


def weight_files(hf_dir: str) -> List[str]:
    """The safetensors files of ``hf_dir``; every file the index names must exist."""
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as fh:
                files = sorted(set(json.load(fh)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise ImportInputError(f"cannot read {index}: {exc}")
        for f in files:
            if not os.path.isfile(os.path.join(hf_dir, f)):
                raise ImportInputError(f"weights file {f} named in {index} is missing")
        return [os.path.join(hf_dir, f) for f in files]
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise ImportInputError(f"{hf_dir} has no {SINGLE_FILE} or {INDEX_FILE} "
                           "(import reads safetensors checkpoints)")


class LazyTensors:
    """The tensors of some safetensors files by name, each read (as fp32, the
    master-weight dtype) only when :meth:`pop` takes it, so an import holds
    the model plus one layer's tensors, not a second copy of the checkpoint."""

    def __init__(self, files: Sequence[str]):
        from safetensors import safe_open

        self._files = {path: safe_open(path, framework="pt") for path in files}
        self._where = {name: path for path, f in self._files.items() for name in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self):
        return iter(sorted(self._where))

    def __len__(self) -> int:
        return len(self._where)

    def pop(self, name: str) -> torch.Tensor:
        return self._files[self._where.pop(name)].get_tensor(name).float()


def read_tensors(files: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Every tensor of ``files`` in fp32, read at once (tests, small models)."""
    lazy = LazyTensors(files)
    return {name: lazy.pop(name) for name in list(lazy)}


def resolve_config(hf: Dict, upcycle_experts: Optional[int], overrides: Sequence[str],
                   tokenizer: Optional[str]) -> Config:
    """The moe_train config of the imported model (``--set`` applied last)."""
    mt = hf.get("model_type")
    supported = MOE_TYPES + DENSE_TYPES
    if mt not in supported:
        raise ImportInputError(f"config.json model_type {mt!r} is not supported; supported: "
                               f"{', '.join(MOE_TYPES)} (MoE), {', '.join(DENSE_TYPES)} "
                               "(dense, with --upcycle-experts)")
    if upcycle_experts is None and mt in DENSE_TYPES:
        raise ImportInputError(f"config.json model_type {mt!r} is dense: pass --upcycle-experts N "
                               "to turn it into an MoE")
    if upcycle_experts is not None and mt in MOE_TYPES:
        raise ImportInputError(f"--upcycle-experts needs a dense model; model_type {mt!r} "
                               "is already an MoE")
    try:
        data = config_from_hf(hf, upcycle_experts)
    except (UnsupportedError, KeyError) as exc:
        msg = str(exc) if isinstance(exc, UnsupportedError) else f"config.json lacks {exc}"
        raise ImportInputError(f"cannot import model_type {mt!r}: {msg}")
    data["data"] = {"tokenizer": tokenizer or "byte"}
    # The training default (128 tokens) may exceed a tiny model's context.
    data["train"] = {"seq_len": min(128, data["model"]["max_seq_len"])}
    cfg = config_from_dict(data, list(overrides))
    if upcycle_experts is not None:
        e = cfg.moe
        if e.score_order == "softmax_then_topk" and (not e.normalize_topk or e.top_k == 1):
            raise ImportInputError("upcycling needs top-k gates that sum to 1 (moe.normalize_topk "
                                   "true with moe.top_k >= 2, or moe.score_order "
                                   "topk_then_softmax) so the MoE starts equal to the dense model")
        if e.router != "token_choice":
            raise ImportInputError("upcycling needs moe.router token_choice (expert choice gives "
                                   "a token 0..E experts, so the MoE would not equal the dense model)")
    return cfg


def import_hf(hf_dir: str, output: str, overrides: Sequence[str] = (),
              upcycle_experts: Optional[int] = None, overwrite: bool = False) -> str:
    """Convert ``hf_dir`` into the moe_train checkpoint directory ``output``;
    return its absolute path. Raises ImportInputError, ConfigError."""
    if upcycle_experts is not None and upcycle_experts < 2:
        raise ImportInputError(f"--upcycle-experts ({upcycle_experts}) must be >= 2")
    hf = read_hf_config(hf_dir)
    files = weight_files(hf_dir)
    output = os.path.abspath(output)
    if os.path.exists(output) and not overwrite:
        raise ImportInputError(f"--output {output} already exists (pass --overwrite to replace it)")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ImportInputError(f"--output {output} exists and is not a directory")
    has_tokenizer = os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))
    cfg = resolve_config(hf, upcycle_experts, overrides,
                         os.path.join(output, "tokenizer.json") if has_tokenizer else None)

    from moe_train.model.transformer import build_model
    from moe_train.parallel.topology import Topology
    from moe_train.train.checkpoint import CONFIG_FILE, write_model_optimizer
    from moe_train.train.checkpoint_manifest import write_manifest

    torch.manual_seed(cfg.train.seed)  # the upcycled routers' random init
    model = build_model(cfg.model, cfg.moe)
    try:
        hf_to_model(LazyTensors(files), model, hf["model_type"], upcycle=upcycle_experts is not None)
    except ConversionError as exc:
        raise ImportInputError(f"{hf_dir}: {exc}")

    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    try:
        write_model_optimizer(tmp, model, None)
        save_config(cfg, os.path.join(tmp, CONFIG_FILE))
        for name in TOKENIZER_FILES:
            src = os.path.join(hf_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        with open(os.path.join(tmp, PROVENANCE_FILE), "w") as fh:
            json.dump({"source": os.path.abspath(hf_dir), "model_type": hf["model_type"],
                       "upcycle_experts": upcycle_experts}, fh, indent=2)
        write_manifest(tmp, None, Topology())  # checksums, verified by every load
        if os.path.exists(output):
            shutil.rmtree(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _parser() -> argparse.ArgumentParser:
    from moe_train.train.export import _Parser

    p = _Parser(prog="moe-train import",
                description="Convert a local Hugging Face checkpoint (Mixtral, OLMoE, Qwen3-MoE; "
                            "or a dense Llama, Mistral, Qwen3 with --upcycle-experts) into a "
                            "moe_train checkpoint directory.")
    p.add_argument("--hf", required=True, metavar="DIR", help="transformers checkpoint directory")
    p.add_argument("--output", required=True, metavar="OUT", help="directory to create")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a field of the resulting config (repeatable)")
    p.add_argument("--upcycle-experts", type=int, default=None, metavar="N",
                   help="turn a dense model into an MoE of N experts, each a copy of the dense MLP")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``moe-train import``; the exit status (2 after one ``error:`` line)."""
    from moe_train.cli import fail
    from moe_train.train.export import _UsageError

    try:
        args = _parser().parse_args(argv)
        out = import_hf(args.hf, args.output, args.set, args.upcycle_experts, args.overwrite)
    except (_UsageError, ImportInputError, ConfigError) as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot write {exc.filename or ''}: {exc.strerror or exc}")
    print(f"imported {args.hf} -> {out}")
    print(f"train from it: moe-train train --config {os.path.join(out, 'config.yaml')} "
          f"--set train.init_from={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
