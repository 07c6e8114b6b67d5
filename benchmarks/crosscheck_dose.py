"""Cross-check of the reference dose engine against an independent engine (pyRadPlan's photon pencil beam).

Run: ``.venv/bin/python -m benchmarks.crosscheck_dose [--spacing-mm 4] [--venv /tmp/xcheck-venv]``.

Four cases, one static 6 MV beam at gantry 0 (couch 0, collimator 0) on a head-first-supine phantom:
an *open* 10 x 10 cm field and an *IMRT-like* field (8 x 8 cm, its +x third at half intensity, a
2 x 2 cm blocked square on the axis), each on a *water* box (30 x 30 cm wide, 28 cm deep below 2 cm
of air) and on the same box with a *bone* slab (relative electron density 1.8, 32 mm thick, from 40 mm
depth, across the whole box). The isocenter is at 10 cm depth (SSD 90 cm); the fields are given on the
5 mm BEV grid of ``core.machine`` (1 MU per open pixel).

This engine computes the dose with :class:`pipeline.dose_engine.ReferenceDoseEngine` on a one-sector arc
centred on gantry 0. pyRadPlan 0.5.0 (matRad's SVD photon pencil beam, "Generic" 6 MV machine) runs in
its own virtual environment (it needs numpy < 2.4; created here when missing) through
``benchmarks/_xcheck_pyradplan.py``, with the same density (its HU table inverted), 5 mm bixels on the
same pixel centres, the same isocenter and grid, and a lateral cut-off wide enough for the full scatter.

Both doses are normalised by each engine's own dose at the reference point (central axis, 10 cm depth)
of the open field in water, i.e. each engine is calibrated once, as a linac is; the absolute outputs
differ in unit (pyRadPlan's Generic machine is not in Gy/MU) and their ratio is printed. Then, per case
and against pyRadPlan as the reference: global gamma 3 %/3 mm pass rate over the phantom voxels above
10 % of the reference maximum (calibrated, and with each dose normalised to its own maximum); depth-dose
differences on an open axis (depth >= 20 mm, past the build-up) and profile differences at 10 cm depth
(in % of the calibration dose, where the profile is in the field and flat; the positions of every
fluence step, in mm); and the dose ratio behind bone / in water at 10 cm depth for each engine. Results are printed as a markdown table;
nothing here is a pass/fail test.

Known differences of method (both are pencil-beam superpositions): pyRadPlan's kernel is chosen for the
central ray's SSD and scaled by each voxel's radiological depth; this engine uses depth-dependent
Gaussian channels and a density-scaled primary width (lateral electron disequilibrium), so bone and
low-density interfaces are where they may differ most. Neither transports energy laterally the way a
collapsed-cone or Monte Carlo engine does, so agreement here does not validate heterogeneity physics.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from core.case import Grid, PatientPosition
from core.errors import AirtError, ConfigError
from core.machine import ArcSpec, MachineModel
from pipeline.beam_model import load_beam_model
from pipeline.dose_engine import ReferenceDoseEngine
from pipeline.gamma import gamma_pass_rate
from pipeline.geometry import ArcGeometry

PYRADPLAN_REQUIREMENTS = ("pyRadPlan==0.5.0", "numpy<2.4")
DEFAULT_VENV = Path(os.environ.get("AIRT_XCHECK_VENV", "/tmp/xcheck-venv"))
WORKER = Path(__file__).resolve().parent / "_xcheck_pyradplan.py"

ISO_DEPTH_MM = 100.0  # isocenter depth below the water surface (y = 0), mm
AIR_MM = 20.0  # air above the surface inside the grid, mm
DEPTH_MM = 280.0  # phantom thickness, mm
HALF_WIDTH_MM = 150.0  # half of the phantom's extent in x and z, mm
BONE_MM = (40.0, 72.0)  # bone slab depth range, mm
BONE_DENSITY = 1.8
AIR_DENSITY = 0.001
LATERAL_CUTOFF_MM = 150.0  # pyRadPlan's geometric lateral cut-off (its default, 50 mm, drops scatter)


@dataclass(frozen=True)
class Phantom:
    """A box phantom on a regular grid; y is depth (the gantry-0 beam travels along +y)."""

    name: str
    grid: Grid
    density: NDArray[np.float32]

    @property
    def inside(self) -> NDArray[np.bool_]:
        """Voxels of the phantom (not air)."""
        return np.asarray(self.density > 0.5)


def make_phantom(name: str, spacing_mm: float, bone: bool) -> Phantom:
    """Water box, optionally with the bone slab; voxel centres on the axis in x and z, surface on a voxel edge."""
    n_lat = 2 * int(HALF_WIDTH_MM // spacing_mm) + 1
    lat0 = -spacing_mm * (n_lat // 2)
    n_y = int(np.ceil((AIR_MM + DEPTH_MM) / spacing_mm))
    y0 = -AIR_MM + 0.5 * spacing_mm
    grid = Grid(origin_mm=(lat0, y0, lat0), spacing_mm=(spacing_mm,) * 3, shape=(n_lat, n_y, n_lat))
    _, y, _ = grid.axes_mm()
    rho = np.where(y > 0.0, 1.0, AIR_DENSITY)
    if bone:
        rho = np.where((y > BONE_MM[0]) & (y < BONE_MM[1]), BONE_DENSITY, rho)
    density = np.broadcast_to(rho[None, :, None], grid.shape).astype(np.float32)
    return Phantom(name, grid, np.ascontiguousarray(density))


def make_fields(machine: MachineModel) -> dict[str, NDArray[np.float64]]:
    """The open and IMRT-like fields on the BEV grid (MU per pixel)."""
    bev = machine.bev
    xc = 0.5 * (bev.col_edges_mm()[1:] + bev.col_edges_mm()[:-1])
    yc = 0.5 * (bev.row_edges_mm()[1:] + bev.row_edges_mm()[:-1])
    vv, uu = np.meshgrid(yc, xc, indexing="ij")
    open_field = ((np.abs(uu) < 50.0) & (np.abs(vv) < 50.0)).astype(np.float64)
    imrt = ((np.abs(uu) < 40.0) & (np.abs(vv) < 40.0)).astype(np.float64)
    imrt[imrt > 0] = np.where(uu[imrt > 0] > 10.0, 0.5, 1.0)
    imrt[(np.abs(uu) < 10.0) & (np.abs(vv) < 10.0)] = 0.0
    return {"open 10x10": open_field, "IMRT-like": imrt}


# ---------------------------------------------------------------------------------------------------
# The two engines
# ---------------------------------------------------------------------------------------------------


def our_dose(phantom: Phantom, fluence: NDArray[np.float64], machine: MachineModel) -> NDArray[np.float64]:
    """This engine's dose (Gy) of one static gantry-0 field (a one-sector arc 359 -> 1 degrees)."""
    arc = ArcSpec(start_deg=359.0, stop_deg=1.0, n_sectors=1, collimator_deg=0.0)
    geo = ArcGeometry(arc=arc, isocenter_mm=(0.0, ISO_DEPTH_MM, 0.0), position=PatientPosition.HFS,
                      machine=machine)
    engine = ReferenceDoseEngine(torch.as_tensor(phantom.density), phantom.grid, geo, load_beam_model())
    with torch.no_grad():
        dose = engine(torch.as_tensor(fluence[None], dtype=torch.float32))
    return np.asarray(dose.numpy(), dtype=np.float64)


