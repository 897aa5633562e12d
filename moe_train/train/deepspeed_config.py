"""The DeepSpeed JSON config, filled from and checked against ``train.*``.

Checked before any process group exists, so a conflict is one line and exit
status 2. Used by :mod:`moe_train.train.engine_deepspeed`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

from moe_train.config import Config, ConfigError

AUTO = "auto"

# Sections that would replace moe_train's own optimizer and schedule.
_REJECTED_SECTIONS = {
    "optimizer": "the optimizer is moe_train's AdamW (train.lr, train.beta1, train.beta2, "
                 "train.weight_decay)",
    "scheduler": "the schedule is moe_train's warmup + cosine (train.warmup_steps, train.min_lr)",
}
SUPPORTED_ZERO_STAGES = (0, 1, 2)


# ----------------------------------------------------------------------------
# The DeepSpeed JSON config, filled from and checked against train.*


def _err(path: str, message: str) -> ConfigError:
    return ConfigError(f"train.deepspeed_config ({path}): {message}")


def load_deepspeed_json(path: str) -> Dict[str, Any]:
    """The JSON object at ``path``. Raises ConfigError naming the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"train.deepspeed_config: file not found: {path}")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise _err(path, f"not valid JSON: {str(exc).splitlines()[0]}")
    if not isinstance(data, dict):
        raise _err(path, "must be a JSON object")
    return data


def _fill(ds: Dict[str, Any], key: str, ours: Any, field: str, path: str) -> None:
    """Set ``ds[key]`` from our field when absent or "auto"; otherwise it must agree."""
    value = ds.get(key, AUTO)
    if value == AUTO:
        ds[key] = ours
    elif value != ours:
        shown = json.dumps(ours)
        raise _err(path, f"{key} ({json.dumps(value)}) conflicts with {field} "
                         f"({shown}); set it to \"auto\" or to {shown}")


def resolve_deepspeed_config(cfg: Config, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` ranks.

    ``"auto"`` (or an absent key) takes moe_train's value: the batch sizes
    (train_micro_batch_size_per_gpu = train.micro_batch_size,
    gradient_accumulation_steps = global / (micro x dp), train_batch_size =
    train.global_batch_size), gradient_clipping = train.grad_clip and
    bf16.enabled = (train.precision == bf16). An explicit value that differs
    is an error, as are optimizer/scheduler sections, fp16 and ZeRO stage 3.
    Raises ConfigError (one line, naming the field) before anything starts.
    """
    path = cfg.train.deepspeed_config
    ds = load_deepspeed_json(path)
    t, p = cfg.train, cfg.parallel
    if p.tensor_parallel_size != 1:
        raise ConfigError(f"parallel.tensor_parallel_size ({p.tensor_parallel_size}) must be 1 "
                          "with train.deepspeed_config: the DeepSpeed engine runs data and expert "
                          "parallelism only")
    for section, why in _REJECTED_SECTIONS.items():
        if section in ds:
            raise _err(path, f"remove the \"{section}\" section: {why}")
    if (ds.get("fp16") or {}).get("enabled") not in (None, False):
        raise _err(path, "fp16.enabled is not supported (no loss scaling in moe_train); "
                         "use bf16 with train.precision=bf16")

    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise _err(path, "zero_optimization must be an object")
    stage = zero.setdefault("stage", 0)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise _err(path, f"zero_optimization.stage ({stage!r}) must be one of 0, 1, 2: ZeRO-3 "
                         "partitions parameters, which the expert-parallel layers do not gather")

    dp = world_size // p.tensor_parallel_size
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be divisible "
                          f"by train.micro_batch_size ({t.micro_batch_size}) x data-parallel "
                          f"size ({dp})")
    accum = t.global_batch_size // (t.micro_batch_size * dp)
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", path)
    _fill(ds, "gradient_accumulation_steps", accum,
          "train.global_batch_size / (train.micro_batch_size x data-parallel size)", path)
    _fill(ds, "train_batch_size", t.global_batch_size, "train.global_batch_size", path)
    _fill(ds, "gradient_clipping", t.grad_clip, "train.grad_clip", path)
    bf16 = ds.setdefault("bf16", {})
    if not isinstance(bf16, dict):
        raise _err(path, "bf16 must be an object")
    enabled = bf16.get("enabled", AUTO)
    if enabled == AUTO:
        bf16["enabled"] = t.precision == "bf16"
    elif enabled is not (t.precision == "bf16"):
        raise _err(path, f"bf16.enabled ({json.dumps(enabled)}) conflicts with train.precision "
                         f"({t.precision}); set it to \"auto\" or train.precision to "
                         f"{'bf16' if enabled else 'fp32'}")
    ds.setdefault("steps_per_print", 2 ** 31 - 1)  # our metrics logger reports progress
    return ds
