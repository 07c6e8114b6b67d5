"""The [planning] section: how plans are made (method, device, optimizer and arc-stage settings)."""

from __future__ import annotations

import enum
import itertools
from typing import Annotated, Any

from pydantic import field_validator

from appliance.config_types import Float, Fraction, Int, NonNegative, Sparing, matching, section, setting
from core.case import DEFAULT_HU_TO_DENSITY
from core.errors import ConfigError
from core.machine import ArcStart
from pipeline.goals import GoalStages


class PlanningMethod(enum.StrEnum):
    """How plans are made: ``ai`` (the AIRT networks), ``optimize`` (gradient optimisation),
    ``auto`` (``ai`` when the installed model is qualified for unattended use, else ``optimize``)."""

    AUTO = "auto"
    AI = "ai"
    OPTIMIZE = "optimize"


class P1Policy(enum.StrEnum):
    """What happens to a plan that fails a priority-1 clinical goal: ``send`` it labelled with its
    verdict, ``hold`` its deliveries until ``airt jobs release ID``, or ``fail`` the job (its files kept)."""

    SEND = "send"
    HOLD = "hold"
    FAIL = "fail"


def check_sparing_pair(pair: Any, source: str) -> tuple[float, float]:
    """A candidate plan's (bladder s_o, rectum s_o), each in [0, 0.5]; ConfigError naming ``source`` otherwise."""
    try:
        b, r = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: each candidate is [bladder s_o, rectum s_o], got {pair!r}") from None
    if not (0.0 <= b <= 0.5 and 0.0 <= r <= 0.5):
        raise ConfigError(f"{source}: suppression factors s_o must be in [0, 0.5], got {[b, r]}")
    return b, r


