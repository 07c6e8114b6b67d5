"""Plan evaluation on the CT grid: DVH metrics per structure and the field-size check.

The dose is computed on the (coarse) dose grid; structures are defined on the (fine) CT grid.
Metrics are evaluated on the CT grid inside each structure's bounding box, with the dose
interpolated trilinearly at the CT voxel centres, so small organs are not distorted by a
4 mm mask resampling. Voxels outside the dose grid receive 0 Gy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from core.case import Case, Grid, Role, mask_bbox, mask_voxels
from core.errors import InputError
from pipeline.dvh import paddick_ci as _paddick_ci
from pipeline.dvh import structure_metrics
from pipeline.geometry import ArcGeometry

log = logging.getLogger(__name__)


def dose_at_ct_voxels(dose: NDArray[np.floating[Any]], dose_grid: Grid, ct_grid: Grid,
                      box: tuple[slice, slice, slice]) -> NDArray[np.float32]:
    """Dose (Gy) interpolated trilinearly at the centres of the CT voxels inside ``box`` ([z, y, x] slices);
    0 at a CT voxel outside the dose grid (as ``scipy.ndimage.map_coordinates(order=1, mode="constant")``).

    Both grids are axis-aligned, so trilinear interpolation at the CT's regular points is three 1D linear
    interpolations, one per axis: three small matrix products instead of eight reads per CT voxel.
    """
    cx, cy, cz = ct_grid.axes_mm()
    mats = [_linear_matrix((np.asarray(c[b], dtype=np.float64) - dose_grid.origin_mm[a]) / dose_grid.spacing_mm[a],
                           dose_grid.shape[2 - a])
            for c, b, a in ((cz, box[0], 2), (cy, box[1], 1), (cx, box[2], 0))]
    # torch's matrix products: in the planning process numpy's BLAS threads would compete with torch's
    import torch

    d = torch.from_numpy(np.ascontiguousarray(dose, dtype=np.float32))
    mz, my, mx = (torch.from_numpy(m) for m in mats)
    d = torch.einsum("zyx,cx->zyc", d, mx)
    d = torch.einsum("by,zyc->zbc", my, d)
    d = torch.einsum("az,zbc->abc", mz, d)
    return np.ascontiguousarray(d.numpy(), dtype=np.float32)


def _linear_matrix(f: NDArray[np.float64], n: int) -> NDArray[np.float32]:
    """(len(f), n) weights of 1D linear interpolation at fractional indices ``f`` of ``n`` samples; a row is 0
    where ``f`` lies outside [0, n - 1]."""
    m = np.zeros((f.size, n), dtype=np.float32)
    inside = (f >= 0.0) & (f <= n - 1)
    rows = np.flatnonzero(inside)
    lo = np.minimum(np.floor(f[inside]).astype(np.int64), max(n - 2, 0))
    t = f[inside] - lo
    m[rows, lo] = 1.0 - t
    if n > 1:
        m[rows, lo + 1] = t
    return m


def ct_voxel_stencil(dose_grid: Grid, ct_grid: Grid, mask: NDArray[np.bool_]) -> tuple[NDArray[np.int64],
                                                                                       NDArray[np.float32]]:
    """The trilinear interpolation of :func:`dose_at_ct_voxels` at the CT voxels of ``mask`` as a sparse map:
    ``(P, 8)`` flat indices on the dose grid and their weights, so that the dose at the ``P`` voxels (in
    C order) is ``(dose.reshape(-1)[idx] * w).sum(1)``. Neighbours off the dose grid get weight 0 (index 0),
    as the evaluation's 0 Gy outside the grid."""
    cz, cy, cx = mask_voxels(mask)  # C order, as the mask's
    if cz.size == 0:
        return np.zeros((0, 8), dtype=np.int64), np.zeros((0, 8), dtype=np.float32)
    ax, ay, az = ct_grid.axes_mm()
    frac = [(np.asarray(v, dtype=np.float64) - dose_grid.origin_mm[a]) / dose_grid.spacing_mm[a]
            for v, a in ((az[cz], 2), (ay[cy], 1), (ax[cx], 0))]  # z, y, x in dose-grid index units
    base = [np.floor(f).astype(np.int64) for f in frac]
    t = [f - b for f, b in zip(frac, base, strict=True)]
    nz, ny, nx = dose_grid.shape
    idx = np.zeros((cz.size, 8), dtype=np.int64)
    w = np.zeros((cz.size, 8), dtype=np.float64)
    for corner in range(8):
        dz, dy, dx = (corner >> 2) & 1, (corner >> 1) & 1, corner & 1
        k, j, i = base[0] + dz, base[1] + dy, base[2] + dx
        inside = (k >= 0) & (k < nz) & (j >= 0) & (j < ny) & (i >= 0) & (i < nx)
        weight = ((t[0] if dz else 1.0 - t[0]) * (t[1] if dy else 1.0 - t[1]) * (t[2] if dx else 1.0 - t[2]))
        idx[:, corner] = np.where(inside, (k * ny + j) * nx + i, 0)
        w[:, corner] = np.where(inside, weight, 0.0)
    return idx, w.astype(np.float32)


class CtDose(NamedTuple):
    """A structure's dose on the CT grid: the dose at the CT voxels of its bounding box, its mask there and
    the box ([z, y, x] slices of the CT grid)."""

    dose: NDArray[np.float32]
    mask: NDArray[np.bool_]
    box: tuple[slice, slice, slice]


