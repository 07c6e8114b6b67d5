"""``airt plan --method ai`` end to end with candidate plans, the model's sequencing threshold,
fine-tuning from a model folder, and the delivery file list."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch

from appliance.config import Settings, settings_from_dict
from appliance.planning import candidate_folder_name
from appliance.scu import result_files
from core.errors import ConfigError
from pipeline.ai_planner import ModelSpec, choose_aperture_threshold, predict_fluence
from pipeline.training.train import TrainConfig, Trainer
from tests.conftest import plan_synthetic_case_cli, require_tool
from tests.test_ai_pipeline import ARC, MACHINE, SPEC, teacher_sequence

CONFIG = """
[planning]
method = "ai"
dose_grid_mm = 5.0
"""


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _, _, out, stdout = plan_synthetic_case_cli(tmp_path_factory.mktemp("ai_e2e"), 12, CONFIG,
                                                "--candidate", "0:0.4", "--candidate", "0.4:0")
    return {"out": out, "stdout": stdout, "metrics": json.loads((out / "metrics.json").read_text())}


@pytest.mark.slow
def test_jobs_show_lists_the_candidates(planned: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cmd_jobs import _print_metrics

    _print_metrics(planned["metrics"])
    text = capsys.readouterr().out
    assert "Candidate plans" in text
    assert "method ai; networks' fluence refined by 20 optimizer evaluations on" in text
    rows = [ln for ln in text.splitlines() if ln.strip().endswith(tuple(c["folder"] for c in planned["metrics"]["candidates"]))]
    assert len(rows) == 2 and rows[0].split()[:2] == ["0.00", "0.40"] and rows[1].split()[:2] == ["0.40", "0.00"]


@pytest.mark.slow
def test_ai_plan_with_candidates(planned: dict[str, Any]) -> None:
    out: Path = planned["out"]
    m = planned["metrics"]
    assert m["method"] == "ai"
    assert set(m["ai_module_ms"]) >= {"DoseProposer", "Bev2Fluence", "DL dose", "fluence correction", "total"}
    # the arc optimisation started from leaf sweeps of the refined fluence (no threshold search)
    assert m["arc_start"]["kind"] == "sweep" and m["arc_start"]["mu"] > 0
    assert "ai_sequencing" not in m
    # the candidates are not arc-optimised: the rule-based sequencer at the first threshold (in the
    # configured order) whose plan covers the PTV
    for c in m["candidates"]:
        seq_choice = c["ai_sequencing"]
        assert "arc_start" not in c and c["sequencer_aperture_threshold"] == seq_choice["threshold"]
        tried = [t["threshold"] for t in seq_choice["tries"]]
        assert tried == list(Settings().planning.ai_aperture_thresholds[: len(tried)])
        if seq_choice["tries"][-1]["accepted"]:
            assert tried[-1] == seq_choice["threshold"]
            assert seq_choice["tries"][-1]["ptv_D98_rel"] >= 0.97 and seq_choice["tries"][-1]["ptv_HI"] <= 0.10
        assert not any(t["accepted"] for t in seq_choice["tries"][:-1])
    # the main plan's fluence was refined near the target (the candidates are the networks' alone)
    refine = m["ai_refine"]
    assert refine["iterations"] == Settings().planning.ai_refine_iterations > 0
    assert refine["loss_end"] < refine["loss_start"] and refine["voxels"] > 0
    assert m["timings_s"]["ai_refine"] > 0 and not any("ai_refine" in c for c in m["candidates"])
    assert m["structures"]["ptv"]["D95_Gy"] == pytest.approx(40.0, rel=0.02)
    names = [c["folder"] for c in m["candidates"]]
    assert names == [f"candidates/{candidate_folder_name(0.0, 0.4)}", f"candidates/{candidate_folder_name(0.4, 0.0)}"]
    uids = {m["plan"]["rtplan_sop_instance_uid"]}
    for c in m["candidates"]:
        folder = out / c["folder"]
        plan = pydicom.dcmread(folder / "rtplan.dcm")
        dose = pydicom.dcmread(folder / "rtdose.dcm")
        assert plan.ApprovalStatus == "UNAPPROVED"
        assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
        assert plan.SOPInstanceUID == c["rtplan_sop_instance_uid"]
        uids.add(plan.SOPInstanceUID)
        assert c["structures"]["ptv"]["D95_Gy"] == pytest.approx(40.0, rel=0.02)  # each plan normalised itself
        sub = json.loads((folder / "metrics.json").read_text())
        assert "not clinically approved" in sub["disclaimer"] and sub["sparing"] == c["sparing"]
        assert any(ln.strip().endswith(c["folder"]) for ln in planned["stdout"].splitlines())  # the summary's table
    assert len(uids) == 3  # three distinct plans
    # suppressing the rectum or the bladder gives different plans (the sparing reaches the correction network)
    assert m["candidates"][0]["total_MU"] != pytest.approx(m["candidates"][1]["total_MU"], rel=1e-6)
    assert m["candidates"][0]["total_MU"] != pytest.approx(m["plan"]["total_MU"], rel=1e-6)
    # a delivery sends the main plan and dose first, then each candidate's
    files = result_files(out)
    assert [p.relative_to(out).as_posix() for p in files] == [
        "rtplan.dcm", "rtdose.dcm",
        f"{names[0]}/rtplan.dcm", f"{names[0]}/rtdose.dcm", f"{names[1]}/rtplan.dcm", f"{names[1]}/rtdose.dcm"]


@pytest.mark.slow
def test_candidate_plan_passes_dciodvfy(planned: dict[str, Any]) -> None:
    dciodvfy = require_tool("dciodvfy")
    folder = planned["out"] / planned["metrics"]["candidates"][0]["folder"]
    res = subprocess.run([dciodvfy, str(folder / "rtplan.dcm")], capture_output=True, text=True, check=False)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, errors


def test_candidate_option_is_checked() -> None:
    from appliance.cmd_plan import parse_candidate

    assert parse_candidate("0.2:0.4") == (0.2, 0.4)
    with pytest.raises(ConfigError, match="BLADDER:RECTUM"):
        parse_candidate("0.2")
    with pytest.raises(ConfigError, match=r"\[0, 0.5\]"):
        parse_candidate("0:0.9")
    with pytest.raises(ConfigError, match="candidate_sparings"):
        settings_from_dict({"planning": {"candidate_sparings": [[0.0, 0.7]]}})


def test_threshold_choice_takes_the_first_plan_that_covers_the_ptv() -> None:
    from core.case import Role
    from pipeline.problem import build_problem
    from pipeline.synth import synth_case

    case = synth_case(13, spacing_mm=(8.0, 8.0, 8.0))
    prob = build_problem(case, ARC, MACHINE, hu_curve=Settings().planning.hu_to_density, spacing_mm=8.0)
    fl, _ = predict_fluence(case, "", geometry=prob.geometry, rx_gy=2.0, sparing={})
    ptv = prob.masks[Role.PTV].numpy()

    def choose(thresholds: tuple[float, ...], d98: float, hi: float) -> Any:
        return choose_aperture_threshold(fl, ARC, MACHINE, prob.engine, ptv, thresholds=thresholds,
                                         min_d98_rel=d98, max_hi=hi)

    easy = choose((0.4, 0.02), 0.0, 1.0)  # any plan will do: the first threshold, one try
    assert easy.threshold == 0.4 and [t["threshold"] for t in easy.tries] == [0.4] and easy.tries[0]["accepted"]
    impossible = choose((0.5, 0.2, 0.02), 1.01, 1.0)  # D98 above D95 = Rx cannot be: every threshold tried
    assert [t["threshold"] for t in impossible.tries] == [0.5, 0.2, 0.02]
    assert not any(t["accepted"] for t in impossible.tries)
    best = max(impossible.tries, key=lambda t: t["ptv_D98_rel"])
    assert impossible.threshold == best["threshold"]  # the best-covering plan is kept
    assert impossible.sequence.total_mu > 0
    with pytest.raises(ConfigError, match="no aperture thresholds"):
        choose((), 0.97, 0.1)


def test_ai_threshold_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="ai_aperture_thresholds"):
        settings_from_dict({"planning": {"ai_aperture_thresholds": [0.3, 1.0]}})
    with pytest.raises(ConfigError, match="ai_aperture_thresholds"):
        settings_from_dict({"planning": {"ai_aperture_thresholds": []}})
    with pytest.raises(ConfigError, match="ai_min_ptv_d98_percent"):
        settings_from_dict({"planning": {"ai_min_ptv_d98_percent": 101}})


def test_init_from_model_copies_the_weights_and_refuses_another_size(tmp_path: Path) -> None:
    cfg = TrainConfig(size="tiny", epochs={"fast_dose": 0, "stage1": 0, "stage2": 0})
    samples = _tiny(tmp_path)
    src = Trainer(tmp_path / "a", samples, [], SPEC, cfg, progress=False)
    src.export(tmp_path / "model")
    dst = Trainer(tmp_path / "b", samples, [], SPEC, TrainConfig(size="tiny", seed=7, epochs=cfg.epochs),
                  progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(src.pipe.correction.state_dict().values(),
                                                        dst.pipe.correction.state_dict().values()))
    dst.init_from_model(tmp_path / "model")
    for k, v in src.pipe.state_dict().items():
        torch.testing.assert_close(dst.pipe.state_dict()[k], v)
    assert dst.data_description["initialised_from"]["model"] == "model"
    other = Trainer(tmp_path / "c", samples, [], ModelSpec(fluence_mu_per_rx_gy=9.0), cfg, progress=False)
    with pytest.raises(ConfigError, match="another grid/normalisation"):
        other.init_from_model(tmp_path / "model")
    with pytest.raises(ConfigError, match="is not a 'small'"):
        Trainer(tmp_path / "d", samples, [], SPEC, TrainConfig(size="small", epochs=cfg.epochs),
                progress=False).init_from_model(tmp_path / "model")


def _tiny(tmp_path: Path) -> list[Any]:
    from pipeline.training.data import quantise_sequence
    from pipeline.training.samples import build_sample
    from pipeline.training.train import PlanRecord, size_configs
    rec = PlanRecord("synth3", quantise_sequence(teacher_sequence(3)), seed=3, case_spacing_mm=8.0)
    return [build_sample(rec, machine=MACHINE, arc=ARC, spec=SPEC, fast_config=size_configs("tiny")["fast_dose"][1],
                         n_perturbed=0)]
