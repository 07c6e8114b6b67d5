"""The reference dose engine's ray trace on the CPU (numba): radiological depth and low-density fraction
at every (control point, dose voxel), without intermediate sample tensors.

:meth:`pipeline.dose_engine.ReferenceDoseEngine._trace` describes the method; this kernel computes the
same quantities as its torch path, control point by control point (parallel over control points):

1. the fan coordinates ``(u, v)`` and source distance ``t`` of every voxel in the beam frame;
2. the ray lattice of the control point (rays through isocenter-plane nodes every ``ray_mm``, the
   smallest lattice of multiples of ``ray_mm`` holding every voxel's neighbouring rays, capped at the
   fluence lattice's half widths; planes every ``dt`` from ``t0``): each ray is marched through the
   zero-padded density (trilinear, zero outside the grid), its radiological depth accumulated
   (midpoint rule, obliquity-corrected step) and its upstream equilibrium density recursed; the
   lattice holds (depth, low-density fraction) per sample, zero-padded by one node on every side;
3. the lattice is read trilinearly at every voxel (zero beyond the lattice, as ``grid_sample``).

Only the rays some voxel reads are marched, each only as deep as its deepest reader: the values any
voxel reads are those of the full lattice. Positions, depths, the recursion and the lattice are
float64 (reads without conversions); the outputs keep the volume's precision (float32 or float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from pipeline.map_sampling import kernel_threads


@njit(inline="always", fastmath=True)
def _lerp(a: float, b: float, f: float) -> float:  # pragma: no cover - compiled
    """Linear interpolation from ``a`` (f = 0) to ``b`` (f = 1)."""
    return a + f * (b - a)


@njit(inline="always", fastmath=True)
def _trilinear(v: NDArray[Any], px: float, py: float, pz: float, h2: int, w2: int, d2: int) -> float:  # pragma: no cover - compiled
    """Trilinear read of the zero-padded volume ``v`` (flat, shape (d2, h2, w2)) at padded index
    coordinates; 0 outside the padded grid."""
    if not (px >= 0.0 and py >= 0.0 and pz >= 0.0 and px < w2 - 1 and py < h2 - 1 and pz < d2 - 1):
        return 0.0
    i = int(px)
    j = int(py)
    k = int(pz)
    fx = px - i
    fy = py - j
    fz = pz - k
    uw = np.uint64(w2)
    uhw = np.uint64(h2 * w2)
    one = np.uint64(1)
    o = (np.uint64(k) * np.uint64(h2) + np.uint64(j)) * uw + np.uint64(i)
    a0, a1, a2, a3 = v[o], v[o + one], v[o + uw], v[o + uw + one]
    o += uhw
    b0, b1, b2, b3 = v[o], v[o + one], v[o + uw], v[o + uw + one]
    lower = _lerp(_lerp(a0, a1, fx), _lerp(a2, a3, fx), fy)
    return _lerp(lower, _lerp(_lerp(b0, b1, fx), _lerp(b2, b3, fx), fy), fz)


@njit(cache=True, parallel=True, fastmath=True, boundscheck=False)
def _trace_kernel(dens: NDArray[Any], rot: NDArray[np.float64], t0: NDArray[np.float64], nt: int, dt: float,
                  points: NDArray[Any], origin: NDArray[np.float64], spacing: NDArray[np.float64], sad: float,
                  ray: float, half_u: float, half_v: float, decay: float, inv_onset: float, inv_ref: float,
                  grid_xy: NDArray[Any], rad: NDArray[Any], inv_sq: NDArray[Any],
                  alpha: NDArray[Any]) -> None:  # pragma: no cover - compiled
    d2, h2, w2 = dens.shape
    vol = dens.ravel()
    n_cp = rot.shape[0]
    n_vox = points.shape[1]
    inv_ray = 1.0 / ray
    inv_dt = 1.0 / dt
    ku = math.ceil(half_u / ray)  # the lattice never reaches beyond node +-ku (+-kv)
    kv = math.ceil(half_v / ray)
    lat_u, lat_v = 2 * ku + 3, 2 * kv + 3  # padded node counts of the largest lattice
    for k in prange(n_cp):
        r = rot[k]
        # 1. fan coordinates of the voxels; extent of the lattice; the deepest plane each ray is read at
        depth = np.full((lat_v, lat_u), -1, dtype=np.int64)
        u_max = 0.0
        v_max = 0.0
        for n in range(n_vox):
            px, py, pz = float(points[0, n]), float(points[1, n]), float(points[2, n])
            tv = sad - (r[0, 2] * px + r[1, 2] * py + r[2, 2] * pz)
            u = (r[0, 0] * px + r[1, 0] * py + r[2, 0] * pz) * sad / tv
            v = (r[0, 1] * px + r[1, 1] * py + r[2, 1] * pz) * sad / tv
            grid_xy[k, n, 0] = u / half_u
            grid_xy[k, n, 1] = v / half_v
            u_max = max(u_max, abs(u))
            v_max = max(v_max, abs(v))
            # padded node indices of the largest lattice; the voxel reads nodes (iu, iu + 1) x (iv, iv + 1)
            fu = u * inv_ray + (ku + 1)
            fv = v * inv_ray + (kv + 1)
            if fu >= 0.0 and fv >= 0.0 and fu < lat_u - 1 and fv < lat_v - 1:
                iu = int(fu)
                iv = int(fv)
                it = int((tv - t0[k]) * inv_dt) + 1
                for jv in range(iv, iv + 2):
                    for ju in range(iu, iu + 2):
                        depth[jv, ju] = max(depth[jv, ju], it)
        hu = ray * math.ceil(min(half_u, u_max + ray) / ray)
        hv = ray * math.ceil(min(half_v, v_max + ray) / ray)
        nu = round(2.0 * hu / ray) + 1
        nv = round(2.0 * hv / ray) + 1
        su = ku - (nu - 1) // 2  # offset of this lattice's nodes in the largest one
        sv = kv - (nv - 1) // 2
        # 2. march the rays; lattice (v, u, t, channel) zero-padded by one node on every side
        lat = np.zeros((nv + 2, nu + 2, nt + 2, 2))  # float64: reads without conversions
        for iv in range(nv):
            vv = -hv + iv * ray
            for iu in range(nu):
                last = min(depth[iv + 1 + sv, iu + 1 + su], nt - 1)
                if last < 0:
                    continue  # no voxel reads this ray
                uu = -hu + iu * ray
                ds = dt * math.sqrt(1.0 + (uu * uu + vv * vv) / (sad * sad))
                # sample s at distance t = t0 + s dt from the source: beam frame (uu t / sad, vv t / sad, sad - t);
                # padded index coordinates q + s dq
                sx = (r[0, 0] * uu + r[0, 1] * vv) / sad - r[0, 2]
                sy = (r[1, 0] * uu + r[1, 1] * vv) / sad - r[1, 2]
                sz = (r[2, 0] * uu + r[2, 1] * vv) / sad - r[2, 2]
                qx = (r[0, 2] * sad + t0[k] * sx - origin[0]) / spacing[0] + 1.0
                qy = (r[1, 2] * sad + t0[k] * sy - origin[1]) / spacing[1] + 1.0
                qz = (r[2, 2] * sad + t0[k] * sz - origin[2]) / spacing[2] + 1.0
                dx, dy, dz = dt * sx / spacing[0], dt * sy / spacing[1], dt * sz / spacing[2]
                cell = lat[iv + 1, iu + 1]
                cum = 0.0
                acc = 1.0
                for s in range(last + 1):
                    rho = float(_trilinear(vol, qx + s * dx, qy + s * dy, qz + s * dz, h2, w2, d2))
                    inc = rho * ds
                    cum += inc
                    dep = cum - 0.5 * inc
                    src = 1.0 if dep < 0.5 else rho  # air in front of the surface counts as equilibrium
                    acc = src if s == 0 else decay * acc + (1.0 - decay) * src
                    inv = 1.0 / max(acc, 1e-3)
                    cell[s + 1, 0] = dep
                    cell[s + 1, 1] = min(max((inv - inv_onset) / (inv_ref - inv_onset), 0.0), 1.0)
        # 3. read the lattice at the voxels
        flat = lat.ravel()
        st = np.uint64(2)
        su_ = np.uint64(2 * (nt + 2))
        sv_ = np.uint64(2 * (nt + 2) * (nu + 2))
        for n in range(n_vox):
            px, py, pz = float(points[0, n]), float(points[1, n]), float(points[2, n])
            tv = sad - (r[0, 2] * px + r[1, 2] * py + r[2, 2] * pz)
            u = (r[0, 0] * px + r[1, 0] * py + r[2, 0] * pz) * sad / tv
            v = (r[0, 1] * px + r[1, 1] * py + r[2, 1] * pz) * sad / tv
            q = sad / tv
            inv_sq[k, n] = q * q
            fu = (u + hu) * inv_ray + 1.0
            fv = (v + hv) * inv_ray + 1.0
            ft = (tv - t0[k]) * inv_dt + 1.0
            if not (fu >= 0.0 and fv >= 0.0 and ft >= 0.0 and fu < nu + 1 and fv < nv + 1 and ft < nt + 1):
                rad[k, n] = 0.0
                alpha[k, n] = 0.0
                continue
            iu = int(fu)  # truncation = floor here (fu >= 0); fractions from signed integers convert fast
            iv = int(fv)
            it = int(ft)
            wu = fu - iu
            wv = fv - iv
            wt = ft - it
            o = np.uint64(iv) * sv_ + np.uint64(iu) * su_ + np.uint64(it) * st
            for c in range(2):
                oc = o + np.uint64(c)
                a0, a1 = flat[oc], flat[oc + st]
                a2, a3 = flat[oc + su_], flat[oc + su_ + st]
                b0, b1 = flat[oc + sv_], flat[oc + sv_ + st]
                b2, b3 = flat[oc + sv_ + su_], flat[oc + sv_ + su_ + st]
                lower = _lerp(_lerp(a0, a1, wt), _lerp(a2, a3, wt), wu)  # along t, then u, then v
                val = _lerp(lower, _lerp(_lerp(b0, b1, wt), _lerp(b2, b3, wt), wu), wv)
                if c == 0:
                    rad[k, n] = val
                else:
                    alpha[k, n] = val


#: Control points per kernel call of :func:`trace`: chunks of about this many (control point, voxel) pairs, so
#: that the radiological depths and inverse-square factors handed to ``sink`` stay in the processor's
#: cache while the depth weights are computed from them (1-2 control points of a pelvis body, the whole
#: arc of a restricted engine). On a 345,000-voxel, 180-control-point arc the depth weights took 0.95 s
#: from whole-arc arrays and 0.45 s chunk by chunk.
CHUNK_PAIRS = 700_000


def trace(density: NDArray[Any], rot: NDArray[np.float64], t0: NDArray[np.float64], nt: int, dt: float,
          points: NDArray[Any], origin: NDArray[np.float64], spacing: NDArray[np.float64], *, sad: float,
          ray_mm: float, half_u: float, half_v: float, decay: float, low_density_onset: float,
          low_density_reference: float,
          sink: Callable[[int, NDArray[Any], NDArray[Any]], None]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Trace the rays of every control point and read them at the dose voxels, a chunk of control points
    (:data:`CHUNK_PAIRS`) at a time.

    Parameters
    ----------
    density
        Relative electron density (D, H, W) on the dose grid, float32 or float64 (the precision of the
        lattice and the outputs).
    rot
        (n_cp, 3, 3) beam-to-patient rotations.
    t0, nt, dt
        Per control point, the source distance of the first plane (mm); the number of planes; their step (mm).
    points
        (3, N) voxel positions relative to the isocenter, mm (x, y, z rows).
    origin, spacing
        Position of voxel (0, 0, 0) relative to the isocenter, and the voxel spacing, mm, (x, y, z).
    sad, ray_mm, half_u, half_v
        Source-axis distance, lateral spacing of the rays, half widths of the fluence lattice (mm).
    decay
        Per-plane factor of the upstream equilibrium-density recursion, ``exp(-dt / length)``.
    low_density_onset, low_density_reference
        The beam model's densities of :meth:`pipeline.beam_model.BeamModel.low_density_fraction`.
    sink
        Called once per chunk, in order, with the chunk's first control point and its radiological depth
        (mm) and inverse-square factor ``(SAD / t)^2``, each (chunk, N) in the density's dtype; the
        arrays are reused for the next chunk (copy what must outlive the call).

    Returns
    -------
    tuple of numpy.ndarray
        ``(grid_xy, alpha)``: fan coordinates over the half widths (n_cp, N, 2) and low-density fraction
        (n_cp, N), in the density's dtype.
    """
    dens = np.pad(np.asarray(density), 1)
    pts = np.ascontiguousarray(points)
    rot = np.ascontiguousarray(rot, dtype=np.float64)
    t0 = np.ascontiguousarray(t0, dtype=np.float64)
    origin = np.asarray(origin, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    n_cp, n_vox = rot.shape[0], pts.shape[1]
    grid_xy = np.empty((n_cp, n_vox, 2), dtype=dens.dtype)
    alpha = np.empty((n_cp, n_vox), dtype=dens.dtype)
    with kernel_threads():
        threads = numba.get_num_threads()  # whole multiples of the threads: the kernel is parallel over control points
        chunk = min(n_cp, threads * max(1, CHUNK_PAIRS // max(1, threads * n_vox)))
        rad, inv_sq = (np.empty((chunk, n_vox), dtype=dens.dtype) for _ in range(2))
        for s in range(0, n_cp, chunk):
            e = min(n_cp, s + chunk)
            _trace_kernel(dens, rot[s:e], t0[s:e], int(nt), float(dt), pts, origin, spacing, float(sad),
                          float(ray_mm), float(half_u), float(half_v), float(decay), 1.0 / low_density_onset,
                          1.0 / low_density_reference, grid_xy[s:e], rad[:e - s], inv_sq[:e - s], alpha[s:e])
            sink(s, rad[:e - s], inv_sq[:e - s])
    return grid_xy, alpha
