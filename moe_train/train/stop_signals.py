"""Preemption-safe stops: SIGTERM, SIGINT and SIGUSR1 end a run at a step
boundary with a checkpoint instead of throwing away everything since the
last save.

- The handler only records the signal (any rank may receive it: torchrun and
  the deepspeed launcher forward SIGTERM/SIGINT to every worker, SLURM and
  Kubernetes signal every process, a user may signal one rank).
- Once per step the trainer asks :meth:`StopSignals.pending`; the ranks agree
  on it with one small all-reduce (``moe_train.parallel.collectives.any_rank``,
  shared with the non-finite check), so every rank stops after the same step.
- The trainer then saves a checkpoint, rank 0 prints one line
  ``stopped by SIGTERM at step N; checkpoint saved (...); continue with
  --resume``, the TensorBoard and metrics writers are closed, and the command
  exits with status ``128 + signal number`` (130 SIGINT, 143 SIGTERM, 138
  SIGUSR1): what a shell reports for a process stopped by that signal, so
  scripts and schedulers see "interrupted", not "finished".
- A second signal while stopping (e.g. during that save) exits at once with
  the same status. The save is atomic (checkpoint_atomic.py), so the previous
  checkpoint stays the latest and nothing is corrupted.

Handlers can only be installed from the main thread. Under torchrun and the
deepspeed launcher ``train`` runs there; Ray Train runs the training function
in a worker thread, where :meth:`install` does nothing and Ray's own handling
applies (on preemption Ray restarts the worker group, which resumes from the
latest checkpoint: docs/launching.md).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Dict, Optional

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

# Test hook: "STEP:SECONDS" makes the run wait up to SECONDS after step STEP
# (or until a signal arrives), so a test can signal it at a known step.
STEP_PAUSE_ENV = "MOE_TRAIN_TEST_STEP_PAUSE"


def exit_status(signum: int) -> int:
    """The documented exit status of a run stopped by signal ``signum``."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(int(signum)).name


class StopSignals:
    """Records SIGTERM / SIGINT / SIGUSR1 while installed (a context manager).
    ``verbose``: print a line when a signal arrives (rank 0)."""

    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.received = 0  # signal number of the first signal, 0 for none
        self._previous: Dict[int, object] = {}

    def _say(self, text: str) -> None:
        if self.verbose:
            # os.write, not print: a handler may interrupt a print in progress.
            os.write(2, (text + "\n").encode())

    def _handle(self, signum, frame) -> None:
        name = signal_name(signum)
        if not self.received:
            self.received = signum
            self._say(f"{name} received: stopping after this step with a checkpoint "
                      f"(send {name} again to stop at once without it)")
            return
        self._say(f"{name} received again: stopping now; the last complete checkpoint "
                  "stays the latest")
        os._exit(exit_status(signum))

    def install(self) -> bool:
        """Install the handlers; False (nothing installed) off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for name in SIGNALS:
            num = getattr(signal, name, None)
            if num is not None:
                self._previous[num] = signal.signal(num, self._handle)
        return True

    def restore(self) -> None:
        """Put the previous handlers back."""
        for num, handler in self._previous.items():
            signal.signal(num, handler)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def pending(self) -> int:
        """The signal number received on this rank (0 for none)."""
        return self.received

    def test_pause(self, step: int) -> None:
        """The :data:`STEP_PAUSE_ENV` test hook (no-op in normal use)."""
        spec = os.environ.get(STEP_PAUSE_ENV)
        if not spec:
            return
        at, seconds = spec.split(":")
        if int(at) != step:
            return
        deadline = time.time() + float(seconds)
        while not self.received and time.time() < deadline:
            time.sleep(0.02)


def stopped_line(signum: int, step: int, checkpoint: Optional[str]) -> str:
    """The final line of a run stopped by a signal."""
    saved = (f"checkpoint saved ({checkpoint})" if checkpoint
             else "no checkpoint written (weights not finite)")
    return (f"stopped by {signal_name(signum)} at step {step}; {saved}; "
            "continue with --resume")
