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
import json
import os
import sys
from typing import List, Optional, Tuple

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


def strip_local_rank(argv: List[str]) -> Tuple[List[str], Optional[str]]:
    """argv without ``--local_rank N`` / ``--local-rank=N``, and the value seen."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name in _LOCAL_RANK_FLAGS:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, value


def deepspeed_args(argv: List[str]) -> Tuple[List[str], Optional[str], bool]:
    """argv without ``--deepspeed_config PATH`` / ``--deepspeed_config=PATH``
    and ``--deepspeed``; the path seen (or None) and whether --deepspeed was."""
    rest, path, flag, i = [], None, False, 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        if name == "--deepspeed_config":
            if eq:
                path = inline
            elif i + 1 < len(argv):
                path = argv[i + 1]
                i += 1
            else:
                path = ""
        elif argv[i] == "--deepspeed":
            flag = True
        else:
            rest.append(argv[i])
        i += 1
    return rest, path, flag


def main() -> int:
    argv, local_rank = strip_local_rank(sys.argv[1:])
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    argv, ds_config, ds_flag = deepspeed_args(argv)
    if ds_config == "":
        print("error: --deepspeed_config needs the path of a DeepSpeed JSON config",
              file=sys.stderr)
        return 2
    if ds_flag and ds_config is None:
        # Without a config file the flag alone would silently train without DeepSpeed.
        print("error: --deepspeed needs --deepspeed_config JSON (or train.deepspeed_config in "
              "the config, without --deepspeed)", file=sys.stderr)
        return 2
    if ds_config is not None:
        # A JSON string is a YAML string: any path survives --set's YAML parsing.
        argv += ["--set", "train.deepspeed_config=" + json.dumps(ds_config)]
    from moe_train.cli import train_main

    return train_main(argv, prog="launch/train.py")


if __name__ == "__main__":
    sys.exit(main())
