"""The deliverable arc's quality on two case sets: the unsequenced fluence, the sequencer's arc and
the exported arc after machine-parameter optimisation, for both planning methods.

Case sets (each case written as DICOM and read back by the appliance's loader, as ``airt plan``
reads a folder):

- ``synth``: ``airt synth`` seeds from 2000 (never in the training data, seeds 1000-1169), the
  default CT (512 x 512, 0.977 mm pixels, 120 slices of 2.5 mm, HFS), TG-263 ROI names;
- ``heldout``: ``airt synth --heldout`` seeds from 5000: anatomy outside every range the training
  cases are drawn from (small and large bodies, empty and full bladders, narrow and wide rectums
  with large gas pockets, small and large prostates, femoral heads closer and farther, larger
  shifts; ``pipeline.synth.draw_heldout_params``), clinical ROI names, and CT geometries no
  training or tuning used: 400 and 512 matrices, 1.1-1.25 mm pixels, 2 and 3 mm slices,
  feet-first. No setting of the planner was chosen on these cases.

Per case and method (``pipeline.plan.plan_arc`` with the appliance's settings), each dose from the
full reference engine (4 mm) and MU-normalised to PTV D95 = Rx on the CT grid, metrics on the CT
grid (as ``metrics.json``):

- ``unsequenced``: the fluence handed to the sequencer (optimizer's or networks' + refinement);
- ``sequencer``: the sequencer's arc (the start of the arc optimisation);
- ``exported``: the arc written to the RT Plan;
- gamma 3 %/3 mm (global, 10 % threshold) of the exported arc's dose against the dose the arc
  optimisation computed for its final arc (its own fluence model), and against the unsequenced
  fluence's dose;
- every machine limit checked on the exported arc (``sequencing.deliverability``);
- the clinical goals of the profile's goal list on the exported arc (all P1 met, P2 met);
- times (2 threads): the arc optimisation, and case to exported arc excluding the final dose; the process
  sets the planning process's memory policy first (``appliance.plan_process``: freed memory kept, no
  huge-page advice from numpy).

Methods: ``optimize`` and ``ai`` as the appliance plans them, ``ai_networks``: the AI method without
its refinement (the networks' fluence, the paper's pipeline, then the same arc stage), and
``ai_networks_nodf``: that without the dose-feedback correction (the paper's "-DF" ablation). The rows
are what ``benchmarks.gate_ai`` computes the AI model's quality gate from.

    .venv/bin/python -m benchmarks.bench_arc [--sets synth,heldout] [--cases 10] [--methods optimize,ai,ai_networks]
                                             [--threads 2] [--profile NAME] [--optimizer-weights K=V,...] [--model DIR]
                                             [--json OUT.json] [--from-json OUT.json [--compare BEFORE.json]]

With ``--json`` each finished case is appended at once and a rerun skips the cases already there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from appliance.config import PlanningMethod, Settings, StructureSettings
from appliance.dicom.case_loader import load_folder
from appliance.plan_process import planning_memory_policy
from appliance.planning import planning_options
from appliance.synth_dicom import write_synth_case
from core.case import Case, Prescription
from pipeline.ai_model import installed_model_dir, model_weights_id
from pipeline.arc_optimizer import delivered_fluence
from pipeline.evaluation import evaluate_structures
from pipeline.gamma import gamma_pass_rate
from pipeline.goals import evaluate_goals, plan_verdict
from pipeline.optimizer import OptimizerWeights
from pipeline.plan import FluenceSource, PlanningOptions, PlanResult, Timings, mu_normalisation_factor, plan_arc
from sequencing.deliverability import check_deliverable, delivery_time_s
from sequencing.fluence import fluence_from_sequence
from sequencing.sequencer import ArcSequence

SETTINGS = Settings()
#: The protocol profile planned (``--profile``; default ``planning.profile``): prescription and goal list.
PROFILE = SETTINGS.profile()
#: The optimizer's dose-term weights (``--optimizer-weights`` over the configured ones; None: as configured).
WEIGHTS: OptimizerWeights | None = None
#: Adam steps of the arc stage (leaf mm, relative sector MU) for this run; ``None``: the shipped ones.
ARC_STEPS: tuple[float, float] | None = None
MACHINE = SETTINGS.machine.model()
ARC = SETTINGS.machine.arc()


@dataclass(frozen=True)
class CtGeometry:
    """How a case's CT is written."""

    matrix: int
    pixel_mm: float
    slice_mm: float
    slices: int
    position: str

    def label(self) -> str:
        return f"{self.matrix}/{self.pixel_mm:g}mm/{self.slice_mm:g}mm/{self.position}"


