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

A save is a collective and atomic: :mod:`moe_train.train.checkpoint_atomic`
writes into ``checkpoints/.tmp-step_N`` and renames it to ``step_N`` once every
rank's files are on disk, then replaces ``latest``. A process killed at any
moment leaves either the old ``latest`` pointing at a complete checkpoint, or
the new one.

Before the rename the ranks hash every file into ``manifest.json``
(:mod:`moe_train.train.checkpoint_manifest`); :func:`find_checkpoint`
verifies it and falls back from a bad latest checkpoint to the newest good
one. A full disk is checked before a save and cleaned up after a failed one
(:mod:`moe_train.train.checkpoint_space`): SaveError, the previous checkpoint
intact.

Model and optimizer state go through :func:`write_model_optimizer` and
:func:`read_model_optimizer` only (:mod:`moe_train.train.checkpoint_state`).
DeepSpeed-engine checkpoints (:mod:`moe_train.train.engine_deepspeed`) carry
the same ``model/`` beside the engine's files, so ``load_model`` and export
read them too.

This module finds, verifies and loads checkpoints; it re-exports the save
(checkpoint_atomic.py) and the state I/O (checkpoint_state.py) so that
``moe_train.train.checkpoint`` stays the one import for callers.
"""
from __future__ import annotations

import os
import sys
from typing import Any, List, Optional, Tuple

import torch
import yaml

from moe_train.config import Config, ConfigError, config_from_dict, moe_for_model
from moe_train.parallel import dist_checkpoint
from moe_train.parallel.topology import Topology
from moe_train.train import InputError
from moe_train.train import checkpoint_manifest as manifests
# The save and the state I/O live in checkpoint_atomic / checkpoint_state;
# re-exported here for callers of this module.
from moe_train.train.checkpoint_atomic import (CHECKPOINTS, CONFIG_FILE, LATEST, RNG_DIR,  # noqa: F401
                                               SAVE_DELAY_ENV, TMP_PREFIX, TRAINER_FILE,
                                               _STEP_RE, _rng_file, begin_save, finish_save,
                                               save_checkpoint, step_dirs)
from moe_train.train.checkpoint_state import (MODEL_DIR, OPTIMIZER_DIR, _single,  # noqa: F401
                                              read_model_optimizer, reseed, rng_state,
                                              set_rng_state, write_errors, write_model_optimizer)

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
