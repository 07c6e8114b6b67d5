"""Plan a case: load the CT series and RT Structure Set a :class:`~core.request.CaseRequest` names, run
the planning core, write RT Plan, RT Dose, metrics.json (with the :class:`PlanSummary`) and a report.

This is what ``airt plan`` and the node's worker run. The planning itself (fluence, sequencer,
machine-parameter optimisation, reference dose, MU normalisation) is ``pipeline.plan.plan_arc``;
this module turns the settings into its options and writes what it returns. The RT Dose written
is always the full reference engine's dose of the exported arc, never a network's prediction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.config import PlanningMethod, Profile, Settings
from appliance.plan_summary import PlanSummary
from appliance.profiles import ProfileChoice, choose_profile
from appliance.web_pages import fmt
from core.case import Case, Role
from core.errors import PlanningError
from core.request import CaseRequest

if TYPE_CHECKING:
    from pipeline.goals import Verdict
    from pipeline.plan import PlanningOptions, PlanResult, Timings

log = logging.getLogger(__name__)

#: Sub-folder of a plan's output folder holding the candidate plans (one sub-folder each).
CANDIDATES_DIR = "candidates"
DISCLAIMER = "Research output of an automated planner; not clinically approved. Review in a TPS."


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; other names pass through."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PlanningError(f"planning.device = {name!r} but no CUDA device is available; use auto or cpu")
    return name


def model_qualification(settings: Settings, folder: Path, profile: str | None = None) -> tuple[bool, str]:
    """Whether the model in ``folder`` qualifies for ``auto`` with these settings for ``profile`` (default
    ``planning.profile``), and why (not): its recorded gate against the AI method's configured refinement and
    arc stage (:func:`pipeline.ai_model.model_is_qualified`)."""
    from pipeline.ai_model import model_is_qualified

    p = settings.planning
    return model_is_qualified(folder, profile=profile or p.profile, refine_iterations=p.ai_refine_iterations,
                              arc_iterations=p.arc_optimizer_iterations, arc_rounds=p.arc_optimizer_rounds,
                              arc_sectors_per_beam=p.arc_sectors_per_beam)


def resolve_method(settings: Settings, method: str | None, profile: str | None = None) -> PlanningMethod:
    """The planning method to use: explicit argument, else the configuration. ``auto`` means ai
    when an installed model is qualified for unattended use for the plan's protocol profile
    (``profile``, default ``planning.profile``: its plans passed the quality gate recorded in
    model.json for that profile), else optimize."""
    from pipeline.ai_model import installed_model_dir

    chosen = PlanningMethod(method) if method else settings.planning.method
    folder = installed_model_dir(settings.planning.model_dir)
    if chosen is PlanningMethod.AUTO:
        if folder is None:
            return PlanningMethod.OPTIMIZE
        ok, why = model_qualification(settings, folder, profile)
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


def planning_options(settings: Settings, method: PlanningMethod, device: str,
                     profile: Profile | None = None) -> PlanningOptions:
    """The planning core's options from the settings and a profile (default ``planning.profile``;
    ``method`` resolved: ai or optimize)."""
    from pipeline.arc_optimizer import ArcOptimizerSettings
    from pipeline.optimizer import OptimizerWeights
    from pipeline.plan import FluenceSource, PlanningOptions

    p = settings.planning
    profile = profile or settings.profile()
    full = method is PlanningMethod.OPTIMIZE
    arc_iterations = p.optimizer_arc_iterations if full else p.arc_optimizer_iterations
    arc_rounds = p.optimizer_arc_rounds if full else p.arc_optimizer_rounds
    sectors_per_beam = p.optimizer_arc_sectors_per_beam if full else p.arc_sectors_per_beam
    return PlanningOptions(
        source=FluenceSource(method.value), dose_grid_mm=p.dose_grid_mm, hu_curve=tuple(p.hu_to_density),
        optimizer_iterations=p.optimizer_iterations, sequencer_threshold=p.aperture_threshold,
        ai_thresholds=tuple(p.ai_aperture_thresholds), ai_min_ptv_d98_rel=p.ai_min_ptv_d98_percent / 100.0,
        ai_max_ptv_hi=p.ai_max_ptv_hi, ai_refine_iterations=p.ai_refine_iterations, model_dir=p.model_dir,
        sparing={Role.BLADDER: p.sparing_bladder, Role.RECTUM: p.sparing_rectum},
        arc=ArcOptimizerSettings(iterations=arc_iterations, rounds=arc_rounds,
                                 mu_weight=p.arc_mu_weight, mu_limit=p.arc_max_mu_per_cgy,
                                 sectors_per_beam=sectors_per_beam),
        arc_start=p.arc_start, optimizer_weights=OptimizerWeights(oar_mean=p.oar_mean_weight),
        normalisation=profile.normalisation,
        normalisation_volume_percent=profile.normalisation_volume_percent,
        goals=profile.goal_specs(),
        goal_stages=p.goal_stages, rescue_rounds=p.rescue_rounds, device=device,
    )


def _export(result: PlanResult, case: Case, settings: Settings, out_dir: Path, label: str,
            verdict: Verdict | None, profile: str) -> tuple[str, np.ndarray]:
    """Write ``rtplan.dcm`` and ``rtdose.dcm`` of a planned arc into ``out_dir`` (the profile and the
    verdict in the RT Plan); returns the plan's UID and the plan's dose (all fractions, Gy)."""
    from appliance.dicom.rtdose import write_rtdose
    from appliance.dicom.rtplan import write_rtplan

    iso = result.problem.geometry.isocenter_mm
    dose_plan = (result.dose_fx * case.prescription.fractions).astype(np.float32)
    plan_uid = write_rtplan(
        out_dir / "rtplan.dcm", sequence=result.sequence, machine=settings.machine.model(), case=case,
        isocenter_mm=(float(iso[0]), float(iso[1]), float(iso[2])), plan_label=label,
        fractions=case.prescription.fractions, rx_gy=case.prescription.dose_gy,
        dose_rate_mu_min=settings.machine.dose_rate_mu_min,
        verdict=f"profile {profile}: {verdict.text}" if verdict else "",
        p1_met=verdict.p1_met if verdict else None,
    )
    write_rtdose(out_dir / "rtdose.dcm", dose_gy=dose_plan, grid=result.problem.grid, case=case,
                 plan_sop_instance_uid=plan_uid)
    return plan_uid, dose_plan


def candidate_folder_name(bladder: float, rectum: float) -> str:
    """Sub-folder of ``candidates/`` holding the plan made with these suppression factors."""
    return f"bladder{bladder:.2f}_rectum{rectum:.2f}"


def _plan_candidate(case: Case, settings: Settings, options: PlanningOptions, main: PlanResult, out_dir: Path,
                    bladder: float, rectum: float, profile: str) -> dict[str, Any]:
    """One extra AI plan with OAR suppression factors: exported under ``candidates/`` with its metrics.

    The networks' fluence is sequenced as it is: neither refined nor arc-optimised, because both pull
    every plan towards the objective's one trade-off and undo the sparing (with 30 arc evaluations,
    s_o = 0.4 lowered the bladder's mean dose on 3 of 20 cases instead of 14; ``bench_ai``)."""
    from dataclasses import replace

    from pipeline.evaluation import evaluate_structures
    from pipeline.goals import plan_verdict
    from pipeline.plan import Timings, plan_arc

    folder = out_dir / CANDIDATES_DIR / candidate_folder_name(bladder, rectum)
    folder.mkdir(parents=True, exist_ok=True)
    sub = Timings()
    result = plan_arc(case, settings.machine.model(), settings.machine.arc(),
                      replace(options, sparing={Role.BLADDER: bladder, Role.RECTUM: rectum}, ai_refine_iterations=0,
                              arc=replace(options.arc, iterations=0), rescue_rounds=0),
                      problem=main.problem, timings=sub)
    verdict = plan_verdict(result.goals) if result.goals is not None else None
    plan_uid, dose_plan = _export(result, case, settings, folder, f"AIRT B{bladder:.2f} R{rectum:.2f}", verdict,
                                  profile)
    structures = evaluate_structures(dose_plan, result.problem.grid, case)
    row = {"sparing": {"bladder": bladder, "rectum": rectum}, "folder": f"{CANDIDATES_DIR}/{folder.name}",
           "method": PlanningMethod.AI.value, "rtplan_sop_instance_uid": plan_uid,
           "total_MU": float(result.sequence.total_mu), **result.record,
           "timings_s": {k: round(v, 4) for k, v in sub.stages.items()}, "structures": structures,
           "goals": result.goals or [], "verdict": verdict.to_dict() if verdict else None}
    (folder / "metrics.json").write_text(json.dumps({"disclaimer": DISCLAIMER, "case_id": case.case_id, **row},
                                                    indent=2, default=json_default))
    log.info("case %s: candidate plan s_bladder %.2f s_rectum %.2f written (%.0f MU)", case.case_id, bladder,
             rectum, result.sequence.total_mu)
    return row


