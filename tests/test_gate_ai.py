"""The AI quality gate (``benchmarks.gate_ai``): both case sets, paired against the full planner."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from scipy import stats

from benchmarks.gate_ai import MARGINS, paired_bound, quality_gate, with_run_planner

WEIGHTS = "f" * 64


def _method(rng: np.random.Generator, *, shift: dict[str, float] | None = None, p1_ok: bool = True,
            d98: float = 39.5, planner: bool = True, source: str = "ai") -> dict[str, Any]:
    exported = {"HI": 0.08, "D98_Gy": d98, "bladder_Dmean_Gy": 2.0, "bladder_D2_Gy": 38.0,
                "rectum_Dmean_Gy": 4.0, "rectum_D2_Gy": 36.0}
    exported = {k: v + rng.normal(0.0, 0.002 if k == "HI" else 0.05) + (shift or {}).get(k, 0.0)
                for k, v in exported.items()}
    goal = {"structure": "rectum", "metric": "V36Gycc", "comparison": "<=", "limit": 2.0, "value": 1.0}
    goals = [{**goal, "priority": 1, "passed": p1_ok}, {**goal, "priority": 2, "passed": False},
             {**goal, "priority": 1, "passed": None}]
    row: dict[str, Any] = {"exported": exported, "goals": goals, "to_exported_arc_s": 9.0 if source == "ai" else 40.0}
    if planner:
        row["planner"] = {"source": source, "ai_refine_iterations": 20, "arc_iterations": 150,
                          "sectors_per_beam": 3 if source == "ai" else 2,
                          "rescue_rounds": 2, **({"model_weights_id": WEIGHTS} if source == "ai" else {})}
    return row


def _rows(n: int = 20, *, shift: dict[str, float] | None = None, ai_p1_fail: int = 0, seed: int = 0
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    ai, opt = [], []
    for case_set, first in (("synth", 2000), ("heldout", 5000)):
        for i in range(n):
            base = {"set": case_set, "seed": first + i, "profile": "prostate_40gy_5fx", "rx_gy": 40.0}
            ai.append({**base, "methods": {"ai": _method(rng, shift=shift, p1_ok=i >= ai_p1_fail)}})
            opt.append({**base, "methods": {"optimize": _method(rng, source="optimize")}})
    return ai, opt


def test_the_bound_is_the_one_sided_student_t_bound() -> None:
    d = [0.1, -0.2, 0.3, 0.05, 0.0]
    b = paired_bound([*d, float("nan")], 0.2)
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    assert b["n"] == 5 and b["mean_diff"] == pytest.approx(mean)
    assert b["upper95"] == pytest.approx(mean + stats.t.ppf(0.95, 4) * sd / math.sqrt(5))
    assert b["non_inferior"] is (b["upper95"] < 0.2) and b["cases_within_margin"] == 4
    assert paired_bound([0.0], 1.0)["non_inferior"] is False  # one case proves nothing


def test_a_model_as_good_as_the_planner_passes_on_both_sets() -> None:
    ai, opt = _rows()
    gate = quality_gate(ai, opt, weights_id=WEIGHTS)
    assert gate["passed"] is True and set(gate["case_sets"]) == {"synth", "heldout"}
    for v in gate["case_sets"].values():
        assert v["cases"] == 20 and v["passed"] is True
        assert [c["metric"] for c in v["criteria"][:len(MARGINS)]] == list(MARGINS)
        assert v["median_to_exported_arc_s"] == {"ai": 9.0, "optimize": 40.0}
    assert gate["ai_refine_iterations"] == 20 and gate["arc_iterations"] == 150
    # each method's dose beams as its rows record them (the AI method's arc stage doses coarser beams)
    assert gate["sectors_per_beam"] == 3 and gate["planner_sectors_per_beam"] == 2
    assert gate["model_weights_id"] == WEIGHTS and gate["rows_without_planner_record"] == 0


@pytest.mark.parametrize(("shift", "fail_p1", "failing"), [
    ({"rectum_Dmean_Gy": 1.6}, 0, "rectum_Dmean_Gy"),
    ({"HI": 0.012}, 0, "HI"),
    ({"D98_Gy": -1.5}, 0, "PTV D98 >= 97 % Rx (cases)"),
    (None, 1, "all P1 goals met (cases)"),
])
def test_each_criterion_can_fail_the_gate(shift: dict[str, float] | None, fail_p1: int, failing: str) -> None:
    ai, opt = _rows(shift=shift, ai_p1_fail=fail_p1)
    gate = quality_gate(ai, opt, weights_id=WEIGHTS)
    assert gate["passed"] is False
    for v in gate["case_sets"].values():
        assert [c["metric"] for c in v["criteria"] if not c["non_inferior"]] == [failing]


def test_too_few_cases_or_a_missing_set_fail_the_gate() -> None:
    ai, opt = _rows(n=19)
    gate = quality_gate(ai, opt, weights_id=WEIGHTS)
    assert gate["passed"] is False and all(not v["enough_cases"] for v in gate["case_sets"].values())
    ai, opt = _rows()
    gate = quality_gate([r for r in ai if r["set"] == "synth"], opt, weights_id=WEIGHTS)
    assert gate["case_sets"]["synth"]["passed"] is True and gate["case_sets"]["heldout"]["cases"] == 0
    assert gate["passed"] is False
    # only paired seeds count
    gate = quality_gate(ai, [r for r in opt if r["seed"] != 2003], weights_id=WEIGHTS)
    assert gate["case_sets"]["synth"]["cases"] == 19 and gate["passed"] is False


def test_rows_of_another_model_profile_or_planner_are_refused() -> None:
    ai, opt = _rows()
    with pytest.raises(SystemExit, match="not the model gated"):
        quality_gate(ai, opt, weights_id="0" * 64)
    ai[3]["profile"] = "prostate_60gy_20fx"
    with pytest.raises(SystemExit, match="the profile"):
        quality_gate(ai, opt, weights_id=WEIGHTS)
    ai, opt = _rows()
    opt[5]["methods"]["optimize"]["planner"]["arc_iterations"] = 60
    with pytest.raises(SystemExit, match="planner_arc_iterations"):
        quality_gate(ai, opt, weights_id=WEIGHTS)
    ai, opt = _rows()
    ai[2]["methods"]["ai"]["planner"]["arc_iterations"] = 60
    with pytest.raises(SystemExit, match="disagree on arc_iterations"):
        quality_gate(ai, opt, weights_id=WEIGHTS)


def test_the_full_planner_may_run_more_arc_evaluations_than_the_ai_method() -> None:
    """planning.optimizer_arc_iterations: the gate records the AI method's count (what ``auto`` checks) and the
    planner's beside it."""
    ai, opt = _rows()
    for r in opt:
        r["methods"]["optimize"]["planner"]["arc_iterations"] = 500
    gate = quality_gate(ai, opt, weights_id=WEIGHTS)
    assert gate["arc_iterations"] == 150 and gate["planner_arc_iterations"] == 500


