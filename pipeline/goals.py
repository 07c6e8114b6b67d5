"""Clinical goals evaluated pass/fail on a dose, and MU normalisation to the prescription (torch-free).

The appliance converts its configured ``appliance.config.Goal`` entries to :class:`GoalSpec`
(this module never imports ``appliance``). A goal on a structure the case does not have is
reported with ``passed=None`` and a reason, never as a crash: a missing femoral head must not
stop a plan from being delivered to the physicist.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.case import Case, Grid, Role
from core.errors import InputError, PlanningError
from pipeline.dvh import METRIC_RE, V_METRIC_RE, dose_at_volume_percent, evaluate_metric, metric_unit, paddick_ci

log = logging.getLogger(__name__)



class Normalisation(enum.StrEnum):
    """How MU are scaled after planning: ``ptv_dx`` (PTV D{volume_percent}% = Rx),
    ``ptv_mean`` (PTV mean = Rx), ``none``."""

    PTV_DX = "ptv_dx"
    PTV_MEAN = "ptv_mean"
    NONE = "none"


class GoalStages(enum.StrEnum):
    """Which planning stages add the goals to their objective.

    ``arc``: the machine-parameter optimisation of the arc and the rescue (the fluence stages keep
    the shape objective); ``all``: the fluence optimizer and the AI refinement too; ``off``: none
    (the goals are evaluated, and a rescue still adds them with the failing ones raised).
    """

    ARC = "arc"
    ALL = "all"
    OFF = "off"


AT_LEAST = ">="
AT_MOST = "<="


@dataclass(frozen=True)
class GoalSpec:
    """One clinical goal.

    Parameters
    ----------
    structure
        Role value of the structure (``"ptv"``, ``"bladder"``, ``"rectum"``, ``"body"``,
        ``"femur_head_l"``, ``"femur_head_r"``).
    metric
        Metric in the goal grammar (``D98%``, ``D2cc``, ``V36Gy%``, ``V20Gycc``, ``Dmean``,
        ``Dmax``, ``HI``, ``CI``).
    comparison
        ``">="`` (value must be at least ``limit``) or ``"<="`` (at most).
    limit
        Limit in the metric's unit (Gy, %, cm3 or a ratio).
    priority
        1 = must, 2 = should, 3 = nice to have.
    """

    structure: str
    metric: str
    comparison: str
    limit: float
    priority: int = 2

    def __post_init__(self) -> None:
        if self.comparison not in (AT_LEAST, AT_MOST):
            raise InputError(f"goal {self.structure} {self.metric}: comparison must be '>=' or '<='")
        if not METRIC_RE.fullmatch(self.metric):
            raise InputError(
                f"goal {self.structure}: metric {self.metric!r} is not Dx%, Dxcc, VxGy%, VxGycc, "
                "Dmean, Dmax, HI or CI"
            )


@dataclass(frozen=True)
class GoalResult:
    """The outcome of one goal.

    ``value`` is in ``unit``; ``passed`` is ``None`` (with ``reason``) when the goal could not be
    evaluated, e.g. because the case has no such structure.
    """

    structure: str
    metric: str
    comparison: str
    limit: float
    priority: int
    value: float | None
    unit: str
    passed: bool | None
    reason: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (for metrics.json)."""
        return asdict(self)


def _evaluate(
    goals: Iterable[GoalSpec],
    inputs: Callable[[str], tuple[NDArray[Any], NDArray[Any]] | None],
    ci: Callable[[NDArray[Any], NDArray[Any]], float],
    voxel_cc: float,
    rx_gy: float,
) -> list[dict[str, Any]]:
    """Core of the goal evaluation; ``inputs(role)`` gives (dose values, mask) or None if absent."""
    results = []
    for g in goals:
        unit = metric_unit(g.metric)
        got = inputs(g.structure)
        value: float | None = None
        passed: bool | None = None
        reason = ""
        if got is None:
            reason = f"the case has no {g.structure} structure"
        elif not np.any(got[1]):
            reason = f"the {g.structure} structure covers no voxel of the dose grid"
        else:
            d, m = got
            value = ci(d, m) if g.metric == "CI" else evaluate_metric(g.metric, d, m, voxel_cc, rx_gy=rx_gy)
            if np.isnan(value):
                reason = f"{g.metric} is undefined for this dose (zero median dose)"
            elif g.comparison == AT_LEAST:
                passed = bool(value >= g.limit)
            else:
                passed = bool(value <= g.limit)
        if reason:
            log.info("goal %s %s not evaluated: %s", g.structure, g.metric, reason)
        results.append(
            GoalResult(
                g.structure, g.metric, g.comparison, g.limit, g.priority, value, unit, passed, reason
            ).to_dict()
        )
    return results


