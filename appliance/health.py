"""Readiness of the node: the checks behind ``GET /readyz``.

A node is ready when it can take a study and do something with it:

``scp_listening``
    the Storage SCP is started and has its listening socket;
``database_writable``
    a real write to the queue database succeeds: a ``node_events`` row is inserted in a transaction
    that is then rolled back (SQLite takes its write lock, ``BEGIN IMMEDIATE``; a read-only file,
    a full disk or a PostgreSQL standby fail here);
``free_disk``
    the data directory's file system has at least ``storage.min_free_disk_mb`` free (below it the
    SCP answers Out of Resources);
``scheduler_running``, ``worker_alive``
    (the node passes these) the scheduler's thread runs, and the worker thread is alive when
    ``worker.enabled``.

Each check gives ``ok`` and a ``detail`` in words; a check that raises counts as failed, with the
error as its detail.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from appliance.config import Settings
from appliance.scp import StorageSCP
from storage.db import Database
from storage.models import NodeEvent
from storage.states import utcnow

log = logging.getLogger(__name__)

MiB = 1024 * 1024


@dataclass(frozen=True)
class Check:
    """The result of one readiness check."""

    ok: bool
    detail: str


class Readiness:
    """The readiness checks of a node.

    Parameters
    ----------
    db
        The queue database (written to and rolled back at each check).
    scp
        The Storage SCP whose listening is checked (None: the check fails, "no SCP").
    data_dir
        The data directory whose free space is checked.
    min_free_disk_mb
        The free space below which the node is not ready (``storage.min_free_disk_mb``).
    parts
        Further checks by name: a callable telling whether a part (thread) is alive, e.g.
        ``{"worker_alive": thread.is_alive}``.
    """

    def __init__(self, db: Database, scp: StorageSCP | None, *, data_dir: Path, min_free_disk_mb: float,
                 parts: Mapping[str, Callable[[], bool]] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.min_free_disk_mb = min_free_disk_mb
        self.db = db
        self.scp = scp
        self.parts = dict(parts or {})

    @classmethod
    def for_node(cls, settings: Settings, db: Database, scp: StorageSCP | None,
                 parts: Mapping[str, Callable[[], bool]] | None = None) -> Readiness:
        """The readiness checks of a node configured by ``settings``."""
        return cls(db, scp, data_dir=settings.data_dir, min_free_disk_mb=settings.storage.min_free_disk_mb,
                   parts=parts)

    def check(self) -> dict[str, Check]:
        """Run every check (each guarded: an exception fails that check with the error)."""
        checks: dict[str, Callable[[], Check]] = {
            "scp_listening": self._scp,
            "database_writable": self._database,
            "free_disk": self._disk,
        }
        for name, alive in self.parts.items():
            checks[name] = functools.partial(_part, name, alive)
        out: dict[str, Check] = {}
        for name, fn in checks.items():
            try:
                out[name] = fn()
            except Exception as exc:  # a failed check must answer, not raise
                out[name] = Check(False, f"{type(exc).__name__}: {exc}")
        for name, c in out.items():
            if not c.ok:
                log.warning("readiness: %s failing: %s", name, c.detail)
        return out

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the JSON body of /readyz): ``{"ready", "failing": [names], "checks": {name: {ok, detail}}}``."""
        checks = self.check()
        failing = [n for n, c in checks.items() if not c.ok]
        return not failing, {"ready": not failing, "failing": failing,
                             "checks": {n: asdict(c) for n, c in checks.items()}}

    def _scp(self) -> Check:
        if self.scp is None:
            return Check(False, "no Storage SCP in this process")
        try:
            port = self.scp.port
        except RuntimeError:
            return Check(False, "the Storage SCP is not listening (stopped or not started)")
        return Check(True, f"listening on {self.scp.node.bind_address}:{port}")

    def _database(self) -> Check:
        with self.db.engine.connect() as conn:
            trans = conn.begin()
            try:
                conn.execute(insert(NodeEvent).values(at=utcnow(), kind="readiness_probe", level="DEBUG",
                                                      message="readiness probe (rolled back)"))
            finally:
                trans.rollback()
        return Check(True, f"{self.db.engine.dialect.name}: write and roll back succeeded")

    def _disk(self) -> Check:
        free_mb = shutil.disk_usage(self.data_dir).free / MiB
        floor = self.min_free_disk_mb
        if free_mb < floor:
            return Check(False, f"only {free_mb:.0f} MiB free in {self.data_dir} (storage.min_free_disk_mb = "
                                f"{floor}); C-STOREs are refused until space is freed")
        return Check(True, f"{free_mb:.0f} MiB free (floor {floor} MiB)")


def _part(name: str, alive: Callable[[], bool]) -> Check:
    """A part's check: its thread is alive, or it stopped."""
    if alive():
        return Check(True, "running")
    return Check(False, f"the {name.rsplit('_', 1)[0]} thread stopped; see the node log (the node needs a restart)")
