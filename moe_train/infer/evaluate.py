"""``moe-train eval``: loss, perplexity and bits per byte of a checkpoint.

    moe-train eval --checkpoint RUN_OR_CKPT [--data DATASET_OR_TEXT_FILE] [--json]

- No ``--data``: the run's own validation batches (``train.eval_iters``
  batches of ``train.micro_batch_size`` x ``train.seq_len``, drawn exactly as
  the trainer draws them), so the loss equals the run's last ``loss/val``
  when the checkpoint is the run's last step (same device and precision).
- ``--data`` a text file: tokenized with the run's tokenizer and cut into
  consecutive windows of ``train.seq_len`` predictions; every token but the
  first is predicted exactly once.
- ``--data`` a dataset directory made by ``moe-train prepare-data``, or a
  built-in corpus name: its validation split, in consecutive windows.

loss is the mean cross-entropy in nats per predicted token, perplexity
``exp(loss)``, bits per byte ``sum of losses / ln 2 / UTF-8 bytes of the
predicted tokens`` (= loss / ln 2 for the byte tokenizer), which compares
models with different tokenizers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, TextIO

import numpy as np
import torch
import torch.nn.functional as F

from moe_train.config import ConfigError
from moe_train.infer.common import (Loaded, Parser, UsageError, add_common_arguments,
                                    eod_id_or_none, load)
from moe_train.train import InputError


@dataclass
class EvalResult:
    """What eval prints."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    parts: Dict[str, float] = field(default_factory=dict)
    """The loss of each part of a ``data.blend`` (empty otherwise)."""


def windows(tokens: np.ndarray, seq_len: int, rows: int) -> List[torch.Tensor]:
    """Batches ``[rows, seq_len + 1]`` of consecutive windows that overlap by
    one token (a window's last target is the next one's first input), so
    every token but the first is a target once; the last, shorter window is
    a batch of its own."""
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    starts = range(0, max(len(ids) - 1, 0), seq_len)
    full = [ids[s:s + seq_len + 1] for s in starts if s + seq_len + 1 <= len(ids)]
    tail = [ids[s:] for s in starts if s + seq_len + 1 > len(ids)]
    batches = [torch.stack(full[i:i + rows]) for i in range(0, len(full), rows)]
    return batches + [t[None] for t in tail]


def _target_bytes(tokenizer, targets_BS: torch.Tensor) -> int:
    if tokenizer.name == "byte":  # the end-of-document id is no byte of the text
        return int((targets_BS < 256).sum())
    return sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in targets_BS)


@torch.no_grad()
def evaluate(run: Loaded, parts: Dict[str, List[torch.Tensor]], tokenizer,
             weights: Optional[Dict[str, float]] = None,
             eod_id: Optional[int] = None) -> EvalResult:
    """Cross-entropy of ``run.model`` over the batches of each part
    (``[b, s + 1]``: inputs ``[:, :-1]``, targets ``[:, 1:]``), computed as
    the trainer's evaluate does: logits under the run's autocast (with
    ``document_ids`` when the run trained with ``data.document_mask``), CE in
    fp32, a part's loss the token-weighted mean of its batch means (equal
    batches: the trainer's plain mean), the loss the parts' mix by
    ``weights`` (default: one part, weight 1)."""
    from moe_train.model.document_mask import document_ids

    weights = weights or {name: 1.0 for name in parts}
    masked = run.cfg.data.document_mask and eod_id is not None
    losses: Dict[str, float] = {}
    tokens, nbytes = 0, 0
    for name, batches in parts.items():
        nats, count = 0.0, 0
        for batch in batches:
            batch = batch.to(run.device)
            inputs_BS, targets_BS = batch[:, :-1], batch[:, 1:]
            kwargs = {"document_ids": document_ids(inputs_BS, eod_id)} if masked else {}
            with run.autocast():
                logits_BSV = run.model(inputs_BS, **kwargs).logits
            loss = F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]),
                                   targets_BS.reshape(-1))
            nats += loss.item() * targets_BS.numel()
            count += targets_BS.numel()
            nbytes += _target_bytes(tokenizer, targets_BS)
        if count:
            losses[name] = nats / count
        tokens += count
    if tokens == 0:
        raise InputError("no tokens to evaluate: the data holds fewer than 2 tokens")
    loss = sum(weights[name] * value for name, value in losses.items())
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                      # nats per token / ln 2 * tokens per byte (exact for one part)
                      bits_per_byte=loss * tokens / math.log(2) / max(nbytes, 1),
                      tokens=tokens, bytes=nbytes,
                      parts={n: v for n, v in losses.items() if n} if len(losses) > 1 else {})


