"""The native engine: torch data parallelism around moe_train's model.

Replicated (``parallel.dp_shard_size`` 1, dp > 1): the training forward
goes through torch DDP (:mod:`moe_train.parallel.ddp`), which all-reduces
the dense gradients over the data-parallel group during the last
micro-batch's backward (``no_sync`` on the others); routed-expert gradients
under expert parallelism are summed over the expert-data-parallel group
after it. Sharded (``dp_shard_size`` > 1): FSDP2 (parallel/fsdp.py).
Gradients are then clipped by the global norm
(:func:`moe_train.parallel.clip_grad_norm`); AdamW and the warmup + cosine
schedule step. Checkpoints are the layout-independent ones of
:mod:`moe_train.train.checkpoint`, written from the plain model.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict

import torch
from torch import nn

from moe_train.config import Config
from moe_train.parallel import clip_grad_norm, sync_gradients
from moe_train.parallel.ddp import replicate
from moe_train.train import checkpoint as ckpt
from moe_train.train.engine import Engine
from moe_train.train.optim import build_optimizer, build_scheduler


class NativeEngine(Engine):
    """Replicated data parallelism through torch DDP (parallel/ddp.py), or
    FSDP2 full sharding (``parallel.dp_shard_size`` = dp) or HSDP (a divisor
    between; parallel/fsdp.py)."""

    _norm = None  # set by clip() until step() or skip() uses it

    def __init__(self, model: nn.Module, cfg: Config, topology, accum: int,
                 replicate_with: str = "ddp"):
        """``replicate_with``: how a replicated run reduces gradients, ``ddp``
        (torch DDP, overlapped with the backward; the trainer's) or
        ``allreduce`` (the hand-written :func:`moe_train.parallel.sync_gradients`
        after the backward; benchmarks/ddp_overlap.py and the tests compare
        the two)."""
        self.model, self.cfg, self.topology, self.accum = model, cfg, topology, accum
        self.sharded = cfg.parallel.dp_shard_size > 1
        if replicate_with not in ("ddp", "allreduce"):
            raise ValueError(f"replicate_with must be ddp or allreduce, got {replicate_with!r}")
        self.ddp = (replicate(model, topology)
                    if not self.sharded and topology.dp_size > 1 and replicate_with == "ddp"
                    else None)
        self._forwards = 0  # training forwards since the last step: the last one syncs
        self.optimizer = build_optimizer(model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)

    def __call__(self, inputs: torch.Tensor, **kwargs):
        if self.ddp is None or not torch.is_grad_enabled():
            return self.model(inputs, **kwargs)
        # DDP decides in the forward whether the coming backward reduces:
        # only the step's last micro-batch does, after the others accumulated.
        self._forwards += 1
        return self.ddp(inputs, sync=self._forwards >= self.accum, **kwargs)

    def _full(self, write_back: bool = False):
        # Checkpoints stay in the logical layout: FSDP shards are gathered
        # around the save and scattered back after a load (parallel/fsdp.py).
        if not self.sharded:
            return contextlib.nullcontext()
        from moe_train.parallel.fsdp import gathered

        return gathered(self.model, self.optimizer, write_back=write_back)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def clip(self) -> torch.Tensor:
        if self.sharded:  # FSDP reduce-scattered the gradients in the backward
            from moe_train.parallel.fsdp import fsdp_clip_grad_norm

            self._norm = fsdp_clip_grad_norm(self.model, self.cfg.train.grad_clip, self.topology)
            return self._norm
        if self.ddp is not None:  # DDP reduced the dense gradients in the backward
            self.ddp.sync_experts()
        else:
            sync_gradients(self.model, self.topology)
        self._norm = clip_grad_norm(self.model, self.cfg.train.grad_clip, self.topology)
        return self._norm

    def step(self) -> torch.Tensor:
        norm = self._norm if self._norm is not None else self.clip()
        self._norm = None
        self._forwards = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip(self) -> bool:
        self._norm = None
        self._forwards = 0
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def state(self) -> Dict[str, Any]:
        topo = self.topology
        return {"scheduler": self.scheduler.state_dict(),
                "layout": {"tensor_parallel_size": topo.tp_size,
                           "expert_parallel_size": topo.ep_size,
                           "data_parallel_size": topo.dp_size}}

    def save(self, run_dir: str, step: int, keep_last: int) -> str:
        with self._full():
            return ckpt.save_checkpoint(run_dir, step, self.model, self.optimizer,
                                        self.scheduler, self.cfg, keep_last,
                                        topology=self.topology)

    def load(self, ckpt_dir: str) -> int:
        with self._full(write_back=True):
            return ckpt.load_checkpoint(ckpt_dir, self.model, self.optimizer, self.scheduler,
                                        self.cfg, self.topology)
