"""pydantic's validation errors as :class:`ConfigError` messages that name the key as the TOML file writes it.

A message gives the dotted path of the key (``planning.dose_grid_mm``, ``profiles[1].goals[0].limit``,
``destinations[0].port``), the value found and what is allowed; unknown keys are listed with the keys
the table knows, missing ones with the table that lacks them.

Validators raise ``ValueError``. A validator of one value says what is allowed ("allowed auto, cpu,
cuda, cuda:N") and the key and the value are written before it. A validator of a whole table starts
its message with one of the table's keys ("enabled = true needs ...") and the table's path is written
before it (``tls.enabled = true needs ...``); any other message of a table gets ``[path]`` before it.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from collections.abc import Sequence
from typing import Any

import annotated_types
import pydantic
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from core.errors import ConfigError

_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
    "tuple_type": "a list", "list_type": "a list", "iterable_type": "a list",
    "dict_type": "a table", "dataclass_type": "a table", "dataclass_exact_type": "a table", "model_type": "a table",
}
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_LENGTH_ERRORS = {"too_short", "too_long", "string_too_short", "string_too_long"}
_UNKNOWN_ERRORS = {"extra_forbidden", "unexpected_keyword_argument"}


def settings_error(exc: pydantic.ValidationError, root: type, where: str = "") -> ConfigError:
    """One :class:`ConfigError` for every problem ``exc`` lists, each naming its key.

    Parameters
    ----------
    exc
        The error pydantic raised validating ``root`` (a settings dataclass).
    root
        The dataclass that was validated; keys are paths inside it.
    where
        Written before every key: "" for the whole file, a class name for one section built in code.
    """
    entries: list[str | tuple[str, tuple[Any, ...]]] = []  # messages, and groups of keys in the order they came
    groups: dict[tuple[str, tuple[Any, ...]], list[str]] = {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p != "[key]")
        if err["type"] in _UNKNOWN_ERRORS or err["type"] == "missing":
            group = ("missing" if err["type"] == "missing" else "unknown", loc[:-1])
            if group not in groups:
                groups[group] = []
                entries.append(group)
            groups[group].append(str(loc[-1]))
        else:
            entries.append(_message(err, root, loc, where))
    messages = [e if isinstance(e, str) else _keys_message(*e, groups[e], root, where) for e in entries]
    unique = list(dict.fromkeys(messages))
    if len(unique) == 1:
        return ConfigError(unique[0])
    return ConfigError(f"{len(unique)} settings are invalid:\n  " + "\n  ".join(unique))


def _keys_message(kind: str, parent: tuple[Any, ...], names: list[str], root: type, where: str) -> str:
    """Unknown keys of a table, with the keys it knows, or the required keys it lacks."""
    table = _key(where, parent)
    place = f"[{table}]" if table else "the top level"
    if kind == "missing":
        return f"{place} is missing required setting(s) {names}"
    info = _field_at(root, parent)
    known = sorted(_fields_of(info.annotation)) if info is not None else []
    return f"unknown setting(s) {sorted(names)} in {place}" + (f"; known: {known}" if known else "")


def _message(err: ErrorDetails, root: type, loc: tuple[Any, ...], where: str) -> str:
    """The message of one error that is not an unknown or missing key."""
    key = _key(where, loc)
    kind = err["type"]
    value = err["input"]
    ctx = err.get("ctx") or {}
    info = _field_at(root, loc)
    if kind in ("value_error", "assertion_error"):
        text = str(ctx.get("error", err["msg"]))
        fields = _fields_of(info.annotation) if info is not None else {}
        if fields or not loc:  # a table's own validator
            return _table_message(key, text, fields)
        return f"{key} {_shown(value)}: {text}" if _is_scalar(value) else f"{key}: {text}"
    if kind in _TYPE_WORDS:
        return f"{key or 'the configuration'} must be {_TYPE_WORDS[kind]}, got {_shown(value)}"
    if kind in ("enum", "literal_error"):
        tp = info.annotation if info is not None else None
        allowed = ([m.value for m in tp] if isinstance(tp, type) and issubclass(tp, enum.Enum)
                   else ctx.get("expected", "?"))
        return f"{key} = {_shown(value)} is not allowed; allowed values: {allowed}"
    if kind in _RANGE_ERRORS:
        noun = f"{info.title} " if info is not None and info.title else ""
        bounds = _range(info.metadata) if info is not None else ""
        return f"{key} must be {noun}{bounds or err['msg']}, got {_shown(value)}"
    if kind in _LENGTH_ERRORS:
        return _length_message(key, value, info, kind.startswith("string"))
    return f"{key}: {err['msg']}, got {_shown(value)}"


def _table_message(key: str, text: str, fields: dict[str, FieldInfo]) -> str:
    """A table validator's message, after the table's path: ``tls`` + ``enabled = true needs ...``."""
    if not key:
        return text
    first = re.match(r"[A-Za-z_]\w*", text)
    if first is not None and first.group() in fields:
        return f"{key}.{text}"
    return f"[{key}] {text}"


def _length_message(key: str, value: Any, info: FieldInfo | None, text: bool) -> str:
    lo, hi = _length_limits(info)
    if text:
        if lo == 1 and hi is None:
            return f"{key} must not be empty"
        return f"{key} {_shown(value)} must be {lo or 0}-{hi} characters long" if hi else f"{key} {_shown(value)} is too short"
    count = len(value) if isinstance(value, Sequence) else "?"
    allowed = (f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None
               else f"at most {hi}" if not lo else f"{lo} to {hi}")
    items = "item" if allowed.endswith(" 1") else "items"
    return f"{key} must have {allowed} {items}, got {count}"


def _length_limits(info: FieldInfo | None) -> tuple[int | None, int | None]:
    """(min, max) number of items or characters a value may have; a fixed-length tuple gives its length twice."""
    if info is None:
        return None, None
    args = typing.get_args(info.annotation)
    if typing.get_origin(info.annotation) is tuple and args and args[-1] is not Ellipsis:
        return len(args), len(args)
    lo = next((m.min_length for m in info.metadata if isinstance(m, annotated_types.MinLen)), None)
    hi = next((m.max_length for m in info.metadata if isinstance(m, annotated_types.MaxLen)), None)
    return lo, hi


def _range(metadata: list[Any]) -> str:
    """The allowed range as text: ``in [1, 10]``, ``in (0, 1)``, ``>= 0``, ``> 0`` or ``<= 5``."""
    lower: list[tuple[Any, str, str]] = [(m.ge, "[", ">=") for m in metadata if isinstance(m, annotated_types.Ge)]
    lower += [(m.gt, "(", ">") for m in metadata if isinstance(m, annotated_types.Gt)]
    upper: list[tuple[Any, str, str]] = [(m.le, "]", "<=") for m in metadata if isinstance(m, annotated_types.Le)]
    upper += [(m.lt, ")", "<") for m in metadata if isinstance(m, annotated_types.Lt)]
    if lower and upper:
        return f"in {lower[0][1]}{_number(lower[0][0])}, {_number(upper[0][0])}{upper[0][1]}"
    if lower or upper:
        bound, _, op = (lower or upper)[0]
        return f"{op} {_number(bound)}"
    return ""


def _field_at(root: type, loc: tuple[Any, ...]) -> FieldInfo | None:
    """The field (type and constraints) at ``loc`` inside ``root``; None where the path leads nowhere."""
    info = FieldInfo.from_annotation(root)
    for part in loc:
        tp = info.annotation
        fields = _fields_of(tp)
        if fields:
            found = fields.get(part) if isinstance(part, str) else None
            if found is None:
                return None
            info = found
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item = args[0]
        elif origin is tuple and isinstance(part, int) and part < len(args):
            item = args[part]
        elif origin is dict and len(args) == 2:
            item = args[1]
        else:
            return None
        info = FieldInfo.from_annotation(item)
    return info


def _fields_of(tp: Any) -> dict[str, FieldInfo]:
    """The fields of a settings dataclass; empty for anything else."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return dict(getattr(tp, "__pydantic_fields__", {}))
    return {}


def _key(where: str, loc: tuple[Any, ...]) -> str:
    """A path as the TOML file writes it: ``profiles[1].goals[0].limit``."""
    key = where
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _shown(value: Any) -> str:
    """A value as the message shows it: TOML booleans, quoted strings, "a table" and "a list" for the rest."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 80 else repr(value[:77] + "...")
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _number(x: Any) -> str:
    """A bound as the message shows it: 1 rather than 1.0."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)
