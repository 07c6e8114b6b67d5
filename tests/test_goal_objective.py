"""Clinical goals as objective terms (pipeline.goal_objective), the verdict and the rescue."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.case import Role
from core.errors import PlanningError
from core.machine import ArcSpec, MachineModel
from pipeline.arc_optimizer import ArcOptimizerSettings
from pipeline.dose_engine import dose_grid_for_case
from pipeline.dvh import evaluate_metric
from pipeline.goal_objective import (
    PriorityWeights,
    at_least_fraction_above,
    at_most_fraction_above,
    goal_terms,
    normalisation_scale,
)
from pipeline.goals import GoalSpec, GoalStages, evaluate_goals, plan_verdict
from pipeline.plan import FluenceSource, PlanningOptions, goal_rank, plan_arc
from pipeline.problem import build_problem
from pipeline.synth import synth_case

torch.set_num_threads(2)


def test_dose_volume_penalties_are_zero_exactly_when_the_dvh_goal_holds() -> None:
    d = torch.linspace(0.0, 10.0, 101)  # 101 voxels, 0.1 Gy apart
    # "at most 10 % above 8.95 Gy": 11 voxels (9.0 .. 10.0) are above; 10 are allowed -> violated
    assert float(at_most_fraction_above(d, 8.95, 0.10, 1.0)) > 0
    assert float(at_most_fraction_above(d, 8.95, 0.11, 1.0)) == 0.0
    # only the voxel not among the hottest 10 % is pushed, not the allowed hot ones
    x = d.clone().requires_grad_(True)
    at_most_fraction_above(x, 8.95, 0.10, 1.0).backward()
    assert x.grad is not None
    pushed = torch.nonzero(x.grad).reshape(-1).tolist()
    assert pushed == [90]  # 9.0 Gy: above the limit and outside the hottest 10 voxels
    # "at least 90 % at or above 1.05 Gy": the 90 hottest voxels must be >= 1.05; voxel 11 (1.1) is the
    # coldest of them -> met; at 1.15 it is not
    assert float(at_least_fraction_above(d, 1.05, 0.90, 1.0)) == 0.0
    assert float(at_least_fraction_above(d, 1.15, 0.90, 1.0)) > 0


def _by_mask(values: torch.Tensor, limit: float, fraction: float, at_least: bool) -> torch.Tensor:
    """The penalties by their definition: a mask of the hottest ``fraction`` over the whole structure."""
    n = values.numel()
    k = min(n, max(0, int(fraction * n + 1e-9)))
    hottest = torch.zeros(n, dtype=torch.bool)
    hottest[torch.topk(values.detach(), k).indices] = True
    if at_least:
        return (torch.relu(limit - values) ** 2 * hottest).mean()
    return (torch.relu(values - limit) ** 2 * ~hottest).mean()


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.1, 0.5, 0.95, 0.98, 1.0])
@pytest.mark.parametrize("at_least", [False, True])
def test_dose_volume_penalties_equal_their_definition_with_their_gradients(fraction: float, at_least: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.rand(997, generator=gen, dtype=torch.float64) * 10, torch.full((3,), 9.5,
                                                                                             dtype=torch.float64)])
    for limit in (2.0, 7.5, 9.5, 11.0):
        x, y = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
        penalty = (at_least_fraction_above if at_least else at_most_fraction_above)(x, limit, fraction, 1.0)
        reference = _by_mask(y, limit, fraction, at_least)
        reference.backward()
        assert float(penalty) == pytest.approx(float(reference), rel=1e-12, abs=1e-15)
        assert y.grad is not None
        if penalty.requires_grad:
            penalty.backward()
            assert x.grad is not None
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-15)
        else:  # nothing can be penalised (no voxel outside the hottest, or none among them)
            assert float(penalty) == 0.0 and not bool(y.grad.any())


@pytest.mark.parametrize(("metric", "comparison", "limit"), [
    ("D2%", "<=", 9.75), ("D2%", "<=", 9.85), ("D98%", ">=", 0.15), ("D98%", ">=", 0.25),
    ("V5Gy%", "<=", 50.0), ("V5Gy%", "<=", 52.0), ("V5Gy%", ">=", 50.0), ("V5Gy%", ">=", 52.0),
    ("Dmean", "<=", 4.9), ("Dmean", "<=", 5.1), ("Dmax", "<=", 9.9), ("Dmax", "<=", 10.1),
    ("D2cc", "<=", 9.7), ("D2cc", "<=", 9.9), ("V8Gycc", "<=", 2.0), ("V8Gycc", "<=", 2.2),
])
def test_a_goal_term_vanishes_exactly_when_the_goal_is_met(metric: str, comparison: str, limit: float) -> None:
    # 1000 voxels of 0.01 cm3 (10 cm3), doses 0..10 Gy in one fraction; no margin
    dose = torch.linspace(0.0, 10.0, 1000).reshape(10, 10, 10)
    mask = torch.ones_like(dose, dtype=torch.bool)
    goal = GoalSpec("rectum", metric, comparison, limit, 1)
    (term,) = goal_terms([goal], {"rectum": mask}, fractions=1, voxel_cc=0.01, weights=PriorityWeights(margin=0.0))
    value = evaluate_metric(metric, dose.numpy(), mask.numpy(), 0.01, rx_gy=8.0)
    met = value <= limit if comparison == "<=" else value >= limit
    penalty = float(term.value_of(dose.reshape(-1)[term.mask.reshape(-1)], 8.0))
    assert (penalty == 0.0) == met, (metric, comparison, limit, value, penalty)


def test_goal_terms_weights_margins_fractions_and_missing_structures() -> None:
    mask = torch.ones((4, 4, 4), dtype=torch.bool)
    goals = [GoalSpec("ptv", "D98%", ">=", 38.0, 1), GoalSpec("rectum", "V36Gy%", "<=", 5.0, 2),
             GoalSpec("bladder", "Dmean", "<=", 14.0, 3), GoalSpec("ptv", "CI", ">=", 0.8, 2),
             GoalSpec("femur_head_l", "Dmax", "<=", 30.0, 1)]
    terms = goal_terms(goals, {"ptv": mask, "rectum": mask, "bladder": mask}, fractions=5, voxel_cc=0.064,
                       weights=PriorityWeights(p1=1000, p2=100, p3=10, margin=0.02), boost={1: 4.0})
    # CI has no term; the femoral head is absent
    assert [t.goal.metric for t in terms] == ["D98%", "V36Gy%", "Dmean"]
    assert [t.weight for t in terms] == [1000, 400, 10]
    assert terms[0].limit_fx == pytest.approx(38.0 * 1.02 / 5)  # a lower bound is raised by the margin
    assert terms[1].limit_fx == pytest.approx(36.0 * 0.98 / 5)  # the dose level of a V goal is lowered
    assert terms[2].limit_fx == pytest.approx(14.0 * 0.98 / 5)
    with pytest.raises(PlanningError, match="margin"):
        PriorityWeights(margin=0.5)


def test_restricted_region_counts_the_whole_structure() -> None:
    # 100 voxels, 20 computed (the rest far away, below every limit): 10 computed voxels above 5 Gy
    # are 10 % of the structure, so "V5Gy% <= 10" holds and "V5Gy% <= 9" does not
    mask = torch.ones(100, dtype=torch.bool).reshape(10, 10)
    region = torch.zeros_like(mask)
    region.view(-1)[:20] = True
    dose = torch.zeros(10, 10)
    dose.view(-1)[:10] = 6.0
    ok, bad = (goal_terms([GoalSpec("rectum", "V5Gy%", "<=", v, 1)], {"rectum": mask}, fractions=1, voxel_cc=0.1,
                          weights=PriorityWeights(margin=0.0), region=region)[0] for v in (10.0, 9.0))
    assert float(ok.value_of(dose.reshape(-1)[ok.mask.reshape(-1)], 8.0)) == 0.0
    assert float(bad.value_of(dose.reshape(-1)[bad.mask.reshape(-1)], 8.0)) > 0.0


def test_normalisation_scale_puts_the_dv_at_the_prescription() -> None:
    dose = torch.rand(20, 20, 20, generator=torch.Generator().manual_seed(1)) * 3 + 6
    ptv = torch.zeros_like(dose, dtype=torch.bool)
    ptv[5:15, 5:15, 5:15] = True
    n = dose * normalisation_scale(dose[ptv], 8.0, 95.0)
    assert np.percentile(n[ptv].numpy(), 5, method="higher") == pytest.approx(8.0, rel=1e-3)


def test_verdict_text_and_rank() -> None:
    rows = [
        {"structure": "ptv", "metric": "D98%", "comparison": ">=", "limit": 38.0, "priority": 1, "value": 38.5,
         "unit": "Gy", "passed": True},
        {"structure": "rectum", "metric": "V36Gy%", "comparison": "<=", "limit": 5.0, "priority": 1,
         "value": 7.214, "unit": "%", "passed": False},
        {"structure": "bladder", "metric": "Dmean", "comparison": "<=", "limit": 14.0, "priority": 2, "value": 3.0,
         "unit": "Gy", "passed": True},
        {"structure": "femur_head_l", "metric": "Dmax", "comparison": "<=", "limit": 30.0, "priority": 2,
         "value": None, "unit": "Gy", "passed": None},
    ]
    v = plan_verdict(rows)
    assert not v.p1_met and v.text == "P1 failed: rectum V36Gy% 7.21% vs <= 5%; P2 1/1"
    assert v.not_evaluated == ("femur_head_l Dmax",)
    assert plan_verdict(rows[:1] + rows[2:]).text == "all P1 met; P2 1/1"
    worse = [dict(r) for r in rows]
    worse[1]["value"] = 9.0
    assert goal_rank(rows) < goal_rank(worse) and goal_rank(rows[:1]) < goal_rank(rows)


def test_a_volume_goal_that_the_ptv_overlap_alone_breaks_says_so() -> None:
    case = synth_case(2005, spacing_mm=(2.0, 2.0, 2.5))
    inside = float((case.masks[Role.RECTUM] & case.masks[Role.PTV]).sum()) * case.grid.voxel_volume_cc
    assert inside > 1.5  # this anatomy puts 2.1 cc of the rectum inside the PTV
    grid = dose_grid_for_case(case, 4.0)
    dose = np.full(grid.shape, case.prescription.dose_gy, dtype=np.float32)  # every voxel at Rx: both fail
    goals = [GoalSpec("rectum", "V36Gycc", "<=", 1.0, 1), GoalSpec("rectum", "V36Gycc", "<=", inside + 1.0, 1),
             GoalSpec("rectum", "V36Gy%", "<=", 0.5, 2), GoalSpec("ptv", "D98%", ">=", 50.0, 1)]
    rows = evaluate_goals(goals, dose, grid, case)
    assert [r["passed"] for r in rows] == [False, False, False, False]
    # the overlap exceeds 1 cc and 0.5 % of the rectum: named; it does not exceed inside + 1 cc: not named
    assert rows[0]["note"] == rows[2]["note"] == f"{inside:.2g} cm3 of the rectum inside the PTV"
    assert rows[1]["note"] == "" and rows[3]["note"] == ""
    assert plan_verdict(rows).p1_failed[0].endswith(f"vs <= 1 cm3 ({inside:.2g} cm3 of the rectum inside the PTV)")


def test_planning_with_goals_rescues_a_failing_p1_goal() -> None:
    arc, machine = ArcSpec(), MachineModel()
    case = synth_case(1903, spacing_mm=(4.0, 4.0, 4.0))
    problem = build_problem(case, arc, machine, spacing_mm=5.0)
    # a P1 goal the first arc misses (rectum mean far below what the plan gives) and a P1 coverage goal
    goals = (GoalSpec("ptv", "D98%", ">=", 34.0, 1), GoalSpec("rectum", "Dmean", "<=", 2.0, 1),
             GoalSpec("bladder", "Dmean", "<=", 30.0, 2))
    options = PlanningOptions(source=FluenceSource.OPTIMIZE, optimizer_iterations=10, dose_grid_mm=5.0,
                              arc=ArcOptimizerSettings(iterations=8), goals=goals, goal_stages=GoalStages.OFF,
                              rescue_rounds=2)
    result = plan_arc(case, machine, arc, options, problem=problem)
    assert result.goals is not None and [g["metric"] for g in result.goals] == ["D98%", "Dmean", "Dmean"]
    rescue = result.record["rescue"]
    tries = rescue["tries"]
    assert tries[0]["p1_failed"] == ["rectum Dmean <= 2"] and 2 <= len(tries) <= 3
    kept = tries[rescue["kept_round"]]
    assert min(tuple(t["rank"]) for t in tries) == tuple(kept["rank"]) == goal_rank(result.goals)
    # the rescue raised the failing goal's weight and lowered the rectum dose
    rectum = [t["rank"][1] for t in tries]
    assert min(rectum[1:]) < rectum[0]
    assert tries[1]["boost"] == {"1": options.rescue_boost}
