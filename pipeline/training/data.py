"""Training data of the AIRT networks: teacher plans, a compact cache of their arcs, and samples.

What a training case is
-----------------------
A planning case (CT + masks) and a *sequenced* single-arc VMAT plan for it. The paper's targets
come from Eclipse-optimised plans; ours come from

* teacher cases (:func:`teacher_case`): ``pipeline.synth``'s anatomy of a seed with the paper's
  augmentations (scaling, rotation, non-rigid deformation, PTV and rectum margins), wide anatomy
  variety on half of them (bladder filling, rectal gas and calibre, body size, femoral heads:
  :func:`pipeline.synth.draw_variety_params`), on a CT geometry drawn from :data:`TEACHER_CTS`
  (matrix, pixel, slice, head- or feet-first), planned by the appliance's full planner
  (:func:`pipeline.plan.plan_arc`, method optimize, with the profile's goals, the machine-parameter
  optimisation and the rescue: the plans the appliance would send). The seeds and CT geometries
  of the benchmark case sets and the quality gate (:data:`RESERVED_SEEDS`,
  ``benchmarks.bench_arc.HELDOUT_CTS``) are never teacher cases;
* clinical exports (CT + RTSTRUCT + RT Plan), read in ``appliance.cmd_train`` (DICOM lives there).

The *target fluence* is re-derived from the sequenced apertures by
``sequencing.fluence.fluence_from_sequence`` (two-level maps, like maps from TPS apertures) and the
*target dose* is the reference engine's dose of that fluence, on the networks' grid.

The cache
---------
Only what is expensive (the planner, tens of seconds a case) is cached: one compressed
``case_<seed>.npz`` per case holding the seed, the teacher case's CT geometry and anatomy variety,
and the arc: leaf positions of every pair quantised to 0.1 mm as int16, jaws likewise, cumulative
MU as float32 and the gantry angles as float32 (about 10-20 kB a case). Anatomy, target fluence and
target dose are regenerated from these. ``cache.json`` beside them records the planner, the profile
and how the cases were drawn. Generation is resumable: a case whose file exists is skipped; files
are written atomically. Caches of the first format (4 mm cases of ``draw_params``, the first
fluence optimizer; ``pipeline/data/teacher_plans``) are still read for training.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from core.case import Case, Grid, PatientPosition, Prescription
from core.errors import ConfigError, InputError
from core.machine import ArcSpec, MachineModel, RotationDirection
from sequencing.sequencer import ArcSequence

if TYPE_CHECKING:
    from pipeline.plan import PlanningOptions

log = logging.getLogger(__name__)

#: Format 2: teacher cases of drawn CT geometries and anatomy variety planned by the full planner
#: (format 1, still read for training: 4 mm cases of ``draw_params`` from the first fluence optimizer).
CACHE_FORMAT = 2
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
        What the generator recorded (planning seconds, PTV HI/D98 and goals of the plan).
    case
        The teacher case (CT geometry, anatomy variety); None for the first cache format's 4 mm
        cases of :func:`pipeline.synth.draw_params`.
    """

    seed: int
    sequence: ArcSequence
    info: dict[str, float] = field(default_factory=dict)
    case: TeacherCase | None = None


def cache_path(cache_dir: str | Path, seed: int) -> Path:
    """The file of case ``seed`` in a cache folder."""
    return Path(cache_dir) / f"case_{seed:06d}.npz"


