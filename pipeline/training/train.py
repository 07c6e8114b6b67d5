"""Training of the AIRT networks: fast dose first, then the paper's two stages (Note S2).

Phases, each run for its number of epochs (one step per training case, batch size 1):

1. ``fast_dose``: the FastDose network learns the reference engine's dose on the network grid
   from (case, fluence) pairs: the cached plans' target fluence and random perturbations of it
   (per-control-point scaling and pixel noise). It is then frozen, as in the paper.
2. ``stage1``: DoseProposer, Bev2Fluence and the correction network with the reconstruction
   losses and the paper's weights: proposer 0.3, fluence stage 1 0.1, dose stage 1 0.1, dose
   error stage 1 0.0003, fluence 0.4, dose error 0.001.
3. ``stage2``: everything before the correction frozen; correction with fluence 0.2, generator
   hinge 0.04, dose error 0.001 (Err with random suppression factors ``s_o`` per step, in both
   Err instances), and the discriminator with hinge + R1 (gamma 0.0025).

Loss conventions: fluence and dose losses are mean absolute errors (normalised units, see
:class:`pipeline.ai_planner.ModelSpec`); dose *error* losses are the L1 norm (sum over voxels) of
the Err map, so that the paper's small weights give them a say. The discriminator scores
``disc_maps`` randomly chosen control-point maps of the plan per step (all 180 in the paper).

A run folder holds ``checkpoint.pt`` (state dicts only, loaded with ``weights_only=True``),
``log.csv`` and ``log.jsonl`` (one row per phase and epoch) and, at the end, the model folder.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.case import Case, Prescription
from core.errors import ConfigError, InputError
from core.machine import MachineModel
from pipeline.ai_planner import AirtPipeline, ModelSpec, PreparedCase
from pipeline.model_io import save_model_folder
from pipeline.nets.bev2fluence import Bev2FluenceConfig
from pipeline.nets.discriminator import (
    DiscriminatorConfig,
    d_hinge_loss,
    g_hinge_loss,
    r1_penalty,
)
from pipeline.nets.dose_proposer import DoseProposerConfig
from pipeline.nets.fast_dose import FastDoseConfig, PrimaryGeometry
from pipeline.training.data import TeacherCase
from sequencing.sequencer import ArcSequence

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("fast_dose", "stage1", "stage2")
#: Loss weights of the paper (Note S2).
STAGE1_WEIGHTS: dict[str, float] = {"proposer": 0.3, "fluence1": 0.1, "dose1": 0.1, "dose_error1": 0.0003,
                                    "fluence": 0.4, "dose_error": 0.001}
STAGE2_WEIGHTS: dict[str, float] = {"fluence": 0.2, "g_hinge": 0.04, "dose_error": 0.001}
R1_GAMMA = 0.0025


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class PlanRecord:
    """A training case: a sequenced plan and where its case comes from.

    Exactly one of ``teacher`` (a teacher case, :class:`pipeline.training.data.TeacherCase`), ``seed``
    (a first-format cache's case: ``synth_case(seed, spacing_mm=case_spacing_mm)``) and ``case`` (a
    loaded clinical case) is set.
    """

    name: str
    sequence: ArcSequence
    seed: int | None = None
    case: Case | None = None
    case_spacing_mm: float = 4.0
    teacher: TeacherCase | None = None
    prescription: Prescription = field(default_factory=Prescription)

    def load_case(self) -> Case:
        """The planning case of the record."""
        if self.case is not None:
            return self.case
        if self.teacher is not None:
            return self.teacher.case(self.prescription)
        if self.seed is None:
            raise InputError(f"training record {self.name} has neither a seed nor a case")
        from pipeline.synth import synth_case

        s = self.case_spacing_mm
        return synth_case(self.seed, spacing_mm=(s, s, s))


@dataclass(eq=False)
class Sample:
    """A training case on the network grid with its targets (normalised units).

    Attributes
    ----------
    name
        Case id (for logs).
    prep
        Inputs, masks, BEV projector and fast-dose geometry.
    fluence
        Target fluence ``(1, n_cp, rows, cols)``.
    dose
        Target dose ``(1, 1, nz, ny, nx)`` (reference engine, Rx units).
    extra
        Perturbed (fluence, reference dose) pairs for the fast dose network.
    """

    name: str
    prep: PreparedCase
    fluence: Tensor
    dose: Tensor
    extra: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def half_geometry(g: PrimaryGeometry) -> PrimaryGeometry:
    """The fast dose geometry with its big tensors in float16 (half the memory; used as float32)."""
    return PrimaryGeometry(g.sample_grid.half(), g.weight.half(), g.sh, g.density, g.shape, g.bev)


def perturb_fluence(fluence: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random plausible variation of a plan's fluence (MU per pixel, same shape, >= 0).

    Per-control-point scale factors (log-normal, smoothed along the arc) times pixel noise
    (+-30 %), so the fast dose network sees fluences away from the teacher's.
    """
    n = fluence.shape[0]
    raw = rng.normal(0.0, 0.5, size=n + 20)
    kernel = np.ones(9) / 9.0
    scale = np.exp(np.convolve(raw, kernel, mode="same")[10:10 + n] * 2.0)
    noise = 1.0 + 0.3 * rng.uniform(-1.0, 1.0, size=fluence.shape)
    return np.clip(fluence * scale[:, None, None] * noise, 0.0, None)


