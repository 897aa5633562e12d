"""``moe-train generate``: continue a prompt with a trained model, streaming
the text to stdout, with a KV cache (:mod:`moe_train.model.kv_cache`): the
prompt is one forward, then every new token is one forward of one position.

    moe-train generate --checkpoint RUN_OR_CKPT --prompt TEXT [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--ignore-eod]

Temperature 0 is greedy and deterministic; it gives the tokens transformers'
``generate(do_sample=False)`` gives on the exported model
(tests/integration/test_generate_eval.py). Generation stops after N tokens,
when prompt and continuation fill ``model.max_seq_len`` positions, or at the
tokenizer's end-of-document token (the exported eos), unless --ignore-eod.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, ContextManager, Iterator, List, Optional, Sequence, TextIO

import torch

from moe_train.config import ConfigError
from moe_train.infer.common import (Loaded, Parser, UsageError, add_common_arguments,
                                    eod_id_or_none, load)
from moe_train.infer.sampling import next_token
from moe_train.model.kv_cache import KVCache
from moe_train.train import InputError


def check_prompt(prompt_ids: Sequence[int], max_seq_len: int) -> None:
    """UsageError for an empty prompt or one longer than ``max_seq_len``."""
    if not prompt_ids:
        raise UsageError("--prompt is empty; give at least one character")
    if len(prompt_ids) > max_seq_len:
        raise UsageError(f"--prompt is {len(prompt_ids)} tokens; model.max_seq_len is "
                         f"{max_seq_len}")


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: int = 0,
                 max_seq_len: Optional[int] = None, stop_id: Optional[int] = None,
                 autocast: Optional[Callable[[], ContextManager]] = None) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids continuing ``prompt_ids``
    (one sequence), each as soon as it is chosen; stop before ``stop_id``
    (the end-of-document id: the model ends the text there). ``model`` is a
    :class:`~moe_train.model.transformer.Transformer` in eval mode;
    ``autocast`` makes the context each forward runs in (bf16 autocast)."""
    max_len = max_seq_len or model.model_cfg.max_seq_len
    check_prompt(prompt_ids, max_len)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache.for_model(model, max_len)
    ids_BS = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    # Prompt and continuation together fill at most max_len positions (the
    # max_length of the exported generation_config.json).
    for _ in range(min(max_new_tokens, max_len - len(prompt_ids))):
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits_BV = model(ids_BS, cache=cache).logits[:, -1]
        token_B = next_token(logits_BV, temperature, top_k, top_p, generator)
        token = int(token_B.item())
        if token == stop_id:
            return
        yield token
        ids_BS = token_B[:, None]


def stream_text(tokenizer, prompt_ids: List[int], new_ids: Iterator[int], out: TextIO) -> List[int]:
    """Write the decoded continuation to ``out`` as it grows; return the new
    ids. Text is held back while it ends in an incomplete UTF-8 sequence (a
    byte tokenizer emits a multi-byte character one byte at a time)."""
    ids = list(prompt_ids)
    shown = tokenizer.decode(ids)
    out.write(shown)
    out.flush()
    new: List[int] = []
    for token in new_ids:
        ids.append(token)
        new.append(token)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    text = tokenizer.decode(ids)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return new


def _parser() -> Parser:
    p = Parser(prog="moe-train generate",
               description="Continue a prompt with a trained model (KV-cached decoding).")
    add_common_arguments(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="tokens to generate (default 200; fewer at model.max_seq_len)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature; 0 is greedy and deterministic (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--ignore-eod", action="store_true",
                   help="go on past the end-of-document token (default: stop there)")
    return p


def _check_args(args) -> None:
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens ({args.max_new_tokens}) must be >= 0")
    if args.temperature < 0:
        raise UsageError(f"--temperature ({args.temperature}) must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k ({args.top_k}) must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p ({args.top_p}) must be in (0, 1]")
    if args.seed < 0:
        raise UsageError(f"--seed ({args.seed}) must be >= 0")


def main(argv: Optional[Sequence[str]] = None, out: TextIO = None) -> int:
    """``moe-train generate``; returns the exit status (2 after one
    ``error:`` line for bad input)."""
    from moe_train.cli import fail
    from moe_train.data.tokenizer import build_tokenizer

    out = out or sys.stdout
    try:
        args = _parser().parse_args(argv)
        _check_args(args)
        from moe_train.train.checkpoint import find_checkpoint, read_config

        # The prompt is checked before the (slow) weights are read.
        cfg = read_config(find_checkpoint(args.checkpoint))
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        prompt_ids = tokenizer.encode(args.prompt)
        check_prompt(prompt_ids, cfg.model.max_seq_len)
        run: Loaded = load(args.checkpoint, args.device, args.precision)
        ids = generate_ids(run.model, prompt_ids, args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, autocast=run.autocast,
                           stop_id=None if args.ignore_eod else eod_id_or_none(tokenizer))
        stream_text(tokenizer, prompt_ids, ids, out)
    except (InputError, ConfigError) as exc:
        return fail(str(exc))
    return 0
