"""Tokenizers: raw UTF-8 bytes (no download) or a local Hugging Face tokenizer.json.

Both expose the same small surface, so ``prepare`` and the trainer never ask
which one they hold: ``name`` (what meta.json records), ``tag`` (a short,
filesystem-safe identity for cache directory names), ``vocab_size``,
``encode``/``decode`` and ``encode_array`` (the fast path used on whole
documents).
"""
from __future__ import annotations

import hashlib
import os
from typing import List, Union

import numpy as np

from moe_train.config import ConfigError

BYTE = "byte"


class ByteTokenizer:
    """One token per UTF-8 byte: vocabulary 256, nothing to download or train."""

    name = BYTE
    tag = BYTE
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        """The UTF-8 bytes of ``text`` as ints in [0, 256)."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode`, as a uint8 array (no Python int per byte)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        """Bytes back to text. A sampled sequence may cut a multi-byte
        character in half, so invalid UTF-8 becomes U+FFFD instead of raising."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library.

    ``path`` is the file itself or a directory holding ``tokenizer.json``.
    Special tokens are not added on encode: a training corpus is plain text.
    """

    def __init__(self, path: str):
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ConfigError(f"data.tokenizer ({path!r}) must be 'byte' or the path of a local "
                              f"Hugging Face tokenizer.json; not found: {file}")
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # optional dependency: only needed for this class
            raise ConfigError(f"data.tokenizer ({path!r}) needs the 'tokenizers' package: "
                              "pip install tokenizers") from exc
        self.path = os.path.abspath(file)
        with open(self.path, "rb") as fh:
            # The content hash, not the path, identifies the tokenizer: a cache
            # must be rebuilt when the file changes, and may be reused when it moves.
            self.sha256 = hashlib.sha256(fh.read()).hexdigest()
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise ConfigError(f"data.tokenizer ({path!r}) is not a valid Hugging Face "
                              f"tokenizer.json: {str(exc).splitlines()[0]}") from exc

    @property
    def name(self) -> str:
        """Absolute path of the tokenizer.json."""
        return self.path

    @property
    def tag(self) -> str:
        """``hf-`` plus the first 12 hex digits of the file's sha256."""
        return "hf-" + self.sha256[:12]

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens: every id encode can return is below it."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode`, as an int64 array."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        """Token ids back to text (special tokens skipped)."""
        return self._tok.decode([int(i) for i in ids])


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def build_tokenizer(name_or_path: str) -> Tokenizer:
    """``"byte"`` gives a :class:`ByteTokenizer`; anything else is a path to a
    tokenizer.json (or its directory). A missing path raises a ConfigError
    (a ValueError) naming ``data.tokenizer``."""
    if name_or_path == BYTE:
        return ByteTokenizer()
    return HFTokenizer(name_or_path)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``:
    uint16 up to 65536 ids (0..65535), uint32 beyond."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)
