"""params.yaml as text: reading it as YAML 1.2 (as DVC does), dotted-key overrides, and how the config classes of
`florence_ops.config` refuse bad values: strictly, with one line naming the key.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from florence_ops.errors import ConfigError

T = TypeVar("T")


def validated(cls: type[T]) -> type[T]:
    """`cls` as a pydantic dataclass: unknown keys refused, bad values a one-line `ConfigError` naming the key.

    Numbers and bools are strict (StrictInt, StrictFloat, StrictBool fields) because YAML gives them typed: a quoted
    "12" or `yes` is a mistake, not a number or a bool. An int is still accepted where a float is expected.
    """
    cls = dataclass(cls, config=ConfigDict(extra="forbid"))
    build = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            build(self, *args, **kwargs)
        except ValidationError as error:  # also wraps the ConfigError of a __post_init__ check
            raise ConfigError(validation_problem(error, cls)) from None

    cls.__init__ = functools.wraps(build)(__init__)
    return cls


def read_yaml(path: str | Path) -> Any:
    """A YAML file parsed as YAML 1.2 like DVC does (`1e-06` is a float) into plain dicts, lists and scalars; a missing
    file or a syntax error raises `ConfigError`, one line naming the file and the line to fix."""
    try:
        return _yaml().load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    except YAMLError as error:
        raise ConfigError(f"{path}: {_yaml_problem(error)}; fix the YAML syntax there") from None


def parse_value(text: str) -> Any:
    """A value as YAML 1.2 reads it (`1e-06` a float, `null` None, `[a, b]` a list), for `--set key=value` overrides."""
    try:
        return _yaml().load(text)
    except YAMLError as error:
        raise ConfigError(f"{text!r}: {_yaml_problem(error)}") from None


def _yaml() -> YAML:
    # DVC reads params.yaml with ruamel.yaml's safe loader too, so both see the same values. pure: the same parser and
    # error positions with or without the C extension; a new one per call, as a YAML instance is not thread-safe.
    return YAML(typ="safe", pure=True)


def _yaml_problem(error: YAMLError) -> str:
    """Where and what the parser found wrong, on one line (its own message spans several)."""
    if not isinstance(error, MarkedYAMLError) or error.problem_mark is None:
        return "invalid YAML: " + " ".join(str(error).split())
    mark = error.problem_mark
    where = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    if error.context and error.context_mark is not None:
        where += f" ({error.context} opened at line {error.context_mark.line + 1})"
    return where


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """`raw` (params as read from YAML) with each dotted key of `overrides` set in place; returns `raw`."""
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


EXPECTED = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str", "list_type": "a list"}


def validation_problem(error: ValidationError, cls: type) -> str:
    """pydantic's first complaint on one line naming its key: `model.tiny.vision_dims[1]: expected int, got 'x'`."""
    first = error.errors()[0]
    kind, loc, ctx = first["type"], first["loc"], first.get("ctx", {})
    if isinstance(ctx.get("error"), ConfigError):  # a __post_init__ check, already one line
        return str(ctx["error"])
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".") or "params"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        for name in loc[:-1]:
            cls = cls.__pydantic_fields__[name].annotation
        return f"{key}: unknown key (known: {', '.join(sorted(cls.__pydantic_fields__))})"
    if kind == "literal_error":
        return f"{key}: expected one of {ctx['expected']}, got {first['input']!r}"
    expected = "a mapping" if kind.startswith("dataclass") else EXPECTED.get(kind)
    return f"{key}: {f'expected {expected}' if expected else first['msg'].lower()}, got {first['input']!r}"
