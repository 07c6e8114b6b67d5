"""Gamma index (Low et al. 1998) between two doses on the same regular grid (numpy, torch-free).

Global gamma: the dose criterion is a percentage of the reference maximum; the evaluated dose is
searched at sub-voxel shifts (``step_mm``) within the distance-to-agreement sphere, sampled by
trilinear interpolation. Voxels whose reference dose is below ``threshold`` x max are ignored.
Searching only |shift| <= DTA is exact for the pass rate (a shift beyond DTA alone gives gamma > 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.ndimage import map_coordinates


def gamma_pass_rate(
    reference: NDArray[Any],
    evaluated: NDArray[Any],
    spacing_mm: tuple[float, float, float],
    *,
    dose_percent: float = 3.0,
    dta_mm: float = 3.0,
    threshold: float = 0.1,
    step_mm: float = 1.0,
    mask: NDArray[np.bool_] | None = None,
) -> float:
    """Fraction (0-1) of evaluated voxels with gamma <= 1.

    Parameters
    ----------
    reference, evaluated
        Doses on the same grid, indexed [z, y, x]; any unit, the same for both.
    spacing_mm
        (dx, dy, dz) voxel size, mm.
    dose_percent
        Dose criterion, % of the reference maximum (global gamma).
    dta_mm
        Distance-to-agreement criterion, mm.
    threshold
        Only voxels with reference >= threshold x reference maximum count (0-1).
    step_mm
        Search step of the shifts, mm (smaller is more exact and slower).
    mask
        Optional extra restriction of the voxels that count.
    """
    ref = np.asarray(reference, dtype=np.float64)
    ev = np.asarray(evaluated, dtype=np.float64)
    if ref.shape != ev.shape:
        raise ValueError(f"gamma needs doses on one grid, got {ref.shape} and {ev.shape}")
    dmax = float(ref.max())
    if dmax <= 0:
        raise ValueError("the reference dose is zero everywhere")
    sel = ref >= threshold * dmax
    if mask is not None:
        sel &= mask
    idx = np.nonzero(sel)
    if idx[0].size == 0:
        raise ValueError("no voxel above the gamma threshold")
    dd = dose_percent / 100.0 * dmax
    r = ref[idx]
    best = ((ev[idx] - r) / dd) ** 2
    dx, dy, dz = spacing_mm
    n = int(np.floor(dta_mm / step_mm))
    offsets = np.arange(-n, n + 1) * step_mm
    coords = np.stack(idx).astype(np.float64)
    for oz in offsets:
        for oy in offsets:
            for ox in offsets:
                dist2 = ox * ox + oy * oy + oz * oz
                if dist2 == 0 or dist2 > dta_mm * dta_mm + 1e-9:
                    continue
                shifted = coords + np.array([[oz / dz], [oy / dy], [ox / dx]])
                vals = map_coordinates(ev, shifted, order=1, mode="nearest")
                g2 = dist2 / dta_mm**2 + ((vals - r) / dd) ** 2
                np.minimum(best, g2, out=best)
    return float(np.mean(best <= 1.0))
