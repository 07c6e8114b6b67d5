"""Benchmark of the reference dose engine and the BEV projection on a synthetic pelvis (2 threads).

Run: ``.venv/bin/python -m benchmarks.bench_dose [--repeats N]``. Prints a markdown table of medians:
engine set-up (ray tracing), full-arc dose forward and forward + backward of both engine back-ends (numba,
the CPU default, and torch grid_sample, the CUDA path), BEV projection (set-up and projection
of both back-ends: numba ray marching, the CPU default, and torch grid_sample, the previous CPU path and the
CUDA one; forward + backward of the default), and the engine restricted to the AI refinement's
region (PTV, 8 mm shell, bladder/rectum within 15 mm: ``pipeline.refine``) with and without its
convolution lattices cut to the region's reach.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from core.case import DEFAULT_HU_TO_DENSITY, Case, Grid, PatientPosition, Role
from core.machine import ArcSpec, MachineModel
from pipeline.beam_model import load_beam_model
from pipeline.bev import BevProjector
from pipeline.dose_engine import ReferenceDoseEngine, RegionDose, resample_to_grid
from pipeline.geometry import ArcGeometry

HU_CURVE = DEFAULT_HU_TO_DENSITY


def _water_cylinder_case() -> Case:
    """Fallback phantom: an elliptic water cylinder with two bone rods and a spherical PTV."""
    grid = Grid(origin_mm=(-200.0, -150.0, -100.0), spacing_mm=(4.0, 4.0, 4.0), shape=(51, 76, 101))
    x, y, z = grid.axes_mm()
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    body = (xx / 180.0) ** 2 + (yy / 120.0) ** 2 <= 1.0
    ct = np.where(body, 0.0, -1000.0).astype(np.float32)
    for side in (-1.0, 1.0):
        ct[((xx - side * 90.0) ** 2 + yy**2 <= 20.0**2) & body] = 1000.0
    ptv = xx**2 + yy**2 + zz**2 <= 35.0**2
    return Case(case_id="cylinder", ct_hu=ct, grid=grid, masks={Role.PTV: ptv, Role.BODY: body},
                patient_position=PatientPosition.HFS)


def _case() -> tuple[Case, str]:
    try:
        from pipeline.synth import synth_case
    except ImportError:
        return _water_cylinder_case(), "water cylinder with bones"
    return synth_case(0), "synthetic pelvis (seed 0)"


def _median(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    case, label = _case()
    geo = ArcGeometry(arc=ArcSpec(), isocenter_mm=case.ptv_centroid_mm(), position=case.patient_position,
                      machine=MachineModel())
    beam = load_beam_model()
    t = time.perf_counter()
    engine = ReferenceDoseEngine.for_case(case, geo, beam, hu_curve=HU_CURVE, device=args.device)
    setup_s = time.perf_counter() - t
    engine_torch = ReferenceDoseEngine.for_case(case, geo, beam, hu_curve=HU_CURVE, device=args.device,
                                                backend="torch")
    t = time.perf_counter()
    bev = BevProjector(engine.grid, geo, device=args.device)
    bev_setup_s = time.perf_counter() - t
    t = time.perf_counter()
    bev_torch = BevProjector(engine.grid, geo, device=args.device, backend="torch")
    bev_torch_setup_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    fluence = torch.rand(engine.fluence_shape, generator=gen).to(args.device)
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)

    def fwd() -> None:
        with torch.no_grad():
            engine(fluence)
        sync()

    def fwd_bwd() -> None:
        f = fluence.clone().requires_grad_(True)
        engine(f).square().sum().backward()
        sync()

    def fwd_torch() -> None:
        with torch.no_grad():
            engine_torch(fluence)
        sync()

    def fwd_bwd_torch() -> None:
        f = fluence.clone().requires_grad_(True)
        engine_torch(f).square().sum().backward()
        sync()

    dose = engine(fluence).detach()

    def proj() -> None:
        with torch.no_grad():
            bev(dose)
        sync()

    def proj_torch() -> None:
        with torch.no_grad():
            bev_torch(dose)
        sync()

    weights = torch.rand(bev.out_shape, generator=gen).to(args.device)

    def proj_bwd() -> None:
        d = dose.clone().requires_grad_(True)
        (bev(d) * weights).sum().backward()
        sync()

    masks = {role: resample_to_grid(m.astype(np.float32), case.grid, engine.grid, order=1) >= 0.5
             for role, m in case.masks.items()}
    from pipeline.refine import refinement_region

    region = refinement_region(masks, engine.grid.spacing_mm, shell_mm=8.0, oar_reach_mm=15.0)
    t = time.perf_counter()
    sub = engine.restricted(region)
    sub_setup_s = time.perf_counter() - t
    body = np.zeros(int(np.prod(engine.grid.shape)), dtype=bool)
    body[engine.act_idx.cpu().numpy()] = True
    sub_uncut = ReferenceDoseEngine(engine.density, engine.grid, geo, beam, device=args.device,
                                    active=region & body.reshape(engine.grid.shape))  # same voxels, full lattices

    def fwd_bwd_of(e: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            f = fluence.clone().requires_grad_(True)
            e(f).square().sum().backward()
            sync()
        return run

    sub_fb = _median(fwd_bwd_of(sub), args.repeats)
    sub_uncut_fb = _median(fwd_bwd_of(sub_uncut), args.repeats)
    # the arc stage's engines: every two (the full planner's) or three (the AI method's) adjacent sectors dosed
    # as one beam at their mean angle
    every = RegionDose(sub, region)
    merged = {k: RegionDose(engine.restricted(region, sectors_per_beam=k), region, sectors_per_beam=k) for k in (2, 3)}
    with torch.no_grad():
        d_every = every(fluence)
        merged_diff = {k: (e(fluence) - d_every).abs() / d_every.max() for k, e in merged.items()}
    every_fb = _median(fwd_bwd_of(every), args.repeats)
    merged_fb = {k: _median(fwd_bwd_of(e), args.repeats) for k, e in merged.items()}
    bev_t = _median(proj, args.repeats)
    bev_torch_t = _median(proj_torch, args.repeats)

    eng_fb = _median(fwd_bwd, args.repeats)
    eng_fb_torch = _median(fwd_bwd_torch, args.repeats)
    rows = [
        ("engine set-up (ray tracing, once per case)", setup_s, 1),
        (f"full-arc dose forward (180 CP), {engine.backend}", _median(fwd, args.repeats), args.repeats),
        (f"full-arc dose forward + backward, {engine.backend}", eng_fb, args.repeats),
        ("full-arc dose forward (180 CP), torch", _median(fwd_torch, args.repeats), args.repeats),
        ("full-arc dose forward + backward, torch", eng_fb_torch, args.repeats),
        (f"BEV projector set-up ({bev.backend})", bev_setup_s, 1),
        (f"BEV projection (180 x 40 x 40, 64 samples/ray), {bev.backend}", bev_t, args.repeats),
        (f"BEV projection forward + backward, {bev.backend}", _median(proj_bwd, args.repeats), args.repeats),
        ("BEV projector set-up (torch)", bev_torch_setup_s, 1),
        ("BEV projection (180 x 40 x 40, 64 samples/ray), torch", bev_torch_t, args.repeats),
        (f"restricted engine set-up ({sub.points.shape[1]} voxels, lattices cut)", sub_setup_s, 1),
        (f"restricted dose forward + backward, lattices cut ({sub.mat_u_fine.shape[1]} fine nodes a side)",
         sub_fb, args.repeats),
        (f"restricted dose forward + backward, full lattices ({sub_uncut.mat_u_fine.shape[1]} fine nodes a side)",
         sub_uncut_fb, args.repeats),
        ("region dose forward + backward, 180 beams (one per sector)", every_fb, args.repeats),
        ("region dose forward + backward, 90 beams (two sectors per beam, the full planner's arc stage)", merged_fb[2],
         args.repeats),
        ("region dose forward + backward, 60 beams (three sectors per beam, the AI method's arc stage)", merged_fb[3],
         args.repeats),
    ]
    nz, ny, nx = engine.grid.shape
    print(f"{label}: dose grid {nx} x {ny} x {nz} at 4 mm ({engine.points.shape[1]} voxels in the body), "
          f"device {args.device}, {torch.get_num_threads()} threads\n")
    print("| step | median (s) | runs |\n|---|---|---|")
    for name, sec, n in rows:
        print(f"| {name} | {sec:.3f} | {n} |")
    print(f"\nDose forward + backward: torch / {engine.backend} = {eng_fb_torch / eng_fb:.2f}x; "
          f"BEV projection: torch / {bev.backend} = {bev_torch_t / bev_t:.1f}x; restricted forward + backward: "
          f"full engine / cut lattices = {eng_fb / sub_fb:.1f}x, full lattices / cut = {sub_uncut_fb / sub_fb:.1f}x")
    for k, name in ((2, "Two"), (3, "Three")):
        diff = merged_diff[k]
        print(f"{name} sectors per beam against one: forward + backward {every_fb / merged_fb[k]:.2f}x faster; dose "
              f"difference in the region max {100 * float(diff.max()):.2f} %, 99th percentile "
              f"{100 * float(diff.quantile(0.99)):.2f} %, mean {100 * float(diff.mean()):.3f} % of the maximum "
              f"(this arc's fluence)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
