"""Configuration: one TOML file parsed into frozen, typed settings.

The schema is a tree of frozen pydantic dataclasses: this module holds the root (:class:`Settings`),
``config_sections`` the sections about the node, ``config_planning`` the [planning] section and
``config_profiles`` the protocol profiles; ``config_types`` the field types with their ranges and
``config_errors`` the messages. Every setting's field carries its meaning and unit
(:func:`iter_settings`); the reference file ``config/airt.toml`` documents every option and a test
checks it covers them all. Unknown keys, values of the wrong type, ``nan``, ``inf`` and values out of
range raise :class:`ConfigError` naming the key as the TOML file writes it and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import tomllib
import typing
from pathlib import Path
from typing import Any, Self

import pydantic
from pydantic import model_validator
from pydantic.fields import FieldInfo

from appliance.config_errors import settings_error
from appliance.config_planning import P1Policy, PlanningMethod, PlanningSettings, check_sparing_pair
from appliance.config_profiles import (
    CHHIP,
    PACE_B,
    PTV_NAME_DOSE_RE,
    Comparison,
    Goal,
    Profile,
    check_profiles,
    default_profiles,
    ptv_name_dose_gy,
)
from appliance.config_sections import (
    DeliverySettings,
    Destination,
    HttpSettings,
    MachineSettings,
    NodeSettings,
    Peer,
    SchedulerSettings,
    StorageSettings,
    StructureSettings,
    TlsSettings,
    WorkerSettings,
)
from appliance.config_types import AE_TITLE_RE, section, setting, unit_of
from core.errors import ConfigError

__all__ = [
    "AE_TITLE_RE", "CHHIP", "PACE_B", "PTV_NAME_DOSE_RE", "Comparison", "DeliverySettings", "Destination", "Goal",
    "HttpSettings", "MachineSettings", "NodeSettings", "P1Policy", "Peer", "PlanningMethod", "PlanningSettings",
    "Profile", "SchedulerSettings", "Settings", "StorageSettings", "StructureSettings", "TlsSettings",
    "WorkerSettings", "check_sparing_pair", "iter_settings", "load_settings", "ptv_name_dose_gy",
    "render_settings", "settings_from_dict", "unit_of",
]


@section
class Settings:
    """All settings of the appliance."""

    node: NodeSettings = setting("The Storage SCP", default_factory=NodeSettings)
    tls: TlsSettings = setting("TLS", default_factory=TlsSettings)
    peers: tuple[Peer, ...] = setting("Calling peers allowed to connect (the allow-list)", default=())
    destinations: tuple[Destination, ...] = setting("Where results are sent", default=())
    storage: StorageSettings = setting("Storage", default_factory=StorageSettings)
    scheduler: SchedulerSettings = setting("Scheduler", default_factory=SchedulerSettings)
    worker: WorkerSettings = setting("Worker", default_factory=WorkerSettings)
    delivery: DeliverySettings = setting("Delivery", default_factory=DeliverySettings)
    http: HttpSettings = setting("HTTP endpoint (health, metrics, job pages)", default_factory=HttpSettings)
    structures: StructureSettings = setting("Structure names", default_factory=StructureSettings)
    machine: MachineSettings = setting("Machine", default_factory=MachineSettings)
    planning: PlanningSettings = setting("Planning", default_factory=PlanningSettings)
    profiles: tuple[Profile, ...] = setting("Protocol profiles", default_factory=default_profiles)

    @model_validator(mode="after")
    def _sections_together(self) -> Self:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destinations have duplicate names: {names}")
        if any(d.tls for d in self.destinations) and not self.tls.ca_file:
            raise ValueError("a destination has tls = true but [tls] ca_file is empty")
        check_profiles(self.profiles, self.planning.profile, self.node.ae_title)
        return self

    def profile(self, name: str | None = None) -> Profile:
        """The profile called ``name`` (default: ``planning.profile``); ConfigError naming the known ones."""
        wanted = name or self.planning.profile
        for p in self.profiles:
            if p.name == wanted:
                return p
        raise ConfigError(f"no profile named {wanted!r}; known: {[p.name for p in self.profiles]}")

    @property
    def called_ae_titles(self) -> tuple[str, ...]:
        """Every AE title the node answers as: its own, then one per profile that has one."""
        return (self.node.ae_title, *(p.called_ae_title for p in self.profiles if p.called_ae_title))

    @property
    def data_dir(self) -> Path:
        """The data directory as a Path."""
        return Path(self.storage.data_dir)

    @property
    def database_url(self) -> str:
        """The effective SQLAlchemy database URL."""
        return self.storage.database_url or f"sqlite:///{self.data_dir / 'airt.sqlite3'}"


@functools.cache
def _adapter() -> pydantic.TypeAdapter[Settings]:
    return pydantic.TypeAdapter(Settings)


def settings_from_dict(table: dict[str, Any]) -> Settings:
    """Settings from an already-parsed TOML table (validated); ConfigError naming every bad key."""
    moved = [k for k in ("prescription", "goals") if k in table]
    if moved:
        raise ConfigError(f"{moved}: the prescription and the goal list now belong to a protocol profile; "
                          "write them in a [[profiles]] table (dose_gy, fractions, normalisation, "
                          "[[profiles.goals]]) and name it in planning.profile; see config/airt.toml")
    try:
        return _adapter().validate_python(table)
    except pydantic.ValidationError as exc:
        raise settings_error(exc, Settings) from None


def load_settings(path: str | Path | None = None, *, overrides: dict[str, Any] | None = None) -> Settings:
    """Read and validate a TOML configuration file (``None``: built-in defaults).

    ``overrides`` is merged one level deep over the file's tables (used by ``airt demo``).
    """
    table: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {p} does not exist; pass --config PATH") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {p} is not valid TOML: {exc}") from exc
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(table.get(k), dict):
            table[k] = {**table[k], **v}
        else:
            table[k] = v
    return settings_from_dict(table)


def iter_settings(cls: Any = Settings, prefix: str = "") -> typing.Iterator[tuple[str, FieldInfo]]:
    """Every leaf setting as (dotted key, field); lists of tables use ``name[]`` keys.

    The field's ``description`` is the setting's meaning and :func:`unit_of` its unit.
    """
    for name, info in cls.__pydantic_fields__.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = info.annotation
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from iter_settings(tp, key)
        elif typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
            yield from iter_settings(args[0], key + "[]")
        else:
            yield key, info


def render_settings(settings: Settings) -> str:
    """The effective settings as TOML-like text (``airt config check``)."""
    lines: list[str] = []

    def fmt(v: Any) -> str:
        if isinstance(v, enum.Enum):
            return repr(v.value).replace("'", '"')
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, tuple | list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {fmt(x)}" for k, x in v.items()) + " }"
        return repr(v)

    def table(obj: Any, name: str, array: bool = False) -> None:
        lines.append(f"[[{name}]]" if array else f"[{name}]")
        nested = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0]):
                nested.append((f.name, v))
            else:
                lines.append(f"{f.name} = {fmt(v)}")
        lines.append("")
        for sub_name, items in nested:
            for item in items:
                table(item, f"{name}.{sub_name}", array=True)

    for f in dataclasses.fields(settings):
        v = getattr(settings, f.name)
        if dataclasses.is_dataclass(v):
            table(v, f.name)
        else:
            for item in v:
                table(item, f.name, array=True)
            if not v:
                lines.append(f"{f.name} = []")
                lines.append("")
    return "\n".join(lines)
