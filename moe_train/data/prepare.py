"""Tokenize documents into ``train`` / ``val`` token files and ``meta.json``.

Inputs (:mod:`moe_train.data.sources`) are streamed in blocks; ``workers``
processes tokenize the blocks while the main process writes the results in
input order, so the output does not depend on the number of workers.

Document boundaries: the end-of-document id (:attr:`Tokenizer.eod_id`)
follows every document piece written.

Split rule (deterministic, no randomness): each document is tokenized on its
own; its last ``ceil(n * val_fraction)`` tokens go to val and the rest to
train, each piece followed by the end-of-document id. Each split is the
concatenation of those pieces in input order. Taking the tail of every
document (rather than of the whole concatenation) makes the validation set
cover every document.

Layouts: ``bin`` (the default: ``train.bin``/``val.bin`` of bare ids) or
``megatron`` (``train.{bin,idx}``/``val.{bin,idx}``, Megatron-LM indexed
datasets, one document per piece). Every file is written to a temporary name
and moved into place with ``os.replace``; meta.json is removed just before
and written last, so a directory with a meta.json always holds complete,
matching files, and a prepare that fails leaves an earlier dataset intact.

Also the ``moe-train prepare-data`` command (:func:`main`).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing
import os
import shutil
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from moe_train.data.indexed import LAYOUTS, MEGATRON, RAW, make_writer, megatron_dtype, tmp_name
from moe_train.data.sources import (BLOCK_BYTES, Block, DataInputError, ReadOptions,
                                    block_documents, check_input, expand_inputs, read_blocks)
from moe_train.data.tokenizer import Tokenizer, build_tokenizer, token_dtype

FORMAT_VERSION = 2
SPLIT_RULE = ("per-document tail: the last ceil(n * val_fraction) tokens of each input document "
              "go to val, the rest to train; each piece is followed by the end-of-document id; "
              "documents in input order")
TOKENIZER_DIR = "tokenizer"


def val_count(num_tokens: int, val_fraction: float) -> int:
    """Tokens of an ``num_tokens``-token document that go to validation."""
    return min(num_tokens, int(math.ceil(num_tokens * val_fraction)))


def _write_json_atomic(path: str, data: Dict) -> None:
    tmp = tmp_name(os.path.dirname(path), os.path.basename(path))
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------
# Tokenizing blocks, in this process or in workers

_WORKER: Dict = {}


def _init_worker(tokenizer: str, eod_token: Optional[str], opts: ReadOptions) -> None:
    _WORKER.update(tok=build_tokenizer(tokenizer, eod_token), opts=opts)


def _tokenize_block(block: Block, tok: Optional[Tokenizer] = None,
                    opts: Optional[ReadOptions] = None) -> Tuple[List[np.ndarray], bool, int]:
    """``(token arrays of the block's documents, whether the last one ends
    there, input bytes)``."""
    tok = tok or _WORKER["tok"]
    opts = opts or _WORKER["opts"]
    docs = block_documents(block, opts)
    ends = block.doc_end or block.kind != "txt" or opts.split_lines
    # The smallest dtype that holds the ids: less to send back from a worker.
    dtype = token_dtype(tok.vocab_size)
    arrays = [a.astype(dtype, copy=False) for a in tok.encode_docs(docs)] if docs else []
    return arrays, ends, block.nbytes


def _tokenized(blocks: Iterator[Block], tok: Tokenizer, tokenizer_spec: str,
               eod_token: Optional[str], opts: ReadOptions, workers: int):
    """Tokenized blocks in input order. With workers > 1, at most
    ``4 * workers`` blocks are in flight, so memory stays bounded however
    large the input."""
    if workers <= 1:
        for block in blocks:
            yield _tokenize_block(block, tok, opts)
        return
    # The tokenizers library's own thread pool would compete with the workers
    # (and is unsafe across fork); --workers is the one parallelism knob.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, _init_worker, (tokenizer_spec, eod_token, opts)) as pool:
        pending: collections.deque = collections.deque()
        for block in blocks:
            pending.append(pool.apply_async(_tokenize_block, (block,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _all_blocks(files: Sequence[str], opts: ReadOptions, block_bytes: int,
                source_of: List[int]) -> Iterator[Block]:
    for i, path in enumerate(files):
        for block in read_blocks(path, opts, block_bytes):
            source_of.append(i)
            yield block


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: a bar only on a terminal, never in logs or captured stderr.
    return tqdm(total=total, unit="B", unit_scale=True, desc="prepare-data", disable=None)


# ----------------------------------------------------------------------------
# prepare


def prepare(inputs: Sequence[str], output_dir: str, tokenizer: Union[str, Tokenizer] = "byte",
            val_fraction: float = 0.05, corpus: Optional[str] = None, *, workers: int = 1,
            split_lines: bool = False, json_key: str = "text", column: str = "text",
            layout: str = RAW, eod_token: Optional[str] = None, progress: bool = False,
            block_bytes: int = BLOCK_BYTES) -> Dict:
    """Tokenize ``inputs`` (paths or globs of .txt/.jsonl/.jsonl.gz/.parquet
    files) into ``output_dir`` and return the meta dict.

    ``tokenizer`` is a name/path for :func:`build_tokenizer` or a tokenizer
    object (then ``workers`` must be 1). ``corpus`` names a built-in corpus
    for meta.json (None for user files). ``layout`` is ``bin`` or
    ``megatron`` (see the module docstring and docs/data.md).
    Raises FileNotFoundError for a missing input, ValueError (DataInputError,
    ConfigError) for bad content, options or tokenizer, OSError when
    output_dir is not writable. Everything that can be checked without
    reading the inputs whole is checked before anything is written.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction ({val_fraction}) must be in (0, 1)")
    if layout not in LAYOUTS:
        raise ValueError(f"--format ({layout!r}) must be one of: {', '.join(LAYOUTS)}")
    if workers < 1:
        raise ValueError(f"--workers ({workers}) must be >= 1")
    if not list(inputs):
        raise DataInputError("prepare: no input files")
    files = expand_inputs(inputs)
    spec = tokenizer if isinstance(tokenizer, str) else None
    if spec is None and workers > 1:
        raise ValueError("prepare: workers > 1 needs the tokenizer by name or path")
    tok = build_tokenizer(tokenizer, eod_token) if spec is not None else tokenizer
    eod = tok.eod_id
    opts = ReadOptions(split_lines=split_lines, json_key=json_key, column=column)
    for path in files:
        check_input(path, opts)
    dtype = megatron_dtype(tok.vocab_size) if layout == MEGATRON else token_dtype(tok.vocab_size)

    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    writers = {}
    sources = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p), "documents": 0,
                "tokens": 0, "val_tokens": 0} for p in files]
    eod_arr = np.array([eod], dtype=np.int64)
    written = {"train": 0, "val": 0}  # tokens in each split's file, end-of-document ids included
    bar = _progress(sum(s["bytes"] for s in sources), progress)
    results = None
    try:
        for split in ("train", "val"):
            writers[split] = make_writer(layout, output_dir, split, dtype)
        source_of: List[int] = []
        blocks = _all_blocks(files, opts, block_bytes, source_of)
        pieces: List[np.ndarray] = []  # of a whole-file .txt document still being read
        # Closed in the finally below, so an error stops the workers at once.
        results = _tokenized(blocks, tok, spec, eod_token, opts, workers)
        for n, (arrays, ends, nbytes) in enumerate(results):
            src = sources[source_of[n]]
            last = len(arrays) - 1
            for j, ids in enumerate(arrays):
                if j == last and not ends:
                    pieces.append(ids)
                    continue
                if pieces:
                    ids = np.concatenate(pieces + [ids])
                    pieces = []
                _write_document(ids, writers, written, src, val_fraction, eod_arr, tok)
            if ends and pieces:  # the document's last block held no text
                _write_document(np.concatenate(pieces), writers, written, src, val_fraction,
                                eod_arr, tok)
                pieces = []
            if bar is not None:
                bar.update(nbytes)
        if not sum(s["tokens"] for s in sources):
            raise DataInputError(f"--input {' '.join(inputs)}: no tokens: the input is empty "
                                 "or holds only empty documents")
        meta_path = os.path.join(output_dir, "meta.json")
        # Without meta.json the directory reads as "not prepared" while the
        # files are replaced. A concurrent prepare may remove it first.
        try:
            os.remove(meta_path)
        except FileNotFoundError:
            pass
        for split in ("train", "val"):
            writers.pop(split).commit()
        tok_files = _copy_tokenizer(tok, output_dir)
    except BaseException:
        for w in writers.values():
            w.discard()
        if created and not os.listdir(output_dir):
            os.rmdir(output_dir)
        raise
    finally:
        if results is not None:
            results.close()
        if bar is not None:
            bar.close()

    meta = {
        "format": FORMAT_VERSION,
        "layout": layout,
        "corpus": corpus,
        "tokenizer": tok.name,
        "tokenizer_tag": tok.tag,
        "tokenizer_files": tok_files,
        "vocab_size": int(tok.vocab_size),
        "eod_id": int(eod),
        "dtype": dtype.name,
        "train_tokens": written["train"],
        "val_tokens": written["val"],
        "documents": sum(s["documents"] for s in sources),
        "val_fraction": val_fraction,
        "split": SPLIT_RULE,
        "sources": sources,
    }
    _write_json_atomic(os.path.join(output_dir, "meta.json"), meta)
    return meta


