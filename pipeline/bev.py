"""Beam's-eye-view projection (AIRT eq. 2 and 13): a parameter-free, differentiable torch module.

For every control point (sector centre) of the arc, a volume on the dose grid is sampled along the
divergent rays from the source through the centre of every BEV pixel (the fluence-map convention of
``core.machine``: row = leaf-pair axis ``y_b``, column = leaf-travel axis ``x_b``, 5 mm at the
isocenter plane, 20 x 20 cm) and **averaged** over the ray segment that crosses the grid's bounding
box (``depth_samples`` equidistant samples between the box's nearest and farthest planes along the
beam axis; samples outside the grid count as 0). The result is linear in the volume, so its adjoint
(autograd) spreads a BEV map back along the same rays.

Two interchangeable back-ends compute the same samples (trilinear, zero outside the grid):

* ``"numba"`` (CPU): a ray-marching kernel. Every ray is a straight line in voxel-index space, so a
  sample's position is ``start + s * step``; only the samples inside the (zero-padded) grid are
  visited, and the mean is accumulated without storing the samples. The adjoint is the same march
  scattering the output gradient back (one accumulation buffer per thread). No per-sample
  coordinates are stored (set-up is a few milliseconds and a few MB).
* ``"torch"`` (any device): precomputed sample coordinates read by the 2D ``grid_sample`` kernel on
  the tiled volume (see :func:`pipeline.dose_engine.trilinear_plan`); the path for CUDA. It stores
  12 bytes per sample (about 0.2 GB for 180 control points of 40 x 40 rays at 64 samples per ray).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange
from numpy.typing import NDArray

from core.case import Grid
from core.errors import PlanningError
from pipeline.dose_engine import depth_range_mm, sample_planned, trilinear_plan
from pipeline.geometry import ArcGeometry
from pipeline.map_sampling import kernel_threads, numba_threads

log = logging.getLogger(__name__)

BACKENDS = ("auto", "numba", "torch")
"""Accepted values of ``BevProjector(backend=...)``; "auto" is numba on CPU, torch elsewhere."""


# ---------------------------------------------------------------------------------------------------
# Numba kernels (private). Volumes are zero-padded by one voxel on every side, shape (B, D+2, H+2, W+2);
# ray positions are in padded index coordinates (x along W, y along H, z along D); a ray visits the
# samples s_lo[r] .. s_hi[r] (inclusive, possibly empty) that lie inside the padded grid.
# ---------------------------------------------------------------------------------------------------


# fastmath: the volumes are finite, and letting the compiler fuse and reorder the interpolation's
# arithmetic halves the time; indices are unsigned (no negative-index wrap-around test per load) and
# need no clamping because the sample range keeps every position inside the padded grid.


@njit(inline="always", fastmath=True)
def _ray_origin(start: NDArray[np.float64], step: NDArray[np.float64], s_lo: NDArray[np.int64],
                r: int) -> tuple[float, float, float, float, float, float]:  # pragma: no cover - compiled
    """Position of ray ``r``'s first sample and its step (padded index coordinates)."""
    dx, dy, dz = step[r, 0], step[r, 1], step[r, 2]
    s0 = s_lo[r]
    return start[r, 0] + s0 * dx, start[r, 1] + s0 * dy, start[r, 2] + s0 * dz, dx, dy, dz


@njit(inline="always", fastmath=True)
def _cell(px: float, py: float, pz: float, uh: np.uint64,
          uw: np.uint64) -> tuple[np.uint64, float, float, float]:  # pragma: no cover - compiled
    """Flat index of the lower corner of the cell holding a position, and the position's fractions in it."""
    i = np.uint64(px)
    j = np.uint64(py)
    k = np.uint64(pz)
    return (k * uh + j) * uw + i, px - i, py - j, pz - k


