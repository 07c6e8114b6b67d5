"""The project's plans against an open IMRT optimiser: pyRadPlan 0.5.0 (the Python port of matRad) plans
the benchmark cases of ``benchmarks/bench_arc.py`` and its DVH metrics are printed beside ours.

    .venv/bin/python -m benchmarks.bench_pyradplan [--sets synth,heldout] [--cases 10] [--json OUT.json]
        [--ours benchmarks/bench_arc_latest.json ...] [--venv /tmp/xcheck-venv] [--solver ipopt|scipy]
        [--profile NAME] [--dose-grid-mm 4] [--bixel-mm 5] [--max-iter 500] [--forward-cutoff-mm 150]
        [--threads 1] [--from-json OUT.json]

What is compared
    The cases are those of ``bench_arc`` (``synth`` seeds 2000+, ``heldout`` seeds 5000+), each written as
    DICOM and read back by the appliance's loader exactly as ``bench_arc.run_case`` does. pyRadPlan plans
    each case in its own virtual environment (``benchmarks/_plan_pyradplan.py``; the environment of
    ``benchmarks/crosscheck_dose.py``, created when missing, plus ``ipyopt`` for IPOPT and pydantic < 2.13,
    without which pyRadPlan 0.5.0 cannot compute a dose): 9 equispaced
    coplanar 6 MV beams (gantry 0, 40, ..., 320 degrees, couch 0), pyRadPlan's "Generic" machine, 5 mm
    bixels, its SVD pencil-beam dose influence matrix (SVDPB, its default cut-offs) on the project's own
    dose grid (same extent and 4 mm spacing as ``pipeline.problem.build_problem``, the same density: our CT
    resampled, our HU-to-density curve, air outside the body, then pyRadPlan's HU table inverted), the same
    isocenter (PTV centroid) and the same dose-grid masks (PTV >= 25 % voxel fraction, others >= 50 %).
    Its fluence is optimised by pyRadPlan's own optimiser (``nonlin_fluence`` problem; IPOPT, its default,
    when ``ipyopt`` installs, else SciPy L-BFGS-B) on matRad-style objectives derived from the goal list the
    way a planner would type the protocol into matRad (``_plan_pyradplan.objectives_from_goals``: PTV
    squared deviation to Rx; min/max DVH objectives for the Dx% / VxGy% goals at their limits; mean-dose
    minimisation for the Dmean goals; squared overdosing for Dmax goals; plus matRad's usual body
    squared-overdosing term at 44 % Rx, which is not a goal).

    pyRadPlan's dose per fraction is MU-normalised exactly as ours (PTV D95 = Rx on the CT grid,
    ``pipeline.goals.normalisation_factor`` on ``structure_dvh_inputs``), then both planners are measured by
    the same code on the same grid: ``pipeline.evaluation.evaluate_structures`` (dose interpolated to the CT
    voxels of each structure), ``bench_arc._row`` and ``pipeline.goals.evaluate_goals`` with the shipped goal
    list. Our figures are read, not recomputed, from ``--ours`` (``bench_arc``'s saved rows, the exported
    arc of each method, ``optimize`` and ``ai``).

Known differences of method (read the table with them)
    - Treatment technique: pyRadPlan's plan is a 9-beam IMRT *fluence* (ideal bixel weights, never
      sequenced into MLC segments, no leaf or MU limits, no deliverability loss); ours is a single-arc VMAT
      arc *after* sequencing and machine-parameter optimisation, i.e. a deliverable plan. An unsequenced
      fluence has an advantage here, 9 fixed beams a disadvantage in conformity against an arc.
    - Dose engines: each plan's dose is its own engine's. pyRadPlan's dose is evaluated as pyRadPlan
      computes it, not recomputed with our reference engine (that would need its bixel weights turned into
      our BEV fluence at 9 static gantry angles, which our arc engine does not model). Two tables: first
      the dose pyRadPlan optimised and reports, from its dose influence matrix (50 mm geometric lateral
      cut-off, 0.995 dosimetric cut-off, matRad's sampling of the low-dose tail: part of the far scatter is
      missing, which lowers its OAR mean doses); then the same bixel weights recomputed forward by pyRadPlan
      with a 150 mm cut-off, no dosimetric cut-off and no sampling (``--forward-cutoff-mm``, stored as
      ``forward``): the setting under which ``benchmarks/crosscheck_dose.py`` compares the two engines on
      phantoms, i.e. the like-for-like dose model (ours computes the full scatter). Read the claim off the
      second table; the first shows what a matRad user would see.
    - Optimisation: pyRadPlan optimises only the objectives above (no HI or CI term) with its generic
      weights; ours optimises its own objective and the goal list with its rescue rounds.
    - Both are normalised after optimisation to PTV D95 = Rx, so PTV D98 and the OAR doses are compared at
      equal PTV coverage.

Output: per set, a markdown table per case and the median (pyRadPlan / ours optimize / ours ai) of PTV D98,
PTV HI, bladder Dmean, rectum Dmean and "all P1 goals met", then the counts of cases where ours (each
method) has rectum Dmean <= pyRadPlan's, bladder Dmean <= pyRadPlan's and PTV D98 >= pyRadPlan's. With
``--json`` each finished case is appended at once and a rerun skips the cases already there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from appliance.config import Settings
from benchmarks.bench_arc import CASE_SETS, _row, case_spec, load_case, run_sets
from benchmarks.crosscheck_dose import DEFAULT_VENV, ensure_venv
from core.case import Case, Grid, Prescription, Role
from core.errors import AirtError, ConfigError, PlanningError
from pipeline.dose_engine import case_density
from pipeline.evaluation import evaluate_structures, structure_dvh_inputs
from pipeline.goals import GoalSpec, Normalisation, evaluate_goals, normalisation_factor, plan_verdict
from pipeline.problem import dose_grid_masks

WORKER = Path(__file__).resolve().parent / "_plan_pyradplan.py"
GANTRY_DEG = tuple(float(a) for a in range(0, 360, 40))
IPOPT_REQUIREMENT = "ipyopt"
#: Installed into pyRadPlan's environment on top of ``crosscheck_dose.PYRADPLAN_REQUIREMENTS``: pyRadPlan 0.5.0's
#: STF serialiser passes its ``SerializationInfo`` where pydantic-core now wants an index key, so
#: ``generate_stf`` -> dose calculation fails with pydantic 2.14 (2.12.5 works).
VENV_FIXES = ("pydantic<2.13",)
METHODS = ("optimize", "ai")


@dataclass(frozen=True)
class Protocol:
    """What a plan is made and judged against: goal list, prescription, normalisation, planning grid."""

    name: str
    goals: tuple[GoalSpec, ...]
    prescription: Prescription
    normalisation: str
    normalisation_volume_percent: float
    dose_grid_mm: float
    hu_curve: tuple[tuple[float, float], ...]


def protocol_from_settings(settings: Settings, profile: str | None = None) -> Protocol:
    """The protocol of a profile of the settings (default ``planning.profile``): goal list, Rx, normalisation;
    with the planning grid and HU curve of ``[planning]``."""
    p = settings.planning
    prof = settings.profile(profile or None)
    return Protocol(name=prof.name, goals=tuple(prof.goal_specs()), prescription=prof.to_prescription(),
                    normalisation=Normalisation(prof.normalisation).value,
                    normalisation_volume_percent=float(prof.normalisation_volume_percent),
                    dose_grid_mm=float(p.dose_grid_mm),
                    hu_curve=tuple((float(h), float(d)) for h, d in p.hu_to_density))


@dataclass(frozen=True)
class PlanningInput:
    """A case on the planning (dose) grid, as the project's planner sees it."""

    grid: Grid
    density: NDArray[np.float32]
    masks: dict[Role, NDArray[np.bool_]]
    iso_mm: tuple[float, float, float]


