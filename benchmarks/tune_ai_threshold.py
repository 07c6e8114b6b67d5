"""Choose the leaf sequencer's aperture threshold for a trained model's fluence, on tuning cases.

The networks predict smooth maps: where the teacher plans open a leaf at one control point and
close it at the next, the network predicts a partial value. The sequencer forms each row's
aperture from the pixels at or above ``threshold`` x the map maximum, so a low threshold opens
every such pixel fully (wider fields, more OAR dose, lower CI) and a high one closes target
pixels (cold PTV). This script plans synthetic tuning cases (seeds that are neither training nor
benchmark cases) with the appliance's optimizer and with the model, sequences the model's maps
at each candidate threshold, evaluates every plan with the reference engine (4 mm, D95 = Rx)
and picks the threshold that keeps every plan at PTV D98 >= 97 % of Rx and the mean PTV HI no
worse than the optimizer's, and among those has the smallest worst mean OAR excess over the
optimizer (bladder/rectum Dmean and D2). ``--write`` records it in the model's ``model.json``
(``meta.sequencing``), where ``airt plan --method ai`` reads it.

    .venv/bin/python -m benchmarks.tune_ai_threshold [--model DIR] [--seeds 1900:1910]
        [--thresholds 0.02,0.1,0.2,0.3,0.4,0.5] [--optimizer-json FILE] [--write]

``--optimizer-json`` keeps the optimizer's evaluations (the slow part, about 45 s a case) so
that several models can be tuned on the same cases.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_ai import ARC, MACHINE, SETTINGS, evaluate
from pipeline.ai_planner import predict_fluence
from pipeline.model_io import update_model_meta
from pipeline.problem import build_problem
from pipeline.synth import synth_case
from pipeline.training.data import PlanningRecipe, parse_seed_range, plan_synthetic_case
from sequencing.sequencer import sequence_arc

OAR_METRICS = ("bladder_Dmean_Gy", "bladder_D2_Gy", "rectum_Dmean_Gy", "rectum_D2_Gy")
D98_MIN_REL = 0.97


def optimizer_rows(seeds: list[int], iterations: int, cache: Path | None) -> dict[int, dict[str, float]]:
    """The optimizer plan's evaluation per seed (read from / added to ``cache`` when given)."""
    known: dict[int, dict[str, float]] = {}
    if cache is not None and cache.is_file():
        doc = json.loads(cache.read_text())
        if doc.get("iterations") == iterations:
            known = {int(k): v for k, v in doc["rows"].items()}
    recipe = PlanningRecipe(iterations=iterations, aperture_threshold=SETTINGS.planning.aperture_threshold)
    for seed in seeds:
        if seed in known:
            continue
        case = synth_case(seed, spacing_mm=(4.0, 4.0, 4.0))
        prob = build_problem(case, ARC, MACHINE, hu_curve=SETTINGS.planning.hu_to_density, spacing_mm=4.0)
        plan = plan_synthetic_case(seed, machine=MACHINE, arc=ARC, recipe=recipe,
                                   hu_curve=SETTINGS.planning.hu_to_density)
        rx_fx = case.prescription.dose_gy / case.prescription.fractions
        known[seed] = evaluate(plan.sequence, prob.engine, prob.masks, rx_fx, case.prescription.fractions)
        print(f"optimizer seed {seed}: HI {known[seed]['HI']:.3f}", flush=True)
        if cache is not None:
            cache.write_text(json.dumps({"iterations": iterations, "rows": {str(k): v for k, v in known.items()}},
                                        indent=1))
    return {s: known[s] for s in seeds}


def ai_rows(seeds: list[int], model: str, thresholds: list[float]) -> dict[float, dict[int, dict[str, float]]]:
    """The AI plan's evaluation per threshold and seed (one prediction per seed)."""
    out: dict[float, dict[int, dict[str, float]]] = {t: {} for t in thresholds}
    for seed in seeds:
        case = synth_case(seed, spacing_mm=(4.0, 4.0, 4.0))
        prob = build_problem(case, ARC, MACHINE, hu_curve=SETTINGS.planning.hu_to_density, spacing_mm=4.0)
        rx_fx = case.prescription.dose_gy / case.prescription.fractions
        fluence, _ = predict_fluence(case, model, geometry=prob.geometry, rx_gy=rx_fx, sparing={}, device="cpu")
        for t in thresholds:
            seq = sequence_arc(fluence, ARC, MACHINE, threshold=t)
            out[t][seed] = evaluate(seq, prob.engine, prob.masks, rx_fx, case.prescription.fractions)
    return out