@njit(cache=True, parallel=True, fastmath=True)
def _ray_mean_kernel(vol: NDArray[Any], start: NDArray[np.float64], step: NDArray[np.float64],
                     s_lo: NDArray[np.int64], s_hi: NDArray[np.int64], inv_n: float,
                     out: NDArray[Any]) -> None:  # pragma: no cover - compiled
    nb, _, h2, w2 = vol.shape
    uh, uw, uhw = np.uint64(h2), np.uint64(w2), np.uint64(h2 * w2)
    one, uw1 = np.uint64(1), np.uint64(w2 + 1)
    n_rays = start.shape[0]
    for b in range(nb):
        v = vol[b].ravel()
        for r in prange(n_rays):
            acc = 0.0
            px, py, pz, dx, dy, dz = _ray_origin(start, step, s_lo, r)
            for _s in range(s_lo[r], s_hi[r] + 1):
                o, fx, fy, fz = _cell(px, py, pz, uh, uw)
                a0, a1, a2, a3 = v[o], v[o + one], v[o + uw], v[o + uw1]
                o += uhw
                b0, b1, b2, b3 = v[o], v[o + one], v[o + uw], v[o + uw1]
                c00 = a0 + fx * (a1 - a0)
                c01 = a2 + fx * (a3 - a2)
                c10 = b0 + fx * (b1 - b0)
                c11 = b2 + fx * (b3 - b2)
                c0 = c00 + fy * (c01 - c00)
                c1 = c10 + fy * (c11 - c10)
                acc += c0 + fz * (c1 - c0)
                px += dx
                py += dy
                pz += dz
            out[b, r] = acc * inv_n


@njit(cache=True, parallel=True, fastmath=True)
def _ray_mean_adjoint_kernel(grad: NDArray[Any], start: NDArray[np.float64], step: NDArray[np.float64],
                             s_lo: NDArray[np.int64], s_hi: NDArray[np.int64], inv_n: float,
                             buf: NDArray[Any]) -> None:  # pragma: no cover - compiled
    n_threads, nb, _, h2, w2 = buf.shape
    uh, uw, uhw = np.uint64(h2), np.uint64(w2), np.uint64(h2 * w2)
    one, uw1 = np.uint64(1), np.uint64(w2 + 1)
    n_rays = start.shape[0]
    for t in prange(n_threads):
        r0 = (n_rays * t) // n_threads
        r1 = (n_rays * (t + 1)) // n_threads
        for b in range(nb):
            a = buf[t, b].ravel()
            for r in range(r0, r1):
                g = grad[b, r] * inv_n
                if g == 0.0:
                    continue
                px, py, pz, dx, dy, dz = _ray_origin(start, step, s_lo, r)
                for _s in range(s_lo[r], s_hi[r] + 1):
                    o, fx, fy, fz = _cell(px, py, pz, uh, uw)
                    g1 = g * fz
                    g0 = g - g1
                    g01 = g0 * fy
                    g00 = g0 - g01
                    g11 = g1 * fy
                    g10 = g1 - g11
                    a[o] += g00 - g00 * fx
                    a[o + one] += g00 * fx
                    a[o + uw] += g01 - g01 * fx
                    a[o + uw1] += g01 * fx
                    o += uhw
                    a[o] += g10 - g10 * fx
                    a[o + one] += g10 * fx
                    a[o + uw] += g11 - g11 * fx
                    a[o + uw1] += g11 * fx
                    px += dx
                    py += dy
                    pz += dz


class _RayPlan:
    """Straight-ray description of the samples of a projector (numba back-end), numpy on the CPU.

    ``start`` and ``step`` (n_rays, 3) are padded index coordinates (x, y, z) of sample 0 and the
    increment per sample; ``s_lo``/``s_hi`` (n_rays,) the first and last sample inside the padded grid.
    """

    def __init__(self, start: NDArray[np.float64], step: NDArray[np.float64], shape: tuple[int, int, int],
                 n_samples: int) -> None:
        d, h, w = shape
        eps = 1e-6  # samples within eps of the padded grid's faces read (almost) only padding: skipped
        upper = np.array([w + 1.0, h + 1.0, d + 1.0]) - eps
        lo = np.full(start.shape[0], -np.inf)
        hi = np.full(start.shape[0], np.inf)
        for ax in range(3):  # keep eps < start + s * step < upper along every axis
            p0, dp = start[:, ax], step[:, ax]
            inside = (p0 > eps) & (p0 < upper[ax])
            moving = dp != 0.0
            safe = np.where(moving, dp, 1.0)
            a, b = (eps - p0) / safe, (upper[ax] - p0) / safe
            lo = np.maximum(lo, np.where(moving, np.minimum(a, b), np.where(inside, -np.inf, np.inf)))
            hi = np.minimum(hi, np.where(moving, np.maximum(a, b), np.where(inside, np.inf, -np.inf)))
        # samples strictly inside (every index and index + 1 then lies in the padded grid)
        lo = np.clip(np.floor(lo) + 1.0, 0.0, float(n_samples))
        hi = np.clip(np.ceil(hi) - 1.0, -1.0, n_samples - 1.0)
        self.s_lo = lo.astype(np.int64)
        self.s_hi = hi.astype(np.int64)
        self.start = np.ascontiguousarray(start)
        self.step = np.ascontiguousarray(step)
        self.n_samples = int(n_samples)

    def n_visited(self) -> int:
        """Number of samples the kernel evaluates (inside the grid) over all rays."""
        return int(np.maximum(self.s_hi - self.s_lo + 1, 0).sum())


