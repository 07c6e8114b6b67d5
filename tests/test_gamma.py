"""Gamma pass rate on analytic dose distributions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.gamma import gamma_pass_rate


def _blob(shift_mm: float, spacing: float = 2.0) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(30) * spacing for _ in range(3)), indexing="ij")
    c = 15 * spacing
    return np.exp(-(((x - c - shift_mm) ** 2) + (y - c) ** 2 + (z - c) ** 2) / (2 * 12.0**2))


def test_identical_doses_pass_everywhere() -> None:
    d = _blob(0.0)
    assert gamma_pass_rate(d, d, (2.0, 2.0, 2.0)) == 1.0


def test_shift_within_dta_passes_and_beyond_fails() -> None:
    ref = _blob(0.0)
    assert gamma_pass_rate(ref, _blob(2.0), (2.0, 2.0, 2.0), dose_percent=0.5) > 0.99
    assert gamma_pass_rate(ref, _blob(6.0), (2.0, 2.0, 2.0), dose_percent=0.5) < 0.6


def test_dose_difference_criterion() -> None:
    ref = _blob(0.0)
    assert gamma_pass_rate(ref, ref * 1.02, (2.0, 2.0, 2.0), dta_mm=0.5) == 1.0
    assert gamma_pass_rate(ref, ref * 1.05 + 0.05, (2.0, 2.0, 2.0), dta_mm=0.5) < 0.2


def test_refuses_mismatched_grids() -> None:
    with pytest.raises(ValueError, match="one grid"):
        gamma_pass_rate(np.ones((3, 3, 3)), np.ones((3, 3, 4)), (1.0, 1.0, 1.0))
