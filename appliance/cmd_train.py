"""``airt train``: make training data and train the AIRT networks.

Make (or extend, resumably) a cache of teacher plans: synthetic cases of drawn CT geometries and
anatomy variety planned by the configured full planner (method optimize) with a profile::

    airt train --make-data --seeds 10000:10300 --out CACHE [--profile NAME] [--isotropic-mm 8]

Summarise a cache (cases, CT geometries, goals met, PTV HI, organ doses, planning time)::

    airt train --summary --cache CACHE

Train on cached synthetic plans and/or clinical exports, write a model folder::

    airt train --cache CACHE [--clinical EXPORTS] --run RUN_DIR --model-out MODEL_DIR
               [--size small|paper] [--device auto] [--epochs 4 6 3] [--lr 1e-3] [--resume]

A clinical export folder holds one sub-folder per patient with the planning CT series, the RT
Structure Set and the RT Plan (an RT Dose may be there and is ignored: the target dose is
recomputed with the reference engine). Only single-arc VMAT plans on the configured machine's
MLC with the configured arc (control points every 2 degrees, same collimator) are accepted;
others are refused with the reason.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import Settings, load_settings
from core.case import Prescription
from core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: Largest accepted distance between a clinical plan's isocenter and the PTV centroid, mm (the
#: networks place the isocenter at the PTV centroid).
MAX_ISOCENTER_OFFSET_MM = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``airt train``."""
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration (machine, arc, structures)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    data = parser.add_argument_group("training data")
    data.add_argument("--make-data", action="store_true",
                      help="plan teacher cases into the cache --out with the configured planner (method optimize)")
    data.add_argument("--seeds", default="10000:10100",
                      help="teacher case seeds A:B (B exclusive), A-B or N; 2000-2999 and 5000-5999 are reserved "
                           "for the benchmarks and the quality gate")
    data.add_argument("--out", type=Path, default=None, help="cache folder written by --make-data")
    data.add_argument("--summary", action="store_true",
                      help="print what the --cache folders hold (cases, CT geometries, goals met, PTV HI, organ "
                           "doses, planning time) and stop")
    data.add_argument("--profile", default="", help="protocol profile of the teacher plans (default: planning.profile)")
    data.add_argument("--isotropic-mm", type=float, default=None,
                      help="teacher cases on an isotropic grid of this spacing instead of drawn CT geometries "
                           "(quicker; no CT variety)")
    train = parser.add_argument_group("training")
    train.add_argument("--cache", type=Path, action="append", default=[], help="cache folder (repeatable)")
    train.add_argument("--clinical", type=Path, action="append", default=[],
                       help="folder of clinical exports, one sub-folder per patient (repeatable)")
    train.add_argument("--max-cases", type=int, default=0, help="use at most this many cases (0: all)")
    train.add_argument("--sample-store", type=Path, default=None,
                       help="folder of the stored training samples (default RUN/samples; built once, resumable, "
                            "shareable between runs of the same network grid and seed)")
    train.add_argument("--samples-in-memory", type=int, default=200,
                       help="training samples kept in memory (about 30 MB each); the others are read from the store "
                            "when needed")
    train.add_argument("--run", type=Path, default=Path("airt-train-run"), help="run folder (checkpoints, logs)")
    train.add_argument("--model-out", type=Path, default=None, help="model folder to write (default RUN/model)")
    train.add_argument("--size", choices=["small", "paper", "tiny"], default="small",
                       help="network widths (tiny: for smoke tests only)")
    train.add_argument("--epochs", type=int, nargs=3, default=[4, 6, 3], metavar=("FAST_DOSE", "STAGE1", "STAGE2"),
                       help="epochs of the fast-dose, stage-1 and stage-2 phases")
    train.add_argument("--lr", type=float, default=1e-3,
                       help="Adam learning rate (paper 1e-4; 1e-3 suits the small CPU networks)")
    train.add_argument("--lr-final-fraction", type=float, default=0.1,
                       help="cosine learning-rate decay within each phase down to this fraction of --lr")
    train.add_argument("--val-fraction", type=float, default=0.1, help="fraction of cases held out for validation")
    train.add_argument("--time-limit-min", type=float, default=0.0, help="per-phase wall-time limit, minutes")
    train.add_argument("--no-adversarial", action="store_true", help="stage 2 without the adversarial loss")
    train.add_argument("--resume", action="store_true", help="continue the run in --run from its checkpoint")
    train.add_argument("--stop-after", choices=["fast_dose", "stage1", "stage2"], default=None,
                       help="end the run after this phase without exporting a model (resume a copy of the run "
                            "folder to branch the remaining phases)")
    train.add_argument("--init-from", type=Path, default=None,
                       help="start from this model folder's networks (fine-tuning; its grids and normalisation "
                            "are kept); give 0 fast-dose epochs to keep its fast dose network as it is")
    train.add_argument("--seed", type=int, default=0, help="random seed")
    train.add_argument("--note", default="", help="free text recorded in model.json (how and why it was trained)")


