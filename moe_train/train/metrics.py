"""Training metrics: TensorBoard events under RUN_DIR/tb, the same scalars in
RUN_DIR/metrics.jsonl (one strict-JSON object per logged step; a NaN or
infinite value is written as null), and the console
progress. Only rank 0 builds an enabled logger; every other rank gets one that
does nothing, so the trainer calls it unconditionally.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from moe_train.console import fmt

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


# A starved expert got less than this share of its layer's mean load.
STARVED_BELOW = 0.1
PERCENTILES = (50, 95)


def can_drop(moe_cfg) -> bool:
    """Whether routing can leave (token, expert) assignments uncomputed: token
    choice with a capacity, or expert choice (a token no expert picks)."""
    return moe_cfg.enabled and (moe_cfg.router == "expert_choice"
                                or moe_cfg.capacity_factor is not None)


def _load_stats(load: torch.Tensor, prefix: str) -> Dict[str, float]:
    """Percentiles and max of ``load`` (loads over their layer's mean) and the
    count of starved experts, as ``{prefix}load_p50`` etc."""
    out = {f"{prefix}load_p{q}": torch.quantile(load, q / 100).item() for q in PERCENTILES}
    out[f"{prefix}load_max_over_mean"] = load.max().item()
    out[f"{prefix}starved_experts"] = float((load < STARVED_BELOW).sum().item())
    return out


def moe_layer_metrics(tokens_per_expert: Sequence[torch.Tensor],
                      dropped_fraction: Sequence[float], drops: bool = True) -> Dict[str, float]:
    """Load scalars of each MoE layer i (``moe/layer_{i}/...``) and of all
    layers pooled (``moe/all_layers/...``), with load = an expert's tokens
    over its layer's mean tokens per expert (1.0 is perfect balance):
    ``load_p50``, ``load_p95`` (percentiles over experts, linear
    interpolation), ``load_max_over_mean`` (E means one expert took all),
    ``starved_experts`` (experts below 10% of the mean) and, when ``drops``,
    ``dropped_fraction`` (all_layers: the mean over layers)."""
    out: Dict[str, float] = {}
    pooled = []
    for i, counts in enumerate(tokens_per_expert):
        counts = counts.detach().double().reshape(-1).cpu()
        mean = counts.mean()
        load = counts / mean if mean > 0 else torch.zeros_like(counts)
        pooled.append(load)
        out.update(_load_stats(load, f"moe/layer_{i}/"))
        if drops:
            out[f"moe/layer_{i}/dropped_fraction"] = float(dropped_fraction[i])
    if pooled:
        out.update(_load_stats(torch.cat(pooled), "moe/all_layers/"))
        if drops:
            out["moe/all_layers/dropped_fraction"] = float(np.mean(
                [float(d) for d in dropped_fraction[:len(pooled)]]))
    return out


def tensorboard_layout(drops: bool) -> Dict[str, Dict[str, list]]:
    """The Custom Scalars dashboard: categories of charts, each chart a list of
    tag regexes drawn together (``SummaryWriter.add_custom_scalars``)."""
    load = {
        "load max / mean, every layer": ["Multiline", [r"^moe/layer_\d+/load_max_over_mean$"]],
        "load p50, p95, max over mean, all layers": [
            "Multiline", [r"^moe/all_layers/load_(p50|p95|max_over_mean)$"]],
        "starved experts (< 10% of mean load)": [
            "Multiline", [r"^moe/(layer_\d+|all_layers)/starved_experts$"]],
    }
    if drops:
        load["dropped fraction, every layer"] = ["Multiline", [r"^moe/layer_\d+/dropped_fraction$"]]
    return {
        "loss": {"train and validation loss": [
                     "Multiline", [r"^loss/train$", r"^loss/val(/.*)?$"]],
                 "router losses": ["Multiline", [r"^train/(aux_loss|load_balancing|z_loss)$"]]},
        "expert load": load,
        "optimizer and throughput": {
            "learning rate": ["Multiline", [r"^train/lr$"]],
            "gradient norm (before clipping)": ["Multiline", [r"^train/grad_norm$"]],
            "skipped non-finite steps": ["Multiline", [r"^train/skipped_steps$"]],
            "tokens/s (all ranks)": ["Multiline", [r"^perf/tokens_per_sec$"]],
            "MFU and TFLOP/s per device": ["Multiline", [r"^perf/(mfu|tflops)$"]],
        },
    }


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
    a rewrite of metrics.jsonl), so each step appears once. ``layout``: the
    Custom Scalars dashboard (:func:`tensorboard_layout`).
    """

    def __init__(self, run_dir: str, enabled: bool = True, resume_step: Optional[int] = None,
                 layout: Optional[Dict[str, Dict[str, list]]] = None):
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
        if layout:
            self.writer.add_custom_scalars(layout)
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
            value = float(value)
            # Strict JSON has no NaN/Infinity: a non-finite value is null.
            record[tag] = value if math.isfinite(value) else None
        for tag, values in (histograms or {}).items():
            self.writer.add_histogram(tag, values.detach().cpu().double(), step)
            record[tag] = values.detach().cpu().tolist()
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")

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
    redrawn bar would only add noise. Numbers print at 4 significant digits."""

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

    @property
    def wants_every_step(self) -> bool:
        """True when a bar is drawn: it shows the loss of every step, so the
        caller should pass it even on steps it does not log."""
        return self.bar is not None

    def update(self, step: int, loss: Optional[float], tokens_per_sec: Optional[float],
               logged: bool) -> None:
        """Advance to ``step`` (completed updates) showing this step's ``loss``;
        print a line when ``logged`` and there is no bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            postfix = {}
            if loss is not None:
                postfix["loss"] = fmt(loss)
            if tokens_per_sec is not None:
                postfix["tok_s"] = fmt(tokens_per_sec)
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
        elif logged:
            done = step - self.initial
            elapsed = time.time() - self.start_time
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(f"step {step}/{self.total}  loss {fmt(loss)}  tokens/s {fmt(tokens_per_sec)}  "
                  f"eta {fmt(eta)}s", flush=True)

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
