"""Fast dose: the paper's physics-informed "DL dose" (paper eq. 4, Note S1 "Dose Computation Network").

Two stages:

1. A parameter-free physics layer (:class:`PrimaryFluenceSH`) that accumulates, per dose-grid
   voxel, the primary (uncollided) fluence of every control point, weighted by the real
   spherical harmonics ``Y_lm`` of the beam direction up to order ``L``. For control point
   ``k`` and voxel ``p`` the primary fluence is the fluence map sampled (bilinearly) where the
   divergent ray from the source through ``p`` crosses the isocenter plane, times the inverse
   square factor ``(SAD / r)^2`` (``r`` the source distance along the beam axis) and the
   attenuation ``exp(-mu * d_rad)`` (``d_rad`` the radiological depth, mm of water-equivalent
   path from the source to ``p``). This is the transpose of a BEV projection; it is linear in
   the fluence. The paper uses ``L = 4`` (25 coefficients); ``L = 1`` (4) or ``L = 2`` (9)
   are the low-order versions. Everything that depends only on the case and the arc (sampling
   positions, attenuation, ``Y_lm``) is computed once per case by :func:`primary_geometry`.
2. A small MedNeXt image-to-image network (:class:`pipeline.nets.blocks.MedNeXtUNet`) mapping
   ``[SH channels, relative density]`` to the dose, with a leaky-ReLU output (slope 1e-2).

The relative-density conversion and the effective attenuation coefficient are deliberately
simple (the configured HU -> density curve, one ``mu`` for the 6 MV spectrum): stage 2 learns the
rest from the reference dose engine.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray
from scipy import special
from torch import Tensor, nn

from core.case import Grid, PatientPosition
from core.errors import InputError
from core.machine import ArcSpec, BevGrid, MachineModel
from pipeline.geometry import ArcGeometry
from pipeline.nets.blocks import MedNeXtUNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FastDoseConfig:
    """Sizes and physics constants of a :class:`FastDose` network.

    Parameters
    ----------
    sh_order
        Highest spherical-harmonic order ``L`` of stage 1 (0-4); ``(L + 1)**2`` channels.
    mu_per_mm
        Effective linear attenuation coefficient of water for the beam, 1/mm (6 MV: ~0.005).
    sh_scale
        Factor applied to the SH channels before stage 2 (so that a typical plan gives O(1)
        inputs; 1 / (typical MU per control point) is a good choice).
    ray_spacing_mm
        Spacing at the isocenter plane of the rays traced for the radiological depth, mm (> 0).
    ray_step_mm
        Step along those rays, mm (> 0); depth is interpolated linearly between steps.
    channels, blocks, expansion, kernel_size
        Stage-2 MedNeXt sizes (see :class:`pipeline.nets.blocks.MedNeXtUNet`).
    """

    sh_order: int = 4
    mu_per_mm: float = 0.0049
    sh_scale: float = 0.1
    ray_spacing_mm: float = 5.0
    ray_step_mm: float = 4.0
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    blocks: tuple[int, ...] = (2, 2, 2, 2, 2, 2, 2, 2, 2)
    expansion: tuple[int, ...] = (4, 4, 4, 4, 4, 4, 4, 4, 4)
    kernel_size: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.sh_order <= 8:
            raise ValueError(f"FastDoseConfig sh_order must be in [0, 8], got {self.sh_order}")
        if not self.mu_per_mm >= 0 or not self.sh_scale > 0:
            raise ValueError("FastDoseConfig needs mu_per_mm >= 0 and sh_scale > 0")
        if not (self.ray_spacing_mm > 0 and self.ray_step_mm > 0):
            raise ValueError("FastDoseConfig ray_spacing_mm and ray_step_mm must be > 0")
        n = 2 * (len(self.channels) - 1) + 1
        if len(self.channels) < 2 or len(self.blocks) != n or len(self.expansion) != n:
            raise ValueError(
                f"FastDoseConfig: {len(self.channels)} widths need {n} blocks and expansion entries"
            )

    @property
    def n_sh(self) -> int:
        """Number of spherical-harmonic channels, ``(sh_order + 1)**2``."""
        return (self.sh_order + 1) ** 2

    @classmethod
    def paper(cls) -> FastDoseConfig:
        """The paper's size: L = 4 (26 input channels), 16 -> 32 -> 64 -> 128 -> 256 (~2.8 M)."""
        return cls()

    @classmethod
    def small(cls) -> FastDoseConfig:
        """A CPU size: L = 2 (10 input channels), 8 -> 16 -> 32, bottleneck 64, expansion 2; depth
        traced on 10 mm rays in 8 mm steps."""
        return cls(
            sh_order=2,
            ray_spacing_mm=10.0,
            ray_step_mm=8.0,
            channels=(8, 16, 32, 64),
            blocks=(1, 1, 1, 1, 1, 1, 1),
            expansion=(2, 2, 2, 2, 2, 2, 2),
        )


