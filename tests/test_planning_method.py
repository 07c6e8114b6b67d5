"""Which planning method runs: ``auto`` uses a model only when it is qualified for unattended use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.config import PlanningMethod, settings_from_dict
from appliance.planning import resolve_method
from core.errors import PlanningError
from pipeline.ai_model import SHIPPED_MODEL_DIR, model_is_qualified


def _model(folder: Path, meta: dict[str, object]) -> Path:
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"format_version": 1, "meta": meta, "networks": {}}))
    return folder


def test_auto_uses_a_qualified_model_only(tmp_path: Path) -> None:
    plain = _model(tmp_path / "plain", {"note": "demo model"})
    good = _model(tmp_path / "good", {"qualified_for_auto": True})
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(plain)}}), None) is PlanningMethod.OPTIMIZE
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(good)}}), None) is PlanningMethod.AI
    # explicit choices are honoured
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(plain)}}), "ai") is PlanningMethod.AI
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(good)}}), "optimize") is PlanningMethod.OPTIMIZE
    assert model_is_qualified(plain) == (False, "demo model")


def test_no_model_means_optimize_and_ai_is_refused_clearly(tmp_path: Path) -> None:
    s = settings_from_dict({"planning": {"model_dir": str(tmp_path / "none")}})
    assert resolve_method(s, None) is PlanningMethod.OPTIMIZE
    with pytest.raises(PlanningError, match="needs a trained model"):
        resolve_method(s, "ai")


def test_a_gate_passed_with_refinement_does_not_hold_without_it(tmp_path: Path) -> None:
    gated = _model(tmp_path / "gated", {"qualified_for_auto": True,
                                        "quality_gate": {"ai_refine_iterations": 20, "passed": True}})
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(gated)}}), None) is PlanningMethod.AI
    fewer = settings_from_dict({"planning": {"model_dir": str(gated), "ai_refine_iterations": 5}})
    assert resolve_method(fewer, None) is PlanningMethod.OPTIMIZE
    ok, why = model_is_qualified(gated, 5)
    assert not ok and "20 refinement evaluations" in why and "is 5" in why


def test_shipped_model_is_used_unattended_only_as_its_recorded_gate_says() -> None:
    if not (SHIPPED_MODEL_DIR / "model.json").exists():
        pytest.skip("no shipped model")
    meta = json.loads((SHIPPED_MODEL_DIR / "model.json").read_text())["meta"]
    settings = settings_from_dict({})
    ok, why = model_is_qualified(SHIPPED_MODEL_DIR, settings.planning.ai_refine_iterations)
    gate = meta.get("quality_gate")
    if gate is None:
        assert not ok and why
    else:  # the verdict is the conjunction of the measured criteria, on at least 20 held-out cases
        assert ok is gate["passed"] is all(c["non_inferior"] for c in gate["criteria"])
        assert gate["cases"] == len(set(gate["seeds"])) >= 20
        assert gate["ai_refine_iterations"] <= settings.planning.ai_refine_iterations
    assert resolve_method(settings, None) is (PlanningMethod.AI if ok else PlanningMethod.OPTIMIZE)


def test_the_shipped_gate_is_the_one_the_benchmark_file_measured() -> None:
    """The verdict in model.json is recomputed from the per-case values it was written from."""
    from benchmarks.bench_ai import D98_MIN_REL, non_inferiority

    gate = json.loads((SHIPPED_MODEL_DIR / "model.json").read_text())["meta"].get("quality_gate")
    if gate is None:
        pytest.skip("the shipped model records no quality gate")
    saved = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ai_latest.json").read_text())
    rows = saved["rows"]
    assert gate["seeds"] == [r["seed"] for r in rows]
    assert gate["ai_refine_iterations"] == saved["refine_iterations"]
    recomputed = non_inferiority(rows, "AI")
    assert [c["metric"] for c in gate["criteria"][:-1]] == [x["metric"] for x in recomputed]
    for c, x in zip(gate["criteria"], recomputed, strict=False):
        assert c["upper95"] == pytest.approx(x["upper95"]) and c["non_inferior"] is x["non_inferior"]
    d98_ok = sum(r["quality"]["AI"]["D98_Gy"] / 40.0 >= D98_MIN_REL for r in rows)
    assert gate["criteria"][-1]["cases"] == d98_ok
    assert gate["passed"] is (all(x["non_inferior"] for x in recomputed) and d98_ok == len(rows))
