"""The choice of what to plan is made once and travels as a value; the plan's outcome comes back typed.

- :func:`core.request.choose_ct_series`, the one rule the scheduler and the folder loader apply;
- the worker hands the scheduler's choice (a :class:`CaseRequest`) to the planning function in the
  planning process: with a second CT series in the study's frame of reference, the plan sees exactly
  the series the structure set names;
- :func:`appliance.dicom.case_loader.load_case` plans the files a request names or refuses them, it
  never chooses again;
- :class:`PlanSummary` round-trips through JSON and refuses a summary of another shape;
- a plan recorded as deliverable (RT Plan, RT Dose, metrics.json written) is queued for sending before
  the planner's report is made; what fails after that does not take the plan back;
- the planning process is long-lived: warmed up once, reused for the next jobs, replaced after
  ``worker.planner_jobs`` jobs; the node's planner warms up on a real synthetic case.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from appliance.dicom.case_loader import load_case, request_from_folder
from appliance.plan_process import WARM_UP_AFTER_IDLE_S
from appliance.plan_summary import PlanSummary
from appliance.scheduler import StudyScheduler
from appliance.worker import Worker
from core.case import Prescription
from core.errors import InputError, PlanningError
from core.request import CaseRequest, SeriesSeen, StructureSetSeen, choose_ct_series
from storage.db import Database
from storage.models import Delivery, Job
from storage.states import JobState
from tests.node_helpers import node_settings, running_scp, store_paths
from tests.test_case_loader import STRUCTURES, build
from tests.test_scp import make_ct_slice, write_case

SHIPPED = Path(__file__).parent / "data" / "dicompyler_example"


def _summary(case_id: str, **over: object) -> PlanSummary:
    values: dict[str, object] = dict(
        case_id=case_id, method="optimize", profile="prostate_40gy_5fx", profile_reason="test",
        dose_gy=40.0, fractions=5, verdict="P1 failed: rectum V36Gycc 3.28 cm3 vs <= 2 cm3", p1_met=False,
        ptv_d98_gy=39.1, ptv_hi=0.071, bladder_dmean_gy=8.2, rectum_dmean_gy=None, total_mu=612.0,
        rtplan_uid="1.2.3.4", stages_s={"load": 0.5, "arc_optimize": 9.9})
    values.update(over)
    return PlanSummary(**values)  # type: ignore[arg-type]


def recording_plan(request: CaseRequest, out_dir: Path, method: str | None,
                  on_deliverable: Callable[[PlanSummary], None] | None = None) -> PlanSummary:
    """A planning function that records the request it was handed (in metrics.json) and writes real,
    shipped RT Plan and RT Dose files, so that the worker's success path runs without planning."""
    for name in ("rtplan.dcm", "rtdose.dcm"):
        shutil.copy(SHIPPED / name, out_dir / name)
    summary = _summary(request.study_uid, p1_met=True, verdict="all P1 met")
    seen = {"ct_series_uid": request.ct_series_uid, "rtstruct_uid": request.rtstruct_uid,
            "ct_files": [p.name for p in request.ct_files], "rtstruct_file": request.rtstruct_file.name,
            "calling_aets": list(request.calling_aets), "method": method}
    (out_dir / "metrics.json").write_text(json.dumps({"summary": summary.to_dict(), "request": seen,
                                                      "pid": os.getpid(), "warmed": WARMED}))
    return summary


WARMED: list[int] = []
"""In a planning process: the pid that ran :meth:`WarmRecordingPlan.warm_up`."""


@dataclasses.dataclass(frozen=True)
class WarmRecordingPlan:
    """:func:`recording_plan` with a warm-up, as the node's planner has; a warm-up touches ``mark`` (when given)
    so that a test can wait for it instead of guessing how long a process takes to start."""

    mark: Path | None = None

    def warm_up(self) -> None:
        WARMED.append(os.getpid())
        if self.mark is not None:
            self.mark.touch()

    def __call__(self, request: CaseRequest, out_dir: Path, method: str | None,
                 on_deliverable: Callable[[PlanSummary], None] | None = None) -> PlanSummary:
        return recording_plan(request, out_dir, method)


# ------------------------------------------------------------------------------------------------
# The rule


def _series(uid: str, frame: str, *images: str) -> SeriesSeen:
    return SeriesSeen(uid, frame, frozenset(images))


def _rs(frames: set[str], refs: set[str] = set()) -> StructureSetSeen:  # noqa: B006
    return StructureSetSeen("9.9", frozenset(frames), frozenset(refs))


