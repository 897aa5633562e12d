"""moe_train: Mixture-of-Experts language model training."""

from moe_train.console import quiet_known_warnings as _quiet_known_warnings

__version__ = "0.1.0"

_quiet_known_warnings()


def load_model(path):
    """Load ``(model, config)`` from a run directory or a checkpoint directory."""
    from moe_train.train.checkpoint import load_model as _load

    return _load(path)
