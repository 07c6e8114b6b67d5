"""Inference time of the AIRT networks (small and paper configs) on a prostate-sized case.

Run: ``python -m benchmarks.bench_nets [--threads N] [--grid-mm 4 8] [--paper] [--device cpu|cuda]``.
Prints a markdown table of median wall and process-CPU times (ms) per network and for the whole
network chain (proposer, Bev2Fluence, fast dose, correction) at each dose-grid spacing, on a
pelvis-sized 400 x 256 x 160 mm dose box and 180 control points.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from core.case import Grid, PatientPosition
from core.machine import ArcSpec, MachineModel
from pipeline.nets.bev2fluence import Bev2Fluence, Bev2FluenceConfig
from pipeline.nets.dose_proposer import DoseProposer, DoseProposerConfig
from pipeline.nets.fast_dose import FastDose, FastDoseConfig, primary_geometry_for_arc

# A pelvis-sized dose box: 400 x 256 x 160 mm (LR x AP x SI) around the isocenter.
BOX_MM = (400.0, 256.0, 160.0)


def _median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median wall time and median process CPU time of ``fn``, ms."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1000.0 * statistics.median(wall), 1000.0 * statistics.median(cpu)


def run(size: str, grid_mm: float, repeats: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """Median times (ms) of each network and of the chain for one config size and grid spacing."""
    shape = tuple(round(b / grid_mm) for b in BOX_MM[::-1])  # (nz, ny, nx)
    grid = Grid(tuple(-0.5 * b for b in BOX_MM), (grid_mm,) * 3, shape)  # type: ignore[arg-type]
    machine = MachineModel()
    pick = (lambda c: c.paper()) if size == "paper" else (lambda c: c.small())
    fd_cfg = pick(FastDoseConfig)
    t0, c0 = time.perf_counter(), time.process_time()
    geom = primary_geometry_for_arc(
        np.ones(shape, np.float32), grid, ArcSpec(), machine, (0.0, 0.0, 0.0), PatientPosition.HFS, fd_cfg
    ).to(device)
    t_geom = (1000.0 * (time.perf_counter() - t0), 1000.0 * (time.process_time() - c0))
    proposer = DoseProposer(pick(DoseProposerConfig)).to(device).eval()
    b2f = Bev2Fluence(pick(Bev2FluenceConfig)).to(device).eval()
    corr = Bev2Fluence(Bev2FluenceConfig.paper(2) if size == "paper" else Bev2FluenceConfig.small(2))
    corr = corr.to(device).eval()
    fast = FastDose(fd_cfg).to(device).eval()
    x = torch.rand(1, 4, *shape, device=device)
    bev = torch.rand(1, 1, 180, 40, 40, device=device)
    bev2 = torch.rand(1, 2, 180, 40, 40, device=device)
    fl = torch.rand(180, 40, 40, device=device)
    out: dict[str, tuple[float, float]] = {"geometry (once per case)": t_geom}
    with torch.inference_mode():
        out["dose proposer"] = _median_ms(lambda: proposer(x), repeats, device)
        out["bev2fluence"] = _median_ms(lambda: b2f(bev), repeats, device)
        out["fast dose stage 1"] = _median_ms(lambda: fast.stage1(fl, geom), repeats, device)
        out["fast dose (both stages)"] = _median_ms(lambda: fast(fl, geom), repeats, device)
        out["correction"] = _median_ms(lambda: corr(bev2), repeats, device)

        def chain() -> None:
            proposer(x)
            f0 = b2f(bev)
            fast(f0[:, 0], geom)
            corr(bev2)

        out["chain (no BEV projection)"] = _median_ms(chain, repeats, device)
    return out


def main() -> None:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--grid-mm", type=float, nargs="+", default=[8.0, 4.0], help="dose grid spacings, mm")
    ap.add_argument("--paper", action="store_true", help="also time the paper-size configs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = ["small", "paper"] if args.paper else ["small"]
    rows = [(s, g, run(s, g, args.repeats, device)) for s in sizes for g in args.grid_mm]
    keys = list(rows[0][2])
    print(f"device {device}, {args.threads} CPU threads, median of {args.repeats}; "
          "each cell: wall ms / process CPU ms (CPU time is the fairer figure on a shared machine)\n")
    print("| config | grid mm | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for s, g, r in rows:
        print(f"| {s} | {g:g} | " + " | ".join(f"{r[k][0]:.0f} / {r[k][1]:.0f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
