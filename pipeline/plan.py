"""The planning core: one function from a Case to a deliverable, normalised arc and its reference dose.

``airt plan``, the node's worker (through ``appliance.planning``) and the benchmarks call
:func:`plan_arc`; nothing else sequences, doses and normalises a plan. No DICOM here: the caller
writes the RT Plan and RT Dose and evaluates the goals.

Steps::

    fluence      optimizer near the target (method optimize) | networks + refinement (method ai)
    sequence     leaf sweeps over groups of adjacent sectors (sequencing.sweep), or the rule-based
                 sequencer (AI: the threshold whose plan covers the PTV); a start point only
    arc          machine-parameter optimisation of leaves and MU through the dose (pipeline.arc_optimizer)
    dose         full reference engine of the exported arc (fluence_from_sequence), per fraction
    normalise    MU scaled so that PTV D<v> (or the PTV mean) = Rx on the CT grid; a plan scaled down
                 by more than the arc's MU headroom has its leaf travel limited again for its new MU
                 and is dosed again

The dose returned is always the full reference engine's dose of the returned sequence.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray

from core.case import DEFAULT_HU_TO_DENSITY, Case, Role
from core.errors import PlanningError, SequencingError
from core.machine import ArcSpec, ArcStart, MachineModel
from pipeline.arc_optimizer import (
    FAR_OARS,
    OAR_REACH_MM,
    SHELL_MM,
    ArcOptimizerSettings,
    LinearDoseTerms,
    LinearGoalTerms,
    optimize_arc,
    rescale_mu,
)
from pipeline.dose_engine import DoseEngine, ReferenceDoseEngine, RegionDose
from pipeline.goal_objective import GoalSetup, PriorityWeights
from pipeline.goals import AT_LEAST, GoalSpec, GoalStages, Normalisation
from pipeline.optimizer import CtPoints
from pipeline.problem import PlanningProblem, build_problem
from sequencing.sequencer import ArcSequence
from sequencing.sweep import DEFAULT_GROUP

if TYPE_CHECKING:
    from pipeline.optimizer import OptimizerWeights

log = logging.getLogger(__name__)

#: Normalisation passes at most (dose, factor, leaf travel limited again for the scaled MU).
MAX_NORMALISATION_PASSES = 3


class FluenceSource(enum.StrEnum):
    """Where the fluence handed to the sequencer comes from."""

    OPTIMIZE = "optimize"
    AI = "ai"


@dataclass
class Timings:
    """Wall-clock seconds per stage, in the order they ran."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (accumulates when a stage runs twice)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0


