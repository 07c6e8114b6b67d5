"""Faults: the node killed (SIGKILL) while writing an instance and while committing its row, the data
directory filling up, the database locked by another writer, destinations that are down, slow or
refusing, and planning processes that crash, hang or raise. After each: every acknowledged instance
is on disk and in the database, nothing half-written remains, every job reaches a final state, and
results reach every destination. (SIGKILL while receiving, planning and sending: tests/test_node.py.)

Real processes, real loopback associations, real SQLite files; the crashing and hanging planners are
real functions of this module run in the worker's real child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import RTDoseStorage, RTPlanStorage  # type: ignore[attr-defined]
from sqlalchemy import select

import storage.db
from appliance.config import Settings, settings_from_dict
from appliance.cstore import STATUS_OUT_OF_RESOURCES, STATUS_PROCESSING_FAILURE
from appliance.plan_summary import PlanSummary
from appliance.scheduler import StudyScheduler
from appliance.scu import Deliverer
from appliance.scu import wait_for_port as wait_port
from appliance.service import recover
from appliance.worker import Worker
from core.request import CaseRequest
from storage.db import Database
from storage.instance_store import InstanceStore
from storage.models import Delivery, Instance, Job, JobEvent, NodeEvent
from storage.states import DeliveryState, JobState, utcnow
from tests.conftest import free_port
from tests.node_helpers import kill_group, node_settings, node_table, running_scp, store_paths
from tests.test_scp import make_ct_slice, write_case
from tests.test_scu import _succeeded_job_with_delivery

REPO = Path(__file__).resolve().parents[1]


def _consistent(settings: Settings, db: Database, acked: set[str]) -> set[str]:
    """Assert the store and the database agree and hold every acknowledged instance; returns the stored UIDs."""
    store = InstanceStore(settings.data_dir)
    with db.session() as s:
        rows = {uid: path for uid, path in s.execute(select(Instance.sop_instance_uid, Instance.path))}
    assert acked <= set(rows), acked - set(rows)
    for uid, path in rows.items():
        f = store.absolute(path)
        assert f.is_file(), path
        assert pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == uid
    assert set(store.iter_files()) == set(rows.values())
    assert not list(store.root.rglob("*.tmp-*"))
    return set(rows)


# ------------------------------------------------------------------------------------------------
# SIGKILL while writing a file / while committing its row (the SCP in a child process)

SCP_CHILD = textwrap.dedent("""
    import json, os, signal, sys, threading
    from sqlalchemy import event
    from appliance.config import settings_from_dict
    from appliance.scp import StorageSCP
    from storage.db import Database
    from storage.instance_store import InstanceStore
    settings = settings_from_dict(json.loads(sys.argv[1]))
    stage, nth = sys.argv[2], int(sys.argv[3])
    db = Database(settings.database_url)
    calls = {"n": 0}
    def die_at_nth(*_a):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    if stage == "writing":  # the instance's bytes are in its temp file, fsync starts: die
        real_fsync = os.fsync
        def fsync(fd):
            if os.path.realpath(f"/proc/self/fd/{fd}").find(".tmp-") >= 0:
                die_at_nth()
            real_fsync(fd)
        os.fsync = fsync
    else:  # "committing": the file is renamed into place, the row's COMMIT is about to go out: die
        event.listen(db.engine, "commit", die_at_nth)
    scp = StorageSCP.for_node(settings, db, InstanceStore(settings.data_dir))
    scp.start()
    print("listening", flush=True)
    threading.Event().wait()
