"""From the last C-STORE to the RT Dose at the TPS: the node as shipped, stage by stage.

``python -m benchmarks.bench_latency [--studies 6] [--slices 120] [--plan-runs 5] [--compare-env KEY=VALUE]
[--plan-only]``

1. One node (``airt serve``) runs the reference configuration ``config/airt.toml`` with only the data
   folder and the ports changed (stable age left at its default: the node starts a job when the study
   is complete). dcmtk ``storescp`` is its destination (the reference file's ``TPS``), and dcmtk
   ``storescu`` pushes ``--studies`` synthetic studies (``--slices`` slices of 512 x 512 + RT
   Structure Set, distinct seeds) one after the other, each once the previous one's RT Dose has arrived.
   For each study: the time from the last C-STORE answered to the RT Dose written by the receiver, and
   where it went, from the job's row: detection (last C-STORE -> job created), queue (created ->
   claimed), inputs (job folder), the planning process up to the plan being deliverable (its stages:
   load, engine set-up, planning, arc optimisation, final dose, export, evaluation), and sending
   (deliverable -> RT Dose at the receiver). The first study after start-up is reported apart from the
   later ones (medians).
2. ``--plan-runs`` times ``airt plan --method ai`` on the first study as a whole process (Python start,
   imports, load, plan, report), with the in-process planning time it records; medians. With
   ``--compare-env KEY=VALUE`` the runs alternate between the environment as it is and one with
   ``KEY=VALUE`` added, and both are printed side by side (``--plan-only``: skip the node, step 1).

Prints markdown tables. Needs dcmtk (storescu, storescp).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.scu import free_port
from benchmarks.bench_node import start_node, start_receiver

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "config" / "airt.toml"
PLAN_STAGES = ("load", "setup", "ai_load", "ai_preprocess", "ai_inference", "ai_refine", "sequence", "arc_optimize",
               "final_dose", "export", "evaluate")


def shipped_config(path: Path, *, data: Path, port: int, receiver_port: int) -> None:
    """The reference configuration with the data folder, the node's port, the destination's port and the
    HTTP port (any free one) changed; nothing else."""
    section = ""
    out = []
    for line in REFERENCE.read_text().splitlines():
        header = re.match(r"^\[\[?([^\]]+)\]\]?\s*$", line)
        if header:
            section = header.group(1)
        elif section == "node" and line.startswith("port ="):
            line = f"port = {port}"
        elif section == "destinations" and line.startswith("port ="):
            line = f"port = {receiver_port}"
        elif section == "http" and line.startswith("port ="):
            line = "port = 0"
        elif section == "storage" and line.startswith("data_dir ="):
            line = f'data_dir = "{data}"'
        out.append(line)
    path.write_text("\n".join(out) + "\n")


def _utc(text: str) -> dt.datetime:
    """A timestamp column as SQLite stores it (UTC, naive or with an offset)."""
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _job_row(db: Path, study_uid: str) -> dict[str, Any]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    row = con.execute("SELECT id, created_at, started_at, finished_at, timings FROM jobs WHERE study_uid = ? "
                      "ORDER BY id DESC LIMIT 1", (study_uid,)).fetchone()
    con.close()
    if row is None:
        raise RuntimeError(f"no job for study {study_uid}")
    return dict(row)


def push_and_wait(case: Path, study_uid: str, *, port: int, received: Path, db: Path,
                  node: subprocess.Popen[bytes]) -> dict[str, float]:
    """Push one study, wait for its RT Dose at the receiver; the stages of its latency, s."""
    before = {p.name for p in received.iterdir()}
    push = subprocess.run(["storescu", "-aet", "TPS", "-aec", "AIRT", "+sd", "-nh", "127.0.0.1", str(port), str(case)],
                          capture_output=True, timeout=600)
    if push.returncode != 0:
        raise RuntimeError(f"storescu failed: {push.stderr.decode(errors='replace')[-2000:]}")
    t_pushed, wall_pushed = time.perf_counter(), dt.datetime.now(dt.UTC)
    while not any(p.name.startswith("RD") and p.name not in before for p in received.iterdir()):
        if time.perf_counter() - t_pushed > 1800 or node.poll() is not None:
            raise RuntimeError("no RT Dose at the receiver; see the node log")
        time.sleep(0.02)
    total = time.perf_counter() - t_pushed
    row = _job_row(db, study_uid)
    timings = json.loads(row["timings"])
    stages = timings.get("plan_stages_s", {})
    created, started, finished = (_utc(row[k]) for k in ("created_at", "started_at", "finished_at"))
    out = {"total": total,
           "detection": (created - wall_pushed).total_seconds(),
           "queue": (started - created).total_seconds(),
           "inputs": float(timings["inputs_s"]),
           "plan_process": float(timings["plan_process_s"]),
           "send": total - (finished - wall_pushed).total_seconds()}
    for k in PLAN_STAGES:
        out[k] = float(stages.get(k, 0.0))
    out["process_other"] = out["plan_process"] - sum(out[k] for k in PLAN_STAGES)
    return out


def node_runs(root: Path, cases: list[tuple[Path, str]]) -> list[dict[str, float]]:
    """All studies through one node started once; a row per study, in order."""
    port, rport = free_port(), free_port()
    received = root / "received"
    received.mkdir()
    cfg = root / "airt.toml"
    shipped_config(cfg, data=root / "data", port=port, receiver_port=rport)
    rows = []
    receiver = start_receiver(received, rport, "TPS")  # the reference file's destination
    try:
        node = start_node(cfg, port, root / "node.log")
        try:
            for k, (case, study_uid) in enumerate(cases):
                rows.append(push_and_wait(case, study_uid, port=port, received=received,
                                          db=root / "data" / "airt.sqlite3", node=node))
                print(f"study {k}: {rows[-1]['total']:.1f} s (planning process {rows[-1]['plan_process']:.1f} s)",
                      file=sys.stderr)
        finally:
            node.terminate()
            node.wait(120)
    finally:
        receiver.terminate()
        receiver.wait(30)
    return rows


def plan_cli_runs(case: Path, root: Path, n: int, env: dict[str, str] | None = None,
                  tag: str = "") -> list[tuple[float, float]]:
    """``airt plan --method ai`` as a whole process: (wall s, in-process planning s from metrics.json); ``env``
    is added to this process's environment."""
    airt = Path(sys.executable).with_name("airt")
    environ = {**os.environ, **(env or {})}
    runs = []
    for k in range(n):
        out = root / f"plan{tag}{k}"
        t0 = time.perf_counter()
        subprocess.run([str(airt), "plan", str(case), "--out", str(out), "--method", "ai"], check=True,
                       capture_output=True, timeout=1800, env=environ)
        wall = time.perf_counter() - t0
        stages = json.loads((out / "metrics.json").read_text())["timings_s"]
        runs.append((wall, float(stages["total"])))
        print(f"airt plan run {k}{' ' + tag if tag else ''}: {wall:.1f} s (in process {stages['total']:.1f} s, "
              f"engine set-up {stages['setup']:.1f} s)", file=sys.stderr)
    return runs


