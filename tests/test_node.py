"""The node as a process: real peers on loopback (dcmtk storescu/storescp, Orthanc, pynetdicom),
real SQLite files, kill -9 at the worst moments, and the systemd unit."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    RTDoseStorage,
    RTPlanStorage,
    RTStructureSetStorage,
)

from appliance.config import settings_from_dict
from appliance.scheduler import StudyScheduler
from appliance.scp import StorageSCP
from appliance.scu import wait_for_port
from appliance.worker import Worker
from storage.db import Database
from storage.instance_store import InstanceStore
from storage.models import Job
from storage.states import JobState, utcnow
from tests.conftest import free_port, require_tool
from tests.node_helpers import case_files, tiny_case
from tests.test_scp import PEER, associate, write_case
from tests.test_scu import _received_order, start_storescp

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "airt.service"

PLANNING_TOML = """
[planning]
method = "optimize"
optimizer_iterations = 5
optimizer_arc_iterations = 150
dose_grid_mm = 8.0
"""


# ------------------------------------------------------------------------------------------------
# systemd unit


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "User=airt", "StateDirectory=airt", "ProtectSystem=strict",
                 "NoNewPrivileges=true", "PrivateTmp=true", "ProtectHome=true", "RestrictAddressFamilies=",
                 "CapabilityBoundingSet=\n", "MemoryDenyWriteExecute=false", "DevicePolicy=closed",
                 "CacheDirectory=airt", "NUMBA_CACHE_DIR=/var/cache/airt/numba"):
        assert line in text, line
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt package systemd)")
    # verify checks that ExecStart exists: point it at this checkout's entry point.
    airt = Path(sys.executable).with_name("airt")
    if not airt.exists():
        pytest.skip("the airt entry point is not installed in this environment")
    unit = tmp_path / "airt.service"
    unit.write_text(text.replace("/opt/airt/bin/airt", str(airt)))
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "airt.service" not in r.stdout + r.stderr, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------
# In-process worker on tiny cases (fast: planning fails or times out early)


def _ingest_tiny_case(tmp_path: Path, plannable: bool = False, **settings_over: Any) -> tuple[Any, Database, int]:
    """Push a 3-slice case whose PTV is empty (unplannable), or with ``plannable`` a small real one,
    to an SCP, and let the scheduler make its job."""
    table: dict[str, Any] = {"node": {"port": free_port()}, "peers": [{"ae_title": PEER}],
                             "storage": {"data_dir": str(tmp_path / "data"), "min_free_disk_mb": 1},
                             "scheduler": {"stable_age_s": 0.0},
                             "planning": {"method": "optimize", "optimizer_iterations": 2, "dose_grid_mm": 8.0,
                                          "optimizer_arc_iterations": 150}}
    table.update(settings_over)
    settings = settings_from_dict(table)
    db = Database(settings.database_url)
    scp = StorageSCP.for_node(settings, db, InstanceStore(settings.data_dir))
    scp.start()
    try:
        if plannable:
            paths = case_files(tiny_case(tmp_path / "case"))
        else:
            paths = write_case(tmp_path / "case", n_slices=3)["paths"]  # type: ignore[assignment]
        assoc = associate(scp.port)
        for p in paths:
            assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    finally:
        scp.stop()
    (job_id,) = StudyScheduler.for_node(settings, db).tick(utcnow())
    return settings, db, job_id


def test_unplannable_case_fails_with_the_loaders_message(tmp_path: Path) -> None:
    settings, db, job_id = _ingest_tiny_case(tmp_path)
    assert Worker.for_node(settings, db).run_once() == job_id
    with db.session() as s:
        job = s.get(Job, job_id)
    assert job is not None and job.state == JobState.FAILED and job.attempts == 1
    assert job.failure_reason and "internal error" not in job.failure_reason, job.failure_reason
    assert (settings.data_dir / "jobs" / str(job_id) / "input").is_dir()
    assert len(list((settings.data_dir / "jobs" / str(job_id) / "input").glob("*.dcm"))) == 4


def test_plan_timeout_kills_the_planning_process(tmp_path: Path) -> None:
    # a plannable case: the loader's own error must not end the plan before the timeout does
    settings, db, job_id = _ingest_tiny_case(tmp_path, plannable=True, worker={"plan_timeout_s": 0.3})
    t0 = time.perf_counter()
    assert Worker.for_node(settings, db).run_once() == job_id
    assert time.perf_counter() - t0 < 30
    with db.session() as s:
        job = s.get(Job, job_id)
    assert job is not None and job.state == JobState.FAILED
    assert "plan exceeded 0.3 s" in str(job.failure_reason)
    assert job.timings is not None and job.timings["plan_process_s"] < 15


# ------------------------------------------------------------------------------------------------
# The node as a process


class NodeProcess:
    """``airt serve`` in a subprocess, with its log in a file."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        fh = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(self.config)],
                                     stdout=fh, stderr=fh, cwd=REPO)
        wait_for_port(self.port, timeout_s=120)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(90)


