"""Load on the node: N concurrent associations, each pushing one synthetic study (a CT series + RT
Structure Set), into ``airt serve`` running as its own process with the worker disabled.

Reports instances/s, p50/p99 C-STORE latency (timed in the pynetdicom clients), the node's peak RSS,
and checks that every instance is stored and that exactly one job per study was created.

    .venv/bin/python -m benchmarks.bench_load_node [--clients 8] [--slices 120] [--matrix 512]
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from appliance.scu import wait_for_port
from appliance.synth_dicom import write_synth_case
from tests.conftest import free_port
from tests.node_helpers import PEER, StoreRun, store_paths

REPO = Path(__file__).resolve().parents[1]


def _instances_stored(http_port: int) -> float:
    """``airt_dicom_instances_received_total`` (outcome stored) scraped from the node's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as rsp:
            text = rsp.read().decode()
    except OSError:  # not listening yet
        return float("nan")
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "airt_dicom_instances_received_total" and s.labels.get("outcome") == "stored")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a markdown table."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_load_node")
    ap.add_argument("--clients", type=int, default=8, help="concurrent associations (one study each)")
    ap.add_argument("--slices", type=int, default=120, help="CT slices per study")
    ap.add_argument("--matrix", type=int, default=512, help="CT matrix (pixels per side)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    print(f"writing {args.clients} synthetic studies into {work} ...", file=sys.stderr)
    studies = []
    for k in range(args.clients):
        w = write_synth_case(work / f"case{k}", 100 + k, n_slices=args.slices, matrix=args.matrix,
                             pixel_mm=500.0 / args.matrix, slice_mm=2.5)
        studies.append([*w.ct_paths, w.rtstruct_path])
    n_files = sum(len(s) for s in studies)
    n_bytes = sum(p.stat().st_size for s in studies for p in s)
    port, http_port = free_port(), free_port()
    data = work / "data"
    cfg = work / "airt.toml"
    cfg.write_text(f'[node]\nport = {port}\nmax_associations = {args.clients + 2}\n'
                   f'[[peers]]\nae_title = "{PEER}"\n'
                   f'[storage]\ndata_dir = "{data}"\nmin_free_disk_mb = 64\n'
                   '[scheduler]\nstable_age_s = 2.0\npoll_interval_s = 0.5\n[worker]\nenabled = false\n'
                   f'[http]\nport = {http_port}\n')
    log = (work / "node.log").open("wb")
    node = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(cfg)], cwd=REPO,
                            stdout=log, stderr=log)
    try:
        wait_for_port(port, timeout_s=120)
        proc = psutil.Process(node.pid)
        rss0 = proc.memory_info().rss
        peak = [rss0]
        runs: list[StoreRun | None] = [None] * args.clients
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.05)

        def client(k: int) -> None:
            runs[k] = store_paths(port, studies[k], timeout_s=120)

        sampler = threading.Thread(target=sample)
        sampler.start()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        scrapes: list[tuple[float, float]] = []  # (s since start, instances stored) from /metrics during the load
        while any(t.is_alive() for t in threads):
            scrapes.append((time.perf_counter() - t0, _instances_stored(http_port)))
            time.sleep(1.0)
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        scrapes.append((wall, _instances_stored(http_port)))
        done.set()
        sampler.join()
        statuses = [s for r in runs if r is not None for s in r.statuses]
        lat = np.array([x for r in runs if r is not None for x in r.latencies_s]) * 1000.0
        db = data / "airt.sqlite3"
        deadline = time.time() + 60
        jobs: list[tuple[str, int]] = []
        while time.time() < deadline:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
                jobs = con.execute("SELECT study_uid, COUNT(*) FROM jobs GROUP BY study_uid").fetchall()
                stored = con.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
            if len(jobs) >= args.clients:
                break
            time.sleep(0.5)
    finally:
        node.terminate()
        node.wait(60)
        log.close()
    ok = sum(1 for s in statuses if s == 0)
    print(f"\nLoad: {args.clients} concurrent associations x ({args.slices} CT slices {args.matrix}x{args.matrix} "
          f"+ 1 RTSTRUCT), node with worker disabled, {psutil.cpu_count()} CPUs\n")
    print("| metric | value |\n|---|---|")
    print(f"| instances sent / answered Success / stored | {n_files} / {ok} / {stored} |")
    print(f"| data sent | {n_bytes / 2**20:.0f} MiB |")
    print(f"| wall time | {wall:.1f} s |")
    print(f"| throughput | {ok / wall:.1f} instances/s ({n_bytes / 2**20 / wall:.1f} MiB/s) |")
    print(f"| C-STORE latency p50 / p99 / max | {np.percentile(lat, 50):.1f} / {np.percentile(lat, 99):.1f} / "
          f"{lat.max():.1f} ms |")
    print(f"| node RSS before / peak | {rss0 / 2**20:.0f} / {peak[0] / 2**20:.0f} MiB |")
    print(f"| jobs created (studies, max jobs per study) | {len(jobs)} ({args.clients}), "
          f"{max((n for _, n in jobs), default=0)} |")
    good = ok == n_files == stored and len(jobs) == args.clients and all(n == 1 for _, n in jobs)
    print("| /metrics airt_dicom_instances_received_total during the load (s: count) | "
          + ", ".join(f"{t:.0f}: {n:.0f}" for t, n in scrapes) + " |")
    print(f"\nall stored, one job per study: {'yes' if good else 'NO'}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
