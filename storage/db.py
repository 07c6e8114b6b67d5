"""Engine, sessions and schema of the queue database (SQLite by default, PostgreSQL later).

SQLite is opened in WAL mode with ``busy_timeout``, ``foreign_keys=ON`` and ``synchronous=FULL``
(a C-STORE is acknowledged only after its row is durable), set on every new connection; every
transaction starts with ``BEGIN IMMEDIATE`` so that read-then-write sequences (get-or-create,
claiming a job) are serialised between threads and processes instead of failing with
"database is locked" half way. SQL stays portable: claims use a conditional UPDATE, and
``SELECT ... FOR UPDATE SKIP LOCKED`` where the dialect supports it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ConfigError
from storage.models import Base, Job, NodeEvent
from storage.states import JobState, TransitionError, transition, utcnow

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30000
"""How long a SQLite connection waits for another writer before failing, ms."""

VIEWS: dict[str, str] = {
    "v_jobs_overview": """
        SELECT j.id AS job_id, j.study_uid, j.state, j.method, j.profile, j.profile_reason, j.hold_reason,
               j.attempts,
               j.created_at, j.started_at, j.finished_at,
               j.ptv_d98_gy, j.ptv_hi, j.bladder_dmean_gy, j.rectum_dmean_gy,
               j.failure_reason, j.output_dir,
               (SELECT COUNT(*) FROM deliveries d WHERE d.job_id = j.id AND d.state = 'DELIVERED')
                   AS deliveries_done,
               (SELECT COUNT(*) FROM deliveries d WHERE d.job_id = j.id) AS deliveries_total
        FROM jobs j""",
    "v_deliveries_pending": """
        SELECT d.id AS delivery_id, d.job_id, j.study_uid, d.destination, d.ae_title, d.host, d.port,
               d.state, d.attempts, d.next_try_at, d.last_error
        FROM deliveries d JOIN jobs j ON j.id = d.job_id
        WHERE d.state IN ('PENDING', 'SENDING')""",
    "v_studies": """
        SELECT s.study_uid, s.first_received_at, s.last_received_at,
               (SELECT COUNT(*) FROM series se WHERE se.study_id = s.id) AS n_series,
               (SELECT COUNT(*) FROM instances i JOIN series se ON se.id = i.series_id
                WHERE se.study_id = s.id) AS n_instances,
               (SELECT MAX(j.id) FROM jobs j WHERE j.study_id = s.id) AS latest_job_id
        FROM studies s""",
}
"""Read-only views for people using the sqlite3 shell (name -> SELECT)."""


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the connection settings this project relies on.

    Parameters
    ----------
    url
        SQLAlchemy URL, e.g. ``sqlite:////var/lib/airt/airt.sqlite3``.

    Raises
    ------
    ConfigError
        If the URL cannot be parsed or its driver is not installed.
    """
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000.0,
                                                      "check_same_thread": False})
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError, NoSuchModuleError, ImportError
        raise ConfigError(f"storage.database_url {url!r} cannot be used: {exc}") from exc
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself.
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""Alembic's script directory (``env.py``, ``versions/``)."""
BASELINE_REVISION = "0001"
"""The schema of databases created before migrations existed (no ``alembic_version`` table)."""
_MIGRATION_LOCK_KEY = 74110001
"""PostgreSQL advisory lock held while a node migrates, so that two hosts starting at once do not."""


def _alembic_config(conn: Any) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    return cfg


def schema_revision(engine: Engine) -> str | None:
    """The database's Alembic revision (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def init_db(engine: Engine) -> None:
    """Bring the schema to the current revision and (re)create the views. Safe to call at every start.

    A new database is created from the models and stamped with the newest revision; one created
    before migrations existed (tables but no version) is stamped with the baseline and upgraded; a
    versioned one is upgraded (Alembic, ``storage/migrations``). All in one transaction.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        current = MigrationContext.configure(conn).get_current_revision()
        cfg = _alembic_config(conn)
        if current is None and not inspect(conn).has_table("jobs"):
            Base.metadata.create_all(conn)
            command.stamp(cfg, "head")
        else:
            if current is None:
                log.warning("database has no schema version: stamping the baseline %s and upgrading",
                            BASELINE_REVISION)
                command.stamp(cfg, BASELINE_REVISION)
            command.upgrade(cfg, "head")
        for name, body in VIEWS.items():
            conn.execute(text(f"DROP VIEW IF EXISTS {name}"))
            conn.execute(text(f"CREATE VIEW {name} AS {body}"))


class Database:
    """The queue database: an engine and short transactions on it.

    Parameters
    ----------
    url
        SQLAlchemy URL (``Settings.database_url``).
    create
        Create the schema if missing (the node and the CLI do; tests may share one file).
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        if create:
            init_db(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self._sessions() as s, s.begin():
            yield s

    def dispose(self) -> None:
        """Close pooled connections (before fork, at shutdown)."""
        self.engine.dispose()


def record_node_event(
    session: Session,
    kind: str,
    message: str,
    *,
    level: str = "WARNING",
    study_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> None:
    """Append a ``node_events`` row (and log it at ``level``)."""
    session.add(NodeEvent(at=utcnow(), kind=kind, level=level, study_uid=study_uid,
                          sop_instance_uid=sop_instance_uid, message=message))
    log.log(logging.getLevelName(level), "%s: %s", kind, message)


def claim_next_job(session: Session, worker: str) -> Job | None:
    """Claim the oldest PENDING job for ``worker`` (PENDING -> RUNNING, attempts + 1).

    Two workers, threads or processes, never get the same job: the claim is the conditional
    UPDATE of :func:`storage.states.transition`; a lost race moves on to the next candidate.

    Returns
    -------
    Job or None
        The claimed job (state RUNNING), or None when nothing is pending.
    """
    for _ in range(20):
        q = select(Job.id).where(Job.state == JobState.PENDING).order_by(Job.created_at, Job.id).limit(1)
        if session.get_bind().dialect.name != "sqlite":
            q = q.with_for_update(skip_locked=True)
        job_id = session.scalar(q)
        if job_id is None:
            return None
        try:
            transition(session, job_id, {JobState.PENDING}, JobState.RUNNING, f"claimed by {worker}",
                       values={"attempts": Job.attempts + 1, "started_at": utcnow(), "worker": worker})
        except TransitionError:
            continue
        job = session.get(Job, job_id, populate_existing=True)
        return job
    return None


def count_jobs(session: Session, state: JobState) -> int:
    """Number of jobs in ``state``."""
    return int(session.scalar(select(func.count()).select_from(Job).where(Job.state == state)) or 0)
