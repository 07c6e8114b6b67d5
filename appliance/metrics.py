"""The node's Prometheus metrics: counters of what happened, and gauges read from the queue at scrape time.

Library: ``prometheus_client`` (the Prometheus authors' Python client), with a
:class:`~prometheus_client.CollectorRegistry` of the node's own, never the process-global one,
so that two nodes in one process (tests) count separately.

Two kinds of metric
-------------------
* **Counters** (since the process started; a restart begins again at 0, which Prometheus'
  ``rate()`` and ``increase()`` handle): DICOM associations accepted and rejected by reason,
  instances and bytes received, C-STORE failures by status, delivery attempts, planning
  processes by outcome, HTTP requests. The Storage SCP, the delivery loop and the worker count
  into a :class:`NodeMetrics` they are given (none given: nothing is counted).
* **Queue gauges** (:class:`QueueCollector`), read from the database at each scrape, so that they
  hold for every process sharing the queue and survive restarts: jobs and deliveries by state,
  the age of the oldest pending job, a histogram of the planning time of every succeeded job
  (``timings.plan_process_s``), the free space of the data directory.

Metric names and labels are listed in ``docs/CONFORMANCE.md`` (section "HTTP").
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from storage.db import Database
from storage.models import Delivery, Job
from storage.states import DeliveryState, JobState, utcnow

log = logging.getLogger(__name__)

REJECT_CALLING_AE = "calling_ae_not_allowed"
"""Association rejected: the calling AE title (or its address) is not in ``[[peers]]``."""
REJECT_CALLED_AE = "called_ae_unknown"
"""Association rejected: the called AE title is neither ``node.ae_title`` nor a profile's."""
REJECT_LOCAL_LIMIT = "local_limit"
"""Association rejected: ``node.max_associations`` reached."""
REJECT_REASONS = (REJECT_CALLING_AE, REJECT_CALLED_AE, REJECT_LOCAL_LIMIT)

MODALITIES = ("CT", "RTSTRUCT")
"""What the SCP stores (``appliance.cstore.STORAGE_SOP_CLASSES``)."""
STORE_FAILURE_STATUSES = (0xA700, 0xA701, 0xA900, 0xC210, 0xC211, 0xC212, 0xC213, 0xC214)
"""The failure statuses the SCP answers (``appliance.scp``), shown at 0 before they first happen."""
PLAN_OUTCOMES = ("ok", "failed", "crashed", "timeout", "cancelled", "stopping")
"""How a planning process ends (``appliance.worker.Worker._run_child``)."""

PLANNING_BUCKETS_S = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
"""Upper bounds of the planning-time histogram, s (the default ``worker.plan_timeout_s`` is 1800 s)."""


def status_label(status: int) -> str:
    """A C-STORE status as the label value used in metrics, e.g. ``0xA700``."""
    return f"0x{status:04X}"


class QueueCollector(Collector):
    """Gauges read from the queue database and the data directory at scrape time.

    A database that cannot be read does not fail the scrape: ``airt_database_up`` is 0 and the
    queue gauges are left out (the error is logged).

    Parameters
    ----------
    db
        The queue database.
    data_dir
        The data directory (its file system's free space is reported).
    """

    def __init__(self, db: Database, data_dir: Path) -> None:
        self.db = db
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._plan_s: dict[int, tuple[Any, float | None]] = {}
        """Succeeded job id -> (its finished_at, its planning time, s): timings are read once per job."""

    def collect(self) -> Iterable[Metric]:
        """The gauges (called by the registry at each scrape)."""
        yield from self._disk()
        try:
            queue = list(self._queue())
        except Exception as exc:  # any driver error: report it as a gauge, keep the scrape working
            log.warning("metrics: cannot read the queue database: %s", exc)
            yield GaugeMetricFamily("airt_database_up", "Whether the queue database could be read at this scrape",
                                    value=0)
            return
        yield GaugeMetricFamily("airt_database_up", "Whether the queue database could be read at this scrape",
                                value=1)
        yield from queue

    def _disk(self) -> Iterator[Metric]:
        with contextlib.suppress(OSError):
            yield GaugeMetricFamily("airt_data_free_bytes", "Free space of the file system of storage.data_dir",
                                    value=shutil.disk_usage(self.data_dir).free)

    def _queue(self) -> Iterator[Metric]:
        now = utcnow()
        with self.db.session() as s:
            jobs = {st: int(n) for st, n in s.execute(select(Job.state, func.count()).group_by(Job.state))}
            deliveries = {st: int(n) for st, n in s.execute(select(Delivery.state, func.count()).group_by(Delivery.state))}
            oldest = s.scalar(select(func.min(Job.updated_at)).where(Job.state == JobState.PENDING))
            plan_s = self._planning_times(s)
        g = GaugeMetricFamily("airt_jobs", "Jobs in the queue by state", labels=["state"])
        for st in JobState:
            g.add_metric([st.value], float(jobs.get(st, 0)))
        yield g
        g = GaugeMetricFamily("airt_deliveries", "Deliveries (one job's results to one destination) by state",
                              labels=["state"])
        for ds in DeliveryState:
            g.add_metric([ds.value], float(deliveries.get(ds, 0)))
        yield g
        age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        yield GaugeMetricFamily("airt_oldest_pending_job_age_seconds",
                                "Seconds since the oldest PENDING job was queued (0: none pending)", value=age)
        counts = [sum(1 for v in plan_s if v <= b) for b in PLANNING_BUCKETS_S]
        yield HistogramMetricFamily(
            "airt_planning_seconds", "Wall time of the planning process of every SUCCEEDED job (timings.plan_process_s)",
            buckets=[*((f"{b:g}", float(c)) for b, c in zip(PLANNING_BUCKETS_S, counts)), ("+Inf", float(len(plan_s)))],
            sum_value=float(sum(plan_s)))

    def _planning_times(self, s: Any) -> list[float]:
        """Planning time of every SUCCEEDED job; each job's timings JSON is read once (then cached)."""
        rows = s.execute(select(Job.id, Job.finished_at).where(Job.state == JobState.SUCCEEDED)).all()
        with self._lock:
            missing = object()
            todo = [r.id for r in rows if self._plan_s.get(r.id, (missing,))[0] != r.finished_at]
            for chunk in _batched(todo, 500):
                q = select(Job.id, Job.finished_at, Job.timings).where(Job.id.in_(chunk))
                for job_id, finished, timings in s.execute(q):
                    v = (timings or {}).get("plan_process_s") if isinstance(timings, dict) else None
                    self._plan_s[job_id] = (finished, float(v) if isinstance(v, int | float) else None)
            return [v for r in rows if (v := self._plan_s.get(r.id, (None, None))[1]) is not None]


