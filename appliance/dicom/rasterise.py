"""Closed planar polygons (an RT Structure Set's contours) filled onto a grid by the even-odd rule."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray

from core.case import Grid


def rasterise_polygons(
    polygons: Iterable[tuple[int, NDArray[np.float64]]], grid: Grid
) -> NDArray[np.bool_]:
    """Fill closed planar polygons onto a grid by the even-odd rule.

    A voxel is inside when its centre lies inside the polygons of its slice by the even-odd
    (crossing-number) rule, so several polygons on one slice are the XOR of their fills: a
    polygon inside another is a hole, disjoint polygons add. Scanline filling, vectorised over
    all polygons at once (one pass over the edges, no per-pixel test); the half-open crossing
    rule makes a centre exactly on a horizontal edge count consistently.

    Parameters
    ----------
    polygons
        ``(k, xy)`` pairs: slice index ``k`` of the grid (polygons on slices outside
        ``[0, nz)`` are ignored) and the polygon's vertices, shape ``(n, 2)``, patient x and y in
        mm; the polygon is closed implicitly (last vertex to first). Polygons with fewer than
        3 vertices are ignored.
    grid
        The grid to fill (its x/y origin and spacing place the vertices).

    Returns
    -------
    numpy.ndarray
        Boolean mask of shape ``grid.shape``.
    """
    nz, ny, nx = grid.shape
    mask = np.zeros(grid.shape, dtype=np.bool_)
    ox, oy, _ = grid.origin_mm
    dx, dy, _ = grid.spacing_mm
    ks: list[NDArray[np.int64]] = []
    us: list[NDArray[np.float64]] = []
    vs: list[NDArray[np.float64]] = []
    for k, xy in polygons:
        pts = np.asarray(xy, dtype=np.float64)
        if not 0 <= k < nz or pts.ndim != 2 or pts.shape[0] < 3 or pts.shape[1] != 2:
            continue
        ks.append(np.full(pts.shape[0], k, dtype=np.int64))
        us.append((pts[:, 0] - ox) / dx)
        vs.append((pts[:, 1] - oy) / dy)
    if not ks:
        return mask
    # Edges (u_a, v_a) -> (u_b, v_b) in continuous index units, each polygon closed.
    k_e = np.concatenate(ks)
    u_a = np.concatenate(us)
    v_a = np.concatenate(vs)
    u_b = np.concatenate([np.roll(u, -1) for u in us])
    v_b = np.concatenate([np.roll(v, -1) for v in vs])
    v_lo = np.minimum(v_a, v_b)
    v_hi = np.maximum(v_a, v_b)
    # Rows j (pixel-centre lines v = j) crossed by an edge: v_lo <= j < v_hi (half-open).
    j_lo = np.maximum(np.ceil(v_lo), 0).astype(np.int64)
    j_hi = np.minimum(np.ceil(v_hi) - 1, ny - 1).astype(np.int64)
    counts = np.maximum(j_hi - j_lo + 1, 0)
    total = int(counts.sum())
    if total == 0:
        return mask
    edge = np.repeat(np.arange(k_e.size), counts)
    offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    j = j_lo[edge] + offset
    t = (j - v_a[edge]) / (v_b[edge] - v_a[edge])  # v_b != v_a wherever counts > 0
    u = u_a[edge] + t * (u_b[edge] - u_a[edge])
    row = k_e[edge] * ny + j
    order = np.lexsort((u, row))
    row = row[order]
    u = u[order]
    # Every closed polygon crosses a row an even number of times, so consecutive crossings of a
    # row pair up into disjoint spans: the even-odd fill.
    row_s, u_s, u_e = row[0::2], u[0::2], u[1::2]
    i_s = np.clip(np.ceil(u_s), 0, nx).astype(np.int64)
    i_e = np.clip(np.floor(u_e), -1, nx - 1).astype(np.int64)
    keep = i_e >= i_s
    row_s, i_s, i_e = row_s[keep], i_s[keep], i_e[keep]
    if row_s.size == 0:
        return mask
    rows, inverse = np.unique(row_s, return_inverse=True)
    # +1 where a span starts, -1 just after it ends; the running sum along a row is 1 inside.
    # Spans of a row are disjoint, so no two starts (nor two ends) share a cell and plain fancy
    # indexing is exact; a start may meet the previous span's end, hence two separate updates.
    diff = np.zeros((rows.size, nx + 1), dtype=np.int8)
    diff[inverse, i_s] += 1
    diff[inverse, i_e + 1] -= 1
    mask.reshape(nz * ny, nx)[rows] = np.cumsum(diff, axis=1, dtype=np.int8)[:, :nx] > 0
    return mask