def test_choice_by_frame_then_series_reference_then_contour_images() -> None:
    a, b, c = _series("1", "F", "a1", "a2"), _series("2", "F", "b1"), _series("3", "G", "c1")

    def no_images() -> set[str]:
        raise AssertionError("image references read although the series reference decided")

    assert choose_ct_series(_rs({"G"}), [a, b, c], no_images, "here") == c
    assert choose_ct_series(_rs({"F"}, {"2"}), [a, b, c], no_images, "here") == b
    assert choose_ct_series(_rs({"F"}), [a, b, c], lambda: {"a2"}, "here") == a
    assert choose_ct_series(_rs({"H"}), [a, b, c], no_images, "here") is None


@pytest.mark.parametrize("refs", [set(), {"a1", "b1"}])
def test_choice_refuses_two_series_that_nothing_tells_apart(refs: set[str]) -> None:
    a, b = _series("1", "F", "a1"), _series("2", "F", "b1")
    with pytest.raises(InputError, match="study 7: 2 CT series share the Frame of Reference") as err:
        choose_ct_series(_rs({"F"}), [a, b], lambda: refs, "study 7")
    assert "1 (1 images), 2 (1 images)" in str(err.value)
    assert ("point into several of them" if refs else "name none of them") in str(err.value)


# ------------------------------------------------------------------------------------------------
# The worker hands the scheduler's choice to the planning process