class _RayMean(torch.autograd.Function):
    """Autograd wrapper of the numba kernels: (B, D, H, W) CPU volume -> (B, n_rays) ray means."""

    @staticmethod
    def forward(ctx: Any, vol: torch.Tensor, plan: _RayPlan) -> torch.Tensor:  # type: ignore[override]
        padded = F.pad(vol.detach(), (1, 1, 1, 1, 1, 1)).contiguous().numpy()
        out = np.empty((vol.shape[0], plan.start.shape[0]), dtype=padded.dtype)
        with kernel_threads():
            _ray_mean_kernel(padded, plan.start, plan.step, plan.s_lo, plan.s_hi, 1.0 / plan.n_samples, out)
        ctx.plan = plan
        ctx.vol_shape = tuple(vol.shape)
        ctx.dtype = vol.dtype
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        plan: _RayPlan = ctx.plan
        b, d, h, w = ctx.vol_shape
        g = grad_out.detach().to(ctx.dtype).contiguous().numpy()
        n_threads = numba_threads()
        buf = np.zeros((n_threads, b, d + 2, h + 2, w + 2), dtype=g.dtype)
        with kernel_threads(n_threads):
            _ray_mean_adjoint_kernel(g, plan.start, plan.step, plan.s_lo, plan.s_hi, 1.0 / plan.n_samples, buf)
        grad = buf.sum(axis=0)[:, 1:-1, 1:-1, 1:-1]
        return torch.from_numpy(np.ascontiguousarray(grad)), None


