"""Checkpoints: written atomically, resumed exactly, loaded for inference.

Layout of a run directory::

    RUN_DIR/checkpoints/step_N/   model.pt, optimizer.pt, trainer.pt, config.yaml
    RUN_DIR/checkpoints/latest    one line: the name of the newest complete step_N

A save writes everything into ``checkpoints/.tmp-step_N``, fsyncs each file
and the directory, renames it to ``step_N`` (a rename is atomic on POSIX), and
only then replaces ``latest`` (temp file + os.replace). A process killed at
any moment leaves either the old ``latest`` pointing at a complete checkpoint,
or the new one; a stale ``.tmp-*`` directory is removed by the next save.

``trainer.pt`` holds the step (the data position too: batch s is a function
of (seed, s)), the scheduler and the RNG states of torch, numpy and Python.
Model and optimizer state go through :func:`write_model_optimizer` and
:func:`read_model_optimizer` only, so that a sharded format
(torch.distributed.checkpoint) can replace those two functions alone.
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
from moe_train.train import InputError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.yaml"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step_(\d+)$")

# Test hook: "STEP:SECONDS" makes the save of step STEP sleep inside the
# temporary directory (after model.pt is written), so a test can kill the
# process in the middle of a save. Unset in normal use.
SAVE_DELAY_ENV = "MOE_TRAIN_TEST_SAVE_DELAY"

# Fields that change parameter shapes (or which parameters exist): a
# checkpoint can only be loaded into a model that agrees on all of them.
# Sizes left null in the config are compared after resolution.
SHAPE_FIELDS = {
    "model.vocab_size": lambda c: c.model.vocab_size,
    "model.hidden_size": lambda c: c.model.hidden_size,
    "model.num_layers": lambda c: c.model.num_layers,
    "model.num_heads": lambda c: c.model.num_heads,
    "model.num_kv_heads": lambda c: c.model.kv_heads,
    "model.ffn_hidden_size": lambda c: c.model.ffn_size,
    "model.norm": lambda c: c.model.norm,
    "model.activation": lambda c: c.model.activation,
    "model.tie_embeddings": lambda c: c.model.tie_embeddings,
    "moe.num_experts": lambda c: c.moe.num_experts,
    "moe.layer_freq": lambda c: c.moe.layer_freq,
    "moe.num_shared_experts": lambda c: c.moe.num_shared_experts,
    "moe.noisy_gating": lambda c: c.moe.noisy_gating,
    "moe.hidden_size": lambda c: moe_for_model(c.moe, c.model).hidden_size,
    "moe.ffn_hidden_size": lambda c: moe_for_model(c.moe, c.model).ffn_hidden_size,
    "moe.activation": lambda c: moe_for_model(c.moe, c.model).activation,
}


# ----------------------------------------------------------------------------
# Model and optimizer state: the two functions a sharded format replaces.


def write_model_optimizer(ckpt_dir: str, model: torch.nn.Module,
                          optimizer: Optional[torch.optim.Optimizer]) -> List[str]:
    """Write model (and optimizer) state into ``ckpt_dir``; return the files."""
    files = [os.path.join(ckpt_dir, MODEL_FILE)]
    torch.save(model.state_dict(), files[0])
    if optimizer is not None:
        files.append(os.path.join(ckpt_dir, OPTIMIZER_FILE))
        torch.save(optimizer.state_dict(), files[1])
    return files


def read_model_optimizer(ckpt_dir: str, model: torch.nn.Module,
                         optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Load the state written by :func:`write_model_optimizer` in place."""
    device = next(model.parameters()).device
    state = torch.load(os.path.join(ckpt_dir, MODEL_FILE), map_location=device, weights_only=True)
    model.load_state_dict(state)
    if optimizer is not None:
        # Loading through the optimizer casts and moves its state to match the params.
        optimizer.load_state_dict(torch.load(os.path.join(ckpt_dir, OPTIMIZER_FILE),
                                             map_location=device, weights_only=True))


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


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, cfg: Config,
                    keep_last: int, is_main: bool = True) -> str:
    """Atomically write checkpoint ``step`` of this run and return its path.

    ``is_main``: only the main rank writes (every rank holds the same
    replicated state in the single-copy format used here).
    """
    root = os.path.join(run_dir, CHECKPOINTS)
    name = f"step_{step}"
    final = os.path.join(root, name)
    if not is_main:
        return final
    os.makedirs(root, exist_ok=True)
    for entry in os.listdir(root):
        if entry.startswith(TMP_PREFIX):  # left by a save that was killed
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)

    tmp = os.path.join(root, TMP_PREFIX + name)
    os.makedirs(tmp)
    files = write_model_optimizer(tmp, model, optimizer)
    _test_delay(step)
    trainer_path = os.path.join(tmp, TRAINER_FILE)
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state()},
               trainer_path)
    config_path = os.path.join(tmp, CONFIG_FILE)
    save_config(cfg, config_path)
    for path in files + [trainer_path, config_path]:
        _fsync_file(path)
    _fsync_dir(tmp)

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
    return final


# ----------------------------------------------------------------------------
# Finding, checking and loading


def _is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_FILE)) and \
        os.path.isfile(os.path.join(path, CONFIG_FILE))


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
                    scheduler: Any, cfg: Config) -> int:
    """Restore model, optimizer, scheduler and RNG states from ``ckpt_dir``
    into the objects built for ``cfg``; return the step to continue from."""
    check_compatible(read_config(ckpt_dir), cfg, ckpt_dir)
    read_model_optimizer(ckpt_dir, model, optimizer)
    state = torch.load(os.path.join(ckpt_dir, TRAINER_FILE), weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def load_model(path: str) -> Tuple[torch.nn.Module, Config]:
    """``(model, config)`` from a run directory (its latest checkpoint) or a
    checkpoint directory. The model is on the CPU, in fp32 and in eval mode;
    ``model(input_ids [B,S]).logits`` has shape [B,S,V]."""
    from moe_train.model.transformer import build_model

    ckpt = find_checkpoint(path)
    try:
        cfg = read_config(ckpt)
    except ConfigError as exc:
        raise InputError(f"{ckpt}: {exc}")
    model = build_model(cfg.model, cfg.moe)
    read_model_optimizer(ckpt, model)
    model.eval()
    return model, cfg
