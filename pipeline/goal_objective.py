"""Clinical goals as differentiable terms of the planning objective (torch).

Every goal of the active list (``pipeline.goals.GoalSpec``: Dx%, Dxcc, VxGy%, VxGycc, Dmean,
Dmax, HI on any structure) becomes a squared-hinge term that is zero exactly when the goal is met
and grows with the violation. Its weight comes from its priority (P1 requirements far above P2,
P2 above P3, see :class:`PriorityWeights`), so the optimiser meets the P1 goals first and trades
P2 and P3 against each other and against the shape terms of the objective (homogeneity,
conformity). CI goals have no term (the conformity ring of the objective works on them); they are
evaluated only.

Dose-volume goals are the exact dose-volume-histogram constraints of clinical optimisers
(matRad's min/max DVH objectives): "at most a fraction ``f`` of the structure above ``L``" (``D2% <=
43 Gy``, ``V36Gy% <= 5``, ``D1cc <= ...``) penalises the voxels above ``L`` that are not among the
hottest ``f``; "at least a fraction ``f`` at or above ``L``" (``D98% >= 38 Gy``, ``V38Gy% >= 95``)
penalises the voxels below ``L`` among the hottest ``f``. ``Dmax`` allows no voxel above ``L``;
``Dmean`` is a hinge on the mean; ``HI`` a hinge on ``(D2 - D98) / D50`` with each quantile taken as
the mean of its 2 % tail.

Goals are stated for the exported plan, which is MU-normalised after planning (PTV D95 = Rx by
default). The terms therefore see the dose as it will be normalised: the dose is scaled by
``Rx / D_v(PTV)`` (the PTV's normalisation dose, a differentiable order statistic) before the
goals are evaluated, and every limit is tightened by ``margin`` (a fraction of the limit) for the
difference between the optimiser's dose grid and the CT grid the goals are reported on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from core.errors import PlanningError
from pipeline.dvh import D_METRIC_RE, V_METRIC_RE
from pipeline.goals import AT_LEAST, GoalSpec

#: Tail fraction standing for D2 and D98 in the HI term.
HI_TAIL = 0.02


@dataclass(frozen=True)
class PriorityWeights:
    """Weight of a goal's term by priority (the objective's shape terms weigh 20-200).

    Parameters
    ----------
    p1, p2, p3
        Weights of priority 1 (must), 2 (should) and 3 (nice to have) goals, >= 0.
    margin
        Fraction by which every limit is tightened in the objective (0.02: a ``<= 43 Gy`` goal is
        optimised to 42.1 Gy), in [0, 0.2).
    """

    p1: float = 2000.0
    p2: float = 200.0
    p3: float = 20.0
    margin: float = 0.02

    def __post_init__(self) -> None:
        if min(self.p1, self.p2, self.p3) < 0:
            raise PlanningError("goal priority weights must be >= 0")
        if not 0.0 <= self.margin < 0.2:
            raise PlanningError(f"goal margin must be in [0, 0.2), got {self.margin}")

    def of(self, priority: int) -> float:
        """The weight of a priority (1, 2 or 3)."""
        return {1: self.p1, 2: self.p2, 3: self.p3}[priority]


def _tail_size(n: int, fraction: float) -> int:
    """How many of ``n`` voxels the hottest ``fraction`` holds (at least 0, at most all)."""
    return min(n, max(0, math.floor(fraction * n + 1e-9)))


def at_most_fraction_above(values: torch.Tensor, limit: float, fraction: float, scale: float) -> torch.Tensor:
    """Penalty of "at most ``fraction`` of the voxels above ``limit``": mean over the structure of
    ``relu(d - limit)^2 / scale^2`` on the voxels not among the hottest ``fraction`` (its coldest rest,
    by one ``topk``: no mask over the structure)."""
    n = values.numel()
    k = _tail_size(n, fraction)
    if k >= n:
        return values.new_zeros(())
    rest = values if k == 0 else torch.topk(values, n - k, largest=False, sorted=False).values
    return (torch.relu(rest - limit) ** 2).sum() / (n * scale * scale)


def at_least_fraction_above(values: torch.Tensor, limit: float, fraction: float, scale: float) -> torch.Tensor:
    """Penalty of "at least ``fraction`` of the voxels at or above ``limit``": mean over the structure
    of ``relu(limit - d)^2 / scale^2`` on the voxels among the hottest ``fraction``."""
    n = values.numel()
    k = _tail_size(n, fraction)
    if k == 0:
        return values.new_zeros(())
    held = torch.topk(values, k, sorted=False).values
    return (torch.relu(limit - held) ** 2).sum() / (n * scale * scale)


def _tail_mean(values: torch.Tensor, fraction: float, hottest: bool) -> torch.Tensor:
    k = max(1, math.ceil(fraction * values.numel()))
    return torch.topk(values, k, largest=hottest, sorted=False).values.mean()


@dataclass(frozen=True)
class GoalSetup:
    """The goals an objective adds as terms, and how.

    Parameters
    ----------
    goals
        The active goal list.
    fractions
        Number of fractions (the objective works per fraction).
    voxel_cc
        Volume of a dose-grid voxel, cm3.
    weights
        Priority weights and margin.
    boost
        Extra weight factor of some goals, by index in ``goals`` (rescue rounds).
    normalisation_percent
        The PTV D<v> the exported plan is normalised to; ``None`` when the plan is not normalised.
    """

    goals: tuple[GoalSpec, ...]
    fractions: int
    voxel_cc: float
    weights: PriorityWeights = field(default_factory=PriorityWeights)
    boost: Mapping[int, float] | None = None
    normalisation_percent: float | None = 95.0


@dataclass(frozen=True)
class GoalTerm:
    """One goal as an objective term on a structure's voxels (see the module docstring)."""

    goal: GoalSpec
    mask: torch.Tensor  # bool, on the dose grid: the structure's voxels the engine computes
    weight: float
    limit_fx: float  # the limit in dose-per-fraction units for dose metrics, the metric's own otherwise
    voxel_cc: float
    total_voxels: int  # the whole structure's voxels (those outside ``mask`` count as below every limit)
    index: torch.Tensor | None = None  # ``mask``'s flat indices, when precomputed

    def with_index(self) -> GoalTerm:
        """The same term with ``index`` precomputed (no boolean selection per call)."""
        return replace(self, index=torch.nonzero(self.mask.reshape(-1)).reshape(-1))

    @property
    def name(self) -> str:
        return f"goal {self.goal.structure} {self.goal.metric} {self.goal.comparison} {self.goal.limit:g}"

    def value_of(self, d: torch.Tensor, scale: float) -> torch.Tensor:
        """The term (dimensionless, 0 when met) of the doses per fraction ``d`` at the term's voxels (``mask``'s,
        in flat order); ``scale`` is Rx per fraction."""
        g = self.goal
        n = self.total_voxels
        if d.numel() == 0:
            return d.new_zeros(())
        at_least = g.comparison == AT_LEAST
        share = d.numel() / n  # fractions of the whole structure -> of the voxels computed
        if g.metric == "Dmean":
            mean = d.sum() / n
            gap = (self.limit_fx - mean) if at_least else (mean - self.limit_fx)
            return torch.relu(gap) ** 2 / (scale * scale)
        if g.metric == "Dmax":
            if at_least:
                return torch.relu(self.limit_fx - d.max()) ** 2 / (scale * scale)
            return at_most_fraction_above(d, self.limit_fx, 0.0, scale)
        if g.metric == "HI":
            hi = (_tail_mean(d, HI_TAIL, True) - _tail_mean(d, HI_TAIL, False)) / d.mean().clamp_min(1e-9)
            return torch.relu((self.limit_fx - hi) if at_least else (hi - self.limit_fx)) ** 2
        m = D_METRIC_RE.match(g.metric)
        if m:  # Dx: the dose that the hottest x (% or cc) of the structure receives
            x = float(m.group("x"))
            f = min(1.0, (x / 100.0 if m.group("unit") == "%" else x / (n * self.voxel_cc)) / share)
            if at_least:
                return at_least_fraction_above(d, self.limit_fx, f, scale)
            return at_most_fraction_above(d, self.limit_fx, f, scale)
        m = V_METRIC_RE.match(g.metric)
        if m:  # VxGy: the volume (% or cc) receiving at least x Gy; limit_fx is x per fraction here
            f = g.limit / 100.0 if m.group("unit") == "%" else g.limit / (n * self.voxel_cc)
            f = min(1.0, max(0.0, f / share))
            if at_least:
                return at_least_fraction_above(d, self.limit_fx, f, scale)
            return at_most_fraction_above(d, self.limit_fx, f, scale)
        return d.new_zeros(())  # CI: evaluated only


