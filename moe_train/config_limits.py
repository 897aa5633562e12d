"""Value limits that torch, numpy or plain arithmetic would otherwise enforce
late, with a traceback, after a run has started (issue 12, "validate
everything first").

Found by reading where each field ends up:

- every float field: finite (``lr=.inf`` or ``nan`` trains NaN);
- every integer field: ``|v| < 2**31`` (sizes and step counts are tensor
  dimensions and loop bounds; a 20-digit size overflows shape arithmetic);
- ``train.seed``: ``[0, 2**32)`` (``np.random.seed`` and numpy's
  SeedSequence refuse negatives and larger values);
- ``train.beta1``/``beta2``: ``[0, 1)`` (torch's AdamW raises otherwise,
  and ``beta=1`` divides by zero in the bias correction);
- ``model.norm_eps``: ``> 0`` (0 divides by zero on an all-zero row);
- ``model.rope.*`` floats: finite (checked above) and ``base > 0``
  (config_validate.validate);
- ``train.max_skipped_steps``: ``>= 1``.

Messages never print a whole oversized number (a 4000-digit integer cannot
even be formatted by Python).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Tuple

INT_LIMIT = 2 ** 31
SEED_LIMIT = 2 ** 32


def _fields(obj: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            yield from _fields(value, path)
        else:
            yield path, value


def show(value: Any) -> str:
    """``value`` for an error message, shortened when it is a huge integer."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > 64:
        return f"an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"
    return repr(value)


def check_int_limits(cfg: Any, error=ValueError) -> None:
    """Raise ``error`` (config.ConfigError) naming the first integer field of
    ``cfg`` (a Config) outside ``±2**31``. Runs before any other check, whose
    messages format the values."""
    for path, value in _fields(cfg):
        if isinstance(value, bool) or not isinstance(value, int) or path == "train.seed":
            continue
        if not -INT_LIMIT < value < INT_LIMIT:
            raise error(f"{path} ({show(value)}) must be between -2**31 and 2**31 "
                        "(exclusive)")


def check_limits(cfg: Any, error=ValueError) -> None:
    """Raise ``error`` (config.ConfigError) naming the first field of ``cfg``
    (a Config) that is outside the other limits in the module docstring (run
    after the component checks, whose messages are more specific)."""
    check_int_limits(cfg, error)
    for path, value in _fields(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{path} ({value}) must be a finite number")
    t = cfg.train
    if not 0 <= t.seed < SEED_LIMIT:
        raise error(f"train.seed ({show(t.seed)}) must be in [0, 2**32)")
    for name in ("beta1", "beta2"):
        beta = getattr(t, name)
        if not 0.0 <= beta < 1.0:
            raise error(f"train.{name} ({beta}) must be in [0, 1)")
    if not cfg.model.norm_eps > 0:
        raise error(f"model.norm_eps ({cfg.model.norm_eps}) must be > 0")
    skips = getattr(t, "max_skipped_steps", 1)
    if skips < 1:
        raise error(f"train.max_skipped_steps ({skips}) must be >= 1")