def _write_document(ids: np.ndarray, writers, written: Dict[str, int], src: Dict,
                    val_fraction: float, eod_arr: np.ndarray, tok: Tokenizer) -> None:
    """Split one document, append the end-of-document id to each piece, write."""
    n = len(ids)
    if n == 0:
        return
    top = int(ids.max())
    if top >= tok.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"tokenizer {tok.name} produced id {top} outside [0, "
                         f"{tok.vocab_size}) in {src['path']}")
    n_val = val_count(n, val_fraction)
    # In the ids' own (compact) dtype, which holds the end-of-document id too:
    # no widening copy of every token.
    eod = eod_arr.astype(ids.dtype)
    for split, piece in (("train", ids[:n - n_val]), ("val", ids[n - n_val:])):
        if len(piece):
            writers[split].add(np.concatenate([piece, eod]))
            written[split] += len(piece) + 1
    src["documents"] += 1
    src["tokens"] += n
    src["val_tokens"] += n_val


def _copy_tokenizer(tok: Tokenizer, output_dir: str) -> List[str]:
    """Copy the tokenizer's files into ``output_dir/tokenizer/``; their names."""
    if not tok.files:
        return []
    target = os.path.join(output_dir, TOKENIZER_DIR)
    os.makedirs(target, exist_ok=True)
    for path in tok.files:
        dst = os.path.join(target, os.path.basename(path))
        if os.path.abspath(path) != os.path.abspath(dst):
            shutil.copyfile(path, dst)
    return sorted(os.path.basename(p) for p in tok.files)


