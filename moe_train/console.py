"""What moe_train prints: numbers at 4 significant digits, and megatron-core's
warning about missing Transformer Engine / Apex silenced (it repeats once per
import site and rank, 16-47 lines per launch, and says nothing actionable: the
torch fallbacks it announces are the ones moe_train uses on purpose).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings

SIGNIFICANT_DIGITS = 4


def quiet_known_warnings() -> None:
    """Ignore megatron-core's "Transformer Engine and Apex are not installed"
    UserWarning, and only that one. Called when moe_train is imported, so
    every entry point (CLI, launch scripts, Ray workers) gets it."""
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed",
                            category=UserWarning, module=r"megatron\.")


def fmt(x: float) -> str:
    """``x`` rounded to 4 significant digits, in plain notation between 1e-4
    and 1e6 (``2.992``, ``14520``, ``0.001235``), else in scientific notation."""
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    x = float(f"{x:.{SIGNIFICANT_DIGITS - 1}e}")  # round first: 0.99996 -> 1.0
    exponent = math.floor(math.log10(abs(x)))
    if -4 <= exponent < 6:
        return f"{x:.{max(0, SIGNIFICANT_DIGITS - 1 - exponent)}f}"
    return f"{x:.{SIGNIFICANT_DIGITS - 1}e}"


@contextlib.contextmanager
def deepspeed_comm_op_notice(is_main: bool):
    """Around ``deepspeed.init_distributed``: on DeepSpeed's CPU accelerator
    the first run on a machine compiles DeepSpeed's shared-memory comm op
    (about 40 s of silence); rank 0 says so before and after. Silent when the
    op is already in torch's extension cache, or on GPUs (no such op)."""
    build_dir = _shm_comm_op_missing() if is_main else None
    announce = build_dir is not None
    if announce:
        print(f"building DeepSpeed's CPU comm op, about 40 s once (cached in {build_dir})",
              flush=True)
    start = time.time()
    yield
    if announce:
        print(f"built DeepSpeed's CPU comm op in {fmt(time.time() - start)} s", flush=True)


def _shm_comm_op_missing():
    """The build directory of DeepSpeed's shared-memory comm op when it must
    be built, else None."""
    try:
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None:
            return None
        build_dir = _get_build_directory(builder.NAME, verbose=False)
        return None if os.path.exists(os.path.join(build_dir, builder.NAME + ".so")) else build_dir
    except Exception:  # a DeepSpeed or torch without these internals: say nothing
        return None