def load_clinical_record(folder: Path, settings: Settings) -> Any:
    """Read one clinical export (CT + RTSTRUCT + RT Plan) into a training record.

    Returns
    -------
    pipeline.training.train.PlanRecord

    Raises
    ------
    InputError
        No RT Plan, several, not a single-arc VMAT plan on the configured MLC and arc, or an
        isocenter away from the PTV centroid; the message says which and why.
    """
    import pydicom

    from appliance.dicom.case_loader import load_folder
    from appliance.dicom.rtplan_reader import arc_sequence_from_beam, read_rtplan
    from core.errors import ExportError
    from pipeline.training.train import PlanRecord

    plans = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["Modality"])
            except Exception:
                continue
            if ds.get("Modality") == "RTPLAN":
                plans.append(p)
    if len(plans) != 1:
        raise InputError(f"{folder}: expected exactly one RT Plan, found {len(plans)}; keep one plan per patient folder")
    plan = read_rtplan(plans[0])
    where = f"{folder} (plan {plan.sop_instance_uid})"
    if len(plan.beams) != 1:
        raise InputError(f"{where}: {len(plan.beams)} treatment beams; only single-arc VMAT plans can be learned")
    beam = plan.beams[0]
    machine, arc = settings.machine.model(), settings.machine.arc()
    try:
        seq = arc_sequence_from_beam(beam)
    except ExportError as exc:
        raise InputError(f"{where}: not a single-arc VMAT beam: {exc}") from exc
    if beam.leaf_boundaries_mm is None or beam.leaf_boundaries_mm.shape != (len(machine.leaf_boundaries_mm),) or \
            not np.allclose(beam.leaf_boundaries_mm, machine.leaf_boundaries_mm, atol=0.01):
        raise InputError(f"{where}: the MLC is not the configured {machine.name} MLC (leaf boundaries differ)")
    expected = arc.control_point_angles_deg()
    if seq.n_control_points != expected.shape[0] or \
            np.abs((seq.gantry_deg - expected + 180.0) % 360.0 - 180.0).max() > 1.0:
        raise InputError(f"{where}: {seq.n_control_points} control points at other gantry angles than the "
                         f"configured arc ({expected.shape[0]} from {arc.start_deg} to {arc.stop_deg}); "
                         "re-sample the plan or change machine.arc settings")
    if abs((seq.collimator_deg - arc.collimator_deg + 180.0) % 360.0 - 180.0) > 0.5:
        raise InputError(f"{where}: collimator {seq.collimator_deg} deg, the configured arc uses {arc.collimator_deg}")
    case = load_folder(folder, structures=settings.structures, prescription=settings.profile().to_prescription())
    if beam.isocenter_mm is not None:
        offset = float(np.linalg.norm(np.asarray(beam.isocenter_mm) - np.asarray(case.ptv_centroid_mm())))
        if offset > MAX_ISOCENTER_OFFSET_MM:
            raise InputError(f"{where}: isocenter {offset:.1f} mm from the PTV centroid (at most "
                             f"{MAX_ISOCENTER_OFFSET_MM} mm); the networks assume an isocenter at the centroid")
    log.info("clinical case %s: plan %s, %.0f MU", case.case_id, plan.sop_instance_uid, seq.total_mu)
    return PlanRecord(name=case.case_id, sequence=seq, case=case)


