"""The fixed registry of network architectures, and strict config <-> plain-data conversion.

A model folder names each network by a registry name and gives its config as plain JSON data
(ints, floats, lists of ints); :func:`build` turns that into a module using only the classes
listed here. Nothing is imported, evaluated or unpickled from the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

from core.errors import ConfigError
from pipeline.nets.bev2fluence import Bev2Fluence, Bev2FluenceConfig
from pipeline.nets.discriminator import DiscriminatorConfig, FluenceDiscriminator
from pipeline.nets.dose_proposer import DoseProposer, DoseProposerConfig
from pipeline.nets.fast_dose import FastDose, FastDoseConfig

C = TypeVar("C")

#: Registry name -> (config class, network class). The correction network is a ``bev2fluence``
#: with ``in_channels=2``.
REGISTRY: dict[str, tuple[type[Any], type[nn.Module]]] = {
    "dose_proposer": (DoseProposerConfig, DoseProposer),
    "bev2fluence": (Bev2FluenceConfig, Bev2Fluence),
    "fast_dose": (FastDoseConfig, FastDose),
    "discriminator": (DiscriminatorConfig, FluenceDiscriminator),
}


def _lookup(name: str) -> tuple[type[Any], type[nn.Module]]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown network architecture {name!r}; known: {sorted(REGISTRY)} "
            "(the model folder was made by another version of this software)"
        ) from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-ready plain data (tuples become lists)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise ConfigError(f"expected a network config dataclass, got {type(config).__name__}")
    return {f.name: (list(v) if isinstance(v, tuple) else v) for f in dataclasses.fields(config)
            for v in [getattr(config, f.name)]}


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build config ``cls`` from plain data, strictly.

    Unknown keys are refused; each value must have the type of the field's default (int, float
    — ints accepted — or a list/tuple of ints); missing keys take the default. Invalid sizes are
    reported by the config's own validation.
    """
    if not dataclasses.is_dataclass(cls):
        raise ConfigError(f"{cls!r} is not a config dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {unknown}; allowed {sorted(fields)}")
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        ref = getattr(defaults, key)
        where = f"{cls.__name__}.{key}"
        if isinstance(ref, tuple):
            if not isinstance(value, list | tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            ):
                raise ConfigError(f"{where} must be a list of integers, got {value!r}")
            kwargs[key] = tuple(value)
        elif isinstance(ref, int):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{where} must be an integer, got {value!r}")
            kwargs[key] = value
        elif isinstance(ref, float):
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"{where} must be a number, got {value!r}")
            kwargs[key] = float(value)
        else:
            raise ConfigError(f"{where} has an unsupported type {type(ref).__name__}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def build(name: str, config: Mapping[str, Any] | Any) -> tuple[Any, nn.Module]:
    """Build registry network ``name`` from a config (dataclass or plain data).

    Returns
    -------
    config, module
        The config dataclass actually used and the freshly initialised network.
    """
    cfg_cls, net_cls = _lookup(name)
    if isinstance(config, Mapping):
        cfg = config_from_dict(cfg_cls, config)
    elif isinstance(config, cfg_cls):
        cfg = config
    else:
        raise ConfigError(f"network {name!r} needs a {cfg_cls.__name__}, got {type(config).__name__}")
    return cfg, net_cls(cfg)


def registry_name(module: nn.Module) -> str:
    """The registry name of a network instance."""
    for name, (_, net_cls) in REGISTRY.items():
        if type(module) is net_cls:
            return name
    raise ConfigError(f"{type(module).__name__} is not a registered network architecture")
