"""Storage SCP: real associations on loopback (pynetdicom and dcmtk as peers), real SQLite files."""

from __future__ import annotations

import ast
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    RTStructureSetStorage,
    Verification,
)
from sqlalchemy import func, select

from appliance.config import settings_from_dict
from appliance.cstore import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_CONFLICT,
    STATUS_INVALID_UID,
    STATUS_OUT_OF_RESOURCES,
)
from appliance.scp import StorageSCP
from storage.db import Database
from storage.instance_store import InstanceStore
from storage.models import Instance, NodeEvent, Study
from tests.conftest import free_port, require_tool

PEER = "PUSHER"


# ------------------------------------------------------------------------------------------------
# Small DICOM fixtures (CT series + RTSTRUCT), written with pydicom


def _meta(sop_class: str, sop_uid: str, ts: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    m = FileMetaDataset()
    m.MediaStorageSOPClassUID = UID(sop_class)
    m.MediaStorageSOPInstanceUID = UID(sop_uid)
    m.TransferSyntaxUID = UID(ts)
    return m


def make_ct_slice(*, study: str, series: str, for_uid: str, z: float, rows: int = 16, seed: int = 0,
                  sop_uid: str | None = None) -> Dataset:
    """A small CT image (``rows`` x ``rows``, 2 mm pixels) at height ``z`` mm."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta = _meta(ds.SOPClassUID, ds.SOPInstanceUID)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, for_uid
    ds.Modality = "CT"
    ds.PatientID = "SYNTH01"
    ds.PatientName = "Synthetic^Phantom"
    ds.ImagePositionPatient = [-16.0, -16.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [2.0, 2.0]
    ds.SliceThickness = 2.0
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(-1000, 1000, size=(rows, rows), dtype=np.int16).tobytes()
    return ds


def make_rtstruct(*, study: str, for_uid: str, ct_series: str, sop_uid: str | None = None) -> Dataset:
    """A minimal RT Structure Set on ``for_uid`` referencing ``ct_series`` with one ROI."""
    ds = Dataset()
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta = _meta(ds.SOPClassUID, ds.SOPInstanceUID)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.PatientID = "SYNTH01"
    ds.StructureSetLabel = "TEST"
    series_item = Dataset()
    series_item.SeriesInstanceUID = ct_series
    study_item = Dataset()
    study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
    for_item = Dataset()
    for_item.FrameOfReferenceUID = for_uid
    for_item.RTReferencedStudySequence = DicomSequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([for_item])
    roi = Dataset()
    roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = 1, "PTV", for_uid
    ds.StructureSetROISequence = DicomSequence([roi])
    return ds


def write_case(folder: Path, *, n_slices: int = 4, study: str | None = None, for_uid: str | None = None
               ) -> dict[str, object]:
    """Write a CT series of ``n_slices`` and an RTSTRUCT into ``folder``; returns their UIDs and paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    for_uid = for_uid or generate_uid()
    series = generate_uid()
    paths = []
    for k in range(n_slices):
        ds = make_ct_slice(study=study, series=series, for_uid=for_uid, z=2.0 * k, seed=k)
        p = folder / f"ct_{k:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    rs = make_rtstruct(study=study, for_uid=for_uid, ct_series=series)
    p = folder / "rtstruct.dcm"
    rs.save_as(p, enforce_file_format=True)
    paths.append(p)
    return {"study": study, "series": series, "for": for_uid, "paths": paths, "rtstruct": rs.SOPInstanceUID}


# ------------------------------------------------------------------------------------------------
# A running SCP


def node_settings(tmp: Path, **over: object) -> object:
    table: dict[str, object] = {
        "node": {"ae_title": "AIRT", "port": free_port()},
        "peers": [{"ae_title": PEER}],
        "storage": {"data_dir": str(tmp / "data"), "min_free_disk_mb": 1},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(table.get(k), dict):
            table[k] = {**table[k], **v}  # type: ignore[dict-item]
        else:
            table[k] = v
    return settings_from_dict(table)


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    settings = node_settings(tmp_path)
    db = Database(settings.database_url)  # type: ignore[attr-defined]
    server = StorageSCP.for_node(settings, db, InstanceStore(settings.data_dir))  # type: ignore[arg-type, attr-defined]
    server.start()
    yield server
    server.stop()
    assert not _config.STORE_RECV_CHUNKED_DATASET  # the SCP never sets pynetdicom's process-wide switches
    db.dispose()


def associate(port: int, *, aet: str = PEER, contexts: list[str] | None = None,
              ts: list[str] | None = None) -> object:
    ae = AE(ae_title=aet)
    for c in contexts or [CTImageStorage, RTStructureSetStorage, Verification]:
        ae.add_requested_context(c, ts or [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="AIRT")


def _count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


# ------------------------------------------------------------------------------------------------
# Tests


def test_echo_and_store_case_written_atomically(scp: StorageSCP, tmp_path: Path) -> None:
    case = write_case(tmp_path / "case", n_slices=3)
    assoc = associate(scp.port)
    assert assoc.is_established  # type: ignore[attr-defined]
    assert assoc.send_c_echo().Status == 0  # type: ignore[attr-defined]
    for p in case["paths"]:  # type: ignore[attr-defined]
        assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    with scp.db.session() as s:
        rows = list(s.scalars(select(Instance)))
        study = s.scalar(select(Study))
    assert len(rows) == 4 and study is not None and study.study_uid == case["study"]
    assert study.last_received_at.tzinfo is not None
    rs = next(r for r in rows if r.modality == "RTSTRUCT")
    assert rs.frame_of_reference_uid == case["for"] and rs.referenced_series_uid == case["series"]
    for r in rows:
        f = scp.store.absolute(r.path)
        assert f.is_file() and f.name == f"{r.sop_instance_uid}.dcm"
        assert r.path.startswith(f"instances/{case['study']}/")
        back = pydicom.dcmread(f)
        assert back.SOPInstanceUID == r.sop_instance_uid
    ct = next(r for r in rows if r.modality == "CT")
    src = next(pydicom.dcmread(p) for p in case["paths"]  # type: ignore[attr-defined]
               if pydicom.dcmread(p).SOPInstanceUID == ct.sop_instance_uid)
    assert pydicom.dcmread(scp.store.absolute(ct.path)).PixelData == src.PixelData
    assert not list(scp.store.root.rglob("*.tmp-*"))


def test_dcmtk_storescu_implicit_vr_and_duplicate_is_idempotent(scp: StorageSCP, tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    write_case(tmp_path / "case", n_slices=3)
    cmd = [storescu, "-aet", PEER, "-aec", "AIRT", "-xi", "+sd", "+r", "-nh", "127.0.0.1", str(scp.port),
           str(tmp_path / "case")]
    for _ in range(2):  # the second push is all duplicates: still Success
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    assert _count(scp.db, Instance) == 4
    with scp.db.session() as s:
        tss = set(s.scalars(select(Instance.transfer_syntax_uid)))
    assert tss == {ImplicitVRLittleEndian}
    assert _count(scp.db, NodeEvent) == 0


def test_same_uid_different_content_is_refused_and_recorded(scp: StorageSCP, tmp_path: Path) -> None:
    study, series, for_uid, sop = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    first = make_ct_slice(study=study, series=series, for_uid=for_uid, z=0.0, seed=1, sop_uid=sop)
    second = make_ct_slice(study=study, series=series, for_uid=for_uid, z=0.0, seed=2, sop_uid=sop)
    assoc = associate(scp.port)
    assert assoc.send_c_store(first).Status == 0  # type: ignore[attr-defined]
    assert assoc.send_c_store(second).Status == STATUS_CONFLICT  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    with scp.db.session() as s:
        inst = s.scalar(select(Instance))
        events = list(s.scalars(select(NodeEvent)))
    assert inst is not None
    assert pydicom.dcmread(scp.store.absolute(inst.path)).PixelData == first.PixelData
    assert [e.kind for e in events] == ["instance_conflict"] and sop in events[0].message


def test_peer_not_on_allow_list_is_rejected(scp: StorageSCP) -> None:
    assoc = associate(scp.port, aet="STRANGER")
    assert assoc.is_rejected  # type: ignore[attr-defined]
    ok = associate(scp.port)
    assert ok.is_established  # type: ignore[attr-defined]
    ok.release()  # type: ignore[attr-defined]


def test_dcmtk_echoscu_unknown_peer_gets_a_reject(scp: StorageSCP) -> None:
    echoscu = require_tool("echoscu")
    bad = subprocess.run([echoscu, "-aet", "STRANGER", "-aec", "AIRT", "127.0.0.1", str(scp.port)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "Rejected" in (bad.stdout + bad.stderr)
    good = subprocess.run([echoscu, "-aet", PEER, "-aec", "AIRT", "127.0.0.1", str(scp.port)],
                          capture_output=True, text=True, timeout=30)
    assert good.returncode == 0, good.stderr


def test_unsupported_sop_class_refused_in_negotiation(scp: StorageSCP) -> None:
    assoc = associate(scp.port, contexts=[MRImageStorage, Verification])
    assert assoc.is_established  # type: ignore[attr-defined]
    accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}  # type: ignore[attr-defined]
    assert str(MRImageStorage) not in accepted and str(Verification) in accepted
    assoc.release()  # type: ignore[attr-defined]


def test_malformed_dataset_fails_and_node_keeps_serving(scp: StorageSCP, tmp_path: Path) -> None:
    # A file with valid file meta whose dataset is garbage, sent as it is (no re-encoding).
    sop = generate_uid()
    bad = tmp_path / "bad.dcm"
    good = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0,
                         sop_uid=sop)
    good.save_as(bad, enforce_file_format=True)
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, good.file_meta)
    # (0008,0016) SOPClassUID claiming a length far past the end of the data, then junk.
    bad.write_bytes(buf.getvalue() + b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 50)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = associate(scp.port)
        status = assoc.send_c_store(bad).Status  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert 0xC000 <= status <= 0xCFFF or 0xA900 <= status <= 0xA9FF
    assert _count(scp.db, Instance) == 0
    assert not [p for p in scp.store.root.rglob("*") if p.is_file()]
    again = associate(scp.port)
    assert again.send_c_store(good).Status == 0  # type: ignore[attr-defined]
    again.release()  # type: ignore[attr-defined]
    assert _count(scp.db, Instance) == 1


def test_invalid_uid_never_becomes_a_path(scp: StorageSCP, tmp_path: Path) -> None:
    ds = make_ct_slice(study="1.2.3/../../etc", series=generate_uid(), for_uid=generate_uid(), z=0.0)
    assoc = associate(scp.port)
    status = assoc.send_c_store(ds).Status  # type: ignore[attr-defined]
    assoc.release()  # type: ignore[attr-defined]
    assert status in (STATUS_INVALID_UID, STATUS_CANNOT_UNDERSTAND)
    assert not [p for p in (tmp_path / "data").rglob("*.dcm")]


def test_low_disk_answers_out_of_resources(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, storage={"data_dir": str(tmp_path / "data"), "min_free_disk_mb": 10**9})
    db = Database(settings.database_url)  # type: ignore[attr-defined]
    server = StorageSCP.for_node(settings, db, InstanceStore(settings.data_dir))  # type: ignore[arg-type, attr-defined]
    server.start()
    try:
        assoc = associate(server.port)
        ds = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0)
        assert assoc.send_c_store(ds).Status == STATUS_OUT_OF_RESOURCES  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
    finally:
        server.stop()
        db.dispose()
    assert _count(db, Instance) == 0


def test_idle_connections_filling_max_associations_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Silent TCP connections hold association slots: the peer locked out and the idle connections are
    both in the log, with the setting to look at."""
    from tests.node_helpers import node_settings, running_scp, store_paths

    settings = node_settings(tmp_path, node={"max_associations": 2, "acse_timeout_s": 30.0})
    with caplog.at_level(logging.WARNING, logger="appliance.scp"), running_scp(settings) as scp:
        idle = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(2)]
        deadline = time.time() + 10  # the listener takes them in its own thread
        while time.time() < deadline and scp.open_connections < 2:
            time.sleep(0.05)
        assert scp.open_connections == 2
        run = store_paths(scp.port, [])
        assert not run.established
        for s in idle:
            s.close()
        deadline = time.time() + 10
        while time.time() < deadline and sum("without an association request" in r.getMessage()
                                             for r in caplog.records) < 2:
            time.sleep(0.1)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "node.max_associations = 2 reached with 3 connections open, 2 of them without an association" in text
    assert text.count("closed after") == 2 and "held one of the node.max_associations = 2 slots" in text


# ------------------------------------------------------------------------------------------------
# Public API only

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("appliance", "core", "pipeline", "sequencing", "storage")


def _private_imports(tree: ast.AST) -> list[str]:
    """Imports of another package's private modules or names (``_x``; ``__future__`` and dunders aside)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] not in PACKAGES:
            parts = node.module.split(".")
            names = [a.name for a in node.names]
            if any(p.startswith("_") and not p.startswith("__") for p in parts + names):
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] not in PACKAGES
                      and any(p.startswith("_") and not p.startswith("__") for p in a.name.split("."))]
    return found


def test_no_package_imports_another_packages_private_names() -> None:
    found = {str(f.relative_to(REPO)): hits for pkg in PACKAGES for f in sorted((REPO / pkg).rglob("*.py"))
             if (hits := _private_imports(ast.parse(f.read_text(encoding="utf-8"))))}
    assert found == {}, "private names of other packages imported (use their public API):\n" + "\n".join(
        f"{k}: {v}" for k, v in found.items())


def test_the_scp_touches_no_private_attribute_of_a_library_object() -> None:
    """In the SCP's modules ``_private`` attributes are read or set only on ``self``, and only those the
    module itself defines (not those of a library base class)."""
    found = []
    for name in ("scp.py", "scp_transport.py", "scp_stream.py", "cstore.py"):
        tree = ast.parse((REPO / "appliance" / name).read_text(encoding="utf-8"))
        private = [n for n in ast.walk(tree)
                   if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")]
        own = {n.attr for n in private if isinstance(n.ctx, ast.Store)} | {
            n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        found += [f"{name} line {n.lineno}: {ast.unparse(n)}" for n in private
                  if not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls")) or n.attr not in own]
    assert found == []
