"""The pyRadPlan half of the dose cross-check: runs inside its own virtual environment, not the project's.

``benchmarks/crosscheck_dose.py`` writes a phantom and a field to an ``.npz`` and runs
``<xcheck venv>/bin/python benchmarks/_xcheck_pyradplan.py IN.npz OUT.npz``. This script imports only
numpy, SimpleITK and pyRadPlan (matRad's photon SVD pencil beam, ``SVDPB``, with the "Generic" 6 MV
machine), never the project's packages.

Input (``IN.npz``)
    ``density`` (nz, ny, nx) relative electron density on the grid (converted to HU by inverting
    pyRadPlan's own default HU look-up table, so both engines see the same density); ``origin_mm``
    and ``spacing_mm`` (x, y, z) of the grid (voxel centres, DICOM LPS, mm); ``iso_mm`` the isocenter
    (x, y, z), mm; ``fluence`` (rows, cols) the field in the project's BEV convention (row = y_b =
    +z at gantry 0 head first supine, column = x_b = +x, ``pixel_mm`` pixels centred on the axis);
    ``pixel_mm``; ``lateral_cutoff_mm`` pyRadPlan's geometric lateral cut-off.

Geometry
    One beam at gantry 0, couch 0 (pyRadPlan: source at ``iso - SAD * y``, the same as the project's
    gantry 0 for a head-first-supine CT). pyRadPlan puts its bixels at multiples of ``pixel_mm`` from
    its isocenter, while the project's pixels are centred at odd multiples of half a pixel; pyRadPlan's
    isocenter is therefore shifted by half a pixel in x and z so that its bixel centres coincide with
    the project's pixel centres at the isocenter plane (the source moves with it by the same 2.5 mm:
    the ray angles differ by < 0.15 degrees, 0.25 mm at 10 cm below the isocenter plane). Each bixel
    gets the weight of the project pixel it lies in.

Output (``OUT.npz``)
    ``dose`` (nz, ny, nx) pyRadPlan's physical dose on the same grid (its own units per unit bixel
    weight), ``n_bixels`` (computed, weight != 0), ``n_rays_generated``, ``seconds``, ``version``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def ct_from_density(density: np.ndarray, origin: list[float], spacing: list[float]) -> object:
    """pyRadPlan's CT of a relative-electron-density grid (z, y, x): the density turned into HU through
    pyRadPlan's own table (its monotonic part above the air plateau), so that pyRadPlan sees our density."""
    import SimpleITK
    from pyRadPlan.ct import validate_ct
    from pyRadPlan.ct._hlut import default_hlut

    hlut = default_hlut("photons")
    keep = np.concatenate([[True], np.diff(hlut[:, 1]) > 0])
    hu = np.interp(density, hlut[keep, 1], hlut[keep, 0]).astype(np.float32)
    img = SimpleITK.GetImageFromArray(hu)  # numpy (z, y, x) -> image (x, y, z)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return validate_ct({"cube_hu": img})


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: _xcheck_pyradplan.py IN.npz OUT.npz", file=sys.stderr)
        return 2
    import logging

    import pyRadPlan
    import SimpleITK
    from pyRadPlan import PhotonPlan, generate_stf
    from pyRadPlan.cst import create_cst, create_voi
    from pyRadPlan.dose.engines import get_engine

    logging.basicConfig(level=logging.WARNING)
    data = np.load(argv[1])
    density = np.asarray(data["density"], dtype=np.float64)
    origin = [float(v) for v in data["origin_mm"]]
    spacing = [float(v) for v in data["spacing_mm"]]
    iso = np.asarray(data["iso_mm"], dtype=np.float64)
    fluence = np.asarray(data["fluence"], dtype=np.float64)
    pixel = float(data["pixel_mm"])
    cutoff = float(data["lateral_cutoff_mm"])
    rows, cols = fluence.shape

    ct = ct_from_density(density, origin, spacing)

    # where the field is open, in the isocenter plane (the project's pixel convention)
    nz, ny, nx = density.shape
    x = origin[0] + spacing[0] * np.arange(nx)
    y = origin[1] + spacing[1] * np.arange(ny)
    z = origin[2] + spacing[2] * np.arange(nz)
    col = np.floor((x - iso[0]) / pixel + cols / 2).astype(int)
    row = np.floor((z - iso[2]) / pixel + rows / 2).astype(int)
    ok_c = (col >= 0) & (col < cols)
    ok_r = (row >= 0) & (row < rows)
    rr, cc = np.meshgrid(np.where(ok_r, row, 0), np.where(ok_c, col, 0), indexing="ij")
    open_zx = (fluence[rr, cc] != 0) & ok_r[:, None] & ok_c[None, :]
    plane = np.abs(y - iso[1]) <= 0.5 * spacing[1] + 1e-6
    target = np.zeros((nz, ny, nx), dtype=np.uint8)
    target[:, plane, :] = open_zx[:, None, :]
    body = np.ones((nz, ny, nx), dtype=np.uint8)
    cst = create_cst([
        create_voi(name="field", voi_type="TARGET", mask=target, ct_image=ct),
        create_voi(name="phantom", voi_type="OAR", mask=body, ct_image=ct),
    ], ct)

    shift = np.array([0.5 * pixel, 0.0, 0.5 * pixel])
    pln = PhotonPlan(machine="Generic")
    pln.prop_stf = {"generator": "photonIMRT", "gantry_angles": [0.0], "couch_angles": [0.0],
                    "bixel_width": pixel, "iso_center": (iso + shift).reshape(1, 3)}
    pln.prop_dose_calc = {"engine": "SVDPB", "dose_grid": ct.grid, "geometric_lateral_cutoff": cutoff,
                          "dosimetric_lateral_cutoff": 1.0}
    stf = generate_stf(ct, cst, pln)

    # each bixel takes the weight of the project pixel it lies in; bixels of weight 0 (the generator's
    # margin around the field) are dropped so they cost no time
    n_all = 0
    for beam in stf.beams:
        kept = []
        for ray in beam.rays:
            pos = np.asarray(ray.ray_pos_bev, dtype=np.float64)
            c = int(np.floor((pos[0] + shift[0]) / pixel + cols / 2))
            r = int(np.floor((pos[2] + shift[2]) / pixel + rows / 2))
            w = float(fluence[r, c]) if 0 <= r < rows and 0 <= c < cols else 0.0
            n_all += 1
            if w != 0.0:
                for beamlet in ray.beamlets:
                    beamlet.weight = w
                kept.append(ray)
        beam.rays = kept
    n_bixels = sum(b.total_number_of_bixels for b in stf.beams)
    engine = get_engine(pln)
    engine.console_progress = False
    t0 = time.perf_counter()
    result = engine.calc_dose_forward(ct, cst, stf, None)
    seconds = time.perf_counter() - t0
    dose_img = result["physical_dose"]
    dose = SimpleITK.GetArrayFromImage(dose_img) if isinstance(dose_img, SimpleITK.Image) else np.asarray(dose_img)
    if dose.shape != density.shape:
        print(f"pyRadPlan returned a dose of shape {dose.shape}, expected {density.shape}", file=sys.stderr)
        return 1
    np.savez_compressed(Path(argv[2]), dose=dose.astype(np.float32), n_bixels=n_bixels, n_rays_generated=n_all, seconds=seconds,
                        version=str(getattr(pyRadPlan, "__version__", "unknown")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
