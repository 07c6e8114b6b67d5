"""The on-disk store of received instances: ``DATA_DIR/instances/<study>/<series>/<sop>.dcm``.

Files are written atomically: the bytes go to a temporary file in the destination folder
(``.<name>.tmp-<random>``), which is fsynced, renamed over the final name and the folder fsynced,
so a crash leaves either the whole file or a temporary file that :meth:`InstanceStore.sweep_temp_files`
removes at the next start. Path components are UIDs checked by the caller (digits and dots only).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
COPY_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class WrittenFile:
    """A file written by :meth:`InstanceStore.write_temp`, not yet at its final name."""

    temp_path: Path
    final_path: Path
    size_bytes: int
    sha256: str


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceStore:
    """Files of received instances under ``data_dir/instances`` and quarantined ones under
    ``data_dir/quarantine``.

    Parameters
    ----------
    data_dir
        The node's data directory; created if missing.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "instances"
        self.quarantine_dir = self.data_dir / "quarantine"
        self.root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Path of an instance relative to the data directory (UIDs must already be validated)."""
        for part in (study_uid, series_uid, sop_uid):
            if not part or "/" in part or part.startswith(".") or "\x00" in part:
                raise ValueError(f"{part!r} cannot be a path component")
        return f"instances/{study_uid}/{series_uid}/{sop_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        """The absolute path of a stored relative path."""
        return self.data_dir / relative

    def write_temp(self, relative: str, chunks: Iterable[bytes]) -> WrittenFile:
        """Write ``chunks`` to a temporary file beside ``relative`` and fsync it.

        Returns the temporary file with its size and SHA-256; :meth:`commit` renames it into place,
        :meth:`discard` removes it.
        """
        final = self.absolute(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}{TMP_MARK}{secrets.token_hex(6)}")
        digest = hashlib.sha256()
        size = 0
        try:
            with tmp.open("xb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return WrittenFile(tmp, final, size, digest.hexdigest())

    @staticmethod
    def commit(written: WrittenFile) -> None:
        """Rename the temporary file over its final name and fsync the folder."""
        os.replace(written.temp_path, written.final_path)
        fsync_dir(written.final_path.parent)

    @staticmethod
    def discard(written: WrittenFile) -> None:
        """Remove the temporary file (a refused or duplicate instance)."""
        written.temp_path.unlink(missing_ok=True)

    def sweep_temp_files(self) -> list[Path]:
        """Remove temporary files left by a crash mid-write; returns what was removed."""
        removed = []
        for p in self.root.rglob(f".*{TMP_MARK}*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
        for p in removed:
            log.info("removed temporary file %s left by an interrupted write", p)
        return removed

    def iter_files(self) -> Iterator[str]:
        """Relative paths of every stored instance file (temporary files excluded)."""
        for p in sorted(self.root.rglob("*.dcm")):
            if p.is_file() and TMP_MARK not in p.name:
                yield p.relative_to(self.data_dir).as_posix()

    def quarantine(self, relative: str, why: str) -> Path:
        """Move a file that cannot be registered to ``data_dir/quarantine`` (kept for a person)."""
        src = self.absolute(relative)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dst = self.quarantine_dir / f"{secrets.token_hex(4)}-{src.name}"
        shutil.move(src, dst)
        (dst.parent / (dst.name + ".why.txt")).write_text(f"{relative}: {why}\n", encoding="utf-8")
        return dst


def sha256_file(path: Path) -> tuple[int, str]:
    """Size in bytes and SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def read_chunks(fh: BinaryIO, chunk_bytes: int = COPY_CHUNK_BYTES) -> Iterator[bytes]:
    """The rest of an open binary file, in chunks."""
    while chunk := fh.read(chunk_bytes):
        yield chunk
