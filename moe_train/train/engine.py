"""The one engine interface the training loop drives.

An engine owns what happens to a model's gradients and weights between two
forwards: the backward of one micro-batch, the reduction and global-norm
clipping of the gradients, the optimizer and schedule step, and checkpoints
of its state. The loop (:mod:`moe_train.train.trainer`) calls only::

    out = engine(inputs)          # forward of one micro-batch
    engine.backward(loss)         # loss of that micro-batch (mean over its tokens)
    norm = engine.clip()          # after the last micro-batch: reduce + clip
    grad_norm = engine.step()     # update (or engine.skip(): a non-finite step)
    engine.save(run_dir, step, keep_last) / engine.load(ckpt_dir)

Two implementations: :class:`moe_train.train.engine_native.NativeEngine`
(torch: replicated data parallelism or FSDP2) and
:class:`moe_train.train.engine_deepspeed.DeepSpeedEngine` (``train.deepspeed_config``).
Both keep moe_train's model, AdamW and warmup + cosine schedule; both write
checkpoints through the atomic-save protocol of :mod:`moe_train.train.checkpoint_atomic`.
"""
from __future__ import annotations

import abc
from typing import Any, Dict, Optional

import torch
from torch import nn

from moe_train.config import Config


class Engine(abc.ABC):
    """Backward, step, clip, state, save and load for one model.

    ``model`` is the (parallelized) moe_train module: evaluation and the
    aux-loss-free bias update use it directly. ``optimizer`` and
    ``scheduler`` step inside :meth:`step`; ``lr`` is the learning rate the
    next update uses.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def __call__(self, inputs: torch.Tensor, **kwargs):
        """Forward of one micro-batch (the model's output object); ``kwargs``
        go to the model (``document_ids``)."""
        return self.model(inputs, **kwargs)

    @property
    def lr(self) -> float:
        """Learning rate of the coming update."""
        return self.scheduler.get_last_lr()[0]

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss; the engine scales it so
        the accumulated gradient is that of the mean over the global batch."""

    @abc.abstractmethod
    def clip(self) -> Optional[torch.Tensor]:
        """Reduce the accumulated gradients and clip them by the global norm
        (``train.grad_clip``); the norm before clipping, or None where the
        engine clips inside :meth:`step` itself."""

    @abc.abstractmethod
    def step(self) -> torch.Tensor:
        """After the last micro-batch: :meth:`clip` (unless the loop called
        it this step), update, advance the schedule, clear the gradients.
        Returns the global gradient norm."""

    def skip(self) -> bool:
        """Drop this step's gradients without an update (a non-finite step,
        train/nonfinite.py): advance the schedule, clear the gradients.
        False where the engine cannot (the loop then calls :meth:`step`)."""
        return False

    @abc.abstractmethod
    def state(self) -> Dict[str, Any]:
        """What a checkpoint's ``trainer.pt`` records about this engine
        besides the step (its schedule, its layout or ZeRO stage)."""

    @abc.abstractmethod
    def save(self, run_dir: str, step: int, keep_last: int) -> str:
        """Atomically write checkpoint ``step`` under ``run_dir``; its path.
        A collective: every rank calls it."""

    @abc.abstractmethod
    def load(self, ckpt_dir: str) -> int:
        """Restore a checkpoint this kind of engine wrote; the step to
        continue from. A collective."""


def build_engine(model: nn.Module, cfg: Config, topology, accum: int) -> Engine:
    """The engine ``cfg`` asks for around ``model`` (built and parallelized):
    DeepSpeed with ``train.deepspeed_config``, else native. ``accum`` is the
    number of micro-batches per optimizer step on each rank."""
    if cfg.train.deepspeed_config:
        from moe_train.train.engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, topology)
    from moe_train.train.engine_native import NativeEngine

    return NativeEngine(model, cfg, topology, accum)


def check_engine_config(cfg: Config, world_size: int) -> None:
    """Engine-specific input checks, before any process group exists
    (ConfigError naming the field)."""
    if cfg.train.deepspeed_config:
        from moe_train.train.deepspeed_config import resolve_deepspeed_config

        resolve_deepspeed_config(cfg, world_size)
