"""What a peer sends to the Storage SCP, handed to pynetdicom one whole, checked PDU at a time, with
each DIMSE message's dataset taken out as it arrives (:class:`PduStream`).

pynetdicom reads a PDU as long as its header announces (up to 4 GiB) and keeps a C-STORE's whole
dataset in memory before the handler sees it. :class:`PduStream` reads the connection instead:

- a PDU longer than its limit closes the connection before its body is read;
- the dataset fragments of each DIMSE message go, as received, into a :class:`ReceivedDataset`
  (memory up to 1 MiB, then an unnamed temporary file, so nothing is left behind if the process
  dies) and reach pynetdicom empty: the message keeps its command and its fragments' headers, not
  its dataset bytes. Past its limit a dataset is counted, not kept. The C-STORE handler takes it by
  the message's MessageID.

:mod:`appliance.scp_transport` puts a :class:`PduStream` on every connection of the SCP.
"""

from __future__ import annotations

import io
import logging
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IN_MEMORY_DATASET_BYTES = 1024 * 1024
"""A received dataset stays in memory up to this size, bytes (a 512 x 512 CT slice is 0.5 MB), then
goes to a temporary file."""
COPY_CHUNK_BYTES = 1024 * 1024
"""Read size when a received dataset is copied out, bytes."""

PDU_HEADER = 6
"""Bytes of a PDU header: type, reserved, length (4 bytes, big endian)."""
P_DATA_TF = 0x04
"""PDU type of P-DATA-TF (PS3.8 9.3.5): presentation data value items, each a command or dataset fragment."""
MESSAGE_ID = (0x0000, 0x0110)
"""(group, element) of MessageID in a command set (implicit VR little endian, PS3.7 E.1)."""
COMMAND_KEPT_BYTES = 65536
"""Bytes of a command set kept to find its MessageID (a command set is a few hundred bytes)."""


class ReceivedDataset:
    """The dataset of one DIMSE message as the peer encoded it: in memory up to
    :data:`IN_MEMORY_DATASET_BYTES`, then in an unnamed temporary file in ``folder``; past
    ``max_bytes`` only counted. Close it when done.

    Attributes
    ----------
    message_id
        MessageID of the command it belongs to (None when the command had none).
    size
        Bytes the peer sent.
    error
        Why the bytes could not be kept (a full disk), or None.
    """

    def __init__(self, message_id: int | None, folder: Path, max_bytes: int) -> None:
        self.message_id = message_id
        self.size = 0
        self.error: OSError | None = None
        self._max = max_bytes
        # Lives as long as this object, which close() ends.
        self._file = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY_DATASET_BYTES, dir=str(folder))  # noqa: SIM115

    @property
    def complete(self) -> bool:
        """Whether every byte the peer sent is kept."""
        return self.error is None and self.size <= self._max

    def write(self, fragment: bytes | memoryview) -> None:
        """Append a fragment (counted always, kept while :attr:`complete`)."""
        self.size += len(fragment)
        if self.complete:
            try:
                self._file.write(fragment)
            except OSError as exc:  # the disk is full: the handler answers for it
                self.error = exc

    def open(self, head: bytes) -> io.BufferedReader:
        """``head`` (preamble and file meta) then the dataset, as one read-only seekable file."""
        return io.BufferedReader(_HeadThenFile(head, self._file, self.size))

    def chunks(self, head: bytes) -> Iterator[bytes]:
        """``head`` then the dataset, in chunks."""
        yield head
        self._file.seek(0)
        while chunk := self._file.read(COPY_CHUNK_BYTES):
            yield chunk

    def close(self) -> None:
        """Drop the bytes (the temporary file goes with them)."""
        self._file.close()


class _HeadThenFile(io.RawIOBase):
    """A few bytes followed by the content of a file, read-only and seekable (what pydicom reads)."""

    name = "received dataset"
    """What pydicom calls the file in its messages."""

    def __init__(self, head: bytes, tail: Any, tail_size: int) -> None:
        super().__init__()
        self._head, self._tail = head, tail
        self._size = len(head) + tail_size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), max(0, self._size - self._pos))
        if self._pos < len(self._head):
            n = min(n, len(self._head) - self._pos)
            view[:n] = self._head[self._pos:self._pos + n]
        elif n:
            self._tail.seek(self._pos - len(self._head))
            n = self._tail.readinto(view[:n])
        self._pos += n
        return n


def _message_id(command: bytes | bytearray) -> int | None:
    """MessageID of an encoded command set, or None."""
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, pos)
        if (group, element) == MESSAGE_ID and length == 2:
            return int.from_bytes(command[pos + 8:pos + 10], "little")
        pos += 8 + length
    return None


