"""Model FLOPs, achieved TFLOP/s, MFU and memory for the training metrics.

Model FLOPs (PaLM, Chowdhery et al. 2022, App. B): the matmul FLOPs the model
needs per token, whatever the implementation does (no recompute, no padding):

- every dense matmul: 2 * in * out per token (attention projections, dense
  MLPs, shared experts, routers, the LM head; the embedding is a lookup);
- routed experts: 2 * (one expert's matmul weights) * experts per token
  (token choice: ``moe.top_k``; expert choice: its capacity factor c, since
  the E experts take T*c/E tokens each);
- attention scores and values: 4 * S * H * d per token and layer, the full
  S x S square as PaLM and Megatron count it (causal masking is not halved).

A training step costs 3x the forward (the backward is 2x: gradients for the
inputs and for the weights). MFU = achieved model FLOP/s per device / the
device's peak. The peak comes from ``train.peak_tflops`` or, on CUDA, from a
table of known GPUs; when neither gives one (any CPU without the field), MFU
is not logged.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

# Dense (no sparsity) peak TFLOP/s of one device from the vendors' data
# sheets: (name fragment, bf16 tensor core, fp32 without TF32). The first
# fragment found in torch.cuda.get_device_name wins, so longer names go first.
# fp32 is the non-tensor-core rate because torch's default fp32 matmul
# precision ("highest") does not use TF32.
PEAK_TFLOPS = (
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),
    ("H800", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
)

GIB = 2.0 ** 30


def experts_per_token(moe_cfg) -> float:
    """How many routed experts compute each token on average."""
    if moe_cfg.router == "expert_choice":
        return 2.0 if moe_cfg.capacity_factor is None else float(moe_cfg.capacity_factor)
    return float(moe_cfg.top_k)


def forward_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward model FLOPs per token of an unsharded ``model`` (a meta-device
    copy is enough: only shapes are read) at sequence length ``seq_len``."""
    from moe_train.model.attention import Attention
    from moe_train.moe.layer import MoELayer

    flops = 0.0
    skip = set()  # parameters that are no per-token dense matmul
    for module in model.modules():
        if isinstance(module, MoELayer):
            params = list(module.experts.parameters())
            per_expert = sum(p.numel() for p in params if p.dim() >= 2) / module.cfg.num_experts
            flops += 2.0 * per_expert * experts_per_token(module.cfg)
            skip.update(id(p) for p in params)
        elif isinstance(module, Attention):
            flops += 4.0 * seq_len * module.total_heads * module.head_dim
        elif isinstance(module, nn.Embedding):
            skip.update(id(p) for p in module.parameters(recurse=False))
    counted = set()
    for module in model.modules():
        # The LM head counts even when its weight is the (tied) embedding's.
        if isinstance(module, nn.Linear) and id(module.weight) not in counted \
                and (id(module.weight) not in skip or module is getattr(model, "lm_head", None)):
            flops += 2.0 * module.in_features * module.out_features
            counted.add(id(module.weight))
    for p in model.parameters():
        # Routers (and their noise weights) are plain [E, D] parameters.
        if p.dim() >= 2 and id(p) not in skip and id(p) not in counted:
            flops += 2.0 * p.numel()
            counted.add(id(p))
    return flops


def model_flops_per_token(cfg) -> float:
    """Training model FLOPs per token (3x the forward) for a Config, counted
    on a meta-device build (no memory, no initialisation cost)."""
    from moe_train.model.transformer import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe)
    return 3.0 * forward_flops_per_token(model, cfg.train.seq_len)


def peak_tflops(device: torch.device, precision: str,
                configured: Optional[float] = None) -> Optional[float]:
    """Peak TFLOP/s of one device: ``configured`` if given, else the table's
    value for a known CUDA GPU at ``precision``, else None (MFU unknown)."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, bf16, fp32 in PEAK_TFLOPS:
        if fragment in name:
            return bf16 if precision == "bf16" else fp32
    return None


def memory_metrics(device: torch.device) -> Dict[str, float]:
    """``memory/max_allocated`` (GiB, the peak of torch's CUDA allocator since
    the process started) on CUDA; ``memory/rss`` (GiB, the process's resident
    set now) elsewhere."""
    if device.type == "cuda":
        return {"memory/max_allocated": torch.cuda.max_memory_allocated(device) / GIB}
    try:
        import psutil

        rss = psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil: resident pages from /proc
        import os

        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"memory/rss": rss / GIB}


class PerfMeter:
    """The ``perf/*`` and ``memory/*`` scalars of a logged step.

    ``flops_per_token``: training model FLOPs per token; ``world_size``: the
    devices sharing the work; ``peak``: one device's peak TFLOP/s or None.
    """

    def __init__(self, flops_per_token: float, world_size: int, device: torch.device,
                 peak: Optional[float]):
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.device = device
        self.peak = peak

    @classmethod
    def for_run(cls, cfg, topology) -> "PerfMeter":
        """The meter of a run: FLOPs from ``cfg``, peak from
        ``train.peak_tflops`` or the device table."""
        return cls(model_flops_per_token(cfg), topology.world_size, topology.device,
                   peak_tflops(topology.device, cfg.train.precision,
                               getattr(cfg.train, "peak_tflops", None)))

    def scalars(self, tokens_per_sec: float) -> Dict[str, float]:
        """tokens/s (all ranks), TFLOP/s per device, MFU (when the peak is
        known) and memory."""
        tflops = self.flops_per_token * tokens_per_sec / self.world_size / 1e12
        out = {"perf/tokens_per_sec": tokens_per_sec, "perf/tflops": tflops}
        if self.peak:
            out["perf/mfu"] = tflops / self.peak
        out.update(memory_metrics(self.device))
        return out
