"""The planning problem of one case: beam geometry, reference dose engine and masks on its grid.

Shared by the planning driver, the AI pipeline, training-data generation and the benchmarks so
that all of them see the same isocenter, dose grid and mask resampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from core.case import DEFAULT_HU_TO_DENSITY, Case, Grid, Role
from core.errors import PlanningError
from core.machine import ArcSpec, MachineModel
from pipeline.beam_model import BeamModel, load_beam_model
from pipeline.dose_engine import ReferenceDoseEngine, resample_to_grid
from pipeline.geometry import ArcGeometry

#: Dose-grid voxels holding at least this fraction of PTV belong to the planning PTV. Below one half,
#: so that the thin ends and edges of the PTV on the (finer) CT grid, where the goals are evaluated,
#: are covered by voxels the objective pushes to the prescription: with 0.5 the superior and inferior
#: end slices of a PTV were left out and its CT-grid D98 fell 1-2 Gy short on some cases.
PTV_FRACTION = 0.25


@dataclass(frozen=True, eq=False)
class PlanningProblem:
    """Everything a planner needs besides the fluence.

    Attributes
    ----------
    geometry
        The arc around the isocenter (PTV centroid).
    engine
        Reference dose engine on the dose grid (``engine.grid``).
    masks
        Boolean masks on the dose grid by role (trilinear fraction >= 0.5; the PTV's >= :data:`PTV_FRACTION`),
        on the engine's device.
    """

    geometry: ArcGeometry
    engine: ReferenceDoseEngine
    masks: dict[Role, torch.Tensor]

    @property
    def grid(self) -> Grid:
        """The dose grid."""
        return self.engine.grid


def build_problem(case: Case, arc: ArcSpec, machine: MachineModel, *,
                  hu_curve: Sequence[tuple[float, float]] = DEFAULT_HU_TO_DENSITY, spacing_mm: float = 4.0,
                  beam: BeamModel | None = None, device: str | torch.device = "cpu",
                  ptv_fraction: float = PTV_FRACTION) -> PlanningProblem:
    """Geometry, engine and dose-grid masks of ``case`` (isocenter at the PTV centroid).

    A dose-grid voxel belongs to a structure when at least half of it (trilinear fraction >= 0.5) does,
    to the PTV when ``ptv_fraction`` of it does (see :data:`PTV_FRACTION`)."""
    geometry = ArcGeometry(arc=arc, isocenter_mm=case.ptv_centroid_mm(), position=case.patient_position,
                           machine=machine)
    engine = ReferenceDoseEngine.for_case(case, geometry, beam or load_beam_model(), hu_curve=hu_curve,
                                          spacing_mm=spacing_mm, device=device)
    masks = {role: torch.as_tensor(m, device=device)
             for role, m in dose_grid_masks(case, engine.grid, ptv_fraction).items()}
    return PlanningProblem(geometry=geometry, engine=engine, masks=masks)


def dose_grid_masks(case: Case, grid: Grid, ptv_fraction: float = PTV_FRACTION) -> dict[Role, NDArray[np.bool_]]:
    """The case's structure masks on a dose grid: a voxel belongs to a structure when at least half of it
    (trilinear fraction >= 0.5) does, to the PTV when ``ptv_fraction`` of it does.

    Raises
    ------
    PlanningError
        When no dose-grid voxel is in the PTV.
    """
    masks = {role: np.asarray(resample_to_grid(m, case.grid, grid, order=1)
                              >= (ptv_fraction if role is Role.PTV else 0.5))
             for role, m in case.masks.items()}
    if not masks[Role.PTV].any():
        raise PlanningError("the PTV vanished on the dose grid; use a finer planning.dose_grid_mm")
    return masks
