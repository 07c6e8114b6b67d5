"""The reference dose engine: a differentiable 6 MV pencil-beam engine on divergent rays through the CT.

Method (per control point ``k``; fan coordinates ``(u, v)`` are the beam-frame lateral coordinates
projected to the isocenter plane, ``t`` is the distance from the source along the central axis):

1. *Ray tracing, once per engine.* The density is sampled on a beam-aligned divergent grid (rays
   from the source through an isocenter-plane lattice, planes every ``depth_step_mm``) with
   ``torch.nn.functional.grid_sample``; the radiological depth ``d`` along each ray is a cumulative
   sum (midpoint rule, obliquity-corrected step). An upstream exponential average of the density
   along the ray (length ``disequilibrium_length_mm``) gives the local electron-equilibrium density,
   which sets how much of the primary uses the widened low-density kernel (lateral electron
   disequilibrium in lung and gas, with a gradual build-down / build-up at interfaces). Both
   quantities are then sampled at every dose voxel's position and stored: they do not depend on the
   fluence.
2. *Fluence convolution, every call.* Each fluence map (MU per 5 mm pixel) is convolved analytically
   (pixel box * Gaussian, separable, as small matrices) with the four lateral channels of the beam
   model (primary, low-density primary, two phantom-scatter Gaussians, each plus extra-focal head
   scatter) on a fine isocenter-plane lattice.
3. *Dose.* For every voxel: ``D = k_cal * (SAD / t)^2 * sum_c W_c(d, rho_eq) * F_c(u, v)`` where the
   depth weights ``W_c`` are the beam model's primary/scatter depth functions (attenuation with
   spectral hardening and build-up) of the voxel's radiological depth, and ``F_c(u, v)`` is sampled
   bilinearly (grid_sample) where the voxel projects. Summed over control points.

Everything in step 2-3 is linear in the fluence and differentiable (autograd through matmul and
grid_sample); control points are processed in chunks under activation checkpointing so memory stays
bounded in the backward pass. On the CPU the backward of the map reads is a numba scatter kernel
instead (``backend``), which halves the cost of a gradient. The absolute scale ``k_cal`` is derived
by the beam model evaluating the reference condition (10 x 10 cm, SSD 100 cm, d_max: 1 cGy/MU).

Approximations (documented, tested where it matters): a pencil-beam superposition in fan coordinates
(kernel widths fixed at the isocenter plane, depth-dependence through the component weights);
heterogeneity through the radiological depth of the voxel's own ray (no lateral transport of TERMA
behind a bone edge) and through the density-scaled primary width; no electron contamination; dose is
dose to water-like medium (no stopping-power conversion); air outside the body receives the build-up
dose of zero depth (callers mask it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from scipy import ndimage
from torch.utils.checkpoint import checkpoint

from core.case import Case, Grid, Role
from core.errors import InputError, PlanningError
from pipeline import trace_kernels
from pipeline.beam_model import BeamModel
from pipeline.geometry import ArcGeometry
from pipeline.map_sampling import SamplePlan, sample_adjoint, sample_adjoint_pair

log = logging.getLogger(__name__)

ENGINE_BACKENDS = ("auto", "numba", "torch")
"""Accepted values of ``ReferenceDoseEngine(backend=...)``."""

BODY_HU_THRESHOLD = -400.0
"""HU above which a voxel counts as body when a case has no BODY structure."""


class DoseEngine(Protocol):
    """What the planners need of a dose engine (:class:`ReferenceDoseEngine` is one).

    Attributes
    ----------
    grid
        The dose grid (its spacing scales the conformity fall-off of the objective).
    fluence_shape
        ``(n_sectors, rows, cols)`` the engine takes.
    device
        Torch device of its computations.
    """

    grid: Grid
    fluence_shape: tuple[int, int, int]
    device: torch.device

    def __call__(self, fluence: torch.Tensor) -> torch.Tensor:
        """Dose (Gy) on ``grid`` of fluence maps (MU per pixel); linear and differentiable."""
        ...

    def restricted(self, mask: NDArray[np.bool_]) -> DoseEngine:
        """The same engine computing dose only in ``mask`` (bool on ``grid``): the same dose there, cheaper."""
        ...

    def adjoint(self, weight: torch.Tensor) -> torch.Tensor:
        """``A^T w`` (``fluence_shape``): for every BEV pixel, the dose per MU it delivers summed over the
        voxels of ``weight`` (a mask or voxel weights on ``grid``); ``<A^T w, fluence>`` is then the
        weighted dose sum exactly."""
        ...


def autograd_adjoint(engine: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor,
                     shape: tuple[int, int, int], *, device: torch.device | str,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:meth:`DoseEngine.adjoint` of any linear differentiable ``engine`` taking fluence of ``shape``:
    one forward and one backward pass."""
    probe = torch.zeros(shape, device=device, dtype=dtype, requires_grad=True)
    dose = engine(probe)
    (adj,) = torch.autograd.grad((dose * weight.to(device=dose.device, dtype=dose.dtype)).sum(), probe)
    return adj.detach()


# ---------------------------------------------------------------------------------------------------
# Grids and resampling
# ---------------------------------------------------------------------------------------------------


def dose_grid_for_case(case: Case, spacing_mm: float = 4.0, margin_mm: float = 50.0) -> Grid:
    """The dose grid of a case: isotropic, covering the body in x/y and the PTV +- a margin in z.

    Parameters
    ----------
    case
        The planning case.
    spacing_mm
        Isotropic dose-grid spacing, mm (> 0; 4 mm in the appliance).
    margin_mm
        Extent beyond the PTV along z (superior and inferior), mm (>= 0): large enough to hold the
        OARs' dose from the arc's scatter and exit (50 mm default). Clipped to the CT.

    Returns
    -------
    Grid
        In x and y the body's bounding box (the BODY mask, else CT > -400 HU, within the chosen
        slices), in z the PTV extent +- ``margin_mm``; voxel centres start on the CT's bounding box.
    """
    if not spacing_mm > 0:
        raise InputError(f"dose grid spacing must be > 0 mm, got {spacing_mm}")
    if margin_mm < 0:
        raise InputError(f"dose grid margin must be >= 0 mm, got {margin_mm}")
    g = case.grid
    x, y, z = g.axes_mm()
    kk = np.nonzero(case.masks[Role.PTV].any(axis=(1, 2)))[0]
    z_lo = max(z[kk.min()] - margin_mm, z.min())
    z_hi = min(z[kk.max()] + margin_mm, z.max())
    k0, k1 = int(np.searchsorted(z, z_lo)), int(np.searchsorted(z, z_hi, side="right"))
    body = case.masks.get(Role.BODY)
    if body is None:
        body = case.ct_hu > BODY_HU_THRESHOLD
    body_xy: NDArray[np.bool_] = np.asarray(np.any(body[k0:k1], axis=0))
    if not body_xy.any():
        body_xy = np.asarray(np.any(case.masks[Role.PTV], axis=0))
    jj = np.nonzero(body_xy.any(axis=1))[0]
    ii = np.nonzero(body_xy.any(axis=0))[0]
    lo = (float(x[ii.min()]), float(y[jj.min()]), float(z_lo))
    hi = (float(x[ii.max()]), float(y[jj.max()]), float(z_hi))
    shape_xyz = [math.floor((h - low) / spacing_mm + 1e-6) + 1 for low, h in zip(lo, hi)]
    # centre the lattice on the box so both edges are covered equally
    origin = tuple(low + 0.5 * ((h - low) - (n - 1) * spacing_mm) for low, h, n in zip(lo, hi, shape_xyz))
    return Grid(origin_mm=(origin[0], origin[1], origin[2]), spacing_mm=(spacing_mm,) * 3,
                shape=(shape_xyz[2], shape_xyz[1], shape_xyz[0]))