@dataclass(frozen=True)
class PlanningOptions:
    """What :func:`plan_arc` needs besides the case, the machine and the arc.

    Parameters
    ----------
    source
        Fluence from the optimizer or the AI networks.
    dose_grid_mm
        Dose grid spacing, mm.
    hu_curve
        (HU, relative electron density) calibration pairs.
    optimizer_iterations
        Fluence optimizer evaluations (method optimize), from a flat start on the voxels near the target
        (:func:`pipeline.refine.refine_fluence`).
    sequencer_threshold
        The leaf sequencer's aperture threshold for an optimizer's fluence (fraction of a map's maximum).
    ai_thresholds, ai_min_ptv_d98_rel, ai_max_ptv_hi
        Sequencer thresholds tried for an AI fluence and what the chosen one's plan must reach (see
        :func:`pipeline.ai_planner.choose_aperture_threshold`).
    ai_refine_iterations
        Refinement evaluations of an AI fluence (0: none).
    model_dir
        AI model folder (``""`` for the shipped model).
    sparing
        AI OAR suppression factors by role.
    ai_feedback
        Run the AI pipeline's dose-feedback correction (False only for the ablation "-DF").
    arc
        Machine-parameter optimisation settings (``iterations = 0`` keeps the sequencer's arc); its
        MU term is the modulation factor (MU per cGy of the fraction dose).
    arc_start, sweep_group
        The arc the optimisation starts from: the fluence of every ``sweep_group`` adjacent sectors
        delivered by one leaf sweep (``sequencing.sweep``), or the rule-based sequencer's (for an AI
        fluence at the threshold search's choice). Without arc optimisation (``arc.iterations = 0``)
        the rule-based sequencer's arc is the plan (a sweep needs the optimisation to bring its MU
        down).
    normalisation, normalisation_volume_percent
        MU normalisation: PTV D<v> = Rx, PTV mean = Rx, or none.
    goals
        The clinical goal list: evaluated on the plan (``PlanResult.goals``) and terms of the
        objective, weighted by priority (``goal_weights``), in the stages ``goal_stages`` names.
    rescue_rounds, rescue_boost
        When a P1 goal fails, the arc is optimised again up to ``rescue_rounds`` times with the
        failing goals' weights multiplied by ``rescue_boost`` each round; the plan that best meets the
        goals in priority order is kept (0: no rescue).
    optimizer_weights
        The dose terms' weights of the fluence optimizer, the AI refinement and the arc optimisation
        (``pipeline.optimizer.OptimizerWeights``; None: its defaults).
    device
        Torch device.
    """

    source: FluenceSource = FluenceSource.OPTIMIZE
    dose_grid_mm: float = 4.0
    hu_curve: tuple[tuple[float, float], ...] = DEFAULT_HU_TO_DENSITY
    optimizer_iterations: int = 150
    sequencer_threshold: float = 0.02
    ai_thresholds: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1, 0.05, 0.02)
    ai_min_ptv_d98_rel: float = 0.97
    ai_max_ptv_hi: float = 0.10
    ai_refine_iterations: int = 20
    model_dir: str = ""
    sparing: Mapping[Role, float] = field(default_factory=dict)
    ai_feedback: bool = True
    arc: ArcOptimizerSettings = field(default_factory=ArcOptimizerSettings)
    arc_start: ArcStart = ArcStart.SWEEP
    sweep_group: int = DEFAULT_GROUP
    normalisation: Normalisation = Normalisation.PTV_DX
    normalisation_volume_percent: float = 95.0
    goals: Sequence[GoalSpec] = ()
    goal_stages: GoalStages = GoalStages.ARC
    goal_weights: PriorityWeights = field(default_factory=PriorityWeights)
    rescue_rounds: int = 2
    rescue_boost: float = 4.0
    optimizer_weights: OptimizerWeights | None = None
    device: str = "cpu"


@dataclass(frozen=True, eq=False)
class PlanResult:
    """What :func:`plan_arc` returns.

    Attributes
    ----------
    sequence
        The exported arc, MU normalised, within every machine limit.
    start
        The sequencer's arc the machine-parameter optimisation started from (not normalised).
    dose_fx
        Its dose per fraction from the full reference engine, Gy, on ``problem.grid``.
    fluence
        The fluence that was sequenced (MU per pixel per fraction, before normalisation).
    factor
        The MU normalisation factor applied to ``sequence`` and ``dose_fx``.
    problem
        Geometry, reference engine and dose-grid masks of the case.
    record
        What ``metrics.json`` records of how the plan was made (method details, sequencer
        threshold, refinement, arc optimisation, rescue tries).
    goals
        The goal results of the returned plan (``pipeline.goals.evaluate_goals``, CT grid), or
        ``None`` when the options hold no goals.
    """

    sequence: ArcSequence
    start: ArcSequence
    dose_fx: NDArray[np.float32]
    fluence: NDArray[np.float32]
    factor: float
    problem: PlanningProblem
    record: dict[str, Any]
    goals: list[dict[str, Any]] | None = None


#: Structures the arc optimisation reads at their CT voxels (:meth:`DoseObjective.on_voxels`): the PTV
#: whole, the organs where they are near it.
CT_POINT_ROLES = (Role.PTV, Role.RECTUM, Role.BLADDER)


