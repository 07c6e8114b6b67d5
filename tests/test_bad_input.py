"""The catalogue of bad input and what the node does with each (see docs/CONFORMANCE.md).

Network level (the SCP answers a failure status or refuses in negotiation, the node keeps serving,
nothing else is lost): wrong transfer syntax, SOP class disagreeing with the context, a malformed
dataset, a huge instance (memory stays bounded: the SCP streams to disk). Case level (the loader or
the planner raises an InputError that names the problem; through the node it becomes a FAILED job
with that reason): truncated files, pixel data of the wrong size, missing slices, uneven spacing,
non-axial orientation, slices of two series mixed, no PTV, an empty or self-intersecting contour,
an unknown frame of reference, names in other languages and cases, a PTV outside the body or too
large for the 20 cm field. Hostile UIDs and duplicates: tests/test_security.py and tests/test_scp.py.

Everything is generated here from the synthetic case writer; real associations, real files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage  # type: ignore[attr-defined]

from appliance.config import Settings, settings_from_dict
from appliance.cstore import STATUS_DATASET_MISMATCH
from appliance.dicom.case_loader import load_folder, request_from_folder
from appliance.planning import plan_request
from appliance.scheduler import StudyScheduler
from appliance.scu import wait_for_port as wait_port
from appliance.synth_dicom import SynthWritten
from appliance.worker import Worker
from core.case import Prescription, Role
from core.errors import InputError
from storage.models import Job
from storage.states import JobState
from tests.conftest import free_port
from tests.node_helpers import (
    PEER,
    case_files,
    kill_group,
    node_settings,
    node_table,
    running_scp,
    store_paths,
    tiny_case,
)
from tests.test_scp import make_ct_slice

REPO = Path(__file__).resolve().parents[1]
SETTINGS = settings_from_dict({"planning": {"method": "optimize", "optimizer_iterations": 2, "dose_grid_mm": 8.0,
                                            "optimizer_arc_iterations": 150}})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> SynthWritten:
    return tiny_case(tmp_path_factory.mktemp("pristine") / "case", seed=4)


@pytest.fixture
def case(pristine: SynthWritten, tmp_path: Path) -> Path:
    """A fresh copy of the tiny synthetic case to break."""
    dst = tmp_path / "case"
    shutil.copytree(pristine.folder, dst)
    return dst


def _cts(folder: Path) -> list[Path]:
    return sorted(folder.glob("CT_*.dcm"), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True)
                                                                 .ImagePositionPatient[2]))


def _rs(folder: Path) -> Path:
    (rs,) = folder.glob("RS_*.dcm")
    return rs


def _edit(path: Path, fn: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path)


def _roi(ds: Dataset, name: str) -> tuple[Dataset, Dataset]:
    """(StructureSetROISequence item, ROIContourSequence item) of ROI ``name``."""
    roi = next(r for r in ds.StructureSetROISequence if r.ROIName == name)
    contours = next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == roi.ROINumber)
    return roi, contours


def _map_points(ds: Dataset, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    """Replace every contour of ROI ``name`` by ``fn(points (n, 3) mm)``."""
    _, contours = _roi(ds, name)
    for c in contours.ContourSequence:
        pts = fn(np.asarray(c.ContourData, dtype=float).reshape(-1, 3))
        c.ContourData = [f"{v:.3f}" for v in pts.ravel()]
        c.NumberOfContourPoints = len(pts)


def _load(folder: Path) -> object:
    return load_folder(folder, structures=SETTINGS.structures, prescription=Prescription())


# ------------------------------------------------------------------------------------------------
# Case-level catalogue (fast: load_case / plan_folder directly)


def _truncate_file(folder: Path) -> None:
    p = _cts(folder)[10]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _short_pixels(folder: Path) -> None:
    _edit(_cts(folder)[5], lambda ds: setattr(ds, "PixelData", ds.PixelData[:-200]))


def _missing_slice(folder: Path) -> None:
    _cts(folder)[12].unlink()


def _uneven_spacing(folder: Path) -> None:
    for p in _cts(folder)[14:]:
        _edit(p, lambda ds: setattr(ds, "ImagePositionPatient",
                                    [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 1.5]))


def _oblique(folder: Path) -> None:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    for p in _cts(folder):
        _edit(p, lambda ds: setattr(ds, "ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, c, s]))


def _two_series_mixed(folder: Path) -> None:
    # Half the slices re-labelled as a second series of the same study and frame of reference, and the
    # structure set no longer naming its series: two candidate series, none complete.
    other = generate_uid()
    for p in _cts(folder)[::2]:
        _edit(p, lambda ds: setattr(ds, "SeriesInstanceUID", other))

    def unname(ds: Dataset) -> None:
        for f in ds.ReferencedFrameOfReferenceSequence:
            for st in f.RTReferencedStudySequence:
                del st.RTReferencedSeriesSequence
    _edit(_rs(folder), unname)


def _no_ptv(folder: Path) -> None:
    _edit(_rs(folder), lambda ds: setattr(_roi(ds, "PTV")[0], "ROIName", "Zielvolumen"))


def _empty_ptv(folder: Path) -> None:
    _edit(_rs(folder), lambda ds: delattr(_roi(ds, "PTV")[1], "ContourSequence"))


def _unknown_frame(folder: Path) -> None:
    other = generate_uid()

    def fn(ds: Dataset) -> None:
        for f in ds.ReferencedFrameOfReferenceSequence:
            f.FrameOfReferenceUID = other
        for r in ds.StructureSetROISequence:
            r.ReferencedFrameOfReferenceUID = other
    _edit(_rs(folder), fn)


def _ptv_outside_body(folder: Path) -> None:
    _edit(_rs(folder), lambda ds: _map_points(ds, "PTV", lambda p: p + np.array([210.0, 0.0, 0.0])))


CASE_FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated file": (_truncate_file, "CT"),
    "pixel data of the wrong size": (_short_pixels, "pixel"),
    "missing slice": (_missing_slice, "were not received"),
    "non-uniform spacing": (_uneven_spacing, "spacing"),
    "non-axial orientation": (_oblique, "axial"),
    "two series mixed": (_two_series_mixed, "series"),
    "no PTV": (_no_ptv, "no ROI recognised as the PTV"),
    "empty PTV contour": (_empty_ptv, "PTV"),
    "unknown frame of reference": (_unknown_frame, "frame of reference"),
    "PTV outside the body": (_ptv_outside_body, "outside the body contour"),
}


@pytest.mark.parametrize("fault", list(CASE_FAULTS))
def test_case_level_fault_is_a_clear_input_error(case: Path, fault: str) -> None:
    breaker, words = CASE_FAULTS[fault]
    breaker(case)
    with pytest.raises(InputError) as err:
        _load(case)
    msg = str(err.value)
    assert words.lower() in msg.lower(), msg
    assert "Phantom" not in msg and len(msg) < 2000  # names UIDs/files, never the patient


def test_names_in_other_languages_and_cases_map_to_roles(case: Path) -> None:
    renames = {"PTV": "ptv_PROSTATE", "Bladder": "VESSIE", "Rectum": "Rektum", "Body": "external",
               "Femur_Head_L": "FEMUR_L"}

    def fn(ds: Dataset) -> None:
        for old, new in renames.items():
            _roi(ds, old)[0].ROIName = new
    _edit(_rs(case), fn)
    c = _load(case)
    names = c.structure_names  # type: ignore[attr-defined]
    assert names[Role.PTV] == "ptv_PROSTATE" and names[Role.BLADDER] == "VESSIE"
    assert names[Role.RECTUM] == "Rektum" and names[Role.BODY] == "external"
    assert names[Role.FEMUR_HEAD_L] == "FEMUR_L"


def test_self_intersecting_contour_gives_a_case_or_a_clear_error(case: Path) -> None:
    def bow_tie(p: np.ndarray) -> np.ndarray:
        c = p.mean(axis=0)
        r = 0.6 * float(np.max(np.abs(p[:, :2] - c[:2])))
        xy = np.array([[-r, -r], [r, r], [r, -r], [-r, r]])  # crosses itself at the centre
        return np.column_stack([c[0] + xy[:, 0], c[1] + xy[:, 1], np.full(4, c[2])])

    _edit(_rs(case), lambda ds: _map_points(ds, "PTV", bow_tie))
    try:
        c = _load(case)
    except InputError as exc:
        assert "PTV" in str(exc)
        return
    ptv = c.masks[Role.PTV]  # type: ignore[attr-defined]
    assert 0 < int(ptv.sum()) < int(c.masks[Role.BODY].sum())  # type: ignore[attr-defined]


def test_garbage_files_in_the_folder_are_ignored(case: Path) -> None:
    rng = np.random.default_rng(0)
    (case / "junk.dcm").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (case / "empty.dcm").write_bytes(b"")
    (case / "notes.txt").write_text("not DICOM")
    assert Role.PTV in _load(case).masks  # type: ignore[attr-defined]


def test_ptv_larger_than_the_field_is_refused_by_the_planner(case: Path, tmp_path: Path) -> None:
    def widen(p: np.ndarray) -> np.ndarray:
        c = p.mean(axis=0)
        return np.column_stack([c[0] + 7.0 * (p[:, 0] - c[0]), p[:, 1], p[:, 2]])

    _edit(_rs(case), lambda ds: _map_points(ds, "PTV", widen))
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"PTV extends .* mm from the isocenter"):
        plan_request(request_from_folder(case), tmp_path / "out", SETTINGS)
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "out" / "rtplan.dcm").exists()


# ------------------------------------------------------------------------------------------------
# Through the node: refused at the DIMSE level, or a FAILED job with the loader's reason


def test_wrong_transfer_syntax_is_refused_in_negotiation(tmp_path: Path) -> None:
    """A compressed RT Structure Set, and CT in a syntax the node neither decodes nor explains (JPEG 2000
    Part 2 multi-component), are refused in negotiation (lossy CT is refused per image: test_compressed_ct)."""
    with running_scp(node_settings(tmp_path)) as scp:
        ae = AE(ae_title=PEER)
        ae.add_requested_context(RTStructureSetStorage, [JPEGBaseline8Bit])
        ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.92"])
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="AIRT")
        # Every context refused: pynetdicom gives up on the association (nothing can be sent).
        assert not assoc.is_established and assoc.accepted_contexts == []
        assert [c.result for c in assoc.rejected_contexts] == [0x04, 0x04]  # transfer syntaxes not supported
        assert store_paths(scp.port, [_ct_file(tmp_path)]).statuses == [0]


def _ct_file(tmp_path: Path, **kw: object) -> Path:
    ds = make_ct_slice(study=generate_uid(), series=generate_uid(), for_uid=generate_uid(), z=0.0, **kw)  # type: ignore[arg-type]
    p = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


def _send_raw(port: int, path: Path) -> int:
    """C-STORE a file's bytes as they are (file meta decides the request; the dataset is not re-encoded)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        run = store_paths(port, [path])
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    return run.statuses[0]