SYNTH_CT = CtGeometry(512, 0.977, 2.5, 120, "HFS")
#: CT geometries of the held-out set, cycled over its cases (fields of view 440-512 mm, 300 mm long).
HELDOUT_CTS = (
    CtGeometry(400, 1.25, 3.0, 100, "FFS"),
    CtGeometry(512, 1.0, 2.0, 150, "HFS"),
    CtGeometry(400, 1.25, 2.0, 150, "HFS"),
    CtGeometry(512, 1.17, 3.0, 100, "FFS"),
    CtGeometry(400, 1.1, 3.0, 100, "HFS"),
)
CASE_SETS = {"synth": 2000, "heldout": 5000}


def case_spec(case_set: str, index: int) -> tuple[int, CtGeometry, bool]:
    """Seed, CT geometry and whether the anatomy is held out, of case ``index`` of a set."""
    if case_set == "synth":
        return CASE_SETS["synth"] + index, SYNTH_CT, False
    return CASE_SETS["heldout"] + index, HELDOUT_CTS[index % len(HELDOUT_CTS)], True


def _normalised(dose_fx: np.ndarray, result: PlanResult, case: Case,
                options: PlanningOptions) -> dict[str, dict[str, Any]]:
    """Metrics (CT grid, all fractions) of a dose per fraction normalised as the plan was."""
    rx_fx = case.prescription.dose_gy / case.prescription.fractions
    f = mu_normalisation_factor(dose_fx, result.problem, case, options, rx_fx)
    return evaluate_structures(dose_fx * f * case.prescription.fractions, result.problem.grid, case)


def _row(structures: dict[str, dict[str, Any]]) -> dict[str, float]:
    p = structures["ptv"]
    row = {"HI": p["HI"], "D98_Gy": p["D98_Gy"], "D2_Gy": p["D2_Gy"], "CI": p.get("CI_paddick", float("nan"))}
    for organ in ("bladder", "rectum"):
        s = structures.get(organ, {})
        row[f"{organ}_Dmean_Gy"] = s.get("Dmean_Gy", float("nan"))
        row[f"{organ}_D2_Gy"] = s.get("D2_Gy", float("nan"))
    return row


