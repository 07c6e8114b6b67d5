"""Machine-parameter optimisation of the sequenced arc (pipeline.arc_optimizer) and the planning core."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from appliance.config import Settings
from core.case import Role
from core.errors import PlanningError
from core.machine import ArcSpec, MachineModel
from pipeline import evaluation
from pipeline.arc_optimizer import (
    MU_CAP_FRACTION,
    ArcOptimizerSettings,
    LinearDoseTerms,
    _OpenArea,
    delivered_fluence,
    delivered_fluence_torch,
    open_area,
    optimize_arc,
    rescale_mu,
)
from pipeline.evaluation import evaluate_structures
from pipeline.optimizer import build_dose_objective
from pipeline.plan import FluenceSource, PlanningOptions, near_target_engine, plan_arc
from pipeline.problem import build_problem
from pipeline.synth import synth_case
from sequencing.deliverability import check_deliverable
from sequencing.fluence import fluence_from_sequence, synthetic_arc_fluence
from sequencing.sequencer import ArcSequence, sequence_arc

torch.set_num_threads(2)
ARC = ArcSpec()
MACHINE = MachineModel()
FIRST, ROWS = MACHINE.first_bev_leaf_pair, MACHINE.bev.n_rows


def _sequence(seed: int = 3, threshold: float = 0.1) -> ArcSequence:
    return sequence_arc(synthetic_arc_fluence(ARC, MACHINE, seed=seed, noise=0.2), ARC, MACHINE, threshold=threshold)


def _model(seq: ArcSequence, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return delivered_fluence(torch.tensor(seq.leaves_mm[:, FIRST:FIRST + ROWS], dtype=dtype),
                             torch.tensor(seq.jaws_mm), torch.tensor(seq.segment_mu(), dtype=dtype), MACHINE)


@pytest.mark.parametrize("substeps", [1, 8])
def test_fluence_model_is_the_sequence_fluence_kernel(substeps: int) -> None:
    seq = _sequence()
    # moving, closed and jaw-clipped rows: shift the jaws inwards so that they cut some apertures
    jaws = np.array(seq.jaws_mm)
    jaws[:, 0] += 4.0
    jaws[:, 3] -= 3.0
    seq = dataclasses.replace(seq, jaws_mm=jaws)
    expected = fluence_from_sequence(seq, MACHINE, substeps=substeps)
    got = delivered_fluence(torch.tensor(seq.leaves_mm[:, FIRST:FIRST + ROWS]), torch.tensor(seq.jaws_mm),
                            torch.tensor(seq.segment_mu()), MACHINE, substeps=substeps).numpy()
    assert expected.max() > 1.0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 * expected.max())


def test_fluence_model_gradient_matches_finite_differences() -> None:
    seq = _sequence()
    leaves = torch.tensor(seq.leaves_mm[:, FIRST:FIRST + ROWS], dtype=torch.float64, requires_grad=True)
    mu = torch.tensor(seq.segment_mu(), dtype=torch.float64, requires_grad=True)
    jaws = torch.tensor(seq.jaws_mm)
    weights = torch.rand((ARC.n_sectors, ROWS, MACHINE.bev.n_cols), dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    (delivered_fluence(leaves, jaws, mu, MACHINE) * weights).sum().backward()
    assert leaves.grad is not None and mu.grad is not None
    # an open row's leaf, away from pixel edges and jaws: a small move changes the fluence linearly
    j, r = 60, 20
    assert seq.leaves_mm[j, FIRST + r, 1] - seq.leaves_mm[j, FIRST + r, 0] > 5.0
    for side in (0, 1):
        with torch.no_grad():
            plus, minus = leaves.detach().clone(), leaves.detach().clone()
            plus[j, r, side] += 1e-4
            minus[j, r, side] -= 1e-4
            fd = float(((delivered_fluence(plus, jaws, mu, MACHINE) - delivered_fluence(minus, jaws, mu, MACHINE))
                        * weights).sum()) / 2e-4
        assert float(leaves.grad[j, r, side]) == pytest.approx(fd, rel=1e-4, abs=1e-9)
        assert abs(fd) > 0
    # linear in the MU: d/dMU_k = the open area weighted
    with torch.no_grad():
        unit = delivered_fluence(leaves.detach(), jaws, torch.ones_like(mu), MACHINE)
    np.testing.assert_allclose(mu.grad.numpy(), (unit * weights).sum(dim=(1, 2)).numpy(), rtol=1e-10)


def test_open_area_gradient_by_hand_is_autograds() -> None:
    # random intervals (some closed, some reversed, some outside the columns) and row weights
    gen = torch.Generator().manual_seed(1)
    col = torch.as_tensor(MACHINE.bev.col_edges_mm())
    lo = torch.rand(7, 4, 5, generator=gen, dtype=torch.float64) * 260.0 - 130.0
    hi = lo + torch.rand(7, 4, 5, generator=gen, dtype=torch.float64) * 80.0 - 10.0
    row_weight = torch.rand(7, 4, 5, generator=gen, dtype=torch.float64)
    weights = torch.rand(7, 5, col.numel() - 1, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (open_area, _OpenArea.apply):
        a, b = lo.clone().requires_grad_(True), hi.clone().requires_grad_(True)
        area = fn(a, b, row_weight, col)
        (area * weights).sum().backward()
        assert a.grad is not None and b.grad is not None
        grads.append((area.detach(), a.grad, b.grad))
    for got, expected in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert float(grads[0][1].abs().max()) > 0.1 and float(grads[0][2].abs().max()) > 0.1


def test_rescaling_mu_down_limits_the_leaves_again() -> None:
    seq = _sequence(threshold=0.05)
    assert not check_deliverable(seq, MACHINE)
    same, relimited = rescale_mu(seq, 0.99, MACHINE, ARC, mu_headroom=0.02)
    assert not relimited and same.total_mu == pytest.approx(0.99 * seq.total_mu)
    np.testing.assert_array_equal(same.leaves_mm, seq.leaves_mm)
    # a factor the headroom does not cover: leaf moves too fast for the new MU unless limited again
    plain = dataclasses.replace(seq, cumulative_mu=seq.cumulative_mu * 0.3)
    assert any("leaf speed" in p for p in check_deliverable(plain, MACHINE))
    scaled, relimited = rescale_mu(seq, 0.3, MACHINE, ARC, mu_headroom=0.02)
    assert relimited and scaled.total_mu == pytest.approx(0.3 * seq.total_mu)
    assert check_deliverable(scaled, MACHINE) == []
    with pytest.raises(PlanningError, match="factor"):
        rescale_mu(seq, float("nan"), MACHINE, ARC, mu_headroom=0.02)


def test_rescaling_mu_up_caps_segments_at_the_machines_mu_per_degree() -> None:
    seq = _sequence(threshold=0.05)
    delta = ARC.span_deg() / ARC.n_sectors
    cap = MACHINE.max_mu_per_deg * delta
    mu = seq.segment_mu().copy()
    mu[10:20] = 0.95 * cap  # near the cap: a 10 % increase goes past it
    near_cap = dataclasses.replace(seq, cumulative_mu=np.concatenate([[0.0], np.cumsum(mu)]))
    assert check_deliverable(near_cap, MACHINE) == []
    scaled, changed = rescale_mu(near_cap, 1.1, MACHINE, ARC, mu_headroom=0.02)
    assert changed  # it delivers less than 1.1 x: the caller must dose it again
    assert scaled.segment_mu()[10:20] == pytest.approx(np.full(10, cap))
    assert scaled.segment_mu()[30] == pytest.approx(1.1 * mu[30])
    assert check_deliverable(scaled, MACHINE) == []


@pytest.fixture(scope="module")
def problem() -> dict[str, object]:
    settings = Settings()
    case = synth_case(1902, spacing_mm=(4.0, 4.0, 4.0))
    prob = build_problem(case, ARC, MACHINE, hu_curve=settings.planning.hu_to_density, spacing_mm=5.0)
    return {"case": case, "problem": prob}


def test_arc_optimisation_lowers_the_objective_within_every_limit(problem: dict[str, object]) -> None:
    prob = problem["problem"]
    case = problem["case"]
    rx = case.prescription.dose_gy / case.prescription.fractions  # type: ignore[attr-defined]
    near, region, _ = near_target_engine(prob)  # type: ignore[arg-type]
    masks = {r.value: torch.as_tensor(m.numpy() & region) for r, m in prob.masks.items()}  # type: ignore[attr-defined]
    grid_objective = build_dose_objective(masks, rx_gy=rx, spacing_mm=prob.grid.spacing_mm)  # type: ignore[attr-defined]
    objective = grid_objective.on_voxels(near.index)
    # a crude start: the sequencer's arc of flat, wide fields at about the right level
    start = _sequence(seed=5, threshold=0.02)
    with torch.no_grad():
        d0 = prob.engine(torch.as_tensor(fluence_from_sequence(start, MACHINE), dtype=torch.float32))  # type: ignore[attr-defined]
    level = rx / float(d0[prob.masks[Role.PTV]].mean())  # type: ignore[attr-defined]
    start = dataclasses.replace(start, cumulative_mu=start.cumulative_mu * min(level, 1.0))
    result = optimize_arc(start, near, objective, MACHINE, ARC,
                          settings=ArcOptimizerSettings(iterations=12, mu_headroom=0.02))
    assert result.iterations == 12 and result.loss[1] < 0.7 * result.loss[0]
    seq = result.sequence
    assert check_deliverable(seq, MACHINE) == []
    # leaves outside the BEV rows are untouched, the leaves and MU did move
    np.testing.assert_array_equal(seq.leaves_mm[:, :FIRST], start.leaves_mm[:, :FIRST])
    assert np.abs(seq.leaves_mm - start.leaves_mm).max() > 1.0
    assert not np.allclose(seq.segment_mu(), start.segment_mu())
    # the MU may be scaled down by the headroom and every leaf stays within its speed
    assert check_deliverable(dataclasses.replace(seq, cumulative_mu=seq.cumulative_mu * 0.98), MACHINE) == []
    # the restricted engine's dose of the model's fluence is the full engine's in its region
    with torch.no_grad():
        flu = _model(seq, torch.float32)
        full = prob.engine(flu).numpy()  # type: ignore[attr-defined]
        sub = near(flu)
        region_grid = torch.zeros(full.size, dtype=sub.dtype).index_copy(0, near.index, sub).reshape(full.shape)
    np.testing.assert_allclose(sub.numpy(), full[region], rtol=1e-5, atol=1e-6 * float(full.max()))
    # the objective of the region's dose vector is the grid objective of that dose on the grid
    assert float(objective(sub)) == pytest.approx(float(grid_objective(region_grid)), rel=1e-5)
    assert float(objective(sub)) > 0
    with pytest.raises(PlanningError, match="outside the given ones"):
        build_dose_objective({r.value: m for r, m in prob.masks.items()}, rx_gy=rx,  # type: ignore[attr-defined]
                             spacing_mm=prob.grid.spacing_mm).on_voxels(near.index)  # type: ignore[attr-defined]
    with pytest.raises(PlanningError, match="iterations"):
        ArcOptimizerSettings(iterations=-1)
    with pytest.raises(PlanningError, match="mu_weight"):
        ArcOptimizerSettings(mu_weight=-1.0)
    # the MU term trades dose terms for fewer MU: the same start and steps end with fewer MU
    frugal = optimize_arc(start, near, objective, MACHINE, ARC, mu_reference=start.total_mu,
                          settings=ArcOptimizerSettings(iterations=12, mu_headroom=0.02, mu_weight=20.0))
    assert frugal.sequence.total_mu < 0.98 * seq.total_mu
    assert check_deliverable(frugal.sequence, MACHINE) == []
    # and no sector above the room left for the MU normalisation
    cap = MU_CAP_FRACTION * MACHINE.max_mu_per_deg * ARC.span_deg() / ARC.n_sectors
    assert frugal.sequence.segment_mu().max() <= cap + 1e-9


def test_arc_rounds_restart_the_optimiser_at_its_full_step(problem: dict[str, object],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # rounds = 2: the evaluations in two halves, each with a fresh Adam (no moments) whose step starts at
    # the full step and decays linearly to a tenth over its own half
    import pipeline.arc_optimizer as arc_module

    prob = problem["problem"]
    case = problem["case"]
    rx = case.prescription.dose_gy / case.prescription.fractions  # type: ignore[attr-defined]
    near, region, _ = near_target_engine(prob)  # type: ignore[arg-type]
    masks = {r.value: torch.as_tensor(m.numpy() & region) for r, m in prob.masks.items()}  # type: ignore[attr-defined]
    objective = build_dose_objective(masks, rx_gy=rx, spacing_mm=prob.grid.spacing_mm).on_voxels(near.index)  # type: ignore[attr-defined]
    start = _sequence(seed=5, threshold=0.02)
    made: list[list[float]] = []  # per optimiser: the leaf step of each of its steps

    class Recorded(torch.optim.Adam):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append([])

        def step(self, closure: object = None) -> None:  # type: ignore[override]
            assert all(len(self.state[p]) == 0 for p in self.param_groups[0]["params"]) == (not made[-1])
            made[-1].append(float(self.param_groups[0]["lr"]))
            super().step()

    monkeypatch.setattr(arc_module.torch.optim, "Adam", Recorded)
    settings = ArcOptimizerSettings(iterations=7, rounds=2, leaf_step_mm=1.0, mu_headroom=0.02)
    result = optimize_arc(start, near, objective, MACHINE, ARC, settings=settings)
    assert result.iterations == 7 and result.record()["rounds"] == 2
    assert [len(steps) for steps in made] == [4, 3]  # as even as 7 allows
    for steps in made:
        assert steps[0] == pytest.approx(1.0) and steps[-1] == pytest.approx(0.1)
    assert check_deliverable(result.sequence, MACHINE) == []
    with pytest.raises(PlanningError, match="rounds"):
        ArcOptimizerSettings(iterations=3, rounds=0)


def test_arc_objective_reads_the_ptv_and_the_organs_near_it_at_their_ct_voxels(problem: dict[str, object]) -> None:
    prob = problem["problem"]
    case = problem["case"]
    rx = case.prescription.dose_gy / case.prescription.fractions  # type: ignore[attr-defined]
    near, region, points = near_target_engine(prob, case)  # type: ignore[arg-type]
    assert set(points) == {"ptv", "rectum", "bladder"}
    for pt in points.values():
        assert pt.support(prob.grid.shape)[~region].sum() == 0  # type: ignore[attr-defined]
    masks = {r.value: torch.as_tensor(m.numpy() & region) for r, m in prob.masks.items()}  # type: ignore[attr-defined]
    grid_objective = build_dose_objective(masks, rx_gy=rx, spacing_mm=prob.grid.spacing_mm)  # type: ignore[attr-defined]
    objective = grid_objective.on_voxels(near.index, points)
    flu = torch.as_tensor(synthetic_arc_fluence(ARC, MACHINE, seed=2, noise=0.2), dtype=torch.float32)
    with torch.no_grad():
        vec = near(flu)
        full = prob.engine(flu).numpy()  # type: ignore[attr-defined]
    assert objective.points is not None
    at_points = objective.points(vec).numpy()
    n_ptv = points["ptv"].index.shape[0]
    # the PTV the objective reads is the dose at all the PTV's CT voxels, as the plan's evaluation reads it
    expected = evaluation.structure_dvh_inputs(full, prob.grid, case, Role.PTV)  # type: ignore[attr-defined,arg-type]
    assert expected is not None and n_ptv == int(expected[1].sum()) > 500
    np.testing.assert_allclose(at_points[:n_ptv], expected[0][expected[1]], rtol=1e-4, atol=1e-5 * float(full.max()))
    assert float(objective.ptv.sum()) == n_ptv and float(objective.ptv[: vec.numel()].sum()) == 0.0
    # an organ: its CT voxels near the target (some, not all), its own terms without those in the PTV
    rectum = evaluation.structure_dvh_inputs(full, prob.grid, case, Role.RECTUM)  # type: ignore[attr-defined,arg-type]
    assert rectum is not None
    n_rect = points["rectum"].index.shape[0]
    assert 0 < n_rect < int(rectum[1].sum()) == points["rectum"].total
    rect = points["rectum"]
    on_grid = (full.reshape(-1)[rect.index.numpy()] * rect.weights.numpy()).sum(axis=1)
    np.testing.assert_allclose(at_points[n_ptv:n_ptv + n_rect], on_grid, rtol=1e-4, atol=1e-5 * float(full.max()))
    # and they are the rectum's hottest voxels: the evaluation's rectum D2cc is reached among them
    top = np.sort(rectum[0][rectum[1]])[::-1][: max(1, round(2.0 / rect.voxel_cc))]
    assert np.sort(on_grid)[::-1][: top.size] == pytest.approx(top, rel=1e-4)
    assert float(objective.oars["rectum"].sum()) == float((~points["rectum"].in_ptv).sum())
    assert float(objective(vec)) > 0
    # a region without one of the points' neighbours is refused
    missing = int(points["ptv"].index[points["ptv"].weights > 0][0])
    lacking = region.copy()
    lacking.reshape(-1)[missing] = False
    cut = {r: torch.as_tensor(m.numpy() & lacking) for r, m in masks.items()}
    with pytest.raises(PlanningError, match="neighbours"):
        build_dose_objective(cut, rx_gy=rx, spacing_mm=prob.grid.spacing_mm).on_voxels(  # type: ignore[attr-defined]
            near.index[near.index != missing], points)


def test_linear_terms_give_the_far_structures_mean_dose_exactly(problem: dict[str, object]) -> None:
    prob = problem["problem"]
    femur = prob.masks[Role.FEMUR_HEAD_L]  # type: ignore[attr-defined]
    terms = LinearDoseTerms.of(prob.engine, [femur], rx_gy=8.0, level=0.0, weight=1.0)  # type: ignore[attr-defined]
    flu = torch.as_tensor(synthetic_arc_fluence(ARC, MACHINE, seed=2, noise=0.2), dtype=torch.float32)
    with torch.no_grad():
        mean = float(prob.engine(flu)[femur].mean())  # type: ignore[attr-defined]
    assert mean > 0
    assert float(terms(flu)) * 8.0 == pytest.approx(mean, rel=1e-4)
    # a hinge: nothing below the level, the excess above it
    above = LinearDoseTerms(maps=terms.maps, rx_gy=8.0, level=mean / 8.0 - 0.01, weight=3.0)
    below = LinearDoseTerms(maps=terms.maps, rx_gy=8.0, level=mean / 8.0 + 0.01, weight=3.0)
    assert float(below(flu)) == 0.0 and float(above(flu)) == pytest.approx(0.03, rel=1e-3)


def test_planning_core_exports_a_better_arc_than_the_sequencer(problem: dict[str, object]) -> None:
    case = problem["case"]
    prob = problem["problem"]
    options = PlanningOptions(source=FluenceSource.OPTIMIZE, optimizer_iterations=20, dose_grid_mm=5.0,
                              arc=ArcOptimizerSettings(iterations=20))
    result = plan_arc(case, MACHINE, ARC, options, problem=prob)  # type: ignore[arg-type]
    assert check_deliverable(result.sequence, MACHINE) == []
    assert result.record["arc_optimizer"]["iterations"] == 20
    assert result.record["arc_start"]["kind"] == "sweep"  # the default start: leaf sweeps of the fluence
    # the fluence optimizer ran from its flat start on the voxels near the target, not on the whole body
    opt = result.record["optimizer"]
    body_voxels = int(prob.engine.points.shape[1])  # type: ignore[attr-defined]
    assert opt["iterations"] == 20 and 0 < opt["voxels"] < body_voxels and opt["loss_end"] < opt["loss_start"]
    fx = case.prescription.fractions  # type: ignore[attr-defined]
    exported = evaluate_structures(result.dose_fx * fx, prob.grid, case)  # type: ignore[attr-defined,arg-type]
    # the dose returned is the full reference engine's dose of the returned arc
    with torch.no_grad():
        again = prob.engine(torch.as_tensor(fluence_from_sequence(result.sequence, MACHINE), dtype=torch.float32))  # type: ignore[attr-defined]
    np.testing.assert_allclose(result.dose_fx, again.numpy(), rtol=1e-4, atol=1e-5)
    assert exported["ptv"]["D95_Gy"] == pytest.approx(case.prescription.dose_gy, rel=1e-3)  # type: ignore[attr-defined]
    # the sequencer's own arc, normalised the same way, is less homogeneous
    with torch.no_grad():
        d_start = prob.engine(torch.as_tensor(fluence_from_sequence(result.start, MACHINE), dtype=torch.float32)).numpy()  # type: ignore[attr-defined]
    start_ptv = evaluate_structures(d_start * fx, prob.grid, case)["ptv"]  # type: ignore[attr-defined,arg-type]
    start_hi = start_ptv["HI"]
    assert exported["ptv"]["HI"] < start_hi - 0.01, (exported["ptv"]["HI"], start_hi)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fluence_kernels_equal_the_torch_form(dtype: torch.dtype) -> None:
    # a sequenced arc, with leaf edges on pixel edges, widened edges exactly on the jaws (the tie
    # torch's maximum and minimum split), leaves beyond the field and closed pairs
    seq = _sequence()
    leaves64 = torch.tensor(seq.leaves_mm[:, FIRST:FIRST + ROWS], dtype=torch.float64)
    jaws64 = torch.tensor(seq.jaws_mm, dtype=torch.float64)
    edges = MACHINE.bev.col_edges_mm()
    half_dlg = 0.5 * MACHINE.dosimetric_leaf_gap_mm
    leaves64[10:12, :, 0] = float(edges[12])
    leaves64[10:12, :, 1] = float(edges[20])
    leaves64[30:32, :, 0] = jaws64[30:32, 0, None] + half_dlg  # on X1 at both ends of the sector
    leaves64[30:32, :, 1] = jaws64[30:32, 1, None] - half_dlg
    leaves64[50, :8, :] = torch.tensor([-300.0, 300.0], dtype=torch.float64)
    leaves64[70, :, 1] = leaves64[70, :, 0]
    gen = torch.Generator().manual_seed(3)
    weights = torch.rand((ARC.n_sectors, ROWS, MACHINE.bev.n_cols), dtype=dtype, generator=gen)
    results = []
    for fn in (delivered_fluence, delivered_fluence_torch):
        leaves = leaves64.to(dtype).clone().requires_grad_(True)
        mu = torch.tensor(seq.segment_mu(), dtype=dtype, requires_grad=True)
        fluence = fn(leaves, jaws64.to(dtype), mu, MACHINE)
        (fluence * weights).sum().backward()
        assert leaves.grad is not None and mu.grad is not None
        results.append((fluence.detach(), leaves.grad, mu.grad))
    (got, g_leaves, g_mu), (expected, e_leaves, e_mu) = results
    assert got.dtype == dtype and got.shape == expected.shape
    # the same operations in the same order: the fluence to the bit; the gradients summed in another order
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(g_leaves, e_leaves, rtol=tol, atol=tol * float(e_leaves.abs().max()))
    torch.testing.assert_close(g_mu, e_mu, rtol=tol, atol=0)
    assert float(expected.max()) > 1.0 and float(e_leaves[30:32].abs().max()) > 0.0
    assert float(e_leaves.abs().max()) > 0.1 and float(e_mu.abs().max()) > 0.1


def test_far_goals_hold_the_hottest_part_of_the_femoral_heads(problem: dict[str, object]) -> None:
    # an "at most V14.5Gy% <= 5" goal on a femoral head (outside the restricted engine) is held by the mean
    # dose of its 5 % hottest voxels in the arc's dose, exactly through the fluence: drawn from the start
    # arc's dose, drawn again from the current fluence's dose every redraw_every evaluations
    from pipeline.goals import GoalSpec, GoalStages
    from pipeline.plan import far_goal_terms, hottest_part

    prob = problem["problem"]
    case = problem["case"]
    fx = case.prescription.fractions  # type: ignore[attr-defined]
    rx = case.prescription.dose_gy / fx  # type: ignore[attr-defined]
    goals = (GoalSpec("femur_head_l", "V14.5Gy%", "<=", 5.0, 2), GoalSpec("femur_head_r", "V14.5Gy%", "<=", 5.0, 2),
             GoalSpec("rectum", "V36Gy%", "<=", 5.0, 1))
    options = PlanningOptions(source=FluenceSource.OPTIMIZE, dose_grid_mm=5.0, goals=goals)
    start = _sequence(seed=5, threshold=0.02)
    terms, held = far_goal_terms(prob, options, case, rx, start, MACHINE)  # type: ignore[arg-type]
    assert terms is not None and terms.terms is not None and len(terms.terms.maps) == 2 and len(held) == 2
    assert held[0].startswith("femur_head_l V14.5Gy% <= 5: mean of the 5 % hottest in the arc's dose (redrawn")
    flu = torch.as_tensor(fluence_from_sequence(start, MACHINE), dtype=torch.float32)
    with torch.no_grad():
        dose = prob.engine(flu).numpy()  # type: ignore[attr-defined]
    expected = 0.0
    for role in (Role.FEMUR_HEAD_L, Role.FEMUR_HEAD_R):
        mask = prob.masks[role].numpy()  # type: ignore[attr-defined]
        part = hottest_part(mask, dose, 0.05)
        assert part.sum() == int(np.ceil(0.05 * mask.sum())) and not (part & ~mask).any()
        assert dose[part].min() >= dose[mask & ~part].max()  # the hottest, in the start arc's dose
        excess = max(0.0, float(dose[part].mean()) - 14.5 * 0.98 / fx) / rx
        expected += 200.0 * excess**2  # the P2 weight, the goals' 2 % margin
    assert expected > 0  # this start arc breaks the goal's level in the parts
    assert float(terms(flu)) == pytest.approx(expected, rel=1e-3)
    assert terms.redraws == 1  # drawn once, from the start arc
    # the parts are drawn again from the dose of the fluence of every redraw_every-th evaluation: here
    # a fluence that only the other half of the sectors deliver, whose hot voxels lie elsewhere
    other = flu.clone()
    other[: other.shape[0] // 2] = 0.0
    with torch.no_grad():
        other_dose = prob.engine(other).numpy()  # type: ignore[attr-defined]
    mask_l = prob.masks[Role.FEMUR_HEAD_L].numpy()  # type: ignore[attr-defined]
    assert (hottest_part(mask_l, other_dose, 0.05) != hottest_part(mask_l, dose, 0.05)).any()
    for _ in range(terms.redraw_every - 2):
        terms(other)  # the parts of the start arc's dose still
    assert terms.redraws == 1
    terms(other)
    assert terms.redraws == 2
    redrawn = 0.0
    for role in (Role.FEMUR_HEAD_L, Role.FEMUR_HEAD_R):
        part = hottest_part(prob.masks[role].numpy(), other_dose, 0.05)  # type: ignore[attr-defined]
        redrawn += 200.0 * (max(0.0, float(other_dose[part].mean()) - 14.5 * 0.98 / fx) / rx) ** 2
    assert float(terms(other)) == pytest.approx(redrawn, rel=1e-3)
    # goals evaluated only: no term
    off = dataclasses.replace(options, goal_stages=GoalStages.OFF)
    assert far_goal_terms(prob, off, case, rx, start, MACHINE) == (None, [])  # type: ignore[arg-type]
