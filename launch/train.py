#!/usr/bin/env python
"""One training script for torchrun and the deepspeed launcher.

    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny.yaml
    deepspeed --num_gpus 2 launch/train.py --config configs/tiny.yaml

Takes the options of ``python -m moe_train.train``. The deepspeed launcher
appends ``--local_rank N`` (older torch.distributed.launch ``--local-rank=N``);
it is accepted and dropped, since LOCAL_RANK in the environment says the same.
"""
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


def main() -> int:
    argv, local_rank = strip_local_rank(sys.argv[1:])
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    from moe_train.cli import train_main

    return train_main(argv, prog="launch/train.py")


if __name__ == "__main__":
    sys.exit(main())
