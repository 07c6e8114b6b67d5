"""The Storage SCP's transport: the server-side TLS context, and pynetdicom's threaded server with a
TLS handshake per connection and a filter on what a peer sends, so that one peer cannot exhaust
memory or hold an association slot.

pynetdicom reads every connection of a :class:`NodeServer` through a
:class:`~appliance.scp_stream.PduStream`:

- a PDU longer than ``max(node.max_pdu_bytes, 64 KiB)`` closes the connection before its body is
  read;
- a peer that stops in the middle of a PDU is dropped after ``node.network_timeout_s``;
- each DIMSE message's dataset is taken out as it arrives (memory up to 1 MiB, then an unnamed
  temporary file in the instance store's folder); past ``node.max_dataset_bytes`` it is counted,
  not kept. The C-STORE handler takes it with :func:`received_dataset` (``event.dataset`` and
  ``event.encoded_dataset()`` hold nothing on this server).

Only public API of pynetdicom is used: :meth:`pynetdicom.ae.ApplicationEntity.make_server` with a
server class and a request handler class, the connection given to the handler
(``RequestHandler.request``), the association's documented ``dul.socket.socket``, and the
documented ``ssl.SSLContext.sslsocket_class``.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from appliance.config import NodeSettings, TlsSettings
from appliance.scp_stream import PduStream, ReceivedDataset

log = logging.getLogger(__name__)

MIN_PDU_READ_BYTES = 65536
"""Smallest limit on the PDU length a peer may announce, bytes: an A-ASSOCIATE-RQ with many
presentation contexts may exceed a small ``node.max_pdu_bytes``; a P-DATA-TF may not."""


@dataclass(frozen=True)
class TransportLimits:
    """What a peer may make the node read, keep or wait for.

    Attributes
    ----------
    handshake_timeout_s
        The TLS handshake, s (``node.acse_timeout_s``).
    read_timeout_s
        Waiting for the rest of a PDU, s (``node.network_timeout_s``).
    max_pdu_bytes
        Longest PDU read, bytes (``node.max_pdu_bytes``, at least :data:`MIN_PDU_READ_BYTES`).
    max_dataset_bytes
        Dataset bytes of one message kept (``node.max_dataset_bytes``).
    """

    handshake_timeout_s: float
    read_timeout_s: float
    max_pdu_bytes: int
    max_dataset_bytes: int

    @classmethod
    def of(cls, node: NodeSettings) -> TransportLimits:
        """The limits of a node's ``[node]`` settings."""
        return cls(handshake_timeout_s=node.acse_timeout_s, read_timeout_s=node.network_timeout_s,
                   max_pdu_bytes=max(node.max_pdu_bytes, MIN_PDU_READ_BYTES),
                   max_dataset_bytes=node.max_dataset_bytes)


class _PduStreamRecv:
    """``recv`` through the socket's :class:`PduStream` (set before pynetdicom reads; ``flags`` unused)."""

    pdus: PduStream

    def recv(self, bufsize: int = 1024, flags: int = 0) -> bytes:
        return self.pdus.recv(bufsize)


class PduStreamSocket(_PduStreamRecv, socket.socket):
    """A TCP connection that pynetdicom reads through a :class:`PduStream`."""


class PduStreamSSLSocket(_PduStreamRecv, ssl.SSLSocket):
    """A TLS connection that pynetdicom reads through a :class:`PduStream` (made by the SSL context of
    :func:`make_ssl_context`, whose ``sslsocket_class`` it is)."""


def received_dataset(assoc: Association, message_id: int | None) -> ReceivedDataset:
    """The dataset of message ``message_id`` received on an association of a :class:`NodeServer`.

    Raises
    ------
    LookupError
        When none was received (or the association is not on a :class:`NodeServer`).
    """
    conn = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if not isinstance(conn, _PduStreamRecv):
        raise LookupError("the association's connection is not read through a PduStream (not a NodeServer's)")
    return conn.pdus.take(message_id)


def make_ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The server-side TLS context from ``[tls]``, or None when TLS is off."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_file)
    ctx.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.sslsocket_class = PduStreamSSLSocket
    return ctx


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's TLS handling and limits (see :class:`NodeRequestHandler`).

    Made by ``AE.make_server(..., server_class=NodeServer, request_handler=NodeRequestHandler,
    node_tls=..., limits=..., dataset_folder=...)``; the other arguments are those of
    :class:`pynetdicom.transport.AssociationServer`. Serve it with ``serve_forever`` and stop it with
    :meth:`shutdown`.
    """

    def __init__(self, *args: Any, node_tls: ssl.SSLContext | None, limits: TransportLimits,
                 dataset_folder: Path, **kwargs: Any) -> None:
        self.node_tls = node_tls
        self.limits = limits
        self.dataset_folder = dataset_folder
        super().__init__(*args, **kwargs)

    def shutdown(self) -> None:
        """Stop serving and close the listening socket.

        Not ``AssociationServer.shutdown``: that one also takes the server off the list of servers
        ``AE.start_server`` started, where a server made by ``AE.make_server`` never was.
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class NodeRequestHandler(RequestHandler):
    """Handles one connection in its own thread: the TLS handshake first (bounded by the ACSE
    timeout; a failed handshake closes the connection and is logged), then pynetdicom's association
    on the connection read through a :class:`PduStream`."""

    server: NodeServer

    def handle(self) -> None:
        raw: socket.socket = self.request
        tls, limits = self.server.node_tls, self.server.limits
        conn: socket.socket
        if tls is None:
            conn = PduStreamSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        else:
            try:
                raw.settimeout(limits.handshake_timeout_s)
                conn = tls.wrap_socket(raw, server_side=True)
            except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
                log.warning("TLS handshake with %s failed: %s", self.client_address[0], exc)
                raw.close()
                return
        if not isinstance(conn, _PduStreamRecv):
            conn.close()
            raise TypeError(f"the SCP's TLS context makes {type(conn).__name__} sockets, not "
                            "PduStreamSSLSocket: make it with appliance.scp_transport.make_ssl_context")
        conn.settimeout(limits.read_timeout_s)
        conn.pdus = PduStream(conn.recv_into, str(self.client_address[0]), max_pdu_bytes=limits.max_pdu_bytes,
                              max_dataset_bytes=limits.max_dataset_bytes, folder=self.server.dataset_folder)
        self.request = conn
        super().handle()
