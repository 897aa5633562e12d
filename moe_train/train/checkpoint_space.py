"""A full disk during a checkpoint: checked before, cleaned up after.

Before a save, rank 0 compares the free space of the run directory's
filesystem with the size of the previous checkpoint (from its manifest). A
save that fails anyway (ENOSPC, or any other write error, on any rank) is
agreed on by every rank, its temporary directory is removed, and the run
stops with :class:`SaveError`: one line naming the run directory, the bytes
needed and the bytes free, exit status 2. The previous checkpoint stays the
latest and intact.

Why stop rather than skip the save and train on: a run that cannot
checkpoint loses everything since its last save on the next preemption or
crash, and keeps a GPU allocation busy doing so; stopping frees the machine
at once with a message that says what to free, and ``--resume`` continues
exactly where the last good checkpoint left off.
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import Optional

from moe_train.train import InputError


class SaveError(InputError):
    """A checkpoint could not be written (disk full, or another write error).
    One line; the command exits with status 2."""


def free_bytes(path: str) -> int:
    """Free bytes (for this user) on the filesystem holding ``path``."""
    return shutil.disk_usage(path).free


def tree_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    total = 0
    for parent, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(parent, name))
            except OSError:
                pass
    return total


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps: torch's writer and DCP re-raise
    the OSError in their own words) says the device is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "Errno 28" in text or \
                "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe(exc: BaseException) -> str:
    """A write error in a few words, for the one-line message."""
    if is_disk_full(exc):
        return "no space left on device"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {first[:200]}"


def check_before(run_dir: str, step: int, previous: Optional[str], needed: int) -> None:
    """SaveError when ``run_dir`` has less than ``needed`` bytes free (the
    size of ``previous``, the latest checkpoint); nothing to compare with
    before the first checkpoint."""
    if needed <= 0:
        return
    free = free_bytes(run_dir)
    if free < needed:
        raise SaveError(
            f"not enough space in {run_dir} for checkpoint step_{step}: needs about {needed} "
            f"bytes (the size of {os.path.basename(previous)}), {free} bytes free; "
            f"{os.path.basename(previous)} is intact; free space and continue with --resume")


def failed(run_dir: str, step: int, reason: str, needed: int, previous: Optional[str]) -> SaveError:
    """The SaveError of a save that failed with ``reason`` (its temporary
    directory already removed)."""
    kept = (f"the latest checkpoint {os.path.basename(previous)} is intact" if previous
            else "no earlier checkpoint exists")
    return SaveError(f"checkpoint step_{step} could not be written in {run_dir}: {reason} "
                     f"(needs at least {needed} bytes, {free_bytes(run_dir)} bytes free); "
                     f"{kept}; free space and continue with --resume")