def near_target_engine(problem: PlanningProblem, case: Case | None = None, *, sectors_per_beam: int = 1
                       ) -> tuple[RegionDose, NDArray[np.bool_], dict[str, CtPoints]]:
    """The reference engine restricted to the voxels the arc optimisation reads (see ``arc_optimizer``),
    giving the dose as a vector over them (every ``sectors_per_beam`` adjacent sectors dosed together);
    that region (bool on the dose grid); and, with ``case``, the CT voxels of :data:`CT_POINT_ROLES` it
    reads (the PTV's all, an organ's those interpolating from the region), the region then holding every
    voxel they interpolate from."""
    from pipeline.evaluation import ct_voxel_stencil
    from pipeline.refine import refinement_region

    masks = {role: m.detach().cpu().numpy().astype(bool) for role, m in problem.masks.items()}
    region = refinement_region(masks, problem.grid.spacing_mm, shell_mm=SHELL_MM, oar_reach_mm=OAR_REACH_MM)
    points: dict[str, CtPoints] = {}
    if case is not None:
        dev = problem.engine.device
        ptv_ct = case.masks[Role.PTV]
        base = region.reshape(-1).copy()
        for role in CT_POINT_ROLES:
            if role not in case.masks or not case.masks[role].any():
                continue
            idx, w = ct_voxel_stencil(problem.grid, case.grid, case.masks[role])
            in_ptv = ptv_ct[case.masks[role]]
            if role is not Role.PTV:  # an organ's voxels near the target: some neighbour in the region
                near = (base[idx] & (w > 0)).any(axis=1)
                idx, w, in_ptv = idx[near], w[near], in_ptv[near]
            if idx.shape[0] == 0:
                continue
            pt = CtPoints(index=torch.as_tensor(idx, device=dev), weights=torch.as_tensor(w, device=dev),
                          voxel_cc=case.grid.voxel_volume_cc, total=int(case.masks[role].sum()),
                          in_ptv=torch.as_tensor(in_ptv, device=dev))
            region |= pt.support(problem.grid.shape)
            points[role.value] = pt
    engine = problem.engine.restricted(region, sectors_per_beam=sectors_per_beam)
    return RegionDose(engine, region, sectors_per_beam=sectors_per_beam), region, points


def _fluence(case: Case, problem: PlanningProblem, options: PlanningOptions, rx_fx: float,
             timings: Timings, record: dict[str, Any]) -> tuple[NDArray[np.float32], DoseEngine | None]:
    """The fluence to sequence, and the refinement's restricted engine (AI) when there is one."""
    from pipeline.refine import refine_fluence

    if options.source is FluenceSource.OPTIMIZE:  # from a flat start, on the voxels near the target
        with timings.stage("optimize"):
            result = refine_fluence(None, problem.engine, problem.masks, rx_gy=rx_fx,
                                    iterations=options.optimizer_iterations, weights=options.optimizer_weights,
                                    goals=_goal_setup(options, problem, case, {}, fluence_stage=True))
        record["optimizer"] = result.record()
        return result.fluence, None
    from pipeline.ai_planner import predict_fluence

    fluence, module_ms = predict_fluence(case, options.model_dir, geometry=problem.geometry, rx_gy=rx_fx,
                                         sparing=options.sparing, device=options.device, timings=timings,
                                         feedback=options.ai_feedback)
    record["ai_module_ms"] = module_ms
    if options.ai_refine_iterations <= 0:
        return fluence, None
    with timings.stage("ai_refine"):
        refined = refine_fluence(fluence, problem.engine, problem.masks, rx_gy=rx_fx,
                                 iterations=options.ai_refine_iterations, weights=options.optimizer_weights,
                                 goals=_goal_setup(options, problem, case, {}, fluence_stage=True))
    record["ai_refine"] = refined.record()
    return refined.fluence, refined.engine


