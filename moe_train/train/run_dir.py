"""A run directory belongs to one run: a manifest of what runs wrote there, an
OS lock while a run is live, and default names that never collide.

- ``RUN_DIR/moe_train_run.json`` (the manifest) lists the names moe_train
  writes in a run directory. Only those names are ever removed, and only by
  a fresh run given ``overwrite`` (``--overwrite``); a directory without a
  manifest is not a moe_train run, and what it holds is never deleted.
  Inside ``checkpoints/`` and ``tb/`` only moe_train's own entries (``step_N``,
  ``latest``, ``.tmp-*``; TensorBoard event files) are removed, so a user
  file put there survives too.
- A fresh run into a directory whose manifest lists files that exist refuses
  (InputError, exit 2) unless ``overwrite``; ``--resume`` continues it.
- A live run holds ``fcntl.flock`` on ``RUN_DIR/.moe_train.lock`` (rank 0
  takes it; the kernel drops it when the process dies, even by SIGKILL). A
  second run into the directory, fresh or ``--resume``, under any launcher,
  refuses in one line naming the PID that holds the lock. flock works on
  local filesystems and most cluster filesystems (Lustre mounted with
  ``flock``, NFSv4); on one without it the lock is advisory only.
- :func:`default_run_dir` is ``runs/<YYYYmmdd-HHMMSS>-<pid>``, with ``-2``,
  ``-3``... appended if that exists.

:func:`check` is read-only (it runs with the other input checks, before
anything is written); :func:`claim` creates the directory, takes the lock,
checks again under the lock, removes what ``overwrite`` allows and writes the
manifest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from typing import List, Optional

from moe_train.train import InputError

try:
    import fcntl
except ImportError:  # not POSIX: no lock, ownership checks still apply
    fcntl = None

MANIFEST = "moe_train_run.json"
LOCK_FILE = ".moe_train.lock"
# What a run writes at the top of its directory (config.yaml, TensorBoard,
# metrics, checkpoints) plus the manifest and the lock themselves.
RUN_FILES = ("config.yaml", "tb", "metrics.jsonl", "checkpoints", MANIFEST, LOCK_FILE)
_BOOKKEEPING = (MANIFEST, LOCK_FILE)
# Entries of the run's own subdirectories that moe_train created.
_OWN_ENTRIES = {"checkpoints": re.compile(r"^(step_\d+|latest|latest\.tmp|\.tmp-.*)$"),
                "tb": re.compile(r"^events\.out\.tfevents\..*$")}


def default_run_dir(root: str = "runs") -> str:
    """``runs/<YYYYmmdd-HHMMSS>-<pid>``: two runs started in the same second
    differ by PID; a suffix is added in the rare case the name exists."""
    base = os.path.join(root, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def read_manifest(run_dir: str) -> Optional[dict]:
    """The manifest of ``run_dir``, or None when it has none (or an unreadable one)."""
    try:
        with open(os.path.join(run_dir, MANIFEST)) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def _holder(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, LOCK_FILE)) as fh:
            text = fh.read().split()
    except OSError:
        text = []
    return f"pid {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "") if text else "pid unknown"


def _in_use(run_dir: str) -> InputError:
    return InputError(f"train.run_dir ({run_dir}) is in use by another run ({_holder(run_dir)}); "
                      "wait for it to end or choose another --run-dir")


class RunLock:
    """``fcntl.flock`` on ``RUN_DIR/.moe_train.lock``, exclusive, non-blocking."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self._fh = None

    def acquire(self, record: bool = True) -> "RunLock":
        """Take the lock and (``record``) write our PID and host into the
        file; InputError naming the holder if another process has it."""
        if fcntl is None:
            return self
        fh = open(os.path.join(self.run_dir, LOCK_FILE), "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise _in_use(self.run_dir)
        if record:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()} {socket.gethostname()}\n")
            fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a
        process that has just opened it)."""
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def _probe_lock(run_dir: str) -> None:
    """InputError if a live process holds the lock of ``run_dir`` (read-only
    apart from opening the lock file that is already there)."""
    if fcntl is None or not os.path.isfile(os.path.join(run_dir, LOCK_FILE)):
        return
    RunLock(run_dir).acquire(record=False).release()


def _present(run_dir: str) -> List[str]:
    return [n for n in RUN_FILES if os.path.lexists(os.path.join(run_dir, n))]


def check(run_dir: str, fresh: bool, overwrite: bool = False, probe: bool = True) -> List[str]:
    """Read-only ownership check of ``run_dir`` for a run; returns the names
    a claim would remove (fresh run with ``overwrite``). InputError when the
    directory is in use, holds a run and neither ``--resume`` nor
    ``--overwrite`` was given, or holds run-file names no manifest lists."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise InputError(f"train.run_dir ({run_dir}) exists and is not a directory")
    if not os.path.isdir(run_dir):
        return []
    if probe:
        _probe_lock(run_dir)
    if not fresh:
        return []
    manifest = read_manifest(run_dir)
    owned = set(manifest["files"]) if manifest else set()
    present = [n for n in _present(run_dir) if n not in _BOOKKEEPING]
    foreign = [n for n in present if n not in owned]
    if foreign:
        raise InputError(
            f"train.run_dir ({run_dir}) holds {', '.join(foreign)} that no moe_train run "
            f"recorded (no {MANIFEST} lists them); moe_train never deletes them: choose another "
            "--run-dir or move them")
    if present and not overwrite:
        raise InputError(f"train.run_dir ({run_dir}) already holds a run ({', '.join(present)}); "
                         "pass --resume to continue it or --overwrite to replace it")
    return present


def _remove_own(run_dir: str, name: str) -> None:
    path = os.path.join(run_dir, name)
    if name in _OWN_ENTRIES and os.path.isdir(path) and not os.path.islink(path):
        for entry in os.listdir(path):
            if _OWN_ENTRIES[name].match(entry):
                target = os.path.join(path, entry)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                else:
                    os.remove(target)
        if not os.listdir(path):
            os.rmdir(path)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _write_manifest(run_dir: str) -> None:
    manifest = {"format": 1, "written_by": "moe_train", "files": list(RUN_FILES),
                "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = os.path.join(run_dir, f".{MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, os.path.join(run_dir, MANIFEST))


def claim(run_dir: str, fresh: bool, overwrite: bool = False) -> "tuple[RunLock, List[str]]":
    """Make ``run_dir`` this run's: create it, take the lock, check again
    under the lock, remove an earlier run's files (fresh + ``overwrite``)
    and write the manifest. Returns ``(lock, removed names)``; the caller
    releases the lock when the run ends."""
    check(run_dir, fresh, overwrite)
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = RunLock(run_dir).acquire()
    except OSError as exc:
        raise InputError(f"train.run_dir ({run_dir}) cannot be written: {exc.strerror or exc}")
    try:
        # Again under the lock: another run may have claimed it meanwhile.
        removed = check(run_dir, fresh, overwrite, probe=False)
        for name in removed:
            _remove_own(run_dir, name)
        _write_manifest(run_dir)
    except OSError as exc:
        lock.release()
        raise InputError(f"train.run_dir ({run_dir}) cannot be written: {exc.strerror or exc}")
    except InputError:
        lock.release()
        raise
    return lock, removed


def prepare(run_dir: str, fresh: bool, overwrite: bool = False) -> List[str]:
    """:func:`claim` and release at once: for a driver (Ray) that prepares
    the directory its workers then lock. Returns the removed names."""
    lock, removed = claim(run_dir, fresh, overwrite)
    lock.release()
    return removed
