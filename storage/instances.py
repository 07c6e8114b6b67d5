"""Registering a received instance: study, series and instance rows, duplicates and conflicts.

DICOM-free: the caller parses the header into an :class:`InstanceHeader` (``appliance.scp``).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.db import record_node_event
from storage.models import Instance, Series, Study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceHeader:
    """The header attributes of an instance the node keeps (UIDs already validated)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    transfer_syntax_uid: str
    frame_of_reference_uid: str | None = None
    """CT: FrameOfReferenceUID; RTSTRUCT: the ReferencedFrameOfReferenceUID of its contours."""
    referenced_series_uid: str | None = None
    """RTSTRUCT: the first referenced CT series, when the structure set names it."""


class RegisterOutcome(enum.StrEnum):
    """What :func:`register_instance` found."""

    NEW = "new"
    """No row had this SOP Instance UID; rows were added."""
    DUPLICATE = "duplicate"
    """The same SOP Instance UID with the same content is already stored (idempotent)."""
    CONFLICT = "conflict"
    """The same SOP Instance UID with different content is stored; the first one is kept."""


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    """The stored instance with this SOP Instance UID, if any."""
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def classify(session: Session, sop_instance_uid: str, sha256: str) -> RegisterOutcome:
    """Whether an instance with this UID and content would be new, a duplicate or a conflict."""
    existing = find_instance(session, sop_instance_uid)
    if existing is None:
        return RegisterOutcome.NEW
    return RegisterOutcome.DUPLICATE if existing.sha256 == sha256 else RegisterOutcome.CONFLICT


def register_instance(
    session: Session,
    hdr: InstanceHeader,
    *,
    path: str,
    size_bytes: int,
    sha256: str,
    calling_ae_title: str,
    received_at: dt.datetime,
    called_ae_title: str | None = None,
) -> RegisterOutcome:
    """Add the rows of a received instance (get-or-create study and series), or report a duplicate.

    A conflict (same UID, other content) is recorded as a ``node_events`` row; nothing else changes.
    The caller commits (the session's transaction is ``BEGIN IMMEDIATE`` on SQLite, so the
    get-or-create is not racing another association).
    """
    outcome = classify(session, hdr.sop_instance_uid, sha256)
    if outcome == RegisterOutcome.DUPLICATE:
        return outcome
    if outcome == RegisterOutcome.CONFLICT:
        record_node_event(
            session, "instance_conflict",
            f"instance {hdr.sop_instance_uid} received again from {calling_ae_title!r} with different "
            f"content (sha256 {sha256[:12]}...); the first version is kept and the new one refused",
            study_uid=hdr.study_uid, sop_instance_uid=hdr.sop_instance_uid,
        )
        return outcome
    study = session.scalar(select(Study).where(Study.study_uid == hdr.study_uid))
    if study is None:
        study = Study(study_uid=hdr.study_uid, first_received_at=received_at, last_received_at=received_at)
        session.add(study)
        session.flush()
    else:
        study.last_received_at = max(study.last_received_at, received_at)
    series = session.scalar(select(Series).where(Series.series_uid == hdr.series_uid))
    if series is None:
        series = Series(study_id=study.id, series_uid=hdr.series_uid, modality=hdr.modality,
                        frame_of_reference_uid=hdr.frame_of_reference_uid)
        session.add(series)
        session.flush()
    session.add(Instance(
        series_id=series.id, sop_instance_uid=hdr.sop_instance_uid, sop_class_uid=hdr.sop_class_uid,
        modality=hdr.modality, frame_of_reference_uid=hdr.frame_of_reference_uid,
        referenced_series_uid=hdr.referenced_series_uid, transfer_syntax_uid=hdr.transfer_syntax_uid,
        path=path, size_bytes=size_bytes, sha256=sha256, calling_ae_title=calling_ae_title,
        called_ae_title=called_ae_title, received_at=received_at,
    ))
    session.flush()
    return RegisterOutcome.NEW
