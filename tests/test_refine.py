"""Dose-guided refinement of a fluence near the target (pipeline.refine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appliance.config import Settings
from core.case import Role
from core.errors import PlanningError
from pipeline.dvh import dose_at_volume_percent
from pipeline.goals import normalisation_factor
from pipeline.optimizer import ptv_aperture
from pipeline.problem import build_problem
from pipeline.refine import refine_fluence, refinement_region
from pipeline.synth import synth_case

torch.set_num_threads(2)


def test_region_is_the_ptv_its_shell_and_the_oar_walls_near_it() -> None:
    shape = (5, 5, 40)
    ptv = np.zeros(shape, bool)
    ptv[:, :, 10:15] = True
    rectum = np.zeros(shape, bool)
    rectum[:, :, 15:40] = True  # touches the PTV and runs 100 mm away from it
    region = refinement_region({Role.PTV: ptv, Role.RECTUM: rectum}, (4.0, 4.0, 4.0), shell_mm=8.0, oar_reach_mm=20.0)
    assert region[ptv].all()
    x_in = np.nonzero(region[2, 2])[0]
    # shell: 2 voxels (8 mm) on the non-OAR side; rectum: 5 voxels (20 mm) beyond the PTV edge
    assert x_in.min() == 8 and x_in.max() == 19
    assert not region[:, :, 20:].any()  # the far rectum is left out
    with pytest.raises(PlanningError, match="shell"):
        refinement_region({Role.PTV: ptv}, (4.0, 4.0, 4.0), shell_mm=-1.0, oar_reach_mm=0.0)


def _oar_d2(dose: np.ndarray, masks: dict[Role, torch.Tensor]) -> dict[str, float]:
    ptv = masks[Role.PTV].numpy()
    d = dose * normalisation_factor(dose, ptv, rx_gy=1.0, mode="ptv_dx", volume_percent=95.0)
    return {r.value: dose_at_volume_percent(d, masks[r].numpy() & ~ptv, 2.0) for r in (Role.BLADDER, Role.RECTUM)}


def test_refinement_cools_the_oar_walls_of_a_wide_open_fluence() -> None:
    settings = Settings()
    case = synth_case(1901, spacing_mm=(4.0, 4.0, 4.0))
    rx = case.prescription.dose_gy / case.prescription.fractions
    prob = build_problem(case, settings.machine.arc(), settings.machine.model(), spacing_mm=4.0)
    engine, masks = prob.engine, prob.masks
    # a crude start: every pixel that sees the PTV at all, flat, PTV mean = Rx (wide fields, hot OAR walls)
    ptv_t = masks[Role.PTV]
    shape = engine.fluence_shape
    aperture, _ = ptv_aperture(engine, ptv_t, shape, threshold=0.05, device=ptv_t.device, dtype=torch.float32)
    start = aperture.float()
    with torch.no_grad():
        d0 = engine(start)
    start = start * (rx / float(d0[ptv_t].mean()))

    refined = refine_fluence(start.numpy(), engine, masks, rx_gy=rx, iterations=15)

    assert refined.fluence.shape == shape and refined.fluence.dtype == np.float32
    assert float(refined.fluence.min()) >= 0.0
    assert refined.loss[1] < refined.loss[0]
    assert refined.record()["iterations"] == refined.iterations == 15
    assert refined.voxels == refined.engine.points.shape[1] < engine.points.shape[1] // 5
    with torch.no_grad():
        full_before = engine(start).numpy()
        full_after = engine(torch.as_tensor(refined.fluence)).numpy()
        sub_after = refined.engine(torch.as_tensor(refined.fluence)).numpy()
    ptv = ptv_t.numpy()
    # the restricted engine's PTV dose is the full engine's (the threshold choice reuses it)
    np.testing.assert_allclose(sub_after[ptv], full_after[ptv], rtol=1e-5, atol=1e-6 * float(full_after.max()))
    before, after = _oar_d2(full_before, masks), _oar_d2(full_after, masks)
    for organ in ("bladder", "rectum"):
        assert after[organ] < before[organ] - 0.02, (organ, before, after)  # relative to Rx
    with pytest.raises(PlanningError, match="iteration"):
        refine_fluence(start.numpy(), engine, masks, rx_gy=rx, iterations=0)
