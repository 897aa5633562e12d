"""The atomic save of a checkpoint, a collective, and the layout it writes.

Every rank writes into ``checkpoints/.tmp-step_N`` (each file fsynced), a
barrier waits for all of them, then rank 0 fsyncs the directories, renames
``.tmp-step_N`` to ``step_N`` (a rename is atomic on POSIX) and only then
replaces ``latest`` (temp file + os.replace), and a second barrier holds every
rank until the checkpoint is visible. A process killed at any moment leaves
either the old ``latest`` pointing at a complete checkpoint, or the new one; a
stale ``.tmp-*`` directory is removed by the next save. Ranks on several nodes
must share the filesystem of the run dir. Before the rename the ranks hash
every file into ``manifest.json`` (:mod:`moe_train.train.checkpoint_manifest`);
a full disk is checked before a save and cleaned up after a failed one
(:mod:`moe_train.train.checkpoint_space`). Re-exported by
:mod:`moe_train.train.checkpoint`.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from moe_train.config import Config, save_config
from moe_train.parallel.collectives import all_gather_object, barrier, broadcast_object
from moe_train.parallel.topology import Topology
from moe_train.train import checkpoint_manifest as manifests
from moe_train.train import checkpoint_space as space
from moe_train.train.checkpoint_state import _single, rng_state, write_errors, write_model_optimizer

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_FILE = "trainer.pt"
RNG_DIR = "rng"
CONFIG_FILE = "config.yaml"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step_(\d+)$")

# Test hook: "STEP:SECONDS" makes the save of step STEP sleep inside the
# temporary directory (after model/ is written), so a test can kill the
# process in the middle of a save. Unset in normal use.
SAVE_DELAY_ENV = "MOE_TRAIN_TEST_SAVE_DELAY"


def _fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_delay(step: int) -> None:
    spec = os.environ.get(SAVE_DELAY_ENV)
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


def step_dirs(root: str) -> List[Tuple[int, str]]:
    """Complete checkpoints under ``root`` (a checkpoints/ dir) as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, f"{LATEST}.tmp")
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(root, LATEST))
    _fsync_dir(root)


def _rng_file(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, RNG_DIR, f"rank_{rank}.pt")


def _save_fsynced(obj: Any, path: str) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def _fsync_tree(path: str) -> None:
    # The files were fsynced by the rank that wrote them; what is left are
    # the directory entries (the rank-0 view of a shared filesystem).
    for parent, _, _ in os.walk(path, topdown=False):
        _fsync_dir(parent)


def _latest(root: str) -> Optional[str]:
    """The checkpoint ``root/latest`` names, if any."""
    try:
        with open(os.path.join(root, LATEST)) as fh:
            path = os.path.join(root, fh.read().strip())
    except OSError:
        return None
    return path if os.path.isdir(path) else None


def begin_save(run_dir: str, step: int, topology: Topology) -> str:
    """First stage of the atomic save protocol (a collective): rank 0 removes
    temporary directories left by killed saves, checks the free space against
    the previous checkpoint's size (checkpoint_space.py) and creates a clean
    ``checkpoints/.tmp-step_N`` with its rng/ folder. Returns that path;
    raises SaveError on every rank when there is no room."""
    root = os.path.join(run_dir, CHECKPOINTS)
    tmp = os.path.join(root, TMP_PREFIX + f"step_{step}")
    error = None
    if topology.is_main:
        previous = None
        try:
            os.makedirs(root, exist_ok=True)
            for entry in os.listdir(root):
                if entry.startswith(TMP_PREFIX):  # left by a save that was killed
                    shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
            previous = _latest(root)
            space.check_before(run_dir, step, previous,
                               manifests.manifest_bytes(previous) if previous else 0)
            os.makedirs(os.path.join(tmp, RNG_DIR))
        except space.SaveError as exc:
            error = str(exc)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = str(space.failed(run_dir, step, space.describe(exc), 0, previous))
    error = broadcast_object(error, topology)  # and every rank waits for the directory
    if error:
        raise space.SaveError(error)
    return tmp