def _start_sequence(fluence: NDArray[np.float32], problem: PlanningProblem, machine: MachineModel, arc: ArcSpec,
                    options: PlanningOptions, ptv_engine: DoseEngine | None, timings: Timings,
                    record: dict[str, Any]) -> ArcSequence:
    """The arc the machine-parameter optimisation starts from: the leaf sweeps of the fluence, or the
    rule-based sequencer's arc (the optimizer's fluence at the configured threshold, an AI fluence at
    the threshold whose plan covers the PTV)."""
    from sequencing.sequencer import sequence_arc
    from sequencing.sweep import sweep_sequence_arc

    headroom = options.arc.mu_headroom
    if options.arc_start is ArcStart.SWEEP and options.arc.iterations > 0:
        with timings.stage("sequence"):
            seq = sweep_sequence_arc(fluence, arc, machine, group=options.sweep_group, mu_headroom=headroom)
        record["arc_start"] = {"kind": ArcStart.SWEEP.value, "group": options.sweep_group,
                               "mu": round(seq.total_mu, 1)}
        return seq
    if options.source is FluenceSource.AI:
        from pipeline.ai_planner import choose_aperture_threshold

        with timings.stage("ai_threshold"):
            choice = choose_aperture_threshold(
                fluence, arc, machine, problem.engine, problem.masks[Role.PTV].cpu().numpy(),
                thresholds=options.ai_thresholds, min_d98_rel=options.ai_min_ptv_d98_rel,
                max_hi=options.ai_max_ptv_hi, mu_headroom=headroom, ptv_engine=ptv_engine)
        record["ai_sequencing"] = {"threshold": choice.threshold, "tries": choice.tries}
        record["sequencer_aperture_threshold"] = choice.threshold
        return choice.sequence
    with timings.stage("sequence"):
        seq = sequence_arc(fluence, arc, machine, threshold=options.sequencer_threshold, mu_headroom=headroom)
    record["sequencer_aperture_threshold"] = options.sequencer_threshold
    return seq


def _reference_dose(problem: PlanningProblem, seq: ArcSequence, machine: MachineModel,
                    device: str) -> NDArray[np.float32]:
    """Dose per fraction of a sequence from the full reference engine, Gy."""
    return _sequence_dose(problem.engine, seq, machine, device)


def _sequence_dose(engine: ReferenceDoseEngine, seq: ArcSequence, machine: MachineModel,
                   device: str | torch.device | None = None) -> NDArray[np.float32]:
    """Dose per fraction of a sequence from ``engine`` on its grid (0 where it computes none), Gy."""
    from sequencing.fluence import fluence_from_sequence

    delivered = torch.as_tensor(fluence_from_sequence(seq, machine), dtype=torch.float32,
                                device=device if device is not None else engine.device)
    with torch.inference_mode():
        return engine(delivered).cpu().numpy().astype(np.float32)


def mu_normalisation_factor(dose_fx: NDArray[np.float32], problem: PlanningProblem, case: Case,
                            options: PlanningOptions, rx_fx: float) -> float:
    """The factor scaling a dose per fraction (and its MU) to the options' normalisation on the CT grid."""
    from pipeline.evaluation import structure_dvh_inputs
    from pipeline.goals import normalisation_factor

    if options.normalisation is Normalisation.NONE:
        return 1.0
    # On the CT grid, as the reported metrics are, so the reported PTV D<v> equals Rx.
    ptv_inputs = structure_dvh_inputs(dose_fx, problem.grid, case, Role.PTV)
    if ptv_inputs is None:
        raise PlanningError("the PTV holds no CT voxel; the case cannot be normalised")
    factor = normalisation_factor(ptv_inputs[0], ptv_inputs[1], rx_gy=rx_fx, mode=options.normalisation.value,
                                  volume_percent=options.normalisation_volume_percent)
    if not np.isfinite(factor) or factor <= 0:
        raise PlanningError(f"MU normalisation failed (factor {factor}); the plan delivers no PTV dose")
    return float(factor)


