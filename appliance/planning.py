"""Plan a folder of DICOM files: Case -> fluence (AI or optimizer) -> sequencer -> reference dose
of the sequenced plan -> RT Plan, RT Dose, metrics.json and a report.

This is what ``airt plan`` and the node's worker run. The RT Dose written is always the dose of
the *sequenced, deliverable* plan computed by the reference engine, never a network's
prediction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import Normalisation, PlanningMethod, Settings
from pipeline.case import Case, Role
from pipeline.errors import PlanningError, SequencingError

log = logging.getLogger(__name__)

#: Leaf travel is limited for this fraction fewer MU than sequenced, so that the MU normalisation
#: may scale a plan down by up to this fraction without a leaf exceeding its speed.
MU_HEADROOM = 0.02
#: Sequencing passes at most: a plan normalised down by more than MU_HEADROOM is sequenced again
#: from its scaled fluence.
MAX_SEQUENCING_PASSES = 3
#: Sub-folder of a plan's output folder holding the candidate plans (one sub-folder each).
CANDIDATES_DIR = "candidates"
DISCLAIMER = "Research output of an automated planner; not clinically approved. Review in a TPS."


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


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; other names pass through."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PlanningError(f"planning.device = {name!r} but no CUDA device is available; use auto or cpu")
    return name


def resolve_method(settings: Settings, method: str | None) -> PlanningMethod:
    """The planning method to use: explicit argument, else the configuration. ``auto`` means ai
    when an installed model is qualified for unattended use (its held-out plans passed the quality
    gate recorded in model.json), else optimize."""
    from pipeline.ai_model import installed_model_dir, model_is_qualified

    chosen = PlanningMethod(method) if method else settings.planning.method
    folder = installed_model_dir(settings.planning.model_dir)
    if chosen is PlanningMethod.AUTO:
        if folder is None:
            return PlanningMethod.OPTIMIZE
        ok, why = model_is_qualified(folder, settings.planning.ai_refine_iterations)
        if not ok:
            log.info("method auto: using the optimizer; the installed model is not qualified for unattended use (%s)", why)
            return PlanningMethod.OPTIMIZE
        return PlanningMethod.AI
    if chosen is PlanningMethod.AI and folder is None:
        raise PlanningError(
            "planning method 'ai' needs a trained model, none is installed "
            f"(planning.model_dir = {settings.planning.model_dir!r}); use --method optimize or train one"
        )
    return chosen


@dataclass(frozen=True)
class _PlanContext:
    """What turning a fluence into an exported plan needs (one case, one dose grid)."""

    case: Case
    settings: Settings
    engine: Any
    grid: Any
    machine: Any
    arc: Any
    device: str
    isocenter_mm: tuple[float, float, float]
    geometry: Any
    ptv_dose_grid: np.ndarray


def _choose_ai_threshold(ctx: _PlanContext, fluence: np.ndarray, timings: Timings,
                         ptv_engine: Any = None) -> tuple[Any, dict[str, Any]]:
    """The sequencer threshold for an AI fluence (see ``pipeline.ai_planner.choose_aperture_threshold``).

    Returns the choice (its threshold and its sequence, made as :func:`_sequence_and_dose` makes its
    first one) and what ``metrics.json`` records of it. ``ptv_engine``: the refinement's restricted
    engine, reused for the tries.
    """
    from pipeline.ai_planner import choose_aperture_threshold

    p = ctx.settings.planning
    with timings.stage("ai_threshold"):
        choice = choose_aperture_threshold(
            fluence, ctx.arc, ctx.machine, ctx.engine, ctx.ptv_dose_grid, thresholds=p.ai_aperture_thresholds,
            min_d98_rel=p.ai_min_ptv_d98_percent / 100.0, max_hi=p.ai_max_ptv_hi, mu_headroom=MU_HEADROOM,
            ptv_engine=ptv_engine,
        )
    return choice, {"threshold": choice.threshold, "tries": choice.tries}


def _sequence_and_dose(ctx: _PlanContext, fluence: np.ndarray, threshold: float,
                       timings: Timings, first: Any = None) -> tuple[Any, np.ndarray, float]:
    """Sequence a fluence, dose the delivered plan with the reference engine, MU-normalise it.

    ``first``: the sequence of ``fluence`` at ``threshold`` when the caller has it already (the
    AI threshold choice), used for the first pass instead of sequencing again.

    Returns the normalised sequence, its dose per fraction (Gy) and the normalisation factor;
    raises PlanningError / SequencingError when the plan delivers no PTV dose or breaks a limit.
    """
    import torch

    from pipeline.evaluation import structure_dvh_inputs
    from pipeline.goals import normalisation_factor
    from sequencing.deliverability import check_deliverable
    from sequencing.fluence import fluence_from_sequence
    from sequencing.sequencer import sequence_arc

    settings, case = ctx.settings, ctx.case
    norm = settings.prescription.normalisation
    scale = 1.0
    for attempt in range(MAX_SEQUENCING_PASSES):
        with timings.stage("sequence"):
            seq = first if attempt == 0 and first is not None else sequence_arc(
                fluence * scale, ctx.arc, ctx.machine, threshold=threshold, mu_headroom=MU_HEADROOM)
        with timings.stage("final_dose"):
            delivered = fluence_from_sequence(seq, ctx.machine)
            with torch.inference_mode():
                dose_fx = ctx.engine(torch.as_tensor(delivered, dtype=torch.float32, device=ctx.device)).cpu().numpy()
        factor = 1.0
        if norm is Normalisation.NONE:
            break
        mode = "ptv_dx" if norm is Normalisation.PTV_DX else "ptv_mean"
        # On the CT grid, as the reported metrics are, so the reported PTV D95 equals Rx.
        ptv_inputs = structure_dvh_inputs(dose_fx, ctx.grid, case, Role.PTV)
        assert ptv_inputs is not None  # Case guarantees a non-empty PTV
        factor = normalisation_factor(
            ptv_inputs[0], ptv_inputs[1], rx_gy=case.prescription.dose_gy / case.prescription.fractions,
            mode=mode, volume_percent=settings.prescription.normalisation_volume_percent,
        )
        if not np.isfinite(factor) or factor <= 0:
            raise PlanningError(f"MU normalisation failed (factor {factor}); the plan delivers no PTV dose")
        if factor >= 1.0 - MU_HEADROOM:
            break
        # Fewer MU would shorten MU-limited segments below what the leaves need: sequence the
        # scaled fluence again, so that the leaf travel is limited for the MU it will deliver.
        scale *= factor
    with timings.stage("final_dose"):
        seq = dataclasses.replace(seq, cumulative_mu=seq.cumulative_mu * factor)
        dose_fx = dose_fx * factor
        problems = check_deliverable(seq, ctx.machine)
        if problems:
            raise SequencingError("the sequenced plan violates machine limits: " + "; ".join(problems[:5]))
    return seq, dose_fx, float(factor)


def _export(ctx: _PlanContext, out_dir: Path, seq: Any, dose_plan: np.ndarray, label: str) -> str:
    """Write ``rtplan.dcm`` and ``rtdose.dcm`` of a sequenced plan into ``out_dir``; returns the plan's UID."""
    from appliance.rtdose import write_rtdose
    from appliance.rtplan import write_rtplan

    case = ctx.case
    plan_uid = write_rtplan(
        out_dir / "rtplan.dcm", sequence=seq, machine=ctx.machine, case=case, isocenter_mm=ctx.isocenter_mm,
        plan_label=label, fractions=case.prescription.fractions, rx_gy=case.prescription.dose_gy,
        dose_rate_mu_min=ctx.settings.machine.dose_rate_mu_min,
    )
    write_rtdose(out_dir / "rtdose.dcm", dose_gy=dose_plan, grid=ctx.grid, case=case, plan_sop_instance_uid=plan_uid)
    return plan_uid