def test_worker_plans_the_series_the_scheduler_chose(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    case = write_case(tmp_path / "case", n_slices=3)
    # A second reconstruction in the same study and frame of reference, not named by the structure set.
    other = generate_uid()
    extra = []
    for k in range(5):
        ds = make_ct_slice(study=str(case["study"]), series=other, for_uid=str(case["for"]), z=2.0 * k, seed=10 + k)
        path = tmp_path / "case" / f"recon_{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        extra.append(path)
    with running_scp(settings) as scp:
        assert set(store_paths(scp.port, [*case["paths"], *extra]).statuses) == {0}  # type: ignore[misc]
    db = Database(settings.database_url)
    (job_id,) = StudyScheduler.for_node(settings, db).tick()
    assert Worker.for_node(settings, db, plan=recording_plan).run_once() == job_id
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.state == JobState.SUCCEEDED, job.failure_reason
        seen = job.metrics["request"]
        # The job's figures come from the summary's fields.
        assert (job.profile, job.ptv_d98_gy, job.ptv_hi, job.rectum_dmean_gy) == ("prostate_40gy_5fx", 39.1, 0.071, None)
        assert job.timings["plan_stages_s"] == {"load": 0.5, "arc_optimize": 9.9}
    assert seen["ct_series_uid"] == case["series"] and seen["rtstruct_uid"] == case["rtstruct"]
    assert len(seen["ct_files"]) == 3 and seen["rtstruct_file"].endswith(".dcm")
    assert seen["calling_aets"] and seen["method"] == settings.planning.method.value
    db.dispose()


# ------------------------------------------------------------------------------------------------
# The loader plans the request or refuses it


def test_loader_plans_the_request_and_refuses_files_that_are_not_what_it_names(tmp_path: Path) -> None:
    folder, spec = build(tmp_path)
    request = request_from_folder(folder, case_id="c1")
    assert request.ct_series_uid == spec.series_uid and len(request.ct_files) == len(list((folder / "ct").iterdir()))
    case = load_case(request, structures=STRUCTURES, prescription=Prescription())
    assert case.case_id == "c1" and case.dicom is not None and case.dicom.ct_series_instance_uid == spec.series_uid

    with pytest.raises(InputError, match=r"not 1\.2\.9 that this case was scheduled on"):
        load_case(dataclasses.replace(request, rtstruct_uid="1.2.9"), structures=STRUCTURES, prescription=Prescription())
    with pytest.raises(InputError, match=r"not only to 1\.2\.8 that it was scheduled on"):
        load_case(dataclasses.replace(request, ct_series_uid="1.2.8"), structures=STRUCTURES, prescription=Prescription())
    with pytest.raises(InputError, match="should be a CT image"):
        load_case(dataclasses.replace(request, ct_files=(*request.ct_files, request.rtstruct_file)),
                  structures=STRUCTURES, prescription=Prescription())
    gone = request.ct_files[0]
    gone.unlink()
    with pytest.raises(InputError, match=re.escape(f"CT image file {gone} of this case is missing")):
        load_case(request, structures=STRUCTURES, prescription=Prescription())


# ------------------------------------------------------------------------------------------------
# The typed summary


def test_plan_summary_round_trips_and_refuses_another_shape() -> None:
    summary = _summary("case1")
    assert PlanSummary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary
    assert summary.p1_failed and not _summary("c", p1_met=None).p1_failed
    data = summary.to_dict()
    with pytest.raises(PlanningError, match=r"missing fields \['ptv_hi'\] and unknown fields \['HI'\]"):
        PlanSummary.from_dict({**{k: v for k, v in data.items() if k != "ptv_hi"}, "HI": 0.07})
    with pytest.raises(PlanningError, match="ptv_d98_gy is 'nan', not a finite number"):
        PlanSummary.from_dict({**data, "ptv_d98_gy": "nan"})
    with pytest.raises(PlanningError, match="p1_met is 'yes'"):
        PlanSummary.from_dict({**data, "p1_met": "yes"})


# ------------------------------------------------------------------------------------------------
# The long-lived planning process


def test_planning_process_warms_up_when_idle_is_reused_and_replaced_after_its_jobs(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, worker={"planner_jobs": 2, "warm_up": True, "planner_reserve_mb": 256.0})
    cases = [write_case(tmp_path / f"case{k}", n_slices=2) for k in range(3)]
    with running_scp(settings) as scp:
        for case in cases:
            assert set(store_paths(scp.port, case["paths"]).statuses) == {0}  # type: ignore[arg-type]
    db = Database(settings.database_url)
    jobs = sorted(StudyScheduler.for_node(settings, db).tick())
    mark = tmp_path / "warmed"
    worker = Worker.for_node(settings, db, plan=WarmRecordingPlan(mark=mark))
    worker.planner.start()
    # idle: the process warms up WARM_UP_AFTER_IDLE_S after it started (its start-up, imports and memory reserve
    # take longer on a cold machine, so wait for the warm-up itself)
    deadline = time.monotonic() + WARM_UP_AFTER_IDLE_S + 60.0
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mark.exists(), "the idle planning process did not warm up"
    assert [worker.run_once() for _ in jobs] == jobs and worker.run_once() is None
    with db.session() as s:
        seen = [s.get(Job, j).metrics for j in jobs]  # type: ignore[union-attr]
    pids = [m["pid"] for m in seen]
    assert pids[0] == pids[1] != pids[2], pids  # reused, then replaced after planner_jobs = 2
    # The first process warmed up once, while idle; its successor had a job waiting and planned it at once.
    assert [m["warmed"] for m in seen] == [[pids[0]], [pids[0]], []]
    assert worker.planner.pid == pids[2]
    worker.planner.close()
    assert worker.planner.pid is None
    db.dispose()


def test_the_planner_warms_up_on_a_synthetic_case_and_leaves_logging_on(tmp_path: Path) -> None:
    import logging

    from appliance.planning import Planner

    settings = node_settings(tmp_path)
    Planner(settings).warm_up()
    assert logging.root.manager.disable == logging.NOTSET


# ------------------------------------------------------------------------------------------------
# Deliverable before the report


def early_plan(request: CaseRequest, out_dir: Path, method: str | None,
               on_deliverable: Callable[[PlanSummary], None] | None = None) -> PlanSummary:
    """Says the plan is deliverable, then 'makes the report' (0.5 s), completes metrics.json, and then
    fails when the study's calling AE title says so."""
    summary = recording_plan(request, out_dir, method)
    assert on_deliverable is not None
    on_deliverable(summary)
    time.sleep(0.5)
    document = json.loads((out_dir / "metrics.json").read_text())
    (out_dir / "metrics.json").write_text(json.dumps({**document, "completed": True}))
    if "FAILAFTER" in request.calling_aets:
        raise RuntimeError("the report could not be drawn")
    return summary


@pytest.mark.parametrize("fail_after", [False, True])
def test_a_deliverable_plan_is_queued_before_the_report_and_kept_if_the_rest_fails(
        tmp_path: Path, fail_after: bool, caplog: pytest.LogCaptureFixture) -> None:
    peer = "FAILAFTER" if fail_after else "PEER"
    settings = node_settings(tmp_path, peers=[{"ae_title": peer}],
                             destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 104}])
    case = write_case(tmp_path / "case", n_slices=2)
    with running_scp(settings) as scp:
        assert set(store_paths(scp.port, case["paths"], aet=peer).statuses) == {0}  # type: ignore[arg-type]
    db = Database(settings.database_url)
    (job_id,) = StudyScheduler.for_node(settings, db).tick()
    with caplog.at_level("WARNING"):
        assert Worker.for_node(settings, db, plan=early_plan).run_once() == job_id
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.SUCCEEDED
        # Queued when deliverable: the plan's time is to that point, not to the end of the report.
        assert 0 < job.timings["plan_process_s"] < 5
        assert [d.destination for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id))] == ["tps"]
        assert job.metrics.get("completed") is (None if fail_after else True)
    failed_after = [r.getMessage() for r in caplog.records if "did not complete" in r.getMessage()]
    assert bool(failed_after) is fail_after
    if fail_after:
        assert "internal error in planning (RuntimeError: the report could not be drawn)" in failed_after[0]
    db.dispose()