def plan_arc(case: Case, machine: MachineModel, arc: ArcSpec, options: PlanningOptions, *,
             problem: PlanningProblem | None = None, timings: Timings | None = None) -> PlanResult:
    """Plan ``case``: fluence, sequence, arc optimisation, reference dose, MU normalisation.

    Parameters
    ----------
    case
        The planning case (CT in HU, masks by role, prescription).
    machine, arc
        The linac and the arc.
    options
        Method and settings (:class:`PlanningOptions`).
    problem
        The case's geometry, engine and masks when the caller has them (candidate plans of one
        case share them); built otherwise.
    timings
        Stage timings are added here.

    Raises
    ------
    PlanningError, SequencingError
        A plan that cannot be made (with the reason), or one that breaks a machine limit.
    """
    from pipeline.optimizer import build_dose_objective

    timings = timings if timings is not None else Timings()
    rx_fx = case.prescription.dose_gy / case.prescription.fractions
    if problem is None:
        with timings.stage("setup"):
            problem = build_problem(case, arc, machine, hu_curve=options.hu_curve, spacing_mm=options.dose_grid_mm,
                                    device=options.device)
    record: dict[str, Any] = {}
    fluence, ptv_engine = _fluence(case, problem, options, rx_fx, timings, record)
    seq = start = _start_sequence(fluence, problem, machine, arc, options, ptv_engine, timings, record)

    objective: Callable[[dict[int, float]], Any] | None = None
    near: RegionDose | None = None
    far: Callable[[torch.Tensor], torch.Tensor] | None = None
    if options.arc.iterations > 0:
        with timings.stage("arc_optimize"):
            near, region, points = near_target_engine(problem, case, sectors_per_beam=options.arc.sectors_per_beam)
            region_t = torch.as_tensor(region, device=options.device)

            def objective(boost: dict[int, float]) -> Any:
                return build_dose_objective(
                    {role.value: m for role, m in problem.masks.items()}, rx_gy=rx_fx,
                    spacing_mm=problem.grid.spacing_mm, weights=options.optimizer_weights,
                    goals=_goal_setup(options, problem, case, boost),
                    region=region_t).on_voxels(near.index, points)

            far, far_goals = _far_terms(problem, options, case, rx_fx, seq, machine)
            result = optimize_arc(seq, near, objective({}), machine, arc, settings=options.arc,
                                  device=options.device, mu_reference=100.0 * rx_fx, fluence_terms=far)
        seq = result.sequence
        record["arc_optimizer"] = {**result.record(), "voxels": int(region.sum()),
                                   "sectors_per_beam": options.arc.sectors_per_beam, "far_goals": far_goals,
                                   "ct_points": {k: int(p.index.shape[0]) for k, p in points.items()}}

    with timings.stage("final_dose"):
        seq, dose_fx, factor = _normalised_arc(seq, problem, case, machine, arc, options, rx_fx)
    goals = _evaluate(options, dose_fx, problem, case)
    p1_failed = any(g["priority"] == 1 and g["passed"] is False for g in goals or [])
    if goals and p1_failed and objective is not None and near is not None and options.rescue_rounds > 0:
        seq, dose_fx, factor, goals = _rescue(seq, dose_fx, factor, goals, problem, case, machine, arc, options, rx_fx,
                                             near, objective, timings, record, far)
    record["normalisation_factor"] = factor
    return PlanResult(sequence=seq, start=start, dose_fx=dose_fx, fluence=fluence, factor=factor, problem=problem,
                      record=record, goals=goals)


def _far_terms(problem: PlanningProblem, options: PlanningOptions, case: Case, rx_fx: float,
               start: ArcSequence, machine: MachineModel) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, list[str]]:
    """The terms of the arc optimisation on the structures outside its restricted engine (the femoral
    heads): their mean-dose hinges, and their dose-volume goals through their hottest part
    (:func:`far_goal_terms`) when the arc stage holds the goals; and the goals so held, as text."""
    from pipeline.optimizer import OptimizerWeights

    w = options.optimizer_weights or OptimizerWeights()
    masks = [problem.masks[r] for r in FAR_OARS if r in problem.masks]
    if not any(bool(m.any()) for m in masks):
        return None, []
    engine = far_engine(problem)
    terms: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if w.femur_mean > 0:
        terms.append(LinearDoseTerms.of(engine, masks, rx_gy=rx_fx, level=w.femur_mean_level, weight=w.femur_mean))
    goals, held = far_goal_terms(problem, options, case, rx_fx, start, machine, engine=engine)
    if goals is not None:
        terms.append(goals)
    if not terms:
        return None, held
    if len(terms) == 1:
        return terms[0], held
    return (lambda fluence: sum((t(fluence) for t in terms[1:]), terms[0](fluence))), held


def far_engine(problem: PlanningProblem) -> ReferenceDoseEngine:
    """The case's reference engine restricted to the :data:`FAR_OARS` structures: their doses and the
    adjoints of their masks are the full engine's (:meth:`ReferenceDoseEngine.restricted`), for the trace
    of their few thousand voxels instead of a pass over the body (0.35-0.5 s for the start arc's dose)."""
    union = np.zeros(problem.grid.shape, dtype=bool)
    for role in FAR_OARS:
        if role in problem.masks:
            union |= problem.masks[role].detach().cpu().numpy().astype(bool)
    return problem.engine.restricted(union)


