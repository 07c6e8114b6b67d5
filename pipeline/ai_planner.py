"""AIRT inference: CT + structures -> fluence maps of a single VMAT arc in one feed-forward pass.

The chain (paper section 5.2, Note S1)::

    CT + masks --DoseProposer--> D_prop --BEV--> B --Bev2Fluence--> F0 --FastDose--> D0
    D0 --Err (PTV hot/cold, OAR suppression s_o)--> E --BEV--> B_err
    [F0, B_err] --correction (Bev2Fluence, 2 channels)--> F

Everything runs on a coarse *network grid* (``meta.grid.net_grid_mm`` of the model folder, 8 mm
for the CPU model) built like the dose grid (``pipeline.dose_engine.dose_grid_for_case``). The
networks never produce the delivered dose: ``appliance.planning`` refines ``F`` near the target
(``pipeline.refine``, not in the paper; ``planning.ai_refine_iterations``), sequences it at the
threshold :func:`choose_aperture_threshold` picks and computes the final dose of the sequenced
plan with the reference engine.

Normalisation (recorded in ``model.json`` ``meta.normalisation``, applied identically by
``pipeline.training``): doses are in units of the per-fraction prescription (``D / Rx``), fluence
maps in units of ``fluence_mu_per_rx_gy * Rx`` MU per pixel, the BEV error projection is multiplied
by ``err_bev_scale``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from core.case import DEFAULT_HU_TO_DENSITY, Case, Grid, Role
from core.errors import ConfigError, InputError, PlanningError
from pipeline.dose_engine import DoseEngine
from pipeline.geometry import ArcGeometry
from pipeline.model_io import LoadedModel, load_model_folder
from pipeline.nets.err import ErrModule
from pipeline.nets.fast_dose import FastDoseConfig, PrimaryGeometry, primary_geometry_for_arc

if TYPE_CHECKING:
    from pipeline.plan import Timings

log = logging.getLogger(__name__)

#: Keys of the per-module timings, in the order of the paper's Table S4.
MODULE_KEYS: tuple[str, ...] = (
    "preprocessing", "DoseProposer", "BEV projection 1st pass", "Bev2Fluence", "DL dose", "Err",
    "BEV projection 2nd pass", "fluence correction", "total",
)
#: The networks a model folder must hold.
REQUIRED_NETWORKS: tuple[str, ...] = ("dose_proposer", "bev2fluence", "fast_dose", "correction")
#: A control point's map is scaled down when its maximum exceeds this multiple of the median
#: control-point maximum (the networks' rare spikes would exceed the machine's MU per degree
#: after sequencing and normalisation; the teacher plans' MU vary smoothly along the arc).
MAX_CP_TO_MEDIAN = 2.0
#: OARs with a suppression factor s_o.
SPARING_ROLES: tuple[Role, ...] = (Role.BLADDER, Role.RECTUM)


@dataclass(frozen=True)
class ModelSpec:
    """Grids and normalisation of a model (``model.json`` ``meta``), shared by training and inference.

    Parameters
    ----------
    net_grid_mm
        Isotropic spacing of the networks' grid, mm (> 0).
    bev_depth_samples
        Samples per divergent ray of the BEV projections (>= 2).
    fluence_mu_per_rx_gy
        Fluence unit: a network fluence of 1 is ``fluence_mu_per_rx_gy * Rx`` MU per pixel (Rx in Gy
        per fraction), > 0.
    err_bev_scale
        Factor on the BEV projection of the error map (dose in Rx units) fed to the correction, > 0.
    lambda_plus, lambda_minus
        Err PTV overdose/underdose weights (paper eq. 7-8).
    hu_to_density
        (HU, relative electron density) curve of the fast dose network's density channel.
    """

    net_grid_mm: float = 8.0
    bev_depth_samples: int = 32
    fluence_mu_per_rx_gy: float = 0.25
    err_bev_scale: float = 20.0
    lambda_plus: float = 2.0
    lambda_minus: float = 1.0
    hu_to_density: tuple[tuple[float, float], ...] = DEFAULT_HU_TO_DENSITY

    def __post_init__(self) -> None:
        if not (self.net_grid_mm > 0 and self.fluence_mu_per_rx_gy > 0 and self.err_bev_scale > 0):
            raise ConfigError(f"model spec needs positive net_grid_mm, fluence and error scales, got {self}")
        if self.bev_depth_samples < 2:
            raise ConfigError(f"model spec bev_depth_samples must be >= 2, got {self.bev_depth_samples}")

    def to_meta(self) -> dict[str, Any]:
        """The ``grid`` and ``normalisation`` objects of ``model.json``'s meta."""
        return {
            "grid": {"net_grid_mm": self.net_grid_mm, "bev_depth_samples": self.bev_depth_samples,
                     "bev": "40 x 40 pixels of 5 mm at the isocenter plane, 180 control points"},
            "normalisation": {
                "dose": "dose / Rx per fraction (dimensionless)",
                "fluence": "MU per pixel / (fluence_mu_per_rx_gy * Rx per fraction in Gy)",
                "fluence_mu_per_rx_gy": self.fluence_mu_per_rx_gy,
                "err_bev_scale": self.err_bev_scale,
                "ct": "proposer: HU clipped to [-900, 900] -> [0, 1]; fast dose: relative electron density",
            },
            "err": {"lambda_plus": self.lambda_plus, "lambda_minus": self.lambda_minus},
            "hu_to_density": [list(p) for p in self.hu_to_density],
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ModelSpec:
        """Read the spec back from ``model.json``'s meta (ConfigError when incomplete)."""
        try:
            g, n, e = meta["grid"], meta["normalisation"], meta["err"]
            return cls(
                net_grid_mm=float(g["net_grid_mm"]), bev_depth_samples=int(g["bev_depth_samples"]),
                fluence_mu_per_rx_gy=float(n["fluence_mu_per_rx_gy"]), err_bev_scale=float(n["err_bev_scale"]),
                lambda_plus=float(e["lambda_plus"]), lambda_minus=float(e["lambda_minus"]),
                hu_to_density=tuple((float(a), float(b)) for a, b in meta["hu_to_density"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"model meta lacks the grid/normalisation/err/hu_to_density description ({exc!r}); "
                "the model folder was not written by 'airt train'"
            ) from exc


@dataclass(eq=False)
class PreparedCase:
    """A case on the networks' grid: what every forward pass needs besides the fluence.

    Attributes
    ----------
    grid
        The network grid (isotropic ``net_grid_mm``).
    inputs
        DoseProposer inputs ``(1, 4, nz, ny, nx)``.
    masks
        Float {0, 1} masks ``(nz, ny, nx)`` by role value (``ptv`` always, ``bladder``/``rectum``
        when the case has them).
    projector
        BEV projector of the arc on ``grid``.
    primary
        Fast dose stage-1 geometry on ``grid``.
    """

    grid: Grid
    inputs: Tensor
    masks: dict[str, Tensor]
    projector: nn.Module
    primary: PrimaryGeometry


@dataclass(frozen=True, eq=False)
class NetworkCase:
    """A case resampled to the networks' grid: the part of :class:`PreparedCase` that needs the CT
    (and is small: tenths of a megabyte on the 8 mm grid).

    Attributes
    ----------
    grid
        The network grid (isotropic ``net_grid_mm``).
    inputs
        DoseProposer inputs ``(4, nz, ny, nx)``, float32.
    masks
        Masks ``(nz, ny, nx)`` (bool) by role value: ``ptv`` always, ``bladder``/``rectum`` when the
        case has them (non-empty).
    density
        Relative electron density ``(nz, ny, nx)``, float32 (the fast dose network's geometry).
    """

    grid: Grid
    inputs: NDArray[np.float32]
    masks: dict[str, NDArray[np.bool_]]
    density: NDArray[np.float32]


def network_case(case: Case, spec: ModelSpec) -> NetworkCase:
    """Resample a case to the network grid (CT, density, masks)."""
    from pipeline.dose_engine import case_density, resample_to_grid
    from pipeline.nets.dose_proposer import proposer_inputs

    if Role.PTV not in case.masks:
        raise InputError(f"case {case.case_id} has no PTV; the AI planner needs one")
    grid, hu, density, body = case_density(case, spec.net_grid_mm, spec.hu_to_density)
    masks_np = {role: resample_to_grid(m, case.grid, grid, order=1) >= 0.5
                for role, m in case.masks.items()}
    if not masks_np[Role.PTV].any():
        raise PlanningError(f"case {case.case_id}: the PTV vanished on the {spec.net_grid_mm} mm network grid")
    inputs = proposer_inputs(hu, body, masks_np[Role.PTV], masks_np.get(Role.BLADDER), masks_np.get(Role.RECTUM))
    masks = {role.value: np.asarray(masks_np[role], dtype=np.bool_)
             for role in (Role.PTV, *SPARING_ROLES) if role in masks_np and masks_np[role].any()}
    return NetworkCase(grid=grid, inputs=np.asarray(inputs, dtype=np.float32), masks=masks,
                       density=np.ascontiguousarray(density, dtype=np.float32))


def prepare_network_case(net: NetworkCase, geometry: ArcGeometry, spec: ModelSpec, fast_config: FastDoseConfig,
                         device: torch.device | str = "cpu") -> PreparedCase:
    """Set up the BEV projector and the fast-dose geometry of a case on the network grid."""
    from pipeline.bev import BevProjector

    dev = torch.device(device)
    masks = {k: torch.as_tensor(m, dtype=torch.float32, device=dev) for k, m in net.masks.items()}
    projector = BevProjector(net.grid, geometry, depth_samples=spec.bev_depth_samples, device=dev)
    primary = primary_geometry_for_arc(net.density, net.grid, geometry.arc, geometry.machine, geometry.isocenter_mm,
                                       geometry.position, fast_config).to(dev)
    return PreparedCase(net.grid, torch.as_tensor(net.inputs)[None].to(dev), masks, projector, primary)


def prepare_case(case: Case, geometry: ArcGeometry, spec: ModelSpec, fast_config: FastDoseConfig,
                 device: torch.device | str = "cpu") -> PreparedCase:
    """Resample a case to the network grid and set up its BEV projector and fast-dose geometry."""
    return prepare_network_case(network_case(case, spec), geometry, spec, fast_config, device)


@dataclass
class PipelineOutput:
    """Intermediate and final tensors of one forward pass (doses in Rx units, fluence normalised).

    ``dose_proposed`` and ``dose0`` are ``(B, 1, nz, ny, nx)``; ``fluence0`` and ``fluence`` are
    ``(B, n_cp, rows, cols)``; ``err0`` is the Err map of ``dose0``; ``b_err`` its scaled BEV.
    """

    dose_proposed: Tensor
    fluence0: Tensor
    dose0: Tensor
    err0: Tensor
    b_err: Tensor
    fluence: Tensor
    module_ms: dict[str, float] = field(default_factory=dict)


class AirtPipeline(nn.Module):
    """The AIRT chain as one module (its sub-networks are the model folder's networks).

    Parameters
    ----------
    proposer, bev2fluence, fast_dose, correction
        The four networks (``correction`` is a Bev2Fluence with 2 input channels).
    spec
        Grids and normalisation.
    """

    def __init__(self, proposer: nn.Module, bev2fluence: nn.Module, fast_dose: nn.Module,
                 correction: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.proposer = proposer
        self.bev2fluence = bev2fluence
        self.fast_dose = fast_dose
        self.correction = correction
        self.spec = spec
        self.err = ErrModule(spec.lambda_plus, spec.lambda_minus)

    def err_map(self, dose: Tensor, prep: PreparedCase, sparing: Mapping[str, float], dose0: Tensor) -> Tensor:
        """Err of a dose in Rx units (``rx = 1``), with OAR suppression relative to ``dose0`` (eq. 9-12)."""
        return self.err(dose, prep.masks, 1.0, {k: v for k, v in sparing.items() if k in prep.masks}, dose0)

    def forward(self, prep: PreparedCase, sparing: Mapping[str, float] | None = None, *,
                feedback: bool = True, sync: bool = False) -> PipelineOutput:
        """Run the chain on a prepared case.

        Parameters
        ----------
        prep
            The case on the network grid.
        sparing
            Suppression factor ``s_o`` in [0, 1) by OAR role value (``"bladder"``, ``"rectum"``).
        feedback
            False: skip Err and the correction (``fluence = fluence0``; the ablation "-DF").
        sync
            Synchronise the device around each module (accurate per-module timings on a GPU).
        """
        sparing = dict(sparing or {})
        ms: dict[str, float] = {}
        dev = prep.inputs.device

        @contextmanager
        def clock(name: str) -> Iterator[None]:
            if sync and dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            yield
            if sync and dev.type == "cuda":
                torch.cuda.synchronize(dev)
            ms[name] = ms.get(name, 0.0) + 1000.0 * (time.perf_counter() - t0)

        with clock("DoseProposer"):
            d_prop = self.proposer(prep.inputs)
        with clock("BEV projection 1st pass"):
            bev = prep.projector(d_prop[:, 0])
        with clock("Bev2Fluence"):
            f0 = self.bev2fluence(bev[:, None])[:, 0]
        with clock("DL dose"):
            d0 = self.fast_dose(f0, prep.primary)
        if not feedback:
            zero = torch.zeros_like(d0)
            return PipelineOutput(d_prop, f0, d0, zero, torch.zeros_like(f0), f0, ms)
        with clock("Err"):
            e0 = self.err_map(d0, prep, sparing, d0)
        with clock("BEV projection 2nd pass"):
            b_err = prep.projector(e0[:, 0]) * self.spec.err_bev_scale
        with clock("fluence correction"):
            f1 = self.correction(torch.stack([f0, b_err], dim=1))[:, 0]
        return PipelineOutput(d_prop, f0, d0, e0, b_err, f1, ms)


def pipeline_from_model(model: LoadedModel) -> AirtPipeline:
    """Assemble the chain from a loaded model folder (ConfigError when a network is missing)."""
    missing = [k for k in REQUIRED_NETWORKS if k not in model.networks]
    if missing:
        raise ConfigError(f"model folder {model.folder} lacks networks {missing}; retrain it with 'airt train'")
    net = model.networks
    return AirtPipeline(net["dose_proposer"], net["bev2fluence"], net["fast_dose"], net["correction"],
                        ModelSpec.from_meta(model.meta))


_LOADED: dict[tuple[str, float, str], AirtPipeline] = {}


def load_pipeline(model_dir: str | Path, device: torch.device | str = "cpu") -> AirtPipeline:
    """Load (once per folder, modification time and device) the pipeline of a model folder.

    ``model_dir`` empty means the shipped model (``pipeline.ai_model.SHIPPED_MODEL_DIR``).
    """
    from pipeline.ai_model import SHIPPED_MODEL_DIR

    folder = Path(model_dir) if str(model_dir) else SHIPPED_MODEL_DIR
    try:
        stamp = (folder / "model.json").stat().st_mtime
    except OSError:
        raise ConfigError(f"no trained model in {folder} (no model.json); train one with 'airt train'") from None
    key = (str(folder.resolve()), stamp, str(torch.device(device)))
    if key not in _LOADED:
        pipe = pipeline_from_model(load_model_folder(folder, device)).eval()
        _LOADED.clear()
        _LOADED[key] = pipe
    return _LOADED[key]


@dataclass(frozen=True)
class SequencingChoice:
    """The aperture threshold chosen for a predicted fluence, and what each try gave.

    Attributes
    ----------
    threshold
        The threshold the plan is sequenced at.
    sequence
        The sequenced arc at that threshold (MU before normalisation).
    tries
        Per tried threshold (in order): ``threshold``, ``ptv_D98_rel`` and ``ptv_HI`` of the
        reference dose normalised to PTV D95 = Rx, and ``accepted``.
    """

    threshold: float
    sequence: Any
    tries: list[dict[str, float | bool]]


def choose_aperture_threshold(
    fluence: NDArray[np.floating[Any]],
    arc: Any,
    machine: Any,
    engine: DoseEngine,
    ptv_mask: NDArray[Any],
    *,
    thresholds: tuple[float, ...],
    min_d98_rel: float,
    max_hi: float,
    mu_headroom: float = 0.0,
    ptv_engine: DoseEngine | None = None,
) -> SequencingChoice:
    """Sequence a network's fluence at the highest threshold whose plan still covers the PTV.

    The networks' maps are smoother than an optimised fluence: where the teacher plans open a
    leaf at one control point and close it at the next, a network predicts a partial value. The
    sequencer opens every pixel at or above ``threshold`` x the map maximum, so a low threshold
    widens the fields (more OAR dose, lower conformity) and a high one may cut target pixels
    (cold PTV) in some cases. Each threshold, in the order given (highest first), is sequenced,
    dosed with the reference ``engine`` (in the PTV only) and normalised to PTV D95 = Rx; the first whose PTV D98
    is at least ``min_d98_rel`` of Rx and whose HI is at most ``max_hi`` is taken, else the one
    with the highest D98. ``ptv_engine``: an engine whose dose in the PTV equals ``engine``'s (the
    refinement's restricted one), used instead of building a PTV-only copy of ``engine``.
    """
    import torch

    from pipeline.dvh import structure_metrics
    from pipeline.goals import normalisation_factor
    from sequencing.fluence import fluence_from_sequence
    from sequencing.sequencer import sequence_arc

    if not thresholds:
        raise ConfigError("no aperture thresholds to try; give at least one in (0, 1)")
    ptv = np.asarray(ptv_mask, dtype=np.float32)
    # only the PTV's dose is needed: a PTV-only engine is much faster
    engine = ptv_engine if ptv_engine is not None else engine.restricted(ptv > 0)
    tries: list[dict[str, float | bool]] = []
    best: tuple[float, float, Any] | None = None  # (D98, threshold, sequence)
    for t in thresholds:
        seq = sequence_arc(fluence, arc, machine, threshold=t, mu_headroom=mu_headroom)
        delivered = torch.as_tensor(fluence_from_sequence(seq, machine), dtype=torch.float32,
                                    device=engine.device)
        with torch.inference_mode():
            dose = engine(delivered).cpu().numpy()
        dose = dose * normalisation_factor(dose, ptv, rx_gy=1.0, mode="ptv_dx", volume_percent=95.0)
        m = structure_metrics(dose, ptv, 1.0, rx_gy=1.0)
        ok = bool(m["D98_Gy"] >= min_d98_rel and m["HI"] <= max_hi)
        tries.append({"threshold": t, "ptv_D98_rel": round(float(m["D98_Gy"]), 4), "ptv_HI": round(float(m["HI"]), 4),
                      "accepted": ok})
        if ok:
            return SequencingChoice(t, seq, tries)
        if best is None or m["D98_Gy"] > best[0]:
            best = (float(m["D98_Gy"]), t, seq)
    assert best is not None
    log.info("no aperture threshold met PTV D98 >= %.3f Rx and HI <= %.3f; using %.2f (D98 %.3f Rx)",
             min_d98_rel, max_hi, best[1], best[0])
    return SequencingChoice(best[1], best[2], tries)


def limit_control_point_spikes(fluence: Tensor, ratio: float = MAX_CP_TO_MEDIAN) -> Tensor:
    """Scale down the maps ``(n_cp, rows, cols)`` whose maximum exceeds ``ratio`` x the median map maximum."""
    peak = fluence.flatten(1).amax(dim=1)
    cap = ratio * peak.median()
    scale = torch.where(peak > cap, cap / peak.clamp_min(1e-12), torch.ones_like(peak))
    return fluence * scale[:, None, None]


def deliverability_guard(fluence: Tensor, prep: PreparedCase, smoothing_passes: int = 2) -> Tensor:
    """Post-process predicted maps ``(n_cp, rows, cols)`` towards what one aperture per sector delivers.

    Not in the paper (its adversarial loss does this job); needed by the briefly trained CPU
    model, whose maps carry background fluence outside the target and intensities alternating
    between neighbouring control points that the leaf sequencer turns into too many MU per
    degree. Three steps: keep only pixels whose ray crosses the PTV (dilated by one pixel, as
    the optimizer's free pixels), smooth along the arc with ``smoothing_passes`` passes of a
    [1, 2, 1] / 4 filter, and scale down spiking control points (:func:`limit_control_point_spikes`).
    """
    import torch.nn.functional as F

    aperture = (prep.projector(prep.masks[Role.PTV.value]) > 0).to(fluence.dtype)
    aperture = F.max_pool2d(aperture[:, None], 3, stride=1, padding=1)[:, 0]
    f = fluence * aperture
    for _ in range(smoothing_passes):
        padded = torch.cat([f[:1], f, f[-1:]])
        f = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    return limit_control_point_spikes(f)


def _sparing_values(sparing: Mapping[Role, float] | Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for role, s in sparing.items():
        value = Role(role).value
        if not 0.0 <= float(s) < 1.0:
            raise InputError(f"sparing factor for {value} must be in [0, 1), got {s}")
        out[value] = float(s)
    return out


def predict_fluence(
    case: Case,
    model_dir: str,
    *,
    geometry: ArcGeometry,
    rx_gy: float,
    sparing: Mapping[Role, float],
    device: torch.device | str = "cpu",
    timings: Timings | None = None,
    feedback: bool = True,
    postprocess: bool = True,
) -> tuple[NDArray[np.float32], dict[str, float]]:
    """Predict the arc's fluence maps of a case with the AIRT pipeline.

    Parameters
    ----------
    case
        The planning case (CT in HU, masks by role; a PTV is required).
    model_dir
        Model folder; ``""`` for the shipped model.
    geometry
        Arc, isocenter (PTV centroid), patient position and machine.
    rx_gy
        Prescription per fraction, Gy (> 0).
    sparing
        OAR suppression factor ``s_o`` in [0, 1) by role (bladder, rectum); 0 = the baseline plan.
    device
        Torch device to run on.
    timings
        Stage timings (``ai_load``, ``ai_preprocess``, ``ai_inference``) are added here when given.
    feedback
        False skips the dose-feedback correction (ablation).
    postprocess
        Apply :func:`deliverability_guard` (default; False returns the networks' maps as they are).

    Returns
    -------
    fluence, module_ms
        ``(n_sectors, rows, cols)`` float32 MU per pixel per fraction (>= 0), and the wall time
        of each module in milliseconds (keys :data:`MODULE_KEYS`).

    Raises
    ------
    ConfigError
        No usable model folder.
    PlanningError
        The networks produced no fluence (all zero or not finite).
    """
    if not rx_gy > 0:
        raise InputError(f"prescription per fraction must be > 0 Gy, got {rx_gy}")
    dev = torch.device(device)
    s_o = _sparing_values(sparing)

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        if timings is not None:
            with timings.stage(name):
                yield
        else:
            yield

    t_all = time.perf_counter()
    with torch.inference_mode():
        with stage("ai_load"):
            pipe = load_pipeline(model_dir, dev)
        t0 = time.perf_counter()
        with stage("ai_preprocess"):
            prep = prepare_case(case, geometry, pipe.spec, pipe.fast_dose.config, dev)  # type: ignore[arg-type]
        pre_ms = 1000.0 * (time.perf_counter() - t0)
        with stage("ai_inference"):
            out = pipe(prep, s_o, feedback=feedback, sync=True)
            fl = out.fluence[0].clamp_min(0.0)
            if postprocess:
                fl = deliverability_guard(fl, prep)
            fl = fl * (pipe.spec.fluence_mu_per_rx_gy * rx_gy)
            fluence = fl.float().cpu().numpy()
    module_ms = {"preprocessing": pre_ms, **out.module_ms}
    module_ms["total"] = 1000.0 * (time.perf_counter() - t_all)
    module_ms = {k: round(module_ms.get(k, 0.0), 3) for k in MODULE_KEYS}
    if not np.isfinite(fluence).all() or float(fluence.max()) <= 0.0:
        raise PlanningError(
            f"case {case.case_id}: the AI model produced no usable fluence (max {float(np.nanmax(fluence))}); "
            "use --method optimize or retrain the model"
        )
    log.info("case %s: AI fluence predicted in %.0f ms (%s), max %.2f MU per pixel", case.case_id,
             module_ms["total"], ", ".join(f"{k} {v:.0f}" for k, v in module_ms.items() if k != "total"),
             float(fluence.max()))
    return fluence.astype(np.float32), module_ms


def predict_candidates(
    case: Case,
    model_dir: str,
    *,
    geometry: ArcGeometry,
    rx_gy: float,
    sparings: list[Mapping[Role, float]],
    device: torch.device | str = "cpu",
) -> list[tuple[dict[str, float], NDArray[np.float32]]]:
    """Several candidate fluences of one case, one per sparing setting (preprocessing done once).

    Parameters
    ----------
    sparings
        Suppression factors per candidate, e.g. ``[{}, {Role.RECTUM: 0.3}, {Role.BLADDER: 0.3}]``.

    Returns
    -------
    list of (sparing by role value, fluence)
        Fluence ``(n_sectors, rows, cols)`` MU per pixel per fraction, in the order of ``sparings``.
    """
    if not rx_gy > 0:
        raise InputError(f"prescription per fraction must be > 0 Gy, got {rx_gy}")
    dev = torch.device(device)
    out: list[tuple[dict[str, float], NDArray[np.float32]]] = []
    with torch.inference_mode():
        pipe = load_pipeline(model_dir, dev)
        prep = prepare_case(case, geometry, pipe.spec, pipe.fast_dose.config, dev)  # type: ignore[arg-type]
        for sparing in sparings:
            s_o = _sparing_values(sparing)
            res = pipe(prep, s_o)
            fl = (deliverability_guard(res.fluence[0].clamp_min(0.0), prep)
                  * (pipe.spec.fluence_mu_per_rx_gy * rx_gy)).float().cpu().numpy()
            out.append((s_o, fl.astype(np.float32)))
    log.info("case %s: %d AI candidates predicted", case.case_id, len(out))
    return out
