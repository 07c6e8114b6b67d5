"""Helpers shared by the node's reliability and security tests: tiny synthetic cases, an in-process
Storage SCP, a C-STORE client that times each request, a local certificate authority (openssl CLI)
and a throw-away PostgreSQL server (Debian's binaries, run as an unprivileged user).

Everything is real: loopback associations, SQLite files, child processes. Helpers that need an
external program skip the calling test when it is absent (:func:`tests.conftest.require_tool`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage, Verification  # type: ignore[attr-defined]

from appliance.config import Settings, settings_from_dict
from appliance.scp import StorageSCP
from appliance.synth_dicom import SynthWritten, write_synth_case
from storage.db import Database
from storage.instance_store import InstanceStore
from tests.conftest import free_port, require_tool

PEER = "PUSHER"
"""Calling AE title of the test peers (on the node's allow-list)."""

TINY_PLANNING: dict[str, Any] = {"method": "optimize", "optimizer_iterations": 3, "dose_grid_mm": 8.0,
                                 "arc_optimizer_iterations": 20, "optimizer_arc_iterations": 20}
"""Planning settings that make a tiny synthetic case plan in seconds (quality irrelevant)."""


def tiny_case(folder: Path, seed: int = 1, *, n_slices: int = 24) -> SynthWritten:
    """A small synthetic prostate case (``n_slices`` x 128 x 128, 3.9 mm pixels, 5 mm slices) as DICOM."""
    return write_synth_case(folder, seed, n_slices=n_slices, matrix=128, pixel_mm=3.9, slice_mm=5.0)


def case_files(w: SynthWritten) -> list[Path]:
    """The CT slices, then the RT Structure Set."""
    return [*w.ct_paths, w.rtstruct_path]


def node_table(tmp: Path, **over: Any) -> dict[str, Any]:
    """A settings table for a node in ``tmp/data`` on a free port with :data:`PEER` allowed;
    ``over`` merges into (dict values) or replaces (others) the top-level tables."""
    table: dict[str, Any] = {
        "node": {"ae_title": "AIRT", "port": free_port()},
        "peers": [{"ae_title": PEER, "host": "127.0.0.1"}],
        "storage": {"data_dir": str(tmp / "data"), "min_free_disk_mb": 1},
        "scheduler": {"stable_age_s": 0.0, "poll_interval_s": 0.2},
        "planning": dict(TINY_PLANNING),
        # No warm-up case and no memory reserve per planning process (seconds each); both have their own
        # tests (test_case_request.py).
        "worker": {"warm_up": False, "planner_reserve_mb": 0.0},
    }
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(table.get(k), dict):
            table[k] = {**table[k], **v}
        else:
            table[k] = v
    return table


def node_settings(tmp: Path, **over: Any) -> Settings:
    """:func:`node_table` parsed into :class:`Settings`."""
    return settings_from_dict(node_table(tmp, **over))


@contextlib.contextmanager
def running_scp(settings: Settings) -> Iterator[StorageSCP]:
    """A Storage SCP started in this process on ``settings`` (its database created), stopped after."""
    db = Database(settings.database_url)
    scp = StorageSCP.for_node(settings, db, InstanceStore(settings.data_dir))
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()
        db.dispose()


def client_ae(aet: str = PEER, *, timeout_s: float = 20.0, max_pdu: int = 0) -> AE:
    """A pynetdicom AE requesting CT, RT Structure Set and Verification (explicit + implicit VR LE)."""
    ae = AE(ae_title=aet)
    for c in (CTImageStorage, RTStructureSetStorage, Verification):
        ae.add_requested_context(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.maximum_pdu_size = max_pdu
    return ae


@dataclass
class StoreRun:
    """What :func:`store_paths` got back: one status per file (-1: no response) and each C-STORE's
    round-trip time, s."""

    statuses: list[int]
    latencies_s: list[float]
    established: bool


def store_paths(port: int, paths: Sequence[Path], *, aet: str = PEER, called: str = "AIRT",
                tls: tuple[ssl.SSLContext, str] | None = None, timeout_s: float = 20.0) -> StoreRun:
    """C-STORE ``paths`` over one association to ``called`` at 127.0.0.1:``port``, timing each request."""
    ae = client_ae(aet, timeout_s=timeout_s)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls)
    if not assoc.is_established:
        return StoreRun([], [], False)
    run = StoreRun([], [], True)
    try:
        for p in paths:
            t0 = time.perf_counter()
            rsp = assoc.send_c_store(p)
            run.latencies_s.append(time.perf_counter() - t0)
            run.statuses.append(int(rsp.Status) if "Status" in rsp else -1)
            if run.statuses[-1] == -1 or not assoc.is_established:
                break  # no answer: the association is gone
    finally:
        if assoc.is_established:
            assoc.release()
    return run


# ------------------------------------------------------------------------------------------------
# A local certificate authority (openssl CLI)


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a server certificate for 127.0.0.1/localhost, a client certificate
    signed by the CA, and a client certificate signed by another (untrusted) CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    exe = require_tool("openssl")
    r = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {r.stderr}")


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, crt = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(crt),
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    return crt, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, crt, extf = (folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem",
                           folder / f"{name}.ext")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(csr), cwd=folder)
    extf.write_text(ext)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-out", str(crt), "-extfile", str(extf), cwd=folder)
    return crt, key


