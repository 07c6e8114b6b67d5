"""Which planning method runs: ``auto`` uses a model only when it is qualified for unattended use."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from appliance.config import PlanningMethod, settings_from_dict
from appliance.planning import model_qualification, resolve_method
from core.errors import PlanningError
from pipeline.ai_model import SHIPPED_MODEL_DIR, model_is_qualified, model_weights_id


def _model(folder: Path, meta: dict[str, object], networks: Mapping[str, object] | None = None) -> Path:
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"format_version": 1, "meta": meta, "networks": networks or {}}))
    return folder


NETWORKS = {"bev2fluence": {"sha256": "a" * 64}, "dose_proposer": {"sha256": "b" * 64}}


def _gated(folder: Path, **gate: object) -> Path:
    """A model whose model.json records a passed gate of the current format (fields overridden by ``gate``)."""
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"format_version": 1, "meta": {}, "networks": NETWORKS}))
    full = {"format": 2, "passed": True, "ai_refine_iterations": 20, "arc_iterations": 150, "arc_rounds": 3,
            "sectors_per_beam": 3, "model_weights_id": model_weights_id(folder), "profile": PROFILE,
            "case_sets": {"synth": {"cases": 20, "passed": True}, "heldout": {"cases": 20, "passed": True}}, **gate}
    (folder / "model.json").write_text(json.dumps({"format_version": 1, "networks": NETWORKS, "meta": {
        "qualified_for_auto": True, "quality_gates": {PROFILE: full}}}))
    return folder


PROFILE = "prostate_40gy_5fx"


def _ok(folder: Path, **kw: object) -> tuple[bool, str]:
    return model_is_qualified(folder, profile=PROFILE, **kw)  # type: ignore[arg-type]


def test_auto_uses_a_qualified_model_only(tmp_path: Path) -> None:
    plain = _model(tmp_path / "plain", {"note": "demo model"})
    good = _gated(tmp_path / "good")
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(plain)}}), None) is PlanningMethod.OPTIMIZE
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(good)}}), None) is PlanningMethod.AI
    # explicit choices are honoured
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(plain)}}), "ai") is PlanningMethod.AI
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(good)}}), "optimize") is PlanningMethod.OPTIMIZE
    assert _ok(plain) == (False, "demo model")


def test_only_a_gate_on_both_case_sets_for_these_weights_qualifies(tmp_path: Path) -> None:
    """A flag alone, a gate on one set (the previous gate's kind), too few cases, a set that failed, or a
    gate of other weights do not let auto use the model."""
    flag_only = _model(tmp_path / "flag", {"qualified_for_auto": True}, NETWORKS)
    ok, why = _ok(flag_only)
    assert not ok and "no quality gate of the current kind" in why
    previous_kind = _model(tmp_path / "prev", {"qualified_for_auto": True, "quality_gate": {"passed": True}}, NETWORKS)
    assert not _ok(previous_kind)[0]
    one_set = _gated(tmp_path / "one", case_sets={"synth": {"cases": 20, "passed": True}})
    ok, why = _ok(one_set)
    assert not ok and "heldout set" in why and "20 or more" in why
    few = _gated(tmp_path / "few", case_sets={"synth": {"cases": 20, "passed": True},
                                              "heldout": {"cases": 19, "passed": True}})
    assert not _ok(few)[0]
    failed = _gated(tmp_path / "failed", case_sets={"synth": {"cases": 20, "passed": False},
                                                    "heldout": {"cases": 20, "passed": True}})
    ok, why = _ok(failed)
    assert not ok and "synth set" in why
    unrecorded = _gated(tmp_path / "unrecorded", ai_refine_iterations=None)
    ok, why = _ok(unrecorded)
    assert not ok and "does not record ai_refine_iterations" in why
    other = _gated(tmp_path / "other", model_weights_id="0" * 64)
    ok, why = _ok(other)
    assert not ok and "other weights" in why
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(other)}}), None) is PlanningMethod.OPTIMIZE
    assert _ok(_gated(tmp_path / "good")) == (True, f"qualified for profile {PROFILE} on held-out cases of both case sets")


def test_a_gate_holds_for_the_profile_it_was_measured_on(tmp_path: Path) -> None:
    """A model gated at 40 Gy in 5 fractions is not used unattended for the 60 Gy profile's studies."""
    gated = _gated(tmp_path / "gated")
    ok, why = model_is_qualified(gated, profile="prostate_60gy_20fx")
    assert not ok and "cover profile(s) prostate_40gy_5fx, not prostate_60gy_20fx" in why
    settings = settings_from_dict({"planning": {"model_dir": str(gated)}})
    assert resolve_method(settings, None, "prostate_40gy_5fx") is PlanningMethod.AI
    assert resolve_method(settings, None, "prostate_60gy_20fx") is PlanningMethod.OPTIMIZE
    assert resolve_method(settings, "ai", "prostate_60gy_20fx") is PlanningMethod.AI  # asked for explicitly
    default_60 = settings_from_dict({"planning": {"model_dir": str(gated), "profile": "prostate_60gy_20fx"}})
    assert resolve_method(default_60, None) is PlanningMethod.OPTIMIZE


def test_the_weights_id_names_the_networks_digests(tmp_path: Path) -> None:
    a = _model(tmp_path / "a", {}, NETWORKS)
    b = _model(tmp_path / "b", {}, {**NETWORKS, "dose_proposer": {"sha256": "c" * 64}})
    assert model_weights_id(a) != model_weights_id(b)
    assert model_weights_id(a) == model_weights_id(_model(tmp_path / "a2", {"note": "x"}, dict(reversed(NETWORKS.items()))))
    with pytest.raises(ValueError, match="no networks"):
        model_weights_id(_model(tmp_path / "empty", {}))


def test_no_model_means_optimize_and_ai_is_refused_clearly(tmp_path: Path) -> None:
    s = settings_from_dict({"planning": {"model_dir": str(tmp_path / "none")}})
    assert resolve_method(s, None) is PlanningMethod.OPTIMIZE
    with pytest.raises(PlanningError, match="needs a trained model"):
        resolve_method(s, "ai")


def test_a_gate_passed_with_refinement_and_arc_evaluations_does_not_hold_with_fewer(tmp_path: Path) -> None:
    gated = _gated(tmp_path / "gated")
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(gated)}}), None) is PlanningMethod.AI
    fewer = settings_from_dict({"planning": {"model_dir": str(gated), "ai_refine_iterations": 5}})
    assert resolve_method(fewer, None) is PlanningMethod.OPTIMIZE
    ok, why = _ok(gated, refine_iterations=5)
    assert not ok and "ai_refine_iterations = 20" in why and "is 5" in why
    shorter_arc = settings_from_dict({"planning": {"model_dir": str(gated), "arc_optimizer_iterations": 60}})
    assert resolve_method(shorter_arc, None) is PlanningMethod.OPTIMIZE
    ok, why = _ok(gated, refine_iterations=20, arc_iterations=60)
    assert not ok and "arc_iterations = 150" in why and "planning.arc_optimizer_iterations is 60" in why
    # the arc stage in other rounds is another planner than the one gated
    one_round = settings_from_dict({"planning": {"model_dir": str(gated), "arc_optimizer_rounds": 1}})
    assert resolve_method(one_round, None) is PlanningMethod.OPTIMIZE
    ok, why = _ok(gated, arc_rounds=1)
    assert not ok and "in 3 round(s)" in why and "planning.arc_optimizer_rounds is 1" in why
    assert _ok(gated, refine_iterations=20, arc_iterations=150, arc_rounds=3)[0]
    unrecorded = _gated(tmp_path / "unrecorded")  # a gate of before the rounds: one round
    doc = json.loads((unrecorded / "model.json").read_text())
    del doc["meta"]["quality_gates"][PROFILE]["arc_rounds"]
    (unrecorded / "model.json").write_text(json.dumps(doc))
    assert not _ok(unrecorded, arc_rounds=3)[0] and _ok(unrecorded, arc_rounds=1)[0]
    # dose beams coarser than the gate's are another planner; the same or finer ones are at least as exact
    same = settings_from_dict({"planning": {"model_dir": str(gated), "arc_sectors_per_beam": 3}})
    assert resolve_method(same, None) is PlanningMethod.AI
    fine = _gated(tmp_path / "fine", sectors_per_beam=2)
    assert resolve_method(settings_from_dict({"planning": {"model_dir": str(fine)}}), None) is PlanningMethod.OPTIMIZE
    ok, why = _ok(fine, arc_sectors_per_beam=3)
    assert not ok and "2 sector(s) per dose beam" in why and "planning.arc_sectors_per_beam is 3" in why
    assert _ok(fine, arc_sectors_per_beam=2)[0] and _ok(fine, arc_sectors_per_beam=1)[0]
    unrecorded_beams = _gated(tmp_path / "unrecorded_beams")  # a gate of before the dose beams: every sector apart
    doc = json.loads((unrecorded_beams / "model.json").read_text())
    del doc["meta"]["quality_gates"][PROFILE]["sectors_per_beam"]
    (unrecorded_beams / "model.json").write_text(json.dumps(doc))
    assert not _ok(unrecorded_beams, arc_sectors_per_beam=2)[0] and _ok(unrecorded_beams, arc_sectors_per_beam=1)[0]


