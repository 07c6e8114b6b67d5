"""Storage: schema, the job state machine, atomic claims across processes, scheduler rules, recovery."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, text

from appliance.config import settings_from_dict
from appliance.dicom.uids import check_uid, is_strict_uid, is_valid_uid
from appliance.scheduler import StudyScheduler
from appliance.service import recover
from core.errors import InputError
from storage.db import Database, claim_next_job
from storage.instance_store import InstanceStore, sha256_file
from storage.instances import InstanceHeader, RegisterOutcome, register_instance
from storage.models import Instance, Job, JobEvent, JobInstance, NodeEvent, Study
from storage.states import (
    ALLOWED_DELIVERY_TRANSITIONS,
    ALLOWED_TRANSITIONS,
    DeliveryState,
    JobState,
    TransitionError,
    transition,
    utcnow,
)
from tests.test_scp import make_ct_slice, make_rtstruct


def _settings(tmp: Path, **over: object):  # type: ignore[no-untyped-def]
    table: dict[str, object] = {"storage": {"data_dir": str(tmp / "data")},
                                "scheduler": {"stable_age_s": 10.0}, "worker": {"max_attempts": 2}}
    table.update(over)
    return settings_from_dict(table)


def _db(tmp: Path) -> Database:
    return Database(f"sqlite:///{tmp / 'q.sqlite3'}")


def _add_job(db: Database, study_uid: str | None = None, fp: str | None = None) -> int:
    now = utcnow()
    with db.session() as s:
        st = Study(study_uid=study_uid or generate_uid(), first_received_at=now, last_received_at=now)
        s.add(st)
        s.flush()
        job = Job(study_id=st.id, study_uid=st.study_uid, instance_fingerprint=fp or generate_uid(),
                  state=JobState.PENDING, created_at=now, updated_at=now)
        s.add(job)
        s.flush()
        return job.id


def test_uid_validation() -> None:
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2") and is_strict_uid("1.2.840.10008.5.1.4.1.1.2")
    assert is_valid_uid("1.2.03") and not is_strict_uid("1.2.03")
    for bad in ("", "1..2", ".1", "1.2.", "1.2/3", "../1", "1.2.3a", "1" * 65, None, 12):
        assert not is_valid_uid(bad), bad
    with pytest.raises(InputError, match="StudyInstanceUID"):
        check_uid("1.2/../x", "StudyInstanceUID")


def test_sqlite_pragmas_and_views(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with db.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert int(c.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000
    job_id = _add_job(db)
    db.dispose()
    # A physicist's view of the queue with the plain sqlite3 module (no SQLAlchemy).
    con = sqlite3.connect(tmp_path / "q.sqlite3")
    row = con.execute("SELECT job_id, state, deliveries_total FROM v_jobs_overview").fetchone()
    assert row == (job_id, "PENDING", 0)
    assert con.execute("SELECT COUNT(*) FROM v_deliveries_pending").fetchone() == (0,)
    assert con.execute("SELECT n_instances FROM v_studies").fetchone() == (0,)
    con.close()


def test_transition_table_is_consistent() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(JobState)
    assert set(ALLOWED_DELIVERY_TRANSITIONS) == set(DeliveryState)
    assert not ALLOWED_TRANSITIONS[JobState.SUCCEEDED]  # a planned job is final


def test_transition_is_conditional_and_appends_events(tmp_path: Path) -> None:
    db = _db(tmp_path)
    job_id = _add_job(db)
    with db.session() as s:
        transition(s, job_id, {JobState.PENDING}, JobState.RUNNING, "test claim")
    with pytest.raises(TransitionError, match="is RUNNING"), db.session() as s:
        transition(s, job_id, {JobState.PENDING}, JobState.CANCELLED, "too late")
    with pytest.raises(ValueError, match="not allowed"), db.session() as s:
        transition(s, job_id, {JobState.SUCCEEDED}, JobState.RUNNING)
    with db.session() as s:
        transition(s, job_id, {JobState.RUNNING}, JobState.FAILED, "plan exceeded 1 s")
        job = s.get(Job, job_id)
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
    assert job is not None and job.state == JobState.FAILED and job.failure_reason == "plan exceeded 1 s"
    assert job.finished_at is not None and job.finished_at.tzinfo is not None
    assert [(e.from_state, e.to_state) for e in events] == [(JobState.PENDING, JobState.RUNNING),
                                                           (JobState.RUNNING, JobState.FAILED)]
    with pytest.raises(TransitionError, match="does not exist"), db.session() as s:
        transition(s, 9999, {JobState.PENDING}, JobState.RUNNING)


def _claimer(url: str, start_at: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    db = Database(url, create=False)
    got = []
    while time.time() < start_at:
        time.sleep(0.001)
    while True:
        with db.session() as s:
            job = claim_next_job(s, f"proc-{mp.current_process().pid}")
            if job is None:
                break
            got.append(job.id)
    out.put(got)
    db.dispose()


@pytest.mark.parametrize("n_jobs", [1, 30])
def test_two_worker_processes_never_claim_the_same_job(tmp_path: Path, n_jobs: int) -> None:
    db = _db(tmp_path)
    ids = {_add_job(db) for _ in range(n_jobs)}
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 3.0  # both processes are up and importing done by then
    procs = [ctx.Process(target=_claimer, args=(db.url, start_at, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    a, b = (set(r) for r in results)
    assert not a & b
    assert a | b == ids
    with db.session() as s:
        claims = list(s.scalars(select(JobEvent.job_id).where(JobEvent.to_state == JobState.RUNNING)))
        attempts = list(s.scalars(select(Job.attempts)))
    assert sorted(claims) == sorted(ids) and set(attempts) == {1}


# ------------------------------------------------------------------------------------------------
# Scheduler


def _register(db: Database, ds: pydicom.Dataset, modality: str, at: dt.datetime,
              for_uid: str | None = None, ref_series: str | None = None) -> None:
    hdr = InstanceHeader(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                         sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, modality=modality,
                         transfer_syntax_uid="1.2.840.10008.1.2.1",
                         frame_of_reference_uid=for_uid or getattr(ds, "FrameOfReferenceUID", None),
                         referenced_series_uid=ref_series)
    with db.session() as s:
        out = register_instance(s, hdr, path=f"instances/{ds.SOPInstanceUID}.dcm", size_bytes=1,
                                sha256=ds.SOPInstanceUID, calling_ae_title="T", received_at=at)
    assert out == RegisterOutcome.NEW


def test_scheduler_rules(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    db = Database(settings.database_url)
    sched = StudyScheduler.for_node(settings, db, ct_only_wait_s=100.0)
    t0 = utcnow()
    study, series, for_uid = generate_uid(), generate_uid(), generate_uid()
    cts = [make_ct_slice(study=study, series=series, for_uid=for_uid, z=float(k)) for k in range(3)]
    for ds in cts:
        _register(db, ds, "CT", t0)
    assert sched.tick(t0 + dt.timedelta(seconds=5)) == []  # not stable yet
    assert sched.tick(t0 + dt.timedelta(seconds=20)) == []  # CT only: wait for the structure set
    rs = make_rtstruct(study=study, for_uid=for_uid, ct_series=series)
    _register(db, rs, "RTSTRUCT", t0 + dt.timedelta(seconds=30), for_uid=for_uid, ref_series=series)
    assert sched.tick(t0 + dt.timedelta(seconds=35)) == []  # the RTSTRUCT made it unstable again
    first = sched.tick(t0 + dt.timedelta(seconds=41))
    assert len(first) == 1
    assert sched.tick(t0 + dt.timedelta(seconds=50)) == []  # once per instance set
    # A second RTSTRUCT (re-contoured) arrives: a new job; the pending one is superseded.
    rs2 = make_rtstruct(study=study, for_uid=for_uid, ct_series=series)
    _register(db, rs2, "RTSTRUCT", t0 + dt.timedelta(seconds=60), for_uid=for_uid, ref_series=series)
    second = sched.tick(t0 + dt.timedelta(seconds=75))
    assert len(second) == 1
    with db.session() as s:
        j1, j2 = s.get(Job, first[0]), s.get(Job, second[0])
        n2 = len(list(s.scalars(select(JobInstance.instance_id).where(JobInstance.job_id == second[0]))))
        assert j1 is not None and j2 is not None
        assert j1.state == JobState.SUPERSEDED and f"job {j2.id}" in str(j1.failure_reason)
        assert j2.state == JobState.PENDING and j2.rtstruct_uid == rs2.SOPInstanceUID
        assert j2.instance_fingerprint != j1.instance_fingerprint and n2 == 4  # 3 CT + the new RTSTRUCT

    # RTSTRUCT without CT: FAILED with a readable reason.
    lone = make_rtstruct(study=generate_uid(), for_uid=generate_uid(), ct_series=generate_uid())
    _register(db, lone, "RTSTRUCT", t0, for_uid=str(lone.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID))
    # CT on another frame of reference than its RTSTRUCT.
    st3 = generate_uid()
    _register(db, make_ct_slice(study=st3, series=generate_uid(), for_uid=generate_uid(), z=0.0), "CT", t0)
    other = make_rtstruct(study=st3, for_uid=generate_uid(), ct_series=generate_uid())
    _register(db, other, "RTSTRUCT", t0, for_uid=str(other.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID))
    # CT only, after the long wait.
    st4 = generate_uid()
    _register(db, make_ct_slice(study=st4, series=generate_uid(), for_uid=generate_uid(), z=0.0), "CT", t0)
    made = sched.tick(t0 + dt.timedelta(seconds=200))
    with db.session() as s:
        failed = {j.study_uid: j.failure_reason for j in s.scalars(select(Job).where(Job.id.in_(made)))}
    assert "no CT series" in str(failed[lone.StudyInstanceUID])
    assert "Frame of Reference" in str(failed[st3])
    assert "no RT Structure Set" in str(failed[st4])
    # Two schedulers (two processes) on the same database: still one job per instance set.
    st5, se5, f5 = generate_uid(), generate_uid(), generate_uid()
    _register(db, make_ct_slice(study=st5, series=se5, for_uid=f5, z=0.0), "CT", t0)
    _register(db, make_rtstruct(study=st5, for_uid=f5, ct_series=se5), "RTSTRUCT", t0, for_uid=f5)
    other_sched = StudyScheduler.for_node(settings, Database(settings.database_url))
    later = t0 + dt.timedelta(seconds=300)
    assert len(sched.tick(later)) + len(other_sched.tick(later)) == 1


# ------------------------------------------------------------------------------------------------
# Recovery


def test_recovery_after_a_crash(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    db = Database(settings.database_url)
    store = InstanceStore(settings.data_dir)
    # 1. a file renamed into place whose row never committed
    ds = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0)
    rel = store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    store.absolute(rel).parent.mkdir(parents=True)
    ds.save_as(store.absolute(rel), enforce_file_format=True)
    # 2. a temporary file of an interrupted write
    tmp = store.absolute(rel).with_name(".x.dcm.tmp-abc123")
    tmp.write_bytes(b"partial")
    # 3. an unreadable file
    junk_rel = store.relative_path("1.2.3", "1.2.4", "1.2.5")
    store.absolute(junk_rel).parent.mkdir(parents=True)
    store.absolute(junk_rel).write_bytes(b"not dicom at all")
    # 4. a row whose file is gone
    gone = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0)
    _register(db, gone, "CT", utcnow())
    # 5. jobs left RUNNING: one with attempts to spare, one without
    j_ok, j_out = _add_job(db), _add_job(db)
    with db.session() as s:
        transition(s, j_ok, {JobState.PENDING}, JobState.RUNNING, values={"attempts": 1})
        transition(s, j_out, {JobState.PENDING}, JobState.RUNNING, values={"attempts": 2})
    rep = recover(settings, db, store)
    assert rep.temp_files_removed == 1 and not tmp.exists()
    assert rep.files_registered == 1 and rep.files_quarantined == 1 and rep.rows_without_file == 1
    assert rep.jobs_requeued == [j_ok] and rep.jobs_failed == [j_out]
    with db.session() as s:
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
        kinds = sorted(s.scalars(select(NodeEvent.kind)))
        states = {j.id: j.state for j in s.scalars(select(Job))}
    assert inst is not None and inst.sha256 == sha256_file(store.absolute(rel))[1]
    assert kinds == ["instance_file_missing", "instance_quarantined", "instance_recovered"]
    assert states == {j_ok: JobState.PENDING, j_out: JobState.FAILED}
    assert list(store.quarantine_dir.glob("*.why.txt"))
    # A second recovery finds nothing more to do.
    again = recover(settings, db, store)
    assert (again.files_registered, again.files_quarantined, again.temp_files_removed) == (0, 0, 0)


def test_a_database_from_before_migrations_is_upgraded_in_place(tmp_path: Path) -> None:
    """A queue database created before the schema had versions (no alembic_version, none of the profile
    columns) keeps its rows and is brought to the newest revision at start; the migrated schema is
    exactly the models' (Alembic's autogenerate comparison finds no difference)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from storage.db import MIGRATIONS_DIR, schema_revision
    from storage.models import Base

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    db = Database(url)
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert schema_revision(db.engine) == head
    db.dispose()
    con = sqlite3.connect(tmp_path / "old.sqlite3")
    con.execute("DROP VIEW v_jobs_overview")
    for table, column in (("jobs", "profile"), ("jobs", "profile_reason"), ("jobs", "hold_reason"),
                          ("instances", "called_ae_title")):
        con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    con.execute("DROP TABLE alembic_version")
    con.execute("INSERT INTO studies (study_uid, first_received_at, last_received_at) "
                "VALUES ('1.2.3', '2026-01-01 00:00:00.000000', '2026-01-01 00:00:00.000000')")
    con.commit()
    con.close()

    db = Database(url)
    try:
        assert schema_revision(db.engine) == head
        with db.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        with db.session() as s:
            assert [st.study_uid for st in s.query(Study)] == ["1.2.3"]
            assert s.execute(text("SELECT profile, hold_reason FROM v_jobs_overview")).all() == []
    finally:
        db.dispose()
