"""The training loop, optimizer, checkpoints and metrics.

``from moe_train.train.trainer import train`` is the launcher-agnostic entry
(torchrun, the deepspeed launcher and Ray all call it);
``python -m moe_train.train`` is the command line. This package file stays
free of heavy imports so that ``InputError`` can be imported anywhere.
"""


class InputError(ValueError):
    """Bad user input found before training starts (a run directory that
    cannot be written, a missing or incompatible checkpoint, a dataset too
    small). The message is one line naming the field or path; the command line
    prints it as ``error: <msg>`` and exits with status 2."""
