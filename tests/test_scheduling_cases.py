"""Studies that used to be scheduled wrongly or never: each pushed to a real Storage SCP, then one
scheduler pass. The CT series is chosen once, by the scheduler, from what the structure set says."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select

from appliance.scheduler import StudyScheduler
from storage.db import Database
from storage.models import Instance, Job, JobInstance, NodeEvent
from storage.states import JobState, utcnow
from tests.node_helpers import node_settings, running_scp, store_paths, tiny_case


def _push_and_schedule(tmp_path: Path, paths: list[Path]) -> tuple[Job, list[str]]:
    """Push ``paths`` to a fresh node, run one scheduler pass; the job and its instances' modalities."""
    settings = node_settings(tmp_path)
    with running_scp(settings) as scp:
        run = store_paths(scp.port, paths)
        assert run.established and set(run.statuses) == {0}, run.statuses
    db = Database(settings.database_url)
    try:
        (job_id,) = StudyScheduler.for_node(settings, db).tick(utcnow())
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            modalities = sorted(s.scalars(
                select(Instance.modality).join(JobInstance, JobInstance.instance_id == Instance.id)
                .where(JobInstance.job_id == job_id)))
            assert list(s.scalars(select(NodeEvent.id))) == []
        return job, modalities
    finally:
        db.dispose()


def _second_series(w_ct: list[Path], folder: Path, n: int) -> list[Path]:
    """Another CT series on the same Frame of Reference (a second reconstruction): ``n`` slices
    copied from the planning CT with new series and instance UIDs."""
    folder.mkdir(parents=True)
    series = generate_uid()
    out = []
    for k in range(n):
        ds = pydicom.dcmread(w_ct[k % len(w_ct)])
        uid = generate_uid()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], f"{float(ds.ImagePositionPatient[2]) + 0.1 * k:.3f}"]
        path = folder / f"b{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def test_rtstruct_without_referenced_frame_sequence_is_scheduled_by_its_rois_frame(tmp_path: Path) -> None:
    w = tiny_case(tmp_path / "case", n_slices=12)
    rs = pydicom.dcmread(w.rtstruct_path)
    del rs.ReferencedFrameOfReferenceSequence  # Type 3; every ROI names its frame
    rs.save_as(w.rtstruct_path, enforce_file_format=True)
    job, modalities = _push_and_schedule(tmp_path, [*w.ct_paths, w.rtstruct_path])
    assert job.state == JobState.PENDING, job.failure_reason
    assert modalities == ["CT"] * 12 + ["RTSTRUCT"]


def test_rtstruct_filed_under_the_cts_series_uid_still_makes_a_job(tmp_path: Path) -> None:
    w = tiny_case(tmp_path / "case", n_slices=12)
    ct_series = pydicom.dcmread(w.ct_paths[0]).SeriesInstanceUID
    rs = pydicom.dcmread(w.rtstruct_path)
    rs.SeriesInstanceUID = ct_series
    rs.save_as(w.rtstruct_path, enforce_file_format=True)
    job, modalities = _push_and_schedule(tmp_path, [w.rtstruct_path, *w.ct_paths])  # structure set first
    assert job.state == JobState.PENDING, job.failure_reason
    assert job.ct_series_uid == ct_series and modalities == ["CT"] * 12 + ["RTSTRUCT"]


def test_second_ct_series_on_the_frame_the_contours_point_at_the_planning_ct(tmp_path: Path) -> None:
    """A larger second series on the same frame, a structure set naming no series but whose contours
    reference the planning CT's images: the planning CT is chosen, not the largest series."""
    w = tiny_case(tmp_path / "case", n_slices=12)
    planning_series = pydicom.dcmread(w.ct_paths[0]).SeriesInstanceUID
    rs = pydicom.dcmread(w.rtstruct_path)
    for frame in rs.ReferencedFrameOfReferenceSequence:
        del frame.RTReferencedStudySequence
    rs.save_as(w.rtstruct_path, enforce_file_format=True)
    other = _second_series(w.ct_paths, tmp_path / "cbct", 20)
    job, modalities = _push_and_schedule(tmp_path, [*other, *w.ct_paths, w.rtstruct_path])
    assert job.state == JobState.PENDING and job.ct_series_uid == planning_series
    assert modalities == ["CT"] * 12 + ["RTSTRUCT"]


def test_second_ct_series_and_no_reference_to_tell_them_apart_fails_with_the_reason(tmp_path: Path) -> None:
    w = tiny_case(tmp_path / "case", n_slices=12)
    rs = pydicom.dcmread(w.rtstruct_path)
    for frame in rs.ReferencedFrameOfReferenceSequence:
        del frame.RTReferencedStudySequence
    for roi in rs.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            del contour.ContourImageSequence
    rs.save_as(w.rtstruct_path, enforce_file_format=True)
    other = _second_series(w.ct_paths, tmp_path / "cbct", 20)
    job, _ = _push_and_schedule(tmp_path, [*other, *w.ct_paths, w.rtstruct_path])
    assert job.state == JobState.FAILED
    assert "2 CT series share the Frame of Reference" in str(job.failure_reason)
    assert "name none of them" in str(job.failure_reason) and "Send only the planning CT" in str(job.failure_reason)


def _pushed(tmp_path: Path, paths: list[Path]) -> tuple[StudyScheduler, Database]:
    settings = node_settings(tmp_path, scheduler={"stable_age_s": 3600.0})
    with running_scp(settings) as scp:
        run = store_paths(scp.port, paths)
        assert run.established and set(run.statuses) == {0}, run.statuses
    db = Database(settings.database_url)
    return StudyScheduler.for_node(settings, db), db


def test_a_complete_study_is_planned_at_once_without_waiting_for_the_quiet_period(tmp_path: Path) -> None:
    """Every CT image the structure set lists is stored: the job is made in the same pass, an hour before
    the study would be stable."""
    w = tiny_case(tmp_path / "case", n_slices=12)
    sched, db = _pushed(tmp_path, [*w.ct_paths, w.rtstruct_path])
    try:
        (job_id,) = sched.tick(utcnow())
        with db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None and job.state == JobState.PENDING
    finally:
        db.dispose()


def test_a_study_missing_a_listed_ct_image_waits_for_the_quiet_period(tmp_path: Path) -> None:
    w = tiny_case(tmp_path / "case", n_slices=12)
    sched, db = _pushed(tmp_path, [*w.ct_paths[1:], w.rtstruct_path])
    try:
        assert sched.tick(utcnow()) == []  # one listed image has not arrived: not complete
        assert len(sched.tick(utcnow() + dt.timedelta(seconds=3601))) == 1  # stable: the loader will say why
    finally:
        db.dispose()


def test_contour_level_references_alone_do_not_make_a_study_complete(tmp_path: Path) -> None:
    """Without the series' image list, how far the CT extends beyond the contours is unknown: wait."""
    w = tiny_case(tmp_path / "case", n_slices=12)
    rs = pydicom.dcmread(w.rtstruct_path)
    for frame in rs.ReferencedFrameOfReferenceSequence:
        del frame.RTReferencedStudySequence
    rs.save_as(w.rtstruct_path, enforce_file_format=True)
    sched, db = _pushed(tmp_path, [*w.ct_paths, w.rtstruct_path])
    try:
        assert sched.tick(utcnow()) == []
    finally:
        db.dispose()