class PduStream:
    """The bytes a peer sends, handed on one whole, checked PDU at a time, with the datasets taken out
    (see the module docstring). Read by the association's reactor thread; :meth:`take` is called
    from its handler's thread.

    Parameters
    ----------
    read_into
        Reads from the connection into a buffer and returns the count, 0 at its end (``socket.recv_into``).
    peer
        The peer's address, for the log.
    max_pdu_bytes
        Longest PDU read, bytes (a longer one closes the connection).
    max_dataset_bytes
        Dataset bytes of one message kept.
    folder
        Where datasets too large for memory go (unnamed temporary files).
    """

    def __init__(self, read_into: Callable[[memoryview], int], peer: str, *, max_pdu_bytes: int,
                 max_dataset_bytes: int, folder: Path) -> None:
        self._read_into = read_into
        self._peer = peer
        self._max_pdu = max_pdu_bytes
        self._max_dataset = max_dataset_bytes
        self._folder = folder
        self._pdu = memoryview(b"")
        self._command = bytearray()
        self._message_id: int | None = None
        self._dataset: ReceivedDataset | None = None
        """The dataset being received."""
        self._received: deque[ReceivedDataset] = deque()
        """Datasets whose last fragment arrived, oldest first (taken by the handler's thread)."""

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes of the current PDU; the next PDU is read whole when the last is used up.

        Raises
        ------
        OSError
            When a PDU is longer than the limit, or the connection's reads fail (``TimeoutError``
            when the peer stops sending); pynetdicom then closes the association.
        """
        if not self._pdu:
            self._pdu = memoryview(self._next_pdu())
        chunk, self._pdu = self._pdu[:bufsize], self._pdu[bufsize:]
        return bytes(chunk)

    def take(self, message_id: int | None) -> ReceivedDataset:
        """The dataset of message ``message_id`` (older ones nobody took are dropped).

        Raises
        ------
        LookupError
            When no dataset of that message was received.
        """
        while self._received:
            dataset = self._received.popleft()
            if dataset.message_id == message_id:
                return dataset
            dataset.close()
        raise LookupError(f"no dataset of message {message_id} was received from {self._peer}")

    def _read(self, n: int) -> bytearray:
        """``n`` bytes, or fewer when the peer closes the connection first."""
        buf = bytearray(n)
        got = 0
        with memoryview(buf) as view:
            while got < n and (k := self._read_into(view[got:])):
                got += k
        del buf[got:]
        return buf

    def _next_pdu(self) -> bytearray:
        header = self._read(PDU_HEADER)
        if len(header) < PDU_HEADER:
            return header  # the connection ended; pynetdicom sees a short read
        length = int.from_bytes(header[2:6], "big")
        if length > self._max_pdu:
            log.warning("peer %s announced a PDU of %d bytes (limit %d, node.max_pdu_bytes); closing the "
                        "connection", self._peer, length, self._max_pdu)
            raise OSError(f"PDU of {length} bytes exceeds the limit of {self._max_pdu}")
        body = self._read(length)
        if header[0] == P_DATA_TF and len(body) == length:
            body = self._take_datasets(body)
            header[2:6] = len(body).to_bytes(4, "big")
        header += body
        return header

    def _take_datasets(self, body: bytearray) -> bytearray:
        """A P-DATA-TF body with its dataset fragments moved into :class:`ReceivedDataset` and left
        empty (malformed items are left for pynetdicom to refuse)."""
        out = bytearray()
        pos = 0
        with memoryview(body) as view:
            while pos + 6 <= len(body):
                item_len = int.from_bytes(body[pos:pos + 4], "big")  # context ID + control header + fragment
                end = pos + 4 + item_len
                if item_len < 2 or end > len(body):
                    return body
                control = body[pos + 5]
                if control & 0x01:  # a command fragment
                    if len(self._command) < COMMAND_KEPT_BYTES:
                        self._command += view[pos + 6:end]
                    out += view[pos:end]
                    if control & 0x02:  # the command's last fragment: a new message
                        self._message_id, self._command = _message_id(self._command), bytearray()
                        if self._dataset is not None:  # a dataset that never ended
                            self._dataset.close()
                            self._dataset = None
                else:
                    if self._dataset is None:
                        self._dataset = ReceivedDataset(self._message_id, self._folder, self._max_dataset)
                    self._dataset.write(view[pos + 6:end])
                    out += b"\x00\x00\x00\x02" + body[pos + 4:pos + 6]  # context ID, control header
                    if control & 0x02:  # the dataset's last fragment
                        self._received.append(self._dataset)
                        self._dataset = None
                pos = end
        out += body[pos:]
        return out
