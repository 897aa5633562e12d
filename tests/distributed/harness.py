"""Run a function on N local gloo ranks and bring its results back.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes,
each with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set (what
torchrun exports), calls ``fn(rank, world_size, *args)`` and returns the list
of return values by rank. ``fn`` must be a module-level function (the
start method pickles it by name). A worker's exception is re-raised in the parent with the
worker's traceback; a worker that dies without reporting (a crash, a
deadlock past ``timeout``) fails the test with its exit code.

Results travel through ``torch.save`` files, not a multiprocessing queue: a
worker ends with ``os._exit(0)`` (after destroying its process groups),
because a process that used autograd collectives can abort in its exit
handlers ("terminate called without an active exception"), and ``os._exit``
would drop whatever a queue's feeder thread has not yet flushed.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp


class WorkerError(RuntimeError):
    """A rank raised or died; the message holds its traceback or exit code."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_topology_gloo(tensor_parallel_size: int = 1, expert_parallel_size: int = 1):
    """Inside a worker: join the process group on gloo and build the topology."""
    from moe_train.config import ParallelConfig
    from moe_train.parallel.topology import init_topology

    return init_topology(ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                        expert_parallel_size=expert_parallel_size,
                                        backend="gloo"), timeout_minutes=2)


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # The test machine has few cores for many ranks: one thread each.
    torch.set_num_threads(1)
    try:
        payload = {"result": fn(rank, world_size, *args)}
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        payload = {"error": traceback.format_exc()}
    try:
        torch.save(payload, os.path.join(out_dir, f"rank{rank}.pt.tmp"))
        os.replace(os.path.join(out_dir, f"rank{rank}.pt.tmp"), os.path.join(out_dir, f"rank{rank}.pt"))
        if "error" in payload:
            open(os.path.join(out_dir, f"rank{rank}.failed"), "w").close()
    finally:
        try:
            from moe_train.parallel.topology import destroy_topology

            destroy_topology()
        except BaseException:  # noqa: BLE001 - exiting anyway
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# Imported once in the fork server instead of once per rank: importing torch
# and megatron-core costs a few CPU seconds per process, and the test machine
# has few cores for many ranks.
_PRELOAD = ["torch", "torch.distributed", "megatron.core.parallel_state",
            "megatron.core.tensor_parallel", "moe_train.parallel", "moe_train.model.transformer"]


def _context():
    """forkserver with the heavy imports preloaded where the platform has it
    (a fork of a process that has not run torch ops yet is safe), else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _any_error(out_dir: str, world_size: int) -> bool:
    return any(os.path.exists(os.path.join(out_dir, f"rank{r}.failed")) for r in range(world_size))


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes and
    return the results by rank. Raises :class:`WorkerError` if any rank
    failed (first failing rank's traceback in the message)."""
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="moe_dist_") as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, out_dir, fn, args),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed_at = None
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
            if failed_at is None and _any_error(out_dir, world_size):
                failed_at = time.monotonic()
            # A raising rank leaves the others waiting in a collective until
            # the gloo timeout: give them a moment to report, then stop them.
            if failed_at is not None and time.monotonic() - failed_at > 3.0:
                break
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()          # only the processes started here
            procs[r].join(5)

        results, errors = [], []
        for r, p in enumerate(procs):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                why = (f"stopped after {timeout:.0f}s or after another rank failed" if r in hung
                       else f"exit code {p.exitcode}")
                errors.append(f"rank {r} produced no result ({why})")
                results.append(None)
                continue
            payload = torch.load(path, weights_only=False)
            if "error" in payload:
                errors.append(f"rank {r} raised:\n{payload['error']}")
                results.append(None)
            else:
                results.append(payload["result"])
        if errors:
            # A raising rank usually leaves the others stuck in a collective:
            # show the real failure first.
            errors.sort(key=lambda e: "raised" not in e)
            raise WorkerError("\n".join(errors))
        return results


def assert_checks(checks, where, rtol=1e-5, atol=1e-6):
    """Assert each ``(label, got, expected)`` close: fp32 sums in another
    order, so relative to each element and to the tensor's scale for
    elements that nearly cancel."""
    for label, got, expected in checks:
        tol = max(atol, rtol * float(expected.abs().max())) if expected.numel() else atol
        torch.testing.assert_close(got, expected, rtol=rtol, atol=tol,
                                   msg=lambda m: f"{where}: {label}: {m}")
