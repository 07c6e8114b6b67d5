"""The node's HTTP endpoint: /healthz, /readyz, /metrics parsed by Prometheus' own parser while a study is
pushed over DICOM, and the read-only job pages rendered by a real headless Chromium.

Everything is real: the node's Storage SCP on loopback, the SQLite queue, the planning child process,
the HTTP server on a free port, ``urllib``/``http.client`` and Chromium (Debian package ``chromium``;
the browser tests skip where it is missing).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from PIL import Image
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from appliance.config import Settings
from appliance.health import Readiness
from appliance.metrics import NodeMetrics
from appliance.scheduler import StudyScheduler
from appliance.scp import StorageSCP
from appliance.scu import Deliverer
from appliance.service import Node
from appliance.web import WebServer
from appliance.worker import Worker
from core.errors import ConfigError
from storage.db import Database
from storage.instance_store import InstanceStore
from storage.models import Delivery, Instance, Job, JobEvent, Study
from storage.states import DeliveryState, JobState, utcnow
from tests.conftest import free_port, require_tool
from tests.node_helpers import case_files, node_settings, store_paths, tiny_case

PATIENT_NAME = "Zyxwvut^Quorra"
PATIENT_ID = "PID-98765-ZQ"
"""Distinctive patient name and ID written into the pushed case; no page may show them."""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ------------------------------------------------------------------------------------------------
# Helpers


def get(base: str, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    """One request with ``path`` sent exactly as given (no client-side normalisation of ``..``)."""
    host, port = base.removeprefix("http://").rstrip("/").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        rsp = conn.getresponse()
        return rsp.status, {k.lower(): v for k, v in rsp.getheaders()}, rsp.read()
    finally:
        conn.close()


def scrape(base: str) -> Samples:
    """``/metrics`` parsed with prometheus_client's parser: (sample name, labels) -> value."""
    with urllib.request.urlopen(base + "metrics", timeout=60) as rsp:
        assert rsp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = rsp.read().decode("utf-8")
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not in /metrics; names: {sorted({n for n, _ in samples})}"
    return samples[key]


def readyz(base: str) -> tuple[int, dict[str, Any]]:
    status, headers, body = get(base, "/readyz")
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)


def rename_patient(paths: list[Path]) -> None:
    """Write :data:`PATIENT_NAME` and :data:`PATIENT_ID` into every file of a case."""
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.save_as(p)


@contextmanager
def scp_with_metrics(settings: Settings, db: Database, metrics: NodeMetrics) -> Iterator[StorageSCP]:
    scp = StorageSCP.for_node(settings, db, InstanceStore(settings.data_dir), metrics=metrics)
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@contextmanager
def web_server(settings: Settings, db: Database, metrics: NodeMetrics, readiness: Readiness) -> Iterator[str]:
    web = WebServer.for_node(settings, db, metrics, readiness)
    web.start()
    try:
        yield web.url
    finally:
        web.stop()


# ------------------------------------------------------------------------------------------------
# Health, readiness and metrics of a running node