# --------------------------------------------------------------------------- physics helpers


def real_sph_harm(directions: ArrayLike, order: int) -> NDArray[np.float64]:
    """Real orthonormal spherical harmonics ``Y_lm`` of unit directions, up to ``order``.

    Parameters
    ----------
    directions
        ``(n, 3)`` vectors (need not be unit length, must be non-zero).
    order
        Highest degree ``L`` (>= 0).

    Returns
    -------
    ndarray
        ``(n, (L + 1)**2)``; column ``l*l + l + m`` holds ``Y_lm`` (``-l <= m <= l``), with
        ``Y_lm ~ cos(m phi)`` for ``m > 0`` and ``sin(|m| phi)`` for ``m < 0`` (no Condon-Shortley
        phase). Orthonormal on the unit sphere: ``int Y_i Y_j dOmega = delta_ij``.
    """
    d = np.asarray(directions, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] != 3:
        raise InputError(f"real_sph_harm needs (n, 3) directions, got shape {d.shape}")
    norm = np.linalg.norm(d, axis=1)
    if np.any(norm == 0):
        raise InputError("real_sph_harm got a zero direction vector")
    d = d / norm[:, None]
    cos_t = np.clip(d[:, 2], -1.0, 1.0)
    phi = np.arctan2(d[:, 1], d[:, 0])
    out = np.zeros((d.shape[0], (order + 1) ** 2))
    for ell in range(order + 1):
        for m in range(ell + 1):
            k = math.sqrt((2 * ell + 1) / (4 * math.pi) * math.factorial(ell - m) / math.factorial(ell + m))
            p = (-1.0) ** m * special.lpmv(m, ell, cos_t)  # remove the Condon-Shortley phase
            if m == 0:
                out[:, ell * ell + ell] = k * p
            else:
                out[:, ell * ell + ell + m] = math.sqrt(2.0) * k * p * np.cos(m * phi)
                out[:, ell * ell + ell - m] = math.sqrt(2.0) * k * p * np.sin(m * phi)
    return out