def test_sop_class_disagreeing_with_the_request_is_refused(tmp_path: Path) -> None:
    p = _ct_file(tmp_path)
    ds = pydicom.dcmread(p)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage in the dataset, CT in the file meta/request
    ds.save_as(p)
    with running_scp(node_settings(tmp_path)) as scp:
        assert _send_raw(scp.port, p) == STATUS_DATASET_MISMATCH
        assert store_paths(scp.port, [_ct_file(tmp_path)]).statuses == [0]  # still serving
        assert not [f for f in scp.store.root.rglob("*.dcm") if "1.2.840.10008.5.1.4.1.1.4" in f.read_bytes()[:4000].decode("latin-1")]


def test_truncated_instance_through_the_node_becomes_a_failed_job(tmp_path: Path, pristine: SynthWritten) -> None:
    settings: Settings = settings_from_dict(node_table(tmp_path))
    files = case_files(pristine)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(files[7].read_bytes()[:-3000])  # the last 3000 bytes of pixel data lost
    with running_scp(settings) as scp:
        statuses = [*store_paths(scp.port, files[:7] + files[8:]).statuses, _send_raw(scp.port, broken)]
        assert statuses == [0] * len(files)  # headers are fine: stored as received
        db = scp.db
        (job_id,) = StudyScheduler.for_node(settings, db).tick()
        assert Worker.for_node(settings, db).run_once() == job_id
        with db.session() as s:
            job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.FAILED, job.state if job else None
        reason = str(job.failure_reason)
        sop = pydicom.dcmread(broken, stop_before_pixels=True).SOPInstanceUID
        assert sop in reason and "internal error" not in reason, reason
        # The node keeps serving, and a corrected resend of the slice is a conflict, not a silent overwrite.
        assert store_paths(scp.port, [files[7]]).statuses == [0xC212]


