"""Frozen dataclasses ⇄ plain msgpack-ready maps, each value checked against its type hint.

The message kinds in `protocol/` are declared as dataclasses; this module is what makes their
type hints the schema: `to_wire` turns a message into dicts/lists/scalars, `from_wire` builds one
back from an untrusted map, checking every field (str, int, float, bool, None, unions,
`tuple[X, ...]`, `dict[str, X]`, nested dataclasses) and refusing missing or unknown fields.
Fields marked with `frames_field()` travel as separate frames, never in the map.
Failures raise `SchemaError` with the path of the offending field; `wire.py` turns it into a
`WireError`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Union


class SchemaError(ValueError):
    """A map that does not fit the dataclass it should build; the message names the field."""


def frames_field() -> Any:
    """A field holding payload frames: sent after the header, not inside it, never copied."""
    return dataclasses.field(default=(), metadata={"frames": True}, compare=False, repr=False)


def is_frames(f: dataclasses.Field[Any]) -> bool:
    return bool(f.metadata.get("frames"))


def has_frames(cls: type) -> bool:
    return any(is_frames(f) for f in dataclasses.fields(cls))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def to_wire(value: Any) -> Any:
    """Dataclasses to maps and tuples to lists, recursively; frame fields left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return {f.name: to_wire(getattr(value, f.name)) for f in fields if not is_frames(f)}
    if isinstance(value, tuple):
        return [to_wire(v) for v in value]
    return value


def _check(value: Any, tp: Any, path: str) -> Any:
    """`value` if it fits type hint `tp` (lists become tuples, maps nested dataclasses)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        arms = [a for a in args if a is not type(None)] if value is not None else list(args)
        if len(arms) == 1:  # `X | None` given a value: X's own error names the field that is wrong
            return _check(value, arms[0], path)
        for arg in arms:
            try:
                return _check(value, arg, path)
            except SchemaError:
                continue
        raise SchemaError(f"{path} = {value!r:.60} is not {tp}")
    if origin is tuple:
        if not isinstance(value, list):
            raise SchemaError(f"{path} should be a list, got {type(value).__name__}")
        return tuple(_check(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{path} should be a map, got {type(value).__name__}")
        return {_check(k, str, path): _check(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_wire(tp, value, path)
    if tp is type(None):
        ok = value is None
    elif tp in (int, float):  # bool is an int to Python, never to us
        ok = isinstance(value, int | float if tp is float else int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise SchemaError(f"{path} should be {getattr(tp, '__name__', tp)}, got {type(value).__name__}")
    return value


def from_wire(cls: type, header: Any, path: str, **frames: Any) -> Any:
    """An instance of dataclass `cls` from map `header` (plus frame fields given as keywords).

    `cls.__post_init__` may raise its own errors (e.g. `WireError`); they pass through.
    """
    if not isinstance(header, dict):
        raise SchemaError(f"{path} should be a map, got {type(header).__name__}")
    fields = [f for f in dataclasses.fields(cls) if not is_frames(f)]
    if unknown := set(header) - {f.name for f in fields}:
        raise SchemaError(f"{path} has unknown fields {sorted(map(str, unknown))}")
    kwargs = dict(frames)
    for f in fields:
        if f.name in header:
            kwargs[f.name] = _check(header[f.name], _hints(cls)[f.name], f"{path}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SchemaError(f"{path} is missing field {f.name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, OverflowError) as e:  # a check in __post_init__ met absurd values
        raise SchemaError(f"{path}: {e}") from None