def plan_case(case: Case, out_dir: Path, settings: Settings, *, method: str | None = None,
              timings: Timings | None = None, profile: ProfileChoice | None = None,
              candidates: list[tuple[float, float]] | None = None,
              on_deliverable: Callable[[PlanSummary], None] | None = None) -> tuple[PlanSummary, dict[str, Any]]:
    """Plan a loaded Case and write the outputs into ``out_dir``; returns the plan's summary and the
    metrics document written as ``metrics.json`` (which holds the summary under ``"summary"``).

    ``on_deliverable`` is called with the summary as soon as the RT Plan, the RT Dose and metrics.json
    are written, before the fidelity check and the report (and, when candidate plans are made, only
    at the end: they are sent with the main plan); metrics.json is completed afterwards.

    ``profile`` (default: ``planning.profile``) gives the prescription, normalisation and goal list;
    the case is planned to the profile's prescription.

    With the AI method, ``candidates`` (default ``planning.candidate_sparings``) adds one plan per
    (bladder s_o, rectum s_o) pair under ``out_dir/candidates/`` (each with its RT Plan, RT Dose
    and metrics.json); the main plan uses ``planning.sparing_bladder`` / ``sparing_rectum``.
    """
    from dataclasses import replace

    from appliance.report import write_report
    from pipeline.dvh import structure_metrics
    from pipeline.evaluation import check_ptv_fits_field, evaluate_structures
    from pipeline.geometry import ArcGeometry
    from pipeline.goals import plan_verdict
    from pipeline.plan import Timings, plan_arc, unsequenced_dose_fx

    timings = timings or Timings()
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = profile or ProfileChoice(settings.profile(), "the default profile (planning.profile)")
    case = replace(case, prescription=profile.profile.to_prescription())
    chosen = resolve_method(settings, method, profile.profile.name)
    device = resolve_device(settings.planning.device)
    machine = settings.machine.model()
    arc = settings.machine.arc()
    rx_total = case.prescription.dose_gy
    fractions = case.prescription.fractions
    log.info("case %s: planning with method=%s on %s, profile %s (%s): Rx %.2f Gy in %d fractions",
             case.case_id, chosen.value, device, profile.profile.name, profile.reason, rx_total, fractions)
    with timings.stage("setup"):
        check_ptv_fits_field(case, ArcGeometry(arc=arc, isocenter_mm=case.ptv_centroid_mm(),
                                               position=case.patient_position, machine=machine))
    options = planning_options(settings, chosen, device, profile.profile)
    result = plan_arc(case, machine, arc, options, timings=timings)
    seq, grid = result.sequence, result.problem.grid
    verdict = plan_verdict(result.goals) if result.goals is not None else None
    if verdict is not None:
        log.log(logging.INFO if verdict.p1_met else logging.WARNING, "case %s: clinical goals: %s", case.case_id,
                verdict.text)
    with timings.stage("export"):
        plan_uid, dose_plan = _export(result, case, settings, out_dir, "AIRT VMAT", verdict, profile.profile.name)

    with timings.stage("evaluate"):
        structures = evaluate_structures(dose_plan, grid, case)
    sparings = settings.planning.candidate_sparings if candidates is None else tuple(candidates)
    make_candidates = bool(sparings) and chosen is PlanningMethod.AI
    if sparings and not make_candidates:
        log.info("case %s: candidate plans need the AI method (method is %s); none made", case.case_id, chosen.value)

    iso = result.problem.geometry.isocenter_mm
    metrics: dict[str, Any] = {
        "disclaimer": DISCLAIMER,
        "case_id": case.case_id,
        "method": chosen.value,
        "device": device,
        "profile": profile.to_dict(),
        "prescription": {"dose_Gy": rx_total, "fractions": fractions,
                         "normalisation": profile.profile.normalisation.value,
                         "normalisation_factor": float(result.factor)},
        "plan": {
            "total_MU": float(seq.total_mu),
            "control_points": len(seq.gantry_deg),
            "isocenter_mm": [float(v) for v in iso],
            "machine": machine.name,
            "collimator_deg": float(arc.collimator_deg),
            "rtplan_sop_instance_uid": plan_uid,
        },
        "structures": structures,
        "goals": result.goals or [],
        "verdict": verdict.to_dict() if verdict else None,
        "before_sequencing": None,
        "dose_grid": {"spacing_mm": list(grid.spacing_mm), "shape": list(grid.shape)},
        **result.record,
    }

    def figure(role: Role, key: str) -> float | None:
        value = structures.get(role.value, {}).get(key)
        return float(value) if isinstance(value, int | float) and np.isfinite(value) else None

    def finish(summary: PlanSummary | None) -> PlanSummary:
        """The summary at this point, written into metrics.json with the stage timings so far."""
        metrics["timings_s"] = {k: round(v, 4) for k, v in timings.stages.items()}
        metrics["timings_s"]["total"] = round(sum(timings.stages.values()), 4)
        summary = replace(summary, stages_s=dict(metrics["timings_s"])) if summary else PlanSummary(
            case_id=case.case_id, method=chosen.value, profile=profile.profile.name, profile_reason=profile.reason,
            dose_gy=rx_total, fractions=fractions,
            verdict=verdict.text if verdict else "no clinical goals in the profile",
            p1_met=verdict.p1_met if verdict else None,
            ptv_d98_gy=figure(Role.PTV, "D98_Gy"), ptv_hi=figure(Role.PTV, "HI"),
            bladder_dmean_gy=figure(Role.BLADDER, "Dmean_Gy"), rectum_dmean_gy=figure(Role.RECTUM, "Dmean_Gy"),
            total_mu=float(seq.total_mu), rtplan_uid=plan_uid, stages_s=dict(metrics["timings_s"]))
        metrics["summary"] = summary.to_dict()
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=json_default))
        return summary

    summary = finish(None)
    if on_deliverable is not None and not make_candidates:
        on_deliverable(summary)  # RT Plan, RT Dose and metrics.json are complete: they may be sent now
    with timings.stage("fidelity"):
        # Before sequencing (the optimizer's or network's fluence, normalised alike), for fidelity.
        dose_unseq = unsequenced_dose_fx(result, case, options) * fractions
        ptv_unseq = structure_metrics(dose_unseq, result.problem.masks[Role.PTV].cpu().numpy(),
                                      grid.voxel_volume_cc, rx_gy=rx_total)
        metrics["before_sequencing"] = {"ptv_HI": ptv_unseq.get("HI"), "ptv_D98_Gy": ptv_unseq.get("D98_Gy")}
    if make_candidates:
        with timings.stage("candidates"):
            metrics["candidates"] = [_plan_candidate(case, settings, options, result, out_dir, bladder, rectum,
                                                     profile.profile.name)
                                     for bladder, rectum in sparings]
    with timings.stage("report"):
        write_report(out_dir, metrics=metrics, dose=dose_plan, grid=grid, case=case)
    summary = finish(summary)
    log.info("case %s: planned in %.1f s, %.0f MU, PTV D98 %s Gy, HI %s", case.case_id,
             metrics["timings_s"]["total"], seq.total_mu, fmt(summary.ptv_d98_gy, 2), fmt(summary.ptv_hi, 3))
    return summary, metrics


