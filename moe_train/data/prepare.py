"""Tokenize text files into ``train.bin``, ``val.bin`` and ``meta.json``.

Split rule (deterministic, no randomness): each input document, taken in the
order given, is tokenized on its own; its last ``ceil(n * val_fraction)``
tokens go to val.bin and the rest to train.bin. Each split is the
concatenation of those pieces in input order, with no separator token. Taking
the tail of every document (rather than of the whole concatenation) makes the
validation set cover every document.

Every file is written to a temporary name in the output directory and moved
into place with ``os.replace``; meta.json is removed first and written last,
so a directory with a meta.json always holds complete, matching files, even
when two processes prepare the same directory at once.

Also the ``moe-train prepare-data`` command (:func:`main`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import uuid
from typing import Dict, List, Optional, Sequence, Union


from moe_train.data.tokenizer import Tokenizer, build_tokenizer, token_dtype

FORMAT_VERSION = 1
SPLIT_RULE = ("per-document tail: the last ceil(n * val_fraction) tokens of each input document "
              "go to val.bin, the rest to train.bin; documents in input order, concatenated "
              "without separator tokens")


def val_count(num_tokens: int, val_fraction: float) -> int:
    """Tokens of an ``num_tokens``-token document that go to validation."""
    return min(num_tokens, int(math.ceil(num_tokens * val_fraction)))


def read_text(path: str) -> str:
    """A document as text: UTF-8, invalid bytes become U+FFFD, line endings
    kept as they are (newline=""), so a valid UTF-8 file round-trips exactly
    through the byte tokenizer."""
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        return fh.read()


def _tmp_name(output_dir: str, final: str) -> str:
    # Unique per process and call, in the target's directory so that
    # os.replace is a same-filesystem atomic rename.
    return os.path.join(output_dir, f".{final}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def _write_json_atomic(path: str, data: Dict) -> None:
    tmp = _tmp_name(os.path.dirname(path), os.path.basename(path))
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prepare(inputs: Sequence[str], output_dir: str, tokenizer: Union[str, Tokenizer] = "byte",
            val_fraction: float = 0.05, corpus: Optional[str] = None) -> Dict:
    """Tokenize ``inputs`` (text files) into ``output_dir`` and return the meta dict.

    ``tokenizer`` is a name/path for :func:`build_tokenizer` or a tokenizer
    object. ``corpus`` names a built-in corpus for meta.json (None for user
    files). Writes train.bin and val.bin (raw ids, uint16 when the vocabulary
    fits, else uint32; readable with ``np.memmap``) and meta.json (see
    docs/data.md). Raises FileNotFoundError for a missing input, ValueError
    for a bad val_fraction or tokenizer, OSError when output_dir is not writable.
    """
    inputs = list(inputs)
    if not inputs:
        raise ValueError("prepare: no input files")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction ({val_fraction}) must be in (0, 1)")
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    dtype = token_dtype(tok.vocab_size)

    os.makedirs(output_dir, exist_ok=True)
    meta_path = os.path.join(output_dir, "meta.json")
    # Without meta.json the directory reads as "not prepared" while the .bin
    # files below are being replaced. A concurrent prepare may remove it first.
    try:
        os.remove(meta_path)
    except FileNotFoundError:
        pass

    tmp = {split: _tmp_name(output_dir, f"{split}.bin") for split in ("train", "val")}
    sources: List[Dict] = []
    try:
        with open(tmp["train"], "wb") as train_fh, open(tmp["val"], "wb") as val_fh:
            for path in inputs:
                ids = tok.encode_array(read_text(path))
                if ids.size and int(ids.max()) >= tok.vocab_size:
                    raise ValueError(f"tokenizer {tok.name} produced id {int(ids.max())} "
                                     f">= its vocab_size {tok.vocab_size}")
                ids = ids.astype(dtype, copy=False)
                n_val = val_count(len(ids), val_fraction)
                n_train = len(ids) - n_val
                train_fh.write(ids[:n_train].tobytes())
                val_fh.write(ids[n_train:].tobytes())
                sources.append({"path": os.path.abspath(path), "bytes": os.path.getsize(path),
                                "tokens": int(len(ids)), "val_tokens": int(n_val)})
        for split in ("train", "val"):
            os.replace(tmp[split], os.path.join(output_dir, f"{split}.bin"))
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)

    meta = {
        "format": FORMAT_VERSION,
        "corpus": corpus,
        "tokenizer": tok.name,
        "tokenizer_tag": tok.tag,
        "vocab_size": int(tok.vocab_size),
        "dtype": dtype.name,
        "train_tokens": sum(s["tokens"] - s["val_tokens"] for s in sources),
        "val_tokens": sum(s["val_tokens"] for s in sources),
        "val_fraction": val_fraction,
        "split": SPLIT_RULE,
        "sources": sources,
    }
    _write_json_atomic(meta_path, meta)
    return meta


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-train prepare-data",
        description="Tokenize text files into train.bin / val.bin / meta.json. " + SPLIT_RULE + ".")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="text files (UTF-8), in the order they are concatenated")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", default="byte",
                   help="byte (default) or the path of a local Hugging Face tokenizer.json")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of each document held out for validation (default 0.05)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``moe-train prepare-data --input FILES... --output DIR [--tokenizer T]
    [--val-fraction F]``. Prints a one-line summary and returns 0; on an error
    prints one line to stderr and raises SystemExit(2)."""
    args = _parser().parse_args(argv)
    if not 0.0 < args.val_fraction < 1.0:
        print(f"moe-train prepare-data: error: --val-fraction ({args.val_fraction}) "
              "must be in (0, 1)", file=sys.stderr)
        raise SystemExit(2)
    try:
        meta = prepare(args.input, args.output, args.tokenizer, args.val_fraction)
    except (OSError, ValueError) as exc:  # FileNotFoundError and ConfigError included
        print(f"moe-train prepare-data: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {args.output}: train {meta['train_tokens']} tokens, val {meta['val_tokens']} "
          f"tokens ({meta['dtype']}, vocab {meta['vocab_size']}, tokenizer {meta['tokenizer']})")
    return 0
