"""Dose objectives and the Err map of the AIRT paper, plus the fluence optimizer's extra terms (torch).

The paper (Supplementary Note S1, eq. 5-12) defines the dose error map as the gradient of a dose
objective with respect to the dose:

* PTV, eq. 7: ``J_PTV = sum_i M_PTV(i) (l+/2 ReLU(D_i - Rx)^2 + l-/2 ReLU(Rx - D_i)^2)`` with
  ``l+ > l- > 0`` so that hot spots cost more than cold spots; its gradient, eq. 8:
  ``E_PTV = M_PTV (l+ ReLU(D - Rx) - l- ReLU(Rx - D))``.
* OAR ``o`` with suppression factor ``s_o`` in [0, 1), eq. 9-11: reference ``R_o = (1 - s_o) D0``
  (``D0`` the baseline dose), ``J_o = 1/2 sum_i M_o(i) max(D_i - R_o,i, 0)^2`` and
  ``E_o = M_o max(D - R_o, 0)``; ``s_o = 0`` disables the term at ``D = D0``.
* Total, eq. 12: ``E = E_PTV + sum_o E_o``.

Those are sums over voxels, in Gy and Gy^2, exactly as written in the paper. The optimizer-only
terms below are scale-free instead (doses divided by the prescription, means over structures,
fluence divided by its mean level) so that one set of weights fits cases of any size and dose.
Masks may be boolean or float voxel fractions/weights; everything broadcasts over a leading batch
dimension of the dose.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from core.errors import InputError

log = logging.getLogger(__name__)


def _as_weight(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A mask as a float tensor on the device and dtype of ``like``."""
    return mask.to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------- paper eq. 7-12


def ptv_objective(
    dose: torch.Tensor, ptv_mask: torch.Tensor, rx: float | torch.Tensor, lambda_plus: float, lambda_minus: float
) -> torch.Tensor:
    """Asymmetric PTV objective J_PTV of eq. 7, a sum over voxels (Gy^2).

    Parameters
    ----------
    dose
        Dose, Gy, shape (nz, ny, nx) or (B, nz, ny, nx).
    ptv_mask
        PTV mask or weights M_PTV >= 0, broadcastable to ``dose``.
    rx
        Prescribed dose D_Rx, Gy: a scalar or a per-voxel tensor.
    lambda_plus, lambda_minus
        Weights of overdose and underdose (the paper uses ``lambda_plus > lambda_minus > 0``).
    """
    m = _as_weight(ptv_mask, dose)
    x = dose - rx
    per_voxel = 0.5 * lambda_plus * torch.relu(x) ** 2 + 0.5 * lambda_minus * torch.relu(-x) ** 2
    return (m * per_voxel).sum()