def resample_to_grid(volume: NDArray, src: Grid, dst: Grid, *, order: int = 1, fill: float = 0.0) -> NDArray:
    """Resample a volume from one axis-aligned grid to another (same patient coordinates).

    Parameters
    ----------
    volume
        Array of shape ``src.shape`` indexed [z, y, x] (a bool mask is resampled as its 0/1 fraction).
    src, dst
        Source and destination grids.
    order
        1 for trilinear, 0 for nearest neighbour. Masks are resampled as fractions (order 1 of a
        float mask) and thresholded at 0.5 by callers.
    fill
        Value of destination voxels whose centre lies more than half a voxel outside ``src``
        (0 for dose and masks, -1000 for CT in HU).

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``dst.shape``.
    """
    if order not in (0, 1):
        raise InputError(f"resample order must be 0 (nearest) or 1 (trilinear), got {order}")
    vol = np.asarray(volume)
    if vol.shape != src.shape:
        raise InputError(f"volume shape {vol.shape} does not match its grid {src.shape}")
    # index-space affine map per array axis (z, y, x)
    scale = [dst.spacing_mm[a] / src.spacing_mm[a] for a in (2, 1, 0)]
    offset = [(dst.origin_mm[a] - src.origin_mm[a]) / src.spacing_mm[a] for a in (2, 1, 0)]
    # only the source slab the destination reads is converted and handed over (a 4 mm dose grid reads
    # a third of a 120-slice CT): the interpolation reads at most the two neighbours of each position,
    # and the edge values ("nearest") are kept in the slab, so the result is the same
    crop, crop_offset = [], []
    for ax in range(3):
        pos = offset[ax] + scale[ax] * np.array([0.0, dst.shape[ax] - 1.0])
        lo = int(np.clip(np.floor(pos.min()) - 1, 0, src.shape[ax] - 1))
        hi = int(np.clip(np.ceil(pos.max()) + 2, lo + 1, src.shape[ax]))
        crop.append(slice(lo, hi))
        crop_offset.append(offset[ax] - lo)
    part = vol[tuple(crop)]
    if part.dtype == np.bool_:
        part = part.view(np.uint8)
    if part.dtype.kind in "iu" and part.dtype.itemsize <= 2:
        # read as it is (float32 holds these values exactly): no float copy of the slab, the same result
        out = ndimage.affine_transform(part, np.asarray(scale), offset=crop_offset, output_shape=dst.shape,
                                       order=order, mode="nearest", output=np.float32)
    else:
        out = ndimage.affine_transform(part.astype(np.float32, copy=False), np.asarray(scale),
                                       offset=crop_offset, output_shape=dst.shape, order=order, mode="nearest")
    inside = np.ones(dst.shape, dtype=bool)
    for ax in range(3):
        idx = offset[ax] + scale[ax] * np.arange(dst.shape[ax])
        ok = (idx >= -0.5 - 1e-6) & (idx <= src.shape[ax] - 0.5 + 1e-6)
        shp = [1, 1, 1]
        shp[ax] = -1
        inside &= ok.reshape(shp)
    out[~inside] = fill
    return out.astype(np.float32, copy=False)


