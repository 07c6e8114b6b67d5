"""Where the trained AIRT model lives (torch-free)."""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "airt_small"


def installed_model_dir(configured: str = "") -> Path | None:
    """The model folder to use: ``configured`` when non-empty, else the shipped one; None when
    the folder holds no ``model.json`` (no trained model installed)."""
    folder = Path(configured) if configured else SHIPPED_MODEL_DIR
    return folder if (folder / "model.json").is_file() else None


def model_is_qualified(folder: Path) -> tuple[bool, str]:
    """Whether ``planning.method = auto`` may use this model, and why (not).

    A model qualifies only when its ``model.json`` records ``meta.qualified_for_auto = true``,
    which training sets after the model's held-out plans met the quality gate. A model without
    it (such as the shipped CPU demonstration model) is used only when asked for explicitly
    (``--method ai``).
    """
    import json

    try:
        meta = json.loads((folder / "model.json").read_text()).get("meta", {})
    except (OSError, ValueError) as exc:
        return False, f"model.json unreadable: {exc}"
    if meta.get("qualified_for_auto") is True:
        return True, "qualified on held-out cases"
    return False, str(meta.get("note") or "the model has not passed the held-out quality gate")
