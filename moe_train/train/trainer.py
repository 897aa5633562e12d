"""The training loop: ``train(cfg)``, the one entry every launcher calls.

torchrun, the deepspeed launcher and Ray only set up the distributed
environment (RANK, WORLD_SIZE, ...); ``train`` joins it through
:func:`moe_train.parallel.topology.init_topology` and never asks who launched it.

Batch semantics (Megatron's): optimizer step s trains on the global batch
``sample_batch(train, s, global_batch_size, seq_len, seed)``; data-parallel
rank r takes rows ``[r*b, (r+1)*b)`` with ``b = global_batch_size / dp`` and
splits them into ``accum = b / micro_batch_size`` micro-batches whose losses
are divided by ``accum`` before backward, so the gradient is that of the mean
loss over the global batch whatever dp and micro_batch_size are.

Parallelism (docs/parallelism.md): every rank builds the model on the meta
device, ``parallelize`` shards it (TP, then EP) and only this rank's shards
are materialized, each parameter initialized from (``train.seed``, its
unsharded name) (:mod:`moe_train.parallel.build`); the engine reduces
dense gradients over the data-parallel group (torch DDP, during the last
micro-batch's backward) and expert gradients over the expert-data-parallel
group, and ``clip_grad_norm`` clips by the global norm. Expert-parallel groups sit inside
the data-parallel group, so EP ranks train on different rows; TP ranks share
their dp_rank and so their rows. Checkpoints are sharded and EP/TP-independent
(:mod:`moe_train.train.checkpoint`). The loop drives one engine interface
(:mod:`moe_train.train.engine`: backward, step, clip, save, load): the native
engine, or with ``train.deepspeed_config`` the DeepSpeed engine; the model
and its math stay the same.

Logging: only rank 0 writes (stdout, TensorBoard, metrics.jsonl). Losses,
auxiliary losses and per-layer dropped fractions are averaged over the
data-parallel ranks; per-expert token counts are summed over them (the counts
of the whole global batch); the gradient norm is global already. Every rank
evaluates the same validation batches (under EP the ranks of a group must run
each forward together) and the validation loss is averaged over them.

Input checks (run directory, checkpoint, dataset) come before the model is
built and raise :class:`moe_train.train.InputError` or ConfigError.
"""
from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from moe_train.config import Config, ConfigError, save_config
from moe_train.config_validate import config_warnings
from moe_train.console import fmt
from moe_train.model.recompute import apply_recompute
from moe_train.parallel.build import build_parallel_model
from moe_train.parallel.collectives import broadcast_object, process_group_exists, reduce_sum
from moe_train.parallel.topology import Topology, destroy_topology, env_world_size, init_topology
from moe_train.train import InputError
from moe_train.train import checkpoint as ckpt
from moe_train.train import nonfinite
from moe_train.train import run_dir as run_dirs
from moe_train.train.engine import build_engine, check_engine_config
from moe_train.train.flops import PerfMeter
from moe_train.train.heatmap import load_heatmap
from moe_train.train.metrics import TB_DIR, MetricsLogger, Progress, can_drop, tensorboard_layout
from moe_train.train.stop_signals import StopSignals, stopped_line
# One step, evaluation and a logged step's metrics live in trainer_step.py.
from moe_train.train.trainer_step import StepMixin

RUN_CONFIG = "config.yaml"


# ----------------------------------------------------------------------------
# Parallelism enters the loop through moe_train.parallel only: build_parallel_model(),
# the engine (train/engine.py), the collectives of
# moe_train.parallel.collectives and the checkpoint I/O behind
# train/checkpoint.py (docs/parallelism.md). This file never imports
# torch.distributed.


def _on_main(topology: Topology, fn: Callable[[], Any]) -> None:
    """Run an input check on rank 0 only; its InputError/ConfigError is raised
    on every rank, so that no rank waits forever for a rank that gave up."""
    message = None
    if topology.is_main:
        try:
            fn()
        except (InputError, ConfigError) as exc:
            message = str(exc)
    message = broadcast_object(message, topology)
    if message:
        raise InputError(message)


# ----------------------------------------------------------------------------
# Run directory


def _default_run_dir(topology: Topology) -> str:
    """runs/<YYYYmmdd-HHMMSS>-<pid>, chosen by rank 0 so every rank agrees."""
    return broadcast_object(run_dirs.default_run_dir() if topology.is_main else None, topology)


