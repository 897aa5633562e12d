#!/usr/bin/env python
"""One training script for torchrun and the deepspeed launcher.

    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny.yaml
    deepspeed --num_gpus 2 launch/train.py --config configs/tiny.yaml

Takes the options of ``python -m moe_train.train``. The deepspeed launcher
appends ``--local_rank N`` (older torch.distributed.launch ``--local-rank=N``);
it is accepted and dropped, since LOCAL_RANK in the environment says the same.
DeepSpeed's own options are accepted too: ``--deepspeed_config JSON`` is
``--set train.deepspeed_config=JSON`` (the DeepSpeed engine trains), and the
bare ``--deepspeed`` flag, which DeepSpeed scripts pass with it, needs it.
"""
import argparse
import json
import os
import sys
from typing import List

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

class _LauncherArgs(argparse.ArgumentParser):
    """The launchers' own options; everything else goes to the training CLI."""

    def error(self, message: str):
        # One line, exit 2, like every other input error of moe_train.
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _add_launcher_options(p) -> None:
    p.add_argument("--deepspeed_config", metavar="JSON",
                   help="DeepSpeed JSON config: the DeepSpeed engine trains (same as "
                        "--set train.deepspeed_config=JSON)")
    p.add_argument("--deepspeed", action="store_true",
                   help="accepted with --deepspeed_config, as DeepSpeed scripts pass it")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", metavar="N",
                   help="set by the deepspeed launcher; dropped (LOCAL_RANK says the same)")


def launcher_args(argv: List[str]):
    """``(options, rest)``: --local_rank / --deepspeed_config / --deepspeed
    taken out of ``argv``, the rest left for ``train_main``."""
    p = _LauncherArgs(add_help=False, allow_abbrev=False)
    _add_launcher_options(p)
    return p.parse_known_args(argv)


def print_help() -> None:
    """The training options followed by the launcher options."""
    from moe_train.cli import train_parser

    p = train_parser("launch/train.py")
    p.description = ("Train a Mixture-of-Experts language model under torchrun, the deepspeed "
                     "launcher, or as one process.")
    _add_launcher_options(p.add_argument_group("launcher options"))
    p.print_help()


def main() -> int:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print_help()
        return 0
    args, argv = launcher_args(sys.argv[1:])
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", args.local_rank)
    if args.deepspeed and args.deepspeed_config is None:
        # Without a config file the flag alone would silently train without DeepSpeed.
        print("error: --deepspeed needs --deepspeed_config JSON (or train.deepspeed_config in "
              "the config, without --deepspeed)", file=sys.stderr)
        return 2
    if args.deepspeed_config is not None:
        # A JSON string is a YAML string: any path survives --set's YAML parsing.
        argv += ["--set", "train.deepspeed_config=" + json.dumps(args.deepspeed_config)]
    from moe_train.cli import train_main

    return train_main(argv, prog="launch/train.py")


if __name__ == "__main__":
    sys.exit(main())
