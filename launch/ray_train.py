#!/usr/bin/env python
"""Train on a Ray cluster (or a Ray instance started on this machine) with
Ray Train's TorchTrainer: the same ``train(cfg)`` as torchrun and deepspeed.

    python launch/ray_train.py --config configs/tiny.yaml --num-workers 2 --run-dir /abs/run
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python launch/ray_train.py --config configs/tiny.yaml --num-workers 2 --run-dir /abs/run

The config (and a DeepSpeed config, if train.deepspeed_config is set) is
checked and the run directory prepared before Ray starts: bad input prints one
line, ``error: <msg>``, and exits with status 2. A worker that dies makes Ray
restart the worker group (up to --max-failures times), which resumes from the
latest checkpoint of the run directory. See docs/launching.md.
"""
import argparse
import os
import shutil
import sys
from typing import List, Optional

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parser() -> argparse.ArgumentParser:
    """Options of launch/ray_train.py."""
    p = argparse.ArgumentParser(
        prog="launch/ray_train.py",
        description="Train a Mixture-of-Experts language model on Ray Train workers.")
    p.add_argument("--config", metavar="YAML",
                   help="config file (default: the embedded configs/tiny.yaml; with --resume and "
                        "no --config, the config stored with the checkpoint)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--num-workers", type=int, required=True, metavar="N",
                   help="training processes (ranks); one GPU each with --use-gpu")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to join (auto, HOST:6379, ray://HOST:10001); default: the "
                        "cluster of RAY_ADDRESS or ray job submit, else a Ray instance started "
                        "here on 127.0.0.1")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="run directory, the same path on every node (default: train.run_dir, "
                        "else runs/<YYYYmmdd-HHMMSS>-<pid>; inside a Ray job it must be given and "
                        "absolute); Ray's copy of the final checkpoint goes to "
                        "DIR/ray/<basename of DIR>/checkpoint_<timestamp>")
    p.add_argument("--max-failures", type=int, default=3, metavar="M",
                   help="worker-group restarts after a worker dies (-1: no limit; default 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run directory's latest checkpoint instead of starting over")
    p.add_argument("--overwrite", action="store_true",
                   help="a fresh run may replace the run already in the run dir")
    return p


def resolve_config(args: argparse.Namespace):
    """The config to train, validated for ``--num-workers`` ranks, exactly as
    ``moe-train train`` resolves it (a bare --resume: the run's latest
    checkpoint, with its stored config when there is no --config)."""
    from moe_train.cli import LATEST_CHECKPOINT, resolve_train_args

    train_args = argparse.Namespace(config=args.config, set=args.set, run_dir=args.run_dir,
                                    resume=LATEST_CHECKPOINT if args.resume else None)
    return resolve_train_args(train_args, world_size=args.num_workers)[0]


def check_job_paths(cfg) -> None:
    """Inside ``ray job submit`` the entrypoint runs from Ray's cached copy of
    --working-dir, which Ray deletes later: a relative (or missing) run
    directory or data cache would be written there, and lost. Refuse them,
    naming the option, before anything is written."""
    from moe_train.launchers.ray import in_ray_job
    from moe_train.train import InputError

    if not in_ray_job():
        return
    run_dir = cfg.train.run_dir
    if not run_dir or not os.path.isabs(run_dir):
        raise InputError(f"--run-dir ({run_dir or 'not set'}) must be an absolute path inside a "
                         "Ray job: the job runs in Ray's copy of --working-dir, which Ray deletes")
    if cfg.data.cache_dir and not os.path.isabs(cfg.data.cache_dir):
        raise InputError(f"data.cache_dir ({cfg.data.cache_dir}) must be an absolute path "
                         "inside a Ray job: the job runs in Ray's copy of --working-dir, "
                         "which Ray deletes")


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    from moe_train.cli import fail
    from moe_train.config import ConfigError
    from moe_train.train import InputError

    if args.num_workers < 1:
        return fail(f"--num-workers ({args.num_workers}) must be >= 1")
    if args.max_failures < -1:
        return fail(f"--max-failures ({args.max_failures}) must be >= -1 (-1: no limit)")
    try:
        cfg = resolve_config(args)
        if cfg.train.deepspeed_config:
            from moe_train.train.deepspeed_config import resolve_deepspeed_config

            resolve_deepspeed_config(cfg, args.num_workers)
        # Workers run in other directories (and, with ray job submit, from a
        # copy of the working dir): every path they get is absolute.
        from moe_train.train import run_dir as run_dirs

        check_job_paths(cfg)
        run_dir = cfg.train.run_dir or run_dirs.default_run_dir()
        cfg.train.run_dir = os.path.abspath(run_dir)
        if cfg.data.cache_dir:
            cfg.data.cache_dir = os.path.abspath(cfg.data.cache_dir)
        if cfg.train.deepspeed_config:
            cfg.train.deepspeed_config = os.path.abspath(cfg.train.deepspeed_config)
        if os.path.isdir(cfg.data.dataset):
            cfg.data.dataset = os.path.abspath(cfg.data.dataset)

        # The run directory is checked and claimed here, once (an earlier
        # run's files removed only with --overwrite); the workers resume
        # from whatever checkpoint it holds, and rank 0 locks it while it trains.
        removed = run_dirs.prepare(cfg.train.run_dir, fresh=not args.resume,
                                   overwrite=args.overwrite)
        ray_dir = os.path.join(cfg.train.run_dir, "ray")
        if removed and os.path.isdir(ray_dir):
            # The overwritten run's Ray state: Ray would load its snapshot.
            shutil.rmtree(ray_dir)
            removed.append("ray")
    except (ConfigError, InputError) as exc:
        return fail(str(exc))
    if removed:
        print(f"note: --overwrite removed the earlier run's {', '.join(removed)} "
              f"from {cfg.train.run_dir}", flush=True)

    from moe_train.launchers.ray import run

    try:
        result = run(cfg, num_workers=args.num_workers, use_gpu=args.use_gpu,
                     max_failures=args.max_failures, address=args.address)
    except Exception as exc:  # Ray Train raises the workers' error once retries are spent
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"error: training failed after {args.max_failures} restart(s): {first} "
              "(the workers' logs above have the details)", file=sys.stderr)
        return 1
    from moe_train.console import fmt

    metrics = result.metrics or {}
    loss = metrics.get("train_loss")
    print(f"ray: done, {metrics.get('steps')} steps, train loss "
          f"{fmt(loss) if loss is not None else None}, "
          f"checkpoint {cfg.train.run_dir}/checkpoints (Ray's copy: "
          f"{result.checkpoint.path if result.checkpoint else None})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