def evaluate_goals_on_masks(
    goals: Iterable[GoalSpec],
    dose: NDArray[Any],
    masks: Mapping[Any, NDArray[Any]],
    voxel_cc: float,
    *,
    rx_gy: float,
) -> list[dict[str, Any]]:
    """Evaluate clinical goals on a dose and masks that share one grid.

    Parameters
    ----------
    goals
        The goals, in report order.
    dose
        Dose, Gy.
    masks
        Structure masks (bool or voxel fractions) on the dose's grid by role value
        (``core.case.Role`` keys work too: they are string enums). The ``"body"`` mask, when
        present, bounds the CI's prescription isodose volume.
    voxel_cc
        Volume of one voxel, cm3.
    rx_gy
        Prescription dose, Gy (for CI).

    Returns
    -------
    list[dict]
        One :class:`GoalResult` as a dict per goal: ``structure, metric, comparison, limit,
        priority, value, unit, passed, reason``; ``passed`` is ``None`` with a reason when the
        structure is missing or empty.
    """
    body = masks.get("body")

    def inputs(role: str) -> tuple[NDArray[Any], NDArray[Any]] | None:
        m = masks.get(role)
        return None if m is None else (dose, m)

    def ci(d: NDArray[Any], m: NDArray[Any]) -> float:
        return paddick_ci(d, m, rx_gy=rx_gy, body_mask=body)

    return _evaluate(goals, inputs, ci, voxel_cc, rx_gy)


def evaluate_goals(goals: Iterable[GoalSpec], dose: NDArray[Any], dose_grid: Grid, case: Case) -> list[dict[str, Any]]:
    """Evaluate clinical goals of a case, on its CT grid.

    The dose (Gy, on ``dose_grid``) is interpolated trilinearly at the CT voxels of each structure
    (as ``pipeline.evaluation`` does for the reported metrics, so goals and metrics agree); volumes
    use the CT voxel volume; the prescription is the case's total dose; CI counts the prescription
    isodose inside the body. Returns the same dicts as :func:`evaluate_goals_on_masks`.
    """
    from pipeline import evaluation  # lazy: it pulls in the beam geometry

    goals = list(goals)
    wanted = [Role(g.structure) for g in goals if g.structure in {r.value for r in Role}]
    doses = evaluation.ct_structure_doses(dose, dose_grid, case, sorted(set(wanted)))  # once for every goal

    def inputs(role: str) -> tuple[NDArray[Any], NDArray[Any]] | None:
        if role not in case.masks:
            return None
        got = doses.get(Role(role))
        return (np.zeros(1, np.float32), np.zeros(1, bool)) if got is None else (got.dose, got.mask)

    @functools.cache
    def paddick() -> float:
        return evaluation.paddick_ci(dose, dose_grid, case)

    def ci(_d: NDArray[Any], _m: NDArray[Any]) -> float:
        return paddick()

    results = _evaluate(goals, inputs, ci, case.grid.voxel_volume_cc, case.prescription.dose_gy)
    for r in results:
        r["note"] = _overlap_note(r, case)
    return results


def _overlap_note(result: Mapping[str, Any], case: Case) -> str:
    """For a failed "at most" volume goal of an organ (``VxGy`` below the prescription): how much of the
    organ lies inside the PTV when that alone exceeds the allowed volume, i.e. when the goal cannot be
    met without giving up PTV coverage (the plan is normalised to cover the PTV). Empty otherwise."""
    m = V_METRIC_RE.match(str(result["metric"]))
    role = result["structure"]
    if (m is None or result["passed"] is not False or result["comparison"] != AT_MOST or role == Role.PTV.value
            or role not in case.masks or Role.PTV not in case.masks
            or float(m.group("x")) >= case.prescription.dose_gy):
        return ""
    organ = case.masks[Role(role)]
    inside = int((organ & case.masks[Role.PTV]).sum())
    allowed = (float(result["limit"]) / case.grid.voxel_volume_cc if m.group("unit") == "cc"
               else float(result["limit"]) / 100.0 * int(organ.sum()))
    if inside <= allowed:
        return ""
    return f"{inside * case.grid.voxel_volume_cc:.2g} cm3 of the {role} inside the PTV"


