"""Protocol profiles: the dose a PTV's name carries, the routing rules, and a node that answers as one
AE title per profile, plans each study to its profile's prescription, holds a plan failing a
priority-1 goal until it is released, and labels it in the list and in the RT Plan received."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest

from appliance.cmd_jobs import cmd_release
from appliance.config import Settings, ptv_name_dose_gy, settings_from_dict
from appliance.profiles import choose_profile
from appliance.scheduler import StudyScheduler
from appliance.scu import Deliverer
from appliance.worker import Worker
from core.errors import InputError
from storage.db import Database
from storage.models import Delivery, Instance, Job
from storage.states import DeliveryState, JobState, utcnow
from tests.conftest import free_port
from tests.node_helpers import case_files, node_table, running_scp, store_paths, tiny_case
from tests.test_scu import RECEIVER, _received_order, start_storescp

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "dose"),
    [("PTV_6000", 60.0), ("PTV 60Gy", 60.0), ("ptv_60", 60.0), ("PTV_36.25", 36.25), ("PTV_7800cGy", 78.0),
     ("PTV_4000", 40.0), ("PTV2_5400", 54.0), ("PTV", None), ("PTV_prostate", None), ("PTV1", None),
     ("PTV_High", None), ("PTV 60,0 Gy", 60.0)],
)
def test_dose_in_a_ptv_name(name: str, dose: float | None) -> None:
    assert ptv_name_dose_gy(name) == dose


def _settings(**profile_over: Any) -> Settings:
    """The default profiles, the 60 Gy one answering as AIRT_CHHIP and listening to calling AE CHHIP_TPS."""
    table: dict[str, Any] = {"profiles": []}
    for p in Settings().profiles:
        row: dict[str, Any] = {"name": p.name, "protocol": p.protocol, "dose_gy": p.dose_gy,
                               "fractions": p.fractions, "match_ptv_name": p.match_ptv_name,
                               "goals": [{"structure": g.structure, "metric": g.metric,
                                          "comparison": g.comparison.value, "limit": g.limit,
                                          "priority": g.priority} for g in p.goals]}
        if p.dose_gy == 60.0:
            row.update({"called_ae_title": "AIRT_CHHIP", "calling_ae_titles": ["CHHIP_TPS"], **profile_over})
        table["profiles"].append(row)
    return settings_from_dict(table)


def test_routing_rules_in_order() -> None:
    s = _settings()
    c = choose_profile(s, ptv_name="PTV")
    assert c.profile.name == "prostate_40gy_5fx" and "default" in c.reason
    c = choose_profile(s, ptv_name="PTV", called_aets=["AIRT_CHHIP"], calling_aets=["TPS"])
    assert c.profile.name == "prostate_60gy_20fx" and c.reason == "sent to called AE title AIRT_CHHIP"
    c = choose_profile(s, ptv_name="PTV", called_aets=["AIRT"], calling_aets=["CHHIP_TPS"])
    assert c.profile.name == "prostate_60gy_20fx" and "calling AE title CHHIP_TPS" in c.reason
    c = choose_profile(s, ptv_name="PTV_6000", called_aets=["AIRT"], calling_aets=["TPS"])
    assert c.profile.name == "prostate_60gy_20fx" and "'PTV_6000' carries 60 Gy" in c.reason
    c = choose_profile(s, ptv_name="PTV_4000", explicit="prostate_60gy_20fx")
    assert c.profile.name == "prostate_60gy_20fx" and "--profile" in c.reason  # a person's choice wins


def test_doubtful_routing_fails_with_the_reason() -> None:
    s = _settings()
    with pytest.raises(InputError, match=r"PTV 'PTV_4000' names 40 Gy but profile prostate_60gy_20fx \(sent to "
                                         r"called AE title AIRT_CHHIP\) prescribes 60 Gy"):
        choose_profile(s, ptv_name="PTV_4000", called_aets=["AIRT_CHHIP"])
    with pytest.raises(InputError, match="names 70 Gy but profile prostate_40gy_5fx"):
        choose_profile(s, ptv_name="PTV_7000")  # no profile for 70 Gy: never planned to 40 Gy
    s2 = _settings(calling_ae_titles=[])
    two = settings_from_dict({"profiles": [
        {"name": "a", "protocol": "t", "dose_gy": 40.0, "fractions": 5, "called_ae_title": "AIRT_A",
         "goals": [{"structure": "ptv", "metric": "D98%", "comparison": ">=", "limit": 38.0}]},
        {"name": "b", "protocol": "t", "dose_gy": 60.0, "fractions": 20, "called_ae_title": "AIRT_B",
         "goals": [{"structure": "ptv", "metric": "D98%", "comparison": ">=", "limit": 57.0}]}],
        "planning": {"profile": "a"}})
    with pytest.raises(InputError, match=r"called AE titles that choose different profiles .*AIRT_A.* -> a.*AIRT_B.* -> b"):
        choose_profile(two, ptv_name="PTV", called_aets=["AIRT_A", "AIRT_B"])
    assert s2.called_ae_titles == ("AIRT", "AIRT_CHHIP")
    assert choose_profile(s2, ptv_name="PTV", calling_aets=["CHHIP_TPS"]).profile.name == "prostate_40gy_5fx"


def _goal(structure: str, metric: str, comparison: str, limit: float, priority: int) -> dict[str, Any]:
    return {"structure": structure, "metric": metric, "comparison": comparison, "limit": limit, "priority": priority}


@pytest.mark.slow
@pytest.mark.external
def test_node_routes_two_pushes_by_called_ae_and_holds_a_plan_failing_p1(tmp_path: Path) -> None:
    """Two studies pushed to two AE titles of one node: each is planned to its profile's prescription; the
    second profile has a priority-1 goal no plan can meet, so its plan is held (planning.when_p1_fails =
    hold) until released, then sent; the destination (dcmtk storescp) receives both plans with their
    prescriptions and verdicts, and ``airt jobs list`` shows the profiles and the failed goal."""
    rx_port = free_port()
    profiles = [
        {"name": "sbrt_test", "protocol": "test", "dose_gy": 40.0, "fractions": 5, "called_ae_title": "AIRT_SBRT",
         "goals": [_goal("ptv", "D50%", ">=", 1.0, 1)]},
        {"name": "chhip_test", "protocol": "test", "dose_gy": 60.0, "fractions": 20, "called_ae_title": "AIRT_CHHIP",
         "goals": [_goal("ptv", "D50%", ">=", 1.0, 1), _goal("rectum", "Dmean", "<=", 0.01, 1)]},
    ]
    table = node_table(tmp_path, profiles=profiles,
                       planning={"profile": "sbrt_test", "when_p1_fails": "hold"},
                       destinations=[{"name": "tps", "ae_title": RECEIVER, "host": "127.0.0.1", "port": rx_port}])
    settings = settings_from_dict(table)
    cases = {"AIRT_SBRT": case_files(tiny_case(tmp_path / "a", seed=1)),
             "AIRT_CHHIP": case_files(tiny_case(tmp_path / "b", seed=2))}
    with running_scp(settings) as scp:
        for called, paths in cases.items():
            run = store_paths(scp.port, paths, called=called)
            assert run.established and set(run.statuses) == {0}, (called, run.statuses)
        refused = store_paths(scp.port, cases["AIRT_SBRT"][:1], called="SOMEONE_ELSE")
        assert not refused.established  # the node answers only as its own and its profiles' AE titles
    db = Database(settings.database_url)
    with db.session() as s:
        assert {r for (r,) in s.query(Instance.called_ae_title).distinct()} == {"AIRT_SBRT", "AIRT_CHHIP"}
    jobs = StudyScheduler.for_node(settings, db).tick(utcnow())
    assert len(jobs) == 2
    worker = Worker.for_node(settings, db)
    assert {worker.run_once(), worker.run_once()} == set(jobs)
    with db.session() as s:
        rows = {j.profile: j for j in s.query(Job)}
        deliveries = {d.job_id: d.state for d in s.query(Delivery)}
    sbrt, chhip = rows["sbrt_test"], rows["chhip_test"]
    assert sbrt.state == chhip.state == JobState.SUCCEEDED
    assert sbrt.profile_reason == "sent to called AE title AIRT_SBRT"
    assert chhip.profile_reason == "sent to called AE title AIRT_CHHIP"
    assert sbrt.metrics and sbrt.metrics["prescription"]["dose_Gy"] == 40.0 and sbrt.metrics["verdict"]["p1_met"]
    assert chhip.metrics and chhip.metrics["prescription"]["dose_Gy"] == 60.0
    assert chhip.metrics["prescription"]["fractions"] == 20 and not chhip.metrics["verdict"]["p1_met"]
    assert sbrt.hold_reason is None and deliveries == {sbrt.id: DeliveryState.PENDING}
    assert chhip.hold_reason and "airt jobs release" in chhip.hold_reason

    cfg = tmp_path / "airt.toml"
    _write_toml(cfg, table)
    listed = subprocess.run([sys.executable, "-m", "appliance.cli", "jobs", "--config", str(cfg), "list"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    line = next(ln for ln in listed.stdout.splitlines() if "chhip_test" in ln)
    assert "P1 FAIL" in line and "HELD" in line, listed.stdout

    receiver = start_storescp(tmp_path / "received", rx_port)
    try:
        assert Deliverer.for_node(settings, db).tick(utcnow()) == 1  # the held plan is not sent
        assert cmd_release(db, chhip.id, settings) == 0
        with pytest.raises(InputError, match="not held"):
            cmd_release(db, chhip.id, settings)
        assert Deliverer.for_node(settings, db).tick(utcnow()) == 1
        assert _received_order(tmp_path / "received", expected=4) == ["RTPLAN", "RTDOSE", "RTPLAN", "RTDOSE"]
    finally:
        receiver.terminate()
        receiver.wait(10)
    plans = [pydicom.dcmread(p) for p in sorted((tmp_path / "received").glob("*")) if p.name != "order.txt"]
    by_rx = {float(p.DoseReferenceSequence[0].TargetPrescriptionDose): p for p in plans if p.Modality == "RTPLAN"}
    assert set(by_rx) == {40.0, 60.0}
    assert by_rx[60.0].FractionGroupSequence[0].NumberOfFractionsPlanned == 20
    assert "P1 FAILED" in by_rx[60.0].RTPlanName and "profile chhip_test" in by_rx[60.0].RTPlanDescription
    assert "rectum Dmean" in by_rx[60.0].RTPlanDescription
    assert "P1 met" in by_rx[40.0].RTPlanName and "profile sbrt_test" in by_rx[40.0].RTPlanDescription
    db.dispose()


def _write_toml(path: Path, table: dict[str, Any]) -> None:
    """The settings table as TOML (the subset of types this test uses)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines: list[str] = []
    for key, v in table.items():
        if isinstance(v, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {value(x)}" for k, x in v.items()]
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {value(x)}" for k, x in item.items() if k != "goals"]
                for g in item.get("goals", []):
                    lines.append(f"[[{key}.goals]]")
                    lines += [f"{k} = {value(x)}" for k, x in g.items()]
    path.write_text("\n".join(lines) + "\n")
