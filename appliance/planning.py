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
        ok, why = model_is_qualified(folder)
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


def plan_case(case: Case, out_dir: Path, settings: Settings, *, method: str | None = None,
              timings: Timings | None = None) -> dict[str, Any]:
    """Plan a loaded Case and write the outputs into ``out_dir``; returns the metrics dict."""
    import torch

    from appliance.report import write_report
    from appliance.rtdose import write_rtdose
    from appliance.rtplan import write_rtplan
    from pipeline.dvh import structure_metrics
    from pipeline.evaluation import check_ptv_fits_field, evaluate_structures, structure_dvh_inputs
    from pipeline.geometry import ArcGeometry
    from pipeline.goals import GoalSpec, evaluate_goals, normalisation_factor
    from pipeline.problem import build_problem
    from sequencing.deliverability import check_deliverable
    from sequencing.fluence import fluence_from_sequence
    from sequencing.sequencer import sequence_arc

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

    with timings.stage("sequence"):
        seq = sequence_arc(fluence, arc, machine, threshold=settings.planning.aperture_threshold)

    with timings.stage("final_dose"):
        delivered = fluence_from_sequence(seq, machine)
        with torch.inference_mode():
            dose_fx = engine(torch.as_tensor(delivered, dtype=torch.float32, device=device)).cpu().numpy()
        factor = 1.0
        norm = settings.prescription.normalisation
        if norm is not Normalisation.NONE:
            mode = "ptv_dx" if norm is Normalisation.PTV_DX else "ptv_mean"
            # On the CT grid, as the reported metrics are, so the reported PTV D95 equals Rx.
            ptv_inputs = structure_dvh_inputs(dose_fx, grid, case, Role.PTV)
            assert ptv_inputs is not None  # Case guarantees a non-empty PTV
            factor = normalisation_factor(
                ptv_inputs[0], ptv_inputs[1], rx_gy=rx_fx, mode=mode,
                volume_percent=settings.prescription.normalisation_volume_percent,
            )
            if not np.isfinite(factor) or factor <= 0:
                raise PlanningError(f"MU normalisation failed (factor {factor}); the plan delivers no PTV dose")
            seq = dataclasses.replace(seq, cumulative_mu=seq.cumulative_mu * factor)
            dose_fx = dose_fx * factor
        problems = check_deliverable(seq, machine)
        if problems:
            raise SequencingError("the sequenced plan violates machine limits: " + "; ".join(problems[:5]))
        dose_plan = (dose_fx * fractions).astype(np.float32)

    with timings.stage("export"):
        plan_uid = write_rtplan(
            out_dir / "rtplan.dcm", sequence=seq, machine=machine, case=case, isocenter_mm=iso,
            plan_label="AIRT VMAT", fractions=fractions, rx_gy=rx_total,
            dose_rate_mu_min=settings.machine.dose_rate_mu_min,
        )
        write_rtdose(out_dir / "rtdose.dcm", dose_gy=dose_plan, grid=grid, case=case, plan_sop_instance_uid=plan_uid)

    with timings.stage("evaluate"):
        structures = evaluate_structures(dose_plan, grid, case)
        goal_specs = [GoalSpec(g.structure, g.metric, g.comparison.value, g.limit, g.priority) for g in settings.goals]
        goals = evaluate_goals(goal_specs, dose_plan, grid, case)
        # Before sequencing (the optimizer's or network's fluence, same normalisation), for fidelity.
        with torch.inference_mode():
            dose_unseq = engine(torch.as_tensor(fluence * factor, device=device)).cpu().numpy() * fractions
        ptv_unseq = structure_metrics(dose_unseq, masks_dg[Role.PTV].cpu().numpy(), grid.voxel_volume_cc, rx_gy=rx_total)

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


def plan_folder(case_dir: Path, out_dir: Path, settings: Settings, *, method: str | None = None) -> dict[str, Any]:
    """Load the DICOM files of ``case_dir`` into a Case and plan it (see :func:`plan_case`)."""
    from appliance.dicom_in import load_case

    timings = Timings()
    with timings.stage("load"):
        case = load_case(
            Path(case_dir), structures=settings.structures, prescription=settings.prescription.to_prescription()
        )
    return plan_case(case, Path(out_dir), settings, method=method, timings=timings)


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