def summarise(opt: dict[int, dict[str, float]], ai: dict[int, dict[str, float]], rx_gy: float) -> dict[str, Any]:
    """Mean paired differences (AI - optimizer), the lowest D98 and the verdict of one threshold."""
    seeds = sorted(ai)
    diff = {m: float(np.mean([ai[s][m] - opt[s][m] for s in seeds])) for m in ("HI", "CI", *OAR_METRICS)}
    d98_min = min(ai[s]["D98_Gy"] for s in seeds) / rx_gy
    feasible = d98_min >= D98_MIN_REL and diff["HI"] <= 0.0
    return {"mean_diff": diff, "D98_min_rel": d98_min, "feasible": feasible,
            "worst_oar_excess_Gy": max(diff[m] for m in OAR_METRICS),
            "median_HI": statistics.median(ai[s]["HI"] for s in seeds)}


def choose(summary: dict[float, dict[str, Any]]) -> float | None:
    """The feasible threshold with the smallest worst OAR excess (None when none is feasible)."""
    ok = [t for t, r in summary.items() if r["feasible"]]
    return min(ok, key=lambda t: summary[t]["worst_oar_excess_Gy"]) if ok else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model folder (default: the shipped model)")
    ap.add_argument("--seeds", default="1900:1910", help="tuning seeds A:B, disjoint from training and benchmark seeds")
    ap.add_argument("--thresholds", default="0.02,0.1,0.2,0.25,0.3,0.35,0.4,0.5")
    ap.add_argument("--iterations", type=int, default=SETTINGS.planning.optimizer_iterations)
    ap.add_argument("--optimizer-json", type=Path, default=None, help="cache of the optimizer's evaluations")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="record the chosen threshold in the model's model.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = parse_seed_range(args.seeds)
    thresholds = sorted(float(t) for t in args.thresholds.split(","))
    rx_gy = synth_case(seeds[0], spacing_mm=(4.0, 4.0, 4.0)).prescription.dose_gy
    opt = optimizer_rows(seeds, args.iterations, args.optimizer_json)
    ai = ai_rows(seeds, args.model, thresholds)
    summary = {t: summarise(opt, ai[t], rx_gy) for t in thresholds}
    print(f"\n## Aperture threshold of the AI fluence ({len(seeds)} tuning cases, seeds {args.seeds}; "
          "mean AI - optimizer)\n")
    print("| threshold | HI | CI | bladder Dmean | bladder D2 | rectum Dmean | rectum D2 | lowest D98 (% Rx) | feasible |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t, r in summary.items():
        d = r["mean_diff"]
        print(f"| {t:.2f} | {d['HI']:+.3f} | {d['CI']:+.3f} | {d['bladder_Dmean_Gy']:+.2f} | {d['bladder_D2_Gy']:+.2f} | "
              f"{d['rectum_Dmean_Gy']:+.2f} | {d['rectum_D2_Gy']:+.2f} | {100 * r['D98_min_rel']:.1f} | "
              f"{'yes' if r['feasible'] else 'no'} |")
    best = choose(summary)
    if best is None:
        print("\nno threshold keeps D98 >= 97 % and the mean HI no worse than the optimizer's; nothing written")
        return
    print(f"\nchosen: {best:.2f} (worst mean OAR excess {summary[best]['worst_oar_excess_Gy']:+.2f} Gy)")
    if args.write:
        from pipeline.ai_model import SHIPPED_MODEL_DIR

        folder = Path(args.model) if args.model else SHIPPED_MODEL_DIR
        path = update_model_meta(folder, {"sequencing": {
            "aperture_threshold": best,
            "tuned_on": {"synthetic_seeds": args.seeds, "optimizer_iterations": args.iterations,
                         "criterion": "every plan PTV D98 >= 97 % Rx and mean HI <= the optimizer's; then the "
                                      "smallest worst mean OAR excess (bladder/rectum Dmean, D2) over the optimizer"},
            "table": {f"{t:.2f}": r for t, r in summary.items()},
        }})
        print(f"written to {path}")


if __name__ == "__main__":
    main()