# ----------------------------------------------------------------------------
# The command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line and exit 2, like every other input error of moe_train.
        _fail(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="moe-train prepare-data",
        description="Tokenize documents into train / val token files and meta.json. "
                    + SPLIT_RULE + ".")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                   help=".txt, .jsonl, .jsonl.gz or .parquet files (or globs), in order")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", default="byte",
                   help="byte (default), a local tokenizer.json, or a local Hugging Face "
                        "tokenizer directory (AutoTokenizer, offline)")
    p.add_argument("--eod-token", default=None, metavar="TOKEN",
                   help="the end-of-document token of an HF tokenizer (default: its EOS)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of each document held out for validation (default 0.05)")
    p.add_argument("--split-lines", action="store_true",
                   help=".txt: one non-empty line is one document (default: one file)")
    p.add_argument("--json-key", default="text", help=".jsonl: the key of the text (text)")
    p.add_argument("--column", default="text", help=".parquet: the text column (text)")
    p.add_argument("--format", default=RAW, choices=LAYOUTS, dest="layout",
                   help="bin (bare ids, default) or megatron (Megatron-LM .bin/.idx)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset already in --output")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``moe-train prepare-data ...``. Prints a one-line summary and returns
    0; on an error prints one line to stderr and raises SystemExit(2)."""
    args = _parser().parse_args(argv)
    if not 0.0 < args.val_fraction < 1.0:
        _fail(f"--val-fraction ({args.val_fraction}) must be in (0, 1)")
    if args.workers < 1:
        _fail(f"--workers ({args.workers}) must be >= 1")
    existing = [n for n in ("meta.json", "train.bin", "val.bin")
                if os.path.exists(os.path.join(args.output, n))]
    if existing and not args.overwrite:
        _fail(f"--output {args.output} already holds a dataset ({', '.join(existing)}); "
              "pass --overwrite to replace it")
    try:
        meta = prepare(args.input, args.output, args.tokenizer, args.val_fraction,
                       workers=args.workers, split_lines=args.split_lines,
                       json_key=args.json_key, column=args.column, layout=args.layout,
                       eod_token=args.eod_token, progress=True)
    except (OSError, ValueError) as exc:  # FileNotFoundError and ConfigError included
        _fail(str(exc))
    print(f"wrote {args.output}: {meta['documents']} documents, train {meta['train_tokens']} "
          f"tokens, val {meta['val_tokens']} tokens ({meta['layout']}, {meta['dtype']}, "
          f"vocab {meta['vocab_size']}, end-of-document id {meta['eod_id']}, "
          f"tokenizer {meta['tokenizer']})")
    return 0


def _fail(message: str) -> None:
    from moe_train.cli import fail

    raise SystemExit(fail(message))
