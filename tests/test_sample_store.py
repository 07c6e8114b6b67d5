"""Training samples on disk (``pipeline.training.samples``) and ``airt train`` on a teacher cache."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from core.case import PatientPosition, Prescription
from core.errors import ConfigError, InputError
from pipeline.ai_planner import ModelSpec
from pipeline.training.data import TeacherCase, TeacherCt, quantise_sequence, summarise_cache
from pipeline.training.samples import SampleStore, build_sample, build_store, record_digest, sample_path
from pipeline.training.train import PlanRecord, TrainConfig, Trainer, size_configs
from tests.test_ai_pipeline import ARC, MACHINE, SPEC, teacher_sequence

FAST = size_configs("tiny")["fast_dose"][1]


def _records() -> list[PlanRecord]:
    ffs = TeacherCase(seed=10003, ct=TeacherCt(64, 8.0, 8.0, 38, PatientPosition.FFS), wide=True)
    return [PlanRecord("synth3", quantise_sequence(teacher_sequence(3)), seed=3, case_spacing_mm=8.0),
            PlanRecord("teacher10003", quantise_sequence(teacher_sequence(4)), teacher=ffs,
                       prescription=Prescription(40.0, 5))]


def _same(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), atol=atol, rtol=0.0))


def test_a_stored_sample_reads_back_as_the_sample_built_in_memory(tmp_path: Path) -> None:
    records = _records()
    kw = {"machine": MACHINE, "arc": ARC, "spec": SPEC, "fast_config": FAST, "n_perturbed": 1, "seed": 7}
    store = build_store(tmp_path / "s", records, **kw, in_memory=1)  # type: ignore[arg-type]
    assert len(store) == 2 and [s.name for s in store] == ["synth3", "teacher10003"]
    for record, stored in zip(records, store, strict=True):
        direct = build_sample(record, **kw)  # type: ignore[arg-type]
        assert _same(stored.fluence, direct.fluence) and _same(stored.dose, direct.dose)
        assert _same(stored.prep.inputs, direct.prep.inputs)
        assert stored.prep.masks.keys() == direct.prep.masks.keys()
        assert _same(stored.prep.primary.sample_grid, direct.prep.primary.sample_grid)
        assert _same(stored.prep.primary.weight, direct.prep.primary.weight)
        assert all(_same(a[0], b[0]) and _same(a[1], b[1]) for a, b in zip(stored.extra, direct.extra, strict=True))
    # fluence targets are stored in float16: within half a unit in the last place of their scale
    exact = build_sample(records[0], **kw).fluence  # type: ignore[arg-type]
    assert float((store[0].fluence - exact).abs().max()) <= 1e-3 * float(exact.abs().max())
    # the last sample read is kept, the others are read again
    kept = store[1]
    assert store[1] is kept
    _ = store[0]
    assert store[1] is not kept and store[1].name == kept.name
    # resumed: nothing rebuilt
    files = {r.name: sample_path(tmp_path / "s", r.name, record_digest(r)) for r in records}
    stamps = {n: f.stat().st_mtime_ns for n, f in files.items()}
    again = build_store(tmp_path / "s", records, **kw)  # type: ignore[arg-type]
    assert {n: f.stat().st_mtime_ns for n, f in files.items()} == stamps
    assert again.subset(["teacher10003"], in_memory=0)[0].name == "teacher10003"
    # other settings are refused, a missing case is named
    with pytest.raises(ConfigError, match="seed differ"):
        build_store(tmp_path / "s", records, **{**kw, "seed": 8})  # type: ignore[arg-type]
    # a record whose plan changed is another sample, not the stale one
    changed = dataclasses.replace(records[0], sequence=quantise_sequence(teacher_sequence(5)))
    assert record_digest(changed) != record_digest(records[0])
    assert not sample_path(tmp_path / "s", "synth3", record_digest(changed)).exists()
    entries = [(r.name, record_digest(r)) for r in records]
    with pytest.raises(InputError, match="lacks 1 case"):
        SampleStore(tmp_path / "s", [*entries, ("synth99", "0" * 16)], machine=MACHINE, arc=ARC, spec=SPEC,
                    fast_config=FAST)
    files["synth3"].write_bytes(b"truncated")
    with pytest.raises(InputError, match="cannot read stored sample"):
        _ = SampleStore(tmp_path / "s", entries[:1], machine=MACHINE, arc=ARC, spec=SPEC, fast_config=FAST)[0]


def test_the_trainer_runs_on_a_store_read_on_demand(tmp_path: Path) -> None:
    store = build_store(tmp_path / "s", _records(), machine=MACHINE, arc=ARC, spec=SPEC, fast_config=FAST,
                        n_perturbed=1, seed=0, in_memory=0)
    trainer = Trainer(tmp_path / "run", store.subset(["synth3"], in_memory=0), store.subset(["teacher10003"], in_memory=0),
                      SPEC, TrainConfig(size="tiny", epochs={"fast_dose": 1, "stage1": 1, "stage2": 1}, disc_maps=4),
                      progress=False)
    history = trainer.run()
    assert [r["phase"] for r in history] == ["fast_dose", "stage1", "stage2"]
    assert all("val_loss" in r and r["val_loss"] == r["val_loss"] for r in history)


@pytest.mark.slow
def test_airt_train_makes_a_model_from_a_teacher_cache(tmp_path: Path) -> None:
    from appliance import cmd_train

    config = tmp_path / "airt.toml"
    config.write_text("[planning]\noptimizer_iterations = 2\narc_optimizer_iterations = 2\noptimizer_arc_iterations = 2\n"
                      "rescue_rounds = 0\n")
    parser = argparse.ArgumentParser()
    cmd_train.add_arguments(parser)
    common = ["--config", str(config), "--device", "cpu"]
    assert cmd_train.run(parser.parse_args(["--make-data", "--seeds", "10010:10012", "--out", str(tmp_path / "cache"),
                                            "--isotropic-mm", "8", *common])) == 0
    summary = summarise_cache(tmp_path / "cache")
    assert summary["cases"] == 2 and summary["seeds"] == [10010, 10011] and summary["p1_recorded"] == 2
    assert sum(summary["ct_geometries"].values()) == 2 and all("/8mm/8mm/" in k for k in summary["ct_geometries"])
    assert 0 < summary["ptv_HI_median"] < 1 and summary["planning_s_median"] > 0
    assert cmd_train.run(parser.parse_args(["--summary", "--cache", str(tmp_path / "cache"), *common])) == 0
    args = parser.parse_args(["--cache", str(tmp_path / "cache"), "--run", str(tmp_path / "run"), "--size", "tiny",
                              "--epochs", "1", "1", "1", "--samples-in-memory", "0", *common])
    assert cmd_train.run(args) == 0
    meta = json.loads((tmp_path / "run" / "model" / "model.json").read_text())["meta"]
    data = meta["training"]["data"]
    assert data["train_cases"] == ["synth10010"] and data["val_cases"] == ["synth10011"]
    cache = data["synthetic"][0]
    assert cache["seeds"] == [10010, 10011] and cache["recipe"]["format"] == 2
    assert cache["recipe"]["planner_settings"]["optimizer_iterations"] == 2
    assert {"ptv_HI", "all_p1_met", "planning_s"} <= set(cache["teacher_plans_median"])
    store = tmp_path / "run" / "samples"
    assert json.loads((store / "store.json").read_text())["spec"] == ModelSpec.from_meta(meta).to_meta()
    assert sorted(p.name.split("-")[0] for p in store.glob("*.pt")) == ["synth10010", "synth10011"]
    assert "qualified_for_auto" not in meta  # a new model is not gated
