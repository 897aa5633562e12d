"""The ``moe-train`` command: ``train``, ``prepare-data``, ``export``,
``generate`` and ``eval``.

``moe-train train ...`` is the same as ``python -m moe_train.train ...`` and
``launch/train.py ...``. Bad input (a missing config file, an unknown key, an
impossible value, an unwritable run directory, a missing or incompatible
checkpoint, a dataset too small) prints one line, ``error: <msg>``, on stderr
and exits with status 2, before anything is written. A run stopped by
SIGTERM/SIGINT/SIGUSR1 saves and exits with 128 + the signal number; one that
diverged (train.max_skipped_steps non-finite steps in a row) exits with 3
(docs/reliability.md).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Tuple

from moe_train.config import Config, ConfigError, load_config

USAGE = """usage: moe-train <command> [options]

commands:
  train         train a model (python -m moe_train.train; see moe-train train --help)
  prepare-data  tokenize text files into a dataset directory
  export        export a checkpoint to a Hugging Face model directory
  plan          count parameters and per-rank memory of a config (meta device)
  import        convert a Hugging Face checkpoint (or upcycle a dense one) to moe_train
  generate      continue a prompt with a trained model (KV cache)
  eval          loss, perplexity and bits per byte of a checkpoint

run 'moe-train <command> --help' for the options of a command."""

LATEST_CHECKPOINT = ""  # what a bare --resume means: the latest checkpoint of the run dir


def train_parser(prog: str = "moe-train train") -> argparse.ArgumentParser:
    """Options of the train command."""
    p = argparse.ArgumentParser(
        prog=prog, description="Train a Mixture-of-Experts language model.")
    p.add_argument("--config", metavar="YAML",
                   help="config file (default: the embedded configs/tiny.yaml; when resuming, "
                        "the config stored with the checkpoint)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="run directory (default: train.run_dir, else runs/<YYYYmmdd-HHMMSS>)")
    p.add_argument("--resume", nargs="?", const=LATEST_CHECKPOINT, default=None, metavar="PATH",
                   help="continue from a checkpoint: bare, the latest one of the run dir; "
                        "or a run dir or checkpoint dir")
    p.add_argument("--overwrite", action="store_true",
                   help="a fresh run may replace the run already in the run dir (only the "
                        "files that run recorded in its manifest are removed)")
    return p


def resolve_train_args(args: argparse.Namespace,
                       world_size: Optional[int] = None) -> Tuple[Config, Optional[str]]:
    """The config to train and the checkpoint to resume from (or None),
    validated for ``world_size`` ranks (default: the launcher's WORLD_SIZE).

    Resuming without --config takes the config stored with the checkpoint
    (plus any --set), so ``--resume --set train.max_steps=N`` extends a run.
    """
    from moe_train.parallel.topology import env_world_size
    from moe_train.train import InputError
    from moe_train.train.checkpoint import find_checkpoint, read_config, run_dir_of

    world = env_world_size() if world_size is None else world_size
    if args.resume is None:
        cfg = load_config(args.config, args.set, world)
        if args.run_dir:
            cfg.train.run_dir = args.run_dir
        return cfg, None

    if args.resume == LATEST_CHECKPOINT:
        run_dir = args.run_dir or load_config(args.config, args.set, world).train.run_dir
        if not run_dir:
            raise InputError("--resume without a path needs --run-dir (or train.run_dir) "
                             "to find the latest checkpoint")
        ckpt_dir = find_checkpoint(run_dir)
    else:
        ckpt_dir = find_checkpoint(args.resume)
        run_dir = args.run_dir or run_dir_of(ckpt_dir)
    if args.config:
        cfg = load_config(args.config, args.set, world)
    else:
        cfg = read_config(ckpt_dir, args.set).validate(world)
    if run_dir:
        cfg.train.run_dir = run_dir
    return cfg, ckpt_dir


def fail(message: str) -> int:
    """Print ``message`` as one ``error:`` line on stderr; the exit status 2."""
    print("error: " + " ".join(str(message).split("\n")), file=sys.stderr)
    return 2


def train_main(argv: Optional[List[str]] = None, prog: str = "moe-train train") -> int:
    """Parse train options, check the input, train. Returns the exit status."""
    from moe_train.train import InputError
    from moe_train.train.nonfinite import EXIT_STATUS as DIVERGED
    from moe_train.train.nonfinite import DivergedError
    from moe_train.train.stop_signals import exit_status

    args = train_parser(prog).parse_args(argv)
    try:
        cfg, resume = resolve_train_args(args)
        from moe_train.train.trainer import train

        summary = train(cfg, resume=resume, overwrite=args.overwrite)
    except (ConfigError, InputError) as exc:
        return fail(str(exc))
    except DivergedError as exc:
        fail(str(exc))
        return DIVERGED
    except KeyboardInterrupt:  # Ctrl-C before the training loop took over the signal
        fail("interrupted before training started; nothing was saved")
        return 130
    if summary.get("stopped_by"):
        return exit_status(summary["stopped_by"])
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``moe-train`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    if command == "prepare-data":
        from moe_train.data.prepare import main as prepare_main

        return prepare_main(rest) or 0
    if command == "export":
        # Imported only when asked for: export pulls in extra dependencies.
        from moe_train.train.export import main as export_main

        return export_main(rest) or 0
    if command == "plan":
        from moe_train.plan import main as plan_main

        return plan_main(rest)
    if command == "import":
        from moe_train.hf.importer import main as import_main

        return import_main(rest)
    if command in ("generate", "eval"):
        from moe_train.infer import evaluate, generate

        return (generate if command == "generate" else evaluate).main(rest)
    return fail(f"unknown command {command!r}; choose one of: train, prepare-data, export, "
                "plan, import, generate, eval")


if __name__ == "__main__":
    sys.exit(main())
