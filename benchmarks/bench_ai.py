"""Benchmark of the AIRT AI planner against the optimizer on held-out synthetic cases (Table 2 shape).

For each seed (not in the model's training data), every plan made by the planning core
(``pipeline.plan.plan_arc``) on the case's prebuilt engine (engine set-up not timed), timed from
the fluence to the normalised exported arc and its final dose: the appliance's optimizer plan (4 mm,
the configured evaluations and aperture threshold: what ``airt plan --method optimize`` does),
the AI plan of the model under test (``--model``, default the shipped one: what ``airt plan
--method ai`` does through ``pipeline.plan.plan_arc``, threshold choice and the arc's
machine-parameter optimisation of ``--arc`` evaluations included; timed; the optimizer row is made
by the same planning core with the same arc optimisation), the same without dose feedback ("-DF"),
the plans of other models for the ablation (``--variant LABEL=DIR``, e.g. a model trained with
or without the adversarial loss from the same stage 1) and AI plans with bladder or rectum
suppression s_o = 0.2, 0.4. "AI" is what the appliance does: the networks' fluence refined by
``--refine`` optimizer evaluations near the target (``pipeline.refine``; default
``planning.ai_refine_iterations``); "AI networks only" and the ablation and sparing rows are the
paper's pipeline without that refinement. Every AI fluence is sequenced at the aperture threshold
the appliance would choose (``pipeline.ai_planner.choose_aperture_threshold``) and every arc
optimised (``--arc`` evaluations); the exported arc's delivered fluence is dosed by the
reference engine on a 4 mm grid and MU-normalised to PTV D95 = Rx, then evaluated (PTV HI, D98,
D2, Paddick CI; bladder/rectum Dmean, D2). The fast dose network is compared with the reference
engine on the network grid for the AI plan's delivered fluence (global gamma 3 %/3 mm, 10 %
threshold; MAE in the PTV in % of Rx).

Non-inferiority of the AI plans (with and without refinement) against the optimizer's (the paper's margins): for PTV HI and the
bladder/rectum Dmean and D2, the one-sided 95 % upper confidence bound of the mean paired
difference (AI - optimizer) must stay below the margin (HI 0.01, OAR 1.5 Gy), and every AI plan
must reach PTV D98 >= 97 % of Rx.

The quality gate that lets ``planning.method = auto`` use a model is not this benchmark's: it is
``benchmarks.gate_ai``, on both case sets against the full planner.

    .venv/bin/python -m benchmarks.bench_ai [--seeds 2000:2020] [--model DIR] [--variant LABEL=DIR ...]
                                            [--refine N] [--arc N] [--threads 2] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from appliance.config import PlanningMethod, Settings
from appliance.planning import planning_options
from benchmarks.gate_ai import D98_MIN_REL, MARGINS, paired_bound
from core.case import Role
from pipeline.ai_planner import load_pipeline, predict_fluence, prepare_case
from pipeline.beam_model import load_beam_model
from pipeline.dose_engine import ReferenceDoseEngine
from pipeline.dvh import structure_metrics
from pipeline.gamma import gamma_pass_rate
from pipeline.goals import normalisation_factor
from pipeline.plan import plan_arc
from pipeline.problem import build_problem
from pipeline.synth import synth_case
from pipeline.training.data import parse_seed_range
from sequencing.fluence import fluence_from_sequence
from sequencing.sequencer import ArcSequence

SETTINGS = Settings()
MACHINE = SETTINGS.machine.model()
ARC = SETTINGS.machine.arc()
#: The appliance's planning options (the rows change the iterations, model, sparing, feedback and refinement).
AI_OPTIONS = planning_options(SETTINGS, PlanningMethod.AI, "cpu")
OPTIMIZER_OPTIONS = planning_options(SETTINGS, PlanningMethod.OPTIMIZE, "cpu")
#: Row label of the paper's pipeline without the appliance's refinement.
NETWORKS_ONLY = "AI networks only"


def evaluate(seq: ArcSequence, engine: ReferenceDoseEngine, masks: dict[Role, torch.Tensor], rx_fx: float,
             fractions: int) -> dict[str, float]:
    """Quality of a sequenced plan: reference dose, D95 = Rx, metrics (Gy over all fractions)."""
    delivered = fluence_from_sequence(seq, MACHINE)
    with torch.inference_mode():
        dose = engine(torch.as_tensor(delivered, dtype=torch.float32)).numpy()
    ptv = masks[Role.PTV].numpy()
    dose = dose * normalisation_factor(dose, ptv, rx_gy=rx_fx, mode="ptv_dx", volume_percent=95.0) * fractions
    vcc = engine.grid.voxel_volume_cc
    body = masks[Role.BODY].numpy() if Role.BODY in masks else None
    p = structure_metrics(dose, ptv, vcc, rx_gy=rx_fx * fractions, target=True, body_mask=body)
    row = {"HI": p["HI"], "D98_Gy": p["D98_Gy"], "D2_Gy": p["D2_Gy"], "CI": p["CI_paddick"]}
    for role in (Role.BLADDER, Role.RECTUM):
        m = structure_metrics(dose, masks[role].numpy(), vcc, rx_gy=rx_fx * fractions)
        row[f"{role.value}_Dmean_Gy"] = m["Dmean_Gy"]
        row[f"{role.value}_D2_Gy"] = m["D2_Gy"]
    return row


def run_case(seed: int, model_dir: str, variants: dict[str, str], optimizer_iterations: int,
             refine: int, arc_iterations: int) -> dict[str, Any]:
    """All plans and measurements of one held-out case."""
    case = synth_case(seed, spacing_mm=(4.0, 4.0, 4.0))
    rx_fx = case.prescription.dose_gy / case.prescription.fractions
    fx = case.prescription.fractions
    prob = build_problem(case, ARC, MACHINE, hu_curve=SETTINGS.planning.hu_to_density, spacing_mm=4.0)
    geometry, engine, masks = prob.geometry, prob.engine, prob.masks
    ptv = masks[Role.PTV].numpy()
    out: dict[str, Any] = {"seed": seed, "quality": {}, "time_s": {}, "sparing": {}, "threshold": {}}

    arc = replace(AI_OPTIONS.arc, iterations=arc_iterations)  # the shipped arc stage, MU term included
    t0 = time.perf_counter()
    teacher = plan_arc(case, MACHINE, ARC, replace(OPTIMIZER_OPTIONS, optimizer_iterations=optimizer_iterations,
                                                   arc=arc), problem=prob)
    out["time_s"]["optimizer"] = time.perf_counter() - t0
    out["quality"]["optimizer"] = evaluate(teacher.sequence, engine, masks, rx_fx, fx)

    def ai(sparing: dict[Role, float], feedback: bool = True, model: str = model_dir,
           refine_iterations: int = 0) -> tuple[ArcSequence, float, dict[str, float], float]:
        """Plan with the AI method through the planning core, as ``airt plan --method ai`` does."""
        t = time.perf_counter()
        options = replace(AI_OPTIONS, model_dir=model, sparing=sparing, ai_feedback=feedback,
                          ai_refine_iterations=refine_iterations, arc=arc)
        result = plan_arc(case, MACHINE, ARC, options, problem=prob)
        return (result.sequence, time.perf_counter() - t, result.record["ai_module_ms"],
                float(result.record.get("sequencer_aperture_threshold", float("nan"))))

    predict_fluence(case, model_dir, geometry=geometry, rx_gy=rx_fx, sparing={}, device="cpu")  # warm-up
    seq_ai, t_ai, ms, thr = ai({}, refine_iterations=refine)
    out["time_s"]["ai"] = t_ai
    out["module_ms"] = ms
    out["quality"]["AI"] = evaluate(seq_ai, engine, masks, rx_fx, fx)
    out["threshold"]["AI"] = thr
    seq_n, out["time_s"]["ai_networks_only"], _, out["threshold"][NETWORKS_ONLY] = ai({})
    out["quality"][NETWORKS_ONLY] = evaluate(seq_n, engine, masks, rx_fx, fx)
    seq_df, _, _, out["threshold"][f"{NETWORKS_ONLY} -DF"] = ai({}, feedback=False)
    out["quality"][f"{NETWORKS_ONLY} -DF"] = evaluate(seq_df, engine, masks, rx_fx, fx)
    for label, folder in variants.items():
        seq_v, _, _, out["threshold"][label] = ai({}, model=folder)
        out["quality"][label] = evaluate(seq_v, engine, masks, rx_fx, fx)
    for role in (Role.BLADDER, Role.RECTUM):
        out["sparing"][role.value] = {0.0: out["quality"][NETWORKS_ONLY][f"{role.value}_Dmean_Gy"]}
        for s in (0.2, 0.4):
            seq_s, _, _, _ = ai({role: s})
            out["sparing"][role.value][s] = evaluate(seq_s, engine, masks, rx_fx, fx)[f"{role.value}_Dmean_Gy"]

    # Fast dose vs reference engine on the network grid, for the AI plan's delivered fluence.
    pipe = load_pipeline(model_dir, "cpu")
    prep = prepare_case(case, geometry, pipe.spec, pipe.fast_dose.config, "cpu")  # type: ignore[arg-type]
    eng_net = ReferenceDoseEngine.for_case(case, geometry, load_beam_model(), hu_curve=pipe.spec.hu_to_density,
                                           spacing_mm=pipe.spec.net_grid_mm)
    delivered = torch.as_tensor(fluence_from_sequence(seq_ai, MACHINE), dtype=torch.float32)
    with torch.inference_mode():
        ref = eng_net(delivered).numpy() / rx_fx
        fast = pipe.fast_dose(delivered[None] / (pipe.spec.fluence_mu_per_rx_gy * rx_fx), prep.primary)[0, 0].numpy()
    ptv = prep.masks["ptv"].numpy() > 0
    g = pipe.spec.net_grid_mm
    out["fast_dose"] = {"gamma_3_3_pct": 100.0 * gamma_pass_rate(ref, fast, (g, g, g)),
                        "mae_ptv_pct_rx": 100.0 * float(np.abs(fast - ref)[ptv].mean())}
    return out


def non_inferiority(rows: list[dict[str, Any]], label: str = "AI") -> list[dict[str, Any]]:
    """Paired AI - optimizer differences per metric: mean, one-sided 95 % upper bound, verdict."""
    return [{"metric": metric, **paired_bound([r["quality"][label][metric] - r["quality"]["optimizer"][metric]
                                               for r in rows], margin)}
            for metric, margin in MARGINS.items()]


def _med(vals: list[float]) -> float:
    v = [x for x in vals if np.isfinite(x)]
    return statistics.median(v) if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="2000:2020", help="held-out synthetic seeds, A:B (B exclusive)")
    ap.add_argument("--model", default="", help="model folder (default: the shipped model)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                    help="another model for the ablation table, e.g. 'AI with adversarial loss=RUN/model' (repeatable)")
    ap.add_argument("--iterations", type=int, default=SETTINGS.planning.optimizer_iterations,
                    help="optimizer evaluations (default: the appliance's planning.optimizer_iterations)")
    ap.add_argument("--refine", type=int, default=SETTINGS.planning.ai_refine_iterations,
                    help="refinement evaluations of the 'AI' row (default: the appliance's planning.ai_refine_iterations)")
    ap.add_argument("--arc", type=int, default=SETTINGS.planning.arc_optimizer_iterations,
                    help="machine-parameter optimisation evaluations of every AI plan (default: the appliance's "
                         "planning.arc_optimizer_iterations)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write every case's measurements to this JSON file")
    ap.add_argument("--from-json", default="", metavar="FILE",
                    help="print the tables of a run saved with --json instead of planning again")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = dict(v.split("=", 1) for v in args.variant)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            saved = json.load(f)
        rows, args.refine = saved["rows"], int(saved["refine_iterations"])
        for r in rows:  # JSON object keys are strings
            r["sparing"] = {organ: {float(k): v for k, v in by_s.items()} for organ, by_s in r["sparing"].items()}
    else:
        rows = []
        for seed in parse_seed_range(args.seeds):
            rows.append(run_case(seed, args.model, variants, args.iterations, args.refine, args.arc))
            print(f"seed {seed} done", flush=True)
    n = len(rows)

    t_opt = _med([r["time_s"]["optimizer"] for r in rows])
    t_ai = _med([r["time_s"]["ai"] for r in rows])
    t_net = _med([r["time_s"]["ai_networks_only"] for r in rows])
    print(f"\n### Planning time, {n} held-out cases (CPU, {args.threads} threads; medians)\n")
    print("| method | median s | ratio optimizer / AI |\n|---|---|---|")
    print(f"| optimizer ({args.iterations} evaluations, {OPTIMIZER_OPTIONS.dose_grid_mm:g} mm) + sequencing + {args.arc} arc "
          f"evaluations + final dose | {t_opt:.2f} | |")
    print(f"| AI (fluence prediction + {args.refine} refinement evaluations + threshold choice + sequencing + "
          f"{args.arc} arc evaluations + final dose) | {t_ai:.2f} | {t_opt / t_ai:.1f} |")
    print(f"| {NETWORKS_ONLY} (fluence prediction + threshold choice + sequencing + {args.arc} arc evaluations + "
          f"final dose) | {t_net:.2f} | {t_opt / t_net:.1f} |")

    print("\n### AI modules, median ms (Table S4 shape)\n")
    print("| module | ms |\n|---|---|")
    for k in rows[0]["module_ms"]:
        print(f"| {k} | {_med([r['module_ms'][k] for r in rows]):.1f} |")

    cols = ["HI", "D98_Gy", "D2_Gy", "CI", "bladder_Dmean_Gy", "bladder_D2_Gy", "rectum_Dmean_Gy", "rectum_D2_Gy"]
    print(f"\n### Plan quality after sequencing (reference engine, 4 mm, PTV D95 = Rx = 40 Gy; medians of {n})\n")
    print("| method | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for method in rows[0]["quality"]:
        print(f"| {method} | " + " | ".join(f"{_med([r['quality'][method][c] for r in rows]):.3f}" for c in cols)
              + " |")

    if any(np.isnan(v) for r in rows for v in r["threshold"].values()):  # leaf-sweep start: no threshold
        print("\nThe arcs started from leaf sweeps (planning.arc_start = sweep): no aperture threshold was chosen.")
    else:
        print("\nAperture threshold chosen per plan (planning.ai_aperture_thresholds; optimizer plans at "
              f"{SETTINGS.planning.aperture_threshold:g}), median [min, max]: " + "; ".join(
                  f"{k} {_med([r['threshold'][k] for r in rows]):g} [{min(r['threshold'][k] for r in rows):g}, "
                  f"{max(r['threshold'][k] for r in rows):g}]" for k in rows[0]["threshold"]))

    rx_total = 40.0
    verdicts: dict[str, dict[str, Any]] = {}
    for label in ("AI", NETWORKS_ONLY):
        ni = non_inferiority(rows, label)
        d98_ok = sum(r["quality"][label]["D98_Gy"] / rx_total >= D98_MIN_REL for r in rows)
        title = (f"AI plan as the appliance makes it ({args.refine} refinement evaluations)" if label == "AI"
                 else "AI plan of the networks alone (the paper's pipeline)")
        print(f"\n### Non-inferiority against the optimizer: {title} ({n} paired cases)\n")
        print("| metric | margin | mean AI - optimizer | one-sided 95 % upper bound | cases within margin | verdict |")
        print("|---|---|---|---|---|---|")
        for x in ni:
            print(f"| {x['metric']} | {x['margin']:g} | {x['mean_diff']:+.3f} | {x['upper95']:+.3f} | "
                  f"{x['cases_within_margin']}/{x['n']} | {'non-inferior' if x['non_inferior'] else 'NOT shown'} |")
        print(f"| PTV D98 >= {100 * D98_MIN_REL:.0f} % Rx | | | | {d98_ok}/{n} | "
              f"{'met' if d98_ok == n else 'NOT met'} |")
        overall = all(x["non_inferior"] for x in ni) and d98_ok == n
        print(f"\nOverall: {'non-inferior' if overall else 'non-inferiority NOT shown'}")
        verdicts[label] = {"non_inferiority": ni, "d98_ok": d98_ok, "overall_non_inferior": overall}

    print(f"\n### Fast dose vs reference engine (network grid; medians of {n})\n")
    print("| gamma 3%/3mm pass % | MAE in PTV, % of Rx |\n|---|---|")
    print(f"| {_med([r['fast_dose']['gamma_3_3_pct'] for r in rows]):.1f} | "
          f"{_med([r['fast_dose']['mae_ptv_pct_rx'] for r in rows]):.2f} |")

    print(f"\n### Sparing controls: targeted organ Dmean, Gy (medians of {n})\n")
    print("| organ | s_o = 0 | s_o = 0.2 | s_o = 0.4 | cases lowered at 0.2 / 0.4 |\n|---|---|---|---|---|")
    for organ in ("bladder", "rectum"):
        lowered = [sum(r["sparing"][organ][s] < r["sparing"][organ][0.0] for r in rows) for s in (0.2, 0.4)]
        print(f"| {organ} | " + " | ".join(f"{_med([r['sparing'][organ][s] for r in rows]):.2f}"
                                            for s in (0.0, 0.2, 0.4)) + f" | {lowered[0]}/{n} / {lowered[1]}/{n} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "refine_iterations": args.refine, **verdicts["AI"],
                       "networks_only": verdicts[NETWORKS_ONLY]}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
