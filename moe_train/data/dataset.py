"""Memory-mapped token splits and deterministic batch sampling.

Sampling is a pure function of ``(seed, step)``: the global batch of a step
does not depend on the world size, on earlier steps, or on the process, so a
resumed run continues the exact data order and data-parallel rank ``r`` of
``dp`` takes rows ``[r*b:(r+1)*b]`` of the same global batch.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from moe_train.config import ConfigError, DataConfig
from moe_train.data.corpus import CORPORA, corpus_files
from moe_train.data.indexed import MEGATRON, document_split, is_prefix, read_indexed
from moe_train.data.prepare import FORMAT_VERSION, prepare
from moe_train.data.tokenizer import Tokenizer, build_tokenizer

if TYPE_CHECKING:
    import torch

try:
    import fcntl
except ImportError:  # not POSIX: atomic renames alone keep the cache consistent
    fcntl = None

# Entropy word that keeps validation draws apart from training draws.
_VAL_STREAM = 1


class TokenDataset:
    """One split (a ``.bin`` file of raw token ids), memory-mapped read-only.

    ``len(ds)`` is the number of tokens; ``ds[i]`` / ``ds[a:b]`` index the
    token stream. ``split`` is the file name without ``.bin``.
    """

    def __init__(self, path: str, dtype, tokens: Optional[np.ndarray] = None,
                 owner: object = None, split: Optional[str] = None):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.split = split or os.path.splitext(os.path.basename(path))[0]
        # Another reader's array (a slice of an IndexedDataset's map): ``owner``
        # keeps the map open for as long as this dataset lives.
        self.owner = owner
        if tokens is not None:
            self.tokens = tokens
            return
        size = os.path.getsize(path)
        if size % self.dtype.itemsize:
            raise ValueError(f"{path}: {size} bytes is not a whole number of "
                             f"{self.dtype.name} tokens")
        # np.memmap refuses empty files; an empty split is still a valid split.
        self.tokens = (np.memmap(path, dtype=self.dtype, mode="r") if size
                       else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, index):
        return self.tokens[index]

    def __repr__(self) -> str:
        return f"TokenDataset({self.path!r}, {self.dtype.name}, {len(self)} tokens)"


def check_enough(ds: TokenDataset, seq_len: int, split_name: str) -> None:
    """Raise ConfigError (a ValueError) when ``ds`` cannot hold one sequence
    of ``seq_len`` inputs plus its shifted target."""
    if len(ds) < seq_len + 1:
        raise ConfigError(f"dataset {os.path.dirname(os.path.abspath(ds.path))} split {split_name} "
                          f"has {len(ds)} tokens; one sequence of train.seq_len={seq_len} "
                          f"needs {seq_len + 1}")


def _rows(ds: TokenDataset, rng: np.random.Generator, batch_size: int,
          seq_len: int) -> "torch.Tensor":
    # torch is imported here, not at the top, so that prepare-data and cache
    # preparation (and their subprocess tests) start without loading it.
    import torch

    check_enough(ds, seq_len, ds.split)
    # Starts in [0, len - seq_len - 1]: the last row ends exactly at the end.
    starts = rng.integers(0, len(ds) - seq_len, size=batch_size)
    index = starts[:, None] + np.arange(seq_len + 1)[None, :]  # [B, L+1]
    return torch.from_numpy(np.asarray(ds.tokens[index], dtype=np.int64))


def _check_key(seed: int, index: int, index_name: str) -> None:
    # SeedSequence takes non-negative integers only; say so in our words.
    if seed < 0 or index < 0:
        raise ValueError(f"seed ({seed}) and {index_name} ({index}) must be >= 0")


def sample_batch(ds: TokenDataset, step: int, batch_size: int, seq_len: int,
                 seed: int) -> torch.Tensor:
    """The global batch of training step ``step``: a LongTensor ``[batch_size,
    seq_len + 1]`` whose rows are contiguous slices of the token stream
    (inputs are ``[:, :-1]``, targets ``[:, 1:]``).

    Row starts are ``np.random.default_rng([seed, step]).integers(0, len(ds) -
    seq_len, size=batch_size)``: the same for a given ``(seed, step)`` whatever
    else happens, so resumption and data-parallel slicing need no state.
    """
    if hasattr(ds, "sample_batch"):  # a Blend draws from its parts
        return ds.sample_batch(step, batch_size, seq_len, seed)
    _check_key(seed, step, "step")
    return _rows(ds, np.random.default_rng([seed, step]), batch_size, seq_len)


def val_batches(ds: TokenDataset, num_batches: int, batch_size: int, seq_len: int,
                seed: int) -> List[torch.Tensor]:
    """``num_batches`` validation batches, identical on every call (and every
    rank) for the same arguments, so validation losses compare across steps.
    Batch ``i`` draws its starts from ``np.random.default_rng([seed, i, 1])``."""
    out = []
    for i in range(num_batches):
        _check_key(seed, i, "batch index")
        out.append(_rows(ds, np.random.default_rng([seed, i, _VAL_STREAM]), batch_size, seq_len))
    return out


# ----------------------------------------------------------------------------
# Loading splits, preparing the built-in corpora once into a cache


def default_cache_root() -> str:
    """``~/.cache/moe_train``: where built-in corpora are prepared when
    ``data.cache_dir`` is null."""
    return os.path.join(os.path.expanduser("~"), ".cache", "moe_train")


def cache_dir_for(data_cfg: DataConfig, tok: Tokenizer) -> str:
    """``<cache root>/<corpus>-<tokenizer tag>-val<val_fraction>``. The split
    is in the name so that runs with different val_fraction never rebuild
    each other's files."""
    root = data_cfg.cache_dir or default_cache_root()
    return os.path.join(root, f"{data_cfg.dataset}-{tok.tag}-val{data_cfg.val_fraction:g}")


