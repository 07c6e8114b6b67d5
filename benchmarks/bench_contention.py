"""Planning on a host shared with other work: OpenMP's idle spinning, with and without a competing process.

``python -m benchmarks.bench_contention [--runs 3] [--slices 120]``

torch's and numba's CPU threads run on libgomp, whose idle threads spin ``GOMP_SPINCOUNT`` times
(300 000 by default) after every parallel region before they sleep, and an arc evaluation runs dozens
of parallel regions (torch operations, numba kernels); when another process wants a core, the spinning
threads take it from the threads that compute. ``airt`` sets ``GOMP_SPINCOUNT`` to
:data:`appliance.cli.OPENMP_SPIN_COUNT` unless the environment already has it.

The benchmark times ``airt plan --method ai`` as a whole process on one synthetic 512 x 512 study
(``--slices`` slices, seed 2000), with the spin count as ``airt`` sets it and with libgomp's default,
each on an otherwise idle machine and beside one process that keeps a core busy (a Python loop, as
any other program on the host would); the runs alternate, and the table gives medians of ``--runs``:
the whole process, and the arc stage and the in-process total from ``metrics.json``.
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
from pathlib import Path

from appliance.cli import OPENMP_SPIN_COUNT

#: libgomp's own spin count when ``GOMP_SPINCOUNT`` is unset and the threads fit the cores.
LIBGOMP_DEFAULT_SPIN_COUNT = "300000"


def plan_once(case: Path, out: Path, spin_count: str) -> dict[str, float]:
    """``airt plan --method ai`` in a fresh process with this ``GOMP_SPINCOUNT``: wall s, arc stage s,
    in-process total s."""
    airt = Path(sys.executable).with_name("airt")
    env = {**os.environ, "GOMP_SPINCOUNT": spin_count}
    t0 = time.perf_counter()
    subprocess.run([str(airt), "plan", str(case), "--out", str(out), "--method", "ai"], check=True,
                   capture_output=True, timeout=3600, env=env)
    wall = time.perf_counter() - t0
    stages = json.loads((out / "metrics.json").read_text())["timings_s"]
    return {"wall": wall, "arc": float(stages["arc_optimize"]), "total": float(stages["total"])}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_contention")
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration (medians)")
    ap.add_argument("--slices", type=int, default=120, help="CT slices of the synthetic study")
    args = ap.parse_args(argv)
    configs = [(load, spin) for load in (False, True) for spin in (OPENMP_SPIN_COUNT, LIBGOMP_DEFAULT_SPIN_COUNT)]
    results: dict[tuple[bool, str], list[dict[str, float]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="airt-contention-") as tmp:
        root = Path(tmp)
        subprocess.run([str(Path(sys.executable).with_name("airt")), "synth", "--out", str(root / "in"), "--seed",
                        "2000", "--slices", str(args.slices)], check=True, capture_output=True, timeout=600)
        case = next((root / "in").iterdir())
        plan_once(case, root / "warm", OPENMP_SPIN_COUNT)  # numba's cache written, files in the page cache
        for k in range(args.runs):
            for load, spin in configs:
                busy = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load else None)
                try:
                    row = plan_once(case, root / f"run{k}_{int(load)}_{spin}", spin)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                results[(load, spin)].append(row)
                print(f"run {k}: {'one core busy' if load else 'idle'}, GOMP_SPINCOUNT={spin}: "
                      f"{row['wall']:.1f} s (arc {row['arc']:.1f} s)", file=sys.stderr, flush=True)
    print(f"\n`airt plan --method ai`, one {args.slices}-slice study, 2 threads, medians of {args.runs} "
          f"({os.cpu_count()} CPUs)\n")
    print("| other work on the host | GOMP_SPINCOUNT | whole process s | in-process total s | arc stage s |")
    print("|---|---|---:|---:|---:|")
    for load, spin in configs:
        rows = results[(load, spin)]
        name = f"{spin} (airt's)" if spin == OPENMP_SPIN_COUNT else f"{spin} (libgomp's default)"
        cells = [statistics.median(r[key] for r in rows) for key in ("wall", "total", "arc")]
        print(f"| {'one core busy' if load else 'none'} | {name} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