def planning_input(case: Case, spacing_mm: float, hu_curve: tuple[tuple[float, float], ...]) -> PlanningInput:
    """The dose grid, density and dose-grid masks of ``case`` as ``pipeline.problem.build_problem`` builds them
    (``ReferenceDoseEngine.for_case``), without building the engine."""
    grid, _, density, inside = case_density(case, spacing_mm, hu_curve)
    masks = dose_grid_masks(case, grid)
    if Role.BODY not in masks:
        masks[Role.BODY] = np.asarray(inside)
    return PlanningInput(grid=grid, density=density, masks=masks,
                         iso_mm=case.ptv_centroid_mm())


def load_bench_case(case_set: str, index: int, protocol: Protocol, settings: Settings) -> tuple[Case, str, int]:
    """Write case ``index`` of a set as DICOM and load it as ``bench_arc.run_case`` does; (case, CT label, seed)."""
    seed, ct, _ = case_spec(case_set, index)
    return load_case(case_set, index, protocol.prescription, settings.structures), ct.label(), seed


def prepare_venv(python: Path, solver: str) -> str:
    """Make pyRadPlan's environment plan (see :data:`VENV_FIXES`); the solver to use: IPOPT when ``ipyopt``
    imports there (installed when missing), else SciPy."""
    pydantic_ok = ("import importlib.metadata as m; "
                   "assert tuple(int(x) for x in m.version('pydantic').split('.')[:2]) < (2, 13)")

    def works(code: str) -> bool:
        return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0

    want_ipopt = solver == "ipopt" and not works("import ipyopt")
    if want_ipopt or not works(pydantic_ok):
        wanted = [*VENV_FIXES, *([IPOPT_REQUIREMENT] if want_ipopt else [])]
        print(f"installing {' '.join(wanted)} into {python.parent.parent}", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], capture_output=True)
        if not works(pydantic_ok):
            raise ConfigError(f"pyRadPlan's environment {python.parent.parent} needs {VENV_FIXES[0]} (pyRadPlan 0.5.0 "
                              "fails to serialise its beams with pydantic 2.14); pip could not install it")
    if solver == "ipopt" and not works("import ipyopt"):
        print("ipyopt is not available; pyRadPlan plans with its SciPy L-BFGS-B solver", file=sys.stderr)
        return "scipy"
    return solver


