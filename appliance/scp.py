"""The Storage SCP: C-ECHO, and C-STORE of CT images and RT Structure Sets into the instance store.

A C-STORE handler does four things only: check the peer and SOP class (negotiation and
``EVT_REQUESTED`` already did most of it), write the file atomically, insert its row, return a
status. It never plans. Received bytes are written as sent: the file meta pynetdicom makes for the
request (``event.file_meta``), then the dataset as the peer encoded it, never decoded and
re-encoded. Only the header is parsed (``stop_before_pixels``).

The transport (:mod:`appliance.scp_transport`) receives each dataset as it arrives, in memory up to
1 MiB and past that into an unnamed temporary file in the instance store's folder, and keeps at
most ``node.max_dataset_bytes`` of it (a larger one is refused with 0xA701 and the association goes
on); the handler takes it with :func:`~appliance.scp_transport.received_dataset`. So a large
instance goes to disk, not memory, with pynetdicom's public API only (its private switch
``STORE_RECV_CHUNKED_DATASET`` did the same before).

The statuses it answers, what it stores and the check of a received header are in
:mod:`appliance.cstore`; the transport (TLS, PDU and dataset limits) in :mod:`appliance.scp_transport`
and :mod:`appliance.scp_stream`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage, Verification  # type: ignore[attr-defined]

from appliance.config import NodeSettings, Peer, Profile, Settings, TlsSettings
from appliance.cstore import (
    CT_TRANSFER_SYNTAXES,
    STATUS_CONFLICT,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    STATUS_TOO_LARGE,
    TRANSFER_SYNTAXES,
    StoreRefusedError,
    failure_response,
    parse_header,
)
from appliance.scp_stream import ReceivedDataset
from appliance.scp_transport import NodeRequestHandler, NodeServer, TransportLimits, make_ssl_context, received_dataset
from storage.db import Database, record_node_event
from storage.instance_store import InstanceStore
from storage.instances import RegisterOutcome, classify, register_instance
from storage.states import utcnow

if TYPE_CHECKING:
    from appliance.metrics import NodeMetrics

log = logging.getLogger(__name__)

MiB = 1024 * 1024
FILE_PREAMBLE = b"\x00" * 128 + b"DICM"
"""What a DICOM file starts with, before its file meta (PS3.10 7.1)."""


@dataclass
class _AssocStats:
    calling: str
    stored: int = 0
    duplicates: int = 0
    refused: int = 0


class StorageSCP:
    """The node's Storage SCP bound to a database and an instance store.

    Parameters
    ----------
    db
        The queue database (rows are committed before Success is answered).
    store
        Where instance files go.
    node
        The ``[node]`` section: AE title, address, limits and timeouts.
    tls
        The ``[tls]`` section.
    peers
        The calling peers allowed to connect.
    profiles
        The protocol profiles: each one's called AE title is answered too.
    min_free_disk_mb
        Below this much free space in the store an instance is refused (``storage.min_free_disk_mb``).
    metrics
        Counts associations, instances, bytes and failures into it (None: nothing is counted).
    on_stored
        Called (in the association's thread) when an association that stored at least one new instance
        ends: the node runs its scheduler pass at once instead of at the next poll.
    """

    def __init__(self, db: Database, store: InstanceStore, *, node: NodeSettings, tls: TlsSettings,
                 peers: Sequence[Peer], profiles: Sequence[Profile], min_free_disk_mb: float,
                 metrics: NodeMetrics | None = None, on_stored: Callable[[], None] | None = None) -> None:
        self.node = node
        self.tls = tls
        self.profiles = tuple(profiles)
        self.min_free_disk_mb = min_free_disk_mb
        self.db = db
        self.store = store
        self.metrics = metrics
        self.on_stored = on_stored
        self._server: NodeServer | None = None
        self._stats: dict[int, _AssocStats] = {}
        self._silent: dict[int, tuple[float, str]] = {}
        """Open connections that have sent no A-ASSOCIATE-RQ yet: id -> (opened, monotonic s; peer)."""
        self._lock = threading.Lock()
        self._allowed = {(p.ae_title.strip(), p.host) for p in peers}
        self._called = {a.strip() for a in (node.ae_title, *(p.called_ae_title for p in profiles if p.called_ae_title))}

    @classmethod
    def for_node(cls, settings: Settings, db: Database, store: InstanceStore, *, metrics: NodeMetrics | None = None,
                 on_stored: Callable[[], None] | None = None) -> StorageSCP:
        """The Storage SCP of a node configured by ``settings``."""
        return cls(db, store, node=settings.node, tls=settings.tls, peers=settings.peers, profiles=settings.profiles,
                   min_free_disk_mb=settings.storage.min_free_disk_mb, metrics=metrics, on_stored=on_stored)

    # -- lifecycle ---------------------------------------------------------------------------------

    def build_ae(self) -> AE:
        """The pynetdicom AE with the node's contexts, limits and timeouts."""
        node = self.node
        ae = AE(ae_title=node.ae_title)
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage, CT_TRANSFER_SYNTAXES)
        ae.add_supported_context(RTStructureSetStorage, TRANSFER_SYNTAXES)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        return ae

    def start(self) -> tuple[str, int]:
        """Start listening (returns at once); returns the bound (address, port)."""
        node = self.node
        ae = self.build_ae()
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_STORE, self._on_store),
        ]
        # Not ae.start_server(ssl_context=...): pynetdicom would run the TLS handshake in the accept
        # loop, where one silent client stops every later association. NodeServer runs it in the
        # connection's own thread, with a timeout, and bounds what a peer can make the node read.
        server = cast(NodeServer, ae.make_server(
            (node.bind_address, node.port), evt_handlers=handlers, server_class=NodeServer,
            request_handler=NodeRequestHandler, node_tls=make_ssl_context(self.tls),
            limits=TransportLimits.of(node), dataset_folder=self.store.root,
        ))
        threading.Thread(target=server.serve_forever, name=f"scp-{node.port}", daemon=True).start()
        self._server = server
        host, port = server.server_address[:2]
        log.info("Storage SCP %s listening on %s:%d%s", node.ae_title, host, port,
                 " (TLS)" if self.tls.enabled else "")
        for p in self.profiles:
            if p.called_ae_title:
                log.info("  also answering as %s: profile %s (%g Gy in %d fractions)", p.called_ae_title, p.name,
                         p.dose_gy, p.fractions)
        return str(host), int(port)

    @property
    def port(self) -> int:
        """The port the SCP listens on (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("the SCP is not started")
        return int(self._server.server_address[1])

    @property
    def open_connections(self) -> int:
        """Connections the listener holds now: associations, and connections that have not asked for one yet
        (each takes one of the ``node.max_associations`` slots)."""
        return 0 if self._server is None else len(self._server.active_associations)

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("Storage SCP stopped")

    # -- event handlers ---------------------------------------------------------------------------

    def peer_allowed(self, calling_aet: str, address: str) -> bool:
        """Whether a calling AE title connecting from ``address`` may associate."""
        node = self.node
        if node.allow_any_calling_aet:
            return True
        for ae_title, host in self._allowed:
            if ae_title == calling_aet.strip() and (not node.check_peer_host or not host or host == address):
                return True
        return False

    def _on_conn_open(self, event: evt.Event) -> None:
        with self._lock:
            address = getattr(event, "address", None) or ("?", 0)
            self._silent[id(event.assoc)] = (time.monotonic(), f"{address[0]}:{address[1]}")

    def _on_conn_close(self, event: evt.Event) -> None:
        with self._lock:
            silent = self._silent.pop(id(event.assoc), None)
        if silent is not None:
            log.warning("connection from %s closed after %.1f s without an association request; while open it "
                        "held one of the node.max_associations = %d slots", silent[1], time.monotonic() - silent[0],
                        self.node.max_associations)

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejection: more associations than ``node.max_associations``."""
        if self.metrics is not None:
            self.metrics.association_rejected("local_limit")
        active = [a for a in event.assoc.ae.active_associations if a.is_acceptor]
        with self._lock:
            waiting = sum(1 for a in active if id(a) in self._silent)
        log.warning("association from AE %r at %s rejected (local limit exceeded): node.max_associations = %d "
                    "reached with %d connections open, %d of them without an association request (a peer "
                    "holding idle connections locks others out for up to node.acse_timeout_s = %g s)",
                    str(event.assoc.requestor.ae_title).strip(), event.assoc.requestor.address,
                    self.node.max_associations, len(active), waiting, self.node.acse_timeout_s)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            self._silent.pop(id(assoc), None)
        calling = str(cast(A_ASSOCIATE, assoc.requestor.primitive).calling_ae_title).strip()
        address = str(assoc.requestor.address)
        called = str(cast(A_ASSOCIATE, assoc.requestor.primitive).called_ae_title).strip()
        if not self.peer_allowed(calling, address):
            log.warning("association from AE %r at %s rejected: not in [[peers]]%s", calling, address,
                        " (address checked)" if self.node.check_peer_host else "")
            # A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognised.
            if self.metrics is not None:
                self.metrics.association_rejected("calling_ae_not_allowed")
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.kill()
        elif called not in self._called:
            log.warning("association from AE %r at %s to AE %r rejected: this node answers as %s "
                        "(node.ae_title and the profiles' called_ae_title)", calling, address, called,
                        sorted(self._called))
            # A-ASSOCIATE-RJ: rejected-permanent, service-user, called AE title not recognised.
            if self.metrics is not None:
                self.metrics.association_rejected("called_ae_unknown")
            assoc.acse.send_reject(0x01, 0x01, 0x07)
            assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            self._stats[id(assoc)] = _AssocStats(str(assoc.requestor.ae_title).strip())
        if self.metrics is not None:
            self.metrics.association_accepted()
        log.info("association from AE %r at %s:%s accepted", str(assoc.requestor.ae_title).strip(),
                 assoc.requestor.address, assoc.requestor.port)

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            st = self._stats.pop(id(event.assoc), None)
        if st is not None:
            how = "released" if event.event is evt.EVT_RELEASED else "aborted"
            log.info("association from AE %r %s: %d instance(s) stored, %d duplicate(s), %d refused",
                     st.calling, how, st.stored, st.duplicates, st.refused)
            if st.stored and self.on_stored is not None:
                try:
                    self.on_stored()
                except Exception:  # a failed hand-off only delays scheduling to the next poll
                    log.exception("could not start the scheduler pass after the association")

    def _count(self, event: evt.Event, field: str) -> None:
        with self._lock:
            st = self._stats.get(id(event.assoc))
            if st is not None:
                setattr(st, field, getattr(st, field) + 1)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        req = cast(C_STORE, event.request)
        calling = str(event.assoc.requestor.ae_title).strip()
        called = str(cast(A_ASSOCIATE, event.assoc.requestor.primitive).called_ae_title).strip()
        sop_uid = str(req.AffectedSOPInstanceUID)
        try:
            outcome = self.store_instance(event, calling, called)
        except StoreRefusedError as exc:
            self._count(event, "refused")
            if self.metrics is not None:
                self.metrics.store_failed(exc.status)
            log.warning("C-STORE of %s from AE %r refused (0x%04X): %s", sop_uid[:64], calling, exc.status, exc)
            if exc.study_uid:
                with contextlib.suppress(Exception), self.db.session() as s:
                    record_node_event(s, "instance_refused", str(exc), study_uid=exc.study_uid[:64],
                                      sop_instance_uid=sop_uid[:64])
            return failure_response(exc.status, exc.comment)
        except Exception as exc:
            self._count(event, "refused")
            if self.metrics is not None:
                self.metrics.store_failed(STATUS_PROCESSING_FAILURE)
            log.exception("C-STORE of %s from AE %r failed while storing", sop_uid[:64], calling)
            return failure_response(STATUS_PROCESSING_FAILURE, f"node error while storing: {type(exc).__name__}")
        if outcome == RegisterOutcome.CONFLICT:
            self._count(event, "refused")
            if self.metrics is not None:
                self.metrics.store_failed(STATUS_CONFLICT)
            return failure_response(STATUS_CONFLICT, "same SOP Instance UID already stored with other content")
        self._count(event, "stored" if outcome == RegisterOutcome.NEW else "duplicates")
        return STATUS_SUCCESS

    # -- the store itself -------------------------------------------------------------------------

    def store_instance(self, event: evt.Event, calling: str, called: str | None = None) -> RegisterOutcome:
        """Write one received instance and its row; see :mod:`appliance.cstore` for the statuses.

        Raises
        ------
        StoreRefusedError
            When the instance is refused (the status to answer is on the exception).
        """
        req = cast(C_STORE, event.request)
        with contextlib.closing(received_dataset(event.assoc, req.MessageID)) as dataset:
            return self._store(req, dataset, FILE_PREAMBLE + encode_file_meta(event.file_meta), calling, called)

    def _store(self, req: C_STORE, dataset: ReceivedDataset, head: bytes, calling: str,
               called: str | None) -> RegisterOutcome:
        """:meth:`store_instance` of a received ``dataset``, whose file will start with ``head``."""
        expected_class = str(req.AffectedSOPClassUID)
        expected_uid = str(req.AffectedSOPInstanceUID)
        free_mb = shutil.disk_usage(self.store.root).free / MiB
        if free_mb < self.min_free_disk_mb:
            raise StoreRefusedError(STATUS_OUT_OF_RESOURCES,
                               f"only {free_mb:.0f} MiB free in {self.store.root} "
                               f"(storage.min_free_disk_mb = {self.min_free_disk_mb})")
        size = len(head) + dataset.size
        if size > self.node.max_dataset_bytes:
            raise StoreRefusedError(STATUS_TOO_LARGE, f"dataset of {size} bytes exceeds node.max_dataset_bytes = "
                                                 f"{self.node.max_dataset_bytes}")
        if dataset.error is not None:  # it could not be kept while it arrived
            if dataset.error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreRefusedError(STATUS_OUT_OF_RESOURCES, f"no space left in {self.store.root} while "
                                        f"receiving {expected_uid}: {dataset.error.strerror}") from dataset.error
            raise dataset.error
        with dataset.open(head) as fp:
            hdr = parse_header(fp, expected_class=expected_class, expected_uid=expected_uid)
        rel = self.store.relative_path(hdr.study_uid, hdr.series_uid, hdr.sop_instance_uid)
        try:
            written = self.store.write_temp(rel, dataset.chunks(head))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk filled up under the free-space check
                raise StoreRefusedError(STATUS_OUT_OF_RESOURCES, f"no space left in {self.store.root} while "
                                        f"writing {hdr.sop_instance_uid}: {exc.strerror}") from exc
            raise
        renamed = False
        try:
            with self.db.session() as s:
                outcome = classify(s, hdr.sop_instance_uid, written.sha256)
                if outcome == RegisterOutcome.NEW:
                    self.store.commit(written)
                    renamed = True
                register_instance(s, hdr, path=rel, size_bytes=written.size_bytes, sha256=written.sha256,
                                  calling_ae_title=calling, called_ae_title=called, received_at=utcnow())
        except BaseException:
            if renamed:  # the row did not commit: the file must not stay without it
                written.final_path.unlink(missing_ok=True)
            raise
        finally:
            self.store.discard(written)  # no-op after a successful rename
        if self.metrics is not None and outcome != RegisterOutcome.CONFLICT:
            self.metrics.instance_received(hdr.modality, "stored" if outcome == RegisterOutcome.NEW else "duplicate",
                                           written.size_bytes)
        if outcome == RegisterOutcome.NEW:
            log.debug("stored %s %s of study %s from AE %r", hdr.modality, hdr.sop_instance_uid, hdr.study_uid, calling)
        elif outcome == RegisterOutcome.DUPLICATE:
            log.info("duplicate %s %s from AE %r: already stored, answered Success", hdr.modality,
                     hdr.sop_instance_uid, calling)
        return outcome

