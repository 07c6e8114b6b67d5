"""Compressed CT, as PACS and scanners send it: JPEG Lossless (Process 14 and SV1), JPEG-LS lossless,
JPEG 2000 lossless and RLE are accepted, stored as sent and decoded to exactly the HU of the
uncompressed series; lossy-compressed CT is refused with a reason the sender and the job both show.
Files are compressed by dcmtk (dcmcjpeg, dcmcjpls, dcmcrle) and, for JPEG 2000, by pydicom with the
OpenJPEG plugin; pushed by dcmtk storescu."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance.dicom.case_loader import load_folder
from appliance.scheduler import StudyScheduler
from appliance.worker import Worker
from core.case import Case
from storage.db import Database
from storage.models import Instance, Job, NodeEvent
from storage.states import JobState, utcnow
from tests.conftest import require_tool
from tests.node_helpers import PEER, node_settings, running_scp, tiny_case

pytestmark = pytest.mark.external


def _dcmtk(tool: str, *args: str) -> Callable[[Path, Path], None]:
    def run(src: Path, dst: Path) -> None:
        subprocess.run([require_tool(tool), *args, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return run


def _j2k(src: Path, dst: Path) -> None:
    ds = pydicom.dcmread(src)
    ds.compress("1.2.840.10008.1.2.4.90", generate_instance_uid=False)  # JPEG 2000 Lossless Only
    ds.save_as(dst, enforce_file_format=True)


#: name -> (compressor, transfer syntax it writes)
CODECS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "jpeg-lossless-sv1": (_dcmtk("dcmcjpeg", "+e1"), "1.2.840.10008.1.2.4.70"),
    "jpeg-lossless-p14": (_dcmtk("dcmcjpeg", "+el"), "1.2.840.10008.1.2.4.57"),
    "jpeg-ls-lossless": (_dcmtk("dcmcjpls", "+el"), "1.2.840.10008.1.2.4.80"),
    "jpeg2000-lossless": (_j2k, "1.2.840.10008.1.2.4.90"),
    "rle": (_dcmtk("dcmcrle"), "1.2.840.10008.1.2.5"),
}


def _compressed_case(tmp: Path, seed: int, compress: Callable[[Path, Path], None]) -> tuple[list[Path], Path]:
    """A tiny case (uncompressed, under tmp/plain) and its copy with every CT slice compressed
    (tmp/packed); returns the packed files and the plain folder."""
    w = tiny_case(tmp / "plain", seed=seed, n_slices=12)
    packed = tmp / "packed"
    packed.mkdir(parents=True)
    out = []
    for p in w.ct_paths:
        compress(p, packed / p.name)
        out.append(packed / p.name)
    rs = packed / w.rtstruct_path.name
    rs.write_bytes(w.rtstruct_path.read_bytes())
    return [*out, rs], tmp / "plain"


def _load(folder: Path) -> Case:
    from appliance.config import Settings

    s = Settings()
    return load_folder(folder, structures=s.structures, prescription=s.profile().to_prescription())


@pytest.mark.parametrize("codec", list(CODECS))
def test_loader_decodes_lossless_ct_to_the_uncompressed_hu(tmp_path: Path, codec: str) -> None:
    compress, syntax = CODECS[codec]
    files, plain = _compressed_case(tmp_path, 1, compress)
    assert str(pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID) == syntax
    case, reference = _load(files[0].parent), _load(plain)
    np.testing.assert_array_equal(case.ct_hu, reference.ct_hu)
    assert case.masks.keys() == reference.masks.keys()


#: storescu's option proposing each codec's transfer syntax (it has none for JPEG Process 14 non-SV1).
STORESCU_PROPOSE = {"jpeg-lossless-sv1": "-xs", "jpeg-ls-lossless": "-xt", "jpeg2000-lossless": "-xv", "rle": "-xr",
                    "jpeg-baseline": "-xy"}


def _storescu(port: int, files: list[Path], codec: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("storescu"), *(options or ("-v",)), STORESCU_PROPOSE[codec], "-aet", PEER,
                           "-aec", "AIRT",
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_node_takes_every_lossless_ct_from_storescu_and_plans_it(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    pushed: dict[str, tuple[list[Path], Path]] = {}
    with running_scp(settings) as scp:
        for seed, codec in enumerate(STORESCU_PROPOSE, start=11):
            if codec not in CODECS:
                continue
            pushed[codec] = _compressed_case(tmp_path / codec, seed, CODECS[codec][0])
            r = _storescu(scp.port, pushed[codec][0], codec)
            assert r.returncode == 0, r.stdout + r.stderr
    db = Database(settings.database_url)
    try:
        with db.session() as s:
            stored = {str(t) for (t,) in s.query(Instance.transfer_syntax_uid).filter(Instance.modality == "CT")}
        assert stored == {CODECS[c][1] for c in pushed}
        jobs = StudyScheduler.for_node(settings, db).tick(utcnow())
        assert len(jobs) == len(pushed) == 4
        worker = Worker.for_node(settings, db)
        for _ in jobs:
            worker.run_once()
        with db.session() as s:
            done = {j.id: (j.state, j.failure_reason) for j in s.query(Job)}
        assert all(state == JobState.SUCCEEDED for state, _ in done.values()), done
        for job_id in jobs:  # the planned input is the compressed series, with the uncompressed HU
            case = _load(settings.data_dir / "jobs" / str(job_id) / "input")
            plain = next(p for files, p in pushed.values()
                         if pydicom.dcmread(files[0]).StudyInstanceUID == case.dicom.study_instance_uid)  # type: ignore[union-attr]
            np.testing.assert_array_equal(case.ct_hu, _load(plain).ct_hu)
    finally:
        db.dispose()


def test_lossy_ct_is_refused_with_a_reason_the_sender_and_the_job_show(tmp_path: Path) -> None:
    files, _ = _compressed_case(tmp_path, 21, _dcmtk("dcmcjpeg", "+eb"))  # JPEG Baseline (lossy)
    settings = node_settings(tmp_path)
    with running_scp(settings) as scp:
        r = _storescu(scp.port, files, "jpeg-baseline", "-d", "-nh")
    out = r.stdout + r.stderr
    assert "0xc214" in out.lower(), out  # the status and the ErrorComment, as the sender shows them
    assert "[lossy CT refused (JPEG Baseline); send lossless]" in out and "ErrorComment" in out, out
    db = Database(settings.database_url)
    try:
        with db.session() as s:
            assert [m for (m,) in s.query(Instance.modality)] == ["RTSTRUCT"]
            events = [e.message for e in s.query(NodeEvent).filter(NodeEvent.kind == "instance_refused")]
        assert len(events) == 12 and "JPEG Baseline (lossy)" in events[0]
        (job_id,) = StudyScheduler.for_node(settings, db).tick(utcnow())
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None and job.state == JobState.FAILED
            assert "no CT series" in str(job.failure_reason)
            assert "12 image(s) of this study were refused on receipt" in str(job.failure_reason)
            assert "JPEG Baseline (lossy)" in str(job.failure_reason)
    finally:
        db.dispose()


@pytest.mark.slow
def test_orthanc_pushes_losslessly_compressed_ct(tmp_path: Path) -> None:
    """Orthanc stores a JPEG-LS and a JPEG 2000 lossless study as uploaded and pushes them to the node
    (C-STORE in their own transfer syntaxes); both are stored as sent and load with the uncompressed HU."""
    import json
    import urllib.request

    from appliance.scu import wait_for_port
    from tests.conftest import free_port

    orthanc = require_tool("Orthanc")
    settings = node_settings(tmp_path, peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}])
    o_dicom, o_http = free_port(), free_port()
    (tmp_path / "orthanc").mkdir()
    (tmp_path / "orthanc.json").write_text(json.dumps({
        "Name": "test", "DicomAet": "ORTHANC", "DicomPort": o_dicom, "HttpPort": o_http,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "StorageDirectory": str(tmp_path / "orthanc"), "IndexDirectory": str(tmp_path / "orthanc"),
        "DicomModalities": {"airt": ["AIRT", "127.0.0.1", settings.node.port]}, "Plugins": [],
    }))
    proc = subprocess.Popen([orthanc, str(tmp_path / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def http(method: str, url: str, body: bytes | None = None) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{o_http}{url}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=120) as rsp:
            raw = rsp.read()
        return json.loads(raw) if raw else None

    plains = {}
    try:
        wait_for_port(o_http, 60)
        with running_scp(settings):
            for seed, codec in ((31, "jpeg-ls-lossless"), (32, "jpeg2000-lossless")):
                files, plain = _compressed_case(tmp_path / codec, seed, CODECS[codec][0])
                plains[pydicom.dcmread(files[0]).StudyInstanceUID] = (plain, CODECS[codec][1])
                for p in files:
                    http("POST", "/instances", p.read_bytes())
            for study in http("GET", "/studies"):  # type: ignore[union-attr]
                http("POST", "/modalities/airt/store", json.dumps({"Resources": [study]}).encode())
    finally:
        proc.terminate()
        proc.wait(30)
    db = Database(settings.database_url)
    try:
        with db.session() as s:
            rows = [(str(i.transfer_syntax_uid), i.path) for i in s.query(Instance).filter(Instance.modality == "CT")]
        assert {t for t, _ in rows} == {syntax for _, syntax in plains.values()}
        assert len(rows) == 24
        for study_uid, (plain, _) in plains.items():
            folder = tmp_path / f"stored_{study_uid[-6:]}"
            folder.mkdir()
            for _, rel in rows:
                src = settings.data_dir / rel
                if pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID == study_uid:
                    (folder / src.name).write_bytes(src.read_bytes())
            (folder / "rs.dcm").write_bytes(next(plain.glob("RS_*.dcm")).read_bytes())
            np.testing.assert_array_equal(_load(folder).ct_hu, _load(plain).ct_hu)
    finally:
        db.dispose()