def alternating_plan_runs(case: Path, root: Path, n: int, env: dict[str, str]) -> tuple[list[tuple[float, float]],
                                                                                        list[tuple[float, float]]]:
    """:func:`plan_cli_runs` ``n`` times each as it is and with ``env``, alternating run by run."""
    plain: list[tuple[float, float]] = []
    other: list[tuple[float, float]] = []
    for k in range(n):
        plain += plan_cli_runs(case, root, 1, tag=f"plain{k}-")
        other += plan_cli_runs(case, root, 1, env, tag=f"env{k}-")
    return plain, other


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the tables."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_latency")
    ap.add_argument("--studies", type=int, default=6, help="studies pushed to one node (the first is reported apart)")
    ap.add_argument("--slices", type=int, default=120, help="CT slices per study (512 x 512)")
    ap.add_argument("--plan-runs", type=int, default=5, help="airt plan --method ai runs (0: none)")
    ap.add_argument("--compare-env", default="", metavar="KEY=VALUE",
                    help="alternate the airt plan runs with and without this variable in their environment")
    ap.add_argument("--plan-only", action="store_true", help="only the airt plan runs, no node")
    args = ap.parse_args(argv)
    compare: dict[str, str] = {}
    if args.compare_env:
        key, sep, value = args.compare_env.partition("=")
        if not sep or not key:
            print(f"--compare-env needs KEY=VALUE, got {args.compare_env!r}", file=sys.stderr)
            return 2
        compare = {key: value}
    for tool in () if args.plan_only else ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} (dcmtk) is required", file=sys.stderr)
            return 2
    from appliance.synth_dicom import write_synth_case

    med = statistics.median
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        root = Path(tmp)
        cases = []
        for seed in range(1 if args.plan_only else args.studies):  # the airt plan runs use the first
            written = write_synth_case(root / f"case{seed}", 100 + seed, n_slices=args.slices)
            cases.append((root / f"case{seed}", written.study_instance_uid))
        rows: list[dict[str, float]] = []
        if not args.plan_only:
            (root / "node").mkdir()
            rows = node_runs(root / "node", cases)
        others: list[tuple[float, float]] = []
        if compare:
            plans, others = alternating_plan_runs(cases[0][0], root, args.plan_runs, compare)
        else:
            plans = plan_cli_runs(cases[0][0], root, args.plan_runs)
    if rows:
        _print_node_table(rows, args.slices)
    if plans:
        print(f"\n`airt plan --method ai` on the first study, {len(plans)} runs: whole process "
              f"{med(w for w, _ in plans):.1f} s median, of which in-process planning (stages above, with the "
              f"fidelity check and report) {med(p for _, p in plans):.1f} s.")
    if others:
        print(f"With {args.compare_env} (runs alternating with the ones above): whole process "
              f"{med(w for w, _ in others):.1f} s median, in-process planning {med(p for _, p in others):.1f} s.")
    return 0


def _print_node_table(rows: list[dict[str, float]], slices: int) -> None:
    med = statistics.median
    first, later = rows[0], rows[1:]
    print(f"\n## Last C-STORE -> RT Dose at the receiver ({slices}-slice 512 x 512 CT + RT Structure Set, "
          f"shipped configuration, dcmtk storescu -> node -> dcmtk storescp; {len(later)} later studies, median)\n")
    print("| stage | first study after start-up | later studies (median) |")
    print("|---|---:|---:|")
    names = [("total", "**last C-STORE -> RT Dose at the receiver**"), ("detection", "detection (-> job created)"),
             ("queue", "queue (-> claimed)"), ("inputs", "job folder"),
             ("plan_process", "planning process, to a deliverable plan"), *((k, f"- {k}") for k in PLAN_STAGES),
             ("process_other", "- hand-over to and from the planning process"),
             ("send", "sending (deliverable -> RT Dose at the receiver)")]
    for key, label in names:
        later_value = f"{med(r[key] for r in later):.2f} s" if later else "-"
        print(f"| {label} | {first[key]:.2f} s | {later_value} |")


if __name__ == "__main__":
    sys.exit(main())