# ----------------------------------------------------------------------------
# The loop


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer(StepMixin):
    """One training run. Build it with :func:`train`; ``fit()`` runs it."""

    def __init__(self, cfg: Config, topology: Topology, resume: Optional[str] = None,
                 overwrite: bool = False):
        # Our own copy: the resolved run_dir is written into it.
        self.cfg = cfg = copy.deepcopy(cfg)
        self.topology = topology
        self.device = topology.device
        t = cfg.train
        self.accum = t.global_batch_size // (t.micro_batch_size * topology.dp_size)
        self.rows_per_rank = t.global_batch_size // topology.dp_size

        # --- input checks, cheapest first; nothing is written or deleted
        # until every one has passed (docs/reliability.md) -----------------
        self.lock = None
        self.signals = StopSignals(verbose=topology.is_main)
        self.ckpt_dir = ckpt.find_checkpoint(resume) if resume else None
        # The data decides model.vocab_size when it is null, so it is read
        # before the checkpoint's shapes are compared.
        self.data = self._load_data()
        self.train_ds = self.data.train
        if self.ckpt_dir is not None:
            saved = ckpt.read_config(self.ckpt_dir)
            ckpt.check_compatible(saved, cfg, self.ckpt_dir)
        # train.init_from: weights only (an import or another run), step 0.
        self.init_dir = None
        if t.init_from and self.ckpt_dir is None:
            self.init_dir = ckpt.find_checkpoint(t.init_from)
            ckpt.check_compatible(ckpt.read_config(self.init_dir), cfg, self.init_dir)
        t.run_dir = self.run_dir = t.run_dir or _default_run_dir(topology)
        fresh = self.ckpt_dir is None
        _on_main(topology, lambda: run_dirs.check(self.run_dir, fresh, overwrite))
        self.log = topology.is_main

        # --- model, optimizer, schedule --------------------------------------
        _seed_everything(t.seed)
        # Built on the meta device; only this rank's shards are materialized,
        # each initialized from (train.seed, its unsharded name).
        try:
            self.model = build_parallel_model(cfg.model, cfg.moe, topology, t.seed, self.device,
                                              cfg.parallel.dp_shard_size)
            apply_recompute(self.model, t.recompute)
        except ValueError as exc:  # a layout the model cannot be split into; names the fields
            raise ConfigError(str(exc))
        except (RuntimeError, MemoryError) as exc:  # sizes that pass validate() but not malloc
            raise ConfigError("the model sizes in model.* / moe.* cannot be built: "
                              + (str(exc).strip().splitlines() or [type(exc).__name__])[0])
        if self.init_dir is not None:
            ckpt.read_model_optimizer(self.init_dir, self.model, None, topology)
            if self.log:
                print(f"initialised from {self.init_dir}", flush=True)
        # The one engine interface (train/engine.py): native, or DeepSpeed with
        # train.deepspeed_config; same model and math.
        self.engine = build_engine(self.model, cfg, topology, self.accum)
        self.start_step = 0
        if self.ckpt_dir is not None:
            self.start_step = self.engine.load(self.ckpt_dir)
            if self.log:
                print(f"resumed from {self.ckpt_dir} at step {self.start_step}", flush=True)
        self.val_data = ({name: _val_data(ds, t) for name, ds in self.data.val.items()}
                         if t.eval_every > 0 else {})

        # --- every input is good: make the run directory this run's ----------
        removed: List[str] = []

        def claim():
            self.lock, names = run_dirs.claim(self.run_dir, fresh, overwrite)
            removed.extend(names)

        _on_main(topology, claim)
        if self.log:
            print(f"run dir: {self.run_dir}", flush=True)
            for warning in config_warnings(cfg):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
            if removed:
                print(f"note: --overwrite removed the earlier run's {', '.join(removed)} "
                      f"from {self.run_dir}", flush=True)
            print(f"tensorboard --logdir {os.path.join(self.run_dir, TB_DIR)} --host 127.0.0.1",
                  flush=True)
            save_config(cfg, os.path.join(self.run_dir, RUN_CONFIG))

    def _save(self, step: int) -> Optional[str]:
        """Checkpoint ``step`` and return its path; None, writing nothing,
        when a weight is not finite (the latest checkpoint stays the latest,
        and keep_last removes nothing)."""
        t, topo = self.cfg.train, self.topology
        if not nonfinite.weights_finite(self.model, topo):
            if self.log:
                print(f"warning: step {step}: weights are not finite; no checkpoint written "
                      "(the latest one is kept)", flush=True)
            return None
        return self.engine.save(self.run_dir, step, t.keep_last)

    def release(self) -> None:
        """Give up the run directory's lock (the end of the run)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _load_data(self):
        from moe_train.data.blend import load_data
        from moe_train.data.vocab import resolve_vocab_size

        cfg = self.cfg
        try:
            data = load_data(cfg.data, cfg.train.seq_len, cfg.train.eval_every > 0)
        except ConfigError:
            raise
        except (ValueError, OSError) as exc:
            raise InputError(f"data.dataset ({cfg.data.dataset}): {exc}")
        cfg.model.vocab_size = resolve_vocab_size(
            cfg.model.vocab_size, data.vocab_size, "data.blend" if cfg.data.blend else
            "data.dataset")
        if cfg.data.document_mask and data.eod_id is None:
            raise ConfigError("data.document_mask needs end-of-document ids, and data.dataset "
                              "records none (a bare Megatron prefix); prepare the data with "
                              "moe-train prepare-data or set data.document_mask=false")
        return data

    # -- the run --------------------------------------------------------------

    def fit(self) -> Dict[str, Any]:
        """Train from ``start_step`` to ``train.max_steps``; return a summary."""
        t, topo = self.cfg.train, self.topology
        resumed = self.ckpt_dir is not None
        logger = MetricsLogger(self.run_dir, enabled=self.log,
                               resume_step=self.start_step if resumed else None,
                               layout=tensorboard_layout(can_drop(self.cfg.moe)))
        perf = PerfMeter.for_run(self.cfg, topo)
        progress = Progress(t.max_steps, self.start_step, enabled=self.log)
        tokens_per_step = t.global_batch_size * t.seq_len
        summary: Dict[str, Any] = {"run_dir": self.run_dir, "start_step": self.start_step,
                                   "steps": self.start_step, "first_loss": None,
                                   "train_loss": None, "val_loss": None,
                                   "tokens_per_sec": None, "checkpoint": self.ckpt_dir}
        run_start = time.time()
        window_time, window_steps = 0.0, 0
        skips = nonfinite.SkipCounter(t.max_skipped_steps)
        stopped_by = 0
        self.signals.install()
        try:
            for step in range(self.start_step, t.max_steps):
                step_start = time.time()
                result = self._train_step(step)
                # Throughput counts the training steps only, not evaluation,
                # checkpoints or image writing between them.
                window_time += time.time() - step_start
                done = step + 1
                window_steps += 1
                is_log = done % t.log_every == 0 or done == t.max_steps
                is_heatmap = t.heatmap_every > 0 and done % t.heatmap_every == 0
                is_eval = t.eval_every > 0 and (done % t.eval_every == 0 or done == t.max_steps)
                is_save = (t.save_every > 0 and done % t.save_every == 0) or done == t.max_steps
                # A signal agreed on in the last step changes nothing: the run is done.
                stopped_by = result["stop"] if done < t.max_steps else 0
                is_save = is_save or bool(stopped_by)
                diverged = skips.record(done, result["skipped"])

                scalars: Dict[str, float] = {}
                histograms: Dict[str, torch.Tensor] = {}
                if is_log or is_heatmap:
                    # Tokens per expert of the whole global batch: summed over
                    # the data-parallel ranks (each routed its own tokens).
                    counts = [reduce_sum(c.double(), topo) for c in result["counts"]]
                if is_log:
                    tps = tokens_per_step * window_steps / max(window_time, 1e-9)
                    window_time, window_steps = 0.0, 0
                    scalars, histograms = self._step_metrics(result, counts, perf.scalars(tps))
                    scalars["train/skipped_steps"] = skips.take_window()
                    summary["train_loss"] = scalars["loss/train"]
                    if summary["first_loss"] is None:
                        summary["first_loss"] = scalars["loss/train"]
                    summary["tokens_per_sec"] = tps
                if is_heatmap and counts:
                    logger.image("moe/load_heatmap",
                                 load_heatmap([c.cpu().numpy() for c in counts], done), done)
                if is_eval:
                    losses = self.evaluate()
                    # With a blend: one curve per part, and their mix by weight.
                    val = sum(self.data.weights[n] * v for n, v in losses.items())
                    scalars["loss/val"] = val
                    scalars.update({f"loss/val/{n}": v for n, v in losses.items() if n})
                    summary["val_loss"] = val
                    progress.write(f"step {done}: val loss {fmt(val)}")
                if scalars:
                    logger.log(done, scalars, histograms)
                # The bar shows every step's loss: rank 0's own on steps that
                # are not logged (no collective just for the console).
                loss = scalars.get("loss/train")
                if loss is None and progress.wants_every_step:
                    loss = (result["lm"] + result["aux"]).item()
                progress.update(done, loss, summary["tokens_per_sec"], is_log)
                if diverged:
                    raise skips.error(done, (result["lm"] + result["aux"]).item(),
                                      result["grad_norm"].item())
                if is_save:
                    written = self._save(done)
                    summary["checkpoint"] = written or summary["checkpoint"]
                summary["steps"] = done
                if stopped_by:
                    break
                self.signals.test_pause(done)
        finally:
            self.signals.restore()
            progress.close()
            logger.close()
        summary["stopped_by"] = stopped_by
        if stopped_by:
            summary["elapsed_s"] = time.time() - run_start
            if self.log:
                print(stopped_line(stopped_by, summary["steps"], written), flush=True)
            return summary
        ran = summary["steps"] - self.start_step
        summary["elapsed_s"] = time.time() - run_start
        if self.log:
            if ran == 0:
                print(f"nothing to do: already at step {self.start_step} of "
                      f"train.max_steps={t.max_steps}", flush=True)
            else:
                val = summary["val_loss"]
                print(f"done: step {summary['steps']}, train loss {fmt(summary['train_loss'])}"
                      + (f", val loss {fmt(val)}" if val is not None else "")
                      + f", checkpoint {summary['checkpoint']}", flush=True)
        return summary


def _val_data(val_ds, t) -> List[torch.Tensor]:
    """The fixed validation batches (micro_batch_size rows each, the same on
    every rank and at every evaluation)."""
    from moe_train.data import val_batches

    return val_batches(val_ds, t.eval_iters, t.micro_batch_size, t.seq_len, t.seed)


def _refuse_unbuilt(cfg: Config) -> None:
    # Layouts the config alone allows but the loop cannot build: refused in
    # one line before any process group exists.
    p, world = cfg.parallel, env_world_size()
    dp = world // p.tensor_parallel_size
    expert_dp = dp // max(1, p.expert_parallel_size)
    if 1 < p.dp_shard_size < dp and expert_dp > 1 and math.gcd(p.dp_shard_size, expert_dp) == 1:
        # HSDP shards experts over gcd(dp_shard_size, dp / ep) ranks (parallel/fsdp.py).
        raise ConfigError(f"parallel.dp_shard_size ({p.dp_shard_size}) shares no factor with "
                          f"the expert-data-parallel size {expert_dp} (data-parallel {dp} / "
                          f"expert_parallel_size {p.expert_parallel_size}); use a multiple "
                          "or divisor of it")


def train(cfg: Config, resume: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Train a model for ``cfg`` and return a summary dict (run_dir, steps,
    first_loss, train_loss, val_loss, tokens_per_sec, checkpoint, elapsed_s).

    ``resume``: a run directory (its latest checkpoint) or a checkpoint
    directory to continue from; the continuation reproduces an uninterrupted
    run exactly on CPU in fp32. Launcher-agnostic: joins whatever distributed
    environment the launcher created. Raises ConfigError / InputError (one
    line, naming the field or path) for bad input, before anything is written.

    ``overwrite``: a fresh run may replace the run recorded in
    ``train.run_dir`` (only the files its manifest lists); without it such a
    directory is refused (:mod:`moe_train.train.run_dir`).
    """
    cfg.validate(env_world_size())
    _refuse_unbuilt(cfg)
    check_engine_config(cfg, env_world_size())
    owns_group = not process_group_exists()
    topology = init_topology(cfg.parallel)
    try:
        trainer = Trainer(cfg, topology, resume, overwrite)
        try:
            return trainer.fit()
        finally:
            trainer.release()
    finally:
        if owns_group:
            destroy_topology(topology)
