"""The DoseProposer's predicted organ doses against the doses the planner reaches, on both case sets.

The multicentre study takes OAR objective values from the predicted dose with a tolerance, so that a
favourable anatomy is planned below the protocol limit. That only helps where the prediction is at or
below what the planner reaches on its own. This benchmark measures it: for each case of a
``bench_arc`` run (its JSON), the shipped model's DoseProposer predicts the dose on the network grid,
normalised like the plan (PTV D95 = Rx on that grid), and the bladder's and rectum's Dmean and D2 of
the prediction are printed beside those of the exported AI plan of that run (CT grid).

    .venv/bin/python -m benchmarks.bench_proposer --plans benchmarks/bench_arc_profile_40gy_spb2.json
                                                  [--sets synth,heldout] [--cases 10] [--threads 2]

The cases are made exactly as ``bench_arc`` makes them (same seeds, CT geometries and loader).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_arc import ARC, CASE_SETS, MACHINE, SETTINGS, case_spec, load_case
from pipeline.ai_planner import load_pipeline, prepare_case
from pipeline.geometry import ArcGeometry

ORGANS = ("rectum", "bladder")


def predicted(case_set: str, index: int, profile_name: str) -> tuple[int, dict[str, dict[str, float]]]:
    """Seed and the predicted Dmean/D2 (Gy) of each organ of case ``index`` of a set."""
    seed, _, _ = case_spec(case_set, index)
    profile = SETTINGS.profile(profile_name)
    case = load_case(case_set, index, profile.to_prescription())
    geometry = ArcGeometry(arc=ARC, isocenter_mm=case.ptv_centroid_mm(), position=case.patient_position,
                           machine=MACHINE)
    with torch.inference_mode():
        pipe = load_pipeline(SETTINGS.planning.model_dir, "cpu")
        prep = prepare_case(case, geometry, pipe.spec, pipe.fast_dose.config, "cpu")  # type: ignore[arg-type]
        dose = pipe(prep, {}, feedback=False).dose_proposed[0, 0].numpy()
    ptv = prep.masks["ptv"].numpy() > 0.5
    dose = dose * (profile.dose_gy / float(np.percentile(dose[ptv], 5.0)))  # PTV D95 = Rx, as the plans
    out = {}
    for organ in ORGANS:
        mask = prep.masks.get(organ)
        if mask is not None:
            d = dose[mask.numpy() > 0.5]
            out[organ] = {"Dmean_Gy": float(d.mean()), "D2_Gy": float(np.percentile(d, 98.0))}
    return seed, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", required=True, help="a bench_arc JSON whose AI plans the predictions are set against")
    ap.add_argument("--sets", default="synth,heldout")
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {(r["set"], r["seed"]): r for r in json.loads(Path(args.plans).read_text())["rows"]}
    print(f"DoseProposer prediction (shipped model, PTV D95 = Rx) vs the exported AI plan of {args.plans}\n")
    for case_set in args.sets.split(","):
        if case_set not in CASE_SETS:
            raise SystemExit(f"unknown case set {case_set!r}; use {', '.join(CASE_SETS)}")
        print(f"#### {case_set} set\n")
        print("| case | rectum Dmean Gy, predicted / plan | rectum D2 Gy | bladder Dmean Gy | bladder D2 Gy |")
        print("|---|---|---|---|---|")
        ratios: dict[str, list[float]] = {o: [] for o in ORGANS}
        for index in range(args.cases):
            seed = case_spec(case_set, index)[0]
            row = rows.get((case_set, seed))
            if row is None or "ai" not in row["methods"]:
                continue
            _, pred = predicted(case_set, index, row["profile"])
            plan: dict[str, Any] = row["methods"]["ai"]["exported"]
            cells = []
            for organ in ORGANS:
                for metric in ("Dmean_Gy", "D2_Gy"):
                    p, q = pred[organ][metric], plan[f"{organ}_{metric}"]
                    cells.append(f"{p:.2f} / {q:.2f}")
                ratios[organ].append(pred[organ]["Dmean_Gy"] / plan[f"{organ}_Dmean_Gy"])
            print(f"| {seed} | " + " | ".join(cells) + " |", flush=True)
        for organ in ORGANS:
            if ratios[organ]:
                r = ratios[organ]
                print(f"\n{organ} Dmean, predicted / plan: median {statistics.median(r):.2f} "
                      f"(range {min(r):.2f}-{max(r):.2f}, {len(r)} cases)")
        print()


if __name__ == "__main__":
    main()
