"""Shared helpers of the benchmark scripts: timing, memory, machine facts, tables.

Every claim the benchmarks make is a ratio of variants measured side by side
in one process: each repeat runs every variant once (in a rotating order, so
that no variant always runs right after the same neighbour), after warm-up
repeats that are thrown away, and a variant's time is the median over
repeats. On a shared machine absolute times drift; ratios of interleaved
medians drift much less.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

# --thp: PyTorch's CPU allocator asks for transparent huge pages on large
# tensors (env THP_MEM_ALLOC_ENABLE, read at the first allocation, so it is set
# here, before any tensor exists). See docs/performance.md for why it matters.
if "--thp" in sys.argv:
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


# ----------------------------------------------------------------------------
# Device


def pick_device() -> torch.device:
    """CUDA when present, else the CPU (the same scripts run on both)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------
# Timing


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int = 5, warmup: int = 1,
                     device: Optional[torch.device] = None, clock: str = "wall"
                     ) -> Dict[str, List[float]]:
    """Seconds per call of each variant: ``{name: [t_repeat0, ...]}``.

    Each repeat calls every variant once, in an order rotated by one each
    repeat; the first ``warmup`` repeats are discarded. ``clock``: "wall"
    (perf_counter, with a device sync) or "cpu" (process CPU time: with one
    thread, the work done, whatever else the machine runs).
    """
    device = device or pick_device()
    now = time.process_time if clock == "cpu" else time.perf_counter
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            sync(device)
            t0 = now()
            fns[name]()
            sync(device)
            dt = now() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median: how noisy the repeats were."""
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / m if m > 0 else 0.0


def matmul_peak_flops(device: torch.device, n: int = 2048, repeats: int = 5,
                      dtype: torch.dtype = torch.float32, clock: str = "wall") -> float:
    """Measured FLOP/s of one large square matmul (2*n^3 FLOPs): the
    machine's practical peak for this dtype, measured in the same run
    (best of ``repeats``; ``clock`` as in time_interleaved)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t0 = now()
        a @ b
        sync(device)
        best = min(best, now() - t0)
    return 2 * n ** 3 / best


# ----------------------------------------------------------------------------
# Machine facts


def machine_info(device: Optional[torch.device] = None) -> Dict[str, str]:
    device = device or pick_device()
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            if m:
                cpu = m.group(1).strip()
    info = {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "device": str(device),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        info["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        import deepspeed  # noqa: F401
        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001 - optional dependency
        pass
    return info


def print_machine(device: Optional[torch.device] = None) -> None:
    info = machine_info(device)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)


# ----------------------------------------------------------------------------
# Tables


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]],
                note: Optional[str] = None) -> str:
    """Print (and return) a Markdown table, so that a run's output can be
    pasted into docs/performance.md as is."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            if v == 0:
                return "0"
            if abs(v) >= 1000:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.2f}"
        return str(v)

    cells = [[fmt(c) for c in row] for row in rows]
    lines = [f"### {title}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    if note:
        lines += ["", note]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


# ----------------------------------------------------------------------------
# Memory (CPU: peak RSS of a fresh process; GPU: the caching allocator's peak)

MALLOC_ENV = {
    # A fixed mmap threshold turns off glibc's dynamic threshold, so every
    # tensor larger than 64 KiB is its own mapping and is unmapped when freed:
    # RSS then follows the live tensor bytes instead of the heap's high water.
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "65536",
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(field + r":\s+(\d+)\s*kB", f.read())
    return int(m.group(1)) if m else 0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux
    /proc/self/clear_refs '5'). Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def measure_peak(fn: Callable[[], None], device: torch.device) -> int:
    """Bytes by which ``fn`` raised memory above what was live before it.

    CUDA: max_memory_allocated - memory_allocated (exact, allocator counts).
    CPU: peak RSS (VmHWM, reset just before) - RSS before; exact enough when
    the process runs with MALLOC_ENV (see memory.py, which checks it on a
    tensor of known size).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = current_rss_bytes()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): no CPU memory numbers")
    fn()
    return peak_rss_bytes() - before


def run_json_subprocess(args: List[str], env_extra: Optional[Dict[str, str]] = None,
                        timeout: float = 1800) -> dict:
    """Run ``python args...`` in a fresh process; its last stdout line is JSON."""
    env = dict(os.environ)
    env.update(env_extra or {})
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable] + args, env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=REPO_ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"subprocess {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# Distributed


def add_thp_flag(parser) -> None:
    parser.add_argument("--thp", action="store_true",
                        help="THP_MEM_ALLOC_ENABLE=1: transparent huge pages for large CPU tensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_dist(device: torch.device) -> None:
    """A world of one (gloo on CPU, nccl on GPU) in the env:// style that
    DeepSpeed expects; without it DeepSpeed looks for MPI."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        import deepspeed
    except ImportError:
        dist.init_process_group(backend, rank=0, world_size=1)
        return
    # deepspeed.comm keeps its own handle on the process group: let it create it.
    quiet_deepspeed()
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def quiet_deepspeed() -> None:
    """DeepSpeed logs at INFO on import and on every MoE layer it builds."""
    import logging
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from deepspeed.utils import logger
        logger.setLevel(logging.ERROR)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def elapsed_note(t0: float) -> str:
    return f"(script ran {time.perf_counter() - t0:.0f} s)"
