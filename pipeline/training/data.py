"""Training data of the AIRT networks: planned cases, a compact cache of their leaf sequences, and samples.

What a training case is
-----------------------
A planning case (CT + masks) and a *sequenced* single-arc VMAT plan for it. The paper's targets
come from Eclipse-optimised plans; ours come from

* synthetic cases: ``pipeline.synth.synth_case(seed)`` planned by ``pipeline.optimizer.optimize_fluence``
  through the reference dose engine, sequenced by ``sequencing.sequencer.sequence_arc`` and
  MU-normalised so that PTV D95 equals the prescription (the appliance's default normalisation);
* clinical exports (CT + RTSTRUCT + RT Plan), read in ``appliance.cmd_train`` (DICOM lives there).

The *target fluence* is re-derived from the sequenced apertures by
``sequencing.fluence.fluence_from_sequence`` (two-level maps, like maps from TPS apertures) and the
*target dose* is the reference engine's dose of that fluence, on the networks' grid.

The cache
---------
Only what is expensive (the optimizer, tens of seconds a case) is cached: one compressed
``case_<seed>.npz`` per synthetic case holding the seed and the sequence: leaf positions of every
pair quantised to 0.1 mm as int16, jaws likewise, cumulative MU as float32 and the gantry angles as
float32 (about 10-20 kB a case). Anatomy, target fluence and target dose are regenerated from seed
and sequence. ``cache.json`` beside them records how the plans were made. Generation is resumable:
a case whose file exists is skipped; files are written atomically.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from core.case import DEFAULT_HU_TO_DENSITY
from core.errors import ConfigError, InputError
from core.machine import ArcSpec, ArcStart, MachineModel, RotationDirection
from sequencing.sequencer import ArcSequence

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_JSON = "cache.json"
#: Quantum of the cached leaf and jaw positions, mm.
POSITION_QUANTUM_MM = 0.1


# --------------------------------------------------------------------------- the sequence cache


def sequence_to_arrays(seq: ArcSequence) -> dict[str, NDArray[Any]]:
    """The compact arrays of a sequence (positions quantised to 0.1 mm as int16).

    Raises
    ------
    InputError
        A position beyond +-3276.7 mm (cannot be a leaf or jaw of any linac).
    """
    q = 1.0 / POSITION_QUANTUM_MM
    leaves = np.rint(seq.leaves_mm * q)
    jaws = np.rint(seq.jaws_mm * q)
    if np.abs(leaves).max() > 32767 or np.abs(jaws).max() > 32767:
        raise InputError("leaf or jaw positions beyond +-3276.7 mm cannot be cached; the sequence is corrupt")
    return {
        "gantry_deg": seq.gantry_deg.astype(np.float32),
        "leaves_01mm": leaves.astype(np.int16),
        "jaws_01mm": jaws.astype(np.int16),
        "cumulative_mu": seq.cumulative_mu.astype(np.float32),
        "collimator_deg": np.array(seq.collimator_deg, dtype=np.float64),
        "direction": np.array(str(seq.direction.value)),
    }


def sequence_from_arrays(arrays: Any) -> ArcSequence:
    """Rebuild an :class:`ArcSequence` from :func:`sequence_to_arrays`'s arrays (an ``npz`` works)."""
    try:
        return ArcSequence(
            gantry_deg=np.asarray(arrays["gantry_deg"], dtype=np.float64),
            leaves_mm=np.asarray(arrays["leaves_01mm"], dtype=np.float64) * POSITION_QUANTUM_MM,
            jaws_mm=np.asarray(arrays["jaws_01mm"], dtype=np.float64) * POSITION_QUANTUM_MM,
            cumulative_mu=np.asarray(arrays["cumulative_mu"], dtype=np.float64),
            collimator_deg=float(arrays["collimator_deg"]),
            direction=RotationDirection(str(arrays["direction"])),
        )
    except (KeyError, ValueError) as exc:
        raise InputError(f"cached sequence is incomplete or invalid: {exc}") from exc


def quantise_sequence(seq: ArcSequence) -> ArcSequence:
    """The sequence exactly as the cache stores it (what training targets are made from)."""
    return sequence_from_arrays(sequence_to_arrays(seq))