def arc_frames(
    arc: ArcSpec, machine: MachineModel, isocenter_mm: ArrayLike, position: PatientPosition
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-sector rotations ``(n, 3, 3)`` (columns: IEC BLD x, y, z in LPS) and sources ``(n, 3)`` mm.

    Taken from :class:`pipeline.geometry.ArcGeometry`, the project's single beam geometry.
    """
    iso = np.asarray(isocenter_mm, dtype=np.float64).reshape(3)
    g = ArcGeometry(arc, (float(iso[0]), float(iso[1]), float(iso[2])), position, machine)
    return g.sector_rotations(), g.sources_mm()


# --------------------------------------------------------------------------- stage 1


@dataclass(frozen=True, eq=False)
class PrimaryGeometry:
    """Everything stage 1 needs that depends on the case and the arc, not on the fluence.

    Attributes
    ----------
    sample_grid
        ``(n_cp, N, 1, 2)`` normalised (x = leaf travel, y = leaf-pair axis) position in each
        fluence map of the ray through each of the ``N = nz*ny*nx`` voxels; outside [-1, 1] is
        outside the BEV field.
    weight
        ``(n_cp, 1, N)`` inverse-square times attenuation factor, dimensionless, in (0, inf).
    sh
        ``(n_cp, n_sh)`` real spherical harmonics of each control point's beam direction.
    density
        ``(1, 1, nz, ny, nx)`` relative electron density (stage 2's CT channel).
    shape
        ``(nz, ny, nx)`` of the dose grid.
    bev
        The BEV grid the fluence maps are on.
    """

    sample_grid: Tensor
    weight: Tensor
    sh: Tensor
    density: Tensor
    shape: tuple[int, int, int]
    bev: BevGrid

    @property
    def n_cp(self) -> int:
        """Number of control points (fluence maps)."""
        return int(self.sample_grid.shape[0])

    def to(self, device: torch.device | str) -> PrimaryGeometry:
        """A copy on ``device``."""
        return PrimaryGeometry(
            self.sample_grid.to(device),
            self.weight.to(device),
            self.sh.to(device),
            self.density.to(device),
            self.shape,
            self.bev,
        )


def primary_geometry(
    density: ArrayLike,
    grid: Grid,
    rotations: ArrayLike,
    sources_mm: ArrayLike,
    isocenter_mm: ArrayLike,
    *,
    sad_mm: float,
    bev: BevGrid,
    sh_order: int,
    mu_per_mm: float,
    ray_spacing_mm: float = 5.0,
    ray_step_mm: float = 4.0,
    chunk: int = 16,
) -> PrimaryGeometry:
    """Precompute stage 1's sampling positions, attenuation and SH weights for one case.

    Parameters
    ----------
    density
        Relative electron density on the dose grid, ``grid.shape`` (see :func:`pipeline.dose_engine.hu_to_density`).
    grid
        The dose grid (LPS, mm).
    rotations
        ``(n_cp, 3, 3)``: columns are the beam-limiting-device axes x (leaf travel), y (leaf-pair
        axis), z (towards the source) in LPS, one per control point.
    sources_mm
        ``(n_cp, 3)`` source positions, LPS mm (``isocenter + sad * z``).
    isocenter_mm
        ``(3,)`` isocenter, LPS mm.
    sad_mm
        Source-axis distance, mm.
    bev
        BEV grid of the fluence maps (rows = y, cols = x, pixel size at the isocenter plane).
    sh_order
        Highest SH order ``L``.
    mu_per_mm
        Effective attenuation coefficient, 1/mm.
    ray_spacing_mm
        Spacing of the rays traced for the radiological depth at the isocenter plane, mm.
    ray_step_mm
        Step along those rays, mm.
    chunk
        Control points traced at a time (bounds memory: ``chunk * n_steps * n_rays``).

    Notes
    -----
    Memory: ``12 * n_cp * nz * ny * nx`` bytes (180 control points on a 4 mm pelvis box of
    100 x 64 x 40 voxels: about 550 MB; on an 8 mm box: about 70 MB).
    """
    rho = np.asarray(density, dtype=np.float32)
    if rho.shape != grid.shape:
        raise InputError(f"density shape {rho.shape} does not match the dose grid {grid.shape}")
    rot = torch.as_tensor(np.asarray(rotations, dtype=np.float64))
    src = torch.as_tensor(np.asarray(sources_mm, dtype=np.float64))
    iso = torch.as_tensor(np.asarray(isocenter_mm, dtype=np.float64).reshape(3))
    if rot.ndim != 3 or rot.shape[1:] != (3, 3) or src.shape != (rot.shape[0], 3):
        raise InputError(f"rotations must be (n, 3, 3) and sources (n, 3), got {tuple(rot.shape)}, {tuple(src.shape)}")
    n_cp = rot.shape[0]
    nz, ny, nx = grid.shape
    xs, ys, zs = (torch.as_tensor(a) for a in grid.axes_mm())
    zz, yy, xx = torch.meshgrid(zs, ys, xs, indexing="ij")
    pts = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)  # (N, 3) LPS mm, [z, y, x] order
    rho_t = torch.from_numpy(rho)[None, None]  # (1, 1, nz, ny, nx)

    # Radiological depth: trace a divergent ray volume per control point, cumulative density.
    corners = torch.stack(
        torch.meshgrid(*(torch.tensor([a[0], a[-1]]) for a in (xs, ys, zs)), indexing="ij"), dim=-1
    ).reshape(-1, 3)
    reach = float((corners - iso).norm(dim=1).max()) + max(grid.spacing_mm)
    if not (ray_spacing_mm > 0 and ray_step_mm > 0):
        raise InputError(f"ray spacing and step must be > 0 mm, got {ray_spacing_mm}, {ray_step_mm}")
    step = float(ray_step_mm)
    r_min = max(sad_mm - reach, 1.0)
    n_r = math.ceil((sad_mm + reach - r_min) / step) + 1
    r = r_min + step * torch.arange(n_r, dtype=torch.float64)
    n_u = max(math.ceil(2 * bev.half_width_mm / ray_spacing_mm), 2)
    n_w = max(math.ceil(2 * bev.half_height_mm / ray_spacing_mm), 2)
    hw, hh = bev.half_width_mm, bev.half_height_mm
    u = -hw + (torch.arange(n_u, dtype=torch.float64) + 0.5) * (2 * hw / n_u)
    w = -hh + (torch.arange(n_w, dtype=torch.float64) + 0.5) * (2 * hh / n_w)
    ww, uu = torch.meshgrid(w, u, indexing="ij")  # (n_w, n_u)
    stretch = torch.sqrt(1.0 + (uu**2 + ww**2) / sad_mm**2)  # path length per unit of r
    # Normalised density-grid coordinates (align_corners=True) are affine in LPS: g = A p + off.
    scale = 2.0 / (torch.tensor([nx, ny, nz], dtype=torch.float64) - 1.0).clamp_min(1.0)
    A = scale / torch.tensor(grid.spacing_mm, dtype=torch.float64)
    off = -A * torch.tensor(grid.origin_mm, dtype=torch.float64) - 1.0
    rz_q = r.float()[None, :, None, None, None]
    rel = (pts - iso).float()
    rho_f = rho_t.float()

    sample_grid = torch.empty(n_cp, pts.shape[0], 1, 2, dtype=torch.float32)
    weight = torch.empty(n_cp, 1, pts.shape[0], dtype=torch.float32)
    for start in range(0, n_cp, chunk):
        sl = slice(start, min(start + chunk, n_cp))
        R, s = rot[sl], src[sl]
        c = R.shape[0]
        # Ray sample points p = s + r d(u, w) with d = (u X + w Y - SAD Z) / SAD, in grid coordinates.
        AR = A[None, :, None] * R  # (c, 3, 3): the BLD axes in normalised grid units per mm
        d = (
            uu[None, :, :, None] * AR[:, None, None, :, 0]
            + ww[None, :, :, None] * AR[:, None, None, :, 1]
            - sad_mm * AR[:, None, None, :, 2]
        ) / sad_mm  # (c, n_w, n_u, 3)
        g0 = (A * s + off).float()[:, None, None, None, :]
        g = torch.addcmul(g0, rz_q, d.float()[:, None])  # (c, n_r, n_w, n_u, 3)
        vals = F.grid_sample(
            rho_f.expand(c, -1, -1, -1, -1), g, mode="bilinear", padding_mode="zeros", align_corners=True
        )[:, 0]  # (c, n_r, n_w, n_u)
        seg = vals * (step * stretch).float()
        cum = torch.cumsum(seg, dim=1) - 0.5 * seg  # depth to the middle of each sample, mm

        # Voxels in beam coordinates.
        bvec = torch.einsum("nk,ckj->cnj", rel, R.float())  # (c, N, 3): x, y, z along the BLD axes
        dist = (sad_mm - bvec[..., 2]).clamp_min(1.0)
        mag = sad_mm / dist
        gq = torch.stack(  # (c, N, 3): normalised (u, w, r) of each voxel
            [bvec[..., 0] * mag / hw, bvec[..., 1] * mag / hh, ((dist - r_min) / step + 0.5) * (2.0 / n_r) - 1.0],
            dim=-1,
        )
        sample_grid[sl, :, 0, :] = gq[..., :2]
        gq = gq[:, :, None, None, :]  # (c, N, 1, 1, 3)
        depth = F.grid_sample(
            cum[:, None], gq, mode="bilinear", padding_mode="border", align_corners=False
        )[:, 0, :, 0, 0]  # (c, N)
        weight[sl, 0, :] = mag**2 * torch.exp(-mu_per_mm * depth)

    beam_dirs = -rot[:, :, 2].numpy()  # propagation: from the source towards the isocenter
    sh = torch.from_numpy(real_sph_harm(beam_dirs, sh_order).astype(np.float32))
    log.debug("primary geometry: %d control points, grid %s, %d ray depths", n_cp, grid.shape, n_r)
    return PrimaryGeometry(sample_grid, weight, sh, rho_t.float(), (nz, ny, nx), bev)


def primary_geometry_for_arc(
    density: ArrayLike,
    grid: Grid,
    arc: ArcSpec,
    machine: MachineModel,
    isocenter_mm: ArrayLike,
    position: PatientPosition,
    config: FastDoseConfig,
) -> PrimaryGeometry:
    """:func:`primary_geometry` for an arc: one control point per sector centre."""
    rot, src = arc_frames(arc, machine, isocenter_mm, position)
    return primary_geometry(
        density, grid, rot, src, isocenter_mm,
        sad_mm=machine.sad_mm, bev=machine.bev, sh_order=config.sh_order, mu_per_mm=config.mu_per_mm,
        ray_spacing_mm=config.ray_spacing_mm, ray_step_mm=config.ray_step_mm,
    )


class PrimaryFluenceSH(nn.Module):
    """Stage 1 (no parameters): fluence maps -> per-voxel SH coefficients of the primary fluence.

    ``forward(fluence, geom)`` takes ``(n_cp, rows, cols)`` or ``(B, n_cp, rows, cols)`` maps (MU
    per pixel, all sets on the geometry ``geom``) and returns ``(B, n_sh, nz, ny, nx)``:
    ``sum_k Y(k) * weight_k(p) * F_k(u_k(p), w_k(p))``. Linear in the fluence; channel 0 (``Y_00``)
    is non-negative for non-negative fluence.
    """

    def forward(self, fluence: Tensor, geom: PrimaryGeometry) -> Tensor:
        """Accumulate the SH moments of the primary fluence (see the class docstring)."""
        if fluence.ndim == 3:
            fluence = fluence[None]
        expected = (geom.n_cp, geom.bev.n_rows, geom.bev.n_cols)
        if fluence.ndim != 4 or tuple(fluence.shape[1:]) != expected:
            raise InputError(f"fast dose expects fluence (B, {expected}), got {tuple(fluence.shape)}")
        maps = fluence.transpose(0, 1)  # (n_cp, B, rows, cols): the sets become channels
        sampled = F.grid_sample(
            maps, geom.sample_grid.to(maps.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
        )[..., 0]  # (n_cp, B, N)
        prim = sampled * geom.weight.to(maps.dtype)
        out = torch.einsum("cbn,cs->bsn", prim, geom.sh.to(maps.dtype))
        return out.reshape(fluence.shape[0], geom.sh.shape[1], *geom.shape)


class FastDose(nn.Module):
    """Fluence maps -> dose on the case's dose grid (stage 1 physics, stage 2 MedNeXt).

    ``forward(fluence, geom)`` returns ``(B, 1, nz, ny, nx)`` in the units of the training
    targets (Gy for the plan's fluence in MU unless the model folder's ``normalisation`` says
    otherwise). Stage 2 sees ``[sh_scale * SH channels, relative density]``.
    """

    def __init__(self, config: FastDoseConfig) -> None:
        super().__init__()
        self.config = config
        self.stage1 = PrimaryFluenceSH()
        self.stage2 = MedNeXtUNet(
            config.n_sh + 1, 1, config.channels, config.blocks, config.expansion, config.kernel_size
        )

    def forward(self, fluence: Tensor, geom: PrimaryGeometry) -> Tensor:
        """Compute the dose of ``fluence`` (``(n_cp, rows, cols)`` or ``(B, n_cp, rows, cols)``)."""
        if geom.sh.shape[1] != self.config.n_sh:
            raise InputError(
                f"the primary geometry has {geom.sh.shape[1]} SH channels but the network was built "
                f"for sh_order={self.config.sh_order}; rebuild it with primary_geometry_for_arc(config=...)"
            )
        sh = self.stage1(fluence, geom) * self.config.sh_scale
        dens = geom.density.to(sh.dtype).expand(sh.shape[0], -1, -1, -1, -1)
        return F.leaky_relu(self.stage2(torch.cat([sh, dens], dim=1)), negative_slope=1e-2)
