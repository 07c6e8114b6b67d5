"""The non-learned planning path: gradient optimisation of the arc's fluence maps through a dose engine.

The optimizer is the teacher that makes training plans and the fallback when no trained weights are
installed. It needs only a differentiable dose engine that is linear in fluence
(``pipeline.dose_engine.ReferenceDoseEngine`` or any ``torch.nn.Module`` with the same call
``engine(fluence (n_sectors, rows, cols) MU) -> dose (nz, ny, nx) Gy``).

Method
------
1. *Aperture.* The engine's adjoint applied to the PTV mask, ``A^T M_PTV``, gives for every BEV pixel
   the PTV dose per MU delivered through it (one backward pass, works for any linear engine). Pixels
   above ``aperture_threshold`` of their map's maximum form the PTV's beam's-eye-view aperture;
   the optimised pixels are that aperture dilated by ``aperture_margin_px`` pixels; all others stay 0.
2. *Start.* Constant fluence over the aperture, scaled so that the PTV mean dose equals Rx (one
   forward pass), unless ``init`` is given.
3. *Optimisation.* Adam (default) or L-BFGS on ``p`` with ``fluence = level * softplus(p)`` (fluence >= 0 everywhere),
   minimising a weighted sum of scale-free terms (``pipeline.objectives``): the paper's asymmetric
   PTV term (eq. 7, mean over the PTV, dose in units of Rx), cold- and hot-tail terms on the coldest
   and hottest voxels of the PTV, bladder/rectum mean dose and high-dose (hottest part of the organ) terms on the organ
   outside the PTV, a hinge on a dose ceiling falling off with distance from the PTV in the body
   (conformity, hot spots outside the PTV), a femoral-head ceiling, fluence smoothness (along leaf
   travel and between adjacent control points) and, in the last part of the run, a two-level term
   pulling each row towards one flat aperture (what the leaf sequencer can deliver). Every objective
   evaluation costs one engine forward and backward pass; ``time_limit_s`` bounds the wall time.

The dose unit is whatever the engine returns (Gy per fraction in the appliance); ``rx_gy`` must be in
the same unit. MU normalisation to the prescription happens after sequencing
(``pipeline.goals.normalisation_factor``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from core.errors import PlanningError
from pipeline import objectives as obj
from pipeline.dose_engine import DoseEngine, positions_in
from pipeline.goal_objective import GoalSetup, GoalTerm, goal_terms, normalisation_scale

log = logging.getLogger(__name__)

#: ``progress(iteration, iterations, loss)`` is called after every iteration (1-based).
ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class OptimizerWeights:
    """Weights and settings of the fluence optimizer's objective (all terms are scale-free).

    Parameters
    ----------
    lambda_plus, lambda_minus
        Overdose and underdose weights inside the PTV term (paper eq. 7; hot costs more than cold).
    ptv
        Weight of the PTV homogeneity term.
    cold_tail, cold_tail_fraction, cold_tail_level
        Weight of a squared hinge below ``cold_tail_level`` x Rx on the coldest ``cold_tail_fraction``
        of the PTV (drives D98 up).
    hot_tail, hot_tail_fraction, hot_tail_level
        Weight of a squared hinge above ``hot_tail_level`` x Rx on the hottest ``hot_tail_fraction`` of
        the PTV (drives D2 down, hence HI).
    oar_mean
        Weight of the mean dose (in units of Rx) of bladder and rectum outside the PTV.
    oar_high, oar_high_level, oar_high_fraction
        Weight of a squared hinge above ``oar_high_level`` x Rx on the hottest ``oar_high_fraction``
        of bladder and rectum outside the PTV.
    femur, femur_level
        Weight of a squared hinge above ``femur_level`` x Rx in the femoral heads.
    femur_mean, femur_mean_level
        Weight of a hinge on each femoral head's mean dose above ``femur_mean_level`` x Rx, in the arc
        optimisation (``pipeline.arc_optimizer.LinearDoseTerms``: its restricted engine does not reach
        the femoral heads).
    ring, ring_floor_fraction, ring_falloff_mm
        Weight of the conformity term: a squared hinge in the body outside the PTV above the ceiling
        ``Rx (floor + (1.05 - floor) exp(-r / falloff))``, r the distance from the PTV (mm).
    smooth
        Weight of the fluence smoothness term (squared finite differences, relative to the level).
    total_variation
        Weight of the total variation along leaf travel (favours flat open intervals).
    two_level
        Weight of the two-level (deliverability) term, ramped in linearly over the second half.
    learning_rate
        Adam step on the softplus parameter (dimensionless).
    aperture_threshold
        Fraction (0-1) of a map's maximum adjoint value above which a pixel belongs to the aperture.
    aperture_margin_px
        Dilation of the aperture (BEV pixels) defining the pixels that may carry fluence.
    """

    lambda_plus: float = 2.0
    lambda_minus: float = 1.0
    ptv: float = 100.0
    cold_tail: float = 200.0
    cold_tail_fraction: float = 0.05
    cold_tail_level: float = 0.98
    hot_tail: float = 200.0
    hot_tail_fraction: float = 0.05
    hot_tail_level: float = 1.03
    oar_mean: float = 0.5
    oar_high: float = 20.0
    oar_high_level: float = 0.85
    oar_high_fraction: float = 0.1
    femur: float = 10.0
    femur_level: float = 0.5
    femur_mean: float = 10.0
    femur_mean_level: float = 0.2
    ring: float = 20.0
    ring_floor_fraction: float = 0.25
    ring_falloff_mm: float = 15.0
    smooth: float = 0.05
    total_variation: float = 0.0
    two_level: float = 0.5
    learning_rate: float = 0.25
    aperture_threshold: float = 0.3
    aperture_margin_px: int = 1

    def __post_init__(self) -> None:
        for name in ("lambda_plus", "lambda_minus", "learning_rate"):
            if not getattr(self, name) > 0:
                raise PlanningError(f"optimizer weight {name} must be > 0, got {getattr(self, name)}")
        for name in ("ptv", "cold_tail", "hot_tail", "oar_mean", "oar_high", "femur", "femur_mean", "ring", "smooth",
                     "total_variation", "two_level", "aperture_margin_px"):
            if getattr(self, name) < 0:
                raise PlanningError(f"optimizer weight {name} must be >= 0, got {getattr(self, name)}")
        for name in ("cold_tail_fraction", "hot_tail_fraction", "oar_high_fraction", "aperture_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise PlanningError(f"optimizer setting {name} must be in (0, 1], got {getattr(self, name)}")


@dataclass
class OptimizationResult:
    """What the optimizer returns.

    Attributes
    ----------
    fluence
        Optimised fluence maps, MU per pixel, shape (n_sectors, rows, cols), float32, >= 0.
    dose
        Dose of ``fluence`` from the engine (engine units, Gy), shape (nz, ny, nx), float32.
    history
        Total loss after each iteration (dimensionless).
    seconds
        Wall time of the whole optimisation, s.
    terms
        The final value of each objective term (unweighted), for diagnostics.
    """

    fluence: NDArray[np.float32]
    dose: NDArray[np.float32]
    history: list[float]
    seconds: float
    terms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class CtPoints:
    """A structure's CT voxels as interpolated points of the dose grid (:meth:`DoseObjective.on_voxels`):
    all of them for the PTV, those near the target for an organ.

    Attributes
    ----------
    index
        ``(P, 8)`` flat dose-grid indices of each voxel's trilinear neighbours (int64).
    weights
        ``(P, 8)`` their weights (0 for a neighbour off the grid).
    voxel_cc
        Volume of a CT voxel, cm3 (the goals in cm3 count these voxels).
    total
        The whole structure's CT voxels (those not among the points count as below every limit).
    in_ptv
        ``(P,)`` bool: the voxel is also a PTV voxel (an organ's own terms leave those out, its goals not).
    """

    index: torch.Tensor
    weights: torch.Tensor
    voxel_cc: float
    total: int
    in_ptv: torch.Tensor

    def support(self, shape: tuple[int, int, int]) -> NDArray[np.bool_]:
        """The dose-grid voxels the points read (bool of ``shape``)."""
        flat = np.zeros(int(np.prod(shape)), dtype=bool)
        flat[self.index[self.weights > 0].cpu().numpy()] = True
        return flat.reshape(shape)


class PointInterpolation:
    """The dose at interpolated points of a dose vector (:meth:`DoseObjective.on_voxels`) as a sparse matrix
    ``S`` (points x vector entries, 8 entries a row: the trilinear neighbours and their weights), applied
    with its precomputed transpose as the gradient: a step then multiplies two CSR matrices by vectors
    (under a millisecond for 80,000 CT voxels on 2 cores) instead of gathering ``(P, 8)`` neighbours and
    scattering their gradients back, which took several.

    Parameters
    ----------
    positions
        ``(P, 8)`` positions in the dose vector of each point's neighbours (int64).
    weights
        ``(P, 8)`` their weights.
    n
        Length of the dose vector.
    """

    def __init__(self, positions: torch.Tensor, weights: torch.Tensor, n: int) -> None:
        p = positions.shape[0]
        rows = torch.arange(p, device=positions.device).repeat_interleave(positions.shape[1])
        cols, values = positions.reshape(-1), weights.reshape(-1)
        with warnings.catch_warnings():  # torch calls its CSR layout beta; matrix-vector products are all we use
            warnings.simplefilter("ignore", UserWarning)
            self.matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (p, n)).coalesce().to_sparse_csr()
            self.transpose = torch.sparse_coo_tensor(torch.stack([cols, rows]), values,
                                                     (n, p)).coalesce().to_sparse_csr()

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """``S @ vector``: the ``(P,)`` point values; differentiable in ``vector``."""
        out: torch.Tensor = _SparseApply.apply(vector, self)
        return out


class _SparseApply(torch.autograd.Function):
    """``S @ v`` with the gradient ``S^T @ g`` from the precomputed transpose."""

    @staticmethod
    def forward(ctx: Any, vector: torch.Tensor, interp: PointInterpolation) -> torch.Tensor:  # type: ignore[override]
        ctx.interp = interp
        return torch.mv(interp.matrix, vector.detach())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return torch.mv(ctx.interp.transpose, grad.contiguous()), None


@dataclass(frozen=True, eq=False)
class DoseObjective:
    """The dose terms of the planning objective for one case (see the module docstring, step 3).

    Shared by the fluence optimizer and the arc's machine-parameter optimisation, so that both
    minimise the same thing. Built by :func:`build_dose_objective`; :meth:`terms` gives each term
    (unweighted, scale-free) and its weight, :meth:`__call__` their weighted sum.
    """

    weights: OptimizerWeights
    rx_gy: float
    ptv: torch.Tensor
    region: torch.Tensor
    ceiling: torch.Tensor
    oars: dict[str, torch.Tensor]
    femurs: tuple[torch.Tensor, ...]
    goals: tuple[GoalTerm, ...] = ()
    normalisation_percent: float | None = None
    #: Extra dose entries the terms read, interpolated from the dose vector; see :meth:`on_voxels`.
    points: PointInterpolation | None = None
    #: Flat indices of the voxels of each structure the terms read (``"ptv"``, ``"region"``, organs by role
    #: value, ``"femur_<i>"``), precomputed by :meth:`_with_indices` (:func:`build_dose_objective` and
    #: :meth:`on_voxels` return objectives with them) so a step gathers them without boolean masks.
    indices: dict[str, torch.Tensor] | None = None

    def terms(self, dose: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Each dose term of ``dose`` (engine units) and its weight.

        Every structure's doses are gathered once by its precomputed flat indices (:meth:`_with_indices`)
        and each term reads only those: the masks are binary, so this is the masked mean of every term
        without a pass over the whole dose vector per term."""
        if self.indices is None:
            return self._with_indices().terms(dose)
        if self.points is not None:
            dose = torch.cat([dose, self.points(dose)])
        flat = dose.reshape(-1)
        gathered: dict[int, torch.Tensor] = {}

        def at(index: torch.Tensor) -> torch.Tensor:  # one gather per index tensor, shared by its terms
            if id(index) not in gathered:
                gathered[id(index)] = flat.index_select(0, index)
            return gathered[id(index)]

        idx = self.indices
        w, rx = self.weights, self.rx_gy
        ptv = at(idx["ptv"])
        t = {
            "ptv": obj.homogeneity_of(ptv, rx, w.lambda_plus, w.lambda_minus),
            "cold_tail": obj.lower_tail_of(ptv, w.cold_tail_level * rx, w.cold_tail_fraction, rx),
            "hot_tail": obj.upper_tail_of(ptv, w.hot_tail_level * rx, w.hot_tail_fraction, rx),
            "ring": obj.hinge_mean_of(at(idx["region"]), self.ceiling.reshape(-1).index_select(0, idx["region"]), rx),
        }
        k = {"ptv": w.ptv, "cold_tail": w.cold_tail, "hot_tail": w.hot_tail, "ring": w.ring}
        for r in self.oars:
            values = at(idx[r])
            t[f"{r}_mean"], k[f"{r}_mean"] = obj.mean_of(values) / rx, w.oar_mean
            t[f"{r}_high"] = obj.upper_tail_of(values, w.oar_high_level * rx, w.oar_high_fraction, rx)
            k[f"{r}_high"] = w.oar_high
        for i in range(len(self.femurs)):
            t[f"femur_{i}"] = obj.hinge_mean_of(at(idx[f"femur_{i}"]), w.femur_level * rx, rx)
            k[f"femur_{i}"] = w.femur
        if self.goals:
            # the goals hold for the exported plan, i.e. after the MU normalisation
            scale = (None if self.normalisation_percent is None
                     else normalisation_scale(ptv, rx, self.normalisation_percent))
            for g in self.goals:
                assert g.index is not None
                values = at(g.index)
                t[g.name], k[g.name] = g.value_of(values if scale is None else values * scale, rx), g.weight
        return t, k

    def _with_indices(self) -> DoseObjective:
        """This objective with the flat voxel indices of its structures (``ptv``, ``region``, organs by role
        value, ``femur_<i>``) and goals precomputed; a goal on a structure's voxels shares its index
        tensor, so :meth:`terms` gathers those doses once."""
        def where(m: torch.Tensor) -> torch.Tensor:
            return torch.nonzero((m > 0.5).reshape(-1)).reshape(-1)

        indices = {"ptv": where(self.ptv), "region": where(self.region), **{r: where(m) for r, m in self.oars.items()},
                   **{f"femur_{i}": where(m) for i, m in enumerate(self.femurs)}}
        goals = []
        for g in self.goals:
            own = g.with_index()
            assert own.index is not None
            same = next((i for i in indices.values() if torch.equal(i, own.index)), None)
            goals.append(own if same is None else replace(own, index=same))
        return replace(self, indices=indices, goals=tuple(goals))

    def on_voxels(self, index: torch.Tensor, points: Mapping[str, CtPoints] | None = None) -> DoseObjective:
        """This objective of a dose given as a vector over the voxels ``index`` (flat indices on the dose
        grid, e.g. :class:`pipeline.dose_engine.RegionDose`). Every voxel the objective reads (its masks,
        cut to the region it was built for) must be in ``index``; a step then costs the region's voxels,
        not the grid's.

        Without ``points`` its value is this objective's of the grid dose that equals the vector there.
        With them (by role value: ``ptv``, organs), each such structure is its CT voxels instead of its
        dose-grid voxels: its terms and goals (and, for the PTV, the normalisation the goals see) read the
        dose interpolated at those voxels exactly as the plan's evaluation does
        (:func:`pipeline.evaluation.ct_voxel_stencil`). The dose grid's 4 mm masks lose the thin ends of a
        PTV and the edges of the rectum next to it, where the evaluated D98 and V36Gy are decided.
        """
        def take(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1)[index.to(t.device)]

        masks = [self.ptv, self.region, *self.oars.values(), *self.femurs, *(g.mask for g in self.goals)]
        if any(int(torch.count_nonzero(m)) != int(torch.count_nonzero(take(m))) for m in masks):
            raise PlanningError("the objective reads voxels outside the given ones; build it with that region")
        points = dict(points or {})
        n = index.numel()
        starts: dict[str, int] = {}
        total = n
        for name, pt in points.items():  # the vector: the voxels, then each structure's points
            starts[name] = total
            total += int(pt.index.shape[0])
        dtype, dev = self.ptv.dtype, self.ptv.device

        def grid_part(t: torch.Tensor) -> torch.Tensor:  # 0 at every point
            part = take(t)
            return torch.cat([part, part.new_zeros(total - n)])

        def own(name: str, keep: torch.Tensor | None = None) -> torch.Tensor:  # 1 at the structure's points
            m = torch.zeros(total, dtype=dtype, device=dev)
            m[starts[name]:starts[name] + points[name].index.shape[0]] = 1.0 if keep is None else keep.to(dtype)
            return m

        pos, weights = [], []
        for name, pt in points.items():
            p, found = positions_in(index, pt.index.reshape(-1))
            if bool((~found.reshape(pt.index.shape))[pt.weights > 0].any()):
                raise PlanningError(f"the {name}'s CT voxels interpolate from dose voxels outside the given ones; "
                                    "add their neighbours to the region")
            pos.append(p.reshape(pt.index.shape))
            weights.append(pt.weights.to(dtype))
        goals = tuple(replace(g, mask=own(g.goal.structure).to(torch.bool), total_voxels=points[g.goal.structure].total,
                              voxel_cc=points[g.goal.structure].voxel_cc)
                      if g.goal.structure in points else replace(g, mask=grid_part(g.mask)) for g in self.goals)
        oars = {r: own(r, ~points[r].in_ptv) if r in points else grid_part(m) for r, m in self.oars.items()}
        return replace(self, ptv=own("ptv") if "ptv" in points else grid_part(self.ptv), region=grid_part(self.region),
                       ceiling=grid_part(self.ceiling), oars={r: m for r, m in oars.items() if float(m.sum()) > 0},
                       femurs=tuple(grid_part(m) for m in self.femurs), goals=goals,
                       points=PointInterpolation(torch.cat(pos), torch.cat(weights), n) if points else None
                       )._with_indices()

    def __call__(self, dose: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the dose terms (dimensionless)."""
        t, k = self.terms(dose)
        return sum((k[name] * value for name, value in t.items()), dose.new_zeros(()))


def build_dose_objective(masks_on_dose_grid: Mapping[Any, torch.Tensor], *, rx_gy: float,
                         spacing_mm: tuple[float, float, float],
                         weights: OptimizerWeights | None = None, goals: GoalSetup | None = None,
                         region: torch.Tensor | None = None) -> DoseObjective:
    """The dose terms of the planning objective on a case's masks (``ptv`` required; bladder, rectum,
    body and femoral heads used when present), for doses in the unit of ``rx_gy`` (per fraction).

    ``goals``: the clinical goals to add as terms (:mod:`pipeline.goal_objective`). ``region``: the
    voxels the engine computes when it is a restricted one (bool on the dose grid); the masks are
    cut to it, and the goals count the whole structures' volumes."""
    w = weights or OptimizerWeights()
    whole = masks_on_dose_grid
    if region is not None:
        keep = region.to(torch.bool)
        masks_on_dose_grid = {r: m.to(torch.bool) & keep.to(m.device) for r, m in whole.items()}
    if "ptv" not in masks_on_dose_grid:
        raise PlanningError("the planning objective needs a PTV mask on the dose grid")
    ptv_b = masks_on_dose_grid["ptv"]
    device, dtype = ptv_b.device, torch.float32
    ptv = ptv_b.to(dtype)
    outside = 1.0 - (ptv > 0.5).to(dtype)

    def mask(role: str) -> torch.Tensor | None:
        m = masks_on_dose_grid.get(role)
        if m is None or not bool(m.any()):
            return None
        return m.to(device=device, dtype=dtype)

    oars = {r: m * outside for r in ("bladder", "rectum") if (m := mask(r)) is not None}
    body = mask("body")
    ceiling = torch.as_tensor(
        obj.falloff_reference((ptv > 0.5).cpu().numpy(), spacing_mm, rx_gy,
                              floor_fraction=w.ring_floor_fraction, falloff_mm=w.ring_falloff_mm),
        device=device,
    )
    return DoseObjective(
        weights=w, rx_gy=float(rx_gy), ptv=ptv,
        region=(body if body is not None else torch.ones_like(ptv)) * outside, ceiling=ceiling,
        oars={r: m for r, m in oars.items() if float(m.sum()) > 0},
        femurs=tuple(m for r in ("femur_head_l", "femur_head_r") if (m := mask(r)) is not None),
        goals=() if goals is None else goal_terms(
            goals.goals, {str(r): m for r, m in whole.items()}, fractions=goals.fractions,
            voxel_cc=goals.voxel_cc, weights=goals.weights, boost=goals.boost, region=region),
        normalisation_percent=None if goals is None else goals.normalisation_percent,
    )._with_indices()


def _dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Binary dilation of (n, rows, cols) maps by ``px`` pixels in the map plane (square element)."""
    if px <= 0:
        return mask
    m = mask.to(torch.float32).unsqueeze(1)
    m = torch.nn.functional.max_pool2d(m, kernel_size=2 * px + 1, stride=1, padding=px)
    return m.squeeze(1) > 0.5


def ptv_aperture(engine: DoseEngine, ptv: torch.Tensor,
                 shape: tuple[int, int, int], *, threshold: float, device: torch.device,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The PTV's BEV aperture from the engine's adjoint (:meth:`DoseEngine.adjoint`).

    Returns ``(aperture, adjoint)``: a boolean (n_sectors, rows, cols) map of pixels whose PTV dose
    per MU is at least ``threshold`` of their map's maximum, and ``A^T M_PTV`` itself (Gy/MU summed
    over PTV voxels).
    """
    adj = engine.adjoint(ptv).to(device=device, dtype=dtype)
    if tuple(adj.shape) != tuple(shape):
        raise PlanningError(f"the engine takes fluence of shape {tuple(adj.shape)}, not {tuple(shape)}")
    peak = adj.amax(dim=(1, 2), keepdim=True)
    if not bool((peak > 0).all()):
        raise PlanningError(
            "some control points deliver no dose to the PTV through any BEV pixel; check the "
            "isocenter (PTV centroid) and that the PTV lies inside the dose grid"
        )
    return adj >= threshold * peak, adj


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    y = y.clamp_min(1e-6)
    return torch.where(y > 20, y, torch.log(torch.expm1(y)))


def optimize_fluence(
    engine: DoseEngine,
    masks_on_dose_grid: Mapping[Any, torch.Tensor],
    *,
    rx_gy: float,
    iterations: int = 150,
    init: torch.Tensor | None = None,
    weights: OptimizerWeights | None = None,
    progress: ProgressFn | None = None,
    method: str = "adam",
    time_limit_s: float | None = None,
    goals: GoalSetup | None = None,
    region: torch.Tensor | None = None,
) -> OptimizationResult:
    """Optimise the arc's fluence maps for a homogeneous PTV dose with OAR sparing.

    Parameters
    ----------
    engine
        Differentiable dose engine, linear in fluence (:class:`pipeline.dose_engine.DoseEngine`). The
        fluence shape is taken from ``init``, else ``engine.fluence_shape``; ``engine.grid.spacing_mm``
        scales the conformity fall-off.
    masks_on_dose_grid
        Boolean (or 0-1 weight) masks on the engine's dose grid by role (``core.case.Role`` or its
        string value): ``ptv`` required; ``bladder``, ``rectum``, ``body``, ``femur_head_l/r`` used
        when present.
    rx_gy
        Prescribed dose in the engine's dose unit (Gy per fraction for the appliance), > 0.
    iterations
        Objective evaluations (>= 1); each costs one forward and one backward pass of the engine.
    init
        Starting fluence (n_sectors, rows, cols) MU; default: flat over the PTV aperture at PTV mean = Rx.
    weights
        Objective weights and settings; :class:`OptimizerWeights` defaults when ``None``.
    progress
        Called as ``progress(evaluation, iterations, loss)`` after every evaluation.
    method
        ``"adam"`` (Adam, two-level term ramped in over the second half; the default: it reached lower
        losses than L-BFGS on the toy problem from 30 evaluations on) or ``"lbfgs"`` (L-BFGS with a
        strong-Wolfe line search: two thirds of the evaluations on the dose terms, one third with the
        two-level term added).
    time_limit_s
        Stop after the evaluation that passes this wall time (s, counted from the call); ``None``: no limit.
    goals
        Clinical goals added to the objective as terms (:mod:`pipeline.goal_objective`).
    region
        The voxels ``engine`` computes when it is restricted (bool on the dose grid): the masks are
        cut to it and the goals count the whole structures (see :func:`build_dose_objective`).

    Returns
    -------
    OptimizationResult
        Fluence (MU, >= 0, zero outside the dilated PTV aperture), its dose, the loss history,
        the wall time and the final terms.
    """
    t0 = time.perf_counter()
    w = weights or OptimizerWeights()
    if not rx_gy > 0:
        raise PlanningError(f"prescription must be > 0 Gy, got {rx_gy}")
    if iterations < 1:
        raise PlanningError(f"optimizer iterations must be >= 1, got {iterations}")
    if "ptv" not in masks_on_dose_grid:
        raise PlanningError("the optimizer needs a PTV mask on the dose grid")
    ptv_b = masks_on_dose_grid["ptv"]
    device = ptv_b.device
    dtype = torch.float32
    ptv = ptv_b.to(dtype)
    if float(ptv.sum()) <= 0:
        raise PlanningError("the PTV mask is empty on the dose grid; use a finer planning.dose_grid_mm")
    shape = tuple(int(v) for v in (init.shape if init is not None else engine.fluence_shape))
    if len(shape) != 3:
        raise PlanningError(f"init fluence must be (n_sectors, rows, cols), got shape {shape}")
    dose_terms = build_dose_objective(masks_on_dose_grid, rx_gy=rx_gy, spacing_mm=engine.grid.spacing_mm, weights=w,
                                      goals=goals, region=region)

    aperture, _ = ptv_aperture(engine, ptv, shape, threshold=w.aperture_threshold, device=device, dtype=dtype)
    free = _dilate(aperture, w.aperture_margin_px).to(dtype)

    with torch.no_grad():
        if init is None:
            start = aperture.to(dtype)
            d1 = engine(start)
            mean_ptv = float((d1 * ptv).sum() / ptv.sum())
            if not mean_ptv > 0:
                raise PlanningError("an open PTV aperture gives no PTV dose; check the engine and the masks")
            start = start * (rx_gy / mean_ptv)
        else:
            start = init.to(device=device, dtype=dtype).clamp_min(0.0) * free
        level = float(start[start > 0].mean()) if bool((start > 0).any()) else 1.0
        rel = start / level
        rel = torch.where(free > 0, rel.clamp_min(0.05), rel)
        p0 = _inv_softplus(rel)
    param = p0.clone().requires_grad_(True)
    history: list[float] = []
    terms: dict[str, torch.Tensor] = {}
    log.info("optimizer: %s, %d evaluations, %d of %d pixels free, level %.3g MU, rx %.3g Gy",
             method, iterations, int(free.sum()), free.numel(), level, rx_gy)

    def fluence_of(p: torch.Tensor) -> torch.Tensor:
        return level * torch.nn.functional.softplus(p) * free

    def objective(p: torch.Tensor, two_level_weight: float) -> torch.Tensor:
        """Total loss of the parameters; one engine forward. Updates ``terms``."""
        nonlocal terms
        flu = fluence_of(p)
        t, k = dose_terms.terms(engine(flu))
        t["smooth"], k["smooth"] = obj.smoothness_term(flu, level), w.smooth
        if w.total_variation > 0:
            t["tv"], k["tv"] = obj.total_variation_term(flu, level), w.total_variation
        if two_level_weight > 0:
            t["two_level"], k["two_level"] = obj.two_level_term(flu), two_level_weight
        terms = t
        return sum((k[name] * value for name, value in t.items()), flu.new_zeros(()))

    def record(lv: float) -> bool:
        """Store a loss; False when the time limit is reached."""
        if not math.isfinite(lv):
            raise PlanningError(
                f"the fluence optimizer diverged at evaluation {len(history) + 1} (loss {lv}); "
                "lower the learning rate"
            )
        history.append(lv)
        if progress is not None:
            progress(len(history), iterations, lv)
        return time_limit_s is None or time.perf_counter() - t0 < time_limit_s

    if method == "adam":
        opt = torch.optim.Adam([param], lr=w.learning_rate)
        for it in range(iterations):
            opt.zero_grad(set_to_none=True)
            ramp = max(0.0, (it + 1 - 0.5 * iterations) / (0.5 * iterations))
            loss = objective(param, w.two_level * ramp)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if not record(float(loss.detach())):
                break
    elif method == "lbfgs":
        # Two stationary phases (L-BFGS needs a fixed objective): dose terms, then the two-level term.
        phases = [(iterations - iterations // 3, 0.0), (iterations // 3, w.two_level)]
        stop = False
        for n_eval, tl in phases:
            if n_eval <= 0 or stop:
                continue
            lbfgs = torch.optim.LBFGS([param], lr=1.0, max_iter=n_eval, max_eval=n_eval, history_size=20,
                                      tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

            def closure(tl: float = tl) -> torch.Tensor:
                nonlocal stop
                param.grad = None
                loss = objective(param, tl)
                loss.backward()  # type: ignore[no-untyped-call]
                if not record(float(loss.detach())):
                    stop = True
                return loss

            lbfgs.step(closure)  # type: ignore[no-untyped-call]
    else:
        raise PlanningError(f"optimizer method {method!r}: allowed 'adam', 'lbfgs'")

    with torch.no_grad():
        flu = fluence_of(param)
        dose = engine(flu)
    seconds = time.perf_counter() - t0
    log.info("optimizer: loss %.4g -> %.4g in %.1f s", history[0], history[-1], seconds)
    return OptimizationResult(
        fluence=flu.detach().cpu().numpy().astype(np.float32),
        dose=dose.detach().cpu().numpy().astype(np.float32),
        history=history,
        seconds=seconds,
        terms={k: float(v.detach()) for k, v in terms.items()},
    )
