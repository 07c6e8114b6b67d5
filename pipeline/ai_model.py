"""Where the trained AIRT model lives (torch-free)."""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "airt_small"


def installed_model_dir(configured: str = "") -> Path | None:
    """The model folder to use: ``configured`` when non-empty, else the shipped one; None when
    the folder holds no ``model.json`` (no trained model installed)."""
    folder = Path(configured) if configured else SHIPPED_MODEL_DIR
    return folder if (folder / "model.json").is_file() else None


def model_is_qualified(folder: Path, refine_iterations: int | None = None) -> tuple[bool, str]:
    """Whether ``planning.method = auto`` may use this model, and why (not).

    A model qualifies only when its ``model.json`` records ``meta.qualified_for_auto = true``,
    which the held-out benchmark sets when the model's plans met the quality gate
    (``python -m benchmarks.bench_ai --record-gate``). A model without it is used only when asked
    for explicitly (``--method ai``). The gate's plans were refined by
    ``meta.quality_gate.ai_refine_iterations`` optimizer evaluations (``pipeline.refine``); with
    fewer (``refine_iterations``, the configured number) the verdict does not hold and the model
    does not qualify.
    """
    import json

    try:
        meta = json.loads((folder / "model.json").read_text()).get("meta", {})
    except (OSError, ValueError) as exc:
        return False, f"model.json unreadable: {exc}"
    if meta.get("qualified_for_auto") is not True:
        return False, str(meta.get("note") or "the model has not passed the held-out quality gate")
    gate = meta.get("quality_gate") or {}
    needed = int(gate.get("ai_refine_iterations", 0))
    if refine_iterations is not None and refine_iterations < needed:
        return False, (f"its quality gate was passed with {needed} refinement evaluations and "
                       f"planning.ai_refine_iterations is {refine_iterations}")
    return True, "qualified on held-out cases"
