"""Machine model: Varian Millennium 120 MLC, jaws, TrueBeam-like limits, the arc and the BEV grid.

Torch-free; shared by ``pipeline`` (beam geometry, dose engine), ``sequencing`` and ``appliance``.

Fluence-map convention (the contract between pipeline and sequencing)
----------------------------------------------------------------------
A control-point fluence map is an array ``[40, 40]`` of MU per pixel at the isocenter plane,
in the IEC 61217 beam-limiting-device frame (collimator frame): row ``r`` covers
``y in [-100 + 5 r, -95 + 5 r]`` mm (the leaf-pair axis; row r is shaped by MLC leaf pair
``first_bev_leaf_pair + r`` with the default 40 central 5 mm pairs) and column ``c`` covers
``x in [-100 + 5 c, -95 + 5 c]`` mm (the leaf-travel axis). A stack of maps is ``[n_cp, 40, 40]``.

An arc has ``n_sectors`` (180) sectors of equal angle; fluence map ``k`` is delivered while
the gantry travels through sector ``k``, between control points ``k`` and ``k + 1`` (so an
RT Plan has ``n_sectors + 1`` control points). ``ArcSpec.sector_centres_deg()`` gives the angle
at which the dose engine and BEV projection place map ``k``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from core.errors import ConfigError


def millennium120_boundaries_mm() -> tuple[float, ...]:
    """The 61 LeafPositionBoundaries of a Millennium 120 (mm, isocenter plane)."""
    outer_lo = np.arange(-200.0, -100.0, 10.0)
    centre = np.arange(-100.0, 100.0, 5.0)
    outer_hi = np.arange(100.0, 200.0 + 1e-9, 10.0)
    return tuple(float(v) for v in np.concatenate([outer_lo, centre, outer_hi]))


class RotationDirection(enum.StrEnum):
    """DICOM GantryRotationDirection (CC, never "CCW")."""

    CW = "CW"
    CC = "CC"


class ArcStart(enum.StrEnum):
    """How fluence maps become the arc the machine-parameter optimisation starts from.

    ``sweep``: the summed fluence of a few adjacent sectors delivered by one leaf sweep
    (``sequencing.sweep``; keeps the modulation); ``rule``: the AIRT paper's rule-based sequencer,
    one aperture per sector at one MU level (``sequencing.sequencer``).
    """

    SWEEP = "sweep"
    RULE = "rule"


@dataclass(frozen=True)
class BevGrid:
    """The beam's-eye-view fluence grid at the isocenter plane.

    Parameters
    ----------
    n_rows, n_cols
        Pixels along the leaf-pair axis (y) and the leaf-travel axis (x).
    pixel_mm
        Pixel size at the isocenter plane, mm.
    """

    n_rows: int = 40
    n_cols: int = 40
    pixel_mm: float = 5.0

    @property
    def half_width_mm(self) -> float:
        """Half of the field width along x, mm (100 mm by default)."""
        return 0.5 * self.n_cols * self.pixel_mm

    @property
    def half_height_mm(self) -> float:
        """Half of the field height along y, mm (100 mm by default)."""
        return 0.5 * self.n_rows * self.pixel_mm

    def col_edges_mm(self) -> NDArray[np.float64]:
        """Pixel edges along x (n_cols + 1 values), mm."""
        return np.asarray(-self.half_width_mm + self.pixel_mm * np.arange(self.n_cols + 1), dtype=np.float64)

    def row_edges_mm(self) -> NDArray[np.float64]:
        """Pixel edges along y (n_rows + 1 values), mm."""
        return np.asarray(-self.half_height_mm + self.pixel_mm * np.arange(self.n_rows + 1), dtype=np.float64)


@dataclass(frozen=True)
class ArcSpec:
    """One VMAT arc.

    Parameters
    ----------
    start_deg, stop_deg
        Gantry angles (IEC 61217, degrees in [0, 360)) of the first and last control point.
    direction
        CW or CC.
    n_sectors
        Number of equal sectors (fluence maps); 180 gives 2 degree sectors for a 358 degree arc.
    collimator_deg
        Collimator angle, degrees in [0, 360).
    couch_deg
        Patient support angle, degrees; 0 for this planner.
    """

    start_deg: float = 181.0
    stop_deg: float = 179.0
    direction: RotationDirection = RotationDirection.CW
    n_sectors: int = 180
    collimator_deg: float = 30.0
    couch_deg: float = 0.0

    def __post_init__(self) -> None:
        for name in ("start_deg", "stop_deg", "collimator_deg"):
            v = getattr(self, name)
            if not 0.0 <= v < 360.0:
                raise ConfigError(f"arc {name} must be in [0, 360) degrees, got {v}")
        if self.n_sectors < 1:
            raise ConfigError(f"arc n_sectors must be >= 1, got {self.n_sectors}")
        if self.span_deg() <= 0:
            raise ConfigError("arc start_deg and stop_deg must differ")

    def span_deg(self) -> float:
        """Angle travelled by the gantry, degrees (358 for 181 -> 179 CW)."""
        if self.direction is RotationDirection.CW:
            return (self.stop_deg - self.start_deg) % 360.0
        return (self.start_deg - self.stop_deg) % 360.0

    def control_point_angles_deg(self) -> NDArray[np.float64]:
        """Gantry angles of the ``n_sectors + 1`` control points, degrees in [0, 360)."""
        sign = 1.0 if self.direction is RotationDirection.CW else -1.0
        steps = np.linspace(0.0, self.span_deg(), self.n_sectors + 1)
        return np.mod(self.start_deg + sign * steps, 360.0)

    def sector_centres_deg(self) -> NDArray[np.float64]:
        """Gantry angle at the middle of each sector (where fluence map k is placed), degrees."""
        sign = 1.0 if self.direction is RotationDirection.CW else -1.0
        step = self.span_deg() / self.n_sectors
        return np.mod(self.start_deg + sign * step * (np.arange(self.n_sectors) + 0.5), 360.0)


@dataclass(frozen=True)
class MachineModel:
    """Linac and MLC description (defaults: TrueBeam-like 6 MV with a Millennium 120).

    Parameters
    ----------
    name
        TreatmentMachineName written into the RT Plan.
    energy_mv
        Nominal beam energy, MV.
    sad_mm
        Source-axis distance, mm.
    source_mlc_distance_mm
        Source to MLC distance, mm.
    leaf_boundaries_mm
        LeafPositionBoundaries (n_pairs + 1 values, isocenter plane), mm.
    first_bev_leaf_pair
        Index (0-based) of the leaf pair that shapes BEV row 0 (10 for the Millennium 120).
    max_leaf_speed_mm_s
        Maximum leaf speed at the isocenter plane, mm/s.
    max_gantry_speed_deg_s
        Maximum gantry speed, degrees/s.
    max_dose_rate_mu_min
        Maximum dose rate, MU/min.
    min_leaf_gap_mm
        Minimum gap between opposing leaves of a pair during dynamic delivery, mm.
    dosimetric_leaf_gap_mm
        Dosimetric leaf gap (rounded-leaf-end transmission), mm; apertures are widened by it.
    max_jaw_mm
        Largest jaw opening from the axis, mm.
    jaw_margin_mm
        Margin added around the MLC aperture when fitting the jaws, mm.
    min_mu_per_deg, max_mu_per_deg
        Bounds of MU per degree of gantry travel in a sector.
    bev
        The BEV fluence grid.
    """

    name: str = "TrueBeam"
    energy_mv: float = 6.0
    sad_mm: float = 1000.0
    source_mlc_distance_mm: float = 509.0
    leaf_boundaries_mm: tuple[float, ...] = field(default_factory=millennium120_boundaries_mm)
    first_bev_leaf_pair: int = 10
    max_leaf_speed_mm_s: float = 25.0
    max_gantry_speed_deg_s: float = 6.0
    max_dose_rate_mu_min: float = 600.0
    min_leaf_gap_mm: float = 0.5
    dosimetric_leaf_gap_mm: float = 1.3
    max_jaw_mm: float = 200.0
    jaw_margin_mm: float = 5.0
    min_mu_per_deg: float = 0.0
    max_mu_per_deg: float = 20.0
    bev: BevGrid = field(default_factory=BevGrid)

    def __post_init__(self) -> None:
        b = np.asarray(self.leaf_boundaries_mm)
        if b.ndim != 1 or b.size < 2 or np.any(np.diff(b) <= 0):
            raise ConfigError("machine leaf_boundaries_mm must be strictly increasing (n_pairs + 1 values)")
        positive = (
            "sad_mm",
            "source_mlc_distance_mm",
            "max_leaf_speed_mm_s",
            "max_gantry_speed_deg_s",
            "max_dose_rate_mu_min",
            "max_jaw_mm",
            "max_mu_per_deg",
            "energy_mv",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"machine {name} must be > 0, got {getattr(self, name)}")
        for name in ("min_leaf_gap_mm", "dosimetric_leaf_gap_mm", "jaw_margin_mm", "min_mu_per_deg"):
            if getattr(self, name) < 0:
                raise ConfigError(f"machine {name} must be >= 0, got {getattr(self, name)}")
        last = self.first_bev_leaf_pair + self.bev.n_rows
        if self.first_bev_leaf_pair < 0 or last > self.n_leaf_pairs:
            raise ConfigError(
                f"machine first_bev_leaf_pair={self.first_bev_leaf_pair} with {self.bev.n_rows} BEV rows "
                f"does not fit in {self.n_leaf_pairs} leaf pairs"
            )
        widths = np.diff(b)[self.first_bev_leaf_pair : last]
        if not np.allclose(widths, self.bev.pixel_mm):
            raise ConfigError(
                "the leaf pairs shaping the BEV rows must be as wide as a BEV pixel "
                f"({self.bev.pixel_mm} mm); check leaf_boundaries_mm and first_bev_leaf_pair"
            )

    @property
    def n_leaf_pairs(self) -> int:
        """Number of MLC leaf pairs (60 for the Millennium 120)."""
        return len(self.leaf_boundaries_mm) - 1