def normalisation_factor(
    dose: NDArray[Any],
    ptv_mask: NDArray[Any],
    *,
    rx_gy: float,
    mode: str = "ptv_dx",
    volume_percent: float = 95.0,
) -> float:
    """The factor that scales MU (and, dose being linear in MU, the dose) to the prescription.

    Parameters
    ----------
    dose
        Dose of the plan before normalisation, Gy.
    ptv_mask
        PTV mask or voxel fractions on the dose grid.
    rx_gy
        Prescription dose, Gy (> 0).
    mode
        ``"ptv_dx"``: after scaling, PTV D{volume_percent}% = Rx; ``"ptv_mean"``: PTV mean = Rx;
        ``"none"``: 1.0.
    volume_percent
        With ``ptv_dx``: the PTV volume percentage (0 < v < 100) that receives the prescription.

    Returns
    -------
    float
        Multiply MU and dose by this (> 0).
    """
    if not rx_gy > 0:
        raise InputError(f"prescription must be > 0 Gy, got {rx_gy}")
    if mode == "none":
        return 1.0
    if mode == "ptv_dx":
        if not 0 < volume_percent < 100:
            raise InputError(f"normalisation volume must be in (0, 100) %, got {volume_percent}")
        current = dose_at_volume_percent(dose, ptv_mask, volume_percent)
        what = f"PTV D{volume_percent:g}%"
    elif mode == "ptv_mean":
        current = evaluate_metric("Dmean", dose, ptv_mask, 1.0, rx_gy=rx_gy)
        what = "PTV mean dose"
    else:
        raise InputError(f"normalisation mode {mode!r}: allowed ptv_dx, ptv_mean, none")
    if not current > 0:
        raise PlanningError(
            f"cannot normalise the plan: {what} is {current:.4g} Gy (the plan puts no dose in the PTV); "
            "check the PTV contour and the beam geometry"
        )
    return rx_gy / current


@dataclass(frozen=True)
class Verdict:
    """A plan's verdict against its clinical goals.

    Attributes
    ----------
    p1_met
        Every priority-1 goal that could be evaluated passed (a goal on a missing structure is not
        counted as failed, but named in ``not_evaluated``).
    p1_failed
        The failed priority-1 goals, each as ``"<structure> <metric> <value> vs <comparison> <limit>"``.
    p2_met, p2_total
        Priority-2 goals met, of those evaluated.
    not_evaluated
        Goals that could not be evaluated (missing structure...), as ``"<structure> <metric>"``.
    """

    p1_met: bool
    p1_failed: tuple[str, ...]
    p2_met: int
    p2_total: int
    not_evaluated: tuple[str, ...]

    @property
    def text(self) -> str:
        """One line for the RT Plan, the job list and the log: ``all P1 met; P2 5/6`` or
        ``P1 failed: rectum V36Gy% 7.21 vs <= 5; P2 4/6``."""
        head = "all P1 met" if self.p1_met else "P1 failed: " + ", ".join(self.p1_failed)
        return f"{head}; P2 {self.p2_met}/{self.p2_total}"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for metrics.json."""
        return {"text": self.text, "p1_met": self.p1_met, "p1_failed": list(self.p1_failed),
                "p2_met": self.p2_met, "p2_total": self.p2_total, "not_evaluated": list(self.not_evaluated)}


def plan_verdict(results: Iterable[Mapping[str, Any]]) -> Verdict:
    """The verdict of goal results (:func:`evaluate_goals` rows)."""
    rows = list(results)

    def describe(g: Mapping[str, Any]) -> str:
        unit = f" {g['unit']}" if g.get("unit") not in (None, "", "%") else ("%" if g.get("unit") == "%" else "")
        value = g.get("value")
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        note = f" ({g['note']})" if g.get("note") else ""
        return f"{g['structure']} {g['metric']} {shown}{unit} vs {g['comparison']} {g['limit']:g}{unit}{note}"

    failed = tuple(describe(g) for g in rows if g["priority"] == 1 and g.get("passed") is False)
    p2 = [g for g in rows if g["priority"] == 2 and g.get("passed") is not None]
    return Verdict(p1_met=not failed, p1_failed=failed, p2_met=sum(bool(g["passed"]) for g in p2), p2_total=len(p2),
                   not_evaluated=tuple(f"{g['structure']} {g['metric']}" for g in rows if g.get("passed") is None))
