"""Tokenizers: raw UTF-8 bytes (no download), a local Hugging Face
``tokenizer.json``, or a local Hugging Face tokenizer directory (loaded with
transformers' ``AutoTokenizer``, offline).

All expose the same small surface, so ``prepare`` and the trainer never ask
which one they hold: ``name`` (what meta.json records), ``tag`` (a short,
filesystem-safe identity for cache directory names), ``vocab_size``,
``eod_id`` (the end-of-document token written after every document),
``encode``/``decode``, ``encode_docs`` (the fast path used on batches of
documents) and ``files`` (the files that define it, copied next to a dataset).
"""
from __future__ import annotations

import hashlib
import os
from typing import List, Optional, Sequence, Union

import numpy as np

from moe_train.config import ConfigError

BYTE = "byte"

# Special tokens that end a document, in the order they are looked for when a
# bare tokenizer.json does not say which one is its EOS (GPT-2/NeoX, LLaMA/
# Mistral, LLaMA-3, Gemma, BERT-style).
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")

# Files of a Hugging Face tokenizer directory: hashed into the tag and copied
# beside a dataset. Model weights in the same directory are neither.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja")


def _sha256_files(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255) plus the end-of-document id 256:
    vocabulary 257, nothing to download or train."""

    name = BYTE
    tag = BYTE
    eod_id = 256
    vocab_size = 257
    files: List[str] = []

    def encode(self, text: str) -> List[int]:
        """The UTF-8 bytes of ``text`` as ints in [0, 256)."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode`, as a uint8 array (no Python int per byte)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def encode_docs(self, texts: Sequence[str]) -> List[np.ndarray]:
        """:meth:`encode_array` of each text."""
        return [self.encode_array(t) for t in texts]

    def decode(self, ids) -> str:
        """Bytes back to text; the end-of-document id becomes a newline. A
        sampled sequence may cut a multi-byte character in half, so invalid
        UTF-8 becomes U+FFFD instead of raising."""
        return bytes(int(i) if int(i) < 256 else 10 for i in ids).decode("utf-8",
                                                                         errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer.

    ``path`` is a ``tokenizer.json`` file (loaded with the ``tokenizers``
    library) or a directory. A directory with a ``tokenizer_config.json`` is
    loaded with ``transformers.AutoTokenizer`` (offline, local files only); a
    directory holding only ``tokenizer.json`` is read like the file.
    Special tokens are not added on encode: a training corpus is plain text.

    The end-of-document id is ``eod_token`` when given, else the tokenizer's
    EOS (AutoTokenizer's ``eos_token``, or for a bare tokenizer.json the first
    special token of :data:`EOD_CANDIDATES` it has).
    """

    def __init__(self, path: str, eod_token: Optional[str] = None):
        if os.path.isdir(path):
            config = os.path.join(path, "tokenizer_config.json")
            self._auto = os.path.isfile(config)
            file = path if self._auto else os.path.join(path, "tokenizer.json")
        else:
            self._auto, file = False, path
        if not os.path.exists(file):
            raise ConfigError(f"data.tokenizer ({path!r}) must be 'byte', a local Hugging Face "
                              f"tokenizer.json or a tokenizer directory; not found: {file}")
        self.path = os.path.abspath(file)
        if self._auto:
            self.files = sorted(os.path.join(self.path, f) for f in TOKENIZER_FILES
                                if os.path.isfile(os.path.join(self.path, f)))
        else:
            self.files = [self.path]
        # The content hash, not the path, identifies the tokenizer: a cache
        # must be rebuilt when the files change, and may be reused when they move.
        self.sha256 = _sha256_files(self.files)
        self._hf = None
        if self._auto:
            self._load_auto(path)
        else:
            self._load_file(path)
        self._given_path, self._eod_token, self._eod = path, eod_token, None
        if eod_token is not None:
            self._find_eod(path, eod_token)  # a wrong --eod-token is refused at once

    @property
    def eod_id(self) -> int:
        """The end-of-document id (looked up on first use: only prepare needs
        it, and a tokenizer without one still loads for training)."""
        if self._eod is None:
            self._eod = self._find_eod(self._given_path, self._eod_token)
        return self._eod

    def _load_file(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # optional dependency: only needed for this class
            raise ConfigError(f"data.tokenizer ({path!r}) needs the 'tokenizers' package: "
                              "pip install tokenizers") from exc
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise ConfigError(f"data.tokenizer ({path!r}) is not a valid Hugging Face "
                              f"tokenizer.json: {str(exc).splitlines()[0]}") from exc
        self._vocab = self._tok.get_vocab_size(with_added_tokens=True)

    def _load_auto(self, path: str) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ConfigError(f"data.tokenizer ({path!r}) is a tokenizer directory, which needs "
                              "the 'transformers' package: pip install transformers") from exc
        try:
            self._hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:  # transformers raises many types for a bad directory
            raise ConfigError(f"data.tokenizer ({path!r}): AutoTokenizer cannot load it: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                              ) from exc
        # A fast tokenizer's Rust backend encodes batches without Python per token.
        self._tok = getattr(self._hf, "backend_tokenizer", None)
        self._vocab = len(self._hf)

    def _find_eod(self, path: str, eod_token: Optional[str]) -> int:
        vocab = self._hf.get_vocab() if self._hf is not None else self._tok.get_vocab(True)
        if eod_token is not None:
            if eod_token not in vocab:
                raise ConfigError(f"--eod-token ({eod_token!r}) is not a token of tokenizer "
                                  f"{path}")
            return int(vocab[eod_token])
        if self._hf is not None and self._hf.eos_token_id is not None:
            return int(self._hf.eos_token_id)
        for token in EOD_CANDIDATES:
            if token in vocab:
                return int(vocab[token])
        raise ConfigError(f"data.tokenizer ({path!r}) has no end-of-document token (none of "
                          f"{', '.join(EOD_CANDIDATES)}); name one with --eod-token")

    @property
    def name(self) -> str:
        """Absolute path of the tokenizer.json or directory."""
        return self.path

    @property
    def tag(self) -> str:
        """``hf-`` plus the first 12 hex digits of the files' sha256."""
        return "hf-" + self.sha256[:12]

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens: every id encode can return is below it."""
        return self._vocab

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``, without special tokens."""
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=False).ids
        return list(self._hf.encode(text, add_special_tokens=False))

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode`, as an int64 array."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_docs(self, texts: Sequence[str]) -> List[np.ndarray]:
        """Token ids of each text (one Rust call for a fast tokenizer)."""
        if self._tok is not None:
            encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int64) for e in encs]
        return [self.encode_array(t) for t in texts]

    def decode(self, ids) -> str:
        """Token ids back to text (special tokens skipped)."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self._tok.decode(ids)


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def build_tokenizer(name_or_path: str, eod_token: Optional[str] = None) -> Tokenizer:
    """``"byte"`` gives a :class:`ByteTokenizer`; anything else is a path to a
    tokenizer.json or a tokenizer directory. A missing path raises a
    ConfigError (a ValueError) naming ``data.tokenizer``."""
    if name_or_path == BYTE:
        if eod_token is not None:
            raise ConfigError("--eod-token applies to Hugging Face tokenizers; the byte "
                              "tokenizer's end-of-document id is 256")
        return ByteTokenizer()
    return HFTokenizer(name_or_path, eod_token)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``:
    uint16 up to 65536 ids (0..65535), uint32 beyond."""
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)