def _batched(items: list[int], n: int) -> Iterator[tuple[int, ...]]:
    """``items`` in tuples of ``n`` (``itertools.batched`` is Python 3.12+)."""
    for i in range(0, len(items), n):
        yield tuple(items[i:i + n])


class NodeMetrics:
    """The node's metrics in a registry of its own.

    Parameters
    ----------
    db, data_dir
        With a database, the queue gauges (:class:`QueueCollector`) are part of every scrape.
    """

    def __init__(self, db: Database | None = None, data_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.associations_accepted = Counter(
            "airt_dicom_associations_accepted", "DICOM associations accepted by the Storage SCP", registry=r)
        self.associations_rejected = Counter(
            "airt_dicom_associations_rejected", "DICOM associations rejected by the Storage SCP, by reason",
            ["reason"], registry=r)
        self.instances_received = Counter(
            "airt_dicom_instances_received", "Instances received and answered Success, by modality and outcome "
            "(stored: new; duplicate: same UID and bytes already stored)", ["modality", "outcome"], registry=r)
        self.bytes_received = Counter(
            "airt_dicom_received_bytes", "Bytes of the instances received and answered Success, by modality",
            ["modality"], registry=r)
        self.store_failures = Counter(
            "airt_dicom_store_failures", "C-STORE requests answered with a failure status, by status",
            ["status"], registry=r)
        self.delivery_attempts = Counter(
            "airt_delivery_attempts", "Tries to send a job's results to a destination, by destination and outcome",
            ["destination", "outcome"], registry=r)
        self.planning_processes = Counter(
            "airt_planning_processes", "Planning processes run by this node's worker, by outcome",
            ["outcome"], registry=r)
        self.http_requests = Counter(
            "airt_http_requests", "Requests to the HTTP endpoint, by route and status code", ["route", "code"],
            registry=r)
        for reason in REJECT_REASONS:
            self.associations_rejected.labels(reason=reason)
        for m in MODALITIES:
            self.bytes_received.labels(modality=m)
            for outcome in ("stored", "duplicate"):
                self.instances_received.labels(modality=m, outcome=outcome)
        for status in STORE_FAILURE_STATUSES:
            self.store_failures.labels(status=status_label(status))
        for outcome in PLAN_OUTCOMES:
            self.planning_processes.labels(outcome=outcome)
        self.queue: QueueCollector | None = None
        if db is not None:
            self.queue = QueueCollector(db, data_dir or Path("."))
            r.register(self.queue)

    # -- counting (called by the SCP, the delivery loop, the worker and the HTTP server) ---------------

    def association_accepted(self) -> None:
        """One association accepted."""
        self.associations_accepted.inc()

    def association_rejected(self, reason: str) -> None:
        """One association rejected; ``reason`` is one of :data:`REJECT_REASONS`."""
        self.associations_rejected.labels(reason=reason).inc()

    def instance_received(self, modality: str, outcome: str, size_bytes: int) -> None:
        """One instance answered Success (``outcome`` stored or duplicate) of ``size_bytes``."""
        self.instances_received.labels(modality=modality, outcome=outcome).inc()
        self.bytes_received.labels(modality=modality).inc(size_bytes)

    def store_failed(self, status: int) -> None:
        """One C-STORE answered with failure ``status``."""
        self.store_failures.labels(status=status_label(status)).inc()

    def delivery_attempt(self, destination: str, delivered: bool) -> None:
        """One try to send a job's results to ``destination``."""
        self.delivery_attempts.labels(destination=destination, outcome="delivered" if delivered else "failed").inc()

    def planning_process(self, outcome: str) -> None:
        """One planning process ended with ``outcome`` (see :data:`PLAN_OUTCOMES`)."""
        self.planning_processes.labels(outcome=outcome).inc()

    def http_request(self, route: str, code: int) -> None:
        """One HTTP request answered."""
        self.http_requests.labels(route=route, code=str(code)).inc()

    # -- exposition --------------------------------------------------------------------------------

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The metrics as (body, content type): the Prometheus text format, or OpenMetrics when the
        ``Accept`` header asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