def test_node_metrics_move_while_a_study_is_pushed_and_readiness_names_what_fails(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, http={"port": 0}, worker={"enabled": False})
    paths = case_files(tiny_case(tmp_path / "case"))
    conflicting = tmp_path / "conflict.dcm"
    ds = pydicom.dcmread(paths[0])
    ds.SeriesDescription = "same SOP Instance UID, other content"
    ds.save_as(conflicting)
    node = Node(settings)
    node.start()
    try:
        assert node.http is not None
        base = node.http.url
        assert base.startswith("http://127.0.0.1:")
        assert get(base, "/healthz")[:3:2] == (200, b"ok\n")
        before = scrape(base)
        assert value(before, "airt_dicom_associations_accepted_total") == 0
        assert value(before, "airt_database_up") == 1

        run = store_paths(node.port or 0, paths)
        assert run.established and set(run.statuses) == {0}
        run = store_paths(node.port or 0, [paths[0], conflicting])  # an exact duplicate, then a conflict
        assert run.statuses == [0, 0xC212]
        assert not store_paths(node.port or 0, paths[:1], aet="STRANGER").established
        assert not store_paths(node.port or 0, paths[:1], called="NOT_THIS_NODE").established

        with node.db.session() as s:
            stored_bytes = {m: int(b) for m, b in s.execute(
                select(Instance.modality, func.sum(Instance.size_bytes)).group_by(Instance.modality))}
            first_size = s.scalar(select(Instance.size_bytes).where(
                Instance.sop_instance_uid == str(pydicom.dcmread(paths[0]).SOPInstanceUID)))
        after = scrape(base)
        assert value(after, "airt_dicom_associations_accepted_total") == 2
        assert value(after, "airt_dicom_associations_rejected_total", reason="calling_ae_not_allowed") == 1
        assert value(after, "airt_dicom_associations_rejected_total", reason="called_ae_unknown") == 1
        assert value(after, "airt_dicom_associations_rejected_total", reason="local_limit") == 0
        n_ct = len(paths) - 1
        assert value(after, "airt_dicom_instances_received_total", modality="CT", outcome="stored") == n_ct
        assert value(after, "airt_dicom_instances_received_total", modality="RTSTRUCT", outcome="stored") == 1
        assert value(after, "airt_dicom_instances_received_total", modality="CT", outcome="duplicate") == 1
        assert value(after, "airt_dicom_received_bytes_total", modality="CT") == stored_bytes["CT"] + first_size
        assert value(after, "airt_dicom_received_bytes_total", modality="RTSTRUCT") == stored_bytes["RTSTRUCT"]
        assert value(after, "airt_dicom_store_failures_total", status="0xC212") == 1
        assert value(after, "airt_dicom_store_failures_total", status="0xA700") == 0
        assert value(after, "airt_data_free_bytes") > 0

        # The scheduler (stable_age_s = 0) makes a job of the study; no worker runs, so it waits.
        for _ in range(100):
            if value(samples := scrape(base), "airt_jobs", state="PENDING") == 1:
                break
            threading.Event().wait(0.2)
        assert value(samples, "airt_jobs", state="PENDING") == 1
        assert value(samples, "airt_jobs", state="SUCCEEDED") == 0
        assert value(samples, "airt_deliveries", state="PENDING") == 0
        assert value(samples, "airt_oldest_pending_job_age_seconds") >= 0
        assert value(samples, "airt_planning_seconds_count") == 0
        assert value(samples, "airt_http_requests_total", route="metrics", code="200") >= 2

        # OpenMetrics when the scraper asks for it.
        status, headers, body = get(base, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
        names = {f.name for f in parse_openmetrics(body.decode())}
        assert {"airt_dicom_instances_received", "airt_jobs", "airt_planning_seconds"} <= names

        status, ready = readyz(base)
        assert status == 200 and ready["ready"] and ready["failing"] == []
        assert set(ready["checks"]) == {"scp_listening", "database_writable", "free_disk", "scheduler_running"}

        # A stopped worker thread and a disk below storage.min_free_disk_mb are named (same node, same database).
        dead = threading.Thread(target=lambda: None)
        dead.start()
        dead.join()
        ok, body_dead = Readiness.for_node(settings, node.db, node.scp, {"worker_alive": dead.is_alive}).report()
        assert not ok and body_dead["failing"] == ["worker_alive"]
        full = node_settings(tmp_path, storage={"min_free_disk_mb": 1 << 40})
        ok, body_full = Readiness.for_node(full, node.db, node.scp).report()
        assert not ok and body_full["failing"] == ["free_disk"]
        assert "storage.min_free_disk_mb" in body_full["checks"]["free_disk"]["detail"]

        node.scp.stop()
        status, ready = readyz(base)
        assert status == 503 and ready["failing"] == ["scp_listening"], ready
        assert "not listening" in ready["checks"]["scp_listening"]["detail"]
        assert get(base, "/healthz")[0] == 200  # alive, not ready
    finally:
        node.stop()
        node.shutdown()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(base + "healthz", timeout=5)


def test_http_disabled_and_port_in_use(tmp_path: Path) -> None:
    node = Node(node_settings(tmp_path / "a", http={"enabled": False}, worker={"enabled": False}))
    node.start()
    try:
        assert node.http is None
    finally:
        node.stop()
        node.shutdown()
    busy = Node(node_settings(tmp_path / "b", http={"port": 0}, worker={"enabled": False}))
    busy.start()
    try:
        assert busy.http is not None
        clash = Node(node_settings(tmp_path / "c", http={"port": busy.http.port}, worker={"enabled": False}))
        with pytest.raises(ConfigError, match=r"http\.port \d+: cannot listen on 127\.0\.0\.1:\d+ .*set \[http\] port"):
            clash.start()
        with pytest.raises(RuntimeError):
            _ = clash.scp.port  # the SCP it had started is stopped again
        clash.db.dispose()
    finally:
        busy.stop()
        busy.shutdown()


# ------------------------------------------------------------------------------------------------
# Job pages: escaping, the image whitelist, read-only


def _png(path: Path, colour: tuple[int, int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), colour).save(path)
    return path.read_bytes()


def _add_job(db: Database, study_uid: str, **values: Any) -> int:
    now = utcnow()
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            study = Study(study_uid=study_uid, first_received_at=now, last_received_at=now)
            s.add(study)
            s.flush()
        job = Job(study_id=study.id, study_uid=study_uid, instance_fingerprint=os.urandom(8).hex(),
                  created_at=now, updated_at=now, **values)
        s.add(job)
        s.flush()
        return int(job.id)


def test_job_pages_escape_and_serve_only_the_report_images(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, http={"port": 0})
    data = settings.data_dir
    db = Database(settings.database_url)
    hostile = "<script>alert('x')</script>"
    ok_id = _add_job(db, "1.2.3.4", state=JobState.SUCCEEDED, method="optimize", profile="prostate_40gy_5fx",
                     profile_reason=f"the default profile {hostile}", output_dir="jobs/1/output", ptv_d98_gy=38.5,
                     ptv_hi=0.081, metrics={
                         "verdict": {"p1_met": False, "text": f"P1 FAILED: rectum {hostile}"},
                         "goals": [{"structure": hostile, "metric": "V36Gycc", "comparison": "<=", "limit": 2.0,
                                    "priority": 1, "value": 3.1, "unit": "cm3", "passed": False}],
                         "structures": {"ptv": {"name": "PTV_4000", "D98_Gy": 38.5, "HI": 0.081}},
                     }, hold_reason=f"review {hostile}")
    with db.session() as s:
        s.add(JobEvent(job_id=ok_id, at=utcnow(), from_state=None, to_state=JobState.PENDING, message=hostile))
        s.add(Delivery(job_id=ok_id, destination="tps", ae_title="TPS", host="127.0.0.1", port=104,
                       state=DeliveryState.PENDING, last_error=hostile, next_try_at=utcnow(), created_at=utcnow(),
                       updated_at=utcnow()))
    dvh = _png(data / "jobs/1/output/report_dvh.png", (200, 30, 30))
    _png(data / "jobs/1/output/report_slices.png", (30, 30, 200))
    (data / "jobs/1/output/rtplan.dcm").write_bytes(b"not to be served")
    (data / "jobs/1/output/metrics.json").write_text("{}")
    outside = _png(tmp_path / "outside/report_dvh.png", (0, 255, 0))
    escaped_id = _add_job(db, "1.2.3.5", state=JobState.SUCCEEDED, output_dir="../outside")
    failed_id = _add_job(db, "1.2.3.6", state=JobState.FAILED, failure_reason=f"no CT {hostile}")

    metrics = NodeMetrics(db, data)
    with web_server(settings, db, metrics, Readiness.for_node(settings, db, None)) as base:
        status, headers, body = get(base, f"/jobs/{ok_id}")
        page = body.decode()
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert "Research output; not clinically approved" in page
        assert "<script" not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
        assert 'id="verdict"' in page and "P1 FAIL" in page and 'id="goals"' in page and 'id="hold"' in page
        assert f'src="/jobs/{ok_id}/report_dvh.png"' in page and f'src="/jobs/{ok_id}/report_slices.png"' in page

        listing = get(base, "/")[2].decode()
        assert "<script" not in listing and "&lt;script&gt;" in listing
        assert all(f'href="/jobs/{i}"' in listing for i in (ok_id, escaped_id, failed_id))
        assert "HELD" in listing and "P1 FAIL" in listing
        only_failed = get(base, "/?state=FAILED")[2].decode()
        assert f'href="/jobs/{failed_id}"' in only_failed and f'href="/jobs/{ok_id}"' not in only_failed
        assert get(base, "/?state=NONSENSE")[0] == 400 and get(base, "/?limit=0")[0] == 400

        status, headers, body = get(base, f"/jobs/{ok_id}/report_dvh.png")
        assert (status, headers["content-type"], body) == (200, "image/png", dvh)
        assert get(base, f"/jobs/{ok_id}/report_slices.png", method="HEAD")[::2] == (200, b"")
        assert get(base, f"/jobs/{escaped_id}/report_dvh.png")[0] == 404  # output_dir outside the data dir
        assert outside not in get(base, f"/jobs/{escaped_id}/report_dvh.png")[2]
        assert get(base, f"/jobs/{failed_id}/report_dvh.png")[0] == 404  # no output folder
        assert (data / "airt.sqlite3").is_file()
        for path in (f"/jobs/{ok_id}/../../airt.sqlite3", f"/jobs/{ok_id}/%2e%2e%2fairt.sqlite3",
                     f"/jobs/{ok_id}/%2e%2e/%2e%2e/airt.sqlite3", f"/jobs/{ok_id}/report_dvh.png/../../../airt.sqlite3",
                     f"/jobs/{ok_id}/..%2f..%2fairt.sqlite3", f"/jobs/{ok_id}/rtplan.dcm", f"/jobs/{ok_id}/metrics.json",
                     f"/jobs/{ok_id}/report_dvh%2epng", "/airt.sqlite3", "/../airt.sqlite3", "/jobs/0", "/jobs/abc",
                     f"/jobs/{ok_id}/", "/jobs/99999"):
            status, _, body = get(base, path)
            assert status == 404, path
            assert b"SQLite format 3" not in body and b"not to be served" not in body, path
        for method in ("POST", "PUT", "DELETE"):
            status, headers, _ = get(base, f"/jobs/{ok_id}", method=method)
            assert status == 405 and headers["allow"] == "GET, HEAD"
        samples = scrape(base)
        assert value(samples, "airt_http_requests_total", route="not_found", code="404") >= 8
        assert value(samples, "airt_jobs", state="SUCCEEDED") == 2
        assert value(samples, "airt_jobs", state="FAILED") == 1
        assert value(samples, "airt_deliveries", state="PENDING") == 1
        status, ready = readyz(base)
        assert status == 503 and ready["failing"] == ["scp_listening"]  # no SCP in this process
    db.dispose()


# ------------------------------------------------------------------------------------------------
# A planned job in a real browser


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = require_tool("chromium")
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={cwd / 'chromium-profile'}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.mark.slow
@pytest.mark.external
def test_planned_job_in_headless_chromium(tmp_path: Path) -> None:
    """A tiny case pushed, scheduled, planned by the worker and tried once at a destination that is down;
    the job list and the job page rendered by Chromium show the verdict, profile, goals and deliveries and
    load the report images, and show no patient name or ID; the metrics count the plan and the delivery."""
    require_tool("chromium")
    settings = node_settings(tmp_path, http={"port": 0}, destinations=[
        {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": free_port()}])
    paths = case_files(tiny_case(tmp_path / "case"))
    rename_patient(paths)
    db = Database(settings.database_url)
    metrics = NodeMetrics(db, settings.data_dir)
    with scp_with_metrics(settings, db, metrics) as scp:
        assert set(store_paths(scp.port, paths).statuses) == {0}
        (job_id,) = StudyScheduler.for_node(settings, db).tick(utcnow())
        assert Worker.for_node(settings, db, metrics=metrics).run_once() == job_id
        assert Deliverer.for_node(settings, db, metrics=metrics).tick(utcnow()) == 0  # nobody listens at the destination
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None and job.state == JobState.SUCCEEDED and job.metrics
            profile, verdict, n_goals = job.profile, job.metrics["verdict"], len(job.metrics["goals"])
        assert profile
        with web_server(settings, db, metrics, Readiness.for_node(settings, db, scp)) as base:
            samples = scrape(base)
            assert value(samples, "airt_planning_processes_total", outcome="ok") == 1
            assert value(samples, "airt_jobs", state="SUCCEEDED") == 1
            assert value(samples, "airt_planning_seconds_count") == 1 and value(samples, "airt_planning_seconds_sum") > 0
            assert value(samples, "airt_delivery_attempts_total", destination="tps", outcome="failed") == 1
            assert value(samples, "airt_deliveries", state="PENDING") == 1
            assert value(samples, "airt_dicom_instances_received_total", modality="CT", outcome="stored") == len(paths) - 1

            listing = chromium("--dump-dom", base, cwd=tmp_path).stdout
            assert f'href="/jobs/{job_id}"' in listing and profile in listing
            assert ("P1 met" if verdict["p1_met"] else "P1 FAIL") in listing
            page = chromium("--dump-dom", f"{base}jobs/{job_id}", cwd=tmp_path).stdout
            assert "Research output; not clinically approved" in page
            assert 'id="verdict"' in page and verdict["text"].split(":")[0] in page and profile in page
            assert 'id="goals"' in page and 'id="dvh"' in page and 'id="events"' in page and n_goals > 0
            results = [page.count(f'class="{c}">{t}<') for c, t in (("pass", "PASS"), ("fail", "FAIL"), ("na", "n/a"))]
            assert sum(results) == n_goals, results
            assert 'id="report_dvh"' in page and 'id="report_slices"' in page
            assert "tps" in page and "TPS@127.0.0.1" in page and "no association" in page
            for text in (listing, page):
                assert "Zyxwvut" not in text and "Quorra" not in text and PATIENT_ID not in text

            images_before = value(scrape(base), "airt_http_requests_total", route="report_image", code="200")
            shot = tmp_path / "job.png"
            chromium(f"--screenshot={shot}", "--window-size=1280,2000", f"{base}jobs/{job_id}", cwd=tmp_path)
            images_after = value(scrape(base), "airt_http_requests_total", route="report_image", code="200")
            assert images_after - images_before >= 2  # the browser loaded both report images
    db.dispose()
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500, "the screenshot looks blank"
    banner = img.crop((0, 0, 1280, 30)).getcolors(maxcolors=1 << 16) or []
    assert max(banner)[1][0] > 150, "the red research banner is not at the top"  # its dominant colour is red
