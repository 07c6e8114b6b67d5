"""Where PTV coverage and the rectum's high-dose goal cannot both be met: the PTV-rectum overlap.

For every case of ``benchmarks.bench_arc`` rows (both methods), the generator's PTV and rectum on the
case's CT geometry (``pipeline.synth``, no CT noise; the masks the case was written from), the volume
of their overlap, and the least rectum volume a plan with PTV D98 >= ``--d98`` x Rx must give at
least that dose whatever its fall-off: ``overlap - 0.02 x PTV volume`` (at most 2 % of the PTV, and so
of the overlap, may stay below). Where that exceeds the goal (e.g. PACE's rectum V36Gy <= 2 cc at
40 Gy: a rectum voxel at >= 97 % of 40 Gy is above 36 Gy), no plan meets both. Printed beside each
plan's PTV D98, rectum value and P1 verdict.

    .venv/bin/python -m benchmarks.rectum_overlap --rows A.json[,B.json] [--d98 0.97] [--goal-cc 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.bench_arc import case_spec
from pipeline.goals import plan_verdict
from pipeline.synth import PTV, RECTUM, ct_grid, synth_anatomy


def overlap_cc(case_set: str, seed: int) -> tuple[float, float]:
    """PTV volume and PTV-rectum overlap (cm3) of a benchmark case on its CT geometry."""
    first = 2000 if case_set == "synth" else 5000
    _, ct, heldout = case_spec(case_set, seed - first)
    anat = synth_anatomy(seed, ct_grid(ct.slices, ct.pixel_mm, ct.slice_mm, ct.matrix), heldout=heldout, noise=False)
    v = anat.grid.voxel_volume_cc
    ptv, rectum = anat.masks[PTV], anat.masks[RECTUM]
    return float(ptv.sum() * v), float((ptv & rectum).sum() * v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", required=True, help="bench_arc JSON files, comma-separated")
    ap.add_argument("--d98", type=float, default=0.97, help="PTV D98 wanted, fraction of Rx")
    ap.add_argument("--goal-cc", type=float, default=2.0, help="the rectum's high-dose goal, cm3")
    args = ap.parse_args()
    plans: dict[tuple[str, int], dict[str, Any]] = {}
    rx = 40.0
    for f in args.rows.split(","):
        for r in json.loads(Path(f).read_text())["rows"]:
            plans.setdefault((r["set"], r["seed"]), {}).update(r["methods"])
            rx = float(r.get("rx_gy", rx))
    print(f"| case | PTV cc | PTV-rectum overlap cc | rectum cc at >= {100 * args.d98:.0f} % Rx, at least | "
          "both reachable | plans: PTV D98 Gy, rectum high-dose value, all P1 met |")
    print("|---|---|---|---|---|---|")
    for (case_set, seed), methods in sorted(plans.items()):
        vol, ov = overlap_cc(case_set, seed)
        least = ov - 0.02 * vol
        cells = []
        for name, m in methods.items():
            value = next((g["value"] for g in m["goals"] if g["structure"] == "rectum" and g["priority"] == 1
                          and g["metric"].endswith("cc")), float("nan"))
            p1 = plan_verdict(m["goals"]).p1_met
            cells.append(f"{name} {m['exported']['D98_Gy']:.2f}, {value:.2f} cc, {'yes' if p1 else 'no'}")
        print(f"| {case_set} {seed} | {vol:.1f} | {ov:.2f} | {least:.2f} | {'yes' if least <= args.goal_cc else 'NO'} | "
              + "; ".join(cells) + f" (Rx {rx:g} Gy) |")


if __name__ == "__main__":
    main()