def hu_to_density(hu: NDArray, curve: Sequence[tuple[float, float]]) -> NDArray:
    """Relative electron density from HU by a piecewise-linear calibration curve.

    Parameters
    ----------
    hu
        CT numbers, HU.
    curve
        (HU, relative electron density) pairs, at least two, HU strictly increasing, densities >= 0;
        values outside the curve take the end densities.

    Returns
    -------
    numpy.ndarray
        float32 relative electron density (water = 1), same shape as ``hu``.
    """
    pts = np.asarray(curve, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 2:
        raise InputError(f"HU-to-density curve needs >= 2 (HU, density) pairs, got {curve!r}")
    if np.any(np.diff(pts[:, 0]) <= 0):
        raise InputError("HU-to-density curve HU values must be strictly increasing; fix planning.hu_to_density")
    if np.any(pts[:, 1] < 0):
        raise InputError("HU-to-density curve densities must be >= 0; fix planning.hu_to_density")
    return np.interp(np.asarray(hu, dtype=np.float64), pts[:, 0], pts[:, 1]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Geometry helpers shared with the BEV projection
# ---------------------------------------------------------------------------------------------------


def grid_points_mm(grid: Grid, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Voxel-centre positions of ``grid`` flattened in [z, y, x] order, shape (3, N) (x, y, z rows), mm."""
    x, y, z = (torch.as_tensor(a, device=device, dtype=dtype) for a in grid.axes_mm())
    zz, yy, xx = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1), zz.reshape(-1)])


def patient_to_normalized(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Map patient positions (..., 3) in mm to grid_sample coordinates (align_corners=True) of ``grid``."""
    nz, ny, nx = grid.shape
    origin = torch.as_tensor(grid.origin_mm, device=points.device, dtype=points.dtype)
    spacing = torch.as_tensor(grid.spacing_mm, device=points.device, dtype=points.dtype)
    size = torch.as_tensor([max(nx - 1, 1), max(ny - 1, 1), max(nz - 1, 1)], device=points.device,
                           dtype=points.dtype)
    return 2.0 * (points - origin) / spacing / size - 1.0


def depth_range_mm(grid: Grid, rotations: NDArray[np.float64], isocenter_mm: Sequence[float],
                   sad_mm: float, pad_mm: float) -> NDArray[np.float64]:
    """Per control point, the source distance range ``(t_min, t_max)`` covering the grid's bounding box."""
    x, y, z = grid.axes_mm()
    h = 0.5 * np.asarray(grid.spacing_mm)
    corners = np.array([[cx, cy, cz] for cx in (x[0] - h[0], x[-1] + h[0]) for cy in (y[0] - h[1], y[-1] + h[1])
                        for cz in (z[0] - h[2], z[-1] + h[2])]) - np.asarray(isocenter_mm)
    zb = np.einsum("kij,ci->kcj", rotations, corners)[:, :, 2]  # (n, 8) beam-frame z of each corner
    t = sad_mm - zb
    return np.stack([t.min(axis=1) - pad_mm, t.max(axis=1) + pad_mm], axis=1)


#: Entries of the convolution matrices below this (a pixel's share of a node's Gaussian) are set to 0.
BOX_GAUSS_FLOOR = 1e-12


def _box_gauss_matrix(nodes_mm: NDArray[np.float64], edges_mm: NDArray[np.float64], sigma_mm: float) -> NDArray:
    """Matrix (n_nodes, n_pixels): pixel-box functions convolved with a Gaussian, sampled at the nodes."""
    from scipy.special import ndtr

    s = max(sigma_mm, 1e-6)
    cdf = ndtr((edges_mm[None, :] - nodes_mm[:, None]) / s)
    m = np.asarray(cdf[:, 1:] - cdf[:, :-1])
    # Far tails are zero: in float32 they would be denormal numbers, which the CPU multiplies tens of
    # times slower (the convolutions took 20 ms instead of 2.4 ms per arc pass), for a share < 1e-12.
    m[m < BOX_GAUSS_FLOOR] = 0.0
    return m


def trilinear_plan(idx: torch.Tensor, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Precompute how :func:`sample_trilinear` reads points ``idx`` from volumes of ``shape`` (D, H, W).

    The volume is tiled as one 2D image: a zero tile, then slices 0 .. D-1, each tile followed by a
    zero row (so bilinear reads never mix neighbouring slices). A point in slice ``z0`` reads tile
    ``z0 + 1`` and the next tile, blended by ``frac``.

    Returns
    -------
    tuple
        ``(grid0, frac, row_shift)``: normalised 2D coordinates (B, N, 2) of each point in its lower
        tile, the weight (B, N) of the upper tile, and the normalised row offset between tiles. Points
        outside the volume get coordinates that read 0.
    """
    d, h, w = shape
    x, y, z = idx[..., 0], idx[..., 1], idx[..., 2]
    z0 = torch.floor(z)
    row_norm = 2.0 / max((d + 1) * (h + 1) - 1, 1)
    inside = (y > -1.0) & (y < float(h)) & (z0 >= -1) & (z0 <= d - 1)
    gx = 2.0 * x / max(w - 1, 1) - 1.0
    gy = ((z0 + 1.0) * (h + 1) + y) * row_norm - 1.0
    far = torch.full_like(gx, -3.0)
    grid0 = torch.stack([torch.where(inside, gx, far), torch.where(inside, gy, far)], dim=-1)
    frac = torch.where(inside, z - z0, torch.zeros_like(z))
    return grid0, frac, (h + 1) * row_norm


def sample_planned(vol: torch.Tensor, grid0: torch.Tensor, frac: torch.Tensor, row_shift: float) -> torch.Tensor:
    """Apply a :func:`trilinear_plan` to volumes ``vol`` (B, C, D, H, W) -> (B, C, N)."""
    b, c, d, h, w = vol.shape
    tiled = F.pad(vol, (0, 0, 0, 1, 1, 0)).reshape(b, c, (d + 1) * (h + 1), w)
    shift = torch.as_tensor([0.0, row_shift], device=grid0.device, dtype=grid0.dtype)
    g = torch.stack([grid0, grid0 + shift], dim=1)
    out = F.grid_sample(tiled, g, mode="bilinear", padding_mode="zeros", align_corners=True)  # (B, C, 2, N)
    return out[:, :, 0] * (1.0 - frac[:, None]) + out[:, :, 1] * frac[:, None]


def sample_trilinear(vol: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Trilinear sampling with zero padding, through the fast 2D ``grid_sample`` kernel.

    PyTorch's 3D ``grid_sample`` has no vectorised CPU kernel (about 20x slower than the 2D one), so
    the depth slices are tiled into one tall 2D image (zero rows between tiles) and every point is
    two bilinear samples, one in each neighbouring slice, blended linearly.

    Parameters
    ----------
    vol
        (B, C, D, H, W) volume.
    idx
        (B, N, 3) fractional voxel indices ``(w, h, d)`` (x along W, y along H, z along D).

    Returns
    -------
    torch.Tensor
        (B, C, N) samples; points more than one voxel outside the volume read 0, points within one
        voxel interpolate towards 0 (as ``grid_sample`` with zero padding).
    """
    grid0, frac, shift = trilinear_plan(idx, tuple(vol.shape[2:]))  # type: ignore[arg-type]
    return sample_planned(vol, grid0, frac, shift)


def patient_to_index(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Map patient positions (..., 3) in mm to fractional voxel indices (i, j, k) of ``grid``."""
    origin = torch.as_tensor(grid.origin_mm, device=points.device, dtype=points.dtype)
    spacing = torch.as_tensor(grid.spacing_mm, device=points.device, dtype=points.dtype)
    return (points - origin) / spacing


# ---------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------


def case_density(case: Case, spacing_mm: float, hu_curve: Sequence[tuple[float, float]]
                 ) -> tuple[Grid, NDArray[np.float32], NDArray[np.float32], NDArray[np.bool_]]:
    """A case's dose grid, its CT there (HU), its relative electron density and the voxels in the body:
    air outside the BODY structure (when the case has one), else voxels above :data:`BODY_HU_THRESHOLD` HU."""
    grid = dose_grid_for_case(case, spacing_mm)
    hu = resample_to_grid(case.ct_hu, case.grid, grid, order=1, fill=-1000.0)
    density = hu_to_density(hu, hu_curve)
    body = case.masks.get(Role.BODY)
    if body is not None:
        inside = np.asarray(resample_to_grid(body, case.grid, grid, order=1) >= 0.5)
        density = np.where(inside, density, hu_to_density(np.array(-1000.0), hu_curve))
    else:
        inside = np.asarray(hu > BODY_HU_THRESHOLD)
    return grid, hu, np.ascontiguousarray(density, dtype=np.float32), inside


class ReferenceDoseEngine(torch.nn.Module):
    """Differentiable reference dose engine: fluence maps (MU per BEV pixel) -> dose (Gy) on a grid.

    Parameters
    ----------
    density
        Relative electron density on ``grid``, shape (nz, ny, nx), >= 0 (water 1).
    grid
        The dose grid (dose is computed at these voxel centres).
    geometry
        Arc, isocenter, patient position and machine.
    beam
        Beam model (see :mod:`pipeline.beam_model`).
    device
        Torch device for every buffer and computation (CPU or CUDA).
    dtype
        Floating dtype (float32; float64 for gradient checks).
    active
        Optional boolean mask on ``grid`` of the voxels where dose is computed (the body); other
        voxels get 0 Gy. ``None`` computes every voxel.
    lateral_mm
        Spacing of the fluence-convolution lattice at the isocenter plane, mm (> 0; 2.5 by default,
        finer for penumbra studies).
    ray_mm
        Lateral spacing of the ray-tracing rays at the isocenter plane, mm; default twice the smallest
        dose grid spacing (radiological depth is smooth across rays; voxels interpolate between them).
    depth_step_mm
        Step between ray-tracing planes, mm; default the smallest dose grid spacing.
    chunk
        Control points processed together by the torch back-end (memory vs. speed).
    lattice_reach_mm
        Optional ``(u, v)``: no active voxel projects farther than this from the beam axis (mm, at
        the isocenter plane) in any control point. The convolution lattices are then cut to that
        reach (plus one node): the nodes kept are the same, so the dose is the same, and the
        per-pass cost of the convolutions falls with the lattice area (engines restricted to a few
        structures near the isocenter, :meth:`restricted`).
    backend
        How the gradient of the per-voxel map reads is computed: ``"numba"`` (CPU: the forward reads
        with ``grid_sample`` without keeping a graph, the backward is the numba scatter adjoint of
        :mod:`pipeline.map_sampling`, parallel over control points without atomics: forward + backward
        about half the time of ``"torch"``), ``"torch"`` (``grid_sample`` with autograd under
        activation checkpointing; any device) or ``"auto"`` (numba on the CPU, torch elsewhere). Both
        give the same dose and gradient to floating-point rounding.

    Attributes
    ----------
    grid, density, geometry, beam
        As given (``density`` as a tensor on ``device``).
    fluence_shape
        ``(n_sectors, bev rows, bev cols)`` expected by :meth:`forward`.
    """

    density: torch.Tensor
    mat_u_fine: torch.Tensor
    mat_v_fine: torch.Tensor
    mat_u_coarse: torch.Tensor
    mat_v_coarse: torch.Tensor
    mix_fine: torch.Tensor
    mix_coarse: torch.Tensor
    cal: torch.Tensor
    act_idx: torch.Tensor
    rot: torch.Tensor
    iso: torch.Tensor
    points: torch.Tensor
    grid_xy: torch.Tensor
    weights: torch.Tensor
    ld_idx: torch.Tensor
    ld_grid: torch.Tensor
    ld_weights: torch.Tensor

    def __init__(self, density: torch.Tensor, grid: Grid, geometry: ArcGeometry, beam: BeamModel, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 active: torch.Tensor | NDArray[np.bool_] | None = None, lateral_mm: float = 2.5,
                 ray_mm: float | None = None, depth_step_mm: float | None = None, chunk: int = 30,
                 backend: str = "auto", lattice_reach_mm: tuple[float, float] | None = None) -> None:
        super().__init__()
        dev = torch.device(device)
        if backend not in ENGINE_BACKENDS:
            raise PlanningError(f"dose engine backend must be one of {', '.join(ENGINE_BACKENDS)}, got {backend!r}")
        if backend == "auto":
            backend = "numba" if dev.type == "cpu" and dtype in (torch.float32, torch.float64) else "torch"
        if backend == "numba" and (dev.type != "cpu" or dtype not in (torch.float32, torch.float64)):
            raise PlanningError(f"the numba dose back-end runs on the CPU in float32/float64 only, got {dev} and "
                                f"{dtype}; use backend='torch'")
        self.backend = backend
        dens = torch.as_tensor(density, dtype=dtype, device=dev)
        if tuple(dens.shape) != grid.shape:
            raise PlanningError(f"density shape {tuple(dens.shape)} does not match the dose grid {grid.shape}")
        if not bool(torch.isfinite(dens).all()) or bool((dens < 0).any()):
            raise PlanningError("density must be finite and >= 0; check the HU-to-density curve")
        if abs(beam.sad_mm - geometry.machine.sad_mm) > 1e-6:
            raise PlanningError(f"beam model SAD {beam.sad_mm} mm differs from the machine's "
                                f"{geometry.machine.sad_mm} mm; use a beam model made for this machine")
        if not lateral_mm > 0 or chunk < 1:
            raise PlanningError(f"lateral_mm must be > 0 and chunk >= 1, got {lateral_mm}, {chunk}")
        self.grid = grid
        self.geometry = geometry
        self.beam = beam
        self.device = dev
        self.dtype = dtype
        self.chunk = int(chunk)
        bev = geometry.machine.bev
        self.fluence_shape = (geometry.n_sectors, bev.n_rows, bev.n_cols)
        self.sad = float(geometry.machine.sad_mm)
        self.register_buffer("density", dens)
        step = float(min(grid.spacing_mm))
        ray = float(ray_mm) if ray_mm is not None else 2.0 * step
        dt = float(depth_step_mm) if depth_step_mm is not None else step
        if not (ray > 0 and dt > 0):
            raise PlanningError(f"ray_mm and depth_step_mm must be > 0, got {ray}, {dt}")

        # Fluence-convolution lattices (isocenter plane), nodes u (cols, x_b) and v (rows, y_b): a fine one
        # just covering the field for the sharp primary channels, a coarse one reaching the scatter margin
        # for the smooth channels (extra-focal primary and the two phantom-scatter components).
        sig = beam.channel_sigmas_mm()
        coarse = 4.0 * lateral_mm
        self.lateral_mm = float(lateral_mm)
        self.ray_mm, self.depth_step_mm = ray, dt
        self.half_u = coarse * math.ceil((bev.half_width_mm + beam.field_margin_mm) / coarse)
        self.half_v = coarse * math.ceil((bev.half_height_mm + beam.field_margin_mm) / coarse)
        reach = 4.0 * max(sig[0][0], sig[1][0])
        self.fine_u = min(self.half_u, lateral_mm * math.ceil((bev.half_width_mm + reach) / lateral_mm))
        self.fine_v = min(self.half_v, lateral_mm * math.ceil((bev.half_height_mm + reach) / lateral_mm))
        if lattice_reach_mm is not None:  # keep the nodes up to one beyond the farthest voxel (same node positions)
            ru, rv = (float(r) for r in lattice_reach_mm)
            self.half_u = min(self.half_u, coarse * math.ceil((ru + coarse) / coarse))
            self.half_v = min(self.half_v, coarse * math.ceil((rv + coarse) / coarse))
            self.fine_u = min(self.fine_u, self.half_u, lateral_mm * math.ceil((ru + lateral_mm) / lateral_mm))
            self.fine_v = min(self.fine_v, self.half_v, lateral_mm * math.ceil((rv + lateral_mm) / lateral_mm))
        h = beam.head_scatter_fraction
        # each channel: list of (sigma, weight) Gaussian terms; the fine channel 1 is the low-density
        # correction (wide primary minus primary)
        lattices = {
            "fine": (lateral_mm, self.fine_u, self.fine_v,
                     [[(sig[0][0], 1.0), (sig[1][0], 0.0)], [(sig[1][0], 1.0), (sig[0][0], -1.0)]]),
            "coarse": (coarse, self.half_u, self.half_v,
                       [[(sig[0][1], h), (sig[0][1], 0.0)], [(sig[2][0], 1.0), (sig[2][1], h)],
                        [(sig[3][0], 1.0), (sig[3][1], h)]]),
        }
        for name, (spacing, hu_, hv_, chans) in lattices.items():
            nodes_u = np.linspace(-hu_, hu_, round(2 * hu_ / spacing) + 1)
            nodes_v = np.linspace(-hv_, hv_, round(2 * hv_ / spacing) + 1)
            # each distinct Gaussian once (a basis of separable convolutions), the channels as their weighted
            # sums (``mix``): the fine lattice's two channels need two convolutions, not four
            sigmas = list(dict.fromkeys(sg for terms in chans for sg, wt in terms if wt != 0.0))
            mix = np.zeros((len(chans), len(sigmas)))
            for c, terms in enumerate(chans):
                for sg, wt in terms:
                    if wt != 0.0:
                        mix[c, sigmas.index(sg)] += wt
            mu = [_box_gauss_matrix(nodes_u, bev.col_edges_mm(), sg) for sg in sigmas]
            mv = [_box_gauss_matrix(nodes_v, bev.row_edges_mm(), sg) for sg in sigmas]
            # (basis, n_nodes, pixels) and (channels, basis)
            self.register_buffer(f"mat_u_{name}", torch.as_tensor(np.array(mu), dtype=dtype, device=dev))
            self.register_buffer(f"mat_v_{name}", torch.as_tensor(np.array(mv), dtype=dtype, device=dev))
            self.register_buffer(f"mix_{name}", torch.as_tensor(mix, dtype=dtype, device=dev))
        self.register_buffer("cal", torch.tensor(beam.calibration_gy_per_unit, dtype=dtype, device=dev))

        if active is None:
            act = torch.ones(grid.shape, dtype=torch.bool, device=dev)
        else:
            act = torch.as_tensor(active, device=dev).bool()
            if tuple(act.shape) != grid.shape:
                raise PlanningError(f"active mask shape {tuple(act.shape)} does not match the grid {grid.shape}")
        self.register_buffer("act_idx", torch.nonzero(act.reshape(-1)).reshape(-1))
        rot = geometry.sector_rotations()
        self.register_buffer("rot", torch.as_tensor(rot, dtype=dtype, device=dev))
        self.register_buffer("iso", torch.as_tensor(geometry.isocenter_mm, dtype=dtype, device=dev))
        pts = grid_points_mm(grid, dev, dtype)[:, self.act_idx] - self.iso[:, None]
        self.register_buffer("points", pts)  # (3, N_active), relative to the isocenter
        self._trace(rot, ray, dt)
        log.debug("dose engine: grid %s (%d active voxels), %d sectors, lattice %dx%d, %d low-density voxels, "
                  "device %s", grid.shape, self.points.shape[1], geometry.n_sectors, self.mat_v_fine.shape[1],
                  self.mat_u_fine.shape[1], int(self.ld_idx.numel()), dev)

    def restricted(self, mask: NDArray[np.bool_], *, sectors_per_beam: int = 1) -> ReferenceDoseEngine:
        """The same engine computing dose only in ``mask`` (bool on ``grid``) and where this one does.

        For quick checks of one structure's dose (the AI planner's PTV coverage test): the cost of a
        forward pass is mostly per active voxel, so a PTV-only engine is tens of times faster. The
        dose it gives in ``mask`` equals this engine's. Its convolution lattices are cut to the reach
        of the kept voxels' projections. The rays are traced again for the kept voxels (no traced
        value of this engine is reused), so building it costs what building it from the case would.

        With ``sectors_per_beam`` k > 1 (a divisor of the arc's sectors) the engine doses the arc as
        ``n_sectors / k`` beams, one at the mean angle of every k adjacent sectors: it takes their
        summed fluence (:class:`RegionDose` sums it) and costs about 1/k as much a pass. The dose is
        then no longer this engine's: the midpoint rule over 2 k degrees instead of 2 (on a pelvis
        arc, k = 2 moved no voxel by more than 0.4 % of the maximum dose: ``benchmarks/bench_dose.py``).
        """
        k = int(sectors_per_beam)
        if k < 1 or self.geometry.n_sectors % k:
            raise PlanningError(f"sectors_per_beam must divide the arc's {self.geometry.n_sectors} sectors, got "
                                f"{sectors_per_beam}")
        geometry = self.geometry
        if k > 1:
            geometry = replace(geometry, arc=replace(geometry.arc, n_sectors=geometry.n_sectors // k))
        keep = torch.zeros(self.grid.shape[0] * self.grid.shape[1] * self.grid.shape[2], dtype=torch.bool,
                           device=self.device)
        keep[self.act_idx] = True
        keep &= torch.as_tensor(np.asarray(mask), device=self.device).bool().reshape(-1)
        reach = None
        sub = keep[self.act_idx]
        if bool(sub.any()):  # farthest projection of a kept voxel, mm at the isocenter plane
            xy = self.grid_xy[:, sub].abs().amax(dim=(0, 1))
            reach = (float(xy[0]) * self.half_u, float(xy[1]) * self.half_v)
        return ReferenceDoseEngine(self.density, self.grid, geometry, self.beam, device=self.device,
                                   dtype=self.dtype, active=keep.reshape(self.grid.shape), lateral_mm=self.lateral_mm,
                                   ray_mm=self.ray_mm, depth_step_mm=self.depth_step_mm, chunk=self.chunk,
                                   backend=self.backend, lattice_reach_mm=reach)

    @classmethod
    def for_case(cls, case: Case, geometry: ArcGeometry, beam: BeamModel, *,
                 hu_curve: Sequence[tuple[float, float]], spacing_mm: float = 4.0,
                 device: torch.device | str = "cpu", **kwargs: object) -> ReferenceDoseEngine:
        """Build the dose grid and the density of a case, then the engine.

        Outside the BODY structure (when the case has one) the density is that of air and the dose is
        not computed (0 Gy); without a BODY structure, voxels above -400 HU are computed.

        Parameters
        ----------
        case
            The planning case (CT in HU, masks).
        geometry, beam, device
            As for the constructor.
        hu_curve
            (HU, relative electron density) calibration pairs.
        spacing_mm
            Dose grid spacing, mm.
        kwargs
            Passed to the constructor (``lateral_mm``, ``chunk``, ...).
        """
        grid, _, density, active = case_density(case, spacing_mm, hu_curve)
        log.info("case %s: dose grid %s at %.1f mm, %d voxels in the body", case.case_id, grid.shape, spacing_mm,
                 int(active.sum()))
        return cls(torch.as_tensor(density), grid, geometry, beam, device=device, active=active,
                   **kwargs)  # type: ignore[arg-type]

    # -- ray tracing (fluence independent) ---------------------------------------------------------

    @torch.no_grad()
    def _trace(self, rot: NDArray[np.float64], ray_mm: float, dt: float) -> None:
        """Radiological depth and equilibrium density of every (control point, voxel); stores the voxel's
        fan coordinates and its per-channel depth weights (inverse square included).

        The numba back-end traces with the kernel of :mod:`pipeline.trace_kernels` (control points in
        parallel, no sample tensors), the torch back-end with ``grid_sample`` chunk by chunk; both give
        the same buffers to floating-point rounding."""
        dev, dtype = self.device, self.dtype
        n_cp, n_vox = rot.shape[0], self.points.shape[1]
        t_range = depth_range_mm(self.grid, rot, self.geometry.isocenter_mm, self.sad, pad_mm=2.0 * dt)
        nt = math.ceil(float((t_range[:, 1] - t_range[:, 0]).max()) / dt) + 1
        weights = torch.empty(n_cp, 3, n_vox, device=dev, dtype=dtype)
        if self.backend == "numba":
            grid_xy, alpha_all = self._trace_numba(rot, t_range[:, 0], nt, ray_mm, dt, weights)
        else:
            grid_xy, alpha_all = self._trace_torch(rot, t_range[:, 0], nt, ray_mm, dt, weights)
        self.register_buffer("grid_xy", grid_xy)
        self.register_buffer("weights", weights)
        # lateral-disequilibrium correction only where some beam sees a low density
        ld = torch.nonzero(alpha_all.amax(dim=0) > 0.01).reshape(-1)
        self.register_buffer("ld_idx", ld)
        self.register_buffer("ld_grid", grid_xy[:, ld].contiguous())
        self.register_buffer("ld_weights", (weights[:, 0, ld] * alpha_all[:, ld]).contiguous())
        if self.backend == "numba":
            self._make_sample_plans()

    def _store_depth_weights(self, weights: torch.Tensor, rad: torch.Tensor, inv_sq: torch.Tensor) -> None:
        """Fill ``weights`` (b, 3, N) with the beam model's depth weights of ``rad`` (b, N) times ``inv_sq``."""
        for c, w in enumerate(self.beam.depth_weights(rad)):
            torch.mul(w, inv_sq, out=weights[:, c])

    def _trace_numba(self, rot: NDArray[np.float64], t0: NDArray[np.float64], nt: int, ray_mm: float, dt: float,
                     weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU trace (:func:`pipeline.trace_kernels.trace`, chunks of control points whose depth weights
        are stored as each is traced); fills ``weights``, returns ``grid_xy`` and the low-density fractions
        (n_cp, N)."""
        beam = self.beam

        def store(first: int, rad: NDArray[np.floating], inv_sq: NDArray[np.floating]) -> None:
            self._store_depth_weights(weights[first:first + rad.shape[0]], torch.from_numpy(rad),
                                      torch.from_numpy(inv_sq))

        grid_xy, alpha = trace_kernels.trace(
            self.density.numpy(), rot, t0, nt, dt, self.points.numpy(),
            np.subtract(self.grid.origin_mm, self.geometry.isocenter_mm), np.asarray(self.grid.spacing_mm),
            sad=self.sad, ray_mm=ray_mm, half_u=self.half_u, half_v=self.half_v,
            decay=math.exp(-dt / beam.disequilibrium_length_mm), low_density_onset=beam.low_density_onset,
            low_density_reference=beam.low_density_reference, sink=store)
        return torch.from_numpy(grid_xy), torch.from_numpy(alpha)

    def _trace_torch(self, rot: NDArray[np.float64], t_start: NDArray[np.float64], nt: int, ray_mm: float, dt: float,
                     weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trace with ``grid_sample`` on the tiled density (any device), chunk by chunk; fills ``weights``,
        returns ``grid_xy`` and the low-density fractions (n_cp, N)."""
        dev, dtype, sad = self.device, self.dtype, self.sad
        beam = self.beam
        n_cp, n_vox = rot.shape[0], self.points.shape[1]
        a = math.exp(-dt / beam.disequilibrium_length_mm)
        dens = self.density[None, None]
        spacing = self.grid.spacing_mm
        origin = [o - i for o, i in zip(self.grid.origin_mm, self.geometry.isocenter_mm)]
        grid_xy = torch.empty(n_cp, n_vox, 2, device=dev, dtype=dtype)
        alpha_all = torch.empty(n_cp, n_vox, device=dev, dtype=dtype)
        for s in range(0, n_cp, self.chunk):
            e = min(n_cp, s + self.chunk)
            b = e - s
            r = torch.as_tensor(rot[s:e], device=dev, dtype=dtype)
            t0 = torch.as_tensor(t_start[s:e], device=dev, dtype=dtype)
            # voxels in the beam frame and fan coordinates
            xv = torch.matmul(r.transpose(1, 2), self.points)  # (b, 3, N)
            tv = sad - xv[:, 2]
            u = xv[:, 0] * sad / tv
            v = xv[:, 1] * sad / tv
            # ray lattice just large enough for this chunk's voxels (and never beyond the fluence lattice)
            hu_ = ray_mm * math.ceil(min(self.half_u, float(u.abs().max()) + ray_mm) / ray_mm)
            hv_ = ray_mm * math.ceil(min(self.half_v, float(v.abs().max()) + ray_mm) / ray_mm)
            ru = torch.linspace(-hu_, hu_, round(2 * hu_ / ray_mm) + 1, device=dev, dtype=dtype)
            rv = torch.linspace(-hv_, hv_, round(2 * hv_ / ray_mm) + 1, device=dev, dtype=dtype)
            vv, uu = torch.meshgrid(rv, ru, indexing="ij")
            ds = dt * torch.sqrt(1.0 + (uu**2 + vv**2) / sad**2)
            t = t0[:, None] + dt * torch.arange(nt, device=dev, dtype=dtype)[None, :]  # (b, nt)
            f = (t / sad)[:, :, None, None]
            zt = (sad - t)[:, :, None, None]
            fu, fv = uu * f, vv * f  # (b, nt, nv, nu): beam-frame x and y of the samples
            idx = []
            for ax in range(3):  # patient axis ax: index coordinate of every ray sample
                pa = r[:, ax, 0, None, None, None] * fu + r[:, ax, 1, None, None, None] * fv
                pa = pa + r[:, ax, 2, None, None, None] * zt
                idx.append(((pa - origin[ax]) / spacing[ax]).reshape(-1))
            rho = sample_trilinear(dens, torch.stack(idx, dim=-1)[None]).reshape(b, nt, *uu.shape)
            del fu, fv, idx
            inc = rho * ds
            rad = torch.cumsum(inc, dim=1) - 0.5 * inc
            # upstream density average: air in front of the surface counts as equilibrium
            src = torch.where(rad < 0.5, torch.ones_like(rho), rho)
            eq = torch.empty_like(rho)
            acc = src[:, 0]
            for i in range(nt):
                acc = a * acc + (1.0 - a) * src[:, i]
                eq[:, i] = acc
            vol = torch.stack([rad, beam.low_density_fraction(eq)], dim=1)  # (b, 2, nt, nv_r, nu_r)
            vidx = torch.stack([(u + hu_) / ray_mm, (v + hv_) / ray_mm, (tv - t0[:, None]) / dt], dim=-1)
            vals = sample_trilinear(vol, vidx)  # (b, 2, N)
            self._store_depth_weights(weights[s:e], vals[:, 0], (sad / tv) ** 2)
            grid_xy[s:e, :, 0] = u / self.half_u
            grid_xy[s:e, :, 1] = v / self.half_v
            alpha_all[s:e] = vals[:, 1]
        return grid_xy, alpha_all

    def _make_sample_plans(self) -> None:
        """Sample plans of the numba back-end over the traced buffers (views, no copies)."""
        to_fine = (self.half_u / self.fine_u, self.half_v / self.fine_v)
        fine_size = (int(self.mat_v_fine.shape[1]), int(self.mat_u_fine.shape[1]))
        coarse_size = (int(self.mat_v_coarse.shape[1]), int(self.mat_u_coarse.shape[1]))
        self._plan_prim = SamplePlan(self.grid_xy, self.weights, fine_size, to_fine, n_channels=1)
        self._plan_smooth = SamplePlan(self.grid_xy, self.weights, coarse_size, n_channels=3)
        self._plan_ld = SamplePlan(self.ld_grid, self.ld_weights[:, None, :], fine_size, to_fine)

    # -- forward -----------------------------------------------------------------------------------

    def channel_maps(self, fluence: torch.Tensor, lattice: str) -> torch.Tensor:
        """Fluence (b, rows, cols) convolved with the lateral channels of one lattice, isocenter plane.

        "fine": primary, and wide (low-density) primary minus primary; "coarse": extra-focal primary,
        scatter 1, scatter 2 (each with its extra-focal part). Returns (b, channels, n_v, n_u): each
        distinct Gaussian's separable convolution once, the channels their weighted sums.
        """
        mat_v = getattr(self, f"mat_v_{lattice}")
        mat_u = getattr(self, f"mat_u_{lattice}")
        tmp = torch.einsum("svr,brx->bsvx", mat_v, fluence)
        basis = torch.einsum("bsvx,sux->bsvu", tmp, mat_u)
        return torch.einsum("cs,bsvu->bcvu", getattr(self, f"mix_{lattice}"), basis)

    def _chunk_dose(self, fluence: torch.Tensor, grid_xy: torch.Tensor, weights: torch.Tensor,
                    ld_grid: torch.Tensor, ld_weights: torch.Tensor) -> torch.Tensor:
        return self._maps_dose(self.channel_maps(fluence, "fine"), self.channel_maps(fluence, "coarse"),
                               grid_xy, weights, ld_grid, ld_weights)

    def _maps_dose(self, fine: torch.Tensor, coarse: torch.Tensor, grid_xy: torch.Tensor, weights: torch.Tensor,
                   ld_grid: torch.Tensor, ld_weights: torch.Tensor) -> torch.Tensor:
        """Dose at the active voxels (without ``cal``) of a chunk's channel maps, by ``grid_sample``."""
        to_fine = torch.as_tensor([self.half_u / self.fine_u, self.half_v / self.fine_v], device=grid_xy.device,
                                  dtype=grid_xy.dtype)
        g = grid_xy[:, None]  # (b, 1, N, 2)
        prim = F.grid_sample(fine[:, :1], g * to_fine, mode="bilinear", padding_mode="zeros", align_corners=True)
        smooth = F.grid_sample(coarse, g, mode="bilinear", padding_mode="zeros", align_corners=True)[:, :, 0]
        dose = ((prim[:, 0, 0] + smooth[:, 0]) * weights[:, 0] + smooth[:, 1] * weights[:, 1]
                + smooth[:, 2] * weights[:, 2]).sum(0)
        if self.ld_idx.numel() > 0:
            wide = F.grid_sample(fine[:, 1:], ld_grid[:, None] * to_fine, mode="bilinear", padding_mode="zeros",
                                 align_corners=True)
            dose = dose.index_add(0, self.ld_idx, (wide[:, 0, 0] * ld_weights).sum(0))
        return dose

    def forward(self, fluence: torch.Tensor) -> torch.Tensor:
        """Dose of an arc's fluence maps.

        Parameters
        ----------
        fluence
            (n_sectors, rows, cols) MU per BEV pixel at the isocenter plane (``core.machine``
            convention), >= 0 for physical results; any real values are accepted (the map is linear).

        Returns
        -------
        torch.Tensor
            Dose in Gy on ``grid``, shape (nz, ny, nx); differentiable and linear in ``fluence``.
        """
        n_all = self.grid.shape[0] * self.grid.shape[1] * self.grid.shape[2]
        full = torch.zeros(n_all, device=self.device, dtype=self.dtype).index_add(0, self.act_idx,
                                                                                  self.voxel_dose(fluence))
        return full.reshape(self.grid.shape)

    def voxel_dose(self, fluence: torch.Tensor) -> torch.Tensor:
        """Dose (Gy) at the computed voxels only, ``(len(act_idx),)`` in the order of ``act_idx`` (flat
        indices on ``grid``); :meth:`forward` scatters it onto the grid. Differentiable and linear."""
        if tuple(fluence.shape) != self.fluence_shape:
            raise PlanningError(f"fluence shape {tuple(fluence.shape)} does not match the arc's {self.fluence_shape}")
        fl = fluence.to(device=self.device, dtype=self.dtype)
        total = self._active_dose_numba(fl) if self.backend == "numba" else self._active_dose_torch(fl)
        return total * self.cal

    def adjoint(self, weight: torch.Tensor) -> torch.Tensor:
        """``A^T w`` (``fluence_shape``), see :class:`DoseEngine`. The numba back-end computes it without a
        forward pass: the scatter adjoint of the weights' voxels (zero weights cost nothing) and the
        transposed fluence convolution; tens of milliseconds for a structure instead of a full pass."""
        if self.backend != "numba":
            return autograd_adjoint(self, weight, self.fluence_shape, device=self.device, dtype=self.dtype)
        w = weight.to(device=self.device, dtype=self.dtype).reshape(-1)[self.act_idx] * self.cal
        probe = torch.zeros(self.fluence_shape, device=self.device, dtype=self.dtype, requires_grad=True)
        with torch.enable_grad():
            fine = self.channel_maps(probe, "fine")
            coarse = self.channel_maps(probe, "coarse")
            g_fine, g_coarse = self._maps_adjoint(w, tuple(fine.shape))
            (adj,) = torch.autograd.grad([fine, coarse], probe, [g_fine, g_coarse])
        return adj.detach()

    def _maps_adjoint(self, grad: torch.Tensor, fine_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the fine and coarse channel maps from the gradient of the active voxels' dose
        (before ``cal``): the numba scatter adjoints of :mod:`pipeline.map_sampling`."""
        g_fine = torch.zeros(fine_shape, dtype=self.dtype)
        g_prim, g_coarse = sample_adjoint_pair(grad, self._plan_prim, self._plan_smooth)
        g_fine[:, :1] = g_prim
        if self.ld_idx.numel() > 0:
            g_fine[:, 1:] = sample_adjoint(grad[self.ld_idx], self._plan_ld)
        return g_fine, g_coarse

    def _active_dose_torch(self, fl: torch.Tensor) -> torch.Tensor:
        """Dose at the active voxels (without ``cal``): chunks under checkpointing, autograd backward."""
        total = torch.zeros(self.points.shape[1], device=self.device, dtype=self.dtype)
        for s in range(0, fl.shape[0], self.chunk):
            e = min(fl.shape[0], s + self.chunk)
            args = (fl[s:e], self.grid_xy[s:e], self.weights[s:e], self.ld_grid[s:e], self.ld_weights[s:e])
            if torch.is_grad_enabled() and fl.requires_grad:
                total = total + checkpoint(self._chunk_dose, *args, use_reentrant=False)
            else:
                total = total + self._chunk_dose(*args)
        return total

    def _active_dose_numba(self, fl: torch.Tensor) -> torch.Tensor:
        """Dose at the active voxels (without ``cal``): the numba adjoint when a gradient is needed."""
        fine = self.channel_maps(fl, "fine")
        coarse = self.channel_maps(fl, "coarse")
        if torch.is_grad_enabled() and fl.requires_grad:
            return _MapsDose.apply(fine, coarse, self)  # type: ignore[no-any-return]
        return self._maps_dose_chunked(fine, coarse)

    def _maps_dose_chunked(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(self.points.shape[1], device=self.device, dtype=self.dtype)
        for s in range(0, fine.shape[0], self.chunk):
            e = min(fine.shape[0], s + self.chunk)
            total = total + self._maps_dose(fine[s:e], coarse[s:e], self.grid_xy[s:e], self.weights[s:e],
                                            self.ld_grid[s:e], self.ld_weights[s:e])
        return total


def positions_in(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``values`` stand in the ascending ``index`` (flat voxel indices): their positions (valid
    where found) and whether each is there."""
    if index.numel() == 0:
        return torch.zeros_like(values), torch.zeros_like(values, dtype=torch.bool)
    pos = torch.searchsorted(index, values).clamp_max(index.numel() - 1)
    return pos, index[pos] == values


class RegionDose:
    """A restricted engine's dose as a vector over the voxels of its region: what an objective cut to
    that region reads (:meth:`pipeline.optimizer.DoseObjective.on_voxels`), without the full grid.

    Parameters
    ----------
    engine
        The engine restricted to ``region`` (:meth:`ReferenceDoseEngine.restricted`).
    region
        Bool on the engine's grid; its voxels outside the body get 0 Gy, as on the grid.
    sectors_per_beam
        The ``sectors_per_beam`` the engine was restricted with: the fluence of every that many adjacent
        sectors is summed before the engine doses it.

    Attributes
    ----------
    index
        Flat indices on the grid of the region's voxels, ascending: entry ``i`` of a dose is voxel
        ``index[i]``.
    """

    def __init__(self, engine: ReferenceDoseEngine, region: NDArray[np.bool_], *, sectors_per_beam: int = 1) -> None:
        flat = torch.as_tensor(np.flatnonzero(np.asarray(region, dtype=bool)), device=engine.device)
        pos, found = positions_in(flat, engine.act_idx)
        if not bool(found.all()):
            raise PlanningError("the engine computes voxels outside the region; restrict it to the region first")
        if sectors_per_beam < 1:
            raise PlanningError(f"sectors_per_beam must be >= 1, got {sectors_per_beam}")
        self.engine = engine
        self.index = flat
        self.sectors_per_beam = int(sectors_per_beam)
        self._pos = pos

    def __call__(self, fluence: torch.Tensor) -> torch.Tensor:
        """Dose (Gy) at the region's voxels, ``(len(index),)``; differentiable and linear."""
        k = self.sectors_per_beam
        if k > 1:
            if fluence.ndim != 3 or fluence.shape[0] != k * self.engine.fluence_shape[0]:
                raise PlanningError(f"fluence of shape {tuple(fluence.shape)} is not {k} x the engine's "
                                    f"{self.engine.fluence_shape[0]} beams")
            fluence = fluence.reshape(-1, k, *fluence.shape[1:]).sum(dim=1)
        dose = self.engine.voxel_dose(fluence)
        return dose.new_zeros(self.index.numel()).index_add(0, self._pos, dose)


class _MapsDose(torch.autograd.Function):
    """Channel maps -> dose at the active voxels: torch's vectorised ``grid_sample`` forward (no graph
    kept) and the numba scatter adjoint of :mod:`pipeline.map_sampling` backward."""

    @staticmethod
    def forward(ctx: Any, fine: torch.Tensor, coarse: torch.Tensor,  # type: ignore[override]
                engine: ReferenceDoseEngine) -> torch.Tensor:
        ctx.engine = engine
        ctx.shapes = (tuple(fine.shape), tuple(coarse.shape))
        with torch.no_grad():
            return engine._maps_dose_chunked(fine.detach(), coarse.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        engine: ReferenceDoseEngine = ctx.engine
        fine_shape, coarse_shape = ctx.shapes
        g_fine, g_coarse = engine._maps_adjoint(grad, fine_shape)
        assert tuple(g_coarse.shape) == coarse_shape
        return g_fine, g_coarse, None