# ------------------------------------------------------------------------------------------------
# Hand-offs inside the node are immediate


def test_a_complete_study_reaches_the_destination_without_waiting_for_a_poll(tmp_path: Path) -> None:
    from appliance.service import Node
    from tests.conftest import free_port
    from tests.node_helpers import case_files, tiny_case
    from tests.test_scu import start_storescp

    rx_port = free_port()
    receiver = start_storescp(tmp_path / "received", rx_port)
    # Polls every 10 minutes and no quiet-period trigger: only the hand-offs can move the study on.
    settings = node_settings(tmp_path, scheduler={"stable_age_s": 3600.0, "poll_interval_s": 600.0},
                             http={"enabled": False},
                             destinations=[{"name": "tps", "ae_title": "RESULTS", "host": "127.0.0.1",
                                            "port": rx_port}])
    node = Node(settings)
    node.start()
    try:
        paths = case_files(tiny_case(tmp_path / "case"))
        t0 = time.perf_counter()
        assert set(store_paths(node.port or 0, paths).statuses) == {0}
        deadline = t0 + 180.0
        while not any(p.name.startswith("RD") for p in (tmp_path / "received").iterdir()):
            assert time.perf_counter() < deadline, "no RT Dose at the destination"
            time.sleep(0.1)
        with node.db.session() as s:
            job = s.scalars(select(Job)).one()
            assert job.state == JobState.SUCCEEDED
            # detection and queue took no poll interval (600 s): the job was created and claimed at once
            assert (job.started_at - job.created_at).total_seconds() < 5.0
    finally:
        node.stop()
        node.shutdown()
        receiver.terminate()
        receiver.wait(10)


_FAULTS = """
import resource, sys, numpy as np
from appliance.plan_process import keep_freed_memory, reserve_memory
if sys.argv[1] != "default":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
if sys.argv[1] == "reserve":  # written once before the first job, not by a job
    assert reserve_memory(256.0)[0] == 256.0
    assert reserve_memory(256.0, stop=lambda: True)[0] == 0.0
else:
    a = np.ones(200 * 2**20 // 8)
    del a
f0 = faults()
b = np.ones(200 * 2**20 // 8)
print(faults() - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's")
def test_the_planning_process_reuses_the_memory_a_job_freed() -> None:
    """200 MB freed and allocated again: fresh pages (page faults) in a default process, the same pages
    in one set as the planning process sets itself, and in one that reserved memory before its first job
    (a reserve told to stop writes nothing)."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=120)
        return int(out.stdout.strip().splitlines()[-1])

    fresh, kept, reserved = faults("default"), faults("keep"), faults("reserve")
    assert fresh > 50  # 200 MB of 4 kB or 2 MB pages
    assert kept < fresh / 10 and reserved < fresh / 10


_HUGEPAGES = """
import numpy as np
from appliance.plan_process import no_numpy_hugepages
core = getattr(np, "_core", None) or np.core
print(no_numpy_hugepages(), core.multiarray._set_madvise_hugepage(False))
"""


@pytest.mark.parametrize(("env", "expected"), [(None, "True False"), ("1", "False True"), ("0", "True False")])
def test_the_planning_process_keeps_numpy_from_advising_huge_pages(env: str | None, expected: str) -> None:
    """The planning process turns numpy's huge-page advice off (its previous value, read back, is off);
    an administrator's NUMPY_MADVISE_HUGEPAGE wins either way."""
    environ = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if env is not None:
        environ["NUMPY_MADVISE_HUGEPAGE"] = env
    out = subprocess.run([sys.executable, "-c", _HUGEPAGES], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120, env=environ)
    assert out.stdout.split() == expected.split()