#: The part of a far structure that holds an "at most VxGy% <= f" goal in the arc optimisation
#: (:func:`far_goal_terms`): its ``PART_FACTOR x f`` hottest voxels in the current arc's dose.
PART_FACTOR = 1.0

#: Arc-stage evaluations between two redraws of the hottest parts (:class:`HotPartGoalTerms`).
PART_REDRAW_EVERY = 50


def hottest_part(mask: NDArray[np.bool_], dose: NDArray[np.floating], fraction: float) -> NDArray[np.bool_]:
    """The ``fraction`` of ``mask``'s voxels hottest in ``dose`` (at least one; ties by voxel order)."""
    idx = np.flatnonzero(mask)
    k = min(idx.size, max(1, int(np.ceil(fraction * idx.size))))
    keep = idx[np.argsort(-np.asarray(dose).reshape(-1)[idx], kind="stable")[:k]]
    out = np.zeros(mask.size, dtype=bool)
    out[keep] = True
    return out.reshape(mask.shape)


@dataclass(eq=False)
class HotPartGoalTerms:
    """"At most ``f`` of the structure above ``x``" goals on structures outside the restricted engine,
    held by the mean dose of each structure's hottest ``PART_FACTOR x f`` (a helper structure), as
    :class:`LinearGoalTerms` do; the parts are drawn from the start arc's dose and drawn again from the
    current fluence's dose every ``redraw_every`` evaluations, as a planner redraws a helper structure
    between optimisation rounds. A part kept from the start goes stale: the arc stage moves dose
    laterally to spare the rectum and the heads' hot voxels move with it (on 40 cases, 10 heads broke
    ``V14.5Gy% <= 5`` with parts fixed from the start arc).

    ``masks`` are the structures (on ``engine``'s grid), ``fractions`` the parts' sizes (of the
    structure's voxels); ``limits_fx``, ``weights`` and ``rx_fx`` as :class:`LinearGoalTerms`.
    """

    engine: ReferenceDoseEngine
    masks: tuple[NDArray[np.bool_], ...]
    fractions: tuple[float, ...]
    limits_fx: tuple[float, ...]
    weights: tuple[float, ...]
    rx_fx: float
    redraw_every: int = PART_REDRAW_EVERY
    calls: int = 0
    redraws: int = 0
    terms: LinearGoalTerms | None = None

    def redraw(self, dose: NDArray[np.floating]) -> None:
        """Draw the parts from ``dose`` (on the engine's grid) and their maps through the engine."""
        maps = []
        for mask, fraction in zip(self.masks, self.fractions, strict=True):
            part = hottest_part(mask, dose, fraction)
            maps.append(self.engine.adjoint(torch.as_tensor(part, device=self.engine.device)) / float(part.sum()))
        self.terms = LinearGoalTerms(maps=tuple(maps), limits_fx=self.limits_fx, weights=self.weights,
                                     rx_fx=self.rx_fx)
        self.redraws += 1

    def __call__(self, fluence: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.terms is None or (self.redraw_every > 0 and self.calls % self.redraw_every == 0):
            with torch.inference_mode():
                dose = self.engine(fluence.detach().to(self.engine.device)).cpu().numpy()
            self.redraw(dose)
        assert self.terms is not None
        return self.terms(fluence)


def far_goal_terms(problem: PlanningProblem, options: PlanningOptions, case: Case, rx_fx: float,
                   start: ArcSequence, machine: MachineModel, *,
                   engine: ReferenceDoseEngine | None = None) -> tuple[HotPartGoalTerms | None, list[str]]:
    """:class:`HotPartGoalTerms` of the "at most VxGy%" goals on :data:`FAR_OARS` structures, when the arc
    stage's objective holds the goals (``goal_stages``): each held by the mean dose of the part of the
    structure hottest in the arc's dose (``PART_FACTOR`` x the allowed volume, drawn from the start arc and
    redrawn every :data:`PART_REDRAW_EVERY` evaluations), at ``x`` tightened by the goals' margin, weighted
    by the goal's priority; and those goals with their part, as text (``metrics.json``). ``engine``: one
    that computes the dose in those structures (:func:`far_engine`, built when not given)."""
    from pipeline.dvh import V_METRIC_RE
    from pipeline.goals import AT_MOST

    setup = _goal_setup(options, problem, case, {})
    if setup is None:
        return None, []
    far = {r.value: r for r in FAR_OARS if r in problem.masks}
    wanted = [(g, float(m.group("x"))) for g in setup.goals
              if g.structure in far and g.comparison == AT_MOST and 0.0 < g.limit < 50.0
              and (m := V_METRIC_RE.match(g.metric)) is not None and m.group("unit") == "%"]
    if not wanted:
        return None, []
    engine = engine if engine is not None else far_engine(problem)
    masks, fractions, limits, weights, held = [], [], [], [], []
    for goal, level_gy in wanted:
        mask = problem.masks[far[goal.structure]].detach().cpu().numpy().astype(bool)
        if not mask.any():
            continue
        level_gy *= 1.0 - setup.weights.margin
        masks.append(mask)
        fractions.append(PART_FACTOR * goal.limit / 100.0)
        limits.append(level_gy / setup.fractions)
        weights.append(setup.weights.of(goal.priority))
        held.append(f"{goal.structure} {goal.metric} {goal.comparison} {goal.limit:g}: mean of the "
                    f"{PART_FACTOR * goal.limit:g} % hottest in the arc's dose (redrawn every "
                    f"{PART_REDRAW_EVERY} evaluations) <= {level_gy:.2f} Gy")
    if not masks:
        return None, held
    terms = HotPartGoalTerms(engine=engine, masks=tuple(masks), fractions=tuple(fractions), limits_fx=tuple(limits),
                             weights=tuple(weights), rx_fx=rx_fx, redraw_every=PART_REDRAW_EVERY)
    terms.redraw(_sequence_dose(engine, start, machine))
    return terms, held


def _goal_setup(options: PlanningOptions, problem: PlanningProblem, case: Case, boost: dict[int, float], *,
                fluence_stage: bool = False) -> GoalSetup | None:
    """The goals a stage's objective adds as terms (``None``: none): the arc stage with ``goal_stages``
    ``arc`` or ``all``, the fluence stages with ``all``; a rescue (``boost``) always adds them."""
    wanted = {GoalStages.ALL} if fluence_stage else {GoalStages.ARC, GoalStages.ALL}
    if not options.goals or (options.goal_stages not in wanted and not boost):
        return None
    percent = (options.normalisation_volume_percent if options.normalisation is Normalisation.PTV_DX else None)
    return GoalSetup(goals=tuple(options.goals), fractions=case.prescription.fractions,
                     voxel_cc=problem.grid.voxel_volume_cc, weights=options.goal_weights, boost=boost,
                     normalisation_percent=percent)


def _normalised_arc(seq: ArcSequence, problem: PlanningProblem, case: Case, machine: MachineModel, arc: ArcSpec,
                    options: PlanningOptions, rx_fx: float) -> tuple[ArcSequence, NDArray[np.float32], float]:
    """The arc MU-normalised (leaves limited again when scaled down past the headroom), its full
    reference dose per fraction and the factor; raises when a machine limit is broken."""
    from sequencing.deliverability import check_deliverable

    dose_fx = _reference_dose(problem, seq, machine, options.device)
    factor = 1.0
    for _ in range(MAX_NORMALISATION_PASSES):
        step = mu_normalisation_factor(dose_fx, problem, case, options, rx_fx)
        scaled, relimited = rescale_mu(seq, step, machine, arc, mu_headroom=options.arc.mu_headroom)
        seq, factor = scaled, factor * step
        if not relimited:
            dose_fx = (dose_fx * step).astype(np.float32)
            break
        # Fewer MU shortened MU-limited segments: the leaves were limited again, so dose again.
        dose_fx = _reference_dose(problem, seq, machine, options.device)
    else:
        log.warning("case %s: the MU normalisation did not settle in %d passes (last factor %.4f)", case.case_id,
                    MAX_NORMALISATION_PASSES, step)
    problems = check_deliverable(seq, machine)
    if problems:
        raise SequencingError("the planned arc violates machine limits: " + "; ".join(problems[:5]))
    return seq, dose_fx, factor


def _evaluate(options: PlanningOptions, dose_fx: NDArray[np.float32], problem: PlanningProblem,
              case: Case) -> list[dict[str, Any]] | None:
    """The goal results of a plan's dose (CT grid, all fractions), or ``None`` without goals."""
    from pipeline.goals import evaluate_goals

    if not options.goals:
        return None
    return evaluate_goals(options.goals, dose_fx * case.prescription.fractions, problem.grid, case)


def goal_rank(goals: list[dict[str, Any]]) -> tuple[int, float, int, float]:
    """Sort key of a plan by its goal results, best first: P1 goals failed, their summed relative
    violation, P2 goals failed, their summed relative violation."""
    def violation(g: dict[str, Any]) -> float:
        value, limit = g["value"], g["limit"]
        gap = (limit - value) if g["comparison"] == AT_LEAST else (value - limit)
        return max(0.0, gap) / max(abs(limit), 1e-9)

    failed = {p: [g for g in goals if g["priority"] == p and g["passed"] is False] for p in (1, 2)}
    return (len(failed[1]), sum(violation(g) for g in failed[1]), len(failed[2]),
            sum(violation(g) for g in failed[2]))


def _rescue(seq: ArcSequence, dose_fx: NDArray[np.float32], factor: float, goals: list[dict[str, Any]],
            problem: PlanningProblem, case: Case, machine: MachineModel, arc: ArcSpec, options: PlanningOptions,
            rx_fx: float, near: RegionDose, objective: Callable[[dict[int, float]], Any], timings: Timings,
            record: dict[str, Any], far: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[ArcSequence, NDArray[np.float32], float,
                                                                          list[dict[str, Any]]]:
    """While a P1 goal fails: optimise the arc again from the current one with the failing goals'
    weights raised (``options.rescue_boost`` per round, up to ``options.rescue_rounds`` rounds); keep
    the plan that best meets the goals in priority order (:func:`goal_rank`). Records every try."""
    best = (goal_rank(goals), 0, seq, dose_fx, factor, goals)
    tries = [{"round": 0, "rank": list(best[0]), "p1_failed": _failed_names(goals, 1)}]
    boost: dict[int, float] = {}
    current = seq
    for round_ in range(1, options.rescue_rounds + 1):
        failing = [i for i, g in enumerate(goals) if g["priority"] == 1 and g["passed"] is False]
        if not failing:
            break
        for i in failing:
            boost[i] = boost.get(i, 1.0) * options.rescue_boost
        with timings.stage("rescue"):
            result = optimize_arc(current, near, objective(dict(boost)), machine, arc, settings=options.arc,
                                  device=options.device, mu_reference=100.0 * rx_fx, fluence_terms=far)
            current, dose_fx, factor = _normalised_arc(result.sequence, problem, case, machine, arc, options, rx_fx)
            goals = _evaluate(options, dose_fx, problem, case) or []
        rank = goal_rank(goals)
        tries.append({"round": round_, "boost": {str(i): b for i, b in boost.items()}, "rank": list(rank),
                      "p1_failed": _failed_names(goals, 1)})
        if rank < best[0]:
            best = (rank, round_, current, dose_fx, factor, goals)
    record["rescue"] = {"tries": tries, "kept_round": best[1]}
    log.info("case %s: rescue of failing P1 goals: %d round(s), kept round %d (%d P1 goal(s) failed)", case.case_id,
             len(tries) - 1, best[1], best[0][0])
    return best[2], best[3], best[4], best[5]


def _failed_names(goals: list[dict[str, Any]], priority: int) -> list[str]:
    return [f"{g['structure']} {g['metric']} {g['comparison']} {g['limit']:g}" for g in goals
            if g["priority"] == priority and g["passed"] is False]


def unsequenced_dose_fx(result: PlanResult, case: Case, options: PlanningOptions) -> NDArray[np.float32]:
    """Dose per fraction of the fluence handed to the sequencer, normalised as the plan is (for the
    fidelity figures: what sequencing and the arc optimisation kept of the fluence's quality)."""
    with torch.inference_mode():
        dose = result.problem.engine(torch.as_tensor(result.fluence, device=options.device)).cpu().numpy()
    rx_fx = case.prescription.dose_gy / case.prescription.fractions
    return (dose * mu_normalisation_factor(dose, result.problem, case, options, rx_fx)).astype(np.float32)
