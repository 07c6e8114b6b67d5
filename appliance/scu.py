"""Sending results: C-ECHO and C-STORE to peers, and the delivery loop with retries.

Each delivery (one job, one destination) is sent over its own association: the RT Plan first,
then the RT Dose (a TPS links a dose only to a plan it already has). Every C-STORE status is
checked; Success (0x0000) and Warning (0x0001, 0xB000-0xBFFF) count as stored. A failed
delivery stays PENDING with ``attempts``, ``last_error`` and ``next_try_at`` (exponential backoff:
``retry_initial_s * retry_factor ** (attempts - 1)``, at most ``retry_max_s``); it is marked
FAILED only when still failing ``give_up_after_s`` after the job finished. Nothing is dropped
while a destination is down.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from appliance.config import DeliverySettings, Destination, Settings, TlsSettings
from core.errors import ConfigError, ExportError
from storage.db import Database
from storage.models import Delivery, Job
from storage.states import DeliveryState, TransitionError, transition_delivery, utcnow

if TYPE_CHECKING:
    from appliance.metrics import NodeMetrics

log = logging.getLogger(__name__)

RESULT_FILES = ("rtplan.dcm", "rtdose.dcm")
"""What a delivery sends, in this order (then the same of each candidate plan, see :func:`result_files`)."""


def result_files(output_dir: Path) -> list[Path]:
    """The files a delivery of a job sends: the main plan's RT Plan and RT Dose, then those of each
    candidate plan (``candidates/<name>/``, sorted by name) that has both."""
    from appliance.planning import CANDIDATES_DIR

    files = [output_dir / n for n in RESULT_FILES]
    cand = output_dir / CANDIDATES_DIR
    if cand.is_dir():
        for sub in sorted(p for p in cand.iterdir() if p.is_dir()):
            if all((sub / n).is_file() for n in RESULT_FILES):
                files += [sub / n for n in RESULT_FILES]
    return files

PEER_RE = re.compile(r"^(?P<ae>[^@\\]{1,16})@(?P<host>\[[0-9a-fA-F:]+\]|[^:@\s]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class PeerAddress:
    """A DICOM peer to call: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_peer(text: str) -> PeerAddress:
    """Parse ``AE@HOST:PORT`` (e.g. ``TPS@10.0.0.5:104``).

    Raises
    ------
    ConfigError
        If the text is not of that form or the port is out of range.
    """
    m = PEER_RE.fullmatch(text.strip())
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise ConfigError(f"peer {text!r}: write it as AE@HOST:PORT, e.g. TPS@127.0.0.1:104")
    return PeerAddress(m["ae"].strip(), m["host"].strip("[]"), int(m["port"]))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for a peer started next: the demo, tests, benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0, proc: subprocess.Popen[bytes] | None = None,
                  host: str = "127.0.0.1") -> None:
    """Return once something accepts TCP connections on ``host:port`` (a peer or node just started).

    Raises
    ------
    RuntimeError
        ``proc`` (the process expected to listen) exited first.
    TimeoutError
        Nothing listens after ``timeout_s``.
    """
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


def is_stored(status: int) -> bool:
    """Whether a C-STORE status means the peer stored the instance (Success or Warning)."""
    return status == 0x0000 or status == 0x0001 or 0xB000 <= status <= 0xBFFF


def client_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client TLS context from ``[tls]`` (CA bundle; our certificate for mutual TLS when set)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
    if tls.cert_file and tls.key_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


def echo(peer: PeerAddress, *, calling_aet: str = "AIRT", timeout_s: float = 30.0,
         tls: ssl.SSLContext | None = None) -> int:
    """C-ECHO a peer; returns the status (0x0000 = reachable and answering).

    Raises
    ------
    ExportError
        If no association could be established (refused, unreachable, rejected).
    """
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s  # TCP connect + TLS handshake (pynetdicom: unbounded by default)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                         tls_args=(tls, peer.host) if tls else None)
    if not assoc.is_established:
        raise ExportError(f"no association with {peer}: {_why_not(assoc)}")
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else -1
    finally:
        assoc.release()


