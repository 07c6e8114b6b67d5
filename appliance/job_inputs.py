"""A claimed job's input folder and the :class:`~core.request.CaseRequest` it is planned from.

The job's instance files (the CT series and RT Structure Set the scheduler chose, stored under the
data directory) are linked (or copied) into ``DATA_DIR/jobs/<id>/input``, and the request names
those links with the UIDs the job row recorded: the planning process never looks at anything else.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import PlanningError
from core.request import CaseRequest


@dataclass(frozen=True)
class ClaimedJob:
    """What the worker keeps of a claimed job row (the session that read it is closed)."""

    job_id: int
    attempts: int
    created: Any
    method: str | None
    study_uid: str
    ct_series_uid: str | None
    rtstruct_uid: str | None


def job_request(job: ClaimedJob, rows: Sequence[Any], data_dir: Path, in_dir: Path, out_dir: Path) -> CaseRequest:
    """Link the job's instance files into ``in_dir`` (``out_dir`` made empty) and make the request of
    the scheduler's choice.

    Parameters
    ----------
    job
        The claimed job (its UIDs are the scheduler's choice).
    rows
        The job's instances: ``path`` (relative to ``data_dir``), ``modality``, ``sop_instance_uid``,
        ``called_ae_title`` and ``calling_ae_title``.
    data_dir
        The node's data directory.
    in_dir, out_dir
        The job's input and output folders (emptied first).

    Raises
    ------
    PlanningError
        The job names nothing to plan, or a file of it is missing; the job fails with the message.
    OSError
        The folders cannot be written.
    """
    if job.ct_series_uid is None or job.rtstruct_uid is None:
        raise PlanningError(f"job {job.job_id} names no CT series or RT Structure Set to plan; send the study "
                            "again")
    for d in (in_dir, out_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    linked: dict[str, Path] = {}
    for r in rows:
        src = data_dir / r.path
        if not src.is_file():
            raise PlanningError(f"instance file {r.path} of this job is missing from the data directory; "
                                "send the study again")
        dst = in_dir / src.name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        linked[r.sop_instance_uid] = dst
    rtstruct = linked.get(job.rtstruct_uid)
    if rtstruct is None:
        raise PlanningError(f"RT Structure Set {job.rtstruct_uid} chosen for job {job.job_id} is not among its "
                            "instances; send the study again")
    return CaseRequest(
        study_uid=job.study_uid, ct_series_uid=job.ct_series_uid, rtstruct_uid=job.rtstruct_uid,
        ct_files=tuple(sorted(linked[r.sop_instance_uid] for r in rows if r.modality == "CT")),
        rtstruct_file=rtstruct,
        # The AE titles the study came by choose its protocol profile (appliance.profiles).
        called_aets=tuple(sorted({r.called_ae_title for r in rows if r.called_ae_title})),
        calling_aets=tuple(sorted({r.calling_ae_title for r in rows})))
