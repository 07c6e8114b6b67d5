"""The building blocks of the settings schema: the section decorator, ``setting(...)`` and the value types.

Every section of the configuration is a frozen pydantic dataclass (:func:`section`): unknown keys are
refused, ``nan`` and ``inf`` are refused, and integers, numbers and booleans are strict (a TOML string
``"8"`` is not taken for the integer 8, nor ``1`` for true: a value of the wrong type is a mistake in the
file, not something to guess at). Enumerations and lists stay lax because TOML writes them as strings and
arrays. Ranges live in the field types (``Field(ge=..., le=...)``); the meaning and unit of a setting are
its field's ``description`` and ``json_schema_extra["unit"]`` (:func:`setting`, :func:`unit_of`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, dataclass_transform

import pydantic
import pydantic.dataclasses
from pydantic import AfterValidator, ConfigDict, Field, Strict
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonDict
from pydantic_core import PydanticUndefined

from appliance.config_errors import settings_error

T = TypeVar("T")

AE_TITLE_RE = re.compile(r"^[ -\[\]-~]{1,16}$")  # printable ASCII without backslash, 1-16 chars

#: The pydantic configuration of every section.
SECTION_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


def setting(
    text: str,
    unit: str = "",
    *,
    default: Any = PydanticUndefined,
    default_factory: Callable[[], Any] | None = None,
    **constraints: Any,
) -> Any:
    """A setting: its meaning (``text``), its unit, its default (none: the key is required) and its range.

    Parameters
    ----------
    text
        What the setting means, as the reference file and ``airt config`` show it.
    unit
        Its unit ("s", "mm", "count", ...), or "" when it has none.
    default, default_factory
        The default value, or a function making it; neither: the setting is required.
    **constraints
        Range and length limits as ``pydantic.Field`` takes them (``ge``, ``gt``, ``le``, ``lt``,
        ``min_length``, ``max_length``).
    """
    extra: JsonDict | None = {"unit": unit} if unit else None
    if default_factory is not None:
        return Field(default_factory=default_factory, description=text, json_schema_extra=extra, **constraints)
    return Field(default, description=text, json_schema_extra=extra, **constraints)


def unit_of(info: FieldInfo) -> str:
    """The unit of a setting (see :func:`setting`), "" when it has none."""
    extra = info.json_schema_extra
    return str(extra.get("unit", "")) if isinstance(extra, dict) else ""


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, Field, setting))
def section(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen, validating dataclass whose bad values raise :class:`ConfigError`.

    The class stays a real dataclass (``dataclasses.fields``, ``dataclasses.replace`` and
    ``dataclasses.asdict`` work on it); constructing one, ``dataclasses.replace`` included,
    validates every field and the section's own validators, and a bad value raises
    :class:`core.errors.ConfigError` naming the field (``PlanningSettings.dose_grid_mm ...``).
    """
    built: Any = pydantic.dataclasses.dataclass(frozen=True, config=SECTION_CONFIG)(cls)
    validate = built.__init__
    names = [f.name for f in dataclasses.fields(built) if f.init]

    @functools.wraps(validate)
    def validating_init(self: Any, *args: Any, **kwargs: Any) -> None:
        by_name = dict(zip(names, args))
        if len(args) <= len(names) and not by_name.keys() & kwargs.keys():  # so that an error names the field
            kwargs, args = {**by_name, **kwargs}, ()
        try:
            validate(self, *args, **kwargs)
        except pydantic.ValidationError as exc:
            raise settings_error(exc, built, where=built.__name__) from None

    built.__init__ = validating_init
    return built


def matching(pattern: str, allowed: str) -> AfterValidator:
    """A string validator: the whole value must match ``pattern``; ``allowed`` says what may be written."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(allowed)
        return value

    return AfterValidator(check)


def _ae_title(value: str) -> str:
    if not AE_TITLE_RE.fullmatch(value) or not value.strip():
        raise ValueError("an AE title is 1-16 printable ASCII characters, no backslash")
    return value


def _ae_title_or_empty(value: str) -> str:
    return _ae_title(value) if value else value


def _regular_expression(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"bad regular expression: {exc}") from None
    return value


Int = Annotated[int, Strict()]
"""An integer; a TOML float or string is refused, not converted."""
Float = Annotated[float, Strict()]
"""A finite number (a TOML integer is taken as the same number); strings and booleans are refused."""
Bool = Annotated[bool, Strict()]
"""true or false; 0, 1 and strings are refused."""

Port = Annotated[int, Strict(), Field(ge=1, le=65535, title="a TCP port")]
PortOrAny = Annotated[int, Strict(), Field(ge=0, le=65535, title="a TCP port")]
"""A TCP port to listen on; 0 asks the system for any free port."""
Count = Annotated[int, Strict(), Field(gt=0)]
PositiveSeconds = Annotated[float, Strict(), Field(gt=0)]
NonNegativeSeconds = Annotated[float, Strict(), Field(ge=0)]
Positive = Annotated[float, Strict(), Field(gt=0)]
NonNegative = Annotated[float, Strict(), Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(gt=0, lt=1)]
"""A fraction strictly between 0 and 1."""
Angle = Annotated[float, Strict(), Field(ge=0, lt=360)]
"""An angle in degrees, [0, 360)."""
Sparing = Annotated[float, Strict(), Field(ge=0, le=0.5)]
"""A suppression factor s_o of the AI pipeline."""

AeTitle = Annotated[str, AfterValidator(_ae_title)]
AeTitleOrEmpty = Annotated[str, AfterValidator(_ae_title_or_empty)]
RegularExpression = Annotated[str, AfterValidator(_regular_expression)]