def test_the_networks_alone_are_compared_the_same_way() -> None:
    ai, opt = _rows()
    for r in ai:
        r["methods"] = {"ai_networks": r["methods"]["ai"]}
        r["methods"]["ai_networks"]["planner"]["ai_refine_iterations"] = 0  # the planner's rows say 20: no conflict
    assert quality_gate(ai, opt, weights_id=WEIGHTS)["case_sets"]["synth"]["cases"] == 0  # not the ai rows
    gate = quality_gate(ai, opt, weights_id=WEIGHTS, method="ai_networks")
    assert gate["method"] == "ai_networks" and gate["passed"] is True and gate["ai_refine_iterations"] == 0
    assert all(v["cases"] == 20 for v in gate["case_sets"].values())


def test_the_refinement_count_is_always_recorded() -> None:
    ai, opt = _rows()
    for r in ai:  # AI rows planned before rows recorded their planner
        del r["methods"]["ai"]["planner"]
    gate = quality_gate(ai, opt, weights_id=WEIGHTS)
    assert gate["ai_refine_iterations"] == 20 and gate["rows_without_planner_record"] == 40
    for r in ai:
        r["methods"] = {"ai_networks": r["methods"]["ai"]}
    with pytest.raises(SystemExit, match="refinement evaluations"):
        quality_gate(ai, opt, weights_id=WEIGHTS, method="ai_networks")


def test_ai_rows_without_a_planner_record_take_their_runs() -> None:
    """AI rows made before rows recorded their planner: without a record the gate cannot say which arc
    evaluations the AI method was gated with (and ``auto`` then refuses the model); the rows of the run
    that planned them supply it, while the full planner's rows may come from a later planner."""
    ai, run = _rows()
    for r in ai:
        del r["methods"]["ai"]["planner"]
    _, later = _rows(seed=1)
    for r in later:
        r["methods"]["optimize"]["planner"]["arc_iterations"] = 500
    assert "arc_iterations" not in quality_gate(ai, later, weights_id=WEIGHTS)
    gate = quality_gate(with_run_planner(ai, run, "ai"), later, weights_id=WEIGHTS)
    assert gate["passed"] and gate["arc_iterations"] == 150 and gate["planner_arc_iterations"] == 500
    assert gate["ai_refine_iterations"] == 20
    run[3]["methods"]["optimize"]["planner"]["arc_iterations"] = 60  # a run of two planners says nothing
    with pytest.raises(SystemExit, match="record 2 planner settings"):
        with_run_planner(ai, run, "ai")
