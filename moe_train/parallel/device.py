"""The one place that picks a device and a backend.

Nothing else in moe_train calls ``.cuda()`` or names a backend, so the same
code runs with gloo on a CPU laptop and with NCCL on GPUs.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def default_backend() -> str:
    """nccl when CUDA is present, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def pick_device(local_rank: Optional[int] = None) -> torch.device:
    """This process's device: its local GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")