def test_shipped_model_is_used_unattended_only_as_its_recorded_gates_say() -> None:
    if not (SHIPPED_MODEL_DIR / "model.json").exists():
        pytest.skip("no shipped model")
    meta = json.loads((SHIPPED_MODEL_DIR / "model.json").read_text())["meta"]
    settings = settings_from_dict({})
    gates = meta.get("quality_gates") or {}
    for profile in (p.name for p in settings.profiles):
        ok, why = model_qualification(settings, SHIPPED_MODEL_DIR, profile)
        gate = gates.get(profile)
        if gate is None:
            assert not ok and why
        else:  # the verdict is the conjunction of the measured criteria, on at least 20 cases of each set
            assert gate["profile"] == profile
            assert ok is gate["passed"] is all(v["passed"] for v in gate["case_sets"].values())
            for v in gate["case_sets"].values():
                assert v["passed"] is (v["cases"] >= 20 and all(c["non_inferior"] for c in v["criteria"]))
                assert v["cases"] == len(set(v["seeds"]))
            assert gate["ai_refine_iterations"] <= settings.planning.ai_refine_iterations
        assert resolve_method(settings, None, profile) is (PlanningMethod.AI if ok else PlanningMethod.OPTIMIZE)


def test_the_shipped_gates_are_the_ones_the_benchmark_files_measured() -> None:
    """Each verdict in model.json is recomputed from the per-case rows it was written from."""
    from benchmarks.gate_ai import quality_gate

    gates = json.loads((SHIPPED_MODEL_DIR / "model.json").read_text())["meta"].get("quality_gates") or {}
    if not gates:
        pytest.skip("the shipped model records no quality gate of the current kind")
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    for profile, gate in gates.items():
        ai = json.loads((bench / gate["files"]["ai"]).read_text())["rows"]
        opt = json.loads((bench / gate["files"]["optimize"]).read_text())["rows"]
        recomputed = quality_gate(ai, opt, weights_id=model_weights_id(SHIPPED_MODEL_DIR),
                                  min_cases=gate["min_cases"])
        assert recomputed["profile"] == profile and recomputed["passed"] is gate["passed"]
        for name, v in recomputed["case_sets"].items():
            saved = gate["case_sets"][name]
            assert saved["seeds"] == v["seeds"] and saved["passed"] is v["passed"]
            for c, x in zip(saved["criteria"], v["criteria"], strict=True):
                assert c["metric"] == x["metric"] and c["non_inferior"] is x["non_inferior"]
                if "upper95" in x:
                    assert c["upper95"] == pytest.approx(x["upper95"])
