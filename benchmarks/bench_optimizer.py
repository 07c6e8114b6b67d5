"""Benchmark of the fluence optimizer on synthetic pelvis cases (fast path, 4 mm).

For each seed: build the case (``pipeline.synth.synth_case``), the reference dose engine at 4 mm and
the masks on its grid (as ``appliance.planning`` does), optimise, normalise PTV D95 = Rx and report
the optimizer time, PTV HI, D98 (% of Rx), Paddick CI and bladder/rectum mean dose (Gy, total over
all fractions). The dose is the optimizer's fluence before leaf sequencing.

    .venv/bin/python -m benchmarks.bench_optimizer [--seeds 1 2 3 4 5] [--iterations 150] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from appliance.config import Settings
from core.case import Role
from pipeline.dvh import structure_metrics
from pipeline.goals import normalisation_factor
from pipeline.optimizer import optimize_fluence
from pipeline.problem import build_problem
from pipeline.synth import synth_case


def run_case(seed: int, iterations: int, method: str, time_limit_s: float | None) -> dict[str, float]:
    """Plan one synthetic case and return its row of the table."""
    st = Settings()
    t0 = time.perf_counter()
    case = synth_case(seed, spacing_mm=(4.0, 4.0, 4.0))
    prob = build_problem(case, st.machine.arc(), st.machine.model(), hu_curve=st.planning.hu_to_density,
                         spacing_mm=4.0)
    engine, masks = prob.engine, prob.masks
    setup_s = time.perf_counter() - t0
    rx_total = case.prescription.dose_gy
    rx_fx = rx_total / case.prescription.fractions
    res = optimize_fluence(engine, masks, rx_gy=rx_fx, iterations=iterations, method=method,
                           time_limit_s=time_limit_s)
    ptv = masks[Role.PTV].numpy()
    factor = normalisation_factor(res.dose, ptv, rx_gy=rx_fx, mode="ptv_dx", volume_percent=95.0)
    dose = res.dose * factor * case.prescription.fractions
    vcc = engine.grid.voxel_volume_cc
    body = masks[Role.BODY].numpy() if Role.BODY in masks else None
    p = structure_metrics(dose, ptv, vcc, rx_gy=rx_total, target=True, body_mask=body)
    row = {
        "seed": float(seed),
        "setup_s": setup_s,
        "optimizer_s": res.seconds,
        "evaluations": float(len(res.history)),
        "HI": p["HI"],
        "D98_pct": 100.0 * p["D98_Gy"] / rx_total,
        "D2_pct": 100.0 * p["D2_Gy"] / rx_total,
        "CI": p["CI_paddick"],
    }
    for role in (Role.BLADDER, Role.RECTUM):
        m = masks.get(role)
        row[f"{role.value}_Dmean_Gy"] = (
            structure_metrics(dose, m.numpy(), vcc, rx_gy=rx_total)["Dmean_Gy"] if m is not None and bool(m.any())
            else float("nan")
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--iterations", type=int, default=150, help="objective evaluations per case")
    ap.add_argument("--method", choices=["adam", "lbfgs"], default="adam")
    ap.add_argument("--time-limit", type=float, default=None, help="optimizer wall-time limit per case, s")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = [run_case(s, args.iterations, args.method, args.time_limit) for s in args.seeds]
    cols = ["setup_s", "optimizer_s", "evaluations", "HI", "D98_pct", "D2_pct", "CI", "bladder_Dmean_Gy",
            "rectum_Dmean_Gy"]
    print(f"fluence optimizer, {args.method}, {args.iterations} evaluations, {args.threads} threads, 4 mm grid, "
          "before sequencing, PTV D95 = Rx\n")
    print("| seed | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in rows:
        print(f"| {int(r['seed'])} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    print("| **median** | " + " | ".join(f"{statistics.median(r[c] for r in rows):.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
