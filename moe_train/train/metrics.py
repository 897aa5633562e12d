"""Training metrics: TensorBoard events under RUN_DIR/tb, the same scalars in
RUN_DIR/metrics.jsonl (one JSON object per logged step), and the console
progress. Only rank 0 builds an enabled logger; every other rank gets one that
does nothing, so the trainer calls it unconditionally.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def moe_layer_metrics(tokens_per_expert: Sequence[torch.Tensor],
                      dropped_fraction: Sequence[float]) -> Dict[str, float]:
    """Scalars of each MoE layer i: ``moe/layer_{i}/dropped_fraction`` and
    ``moe/layer_{i}/load_max_over_mean`` (the busiest expert's token count over
    the mean count: 1.0 is perfect balance, E means one expert took all)."""
    out: Dict[str, float] = {}
    for i, (counts, dropped) in enumerate(zip(tokens_per_expert, dropped_fraction)):
        counts = counts.double()
        mean = counts.mean().item()
        out[f"moe/layer_{i}/dropped_fraction"] = float(dropped)
        out[f"moe/layer_{i}/load_max_over_mean"] = counts.max().item() / mean if mean > 0 else 0.0
    return out


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Drop the lines logged after ``last_step`` (a resumed run logs them
    again); the rewrite goes through a temp file and os.replace."""
    if not os.path.exists(path):
        return
    kept: List[str] = []
    with open(path) as fh:
        for line in fh:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                # A line cut short by a crash mid-write: not a logged step.
                continue
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(kept)
    os.replace(tmp, path)


class MetricsLogger:
    """Writes scalars, histograms and images for one run.

    ``resume_step``: the step a resumed run continues from; entries logged
    after it by the interrupted run are removed (TensorBoard's purge_step and
    a rewrite of metrics.jsonl), so each step appears once.
    """

    def __init__(self, run_dir: str, enabled: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self.writer = None
        self._jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        jsonl_path = os.path.join(run_dir, METRICS_FILE)
        if resume_step is not None:
            _truncate_jsonl(jsonl_path, resume_step)
        self.writer = SummaryWriter(
            os.path.join(run_dir, TB_DIR),
            purge_step=None if resume_step is None else resume_step + 1)
        # Line-buffered: a crash loses at most the line being written.
        self._jsonl = open(jsonl_path, "a", buffering=1)

    def log(self, step: int, scalars: Dict[str, float],
            histograms: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Scalars go to TensorBoard and, as one JSON object with ``step``, to
        metrics.jsonl; histograms go to TensorBoard and, as lists, to the jsonl."""
        if not self.enabled:
            return
        record: Dict[str, object] = {"step": step}
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
            record[tag] = float(value)
        for tag, values in (histograms or {}).items():
            self.writer.add_histogram(tag, values.detach().cpu().double(), step)
            record[tag] = values.detach().cpu().tolist()
        self._jsonl.write(json.dumps(record) + "\n")

    def image(self, tag: str, rgb_HWC: np.ndarray, step: int) -> None:
        """An RGB uint8 image [H, W, 3] (TensorBoard only)."""
        if self.enabled:
            self.writer.add_image(tag, rgb_HWC, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close the files."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


class Progress:
    """Console progress on rank 0: a tqdm bar (step, loss, tokens/s, ETA) in a
    terminal; a plain line per logged step otherwise (CI logs, pipes), where a
    redrawn bar would only add noise."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.total = total
        self.start_time = time.time()
        self.initial = initial
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                            dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_sec: float, logged: bool) -> None:
        """Advance to ``step`` (completed updates); print a line when ``logged``
        and there is no bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:.0f}", refresh=False)
            self.bar.update(step - self.bar.n)
        elif logged:
            done = step - self.initial
            elapsed = time.time() - self.start_time
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total}  loss {loss:.4f}  tokens/s {tokens_per_sec:.0f}  "
                  f"eta {eta:.0f}s", flush=True)

    def write(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
