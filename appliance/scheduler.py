"""The scheduler: turns received studies into planning jobs once they are stable and complete.

Rules (checked every ``scheduler.poll_interval_s``; a study is *complete* when it holds an RT
Structure Set and every CT image that structure set lists for its series, and it is then planned at
once; otherwise it waits until it is *stable*: no new instance for ``scheduler.stable_age_s``, the
StableAge of Orthanc. A study arriving over several associations is one study):

* a stable study holding an RT Structure Set whose Frame of Reference is that of a CT series in
  the study becomes a PENDING job over that CT series + the structure set (the newest structure set
  when there are several). The CT series is chosen here, once, by the rule of
  :func:`core.request.choose_ct_series`; the worker hands the choice to the loader as a
  :class:`core.request.CaseRequest` and the loader plans on it. Several candidates and nothing to
  tell them apart (a CBCT or a second reconstruction of the same scan) make a FAILED job: the
  structures are never planned on a CT they may not have been drawn on;
* a stable study with an RT Structure Set but no CT series, or whose structure sets reference no
  CT series' frame of reference, becomes a FAILED job whose reason says what is missing;
* a study with CT only is waited for (contouring often comes later): after
  :data:`CT_ONLY_WAIT_S` without a structure set it becomes a FAILED job saying so;
* a study that receives new instances after a job was created gets a new job with the new
  instance fingerprint (never mixed into the old one); older jobs of that study still PENDING
  become SUPERSEDED. A running job is left to finish.

Jobs are unique per (study, instance fingerprint) by a database constraint, so several ticks or
processes cannot create the same job twice. Case-level checks (slices, PTV, names) happen in the
worker and become FAILED jobs with the loader's message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from apscheduler.jobstores.base import JobLookupError  # type: ignore[import-untyped]
from apscheduler.schedulers import SchedulerNotRunningError  # type: ignore[import-untyped]
from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from appliance.config import SchedulerSettings, Settings
from core.errors import InputError
from core.request import SeriesSeen, StructureSetSeen, choose_ct_series
from storage.db import Database, record_node_event
from storage.models import Instance, Job, JobEvent, JobInstance, NodeEvent, Series, Study
from storage.states import JobState, transition, utcnow

log = logging.getLogger(__name__)

CT_ONLY_WAIT_S = 86400.0
"""How long a study holding CT but no RT Structure Set waits before it becomes a FAILED job, s."""


def fingerprint(instances: Sequence[Instance]) -> str:
    """SHA-256 over the sorted ``sop_instance_uid:sha256`` lines: the identity of an instance set."""
    lines = sorted(f"{i.sop_instance_uid}:{i.sha256}" for i in instances)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass(frozen=True)
class Decision:
    """What a stable study becomes: a job over ``instances`` (PENDING) or a FAILED job (``reason``)."""

    instances: tuple[Instance, ...]
    reason: str | None = None
    ct_series_uid: str | None = None
    rtstruct_uid: str | None = None
    wait: bool = False
    """True: not decidable yet (CT only, waiting for a structure set)."""


def decide(study: Study, instances: Sequence[Instance], series: Sequence[Series], now: dt.datetime,
           ct_only_wait_s: float = CT_ONLY_WAIT_S,
           image_refs: Callable[[Instance], set[str]] = lambda _: set()) -> Decision:
    """Decide what a stable study becomes (see the module docstring); no database access.
    ``image_refs`` gives the SOP Instance UIDs an RT Structure Set's contours reference."""
    by_series: dict[int, list[Instance]] = {}
    for inst in instances:
        if inst.modality == "CT":  # an RT Structure Set filed under a CT series UID is not a CT image
            by_series.setdefault(inst.series_id, []).append(inst)
    ct_series = [s for s in series if s.id in by_series]
    rtstructs = sorted((i for i in instances if i.modality == "RTSTRUCT"),
                       key=lambda i: (i.received_at, i.id), reverse=True)
    if not rtstructs:
        age = (now - study.first_received_at).total_seconds()
        if age < ct_only_wait_s:
            return Decision((), wait=True)
        return Decision(tuple(instances), reason=(
            f"study {study.study_uid} holds {len(ct_series)} CT series but no RT Structure Set after "
            f"{age / 3600:.1f} h; send the structure set (PTV, bladder, rectum, body) to plan it"))
    if not ct_series:
        return Decision(tuple(instances), reason=(
            f"study {study.study_uid} holds an RT Structure Set but no CT series; send the planning CT "
            "series (same Frame of Reference) and the study is planned again"))
    seen = [SeriesSeen(s.series_uid, str(by_series[s.id][0].frame_of_reference_uid),
                       frozenset(i.sop_instance_uid for i in by_series[s.id])) for s in ct_series]
    for rs in rtstructs:
        drawn_on = StructureSetSeen(rs.sop_instance_uid, frozenset({str(rs.frame_of_reference_uid)}),
                                    frozenset({rs.referenced_series_uid} if rs.referenced_series_uid else ()))
        try:
            chosen = choose_ct_series(drawn_on, seen, functools.partial(image_refs, rs), f"study {study.study_uid}")
        except InputError as exc:
            return Decision(tuple(instances), reason=str(exc))
        if chosen is None:
            continue
        ct = next(s for s in ct_series if s.series_uid == chosen.series_uid)
        return Decision((*by_series[ct.id], rs), ct_series_uid=ct.series_uid, rtstruct_uid=rs.sop_instance_uid)
    fors = sorted({str(s.frame_of_reference_uid) for s in ct_series})
    return Decision(tuple(instances), reason=(
        f"study {study.study_uid}: no RT Structure Set references the Frame of Reference of a CT series "
        f"(structure sets reference {sorted({str(r.frame_of_reference_uid) for r in rtstructs})}, "
        f"CT series have {fors}); export the structure set drawn on this CT"))


