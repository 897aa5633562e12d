"""What a checkpoint holds besides its files' layout: the model and optimizer
state (a DCP checkpoint in the logical, EP/TP-independent layout of
:mod:`moe_train.parallel.dist_checkpoint`) and the RNG states of torch, numpy
and Python. Re-exported by :mod:`moe_train.train.checkpoint`.

Model and optimizer state go through :func:`write_model_optimizer` and
:func:`read_model_optimizer` only.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Optional

import numpy as np
import torch

from moe_train.parallel import dist_checkpoint
from moe_train.parallel.topology import Topology
from moe_train.train import InputError

MODEL_DIR = dist_checkpoint.MODEL_DIR
OPTIMIZER_DIR = dist_checkpoint.OPTIMIZER_DIR


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


def write_errors():
    """The exceptions a failed checkpoint write raises (OSError and torch's
    and DCP's wrappers of it), for ``except`` clauses around the writes."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (OSError, RuntimeError, CheckpointException)


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

