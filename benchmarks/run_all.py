"""Run every benchmark, print their tables and write benchmarks/RESULTS.md.

Usage: ``python -m benchmarks.run_all [--only NAME ...] [--no-write]`` (``make bench``).
Each benchmark is its own process so their timings do not disturb each other.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (module, extra arguments, what it measures) in the order they run.
BENCHMARKS: list[tuple[str, list[str], str]] = [
    ("bench_load", [], "DICOM -> Case load time (120-slice 512x512 CT + RTSTRUCT)"),
    ("bench_dose", [], "reference dose engine, gradient and BEV projection (synthetic pelvis, 4 mm)"),
    ("bench_sequencing", [], "leaf sequencer on 180 control points"),
    ("bench_optimizer", [], "fluence optimizer on 5 synthetic cases"),
    ("bench_fidelity", [], "sequencing fidelity: dose of the sequenced plan vs the unsequenced fluence"),
    ("bench_arc", [], "the deliverable arc on the synthetic and the held-out case sets, both methods"),
    ("gate_ai", ["--ai", "benchmarks/bench_arc_profile_40gy_ft1000_ai.json",
                 "--optimize", "benchmarks/bench_arc_profile_40gy_ft.json"],
     "the AI model's quality gate, recomputed from the committed bench_arc rows of both case sets (20 + 20, 40 Gy)"),
    ("gate_ai", ["--ai", "benchmarks/bench_arc_profile_60gy_ft1000_ai.json",
                 "--optimize", "benchmarks/bench_arc_profile_60gy_gate.json"],
     "the AI model's quality gate at 60 Gy (CHHiP profile), recomputed from the committed rows (20 + 20)"),
    ("bench_nets", [], "network forward times (small configs)"),
    ("bench_ai", [], "AI pipeline vs optimizer: speed, quality, ablation, sparing"),
    ("bench_node", [], "node: push -> results latency, receive throughput"),
    ("bench_load_node", [], "node under load: concurrent associations"),
]


def machine_description() -> str:
    """CPU model, cores, memory and library versions, for the results header."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores{mem}, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def main() -> int:
    """Run the benchmarks and write RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=None, help="benchmark module names to run")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite RESULTS.md")
    args = parser.parse_args()
    sections: list[str] = []
    failed = []
    for module, extra, what in BENCHMARKS:
        if args.only and module not in args.only:
            continue
        if not (HERE / f"{module}.py").exists():
            print(f"## {module}: not present, skipped\n", flush=True)
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{module}", *extra]
        print(f"## {module}: {what}\n$ {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        took = time.perf_counter() - t0
        print(res.stdout, flush=True)
        if res.returncode != 0:
            failed.append(module)
            print(res.stderr[-3000:], file=sys.stderr, flush=True)
        sections.append(
            f"## {module}\n\n{what}.\n\nCommand: `python -m benchmarks.{module} {' '.join(extra)}`".rstrip()
            + f" (ran {took:.0f} s{', FAILED' if res.returncode else ''})\n\n{res.stdout.strip()}\n"
        )
    if not args.no_write and not args.only:
        header = (
            "# Benchmark results\n\n"
            f"Produced by `make bench` (`python -m benchmarks.run_all`) on {dt.date.today().isoformat()}.\n\n"
            f"Machine: {machine_description()}.\n\n"
            "Figures are medians measured side by side in one run unless a table says otherwise.\n\n"
        )
        (HERE / "RESULTS.md").write_text(header + "\n".join(sections))
    if failed:
        print(f"failed benchmarks: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
