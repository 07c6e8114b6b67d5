"""SCU: C-ECHO and C-STORE to a real dcmtk storescp, and the delivery loop with a destination that is
down for a while."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from appliance.config import settings_from_dict
from appliance.scu import Deliverer, PeerAddress, backoff_s, echo, parse_peer, send_files, wait_for_port
from core.errors import ConfigError, ExportError
from storage.db import Database
from storage.models import Delivery, Job, Study
from storage.states import DeliveryState, JobState, utcnow
from tests.conftest import free_port, require_tool

DATA = Path(__file__).parent / "data" / "dicompyler_example"
RECEIVER = "RESULTS"


def start_storescp(out: Path, port: int) -> subprocess.Popen[bytes]:
    """dcmtk storescp writing what it receives to ``out`` and the order of reception to out/order.txt."""
    exe = require_tool("storescp")
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([exe, "-aet", RECEIVER, "-od", str(out), "-uf",
                             "-xcr", f"echo #f >> {out}/order.txt", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return proc


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    proc = start_storescp(tmp_path / "received", port)
    yield port, tmp_path / "received"
    proc.terminate()
    proc.wait(10)


def _received_order(out: Path, expected: int = 2) -> list[str]:
    """Modalities in the order storescp received them (waits for ``expected`` entries, 10 s at most)."""
    order = out / "order.txt"
    deadline = time.time() + 10
    while time.time() < deadline:
        if order.exists() and len([ln for ln in order.read_text().splitlines() if ln.strip()]) >= expected:
            break
        time.sleep(0.05)
    return [pydicom.dcmread(out / line.strip(), stop_before_pixels=True).Modality
            for line in order.read_text().splitlines() if line.strip()]


def test_parse_peer() -> None:
    assert parse_peer("TPS@10.0.0.5:104") == PeerAddress("TPS", "10.0.0.5", 104)
    assert parse_peer("MY AE@host.example:11112").ae_title == "MY AE"
    assert parse_peer("X@[::1]:4242").host == "::1"
    for bad in ("TPS@host", "@host:104", "TPS@host:0", "TPS@host:99999", "A" * 17 + "@h:1", "TPS:104"):
        with pytest.raises(ConfigError, match="AE@HOST:PORT"):
            parse_peer(bad)


def test_backoff_grows_and_is_capped() -> None:
    waits = [backoff_s(n, 30.0, 2.0, 300.0) for n in range(1, 8)]
    assert waits[:4] == [30.0, 60.0, 120.0, 240.0] and max(waits) == 300.0


def test_echo_and_send_plan_then_dose(receiver: tuple[int, Path]) -> None:
    port, out = receiver
    peer = PeerAddress(RECEIVER, "127.0.0.1", port)
    assert echo(peer, calling_aet="AIRT") == 0
    results = send_files([DATA / "rtplan.dcm", DATA / "rtdose.dcm"], peer, calling_aet="AIRT")
    assert [st for _, st in results] == [0, 0]
    assert _received_order(out) == ["RTPLAN", "RTDOSE"]


def test_echo_nobody_listening_raises_a_clear_error() -> None:
    with pytest.raises(ExportError, match="no association with"):
        echo(PeerAddress("NOBODY", "127.0.0.1", free_port()), timeout_s=3)


def test_cli_echo_and_send(receiver: tuple[int, Path], tmp_path: Path) -> None:
    port, out = receiver
    airt = [str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"), "-m", "appliance.cli"]
    if not Path(airt[0]).exists():
        airt[0] = shutil.which("python3") or "python3"
    r = subprocess.run([*airt, "echo", f"{RECEIVER}@127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "status 0x0000" in r.stdout, r.stderr
    r = subprocess.run([*airt, "send", str(DATA / "rtplan.dcm"), str(DATA / "rtdose.dcm"), "--to",
                        f"{RECEIVER}@127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _received_order(out) == ["RTPLAN", "RTDOSE"]
    r = subprocess.run([*airt, "echo", f"X@127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no association" in r.stderr


def _succeeded_job_with_delivery(tmp_path: Path, port: int) -> tuple[object, Database, int]:
    settings = settings_from_dict({
        "storage": {"data_dir": str(tmp_path / "data")},
        "destinations": [{"name": "tps", "ae_title": RECEIVER, "host": "127.0.0.1", "port": port}],
        "delivery": {"retry_initial_s": 5.0, "retry_factor": 2.0, "retry_max_s": 60.0, "give_up_after_s": 3600.0},
    })
    db = Database(settings.database_url)
    out_dir = settings.data_dir / "jobs" / "1" / "output"
    out_dir.mkdir(parents=True)
    for n in ("rtplan.dcm", "rtdose.dcm"):
        shutil.copy(DATA / n, out_dir / n)
    now = utcnow()
    with db.session() as s:
        st = Study(study_uid=generate_uid(), first_received_at=now, last_received_at=now)
        s.add(st)
        s.flush()
        job = Job(study_id=st.id, study_uid=st.study_uid, instance_fingerprint="f", state=JobState.SUCCEEDED,
                  created_at=now, updated_at=now, finished_at=now, output_dir="jobs/1/output")
        s.add(job)
        s.flush()
        s.add(Delivery(job_id=job.id, destination="tps", ae_title=RECEIVER, host="127.0.0.1", port=port,
                       state=DeliveryState.PENDING, next_try_at=now, created_at=now, updated_at=now))
        s.flush()
        return settings, db, job.id


def test_destination_down_then_up_results_arrive(tmp_path: Path) -> None:
    port = free_port()
    settings, db, _job_id = _succeeded_job_with_delivery(tmp_path, port)
    deliverer = Deliverer.for_node(settings, db)  # type: ignore[arg-type]
    t0 = utcnow()
    assert deliverer.tick(t0) == 0  # nobody listens
    assert deliverer.tick(t0 + dt.timedelta(seconds=4)) == 0  # not due yet: nothing tried
    with db.session() as s:
        d = s.scalar(select(Delivery))
        assert d is not None
        assert d.state == DeliveryState.PENDING and d.attempts == 1 and "no association" in str(d.last_error)
        first_wait = (d.next_try_at - t0).total_seconds()
    assert 4.0 < first_wait < 7.0
    assert deliverer.tick(d.next_try_at) == 0  # still down: second failure, longer wait
    with db.session() as s:
        d = s.scalar(select(Delivery))
        assert d is not None and d.attempts == 2
        assert (d.next_try_at - utcnow()).total_seconds() > first_wait + 2.0
        due = d.next_try_at
    proc = start_storescp(tmp_path / "received", port)
    try:
        assert deliverer.tick(due) == 1
    finally:
        proc.terminate()
        proc.wait(10)
    with db.session() as s:
        d = s.scalar(select(Delivery))
        assert d is not None and d.state == DeliveryState.DELIVERED and d.attempts == 3
        assert d.delivered_at is not None and d.last_error is None
    assert _received_order(tmp_path / "received") == ["RTPLAN", "RTDOSE"]


def test_plan_and_dose_go_out_with_distinct_message_ids() -> None:
    """Message IDs are unique among the requests of one association (PS3.7 9.3.1)."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import RTDoseStorage, RTPlanStorage  # type: ignore[attr-defined]

    seen: list[int] = []

    def on_store(event: evt.Event) -> int:
        seen.append(int(event.request.MessageID))
        return 0

    port = free_port()
    ae = AE(ae_title=RECEIVER)
    for c in (RTPlanStorage, RTDoseStorage):
        ae.add_supported_context(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        results = send_files([DATA / "rtplan.dcm", DATA / "rtdose.dcm"], PeerAddress(RECEIVER, "127.0.0.1", port))
    finally:
        server.shutdown()
    assert [st for _, st in results] == [0, 0]
    assert seen == [1, 2]
