"""Benchmark of the reference engine's set-up (the per-case ray trace) on both case sets (2 threads).

Run: ``.venv/bin/python -m benchmarks.bench_setup [--cases 5] [--repeats 3] [--json PATH]``.

Each case is written as DICOM and loaded as ``airt plan`` loads it (``benchmarks.bench_arc``'s case
sets: ``airt synth`` seeds from 2000 on its CT, and the held-out anatomy and CT geometries from 5000);
:func:`pipeline.problem.build_problem` (dose grid, density, masks, the full engine's trace) is then
timed ``repeats + 1`` times in this process, the first run dropped from the median (numba's cache load,
fresh pages) and shown apart: the first case's first run is what a fresh process (``airt plan``) pays.
The process keeps the memory it frees and keeps numpy from advising huge pages, as the planning process
does (:func:`appliance.plan_process.planning_memory_policy`; ``--numpy-hugepages`` leaves numpy's advice
on, for comparison). Prints a markdown table: per case the dose grid, the engine's voxels and control
points, the first run and the median set-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from appliance.config import PlanningMethod
from appliance.plan_process import planning_memory_policy
from appliance.planning import planning_options
from benchmarks.bench_arc import ARC, MACHINE, PROFILE, SETTINGS, case_spec, load_case
from pipeline.problem import build_problem


def run(cases: int, repeats: int) -> list[dict[str, Any]]:
    """Time the engine set-up of the first ``cases`` cases of each set."""
    options = planning_options(SETTINGS, PlanningMethod.AI, "cpu", PROFILE)
    rows = []
    for case_set in ("synth", "heldout"):
        for index in range(cases):
            seed, ct, _ = case_spec(case_set, index)
            case = load_case(case_set, index, PROFILE.to_prescription())
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                problem = build_problem(case, ARC, MACHINE, hu_curve=options.hu_curve,
                                        spacing_mm=options.dose_grid_mm, device="cpu")
                times.append(time.perf_counter() - t0)
                shape, voxels = problem.grid.shape, int(problem.engine.points.shape[1])
                del problem
            rows.append({"set": case_set, "seed": seed, "ct": ct.label(), "dose_grid": list(shape), "voxels": voxels,
                         "control_points": ARC.n_sectors, "setup_s": statistics.median(times[1:]),
                         "runs_s": times})
            print(f"  {case_set} {seed} ({ct.label()}): {voxels} voxels, set-up {rows[-1]['setup_s']:.2f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=5, help="cases per set")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case after the first")
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--numpy-hugepages", action="store_true",
                    help="leave numpy's huge-page advice on (the planning process turns it off)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    planning_memory_policy(numpy_hugepages=args.numpy_hugepages)
    rows = run(args.cases, args.repeats)
    print(f"\nnumpy huge-page advice {'on' if args.numpy_hugepages else 'off'}")
    print("\n| set | seed | CT | dose grid | body voxels | control points | first run s | engine set-up s, median |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['set']} | {r['seed']} | {r['ct']} | {'x'.join(map(str, r['dose_grid']))} | {r['voxels']} | "
              f"{r['control_points']} | {r['runs_s'][0]:.2f} | {r['setup_s']:.2f} |")
    for case_set in ("synth", "heldout"):
        values = [r["setup_s"] for r in rows if r["set"] == case_set]
        print(f"\n{case_set}: median {statistics.median(values):.2f} s, max {max(values):.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"numpy_hugepages": bool(args.numpy_hugepages), "rows": rows}, indent=1)
                             + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
