"""Loading a configuration: a :class:`Config` from YAML with ``--set
section.key=value`` overrides, checked field by field against the dataclasses
of :mod:`moe_train.config_schema` (re-exported here, so that
``from moe_train.config import ModelConfig`` keeps working).

Unknown keys and wrong types are errors; cross-field rules live in
:meth:`Config.validate`. Every error is a :class:`ConfigError` whose message
names the field path and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, List, Optional

import yaml

from moe_train.config_limits import show
# The schema lives in moe_train.config_schema; re-exported here for callers of this module.
from moe_train.config_schema import (AUX_LOSS_COEF_DEFAULTS, CHOICES, BlendPart,  # noqa: F401
                                     Config, ConfigError, DataConfig, ModelConfig, MoEConfig,
                                     ParallelConfig, RopeConfig, RopeScalingConfig, TrainConfig,
                                     check_choice, moe_for_model)
from moe_train.config_yaml import YamlValueError, load_yaml, load_yaml_file


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, args[0], value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {tp.__name__} fields, got {show(value)}")
        return from_dict(tp, value, path)
    if value is None:
        raise ConfigError(f"{path} must be a {_type_name(tp)}, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, got {show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be an integer, got {show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{path} ({show(value)}) is too large for a number")
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except (ValueError, OverflowError):
                pass
        raise ConfigError(f"{path} must be a number, got {show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} must be a string, got {show(value)}")
    return value


def from_dict(cls: Any, data: Dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {path}; allowed: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(path, hints[key], value)
    return cls(**kwargs)


def _parse_scalar(key: str, text: str) -> Any:
    try:
        return load_yaml(text) if text != "" else ""
    except YamlValueError as exc:
        raise ConfigError(f"--set {key}: {str(exc).replace('line 1: ', '', 1)}")


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(key, text)
    return data


PACKAGED_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
DEFAULT_CONFIG = os.path.join(PACKAGED_CONFIGS, "tiny.yaml")


def find_config(path: str) -> str:
    """The file ``path`` names: itself when it exists, else a config shipped
    in the package, by name (``tiny``) or by its repository path
    (``configs/tiny.yaml``), so that examples work from any directory."""
    if os.path.isfile(path):
        return path
    rel = path[len("configs/"):] if path.startswith("configs/") else path
    for candidate in (rel, rel + ".yaml"):
        packaged = os.path.join(PACKAGED_CONFIGS, candidate)
        if not os.path.isabs(candidate) and os.path.isfile(packaged):
            return packaged
    raise ConfigError(f"config file not found: {path} (nor a packaged config of that name)")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                world_size: Optional[int] = None) -> Config:
    """Load YAML at ``path`` (a file, or the name of a packaged config such as
    ``tiny``; the embedded tiny config when None), apply overrides, build and
    validate. Raises ConfigError with a one-line message."""
    path = find_config(path or DEFAULT_CONFIG)
    try:
        data = load_yaml_file(path)
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}")
    except YamlValueError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections (model, moe, "
                          f"parallel, data, train), got a {type(data).__name__}")
    return config_from_dict(data or {}, overrides, world_size)


def config_from_dict(data: Dict[str, Any], overrides: Optional[List[str]] = None,
                     world_size: Optional[int] = None) -> Config:
    """Build and validate a Config from a raw dict plus overrides."""
    data = apply_overrides(dict(data or {}), overrides or [])
    cfg = from_dict(Config, data)
    cfg.validate(world_size)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML."""
    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)

