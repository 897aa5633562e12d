"""The model's vocabulary size from the data: ``model.vocab_size`` left null
means the dataset's vocabulary rounded up to a multiple of
:data:`VOCAB_MULTIPLE`.

Why 128: it is Megatron-LM's default ``--make-vocab-size-divisible-by``, and
an embedding / output matrix whose row count is a multiple of 128 maps onto
whole tensor-core tiles. Unlike Megatron we do not multiply it by the tensor
parallel size: checkpoints here reshard across TP sizes, so the model's
shapes must not depend on the parallel layout. The padded rows are never
targets; they only cost ``(padded - vocab) * hidden`` parameters.
"""
from __future__ import annotations

from typing import Dict, Iterable

from moe_train.config import ConfigError

VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``vocab`` rounded up to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, -(-int(vocab) // multiple) * multiple)


def data_vocab_size(metas: Iterable[Dict]) -> int:
    """The vocabulary a model needs for these datasets' meta dicts: the
    largest ``vocab_size`` among them."""
    return max(int(m.get("vocab_size") or 0) for m in metas)


def resolve_vocab_size(configured, data_vocab: int, what: str = "data.dataset") -> int:
    """``configured`` (model.vocab_size) when set, checked against the data's
    vocabulary; else the data's vocabulary padded. Raises ConfigError naming
    model.vocab_size when the configured size is too small."""
    if configured is None:
        return padded_vocab_size(data_vocab)
    if data_vocab > configured:
        raise ConfigError(f"model.vocab_size ({configured}) must be >= the tokenizer's "
                          f"vocabulary ({data_vocab}) of {what}; leave it null to use "
                          f"{padded_vocab_size(data_vocab)} ({data_vocab} rounded up to a "
                          f"multiple of {VOCAB_MULTIPLE})")
    return int(configured)


def planned_vocab_size(cfg) -> int:
    """``cfg.model.vocab_size``, or the size training would infer, found
    without preparing or opening any token file: the tokenizer's vocabulary
    for a built-in corpus, meta.json's for a prepared directory, the largest
    id plus one for a bare Megatron prefix (that one is read). For tools that
    need shapes before training (``moe-train plan``)."""
    if cfg.model.vocab_size is not None:
        return int(cfg.model.vocab_size)
    import os

    from moe_train.data.corpus import CORPORA
    from moe_train.data.dataset import open_prefix, read_meta
    from moe_train.data.indexed import is_prefix
    from moe_train.data.tokenizer import build_tokenizer

    paths = [p.path for p in cfg.data.blend] if cfg.data.blend else [cfg.data.dataset]
    sizes = []
    for path in paths:
        meta = read_meta(path) if os.path.isdir(path) else None
        if path in CORPORA:
            sizes.append(build_tokenizer(cfg.data.tokenizer).vocab_size)
        elif meta is not None:
            sizes.append(int(meta["vocab_size"]))
        elif is_prefix(path):
            sizes.append(int(open_prefix(path, cfg.data.val_fraction)[2]["vocab_size"]))
        else:
            raise ConfigError(f"model.vocab_size is null and data.dataset ({path!r}) is not a "
                              "dataset to take it from; set model.vocab_size")
    return padded_vocab_size(max(sizes))
