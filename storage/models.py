"""The database schema: received studies, series and instances; jobs, their history and deliveries.

Tables and columns are named for a physicist reading them in the ``sqlite3`` shell; times are
UTC (stored as ``YYYY-MM-DD HH:MM:SS.ffffff``, compared and sorted as text). Relationships are
``lazy="raise"``: every query says what it loads. Views for people (``v_jobs_overview``,
``v_deliveries_pending``, ``v_studies``) are created by :func:`storage.db.init_db`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from storage.states import DeliveryState, JobState

UID = String(64)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored in UTC and returned UTC-aware (naive values are refused on write)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to a UTC column; use datetime.now(UTC)")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


def _state_enum(cls: type[Any], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, length=16, create_constraint=True, validate_strings=True)


class Base(DeclarativeBase):
    """Base of every table."""


class Study(Base):
    """A DICOM study as received (one row per Study Instance UID)."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    scheduled_through: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    """``last_received_at`` when the scheduler last turned this study into a job; NULL: never."""

    series: Mapped[list[Series]] = relationship(back_populates="study", lazy="raise")


class Series(Base):
    """A DICOM series (one row per Series Instance UID)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str] = mapped_column(String(16))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID, default=None)

    study: Mapped[Study] = relationship(back_populates="series", lazy="raise")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", lazy="raise")


class Instance(Base):
    """A received SOP instance and where its file is (path relative to the data directory)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(16))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID, default=None)
    """CT: its own Frame of Reference; RTSTRUCT: the one its contours are in."""
    referenced_series_uid: Mapped[str | None] = mapped_column(UID, default=None)
    """RTSTRUCT: the CT series it was drawn on (first referenced series), if given."""
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(400), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str | None] = mapped_column(String(16), default=None)
    """The AE title the instance was sent to (the node's, or a profile's); NULL: received before profiles."""
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship(back_populates="instances", lazy="raise")


class Job(Base):
    """One planning job: a study's instance set (by content fingerprint) and what became of it."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("study_id", "instance_fingerprint", name="uq_jobs_study_fingerprint"),
        Index("ix_jobs_state_created", "state", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_uid: Mapped[str] = mapped_column(UID)
    instance_fingerprint: Mapped[str] = mapped_column(String(64))
    """SHA-256 over the sorted ``sop_instance_uid:sha256`` lines of the job's instances."""
    ct_series_uid: Mapped[str | None] = mapped_column(UID, default=None)
    rtstruct_uid: Mapped[str | None] = mapped_column(UID, default=None)
    state: Mapped[JobState] = mapped_column(_state_enum(JobState, "job_state"))
    method: Mapped[str | None] = mapped_column(String(16), default=None)
    profile: Mapped[str | None] = mapped_column(String(64), default=None)
    """The protocol profile the job was planned with (``[[profiles]]`` name)."""
    profile_reason: Mapped[str | None] = mapped_column(Text, default=None)
    """Why that profile: the called or calling AE title, the PTV's name, the default."""
    hold_reason: Mapped[str | None] = mapped_column(Text, default=None)
    """Set while the job's deliveries are held (a priority-1 goal failed and ``planning.when_p1_fails``
    is ``hold``); ``airt jobs release`` clears it and queues the deliveries."""
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """How many times a worker has started this job (crashes count)."""
    worker: Mapped[str | None] = mapped_column(String(120), default=None)
    failure_reason: Mapped[str | None] = mapped_column(Text, default=None)
    output_dir: Mapped[str | None] = mapped_column(String(400), default=None)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """Per-stage wall times, seconds."""
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """The contents of the job's metrics.json (DVH metrics, goal results, MU, timings)."""
    ptv_d98_gy: Mapped[float | None] = mapped_column(Float, default=None)
    ptv_hi: Mapped[float | None] = mapped_column(Float, default=None)
    bladder_dmean_gy: Mapped[float | None] = mapped_column(Float, default=None)
    rectum_dmean_gy: Mapped[float | None] = mapped_column(Float, default=None)


class JobInstance(Base):
    """Which instances a job was built from (the set its fingerprint covers)."""

    __tablename__ = "job_instances"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), primary_key=True)


class JobEvent(Base):
    """Append-only history of a job: every state change with its reason."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    from_state: Mapped[JobState | None] = mapped_column(_state_enum(JobState, "job_event_from"), default=None)
    to_state: Mapped[JobState] = mapped_column(_state_enum(JobState, "job_event_to"))
    message: Mapped[str | None] = mapped_column(Text, default=None)


class Delivery(Base):
    """Sending one job's RT Plan and RT Dose to one destination, with its retries."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "destination", name="uq_deliveries_job_destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[DeliveryState] = mapped_column(_state_enum(DeliveryState, "delivery_state"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    next_try_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)


class NodeEvent(Base):
    """Append-only log of things a person should know that are not job state changes
    (conflicting duplicates, files quarantined or missing, recovery actions)."""

    __tablename__ = "node_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    kind: Mapped[str] = mapped_column(String(40))
    level: Mapped[str] = mapped_column(String(8))
    study_uid: Mapped[str | None] = mapped_column(UID, default=None)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, default=None)
    message: Mapped[str] = mapped_column(Text)
