"""Reading config YAML so that every value means what it looks like.

PyYAML implements YAML 1.1, where ``010`` is the octal number 8 and ``1:30``
the base-60 number 90. Written in a config they almost always mean 10 and
a string, so both forms are refused with one line instead of being read
silently (YAML 1.2 and every other config format dropped them). Integers are
refused past 19 digits before Python parses them (a 5000-digit literal
otherwise ends in Python's int-parsing limit), and a value nested deeper than
Python's recursion limit becomes one line instead of a RecursionError.
A file must be UTF-8 text. Everything else is PyYAML's ``safe_load``.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

# Forms YAML 1.1 reads as numbers that do not mean what they look like.
_AMBIGUOUS = [
    (re.compile(r"^[-+]?0[0-9_]+$"),
     "a leading 0 makes YAML 1.1 read it as an octal number; write it without the 0"),
    (re.compile(r"^[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?$"),
     "YAML 1.1 reads a:b as a base-60 number"),
]
_AMBIGUOUS_TAG = "tag:moe_train,2026:ambiguous"
_MAX_INT_DIGITS = 19  # 2**63 has 19 digits; nothing in a config needs more


class YamlValueError(ValueError):
    """A YAML document or value moe_train refuses to read; the message is one
    line and says where (the caller adds the file or --set key)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses ambiguous YAML 1.1 numbers and huge integers."""


# A copy of SafeLoader's resolver table with the ambiguous forms matched
# first, so that they resolve to a tag whose constructor refuses them.
_StrictLoader.yaml_implicit_resolvers = {
    first: list(resolvers) for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "+-0123456789":
    _StrictLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, (_AMBIGUOUS_TAG, re.compile("|".join(p.pattern for p, _ in _AMBIGUOUS))))


def _line(node) -> str:
    return f"line {node.start_mark.line + 1}: " if node.start_mark else ""


def _refuse_ambiguous(loader, node):
    text = loader.construct_scalar(node)
    why = next(reason for pattern, reason in _AMBIGUOUS if pattern.match(text))
    raise YamlValueError(f"{_line(node)}{text} is ambiguous ({why}); quote it (\"{text}\") "
                         "if it is a string")


def _int(loader, node):
    text = loader.construct_scalar(node)
    digits = sum(c.isdigit() for c in text)
    if digits > _MAX_INT_DIGITS:
        raise YamlValueError(f"{_line(node)}an integer of {digits} digits is too large "
                             f"(at most {_MAX_INT_DIGITS} digits)")
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_StrictLoader.add_constructor(_AMBIGUOUS_TAG, _refuse_ambiguous)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _int)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` with the refusals above. Raises
    :class:`YamlValueError` with a one-line message."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except YamlValueError:
        raise
    except RecursionError:
        raise YamlValueError("nested too deeply")
    except yaml.YAMLError as exc:
        raise YamlValueError(" ".join(str(exc).split()))
    except ValueError as exc:  # e.g. a float or int form Python cannot convert
        raise YamlValueError(" ".join(str(exc).split()))


def load_yaml_file(path: str) -> Any:
    """Read ``path`` as UTF-8 YAML (see :func:`load_yaml`). Raises
    :class:`YamlValueError` naming what is wrong, OSError if unreadable."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlValueError(f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                             f"{exc.start})")
    return load_yaml(text)

