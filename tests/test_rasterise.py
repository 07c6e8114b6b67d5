"""The rasteriser (appliance.dicom.rasterise): closed planar polygons filled by the even-odd rule, against
matplotlib's point-in-polygon test, on degenerate input and on abutting and nested spans."""

from __future__ import annotations

import numpy as np
from matplotlib.path import Path as MplPath
from numpy.typing import NDArray

from appliance.dicom.rasterise import rasterise_polygons
from core.case import Grid


def square(cx: float, cy: float, half: float) -> NDArray[np.float64]:
    lo_x, hi_x, lo_y, hi_y = cx - half, cx + half, cy - half, cy + half
    return np.array([[lo_x, lo_y], [hi_x, lo_y], [hi_x, hi_y], [lo_x, hi_y]])


def test_scanline_rasteriser_matches_matplotlib_reference() -> None:
    rng = np.random.default_rng(7)
    grid = Grid(origin_mm=(-30.3, -20.1, 0.0), spacing_mm=(1.1, 0.9, 2.0), shape=(4, 50, 60))
    x, y, _ = grid.axes_mm()
    xx, yy = np.meshgrid(x, y)
    centres = np.column_stack([xx.ravel(), yy.ravel()])
    polys: list[tuple[int, NDArray[np.float64]]] = []
    expected = np.zeros(grid.shape, dtype=bool)
    for k in range(grid.shape[0]):
        for _ in range(4):  # overlapping star-shaped polygons, some reaching past the grid edge
            n = int(rng.integers(3, 30))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = rng.uniform(3, 25, n)
            c = rng.uniform([-35, -25], [35, 25])
            xy = np.column_stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)])
            polys.append((k, xy))
            inside = MplPath(xy).contains_points(centres).reshape(grid.shape[1:])
            expected[k] ^= inside
    got = rasterise_polygons(polys, grid)
    # Centres lying exactly on an edge may go either way; random vertices make that vanishingly rare.
    assert np.count_nonzero(got != expected) <= 2
    assert expected.sum() > 500


def test_rasteriser_ignores_degenerate_input() -> None:
    grid = Grid(origin_mm=(0.0, 0.0, 0.0), spacing_mm=(1.0, 1.0, 1.0), shape=(2, 10, 10))
    pts = np.array([[1.0, 1.0], [5.0, 5.0]])
    flat = np.array([[1.0, 2.0], [5.0, 2.0], [8.0, 2.0]])
    polys = [(0, pts), (5, square(4, 4, 3)), (-1, square(4, 4, 3)), (1, flat)]
    assert not rasterise_polygons(polys, grid).any()


def test_rasteriser_abutting_and_nested_spans() -> None:
    grid = Grid(origin_mm=(0.0, 0.0, 0.0), spacing_mm=(1.0, 1.0, 1.0), shape=(1, 6, 12))

    def rect(x0: float, x1: float) -> NDArray[np.float64]:
        return np.array([[x0, 0.5], [x1, 0.5], [x1, 4.5], [x0, 4.5]])

    # Columns 1-3 and 4-7 touch (one span ends where the next starts); 9-10 is separate.
    got = rasterise_polygons([(0, rect(0.2, 3.7)), (0, rect(3.8, 7.6)), (0, rect(8.6, 10.4))], grid)
    expected_row = np.zeros(12, dtype=bool)
    expected_row[[1, 2, 3, 4, 5, 6, 7, 9, 10]] = True
    for j in range(6):
        np.testing.assert_array_equal(got[0, j], expected_row if 1 <= j <= 4 else np.zeros(12, dtype=bool))
    # Three nested rectangles: even-odd gives outer ring + innermost island.
    nested = rasterise_polygons([(0, rect(0.5, 11.5)), (0, rect(2.5, 9.5)), (0, rect(4.5, 7.5))], grid)
    np.testing.assert_array_equal(nested[0, 2], [0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1])
