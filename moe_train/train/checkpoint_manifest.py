"""Checksum manifests: every checkpoint directory carries ``manifest.json``
with the size and sha256 of each of its files, so that a truncated, garbled
or half-copied checkpoint is found before anything is trained on it.

The manifest is written last, inside the temporary directory, before the
atomic rename (checkpoint.finish_save), so a ``step_N`` directory always
holds one. Hashing is shared out: rank r hashes files r, r+W, r+2W, ... of
the sorted file list and rank 0 writes the merged manifest. Verification of
a directory is done once per process (cached by path and manifest mtime).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

from moe_train.parallel.collectives import all_gather_object, broadcast_object

MANIFEST_FILE = "manifest.json"
FORMAT = 1
_CHUNK = 1 << 20
_verified: Dict[Tuple[str, int], Optional[str]] = {}


def sha256_file(path: str) -> str:
    """Hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _files(ckpt_dir: str) -> List[str]:
    out = []
    for parent, _, names in os.walk(ckpt_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), ckpt_dir)
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def _describe(ckpt_dir: str, rels: List[str]) -> Dict[str, Dict]:
    return {rel: {"bytes": os.path.getsize(os.path.join(ckpt_dir, rel)),
                  "sha256": sha256_file(os.path.join(ckpt_dir, rel))} for rel in rels}


def write_manifest(ckpt_dir: str, step: Optional[int], topology) -> Dict[str, Dict]:
    """Hash every file of ``ckpt_dir`` and (rank 0) write ``manifest.json``,
    fsynced. A collective when ``topology`` is distributed: every file must
    be on disk on every rank's view first. Returns the files' entries."""
    rels = broadcast_object(_files(ckpt_dir) if topology.is_main else None, topology)
    parts = all_gather_object(_describe(ckpt_dir, rels[topology.rank::topology.world_size]),
                              topology)
    files: Dict[str, Dict] = {}
    for part in parts:
        files.update(part)
    if topology.is_main:
        path = os.path.join(ckpt_dir, MANIFEST_FILE)
        with open(path, "w") as fh:
            json.dump({"format": FORMAT, "step": step, "files": dict(sorted(files.items()))},
                      fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
    return files


def manifest_bytes(ckpt_dir: str) -> int:
    """Total size of the files a checkpoint's manifest lists (0 without one)."""
    try:
        with open(os.path.join(ckpt_dir, MANIFEST_FILE)) as fh:
            return sum(int(f["bytes"]) for f in json.load(fh)["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def verify(ckpt_dir: str) -> Optional[str]:
    """None when every file ``ckpt_dir``'s manifest lists is there with its
    size and sha256; else one line naming the first bad file."""
    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    try:
        key = (os.path.realpath(ckpt_dir), os.stat(path).st_mtime_ns)
    except OSError:
        return f"{path} is missing (an incomplete checkpoint, or one written without it)"
    if key not in _verified:
        _verified[key] = _verify(ckpt_dir, path)
    return _verified[key]


def _verify(ckpt_dir: str, path: str) -> Optional[str]:
    try:
        with open(path) as fh:
            files = json.load(fh)["files"]
        entries = [(rel, int(v["bytes"]), str(v["sha256"])) for rel, v in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{path} is corrupt"
    for rel, size, digest in sorted(entries):
        full = os.path.join(ckpt_dir, rel)
        try:
            have = os.path.getsize(full)
        except OSError:
            return f"{full} is missing"
        if have != size:
            return f"{full} has {have} bytes, the manifest says {size}"
        if sha256_file(full) != digest:
            return f"{full} does not match its sha256 in the manifest"
    return None