class BevProjector(torch.nn.Module):
    """Project volumes on ``grid`` into the BEV of every control point of an arc.

    Parameters
    ----------
    grid
        Grid of the volumes to project (the dose grid).
    geometry
        Arc, isocenter, patient position and machine (SAD and BEV grid).
    depth_samples
        Samples per ray (>= 2) across the grid's depth extent.
    device
        Torch device of the sampling coordinates and of the computation.
    dtype
        Floating dtype of the computation (volumes are cast to it; float32 or float64).
    backend
        "auto" (numba on a CPU device, torch otherwise), "numba" (CPU only) or "torch". Both give the
        same projection (to floating-point rounding) and the same gradients.
    """

    grid0: torch.Tensor
    frac: torch.Tensor

    def __init__(self, grid: Grid, geometry: ArcGeometry, *, depth_samples: int = 64,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 backend: str = "auto") -> None:
        super().__init__()
        if depth_samples < 2:
            raise PlanningError(f"depth_samples must be >= 2, got {depth_samples}")
        if backend not in BACKENDS:
            raise PlanningError(f"BEV projector backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.grid = grid
        self.geometry = geometry
        self.depth_samples = int(depth_samples)
        self.device = torch.device(device)
        self.dtype = dtype
        if backend == "auto":
            backend = "numba" if self.device.type == "cpu" else "torch"
        if backend == "numba" and (self.device.type != "cpu" or dtype not in (torch.float32, torch.float64)):
            raise PlanningError(f"the numba BEV back-end runs on the CPU in float32/float64 only, got device "
                                f"{self.device} and {dtype}; use backend='torch'")
        self.backend = backend
        bev = geometry.machine.bev
        sad = geometry.machine.sad_mm
        rot = geometry.sector_rotations()
        n_cp = rot.shape[0]
        self.out_shape = (n_cp, bev.n_rows, bev.n_cols)
        t_range = depth_range_mm(grid, rot, geometry.isocenter_mm, sad, pad_mm=0.0)
        xc = 0.5 * (bev.col_edges_mm()[1:] + bev.col_edges_mm()[:-1])
        yc = 0.5 * (bev.row_edges_mm()[1:] + bev.row_edges_mm()[:-1])
        yy, xx = np.meshgrid(yc, xc, indexing="ij")  # (rows, cols)
        if backend == "numba":
            self.plan = self._ray_plan(rot, t_range, xx, yy)
            log.debug("BEV projector (numba): %d rays, %d of %d samples inside the grid %s", self.plan.start.shape[0],
                      self.plan.n_visited(), self.plan.start.shape[0] * self.depth_samples, grid.shape)
            return
        steps = np.linspace(0.0, 1.0, self.depth_samples)
        t = t_range[:, :1] + (t_range[:, 1:] - t_range[:, :1]) * steps[None, :]  # (n_cp, S)
        dev = self.device
        f = torch.as_tensor(t / sad, dtype=dtype, device=dev)[:, None, None, :]  # (n_cp, 1, 1, S)
        zb = torch.as_tensor(sad - t, dtype=dtype, device=dev)[:, None, None, :]
        xx_t = torch.as_tensor(xx, dtype=dtype, device=dev)[None, :, :, None]
        yy_t = torch.as_tensor(yy, dtype=dtype, device=dev)[None, :, :, None]
        r = torch.as_tensor(rot, dtype=dtype, device=dev)
        axes = []
        for ax in range(3):  # patient axis ax of every sample, as a fractional voxel index
            pa = (r[:, ax, 0, None, None, None] * xx_t * f + r[:, ax, 1, None, None, None] * yy_t * f
                  + r[:, ax, 2, None, None, None] * zb)
            axes.append((pa + (geometry.isocenter_mm[ax] - grid.origin_mm[ax])) / grid.spacing_mm[ax])
        idx = torch.stack(axes, dim=-1)  # (n_cp, rows, cols, S, 3)
        grid0, frac, self.row_shift = trilinear_plan(idx.reshape(1, -1, 3), grid.shape)
        self.register_buffer("grid0", grid0)
        self.register_buffer("frac", frac)

    def _ray_plan(self, rot: NDArray[np.float64], t_range: NDArray[np.float64], xx: NDArray[np.float64],
                  yy: NDArray[np.float64]) -> _RayPlan:
        """Sample positions as straight lines in padded index space: ``p(t) = P0 + t D`` with ``P0`` the
        source and ``D`` the pixel's direction per mm of source distance, ``t = t0 + s dt``."""
        grid, geo = self.grid, self.geometry
        sad = geo.machine.sad_mm
        spacing = np.asarray(grid.spacing_mm, dtype=np.float64)
        shift = (np.asarray(geo.isocenter_mm, dtype=np.float64) - np.asarray(grid.origin_mm)) / spacing + 1.0
        src = sad * rot[:, :, 2] / spacing + shift  # (n_cp, 3) source, padded index coordinates
        # direction (n_cp, rows, cols, 3): d p / d t = (R_x x_b + R_y y_b) / SAD - R_z, in index units
        dirs = (rot[:, None, None, :, 0] * xx[None, :, :, None] + rot[:, None, None, :, 1] * yy[None, :, :, None]) / sad
        dirs = (dirs - rot[:, None, None, :, 2]) / spacing
        t0 = t_range[:, 0][:, None, None, None]
        dt = ((t_range[:, 1] - t_range[:, 0]) / (self.depth_samples - 1))[:, None, None, None]
        start = (src[:, None, None, :] + t0 * dirs).reshape(-1, 3)
        step = (dt * dirs).reshape(-1, 3)
        return _RayPlan(start, step, self.grid.shape, self.depth_samples)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """BEV projections of a volume.

        Parameters
        ----------
        volume
            (nz, ny, nx) on ``grid``, or a batch (B, nz, ny, nx).

        Returns
        -------
        torch.Tensor
            (n_sectors, rows, cols), or (B, n_sectors, rows, cols): the mean of the volume along each
            pixel's divergent ray (same unit as the volume).
        """
        batched = volume.dim() == 4
        vol = volume if batched else volume[None]
        if tuple(vol.shape[1:]) != self.grid.shape:
            raise PlanningError(f"volume shape {tuple(volume.shape)} does not match the grid {self.grid.shape}")
        vol = vol.to(device=self.device, dtype=self.dtype)
        if self.backend == "numba":
            means = _RayMean.apply(vol, self.plan)
            out = means.reshape(vol.shape[0], *self.out_shape)
        else:
            samples = sample_planned(vol[None], self.grid0, self.frac, self.row_shift)  # (1, B, n_cp*rows*cols*S)
            out = samples.reshape(vol.shape[0], *self.out_shape, self.depth_samples).mean(dim=-1)
        return out if batched else out[0]