def candidate_folder_name(bladder: float, rectum: float) -> str:
    """Sub-folder of ``candidates/`` holding the plan made with these suppression factors."""
    return f"bladder{bladder:.2f}_rectum{rectum:.2f}"


def _plan_candidate(ctx: _PlanContext, out_dir: Path, bladder: float, rectum: float) -> dict[str, Any]:
    """One extra AI plan with OAR suppression factors: exported under ``candidates/`` with its metrics."""
    from pipeline.ai_planner import predict_fluence
    from pipeline.evaluation import evaluate_structures

    case, settings = ctx.case, ctx.settings
    folder = out_dir / CANDIDATES_DIR / candidate_folder_name(bladder, rectum)
    folder.mkdir(parents=True, exist_ok=True)
    sub = Timings()
    fluence, module_ms = predict_fluence(
        case, settings.planning.model_dir, geometry=ctx.geometry,
        rx_gy=case.prescription.dose_gy / case.prescription.fractions,
        sparing={Role.BLADDER: bladder, Role.RECTUM: rectum}, device=ctx.device, timings=sub,
    )
    choice, record = _choose_ai_threshold(ctx, fluence, sub)
    seq, dose_fx, factor = _sequence_and_dose(ctx, fluence, choice.threshold, sub, first=choice.sequence)
    dose_plan = (dose_fx * case.prescription.fractions).astype(np.float32)
    plan_uid = _export(ctx, folder, seq, dose_plan, f"AIRT B{bladder:.2f} R{rectum:.2f}")
    structures = evaluate_structures(dose_plan, ctx.grid, case)
    row = {"sparing": {"bladder": bladder, "rectum": rectum}, "folder": f"{CANDIDATES_DIR}/{folder.name}",
           "method": PlanningMethod.AI.value, "rtplan_sop_instance_uid": plan_uid, "total_MU": float(seq.total_mu),
           "normalisation_factor": factor, "ai_module_ms": module_ms, "ai_sequencing": record,
           "timings_s": {k: round(v, 4) for k, v in sub.stages.items()}, "structures": structures}
    (folder / "metrics.json").write_text(json.dumps({"disclaimer": DISCLAIMER, "case_id": case.case_id, **row},
                                                    indent=2, default=_json_default))
    log.info("case %s: candidate plan s_bladder %.2f s_rectum %.2f written (%.0f MU)", case.case_id, bladder,
             rectum, seq.total_mu)
    return row


