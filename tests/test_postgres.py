"""Scale-out on PostgreSQL: the same storage code on a real PostgreSQL server started by the test
(Debian's binaries, a throw-away cluster on a unix socket), several worker processes sharing one
queue (claims with ``SELECT ... FOR UPDATE SKIP LOCKED``), exactly one claim per job.

Skipped when the PostgreSQL server binaries or the psycopg driver are absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from appliance.plan_summary import PlanSummary
from appliance.scheduler import StudyScheduler
from core.request import CaseRequest
from storage.db import Database
from storage.models import Instance, Job, JobEvent, JobInstance, Series, Study
from storage.states import JobState, utcnow
from tests.node_helpers import PostgresServer, node_settings, running_scp, store_paths
from tests.test_scp import write_case

pytest.importorskip("psycopg", reason="psycopg 3 (the PostgreSQL driver) is not installed: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "data" / "dicompyler_example"

pytestmark = pytest.mark.external


def quick_plan(request: CaseRequest, out_dir: Path, method: str | None,
                  on_deliverable: Callable[[PlanSummary], None] | None = None) -> PlanSummary:
    """A planning function for queue tests: writes a (real, shipped) RT Plan and RT Dose as the outputs
    so that the worker's success path runs, without spending minutes planning."""
    for name in ("rtplan.dcm", "rtdose.dcm"):
        shutil.copy(RESULTS / name, out_dir / name)
    summary = PlanSummary(case_id=request.study_uid, method="optimize", profile="queue-test", profile_reason="test",
                          dose_gy=40.0, fractions=5, verdict="no clinical goals in the profile", p1_met=None,
                          ptv_d98_gy=None, ptv_hi=None, bladder_dmean_gy=None, rectum_dmean_gy=None, total_mu=0.0,
                          rtplan_uid="", stages_s={})
    (out_dir / "metrics.json").write_text(json.dumps({"summary": summary.to_dict()}))
    return summary


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


def _fresh_db(pg: PostgresServer, name: str) -> str:
    """A new empty database on the server (one per test), returned as a SQLAlchemy URL."""
    r = pg._run(str(pg.bindir / "createdb"), "-h", str(pg.sock), "-p", str(pg.port), "-U", "airt", name)
    assert r.returncode == 0, r.stderr
    return pg.url.replace(f"/{pg.database}?", f"/{name}?")


def _add_jobs(db: Database, n: int, data_dir: Path | None = None) -> list[int]:
    """``n`` PENDING jobs; with ``data_dir``, each over one stored CT image and RT Structure Set (files
    written there) as the scheduler would have chosen them."""
    now = utcnow()
    ids = []
    with db.session() as s:
        for k in range(n):
            st = Study(study_uid=f"1.2.826.0.1.{k + 1}", first_received_at=now, last_received_at=now)
            s.add(st)
            s.flush()
            job = Job(study_id=st.id, study_uid=st.study_uid, instance_fingerprint=f"f{k}", state=JobState.PENDING,
                      created_at=now, updated_at=now)
            s.add(job)
            s.flush()
            ids.append(job.id)
            if data_dir is None:
                continue
            case = write_case(data_dir / "cases" / str(k), n_slices=1, study=st.study_uid)
            series = Series(study_id=st.id, series_uid=str(case["series"]), modality="CT")
            s.add(series)
            s.flush()
            paths: list[Path] = case["paths"]  # type: ignore[assignment]
            for path in paths:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                inst = Instance(series_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
                                sop_class_uid=ds.SOPClassUID, modality=ds.Modality,
                                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                                path=str(path.relative_to(data_dir)), size_bytes=path.stat().st_size, sha256="0" * 64,
                                calling_ae_title="PEER", received_at=now)
                s.add(inst)
                s.flush()
                s.add(JobInstance(job_id=job.id, instance_id=inst.id))
            job.ct_series_uid, job.rtstruct_uid = str(case["series"]), str(case["rtstruct"])
    return ids