def ensure_venv(venv: Path) -> Path:
    """Python of the pyRadPlan virtual environment, created (and pyRadPlan installed) when missing."""
    python = venv / "bin" / "python"
    if python.exists():
        probe = subprocess.run([str(python), "-c", "import pyRadPlan, SimpleITK"], capture_output=True, text=True)
        if probe.returncode == 0:
            return python
        print(f"{venv} exists but pyRadPlan does not import; installing it there", file=sys.stderr)
    else:
        base = shutil.which("python3") or sys.executable
        print(f"creating {venv} with {base} and installing {' '.join(PYRADPLAN_REQUIREMENTS)} (a few minutes)",
              file=sys.stderr)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", *PYRADPLAN_REQUIREMENTS])
    if done.returncode != 0:
        raise ConfigError(f"could not install {' '.join(PYRADPLAN_REQUIREMENTS)} into {venv}; check the network "
                          "access to the package index, or pass --venv with a ready environment")
    return python


def pyradplan_dose(python: Path, phantom: Phantom, fluence: NDArray[np.float64], machine: MachineModel,
                   work: Path, tag: str) -> tuple[NDArray[np.float64], dict[str, float]]:
    """pyRadPlan's dose of the same field on the same grid (its own units), and run facts."""
    src, out, log = work / f"{tag}_in.npz", work / f"{tag}_out.npz", work / f"{tag}.log"
    g = phantom.grid
    np.savez(src, density=phantom.density, origin_mm=np.asarray(g.origin_mm), spacing_mm=np.asarray(g.spacing_mm),
             iso_mm=np.array([0.0, ISO_DEPTH_MM, 0.0]), fluence=fluence, pixel_mm=machine.bev.pixel_mm,
             lateral_cutoff_mm=LATERAL_CUTOFF_MM)
    t = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run([str(python), str(WORKER), str(src), str(out)], stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text()[-2000:]
        raise AirtError(f"pyRadPlan failed on case {tag} (exit {done.returncode}); its log {log} ends:\n{tail}")
    res = np.load(out)
    facts = {"seconds": time.perf_counter() - t, "bixels": float(res["n_bixels"])}
    return np.asarray(res["dose"], dtype=np.float64), facts


# ---------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------


def _line(dose: NDArray[np.float64], grid: Grid, x_mm: float, z_mm: float) -> tuple[NDArray, NDArray]:
    """Depth (mm below the surface) and dose along y at the voxel column nearest (x, z)."""
    x, y, z = grid.axes_mm()
    i, k = int(np.argmin(np.abs(x - x_mm))), int(np.argmin(np.abs(z - z_mm)))
    return y, dose[k, :, i]


def _point(dose: NDArray[np.float64], grid: Grid, x_mm: float) -> float:
    """Dose at the isocenter depth on the depth line at (x, 0) (linear between voxel centres)."""
    y, d = _line(dose, grid, x_mm, 0.0)
    return float(np.interp(ISO_DEPTH_MM, y, d))


def reference_dose(dose: NDArray[np.float64], grid: Grid) -> float:
    """Dose on the central axis at the isocenter depth: the calibration point."""
    return _point(dose, grid, 0.0)


def profile_at_depth(dose: NDArray[np.float64], grid: Grid, depth_mm: float) -> tuple[NDArray, NDArray]:
    """Lateral (x) profile through z = 0 at a depth, linear between the two nearest planes."""
    x, y, z = grid.axes_mm()
    k = int(np.argmin(np.abs(z)))
    j = int(np.clip(np.searchsorted(y, depth_mm) - 1, 0, len(y) - 2))
    f = (depth_mm - y[j]) / (y[j + 1] - y[j])
    return x, (1.0 - f) * dose[k, j, :] + f * dose[k, j + 1, :]


def edge_positions(x: NDArray, p: NDArray, edges_mm: list[float], half_mm: float = 10.0) -> list[float]:
    """Where the profile crosses, near each nominal field edge, the level half-way between its doses
    ``half_mm`` either side (the 50 % point of a step between any two intensities), mm."""
    fine = np.arange(float(x[0]), float(x[-1]), 0.1)
    pf = np.interp(fine, x, p)
    out = []
    for e in edges_mm:
        level = 0.5 * (np.interp(e - half_mm, x, p) + np.interp(e + half_mm, x, p))
        near = np.nonzero(np.abs(fine - e) <= half_mm)[0]
        sign = np.sign(pf[near] - level)
        cross = np.nonzero(sign[1:] != sign[:-1])[0]
        if cross.size == 0:
            out.append(float("nan"))
            continue
        i = near[cross[np.argmin(np.abs(fine[near[cross]] - e))]]
        out.append(float(fine[i] + (level - pf[i]) / (pf[i + 1] - pf[i]) * (fine[i + 1] - fine[i])))
    return out


def fluence_edges_mm(fluence: NDArray[np.float64], machine: MachineModel) -> list[float]:
    """x positions (isocenter plane, mm) where the fluence steps along the row just above z = 0."""
    row = fluence[machine.bev.n_rows // 2]
    xe = machine.bev.col_edges_mm()
    return [float(xe[c]) for c in range(1, len(row)) if row[c] != row[c - 1]]


@dataclass(frozen=True)
class Comparison:
    """Agreement of this engine (evaluated) with pyRadPlan (reference) on one case."""

    gamma_cal: float
    gamma_deep: float
    gamma_max: float
    pdd_max_pct: float
    pdd_10_pct: float
    pdd_20_pct: float
    prof_max_pct: float
    edge_mm: float
    n_edges: int
    dmax_ref_mm: float
    dmax_ours_mm: float


def compare(ours: NDArray[np.float64], ref: NDArray[np.float64], phantom: Phantom, axis_x_mm: float,
            spacing: tuple[float, float, float], edges: list[float]) -> Comparison:
    """Metrics on calibrated doses (1 = each engine's open-field water reference dose)."""
    mask = phantom.inside
    o, r = np.where(mask, ours, 0.0), np.where(mask, ref, 0.0)
    g_cal = gamma_pass_rate(r, o, spacing, dose_percent=3.0, dta_mm=3.0, threshold=0.1, mask=mask)
    _, depth, _ = phantom.grid.axes_mm()
    deep_mask = mask & (depth >= 20.0)[None, :, None]
    g_deep = gamma_pass_rate(r, o, spacing, dose_percent=3.0, dta_mm=3.0, threshold=0.1, mask=deep_mask)
    g_max = gamma_pass_rate(r / r.max(), o / o.max(), spacing, dose_percent=3.0, dta_mm=3.0, threshold=0.1,
                            mask=mask)
    y, pr = _line(r, phantom.grid, axis_x_mm, 0.0)
    _, po = _line(o, phantom.grid, axis_x_mm, 0.0)
    deep = (y >= 20.0) & (y <= 250.0)
    pdd_diff = 100.0 * (po - pr)
    at = [float(np.interp(d, y, pdd_diff)) for d in (ISO_DEPTH_MM, 200.0)]
    x, fr = profile_at_depth(r, phantom.grid, ISO_DEPTH_MM)
    _, fo = profile_at_depth(o, phantom.grid, ISO_DEPTH_MM)
    # dose differences where the reference profile is in the field and flat (< 1 % per mm); in the
    # gradients (penumbra, block and step edges) the 50 % edge positions and gamma speak instead
    infield = (fr >= 0.2 * fr.max()) & (np.abs(np.gradient(fr, x)) < 0.01)
    shifts = np.abs(np.subtract(edge_positions(x, fo, edges), edge_positions(x, fr, edges)))
    water = y > 0
    return Comparison(
        gamma_cal=100.0 * g_cal, gamma_deep=100.0 * g_deep, gamma_max=100.0 * g_max,
        pdd_max_pct=float(np.abs(pdd_diff[deep]).max()), pdd_10_pct=at[0], pdd_20_pct=at[1],
        prof_max_pct=float(100.0 * np.abs(fo - fr)[infield].max()),
        edge_mm=float(np.nanmax(shifts)), n_edges=len(edges),
        dmax_ref_mm=float(y[water][np.argmax(pr[water])]), dmax_ours_mm=float(y[water][np.argmax(po[water])]),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--spacing-mm", type=float, default=4.0, help="isotropic grid spacing, mm (3 or 4)")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="pyRadPlan virtual environment (created)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep the doses (.npz) in")
    ap.add_argument("--reuse", action="store_true",
                    help="take the doses already kept in --keep instead of computing them again")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.reuse and args.keep is None:
        raise ConfigError("--reuse needs --keep, the folder that holds the doses of an earlier run")
    machine = MachineModel()
    fields = make_fields(machine)
    phantoms = [make_phantom("water", args.spacing_mm, bone=False), make_phantom("bone slab", args.spacing_mm, bone=True)]
    spacing = (args.spacing_mm,) * 3
    work = Path(tempfile.mkdtemp(prefix="xcheck-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)

    doses: dict[tuple[str, str], tuple[NDArray[np.float64], NDArray[np.float64], dict[str, float]]] = {}
    for phantom in phantoms:
        for fname, fluence in fields.items():
            tag = f"{phantom.name}-{fname}".replace(" ", "_")
            kept = work / f"{tag}_doses.npz"
            if args.reuse and kept.exists():
                old = np.load(kept)
                doses[(phantom.name, fname)] = (old["ours"], old["pyradplan"], {})
                continue
            python = ensure_venv(args.venv)
            t = time.perf_counter()
            ours = our_dose(phantom, fluence, machine)
            our_s = time.perf_counter() - t
            ref, facts = pyradplan_dose(python, phantom, fluence, machine, work, tag)
            facts["our_seconds"] = our_s
            doses[(phantom.name, fname)] = (ours, ref, facts)
            np.savez_compressed(kept, ours=ours, pyradplan=ref)
            print(f"{tag}: this engine {our_s:.1f} s, pyRadPlan {facts['seconds']:.1f} s "
                  f"({int(facts['bixels'])} bixels)", file=sys.stderr)

    cal_ours = reference_dose(doses[("water", "open 10x10")][0], phantoms[0].grid)
    cal_ref = reference_dose(doses[("water", "open 10x10")][1], phantoms[0].grid)
    print(f"\n## Dose engine cross-check against pyRadPlan (SVD pencil beam), {args.spacing_mm:g} mm grid\n")
    print(f"Calibration (open 10 x 10 cm, water, central axis at {ISO_DEPTH_MM:g} mm depth, SSD "
          f"{(1000.0 - ISO_DEPTH_MM) / 10:g} cm): this engine {cal_ours:.5f} Gy per MU, pyRadPlan {cal_ref:.5f} "
          f"per unit bixel weight (ratio {cal_ours / cal_ref:.4f}; the units differ, so all comparisons below use "
          "each engine's own calibration).\n")
    print("| phantom | field | gamma 3%/3mm (calibrated) | same, depth >= 20 mm | gamma 3%/3mm (own max) | "
          "depth dose max abs diff "
          "(20-250 mm) | diff at 10 / 20 cm | profile at 10 cm: max abs diff (in field, flat) | max edge shift "
          "(edges) | d_max pyRadPlan / ours | bone / water at 10 cm, pyRadPlan / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for phantom in phantoms:
        for fname in fields:
            ours, ref, _ = doses[(phantom.name, fname)]
            axis_x = 0.0 if fname.startswith("open") else -24.0
            c = compare(ours / cal_ours, ref / cal_ref, phantom, axis_x, spacing,
                        fluence_edges_mm(fields[fname], machine))
            factor = "-"
            if phantom is not phantoms[0]:
                w_ours, w_ref, _ = doses[(phantoms[0].name, fname)]
                f_ref = _point(ref, phantom.grid, axis_x) / _point(w_ref, phantom.grid, axis_x)
                f_ours = _point(ours, phantom.grid, axis_x) / _point(w_ours, phantom.grid, axis_x)
                factor = f"{f_ref:.3f} / {f_ours:.3f}"
            print(f"| {phantom.name} | {fname} | {c.gamma_cal:.1f} % | {c.gamma_deep:.1f} % | {c.gamma_max:.1f} % | "
                  f"{c.pdd_max_pct:.1f} % | "
                  f"{c.pdd_10_pct:+.1f} / {c.pdd_20_pct:+.1f} % | {c.prof_max_pct:.1f} % | {c.edge_mm:.1f} mm "
                  f"({c.n_edges}) | {c.dmax_ref_mm:.0f} / {c.dmax_ours_mm:.0f} mm | {factor} |")
    print("\nDifferences are this engine minus pyRadPlan, in % of the calibration dose; gamma is global "
          "(3 % of the pyRadPlan maximum), over phantom voxels above 10 % of it, pyRadPlan as the reference. "
          "The IMRT-like depth dose is taken at x = -24 mm (the central axis is blocked). Profile differences "
          "count where the pyRadPlan profile is >= 20 % of its maximum and changes by < 1 % per mm; an edge "
          "position is where the profile crosses the level half-way between its doses 10 mm either side of a "
          "fluence step. The last column is the dose ratio bone slab / water at 10 cm depth on the depth-dose "
          "line, for each engine.")
    print(f"Doses kept in {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
