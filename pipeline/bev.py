"""Beam's-eye-view projection (AIRT eq. 2 and 13): a parameter-free, differentiable torch module.

For every control point (sector centre) of the arc, a volume on the dose grid is sampled along the
divergent rays from the source through the centre of every BEV pixel (the fluence-map convention of
``sequencing.machine``: row = leaf-pair axis ``y_b``, column = leaf-travel axis ``x_b``, 5 mm at the
isocenter plane, 20 x 20 cm) and **averaged** over the ray segment that crosses the grid's bounding
box (``depth_samples`` equidistant samples between the box's nearest and farthest planes along the
beam axis; samples outside the grid count as 0). The result is linear in the volume, so its adjoint
(autograd) spreads a BEV map back along the same rays.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.case import Grid
from pipeline.dose_engine import depth_range_mm, sample_planned, trilinear_plan
from pipeline.errors import PlanningError
from pipeline.geometry import ArcGeometry

log = logging.getLogger(__name__)


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
        Floating dtype of the sampling coordinates (volumes are cast to it).
    """

    grid0: torch.Tensor
    frac: torch.Tensor

    def __init__(self, grid: Grid, geometry: ArcGeometry, *, depth_samples: int = 64,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if depth_samples < 2:
            raise PlanningError(f"depth_samples must be >= 2, got {depth_samples}")
        self.grid = grid
        self.geometry = geometry
        self.depth_samples = int(depth_samples)
        self.device = torch.device(device)
        self.dtype = dtype
        bev = geometry.machine.bev
        sad = geometry.machine.sad_mm
        rot = geometry.sector_rotations()
        n_cp = rot.shape[0]
        t_range = depth_range_mm(grid, rot, geometry.isocenter_mm, sad, pad_mm=0.0)
        steps = np.linspace(0.0, 1.0, self.depth_samples)
        t = t_range[:, :1] + (t_range[:, 1:] - t_range[:, :1]) * steps[None, :]  # (n_cp, S)
        xc = 0.5 * (bev.col_edges_mm()[1:] + bev.col_edges_mm()[:-1])
        yc = 0.5 * (bev.row_edges_mm()[1:] + bev.row_edges_mm()[:-1])
        yy, xx = np.meshgrid(yc, xc, indexing="ij")  # (rows, cols)
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
        self.out_shape = (n_cp, bev.n_rows, bev.n_cols)
        grid0, frac, self.row_shift = trilinear_plan(idx.reshape(1, -1, 3), grid.shape)
        self.register_buffer("grid0", grid0)
        self.register_buffer("frac", frac)

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
        samples = sample_planned(vol[None], self.grid0, self.frac, self.row_shift)  # (1, B, n_cp*rows*cols*S)
        out = samples.reshape(vol.shape[0], *self.out_shape, self.depth_samples).mean(dim=-1)
        return out if batched else out[0]