def plan_case(case: Case, out_dir: Path, settings: Settings, *, method: str | None = None,
              timings: Timings | None = None,
              candidates: list[tuple[float, float]] | None = None) -> dict[str, Any]:
    """Plan a loaded Case and write the outputs into ``out_dir``; returns the metrics dict.

    With the AI method, ``candidates`` (default ``planning.candidate_sparings``) adds one plan per
    (bladder s_o, rectum s_o) pair under ``out_dir/candidates/`` (each with its RT Plan, RT Dose
    and metrics.json); the main plan uses ``planning.sparing_bladder`` / ``sparing_rectum``.
    """
    import torch

    from appliance.report import write_report
    from pipeline.dvh import structure_metrics
    from pipeline.evaluation import check_ptv_fits_field, evaluate_structures
    from pipeline.geometry import ArcGeometry
    from pipeline.goals import GoalSpec, evaluate_goals
    from pipeline.problem import build_problem

    timings = timings or Timings()
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = resolve_method(settings, method)
    device = resolve_device(settings.planning.device)
    machine = settings.machine.model()
    arc = settings.machine.arc()
    rx_total = case.prescription.dose_gy
    fractions = case.prescription.fractions
    rx_fx = rx_total / fractions
    log.info("case %s: planning with method=%s on %s, Rx %.2f Gy in %d fractions",
             case.case_id, chosen.value, device, rx_total, fractions)

    with timings.stage("setup"):
        iso = case.ptv_centroid_mm()
        check_ptv_fits_field(case, ArcGeometry(arc=arc, isocenter_mm=iso, position=case.patient_position,
                                               machine=machine))
        problem = build_problem(case, arc, machine, hu_curve=settings.planning.hu_to_density,
                                spacing_mm=settings.planning.dose_grid_mm, device=device)
        engine, grid, masks_dg, geometry = problem.engine, problem.grid, problem.masks, problem.geometry

    extra: dict[str, Any] = {}
    threshold = settings.planning.aperture_threshold
    ptv_engine = None
    if chosen is PlanningMethod.OPTIMIZE:
        from pipeline.optimizer import optimize_fluence

        with timings.stage("optimize"):
            result = optimize_fluence(
                engine, masks_dg, rx_gy=rx_fx, iterations=settings.planning.optimizer_iterations,
            )
        fluence = np.asarray(result.fluence, dtype=np.float32)
    else:
        from pipeline.ai_planner import predict_fluence

        fluence, module_ms = predict_fluence(
            case, settings.planning.model_dir, geometry=geometry, engine=engine, masks=masks_dg,
            rx_gy=rx_fx, sparing={Role.BLADDER: settings.planning.sparing_bladder,
                                  Role.RECTUM: settings.planning.sparing_rectum},
            device=device, timings=timings,
        )
        extra["ai_module_ms"] = module_ms
        if settings.planning.ai_refine_iterations > 0:
            from pipeline.refine import refine_fluence

            with timings.stage("ai_refine"):
                refined = refine_fluence(fluence, engine, masks_dg, rx_gy=rx_fx,
                                         iterations=settings.planning.ai_refine_iterations)
            fluence, ptv_engine = refined.fluence, refined.engine
            extra["ai_refine"] = refined.record()

    ctx = _PlanContext(case=case, settings=settings, engine=engine, grid=grid, machine=machine, arc=arc,
                       device=device, isocenter_mm=(float(iso[0]), float(iso[1]), float(iso[2])), geometry=geometry,
                       ptv_dose_grid=masks_dg[Role.PTV].cpu().numpy())
    first = None
    if chosen is PlanningMethod.AI:
        choice, extra["ai_sequencing"] = _choose_ai_threshold(ctx, fluence, timings, ptv_engine)
        threshold, first = choice.threshold, choice.sequence
    seq, dose_fx, factor = _sequence_and_dose(ctx, fluence, threshold, timings, first=first)
    extra["sequencer_aperture_threshold"] = threshold
    dose_plan = (dose_fx * fractions).astype(np.float32)
    with timings.stage("export"):
        plan_uid = _export(ctx, out_dir, seq, dose_plan, "AIRT VMAT")

    with timings.stage("evaluate"):
        structures = evaluate_structures(dose_plan, grid, case)
        goal_specs = [GoalSpec(g.structure, g.metric, g.comparison.value, g.limit, g.priority) for g in settings.goals]
        goals = evaluate_goals(goal_specs, dose_plan, grid, case)
        # Before sequencing (the optimizer's or network's fluence, same normalisation), for fidelity.
        with torch.inference_mode():
            dose_unseq = engine(torch.as_tensor(fluence * factor, device=device)).cpu().numpy() * fractions
        ptv_unseq = structure_metrics(dose_unseq, masks_dg[Role.PTV].cpu().numpy(), grid.voxel_volume_cc, rx_gy=rx_total)

    sparings = settings.planning.candidate_sparings if candidates is None else tuple(candidates)
    if sparings and chosen is PlanningMethod.AI:
        with timings.stage("candidates"):
            extra["candidates"] = [
                _plan_candidate(ctx, out_dir, bladder, rectum)
                for bladder, rectum in sparings
            ]
    elif sparings:
        log.info("case %s: candidate plans need the AI method (method is %s); none made", case.case_id, chosen.value)

    metrics: dict[str, Any] = {
        "disclaimer": DISCLAIMER,
        "case_id": case.case_id,
        "method": chosen.value,
        "device": device,
        "prescription": {"dose_Gy": rx_total, "fractions": fractions,
                         "normalisation": settings.prescription.normalisation.value,
                         "normalisation_factor": float(factor)},
        "plan": {
            "total_MU": float(seq.total_mu),
            "control_points": len(seq.gantry_deg),
            "isocenter_mm": [float(v) for v in iso],
            "machine": machine.name,
            "collimator_deg": float(arc.collimator_deg),
            "rtplan_sop_instance_uid": plan_uid,
        },
        "structures": structures,
        "goals": goals,
        "before_sequencing": {"ptv_HI": ptv_unseq.get("HI"), "ptv_D98_Gy": ptv_unseq.get("D98_Gy")},
        "dose_grid": {"spacing_mm": list(grid.spacing_mm), "shape": list(grid.shape)},
        "timings_s": {k: round(v, 4) for k, v in timings.stages.items()},
        **extra,
    }
    metrics["timings_s"]["total"] = round(sum(timings.stages.values()), 4)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    write_report(out_dir, metrics=metrics, dose=dose_plan, grid=grid, case=case)
    log.info("case %s: planned in %.1f s, %.0f MU, PTV D98 %.2f Gy, HI %.3f", case.case_id,
             metrics["timings_s"]["total"], seq.total_mu,
             structures.get("ptv", {}).get("D98_Gy", float("nan")), structures.get("ptv", {}).get("HI", float("nan")))
    return metrics


def plan_folder(case_dir: Path, out_dir: Path, settings: Settings, *, method: str | None = None,
                candidates: list[tuple[float, float]] | None = None) -> dict[str, Any]:
    """Load the DICOM files of ``case_dir`` into a Case and plan it (see :func:`plan_case`)."""
    from appliance.dicom_in import load_case

    timings = Timings()
    with timings.stage("load"):
        case = load_case(
            Path(case_dir), structures=settings.structures, prescription=settings.prescription.to_prescription()
        )
    return plan_case(case, Path(out_dir), settings, method=method, timings=timings, candidates=candidates)


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