def save_cached_plan(cache_dir: str | Path, plan: CachedPlan) -> Path:
    """Write one case of the cache atomically (compressed npz); returns its path."""
    path = cache_path(cache_dir, plan.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    info = {f"info_{k}": np.float64(v) for k, v in plan.info.items()}
    spec = plan.case.arrays() if plan.case is not None else {}
    np.savez_compressed(buf, seed=np.int64(plan.seed), **sequence_to_arrays(plan.sequence), **spec, **info)  # type: ignore[arg-type]
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
            seed = int(z["seed"])
            return CachedPlan(seed, seq, info, TeacherCase.from_arrays(seed, z))
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


# --------------------------------------------------------------------------- teacher cases


@dataclass(frozen=True)
class TeacherCt:
    """The CT geometry a teacher case is generated on (centred on the reference prostate level)."""

    matrix: int
    pixel_mm: float
    slice_mm: float
    slices: int
    position: PatientPosition

    @classmethod
    def isotropic(cls, mm: float, position: PatientPosition = PatientPosition.HFS) -> TeacherCt:
        """An isotropic ``mm`` grid over a 500 x 500 x 300 mm field of view (quick teacher data)."""
        return cls(matrix=max(16, round(500.0 / mm)), pixel_mm=float(mm), slice_mm=float(mm),
                   slices=max(2, round(300.0 / mm)), position=position)

    def grid(self) -> Grid:
        """The case grid."""
        from pipeline.synth import ct_grid

        return ct_grid(self.slices, self.pixel_mm, self.slice_mm, self.matrix)

    def label(self) -> str:
        return f"{self.matrix}/{self.pixel_mm:g}mm/{self.slice_mm:g}mm/{self.position.value}"


#: CT geometries of teacher cases, one drawn per seed: clinical planning CT matrices, pixels and
#: slices, head- and feet-first, 300 mm long. None is a geometry of the held-out benchmark set
#: (``benchmarks.bench_arc.HELDOUT_CTS``), which stays out of training and tuning (a test checks it).
TEACHER_CTS = (
    TeacherCt(512, 0.977, 2.5, 120, PatientPosition.HFS),  # airt synth's CT
    TeacherCt(512, 0.977, 2.5, 120, PatientPosition.FFS),
    TeacherCt(512, 0.88, 2.0, 150, PatientPosition.HFS),
    TeacherCt(440, 1.15, 2.5, 120, PatientPosition.FFS),
    TeacherCt(480, 1.05, 3.0, 100, PatientPosition.HFS),
    TeacherCt(400, 1.3, 2.0, 150, PatientPosition.HFS),
)
#: Seeds kept out of training: the benchmark case sets and the quality gate plan them
#: (``benchmarks.bench_arc``: ``airt synth`` seeds from 2000, held-out seeds from 5000).
RESERVED_SEEDS = (range(2000, 3000), range(5000, 6000))


@dataclass(frozen=True)
class TeacherCase:
    """What a teacher case is made from, drawn from its seed by :func:`teacher_case`.

    Attributes
    ----------
    seed
        The anatomy's seed (``pipeline.synth``).
    ct
        Its CT geometry and patient position.
    wide
        Anatomy from :func:`pipeline.synth.draw_variety_params` (wide variety: bladder filling, rectal
        gas and calibre, body size, femoral heads) instead of :func:`pipeline.synth.draw_params`.
    """

    seed: int
    ct: TeacherCt
    wide: bool

    def case(self, prescription: Prescription) -> Case:
        """The planning case: CT in HU and masks on the CT geometry."""
        from pipeline.synth import draw_params, draw_variety_params, synth_case

        params = draw_variety_params(self.seed) if self.wide else draw_params(self.seed)
        return synth_case(self.seed, grid=self.ct.grid(), patient_position=self.ct.position, params=params,
                          prescription=prescription)

    def arrays(self) -> dict[str, NDArray[Any]]:
        """The fields as cache arrays."""
        return {"ct_matrix": np.array(self.ct.matrix, dtype=np.int64),
                "ct_pixel_mm": np.array(self.ct.pixel_mm, dtype=np.float64),
                "ct_slice_mm": np.array(self.ct.slice_mm, dtype=np.float64),
                "ct_slices": np.array(self.ct.slices, dtype=np.int64),
                "ct_position": np.array(self.ct.position.value), "wide_anatomy": np.array(self.wide, dtype=np.bool_)}

    @classmethod
    def from_arrays(cls, seed: int, z: Any) -> TeacherCase | None:
        """The case of a cache entry; None for an entry of the first format (4 mm cases of
        :func:`pipeline.synth.draw_params`)."""
        if "ct_matrix" not in z:
            return None
        ct = TeacherCt(int(z["ct_matrix"]), float(z["ct_pixel_mm"]), float(z["ct_slice_mm"]), int(z["ct_slices"]),
                       PatientPosition(str(z["ct_position"])))
        return cls(seed=seed, ct=ct, wide=bool(z["wide_anatomy"]))


def teacher_case(seed: int, *, isotropic_mm: float | None = None) -> TeacherCase:
    """The teacher case of ``seed``: a CT geometry of :data:`TEACHER_CTS` and wide anatomy variety with
    probability 0.5, drawn from the seed (deterministic); with ``isotropic_mm`` an isotropic grid of
    that spacing instead (head- or feet-first as drawn).

    Raises
    ------
    ConfigError
        A seed of :data:`RESERVED_SEEDS` (benchmark and quality-gate cases never train).
    """
    if any(seed in r for r in RESERVED_SEEDS):
        raise ConfigError(f"seed {seed} is reserved for the benchmark case sets and the quality gate "
                          f"({', '.join(f'{r.start}-{r.stop - 1}' for r in RESERVED_SEEDS)}); train on other seeds")
    if seed < 0:
        raise ConfigError(f"teacher case seeds must be >= 0, got {seed}")
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(7,)))
    ct = TEACHER_CTS[int(rng.integers(len(TEACHER_CTS)))]
    wide = bool(rng.random() < 0.5)
    if isotropic_mm is not None:
        ct = TeacherCt.isotropic(isotropic_mm, ct.position)
    return TeacherCase(seed=seed, ct=ct, wide=wide)


