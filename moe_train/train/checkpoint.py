"""Checkpoints: written atomically, resumed exactly, loaded for inference,
and independent of the parallel layout that wrote them.

Layout of a run directory::

    RUN_DIR/checkpoints/step_N/   model/, optimizer/ (torch.distributed.checkpoint),
                                  trainer.pt, rng/rank_R.pt, config.yaml
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
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from moe_train.config import Config, ConfigError, config_from_dict, moe_for_model, save_config
from moe_train.parallel import dist_checkpoint
from moe_train.parallel.collectives import barrier
from moe_train.parallel.topology import Topology
from moe_train.train import InputError

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


def begin_save(run_dir: str, step: int, topology: Topology) -> str:
    """First stage of the atomic save protocol (a collective): rank 0 removes
    temporary directories left by killed saves and creates a clean
    ``checkpoints/.tmp-step_N`` with its rng/ folder. Returns that path."""
    root = os.path.join(run_dir, CHECKPOINTS)
    tmp = os.path.join(root, TMP_PREFIX + f"step_{step}")
    if topology.is_main:
        os.makedirs(root, exist_ok=True)
        for entry in os.listdir(root):
            if entry.startswith(TMP_PREFIX):  # left by a save that was killed
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        os.makedirs(os.path.join(tmp, RNG_DIR))
    barrier(topology)  # the clean temporary directory exists for every rank
    return tmp


def finish_save(tmp: str, step: int, cfg: Config, keep_last: int, topology: Topology,
                trainer_state: Dict[str, Any]) -> str:
    """Last stage of the atomic save protocol (a collective), after every
    rank has written its model/optimizer files into ``tmp``: each rank writes
    its RNG state; rank 0 writes ``trainer_state`` (plus step and world size)
    and the config, fsyncs, renames ``tmp`` to ``step_N``, repoints ``latest``
    and keeps the last ``keep_last``. Returns the final path."""
    _save_fsynced(rng_state(), _rng_file(tmp, topology.rank))
    root, name = os.path.dirname(tmp), f"step_{step}"
    final = os.path.join(root, name)
    if topology.is_main:
        _save_fsynced({"step": step, "world_size": topology.world_size, **trainer_state},
                      os.path.join(tmp, TRAINER_FILE))
        config_path = os.path.join(tmp, CONFIG_FILE)
        save_config(cfg, config_path)
        _fsync_file(config_path)
    barrier(topology)  # every rank's files are on disk

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
    a single process writes the whole model.
    """
    topology = topology or _single()
    tmp = begin_save(run_dir, step, topology)
    write_model_optimizer(tmp, model, optimizer, topology)
    _test_delay(step)
    layout = {"tensor_parallel_size": topology.tp_size,
              "expert_parallel_size": topology.ep_size,
              "data_parallel_size": topology.dp_size}
    return finish_save(tmp, step, cfg, keep_last, topology,
                       {"scheduler": scheduler.state_dict(), "layout": layout})


# ----------------------------------------------------------------------------
# Finding, checking and loading


def _is_checkpoint(path: str) -> bool:
    return (dist_checkpoint.has_state(path, MODEL_DIR)
            and os.path.isfile(os.path.join(path, CONFIG_FILE)))


def find_checkpoint(path: str) -> str:
    """The checkpoint directory meant by ``path``: a checkpoint directory
    itself, a checkpoints/ directory or a run directory (then the one named
    by ``latest``, or the newest step_N when there is no ``latest``). Raises
    InputError when there is none."""
    if not os.path.exists(path):
        raise InputError(f"checkpoint path {path} does not exist")
    if _is_checkpoint(path):
        return path
    for root in (os.path.join(path, CHECKPOINTS), path):
        pointer = os.path.join(root, LATEST)
        if os.path.isfile(pointer):
            with open(pointer) as fh:
                name = fh.read().strip()
            candidate = os.path.join(root, name)
            if _is_checkpoint(candidate):
                return candidate
            raise InputError(f"{pointer} names {name}, which is not a complete checkpoint")
        # No pointer: a run killed between the rename of step_N and the write
        # of `latest`. A step_N directory only exists once complete.
        complete = [p for _, p in step_dirs(root) if _is_checkpoint(p)]
        if complete:
            return complete[-1]
    raise InputError(f"no checkpoint found in {path} (expected {CHECKPOINTS}/{LATEST} "
                     "or a step_N directory)")


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
    return int(torch.load(os.path.join(ckpt_dir, TRAINER_FILE), weights_only=True)["step"])


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
    state = torch.load(os.path.join(ckpt_dir, TRAINER_FILE), weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    rng_file = _rng_file(ckpt_dir, topology.rank)
    if state.get("world_size") == topology.world_size and os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
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
