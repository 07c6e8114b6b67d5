"""The AI model's quality gate for ``planning.method = auto``: both case sets, against the full planner.

``auto`` plans with the AI method only when the installed model's ``model.json`` records a passed
gate (:func:`pipeline.ai_model.model_is_qualified`). This gate is computed from the per-case rows of
``benchmarks.bench_arc``, which plans every case with the appliance's planning core twice: the AI
method (the networks' fluence, the refinement, the arc stage, the rescue) and the full planner
(``optimize``: the goal-driven fluence optimisation, the sequencer, the same machine-parameter
optimisation and rescue). Both sets are required, each with at least ``--cases`` paired cases
(default 20):

- ``synth``: ``airt synth`` seeds from 2000 (none in the training data) on the default CT;
- ``heldout``: seeds from 5000 whose anatomy lies outside the training ranges, on CT geometries no
  training or tuning used (see ``benchmarks.bench_arc``).

Criteria, per set, on the exported arcs (the reference engine's dose of the arc written to the RT
Plan, MU-normalised as the appliance does, metrics on the CT grid):

- non-inferiority with the AIRT paper's margins: for PTV HI (0.01) and the bladder and rectum Dmean
  and D2 (1.5 Gy each) the one-sided 95 % upper confidence bound of the mean paired difference
  AI - planner stays below the margin;
- P1: the AI plans meet every priority-1 goal of the profile on at least as many cases as the
  planner's;
- PTV D98 >= 97 % of Rx on at least as many cases as the planner's.

The gate passes when every criterion holds on both sets. A gate holds for the protocol profile its
rows were planned with. ``--record-gate`` writes it into the model's ``model.json``
(``meta.quality_gates.<profile>``; ``meta.qualified_for_auto`` when any profile's passed) with the
model's weights id, the planner settings the rows were made with and the files they came from; ``auto``
then plans that profile's studies with the AI method. Rows made with another
model (their recorded weights id) are refused.

    .venv/bin/python -m benchmarks.gate_ai --ai AI.json --optimize OPTIMIZE.json [--cases 20]
                                           [--model DIR] [--record-gate]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from pipeline.ai_model import GATE_CASE_SETS, MIN_GATE_CASES, installed_model_dir, model_weights_id
from pipeline.goals import plan_verdict

#: Non-inferiority margins of the AIRT paper: metric -> margin (AI - planner must stay below it).
MARGINS: dict[str, float] = {"HI": 0.01, "bladder_Dmean_Gy": 1.5, "bladder_D2_Gy": 1.5, "rectum_Dmean_Gy": 1.5,
                             "rectum_D2_Gy": 1.5}
#: PTV D98 of an acceptable plan, fraction of Rx.
D98_MIN_REL = 0.97


def paired_bound(diffs: Sequence[float], margin: float) -> dict[str, Any]:
    """Mean paired difference, its one-sided 95 % upper confidence bound (Student t), the cases within
    ``margin`` and the verdict (bound < margin); non-finite differences are left out."""
    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    mean = float(d.mean()) if d.size else float("nan")
    upper = (mean + float(stats.t.ppf(0.95, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
             if d.size >= 2 else float("nan"))
    return {"margin": margin, "mean_diff": mean, "upper95": upper, "cases_within_margin": int((d <= margin).sum()),
            "n": int(d.size), "non_inferior": bool(np.isfinite(upper) and upper < margin)}


def p1_met(method_row: dict[str, Any]) -> bool:
    """Whether a plan met every priority-1 goal, as its verdict says (a goal that could not be evaluated
    is not a failure)."""
    return plan_verdict(method_row["goals"]).p1_met


def _paired(ai_rows: list[dict[str, Any]], opt_rows: list[dict[str, Any]], case_set: str,
            method: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    opt = {r["seed"]: r for r in opt_rows if r["set"] == case_set and "optimize" in r["methods"]}
    return [(r, opt[r["seed"]]) for r in sorted(ai_rows, key=lambda r: r["seed"])
            if r["set"] == case_set and method in r["methods"] and r["seed"] in opt]


def set_verdict(pairs: list[tuple[dict[str, Any], dict[str, Any]]], min_cases: int,
                method: str = "ai") -> dict[str, Any]:
    """The criteria of one case set from its (AI row, planner row) pairs (the AI row's ``method``)."""
    ai = [a["methods"][method] for a, _ in pairs]
    opt = [o["methods"]["optimize"] for _, o in pairs]
    criteria = [{"metric": metric, **paired_bound([x["exported"][metric] - y["exported"][metric]
                                                   for x, y in zip(ai, opt, strict=True)], margin)}
                for metric, margin in MARGINS.items()]
    rx = [a.get("rx_gy", 40.0) for a, _ in pairs]
    p1 = {"ai": sum(map(p1_met, ai)), "optimize": sum(map(p1_met, opt))}
    d98 = {"ai": sum(x["exported"]["D98_Gy"] >= D98_MIN_REL * r for x, r in zip(ai, rx, strict=True)),
           "optimize": sum(y["exported"]["D98_Gy"] >= D98_MIN_REL * r for y, r in zip(opt, rx, strict=True))}
    criteria.append({"metric": "all P1 goals met (cases)", "ai": p1["ai"], "planner": p1["optimize"],
                     "non_inferior": p1["ai"] >= p1["optimize"]})
    criteria.append({"metric": f"PTV D98 >= {100 * D98_MIN_REL:.0f} % Rx (cases)", "ai": d98["ai"],
                     "planner": d98["optimize"], "non_inferior": d98["ai"] >= d98["optimize"]})
    enough = len(pairs) >= min_cases
    return {"cases": len(pairs), "seeds": [a["seed"] for a, _ in pairs], "enough_cases": enough,
            "criteria": criteria, "passed": enough and all(c["non_inferior"] for c in criteria),
            "median_to_exported_arc_s": {
                "ai": _median([x["to_exported_arc_s"] for x in ai]),
                "optimize": _median([y["to_exported_arc_s"] for y in opt])}}


def _median(values: list[float]) -> float:
    v = [x for x in values if np.isfinite(x)]
    return round(statistics.median(v), 3) if v else float("nan")


def _one(values: set[Any], what: str) -> Any:
    if len(values) != 1:
        raise SystemExit(f"the rows disagree on {what}: {sorted(map(str, values))}; gate rows of one planner only")
    return next(iter(values))


def quality_gate(ai_rows: list[dict[str, Any]], opt_rows: list[dict[str, Any]], *, weights_id: str,
                 min_cases: int = MIN_GATE_CASES, sets: Sequence[str] = GATE_CASE_SETS,
                 method: str = "ai") -> dict[str, Any]:
    """The gate of the model with weights id ``weights_id`` from ``benchmarks.bench_arc`` rows of the AI
    method (``ai_rows``; their ``method``: ``ai``, or ``ai_networks`` for the networks alone) and of the
    planner (``opt_rows``): per-set criteria, the overall verdict and the planner settings the rows
    record.

    Raises
    ------
    SystemExit
        AI rows made with another model, or rows of different profiles or planner settings.
    """
    ai_used = [r["methods"][method] for r in ai_rows if method in r["methods"]]
    opt_used = [r["methods"]["optimize"] for r in opt_rows if "optimize" in r["methods"]]
    used = ai_used + opt_used
    ids = {m.get("planner", {}).get("model_weights_id") for m in used} - {None}
    if ids and ids != {weights_id}:
        raise SystemExit(f"the AI rows were planned with model(s) {sorted(ids)}, not the model gated ({weights_id})")
    profile = _one({r.get("profile") for r in ai_rows + opt_rows}, "the profile")
    recorded = [m["planner"] for m in used if "planner" in m]
    settings = {"rescue_rounds": _one({p["rescue_rounds"] for p in recorded}, "rescue_rounds")} if recorded else {}
    # the arc evaluations and dose beams the AI method was gated with (what ``auto`` compares with its
    # configuration); the full planner may run more evaluations (planning.optimizer_arc_iterations) with finer
    # beams (planning.optimizer_arc_sectors_per_beam), recorded beside; with the rounds each ran in (rows made
    # before the arc stage had rounds ran one)
    for key, rounds_key, beams_key, rows_of in (
            ("arc_iterations", "arc_rounds", "sectors_per_beam", ai_used),
            ("planner_arc_iterations", "planner_arc_rounds", "planner_sectors_per_beam", opt_used)):
        planners = [m["planner"] for m in rows_of if "planner" in m]
        if planners:
            settings[key] = _one({p["arc_iterations"] for p in planners}, key)
            settings[rounds_key] = _one({p.get("arc_rounds", 1) for p in planners}, rounds_key)
            settings[beams_key] = _one({p["sectors_per_beam"] for p in planners}, beams_key)
    # The planner's rows do not refine: only the AI rows must agree. AI rows made before rows recorded their
    # planner take the configured count the planner's rows record (every bench_arc row records the appliance's
    # ai_refine_iterations); their arc evaluations are not inferred from those rows, which may come from a
    # later planner: ``with_run_planner`` supplies them from the AI rows' own run.
    refine = {m["planner"]["ai_refine_iterations"] for m in ai_used if "planner" in m}
    if not refine and method == "ai":
        refine = {m["planner"]["ai_refine_iterations"] for m in opt_used if "planner" in m}
    if refine:
        settings["ai_refine_iterations"] = _one(refine, "ai_refine_iterations")
    elif recorded:
        raise SystemExit("no row records the AI method's refinement evaluations; plan the AI rows again")
    per_set = {s: set_verdict(_paired(ai_rows, opt_rows, s, method), min_cases, method) for s in sets}
    return {"format": 2, "method": method, "profile": profile, "min_cases": min_cases, "model_weights_id": weights_id,
            "against": "the full planner (method optimize: goal-driven fluence optimisation, sequencing, "
                       "machine-parameter optimisation, rescue) of the same planning core",
            "case_sets": per_set, **settings,
            "rows_without_planner_record": sum("planner" not in m for m in used),
            "passed": all(v["passed"] for v in per_set.values())}


def print_gate(gate: dict[str, Any]) -> None:
    """The gate as the tables of ``benchmarks/RESULTS.md``."""
    what = "AI method" if gate.get("method", "ai") == "ai" else "the networks alone (AI method without refinement)"
    print(f"\n### AI quality gate, profile {gate['profile']}: {what} against the full planner (exported arcs)\n")
    for name, v in gate["case_sets"].items():
        print(f"#### {name} set: {v['cases']} paired cases (at least {gate['min_cases']} needed)\n")
        print("| criterion | margin | mean AI - planner | one-sided 95 % upper bound | cases within margin | verdict |")
        print("|---|---|---|---|---|---|")
        for c in v["criteria"]:
            verdict = "non-inferior" if c["non_inferior"] else "NOT shown"
            if "margin" in c:
                print(f"| {c['metric']} | {c['margin']:g} | {c['mean_diff']:+.3f} | {c['upper95']:+.3f} | "
                      f"{c['cases_within_margin']}/{c['n']} | {verdict} |")
            else:
                print(f"| {c['metric']} | AI not fewer | AI {c['ai']}/{v['cases']}, planner {c['planner']}/{v['cases']} "
                      f"| | | {verdict} |")
        t = v["median_to_exported_arc_s"]
        print(f"\n{name}: {'passed' if v['passed'] else 'NOT passed'}; case -> exported arc (final dose excluded), "
              f"median: AI {t['ai']:.1f} s, planner {t['optimize']:.1f} s\n")
    print(f"Gate: {'passed' if gate['passed'] else 'NOT passed'} (model {gate['model_weights_id'][:12]})")


def with_run_planner(ai_rows: list[dict[str, Any]], run_rows: list[dict[str, Any]],
                     method: str) -> list[dict[str, Any]]:
    """The AI rows, each without a planner record taking the planner record of the ``bench_arc`` run that planned
    them (``run_rows``: rows of that run, or of its resumptions, with the other method; rows made before rows
    recorded their planner, when the run's refinement and arc settings were one for both methods). The run's
    recorded planner settings must be one; a run with none or several is refused."""
    keep = ("ai_refine_iterations", "arc_iterations", "arc_rounds", "sectors_per_beam", "rescue_rounds")
    records = {tuple((k, m["planner"][k]) for k in keep if k in m["planner"])
               for r in run_rows for m in r["methods"].values() if "planner" in m}
    if len(records) != 1:
        raise SystemExit(f"the run's rows record {len(records)} planner settings, not one: "
                         f"{sorted(map(dict, records), key=str)}")
    planner = {**dict(next(iter(records))), "source": "ai"}
    return [row if method not in row["methods"] or "planner" in row["methods"][method]
            else {**row, "methods": {**row["methods"], method: {**row["methods"][method], "planner": dict(planner)}}}
            for row in ai_rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ai", required=True, help="bench_arc JSON with the AI method's rows")
    ap.add_argument("--optimize", required=True, help="bench_arc JSON with the planner's (optimize) rows")
    ap.add_argument("--cases", type=int, default=MIN_GATE_CASES, help="paired cases needed per set")
    ap.add_argument("--ai-method", default="ai", choices=["ai", "ai_networks"],
                    help="the AI rows' method: ai (as the appliance plans) or ai_networks (the networks alone, "
                         "reported only: a gate of it cannot be recorded)")
    ap.add_argument("--model", default="", help="model folder the AI rows were planned with (default: the shipped one)")
    ap.add_argument("--ai-run-planner", default="", metavar="RUN.json",
                    help="bench_arc JSON of the run that planned the AI rows: its planner records stand for AI rows "
                         "made before rows recorded their own (see with_run_planner)")
    ap.add_argument("--record-gate", action="store_true", help="write the gate into the model's model.json")
    args = ap.parse_args()
    folder = installed_model_dir(args.model)
    if folder is None:
        raise SystemExit(f"no model.json in {args.model or 'the shipped model folder'}")
    ai_rows = json.loads(Path(args.ai).read_text())["rows"]
    opt_rows = json.loads(Path(args.optimize).read_text())["rows"]
    if args.ai_run_planner:
        ai_rows = with_run_planner(ai_rows, json.loads(Path(args.ai_run_planner).read_text())["rows"], args.ai_method)
    gate = quality_gate(ai_rows, opt_rows, weights_id=model_weights_id(folder), min_cases=args.cases,
                        method=args.ai_method)
    run = f" --ai-run-planner {args.ai_run_planner}" if args.ai_run_planner else ""
    gate["measured_by"] = (f"python -m benchmarks.gate_ai --ai {args.ai} --optimize {args.optimize}{run} "
                           f"(rows of python -m benchmarks.bench_arc; see benchmarks/RESULTS.md)")
    gate["files"] = {"ai": Path(args.ai).name, "optimize": Path(args.optimize).name,
                     **({"ai_run_planner": Path(args.ai_run_planner).name} if args.ai_run_planner else {})}
    print_gate(gate)
    if args.record_gate:
        from pipeline.model_io import update_model_meta

        if args.ai_method != "ai":
            raise SystemExit("only the AI method as the appliance plans it (--ai-method ai) can be recorded as a gate")
        meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))["meta"]
        gates = {**(meta.get("quality_gates") or {}), gate["profile"]: gate}
        path = update_model_meta(folder, {"quality_gates": gates,
                                          "qualified_for_auto": any(g["passed"] for g in gates.values())},
                                 remove=("quality_gate",))
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