def goal_terms(goals: Sequence[GoalSpec], masks: Mapping[str, torch.Tensor], *, fractions: int, voxel_cc: float,
               weights: PriorityWeights | None = None, boost: Mapping[int, float] | None = None,
               region: torch.Tensor | None = None) -> tuple[GoalTerm, ...]:
    """The terms of the goals whose structure the masks have (others, and CI goals, have none).

    Parameters
    ----------
    goals
        The active goal list (limits in the plan's total dose, % or cm3).
    masks
        Boolean masks on the dose grid by role value (the whole structure, as the goal is evaluated).
    fractions
        Number of fractions (dose limits are divided by it: the objective works per fraction).
    voxel_cc
        Volume of a dose-grid voxel, cm3.
    weights
        Priority weights and margin.
    boost
        Extra factor on the weight of some goals, by their index in ``goals`` (rescue rounds).
    region
        The voxels the engine computes (a restricted engine), bool on the dose grid; the rest of a
        structure counts in its volume with a dose below every limit. ``None``: every voxel.
    """
    w = weights or PriorityWeights()
    out = []
    for i, g in enumerate(goals):
        mask = masks.get(g.structure)
        if g.metric == "CI" or mask is None or not bool(mask.any()):
            continue
        tighter = (1.0 + w.margin) if g.comparison == AT_LEAST else (1.0 - w.margin)
        v = V_METRIC_RE.match(g.metric)
        if v:  # the dose level x is the limit of the term; the goal's volume stays the allowance
            limit = float(v.group("x")) * tighter / fractions
        elif g.metric == "HI":
            limit = g.limit * tighter
        else:
            limit = g.limit * tighter / fractions
        whole = mask.to(torch.bool)
        out.append(GoalTerm(goal=g, mask=whole if region is None else whole & region.to(torch.bool),
                            weight=w.of(g.priority) * (boost or {}).get(i, 1.0), limit_fx=float(limit),
                            voxel_cc=float(voxel_cc), total_voxels=int(whole.sum())))
    return tuple(out)


def normalisation_scale(ptv_values: torch.Tensor, rx_fx: float, volume_percent: float) -> torch.Tensor:
    """The factor by which a dose is scaled so that the PTV's D<volume_percent> equals ``rx_fx`` (as the MU
    normalisation will scale the exported plan), from the PTV voxels' doses ``ptv_values`` (1D);
    differentiable through the order statistic."""
    d = ptv_values
    k = max(1, min(d.numel(), math.ceil((1.0 - volume_percent / 100.0) * d.numel())))
    return rx_fx / torch.kthvalue(d, k).values.clamp_min(1e-9)
