"""Security of the node: who may associate (AE allow-list, peer host), TLS and mutual TLS for the SCP
and the SCU (a local CA made with openssl), limits (associations, PDU, dataset size), UIDs that try
to escape the data directory, the systemd sandbox, and patient names kept out of the logs.

Real loopback associations, real SQLite files, real processes; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import RTDoseStorage, RTPlanStorage  # type: ignore[attr-defined]
from sqlalchemy import func, select

from appliance.config import Settings, settings_from_dict
from appliance.cstore import STATUS_TOO_LARGE
from appliance.scp import StorageSCP
from appliance.scp_stream import PduStream
from appliance.scu import Deliverer, client_ssl_context
from storage.db import Database
from storage.models import Delivery, Instance, Job, NodeEvent
from storage.states import DeliveryState
from tests.conftest import free_port
from tests.node_helpers import (
    PEER,
    Pki,
    case_files,
    client_ae,
    client_tls,
    make_pki,
    node_settings,
    node_table,
    running_scp,
    store_paths,
    tiny_case,
)
from tests.test_scp import make_ct_slice
from tests.test_scu import _succeeded_job_with_delivery

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "airt.service"
DATA = Path(__file__).parent / "data" / "dicompyler_example"


def _n_instances(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def _one_ct(tmp_path: Path) -> Path:
    ds = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0)
    p = tmp_path / f"ct-{ds.SOPInstanceUID}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


# ------------------------------------------------------------------------------------------------
# Who may associate


def test_allow_list_is_on_by_default_and_an_empty_list_admits_nobody(tmp_path: Path) -> None:
    assert Settings().node.allow_any_calling_aet is False
    settings = node_settings(tmp_path, peers=[])
    with running_scp(settings) as scp:
        assoc = client_ae(PEER).associate("127.0.0.1", scp.port, ae_title="AIRT")
        assert assoc.is_rejected
        assert _n_instances(scp.db) == 0


def test_calling_ae_title_is_matched_exactly(tmp_path: Path) -> None:
    with running_scp(node_settings(tmp_path)) as scp:
        for aet in ("PUSHER2", "pusher", "PUSH"):
            assert client_ae(aet).associate("127.0.0.1", scp.port, ae_title="AIRT").is_rejected, aet
        ok = client_ae(PEER).associate("127.0.0.1", scp.port, ae_title="AIRT")
        assert ok.is_established
        ok.release()


@pytest.mark.parametrize(("check_host", "peer_host", "admitted"), [
    (True, "10.255.255.1", False), (True, "127.0.0.1", True), (False, "10.255.255.1", True),
])
def test_peer_host_checking(tmp_path: Path, check_host: bool, peer_host: str, admitted: bool) -> None:
    settings = node_settings(tmp_path, node={"check_peer_host": check_host},
                             peers=[{"ae_title": PEER, "host": peer_host}])
    with running_scp(settings) as scp:
        run = store_paths(scp.port, [_one_ct(tmp_path)])
        assert run.established is admitted
        assert run.statuses == ([0] if admitted else [])
        assert _n_instances(scp.db) == int(admitted)


# ------------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_settings(tmp: Path, pki: Pki, *, require_client_cert: bool = True, **over: object) -> Settings:
    tls = {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
           "ca_file": str(pki.ca), "require_client_cert": require_client_cert}
    return node_settings(tmp, tls=tls, **over)  # type: ignore[arg-type]


def test_tls_scp_with_mutual_authentication(tmp_path: Path, pki: Pki) -> None:
    ct = _one_ct(tmp_path)
    with running_scp(_tls_settings(tmp_path, pki)) as scp:
        ok = store_paths(scp.port, [ct], tls=client_tls(pki, cert=(pki.client_cert, pki.client_key)))
        assert ok.established and ok.statuses == [0]
        # No client certificate, one from another CA, or no TLS at all: no association, nothing stored.
        for tls in (client_tls(pki), client_tls(pki, cert=(pki.rogue_cert, pki.rogue_key)), None):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = store_paths(scp.port, [_one_ct(tmp_path)], tls=tls, timeout_s=5)
            assert not run.established and run.statuses == []
        assert _n_instances(scp.db) == 1
        # Still serving the trusted peer afterwards.
        again = store_paths(scp.port, [_one_ct(tmp_path)], tls=client_tls(pki, cert=(pki.client_cert,
                                                                                      pki.client_key)))
        assert again.statuses == [0]


def test_tls_scp_without_client_certificates_still_encrypts(tmp_path: Path, pki: Pki) -> None:
    with running_scp(_tls_settings(tmp_path, pki, require_client_cert=False)) as scp:
        assert store_paths(scp.port, [_one_ct(tmp_path)], tls=client_tls(pki)).statuses == [0]
        # The AE allow-list still applies over TLS.
        assoc = client_ae("STRANGER").associate("127.0.0.1", scp.port, ae_title="AIRT", tls_args=client_tls(pki))
        assert assoc.is_rejected
        plain = store_paths(scp.port, [_one_ct(tmp_path)], timeout_s=5)
        assert not plain.established


def test_a_silent_client_does_not_block_the_tls_listener(tmp_path: Path, pki: Pki) -> None:
    with running_scp(_tls_settings(tmp_path, pki, node={"acse_timeout_s": 2.0})) as scp:
        silent = socket.create_connection(("127.0.0.1", scp.port))  # TCP only, never a ClientHello
        try:
            time.sleep(0.3)
            t0 = time.perf_counter()
            run = store_paths(scp.port, [_one_ct(tmp_path)],
                              tls=client_tls(pki, cert=(pki.client_cert, pki.client_key)), timeout_s=10)
            assert run.statuses == [0] and time.perf_counter() - t0 < 5
            silent.settimeout(10)
            assert silent.recv(1) == b""  # closed by the node after node.acse_timeout_s
        finally:
            silent.close()


class _TlsResultsReceiver:
    """A pynetdicom RT Plan/RT Dose SCP over TLS that requires a client certificate from the test CA."""

    def __init__(self, pki: Pki, port: int) -> None:
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.received: list[str] = []
        self.peer_certs: list[object] = []
        ae = AE(ae_title="TLSTPS")
        for c in (RTPlanStorage, RTDoseStorage):
            ae.add_supported_context(c, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ctx,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        sock: Any = event.assoc.dul.socket
        self.peer_certs.append(sock.socket.getpeercert())
        self.received.append(str(event.dataset.Modality))
        return 0


def test_scu_delivers_over_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    base, db, _job = _succeeded_job_with_delivery(tmp_path, port)
    db.dispose()
    # The same job, with the destination marked tls = true and the node's certificate for the client side.
    settings = settings_from_dict({
        "storage": {"data_dir": str(base.data_dir)},  # type: ignore[attr-defined]
        "tls": {"enabled": True, "cert_file": str(pki.server_cert), "key_file": str(pki.server_key),
                "ca_file": str(pki.ca)},
        "destinations": [{"name": "tps", "ae_title": "TLSTPS", "host": "127.0.0.1", "port": port, "tls": True}],
    })
    assert client_ssl_context(settings.tls).verify_mode.name == "CERT_REQUIRED"
    db = Database(settings.database_url)
    with db.session() as s:
        d = s.scalar(select(Delivery))
        assert d is not None
        d.ae_title = "TLSTPS"
    receiver = _TlsResultsReceiver(pki, port)
    try:
        assert Deliverer.for_node(settings, db).tick() == 1
    finally:
        assert receiver.server is not None
        receiver.server.shutdown()
    assert receiver.received == ["RTPLAN", "RTDOSE"]
    subject = dict(x[0] for x in receiver.peer_certs[0]["subject"])  # type: ignore[index]
    assert subject["commonName"] == "node"
    with db.session() as s:
        assert s.scalar(select(Delivery.state)) == DeliveryState.DELIVERED
    db.dispose()


# ------------------------------------------------------------------------------------------------
# Limits


def test_association_limit(tmp_path: Path) -> None:
    with running_scp(node_settings(tmp_path, node={"max_associations": 2})) as scp:
        held = [client_ae().associate("127.0.0.1", scp.port, ae_title="AIRT") for _ in range(2)]
        assert all(a.is_established for a in held)
        third = client_ae().associate("127.0.0.1", scp.port, ae_title="AIRT")
        assert third.is_rejected
        for a in held:
            a.release()
        later = store_paths(scp.port, [_one_ct(tmp_path)])
        assert later.statuses == [0]


def test_pdu_limit_is_announced_and_large_datasets_arrive_in_fragments(tmp_path: Path) -> None:
    with running_scp(node_settings(tmp_path, node={"max_pdu_bytes": 16384})) as scp:
        assoc = client_ae().associate("127.0.0.1", scp.port, ae_title="AIRT")
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 16384
        ds = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0, rows=256)
        assert len(ds.PixelData) >= 8 * 16384
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        with scp.db.session() as s:
            inst = s.scalar(select(Instance))
        assert inst is not None
        assert pydicom.dcmread(scp.store.absolute(inst.path)).PixelData == ds.PixelData


def test_a_peer_announcing_a_huge_pdu_is_disconnected_before_the_node_buffers_it(tmp_path: Path) -> None:
    proc = psutil.Process()
    with running_scp(node_settings(tmp_path)) as scp:
        rss0 = proc.memory_info().rss
        s = socket.create_connection(("127.0.0.1", scp.port))
        s.settimeout(10)
        sent = 0
        with pytest.raises(OSError):
            s.sendall(b"\x01\x00" + (0xFFFFFFF0).to_bytes(4, "big"))  # A-ASSOCIATE-RQ of ~4 GiB
            for _ in range(512):
                s.sendall(b"\0" * 1048576)
                sent += 1
        s.close()
        assert sent < 256
        assert proc.memory_info().rss - rss0 < 64 * 2**20
        assert store_paths(scp.port, [_one_ct(tmp_path)]).statuses == [0]


def test_peers_stalling_mid_pdu_are_dropped_and_free_their_slots(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, node={"max_associations": 2, "network_timeout_s": 1.5, "acse_timeout_s": 1.5})
    with running_scp(settings) as scp:
        stalled = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", scp.port))
            s.sendall(b"\x01\x00\x00\x00\x10\x00" + b"\x00\x01")  # 2 of the 4096 bytes announced
            stalled.append(s)
        try:
            for s in stalled:
                s.settimeout(15)
                assert s.recv(1) == b""  # the node hung up
            assert store_paths(scp.port, [_one_ct(tmp_path)]).statuses == [0]
        finally:
            for s in stalled:
                s.close()


def test_dataset_size_limit(tmp_path: Path) -> None:
    with running_scp(node_settings(tmp_path, node={"max_dataset_bytes": 4096})) as scp:
        small = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0, rows=8)
        big = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0, rows=64)
        assoc = client_ae().associate("127.0.0.1", scp.port, ae_title="AIRT")
        assert assoc.send_c_store(big).Status == STATUS_TOO_LARGE
        assert assoc.send_c_store(small).Status == 0
        assoc.release()
        assert _n_instances(scp.db) == 1
        assert not list(scp.store.root.rglob("*.tmp-*"))


def test_an_oversized_dataset_is_refused_with_its_size_and_the_association_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limit = 65536
    settings = node_settings(tmp_path, node={"max_dataset_bytes": limit, "max_pdu_bytes": 16384})
    big = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0, rows=512)
    small = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0, rows=8)
    with caplog.at_level(logging.WARNING, logger="appliance.scp"), running_scp(settings) as scp:
        assoc = client_ae().associate("127.0.0.1", scp.port, ae_title="AIRT")
        assert assoc.send_c_store(big).Status == STATUS_TOO_LARGE
        assert assoc.send_c_store(small).Status == 0
        assoc.release()
        assert _n_instances(scp.db) == 1
    sizes = [int(m[1]) for r in caplog.records if (m := re.search(r"dataset of (\d+) bytes exceeds", r.getMessage()))]
    assert len(sizes) == 1 and sizes[0] > len(big.PixelData) >= 8 * limit  # the size sent, though not kept


def _pdv(control: int, data: bytes, context_id: int = 1) -> bytes:
    """A presentation data value item: length, context ID, message control header, fragment."""
    return (len(data) + 2).to_bytes(4, "big") + bytes([context_id, control]) + data


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return bytes([pdu_type, 0]) + len(body).to_bytes(4, "big") + body


def _message(message_id: int, dataset: bytes, fragment: int) -> tuple[bytes, bytes]:
    """A DIMSE message as P-DATA-TF PDUs (command, then the dataset in fragments), and the same
    message as the node hands it to pynetdicom (every dataset fragment empty)."""
    command = (b"\x00\x00\x02\x00\x04\x00\x00\x001.2\x00"  # (0000,0002) UI "1.2"
               + b"\x00\x00\x10\x01\x02\x00\x00\x00" + message_id.to_bytes(2, "little"))  # (0000,0110) US
    parts = [dataset[i:i + fragment] for i in range(0, len(dataset), fragment)]
    sent = _pdu(0x04, _pdv(0x03, command))
    seen = sent
    for k, part in enumerate(parts):
        control = 0x02 if k == len(parts) - 1 else 0x00
        sent += _pdu(0x04, _pdv(control, part))
        seen += _pdu(0x04, _pdv(control, b""))
    return sent, seen


def _through(stream: bytes, tmp_path: Path, max_dataset_bytes: int, max_pdu_bytes: int = 65536) -> tuple[bytes, PduStream]:
    """What pynetdicom reads from a connection carrying ``stream`` (4096 bytes at a time), and the stream."""
    src = io.BytesIO(stream)
    pdus = PduStream(src.readinto, "test", max_pdu_bytes=max_pdu_bytes, max_dataset_bytes=max_dataset_bytes,
                     folder=tmp_path)
    out = bytearray()
    while chunk := pdus.recv(4096):
        out += chunk
    return bytes(out), pdus


def test_pdu_stream_takes_each_dataset_out_as_sent(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    small, large = rng.bytes(5000), rng.bytes(3 * 2**20)  # the large one goes past memory to a file
    sent7, seen7 = _message(7, small, 1000)
    sent8, seen8 = _message(8, large, 60000)
    sent9, seen9 = _message(9, small, 700)
    assoc_rq, release = _pdu(0x01, b"A" * 300), _pdu(0x05, b"\0" * 4)
    seen, pdus = _through(assoc_rq + sent7 + sent8 + sent9 + release, tmp_path, max_dataset_bytes=4 * 2**20)
    assert seen == assoc_rq + seen7 + seen8 + seen9 + release
    with contextlib.closing(pdus.take(8)) as d8:  # message 7 was never taken: dropped
        assert d8.complete and d8.size == len(large)
        with d8.open(b"HEAD") as fp:
            assert fp.read(6) == b"HEAD" + large[:2]
            fp.seek(-10, io.SEEK_END)
            assert fp.read() == large[-10:]
            fp.seek(0)
            assert fp.read() == b"HEAD" + large
        assert b"".join(d8.chunks(b"HEAD")) == b"HEAD" + large
    with contextlib.closing(pdus.take(9)) as d9:
        assert b"".join(d9.chunks(b"")) == small
    with pytest.raises(LookupError, match="no dataset of message 7"):
        pdus.take(7)


def test_pdu_stream_counts_a_dataset_past_the_limit_without_keeping_it(tmp_path: Path) -> None:
    sent, seen = _message(3, b"D" * 50000, 4000)
    out, pdus = _through(sent, tmp_path, max_dataset_bytes=10000)
    assert out == seen
    with contextlib.closing(pdus.take(3)) as d:
        assert not d.complete and d.size == 50000
        assert len(b"".join(d.chunks(b""))) <= 10000


def test_pdu_stream_refuses_a_long_pdu_and_leaves_malformed_ones_to_pynetdicom(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="PDU of 70000 bytes exceeds the limit of 65536"):
        _through(_pdu(0x04, b"\0" * 70000), tmp_path, max_dataset_bytes=10)
    bad_item = _pdu(0x04, (9999).to_bytes(4, "big") + b"\x01\x00" + b"D" * 100)  # item longer than its PDU
    assert _through(bad_item, tmp_path, max_dataset_bytes=10)[0] == bad_item
    short = _pdu(0x04, _pdv(0x00, b"D" * 100))[:50]  # the connection ends inside a PDU
    assert _through(short, tmp_path, max_dataset_bytes=10)[0] == short


# ------------------------------------------------------------------------------------------------
# Hostile UIDs

HOSTILE = ["../../../../tmp/owned", "1.2.3/../../x", "1.2.840/evil", "/etc/passwd", "..", ".", "1.2.3.",
           "1..2", "1.2.3\\..\\x", "1.2.3 4", "1.2\x00.3", "1." * 40 + "1", "~root", "１.２"]


@pytest.fixture
def scp_node(tmp_path: Path) -> Iterator[StorageSCP]:
    with running_scp(node_settings(tmp_path)) as scp:
        yield scp


@pytest.mark.parametrize("attr", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"])
def test_hostile_uids_never_become_paths(scp_node: StorageSCP, tmp_path: Path, attr: str) -> None:
    root = tmp_path.parent
    before = {p for p in root.rglob("*") if "owned" in p.name or p.name == "x"}
    assoc = client_ae().associate("127.0.0.1", scp_node.port, ae_title="AIRT")
    assert assoc.is_established
    sent = 0
    for bad in HOSTILE:
        if attr == "SOPInstanceUID" and len(bad) > 64:
            continue  # pynetdicom refuses to put it into the C-STORE request at all
        ds = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0, rows=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setattr(ds, attr, bad)
            if attr == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = bad  # type: ignore[assignment]
            try:
                rsp = assoc.send_c_store(ds)
            except (ValueError, TypeError):  # the client cannot even send it (encoding, multi-valued)
                continue
        assert "Status" in rsp and rsp.Status != 0, (attr, bad)
        assert 0xA700 <= rsp.Status <= 0xCFFF
        sent += 1
    assoc.release()
    assert sent >= len(HOSTILE) - 4
    assert _n_instances(scp_node.db) == 0
    data = scp_node.store.data_dir
    assert [p for p in data.rglob("*") if p.is_file() and p.suffix == ".dcm"] == []
    after = {p for p in root.rglob("*") if "owned" in p.name or p.name == "x"}
    assert after == before and not Path("/tmp/owned").exists()
    # Every directory the store made is named by valid UID characters only.
    for p in scp_node.store.root.rglob("*"):
        assert re.fullmatch(r"[0-9.]+", p.name), p
    # Still serving.
    assert store_paths(scp_node.port, [_one_ct(tmp_path)]).statuses == [0]


# ------------------------------------------------------------------------------------------------
# systemd sandbox


def test_systemd_sandbox_exposure(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for directive in ("ProtectSystem=strict", "NoNewPrivileges=true", "PrivateTmp=true", "PrivateDevices=true",
                      "ProtectKernelTunables=true", "ProtectKernelModules=true", "ProtectControlGroups=true",
                      "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "SystemCallFilter=@system-service",
                      "CapabilityBoundingSet=\n", "ReadWritePaths=/var/lib/airt", "User=airt", "UMask=0027"):
        assert directive in text, directive
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt package systemd); static checks passed")
    unit = tmp_path / "airt.service"
    unit.write_text(text.replace("/opt/airt/bin/airt", sys.executable))
    r = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(unit)], capture_output=True,
                       text=True, timeout=120)
    m = re.search(r"Overall exposure level for airt\.service: ([0-9.]+)", r.stdout + r.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze cannot assess a unit offline: {(r.stdout + r.stderr)[-300:]}")
    assert float(m.group(1)) <= 2.5, r.stdout[-3000:]


# ------------------------------------------------------------------------------------------------
# No patient name in the logs

NAME = "Quokkafeld^Zebulonia"


@pytest.mark.slow
def test_no_patient_name_in_logs_through_receive_plan_and_deliver(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    from appliance.scheduler import StudyScheduler
    from appliance.worker import Worker
    from tests.test_scu import start_storescp

    w = tiny_case(tmp_path / "case", seed=11)
    for p in case_files(w):
        ds = pydicom.dcmread(p)
        ds.PatientName = NAME
        ds.save_as(p)
    tps_port = free_port()
    tps = start_storescp(tmp_path / "received", tps_port)
    caplog.set_level(logging.DEBUG)
    try:
        settings = settings_from_dict(node_table(
            tmp_path, destinations=[{"name": "tps", "ae_title": "RESULTS", "host": "127.0.0.1", "port": tps_port}]))
        with running_scp(settings) as scp:
            assert set(store_paths(scp.port, case_files(w)).statuses) == {0}
            db = scp.db
            (job_id,) = StudyScheduler.for_node(settings, db).tick()
            assert Worker.for_node(settings, db).run_once() == job_id
            assert Deliverer.for_node(settings, db).tick() == 1
            with db.session() as s:
                job = s.get(Job, job_id)
                events = [e.message for e in s.scalars(select(NodeEvent))]
            assert job is not None and job.state == "SUCCEEDED", job.failure_reason if job else None
    finally:
        tps.terminate()
        tps.wait(10)
    out, err = capfd.readouterr()
    logs = caplog.text + out + err
    assert "job" in logs and w.study_instance_uid in logs  # the logs were captured, with UIDs
    for needle in (NAME, "Quokkafeld", "Zebulonia"):
        assert needle not in logs
        assert all(needle not in str(m) for m in events)
        assert needle not in str(job.failure_reason) and needle not in str(job.metrics)
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "received").glob("*")
                if p.name != "order.txt"]
    assert {str(d.PatientName) for d in received} == {NAME}  # the name is in the DICOM results, where it belongs
