"""Benchmark of the DICOM node: end-to-end latency and receive throughput, with real dcmtk peers.

``python -m benchmarks.bench_node [--slices 120] [--repeats 1] [--method auto] [--iterations 20] [--dose-grid-mm 4]``

1. End to end: a synthetic CT series (``--slices`` slices, 512 x 512) + RTSTRUCT is pushed with
   dcmtk ``storescu`` to ``airt serve``; dcmtk ``storescp`` is the destination. Reported: the time
   from the end of the push (last C-STORE answered) to the RT Dose written by the receiver, minus
   the scheduler's stable age (the wait is by design), and the planning time the job recorded.
2. Receive throughput: the worker is off; 1 and then 4 ``storescu`` processes push distinct cases
   at the same time. Reported: instances stored per second (median over ``--repeats``).

Prints a markdown table of medians. Needs dcmtk (storescu, storescp).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.scu import free_port, wait_for_port

NODE_AET, PUSHER_AET, RECEIVER_AET = "AIRT", "PUSHER", "RESULTS"


def _config(path: Path, *, data: Path, port: int, receiver_port: int | None, worker: bool, stable_age_s: float,
            iterations: int, dose_grid_mm: float, method: str = "optimize") -> None:
    dest = (f'[[destinations]]\nname = "receiver"\nae_title = "{RECEIVER_AET}"\nhost = "127.0.0.1"\n'
            f"port = {receiver_port}\n" if receiver_port else "")
    path.write_text(f"""
[node]
ae_title = "{NODE_AET}"
port = {port}
max_associations = 16

[[peers]]
ae_title = "{PUSHER_AET}"

{dest}
[storage]
data_dir = "{data}"
min_free_disk_mb = 1

[scheduler]
stable_age_s = {stable_age_s}
poll_interval_s = 0.5

[worker]
enabled = {"true" if worker else "false"}

[http]
port = 0

[delivery]
retry_initial_s = 1.0

[planning]
method = "{method}"
optimizer_iterations = {iterations}
dose_grid_mm = {dose_grid_mm}
""")


def start_node(cfg: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``airt serve --config cfg`` in its own process, logging to ``log``; returns once it listens on ``port``."""
    fh = log.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(cfg)],
                            stdout=fh, stderr=fh)
    wait_for_port(port, 120.0, proc)
    return proc


