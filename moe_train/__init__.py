"""moe_train: Mixture-of-Experts language model training."""

__version__ = "0.1.0"


def load_model(path):
    """Load ``(model, config)`` from a run directory or a checkpoint directory."""
    from moe_train.train.checkpoint import load_model as _load

    return _load(path)