@dataclass(frozen=True)
class CachedPlan:
    """One cached synthetic plan.

    Attributes
    ----------
    seed
        The synthetic case seed (``synth_case(seed)`` regenerates the anatomy).
    sequence
        The MU-normalised sequenced arc (positions as quantised in the cache).
    info
        What the generator recorded (optimizer seconds, evaluations, PTV HI/D98 of the plan).
    """

    seed: int
    sequence: ArcSequence
    info: dict[str, float] = field(default_factory=dict)


def cache_path(cache_dir: str | Path, seed: int) -> Path:
    """The file of case ``seed`` in a cache folder."""
    return Path(cache_dir) / f"case_{seed:06d}.npz"


def save_cached_plan(cache_dir: str | Path, plan: CachedPlan) -> Path:
    """Write one case of the cache atomically (compressed npz); returns its path."""
    path = cache_path(cache_dir, plan.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    info = {f"info_{k}": np.float64(v) for k, v in plan.info.items()}
    np.savez_compressed(buf, seed=np.int64(plan.seed), **sequence_to_arrays(plan.sequence), **info)  # type: ignore[arg-type]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_cached_plan(path: str | Path) -> CachedPlan:
    """Read one cached case.

    Raises
    ------
    InputError
        The file is not a readable cache entry (truncated, or from another program).
    """
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            seq = sequence_from_arrays(z)
            info = {k[5:]: float(z[k]) for k in z.files if k.startswith("info_")}
            return CachedPlan(int(z["seed"]), seq, info)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read cached plan {path}: {exc}; delete it and run the generator again") from exc


def list_cache(cache_dir: str | Path) -> list[Path]:
    """The case files of a cache folder, sorted by seed."""
    return sorted(Path(cache_dir).glob("case_*.npz"))


def read_cache_description(cache_dir: str | Path) -> dict[str, Any]:
    """The generation settings recorded in ``cache.json`` (empty when absent)."""
    p = Path(cache_dir) / CACHE_JSON
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {p}: {exc}") from exc
    return dict(data) if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- planning synthetic cases


@dataclass(frozen=True)
class PlanningRecipe:
    """How synthetic training plans are made (recorded in ``cache.json`` and in ``model.json``).

    Parameters
    ----------
    spacing_mm
        Dose grid of the optimizer's reference engine, mm (4, as the appliance plans: a fluence
        optimised on a coarser grid leaves hot spots between its voxels, PTV HI 0.4 at 6 mm when
        recomputed at 4 mm).
    iterations
        Optimizer objective evaluations per case (30: PTV HI about 0.08 before and 0.09 after
        sequencing, about 25 s a case on 2 cores).
    case_spacing_mm
        Voxel size of the synthetic case (CT and masks), mm.
    normalisation_volume_percent
        MU are scaled so that the PTV dose covering this volume (D95) equals the prescription.
    aperture_threshold
        The leaf sequencer's aperture threshold (fraction of a row's maximum), as
        ``planning.aperture_threshold`` of the appliance.
    arc_iterations
        Machine-parameter optimisation evaluations of the sequenced arc (0: the sequencer's arc).
    """

    spacing_mm: float = 4.0
    iterations: int = 30
    case_spacing_mm: float = 4.0
    normalisation_volume_percent: float = 95.0
    aperture_threshold: float = 0.02
    arc_iterations: int = 0

    def describe(self) -> dict[str, Any]:
        """Plain-data description."""
        return {
            "planner": "pipeline.plan.plan_arc, method optimize: pipeline.optimizer.optimize_fluence (Adam) "
                       "through the reference dose engine, sequencing.sequencer.sequence_arc, machine-parameter "
                       "optimisation of the arc (pipeline.arc_optimizer), MU normalised to PTV "
                       f"D{self.normalisation_volume_percent:g} = Rx on the case grid",
            "optimizer_dose_grid_mm": self.spacing_mm,
            "optimizer_iterations": self.iterations,
            "case_spacing_mm": self.case_spacing_mm,
            "sequencer_aperture_threshold": self.aperture_threshold,
            "arc_optimizer_iterations": self.arc_iterations,
        }


def plan_synthetic_case(
    seed: int,
    *,
    machine: MachineModel,
    arc: ArcSpec,
    hu_curve: Sequence[tuple[float, float]] = DEFAULT_HU_TO_DENSITY,
    recipe: PlanningRecipe = PlanningRecipe(),
    device: torch.device | str = "cpu",
) -> CachedPlan:
    """Plan, sequence and MU-normalise synthetic case ``seed`` (the teacher plan of a training case).

    Returns
    -------
    CachedPlan
        With the sequence as the cache stores it (quantised) and ``info``: ``optimizer_s``,
        ``evaluations``, ``ptv_HI``, ``ptv_D98_rel`` (D98 / Rx of the exported arc's reference dose on
        the case grid).
    """
    from pipeline.arc_optimizer import ArcOptimizerSettings
    from pipeline.evaluation import evaluate_structures
    from pipeline.plan import FluenceSource, PlanningOptions, Timings, plan_arc
    from pipeline.synth import synth_case

    s = recipe.case_spacing_mm
    case = synth_case(seed, spacing_mm=(s, s, s))
    options = PlanningOptions(
        source=FluenceSource.OPTIMIZE, dose_grid_mm=recipe.spacing_mm, hu_curve=tuple(hu_curve),
        optimizer_iterations=recipe.iterations, sequencer_threshold=recipe.aperture_threshold,
        arc=ArcOptimizerSettings(iterations=recipe.arc_iterations), arc_start=ArcStart.RULE,
        normalisation_volume_percent=recipe.normalisation_volume_percent, device=str(device))
    timings = Timings()
    result = plan_arc(case, machine, arc, options, timings=timings)
    seq = result.sequence
    m = evaluate_structures(result.dose_fx * case.prescription.fractions, result.problem.grid, case)["ptv"]
    info = {"optimizer_s": float(timings.stages.get("optimize", float("nan"))),
            "evaluations": float(recipe.iterations), "ptv_HI": float(m["HI"]),
            "ptv_D98_rel": float(m["D98_Gy"]) / case.prescription.dose_gy}
    return CachedPlan(seed, quantise_sequence(seq), info)


def generate_cache(
    cache_dir: str | Path,
    seeds: Iterable[int],
    *,
    machine: MachineModel,
    arc: ArcSpec,
    hu_curve: Sequence[tuple[float, float]] = DEFAULT_HU_TO_DENSITY,
    recipe: PlanningRecipe = PlanningRecipe(),
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, int], None] | None = None,
) -> list[Path]:
    """Plan every seed not yet in the cache and store it (resumable).

    Parameters
    ----------
    cache_dir
        Cache folder (created). Its ``cache.json`` must agree with ``recipe`` when it exists:
        mixing recipes in one cache is refused.
    seeds
        Synthetic case seeds (>= 0).
    progress
        Called as ``progress(seed, done, total)`` after every case.

    Returns
    -------
    list of Path
        The case files of the requested seeds (existing and new).
    """
    out = Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    desc = {"format": CACHE_FORMAT, "machine": machine.name, "arc_sectors": arc.n_sectors,
            "collimator_deg": arc.collimator_deg, **recipe.describe()}
    existing = read_cache_description(out)
    if existing and {k: existing.get(k) for k in desc} != desc:
        raise ConfigError(
            f"cache {out} was made with other settings ({existing}); use another --out folder for {desc}"
        )
    if not existing:
        (out / CACHE_JSON).write_text(json.dumps(desc, indent=2) + "\n", encoding="utf-8")
    todo = [int(s) for s in seeds]
    paths: list[Path] = []
    for i, seed in enumerate(todo):
        path = cache_path(out, seed)
        if path.is_file():
            log.debug("cache: seed %d already cached", seed)
        else:
            t0 = time.perf_counter()
            plan = plan_synthetic_case(seed, machine=machine, arc=arc, hu_curve=hu_curve, recipe=recipe,
                                       device=device)
            save_cached_plan(out, plan)
            log.info("cache: seed %d planned in %.1f s (PTV HI %.3f, D98 %.3f Rx), %d/%d", seed,
                     time.perf_counter() - t0, plan.info["ptv_HI"], plan.info["ptv_D98_rel"], i + 1, len(todo))
        paths.append(path)
        if progress is not None:
            progress(seed, i + 1, len(todo))
    return paths


def parse_seed_range(text: str) -> list[int]:
    """``"A:B"`` (A inclusive, B exclusive), ``"A-B"`` (both inclusive) or ``"N"`` -> list of seeds."""
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            seeds = list(range(int(a), int(b)))
        elif "-" in text.strip("-"):
            a, b = text.split("-", 1)
            seeds = list(range(int(a), int(b) + 1))
        else:
            seeds = [int(text)]
    except ValueError:
        raise ConfigError(f"seed range {text!r} must look like A:B (B exclusive), A-B or N") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"seed range {text!r} is empty or negative")
    return seeds