def make_pki(folder: Path) -> Pki:
    """Generate :class:`Pki` under ``folder`` (EC P-256, valid two days)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    rogue_ca = _ca(folder, "rogue-ca")
    server = _leaf(folder, "node", ca,
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    client = _leaf(folder, "pusher", ca, "extendedKeyUsage=clientAuth\n")
    rogue = _leaf(folder, "rogue", rogue_ca, "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], server[0], server[1], client[0], client[1], rogue[0], rogue[1])


def client_tls(pki: Pki, *, cert: tuple[Path, Path] | None = None) -> tuple[ssl.SSLContext, str]:
    """``tls_args`` for pynetdicom's ``associate``: trust the test CA, present ``cert`` if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx, "127.0.0.1"


# ------------------------------------------------------------------------------------------------
# A throw-away PostgreSQL server


def postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` holding initdb and pg_ctl, if any."""
    cands = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                   if p.parent.name.isdigit() else 0)
    for b in reversed(cands):
        if (b / "initdb").exists() and (b / "pg_ctl").exists():
            return b
    return None


class PostgresServer:
    """A PostgreSQL cluster in a new temporary folder, listening on a unix socket there (no TCP port);
    :meth:`stop` removes the folder.

    initdb refuses to run as root; as root the cluster is owned by and run as the ``nobody`` user
    (hence a folder of its own under the system temporary directory: pytest's are private to root).
    """

    def __init__(self, *, database: str = "airt") -> None:
        bindir = postgres_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries are not installed (make system-deps installs postgresql)")
        self.bindir = bindir
        self.folder = Path(tempfile.mkdtemp(prefix="airt-pg-"))
        self.data = self.folder / "pgdata"
        self.sock = self.folder / "sock"
        self.port = free_port()
        self.database = database
        self.user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self._started = False

    def _run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        full = list(cmd)
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
            full = [runuser, "-u", self.user, "--", *full]
        return subprocess.run(full, capture_output=True, text=True, timeout=120, env={**os.environ, "LC_ALL": "C"})

    def start(self) -> None:
        """initdb, start, create the database; skips the test when the server cannot run here."""
        self.sock.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            uid = pwd.getpwnam(self.user).pw_uid
            for p in (self.folder, self.sock):
                os.chown(p, uid, -1)
        r = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "airt",
                      "--no-sync", "-E", "UTF8")
        if r.returncode != 0:
            pytest.skip(f"initdb failed here: {r.stderr[-400:]}")
        opts = f"-k {self.sock} -p {self.port} -c listen_addresses='' -c fsync=off -c max_connections=50"
        r = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                      str(self.folder / "pg.log"), "-w", "-t", "60", "start")
        if r.returncode != 0:
            log = (self.folder / "pg.log").read_text() if (self.folder / "pg.log").exists() else ""
            pytest.skip(f"PostgreSQL did not start: {r.stderr[-300:]} {log[-300:]}")
        self._started = True
        r = self._run(str(self.bindir / "createdb"), "-h", str(self.sock), "-p", str(self.port), "-U", "airt",
                      self.database)
        if r.returncode != 0:
            raise RuntimeError(f"createdb failed: {r.stderr}")

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver, unix socket)."""
        return f"postgresql+psycopg://airt@/{self.database}?host={self.sock}&port={self.port}"

    def stop(self) -> None:
        """Stop the server (fast shutdown)."""
        if self._started:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self._started = False
        shutil.rmtree(self.folder, ignore_errors=True)


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a child started with ``start_new_session=True`` and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(10)
