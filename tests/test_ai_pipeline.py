"""The AIRT AI pipeline: inference, the training-data cache, the clinical loader, training and resume."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from appliance.config import Settings
from core.case import PatientPosition, Prescription, Role
from core.errors import ConfigError, InputError
from core.machine import ArcSpec, MachineModel
from pipeline.ai_model import SHIPPED_MODEL_DIR
from pipeline.ai_planner import MODULE_KEYS, ModelSpec, predict_candidates, predict_fluence
from pipeline.geometry import ArcGeometry
from pipeline.synth import draw_params, draw_variety_params, synth_case
from pipeline.training.data import (
    RESERVED_SEEDS,
    TEACHER_CTS,
    CachedPlan,
    TeacherCase,
    TeacherCt,
    load_cached_plan,
    parse_seed_range,
    quantise_sequence,
    save_cached_plan,
    teacher_case,
)
from pipeline.training.samples import build_sample
from pipeline.training.train import PlanRecord, TrainConfig, Trainer, size_configs
from sequencing.fluence import fluence_from_sequence, synthetic_arc_fluence
from sequencing.sequencer import ArcSequence, sequence_arc

MACHINE = MachineModel()
ARC = ArcSpec()
SPEC = ModelSpec(fluence_mu_per_rx_gy=1.2)


def teacher_sequence(seed: int) -> ArcSequence:
    """A cheap sequenced arc (synthetic two-level maps, ~8 Gy-ish), standing in for an optimizer plan."""
    fl = synthetic_arc_fluence(ARC, MACHINE, seed=seed, mu_per_sector=8.0)
    return sequence_arc(np.asarray(fl, dtype=np.float32), ARC, MACHINE)


def geometry_of(case: object) -> ArcGeometry:
    return ArcGeometry(arc=ARC, isocenter_mm=case.ptv_centroid_mm(), position=case.patient_position,  # type: ignore[attr-defined]
                       machine=MACHINE)


@pytest.fixture(scope="module")
def tiny_samples() -> list:
    recs = [PlanRecord(f"synth{s}", quantise_sequence(teacher_sequence(s)), seed=s, case_spacing_mm=8.0) for s in (3, 4)]
    fast = size_configs("tiny")["fast_dose"][1]
    return [build_sample(r, machine=MACHINE, arc=ARC, spec=SPEC, fast_config=fast, n_perturbed=1) for r in recs]


def _check_fluence(fluence: np.ndarray, module_ms: dict[str, float]) -> None:
    assert fluence.shape == (ARC.n_sectors, MACHINE.bev.n_rows, MACHINE.bev.n_cols)
    assert fluence.dtype == np.float32
    assert np.isfinite(fluence).all() and fluence.min() >= 0.0 and fluence.max() > 0.0
    assert list(module_ms) == list(MODULE_KEYS)
    assert all(v >= 0 for v in module_ms.values())
    assert module_ms["total"] >= module_ms["DoseProposer"] + module_ms["Bev2Fluence"]


def test_shipped_model_predicts_fluence_and_records_its_training() -> None:
    meta = json.loads((SHIPPED_MODEL_DIR / "model.json").read_text())
    assert set(meta["networks"]) >= {"dose_proposer", "bev2fluence", "fast_dose", "correction"}
    assert meta["meta"]["training"]["n_train_cases"] >= 1
    assert "not clinically validated" in meta["meta"]["warning"]
    case = synth_case(11, spacing_mm=(8.0, 8.0, 8.0))
    fl, ms = predict_fluence(case, "", geometry=geometry_of(case), rx_gy=8.0,
                             sparing={Role.BLADDER: 0.0, Role.RECTUM: 0.0}, device="cpu")
    _check_fluence(fl, ms)
    fl2, _ = predict_fluence(case, "", geometry=geometry_of(case), rx_gy=16.0, sparing={}, device="cpu")
    np.testing.assert_allclose(fl2, 2.0 * fl, rtol=1e-4, atol=1e-5)  # fluence scales with Rx (normalisation)


def test_fresh_tiny_model_folder_predicts_and_sparing_changes_the_fluence(tmp_path: Path, tiny_samples: list) -> None:
    trainer = Trainer(tmp_path / "run", tiny_samples[:1], [], SPEC,
                      TrainConfig(size="tiny", epochs={"fast_dose": 0, "stage1": 0, "stage2": 0}), progress=False)
    trainer.export(tmp_path / "model")
    case = synth_case(5, spacing_mm=(8.0, 8.0, 8.0))
    fl0, ms = predict_fluence(case, str(tmp_path / "model"), geometry=geometry_of(case), rx_gy=8.0, sparing={},
                              device="cpu")
    _check_fluence(fl0, ms)
    fl1, _ = predict_fluence(case, str(tmp_path / "model"), geometry=geometry_of(case), rx_gy=8.0,
                             sparing={Role.BLADDER: 0.4, Role.RECTUM: 0.4}, device="cpu")
    assert not np.allclose(fl0, fl1)  # the suppression factors reach the correction network
    cands = predict_candidates(case, str(tmp_path / "model"), geometry=geometry_of(case), rx_gy=8.0,
                               sparings=[{}, {Role.BLADDER: 0.4, Role.RECTUM: 0.4}])
    assert [c[0] for c in cands] == [{}, {"bladder": 0.4, "rectum": 0.4}]
    np.testing.assert_allclose(cands[0][1], fl0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cands[1][1], fl1, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="must be in"):
        predict_fluence(case, str(tmp_path / "model"), geometry=geometry_of(case), rx_gy=8.0,
                        sparing={Role.RECTUM: 1.0}, device="cpu")
    with pytest.raises(ConfigError, match="no trained model"):
        predict_fluence(case, str(tmp_path / "nothing"), geometry=geometry_of(case), rx_gy=8.0, sparing={})


def test_cache_round_trip_regenerates_the_same_target_fluence(tmp_path: Path) -> None:
    seq = teacher_sequence(2)
    q = quantise_sequence(seq)
    path = save_cached_plan(tmp_path, CachedPlan(42, q, {"ptv_HI": 0.1}))
    assert path.stat().st_size < 40_000  # compact: a few hundred cases fit in a few MB
    back = load_cached_plan(path)
    assert back.seed == 42 and back.info == {"ptv_HI": 0.1}
    np.testing.assert_array_equal(fluence_from_sequence(back.sequence, MACHINE), fluence_from_sequence(q, MACHINE))
    assert np.abs(back.sequence.leaves_mm - seq.leaves_mm).max() <= 0.05 + 1e-9
    np.testing.assert_allclose(back.sequence.cumulative_mu, seq.cumulative_mu, rtol=1e-6)
    exact, quant = fluence_from_sequence(seq, MACHINE), fluence_from_sequence(back.sequence, MACHINE)
    assert np.abs(exact - quant).max() < 0.02 * exact.max()
    (tmp_path / "case_000007.npz").write_bytes(b"not an npz")
    with pytest.raises(InputError, match="cannot read cached plan"):
        load_cached_plan(tmp_path / "case_000007.npz")
    assert parse_seed_range("3:6") == [3, 4, 5] and parse_seed_range("3-5") == [3, 4, 5]
    with pytest.raises(ConfigError):
        parse_seed_range("x:y")


def test_make_data_is_resumable_and_plans_with_the_configured_planner(tmp_path: Path) -> None:
    from appliance import cmd_train

    config = tmp_path / "airt.toml"
    config.write_text("[planning]\noptimizer_iterations = 2\narc_optimizer_iterations = 2\noptimizer_arc_iterations = 2\n"
                      "rescue_rounds = 0\n")
    parser = argparse.ArgumentParser()
    cmd_train.add_arguments(parser)
    args = parser.parse_args(["--make-data", "--seeds", "10006:10007", "--out", str(tmp_path / "cache"),
                              "--isotropic-mm", "8", "--device", "cpu", "--config", str(config)])
    assert cmd_train.run(args) == 0
    path = tmp_path / "cache" / "case_010006.npz"
    plan = load_cached_plan(path)
    assert plan.seed == 10006 and plan.sequence.total_mu > 0
    assert plan.case == teacher_case(10006, isotropic_mm=8.0) and plan.case.ct.pixel_mm == 8.0
    assert {"planning_s", "ptv_HI", "ptv_D98_rel", "all_p1_met", "p2_met", "rectum_Dmean_Gy"} <= set(plan.info)
    stamp = path.stat().st_mtime_ns
    assert cmd_train.run(args) == 0  # resumed: nothing re-planned
    assert path.stat().st_mtime_ns == stamp
    desc = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert desc["format"] == 2 and desc["profile"] == Settings().planning.profile
    planner = desc["planner_settings"]
    # the teacher is the configured full planner: goals, arc optimisation, the appliance's threshold
    assert planner["source"] == "optimize" and planner["optimizer_iterations"] == 2
    assert planner["arc"]["iterations"] == 2 and planner["goals"] and planner["rescue_rounds"] == 0
    assert planner["sequencer_threshold"] == Settings().planning.aperture_threshold
    other = tmp_path / "other.toml"
    other.write_text("[planning]\noptimizer_iterations = 5\n")
    changed = parser.parse_args(["--make-data", "--seeds", "10006:10007", "--out", str(tmp_path / "cache"),
                                 "--isotropic-mm", "8", "--config", str(other)])
    with pytest.raises(ConfigError, match="planner_settings differ"):
        cmd_train.run(changed)
    reserved = parser.parse_args(["--make-data", "--seeds", "2000:2001", "--out", str(tmp_path / "c2")])
    with pytest.raises(ConfigError, match="reserved for the benchmark case sets"):
        cmd_train.run(reserved)
    assert not (tmp_path / "c2").exists()


def test_teacher_cases_vary_ct_and_anatomy_and_keep_the_gate_cases_out() -> None:
    from benchmarks.bench_arc import CASE_SETS, HELDOUT_CTS

    specs = [teacher_case(s) for s in range(10000, 10060)]
    assert specs == [teacher_case(s) for s in range(10000, 10060)]  # drawn from the seed alone
    assert {c.ct for c in specs} == set(TEACHER_CTS)
    assert 15 < sum(c.wide for c in specs) < 45
    assert {c.ct.position for c in specs} == {PatientPosition.HFS, PatientPosition.FFS}
    heldout = {(g.matrix, g.pixel_mm, g.slice_mm, g.position) for g in HELDOUT_CTS}
    assert not heldout & {(c.matrix, c.pixel_mm, c.slice_mm, c.position.value) for c in TEACHER_CTS}
    assert all(any(first in r for r in RESERVED_SEEDS) for first in CASE_SETS.values())
    for seed in (2000, 2019, 5000, 5019):
        with pytest.raises(ConfigError, match="reserved"):
            teacher_case(seed)
    wide = next(c for c in specs if c.wide)
    assert draw_variety_params(wide.seed) != draw_params(wide.seed)
    assert any(a.startswith("wide_") for a in draw_variety_params(wide.seed).augmented)


def test_a_teacher_case_is_built_on_its_ct_geometry_and_position() -> None:
    spec = TeacherCase(seed=10001, ct=TeacherCt(64, 7.5, 6.0, 50, PatientPosition.FFS), wide=True)
    case = spec.case(Prescription(dose_gy=60.0, fractions=20))
    assert case.grid.shape == (50, 64, 64) and case.grid.spacing_mm == (7.5, 7.5, 6.0)
    assert case.patient_position is PatientPosition.FFS and case.prescription.dose_gy == 60.0
    assert case.masks[Role.PTV].any() and case.masks[Role.RECTUM].any()
    # the same anatomy as the generator's on that grid
    from pipeline.synth import synth_anatomy

    anat = synth_anatomy(10001, spec.ct.grid(), params=draw_variety_params(10001))
    assert np.array_equal(case.masks[Role.BLADDER], anat.role_masks()[Role.BLADDER])
    with pytest.raises(InputError, match="parameters of seed"):
        synth_anatomy(10002, spec.ct.grid(), params=draw_variety_params(10001))


@pytest.mark.slow
def test_training_steps_are_finite_and_checkpoints_resume(tmp_path: Path, tiny_samples: list) -> None:
    cfg = TrainConfig(size="tiny", epochs={"fast_dose": 1, "stage1": 1, "stage2": 1}, disc_maps=8)
    trainer = Trainer(tmp_path / "run", tiny_samples[:1], tiny_samples[1:], SPEC, cfg, progress=False)
    first = trainer.fast_dose_step(tiny_samples[0])
    for _ in range(3):
        last = trainer.fast_dose_step(tiny_samples[0])
    assert np.isfinite(list(last.values())).all() and last["loss"] < first["loss"]

    history = trainer.run()  # one epoch of each phase, validation after each
    assert [r["phase"] for r in history] == ["fast_dose", "stage1", "stage2"]
    for r in history:
        assert all(np.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert "val_loss" in r
    assert {"train_proposer", "train_fluence1", "train_dose1", "train_dose_error1", "train_fluence",
            "train_dose_error"} <= set(history[1])
    assert {"train_d_hinge", "train_r1", "train_g_hinge", "train_fluence", "train_dose_error"} <= set(history[2])
    assert (tmp_path / "run" / "log.csv").read_text().count("\n") == 4

    resumed = Trainer(tmp_path / "run", tiny_samples[:1], tiny_samples[1:], SPEC, cfg, progress=False)
    before = {k: v.clone() for k, v in resumed.pipe.correction.state_dict().items()}
    resumed.load_checkpoint()
    after = resumed.pipe.correction.state_dict()
    for k, v in trainer.pipe.correction.state_dict().items():
        torch.testing.assert_close(after[k], v)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert resumed.phase_index == 3 and resumed.run() == history  # finished run: nothing left to do
    with pytest.raises(ConfigError, match="another grid"):
        Trainer(tmp_path / "run", tiny_samples[:1], [], dataclasses.replace(SPEC, net_grid_mm=6.0), cfg,
                progress=False).load_checkpoint()


@pytest.mark.slow
def test_stop_after_stage1_branches_stage2(tmp_path: Path, tiny_samples: list) -> None:
    cfg = TrainConfig(size="tiny", epochs={"fast_dose": 1, "stage1": 1, "stage2": 1}, disc_maps=8)
    trainer = Trainer(tmp_path / "run", tiny_samples[:1], [], SPEC, cfg, progress=False)
    history = trainer.run(stop_after="stage1")
    assert [r["phase"] for r in history] == ["fast_dose", "stage1"] and trainer.phase_index == 2
    # the same stage 1, continued without the adversarial loss (the "-GAN" ablation)
    nogan = Trainer(tmp_path / "run", tiny_samples[:1], [], SPEC, dataclasses.replace(cfg, adversarial=False),
                    progress=False)
    nogan.load_checkpoint()
    rows = nogan.run()
    assert [r["phase"] for r in rows] == ["fast_dose", "stage1", "stage2"]
    assert "train_d_hinge" not in rows[2] and rows[2]["train_g_hinge"] == 0.0
    with pytest.raises(ConfigError, match="stop_after"):
        nogan.run(stop_after="stage3")
    # cosine learning-rate decay within a phase: lr at the first epoch, lr * final fraction at the last
    five = Trainer(tmp_path / "run5", tiny_samples[:1], [], SPEC,
                   dataclasses.replace(cfg, epochs={"fast_dose": 5, "stage1": 1, "stage2": 1}), progress=False)
    lrs = [five.phase_lr("fast_dose", e) for e in range(5)]
    assert lrs[0] == pytest.approx(cfg.lr) and lrs[-1] == pytest.approx(cfg.lr * cfg.lr_final_fraction)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    assert rows[1]["lr"] == pytest.approx(cfg.lr)  # a one-epoch phase keeps the base rate


def test_clinical_loader_reads_our_own_plan_and_refuses_others(tmp_path: Path) -> None:
    from appliance.cmd_train import load_clinical_record
    from appliance.dicom.case_loader import load_folder
    from appliance.dicom.rtplan import write_rtplan
    from appliance.synth_dicom import write_synth_case

    st = Settings()
    folder = tmp_path / "patient1"
    write_synth_case(folder, 9, n_slices=40, slice_mm=5.0, matrix=128, pixel_mm=3.9)
    case = load_folder(folder, structures=st.structures, prescription=st.profile().to_prescription())
    seq = teacher_sequence(9)
    write_rtplan(folder / "rtplan.dcm", sequence=seq, machine=MACHINE, case=case, isocenter_mm=case.ptv_centroid_mm(),
                 fractions=5, rx_gy=40.0, dose_rate_mu_min=600.0)
    rec = load_clinical_record(folder, st)
    assert rec.case is not None and rec.seed is None
    np.testing.assert_allclose(fluence_from_sequence(rec.sequence, MACHINE), fluence_from_sequence(seq, MACHINE),
                               atol=1e-3 * float(seq.total_mu))
    other = dataclasses.replace(st, machine=dataclasses.replace(st.machine, collimator_deg=10.0))
    with pytest.raises(InputError, match="collimator"):
        load_clinical_record(folder, other)
    (folder / "rtplan.dcm").rename(tmp_path / "away.dcm")
    with pytest.raises(InputError, match="exactly one RT Plan"):
        load_clinical_record(folder, st)