def fluence_unit_from_sequences(sequences: Sequence[ArcSequence], machine: MachineModel, rx_gy: float) -> float:
    """``fluence_mu_per_rx_gy`` making the mean non-zero target fluence pixel about 1."""
    from sequencing.fluence import fluence_from_sequence

    vals = []
    for seq in sequences[:20]:
        f = fluence_from_sequence(seq, machine)
        nz = f[f > 1e-3 * f.max()]
        if nz.size:
            vals.append(float(nz.mean()))
    if not vals:
        raise InputError("the training plans deliver no fluence")
    return float(np.mean(vals)) / rx_gy


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (all recorded in the run folder and in ``model.json``).

    Parameters
    ----------
    size
        ``small`` (CPU widths), ``paper`` (the paper's widths; needs a GPU) or ``tiny`` (tests).
    epochs
        Epochs of each phase, ``{"fast_dose": n, "stage1": n, "stage2": n}``.
    lr
        Adam learning rate (the paper: 1e-4; the small CPU nets train faster with 1e-3).
    lr_final_fraction
        Within each phase the learning rate follows a cosine from ``lr`` at the first epoch down to
        ``lr * lr_final_fraction`` at the phase's last planned epoch (1 keeps it constant).
    val_fraction
        Fraction (0-0.5) of cases held out for validation (at least one when there are >= 2).
    n_perturbed
        Perturbed fluence samples per case for the fast dose phase.
    sparing_max
        Stage 2 draws each OAR's ``s_o`` uniformly in [0, sparing_max] (half the steps use 0).
    disc_maps
        Control-point maps per step scored by the discriminator.
    adversarial
        False trains stage 2 without the adversarial loss (the "-GAN" ablation).
    time_limit_min
        Per phase wall-time limit, minutes (0 = none); a phase stops at the end of the epoch in
        which the limit passes.
    seed
        Random seed (weights, split, perturbations, s_o draws).
    """

    size: str = "small"
    epochs: dict[str, int] = field(default_factory=lambda: {"fast_dose": 4, "stage1": 6, "stage2": 3})
    lr: float = 1e-3
    lr_final_fraction: float = 0.1
    val_fraction: float = 0.1
    n_perturbed: int = 2
    sparing_max: float = 0.5
    disc_maps: int = 24
    adversarial: bool = True
    time_limit_min: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size not in ("small", "paper", "tiny"):
            raise ConfigError(f"training size must be 'small', 'paper' or 'tiny', got {self.size!r}")
        if set(self.epochs) != set(PHASES) or min(self.epochs.values()) < 0:
            raise ConfigError(f"epochs must give a count >= 0 for each of {PHASES}, got {self.epochs}")
        if not (self.lr > 0 and 0 <= self.val_fraction <= 0.5 and 0 <= self.sparing_max < 1):
            raise ConfigError("lr must be > 0, val_fraction in [0, 0.5], sparing_max in [0, 1)")
        if not 0 < self.lr_final_fraction <= 1:
            raise ConfigError(f"lr_final_fraction must be in (0, 1], got {self.lr_final_fraction}")
        if self.disc_maps < 1 or self.n_perturbed < 0:
            raise ConfigError("disc_maps must be >= 1 and n_perturbed >= 0")


def size_configs(size: str) -> dict[str, tuple[str, Any]]:
    """Network configs of a training size: ``{key: (registry name, config)}``.

    ``paper`` is the paper's widths (GPU). ``small`` is sized for a 2-core CPU: the proposer and fast
    dose at their registry ``small()`` widths, Bev2Fluence and the correction at half those
    widths (4 -> 8 -> 16, bottleneck 32), the discriminator at ``small()``.
    """
    if size == "paper":
        return {"dose_proposer": ("dose_proposer", DoseProposerConfig.paper()),
                "bev2fluence": ("bev2fluence", Bev2FluenceConfig.paper()),
                "fast_dose": ("fast_dose", FastDoseConfig.paper()),
                "correction": ("bev2fluence", Bev2FluenceConfig.paper(in_channels=2)),
                "discriminator": ("discriminator", DiscriminatorConfig.paper())}
    if size == "tiny":  # for tests and smoke runs: seconds per step
        tb = {"channels": (4, 8, 16), "blocks": (1,) * 5, "expansion": (2,) * 5}
        return {"dose_proposer": ("dose_proposer", DoseProposerConfig(stem_channels=4, channels=(4, 8, 8),
                                                                      decoder_convs=1)),
                "bev2fluence": ("bev2fluence", Bev2FluenceConfig(in_channels=1, **tb)),  # type: ignore[arg-type]
                "fast_dose": ("fast_dose", FastDoseConfig(sh_order=1, channels=(4, 8), blocks=(1, 1, 1),
                                                          expansion=(2, 2, 2), ray_spacing_mm=10.0,
                                                          ray_step_mm=8.0)),
                "correction": ("bev2fluence", Bev2FluenceConfig(in_channels=2, **tb)),  # type: ignore[arg-type]
                "discriminator": ("discriminator", DiscriminatorConfig(base_channels=4, max_channels=16))}
    if size != "small":
        raise ConfigError(f"training size must be 'small', 'paper' or 'tiny', got {size!r}")
    b2f = {"channels": (4, 8, 16, 32), "blocks": (1,) * 7, "expansion": (2,) * 7}
    return {"dose_proposer": ("dose_proposer", DoseProposerConfig.small()),
            "bev2fluence": ("bev2fluence", Bev2FluenceConfig(in_channels=1, **b2f)),  # type: ignore[arg-type]
            "fast_dose": ("fast_dose", FastDoseConfig.small()),
            "correction": ("bev2fluence", Bev2FluenceConfig(in_channels=2, **b2f)),  # type: ignore[arg-type]
            "discriminator": ("discriminator", DiscriminatorConfig.small())}


def build_networks(size: str) -> dict[str, tuple[str, Any, nn.Module]]:
    """Fresh networks of a size: ``{key: (registry name, config, module)}``."""
    from pipeline.nets.registry import build

    out: dict[str, tuple[str, Any, nn.Module]] = {}
    for key, (arch, cfg) in size_configs(size).items():
        cfg_used, module = build(arch, cfg)
        out[key] = (arch, cfg_used, module)
    return out


# --------------------------------------------------------------------------- the trainer


def _l1(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().mean()


class Trainer:
    """Runs the phases over in-memory samples, with checkpoints and logs in ``run_dir``.

    Parameters
    ----------
    run_dir
        Run folder (created): ``checkpoint.pt``, ``log.csv``, ``log.jsonl``.
    train, val
        Training and validation samples (``val`` may be empty).
    spec
        Grids and normalisation (recorded in the model).
    config
        Training settings.
    device
        Torch device.
    data_description
        What the samples are (recorded in ``model.json``).
    """

    def __init__(self, run_dir: str | Path, train: Sequence[Sample], val: Sequence[Sample], spec: ModelSpec,
                 config: TrainConfig, device: torch.device | str = "cpu",
                 data_description: dict[str, Any] | None = None, progress: bool = True) -> None:
        if not train:
            raise InputError("training needs at least one training case")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.train_set, self.val_set = train, val  # lazy sequences (a SampleStore) are kept lazy
        self.spec, self.config, self.device = spec, config, torch.device(device)
        self.data_description = dict(data_description or {})
        self.progress = progress
        torch.manual_seed(config.seed)
        self.rng = random.Random(config.seed)
        self.nets = build_networks(config.size)
        for _, _, m in self.nets.values():
            m.to(self.device)
        n = self.nets
        self.pipe = AirtPipeline(n["dose_proposer"][2], n["bev2fluence"][2], n["fast_dose"][2],
                                 n["correction"][2], spec)
        self.disc: nn.Module = n["discriminator"][2]
        self.opt = {
            "fast_dose": torch.optim.Adam(self.pipe.fast_dose.parameters(), lr=config.lr),
            "stage1": torch.optim.Adam([p for k in ("proposer", "bev2fluence", "correction")
                                        for p in getattr(self.pipe, k).parameters()], lr=config.lr),
            "stage2": torch.optim.Adam(self.pipe.correction.parameters(), lr=config.lr),
            "disc": torch.optim.Adam(self.disc.parameters(), lr=config.lr, betas=(0.0, 0.99)),
        }
        self.phase_index, self.epoch = 0, 0  # next epoch to run
        self.history: list[dict[str, Any]] = []

    # ---- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        """Where the checkpoint of the run is."""
        return self.run_dir / "checkpoint.pt"

    def save_checkpoint(self) -> Path:
        """Write the run state (networks, optimizers, position, history) atomically."""
        state = {
            "nets": {k: m.state_dict() for k, (_, _, m) in self.nets.items()},
            "opt": {k: o.state_dict() for k, o in self.opt.items()},
            "phase_index": self.phase_index, "epoch": self.epoch,
            "history_json": json.dumps(self.history),
            "spec_json": json.dumps(self.spec.to_meta()),
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)
        return self.checkpoint_path

    def load_checkpoint(self) -> None:
        """Resume from ``checkpoint.pt`` (ConfigError when absent or made for other networks)."""
        if not self.checkpoint_path.is_file():
            raise ConfigError(f"no checkpoint to resume in {self.run_dir}; start without --resume")
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        if ModelSpec.from_meta(json.loads(state["spec_json"])) != self.spec:
            raise ConfigError(f"checkpoint in {self.run_dir} was made with another grid/normalisation")
        try:
            for k, (_, _, m) in self.nets.items():
                m.load_state_dict(state["nets"][k])
            for k, o in self.opt.items():
                o.load_state_dict(state["opt"][k])
        except (KeyError, RuntimeError) as exc:
            raise ConfigError(f"checkpoint in {self.run_dir} does not fit --size {self.config.size}: {exc}") from exc
        self.phase_index, self.epoch = int(state["phase_index"]), int(state["epoch"])
        self.history = list(json.loads(state["history_json"]))
        log.info("resumed %s at phase %s epoch %d", self.run_dir, PHASES[min(self.phase_index, 2)], self.epoch)

    def init_from_model(self, folder: str | Path) -> None:
        """Start from the networks of a model folder (fine-tuning, e.g. the shipped model on a clinic's plans).

        Every network of this run must be in the folder with the same architecture and config, and
        the folder's grids and normalisation must equal this run's spec (build the spec with
        :meth:`pipeline.ai_planner.ModelSpec.from_meta` of the folder's meta). The optimizers and
        the position start afresh. ConfigError otherwise.
        """
        from pipeline.model_io import load_model_folder

        model = load_model_folder(folder, self.device)
        if ModelSpec.from_meta(model.meta) != self.spec:
            raise ConfigError(f"model in {folder} was trained with another grid/normalisation than this run")
        for key, (arch, cfg, module) in self.nets.items():
            if key not in model.networks:
                raise ConfigError(f"model in {folder} has no {key!r} network to start from")
            if model.architectures[key] != arch or model.configs[key] != cfg:
                raise ConfigError(f"model in {folder}: network {key!r} is not a {self.config.size!r} {arch}; "
                                  "use the --size it was trained with")
            module.load_state_dict(model.networks[key].state_dict())
        self.data_description["initialised_from"] = describe_start_model(folder)
        log.info("initialised the networks from %s", folder)

    # ---- steps

    def _freeze(self, phase: str) -> None:
        trainable = {"fast_dose": {"fast_dose"}, "stage1": {"proposer", "bev2fluence", "correction"},
                     "stage2": {"correction"}}[phase]
        for name in ("proposer", "bev2fluence", "fast_dose", "correction"):
            mod: nn.Module = getattr(self.pipe, name)
            mod.train(name in trainable)
            mod.requires_grad_(name in trainable)
        self.disc.train(phase == "stage2")

    def fast_dose_step(self, s: Sample, train: bool = True) -> dict[str, float]:
        """One fast-dose step (target + perturbed pairs); returns the losses."""
        pairs = [(s.fluence, s.dose), *s.extra]
        f = torch.cat([p[0] for p in pairs]).to(self.device)
        d = torch.cat([p[1] for p in pairs]).to(self.device)
        with torch.set_grad_enabled(train):
            pred = self.pipe.fast_dose(f, s.prep.primary)
            loss = _l1(pred, d)
            if train:
                self.opt["fast_dose"].zero_grad(set_to_none=True)
                loss.backward()
                self.opt["fast_dose"].step()
        ptv = s.prep.masks["ptv"].bool()
        mae_ptv = float((pred.detach()[:1, 0] - d[:1, 0]).abs()[0][ptv].mean())
        lv = float(loss.detach())
        return {"loss": lv, "dose_mae": lv, "dose_mae_ptv": mae_ptv}

    def _dose_error_l1(self, dose: Tensor, s: Sample, sparing: dict[str, float], dose0: Tensor) -> Tensor:
        return self.pipe.err_map(dose, s.prep, sparing, dose0).abs().sum()

    def stage1_step(self, s: Sample, train: bool = True) -> dict[str, float]:
        """One stage-1 step (reconstruction losses, paper weights); returns the weighted terms."""
        w = STAGE1_WEIGHTS
        with torch.set_grad_enabled(train):
            out = self.pipe(s.prep, {})
            d1 = self.pipe.fast_dose(out.fluence, s.prep.primary)
            terms = {
                "proposer": _l1(out.dose_proposed, s.dose),
                "fluence1": _l1(out.fluence0, s.fluence),
                "dose1": _l1(out.dose0, s.dose),
                "dose_error1": out.err0.abs().sum(),
                "fluence": _l1(out.fluence, s.fluence),
                "dose_error": self._dose_error_l1(d1, s, {}, out.dose0),
            }
            loss = sum(w[k] * v for k, v in terms.items())
            if train:
                self.opt["stage1"].zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[union-attr]
                self.opt["stage1"].step()
        res = {k: float(v.detach()) for k, v in terms.items()}
        res["loss"] = float(loss.detach())  # type: ignore[union-attr]
        res["dose_mae"] = float(_l1(d1.detach(), s.dose))
        return res

    def _draw_sparing(self) -> dict[str, float]:
        if self.rng.random() < 0.5:
            return {}
        return {k: self.rng.uniform(0.0, self.config.sparing_max) for k in ("bladder", "rectum")}

    def stage2_step(self, s: Sample, train: bool = True) -> dict[str, float]:
        """One stage-2 step: the discriminator, then the correction network."""
        w = STAGE2_WEIGHTS
        sparing = self._draw_sparing() if train else {}
        with torch.no_grad():
            out0 = self.pipe(s.prep, sparing, feedback=False)
            f0, d0 = out0.fluence0, out0.dose0
            e0 = self.pipe.err_map(d0, s.prep, sparing, d0)
            b_err = s.prep.projector(e0[:, 0]) * self.spec.err_bev_scale
        res: dict[str, float] = {}
        idx = torch.tensor(self.rng.sample(range(s.fluence.shape[1]), min(self.config.disc_maps, s.fluence.shape[1])))
        with torch.set_grad_enabled(train):
            f1 = self.pipe.correction(torch.stack([f0, b_err], dim=1))[:, 0]
            if self.config.adversarial:
                real = s.fluence[0, idx]
                fake = f1[0, idx]
                if train:
                    d_loss = d_hinge_loss(self.disc(real), self.disc(fake.detach()))
                    r1 = r1_penalty(self.disc, real, R1_GAMMA)
                    self.opt["disc"].zero_grad(set_to_none=True)
                    (d_loss + r1).backward()
                    self.opt["disc"].step()
                    res["d_hinge"], res["r1"] = float(d_loss.detach()), float(r1.detach())
                self.disc.requires_grad_(False)
                g = g_hinge_loss(self.disc(fake))
                self.disc.requires_grad_(True)
            else:
                g = torch.zeros((), device=self.device)
            d1 = self.pipe.fast_dose(f1, s.prep.primary)
            terms = {"fluence": _l1(f1, s.fluence), "g_hinge": g,
                     "dose_error": self._dose_error_l1(d1, s, sparing, d0)}
            loss = sum(w[k] * v for k, v in terms.items())
            if train:
                self.opt["stage2"].zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[union-attr]
                self.opt["stage2"].step()
        res.update({k: float(v.detach()) for k, v in terms.items()})
        res["loss"] = float(loss.detach())  # type: ignore[union-attr]
        res["dose_mae"] = float(_l1(d1.detach(), s.dose))
        return res

    # ---- epochs

    def phase_lr(self, phase: str, epoch: int) -> float:
        """Learning rate of ``epoch`` (0-based) of ``phase``: cosine from ``lr`` to ``lr * lr_final_fraction``."""
        n = self.config.epochs[phase]
        frac = epoch / (n - 1) if n > 1 else 0.0
        lo = self.config.lr * self.config.lr_final_fraction
        return lo + (self.config.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

    def _run_epoch(self, phase: str) -> dict[str, Any]:
        step = {"fast_dose": self.fast_dose_step, "stage1": self.stage1_step, "stage2": self.stage2_step}[phase]
        self._freeze(phase)
        lr = self.phase_lr(phase, self.epoch)
        for name in ((phase, "disc") if phase == "stage2" else (phase,)):
            for group in self.opt[name].param_groups:
                group["lr"] = lr
        order = list(range(len(self.train_set)))
        self.rng.shuffle(order)
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        it: Any = order
        if self.progress:
            from tqdm import tqdm

            it = tqdm(order, desc=f"{phase} epoch {self.epoch + 1}", unit="case", leave=False)
        for i in it:
            r = step(self.train_set[i], True)
            if not all(math.isfinite(v) for v in r.values()):
                raise InputError(f"{phase}: non-finite loss on case {self.train_set[i].name}: {r}; lower --lr")
            for k, v in r.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.progress:
                it.set_postfix(loss=f"{r['loss']:.4f}")
        row: dict[str, Any] = {"phase": phase, "epoch": self.epoch + 1, "seconds": round(time.perf_counter() - t0, 2),
                               "lr": lr}
        row.update({f"train_{k}": v / len(order) for k, v in sums.items()})
        if self.val_set:
            vs: dict[str, float] = {}
            for mod in (self.pipe, self.disc):
                mod.eval()
            for s in self.val_set:
                for k, v in step(s, False).items():
                    vs[k] = vs.get(k, 0.0) + v
            row.update({f"val_{k}": v / len(self.val_set) for k, v in vs.items()})
        return row

    def _log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        with (self.run_dir / "log.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        keys = sorted({k for r in self.history for k in r}, key=lambda k: (k not in ("phase", "epoch", "seconds"), k))
        with (self.run_dir / "log.csv").open("w", newline="", encoding="utf-8") as f:
            wr = csv.DictWriter(f, fieldnames=keys)
            wr.writeheader()
            wr.writerows(self.history)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float) and
                          (k.endswith("_loss") or k.endswith("dose_mae") or k.endswith("_fluence")))
        print(f"[{row['phase']} epoch {row['epoch']}] {row['seconds']:.0f} s: {shown}", flush=True)
        log.info("%s epoch %d: %s", row["phase"], row["epoch"], shown)

    def run(self, stop_after: str | None = None) -> list[dict[str, Any]]:
        """Run the remaining epochs of every phase, checkpointing after each; returns the history.

        ``stop_after`` (a phase name) ends the run once that phase is complete, with the checkpoint
        pointing at the next phase: a copy of the run folder can then be resumed with other settings
        for the remaining phases (the ablation's stage 2 with and without the adversarial loss from one
        stage 1).
        """
        if stop_after is not None and stop_after not in PHASES:
            raise ConfigError(f"stop_after must be one of {PHASES}, got {stop_after!r}")
        while self.phase_index < len(PHASES):
            if stop_after is not None and self.phase_index > PHASES.index(stop_after):
                break
            phase = PHASES[self.phase_index]
            t_phase = time.perf_counter()
            while self.epoch < self.config.epochs[phase]:
                row = self._run_epoch(phase)
                self.epoch += 1
                self._log(row)
                self.save_checkpoint()
                limit = self.config.time_limit_min
                if limit > 0 and time.perf_counter() - t_phase > 60.0 * limit:
                    log.info("%s: time limit of %.1f min reached after %d epochs", phase, limit, self.epoch)
                    break
            self.phase_index += 1
            self.epoch = 0
            self.save_checkpoint()
        return self.history

    def export(self, model_dir: str | Path, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write the trained networks and their description as a model folder (``model.json``)."""
        trained_epochs: dict[str, int] = {}
        for r in self.history:
            trained_epochs[r["phase"]] = max(trained_epochs.get(r["phase"], 0), int(r["epoch"]))
        meta = {
            **self.spec.to_meta(),
            "training": {
                "config": asdict(self.config),
                "epochs_trained": trained_epochs,
                "n_train_cases": len(self.train_set),
                "n_val_cases": len(self.val_set),
                "stage1_weights": STAGE1_WEIGHTS, "stage2_weights": STAGE2_WEIGHTS, "r1_gamma": R1_GAMMA,
                "loss_conventions": "fluence/dose: mean absolute error in normalised units; dose error: "
                                    "sum over voxels of |Err| (Rx units)",
                "final_epoch_logs": {p: next((r for r in reversed(self.history) if r["phase"] == p), None)
                                     for p in PHASES},
                "data": self.data_description,
            },
            "warning": "research model, not clinically validated",
            **(extra_meta or {}),
        }
        return save_model_folder(model_dir, self.nets, meta)


def describe_start_model(folder: str | Path) -> dict[str, Any]:
    """How a fine-tuned model's start is recorded: the folder's name and its networks' SHA-256."""
    nets = json.loads((Path(folder) / "model.json").read_text(encoding="utf-8")).get("networks", {})
    return {"model": Path(folder).name, "sha256": {k: dict(v).get("sha256") for k, v in nets.items()}}


def split_records(records: Sequence[PlanRecord], val_fraction: float) -> tuple[list[PlanRecord], list[PlanRecord]]:
    """Deterministic split: the last ``ceil(val_fraction * n)`` records (at least one when n >= 2)."""
    n = len(records)
    n_val = 0 if n < 2 or val_fraction <= 0 else max(1, math.ceil(val_fraction * n))
    return list(records[: n - n_val]), list(records[n - n_val:])


def default_spec(records: Sequence[PlanRecord], machine: MachineModel, **kwargs: Any) -> ModelSpec:
    """A :class:`ModelSpec` whose fluence unit is derived from the records' plans."""
    if not records:
        raise InputError("no training records")
    case = records[0].case
    prescription = case.prescription if case is not None else records[0].prescription
    rx = prescription.dose_gy / prescription.fractions
    unit = fluence_unit_from_sequences([r.sequence for r in records], machine, rx)
    return replace(ModelSpec(**kwargs), fluence_mu_per_rx_gy=round(unit, 6))
