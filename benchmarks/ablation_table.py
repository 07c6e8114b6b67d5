"""The AI pipeline's ablation table from ``benchmarks.bench_arc`` rows: each variant's exported arcs
against the full planner's on the same cases, per case set.

Each ``--variant LABEL=FILE:METHOD`` names the rows of one variant (a ``bench_arc --json`` file and the
method key of its rows: ``ai``, ``ai_networks``, ``ai_networks_nodf``); ``--planner FILE`` the rows of
the full planner (method ``optimize``). Per set, on the cases every variant and the planner planned,
the table gives medians of the exported arcs' metrics, in brackets the mean paired difference from
the planner, the cases meeting every P1 goal, the P2 goals met, and the median time from the case to
the exported arc (final full-grid dose excluded).

    .venv/bin/python -m benchmarks.ablation_table --planner OPT.json --variant "networks only=AI.json:ai_networks" ...
                                                  [--cases 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from pipeline.goals import plan_verdict

#: Exported-arc metrics of the table, in order.
METRICS = ("HI", "D98_Gy", "bladder_Dmean_Gy", "bladder_D2_Gy", "rectum_Dmean_Gy", "rectum_D2_Gy")


def _rows(path: str | Path, method: str) -> dict[tuple[str, int], dict[str, Any]]:
    """(set, seed) -> the method's row of a ``bench_arc`` file."""
    rows = json.loads(Path(path).read_text())["rows"]
    found = {(r["set"], r["seed"]): r["methods"][method] for r in rows if method in r["methods"]}
    if not found:
        raise SystemExit(f"{path}: no row of method {method!r}")
    return found


def table(planner: dict[tuple[str, int], dict[str, Any]],
          variants: list[tuple[str, dict[tuple[str, int], dict[str, Any]]]], case_set: str,
          cases: int) -> tuple[list[int], list[list[str]]]:
    """The seeds used and one table row per variant (the planner first) for ``case_set``: the first
    ``cases`` seeds every variant and the planner planned."""
    seeds = sorted(s for (c, s) in planner if c == case_set and all((c, s) in v for _, v in variants))[:cases]
    out: list[list[str]] = []
    if not seeds:
        return seeds, out
    for label, rows in [("full planner (optimize)", planner), *variants]:
        cells = [label]
        for k in METRICS:
            digits = 3 if k == "HI" else 2
            vals = [rows[(case_set, s)]["exported"][k] for s in seeds]
            cell = f"{statistics.median(vals):.{digits}f}"
            if rows is not planner:
                diff = statistics.fmean(v - planner[(case_set, s)]["exported"][k] for v, s in zip(vals, seeds))
                cell += f" ({diff:+.{digits}f})"
            cells.append(cell)
        verdicts = [plan_verdict(rows[(case_set, s)]["goals"]) for s in seeds]
        cells += [f"{sum(v.p1_met for v in verdicts)}/{len(seeds)}",
                  f"{sum(v.p2_met for v in verdicts)}/{sum(v.p2_total for v in verdicts)}",
                  f"{statistics.median(rows[(case_set, s)]['to_exported_arc_s'] for s in seeds):.1f}"]
        out.append(cells)
    return seeds, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--planner", required=True, help="bench_arc rows with method optimize")
    ap.add_argument("--variant", action="append", required=True, metavar="LABEL=FILE:METHOD")
    ap.add_argument("--cases", type=int, default=20, help="cases per set (the first seeds all planned)")
    ap.add_argument("--sets", default="synth,heldout")
    args = ap.parse_args()
    variants = []
    for spec in args.variant:
        label, _, source = spec.partition("=")
        path, _, method = source.rpartition(":")
        if not (label and path and method):
            raise SystemExit(f"--variant {spec!r}: expected LABEL=FILE:METHOD")
        variants.append((label, _rows(path, method)))
    planner = _rows(args.planner, "optimize")
    head = ["variant", *METRICS, "all P1 met", "P2 met", "case -> exported arc s"]
    for case_set in args.sets.split(","):
        seeds, rows = table(planner, variants, case_set, args.cases)
        if not seeds:
            raise SystemExit(f"set {case_set}: no case planned by every variant and the planner")
        print(f"\n##### {case_set} set: {len(seeds)} cases (seeds {seeds[0]}-{seeds[-1]}), exported arcs, medians; "
              "in brackets the mean paired difference from the full planner\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