# ------------------------------------------------------------------------------------------------
# Huge instances: the SCP streams to disk

SCP_CHILD = textwrap.dedent("""
    import json, sys, threading
    from appliance.config import settings_from_dict
    from appliance.scp import StorageSCP
    from storage.db import Database
    from storage.instance_store import InstanceStore
    settings = settings_from_dict(json.loads(sys.argv[1]))
    scp = StorageSCP.for_node(settings, Database(settings.database_url), InstanceStore(settings.data_dir))
    scp.start()
    threading.Event().wait()
""")


@pytest.mark.slow
def test_huge_instance_is_streamed_with_bounded_memory(tmp_path: Path) -> None:
    side = 8192  # 8192 x 8192 x 2 bytes = 128 MiB of pixel data
    p = _ct_file(tmp_path, rows=side)
    table = node_table(tmp_path, node={"port": free_port()})
    proc = subprocess.Popen([sys.executable, "-c", SCP_CHILD, json.dumps(table)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_port(table["node"]["port"], timeout_s=60)
        child = psutil.Process(proc.pid)
        time.sleep(0.5)
        rss0 = child.memory_info().rss
        peak = rss0
        statuses: list[int] = []
        import threading

        sender = threading.Thread(target=lambda: statuses.append(_send_raw(table["node"]["port"], p)))
        sender.start()
        while sender.is_alive():
            peak = max(peak, child.memory_info().rss)
            time.sleep(0.02)
        sender.join()
    finally:
        kill_group(proc)
    size = p.stat().st_size
    assert statuses == [0]
    stored = list((tmp_path / "data" / "instances").rglob("*.dcm"))
    assert len(stored) == 1 and abs(stored[0].stat().st_size - size) < 1024  # (file meta re-written)
    assert len(pydicom.dcmread(stored[0]).PixelData) == side * side * 2
    grew_mib = (peak - rss0) / 2**20
    print(f"instance {size / 2**20:.0f} MiB: SCP RSS {rss0 / 2**20:.0f} -> peak {peak / 2**20:.0f} MiB "
          f"(+{grew_mib:.0f} MiB)")
    assert grew_mib < 0.25 * size / 2**20, grew_mib
