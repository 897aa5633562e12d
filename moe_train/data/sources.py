"""Input documents of prepare-data: ``.txt``, ``.jsonl``, ``.jsonl.gz`` and ``.parquet``.

The main process streams each input in blocks of about ``block_bytes`` raw
bytes cut at line ends (Parquet: record batches), so no file is ever held
whole in memory; :func:`block_documents` (run in the workers) turns a block
into document texts. Blocks depend only on the files and ``block_bytes``,
never on the number of workers, which is why any ``--workers`` gives the
same output.

- ``.txt``: one file is one document (read in line-aligned blocks, each block
  tokenized on its own), or with ``split_lines`` one non-empty line is one
  document (its line ending dropped).
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per non-blank line; the document
  is the string under ``json_key``.
- ``.parquet``: the string column ``column``, one row one document.

Bad content raises :class:`DataInputError` (a ValueError) whose one-line
message names the file and the line (or row).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

BLOCK_BYTES = 1 << 20
KINDS = ("txt", "jsonl", "jsonl.gz", "parquet")


class DataInputError(ValueError):
    """Bad input to prepare-data; the message names the file (and line)."""


@dataclass(frozen=True)
class ReadOptions:
    """How documents are found in the inputs."""

    split_lines: bool = False
    json_key: str = "text"
    column: str = "text"


@dataclass
class Block:
    """A piece of one input, small enough to send to a worker.

    ``data`` is raw bytes (text and JSONL) or a list of strings (Parquet);
    ``first_line`` the 1-based line (or row) number of its first line;
    ``doc_end`` whether a whole-file ``.txt`` document ends with this block;
    ``nbytes`` the input bytes it accounts for (for the progress bar).
    """

    path: str
    kind: str
    data: Union[bytes, List[Optional[str]]]
    first_line: int
    doc_end: bool
    nbytes: int


# Extensions that look like data but are not read: refused rather than
# tokenized as if they were text.
_REFUSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".json", ".arrow", ".csv")


def input_kind(path: str) -> str:
    """The kind of ``path`` by its extension, one of :data:`KINDS`; any
    other file (.md, .py, no extension) is text like ``.txt``."""
    lower = path.lower()
    for kind in ("jsonl.gz", "jsonl", "parquet", "txt"):
        if lower.endswith("." + kind):
            return kind
    if lower.endswith(_REFUSED):
        raise DataInputError(f"--input {path}: cannot read this file type; allowed: "
                             + ", ".join("." + k for k in KINDS) + " (other names are text)")
    return "txt"


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Paths and globs to the list of input files: each glob's matches sorted,
    patterns in the order given. A path or glob that names no file is an error."""
    files: List[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataInputError(f"--input {pattern}: the pattern matches no file")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        elif os.path.isdir(pattern):
            raise DataInputError(f"--input {pattern} is a directory; name its files or a glob "
                                 f"such as {os.path.join(pattern, '*.jsonl')}")
        else:
            raise DataInputError(f"input file not found: {pattern}")
    for path in files:
        input_kind(path)
    return files


def check_input(path: str, opts: ReadOptions) -> None:
    """Up-front checks that need no full read: a Parquet file's schema has the
    column, as a string; a gzip file starts like one."""
    kind = input_kind(path)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid and OSError variants
            raise DataInputError(f"{path}: not a readable Parquet file: "
                                 f"{str(exc).splitlines()[0]}") from exc
        if opts.column not in schema.names:
            raise DataInputError(f"{path}: no column {opts.column!r} (columns: "
                                 f"{', '.join(schema.names)}); choose one with --column")
        kind_ok = schema.field(opts.column).type
        if not (pa.types.is_string(kind_ok) or pa.types.is_large_string(kind_ok)):
            raise DataInputError(f"{path}: column {opts.column!r} is {kind_ok}, not a string")
    elif kind == "jsonl.gz":
        with open(path, "rb") as fh:
            if fh.read(2) not in (b"\x1f\x8b", b""):
                raise DataInputError(f"{path}: not a gzip file (it ends in .gz)")


def _utf8_cut(data: bytes) -> int:
    """The largest cut <= len(data) that does not split a UTF-8 character."""
    cut = len(data)
    # Back over continuation bytes (10xxxxxx) to the lead byte, at most 3.
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4
            return cut if need <= back else cut - back
    return cut


def _line_blocks(fh, path: str, kind: str, block_bytes: int, whole_doc: bool,
                 tell=None) -> Iterator[Block]:
    """Blocks of a byte stream, each cut after its last newline (a whole-file
    document with no newline in a block is cut at a character boundary; a
    line longer than a block stays whole). ``tell`` gives the position in the
    underlying file, for progress through a compressed one."""
    carry, line, last = b"", 1, 0

    def consumed(n: int) -> int:
        nonlocal last
        if tell is None:
            return n
        pos = tell()
        n, last = pos - last, pos
        return n

    while True:
        chunk = fh.read(block_bytes)
        if not chunk:
            # The rest ends the input (and a whole-file document, even an empty one).
            if carry or whole_doc:
                yield Block(path, kind, carry, line, whole_doc, consumed(len(carry)))
            return
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0 and whole_doc:
            cut = _utf8_cut(data)
        if cut == 0:
            carry = data
            continue
        block, carry = data[:cut], data[cut:]
        yield Block(path, kind, block, line, False, consumed(len(block)))
        line += block.count(b"\n")


def read_blocks(path: str, opts: ReadOptions, block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """Stream ``path`` as :class:`Block`\\ s (see the module docstring)."""
    kind = input_kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        total_rows = max(1, pf.metadata.num_rows)
        size, row = os.path.getsize(path), 1
        # Rows per batch sized so a batch holds roughly block_bytes of text.
        rows = max(1, int(total_rows * block_bytes / max(1, size)))
        for batch in pf.iter_batches(batch_size=rows, columns=[opts.column]):
            texts = batch.column(0).to_pylist()
            yield Block(path, kind, texts, row, False, size * len(texts) // total_rows)
            row += len(texts)
        return
    if kind == "jsonl.gz":
        raw = open(path, "rb")
        try:
            with gzip.GzipFile(fileobj=raw) as fh:
                yield from _line_blocks(fh, path, kind, block_bytes, False, tell=raw.tell)
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
            raise DataInputError(f"{path}: not a valid gzip file: {exc}") from exc
        finally:
            raw.close()
        return
    whole_doc = kind == "txt" and not opts.split_lines
    with open(path, "rb") as fh:
        yield from _line_blocks(fh, path, kind, block_bytes, whole_doc)


def block_documents(block: Block, opts: ReadOptions) -> List[str]:
    """The document texts of ``block`` (for a whole-file ``.txt``, one piece
    of its document). Raises DataInputError naming the file and line."""
    if block.kind == "parquet":
        for i, text in enumerate(block.data):
            if text is None:
                raise DataInputError(f"{block.path}: row {block.first_line + i}: column "
                                     f"{opts.column!r} is null")
        return [t for t in block.data if t]
    # UTF-8; invalid bytes become U+FFFD; line endings kept as they are.
    if block.kind == "txt" and not opts.split_lines:
        return [block.data.decode("utf-8", errors="replace")]
    lines = block.data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    docs = []
    for i, raw in enumerate(lines):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if block.kind == "txt":
            if raw:
                docs.append(raw.decode("utf-8", errors="replace"))
            continue
        if not raw.strip():
            continue
        where = f"{block.path}: line {block.first_line + i}"
        try:
            obj = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise DataInputError(f"{where}: not valid JSON ({str(exc).splitlines()[0]})") from exc
        if not isinstance(obj, dict) or opts.json_key not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise DataInputError(f"{where}: no key {opts.json_key!r} (found: {keys}); "
                                 "choose one with --json-key")
        text = obj[opts.json_key]
        if not isinstance(text, str):
            raise DataInputError(f"{where}: {opts.json_key!r} is {type(text).__name__}, "
                                 "not a string")
        if text:
            docs.append(text)
    return docs
