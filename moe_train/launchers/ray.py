"""Ray Train glue: run the launcher-agnostic ``train(cfg)`` on the workers of
a Ray Train ``TorchTrainer``.

Ray starts the worker group, sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT and the torch.distributed process group; ``train``
joins it like under torchrun. What Ray adds is failure recovery: when a worker
dies, Ray stops the whole group and starts it again (up to
``FailureConfig.max_failures`` times), and every worker of the new group
resumes from the latest checkpoint in the run directory (written atomically
by the trainer, so a kill in the middle of a save leaves the previous one).
The driver claims the run directory before Ray starts (an earlier run there
is refused, or removed with ``--overwrite``; moe_train.train.run_dir), so
that only checkpoints of this run are ever resumed from.

At the end, rank 0 reports the final checkpoint to Ray (``ray.train.report``),
which copies it to ``<run dir>/ray/<name>/checkpoint_<timestamp>/`` (name:
the run directory's base name) and hands it back as ``Result.checkpoint``.
Logs (TensorBoard, metrics.jsonl) are the trainer's, in the run directory,
written by rank 0 only.

Console: Ray Train's print patch (which sends every ``print`` of a worker to
its logger as well, so each rank-0 line reached the driver twice) is turned
off through RAY_TRAIN_ENABLE_PRINT_PATCH, which Ray Train passes on to the
workers. A Ray instance started here has no dashboard, hence no State API,
and Ray Train's PlacementGroupCleaner would log a warning every few seconds
that it cannot reach it: :func:`quiet_local_workers` silences that logger in
the processes of such an instance only.

The run directory must be reachable at the same path from every worker (one
machine, or a shared file system on a cluster).
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Dict, Optional

# Test hook: "RANK:STEP:MARKER" makes worker RANK exit abruptly (os._exit)
# once the run has logged step STEP, unless file MARKER exists; it creates
# MARKER first, so the fault fires once per run, not again after the restart.
FAULT_ENV = "MOE_TRAIN_TEST_RAY_FAULT"

# Environment a Ray instance started on one machine needs to stay on
# loopback (node address 127.0.0.1, no token authentication between the
# processes of this machine).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}

# Read by Ray Train on the driver and passed to its controller and workers.
QUIET_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

# Set by Ray in the environment of a ``ray job submit`` entrypoint.
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

_PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_PLACEMENT_GROUP_CLEANER_THREAD = "PlacementGroupCleanerMonitor"


def in_ray_job() -> bool:
    """True in the entrypoint of a ``ray job submit`` job, which runs from a
    copy of ``--working-dir`` that Ray caches and later deletes."""
    return JOB_ENV in os.environ


def quiet_local_workers() -> None:
    """Ray worker setup hook for an instance started by :func:`run`. Its
    PlacementGroupCleaner cannot reach the State API (no dashboard serves
    it; with other Ray instances on the machine its lookup even fails with
    "Found multiple active Ray instances"): its warnings, and the traceback of
    its monitor thread, stay silent. Nothing is lost: the instance, with its
    placement groups, ends with the driver."""
    import logging

    logging.getLogger(_PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    previous = threading.excepthook

    def excepthook(args) -> None:
        if args.thread is not None and args.thread.name == _PLACEMENT_GROUP_CLEANER_THREAD:
            return
        previous(args)

    threading.excepthook = excepthook


def _latest_checkpoint(run_dir: str) -> Optional[str]:
    """The checkpoint a (re)started worker group resumes from: None when the
    run directory holds none yet. A checkpoints/ directory that exists but
    cannot be resumed from raises (InputError) rather than starting over,
    which would delete it."""
    from moe_train.train.checkpoint import CHECKPOINTS, LATEST, find_checkpoint, step_dirs

    root = os.path.join(run_dir, CHECKPOINTS)
    if not step_dirs(root) and not os.path.isfile(os.path.join(root, LATEST)):
        return None
    return find_checkpoint(run_dir)


def _arm_fault(spec: Optional[str], rank: int, run_dir: str) -> None:
    """Start the :data:`FAULT_ENV` watcher on the rank it names (tests only)."""
    if not spec:
        return
    fault_rank, step, marker = spec.split(":", 2)
    if int(fault_rank) != rank or os.path.exists(marker):
        return

    from moe_train.train.metrics import METRICS_FILE

    metrics = os.path.join(run_dir, METRICS_FILE)

    def logged_step() -> int:
        last = 0
        try:
            with open(metrics) as fh:
                for line in fh:
                    try:
                        last = max(last, int(json.loads(line).get("step", 0)))
                    except ValueError:  # a line being written right now
                        continue
        except OSError:
            pass
        return last

    def watch() -> None:
        while logged_step() < int(step):
            time.sleep(0.05)
        with open(marker, "w") as fh:
            fh.write(f"rank {rank} killed after step {step}\n")
            fh.flush()
            os.fsync(fh.fileno())
        print(f"fault injection: rank {rank} exits now (step {step} logged)", flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="moe-train-fault", daemon=True).start()


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """What every Ray worker runs: build the config, resume from the run
    directory's latest checkpoint if there is one (a restarted worker group,
    or ``--resume``), train, and report the final checkpoint to Ray."""
    import ray.train

    from moe_train.config import config_from_dict
    from moe_train.train.trainer import train

    cfg = config_from_dict(loop_config["config"])
    run_dir = cfg.train.run_dir
    rank = ray.train.get_context().get_world_rank()
    resume = _latest_checkpoint(run_dir)
    if resume is not None and rank == 0:
        print(f"ray: worker group (re)started; resuming {resume}", flush=True)
    _arm_fault(loop_config.get("fault"), rank, run_dir)

    # The driver claimed the directory (refusing an earlier run without
    # --overwrite); a group restarted before the first checkpoint replaces
    # its own first attempt's logs.
    summary = train(cfg, resume=resume, overwrite=resume is None)

    metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    checkpoint = None
    if rank == 0 and summary.get("checkpoint"):
        checkpoint = ray.train.Checkpoint.from_directory(summary["checkpoint"])
    ray.train.report(metrics, checkpoint=checkpoint)


def run(cfg, num_workers: int, use_gpu: bool = False, max_failures: int = 0,
        address: Optional[str] = None, name: Optional[str] = None):
    """Train ``cfg`` (already validated, ``cfg.train.run_dir`` an absolute
    path prepared by the caller) on ``num_workers`` Ray Train workers and
    return Ray's ``Result``.

    ``address``: the Ray cluster to join (``auto``, ``ray://host:10001`` or
    ``host:6379``); None joins the cluster of RAY_ADDRESS / ``ray job submit``
    if there is one, else starts a Ray instance on this machine, bound to
    127.0.0.1, and stops it at the end. ``max_failures``: worker-group
    restarts Ray may make (-1: no limit).
    """
    run_dir = cfg.train.run_dir
    local = address is None and not os.environ.get("RAY_ADDRESS")
    if local:
        # Read by Ray when it is imported, and inherited by the processes it starts.
        for key, value in LOOPBACK_ENV.items():
            os.environ.setdefault(key, value)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if local:
        ray.init(address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
                 include_dashboard=False, configure_logging=False,
                 runtime_env={"worker_process_setup_hook": quiet_local_workers})
    else:
        ray.init(address=address, configure_logging=False)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.to_dict(), "fault": os.environ.get(FAULT_ENV)},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
            run_config=RunConfig(
                name=name or os.path.basename(os.path.normpath(run_dir)),
                storage_path=os.path.join(run_dir, "ray"),
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )
        return trainer.fit()
    finally:
        if local:
            ray.shutdown()