def read_meta(directory: str) -> Optional[Dict]:
    """meta.json of a prepared directory, or None when there is none (yet)."""
    path = os.path.join(directory, "meta.json")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        return None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(meta).__name__}; "
                         "prepare the dataset again")
    return meta


def _is_current(meta: Optional[Dict], files: List[str], tok: Tokenizer,
                val_fraction: float) -> bool:
    """Whether a cached preparation was made from exactly these files (path
    and size), this tokenizer and this split; a Python upgrade or reinstalled
    package changes the files and so triggers a rebuild."""
    if meta is None or meta.get("format") != FORMAT_VERSION:
        return False
    have = [(s["path"], s["bytes"]) for s in meta.get("sources", [])]
    want = [(os.path.abspath(f), os.path.getsize(f)) for f in files]
    return (meta.get("tokenizer_tag") == tok.tag and meta.get("val_fraction") == val_fraction
            and have == want)


@contextlib.contextmanager
def _file_lock(path: str):
    """Exclusive advisory lock, released by the kernel if the holder dies."""
    if fcntl is None:
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_prepared(corpus: str, data_cfg: DataConfig, tok: Tokenizer) -> Tuple[str, Dict]:
    """Prepare built-in ``corpus`` into its cache directory unless a current
    preparation is there; return ``(directory, meta)``.

    Processes racing here (several ranks, several runs) take a lock file so
    only one tokenizes; the others wait and then reuse its files. prepare's
    atomic renames keep the files whole even without the lock.
    """
    files = corpus_files(corpus)
    out = cache_dir_for(data_cfg, tok)
    meta = read_meta(out)
    if _is_current(meta, files, tok, data_cfg.val_fraction):
        return out, meta
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with _file_lock(out + ".lock"):
            meta = read_meta(out)  # another process may have finished while we waited
            if not _is_current(meta, files, tok, data_cfg.val_fraction):
                meta = prepare(files, out, tok, data_cfg.val_fraction, corpus=corpus)
    except OSError as exc:
        raise ConfigError(f"data.cache_dir: cannot prepare {corpus} into {out}: {exc}") from exc
    return out, meta


def open_splits(directory: str, meta: Dict) -> Tuple[TokenDataset, TokenDataset]:
    """Open train and val of a prepared directory (bare ``.bin`` files, or
    Megatron ``.bin``/``.idx`` pairs read with megatron-core's
    IndexedDataset), checking their sizes against meta.json."""
    splits = []
    for name in ("train", "val"):
        path = os.path.join(directory, f"{name}.bin")
        if meta.get("layout") == MEGATRON:
            tokens, _, owner = read_indexed(os.path.join(directory, name))
            ds = TokenDataset(path, tokens.dtype, tokens, owner)
        else:
            ds = TokenDataset(path, meta["dtype"])
        if len(ds) != meta[f"{name}_tokens"]:
            raise ValueError(f"dataset {directory} is incomplete or corrupt: {name}.bin holds "
                             f"{len(ds)} tokens, meta.json says {meta[f'{name}_tokens']}; "
                             "prepare it again")
        splits.append(ds)
    return splits[0], splits[1]