def _make_data(args: argparse.Namespace, settings: Settings, device: str) -> int:
    from tqdm import tqdm

    from appliance.config import PlanningMethod
    from appliance.plan_process import planning_memory_policy
    from appliance.planning import planning_options
    from pipeline.training.data import generate_cache, parse_seed_range

    if args.out is None:
        raise ConfigError("--make-data needs --out CACHE_FOLDER")
    planning_memory_policy()  # one case after another in this process, as in the node's planning process
    seeds = parse_seed_range(args.seeds)
    profile = settings.profile(args.profile or None)
    options = planning_options(settings, PlanningMethod.OPTIMIZE, device, profile)
    bar = tqdm(total=len(seeds), desc="planning teacher cases", unit="case")

    def progress(seed: int, done: int, total: int) -> None:
        bar.update(1)
        bar.set_postfix(seed=seed)

    paths = generate_cache(args.out, seeds, options=options, prescription=profile.to_prescription(),
                           machine=settings.machine.model(), arc=settings.machine.arc(), profile=profile.name,
                           isotropic_mm=args.isotropic_mm, progress=progress)
    bar.close()
    print(f"{len(paths)} cases in {args.out}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    import json

    from pipeline.training.data import summarise_cache

    if not args.cache:
        raise ConfigError("--summary needs --cache CACHE_FOLDER (repeatable)")
    for cache in args.cache:
        print(f"{cache}: " + json.dumps(summarise_cache(cache), indent=1))
    return 0


def _train(args: argparse.Namespace, settings: Settings, device: str) -> int:
    from tqdm import tqdm

    from pipeline.training.data import list_cache, load_cached_plan, read_cache_description
    from pipeline.training.samples import build_store
    from pipeline.training.train import (
        PlanRecord,
        TrainConfig,
        Trainer,
        default_spec,
        describe_start_model,
        size_configs,
        split_records,
    )

    records: list[PlanRecord] = []
    description: dict[str, Any] = {"synthetic": [], "clinical": []}
    for cache in args.cache:
        desc = read_cache_description(cache)
        plans = [load_cached_plan(p) for p in list_cache(cache)]
        spacing = float(desc.get("case_spacing_mm", 4.0))
        rx = desc.get("prescription")
        prescription = (Prescription(dose_gy=float(rx["dose_gy"]), fractions=int(rx["fractions"])) if rx
                        else Prescription())
        records += [PlanRecord(f"synth{p.seed}", p.sequence, teacher=p.case, prescription=prescription)
                    if p.case is not None else
                    PlanRecord(f"synth{p.seed}", p.sequence, seed=p.seed, case_spacing_mm=spacing) for p in plans]
        keys = {k for p in plans for k in p.info}
        teacher = {k: float(np.nanmedian([p.info[k] for p in plans if k in p.info])) for k in sorted(keys)}
        description["synthetic"].append({"cache": Path(cache).name, "n_cases": len(plans),
                                         "seeds": [p.seed for p in plans], "recipe": desc,
                                         "teacher_plans_median": teacher})
    for root in args.clinical:
        for sub in sorted(p for p in Path(root).iterdir() if p.is_dir()):
            try:
                records.append(load_clinical_record(sub, settings))
            except InputError as exc:
                log.warning("skipping clinical case: %s", exc)
                print(f"skipped: {exc}")
        description["clinical"].append({"folder": Path(root).name})
    if args.max_cases > 0:
        records = records[: args.max_cases]
    if not records:
        raise InputError("no training cases: give --cache folders made by --make-data and/or --clinical exports")
    config = TrainConfig(size=args.size, epochs=dict(zip(("fast_dose", "stage1", "stage2"), args.epochs)),
                         lr=args.lr, lr_final_fraction=args.lr_final_fraction, val_fraction=args.val_fraction,
                         adversarial=not args.no_adversarial,
                         time_limit_min=args.time_limit_min, seed=args.seed)
    machine, arc = settings.machine.model(), settings.machine.arc()
    if args.init_from is not None:
        import json

        from pipeline.ai_planner import ModelSpec

        try:
            meta = json.loads((args.init_from / "model.json").read_text(encoding="utf-8"))["meta"]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"--init-from {args.init_from}: no readable model.json ({exc})") from None
        spec = ModelSpec.from_meta(meta)
    else:
        spec = default_spec(records, machine, hu_to_density=tuple(settings.planning.hu_to_density))
    fast_cfg = size_configs(args.size)["fast_dose"][1]
    train_r, val_r = split_records(records, config.val_fraction)
    bar = tqdm(total=len(records), desc="building samples", unit="case")
    store = build_store(args.sample_store or args.run / "samples", records, machine=machine, arc=arc, spec=spec,
                        fast_config=fast_cfg, n_perturbed=config.n_perturbed, seed=config.seed, device=device,
                        progress=lambda name, done, total: bar.update(1))
    bar.close()
    share = max(0, args.samples_in_memory)
    train_s = store.subset([r.name for r in train_r], in_memory=share)
    val_s = store.subset([r.name for r in val_r], in_memory=max(0, share - len(train_r)))
    description["train_cases"] = [r.name for r in train_r]
    description["val_cases"] = [r.name for r in val_r]
    trainer = Trainer(args.run, train_s, val_s, spec, config, device, data_description=description)
    if args.resume:
        trainer.load_checkpoint()
        if args.init_from is not None:  # the weights come from the checkpoint; keep the record of the start
            trainer.data_description["initialised_from"] = describe_start_model(args.init_from)
    elif args.init_from is not None:
        trainer.init_from_model(args.init_from)
    trainer.run(stop_after=args.stop_after)
    if args.stop_after is not None and trainer.phase_index < 3:
        print(f"stopped after {args.stop_after}; checkpoint in {trainer.checkpoint_path} (resume with --resume)")
        return 0
    out = args.model_out or (args.run / "model")
    path = trainer.export(out, {"note": args.note} if args.note else None)
    print(f"model written: {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Make data or train, as the arguments say."""
    import torch

    from appliance.planning import resolve_device

    settings = load_settings(args.config)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.make_data:
        return _make_data(args, settings, device)
    if args.summary:
        return _summary(args)
    return _train(args, settings, device)
