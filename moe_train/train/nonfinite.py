"""Non-finite guards: a step whose loss or gradient norm is NaN or inf is
skipped (no optimizer update, no expert-bias update; the step still counts,
so the data and the learning-rate schedule move on as after any step), and
``train.max_skipped_steps`` consecutive skipped steps stop the run with exit
status 3 (:class:`DivergedError`). Weights that are not finite are never
checkpointed, so ``keep_last`` only ever rotates finite checkpoints and the
last one written is always finite; export refuses a non-finite model
(checkpoint.load_model).

The decision to skip is taken by every rank together: the local verdicts
go through the same one small all-reduce as the stop signal
(moe_train.parallel.collectives.any_rank), before the optimizer step.

Under ``train.deepspeed_config`` the engine updates inside its own step
(``Engine.skip`` returns False), so a non-finite loss is counted (and stops
the run after the limit) but the update is not undone, and where DeepSpeed
clips inside its step the gradient norm is not known before it; DeepSpeed's
fp16 loss scaler skips overflowing steps by itself.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from moe_train.parallel.collectives import any_rank

EXIT_STATUS = 3


class DivergedError(RuntimeError):
    """``train.max_skipped_steps`` consecutive non-finite steps. The message
    is one line naming the step and the loss; the command exits with 3."""


def finite_or_none(value: float) -> Optional[float]:
    """``value`` as a float, None when NaN or infinite (strict JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def local_nonfinite(loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> torch.Tensor:
    """1.0 when this rank's loss or the gradient norm (None: not known
    before the engine's step) is not finite, else 0.0 (a device tensor: no
    host sync)."""
    ok = torch.isfinite(loss.detach().float())
    if grad_norm is not None:
        ok = ok & torch.isfinite(grad_norm.detach().float().to(ok.device))
    return (~ok).float()


def weights_finite(model: torch.nn.Module, topology) -> bool:
    """True when every parameter on every rank is finite (a collective)."""
    device = next(model.parameters()).device
    bad = torch.zeros((), device=device)
    for p in model.parameters():
        local = p.detach()
        local = local.to_local() if hasattr(local, "to_local") else local  # an FSDP shard
        bad = torch.maximum(bad, (~torch.isfinite(local)).any().float())
    return any_rank(bad.reshape(1), topology).item() == 0


class SkipCounter:
    """Counts skipped steps; raises DivergedError at the limit."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.since_log = 0
        self.first: Optional[int] = None

    def record(self, step: int, skipped: bool) -> bool:
        """After step ``step`` (1-based); True when the limit is reached."""
        if not skipped:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.since_log += 1
        if self.consecutive == 1:
            self.first = step
        return self.consecutive >= self.max_consecutive

    def error(self, step: int, loss: float, grad_norm: float) -> DivergedError:
        """The one-line stop of a run whose limit was reached at ``step``."""
        return DivergedError(
            f"training diverged: step {step} had loss {loss} and gradient norm {grad_norm}; "
            f"steps {self.first}-{step} were skipped as non-finite, "
            f"train.max_skipped_steps={self.max_consecutive} in a row. The latest checkpoint "
            "holds finite weights: lower train.lr (or raise train.warmup_steps) and --resume")

    def take_window(self) -> int:
        """Skipped steps since the previous call (the ``train/skipped_steps`` metric)."""
        n, self.since_log = self.since_log, 0
        return n