def oar_objective(dose: torch.Tensor, oar_mask: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Squared-hinge OAR objective J_o of eq. 10: 1/2 sum_i M_o(i) max(D_i - R_o,i, 0)^2 (Gy^2)."""
    m = _as_weight(oar_mask, dose)
    return 0.5 * (m * torch.relu(dose - reference) ** 2).sum()


def _check_lambdas(lambda_plus: float, lambda_minus: float) -> None:
    if not (lambda_plus > 0 and lambda_minus > 0):
        raise InputError(f"Err weights must be > 0, got lambda+={lambda_plus}, lambda-={lambda_minus}")
    if lambda_plus < lambda_minus:
        log.warning(
            "lambda+ (%g) < lambda- (%g): cold spots will cost more than hot spots (the paper uses l+ > l-)",
            lambda_plus,
            lambda_minus,
        )


def dose_objective(
    dose: torch.Tensor,
    masks: Mapping[Any, torch.Tensor],
    rx: float | torch.Tensor,
    lambda_plus: float,
    lambda_minus: float,
    sparing: Mapping[Any, float] | None = None,
    dose0: torch.Tensor | None = None,
) -> torch.Tensor:
    """The paper's total objective J = J_PTV + sum_o J_o (eq. 6, 7, 10) whose dose gradient is :func:`err_map`.

    Arguments are those of :func:`err_map`; ``dose0`` (the baseline D0) is treated as a constant.
    """
    if "ptv" not in masks:
        raise InputError("the dose objective needs a 'ptv' mask")
    total = ptv_objective(dose, masks["ptv"], rx, lambda_plus, lambda_minus)
    base = (dose if dose0 is None else dose0).detach()
    for role, s in (sparing or {}).items():
        if s == 0 or role not in masks:
            continue
        total = total + oar_objective(dose, masks[role], (1.0 - s) * base)
    return total


def err_map(
    dose: torch.Tensor,
    masks: Mapping[Any, torch.Tensor],
    rx: float | torch.Tensor,
    lambda_plus: float,
    lambda_minus: float,
    sparing: Mapping[Any, float] | None = None,
    dose0: torch.Tensor | None = None,
) -> torch.Tensor:
    """The paper's dose error map E = E_PTV + sum_o E_o (eq. 8, 11, 12), in closed form.

    Parameters
    ----------
    dose
        Dose D, Gy, shape (nz, ny, nx) or (B, nz, ny, nx).
    masks
        Masks or weights by role value (``"ptv"`` required; ``core.case.Role`` keys work),
        broadcastable to ``dose``.
    rx
        Prescribed dose, Gy (scalar, or a tensor broadcastable to ``dose``).
    lambda_plus, lambda_minus
        Overdose and underdose weights of the PTV term, > 0 (the paper: ``lambda_plus > lambda_minus``).
    sparing
        Suppression factor s_o in [0, 1) by OAR role value; roles absent from ``masks`` are skipped
        (logged at debug level), ``s_o = 0`` adds nothing at ``dose = dose0``.
    dose0
        Baseline dose D0 defining the OAR reference R_o = (1 - s_o) D0 (eq. 9), Gy; ``None`` uses
        ``dose`` itself (the paper's stage-0 use).

    Returns
    -------
    torch.Tensor
        E, same shape as ``dose`` (Gy), equal to the gradient of :func:`dose_objective` w.r.t. ``dose``.
    """
    _check_lambdas(lambda_plus, lambda_minus)
    if "ptv" not in masks:
        raise InputError("the Err map needs a 'ptv' mask")
    m = _as_weight(masks["ptv"], dose)
    e = m * (lambda_plus * torch.relu(dose - rx) - lambda_minus * torch.relu(rx - dose))
    base = dose if dose0 is None else dose0
    for role, s in (sparing or {}).items():
        if not 0.0 <= s < 1.0:
            raise InputError(f"suppression factor for {role} must be in [0, 1), got {s}")
        if role not in masks:
            log.debug("no %s mask: its suppression factor %.3g is ignored", role, s)
            continue
        e = e + _as_weight(masks[role], dose) * torch.relu(dose - (1.0 - s) * base)
    return e


# --------------------------------------------------------------------------- optimizer-only terms


def homogeneity_of(values: torch.Tensor, rx: float, lambda_plus: float, lambda_minus: float) -> torch.Tensor:
    """Scale-free eq. 7 of the PTV voxels' doses ``values`` (1D): the mean of l+/2 ReLU(d - 1)^2 +
    l-/2 ReLU(1 - d)^2 with d = D / Rx."""
    x = values / rx - 1.0
    return mean_of(0.5 * lambda_plus * torch.relu(x) ** 2 + 0.5 * lambda_minus * torch.relu(-x) ** 2)


def mean_of(values: torch.Tensor) -> torch.Tensor:
    """Mean of a structure's voxel values (1D); 0 for none."""
    return values.mean() if values.numel() else values.new_zeros(())


def hinge_mean_of(values: torch.Tensor, reference: torch.Tensor | float, rx: float) -> torch.Tensor:
    """Mean of ReLU(D - reference)^2 / Rx^2 over a structure's voxel doses ``values`` (1D; a squared hinge;
    ``reference`` in Gy, a number or the values at those voxels)."""
    return mean_of(torch.relu(values - reference) ** 2) / (rx * rx)


def upper_tail_of(values: torch.Tensor, limit_gy: float, volume_fraction: float, rx: float) -> torch.Tensor:
    """Dose-volume objective: mean ReLU(D - limit)^2 / Rx^2 over the hottest ``volume_fraction`` (in (0, 1]) of
    a structure's voxel doses ``values`` (1D), so that a constraint like "V36Gy < 5 %" does not push on
    the whole organ."""
    if not 0 < volume_fraction <= 1:
        raise InputError(f"dose-volume objective needs a volume fraction in (0, 1], got {volume_fraction}")
    n = int(values.numel())
    if n == 0:
        return values.new_zeros(())
    k = max(1, math.ceil(volume_fraction * n))
    top = torch.topk(values, k, sorted=False).values
    return (torch.relu(top - limit_gy) ** 2).mean() / (rx * rx)


def lower_tail_of(values: torch.Tensor, limit_gy: float, volume_fraction: float, rx: float) -> torch.Tensor:
    """Coverage objective: mean ReLU(limit - D)^2 / Rx^2 over the coldest ``volume_fraction`` of a structure's
    voxel doses ``values`` (1D). The mirror of :func:`upper_tail_of` for targets: it lifts the cold tail of
    the DVH (e.g. D98) without pushing on the rest of the target."""
    return upper_tail_of(-values, -limit_gy, volume_fraction, rx)


def falloff_reference(
    ptv_mask: NDArray[np.bool_],
    spacing_mm: tuple[float, float, float],
    rx_gy: float,
    *,
    start_fraction: float = 1.05,
    floor_fraction: float = 0.25,
    falloff_mm: float = 15.0,
) -> NDArray[np.float32]:
    """Dose ceiling outside the PTV for the conformity (ring/body) term, Gy.

    ``R(r) = Rx (floor + (start - floor) exp(-r / falloff_mm))`` where ``r`` is the distance (mm)
    from the PTV surface; inside the PTV ``R = start Rx``. ``spacing_mm`` is (dx, dy, dz) of the
    dose grid; arrays are indexed [z, y, x].
    """
    dx, dy, dz = spacing_mm
    dist = ndimage.distance_transform_edt(~ptv_mask.astype(bool), sampling=(dz, dy, dx))
    frac = floor_fraction + (start_fraction - floor_fraction) * np.exp(-np.asarray(dist) / falloff_mm)
    return (rx_gy * frac).astype(np.float32)


def smoothness_term(fluence: torch.Tensor, level: torch.Tensor | float) -> torch.Tensor:
    """Fluence roughness: mean squared finite differences along leaf travel and between adjacent maps.

    ``fluence`` is (n_sectors, rows, cols) (core/machine.py convention: columns run along leaf
    travel); the result is divided by ``level**2`` (a typical open-pixel MU) so it is scale-free.
    """
    d_leaf = fluence[:, :, 1:] - fluence[:, :, :-1]
    d_cp = fluence[1:] - fluence[:-1]
    return ((d_leaf**2).mean() + (d_cp**2).mean()) / (level * level)


def total_variation_term(fluence: torch.Tensor, level: torch.Tensor | float) -> torch.Tensor:
    """Mean absolute difference along leaf travel, over ``level``: favours one flat open interval per row."""
    return (fluence[:, :, 1:] - fluence[:, :, :-1]).abs().mean() / level


def two_level_term(fluence: torch.Tensor, significant_fraction: float = 0.3) -> torch.Tensor:
    """Pull every pixel towards 0 or towards its row's aperture level (deliverable by one leaf gap).

    For each map row the aperture level ``L`` is the mean (held constant) of the row's significant
    pixels, those above ``significant_fraction`` of the map's maximum. The term is the mean over
    pixels of ``min(f, |f - L|)^2 / Lbar^2``, with ``Lbar`` the mean level of the rows that have one:
    zero for a row that is closed or open at one constant intensity, positive for intensity variation
    inside the aperture.
    """
    f = fluence
    with torch.no_grad():
        peak = f.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        sig = (f > significant_fraction * peak).to(f.dtype)
        n_sig = sig.sum(dim=2, keepdim=True)
        level = (f * sig).sum(dim=2, keepdim=True) / n_sig.clamp_min(1.0)
        has = n_sig > 0
        lbar = level[has].mean() if bool(has.any()) else f.new_ones(())
        lbar = lbar.clamp_min(1e-12)
    dev = torch.minimum(f.abs(), (f - level).abs())
    return (dev**2).mean() / (lbar * lbar)
