"""What generate and eval share: loading a checkpoint onto one device in
the run's precision, and one-line argument errors."""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from moe_train.config import Config, ConfigError
from moe_train.train import InputError

PRECISIONS = ("fp32", "bf16")


class UsageError(InputError):
    """A bad command-line argument; printed as one ``error:`` line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse prints a usage block and exits; the CLI contract is one line
    ``error: ...`` and exit status 2, which the command's main prints."""

    def error(self, message: str):
        raise UsageError(message)


def eod_id_or_none(tokenizer) -> Optional[int]:
    """The tokenizer's end-of-document id, or None when it has none."""
    try:
        return int(tokenizer.eod_id)
    except (ConfigError, ValueError):
        return None


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--device`` and ``--precision``."""
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT",
                   help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cpu or cuda:0 (default: the GPU when there is one)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32, or bf16 autocast (default: the run's train.precision)")


@dataclass
class Loaded:
    """A model ready for inference and what goes with it."""

    model: torch.nn.Module
    cfg: Config
    ckpt_dir: str
    device: torch.device
    precision: str

    def autocast(self):
        """The run's autocast context: bf16 as in training, or nothing."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def pick_inference_device(name: Optional[str]) -> torch.device:
    """``name``, else the current GPU when there is one, else the CPU."""
    if name is None:
        from moe_train.parallel.device import pick_device

        return pick_device()
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r} is not a torch device ({exc})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def load(path: str, device: Optional[str] = None, precision: Optional[str] = None) -> Loaded:
    """Load the checkpoint at ``path`` (a run or checkpoint directory) in eval
    mode onto ``device``; InputError (one line) for a bad path."""
    from moe_train.train.checkpoint import find_checkpoint, load_model

    dev = pick_inference_device(device)
    ckpt_dir = find_checkpoint(path)  # InputError naming the path
    try:
        model, cfg = load_model(ckpt_dir)
    except ConfigError as exc:
        raise InputError(f"{ckpt_dir}: {exc}")
    model = model.to(dev).eval()
    return Loaded(model, cfg, ckpt_dir, dev, precision or cfg.train.precision)
