"""The node as one process: recovery, Storage SCP, scheduler, worker and delivery loop.

``airt serve`` runs :class:`Node`. Start-up order: open the database, recover (below), start
the SCP, then the HTTP endpoint (``[http]``: ``/healthz``, ``/readyz``, ``/metrics`` and the job
pages, :mod:`appliance.web`), the scheduler (studies -> jobs, and the delivery loop, every
``scheduler.poll_interval_s``) and the worker thread, then ``READY=1`` to systemd. The SCP, the
delivery loop and the worker count into the node's :class:`~appliance.metrics.NodeMetrics`. The main thread feeds
the systemd watchdog (``WATCHDOG=1``) only while every part is alive. SIGTERM/SIGINT stop it
cleanly: no new associations, a running plan is interrupted and its job re-queued, ``STOPPING=1``.

Recovery on start (:func:`recover`)
-----------------------------------
* temporary files of interrupted writes are removed;
* RUNNING jobs go back to PENDING (event recorded), or to FAILED when ``worker.max_attempts``
  starts were already made; SENDING deliveries go back to PENDING (they are resent: at least once);
* instance files on disk without a row are registered again (a crash between rename and commit)
  or, when unreadable, moved to ``DATA_DIR/quarantine`` with a note; rows whose file is missing are
  logged and recorded in ``node_events``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from pydicom import dcmread
from sqlalchemy import select

from appliance.config import Settings
from appliance.cstore import StoreRefusedError, parse_header
from appliance.health import Readiness
from appliance.metrics import NodeMetrics
from appliance.scheduler import StudyScheduler
from appliance.scp import StorageSCP
from appliance.scu import Deliverer
from appliance.web import WebServer
from appliance.worker import Worker
from core.errors import ConfigError
from storage.db import Database, record_node_event
from storage.instance_store import InstanceStore, sha256_file
from storage.instances import RegisterOutcome, register_instance
from storage.models import Delivery, Instance, Job
from storage.states import DeliveryState, JobState, transition, transition_delivery, utcnow

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    """What :func:`recover` did."""

    temp_files_removed: int = 0
    jobs_requeued: list[int] = field(default_factory=list)
    jobs_failed: list[int] = field(default_factory=list)
    deliveries_requeued: int = 0
    files_registered: int = 0
    files_quarantined: int = 0
    rows_without_file: int = 0


def recover(settings: Settings, db: Database, store: InstanceStore) -> RecoveryReport:
    """Bring the database and the instance store back to a consistent state after a stop or crash.

    Run once at start-up, before the SCP and the worker start (see the module docstring).
    """
    rep = RecoveryReport(temp_files_removed=len(store.sweep_temp_files()))
    max_attempts = settings.worker.max_attempts
    with db.session() as s:
        for job_id, attempts in list(s.execute(select(Job.id, Job.attempts).where(Job.state == JobState.RUNNING))):
            if attempts >= max_attempts:
                transition(s, job_id, {JobState.RUNNING}, JobState.FAILED,
                           f"the node stopped during planning {attempts} time(s) (worker.max_attempts = "
                           f"{max_attempts}); see the node log, then airt jobs retry {job_id}")
                rep.jobs_failed.append(job_id)
            else:
                transition(s, job_id, {JobState.RUNNING}, JobState.PENDING,
                           f"node restarted while planning (attempt {attempts} of {max_attempts}); re-queued")
                rep.jobs_requeued.append(job_id)
        for (d_id,) in list(s.execute(select(Delivery.id).where(Delivery.state == DeliveryState.SENDING))):
            transition_delivery(s, d_id, {DeliveryState.SENDING}, DeliveryState.PENDING,
                                values={"next_try_at": utcnow(), "last_error": "node restarted while sending"})
            rep.deliveries_requeued += 1
        known = {str(p): int(i) for p, i in s.execute(select(Instance.path, Instance.id))}
    on_disk = set(store.iter_files())
    for rel in sorted(on_disk - set(known)):
        path = store.absolute(rel)
        try:
            sop = path.stem
            meta = dcmread(path, stop_before_pixels=True)
            hdr = parse_header(path, expected_class=str(meta.SOPClassUID), expected_uid=sop)
            if store.relative_path(hdr.study_uid, hdr.series_uid, hdr.sop_instance_uid) != rel:
                raise StoreRefusedError(0, "its UIDs do not match its place in the store")
            size, sha = sha256_file(path)
            with db.session() as s:
                out = register_instance(s, hdr, path=rel, size_bytes=size, sha256=sha,
                                        calling_ae_title="(recovered)", received_at=utcnow())
                if out == RegisterOutcome.NEW:
                    record_node_event(s, "instance_recovered", f"file {rel} had no row (interrupted store); "
                                      "registered again", level="INFO", study_uid=hdr.study_uid,
                                      sop_instance_uid=hdr.sop_instance_uid)
            if out == RegisterOutcome.NEW:
                rep.files_registered += 1
            else:
                raise StoreRefusedError(0, "another file holds this SOP Instance UID")
        except Exception as exc:  # unreadable in any way (pydicom raises many types): quarantine
            dst = store.quarantine(rel, str(exc))
            rep.files_quarantined += 1
            with db.session() as s:
                record_node_event(s, "instance_quarantined", f"file {rel} cannot be registered ({exc}); "
                                  f"moved to {dst}")
    missing = sorted(set(known) - on_disk)
    if missing:
        with db.session() as s:
            for rel in missing:
                record_node_event(s, "instance_file_missing",
                                  f"instance row {known[rel]} points to {rel}, which is missing; jobs using it "
                                  "will fail until the study is sent again", level="ERROR")
        rep.rows_without_file = len(missing)
    log.info("recovery: %d temp file(s) removed, jobs re-queued %s, jobs failed %s, %d delivery(ies) "
             "re-queued, %d file(s) re-registered, %d quarantined, %d row(s) without file",
             rep.temp_files_removed, rep.jobs_requeued, rep.jobs_failed, rep.deliveries_requeued,
             rep.files_registered, rep.files_quarantined, rep.rows_without_file)
    return rep


class _Notifier:
    """systemd notifications (no-op when not started by systemd with NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        import os

        self._n: Any = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify  # type: ignore[import-untyped]

            self._n = sdnotify.SystemdNotifier()

    def notify(self, msg: str) -> None:
        if self._n is not None:
            self._n.notify(msg)


class Node:
    """The whole node in one process.

    Parameters
    ----------
    settings
        The node's settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.database_url)
        self.store = InstanceStore(settings.data_dir)
        self.metrics = NodeMetrics(self.db, settings.data_dir)
        self.scheduler = StudyScheduler.for_node(settings, self.db)
        # Hand-offs inside the node are immediate; the poll interval is the fallback (and what other hosts
        # sharing the queue rely on): a stored study -> a scheduler pass, a new job -> the worker, queued
        # deliveries -> a delivery pass.
        self.scp = StorageSCP.for_node(settings, self.db, self.store, metrics=self.metrics,
                              on_stored=self.scheduler.run_now)
        self.deliverer = Deliverer.for_node(settings, self.db, metrics=self.metrics)
        self.worker = Worker.for_node(settings, self.db, metrics=self.metrics) if settings.worker.enabled else None
        self._worker_thread: threading.Thread | None = None
        parts: dict[str, Any] = {"scheduler_running": lambda: self.scheduler.running}
        if self.worker is not None:
            parts["worker_alive"] = lambda: self._worker_thread is not None and self._worker_thread.is_alive()
        self.readiness = Readiness.for_node(settings, self.db, self.scp, parts)
        self.http = WebServer.for_node(settings, self.db, self.metrics, self.readiness) if settings.http.enabled else None
        self._wake = threading.Event()
        self.scheduler.on_jobs = self._wake.set
        if self.worker is not None:
            self.worker.on_queued = lambda: self.scheduler.run_now("deliveries")
        self._stop = threading.Event()
        self._notifier = _Notifier()
        self.port: int | None = None

    def start(self) -> int:
        """Recover, then start every part; returns the SCP port."""
        recover(self.settings, self.db, self.store)
        _, self.port = self.scp.start()
        if self.http is not None:
            try:
                self.http.start()
            except OSError as exc:
                self.scp.stop()
                h = self.settings.http
                raise ConfigError(f"http.port {h.port}: cannot listen on {h.bind_address}:{h.port} ({exc.strerror or exc}); "
                                  "another program (or another airt node) uses it, or the address is not on this "
                                  "host: set [http] port (and bind_address) in the configuration, or "
                                  "http.enabled = false") from exc
            if self.settings.http.bind_address not in ("127.0.0.1", "::1", "localhost"):
                log.warning("the HTTP endpoint %s is reachable beyond loopback and has no authentication: put a "
                            "reverse proxy with TLS and authentication in front of it", self.http.url)
        self.scheduler.start(extra=[("deliveries", self._deliveries_tick), ("wake-worker", self._wake.set)])
        if self.worker is not None:
            self._worker_thread = threading.Thread(target=self.worker.run_forever, args=(self._wake,),
                                                   name="worker", daemon=True)
            self._worker_thread.start()
        self._notifier.notify(f"READY=1\nSTATUS=listening on port {self.port}")
        log.info("node %s ready: port %d, data in %s, %d peer(s), %d destination(s), worker %s, HTTP %s",
                 self.settings.node.ae_title, self.port, self.settings.data_dir, len(self.settings.peers),
                 len(self.settings.destinations), "on" if self.worker else "off",
                 self.http.url if self.http is not None else "off")
        return self.port

    def _deliveries_tick(self) -> None:
        try:
            self.deliverer.tick()
        except Exception:
            log.exception("delivery pass failed; retrying at the next poll")

    def healthy(self) -> bool:
        """Whether the scheduler and the worker thread are alive (fed to the systemd watchdog)."""
        if not self.scheduler.running:
            return False
        return self._worker_thread is None or self._worker_thread.is_alive()

    def stop(self) -> None:
        """Stop accepting, interrupt planning (its job re-queued) and wait for the threads."""
        self._stop.set()

    def shutdown(self) -> None:
        """Stop every part (called by :meth:`serve_forever` after :meth:`stop`)."""
        self._notifier.notify("STOPPING=1")
        log.info("node shutting down")
        self.scp.stop()
        if self.worker is not None:
            self.worker.stop()
            self._wake.set()
        self.scheduler.stop()
        if self._worker_thread is not None:
            self._worker_thread.join(timeout=30)
        if self.http is not None:
            self.http.stop()
        self.db.dispose()
        log.info("node stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`stop`); feeds the watchdog while healthy."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d received", signum)
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        try:
            while not self._stop.wait(2.0):
                if self.healthy():
                    self._notifier.notify("WATCHDOG=1")
                else:
                    log.error("a part of the node stopped (scheduler or worker); not feeding the watchdog")
        finally:
            self.shutdown()
        time.sleep(0)  # let log handlers flush