def _why_not(assoc: object) -> str:
    if getattr(assoc, "is_rejected", False):
        return "association rejected by the peer (check its AE title and its allow-list for ours)"
    if getattr(assoc, "is_aborted", False):
        return "association aborted (peer refused or closed the connection)"
    return "connection failed (is the peer running and is the address right?)"


def send_files(paths: Sequence[Path], peer: PeerAddress, *, calling_aet: str = "AIRT",
               timeout_s: float = 60.0, tls: ssl.SSLContext | None = None) -> list[tuple[Path, int]]:
    """C-STORE ``paths`` in order over one association; returns each file's status.

    Presentation contexts are proposed for each file's SOP class with its own transfer syntax
    (plus the two uncompressed little endian ones). A file whose context was not accepted gets
    status -1. Stops after the first failure status so that a dose is never sent without its plan.

    Raises
    ------
    ExportError
        If a file cannot be read or no association could be established.
    """
    metas = []
    for p in paths:
        try:
            ds = dcmread(p, stop_before_pixels=True)
            metas.append((p, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
        except Exception as exc:
            raise ExportError(f"cannot read {p} to send it: {exc}") from exc
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s  # TCP connect + TLS handshake (pynetdicom: unbounded by default)
    contexts: dict[str, list[str]] = {}
    for _, sop_class, ts in metas:
        tss = contexts.setdefault(sop_class, [])
        for t in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if t not in tss:
                tss.append(t)
    if len(contexts) > 128:
        raise ExportError(f"{len(contexts)} SOP classes in one send; at most 128 presentation contexts")
    for sop_class, tss in contexts.items():
        ae.add_requested_context(sop_class, tss)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                         tls_args=(tls, peer.host) if tls else None)
    if not assoc.is_established:
        raise ExportError(f"no association with {peer}: {_why_not(assoc)}")
    results: list[tuple[Path, int]] = []
    try:
        for msg_id, (p, _, _) in enumerate(metas, start=1):
            try:
                rsp = assoc.send_c_store(p, msg_id=msg_id)  # unique within the association (PS3.7 9.3.1)
            except ValueError as exc:  # no accepted presentation context for this file
                log.warning("cannot send %s to %s: %s", p.name, peer, exc)
                results.append((p, -1))
                break
            status = int(rsp.Status) if "Status" in rsp else -1
            results.append((p, status))
            if not is_stored(status):
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def backoff_s(attempts: int, initial_s: float, factor: float, max_s: float) -> float:
    """Wait before the next try after ``attempts`` failed tries (>= 1): initial * factor**(attempts-1), capped."""
    return float(min(max_s, initial_s * factor ** max(0, attempts - 1)))


class Deliverer:
    """Sends due deliveries; :meth:`tick` is one pass (run every poll interval by the service).

    Parameters
    ----------
    db
        The queue database.
    settings
        The ``[delivery]`` section: retries and when to give up.
    data_dir
        The node's data directory (the jobs' output folders).
    destinations
        The configured destinations (which of them use TLS).
    calling_aet
        Our calling AE title (``node.ae_title``).
    timeout_s
        DIMSE timeout of an association (``node.dimse_timeout_s``).
    tls
        The ``[tls]`` section, for destinations with ``tls = true``.
    metrics
        Counts delivery attempts into it (None: nothing is counted).
    """

    def __init__(self, db: Database, settings: DeliverySettings, *, data_dir: Path,
                 destinations: Sequence[Destination], calling_aet: str, timeout_s: float, tls: TlsSettings,
                 metrics: NodeMetrics | None = None) -> None:
        self.db = db
        self.settings = settings
        self.data_dir = Path(data_dir)
        self.destinations = tuple(destinations)
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s
        self.tls = tls
        self.metrics = metrics

    @classmethod
    def for_node(cls, settings: Settings, db: Database, metrics: NodeMetrics | None = None) -> Deliverer:
        """The deliverer of a node configured by ``settings``."""
        return cls(db, settings.delivery, data_dir=settings.data_dir, destinations=settings.destinations,
                   calling_aet=settings.node.ae_title, timeout_s=settings.node.dimse_timeout_s, tls=settings.tls,
                   metrics=metrics)

    def tick(self, now: dt.datetime | None = None) -> int:
        """Try every delivery whose ``next_try_at`` has come; returns how many were delivered."""
        now = now or utcnow()
        with self.db.session() as s:
            due = list(s.execute(
                select(Delivery.id, Delivery.job_id, Delivery.destination, Delivery.ae_title, Delivery.host,
                       Delivery.port, Delivery.attempts, Job.output_dir, Job.finished_at)
                .join(Job, Job.id == Delivery.job_id)
                .where(Delivery.state == DeliveryState.PENDING, Delivery.next_try_at <= now)
                .order_by(Delivery.next_try_at, Delivery.id)
            ))
        delivered = 0
        for row in due:
            delivered += int(self._deliver(row, now))
        return delivered

    def _deliver(self, row: Any, now: dt.datetime) -> bool:
        d_id: int = row.id
        job_id: int = row.job_id
        dest: str = row.destination
        attempts: int = row.attempts
        output_dir: str = row.output_dir
        finished: dt.datetime | None = row.finished_at
        try:
            with self.db.session() as s:
                transition_delivery(s, d_id, {DeliveryState.PENDING}, DeliveryState.SENDING,
                                    values={"attempts": Delivery.attempts + 1})
        except TransitionError:
            return False  # another loop took it
        peer = PeerAddress(row.ae_title, row.host, row.port)
        files = result_files(self.data_dir / str(output_dir))
        dest_cfg = next((x for x in self.destinations if x.name == dest), None)
        tls = client_ssl_context(self.tls) if dest_cfg is not None and dest_cfg.tls else None
        error: str | None = None
        try:
            results = send_files(files, peer, calling_aet=self.calling_aet, timeout_s=self.timeout_s, tls=tls)
            bad = [(p.name, st) for p, st in results if not is_stored(st)]
            if bad or len(results) != len(files):
                error = "; ".join(f"{n}: status 0x{st:04X}" if st >= 0 else f"{n}: no accepted context"
                                  for n, st in bad) or "not every file was sent"
        except ExportError as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("delivery %d of job %d to %s failed unexpectedly", d_id, job_id, dest)
            error = f"{type(exc).__name__}: {exc}"
        n = attempts + 1
        if self.metrics is not None:
            self.metrics.delivery_attempt(dest, error is None)
        with self.db.session() as s:
            if error is None:
                transition_delivery(s, d_id, {DeliveryState.SENDING}, DeliveryState.DELIVERED,
                                    values={"delivered_at": utcnow(), "last_error": None})
                log.info("job %d: %d file(s) (RT Plan and RT Dose of %d plan(s)) delivered to %s (%s) after "
                         "%d attempt(s)", job_id, len(files), len(files) // 2, dest, peer, n)
                return True
            cfg = self.settings
            give_up = finished is not None and (now - finished).total_seconds() > cfg.give_up_after_s
            if give_up:
                transition_delivery(s, d_id, {DeliveryState.SENDING}, DeliveryState.FAILED,
                                    values={"last_error": error})
                log.error("job %d: delivery to %s failed for good after %d attempts: %s", job_id, dest, n, error)
            else:
                wait = backoff_s(n, cfg.retry_initial_s, cfg.retry_factor, cfg.retry_max_s)
                transition_delivery(s, d_id, {DeliveryState.SENDING}, DeliveryState.PENDING,
                                    values={"last_error": error,
                                            "next_try_at": utcnow() + dt.timedelta(seconds=wait)})
                log.warning("job %d: delivery to %s failed (attempt %d): %s; next try in %.0f s", job_id, dest,
                            n, error, wait)
        return False