def structure_dvh_inputs(dose: NDArray[np.floating[Any]], dose_grid: Grid, case: Case,
                         role: Role) -> tuple[NDArray[np.float32], NDArray[np.bool_]] | None:
    """(dose at the structure's CT voxels, mask) inside its bounding box, or None when empty."""
    got = ct_structure_doses(dose, dose_grid, case, (role,)).get(role)
    return None if got is None else (got.dose, got.mask)


def ct_structure_doses(dose: NDArray[np.floating[Any]], dose_grid: Grid, case: Case,
                       roles: Sequence[Role] | None = None) -> dict[Role, CtDose]:
    """For each role (default: every role of the case) with a non-empty mask: its :class:`CtDose`. The dose
    is interpolated once, over the box holding them all, and each structure reads its part (the same
    values as interpolating each box alone)."""
    boxes = {r: box for r in (roles if roles is not None else list(case.masks))
             if r in case.masks and (box := mask_bbox(case.masks[r])) is not None}
    if not boxes:
        return {}
    union = tuple(slice(min(b[a].start for b in boxes.values()), max(b[a].stop for b in boxes.values()))
                  for a in range(3))
    d_all = dose_at_ct_voxels(dose, dose_grid, case.grid, union)  # type: ignore[arg-type]
    return {r: CtDose(d_all[tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, union, strict=True))],
                      case.masks[r][box], box) for r, box in boxes.items()}


def evaluate_structures(dose: NDArray[np.floating[Any]], dose_grid: Grid, case: Case) -> dict[str, dict[str, Any]]:
    """DVH metrics of every role present in the case, keyed by role value.

    Each entry holds the original structure name and the metrics of
    :func:`pipeline.dvh.structure_metrics` (keys with units: ``Dmean_Gy``, ``volume_cm3`` ...).
    The PTV also gets the Paddick conformity index, computed with the body's prescription isodose
    volume.
    """
    rx = case.prescription.dose_gy
    vcc = case.grid.voxel_volume_cc
    doses = ct_structure_doses(dose, dose_grid, case)
    out: dict[str, dict[str, Any]] = {}
    for role in Role:
        if role not in case.masks:
            continue
        inputs = doses.get(role)
        if inputs is None:
            log.warning("structure %s is empty on the CT grid; no metrics", role.value)
            continue
        metrics = structure_metrics(inputs.dose, inputs.mask, vcc, rx_gy=rx)
        out[role.value] = {"name": case.structure_names.get(role, role.value), **metrics}
    ptv = out.get(Role.PTV.value)
    if ptv is not None:
        ptv["CI_paddick"] = paddick_ci(dose, dose_grid, case, body=doses.get(Role.BODY))
    return out


def paddick_ci(dose: NDArray[np.floating[Any]], dose_grid: Grid, case: Case, *, body: CtDose | None = None) -> float:
    """Paddick conformity index (TV_PIV^2 / (TV x PIV)) at the prescription isodose, on the CT grid.

    PIV is counted inside the body (or the whole dose grid when there is no body structure); ``body`` is
    the body's :class:`CtDose` when the caller has it already.
    """
    rx = case.prescription.dose_gy
    if body is None:
        region = case.masks.get(Role.BODY)
        if region is None or not region.any():
            region = np.ones(case.grid.shape, dtype=bool)
        box = mask_bbox(region)
        assert box is not None
        body = CtDose(dose_at_ct_voxels(dose, dose_grid, case.grid, box), region[box], box)
    ptv = case.masks[Role.PTV][body.box]
    if not ptv.any():
        return 0.0
    return _paddick_ci(body.dose, ptv, rx_gy=rx, body_mask=body.mask)


def check_ptv_fits_field(case: Case, geometry: ArcGeometry, *, margin_mm: float = 5.0) -> float:
    """Refuse a PTV whose projection does not fit in the BEV field at every control point.

    Returns the largest half-extent (mm, at the isocenter plane) of the PTV over all sectors.
    """
    k, j, i = mask_voxels(case.masks[Role.PTV])
    if k.size > 20000:  # surface-ish subsample: the extremes are what matter
        sel = np.linspace(0, k.size - 1, 20000).astype(np.int64)
        k, j, i = k[sel], j[sel], i[sel]
    ox, oy, oz = case.grid.origin_mm
    dx, dy, dz = case.grid.spacing_mm
    pts = np.stack([ox + dx * i, oy + dy * j, oz + dz * k], axis=1) - np.asarray(geometry.isocenter_mm)
    sad = geometry.machine.sad_mm
    half_x = geometry.machine.bev.half_width_mm
    half_y = geometry.machine.bev.half_height_mm
    worst_x = worst_y = 0.0
    for rot in geometry.sector_rotations():
        b = pts @ rot  # beam-frame coordinates (x, y, z towards the source)
        scale = sad / (sad - b[:, 2])
        worst_x = max(worst_x, float(np.max(np.abs(b[:, 0] * scale))) + 0.5 * dx)
        worst_y = max(worst_y, float(np.max(np.abs(b[:, 1] * scale))) + 0.5 * dz)
    if worst_y + margin_mm > half_y:
        raise InputError(
            f"the PTV extends {worst_y:.0f} mm from the isocenter along the leaf-pair axis; the "
            f"{2 * half_y:.0f} mm field of the 5 mm leaves holds at most {half_y - margin_mm:.0f} mm: "
            "this planner cannot treat a PTV this long (split the target or plan it in the TPS)"
        )
    if worst_x + margin_mm > half_x:
        raise InputError(
            f"the PTV extends {worst_x:.0f} mm from the isocenter along the leaf-travel axis; the "
            f"BEV field holds at most {half_x - margin_mm:.0f} mm: plan this target in the TPS"
        )
    return max(worst_x, worst_y)
