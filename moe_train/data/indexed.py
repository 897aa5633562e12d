"""Token files on disk: the raw layout (``NAME.bin`` of bare ids) and
Megatron-LM's indexed dataset (``NAME.bin`` + ``NAME.idx``), written with
megatron-core's ``IndexedDatasetBuilder`` and read with its ``IndexedDataset``.

Both writers take one document piece at a time and write it under a
temporary name; :meth:`commit` renames into place, so a reader never sees
half a file. megatron-core is imported only when the Megatron layout is used:
it is heavy, and the raw layout (the default) does not need it.
"""
from __future__ import annotations

import os
import struct
import uuid
from typing import Tuple

import numpy as np

RAW, MEGATRON = "bin", "megatron"
LAYOUTS = (RAW, MEGATRON)


def tmp_name(directory: str, final: str) -> str:
    """A unique temporary name beside ``final`` (same filesystem, so
    ``os.replace`` is an atomic rename)."""
    return os.path.join(directory, f".{final}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def _megatron_indexed():
    """megatron-core's indexed_dataset module, imported without the warnings
    its package prints about optional GPU libraries (a CPU job needs none)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def megatron_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron-LM's preprocess_data.py picks for this
    vocabulary (``DType.optimal_dtype``): uint16 below 65500 ids, else int32."""
    return np.dtype(_megatron_indexed().DType.optimal_dtype(vocab_size))


class RawWriter:
    """Appends ids to ``<directory>/<name>.bin`` as bare ``dtype`` values."""

    def __init__(self, directory: str, name: str, dtype: np.dtype):
        self.final = os.path.join(directory, f"{name}.bin")
        self.tmp = tmp_name(directory, f"{name}.bin")
        self.dtype = dtype
        self._fh = open(self.tmp, "wb")

    def add(self, ids: np.ndarray) -> None:
        """Append one document piece."""
        self._fh.write(ids.astype(self.dtype, copy=False).tobytes())

    def commit(self) -> None:
        """Close and move into place."""
        self._fh.close()
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        """Close and remove the temporary file (after an error)."""
        self._fh.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class MegatronWriter:
    """One Megatron indexed dataset ``<directory>/<name>.{bin,idx}``; every
    :meth:`add` is one document of one sequence (what preprocess_data.py
    writes for a GPT corpus)."""

    def __init__(self, directory: str, name: str, dtype: np.dtype):
        IndexedDatasetBuilder = _megatron_indexed().IndexedDatasetBuilder
        self.finals = [os.path.join(directory, f"{name}.{ext}") for ext in ("bin", "idx")]
        self.tmps = [tmp_name(directory, f"{name}.{ext}") for ext in ("bin", "idx")]
        self.dtype = dtype
        self._builder = IndexedDatasetBuilder(self.tmps[0], dtype=dtype.type)

    def add(self, ids: np.ndarray) -> None:
        """Append one document."""
        ids = ids.astype(self.dtype, copy=False)
        self._builder.add_document(ids, [len(ids)])

    def commit(self) -> None:
        """Write the index and move both files into place (the .bin first: a
        reader finds the pair only once the .idx arrives)."""
        self._builder.finalize(self.tmps[1])
        for tmp, final in zip(self.tmps, self.finals):
            os.replace(tmp, final)

    def discard(self) -> None:
        """Close and remove the temporary files (after an error)."""
        self._builder.data_file.close()
        for tmp in self.tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def make_writer(layout: str, directory: str, name: str, dtype: np.dtype):
    """A :class:`RawWriter` or :class:`MegatronWriter` for ``layout``."""
    return (MegatronWriter if layout == MEGATRON else RawWriter)(directory, name, dtype)


def is_prefix(path: str) -> bool:
    """Whether ``path`` names an indexed dataset prefix (``path.idx`` or
    ``path.bin`` exists)."""
    return os.path.isfile(path + ".idx") or os.path.isfile(path + ".bin")


def check_prefix(prefix: str) -> None:
    """Raise FileNotFoundError naming the missing half of ``prefix``'s pair."""
    for have, missing in ((".idx", ".bin"), (".bin", ".idx")):
        if os.path.isfile(prefix + have) and not os.path.isfile(prefix + missing):
            raise FileNotFoundError(f"{prefix}{have} has no {prefix}{missing} beside it; an "
                                    "indexed dataset needs both")


def read_indexed(prefix: str) -> Tuple[np.ndarray, np.ndarray, object]:
    """``(tokens, doc_starts, dataset)`` of the indexed dataset at ``prefix``.

    ``tokens`` is the whole ``.bin`` as one read-only array (a view of
    IndexedDataset's memory map: no copy), ``doc_starts`` the token offset of
    each document plus the total at the end, ``dataset`` the IndexedDataset,
    which must outlive ``tokens`` (it owns the map).
    """
    check_prefix(prefix)
    IndexedDataset = _megatron_indexed().IndexedDataset
    try:
        ds = IndexedDataset(prefix)
    except (AssertionError, ValueError, struct.error) as exc:
        raise ValueError(f"{prefix}.idx is not a Megatron indexed dataset index: "
                         f"{exc or type(exc).__name__}") from exc
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    seq_starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(seq_starts[-1])
    dtype = np.dtype(ds.index.dtype)
    bin_size = os.path.getsize(prefix + ".bin")
    if bin_size != total * dtype.itemsize:
        raise ValueError(f"{prefix}.bin holds {bin_size} bytes; its .idx describes "
                         f"{total} {dtype.name} tokens ({total * dtype.itemsize} bytes)")
    tokens = ds.bin_reader.read(dtype=dtype, count=total, offset=0) if total else \
        np.zeros(0, dtype)
    doc_starts = seq_starts[np.asarray(ds.document_indices, dtype=np.int64)]
    return tokens, doc_starts, ds


def document_split(doc_starts: np.ndarray, val_fraction: float) -> int:
    """Where a bare indexed dataset is cut into train and val: the start of
    the first document at or after token ``total * (1 - val_fraction)``, or
    that token itself when no document starts there (one long document), so
    val holds whole final documents whenever it can."""
    total = int(doc_starts[-1])
    target = int(np.floor(total * (1.0 - val_fraction)))
    i = int(np.searchsorted(doc_starts[:-1], target, side="left"))
    return int(doc_starts[i]) if i < len(doc_starts) - 1 else target
