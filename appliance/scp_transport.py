"""The Storage SCP's transport: the server-side TLS context, and pynetdicom's threaded server with a
TLS handshake per connection and bounded PDU reads, so that one peer cannot exhaust memory or hold
an association slot."""

from __future__ import annotations

import logging
import ssl
from typing import Any, cast

from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from appliance.config import Settings

log = logging.getLogger(__name__)


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


MIN_PDU_READ_BYTES = 65536
"""Smallest limit on the PDU length a peer may announce, bytes: an A-ASSOCIATE-RQ with many
presentation contexts may exceed a small ``node.max_pdu_bytes``; a P-DATA-TF may not."""


class BoundedAssociationSocket(AssociationSocket):
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


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's TLS handling and read limits (see :class:`NodeRequestHandler`)."""

    node_tls: ssl.SSLContext | None = None
    handshake_timeout_s: float = 30.0
    read_timeout_s: float = 60.0
    max_pdu_read: int = 0


class NodeRequestHandler(RequestHandler):
    """Handles one connection in its own thread: the TLS handshake first (bounded by the ACSE
    timeout; a failed handshake closes the connection and is logged), then pynetdicom's association
    on a :class:`BoundedAssociationSocket`."""

    server: NodeServer

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
        sock.__class__ = BoundedAssociationSocket
        sock.max_read = self.server.max_pdu_read
        sock.read_timeout_s = self.server.read_timeout_s
        return assoc
