"""Checkpoints: written atomically, resumed exactly, loaded for inference,
and independent of the parallel layout that wrote them.

Layout of a run directory::

    RUN_DIR/checkpoints/step_N/   model/, optimizer/ (torch.distributed.checkpoint),
                                  trainer.pt, rng/rank_R.pt, config.yaml,
                                  manifest.json (size + sha256 of every file)
    RUN_DIR/checkpoints/latest    one line: the name of the newest complete step_N

Model and optimizer state are DCP checkpoints in a logical layout (EP=1,
TP=1 names; :mod:`moe_train.parallel.dist_checkpoint`): every rank writes its
own experts, replicated tensors are written once, and a checkpoint written
at one expert- or tensor-parallel size loads at any other. ``trainer.pt``
holds the step (the data position too: batch s is a function of (seed, s)),
the scheduler and the world size; ``rng/rank_R.pt`` the RNG states of torch,
numpy and Python of rank R.

A save is a collective. Every rank writes into ``checkpoints/.tmp-step_N``
(each file fsynced), a barrier waits for all of them, then rank 0 fsyncs the
directories, renames ``.tmp-step_N`` to ``step_N`` (a rename is atomic on
POSIX) and only then replaces ``latest`` (temp file + os.replace), and a
second barrier holds every rank until the checkpoint is visible. A process
killed at any moment leaves either the old ``latest`` pointing at a complete
checkpoint, or the new one; a stale ``.tmp-*`` directory is removed by the
next save. Ranks on several nodes must share the filesystem of the run dir.

Before the rename the ranks hash every file into ``manifest.json``
(:mod:`moe_train.train.checkpoint_manifest`); :func:`find_checkpoint`
verifies it and falls back from a bad latest checkpoint to the newest good
one. A full disk is checked before a save and cleaned up after a failed one
(:mod:`moe_train.train.checkpoint_space`): SaveError, the previous checkpoint
intact.

Model and optimizer state go through :func:`write_model_optimizer` and
:func:`read_model_optimizer` only. DeepSpeed-engine checkpoints
(:mod:`moe_train.train.engine_deepspeed`) carry the same ``model/`` beside the
engine's files, so ``load_model`` and export read them too.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from moe_train.config import Config, ConfigError, config_from_dict, moe_for_model, save_config
from moe_train.parallel import dist_checkpoint
from moe_train.parallel.collectives import all_gather_object, barrier, broadcast_object
from moe_train.parallel.topology import Topology
from moe_train.train import InputError
from moe_train.train import checkpoint_manifest as manifests
from moe_train.train import checkpoint_space as space

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_DIR = dist_checkpoint.MODEL_DIR
OPTIMIZER_DIR = dist_checkpoint.OPTIMIZER_DIR
TRAINER_FILE = "trainer.pt"
RNG_DIR = "rng"
CONFIG_FILE = "config.yaml"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step_(\d+)$")

# Test hook: "STEP:SECONDS" makes the save of step STEP sleep inside the
# temporary directory (after model/ is written), so a test can kill the
# process in the middle of a save. Unset in normal use.
SAVE_DELAY_ENV = "MOE_TRAIN_TEST_SAVE_DELAY"

# Fields that change parameter shapes (or which parameters exist): a
# checkpoint can only be loaded into a model that agrees on all of them.
# Sizes left null in the config are compared after resolution. The parallel
# sizes are not among them: any layout loads any checkpoint.
SHAPE_FIELDS = {
    "model.vocab_size": lambda c: c.model.vocab_size,
    "model.hidden_size": lambda c: c.model.hidden_size,
    "model.num_layers": lambda c: c.model.num_layers,
    "model.num_heads": lambda c: c.model.num_heads,
    "model.num_kv_heads": lambda c: c.model.kv_heads,
    "model.ffn_hidden_size": lambda c: c.model.ffn_size,
    "model.kv_channels": lambda c: c.model.head_dim,
    "model.qk_norm": lambda c: c.model.qk_norm,
    "model.norm": lambda c: c.model.norm,
    "model.activation": lambda c: c.model.activation,
    "model.tie_embeddings": lambda c: c.model.tie_embeddings,
    "moe.num_experts": lambda c: c.moe.num_experts,
    "moe.layer_freq": lambda c: c.moe.layer_freq,
    "moe.first_k_dense": lambda c: c.moe.first_k_dense if c.moe.enabled else 0,
    "moe.num_shared_experts": lambda c: c.moe.num_shared_experts,
    "moe.shared_expert_ffn_hidden_size": lambda c: c.moe.shared_expert_ffn_hidden_size,
    "moe.shared_expert_gate": lambda c: c.moe.shared_expert_gate,
    "moe.noisy_gating": lambda c: c.moe.noisy_gating,
    "moe.hidden_size": lambda c: moe_for_model(c.moe, c.model).hidden_size,
    "moe.ffn_hidden_size": lambda c: moe_for_model(c.moe, c.model).ffn_hidden_size,
    "moe.activation": lambda c: moe_for_model(c.moe, c.model).activation,
}


def _single() -> Topology:
    return Topology()


# ----------------------------------------------------------------------------
# Model and optimizer state


def write_model_optimizer(ckpt_dir: str, model: torch.nn.Module,
                          optimizer: Optional[torch.optim.Optimizer],
                          topology: Optional[Topology] = None) -> None:
    """Write model (and optimizer) state into ``ckpt_dir/model`` (and
    ``ckpt_dir/optimizer``) in the logical DCP layout. A collective when
    ``topology`` is distributed: every rank calls it and writes its shard."""
    dist_checkpoint.save(ckpt_dir, model, optimizer, topology or _single())


def read_model_optimizer(ckpt_dir: str, model: torch.nn.Module,
                         optimizer: Optional[torch.optim.Optimizer] = None,
                         topology: Optional[Topology] = None) -> None:
    """Load the state written by :func:`write_model_optimizer` in place, each
    rank its own part for its place in ``topology`` (any EP/TP size). Raises
    InputError for a checkpoint that does not hold what is asked for."""
    topology = topology or _single()
    try:
        if not dist_checkpoint.has_state(ckpt_dir, MODEL_DIR):
            raise InputError(f"{ckpt_dir} is not a checkpoint (no {MODEL_DIR}/)")
        if optimizer is not None and not dist_checkpoint.has_state(ckpt_dir, OPTIMIZER_DIR):
            raise InputError(f"checkpoint {ckpt_dir} has no optimizer state ({OPTIMIZER_DIR}/); "
                             "a DeepSpeed-engine checkpoint resumes with the "
                             "train.deepspeed_config that wrote it")
        dist_checkpoint.load(ckpt_dir, model, optimizer, topology)
    except dist_checkpoint.CheckpointError as exc:
        raise InputError(f"checkpoint {ckpt_dir}: {exc}")
    except write_errors() + (EOFError, ValueError) as exc:  # garbled files past the manifest
        raise InputError(f"checkpoint {ckpt_dir} cannot be read ({type(exc).__name__}: "
                         + (str(exc).strip().splitlines() or [""])[0][:200] + ")")


# ----------------------------------------------------------------------------
# RNG state


def rng_state() -> Dict[str, Any]:
    """The generators a training step may draw from (torch CPU and CUDA,
    numpy, Python), as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed(seed: int, step: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python from ``(seed, step, rank)``.

    For a resume on a different number of ranks, where the saved per-rank
    RNG states do not map onto the new ranks: the continuation is then a
    deterministic function of the checkpoint and the new world size, though
    not the stream the saving run would have drawn. Nothing in training
    draws from these generators today: random routing has its own keyed
    generator (moe/routing_noise.py) and the data order is a function of
    ``(seed, step)`` alone.
    """
    mixed = (seed * 1_000_003 + step) * 10_007 + rank
    mixed %= 2 ** 32
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)  # CUDA generators too


# ----------------------------------------------------------------------------
# Atomic save


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


def write_errors():
    """The exceptions a failed checkpoint write raises (OSError and torch's
    and DCP's wrappers of it), for ``except`` clauses around the writes."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (OSError, RuntimeError, CheckpointException)


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


# ----------------------------------------------------------------------------
# Finding, checking and loading


def _is_checkpoint(path: str) -> bool:
    return (dist_checkpoint.has_state(path, MODEL_DIR)
            and os.path.isfile(os.path.join(path, CONFIG_FILE)))


def _problem(ckpt_dir: str) -> Optional[str]:
    """Why ``ckpt_dir`` cannot be used (one line), or None: it must be a
    complete checkpoint whose files match its manifest."""
    if not _is_checkpoint(ckpt_dir):
        return f"{ckpt_dir} is not a complete checkpoint (no {MODEL_DIR}/ or {CONFIG_FILE})"
    return manifests.verify(ckpt_dir)


def _warn(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once per job, not once per rank
        print(f"warning: {message}", file=sys.stderr, flush=True)


def find_checkpoint(path: str) -> str:
    """The verified checkpoint directory meant by ``path``.

    A checkpoint directory itself must verify against its manifest
    (InputError naming the bad file otherwise). A run directory or a
    checkpoints/ directory means the one ``latest`` names (or, without
    ``latest``, the newest step_N); when that one fails to verify, the
    newest older checkpoint that does is used instead, with a one-line
    warning naming the bad file. InputError when there is none."""
    if not os.path.exists(path):
        raise InputError(f"checkpoint path {path} does not exist")
    if _is_checkpoint(path):
        problem = manifests.verify(path)
        if problem:
            raise InputError(f"checkpoint {path} failed verification: {problem}")
        return path
    for root in (os.path.join(path, CHECKPOINTS), path):
        steps = [p for _, p in reversed(step_dirs(root))]  # newest first
        pointer = os.path.join(root, LATEST)
        if os.path.isfile(pointer):
            with open(pointer) as fh:
                named = os.path.join(root, fh.read().strip())
            steps = [named] + [p for p in steps if p != named]
        # (No pointer: a run killed between the rename of step_N and the
        # write of `latest`; a step_N directory only exists once complete.)
        if not steps:
            continue
        first = _problem(steps[0])
        if first is None:
            return steps[0]
        for older in steps[1:]:
            if _problem(older) is None:
                _warn(f"checkpoint {steps[0]} failed verification ({first}); using {older}, "
                      "the newest checkpoint that verifies")
                return older
        raise InputError(f"no checkpoint in {path} passes verification; the latest: {first}")
    raise InputError(f"no checkpoint found in {path} (expected {CHECKPOINTS}/{LATEST} "
                     "or a step_N directory)")


def _load_file(path: str) -> Any:
    """``torch.load`` of a checkpoint file; InputError (never EOFError or
    UnpicklingError, whose advice to drop weights_only is wrong here)."""
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint file {path} is missing")
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt file
        raise InputError(f"checkpoint file {path} is corrupt ({type(exc).__name__})")


def run_dir_of(ckpt_dir: str) -> Optional[str]:
    """RUN_DIR for RUN_DIR/checkpoints/step_N, else None."""
    parent = os.path.dirname(os.path.abspath(ckpt_dir))
    if os.path.basename(parent) == CHECKPOINTS:
        return os.path.dirname(parent)
    return None


def checkpoint_step(ckpt_dir: str) -> int:
    """The step a checkpoint was written at."""
    m = _STEP_RE.match(os.path.basename(os.path.normpath(ckpt_dir)))
    if m:
        return int(m.group(1))
    return int(_load_file(os.path.join(ckpt_dir, TRAINER_FILE))["step"])


def read_config(ckpt_dir: str, overrides: Optional[List[str]] = None) -> Config:
    """The config stored with a checkpoint, plus ``--set`` style overrides."""
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read {path}: {exc}")
    return config_from_dict(data, overrides)


def check_compatible(saved: Config, cfg: Config, where: str) -> None:
    """Raise InputError listing every shape field on which the checkpoint's
    config ``saved`` and ``cfg`` differ."""
    diffs = [f"{name} (checkpoint {get(saved)!r}, config {get(cfg)!r})"
             for name, get in SHAPE_FIELDS.items() if get(saved) != get(cfg)]
    if diffs:
        raise InputError(f"checkpoint {where} does not fit this config; fields that differ: "
                         + ", ".join(diffs))


def load_checkpoint(ckpt_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, cfg: Config, topology: Optional[Topology] = None) -> int:
    """Restore model, optimizer, scheduler and RNG states from ``ckpt_dir``
    into the objects built for ``cfg`` and ``topology`` (any EP/TP size);
    return the step to continue from. A collective when ``topology`` is
    distributed.

    RNG: each rank restores the state its rank saved when the world size is
    the one that saved; otherwise every rank is reseeded with
    :func:`reseed` ``(train.seed, step, rank)``.
    """
    topology = topology or _single()
    check_compatible(read_config(ckpt_dir), cfg, ckpt_dir)
    read_model_optimizer(ckpt_dir, model, optimizer, topology)
    state = _load_file(os.path.join(ckpt_dir, TRAINER_FILE))
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    rng_file = _rng_file(ckpt_dir, topology.rank)
    if state.get("world_size") == topology.world_size and os.path.isfile(rng_file):
        set_rng_state(_load_file(rng_file))
    else:
        reseed(cfg.train.seed, step, topology.rank)
    return step


def load_model(path: str) -> Tuple[torch.nn.Module, Config]:
    """``(model, config)`` from a run directory (its latest checkpoint) or a
    checkpoint directory. The model is on the CPU, in fp32 and in eval mode;
    ``model(input_ids [B,S]).logits`` has shape [B,S,V]. A model with a NaN
    or infinite weight is refused (InputError)."""
    from moe_train.model.transformer import build_model

    ckpt = find_checkpoint(path)
    try:
        cfg = read_config(ckpt)
    except ConfigError as exc:
        raise InputError(f"{ckpt}: {exc}")
    model = build_model(cfg.model, cfg.moe)
    read_model_optimizer(ckpt, model)
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        # Training never writes such a checkpoint (train/nonfinite.py);
        # refuse one made otherwise rather than export or serve NaN.
        raise InputError(f"checkpoint {ckpt} holds non-finite weights ({len(bad)} tensors, "
                         f"e.g. {bad[0]}); refusing to use it")
    model.eval()
    return model, cfg
