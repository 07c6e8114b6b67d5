"""The 6 MV photon beam model of the reference dose engine (parameters in ``pipeline/data/beam_6mv.json``).

The model is a multi-Gaussian pencil-beam kernel in fan (isocenter-plane) coordinates whose
component weights depend on the radiological depth ``d`` (mm of water-equivalent path from the
surface along the ray):

* primary attenuation with spectral hardening, ``A(d) = (1 + eta d) ** (-mu0 / eta)`` (the effective
  attenuation coefficient ``mu0 / (1 + eta d)`` falls with depth as the spectrum hardens);
* primary dose ``P(d) = (1 - (1 - f0) exp(-d / lambda_b)) A(d)`` (electron build-up from the surface
  fraction ``f0``), spread laterally by a narrow Gaussian (source size combined with the lateral
  electron range in water, which scales as 1/density: in low density the primary uses a wider
  Gaussian, the lateral disequilibrium channel);
* phantom scatter ``S_i(d) = c_i (1 - exp(-d / lambda_i)) A(d)`` for two broad Gaussians, which makes
  the depth dose and the output factor rise with field size;
* head (extra-focal) scatter: a fraction ``h`` of the fluence spread by a broad Gaussian at the
  isocenter plane, so the collimator scatter factor also rises with field size.

Absolute calibration is not a fitted number: :meth:`BeamModel.calibration_gy_per_unit` evaluates the
model itself for the reference condition (10 x 10 cm field at SSD 100 cm in water, central axis) and
scales it so that the dose maximum is ``reference_dose_gy_per_mu`` (1 cGy/MU).

Approximations, by design: the kernel is laterally invariant in fan coordinates (its width does not
grow with depth apart from the depth-dependent mix of components), heterogeneities act through the
radiological depth of the voxel's own ray (no lateral TERMA transport) and through the density-scaled
primary width; there is no electron contamination, MLC transmission or tongue-and-groove model here
(the sequencer's fluence handles leaf transmission).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_BEAM_PATH = Path(__file__).resolve().parent / "data" / "beam_6mv.json"

# Order of the lateral channels the dose engine convolves the fluence with.
CHANNELS = ("primary", "primary_low_density", "scatter_1", "scatter_2")
#: The build-up exponentials ``exp(-d / length)`` are taken at ``d / length <= EXP_ARG_MAX``: beyond it
#: the term (< 2e-35) no longer changes a float32 or float64 weight, but its float32 denormal values
#: made the depth weights of a pelvis arc about 40 times slower to compute (a third of the engine set-up).
EXP_ARG_MAX = 80.0


@dataclass(frozen=True)
class BeamModel:
    """Parameters of a photon beam (all lengths in mm, at the isocenter plane where lateral).

    Parameters
    ----------
    name
        Human-readable name of the parameter set.
    energy_mv
        Nominal energy, MV (> 0).
    mu0_per_mm
        Effective primary attenuation coefficient in water at the surface, 1/mm (> 0, about 0.005).
    hardening_per_mm
        Spectral hardening rate ``eta``, 1/mm (>= 0): the attenuation coefficient is ``mu0 / (1 + eta d)``.
    surface_fraction
        Primary dose at zero depth relative to full build-up, 0-1.
    buildup_mm
        Build-up length of the primary dose, mm (> 0); sets d_max together with ``mu0_per_mm``.
    source_sigma_mm
        Gaussian sigma of the focal spot / geometric penumbra, mm at the isocenter plane (>= 0).
    electron_sigma_mm
        Gaussian sigma of the lateral spread of primary electrons in water, mm (>= 0).
    low_density_reference
        Relative electron density (0-1, exclusive) at which the primary fully uses the widened kernel
        of sigma ``low_density_sigma_mm``; densities in between interpolate in 1/density.
    low_density_sigma_mm
        Gaussian sigma of the primary's lateral spread at ``low_density_reference`` (mm, > 0): the
        equilibrium range of the secondary electrons, longer than the water core ``electron_sigma_mm``
        divided by the density because of the kernel's long tails.
    low_density_onset
        Equilibrium density below which the widened kernel starts to mix in (between
        ``low_density_reference`` and 1): soft tissue and fat are treated as water-like.
    disequilibrium_length_mm
        Length over which the electron fluence follows a change of density along the ray, mm (> 0);
        gives the build-down / build-up at lung interfaces.
    scatter_weights
        ``c_i`` of the two phantom-scatter components (>= 0), relative to the primary.
    scatter_buildup_mm
        ``lambda_i`` of the two scatter components, mm (> 0).
    scatter_sigma_mm
        Gaussian sigma of the two scatter components, mm at the isocenter plane (> 0).
    head_scatter_fraction
        Extra-focal fluence ``h`` relative to the primary fluence at the field centre for an infinite field (>= 0).
    head_scatter_sigma_mm
        Gaussian sigma of the extra-focal fluence at the isocenter plane, mm (> 0).
    field_margin_mm
        How far beyond the BEV field edge (at the isocenter plane) dose is computed, mm (>= 0).
    reference_field_mm
        Side of the square calibration field at the isocenter plane, mm (> 0).
    reference_ssd_mm
        Source-surface distance of the calibration condition, mm (> 0).
    reference_dose_gy_per_mu
        Dose at d_max on the central axis of the calibration field per MU, Gy (> 0).
    sad_mm
        Source-axis distance the parameters refer to, mm (> 0).
    """

    name: str = "generic 6 MV"
    energy_mv: float = 6.0
    mu0_per_mm: float = 0.0050
    hardening_per_mm: float = 0.0005
    surface_fraction: float = 0.15
    buildup_mm: float = 4.0
    source_sigma_mm: float = 1.6
    electron_sigma_mm: float = 1.6
    low_density_reference: float = 0.25
    low_density_onset: float = 0.8
    low_density_sigma_mm: float = 8.0
    disequilibrium_length_mm: float = 10.0
    scatter_weights: tuple[float, float] = (0.1, 0.3)
    scatter_buildup_mm: tuple[float, float] = (20.0, 80.0)
    scatter_sigma_mm: tuple[float, float] = (15.0, 60.0)
    head_scatter_fraction: float = 0.07
    head_scatter_sigma_mm: float = 50.0
    field_margin_mm: float = 100.0
    reference_field_mm: float = 100.0
    reference_ssd_mm: float = 1000.0
    reference_dose_gy_per_mu: float = 0.01
    sad_mm: float = 1000.0

    def __post_init__(self) -> None:
        positive = ("energy_mv", "mu0_per_mm", "low_density_sigma_mm", "buildup_mm", "disequilibrium_length_mm", "head_scatter_sigma_mm",
                    "reference_field_mm", "reference_ssd_mm", "reference_dose_gy_per_mu", "sad_mm")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"beam model {name} must be > 0, got {getattr(self, name)}")
        for name in ("hardening_per_mm", "source_sigma_mm", "electron_sigma_mm", "head_scatter_fraction",
                     "field_margin_mm"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"beam model {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.surface_fraction <= 1.0:
            raise ConfigError(f"beam model surface_fraction must be in [0, 1], got {self.surface_fraction}")
        if not 0.0 < self.low_density_reference < 1.0:
            raise ConfigError(
                f"beam model low_density_reference must be in (0, 1), got {self.low_density_reference}"
            )
        if not self.low_density_reference < self.low_density_onset <= 1.0:
            raise ConfigError(
                f"beam model low_density_onset must be in (low_density_reference, 1], got {self.low_density_onset}"
            )
        for name in ("scatter_weights", "scatter_buildup_mm", "scatter_sigma_mm"):
            v = getattr(self, name)
            if len(v) != 2:
                raise ConfigError(f"beam model {name} needs two values (one per scatter component), got {v}")
        if any(c < 0 for c in self.scatter_weights):
            raise ConfigError(f"beam model scatter_weights must be >= 0, got {self.scatter_weights}")
        if any(not v > 0 for v in (*self.scatter_buildup_mm, *self.scatter_sigma_mm)):
            raise ConfigError("beam model scatter_buildup_mm and scatter_sigma_mm must be > 0")

    # -- depth dependence ---------------------------------------------------------------------------

    def attenuation(self, d_mm: torch.Tensor) -> torch.Tensor:
        """Primary attenuation ``A(d)`` at radiological depth ``d_mm`` (mm, >= 0), dimensionless."""
        d = d_mm.clamp_min(0.0)
        if self.hardening_per_mm == 0.0:
            return torch.mul(d, -self.mu0_per_mm).exp_()
        return torch.mul(d, self.hardening_per_mm).log1p_().mul_(-(self.mu0_per_mm / self.hardening_per_mm)).exp_()

    def depth_weights(self, d_mm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights of the primary and the two scatter components at radiological depth ``d_mm`` (mm).

        Returns
        -------
        tuple of torch.Tensor
            ``(P(d), S_1(d), S_2(d))``, each shaped like ``d_mm``, in uncalibrated dose units per unit
            fluence (multiply by :meth:`calibration_gy_per_unit` and the inverse-square factor).
        """
        d = d_mm.clamp_min(0.0)
        a = self.attenuation(d)

        def arg(length_mm: float) -> torch.Tensor:  # -d / length, capped (see EXP_ARG_MAX), a fresh tensor
            return torch.div(d, length_mm).clamp_max_(EXP_ARG_MAX).neg_()

        # in place on fresh tensors: the same operations in the same order as the expressions
        # (1 - (1 - f) e^x) a and w (-(e^x - 1)) a, without a temporary per operation
        p = arg(self.buildup_mm).exp_().mul_(1.0 - self.surface_fraction).neg_().add_(1.0).mul_(a)
        s1 = arg(self.scatter_buildup_mm[0]).expm1_().neg_().mul_(self.scatter_weights[0]).mul_(a)
        s2 = arg(self.scatter_buildup_mm[1]).expm1_().neg_().mul_(self.scatter_weights[1]).mul_(a)
        return p, s1, s2

    # -- lateral dependence -------------------------------------------------------------------------

    def low_density_fraction(self, rho_eq: torch.Tensor) -> torch.Tensor:
        """Fraction (0-1) of the primary spread by the low-density kernel at equilibrium density ``rho_eq``."""
        inv = 1.0 / rho_eq.clamp_min(1e-3)
        lo, hi = 1.0 / self.low_density_onset, 1.0 / self.low_density_reference
        return ((inv - lo) / (hi - lo)).clamp(0.0, 1.0)

    def channel_sigmas_mm(self) -> list[tuple[float, float]]:
        """Gaussian sigmas (mm, isocenter plane) of each channel in :data:`CHANNELS`.

        Each channel is the fluence convolved with a Gaussian of the first sigma (focal source) plus
        ``head_scatter_fraction`` times the fluence convolved with a Gaussian of the second sigma
        (extra-focal source); both include the channel's own kernel width.
        """
        kernel = [
            self.electron_sigma_mm,
            self.low_density_sigma_mm,
            self.scatter_sigma_mm[0],
            self.scatter_sigma_mm[1],
        ]
        return [(math.hypot(self.source_sigma_mm, k), math.hypot(self.head_scatter_sigma_mm, k)) for k in kernel]

    def central_axis_fraction(self, field_mm: float) -> NDArray[np.float64]:
        """Each channel's value at the centre of an open square field of side ``field_mm`` (mm at isocenter).

        A unit fluence over the square gives ``erf(a / (2 sqrt(2) sigma))**2`` per Gaussian term.
        """
        out = []
        for s_src, s_head in self.channel_sigmas_mm():
            g = [math.erf(field_mm / (2.0 * math.sqrt(2.0) * max(s, 1e-9))) ** 2 for s in (s_src, s_head)]
            out.append(g[0] + self.head_scatter_fraction * g[1])
        return np.asarray(out)

    def central_axis_dose(self, field_mm: float, depths_mm: NDArray[np.float64] | list[float],
                          ssd_mm: float | None = None, *, calibrated: bool = True) -> NDArray[np.float64]:
        """Central-axis dose per MU of a square field in water, as the engine computes it on the axis.

        Parameters
        ----------
        field_mm
            Side of the square field at the isocenter plane, mm (> 0).
        depths_mm
            Depths below the water surface, mm (>= 0).
        ssd_mm
            Source-surface distance, mm; default the reference SSD.
        calibrated
            Multiply by :meth:`calibration_gy_per_unit` (Gy per MU) or return model units.

        Returns
        -------
        numpy.ndarray
            Dose per MU at each depth (Gy when calibrated).
        """
        ssd = self.reference_ssd_mm if ssd_mm is None else ssd_mm
        d = torch.as_tensor(np.asarray(depths_mm, dtype=np.float64))
        p, s1, s2 = self.depth_weights(d)
        f = self.central_axis_fraction(field_mm)
        inv_sq = (self.sad_mm / (ssd + d)) ** 2
        dose = (inv_sq * (p * float(f[0]) + s1 * float(f[2]) + s2 * float(f[3]))).numpy()
        if calibrated:
            dose = dose * self.calibration_gy_per_unit
        return np.asarray(dose, dtype=np.float64)

    @cached_property
    def calibration_gy_per_unit(self) -> float:
        """Gy per model unit such that the reference field gets ``reference_dose_gy_per_mu`` at d_max."""
        depths = np.arange(0.0, 60.0, 0.05)
        raw = self.central_axis_dose(self.reference_field_mm, depths, self.reference_ssd_mm, calibrated=False)
        return float(self.reference_dose_gy_per_mu / raw.max())

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a JSON-ready dict (tuples as lists)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def load_beam_model(path: Path | None = None) -> BeamModel:
    """Read a beam model JSON file.

    Parameters
    ----------
    path
        JSON file with the :class:`BeamModel` fields (unknown keys are refused; keys starting with
        ``_`` are comments or fit metadata and ignored); ``None`` reads the shipped 6 MV model.

    Raises
    ------
    ConfigError
        If the file cannot be read, is not JSON, or holds unknown or invalid parameters.
    """
    p = DEFAULT_BEAM_PATH if path is None else Path(path)
    try:
        raw = json.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read beam model {p}: {exc}; check the path") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"beam model {p} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"beam model {p} must hold a JSON object of parameters")
    known = {f.name for f in fields(BeamModel)}
    params = {k: v for k, v in raw.items() if not k.startswith("_")}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"beam model {p}: unknown parameter(s) {unknown}; known: {sorted(known)}")
    for k, v in list(params.items()):
        if isinstance(v, list):
            params[k] = tuple(float(x) for x in v)
    try:
        model = BeamModel(**params)
    except TypeError as exc:
        raise ConfigError(f"beam model {p}: {exc}") from exc
    log.debug("beam model %r loaded from %s", model.name, p)
    return model