def plan_request(request: CaseRequest, out_dir: Path, settings: Settings, *, method: str | None = None,
                 profile: str | None = None, candidates: list[tuple[float, float]] | None = None,
                 on_deliverable: Callable[[PlanSummary], None] | None = None) -> tuple[PlanSummary, dict[str, Any]]:
    """Load the CT series and RT Structure Set a request names, choose its profile and plan it (see
    :func:`plan_case`). ``profile`` is an explicit choice (``airt plan --profile``); otherwise the
    AE titles the study came by and the PTV's name choose (``appliance.profiles.choose_profile``)."""
    from appliance.dicom.case_loader import load_case
    from pipeline.plan import Timings

    timings = Timings()
    with timings.stage("load"):
        case = load_case(request, structures=settings.structures, prescription=settings.profile().to_prescription())
        choice = choose_profile(settings, ptv_name=case.structure_names.get(Role.PTV, ""),
                                called_aets=request.called_aets, calling_aets=request.calling_aets, explicit=profile)
    return plan_case(case, Path(out_dir), settings, method=method, timings=timings, profile=choice,
                     candidates=candidates, on_deliverable=on_deliverable)


@dataclass(frozen=True)
class Planner:
    """The planning function the node's worker runs in its planning process, with the settings it
    plans by (``planning``, ``machine``, ``structures``, ``profiles``); picklable into a spawned process.
    """

    settings: Settings

    def __call__(self, request: CaseRequest, out_dir: Path, method: str | None = None,
                 on_deliverable: Callable[[PlanSummary], None] | None = None) -> PlanSummary:
        """Plan one case into ``out_dir``; the summary the worker records (``on_deliverable``: see
        :func:`plan_case`)."""
        return plan_request(request, out_dir, self.settings, method=method, on_deliverable=on_deliverable)[0]

    def warm_up(self) -> None:
        """Plan a small synthetic case (128 x 128 x 40 CT) end to end with the configured method and one or two
        evaluations per stage, in a temporary folder: load, every planning stage, export and report run once, so
        imports, the compiled kernels, the model and first-call costs are paid here and not by the first job."""
        import tempfile
        from dataclasses import replace

        from appliance.dicom.case_loader import request_from_folder
        from appliance.synth_dicom import write_synth_case

        method = resolve_method(self.settings, None)
        p = self.settings.planning
        quick = replace(self.settings, planning=replace(
            p, optimizer_iterations=2, ai_refine_iterations=min(p.ai_refine_iterations, 1),
            arc_optimizer_iterations=min(p.arc_optimizer_iterations, 2),
            optimizer_arc_iterations=min(p.optimizer_arc_iterations, 2), rescue_rounds=0, candidate_sparings=()))
        logging.disable(logging.WARNING)  # the warm-up case's verdict and stages are not a job's: keep the log clean
        try:
            with tempfile.TemporaryDirectory(prefix="airt-warm-up-") as tmp:
                folder = Path(tmp) / "case"
                write_synth_case(folder, 0, n_slices=40, pixel_mm=3.9, slice_mm=5.0, matrix=128, include_bones=False)
                plan_request(request_from_folder(folder), Path(tmp) / "out", quick, method=method.value)
        finally:
            logging.disable(logging.NOTSET)


def json_default(o: object) -> object:
    """``json.dumps(default=...)`` for the numbers planning produces (numpy scalars and arrays)."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