def test_scp_and_scheduler_on_postgresql(tmp_path: Path, pg: PostgresServer) -> None:
    url = _fresh_db(pg, "scp")
    settings = node_settings(tmp_path, storage={"database_url": url})
    case = write_case(tmp_path / "case", n_slices=3)
    with running_scp(settings) as scp:
        assert scp.db.engine.dialect.name == "postgresql"
        paths: list[Path] = case["paths"]  # type: ignore[assignment]
        assert store_paths(scp.port, paths).statuses == [0] * 4
        # Same instance again: an idempotent duplicate; same UID, other content: refused.
        assert store_paths(scp.port, paths[:1]).statuses == [0]
        other = pydicom.dcmread(paths[0])
        other.PixelData = bytes(len(other.PixelData))
        other.save_as(tmp_path / "other.dcm")
        assert store_paths(scp.port, [tmp_path / "other.dcm"]).statuses == [0xC212]
        jobs = StudyScheduler.for_node(settings, scp.db).tick()
        assert len(jobs) == 1
        assert StudyScheduler.for_node(settings, scp.db).tick() == []  # created once
        with scp.db.session() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 4
            job = s.get(Job, jobs[0])
            assert job is not None and job.state == JobState.PENDING and job.study_uid == case["study"]
            assert job.created_at.tzinfo is not None


CLAIMER = textwrap.dedent("""
    import json, pathlib, sys, time
    from sqlalchemy import text
    from storage.db import Database, claim_next_job
    db = Database(sys.argv[1], create=False)
    with db.session() as s:  # connected and imported: tell the test, then wait for the start signal
        s.execute(text("SELECT 1"))
    gate = pathlib.Path(sys.argv[3])
    (gate / ("ready-" + sys.argv[2])).touch()
    while not (gate / "go").exists():
        time.sleep(0.01)
    got = []
    while True:
        with db.session() as s:
            job = claim_next_job(s, sys.argv[2])
            if job is None:
                break
            got.append(job.id)
        time.sleep(0.005)  # a worker plans between claims; let the others in
    print(json.dumps(got))
""")


def test_processes_racing_for_jobs_each_claim_a_job_exactly_once(pg: PostgresServer, tmp_path: Path) -> None:
    url = _fresh_db(pg, "race")
    db = Database(url)
    ids = _add_jobs(db, 120)
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, url, f"claimer-{k}", str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(3)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3:  # all three connected before any claims
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a claimer did not start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    claimed: list[list[int]] = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        claimed.append(json.loads(out.strip().splitlines()[-1]))
    flat = [j for c in claimed for j in c]
    assert sorted(flat) == sorted(ids)  # every job once, none twice
    assert sum(1 for c in claimed if c) >= 2, [len(c) for c in claimed]  # they really raced
    with db.session() as s:
        states = set(s.scalars(select(Job.state)))
        attempts = set(s.scalars(select(Job.attempts)))
        n_events = s.scalar(select(func.count()).select_from(JobEvent))
        workers = {w: n for w, n in s.execute(select(Job.worker, func.count()).group_by(Job.worker))}
    assert states == {JobState.RUNNING} and attempts == {1} and n_events == len(ids)
    assert {w: n for w, n in workers.items()} == {f"claimer-{k}": len(c) for k, c in enumerate(claimed) if c}
    db.dispose()


WORKER = textwrap.dedent("""
    import json, sys
    from appliance.config import settings_from_dict
    from appliance.worker import Worker
    from storage.db import Database
    settings = settings_from_dict(json.loads(sys.argv[1]))
    from tests.test_postgres import quick_plan
    worker = Worker.for_node(settings, Database(settings.database_url, create=False), name=sys.argv[2],
                             plan=quick_plan)
    done = []
    while (job := worker.run_once()) is not None:
        done.append(job)
    print(json.dumps(done))
""")


@pytest.mark.slow
def test_worker_processes_share_one_queue(tmp_path: Path, pg: PostgresServer) -> None:
    url = _fresh_db(pg, "workers")
    table = {"storage": {"data_dir": str(tmp_path / "data"), "database_url": url},
             "destinations": [{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": 104}]}
    db = Database(url)
    ids = _add_jobs(db, 6, tmp_path / "data")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(table), f"worker-{k}"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        done.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(j for d in done for j in d) == sorted(ids)
    with db.session() as s:
        rows = list(s.execute(select(Job.id, Job.state, Job.attempts, Job.worker, Job.output_dir)))
        n_deliveries = s.scalar(select(func.count()).select_from(Job).where(Job.state == JobState.SUCCEEDED))
    for job_id, state, attempts, worker, out_dir in rows:
        assert state == JobState.SUCCEEDED and attempts == 1, (job_id, state)
        assert job_id in done[int(str(worker).split("-")[1])]
        assert (tmp_path / "data" / str(out_dir) / "rtplan.dcm").is_file()
    assert n_deliveries == len(ids)
    db.dispose()
