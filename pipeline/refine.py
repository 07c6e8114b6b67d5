"""Dose-guided refinement of a predicted fluence: a few optimizer steps near the target.

Not in the paper. The small CPU networks reproduce the optimizer's PTV coverage and OAR mean
doses but not the steep dose fall-off it builds where the bladder and rectum walls touch the PTV
(their near-maximum dose, D2, is several Gy higher). Refinement starts from the networks'
fluence and runs ``iterations`` evaluations of the appliance's own optimizer
(:func:`pipeline.optimizer.optimize_fluence`, same objective terms) through a copy of the
reference engine restricted to the voxels that decide that fall-off:

- the PTV and a shell of ``shell_mm`` around it (coverage, homogeneity, conformity terms);
- the bladder and rectum voxels within ``oar_reach_mm`` of the PTV (their high-dose terms).

That engine computes a few thousand voxels instead of about 2e5 on a pelvis at 4 mm, and its
convolution lattices are cut to their reach: a forward and backward pass costs about 25 ms
instead of 0.7 s on two CPU cores. A refinement of 20 evaluations, the engine's set-up included,
takes about 0.7 s where the optimizer from a flat start on the full grid took about 40 s for 50
evaluations. The plan's dose is then computed, as always, by the full reference engine after
sequencing; refinement only changes the fluence handed to the sequencer.

The optimize method (the full planner) runs the same function from the optimizer's flat start
(``fluence=None``): its fluence is only the start of the sweep sequencer and the arc stage, which
see the same voxels. On the 10 + 10 benchmark cases 150 evaluations near the target took 3.1 and
3.6 s (medians) where 50 on the full grid took 23.5 and 28.1 s, and with 500 arc evaluations
instead of 150 the exported arcs gave the rectum a 20-24 % lower mean dose at the same PTV coverage
(``benchmarks/RESULTS.md``, "The full planner near the target"). The femoral heads are outside
this region; only the arc stage holds their terms.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from core.case import Role
from core.errors import PlanningError
from pipeline.dose_engine import DoseEngine
from pipeline.goal_objective import GoalSetup
from pipeline.optimizer import OptimizerWeights, optimize_fluence

log = logging.getLogger(__name__)

#: OARs whose voxels near the PTV the refinement sees.
NEAR_TARGET_OARS: tuple[Role, ...] = (Role.BLADDER, Role.RECTUM)


@dataclass(frozen=True)
class Refinement:
    """What :func:`refine_fluence` returns.

    Attributes
    ----------
    fluence
        Refined fluence maps, MU per pixel, ``(n_sectors, rows, cols)`` float32, >= 0.
    engine
        The restricted reference engine it used; its dose in the PTV equals the full engine's,
        so the sequencer's threshold choice can reuse it.
    iterations
        Optimizer evaluations run.
    voxels
        Voxels the restricted engine computes.
    loss
        Objective before and after (first and last evaluation).
    seconds
        Wall time, s (restricted engine included).
    """

    fluence: NDArray[np.float32]
    engine: DoseEngine
    iterations: int
    voxels: int
    loss: tuple[float, float]
    seconds: float

    def record(self) -> dict[str, Any]:
        """What ``metrics.json`` records."""
        return {"iterations": self.iterations, "voxels": self.voxels, "loss_start": round(self.loss[0], 6), "loss_end": round(self.loss[1], 6),
                "seconds": round(self.seconds, 3)}


def refinement_region(masks: Mapping[Role, NDArray[np.bool_]], spacing_mm: tuple[float, float, float], *,
                      shell_mm: float, oar_reach_mm: float) -> NDArray[np.bool_]:
    """The voxels refinement computes: PTV + ``shell_mm`` shell, bladder/rectum within ``oar_reach_mm``.

    ``spacing_mm`` is (dx, dy, dz) of the grid; arrays are indexed [z, y, x].
    """
    if not (shell_mm >= 0 and oar_reach_mm >= 0):
        raise PlanningError(f"refinement shell and OAR reach must be >= 0 mm, got {shell_mm}, {oar_reach_mm}")
    ptv = np.asarray(masks[Role.PTV], dtype=bool)
    dx, dy, dz = spacing_mm
    dist = ndimage.distance_transform_edt(~ptv, sampling=(dz, dy, dx))
    region = dist <= shell_mm
    for role in NEAR_TARGET_OARS:
        if role in masks:
            region |= np.asarray(masks[role], dtype=bool) & (dist <= oar_reach_mm)
    return np.asarray(region, dtype=bool)


def refine_fluence(
    fluence: NDArray[np.floating[Any]] | None,
    engine: DoseEngine,
    masks: Mapping[Role, torch.Tensor],
    *,
    rx_gy: float,
    iterations: int,
    shell_mm: float = 8.0,
    oar_reach_mm: float = 15.0,
    weights: OptimizerWeights | None = None,
    goals: GoalSetup | None = None,
) -> Refinement:
    """Refine a fluence with ``iterations`` optimizer evaluations near the target (see the module doc).

    Parameters
    ----------
    fluence
        Starting fluence ``(n_sectors, rows, cols)``, MU per pixel per fraction; ``None``: the
        optimizer's flat start over the PTV's aperture (the optimize method).
    engine
        The reference engine of the case (a :class:`pipeline.dose_engine.DoseEngine`).
    masks
        Boolean masks on the engine's grid by role (``ptv`` required).
    rx_gy
        Prescription per fraction, Gy.
    iterations
        Optimizer evaluations (>= 1).
    shell_mm, oar_reach_mm
        Extent of the restricted region (:func:`refinement_region`).
    weights
        Objective weights; the optimizer's defaults when ``None``.
    goals
        Clinical goals added to the objective as terms.
    """
    t0 = time.perf_counter()
    if iterations < 1:
        raise PlanningError(f"refinement needs at least one iteration, got {iterations}")
    if Role.PTV not in masks:
        raise PlanningError("refinement needs a PTV mask on the dose grid")
    masks_np = {role: m.detach().cpu().numpy().astype(bool) for role, m in masks.items()}
    region = refinement_region(masks_np, engine.grid.spacing_mm, shell_mm=shell_mm, oar_reach_mm=oar_reach_mm)
    sub = engine.restricted(region)
    device = masks[Role.PTV].device
    result = optimize_fluence(sub, {role.value: m for role, m in masks.items()}, rx_gy=rx_gy, iterations=iterations,
                              init=(None if fluence is None
                                    else torch.as_tensor(np.asarray(fluence, dtype=np.float32), device=device)),
                              weights=weights, goals=goals, region=torch.as_tensor(region, device=device))
    seconds = time.perf_counter() - t0
    log.info("refinement: %d evaluations on %d voxels, loss %.4g -> %.4g in %.2f s", iterations, int(region.sum()),
             result.history[0], result.history[-1], seconds)
    return Refinement(fluence=result.fluence, engine=sub, iterations=len(result.history), voxels=int(region.sum()),
                      loss=(result.history[0], result.history[-1]), seconds=seconds)