def _data_error(field: str, exc: Exception) -> InputError:
    return InputError(f"{field}: {' '.join(str(exc).split())}")


def run_validation(cfg):
    """``(batches of each part, weights, eod_id)``: the validation batches
    the trainer evaluates for ``cfg`` (every part of a ``data.blend``)."""
    from moe_train.data import val_batches
    from moe_train.data.blend import load_data

    t = cfg.train
    try:
        data = load_data(cfg.data, t.seq_len, need_val=True)
    except (ValueError, OSError) as exc:
        raise _data_error(f"data.dataset ({cfg.data.dataset})", exc)
    parts = {name: val_batches(ds, t.eval_iters, t.micro_batch_size, t.seq_len, t.seed)
             for name, ds in data.val.items()}
    return parts, data.weights, data.eod_id


def data_batches(data: str, cfg, tokenizer, max_tokens: Optional[int]) -> List[torch.Tensor]:
    """Consecutive windows of a text file, or of the validation split of a
    dataset directory or built-in corpus."""
    from moe_train.data import CORPORA, load_splits

    if os.path.isfile(data):
        try:
            with open(data, encoding="utf-8") as fh:
                tokens = tokenizer.encode_array(fh.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise _data_error(f"--data {data}", exc)
    elif os.path.isdir(data) or data in CORPORA:
        try:
            _, val_ds, _ = load_splits(dataclasses.replace(cfg.data, dataset=data))
        except (ValueError, OSError) as exc:
            raise _data_error(f"--data {data}", exc)
        # Slicing is the dataset interface (a memmap reads only what is asked for).
        tokens = val_ds[0:len(val_ds) if max_tokens is None else min(len(val_ds), max_tokens)]
    else:
        raise UsageError(f"--data {data} does not exist (a text file, a dataset directory "
                         f"made by `moe-train prepare-data`, or one of: {', '.join(CORPORA)})")
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    return windows(tokens, cfg.train.seq_len, cfg.train.micro_batch_size)


def _parser() -> Parser:
    p = Parser(prog="moe-train eval",
               description="Loss, perplexity and bits per byte of a checkpoint.")
    add_common_arguments(p)
    p.add_argument("--data", default=None, metavar="DATASET_OR_TEXT_FILE",
                   help="a text file, a prepare-data directory or a built-in corpus (its "
                        "validation split); default: the run's validation batches")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="evaluate only the first N tokens of --data")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Optional[Sequence[str]] = None, out: TextIO = None) -> int:
    """``moe-train eval``; returns the exit status (2 after one ``error:``
    line for bad input)."""
    from moe_train.cli import fail
    from moe_train.data.tokenizer import build_tokenizer
    from moe_train.train.checkpoint import checkpoint_step, find_checkpoint, read_config

    out = out or sys.stdout
    try:
        args = _parser().parse_args(argv)
        if args.max_tokens is not None and args.max_tokens < 2:
            raise UsageError(f"--max-tokens ({args.max_tokens}) must be >= 2")
        # Data first: a bad path fails before the (slow) weights are read.
        cfg = read_config(find_checkpoint(args.checkpoint))
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        if args.data is None:
            parts, weights, eod = run_validation(cfg)
            source = f"{cfg.data.dataset or 'data.blend'} (run validation)"
        else:
            parts, weights = {"": data_batches(args.data, cfg, tokenizer, args.max_tokens)}, None
            eod, source = eod_id_or_none(tokenizer), args.data
        run = load(args.checkpoint, args.device, args.precision)
        result = evaluate(run, parts, tokenizer, weights, eod)
    except (InputError, ConfigError) as exc:
        return fail(str(exc))
    record = dict(dataclasses.asdict(result), data=source, checkpoint=run.ckpt_dir,
                  step=checkpoint_step(run.ckpt_dir), precision=run.precision,
                  device=str(run.device))
    if args.json:
        out.write(json.dumps(record) + "\n")
    else:
        out.write(f"loss {result.loss:.4f}  perplexity {result.perplexity:.3f}  "
                  f"bits/byte {result.bits_per_byte:.4f}  ({result.tokens} tokens, "
                  f"{result.bytes} bytes of {source}; {run.ckpt_dir}, {run.precision}, "
                  f"{run.device})\n")
    return 0
