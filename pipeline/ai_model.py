"""Where the trained AIRT model lives (torch-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHIPPED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "airt_small"
#: Case sets a quality gate must have passed on (``benchmarks.bench_arc``): synthetic seeds no training
#: used, and anatomy and CT geometries no training or tuning used.
GATE_CASE_SETS = ("synth", "heldout")
#: Paired cases per set a quality gate needs.
MIN_GATE_CASES = 20


def installed_model_dir(configured: str = "") -> Path | None:
    """The model folder to use: ``configured`` when non-empty, else the shipped one; None when
    the folder holds no ``model.json`` (no trained model installed)."""
    folder = Path(configured) if configured else SHIPPED_MODEL_DIR
    return folder if (folder / "model.json").is_file() else None


def model_weights_id(folder: Path) -> str:
    """One digest naming a model's weights: the SHA-256 of its networks' recorded SHA-256 digests
    (``model.json`` ``networks.<key>.sha256``, by key). A quality gate records the id of the model
    it measured, so a model retrained into the same folder does not inherit its verdict.

    Raises
    ------
    ValueError
        ``model.json`` unreadable or without network digests.
    """
    import json

    try:
        doc = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder / 'model.json'}: no network digests ({exc})") from None
    return _weights_id(doc, folder)


def _weights_id(doc: Any, folder: Path) -> str:
    """:func:`model_weights_id` of a ``model.json`` already read."""
    import hashlib

    try:
        networks = doc["networks"]
        parts = [f"{key}={networks[key]['sha256']}" for key in sorted(networks)]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{folder / 'model.json'}: no network digests ({exc!r})") from None
    if not parts:
        raise ValueError(f"{folder / 'model.json'}: no networks")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def model_is_qualified(folder: Path, *, profile: str, refine_iterations: int | None = None,
                       arc_iterations: int | None = None, arc_rounds: int | None = None,
                       arc_sectors_per_beam: int | None = None) -> tuple[bool, str]:
    """Whether ``planning.method = auto`` may use this model for a plan of protocol profile ``profile``,
    and why (not).

    A model qualifies only when its ``model.json`` records ``meta.qualified_for_auto = true`` and, for
    this profile, a passed quality gate (``meta.quality_gates.<profile>``, written by ``python -m
    benchmarks.gate_ai --record-gate``) that compared its plans with the full planner's on both case
    sets (:data:`GATE_CASE_SETS`: synthetic seeds never trained on, and anatomy and CT geometries no
    training or tuning used), at least :data:`MIN_GATE_CASES` paired cases each, for this model's
    weights (:func:`model_weights_id`). A model without it is used only when asked for explicitly
    (``--method ai``). The gate's plans were made with ``ai_refine_iterations`` refinement and
    ``arc_iterations`` arc-stage evaluations; with fewer configured (``refine_iterations``,
    ``arc_iterations``) the verdict does not hold and the model does not qualify; nor with the arc stage in
    another number of rounds (``arc_rounds``; a gate that records none ran one); nor with its dose beams
    coarser than the gate's (``arc_sectors_per_beam`` above the gate's ``sectors_per_beam``; a gate that
    records none dosed every sector apart).
    """
    import json

    try:
        doc = json.loads((folder / "model.json").read_text())
    except (OSError, ValueError) as exc:
        return False, f"model.json unreadable: {exc}"
    meta = doc.get("meta", {})
    if meta.get("qualified_for_auto") is not True:
        return False, str(meta.get("note") or "the model has not passed the held-out quality gate")
    gates = meta.get("quality_gates") or {}
    if profile not in gates:
        return False, (f"its quality gates cover profile(s) {', '.join(sorted(gates))}, not {profile}" if gates
                       else "model.json records no quality gate of the current kind (run python -m benchmarks.gate_ai)")
    gate = gates[profile] or {}
    if gate.get("passed") is not True:
        return False, f"its quality gate for profile {profile} did not pass"
    sets = gate.get("case_sets") or {}
    for name in GATE_CASE_SETS:
        got = sets.get(name) or {}
        if not (got.get("passed") is True and int(got.get("cases", 0)) >= MIN_GATE_CASES):
            return False, (f"its quality gate did not pass on {MIN_GATE_CASES} or more paired cases of the "
                           f"{name} set (run python -m benchmarks.gate_ai)")
    try:
        current = _weights_id(doc, folder)
    except ValueError as exc:
        return False, str(exc)
    if gate.get("model_weights_id") != current:
        return False, "its quality gate was measured on other weights than the model's"
    for key, configured, setting in (("ai_refine_iterations", refine_iterations, "planning.ai_refine_iterations"),
                                     ("arc_iterations", arc_iterations, "planning.arc_optimizer_iterations")):
        if not isinstance(gate.get(key), int):
            return False, f"its quality gate does not record {key}"
        needed = int(gate[key])
        if configured is not None and configured < needed:
            return False, f"its quality gate was passed with {key} = {needed} and {setting} is {configured}"
    gated_rounds = int(gate.get("arc_rounds", 1))
    if arc_rounds is not None and arc_rounds != gated_rounds:
        return False, (f"its quality gate was passed with the arc stage in {gated_rounds} round(s) and "
                       f"planning.arc_optimizer_rounds is {arc_rounds}")
    gated_spb = int(gate.get("sectors_per_beam", 1))
    if arc_sectors_per_beam is not None and arc_sectors_per_beam > gated_spb:
        return False, (f"its quality gate was passed with {gated_spb} sector(s) per dose beam in the arc stage and "
                       f"planning.arc_sectors_per_beam is {arc_sectors_per_beam}")
    return True, f"qualified for profile {profile} on held-out cases of both case sets"