def describe_planner(options: PlanningOptions) -> dict[str, Any]:
    """The planner settings of teacher plans as plain data (``cache.json``; the device is left out)."""
    d = asdict(replace(options, device="cpu", model_dir=""))
    d["goals"] = [f"P{g.priority} {g.structure} {g.metric} {g.comparison} {g.limit:g}" for g in options.goals]
    return dict(json.loads(json.dumps(d, default=str)))


def plan_teacher_case(spec: TeacherCase, *, options: PlanningOptions, machine: MachineModel, arc: ArcSpec,
                      prescription: Prescription) -> CachedPlan:
    """Plan one teacher case with the planner of ``options`` (the appliance's full planner: goal-driven
    fluence optimisation, sequencing, machine-parameter optimisation, rescue, final dose, MU
    normalisation).

    Returns
    -------
    CachedPlan
        The exported arc as the cache stores it (quantised), the case spec and ``info``: ``planning_s``,
        ``ptv_HI``, ``ptv_D98_rel`` (D98 / Rx on the CT grid), ``all_p1_met`` (1 or 0), ``p2_met`` and
        ``p2_total``, ``bladder_Dmean_Gy``, ``rectum_Dmean_Gy``.
    """
    from pipeline.evaluation import evaluate_structures
    from pipeline.goals import plan_verdict
    from pipeline.plan import FluenceSource, Timings, plan_arc

    t0 = time.perf_counter()
    case = spec.case(prescription)
    result = plan_arc(case, machine, arc, replace(options, source=FluenceSource.OPTIMIZE), timings=Timings())
    m = evaluate_structures(result.dose_fx * case.prescription.fractions, result.problem.grid, case)
    verdict = plan_verdict(result.goals or [])
    info = {"planning_s": time.perf_counter() - t0, "ptv_HI": float(m["ptv"]["HI"]),
            "ptv_D98_rel": float(m["ptv"]["D98_Gy"]) / case.prescription.dose_gy,
            "all_p1_met": float(verdict.p1_met), "p2_met": float(verdict.p2_met), "p2_total": float(verdict.p2_total),
            **{f"{organ}_Dmean_Gy": float(m.get(organ, {}).get("Dmean_Gy", float("nan")))
               for organ in ("bladder", "rectum")}}
    return CachedPlan(spec.seed, quantise_sequence(result.sequence), info, spec)


