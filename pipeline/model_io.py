"""The trained-model folder: safetensors weights plus a ``model.json`` that says what they are.

Layout of a model folder::

    model.json              architecture, config and SHA-256 of every network, plus ``meta``
    <key>.safetensors       the weights of network ``<key>`` (e.g. ``dose_proposer``)

``model.json`` (``format_version`` 1) holds ``networks``: ``{key: {"architecture": registry name,
"config": plain data, "weights": file name, "sha256": hex digest, "n_parameters": int}}`` and
``meta``: what the caller recorded at training time (grids and spacing, input and output
normalisation, training data description, losses) so that inference preprocessing always
matches training. Loading verifies every hash before reading the weights and builds networks
only from :data:`pipeline.nets.registry.REGISTRY`: no code is imported, evaluated or unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from core.errors import ConfigError
from pipeline.nets.registry import build, config_to_dict

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """Networks of a model folder, built, loaded, on their device and in eval mode.

    Attributes
    ----------
    folder
        Where they were loaded from.
    networks
        Module by key (``dose_proposer``, ``bev2fluence``, ``correction``, ``fast_dose``, ...).
    configs
        Config dataclass by key.
    architectures
        Registry name by key.
    meta
        The ``meta`` object of ``model.json`` (grids, normalisation, training description).
    sha256
        Weights digest by key (for logs and reports).
    """

    folder: Path
    networks: dict[str, nn.Module]
    configs: dict[str, Any]
    architectures: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model_folder(
    folder: str | Path,
    networks: Mapping[str, tuple[str, Any, nn.Module]],
    meta: Mapping[str, Any],
) -> Path:
    """Write a model folder (weights first, ``model.json`` last so a half-written folder has none).

    Parameters
    ----------
    folder
        Target folder; created if missing. Existing files of the same names are replaced.
    networks
        ``{key: (registry name, config dataclass, module)}``; keys are lower-case identifiers
        (they name the weights files).
    meta
        JSON-serialisable description: grids, normalisation, training data, losses, versions.

    Returns
    -------
    Path
        The path of the written ``model.json``.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    try:
        meta_json = json.loads(json.dumps(dict(meta)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model meta must be JSON-serialisable plain data: {exc}") from exc
    entries: dict[str, Any] = {}
    for key, (arch, config, module) in networks.items():
        if not _KEY_RE.match(key):
            raise ConfigError(f"network key {key!r} must be a lower-case identifier (it names a file)")
        cfg_dict = config_to_dict(config)
        build(arch, cfg_dict)  # refuses an unknown architecture or a config it cannot rebuild
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
        data = save_safetensors(state, metadata={"architecture": arch, "key": key})
        name = f"{key}.safetensors"
        _atomic_write(out / name, data)
        entries[key] = {
            "architecture": arch,
            "config": cfg_dict,
            "weights": name,
            "sha256": _sha256(data),
            "n_parameters": sum(p.numel() for p in module.parameters()),
        }
    doc = {"format_version": FORMAT_VERSION, "networks": entries, "meta": meta_json}
    path = out / MODEL_JSON
    _atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    log.info("model folder written: %s (%s)", out, ", ".join(f"{k}={v['sha256'][:12]}" for k, v in entries.items()))
    return path


def update_model_meta(folder: str | Path, updates: Mapping[str, Any], *, remove: Sequence[str] = ()) -> Path:
    """Merge ``updates`` into the ``meta`` of a model folder's ``model.json`` (top-level keys replaced,
    the keys in ``remove`` dropped).

    For what is learned about a model after training (its held-out quality gate); the weights and
    their hashes are untouched. The file is replaced atomically, written as :func:`save_model_folder`
    writes it.
    """
    path = Path(folder) / MODEL_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: no readable model.json ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict):
        raise ConfigError(f"{path} is not a model folder description (no meta object)")
    try:
        doc["meta"].update(json.loads(json.dumps(dict(updates))))
        for key in remove:
            doc["meta"].pop(key, None)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model meta must be JSON-serialisable plain data: {exc}") from exc
    _atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    return path


def load_model_folder(folder: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Read, verify and build the networks of a model folder.

    Raises
    ------
    ConfigError
        The folder has no readable ``model.json``, names an unknown architecture or a weights
        file outside the folder, a weights file is missing, its SHA-256 differs from the one
        recorded (tampered or corrupted), or the weights do not fit the architecture.
    """
    root = Path(folder)
    path = root / MODEL_JSON
    hint = "reinstall the model folder or retrain it with 'airt train'"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no {MODEL_JSON} in model folder {root}; {hint}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; {hint}") from exc
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: unsupported model format {doc.get('format_version') if isinstance(doc, dict) else doc!r}"
                          f" (expected {FORMAT_VERSION}); {hint}")
    entries = doc.get("networks")
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{path} lists no networks; {hint}")
    dev = torch.device(device)
    loaded = LoadedModel(root, {}, {}, {}, dict(doc.get("meta") or {}), {})
    for key, entry in entries.items():
        where = f"{path} network {key!r}"
        if not isinstance(entry, dict) or not {"architecture", "config", "weights", "sha256"} <= set(entry):
            raise ConfigError(f"{where} needs architecture, config, weights and sha256; {hint}")
        name = entry["weights"]
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise ConfigError(f"{where}: weights must be a .safetensors file name inside the folder, got {name!r}")
        try:
            data = (root / name).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read weights {name}: {exc}; {hint}") from exc
        digest = _sha256(data)
        if digest != entry["sha256"]:
            raise ConfigError(
                f"{where}: weights file {name} has SHA-256 {digest}, model.json records {entry['sha256']}; "
                f"the file was modified or corrupted; {hint}"
            )
        if not isinstance(entry["config"], dict):
            raise ConfigError(f"{where}: config must be an object; {hint}")
        config, module = build(str(entry["architecture"]), entry["config"])
        try:
            state = load_safetensors(data)
            module.load_state_dict(state, strict=True)
        except (SafetensorError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"{where}: weights {name} do not fit the architecture: {exc}; {hint}") from exc
        module.to(dev).eval()
        loaded.networks[key] = module
        loaded.configs[key] = config
        loaded.architectures[key] = str(entry["architecture"])
        loaded.sha256[key] = digest
    log.info("model folder loaded: %s on %s (%s)", root, dev, ", ".join(f"{k}={v[:12]}" for k, v in loaded.sha256.items()))
    return loaded
