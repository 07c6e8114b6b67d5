"""The numba weighted bilinear sampler and its adjoint against torch's grid_sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import PlanningError
from pipeline.map_sampling import SamplePlan, weighted_sample


def _reference(maps: torch.Tensor, xy: torch.Tensor, w: torch.Tensor, scale: tuple[float, float],
               c0: int) -> torch.Tensor:
    g = xy * torch.tensor(scale, dtype=xy.dtype)
    s = F.grid_sample(maps, g[:, None], mode="bilinear", padding_mode="zeros", align_corners=True)[:, :, 0]
    return (s * w[:, c0:c0 + maps.shape[1]]).sum(dim=(0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n_channels", "c0", "scale"), [(1, 0, (1.0, 1.0)), (3, 0, (1.3, 0.8)), (2, 1, (1.0, 1.0))])
def test_matches_grid_sample(dtype: torch.dtype, n_channels: int, c0: int, scale: tuple[float, float]) -> None:
    gen = torch.Generator().manual_seed(n_channels + c0)
    b, n, rows, cols = 5, 5000, 9, 13
    maps = torch.rand(b, n_channels, rows, cols, generator=gen, dtype=dtype)
    # positions reach beyond the maps: the outer ring interpolates towards 0, further out reads 0
    xy = (torch.rand(b, n, 2, generator=gen, dtype=dtype) * 2.0 - 1.0) * 1.4
    w = torch.rand(b, c0 + n_channels, n, generator=gen, dtype=dtype)
    plan = SamplePlan(xy, w, (rows, cols), scale, first_channel=c0, n_channels=n_channels)
    m = maps.clone().requires_grad_(True)
    got = weighted_sample(m, plan)
    got.backward(torch.arange(n, dtype=dtype) / n)
    m_ref = maps.clone().requires_grad_(True)
    want = _reference(m_ref, xy, w, scale, c0)
    want.backward(torch.arange(n, dtype=dtype) / n)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(m.grad, m_ref.grad, rtol=tol, atol=tol * n)
    assert float(got.detach().abs().sum()) > 0


def test_gradcheck() -> None:
    gen = torch.Generator().manual_seed(7)
    xy = torch.rand(2, 40, 2, generator=gen, dtype=torch.float64) * 2.2 - 1.1
    w = torch.rand(2, 2, 40, generator=gen, dtype=torch.float64)
    plan = SamplePlan(xy, w, (4, 5))
    maps = torch.rand(2, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: weighted_sample(m, plan), (maps,), eps=1e-6, atol=1e-9)


def test_bad_plans_and_maps() -> None:
    xy = torch.zeros(2, 10, 2)
    with pytest.raises(PlanningError, match="do not match"):
        SamplePlan(xy, torch.zeros(3, 1, 10), (4, 4))
    with pytest.raises(PlanningError, match="channels"):
        SamplePlan(xy, torch.zeros(2, 1, 10), (4, 4), first_channel=1)
    with pytest.raises(PlanningError, match="differ"):
        SamplePlan(xy, torch.zeros(2, 1, 10, dtype=torch.float64), (4, 4))
    plan = SamplePlan(xy, torch.zeros(2, 1, 10), (4, 4))
    with pytest.raises(PlanningError, match="do not match"):
        weighted_sample(torch.zeros(2, 1, 5, 4), plan)
    with pytest.raises(PlanningError, match="dtype"):
        weighted_sample(torch.zeros(2, 1, 4, 4, dtype=torch.float64), plan)