def start_receiver(out: Path, port: int, aet: str) -> subprocess.Popen[bytes]:
    """dcmtk ``storescp`` as ``aet`` on ``port`` writing what it receives into ``out``; returns once it listens."""
    proc = subprocess.Popen(["storescp", "-aet", aet, "-od", str(out), "-uf", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, 10.0, proc)
    return proc


def _push(folder: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["storescu", "-aet", PUSHER_AET, "-aec", NODE_AET, "+sd", "-nh", "127.0.0.1", str(port),
                             str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def end_to_end(work: Path, case: Path, *, stable_age_s: float, iterations: int, dose_grid_mm: float,
               method: str) -> tuple[float, float]:
    """One push -> results run; returns (latency minus stable age, job's planning process time), s."""
    port, rport = free_port(), free_port()
    out = work / "received"
    out.mkdir(parents=True)
    receiver = start_receiver(out, rport, RECEIVER_AET)
    cfg = work / "airt.toml"
    _config(cfg, data=work / "data", port=port, receiver_port=rport, worker=True, stable_age_s=stable_age_s,
            iterations=iterations, dose_grid_mm=dose_grid_mm, method=method)
    node = start_node(cfg, port, work / "node.log")
    try:
        push = _push(case, port)
        _, err = push.communicate(timeout=600)
        if push.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-2000:]}")
        t_pushed = time.perf_counter()
        while not any(p.name.startswith("RD") for p in out.iterdir()):
            if time.perf_counter() - t_pushed > 3600 or node.poll() is not None:
                raise RuntimeError(f"no RT Dose at the receiver; see {work / 'node.log'}")
            time.sleep(0.05)
        latency = time.perf_counter() - t_pushed - stable_age_s
        con = sqlite3.connect(work / "data" / "airt.sqlite3")
        (timings,) = con.execute("SELECT json_extract(timings, '$.plan_process_s') FROM jobs").fetchone()
        con.close()
        return latency, float(timings)
    finally:
        node.terminate()
        node.wait(120)
        receiver.terminate()
        receiver.wait(30)


def throughput(work: Path, cases: list[Path], n_senders: int, n_instances: int) -> float:
    """Instances stored per second with ``n_senders`` concurrent storescu processes (worker off)."""
    port = free_port()
    work.mkdir(parents=True)
    cfg = work / "airt.toml"
    _config(cfg, data=work / "data", port=port, receiver_port=None, worker=False, stable_age_s=3600.0,
            iterations=1, dose_grid_mm=8.0)
    node = start_node(cfg, port, work / "node.log")
    try:
        t0 = time.perf_counter()
        pushes = [_push(c, port) for c in cases[:n_senders]]
        for p in pushes:
            _, err = p.communicate(timeout=1200)
            if p.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-2000:]}")
        wall = time.perf_counter() - t0
        con = sqlite3.connect(work / "data" / "airt.sqlite3")
        (n,) = con.execute("SELECT COUNT(*) FROM instances").fetchone()
        con.close()
        if n != n_instances * n_senders:
            raise RuntimeError(f"{n} instances stored, expected {n_instances * n_senders}")
        return n / wall
    finally:
        node.terminate()
        node.wait(120)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_node")
    ap.add_argument("--slices", type=int, default=120, help="CT slices per case (default 120)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per measurement (median reported)")
    ap.add_argument("--method", choices=["auto", "ai", "optimize"], default="auto",
                    help="planning.method for the end-to-end run (default auto, as the appliance ships)")
    ap.add_argument("--iterations", type=int, default=20, help="planning.optimizer_iterations for the end-to-end run")
    ap.add_argument("--dose-grid-mm", type=float, default=4.0, help="planning.dose_grid_mm for the end-to-end run")
    ap.add_argument("--stable-age-s", type=float, default=2.0, help="scheduler.stable_age_s for the end-to-end run")
    args = ap.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} (dcmtk) is required", file=sys.stderr)
            return 2
    from appliance.synth_dicom import write_synth_case

    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        root = Path(tmp)
        cases = []
        for seed in range(4):
            folder = root / f"case{seed}"
            write_synth_case(folder, seed, n_slices=args.slices)
            cases.append(folder)
        n_inst = args.slices + 1
        lat, plan, tp1, tp4 = [], [], [], []
        for r in range(args.repeats):
            la, pl = end_to_end(root / f"e2e{r}", cases[0], stable_age_s=args.stable_age_s,
                                iterations=args.iterations, dose_grid_mm=args.dose_grid_mm, method=args.method)
            lat.append(la)
            plan.append(pl)
            print(f"run {r}: latency - stable age {la:.1f} s, planning process {pl:.1f} s", file=sys.stderr)
            tp1.append(throughput(root / f"tp1_{r}", cases, 1, n_inst))
            tp4.append(throughput(root / f"tp4_{r}", cases, 4, n_inst))
    med = statistics.median
    print(f"\n## DICOM node ({args.slices}-slice 512x512 CT + RTSTRUCT, dcmtk peers on loopback, "
          f"{args.repeats} run(s), median)\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| last C-STORE -> RT Dose at receiver, minus stable age ({args.stable_age_s:g} s) | {med(lat):.1f} s |")
    how = f"optimize, {args.iterations} it" if args.method == "optimize" else f"method {args.method}"
    print(f"| of which planning process ({how}, {args.dose_grid_mm:g} mm grid) | "
          f"{med(plan):.1f} s |")
    print(f"| node overhead (latency - planning) | {med(lat) - med(plan):.1f} s |")
    print(f"| receive throughput, 1 sender | {med(tp1):.1f} instances/s |")
    print(f"| receive throughput, 4 concurrent senders | {med(tp4):.1f} instances/s |")
    print(f"| ratio 4 senders / 1 sender | {med(tp4) / med(tp1):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