@dataclass(frozen=True)
class _ImageRefs:
    """The SOP Instance UIDs an RT Structure Set lists for its series, and those it references anywhere."""

    listed: set[str]
    anywhere: set[str]


class StudyScheduler:
    """Creates jobs from stable studies; :meth:`tick` is one pass, :meth:`start` runs it periodically.

    Parameters
    ----------
    db
        The queue database.
    settings
        The ``[scheduler]`` section: stable age and poll interval.
    data_dir
        The node's data directory (RT Structure Set files are read for their image references).
    method
        The planning method recorded in new jobs (``planning.method``).
    ct_only_wait_s
        See :data:`CT_ONLY_WAIT_S`.
    """

    def __init__(self, db: Database, settings: SchedulerSettings, *, data_dir: Path, method: str,
                 ct_only_wait_s: float = CT_ONLY_WAIT_S) -> None:
        self.db = db
        self.settings = settings
        self.data_dir = Path(data_dir)
        self.method = method
        self.ct_only_wait_s = ct_only_wait_s
        self._bg: BackgroundScheduler | None = None
        self.on_jobs: Callable[[], None] | None = None
        """Called after a pass that created PENDING or FAILED jobs (the node wakes its worker)."""
        self._ref_cache: dict[int, _ImageRefs] = {}
        """RT Structure Set instance id -> its image references; kept while its study waits."""

    @classmethod
    def for_node(cls, settings: Settings, db: Database, *, ct_only_wait_s: float = CT_ONLY_WAIT_S) -> StudyScheduler:
        """The scheduler of a node configured by ``settings``."""
        return cls(db, settings.scheduler, data_dir=settings.data_dir, method=settings.planning.method.value,
                   ct_only_wait_s=ct_only_wait_s)

    def tick(self, now: dt.datetime | None = None) -> list[int]:
        """One pass over the studies with instances not yet scheduled: the complete ones and the stable
        ones become jobs; returns new job ids."""
        now = now or utcnow()
        cutoff = now - dt.timedelta(seconds=self.settings.stable_age_s)
        with self.db.session() as s:
            waiting = s.execute(
                select(Study.id, Study.last_received_at).where(
                    (Study.scheduled_through.is_(None)) | (Study.scheduled_through < Study.last_received_at),
                ).order_by(Study.last_received_at)
            ).all()
        study_ids = [sid for sid, last in waiting if last <= cutoff or self._complete(sid)]
        if not waiting:
            self._ref_cache.clear()  # every study is scheduled: nothing read so far is needed again
        created: list[int] = []
        for sid in study_ids:
            try:
                with self.db.session() as s:
                    job_id = self._schedule_study(s, sid, now)
            except IntegrityError as exc:
                with self.db.session() as s:
                    st = s.get(Study, sid)
                    if st is None:
                        continue
                    st.scheduled_through = st.last_received_at
                    if s.scalar(select(Job.id).where(Job.study_id == sid)) is not None:
                        # Another tick or process created this (study, fingerprint) job first.
                        log.debug("study %d: job already created elsewhere", sid)
                    else:
                        record_node_event(s, "schedule_failed", (
                            f"study {st.study_uid} could not become a job ({exc.orig}); its instances are "
                            "kept: send the study again or see the node log"), level="ERROR",
                            study_uid=st.study_uid)
                continue
            if job_id is not None:
                created.append(job_id)
        return created

    def _schedule_study(self, s: Session, study_id: int, now: dt.datetime) -> int | None:
        study = s.get(Study, study_id)
        if study is None:
            return None
        series = list(s.scalars(select(Series).where(Series.study_id == study_id)))
        instances = list(s.scalars(
            select(Instance).join(Series, Series.id == Instance.series_id).where(Series.study_id == study_id)))
        d = decide(study, instances, series, now, self.ct_only_wait_s, self._image_refs)
        if d.wait:
            return None
        fp = fingerprint(d.instances)
        study.scheduled_through = study.last_received_at
        if s.scalar(select(Job.id).where(Job.study_id == study_id, Job.instance_fingerprint == fp)) is not None:
            return None
        reason = d.reason
        if reason is not None:
            refused = list(s.scalars(select(NodeEvent.message).where(
                NodeEvent.study_uid == study.study_uid, NodeEvent.kind == "instance_refused")))
            if refused:
                reason += f". {len(refused)} image(s) of this study were refused on receipt, e.g.: {refused[0]}"
        state = JobState.PENDING if reason is None else JobState.FAILED
        job = Job(study_id=study_id, study_uid=study.study_uid, instance_fingerprint=fp,
                  ct_series_uid=d.ct_series_uid, rtstruct_uid=d.rtstruct_uid, state=state,
                  method=self.method, created_at=now, updated_at=now,
                  finished_at=None if reason is None else now, failure_reason=reason)
        s.add(job)
        s.flush()
        s.add_all(JobInstance(job_id=job.id, instance_id=i.id) for i in d.instances)
        s.add(JobEvent(job_id=job.id, at=now, from_state=None, to_state=state,
                       message=reason or f"{len(d.instances)} instances, CT series {d.ct_series_uid}"))
        if state == JobState.PENDING:
            older = s.scalars(select(Job.id).where(Job.study_id == study_id, Job.id != job.id,
                                                   Job.state == JobState.PENDING))
            for old_id in list(older):
                transition(s, old_id, {JobState.PENDING}, JobState.SUPERSEDED,
                           f"superseded by job {job.id}: the study received new instances")
            log.info("job %d created for study %s: %d instances (CT series %s, RTSTRUCT %s)", job.id,
                     study.study_uid, len(d.instances), d.ct_series_uid, d.rtstruct_uid)
        else:
            log.warning("job %d created FAILED for study %s: %s", job.id, study.study_uid, reason)
        return job.id

    def _complete(self, study_id: int) -> bool:
        """Whether a study holds an RT Structure Set and every CT image its referenced series lists
        (RTReferencedSeriesSequence > ContourImageSequence): then it is planned at once, without waiting
        ``scheduler.stable_age_s``. A structure set that lists no images leaves the study to the quiet
        period (contour-level references alone do not say how far the CT extends)."""
        with self.db.session() as s:
            rows = s.execute(select(Instance.id, Instance.modality, Instance.sop_instance_uid, Instance.path)
                             .join(Series, Series.id == Instance.series_id)
                             .where(Series.study_id == study_id)).all()
        cts = {r.sop_instance_uid for r in rows if r.modality == "CT"}
        for r in sorted((r for r in rows if r.modality == "RTSTRUCT"), key=lambda r: r.id, reverse=True):
            listed = self._refs(r.id, r.path, r.sop_instance_uid).listed
            if listed and listed <= cts:
                log.info("study of RT Structure Set %s complete: all %d CT images it lists are stored",
                         r.sop_instance_uid, len(listed))
                return True
        return False

    def _image_refs(self, rtstruct: Instance) -> set[str]:
        """The CT images an RT Structure Set references anywhere (its series' list and its contours)."""
        return self._refs(rtstruct.id, rtstruct.path, rtstruct.sop_instance_uid).anywhere

    def _refs(self, instance_id: int, path: str, sop_uid: str) -> _ImageRefs:
        """An RT Structure Set's image references, read from its stored file once (files do not change)."""
        found = self._ref_cache.get(instance_id)
        if found is not None:
            return found
        import pydicom

        from appliance.dicom.rtstruct import rtstruct_image_refs, rtstruct_listed_images

        try:
            ds = pydicom.dcmread(self.data_dir / path, stop_before_pixels=True)
            found = _ImageRefs(listed=rtstruct_listed_images(ds), anywhere=rtstruct_image_refs(ds))
        except Exception as exc:  # a damaged file: the loader will say so; here it references nothing
            log.warning("RT Structure Set %s cannot be read for its image references: %s", sop_uid, exc)
            found = _ImageRefs(listed=set(), anywhere=set())
        self._ref_cache[instance_id] = found
        return found

    def start(self, extra: Sequence[tuple[str, object]] = ()) -> None:
        """Run :meth:`tick` (and each ``(name, callable)`` in ``extra``) every poll interval in a
        background thread (APScheduler; one run at a time per callable, missed runs coalesced)."""
        interval = self.settings.poll_interval_s
        bg = BackgroundScheduler(timezone=dt.UTC)
        bg.add_job(self._safe_tick, "interval", seconds=interval, id="studies", max_instances=1,
                   coalesce=True, next_run_time=utcnow())
        for name, fn in extra:
            bg.add_job(fn, "interval", seconds=interval, id=name, max_instances=1, coalesce=True,
                       next_run_time=utcnow())
        bg.start()
        self._bg = bg

    def _safe_tick(self) -> None:
        try:
            created = self.tick()
        except Exception:
            log.exception("scheduler pass failed; retrying at the next poll")
            return
        if created and self.on_jobs is not None:
            self.on_jobs()

    def run_now(self, name: str = "studies") -> None:
        """Run the periodic pass ``name`` (``"studies"`` or one of ``start``'s extras) now instead of at the
        next poll (no-op before :meth:`start`); a pass already running is not run twice (the next one is
        coalesced)."""
        bg = self._bg
        if bg is not None:
            with contextlib.suppress(JobLookupError, SchedulerNotRunningError):  # stopping: nothing to run
                bg.modify_job(name, next_run_time=utcnow())

    def stop(self) -> None:
        """Stop the background thread (waits for a running pass)."""
        if self._bg is not None:
            self._bg.shutdown(wait=True)
            self._bg = None

    @property
    def running(self) -> bool:
        """Whether the background scheduler is running."""
        return self._bg is not None and bool(self._bg.running)
