"""Machine-parameter optimisation of a sequenced VMAT arc: leaves and MU optimised through the dose.

The leaf sequencer gives every sector one aperture per leaf pair at one MU level; the fluence it
was handed is modulated inside those apertures, so sequencing loses part of the plan's quality.
Clinical planners do not stop there (Eclipse's Photon Optimizer, RayStation, matRad's direct
aperture optimisation): they optimise the machine parameters of the deliverable arc. This module
does the same for the appliance's arc.

Variables. The DICOM leaf positions of both banks of the leaf pairs that shape the BEV rows at
every control point (``(n_cp, rows, 2)``, mm) and the MU of every sector (``(n_sectors,)``). Leaf
pairs outside the BEV rows stay parked closed.

Model. :func:`delivered_fluence` is :func:`sequencing.fluence.fluence_from_sequence` written in
torch: sector ``k`` delivers its MU while leaves and jaws move linearly from control point ``k`` to
``k + 1``, sampled at ``substeps`` sub-positions; a pixel is open by the fraction of its area
inside ``[a - DLG/2, b + DLG/2] ∩ [X1, X2]`` in x and ``[Y1, Y2]`` in y (partial pixel edges, the
dosimetric leaf gap, the jaws). It gives the same fluence as the numba kernel to rounding, and
is differentiable in the leaf positions (almost everywhere) and linear in the MU; the gradient of the
open areas is written by hand (one pixel per leaf edge). On the CPU the fluence and its gradient
are two numba kernels (:class:`_DeliveredFluence`, about 1 ms a step where the torch form took 4).
The jaws are fitted to the leaves (``sequencing``'s rule) after every step and held fixed within a
step.

Objective. The planning objective's dose terms (:class:`pipeline.optimizer.DoseObjective`, the
same terms the fluence optimizer minimises) plus, with ``mu_weight``, a hinge on the arc's total
MU over a reference above ``mu_limit`` (the modulation factor, MU per cGy), evaluated through a
dose engine: the reference engine or a copy restricted to the voxels near the target where the
terms change (``SHELL_MM``, ``OAR_REACH_MM``), so a step costs tens of milliseconds instead of the
full engine's 0.7 s; the femoral heads' mean dose, and their dose-volume goals through the mean of
a part, come exactly from the fluence (``FAR_OARS``, :class:`LinearDoseTerms`,
:class:`LinearGoalTerms`). In the planning core (``pipeline.plan``) the restricted engine gives the
dose as a vector over its region only (:class:`pipeline.dose_engine.RegionDose`) and the objective
reads the PTV, and the rectum and bladder near it, at their CT voxels by the evaluation's own
trilinear interpolation (:meth:`pipeline.optimizer.DoseObjective.on_voxels`): the goals are
optimised on the voxels their verdict is computed on.

Machine limits, by construction. After every Adam step the variables are projected onto the
machine's feasible set: MU per sector within ``[min_mu_per_deg, MU_CAP_FRACTION x max_mu_per_deg] x
sector angle`` (room for the MU normalisation);
leaf positions within the BEV field; every gap ``>= min_leaf_gap_mm``; every leaf move within
``max_leaf_speed x`` the segment's time ``max(angle / max gantry speed, MU (1 - headroom) / max
dose rate)`` (``sequencing.sequencer.limit_leaf_travel``, which keeps the gap). So every iterate is
deliverable, and the MU may later be scaled down by up to ``mu_headroom`` (the MU normalisation)
without a leaf exceeding its speed. The start is the sequencer's arc.

The plan's dose is still computed afterwards, as always, by the full reference engine from the
exported arc (``fluence_from_sequence``), never by this module's model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from numba import njit, prange
from numpy.typing import NDArray

from core.case import Role
from core.errors import PlanningError
from core.machine import ArcSpec, MachineModel
from pipeline.dose_engine import DoseEngine
from pipeline.map_sampling import kernel_threads
from sequencing.sequencer import ArcSequence, fit_jaws, limit_leaf_travel

log = logging.getLogger(__name__)

#: Extent of the restricted engine's region (:func:`pipeline.refine.refinement_region`), mm: the
#: body within ``SHELL_MM`` of the PTV (conformity) and the bladder and rectum within ``OAR_REACH_MM``
#: (their mean and high-dose terms where the arc changes them). Farther voxels would widen the engine's
#: convolution lattices: a region reaching the whole bladder, rectum and femoral heads (and the body
#: within 30 mm) cost twice as much a step on a synthetic pelvis (2.9 s against 1.4 s for 30 steps; PTV
#: HI 0.045 against 0.057, rectum Dmean 8.3 against 8.0 Gy).
SHELL_MM = 15.0
OAR_REACH_MM = 25.0
#: The optimised arc's sector MU stay at or below this fraction of the machine's MU per degree, so
#: the MU normalisation may scale them up (a normalisation that still reaches the cap caps those
#: sectors, and the plan is dosed again).
MU_CAP_FRACTION = 0.9
#: Structures outside the restricted engine's region whose mean dose the arc optimisation still
#: holds (:class:`LinearDoseTerms`): an arc sparing the rectum turns to lateral angles through the
#: femoral heads (femoral head V14.5Gy reached 15-35 % on synthetic pelvises against a 5 % goal).
#: Computing them in the restricted engine instead made a step 7 times as slow.
FAR_OARS = (Role.FEMUR_HEAD_L, Role.FEMUR_HEAD_R)


@dataclass(frozen=True, eq=False)
class LinearDoseTerms:
    """Mean-dose hinges of structures from the fluence, exactly: the dose is linear in the fluence, so a
    structure's mean dose is ``<g, fluence>`` with ``g = A^T m / |m|`` (the engine's adjoint of its mask,
    :meth:`pipeline.dose_engine.DoseEngine.adjoint`, once per case).

    ``maps`` are the ``g`` of each structure (``(n_sectors, rows, cols)``, dose per MU); the term is
    ``weight x sum_s max(0, mean_s / rx - level)``.
    """

    maps: tuple[torch.Tensor, ...]
    rx_gy: float
    level: float
    weight: float
    _stack: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_stack", stacked(self.maps))

    @classmethod
    def of(cls, engine: DoseEngine, masks: list[torch.Tensor], *, rx_gy: float, level: float,
           weight: float) -> LinearDoseTerms:
        """The terms of ``masks`` (bool, on the engine's grid) through ``engine`` (one that computes them)."""
        maps = tuple(engine.adjoint(m) / float(m.sum())
                     for m in masks if bool(m.any()))
        return cls(maps=maps, rx_gy=float(rx_gy), level=float(level), weight=float(weight))

    def __call__(self, fluence: torch.Tensor) -> torch.Tensor:
        if not self.maps:
            return fluence.new_zeros(())
        means = linear_doses(self._stack, fluence)
        return self.weight * torch.relu(means / self.rx_gy - self.level).sum()


@dataclass(frozen=True, eq=False)
class LinearGoalTerms:
    """Dose-volume goals of structures outside the restricted engine, through mean doses that are
    linear in the fluence (as :class:`LinearDoseTerms`): an "at most ``f`` of the structure above
    ``x``" goal (``V14.5Gy% <= 5`` on a femoral head) is held by the mean dose of a part of the
    structure (in the planning core its hottest ``f`` in the arc's dose, the part a planner draws as
    a helper structure, redrawn as the dose moves: ``pipeline.plan.HotPartGoalTerms``), kept at or
    below ``x``. Squared hinges, weighted by the goal's
    priority as the goal terms of :mod:`pipeline.goal_objective`.

    ``maps`` are the parts' ``A^T m / |m|`` (dose per MU); ``limits_fx`` their levels (Gy per
    fraction) and ``weights`` their weights; ``rx_fx`` the prescription per fraction (the scale).
    """

    maps: tuple[torch.Tensor, ...]
    limits_fx: tuple[float, ...]
    weights: tuple[float, ...]
    rx_fx: float
    _stack: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_stack", stacked(self.maps))
        if not len(self.maps) == len(self.limits_fx) == len(self.weights):
            raise PlanningError(f"{len(self.maps)} maps, {len(self.limits_fx)} limits and {len(self.weights)} weights "
                                "of linear goal terms differ in number")

    def __call__(self, fluence: torch.Tensor) -> torch.Tensor:
        if not self.maps:
            return fluence.new_zeros(())
        means = linear_doses(self._stack, fluence)
        limits = torch.as_tensor(self.limits_fx, dtype=fluence.dtype, device=fluence.device)
        weights = torch.as_tensor(self.weights, dtype=fluence.dtype, device=fluence.device)
        return (weights * (torch.relu(means - limits) / self.rx_fx) ** 2).sum()


def stacked(maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The maps flattened into the rows of one matrix (``(len(maps), n)``), for :func:`linear_doses`."""
    if not maps:
        return torch.zeros((0, 0))
    return torch.stack([g.reshape(-1) for g in maps])


def linear_doses(stack: torch.Tensor, fluence: torch.Tensor) -> torch.Tensor:
    """``<g, fluence>`` for every map ``g`` stacked in ``stack`` (:func:`stacked`), ``(len(maps),)``: one
    matrix-vector product forward and one backward, instead of a product and a sum per map."""
    return torch.mv(stack.to(device=fluence.device, dtype=fluence.dtype), fluence.reshape(-1))


@dataclass(frozen=True)
class ArcOptimizerSettings:
    """Settings of the machine-parameter optimisation.

    Parameters
    ----------
    iterations
        Objective evaluations (>= 0; 0 returns the start projected onto the limits).
    rounds
        Rounds the evaluations are split into (>= 1; more than ``iterations`` run one each): each
        round starts Adam afresh (no moments) at the full step from where the last ended, a warm
        restart. On 3 + 3 cases four rounds of 125 evaluations left the rectum a 6-40 % lower mean
        dose than one run of 500, at the same PTV coverage (``benchmarks/RESULTS.md``).
    leaf_step_mm
        Adam step of the leaf positions, mm (decays linearly to a tenth over each round).
    mu_step
        Adam step of the sector MU, relative to the start's mean sector MU.
    substeps
        Sub-positions per sector of the fluence model (as ``fluence_from_sequence``).
    mu_headroom
        Fraction in [0, 0.5) by which the MU may be scaled down afterwards with every leaf still
        within its speed (see the module docstring).
    mu_weight, mu_limit
        The MU term: ``mu_weight x max(0, MU / mu_reference - mu_limit)`` with ``mu_reference`` the
        fraction dose in cGy in the planning core (:func:`optimize_arc`), so ``mu_limit`` is a
        modulation factor in MU per cGy above which MU cost as much as dose terms (a soft maximum,
        as clinical planners' MU constraints); ``mu_weight = 0`` leaves the MU free.
    sectors_per_beam
        Adjacent sectors the planning core's restricted engine doses together at their mean angle
        (:meth:`pipeline.dose_engine.ReferenceDoseEngine.restricted`); 1 = every sector apart.
    """

    iterations: int = 60
    rounds: int = 1
    leaf_step_mm: float = 1.0
    mu_step: float = 0.03
    substeps: int = 8
    mu_headroom: float = 0.02
    mu_weight: float = 0.0
    mu_limit: float = 0.0
    sectors_per_beam: int = 1

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise PlanningError(f"machine-parameter optimisation needs iterations >= 0, got {self.iterations}")
        if self.rounds < 1:
            raise PlanningError(f"machine-parameter optimisation rounds must be >= 1, got {self.rounds}")
        if not (self.leaf_step_mm > 0 and self.mu_step > 0):
            raise PlanningError("machine-parameter optimisation steps must be > 0")
        if self.substeps < 1:
            raise PlanningError(f"substeps must be >= 1, got {self.substeps}")
        if not 0.0 <= self.mu_headroom < 0.5:
            raise PlanningError(f"mu_headroom must be in [0, 0.5), got {self.mu_headroom}")
        if self.sectors_per_beam < 1:
            raise PlanningError(f"sectors_per_beam must be >= 1, got {self.sectors_per_beam}")
        if not (self.mu_weight >= 0.0 and self.mu_limit >= 0.0):
            raise PlanningError(f"mu_weight and mu_limit must be >= 0, got {self.mu_weight}, {self.mu_limit}")


@dataclass(frozen=True)
class ArcOptimization:
    """What :func:`optimize_arc` returns.

    Attributes
    ----------
    sequence
        The optimised arc: leaves, jaws (fitted to the leaves), cumulative MU; within every
        machine limit.
    loss
        Objective of the start (after projection) and of the result.
    iterations
        Objective evaluations run.
    seconds
        Wall time, s.
    rounds
        Rounds the evaluations ran in (warm restarts, :class:`ArcOptimizerSettings`).
    """

    sequence: ArcSequence
    loss: tuple[float, float]
    iterations: int
    seconds: float
    rounds: int = 1

    def record(self) -> dict[str, Any]:
        """What ``metrics.json`` records."""
        return {"iterations": self.iterations, "rounds": self.rounds, "loss_start": round(self.loss[0], 6),
                "loss_end": round(self.loss[1], 6), "seconds": round(self.seconds, 3)}


def delivered_fluence(leaves: torch.Tensor, jaws: torch.Tensor, segment_mu: torch.Tensor, machine: MachineModel,
                      *, substeps: int = 8) -> torch.Tensor:
    """Fluence ``(n_sectors, rows, cols)`` (MU per pixel) of the BEV rows' leaves, differentiably.

    Parameters
    ----------
    leaves
        ``(n_cp, rows, 2)`` DICOM positions of the leaf pairs shaping the BEV rows, mm.
    jaws
        ``(n_cp, 4)`` X1, X2, Y1, Y2, mm (treated as constants).
    segment_mu
        ``(n_sectors,)`` MU of each sector.
    machine
        BEV grid and dosimetric leaf gap.
    substeps
        Sub-positions per sector (midpoint rule, as ``fluence_from_sequence``).

    On the CPU (float32 or float64) one numba kernel computes the fluence and one its gradient
    (:class:`_DeliveredFluence`); elsewhere :func:`delivered_fluence_torch`, whose operations they
    reproduce (the fluence to the bit, the gradients to rounding: summed in another order).
    """
    if leaves.device.type == "cpu" and leaves.dtype in (torch.float32, torch.float64):
        bev = machine.bev
        dtype = leaves.dtype
        return _DeliveredFluence.apply(  # type: ignore[no-any-return]
            leaves, jaws.to(dtype), segment_mu.to(dtype), _Beamlets(
                row_lo=np.ascontiguousarray(bev.row_edges_mm()[:-1], dtype=_NP_DTYPES[dtype]),
                col=np.ascontiguousarray(bev.col_edges_mm(), dtype=_NP_DTYPES[dtype]),
                half_dlg=0.5 * float(machine.dosimetric_leaf_gap_mm), pixel_mm=float(bev.pixel_mm),
                substeps=int(substeps)))
    return delivered_fluence_torch(leaves, jaws, segment_mu, machine, substeps=substeps)


def delivered_fluence_torch(leaves: torch.Tensor, jaws: torch.Tensor, segment_mu: torch.Tensor, machine: MachineModel,
                            *, substeps: int = 8) -> torch.Tensor:
    """:func:`delivered_fluence` in torch operations (any device).

    The open area of every pixel, the ``(sectors, substeps, rows, cols)`` part, has a hand-written
    gradient (:class:`_OpenArea`); the rest (interpolation, dosimetric leaf gap and jaws, MU) is torch's.
    """
    bev = machine.bev
    dtype, dev = leaves.dtype, leaves.device
    w = float(bev.pixel_mm)
    half_dlg = 0.5 * float(machine.dosimetric_leaf_gap_mm)
    t = (torch.arange(substeps, dtype=dtype, device=dev) + 0.5) / substeps  # (S,)
    u = 1.0 - t

    def lerp(v: torch.Tensor) -> torch.Tensor:  # (n_cp, ...) -> (n, S, ...)
        shape = (1, substeps) + (1,) * (v.ndim - 1)
        return v[:-1, None] * u.reshape(shape) + v[1:, None] * t.reshape(shape)

    lv = lerp(leaves)  # (n, S, R, 2)
    jw = lerp(jaws.to(dtype))  # (n, S, 4)
    lo = torch.maximum(lv[..., 0] - half_dlg, jw[..., 0:1])  # (n, S, R)
    hi = torch.minimum(lv[..., 1] + half_dlg, jw[..., 1:2])
    row_lo = torch.as_tensor(bev.row_edges_mm()[:-1], dtype=dtype, device=dev)
    col = torch.as_tensor(bev.col_edges_mm(), dtype=dtype, device=dev)
    oy = (torch.minimum(jw[..., 3:4], row_lo + w) - torch.maximum(jw[..., 2:3], row_lo)).clamp_min(0.0)  # (n, S, R)
    open_area: torch.Tensor = _OpenArea.apply(lo, hi, oy.detach() / (substeps * w * w), col)  # (n, R, C)
    return open_area * segment_mu[:, None, None]


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@dataclass(frozen=True)
class _Beamlets:
    """The BEV grid and leaf model constants of :class:`_DeliveredFluence`'s kernels."""

    row_lo: NDArray[Any]
    col: NDArray[Any]
    half_dlg: float
    pixel_mm: float
    substeps: int


@njit(inline="always")
def _sub_position(leaves: NDArray[Any], jaws: NDArray[Any], k: int, r: int, t: Any, u: Any, hd: Any) -> tuple[
        Any, Any, Any, Any, Any, Any, Any, Any]:  # pragma: no cover - compiled
    """Sector ``k``'s sub-position at ``t`` (``u = 1 - t``), row ``r``: the leaf edges widened by the
    dosimetric leaf gap (``a - DLG/2``, ``b + DLG/2``) and the jaws X1, X2, Y1, Y2, interpolated as
    :func:`delivered_fluence_torch` does (the same float operations in the same order)."""
    a = leaves[k, r, 0] * u + leaves[k + 1, r, 0] * t - hd
    b = leaves[k, r, 1] * u + leaves[k + 1, r, 1] * t + hd
    x1 = jaws[k, 0] * u + jaws[k + 1, 0] * t
    x2 = jaws[k, 1] * u + jaws[k + 1, 1] * t
    y1 = jaws[k, 2] * u + jaws[k + 1, 2] * t
    y2 = jaws[k, 3] * u + jaws[k + 1, 3] * t
    return a, b, x1, x2, y1, y2, max(a, x1), min(b, x2)


@njit(cache=True, parallel=True, boundscheck=False)
def _delivered_kernel(leaves: NDArray[Any], jaws: NDArray[Any], mu: NDArray[Any], row_lo: NDArray[Any],
                      col: NDArray[Any], half_dlg: float, pixel: float, substeps: int, area: NDArray[Any],
                      fluence: NDArray[Any]) -> None:  # pragma: no cover - compiled
    """Open area ``area`` (n, R, C; zeros in) and fluence ``area x mu`` of every sector: only the columns an
    open interval touches are visited."""
    n, n_rows, n_cols = area.shape
    real = leaves.dtype.type
    width = col[1] - col[0]
    hd, w, norm = real(half_dlg), real(pixel), real(substeps * pixel * pixel)
    for k in prange(n):
        for r in range(n_rows):
            for s in range(substeps):
                t = (real(s) + real(0.5)) / real(substeps)
                _, _, _, _, y1, y2, lo, hi = _sub_position(leaves, jaws, k, r, t, real(1.0) - t, hd)
                oy = min(y2, row_lo[r] + w) - max(y1, row_lo[r])
                if oy <= 0.0 or hi <= lo:
                    continue
                rw = oy / norm
                # one column of slack each side against rounding; columns outside get 0 overlap
                c_lo = max(int(np.floor((lo - col[0]) / width)) - 1, 0)
                c_hi = min(int(np.floor((hi - col[0]) / width)) + 1, n_cols - 1)
                for c in range(c_lo, c_hi + 1):
                    ov = min(hi, col[c + 1]) - max(lo, col[c])
                    if ov > 0.0:
                        area[k, r, c] += rw * ov
            for c in range(n_cols):
                fluence[k, r, c] = area[k, r, c] * mu[k]


@njit(cache=True, parallel=True, boundscheck=False)
def _delivered_grad_kernel(grad: NDArray[Any], area: NDArray[Any], leaves: NDArray[Any], jaws: NDArray[Any],
                           mu: NDArray[Any], row_lo: NDArray[Any], col: NDArray[Any], half_dlg: float, pixel: float,
                           substeps: int, g_this: NDArray[Any], g_next: NDArray[Any],
                           g_mu: NDArray[Any]) -> None:  # pragma: no cover - compiled
    """Gradient of ``sum(grad x fluence)``: per sector, the part of its leaves' gradient at control point
    ``k`` (``g_this``) and ``k + 1`` (``g_next``), and its MU's (``g_mu``). A leaf edge moves the area of
    the one pixel that holds it (from above at a pixel edge); where the widened leaf edge and the jaw
    coincide, the leaf gets half (torch's rule for ``maximum`` and ``minimum``)."""
    n, n_rows, n_cols = area.shape
    real = leaves.dtype.type
    width = col[1] - col[0]
    hd, w, norm = real(half_dlg), real(pixel), real(substeps * pixel * pixel)
    half, one = real(0.5), real(1.0)
    for k in prange(n):
        acc = 0.0
        for r in range(n_rows):
            for c in range(n_cols):
                acc += grad[k, r, c] * area[k, r, c]
            for s in range(substeps):
                t = (real(s) + half) / real(substeps)
                u = one - t
                a, b, x1, x2, y1, y2, lo, hi = _sub_position(leaves, jaws, k, r, t, u, hd)
                if not hi > lo:
                    continue
                rw = max(min(y2, row_lo[r] + w) - max(y1, row_lo[r]), real(0.0)) / norm * mu[k]
                j = int(np.floor((lo - col[0]) / width))
                if 0 <= j < n_cols and a >= x1:
                    g = -grad[k, r, j] * rw * (half if a == x1 else one)
                    g_this[k, r, 0] += g * u
                    g_next[k, r, 0] += g * t
                j = int(np.floor((hi - col[0]) / width))
                if 0 <= j < n_cols and b <= x2:
                    g = grad[k, r, j] * rw * (half if b == x2 else one)
                    g_this[k, r, 1] += g * u
                    g_next[k, r, 1] += g * t
        g_mu[k] = acc


class _DeliveredFluence(torch.autograd.Function):
    """:func:`delivered_fluence_torch` on the CPU: the fluence and its gradient by numba kernels,
    without the ``(sectors, substeps, rows)`` temporaries of the torch form (a few milliseconds a step)."""

    @staticmethod
    def forward(ctx: Any, leaves: torch.Tensor, jaws: torch.Tensor, mu: torch.Tensor,  # type: ignore[override]
                beamlets: _Beamlets) -> torch.Tensor:
        lv, jw, sector_mu = (np.ascontiguousarray(x.detach().numpy()) for x in (leaves, jaws, mu))
        area = np.zeros((lv.shape[0] - 1, lv.shape[1], beamlets.col.shape[0] - 1), dtype=lv.dtype)
        fluence = np.empty_like(area)
        with kernel_threads():
            _delivered_kernel(lv, jw, sector_mu, beamlets.row_lo, beamlets.col, beamlets.half_dlg, beamlets.pixel_mm,
                              beamlets.substeps, area, fluence)
        ctx.arrays = (area, lv, jw, sector_mu)
        ctx.beamlets = beamlets
        return torch.from_numpy(fluence)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        area, leaves, jaws, mu = ctx.arrays
        b: _Beamlets = ctx.beamlets
        g = np.ascontiguousarray(grad.detach().numpy().astype(area.dtype, copy=False))
        g_this = np.zeros((area.shape[0], leaves.shape[1], 2), dtype=area.dtype)
        g_next = np.zeros_like(g_this)
        g_mu = np.zeros(area.shape[0], dtype=area.dtype)
        with kernel_threads():
            _delivered_grad_kernel(g, area, leaves, jaws, mu, b.row_lo, b.col, b.half_dlg, b.pixel_mm, b.substeps,
                                   g_this, g_next, g_mu)
        g_leaves = np.zeros_like(leaves)
        g_leaves[:-1] += g_this
        g_leaves[1:] += g_next
        return torch.from_numpy(g_leaves), None, torch.from_numpy(g_mu), None


def open_area(lo: torch.Tensor, hi: torch.Tensor, row_weight: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``sum_s row_weight[n, s, r] x |[lo, hi] ∩ [col_c, col_c+1]|``: the ``(n, R, C)`` open area of
    sub-positions ``s`` whose open interval along x is ``[lo, hi]`` (``(n, S, R)``, mm) and whose row
    weight is ``row_weight`` (the y overlap over the sub-positions' pixel areas). Plain torch (the
    reference of :class:`_OpenArea`'s gradient)."""
    ox = (torch.minimum(hi[..., None], col[1:]) - torch.maximum(lo[..., None], col[:-1])).clamp_min(0.0)
    return (row_weight[..., None] * ox).sum(dim=1)


class _OpenArea(torch.autograd.Function):
    """:func:`open_area` with its gradient by hand: ``d area[n, r, c] / d lo[n, s, r]`` is
    ``-row_weight`` for the one pixel ``c`` that contains ``lo`` (when the interval is open) and 0
    elsewhere, and likewise ``+row_weight`` for ``hi``; so the backward pass gathers one value per
    sub-position and row instead of differentiating the ``(n, S, R, C)`` overlaps. At a pixel edge it
    takes the derivative from above."""

    @staticmethod
    def forward(ctx: Any, lo: torch.Tensor, hi: torch.Tensor, row_weight: torch.Tensor,  # type: ignore[override]
                col: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(lo, hi, row_weight, col)
        with torch.no_grad():
            return open_area(lo, hi, row_weight, col)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        lo, hi, row_weight, col = ctx.saved_tensors
        n_cols = col.numel() - 1
        width = col[1] - col[0]
        g = grad[:, None].expand(-1, lo.shape[1], -1, -1)  # (n, S, R, C), a view

        def at(x: torch.Tensor) -> torch.Tensor:  # grad at the pixel holding x, 0 outside the columns
            j = torch.floor((x - col[0]) / width).to(torch.int64)
            inside = (j >= 0) & (j < n_cols) & (hi > lo)
            return g.gather(3, j.clamp(0, n_cols - 1)[..., None])[..., 0] * row_weight * inside

        return -at(lo), at(hi), None, None


@dataclass(frozen=True)
class _Limits:
    """The feasible set of the variables (see the module docstring); ``template`` holds the arc's
    leaf positions, whose pairs outside the BEV rows stay as they are."""

    machine: MachineModel
    delta_deg: float
    mu_headroom: float
    template: NDArray[np.float64]
    mu_cap_fraction: float = MU_CAP_FRACTION

    def project(self, leaves: NDArray[np.float64], mu: NDArray[np.float64]) -> tuple[NDArray[np.float64],
                                                                                      NDArray[np.float64]]:
        """The nearest-in-spirit feasible point: MU clipped, leaves in the field, gaps, then leaf travel."""
        m = self.machine
        mu = np.clip(mu, m.min_mu_per_deg * self.delta_deg, self.mu_cap_fraction * m.max_mu_per_deg * self.delta_deg)
        edge = m.bev.half_width_mm - 0.5 * m.dosimetric_leaf_gap_mm
        a = np.clip(leaves[..., 0], -edge, edge - m.min_leaf_gap_mm)
        b = np.clip(leaves[..., 1], -edge + m.min_leaf_gap_mm, edge)
        short = b - a < m.min_leaf_gap_mm
        ctr = np.clip(0.5 * (a + b), -edge + 0.5 * m.min_leaf_gap_mm, edge - 0.5 * m.min_leaf_gap_mm)
        a = np.where(short, ctr - 0.5 * m.min_leaf_gap_mm, a)
        b = np.where(short, ctr + 0.5 * m.min_leaf_gap_mm, b)
        limited = limit_leaf_travel(np.stack([a, b], axis=-1), mu, self.delta_deg, m, mu_headroom=self.mu_headroom)
        return limited, np.asarray(mu, dtype=np.float64)

    def full(self, bev_leaves: NDArray[np.float64]) -> NDArray[np.float64]:
        """All leaf pairs: the template's, with the BEV rows replaced."""
        first = self.machine.first_bev_leaf_pair
        leaves = np.array(self.template, dtype=np.float64, copy=True)
        leaves[:, first:first + self.machine.bev.n_rows, :] = bev_leaves
        return leaves

    def sequence(self, start: ArcSequence, bev_leaves: NDArray[np.float64],
                 mu: NDArray[np.float64]) -> ArcSequence:
        """``start`` with these BEV-row leaves, jaws fitted to them and these sector MU."""
        leaves = self.full(bev_leaves)
        return replace(start, leaves_mm=leaves, jaws_mm=fit_jaws(leaves, self.machine),
                       cumulative_mu=np.concatenate([[0.0], np.cumsum(mu)]))


def optimize_arc(
    start: ArcSequence,
    engine: Callable[[torch.Tensor], torch.Tensor],
    objective: Callable[[torch.Tensor], torch.Tensor],
    machine: MachineModel,
    arc: ArcSpec,
    *,
    settings: ArcOptimizerSettings | None = None,
    device: str | torch.device = "cpu",
    mu_reference: float | None = None,
    fluence_terms: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ArcOptimization:
    """Optimise the leaves and sector MU of a sequenced arc through the dose (see the module docstring).

    Parameters
    ----------
    start
        The sequencer's arc (its leaf pairs must match ``machine``).
    engine
        Differentiable dose engine ``fluence (n_sectors, rows, cols) MU -> dose`` (the reference
        engine or a restricted copy).
    objective
        ``dose -> loss`` (e.g. :class:`pipeline.optimizer.DoseObjective`), on the engine's grid.
    machine, arc
        Machine limits and the arc of ``start``.
    settings
        Steps, iterations, headroom; the defaults when ``None``.
    device
        Torch device of the fluence model (the engine's).
    mu_reference
        The MU that the MU term (``settings.mu_weight``) divides the arc's MU by; ``None``: the
        start's MU.
    fluence_terms
        Terms computed from the delivered fluence itself, added to the loss (e.g.
        :class:`LinearDoseTerms`: the mean dose of structures outside the restricted engine's region).

    Returns
    -------
    ArcOptimization
        The optimised arc (within every machine limit by construction), the losses and the time.
    """
    t0 = time.perf_counter()
    s = settings or ArcOptimizerSettings()
    n = arc.n_sectors
    if start.leaves_mm.shape != (n + 1, machine.n_leaf_pairs, 2):
        raise PlanningError(f"the arc to optimise has leaves of shape {start.leaves_mm.shape}; the machine and arc "
                            f"need ({n + 1}, {machine.n_leaf_pairs}, 2)")
    limits = _Limits(machine=machine, delta_deg=arc.span_deg() / n, mu_headroom=s.mu_headroom,
                     template=np.asarray(start.leaves_mm, dtype=np.float64))
    first, rows = machine.first_bev_leaf_pair, machine.bev.n_rows
    leaves_np, mu_np = limits.project(np.asarray(start.leaves_mm[:, first:first + rows, :], dtype=np.float64),
                                      np.asarray(start.segment_mu(), dtype=np.float64))
    mu_scale = float(mu_np.mean()) if mu_np.mean() > 0 else 1.0
    mu_ref = float(mu_reference) if mu_reference else float(mu_np.sum()) or 1.0
    dtype = torch.float32
    leaves = torch.tensor(leaves_np, dtype=dtype, device=device, requires_grad=True)
    mu_rel = torch.tensor(mu_np / mu_scale, dtype=dtype, device=device, requires_grad=True)
    jaws_np = fit_jaws(limits.full(leaves_np), machine)
    base_lr = (s.leaf_step_mm, s.mu_step)
    # round r holds the evaluations [starts[r], starts[r + 1]): as even as the count allows
    rounds = min(s.rounds, max(1, s.iterations))
    starts = [round(r * s.iterations / rounds) for r in range(rounds + 1)]

    def loss_of() -> torch.Tensor:
        jaws = torch.as_tensor(jaws_np, dtype=dtype, device=device)
        flu = delivered_fluence(leaves, jaws, mu_rel * mu_scale, machine, substeps=s.substeps)
        loss = objective(engine(flu))
        if fluence_terms is not None:
            loss = loss + fluence_terms(flu)
        if s.mu_weight > 0:
            loss = loss + s.mu_weight * torch.relu(mu_rel.sum() * (mu_scale / mu_ref) - s.mu_limit)
        return loss

    history: list[float] = []
    for r in range(rounds):
        # a warm restart: fresh moments, the full step decaying to a tenth over the round's evaluations
        opt = torch.optim.Adam([{"params": [leaves], "lr": s.leaf_step_mm}, {"params": [mu_rel], "lr": s.mu_step}])
        length = starts[r + 1] - starts[r]
        for step in range(length):
            decay = 1.0 - 0.9 * step / max(1, length - 1)
            for group, lr in zip(opt.param_groups, base_lr, strict=True):
                group["lr"] = lr * decay
            opt.zero_grad(set_to_none=True)
            loss = loss_of()
            loss.backward()  # type: ignore[no-untyped-call]
            value = float(loss.detach())
            if not np.isfinite(value):
                raise PlanningError(f"the arc optimisation diverged at evaluation {len(history) + 1} (loss {value})")
            history.append(value)
            opt.step()
            with torch.no_grad():
                leaves_np, mu_np = limits.project(leaves.detach().cpu().numpy().astype(np.float64),
                                                  mu_rel.detach().cpu().numpy().astype(np.float64) * mu_scale)
                leaves.copy_(torch.as_tensor(leaves_np, dtype=dtype))
                mu_rel.copy_(torch.as_tensor(mu_np / mu_scale, dtype=dtype))
            jaws_np = fit_jaws(limits.full(leaves_np), machine)
    with torch.no_grad():
        final = float(loss_of())
    first_loss = history[0] if history else final
    seq = limits.sequence(start, leaves_np, mu_np)
    seconds = time.perf_counter() - t0
    log.info("arc optimisation: %d evaluations in %d round(s), loss %.4g -> %.4g, %.0f -> %.0f MU in %.2f s",
             len(history), rounds, first_loss, final, start.total_mu, seq.total_mu, seconds)
    return ArcOptimization(sequence=seq, loss=(first_loss, final), iterations=len(history), seconds=seconds,
                           rounds=rounds)


def rescale_mu(seq: ArcSequence, factor: float, machine: MachineModel, arc: ArcSpec, *,
               mu_headroom: float) -> tuple[ArcSequence, bool]:
    """The arc with every MU scaled by ``factor`` (the MU normalisation), still within the leaf speed.

    Leaf travel was limited for ``1 - mu_headroom`` of the MU, so a factor at or above that keeps every
    leaf within its speed as it is. A smaller factor shortens MU-limited segments: the leaf travel of
    the BEV rows is then limited again for the new MU (with the same headroom) and the jaws refitted.
    A segment scaled past the machine's MU per degree is capped there. Returns the arc and whether
    it delivers other than ``factor`` times the input (leaves limited again or MU capped: its dose
    must then be computed again).
    """
    if not (np.isfinite(factor) and factor > 0):
        raise PlanningError(f"MU normalisation factor must be finite and > 0, got {factor}")
    delta_deg = arc.span_deg() / arc.n_sectors
    scaled = np.asarray(seq.segment_mu(), dtype=np.float64) * factor
    over_cap = bool((scaled > machine.max_mu_per_deg * delta_deg).any())
    if factor >= 1.0 - mu_headroom and not over_cap:
        return replace(seq, cumulative_mu=seq.cumulative_mu * factor), False
    limits = _Limits(machine=machine, delta_deg=delta_deg, mu_headroom=mu_headroom,
                     template=np.asarray(seq.leaves_mm, dtype=np.float64), mu_cap_fraction=1.0)
    first, rows = machine.first_bev_leaf_pair, machine.bev.n_rows
    old = np.asarray(seq.leaves_mm[:, first:first + rows, :], dtype=np.float64)
    leaves, mu = limits.project(old, scaled)
    if not np.abs(leaves - old).max() > 1e-9:
        # segments capped at the machine's MU per degree deliver less than scaled: dose again
        return replace(seq, cumulative_mu=np.concatenate([[0.0], np.cumsum(mu)])), over_cap
    return limits.sequence(seq, leaves, mu), True