""")


@pytest.mark.parametrize("stage", ["writing", "committing"])
def test_sigkill_while_storing_loses_nothing_acknowledged(tmp_path: Path, stage: str) -> None:
    table = node_table(tmp_path)
    settings = settings_from_dict(table)
    case = write_case(tmp_path / "case", n_slices=5)
    paths: list[Path] = case["paths"]  # type: ignore[assignment]
    Database(settings.database_url).dispose()  # schema first, so that commit #1 is the first instance's
    proc = subprocess.Popen([sys.executable, "-c", SCP_CHILD, json.dumps(table), stage, "3"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(settings.node.port, timeout_s=60)
        run = store_paths(settings.node.port, paths, timeout_s=10)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        kill_group(proc)
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    acked = {u for u, st in zip(uids, run.statuses) if st == 0}
    assert len(acked) == 2 and run.statuses[:2] == [0, 0] and len(run.statuses) == 3 and run.statuses[2] != 0
    store = InstanceStore(settings.data_dir)
    leftovers = list(store.root.rglob("*.tmp-*"))
    if stage == "writing":
        assert len(leftovers) == 1  # the interrupted write, never renamed
    db = Database(settings.database_url)
    rep = recover(settings, db, store)
    stored = _consistent(settings, db, acked)
    if stage == "writing":
        assert rep.temp_files_removed == 1 and stored == acked
    else:  # the third file was whole and in place: registered again, recorded for a person
        assert rep.files_registered == 1 and stored == acked | {uids[2]}
        with db.session() as s:
            assert [e.kind for e in s.scalars(select(NodeEvent))] == ["instance_recovered"]
    # The peer resends the study (it got no answer for the third): everything arrives, once.
    with running_scp(settings) as scp:
        again = store_paths(scp.port, paths)
        assert again.statuses == [0] * len(paths)
    stored = _consistent(settings, db, set(uids))
    assert stored == set(uids)
    db.dispose()


# ------------------------------------------------------------------------------------------------
# Disk full


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs mounted on tmp_path/data (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "data"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_disk_filling_up_answers_out_of_resources_and_leaves_nothing_half_written(
        tmp_path: Path, small_tmpfs: Path) -> None:
    settings = node_settings(tmp_path, storage={"data_dir": str(small_tmpfs), "min_free_disk_mb": 0})
    study, series, for_uid = generate_uid(), generate_uid(), generate_uid()
    files = []
    for k in range(8):  # 8 x 2 MiB into 12 MiB (the database takes some too)
        ds = make_ct_slice(study=study, series=series, for_uid=for_uid, z=2.0 * k, rows=1024, seed=k)
        files.append(tmp_path / f"big{k}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    with running_scp(settings) as scp:
        run = store_paths(scp.port, files)
        acked = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                 for f, st in zip(files, run.statuses) if st == 0}
        refused = [st for st in run.statuses if st != 0]
        assert len(run.statuses) == len(files) and acked and refused, run.statuses
        assert set(refused) <= {STATUS_OUT_OF_RESOURCES, STATUS_PROCESSING_FAILURE}
        assert STATUS_OUT_OF_RESOURCES in refused
        _consistent(settings, scp.db, acked)
        # Space comes back (an admin cleans up): the refused instances are accepted when resent.
        with scp.db.session() as s:
            victims = list(s.scalars(select(Instance)))[:3]
            for v in victims:
                scp.store.absolute(v.path).unlink()
                s.delete(v)
        remaining = acked - {v.sop_instance_uid for v in victims}
        rerun = store_paths(scp.port, [f for f, st in zip(files, run.statuses) if st != 0][:2])
        assert rerun.statuses == [0, 0]
        _consistent(settings, scp.db, remaining)


def test_free_space_floor_refuses_before_writing(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, storage={"data_dir": str(tmp_path / "data"), "min_free_disk_mb": 10**9})
    with running_scp(settings) as scp:
        run = store_paths(scp.port, write_case(tmp_path / "case", n_slices=2)["paths"])  # type: ignore[arg-type]
        assert run.statuses == [STATUS_OUT_OF_RESOURCES] * 3
        _consistent(settings, scp.db, set())


# ------------------------------------------------------------------------------------------------
# SQLite busy / locked


@contextlib.contextmanager
def _write_lock(db_file: Path, hold_s: float) -> Iterator[threading.Event]:
    """Another connection (as another process would) holds SQLite's write lock for ``hold_s``."""
    taken = threading.Event()

    def hold() -> None:
        con = sqlite3.connect(db_file, timeout=30, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO node_events (at, kind, level, message) VALUES ('2020-01-01 00:00:00', 'lock', "
                    "'INFO', 'held by a test')")
        taken.set()
        time.sleep(hold_s)
        con.execute("COMMIT")
        con.close()

    t = threading.Thread(target=hold)
    t.start()
    taken.wait(10)
    try:
        yield taken
    finally:
        t.join()


def test_store_waits_for_a_short_write_lock(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    case = write_case(tmp_path / "case", n_slices=2)
    with running_scp(settings) as scp, _write_lock(settings.data_dir / "airt.sqlite3", 2.0):
        t0 = time.perf_counter()
        run = store_paths(scp.port, case["paths"])  # type: ignore[arg-type]
        assert run.statuses == [0, 0, 0] and time.perf_counter() - t0 > 1.5
    db = Database(settings.database_url)
    _consistent(settings, db, {pydicom.dcmread(p).SOPInstanceUID for p in case["paths"]})  # type: ignore[attr-defined]
    with sqlite3.connect(settings.data_dir / "airt.sqlite3") as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.dispose()


def test_store_fails_cleanly_when_the_lock_outlasts_busy_timeout(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.db, "SQLITE_BUSY_TIMEOUT_MS", 500)  # the node's wait, shortened for the test
    settings = node_settings(tmp_path)
    case = write_case(tmp_path / "case", n_slices=1)
    with running_scp(settings) as scp:
        with _write_lock(settings.data_dir / "airt.sqlite3", 3.0):
            run = store_paths(scp.port, case["paths"])  # type: ignore[arg-type]
        assert run.statuses == [STATUS_PROCESSING_FAILURE] * 2
        _consistent(settings, scp.db, set())
        assert store_paths(scp.port, case["paths"]).statuses == [0, 0]  # type: ignore[arg-type]
        _consistent(settings, scp.db, {pydicom.dcmread(p).SOPInstanceUID for p in case["paths"]})  # type: ignore[attr-defined]
    with sqlite3.connect(settings.data_dir / "airt.sqlite3") as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# ------------------------------------------------------------------------------------------------
# Destinations that are slow or refuse


class _Receiver:
    """A pynetdicom RT Plan/RT Dose SCP whose answer is set by the test: a status, or a stall."""

    def __init__(self, port: int, *, status: int = 0, stall_s: float = 0.0, aet: str = "RESULTS") -> None:
        self.status, self.stall_s = status, stall_s
        self.received: list[str] = []
        ae = AE(ae_title=aet)
        ae.require_called_aet = True
        for c in (RTPlanStorage, RTDoseStorage):
            ae.add_supported_context(c, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        if self.stall_s:
            time.sleep(self.stall_s)
        if self.status == 0:
            self.received.append(str(event.dataset.Modality))
        return self.status

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def _delivery(db: Database) -> Delivery:
    with db.session() as s:
        d = s.scalar(select(Delivery))
        assert d is not None
        return d


@pytest.mark.parametrize("fault", ["refuses (0xA700)", "rejects the association", "stalls past the timeout"])
def test_destination_faults_are_retried_until_delivered(tmp_path: Path, fault: str) -> None:
    port = free_port()
    base, db, _ = _succeeded_job_with_delivery(tmp_path, port)
    settings = settings_from_dict({
        "storage": {"data_dir": str(base.data_dir)},  # type: ignore[attr-defined]
        "node": {"dimse_timeout_s": 1.0, "acse_timeout_s": 2.0, "network_timeout_s": 2.0},
        "destinations": [{"name": "tps", "ae_title": "RESULTS", "host": "127.0.0.1", "port": port}],
        "delivery": {"retry_initial_s": 5.0, "retry_factor": 2.0},
    })
    if fault.startswith("refuses"):
        bad = _Receiver(port, status=0xA700)
        words = "0xA700"
    elif fault.startswith("rejects"):
        bad = _Receiver(port, aet="SOMEBODY")
        words = "rejected"
    else:
        bad = _Receiver(port, stall_s=4.0)
        words = "rtplan.dcm"
    deliverer = Deliverer.for_node(settings, db)
    try:
        t0 = time.perf_counter()
        assert deliverer.tick() == 0
        assert time.perf_counter() - t0 < 15
    finally:
        bad.close()
    d = _delivery(db)
    assert d.state == DeliveryState.PENDING and d.attempts == 1 and words in str(d.last_error), d.last_error
    # The retry runs with ordinary timeouts: the short ones above only keep the fault phase quick,
    # and a loaded CI machine may need more than 1 s for a healthy association.
    patient = settings_from_dict({
        "storage": {"data_dir": str(base.data_dir)},  # type: ignore[attr-defined]
        "destinations": [{"name": "tps", "ae_title": "RESULTS", "host": "127.0.0.1", "port": port}],
        "delivery": {"retry_initial_s": 5.0, "retry_factor": 2.0},
    })
    good = _Receiver(port)
    try:
        assert Deliverer.for_node(patient, db).tick(d.next_try_at) == 1
    finally:
        good.close()
    d = _delivery(db)
    assert d.state == DeliveryState.DELIVERED and d.attempts == 2
    assert good.received == ["RTPLAN", "RTDOSE"]
    db.dispose()


def test_destination_failing_past_give_up_is_failed_and_can_be_retried(tmp_path: Path) -> None:
    port = free_port()
    base, db, _ = _succeeded_job_with_delivery(tmp_path, port)
    settings = settings_from_dict({
        "storage": {"data_dir": str(base.data_dir)},  # type: ignore[attr-defined]
        "destinations": [{"name": "tps", "ae_title": "RESULTS", "host": "127.0.0.1", "port": port}],
        "delivery": {"give_up_after_s": 60.0},
    })
    deliverer = Deliverer.for_node(settings, db)
    import datetime as dt

    later = utcnow() + dt.timedelta(seconds=120)
    assert deliverer.tick(later) == 0
    assert _delivery(db).state == DeliveryState.FAILED  # final, and says why
    assert "no association" in str(_delivery(db).last_error)
    db.dispose()


# ------------------------------------------------------------------------------------------------
# Planning processes that crash, hang or raise


def crashing_plan(request: CaseRequest, out_dir: Path, method: str | None,
                  on_deliverable: Callable[[PlanSummary], None] | None = None) -> PlanSummary:
    """Dies like a segfault or the OOM killer would: no result, no traceback."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("not reached")


def hanging_plan(request: CaseRequest, out_dir: Path, method: str | None,
                  on_deliverable: Callable[[PlanSummary], None] | None = None) -> PlanSummary:
    """Never returns."""
    threading.Event().wait()
    raise AssertionError("not reached")


def buggy_plan(request: CaseRequest, out_dir: Path, method: str | None,
                  on_deliverable: Callable[[PlanSummary], None] | None = None) -> PlanSummary:
    """A programming error inside planning."""
    plans: list[PlanSummary] = []
    return plans[7]


def _pending_job(tmp_path: Path, **over: Any) -> tuple[Settings, Database, int]:
    settings = node_settings(tmp_path, **over)
    case = write_case(tmp_path / "case", n_slices=2)
    with running_scp(settings) as scp:
        assert store_paths(scp.port, case["paths"]).statuses == [0, 0, 0]  # type: ignore[arg-type]
    db = Database(settings.database_url)
    (job_id,) = StudyScheduler.for_node(settings, db).tick()
    return settings, db, job_id


def _job(db: Database, job_id: int) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def test_planning_process_that_crashes_is_retried_then_failed(tmp_path: Path) -> None:
    settings, db, job_id = _pending_job(tmp_path, worker={"max_attempts": 2})
    worker = Worker.for_node(settings, db, plan=crashing_plan)
    assert worker.run_once() == job_id
    job = _job(db, job_id)
    assert job.state == JobState.PENDING and job.attempts == 1
    with db.session() as s:
        last = s.scalar(select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()))
    assert "without a result" in str(last) and "retrying (attempt 1 of 2)" in str(last)
    assert worker.run_once() == job_id
    job = _job(db, job_id)
    assert job.state == JobState.FAILED and job.attempts == 2
    assert "exited with code -9 without a result" in str(job.failure_reason)
    assert worker.run_once() is None  # final: nothing left to claim
    db.dispose()


def test_planning_process_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    settings, db, job_id = _pending_job(tmp_path, worker={"plan_timeout_s": 2.0})
    t0 = time.perf_counter()
    assert Worker.for_node(settings, db, plan=hanging_plan).run_once() == job_id
    assert time.perf_counter() - t0 < 30
    job = _job(db, job_id)
    assert job.state == JobState.FAILED and "plan exceeded 2 s" in str(job.failure_reason)
    db.dispose()


def test_planning_bug_fails_the_job_with_an_internal_error(tmp_path: Path) -> None:
    settings, db, job_id = _pending_job(tmp_path)
    assert Worker.for_node(settings, db, plan=buggy_plan).run_once() == job_id
    job = _job(db, job_id)
    assert job.state == JobState.FAILED and "internal error in planning (IndexError" in str(job.failure_reason)
    db.dispose()


# ------------------------------------------------------------------------------------------------
# Load (small; the full-size figures come from benchmarks/bench_load_node.py)


def test_concurrent_associations_store_everything_and_make_one_job_per_study(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, node={"max_associations": 10})
    cases = [write_case(tmp_path / f"case{k}", n_slices=6) for k in range(8)]
    runs: list[Any] = [None] * len(cases)
    with running_scp(settings) as scp:
        def client(k: int) -> None:
            runs[k] = store_paths(scp.port, cases[k]["paths"])  # type: ignore[arg-type]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [r.statuses for r in runs] == [[0] * 7] * len(cases)
        sched = StudyScheduler.for_node(settings, scp.db)
        jobs = sched.tick()
        assert len(jobs) == len(cases) and sched.tick() == []
        with scp.db.session() as s:
            studies = sorted(s.scalars(select(Job.study_uid)))
        assert studies == sorted(str(c["study"]) for c in cases)
        every = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                 for c in cases for p in c["paths"]}  # type: ignore[attr-defined]
        assert _consistent(settings, scp.db, every) == every
