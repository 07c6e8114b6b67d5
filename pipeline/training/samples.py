"""Training samples on disk: the small, expensive part of each sample, the rest rebuilt when read.

At a thousand teacher cases and more the samples no longer fit in memory: one holds about 30 MB,
mostly the fast dose network's ray geometry on the 8 mm grid, and building one costs 10-20 s on 2
cores (the anatomy on its CT geometry, the resampling, the reference engine on the network grid,
three doses). A :class:`SampleStore` keeps, per case, what is expensive to make and small (about
2 MB): the case on the network grid (:class:`pipeline.ai_planner.NetworkCase`), its isocenter and
patient position, the target fluence (float16) and dose, and the perturbed (fluence, dose) pairs of
the fast dose phase. Reading a sample rebuilds the BEV projector and the fast dose geometry from
them (a few tenths of a second) and keeps the last ``in_memory`` samples read.

A store folder holds ``store.json`` (the network grid and normalisation, the fast dose geometry,
the arc and machine, the perturbation count and seed: a store made with others is refused) and one
``<case name>-<digest>.pt`` per case (the digest of its arc and case, :func:`record_digest`: a case
whose plan changed is built again), written atomically, so building resumes where it stopped. Files are read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor

from core.case import Grid, PatientPosition
from core.errors import ConfigError, InputError
from core.machine import ArcSpec, MachineModel
from pipeline.ai_planner import ModelSpec, NetworkCase, network_case, prepare_network_case
from pipeline.geometry import ArcGeometry
from pipeline.nets.fast_dose import FastDoseConfig
from pipeline.training.train import PlanRecord, Sample, half_geometry, perturb_fluence

log = logging.getLogger(__name__)

STORE_FORMAT = 1
STORE_JSON = "store.json"


def record_digest(record: PlanRecord) -> str:
    """What a stored sample was made from, as 16 hex digits: the arc (as the cache quantises it) and the
    case (teacher case and prescription, first-format seed and spacing, or a clinical case's id). A
    record whose plan or case changed gets another file, never a stale sample."""
    from pipeline.training.data import sequence_to_arrays

    h = hashlib.sha256()
    for key, a in sorted(sequence_to_arrays(record.sequence).items()):
        h.update(key.encode())
        h.update(np.ascontiguousarray(a).tobytes())
    if record.teacher is not None:
        h.update(repr((record.teacher, record.prescription)).encode())
    elif record.case is not None:
        h.update(f"case:{record.case.case_id}".encode())
    else:
        h.update(f"synth:{record.seed}@{record.case_spacing_mm}".encode())
    return h.hexdigest()[:16]


def record_rng(seed: int, name: str) -> np.random.Generator:
    """The perturbations' random generator of one case: from the run's seed and the case's name, so a
    sample is the same whichever order the store is built or resumed in."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def compact_sample(record: PlanRecord, *, machine: MachineModel, arc: ArcSpec, spec: ModelSpec,
                   n_perturbed: int, seed: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Regenerate a training case and return its stored form: the case on the network grid, its
    isocenter and position, the target fluence (from the sequence) and the reference engine's target
    dose, and ``n_perturbed`` perturbed pairs (:func:`pipeline.training.train.perturb_fluence`)."""
    from pipeline.beam_model import load_beam_model
    from pipeline.dose_engine import ReferenceDoseEngine
    from sequencing.fluence import fluence_from_sequence

    case = record.load_case()
    rx = case.prescription.dose_gy / case.prescription.fractions
    geometry = ArcGeometry(arc=arc, isocenter_mm=case.ptv_centroid_mm(), position=case.patient_position,
                           machine=machine)
    net = network_case(case, spec)
    engine = ReferenceDoseEngine.for_case(case, geometry, load_beam_model(), hu_curve=spec.hu_to_density,
                                          spacing_mm=spec.net_grid_mm, device=device)
    if engine.grid.shape != net.grid.shape:
        raise InputError(f"{record.name}: engine grid {engine.grid.shape} differs from network grid {net.grid.shape}")
    fl = fluence_from_sequence(record.sequence, machine)
    f_unit = spec.fluence_mu_per_rx_gy * rx

    def pair(f_mu: np.ndarray) -> tuple[Tensor, Tensor]:
        ft = torch.as_tensor(f_mu, dtype=torch.float32, device=device)
        with torch.inference_mode():
            d = engine(ft) / rx
        return (ft / f_unit).half().cpu(), d.float().cpu()

    rng = record_rng(seed, record.name)
    target = pair(fl)
    extra = [pair(perturb_fluence(fl, rng)) for _ in range(n_perturbed)]
    g = net.grid
    return {
        "name": record.name,
        "grid": torch.tensor([*g.origin_mm, *g.spacing_mm], dtype=torch.float64),
        "shape": torch.tensor(g.shape, dtype=torch.int64),
        "isocenter_mm": torch.tensor(geometry.isocenter_mm, dtype=torch.float64),
        "position": case.patient_position.value,
        "inputs": torch.as_tensor(net.inputs).clone(),
        "density": torch.as_tensor(net.density).clone(),
        "masks": {k: torch.as_tensor(m).clone() for k, m in net.masks.items()},
        "fluence": target[0], "dose": target[1],
        "extra_fluence": [f for f, _ in extra], "extra_dose": [d for _, d in extra],
    }


def sample_from_compact(data: dict[str, Any], *, machine: MachineModel, arc: ArcSpec, spec: ModelSpec,
                        fast_config: FastDoseConfig, device: torch.device | str = "cpu") -> Sample:
    """A training sample from its stored form (:func:`compact_sample`): the BEV projector and the fast
    dose geometry rebuilt on the network grid."""
    g = [float(v) for v in data["grid"]]
    shape = tuple(int(v) for v in data["shape"])
    grid = Grid(origin_mm=(g[0], g[1], g[2]), spacing_mm=(g[3], g[4], g[5]), shape=(shape[0], shape[1], shape[2]))
    iso = [float(v) for v in data["isocenter_mm"]]
    geometry = ArcGeometry(arc=arc, isocenter_mm=(iso[0], iso[1], iso[2]),
                           position=PatientPosition(data["position"]), machine=machine)
    net = NetworkCase(grid=grid, inputs=data["inputs"].numpy(), density=data["density"].numpy(),
                      masks={k: m.numpy() for k, m in data["masks"].items()})
    prep = prepare_network_case(net, geometry, spec, fast_config, device)
    prep.primary = half_geometry(prep.primary)
    dev = torch.device(device)

    def fl(t: Tensor) -> Tensor:
        return t.float()[None].to(dev)

    def dose(t: Tensor) -> Tensor:
        return t[None, None].to(dev)

    extra = [(fl(f), dose(d)) for f, d in zip(data["extra_fluence"], data["extra_dose"], strict=True)]
    return Sample(str(data["name"]), prep, fl(data["fluence"]), dose(data["dose"]), extra)


def build_sample(record: PlanRecord, *, machine: MachineModel, arc: ArcSpec, spec: ModelSpec,
                 fast_config: FastDoseConfig, n_perturbed: int = 2, seed: int = 0,
                 device: torch.device | str = "cpu") -> Sample:
    """A training case as an in-memory sample: anatomy, target fluence (from the sequence), reference
    target dose and perturbed pairs, exactly as a :class:`SampleStore` reads it back."""
    data = compact_sample(record, machine=machine, arc=arc, spec=spec, n_perturbed=n_perturbed, seed=seed,
                          device=device)
    return sample_from_compact(data, machine=machine, arc=arc, spec=spec, fast_config=fast_config, device=device)


class SampleStore(Sequence[Sample]):
    """The samples of a store folder (:func:`build_store`) in a fixed order, read on demand.

    Parameters
    ----------
    folder
        The store.
    entries
        The cases, in order: (name, :func:`record_digest`); each must have its file.
    in_memory
        Samples kept after reading (least recently read dropped first); 0 keeps none.
    """

    def __init__(self, folder: str | Path, entries: Sequence[tuple[str, str]], *, machine: MachineModel,
                 arc: ArcSpec, spec: ModelSpec, fast_config: FastDoseConfig, device: torch.device | str = "cpu",
                 in_memory: int = 0) -> None:
        self.folder = Path(folder)
        self.entries = list(entries)
        missing = [n for n, d in self.entries if not sample_path(self.folder, n, d).is_file()]
        if missing:
            raise InputError(f"sample store {self.folder} lacks {len(missing)} case(s), e.g. {missing[0]}; "
                             "build it again (it resumes)")
        self._kw = {"machine": machine, "arc": arc, "spec": spec, "fast_config": fast_config, "device": device}
        self.in_memory = max(0, int(in_memory))
        self._kept: OrderedDict[str, Sample] = OrderedDict()

    @property
    def names(self) -> list[str]:
        """The cases' names, in order."""
        return [n for n, _ in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def subset(self, names: Sequence[str], *, in_memory: int) -> SampleStore:
        """The store of some of these cases, in the order given."""
        digest = dict(self.entries)
        return SampleStore(self.folder, [(n, digest[n]) for n in names], in_memory=in_memory,
                           **self._kw)  # type: ignore[arg-type]

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | Sequence[Sample]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        name, digest = self.entries[i]
        if name in self._kept:
            self._kept.move_to_end(name)
            return self._kept[name]
        data = load_compact(sample_path(self.folder, name, digest))
        sample = sample_from_compact(data, **self._kw)  # type: ignore[arg-type]
        if self.in_memory:
            self._kept[name] = sample
            while len(self._kept) > self.in_memory:
                self._kept.popitem(last=False)
        return sample

    def __iter__(self) -> Iterator[Sample]:
        return (self[k] for k in range(len(self)))


def sample_path(folder: str | Path, name: str, digest: str) -> Path:
    """The file of case ``name`` made from ``digest`` (:func:`record_digest`) in a store (the name
    sanitised to letters, digits, ``-`` and ``_``)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return Path(folder) / f"{safe}-{digest}.pt"


def load_compact(path: Path) -> dict[str, Any]:
    """One stored sample (InputError when it is not readable)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file fails in the unpickler in many ways
        raise InputError(f"cannot read stored sample {path}: {exc}; delete it and build the store again") from exc
    if not isinstance(data, dict) or "fluence" not in data:
        raise InputError(f"{path} is not a stored training sample; delete it and build the store again")
    return data


def store_description(*, machine: MachineModel, arc: ArcSpec, spec: ModelSpec, fast_config: FastDoseConfig,
                      n_perturbed: int, seed: int) -> dict[str, Any]:
    """What the samples of a store depend on (``store.json``)."""
    desc = {"format": STORE_FORMAT, "machine": machine.name, "arc_sectors": arc.n_sectors,
            "arc_start_deg": arc.start_deg, "collimator_deg": arc.collimator_deg, "spec": spec.to_meta(),
            "fast_dose": asdict(fast_config), "n_perturbed": n_perturbed, "seed": seed}
    return dict(json.loads(json.dumps(desc, default=str)))


def build_store(folder: str | Path, records: Sequence[PlanRecord], *, machine: MachineModel, arc: ArcSpec,
                spec: ModelSpec, fast_config: FastDoseConfig, n_perturbed: int, seed: int,
                device: torch.device | str = "cpu", in_memory: int = 0,
                progress: Callable[[str, int, int], None] | None = None) -> SampleStore:
    """Store the sample of every record not yet in ``folder`` (resumable) and return the store of them all.

    Raises
    ------
    ConfigError
        The folder holds a store made for another network grid, normalisation, fast dose geometry, arc,
        machine, perturbation count or seed.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    desc = store_description(machine=machine, arc=arc, spec=spec, fast_config=fast_config, n_perturbed=n_perturbed,
                             seed=seed)
    meta = out / STORE_JSON
    if meta.is_file():
        try:
            existing = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {meta}: {exc}") from exc
        if existing != desc:
            changed = sorted(k for k in desc if existing.get(k) != desc[k])
            raise ConfigError(f"sample store {out} was built with other settings ({', '.join(changed)} differ); "
                              "use another folder")
    else:
        meta.write_text(json.dumps(desc, indent=2) + "\n", encoding="utf-8")
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise InputError("training cases must have distinct names")
    entries = [(r.name, record_digest(r)) for r in records]
    for i, (record, (_, digest)) in enumerate(zip(records, entries, strict=True)):
        path = sample_path(out, record.name, digest)
        if not path.is_file():
            data = compact_sample(record, machine=machine, arc=arc, spec=spec, n_perturbed=n_perturbed, seed=seed,
                                  device=device)
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{path.name}.")
            os.close(fd)
            try:
                torch.save(data, tmp)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        if progress is not None:
            progress(record.name, i + 1, len(records))
    return SampleStore(out, entries, machine=machine, arc=arc, spec=spec, fast_config=fast_config, device=device,
                       in_memory=in_memory)