def _agree_or_abandon(error: Optional[str], tmp: str, step: int, topology: Topology) -> None:
    """Every rank learns whether any rank failed to write; if one did, rank 0
    removes ``tmp`` and every rank raises the same SaveError."""
    errors = all_gather_object(error, topology)
    error = next((e for e in errors if e), None)
    if error is None:
        return
    message = None
    if topology.is_main:
        root = os.path.dirname(tmp)
        needed = space.tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        message = str(space.failed(os.path.dirname(root), step, error, needed, _latest(root)))
    raise space.SaveError(broadcast_object(message, topology))


def finish_save(tmp: str, step: int, cfg: Config, keep_last: int, topology: Topology,
                trainer_state: Dict[str, Any], error: Optional[str] = None) -> str:
    """Last stage of the atomic save protocol (a collective), after every
    rank has written its model/optimizer files into ``tmp`` (``error``: this
    rank's failure to, from :func:`checkpoint_space.describe`): each rank
    writes its RNG state; rank 0 writes ``trainer_state`` (plus step and
    world size) and the config; the ranks hash the files into
    ``manifest.json``; rank 0 fsyncs, renames ``tmp`` to ``step_N``, repoints
    ``latest`` and keeps the last ``keep_last``. Returns the final path. A
    write that failed on any rank removes ``tmp`` and raises SaveError on
    every rank (the previous checkpoint stays the latest)."""
    if error is None:
        try:
            _save_fsynced(rng_state(), _rng_file(tmp, topology.rank))
            if topology.is_main:
                _save_fsynced({"step": step, "world_size": topology.world_size, **trainer_state},
                              os.path.join(tmp, TRAINER_FILE))
                config_path = os.path.join(tmp, CONFIG_FILE)
                save_config(cfg, config_path)
                _fsync_file(config_path)
        except write_errors() as exc:
            error = space.describe(exc)
    _agree_or_abandon(error, tmp, step, topology)  # also: every rank's files are on disk
    try:
        manifests.write_manifest(tmp, step, topology)
    except OSError as exc:
        error = space.describe(exc)
    _agree_or_abandon(error, tmp, step, topology)

    root, name = os.path.dirname(tmp), f"step_{step}"
    final = os.path.join(root, name)
    if topology.is_main:
        _fsync_tree(tmp)
        if os.path.exists(final):
            # Only a run that restarts at this very step meets an existing step_N;
            # move it aside so the rename below stays a single atomic step.
            old = os.path.join(root, f"{TMP_PREFIX}old-{name}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
        _write_latest(root, name)
        for _, path in step_dirs(root)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    barrier(topology)  # nobody reads or deletes step_N before it is in place
    return final


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, cfg: Config,
                    keep_last: int, topology: Optional[Topology] = None) -> str:
    """Atomically write checkpoint ``step`` of this run and return its path.

    A collective when ``topology`` is distributed: every rank calls it,
    writes its own shard of the model and optimizer and its RNG state; rank 0
    writes the rest and makes the checkpoint visible. Without ``topology``,
    a single process writes the whole model. Raises SaveError (one line)
    when the disk is full or a write fails, after removing the partial save.
    """
    topology = topology or _single()
    tmp = begin_save(run_dir, step, topology)
    error = None
    try:
        write_model_optimizer(tmp, model, optimizer, topology)
    except write_errors() as exc:
        error = space.describe(exc)
    _test_delay(step)
    layout = {"tensor_parallel_size": topology.tp_size,
              "expert_parallel_size": topology.ep_size,
              "data_parallel_size": topology.dp_size}
    return finish_save(tmp, step, cfg, keep_last, topology,
                       {"scheduler": scheduler.state_dict(), "layout": layout}, error)