def write_config(path: Path, *, data: Path, port: int, destinations: list[tuple[str, str, int]],
                 peers: tuple[str, ...] = (PEER,)) -> None:
    lines = [f'[node]\nae_title = "AIRT"\nport = {port}\n']
    for p in peers:
        lines.append(f'[[peers]]\nae_title = "{p}"\nhost = "127.0.0.1"\n')
    for name, aet, dport in destinations:
        lines.append(f'[[destinations]]\nname = "{name}"\nae_title = "{aet}"\nhost = "127.0.0.1"\nport = {dport}\n')
    lines.append(f'[storage]\ndata_dir = "{data}"\nmin_free_disk_mb = 1\n')
    lines.append("[scheduler]\nstable_age_s = 2.0\npoll_interval_s = 0.5\n")
    lines.append("[worker]\nplan_timeout_s = 900.0\nmax_attempts = 3\n")
    lines.append("[delivery]\nretry_initial_s = 1.0\nretry_max_s = 4.0\n")
    lines.append("[http]\nport = 0\n")
    path.write_text("\n".join(lines) + PLANNING_TOML)


def query(db_file: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def wait_for(cond: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            if cond():
                return
        except sqlite3.OperationalError:
            pass
        time.sleep(0.3)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def synth_case(folder: Path, seed: int = 3) -> list[Path]:
    from appliance.synth_dicom import write_synth_case

    w = write_synth_case(folder, seed, n_slices=48, pixel_mm=1.95, matrix=256, slice_mm=5.0)
    return [*w.ct_paths, w.rtstruct_path]


class BlockingReceiver:
    """A pynetdicom Storage SCP that holds its first C-STORE until released (to kill the node while
    it is sending) and records what it received."""

    def __init__(self, port: int) -> None:
        self.release = threading.Event()
        self.received: list[str] = []
        ae = AE(ae_title="SLOWTPS")
        for c in (RTPlanStorage, RTDoseStorage):
            ae.add_supported_context(c, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        self.release.wait(120)
        self.received.append(str(event.dataset.Modality))
        return 0

    def close(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], object]]]:
    todo: list[Callable[[], object]] = []
    yield todo
    for fn in reversed(todo):
        with contextlib.suppress(Exception):
            fn()