def generate_cache(
    cache_dir: str | Path,
    seeds: Iterable[int],
    *,
    options: PlanningOptions,
    prescription: Prescription,
    machine: MachineModel,
    arc: ArcSpec,
    profile: str,
    isotropic_mm: float | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> list[Path]:
    """Plan every seed's teacher case (:func:`teacher_case`) not yet in the cache and store it (resumable).

    Parameters
    ----------
    cache_dir
        Cache folder (created). Its ``cache.json`` must agree with these settings when it exists:
        mixing planners, profiles or case geometries in one cache is refused.
    seeds
        Seeds (>= 0, none of :data:`RESERVED_SEEDS`).
    options
        The planner (method optimize is used whatever ``options.source`` says).
    prescription, profile
        The profile's prescription and its name (recorded).
    isotropic_mm
        Cases on an isotropic grid of this spacing instead of the drawn CT geometries.
    progress
        Called as ``progress(seed, done, total)`` after every case.

    Returns
    -------
    list of Path
        The case files of the requested seeds (existing and new).
    """
    todo = [int(s) for s in seeds]
    specs = [teacher_case(s, isotropic_mm=isotropic_mm) for s in todo]  # refuses reserved seeds first
    out = Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    desc = {"format": CACHE_FORMAT, "machine": machine.name, "arc_sectors": arc.n_sectors,
            "collimator_deg": arc.collimator_deg, "profile": profile,
            "prescription": {"dose_gy": prescription.dose_gy, "fractions": prescription.fractions},
            "cases": ("pipeline.training.data.teacher_case: CT geometries of TEACHER_CTS, wide anatomy variety "
                      "with probability 0.5" if isotropic_mm is None else
                      f"pipeline.training.data.teacher_case on an isotropic {isotropic_mm:g} mm grid"),
            "planner": "pipeline.plan.plan_arc, method optimize: " + PLANNER_TEXT,
            "planner_settings": describe_planner(options)}
    existing = read_cache_description(out)
    if existing and {k: existing.get(k) for k in desc} != desc:
        changed = sorted(k for k in desc if existing.get(k) != desc[k])
        raise ConfigError(f"cache {out} was made with other settings ({', '.join(changed)} differ); "
                          "use another --out folder")
    if not existing:
        (out / CACHE_JSON).write_text(json.dumps(desc, indent=2) + "\n", encoding="utf-8")
    paths: list[Path] = []
    for i, (seed, spec) in enumerate(zip(todo, specs, strict=True)):
        path = cache_path(out, seed)
        if path.is_file():
            log.debug("cache: seed %d already cached", seed)
        else:
            plan = plan_teacher_case(spec, options=options, machine=machine, arc=arc, prescription=prescription)
            save_cached_plan(out, plan)
            log.info("cache: seed %d (%s%s) planned in %.1f s (PTV HI %.3f, D98 %.3f Rx, P1 %s), %d/%d", seed,
                     spec.ct.label(), ", wide anatomy" if spec.wide else "", plan.info["planning_s"],
                     plan.info["ptv_HI"], plan.info["ptv_D98_rel"],
                     "met" if plan.info["all_p1_met"] else "failed", i + 1, len(todo))
        paths.append(path)
        if progress is not None:
            progress(seed, i + 1, len(todo))
    return paths


def summarise_cache(cache_dir: str | Path) -> dict[str, Any]:
    """What a teacher cache holds, for the physicist who trains on it: case count, CT geometries and
    anatomy variety, how many plans met every P1 goal, the P2 goals met, PTV HI and D98 (median and
    worst), the rectum and bladder mean dose and the planning time (medians)."""
    plans = [load_cached_plan(p) for p in list_cache(cache_dir)]
    info = [p.info for p in plans]

    def values(key: str) -> NDArray[np.float64]:
        v = np.array([i[key] for i in info if key in i], dtype=np.float64)
        return v[np.isfinite(v)]

    def med(key: str) -> float:
        v = values(key)
        return round(float(np.median(v)), 3) if v.size else float("nan")

    cts: dict[str, int] = {}
    for p in plans:
        label = p.case.ct.label() if p.case is not None else "4 mm synthetic (first format)"
        cts[label] = cts.get(label, 0) + 1
    hi, d98 = values("ptv_HI"), values("ptv_D98_rel")
    return {"cases": len(plans), "seeds": [min((p.seed for p in plans), default=0), max((p.seed for p in plans), default=0)],
            "ct_geometries": dict(sorted(cts.items())), "wide_anatomy": sum(bool(p.case and p.case.wide) for p in plans),
            "all_p1_met": int(values("all_p1_met").sum()), "p1_recorded": int(values("all_p1_met").size),
            "p2_met": int(values("p2_met").sum()), "p2_total": int(values("p2_total").sum()),
            "ptv_HI_median": med("ptv_HI"), "ptv_HI_worst": round(float(hi.max()), 3) if hi.size else float("nan"),
            "ptv_D98_rel_median": med("ptv_D98_rel"),
            "ptv_D98_rel_min": round(float(d98.min()), 4) if d98.size else float("nan"),
            "rectum_Dmean_Gy_median": med("rectum_Dmean_Gy"), "bladder_Dmean_Gy_median": med("bladder_Dmean_Gy"),
            "planning_s_median": med("planning_s")}


#: What the teacher planner does (``cache.json``).
PLANNER_TEXT = ("the profile's goal-driven fluence optimisation through the reference dose engine, the "
                "sequencer's start arc, machine-parameter optimisation of the arc with the goal terms (in "
                "rounds; the femoral heads' dose-volume goals through helper parts redrawn as the dose moves), "
                "rescue of failed P1 goals, the reference engine's dose of the exported arc, MU normalisation")


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
