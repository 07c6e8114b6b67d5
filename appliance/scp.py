"""The Storage SCP: C-ECHO, and C-STORE of CT images and RT Structure Sets into the instance store.

A C-STORE handler does four things only: check the peer and SOP class (negotiation and
``EVT_REQUESTED`` already did most of it), write the file atomically, insert its row, return a
status. It never plans. Received bytes are written as sent (file meta + dataset, never decoded
and re-encoded); with ``pynetdicom._config.STORE_RECV_CHUNKED_DATASET`` the dataset arrives in a
temporary file, so large instances go to disk, not memory. Only the header is parsed
(``stop_before_pixels``).

C-STORE statuses the node answers
---------------------------------
========  ====================================================================================
0x0000    Success: the file is on disk (fsynced, renamed) and its row committed; also for an
          exact duplicate (same SOP Instance UID, same bytes).
0xA700    Out of resources: free disk below ``storage.min_free_disk_mb``, or the disk filled up
          while the file was written (nothing of it remains).
0xA701    Out of resources: the dataset is larger than ``node.max_dataset_bytes``.
0xA900    Dataset does not match SOP class: SOP Class/Instance UID in the dataset differ from
          the C-STORE request.
0xC210    Cannot understand: the dataset cannot be parsed, or required attributes are missing.
0xC211    Cannot understand: a UID (study, series, SOP instance, frame of reference) is not a
          valid UID; nothing is written (UIDs become file names only after validation).
0xC212    Refused: an instance with this SOP Instance UID but different content is already
          stored. The first version is kept and a ``node_events`` row records the conflict.
          (A failure, not a warning: a warning would tell the sender the data was stored.)
0xC213    Processing failure: the node could not write the file or the row (see its log).
0xC214    Refused: a lossy-compressed CT image (JPEG Baseline/Extended, JPEG-LS near-lossless,
          lossy JPEG 2000, or LossyImageCompression = 01); a ``node_events`` row lets the
          study's job say why its CT is missing.
========  ====================================================================================

Every failure status carries an ErrorComment (64 characters) saying why. CT images are accepted
uncompressed and losslessly compressed (JPEG Lossless, JPEG-LS lossless, JPEG 2000 lossless, RLE);
they are stored as sent and decoded when the case is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from appliance.config import Settings
from appliance.dicom.ct_pixels import LOSSLESS_SYNTAXES, LOSSY_SYNTAXES, lossy_reason
from appliance.dicom.uids import check_uid
from core.errors import AirtError, InputError
from storage.db import Database, record_node_event
from storage.instance_store import InstanceStore, read_chunks
from storage.instances import InstanceHeader, RegisterOutcome, classify, register_instance
from storage.states import utcnow

if TYPE_CHECKING:
    from appliance.metrics import NodeMetrics

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_TOO_LARGE = 0xA701
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_INVALID_UID = 0xC211
STATUS_CONFLICT = 0xC212
STATUS_PROCESSING_FAILURE = 0xC213
STATUS_LOSSY_REFUSED = 0xC214

TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
"""Transfer syntaxes accepted for storage (listed explicitly, not 'everything pydicom knows')."""
CT_TRANSFER_SYNTAXES = [*TRANSFER_SYNTAXES, *LOSSLESS_SYNTAXES, *LOSSY_SYNTAXES]
"""A CT is also accepted losslessly compressed (decoded at planning, same HU), and lossy-compressed
syntaxes are accepted in negotiation so that each such image is refused with the reason (0xC214 and
an ErrorComment the sender shows, a node event the job's failure reason repeats) instead of a
silent 'no presentation context'."""

STORAGE_SOP_CLASSES = {str(CTImageStorage): "CT", str(RTStructureSetStorage): "RTSTRUCT"}
"""SOP classes accepted for storage -> the modality the node files them under."""

MiB = 1024 * 1024


class StoreRefusedError(AirtError):
    """An instance was refused; ``status`` is the C-STORE status to answer. With ``study_uid`` the
    refusal is also a ``node_events`` row, so that the study's job can say why an image is missing."""

    def __init__(self, status: int, message: str, study_uid: str | None = None, comment: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.study_uid = study_uid
        self.comment = comment or message
        """The ErrorComment answered (64 characters): the reason first."""


def _failure(status: int, comment: str) -> Dataset:
    """A C-STORE failure response: the status and an ErrorComment (LO, 64 characters) the sender shows."""
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = "".join(c if c.isprintable() and c != "\\" else " " for c in comment)[:64]
    return rsp


def _first(ds: Dataset, *path: str) -> Any:
    """Follow ``Seq, Seq, ..., Attribute`` through the first item of each sequence (None if absent)."""
    cur: Any = ds
    for name in path[:-1]:
        seq = getattr(cur, name, None)
        if not seq:
            return None
        cur = seq[0]
    return getattr(cur, path[-1], None)


def parse_header(source: Path | bytes, *, expected_class: str, expected_uid: str) -> InstanceHeader:
    """Parse and validate the header of a received instance (DICOM file format, with file meta).

    Parameters
    ----------
    source
        A file path or the encoded bytes (preamble, file meta, dataset).
    expected_class, expected_uid
        AffectedSOPClassUID and AffectedSOPInstanceUID of the C-STORE request.

    Raises
    ------
    StoreRefusedError
        With the status to answer (0xC210, 0xC211 or 0xA900) and a message naming the attribute.
    """
    try:
        fp: Any = io.BytesIO(source) if isinstance(source, bytes) else source
        ds = dcmread(fp, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        sop_class = str(ds.SOPClassUID)
        sop_uid = ds.SOPInstanceUID
        study_uid, series_uid = ds.StudyInstanceUID, ds.SeriesInstanceUID
        modality = STORAGE_SOP_CLASSES.get(sop_class)
        lossy = None
        if modality == "CT":
            for_uid = ds.FrameOfReferenceUID
            ref_series = None
            lossy = lossy_reason(ts, ds.get("LossyImageCompression"))
        else:
            for_uid = _first(ds, "ReferencedFrameOfReferenceSequence", "FrameOfReferenceUID")
            if for_uid is None:  # the sequence is Type 3; every ROI names its frame (Type 1)
                for_uid = _first(ds, "StructureSetROISequence", "ReferencedFrameOfReferenceUID")
            ref_series = _first(ds, "ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence",
                                "RTReferencedSeriesSequence", "SeriesInstanceUID")
    except Exception as exc:  # corrupt input makes pydicom raise many types (struct.error, ...: fuzzing)
        raise StoreRefusedError(STATUS_CANNOT_UNDERSTAND,
                           f"instance {expected_uid}: cannot parse the dataset: {exc}") from exc
    if sop_class != expected_class or str(sop_uid) != expected_uid:
        raise StoreRefusedError(STATUS_DATASET_MISMATCH,
                           f"dataset SOP Class/Instance UID {sop_class}/{sop_uid} differ from the C-STORE "
                           f"request's {expected_class}/{expected_uid}")
    if modality is None:
        raise StoreRefusedError(STATUS_DATASET_MISMATCH, f"SOP class {sop_class} is not stored by this node")
    if lossy is not None:
        raise StoreRefusedError(
            STATUS_LOSSY_REFUSED, f"CT image {sop_uid} refused: {lossy}; lossy-compressed CT is not planned "
            "on (its values are not the scanner's HU). Send the original or a lossless copy",
            study_uid=str(study_uid), comment=f"lossy CT refused ({lossy.split(' (')[0].split(' is ')[-1]}); send lossless")
    try:
        hdr = InstanceHeader(
            study_uid=check_uid(study_uid, "StudyInstanceUID"),
            series_uid=check_uid(series_uid, "SeriesInstanceUID"),
            sop_instance_uid=check_uid(sop_uid, "SOPInstanceUID"),
            sop_class_uid=sop_class,
            modality=modality,
            transfer_syntax_uid=check_uid(ts, "TransferSyntaxUID"),
            frame_of_reference_uid=None if for_uid is None else check_uid(for_uid, "FrameOfReferenceUID"),
            referenced_series_uid=None if ref_series is None else check_uid(ref_series, "referenced SeriesInstanceUID"),
        )
    except InputError as exc:
        raise StoreRefusedError(STATUS_INVALID_UID, str(exc)) from exc
    return hdr


MIN_PDU_READ_BYTES = 65536
"""Smallest limit on the PDU length a peer may announce, bytes: an A-ASSOCIATE-RQ with many
presentation contexts may exceed a small ``node.max_pdu_bytes``; a P-DATA-TF may not."""


class _BoundedAssociationSocket(AssociationSocket):
    """An acceptor socket that refuses to read a PDU longer than the server's ``max_pdu_read`` (pynetdicom
    would buffer whatever length a peer announces, up to 4 GiB, in memory) and that gives up on a peer
    that stops sending in the middle of a PDU after ``read_timeout_s``. Either closes the connection
    (the DUL sees a transport error), so one peer cannot exhaust memory or hold an association slot."""

    max_read: int = 0
    read_timeout_s: float = 60.0

    def recv(self, nr_bytes: int) -> bytearray:
        if self.max_read and nr_bytes > self.max_read:
            log.warning("peer %s announced a PDU of %d bytes (limit %d, node.max_pdu_bytes); closing the "
                        "connection", self._assoc.requestor.address, nr_bytes, self.max_read)
            raise OSError(f"PDU of {nr_bytes} bytes exceeds the limit of {self.max_read}")
        if self.socket is not None:
            self.socket.settimeout(self.read_timeout_s)
        return super().recv(nr_bytes)


class _NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's TLS handling and read limits (see :class:`_NodeRequestHandler`)."""

    node_tls: ssl.SSLContext | None = None
    handshake_timeout_s: float = 30.0
    read_timeout_s: float = 60.0
    max_pdu_read: int = 0


class _NodeRequestHandler(RequestHandler):
    """Handles one connection in its own thread: the TLS handshake first (bounded by the ACSE
    timeout; a failed handshake closes the connection and is logged), then pynetdicom's association
    on a :class:`_BoundedAssociationSocket`."""

    server: _NodeServer

    def handle(self) -> None:
        tls = self.server.node_tls
        if tls is not None:
            raw = cast(Any, self.request)
            try:
                raw.settimeout(self.server.handshake_timeout_s)
                self.request = tls.wrap_socket(raw, server_side=True)
            except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
                log.warning("TLS handshake with %s failed: %s", self.client_address[0], exc)
                raw.close()
                return
        super().handle()

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        sock = cast(Any, assoc.dul.socket)
        # Same object, narrower class: only recv() differs (pynetdicom builds the socket inline).
        sock.__class__ = _BoundedAssociationSocket
        sock.max_read = self.server.max_pdu_read
        sock.read_timeout_s = self.server.read_timeout_s
        return assoc


@dataclass
class _AssocStats:
    calling: str
    stored: int = 0
    duplicates: int = 0
    refused: int = 0


def make_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server-side TLS context from ``[tls]``, or None when TLS is off."""
    tls = settings.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_file)
    ctx.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class StorageSCP:
    """The node's Storage SCP bound to a database and an instance store.

    Parameters
    ----------
    settings
        ``node``, ``peers``, ``tls`` and ``storage`` are used.
    db
        The queue database (rows are committed before Success is answered).
    store
        Where instance files go.
    metrics
        Counts associations, instances, bytes and failures into it (None: nothing is counted).
    """

    def __init__(self, settings: Settings, db: Database, store: InstanceStore,
                 metrics: NodeMetrics | None = None) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.metrics = metrics
        self._server: ThreadedAssociationServer | None = None
        self._prev_chunked = False
        self._stats: dict[int, _AssocStats] = {}
        self._silent: dict[int, tuple[float, str]] = {}
        """Open connections that have sent no A-ASSOCIATE-RQ yet: id -> (opened, monotonic s; peer)."""
        self._lock = threading.Lock()
        self._allowed = {(p.ae_title.strip(), p.host) for p in settings.peers}
        self._called = {a.strip() for a in settings.called_ae_titles}

    # -- lifecycle ---------------------------------------------------------------------------------

    def build_ae(self) -> AE:
        """The pynetdicom AE with the node's contexts, limits and timeouts."""
        node = self.settings.node
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
        # Receive C-STORE data into a temporary file instead of memory (process-wide switch,
        # set while the SCP runs and restored by stop()).
        self._prev_chunked = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = True
        node = self.settings.node
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
        # loop, where one silent client stops every later association. _NodeServer runs it in the
        # connection's own thread, with a timeout, and bounds what a peer can make the node read.
        server = cast(_NodeServer, ae.make_server(
            (node.bind_address, node.port), evt_handlers=handlers, server_class=_NodeServer,
            request_handler=_NodeRequestHandler,
        ))
        server.node_tls = make_ssl_context(self.settings)
        server.handshake_timeout_s = node.acse_timeout_s
        server.read_timeout_s = node.network_timeout_s
        server.max_pdu_read = max(node.max_pdu_bytes, MIN_PDU_READ_BYTES)
        ae._servers.append(server)  # as start_server does: server.shutdown() removes it again
        threading.Thread(target=server.serve_forever, name=f"scp-{node.port}", daemon=True).start()
        self._server = server
        host, port = server.server_address[:2]
        log.info("Storage SCP %s listening on %s:%d%s", node.ae_title, host, port,
                 " (TLS)" if self.settings.tls.enabled else "")
        for p in self.settings.profiles:
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

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            _config.STORE_RECV_CHUNKED_DATASET = self._prev_chunked
            log.info("Storage SCP stopped")

    # -- event handlers ---------------------------------------------------------------------------

    def peer_allowed(self, calling_aet: str, address: str) -> bool:
        """Whether a calling AE title connecting from ``address`` may associate."""
        node = self.settings.node
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
                        self.settings.node.max_associations)

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
                    self.settings.node.max_associations, len(active), waiting, self.settings.node.acse_timeout_s)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            self._silent.pop(id(assoc), None)
        calling = str(cast(A_ASSOCIATE, assoc.requestor.primitive).calling_ae_title).strip()
        address = str(assoc.requestor.address)
        called = str(cast(A_ASSOCIATE, assoc.requestor.primitive).called_ae_title).strip()
        if not self.peer_allowed(calling, address):
            log.warning("association from AE %r at %s rejected: not in [[peers]]%s", calling, address,
                        " (address checked)" if self.settings.node.check_peer_host else "")
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
            return _failure(exc.status, exc.comment)
        except Exception as exc:
            self._count(event, "refused")
            if self.metrics is not None:
                self.metrics.store_failed(STATUS_PROCESSING_FAILURE)
            log.exception("C-STORE of %s from AE %r failed while storing", sop_uid[:64], calling)
            return _failure(STATUS_PROCESSING_FAILURE, f"node error while storing: {type(exc).__name__}")
        if outcome == RegisterOutcome.CONFLICT:
            self._count(event, "refused")
            if self.metrics is not None:
                self.metrics.store_failed(STATUS_CONFLICT)
            return _failure(STATUS_CONFLICT, "same SOP Instance UID already stored with other content")
        self._count(event, "stored" if outcome == RegisterOutcome.NEW else "duplicates")
        return STATUS_SUCCESS

    # -- the store itself -------------------------------------------------------------------------

    def store_instance(self, event: evt.Event, calling: str, called: str | None = None) -> RegisterOutcome:
        """Write one received instance and its row; see the module docstring for the statuses.

        Raises
        ------
        StoreRefusedError
            When the instance is refused (the status to answer is on the exception).
        """
        req = cast(C_STORE, event.request)
        expected_class = str(req.AffectedSOPClassUID)
        expected_uid = str(req.AffectedSOPInstanceUID)
        free_mb = shutil.disk_usage(self.store.root).free / MiB
        if free_mb < self.settings.storage.min_free_disk_mb:
            raise StoreRefusedError(STATUS_OUT_OF_RESOURCES,
                               f"only {free_mb:.0f} MiB free in {self.store.root} "
                               f"(storage.min_free_disk_mb = {self.settings.storage.min_free_disk_mb})")
        source: Path | bytes
        try:
            source = Path(event.dataset_path)
            size = source.stat().st_size
        except AttributeError:  # chunked receive off: the bytes are in memory
            source = event.encoded_dataset()
            size = len(source)
        if size > self.settings.node.max_dataset_bytes:
            raise StoreRefusedError(STATUS_TOO_LARGE, f"dataset of {size} bytes exceeds node.max_dataset_bytes = "
                                                 f"{self.settings.node.max_dataset_bytes}")
        hdr = parse_header(source, expected_class=expected_class, expected_uid=expected_uid)
        rel = self.store.relative_path(hdr.study_uid, hdr.series_uid, hdr.sop_instance_uid)
        try:
            written = self.store.write_temp(rel, _chunks(source))
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


def _chunks(source: Path | bytes) -> Iterator[bytes]:
    if isinstance(source, bytes):
        yield source
        return
    with source.open("rb") as fh:
        yield from read_chunks(cast(BinaryIO, fh))