@section
class PlanningSettings:
    """The planning pipeline."""

    profile: str = setting("The profile ([[profiles]]) of a study that no AE title or PTV name routes to another",
                           default="prostate_40gy_5fx")
    when_p1_fails: P1Policy = setting(
        "A plan failing a priority-1 goal: send (labelled with its verdict), hold (sent after airt jobs release ID) "
        "or fail (the job fails, files kept)", default=P1Policy.SEND)
    method: PlanningMethod = setting(
        "auto (ai when the installed model is qualified for unattended use, else optimize), ai or optimize",
        default=PlanningMethod.AUTO)
    device: Annotated[str, matching(r"auto|cpu|cuda(:\d+)?", "allowed auto, cpu, cuda, cuda:N")] = setting(
        "auto (CUDA when present), cpu, cuda or cuda:N", default="auto")
    model_dir: str = setting("Trained model folder; empty uses the shipped model", "path", default="")
    dose_grid_mm: Float = setting("Dose grid spacing", "mm", default=4.0, ge=1.0, le=10.0)
    optimizer_iterations: Int = setting(
        "Evaluations of the optimize method's fluence optimizer (one dose forward + backward each, on the voxels "
        "near the target: the PTV, an 8 mm shell and bladder/rectum within 15 mm)", "count 1-2000", default=150,
        gt=0, le=2000)
    aperture_threshold: Fraction = setting(
        "Leaf sequencer: a pixel belongs to a row's aperture at this fraction of the map maximum (PTV HI after "
        "sequencing 0.07 at 0.02, 0.28 at 0.15 on a synthetic case)", "fraction 0-1", default=0.02)
    ai_aperture_thresholds: tuple[Fraction, ...] = setting(
        "Leaf sequencer thresholds tried for AI fluence, in order: the first whose plan meets ai_min_ptv_d98_percent "
        "and ai_max_ptv_hi (reference dose, D95 = Rx) is used, else the one with the highest D98", "fractions 0-1",
        default=(0.4, 0.3, 0.2, 0.1, 0.05, 0.02), min_length=1)
    ai_min_ptv_d98_percent: Float = setting("PTV D98 an AI plan's threshold must reach", "% of Rx", default=97.0,
                                            ge=50.0, le=100.0)
    ai_max_ptv_hi: Float = setting(
        "Largest PTV homogeneity index (D2 - D98) / D50 an AI plan's threshold may give", "ratio", default=0.10,
        gt=0.0, le=1.0)
    ai_refine_iterations: Int = setting(
        "Optimizer evaluations refining the AI fluence near the target before sequencing (the PTV, an 8 mm shell and "
        "bladder/rectum within 15 mm; not in the paper: the small CPU networks leave the OAR walls next to the PTV "
        "hotter than the optimizer does); 0 = the networks' fluence as it is", "count 0-200", default=20, ge=0, le=200)
    arc_optimizer_iterations: Int = setting(
        "Machine-parameter optimisation of the sequenced arc, AI method: evaluations optimising the leaf positions "
        "and MU of every control point through the dose (machine limits kept at every step); 0 = the sequencer's "
        "arc as it is", "count 0-2000", default=250, ge=0, le=2000)
    optimizer_arc_iterations: Int = setting(
        "The same for the optimize method (the full planner: studies the AI method is not qualified for, teacher "
        "plans, the AI model's quality gate), which is not on the latency path: more evaluations spare the "
        "rectum and bladder better (benchmarks/RESULTS.md), about 0.03 s each on 2 cores", "count 0-2000",
        default=500, ge=0, le=2000)
    arc_optimizer_rounds: Int = setting(
        "Rounds the AI method's arc evaluations are split into: each round restarts the optimiser (Adam, fresh "
        "moments) at its full step from the arc the last round ended with, which spares the rectum and bladder "
        "better at the same count (benchmarks/RESULTS.md); 1 = one run", "count 1-10", default=3, ge=1, le=10)
    optimizer_arc_rounds: Int = setting(
        "The same for the optimize method", "count 1-10", default=4, ge=1, le=10)
    oar_mean_weight: Float = setting(
        "Weight of the bladder's and rectum's mean dose (outside the PTV, in units of Rx) in the fluence optimizer, "
        "the AI refinement and the arc optimisation: higher spares the low-dose bath at some cost in PTV homogeneity "
        "(the optimizer's own default is 0.5)", "0-50", default=10.0, ge=0.0, le=50.0)
    arc_start: ArcStart = setting(
        "Start of the machine-parameter optimisation: sweep (the fluence of every 10 adjacent sectors delivered by "
        "one leaf sweep, which keeps its modulation) or rule (the AIRT paper's one aperture per sector; for an AI "
        "fluence at the threshold search's choice)", default=ArcStart.SWEEP)
    arc_max_mu_per_cgy: Float = setting(
        "Soft maximum of the arc's modulation factor (MU per cGy of the fraction dose) in the machine-parameter "
        "optimisation: MU above it cost arc_mu_weight per MU/cGy (less modulation, shorter delivery)",
        "MU/cGy 1-20", default=3.0, ge=1.0, le=20.0)
    arc_mu_weight: Float = setting(
        "Weight of each MU per cGy above arc_max_mu_per_cgy in the machine-parameter optimisation; 0 = MU not "
        "penalised", "0-50", default=4.0, ge=0.0, le=50.0)
    arc_sectors_per_beam: Int = setting(
        "Adjacent arc sectors the AI method's machine-parameter optimisation doses together as one beam at their "
        "mean angle (3: every 6 degrees, a third less time a step than 2, which is on the latency path; 2: every 4 "
        "degrees; 1: every sector apart); the plan's dose is always computed sector by sector", "count 1-3",
        default=3, ge=1, le=3)
    optimizer_arc_sectors_per_beam: Int = setting(
        "The same for the optimize method (not on the latency path)", "count 1-3", default=2, ge=1, le=3)
    goal_stages: GoalStages = setting(
        "Planning stages whose objective holds every clinical goal ([[goals]]) as a term weighted by its priority: "
        "arc (the arc optimisation and the rescue), all (also the fluence optimizer and the AI refinement) or off "
        "(goals evaluated only)", default=GoalStages.ARC)
    rescue_rounds: Int = setting(
        "When a priority-1 goal fails, optimise the arc again up to this many times with the failing goals' weights "
        "raised, keeping the plan that best meets the goals in priority order; 0 = no rescue", "count 0-10",
        default=2, ge=0, le=10)
    sparing_bladder: Sparing = setting("Bladder suppression factor s_o of the AI pipeline (0 = baseline)",
                                       "fraction 0-0.5", default=0.0)
    sparing_rectum: Sparing = setting("Rectum suppression factor s_o of the AI pipeline (0 = baseline)",
                                      "fraction 0-0.5", default=0.0)
    candidate_sparings: tuple[tuple[Sparing, Sparing], ...] = setting(
        "Extra AI plans, one per (bladder s_o, rectum s_o) pair, each sequenced, dosed and sent as its own RT Plan "
        "+ RT Dose beside the main plan, e.g. [[0.0, 0.4], [0.4, 0.0]]", default=(), max_length=8)
    hu_to_density: tuple[tuple[Float, NonNegative], ...] = setting(
        "CT calibration curve: (HU, relative electron density) pairs, HU increasing", default=DEFAULT_HU_TO_DENSITY)

    @field_validator("hu_to_density")
    @classmethod
    def _increasing_hu(cls, pairs: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        hus = [p[0] for p in pairs]
        if len(hus) < 2 or any(b <= a for a, b in itertools.pairwise(hus)):
            raise ValueError("needs >= 2 pairs with strictly increasing HU")
        return pairs