def _dose_fx(result: PlanResult, fluence: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return result.problem.engine(torch.as_tensor(fluence, dtype=torch.float32)).numpy()


def _model_fluence(seq: ArcSequence) -> np.ndarray:
    """The arc optimisation's own fluence model of an arc (torch), as numpy."""
    first, rows = MACHINE.first_bev_leaf_pair, MACHINE.bev.n_rows
    with torch.no_grad():
        return delivered_fluence(torch.tensor(seq.leaves_mm[:, first:first + rows], dtype=torch.float64),
                                 torch.tensor(seq.jaws_mm), torch.tensor(seq.segment_mu()),
                                 MACHINE).numpy()


class Method(NamedTuple):
    """A planning method of a run: the appliance's kind, its refinement evaluations (-1: the configured
    count) and whether the AI pipeline runs its dose-feedback correction."""

    kind: PlanningMethod
    refine: int
    feedback: bool = True


#: Methods a run may plan: the appliance's two, the AI method without its refinement (the networks'
#: fluence straight to the sequencer and the arc stage: the paper's pipeline), and that without the
#: dose-feedback correction (Err and the correction network skipped: the paper's "-DF").
METHODS = {"optimize": Method(PlanningMethod.OPTIMIZE, 0), "ai": Method(PlanningMethod.AI, -1),
           "ai_networks": Method(PlanningMethod.AI, 0),
           "ai_networks_nodf": Method(PlanningMethod.AI, 0, feedback=False)}


def run_method(case: Case, method: str) -> dict[str, Any]:
    """Plan one case with one method of :data:`METHODS` and measure it."""
    timings = Timings()
    kind, refine, feedback = METHODS[method]
    options = planning_options(SETTINGS, kind, "cpu", PROFILE)
    if refine >= 0 and kind is PlanningMethod.AI:
        options = replace(options, ai_refine_iterations=refine)
    if not feedback:
        options = replace(options, ai_feedback=False)
    if WEIGHTS is not None:
        options = replace(options, optimizer_weights=WEIGHTS)
    if ARC_STEPS is not None:
        options = replace(options, arc=replace(options.arc, leaf_step_mm=ARC_STEPS[0], mu_step=ARC_STEPS[1]))
    result = plan_arc(case, MACHINE, ARC, options, timings=timings)
    fx = case.prescription.fractions
    exported = evaluate_structures(result.dose_fx * fx, result.problem.grid, case)
    goals = evaluate_goals(list(PROFILE.goal_specs()), result.dose_fx * fx, result.problem.grid, case)
    unseq_fx = _dose_fx(result, result.fluence)
    start_fx = _dose_fx(result, fluence_from_sequence(result.start, MACHINE))
    model_fx = _dose_fx(result, _model_fluence(result.sequence))
    spacing = result.problem.grid.spacing_mm
    unseq_scaled = unseq_fx * (result.factor if np.isfinite(result.factor) else 1.0)
    return {
        "unsequenced": _row(_normalised(unseq_fx, result, case, options)),
        "sequencer": _row(_normalised(start_fx, result, case, options)),
        "exported": _row(exported),
        "goals": [{k: g[k] for k in ("structure", "metric", "comparison", "limit", "priority", "value", "passed")}
                  for g in goals],
        "gamma_vs_optimised_pct": 100.0 * gamma_pass_rate(model_fx, result.dose_fx, spacing),
        "gamma_vs_unsequenced_pct": 100.0 * gamma_pass_rate(unseq_scaled, result.dose_fx, spacing),
        "limit_problems": check_deliverable(result.sequence, MACHINE),
        "mu_per_fraction": result.sequence.total_mu,
        "beam_on_s": delivery_time_s(result.sequence, MACHINE),
        "segments": int(ARC.n_sectors),
        "arc_optimize_s": timings.stages.get("arc_optimize", float("nan")),
        "to_exported_arc_s": sum(v for k, v in timings.stages.items() if k != "final_dose"),
        "setup_s": timings.stages.get("setup", float("nan")),
        "final_dose_s": timings.stages.get("final_dose", float("nan")),
        "timings_s": dict(timings.stages),
        "record": {k: v for k, v in result.record.items()
                   if k in ("arc_optimizer", "arc_start", "sequencer_aperture_threshold", "rescue")},
        "planner": planner_settings(options),
    }


def planner_settings(options: PlanningOptions) -> dict[str, Any]:
    """What a quality gate must know of the planner that made a row (``benchmarks.gate_ai``): the
    refinement and arc-stage evaluations and, for the AI method, the weights id of its model."""
    out: dict[str, Any] = {"source": options.source.value, "ai_refine_iterations": options.ai_refine_iterations,
                           "optimizer_iterations": options.optimizer_iterations,
                           "arc_iterations": options.arc.iterations, "arc_rounds": options.arc.rounds,
                           "sectors_per_beam": options.arc.sectors_per_beam,
                           "rescue_rounds": options.rescue_rounds}
    folder = installed_model_dir(options.model_dir)
    if options.source is FluenceSource.AI and folder is not None:
        out["model_weights_id"] = model_weights_id(folder)
    if not options.ai_feedback:
        out["ai_feedback"] = False
    return out


def load_case(case_set: str, index: int, prescription: Prescription,
              structures: StructureSettings | None = None) -> Case:
    """Case ``index`` of a set written as DICOM and loaded as ``airt plan`` loads it (``structures``:
    the structure-name settings, default :data:`SETTINGS`')."""
    seed, ct, heldout = case_spec(case_set, index)
    with tempfile.TemporaryDirectory(prefix="bench_case_") as tmp:
        write_synth_case(Path(tmp), seed, n_slices=ct.slices, pixel_mm=ct.pixel_mm, slice_mm=ct.slice_mm,
                         matrix=ct.matrix, patient_position=ct.position, heldout=heldout)
        return load_folder(Path(tmp), structures=structures or SETTINGS.structures, prescription=prescription)


def run_case(case_set: str, index: int, methods: list[str]) -> dict[str, Any]:
    """Write one case as DICOM, load it as ``airt plan`` does, plan it with every method."""
    seed, ct, _ = case_spec(case_set, index)
    case = load_case(case_set, index, PROFILE.to_prescription())
    out: dict[str, Any] = {"set": case_set, "seed": seed, "ct": ct.label(), "profile": PROFILE.name,
                           "optimizer_weights": None if WEIGHTS is None else asdict(WEIGHTS),
                           "rx_gy": PROFILE.dose_gy, "methods": {}}
    for method in methods:
        t0 = time.perf_counter()
        out["methods"][method] = run_method(case, method)
        print(f"  {case_set} seed {seed} ({ct.label()}) {method}: HI "
              f"{out['methods'][method]['exported']['HI']:.3f} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def run_sets(sets: str, cases: int, path: Path | None, *, done: Callable[[dict[str, Any], str, int], bool],
             plan: Callable[[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Plan ``cases`` cases of each of the comma-separated ``sets`` with ``plan(set, index)``, skipping those a
    saved row is ``done`` for (``done(row, set, seed)``); with ``path``, the rows already there are loaded first
    and the file is rewritten after every case (a run resumes where it stopped). Returns every row."""
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path and path.exists() else []
    for case_set in sets.split(","):
        if case_set not in CASE_SETS:
            raise SystemExit(f"unknown case set {case_set!r}; use {', '.join(CASE_SETS)}")
        for index in range(cases):
            seed = case_spec(case_set, index)[0]
            if any(done(r, case_set, seed) for r in rows):
                continue
            rows.append(plan(case_set, index))
            if path:
                path.write_text(json.dumps({"rows": rows}, indent=1, default=str))
    return rows


def _med(values: list[float]) -> float:
    v = [x for x in values if np.isfinite(x)]
    return statistics.median(v) if v else float("nan")


def _mu(x: list[dict[str, Any]]) -> str:
    mu = [v["mu_per_fraction"] for v in x if "mu_per_fraction" in v]
    return f"{_med(mu):.0f} ({max(mu):.0f})" if mu else "-"


def print_tables(rows: list[dict[str, Any]]) -> None:
    """The tables of ``benchmarks/RESULTS.md``."""
    for case_set in CASE_SETS:
        sub = [r for r in rows if r["set"] == case_set]
        if not sub:
            continue
        rx = sub[0].get("rx_gy", 40.0)
        methods = list(sub[0]["methods"])
        n = len(sub)
        print(f"\n### {case_set} set, profile {sub[0].get('profile', 'prostate_40gy_5fx')} (Rx {rx:g} Gy): {n} cases "
              f"(CT {', '.join(sorted({r['ct'] for r in sub}))})\n")
        print("| method | stage | PTV HI median (worst) | PTV D98 Gy median (min) | PTV D2 Gy | bladder Dmean | "
              "rectum Dmean | rectum D2 |")
        print("|---|---|---|---|---|---|---|---|")
        for m in methods:
            for stage in ("unsequenced", "sequencer", "exported"):
                q = [r["methods"][m][stage] for r in sub]
                print(f"| {m} | {stage} | {_med([x['HI'] for x in q]):.3f} ({max(x['HI'] for x in q):.3f}) | "
                      f"{_med([x['D98_Gy'] for x in q]):.2f} ({min(x['D98_Gy'] for x in q):.2f}) | "
                      f"{_med([x['D2_Gy'] for x in q]):.2f} | {_med([x['bladder_Dmean_Gy'] for x in q]):.2f} | "
                      f"{_med([x['rectum_Dmean_Gy'] for x in q]):.2f} | {_med([x['rectum_D2_Gy'] for x in q]):.2f} |")
        print("\n| method | exported HI - unsequenced HI, median | D98 >= 97 % Rx | gamma vs optimised, min % | "
              "gamma vs unsequenced, median % | plans within every limit | arc optimisation s, median | "
              "case -> exported arc s, median (final dose excluded) | of which engine set-up s | MU per fraction, "
              "median (max) | beam-on s, median |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for m in methods:
            x = [r["methods"][m] for r in sub]
            dhi = _med([v["exported"]["HI"] - v["unsequenced"]["HI"] for v in x])
            d98 = sum(v["exported"]["D98_Gy"] >= 0.97 * rx for v in x)
            ok = sum(not v["limit_problems"] for v in x)
            print(f"| {m} | {dhi:+.3f} | {d98}/{n} | {min(v['gamma_vs_optimised_pct'] for v in x):.1f} | "
                  f"{_med([v['gamma_vs_unsequenced_pct'] for v in x]):.1f} | {ok}/{n} | "
                  f"{_med([v['arc_optimize_s'] for v in x]):.2f} | {_med([v['to_exported_arc_s'] for v in x]):.2f} | "
                  f"{_med([v['setup_s'] for v in x]):.2f} | {_mu(x)} | {_med([v.get('beam_on_s', np.nan) for v in x]):.0f} |")


def print_goal_table(rows: list[dict[str, Any]]) -> None:
    """Per set and method: plans meeting every P1 goal, P2 goals met, and each P1 goal's failures."""
    profile = rows[0].get("profile", "prostate_40gy_5fx") if rows else "-"
    print(f"\n### Clinical goals of profile {profile} (exported arc)\n")
    print("| set | method | all P1 met | P2 met (of all P2 evaluations) | P1 failures by goal | plans rescued "
          "(P1 failed after the first arc) |")
    print("|---|---|---|---|---|---|")
    for case_set in CASE_SETS:
        sub = [r for r in rows if r["set"] == case_set]
        if not sub:
            continue
        for m in sub[0]["methods"]:
            goals = [r["methods"][m].get("goals", []) for r in sub]
            if not any(goals):
                continue
            verdicts = [plan_verdict(gl) for gl in goals]
            p1_ok = sum(v.p1_met for v in verdicts)
            fails: dict[str, int] = {}
            for gl in goals:
                for g in gl:
                    if g["priority"] == 1 and g["passed"] is False:
                        key = f"{g['structure']} {g['metric']} {g['comparison']} {g['limit']:g}"
                        fails[key] = fails.get(key, 0) + 1
            rescued = sum(len(r["methods"][m].get("record", {}).get("rescue", {}).get("tries", [])) > 1 for r in sub)
            print(f"| {case_set} | {m} | {p1_ok}/{len(sub)} | {sum(v.p2_met for v in verdicts)}/"
                  f"{sum(v.p2_total for v in verdicts)} | "
                  + (", ".join(f"{k}: {v}" for k, v in fails.items()) or "none") + f" | {rescued}/{len(sub)} |")


def print_comparison(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """Medians before -> after on the seeds both runs planned, per set and method (the exported arcs)."""
    print("\n| set | method | cases | PTV HI | PTV D98 Gy min | D98 >= 97 % Rx | rectum Dmean Gy | bladder Dmean Gy | "
          "all P1 met | P2 met | arc optimisation s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case_set in CASE_SETS:
        old = {r["seed"]: r for r in before if r["set"] == case_set}
        new = {r["seed"]: r for r in after if r["set"] == case_set}
        seeds = sorted(old.keys() & new.keys())
        if not seeds:
            continue
        for m in new[seeds[0]]["methods"]:
            if m not in old[seeds[0]]["methods"]:
                continue
            cols = []
            for runs in (old, new):
                x = [runs[s]["methods"][m] for s in seeds]
                rx = runs[seeds[0]].get("rx_gy", 40.0)
                verdicts = [plan_verdict(v["goals"]) for v in x]
                p1 = sum(v.p1_met for v in verdicts)
                cols.append((f"{_med([v['exported']['HI'] for v in x]):.3f}", f"{min(v['exported']['D98_Gy'] for v in x):.2f}",
                             f"{sum(v['exported']['D98_Gy'] >= 0.97 * rx for v in x)}/{len(x)}",
                             f"{_med([v['exported']['rectum_Dmean_Gy'] for v in x]):.2f}",
                             f"{_med([v['exported']['bladder_Dmean_Gy'] for v in x]):.2f}", f"{p1}/{len(x)}",
                             f"{sum(v.p2_met for v in verdicts)}/{sum(v.p2_total for v in verdicts)}",
                             f"{_med([v['arc_optimize_s'] for v in x]):.1f}"))
            print(f"| {case_set} | {m} | {len(seeds)} | " + " | ".join(f"{a} -> {b}" for a, b in zip(*cols, strict=True))
                  + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="synth,heldout", help="case sets, comma-separated (synth, heldout)")
    ap.add_argument("--cases", type=int, default=10, help="cases per set (default 10)")
    ap.add_argument("--methods", default="optimize,ai",
                    help="planning methods, comma-separated: optimize, ai, ai_networks (ai without refinement), "
                         "ai_networks_nodf (that without the dose-feedback correction)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default="", help="protocol profile planned (default: planning.profile)")
    ap.add_argument("--optimizer-weights", default="", metavar="NAME=VALUE,...",
                    help="override the optimizer's dose-term weights (pipeline.optimizer.OptimizerWeights), "
                         "e.g. oar_mean=5,ring_floor_fraction=0.1")
    ap.add_argument("--arc-iterations", type=int, default=0,
                    help="planning.arc_optimizer_iterations and optimizer_arc_iterations (both methods) for this "
                         "run (default: the shipped values)")
    ap.add_argument("--sectors-per-beam", type=int, default=0,
                    help="planning.arc_sectors_per_beam and optimizer_arc_sectors_per_beam (both methods) for this "
                         "run (default: the shipped values)")
    ap.add_argument("--arc-steps", default="", metavar="LEAF_MM,MU",
                    help="the arc stage's Adam steps for this run: leaf positions in mm, sector MU relative to "
                         "the start's mean (default: pipeline.arc_optimizer.ArcOptimizerSettings)")
    ap.add_argument("--model", default="", metavar="DIR",
                    help="planning.model_dir for this run: the AI method's model folder (default: the shipped one); "
                         "the rows record its weights id")
    ap.add_argument("--json", default="", help="append each case's measurements to this JSON file (resumable)")
    ap.add_argument("--from-json", default="", help="print the tables of a saved run instead of planning")
    ap.add_argument("--compare", default="", metavar="BEFORE.json",
                    help="with --from-json: also print the medians of BEFORE -> the saved run on their common seeds")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())["rows"]
        print_tables(saved)
        print_goal_table(saved)
        if args.compare:
            print_comparison(json.loads(Path(args.compare).read_text())["rows"], saved)
        return
    torch.set_num_threads(args.threads)
    planning_memory_policy()  # as the planning process, so the times are the node's
    global PROFILE, WEIGHTS, SETTINGS, ARC_STEPS
    if args.arc_steps:
        leaf_mm, mu_step = (float(v) for v in args.arc_steps.split(","))
        ARC_STEPS = (leaf_mm, mu_step)
    if args.arc_iterations:
        SETTINGS = dataclasses.replace(SETTINGS, planning=dataclasses.replace(
            SETTINGS.planning, arc_optimizer_iterations=args.arc_iterations,
            optimizer_arc_iterations=args.arc_iterations))
    if args.sectors_per_beam:
        SETTINGS = dataclasses.replace(SETTINGS, planning=dataclasses.replace(
            SETTINGS.planning, arc_sectors_per_beam=args.sectors_per_beam,
            optimizer_arc_sectors_per_beam=args.sectors_per_beam))
    if args.model:
        SETTINGS = dataclasses.replace(SETTINGS, planning=dataclasses.replace(SETTINGS.planning, model_dir=args.model))
    PROFILE = SETTINGS.profile(args.profile or None)
    if args.optimizer_weights:
        pairs = [p.split("=", 1) for p in args.optimizer_weights.split(",")]
        base = planning_options(SETTINGS, PlanningMethod.OPTIMIZE, "cpu", PROFILE).optimizer_weights or OptimizerWeights()
        WEIGHTS = replace(base, **{k.strip(): type(getattr(base, k.strip()))(v) for k, v in pairs})
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; use {', '.join(METHODS)}")
    path = Path(args.json) if args.json else None
    rows = run_sets(args.sets, args.cases, path,
                    done=lambda r, case_set, seed: (r["set"] == case_set and r["seed"] == seed
                                                    and r.get("profile", PROFILE.name) == PROFILE.name),
                    plan=lambda case_set, index: run_case(case_set, index, methods))
    print_tables(rows)
    print_goal_table(rows)


if __name__ == "__main__":
    main()