def open_prefix(prefix: str, val_fraction: float) -> Tuple[TokenDataset, TokenDataset, Dict]:
    """``(train, val, meta)`` of a Megatron-LM indexed dataset ``prefix``
    (``prefix.bin`` + ``prefix.idx``, e.g. from Megatron's preprocess_data.py),
    used as it is: the token stream is cut at :func:`document_split`. The
    meta is made up: ``vocab_size`` is the largest id plus one (no tokenizer
    is recorded beside such a dataset)."""
    tokens, doc_starts, owner = read_indexed(prefix)
    cut = document_split(doc_starts, val_fraction)
    path = prefix + ".bin"
    train = TokenDataset(path, tokens.dtype, tokens[:cut], owner, split="train")
    val = TokenDataset(path, tokens.dtype, tokens[cut:], owner, split="val")
    meta = {"format": FORMAT_VERSION, "layout": MEGATRON, "corpus": None, "tokenizer": None,
            "vocab_size": int(tokens.max()) + 1 if len(tokens) else 0,
            "dtype": tokens.dtype.name, "train_tokens": len(train), "val_tokens": len(val),
            "documents": len(doc_starts) - 1, "val_fraction": val_fraction,
            "split": "whole final documents from token total * (1 - val_fraction) on"}
    return train, val, meta


def load_splits(data_cfg: DataConfig, name: Optional[str] = None
                ) -> Tuple[TokenDataset, TokenDataset, Dict]:
    """``(train, val, meta)`` for ``name`` (default ``data_cfg.dataset``).

    A built-in corpus name (``shakespeare``, ``stdlib``) is prepared once with
    ``data_cfg.tokenizer`` and ``data_cfg.val_fraction`` into the cache and
    reused. A path with ``PATH.idx``/``PATH.bin`` is a Megatron-LM indexed
    dataset prefix (:func:`open_prefix`). Anything else is a directory made by
    ``moe-train prepare-data``; its meta.json decides the split, and
    ``data_cfg.tokenizer`` must be the tokenizer it was prepared with. Errors
    are ConfigErrors naming the field.
    """
    name = data_cfg.dataset if name is None else name
    if name in CORPORA:
        tok = build_tokenizer(data_cfg.tokenizer)
        directory, meta = ensure_prepared(name, data_cfg, tok)
    else:
        directory = name
        for ext in (".idx", ".bin"):  # the prefix given with one of its files' names
            if name.endswith(ext) and is_prefix(name[:-len(ext)]):
                name = name[:-len(ext)]
        if is_prefix(name) and not os.path.isdir(name):
            try:
                return open_prefix(name, data_cfg.val_fraction)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"data.dataset ({name!r}): {exc}") from exc
        meta = read_meta(directory) if os.path.isdir(directory) else None
        if meta is None:
            raise ConfigError(f"data.dataset ({name!r}) must be one of: {', '.join(CORPORA)}, "
                              "a directory made by `moe-train prepare-data` "
                              f"(no {os.path.join(name, 'meta.json')} found), or a Megatron "
                              "indexed dataset prefix (PATH for PATH.bin and PATH.idx)")
        if meta.get("format") != FORMAT_VERSION:
            raise ConfigError(f"data.dataset ({name!r}) has meta.json format "
                              f"{meta.get('format')}; this version reads {FORMAT_VERSION}: "
                              "prepare it again")
        tok = build_tokenizer(data_cfg.tokenizer)
        if tok.tag != meta["tokenizer_tag"]:
            raise ConfigError(f"data.tokenizer ({data_cfg.tokenizer!r}) is not the tokenizer "
                              f"data.dataset ({name!r}) was prepared with; set "
                              f"data.tokenizer={meta['tokenizer']}")
    train, val = open_splits(directory, meta)
    return train, val, meta