@pytest.mark.slow
@pytest.mark.external
def test_push_plan_deliver_through_kill9_while_receiving_planning_and_sending(
        tmp_path: Path, cleanup: list[Callable[[], object]]) -> None:
    storescu = require_tool("storescu")
    require_tool("storescp")
    files = synth_case(tmp_path / "case")
    port, tps_port, slow_port = free_port(), free_port(), free_port()
    data, cfg, log = tmp_path / "data", tmp_path / "airt.toml", tmp_path / "node.log"
    db_file = data / "airt.sqlite3"
    write_config(cfg, data=data, port=port, destinations=[("slow", "SLOWTPS", slow_port), ("tps", "RESULTS", tps_port)])
    slow = BlockingReceiver(slow_port)
    cleanup.append(slow.close)
    node = NodeProcess(cfg, port, log)
    cleanup.append(node.stop)
    node.start()

    # 1. kill -9 while receiving: every acknowledged instance is there after the restart.
    acked: list[str] = []
    ae = AE(ae_title=PEER)
    for c in (CTImageStorage, RTStructureSetStorage):
        ae.add_requested_context(c, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="AIRT")
    assert assoc.is_established
    killer = threading.Timer(0.0, lambda: None)
    for i, p in enumerate(files[:-1]):
        if i == 12:
            killer = threading.Timer(0.05, node.kill9)
            killer.start()
        try:
            rsp = assoc.send_c_store(p)
        except Exception:
            break
        if "Status" in rsp and rsp.Status == 0:
            acked.append(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        if not assoc.is_established:
            break
    killer.join()
    assoc.abort()
    assert 12 <= len(acked) < len(files) - 1
    node.start()
    stored = {r[0] for r in query(db_file, "SELECT sop_instance_uid FROM instances")}
    assert set(acked) <= stored

    # 2. the whole case again with dcmtk storescu (acknowledged ones are idempotent duplicates).
    r = subprocess.run([storescu, "-aet", PEER, "-aec", "AIRT", "-nh", "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert query(db_file, "SELECT COUNT(*) FROM instances") == [(len(files),)]

    # 3. kill -9 while planning: the job is re-queued and completes.
    wait_for(lambda: query(db_file, "SELECT state FROM jobs") == [("RUNNING",)], 120, "the job to run", log)
    time.sleep(1.0)
    node.kill9()
    node.start()
    wait_for(lambda: query(db_file, "SELECT state FROM jobs WHERE state IN ('SUCCEEDED', 'FAILED')") != [],
             900, "the job to finish", log)
    (state, attempts, reason, d98) = query(db_file, "SELECT state, attempts, failure_reason, ptv_d98_gy FROM jobs")[0]
    assert state == "SUCCEEDED", reason
    assert attempts == 2 and d98 is not None and d98 > 0
    history = [r[0] for r in query(db_file, "SELECT message FROM job_events ORDER BY id")]
    assert any("node restarted while planning" in str(m) for m in history)

    # 4. kill -9 while sending to the slow destination; the other one is down until after the restart.
    wait_for(lambda: query(db_file, "SELECT state FROM deliveries WHERE destination = 'slow'") == [("SENDING",)],
             60, "sending to the slow destination", log)
    node.kill9()
    slow.release.set()
    tps = start_storescp(tmp_path / "received", tps_port)
    cleanup.append(tps.terminate)
    node.start()
    wait_for(lambda: query(db_file, "SELECT COUNT(*) FROM deliveries WHERE state = 'DELIVERED'") == [(2,)],
             120, "both deliveries", log)
    assert _received_order(tmp_path / "received") == ["RTPLAN", "RTDOSE"]
    assert slow.received[-2:] == ["RTPLAN", "RTDOSE"]
    assert query(db_file, "SELECT state, deliveries_done FROM v_jobs_overview") == [("SUCCEEDED", 2)]

    # 5. a physicist's view: the verdict against the clinical goals in the list, the job and the RT Plan
    # the destination received; then a clean SIGTERM stop.
    (metrics_json,) = query(db_file, "SELECT metrics FROM jobs")[0]
    verdict = json.loads(metrics_json)["verdict"]
    order = [ln.strip() for ln in (tmp_path / "received" / "order.txt").read_text().splitlines() if ln.strip()]
    plan = pydicom.dcmread(tmp_path / "received" / order[0])
    assert ("P1 met" if verdict["p1_met"] else "P1 FAILED") in plan.RTPlanName
    assert verdict["text"] in plan.RTPlanDescription
    listed = subprocess.run([sys.executable, "-m", "appliance.cli", "jobs", "--config", str(cfg), "list"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "GOALS" in listed.stdout and ("P1 met" if verdict["p1_met"] else "P1 FAIL") in listed.stdout, listed.stdout
    show = subprocess.run([sys.executable, "-m", "appliance.cli", "jobs", "--config", str(cfg), "show", "1"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert show.returncode == 0, show.stderr
    for text in ("SUCCEEDED", "node restarted while planning", "DVH metrics", "Clinical goals", "DELIVERED",
                 f"Verdict (clinical goals): {verdict['text']}"):
        assert text in show.stdout, text
    assert node.stop() == 0
    assert "node stopped" in log.read_text()


def _http(method: str, url: str, body: bytes | None = None) -> Any:
    req = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(req, timeout=120) as rsp:
        raw = rsp.read()
    return json.loads(raw) if raw else None


@pytest.mark.slow
@pytest.mark.external
def test_orthanc_pushes_a_study_and_receives_the_results(
        tmp_path: Path, cleanup: list[Callable[[], object]]) -> None:
    orthanc = require_tool("Orthanc")
    files = synth_case(tmp_path / "case", seed=5)
    port, o_dicom, o_http = free_port(), free_port(), free_port()
    (tmp_path / "orthanc").mkdir()
    (tmp_path / "orthanc.json").write_text(json.dumps({
        "Name": "test", "DicomAet": "ORTHANC", "DicomPort": o_dicom, "HttpPort": o_http,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "StorageDirectory": str(tmp_path / "orthanc"), "IndexDirectory": str(tmp_path / "orthanc"),
        "DicomModalities": {"airt": ["AIRT", "127.0.0.1", port]}, "Plugins": [],
    }))
    o_proc = subprocess.Popen([orthanc, str(tmp_path / "orthanc.json")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    cleanup.append(o_proc.terminate)
    wait_for_port(o_http, 60)
    base = f"http://127.0.0.1:{o_http}"
    for p in files:
        _http("POST", f"{base}/instances", p.read_bytes())
    (study,) = _http("GET", f"{base}/studies")
    data, cfg, log = tmp_path / "data", tmp_path / "airt.toml", tmp_path / "node.log"
    write_config(cfg, data=data, port=port, destinations=[("orthanc", "ORTHANC", o_dicom)], peers=("ORTHANC",))
    node = NodeProcess(cfg, port, log)
    cleanup.append(node.stop)
    node.start()
    _http("POST", f"{base}/modalities/airt/store", json.dumps({"Resources": [study]}).encode())

    def modalities() -> set[str]:
        out = set()
        for sid in _http("GET", f"{base}/series"):
            out.add(_http("GET", f"{base}/series/{sid}")["MainDicomTags"].get("Modality", ""))
        return out

    wait_for(lambda: {"RTPLAN", "RTDOSE"} <= modalities(), 900, "RT Plan and RT Dose in Orthanc", log)
    db_file = data / "airt.sqlite3"
    assert query(db_file, "SELECT state FROM jobs") == [("SUCCEEDED",)]
    assert query(db_file, "SELECT COUNT(DISTINCT calling_ae_title) FROM instances") == [(1,)]
    assert node.stop() == 0




def test_jobs_cli_list_show_cancel_retry(tmp_path: Path) -> None:
    settings, db, job_id = _ingest_tiny_case(tmp_path)
    cfg = tmp_path / "airt.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{settings.data_dir}"\n')
    db.dispose()

    def airt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "appliance.cli", "jobs", "--config", str(cfg), *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO)

    r = airt("list")
    assert r.returncode == 0 and f"{job_id:>5}  PENDING" in r.stdout, r.stdout + r.stderr
    r = airt("cancel", str(job_id))
    assert r.returncode == 0 and "PENDING -> CANCELLED" in r.stdout
    r = airt("cancel", str(job_id))
    assert r.returncode == 2 and "only PENDING or RUNNING" in r.stderr
    r = airt("retry", str(job_id))
    assert r.returncode == 0 and "CANCELLED -> PENDING" in r.stdout
    r = airt("show", str(job_id))
    assert r.returncode == 0
    assert [ln.split()[4] for ln in r.stdout.splitlines() if " -> " in ln and ln.startswith("  20")] == [
        "PENDING", "CANCELLED", "PENDING"]
    r = airt("show", "999")
    assert r.returncode == 2 and "there is no job 999" in r.stderr
