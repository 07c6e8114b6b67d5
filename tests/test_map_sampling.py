"""The numba adjoint of weighted bilinear sampling against torch's grid_sample autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.errors import PlanningError
from pipeline.map_sampling import SamplePlan, sample_adjoint, sample_adjoint_pair


def _forward(maps: torch.Tensor, xy: torch.Tensor, w: torch.Tensor, scale: tuple[float, float],
             c0: int) -> torch.Tensor:
    """``out[n] = sum_b sum_c w[b, c0 + c, n] * bilinear(maps[b, c], xy[b, n] * scale)`` with grid_sample."""
    g = xy * torch.tensor(scale, dtype=xy.dtype)
    s = F.grid_sample(maps, g[:, None], mode="bilinear", padding_mode="zeros", align_corners=True)[:, :, 0]
    return (s * w[:, c0:c0 + maps.shape[1]]).sum(dim=(0, 1))


def _problem(dtype: torch.dtype, n_channels: int, c0: int, seed: int, b: int = 5, n: int = 5000,
             rows: int = 9, cols: int = 13) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(b, n_channels, rows, cols, generator=gen, dtype=dtype)
    # positions reach beyond the maps: the outer ring interpolates towards 0, further out reads 0
    xy = (torch.rand(b, n, 2, generator=gen, dtype=dtype) * 2.0 - 1.0) * 1.4
    w = torch.rand(b, c0 + n_channels, n, generator=gen, dtype=dtype)
    return maps, xy, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n_channels", "c0", "scale"), [(1, 0, (1.0, 1.0)), (3, 0, (1.3, 0.8)), (2, 1, (1.0, 1.0))])
def test_adjoint_is_grid_sample_gradient(dtype: torch.dtype, n_channels: int, c0: int,
                                         scale: tuple[float, float]) -> None:
    maps, xy, w = _problem(dtype, n_channels, c0, seed=n_channels + c0)
    n = xy.shape[1]
    plan = SamplePlan(xy, w, tuple(maps.shape[2:]), scale, first_channel=c0, n_channels=n_channels)  # type: ignore[arg-type]
    upstream = torch.arange(n, dtype=dtype) / n
    m = maps.clone().requires_grad_(True)
    _forward(m, xy, w, scale, c0).backward(upstream)
    got = sample_adjoint(upstream, plan)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert m.grad is not None and float(m.grad.abs().sum()) > 0
    torch.testing.assert_close(got, m.grad, rtol=tol, atol=tol * n)


def test_dot_product_identity() -> None:
    """<A maps, v> == <maps, A^T v> in float64 for random maps and point values."""
    maps, xy, w = _problem(torch.float64, 2, 0, seed=11, b=3, n=700, rows=6, cols=7)
    plan = SamplePlan(xy, w, (6, 7), (1.1, 0.9))
    v = torch.randn(700, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lhs = float((_forward(maps, xy, w, (1.1, 0.9), 0) * v).sum())
    rhs = float((maps * sample_adjoint(v, plan)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)
    assert abs(lhs) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_adjoint_is_the_two_adjoints(dtype: torch.dtype) -> None:
    """One pass for the primary (1 channel, fine lattice) and scatter (3 channels, coarse) plans of the same
    positions and weights gives what two passes give; plans that share nothing are refused."""
    _, xy, w = _problem(dtype, 3, 0, seed=5)
    fine = SamplePlan(xy, w, (21, 17), (1.6, 1.4), n_channels=1)
    coarse = SamplePlan(xy, w, (7, 6), n_channels=3)
    upstream = torch.rand(xy.shape[1], generator=torch.Generator().manual_seed(2), dtype=dtype)
    upstream[::7] = 0.0  # points without a gradient are skipped
    got_fine, got_coarse = sample_adjoint_pair(upstream, fine, coarse)
    assert float(got_fine.abs().sum()) > 0 and float(got_coarse.abs().sum()) > 0
    tol = 1e-6 if dtype == torch.float32 else 1e-14  # the same sums; the compiler may fuse them differently
    torch.testing.assert_close(got_fine, sample_adjoint(upstream, fine), rtol=tol, atol=tol)
    torch.testing.assert_close(got_coarse, sample_adjoint(upstream, coarse), rtol=tol, atol=tol)
    other = SamplePlan(xy.clone(), w, (7, 6), n_channels=3)
    with pytest.raises(PlanningError, match="share"):
        sample_adjoint_pair(upstream, fine, other)
    with pytest.raises(PlanningError, match="1 and 3"):
        sample_adjoint_pair(upstream, coarse, fine)


def test_bad_plans_and_inputs() -> None:
    xy = torch.zeros(2, 10, 2)
    with pytest.raises(PlanningError, match="do not match"):
        SamplePlan(xy, torch.zeros(3, 1, 10), (4, 4))
    with pytest.raises(PlanningError, match="channels"):
        SamplePlan(xy, torch.zeros(2, 1, 10), (4, 4), first_channel=1)
    with pytest.raises(PlanningError, match="differ"):
        SamplePlan(xy, torch.zeros(2, 1, 10, dtype=torch.float64), (4, 4))
    plan = SamplePlan(xy, torch.zeros(2, 1, 10), (4, 4))
    with pytest.raises(PlanningError, match="adjoint input has shape"):
        sample_adjoint(torch.zeros(9), plan)