def run_pyradplan(python: Path, inp: PlanningInput, protocol: Protocol, config: dict[str, Any], work: Path,
                  tag: str, threads: int) -> tuple[NDArray[np.float64], dict[str, Any], dict[str, NDArray]]:
    """pyRadPlan's plan of one case: dose per fraction on ``inp.grid`` (its units), run facts, extra doses."""
    src, out, log = work / f"{tag}_in.npz", work / f"{tag}_out.npz", work / f"{tag}.log"
    rx = protocol.prescription
    cfg = {**config, "rx_fx_gy": rx.dose_gy / rx.fractions, "fractions": rx.fractions,
           "goals": [{"structure": g.structure, "metric": g.metric, "comparison": g.comparison, "limit": g.limit,
                      "priority": g.priority} for g in protocol.goals]}
    g = inp.grid
    arrays: dict[str, Any] = {f"mask_{role.value}": m.astype(np.uint8) for role, m in inp.masks.items()}
    arrays.update(density=inp.density, origin_mm=np.asarray(g.origin_mm), spacing_mm=np.asarray(g.spacing_mm),
                  iso_mm=np.asarray(inp.iso_mm), config=np.asarray(json.dumps(cfg)))
    np.savez_compressed(src, **arrays)
    env = {**os.environ, "TQDM_DISABLE": "1", **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                      "NUMBA_NUM_THREADS")}}
    t = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run([str(python), str(WORKER), str(src), str(out)], stdout=fh, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode != 0:
        raise AirtError(f"pyRadPlan failed on {tag} (exit {done.returncode}); its log {log} ends:\n"
                        f"{log.read_text()[-3000:]}")
    res = np.load(out)
    info = json.loads(str(res["info"]))
    info["wall_s"] = time.perf_counter() - t
    extra = {k: np.asarray(res[k], dtype=np.float64) for k in ("dose_forward",) if k in res.files}
    return np.asarray(res["dose"], dtype=np.float64), info, extra


def measure(dose_fx: NDArray[np.float64], grid: Grid, case: Case, protocol: Protocol) -> dict[str, Any]:
    """Normalise a dose per fraction as the planner does (CT grid) and measure it as ``bench_arc`` does."""
    rx = protocol.prescription
    ptv = structure_dvh_inputs(dose_fx, grid, case, Role.PTV)
    if ptv is None:
        raise PlanningError("the PTV holds no CT voxel")
    factor = normalisation_factor(ptv[0], ptv[1], rx_gy=rx.dose_gy / rx.fractions, mode=protocol.normalisation,
                                  volume_percent=protocol.normalisation_volume_percent)
    total = dose_fx * factor * rx.fractions
    goals = evaluate_goals(protocol.goals, total, grid, case)
    return {
        "exported": _row(evaluate_structures(total, grid, case)),
        "goals": [{k: g[k] for k in ("structure", "metric", "comparison", "limit", "priority", "value", "passed")}
                  for g in goals],
        "p1_met": plan_verdict(goals).p1_met,
        "factor": float(factor),
    }


def run_case(case_set: str, index: int, python: Path, protocol: Protocol, settings: Settings,
             config: dict[str, Any], work: Path, threads: int) -> dict[str, Any]:
    """Build one case, plan it with pyRadPlan and measure the plan."""
    t0 = time.perf_counter()
    case, ct_label, seed = load_bench_case(case_set, index, protocol, settings)
    inp = planning_input(case, protocol.dose_grid_mm, protocol.hu_curve)
    t_case = time.perf_counter() - t0
    dose_fx, info, extra = run_pyradplan(python, inp, protocol, config, work, f"{case_set}_{seed}", threads)
    row: dict[str, Any] = {"set": case_set, "seed": seed, "ct": ct_label, "protocol": protocol.name,
                           "grid": {"shape": list(inp.grid.shape), "spacing_mm": list(inp.grid.spacing_mm)},
                           "config": config, "pyradplan": measure(dose_fx, inp.grid, case, protocol)}
    if "dose_forward" in extra:
        row["forward"] = measure(extra["dose_forward"], inp.grid, case, protocol)
    row["info"] = info
    row["case_s"] = t_case
    row["wall_s"] = time.perf_counter() - t0
    p = row["pyradplan"]["exported"]
    print(f"  {case_set} seed {seed} ({ct_label}): pyRadPlan D98 {p['D98_Gy']:.2f} HI {p['HI']:.3f} bladder "
          f"{p['bladder_Dmean_Gy']:.2f} rectum {p['rectum_Dmean_Gy']:.2f} Gy, P1 "
          f"{'met' if row['pyradplan']['p1_met'] else 'FAILED'}; {row['wall_s']:.0f} s "
          f"(case {t_case:.0f}, dij {info['seconds'].get('dij', 0):.0f}, optimisation "
          f"{info['seconds'].get('optimise', 0):.0f} s, {info.get('iterations')} it.)", flush=True)
    return row


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------


#: What rows of ``--ours`` saved before protocol profiles existed were planned with.
PRE_PROFILE_RX = (40.0, 5)


def ours_by_case(paths: list[Path], protocol: Protocol) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    """Our exported-arc rows of the protocol's profile by (set, seed) and method, with ``p1_met`` from their goals
    (as ``--ours`` recorded them) and ``same_goals``: whether those goals are the protocol's goal list. A row
    without a profile (saved before profiles) counts when the protocol prescribes 40 Gy in 5 fractions. The
    files' methods are merged per case (e.g. the gate's AI and planner files); a later file's method wins."""
    rx = protocol.prescription
    mine = {(g.structure, g.metric, g.comparison, float(g.limit), g.priority) for g in protocol.goals}
    out: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    source: dict[tuple[str, int, str], Path] = {}  # (set, seed, method) -> the file its row came from
    replaced: dict[tuple[str, Path, Path], int] = {}  # (method, earlier file, later file) -> cases
    for path in paths:
        for r in json.loads(path.read_text())["rows"]:
            if r.get("profile", protocol.name if (rx.dose_gy, rx.fractions) == PRE_PROFILE_RX else None) != protocol.name:
                continue
            key = (r["set"], int(r["seed"]))
            for m, v in r["methods"].items():
                if (earlier := source.get((*key, m))) is not None and earlier != path:
                    replaced[(m, earlier, path)] = replaced.get((m, earlier, path), 0) + 1
                source[(*key, m)] = path
                out.setdefault(key, {})[m] = {
                    "exported": v["exported"], "p1_met": plan_verdict(v["goals"]).p1_met if v.get("goals") else None,
                    "same_goals": {(g["structure"], g["metric"], g["comparison"], float(g["limit"]), g["priority"])
                                   for g in v.get("goals", [])} == mine}
    for (m, earlier, later), n in sorted(replaced.items()):
        print(f"--ours: the {m} rows of {later.name} replace those of {earlier.name} on {n} case(s) (a later file's "
              "method wins)")
    return out


def _med(values: list[float]) -> float:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return statistics.median(v) if v else float("nan")


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _p1(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


COLUMNS = (("PTV D98 Gy", "D98_Gy", 2), ("PTV HI", "HI", 3), ("bladder Dmean Gy", "bladder_Dmean_Gy", 2),
           ("rectum Dmean Gy", "rectum_Dmean_Gy", 2))


def print_tables(rows: list[dict[str, Any]], ours: dict[tuple[str, int], dict[str, dict[str, Any]]],
                 key: str = "pyradplan") -> None:
    """Per set: per case and median, pyRadPlan / ours optimize / ours ai; then the counts."""
    label = "pyRadPlan" if key == "pyradplan" else "pyRadPlan (forward, wide cut-off)"
    for case_set in CASE_SETS:
        sub = [r for r in rows if r["set"] == case_set and key in r]
        if not sub:
            continue
        print(f"\n### {case_set} set: {len(sub)} cases, {label} / ours optimize / ours ai (exported arc)\n")
        print("| case | " + " | ".join(c[0] for c in COLUMNS) + " | all P1 met | pyRadPlan s |")
        print("|---|" + "---|" * (len(COLUMNS) + 2))
        per: dict[str, list[list[float | None]]] = {c[1]: [[], [], []] for c in COLUMNS}
        p1s: list[list[bool | None]] = [[], [], []]
        for r in sub:
            mine = ours.get((case_set, int(r["seed"])), {})
            cells = []
            for _, k, digits in COLUMNS:
                vals = [r[key]["exported"].get(k)] + [mine[m]["exported"].get(k) if m in mine else None
                                                      for m in METHODS]
                for i, v in enumerate(vals):
                    per[k][i].append(v)
                cells.append(" / ".join(_fmt(v, digits) for v in vals))
            p1 = [r[key]["p1_met"]] + [mine[m]["p1_met"] if m in mine else None for m in METHODS]
            for i, v in enumerate(p1):
                p1s[i].append(v)
            print(f"| {r['seed']} ({r['ct']}) | " + " | ".join(cells) + " | " + " / ".join(_p1(v) for v in p1)
                  + f" | {r.get('wall_s', float('nan')):.0f} |")
        med = " | ".join(" / ".join(_fmt(_med([v for v in per[k][i] if v is not None]), d) for i in range(3))
                         for _, k, d in COLUMNS)
        p1_counts = " / ".join(f"{sum(bool(v) for v in p1s[i])}/{sum(v is not None for v in p1s[i])}"
                               for i in range(3))
        print(f"| **median** | {med} | {p1_counts} | {_med([r.get('wall_s', float('nan')) for r in sub]):.0f} |")
        print("\n| ours | rectum Dmean <= pyRadPlan's | bladder Dmean <= pyRadPlan's | PTV D98 >= pyRadPlan's |")
        print("|---|---|---|---|")
        for j, m in enumerate(METHODS, start=1):
            pairs = {k: [(float(a), float(b)) for a, b in zip(per[k][0], per[k][j]) if a is not None and b is not None]
                     for _, k, _ in COLUMNS}
            le = {k: sum(b <= a for a, b in pairs[k]) for k in ("rectum_Dmean_Gy", "bladder_Dmean_Gy")}
            ge = sum(b >= a for a, b in pairs["D98_Gy"])
            print(f"| {m} | {le['rectum_Dmean_Gy']}/{len(pairs['rectum_Dmean_Gy'])} | "
                  f"{le['bladder_Dmean_Gy']}/{len(pairs['bladder_Dmean_Gy'])} | {ge}/{len(pairs['D98_Gy'])} |")


def print_run_facts(rows: list[dict[str, Any]]) -> None:
    """How pyRadPlan ran: solver, iterations, bixels, timings, versions."""
    if not rows:
        return
    info = rows[-1]["info"]
    print(f"\npyRadPlan {info['versions'].get('pyRadPlan')} (numpy {info['versions'].get('numpy')}, scipy "
          f"{info['versions'].get('scipy')}, ipyopt {info['versions'].get('ipyopt')}); objectives of the last "
          f"case: {json.dumps(info['objectives'])}; goals not translated: {info['goals_not_translated']}")
    print("\n| case | solver | iterations | bixels | dij entries M | dij s | optimisation s | case -> result s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        i = r["info"]
        print(f"| {r['set']} {r['seed']} | {i['solver']} | {i.get('iterations')} | {sum(i['bixels_per_beam'])} | "
              f"{i['dij_nnz'] / 1e6:.0f} | {i['seconds'].get('dij', 0):.0f} | {i['seconds'].get('optimise', 0):.0f} | "
              f"{r.get('wall_s', float('nan')):.0f} |")


def report(rows: list[dict[str, Any]], ours: dict[tuple[str, int], dict[str, dict[str, Any]]],
           protocol: Protocol) -> None:
    """Every table of a run."""
    rx = protocol.prescription
    print(f"\n## pyRadPlan (9-beam IMRT fluence) vs ours (single-arc VMAT, exported), profile {protocol.name} "
          f"(Rx {rx.dose_gy:g} Gy in {rx.fractions}, normalised to PTV D{protocol.normalisation_volume_percent:g} = "
          "Rx; cells: pyRadPlan / ours optimize / ours ai)")
    print_tables(rows, ours)
    if any("forward" in r for r in rows):
        print_tables(rows, ours, key="forward")
    judged = [v["same_goals"] for r in rows for v in ours.get((r["set"], int(r["seed"])), {}).values()]
    if judged and not all(judged):
        print(f"\nNote: ours' 'all P1 met' is as --ours recorded it, judged on a goal list other than profile "
              f"{protocol.name}'s ({len(judged) - sum(judged)} of {len(judged)} plans); pyRadPlan's is judged on "
              "the profile's. Rerun bench_arc with this profile for a like-for-like P1 column.")
    print_run_facts(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="synth,heldout", help="case sets, comma-separated (synth, heldout)")
    ap.add_argument("--cases", type=int, default=10, help="cases per set (default 10)")
    ap.add_argument("--ours", type=Path, nargs="+", default=[Path(__file__).resolve().parent / "bench_arc_latest.json"],
                    help="bench_arc's saved rows (our plans; several files: their methods merged per case)")
    ap.add_argument("--json", default="", help="append each case's measurements to this JSON file (resumable)")
    ap.add_argument("--from-json", default="", help="print the tables of a saved run instead of planning")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="pyRadPlan virtual environment (created)")
    ap.add_argument("--solver", choices=("ipopt", "scipy"), default="ipopt",
                    help="pyRadPlan's solver (ipopt falls back to scipy when ipyopt cannot be installed)")
    ap.add_argument("--dose-grid-mm", type=float, default=0.0, help="planning grid (default: the settings', 4 mm)")
    ap.add_argument("--bixel-mm", type=float, default=5.0)
    ap.add_argument("--max-iter", type=int, default=500, help="solver iterations at most (pyRadPlan's default)")
    ap.add_argument("--body-max-rel", type=float, default=30.0 / 68.0,
                    help="body squared-overdosing level, fraction of Rx (matRad's prostate example; 0: none)")
    ap.add_argument("--forward-cutoff-mm", type=float, default=150.0,
                    help="also recompute the final dose forward with this lateral cut-off, no dosimetric cut-off "
                         "and no dij sampling (the cross-check's setting; 0: no)")
    ap.add_argument("--profile", default="", help="protocol profile (default: planning.profile)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="folder for the exchanged .npz files and logs")
    args = ap.parse_args()
    settings = Settings()
    protocol = protocol_from_settings(settings, args.profile or None)
    ours = ours_by_case([p for p in args.ours if p.exists()], protocol)
    if args.from_json:
        saved = [r for r in json.loads(Path(args.from_json).read_text())["rows"] if r.get("protocol") == protocol.name]
        report(saved, ours, protocol)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    if args.dose_grid_mm > 0:
        protocol = replace(protocol, dose_grid_mm=args.dose_grid_mm)
    python = ensure_venv(args.venv)
    config = {"gantry_deg": list(GANTRY_DEG), "bixel_mm": args.bixel_mm, "max_iter": args.max_iter,
              "solver": prepare_venv(python, args.solver), "body_max_rel": args.body_max_rel,
              "forward_cutoff_mm": args.forward_cutoff_mm}
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_pyradplan_"))
    work.mkdir(parents=True, exist_ok=True)
    path = Path(args.json) if args.json else None
    rows = run_sets(args.sets, args.cases, path,
                    done=lambda r, case_set, seed: (r["set"] == case_set and r["seed"] == seed
                                                    and r.get("protocol") == protocol.name),
                    plan=lambda case_set, index: run_case(case_set, index, python, protocol, settings, config, work,
                                                          args.threads))
    report([r for r in rows if r.get("protocol") == protocol.name], ours, protocol)
    print(f"\nExchanged files and pyRadPlan logs in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
