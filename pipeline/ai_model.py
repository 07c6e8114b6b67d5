"""Where the trained AIRT model lives (torch-free)."""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "airt_small"


def installed_model_dir(configured: str = "") -> Path | None:
    """The model folder to use: ``configured`` when non-empty, else the shipped one; None when
    the folder holds no ``model.json`` (no trained model installed)."""
    folder = Path(configured) if configured else SHIPPED_MODEL_DIR
    return folder if (folder / "model.json").is_file() else None
