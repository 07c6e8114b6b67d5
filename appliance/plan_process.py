"""The planning process: a long-lived child of the worker that plans one case at a time.

The worker (:mod:`appliance.worker`) keeps one :class:`PlannerProcess`: a process of its own
(multiprocessing *spawn*: no inherited threads or sockets) started with the planning function the
worker was given (:class:`appliance.planning.Planner` on the node). The process imports the
planning stack once, keeps the memory a job frees for the next and numpy's huge-page advice off
(:func:`planning_memory_policy`), writes ``worker.planner_reserve_mb`` once for its first job
(:func:`reserve_memory`, skipped when a job is already waiting) and, with ``worker.warm_up``, plans a
small synthetic case while it waits for its first job (the planner's ``warm_up``: compiled kernels loaded, the model read, first-call costs
paid; skipped when a job is already waiting). It then plans the :class:`~core.request.CaseRequest` it
is sent, writes ``result.json`` atomically, ``{"ok": true, "summary": PlanSummary.to_dict(), "plan_s": t}``
or ``{"ok": false, "error": message, "kind": exception class}`` (a planning error's message is
the physicist's; any other exception is an internal error whose traceback goes to the node log),
and answers with its peak memory.

The worker kills the process at ``worker.plan_timeout_s``, on cancellation and at shutdown, and
replaces it after ``worker.planner_jobs`` jobs or when its peak memory passed
``worker.planner_max_rss_mb``; a process that died (segfault, out of memory) is replaced for the
next job. The process dies with its parent (``PR_SET_PDEATHSIG`` on Linux, plus a watch on the
parent pid), so a node killed with SIGKILL leaves no orphan writing into a job folder that recovery
re-queues.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing as mp
import os
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

from appliance.plan_summary import PlanSummary
from core.errors import AirtError
from core.request import CaseRequest

log = logging.getLogger(__name__)

WARM_UP_AFTER_IDLE_S = 3.0
"""A new planning process warms up only when no job arrived within this many seconds of its start."""


class PlanFunction(Protocol):
    """Plans one case into an output folder (RT Plan, RT Dose, metrics.json) with a method (None: the
    configured one) and returns its summary; calls ``on_deliverable(summary)`` once the RT Plan, RT
    Dose and metrics.json may be sent, when that is before it returns (report still to come). Must be
    picklable (a module-level function or an instance of a module-level class) to reach the spawned
    planning process."""

    def __call__(self, request: CaseRequest, out_dir: Path, method: str | None,
                 on_deliverable: Callable[[PlanSummary], None] | None = None) -> PlanSummary: ...


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(3)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _plan_one(plan: PlanFunction, request: CaseRequest, out_dir: Path, method: str | None,
              result_path: Path, conn: Connection) -> None:
    """Plan one case, telling the worker when it is deliverable, and write its result file atomically."""
    t0 = time.perf_counter()
    result: dict[str, Any]
    try:
        summary = plan(request, out_dir, method,
                       on_deliverable=lambda early: conn.send(("deliverable", early.to_dict())))
        if not isinstance(summary, PlanSummary):
            raise TypeError(f"the planning function returned {type(summary).__name__}, not a PlanSummary")
        result = {"ok": True, "summary": summary.to_dict(), "plan_s": time.perf_counter() - t0}
    except AirtError as exc:
        result = {"ok": False, "error": str(exc), "kind": type(exc).__name__}
    except Exception as exc:
        result = {"ok": False, "kind": type(exc).__name__,
                  "error": f"internal error in planning ({type(exc).__name__}: {exc}); see the node log",
                  "traceback": traceback.format_exc()}
    tmp = result_path.with_name(result_path.name + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, result_path)


#: glibc ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Keep the memory a job frees in this process's heap for the next job instead of returning it to the
    system (glibc: no ``mmap`` for large blocks, no trimming of the heap's top).

    A plan allocates about a gigabyte of engine buffers (ray-traced depths, depth weights and fan
    coordinates of every control point and body voxel). Returned to the system after each job, the next
    job's buffers are fresh pages whose faults cost more than the trace that fills them: engine set-up of
    the same case took 2.0-3.7 s in a process that had planned before, 1.6-1.7 s with this. The peak
    memory is unchanged (the worker still replaces the process when it passes
    ``worker.planner_max_rss_mb``). Returns whether the C library took the settings (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def no_numpy_hugepages() -> bool:
    """Stop numpy from asking the kernel for transparent huge pages on its large arrays.

    numpy advises ``MADV_HUGEPAGE`` on every array of 4 MiB or more (Linux). Where the kernel's
    ``transparent_hugepage/defrag`` is ``madvise`` (Debian's and most distributions' default), a page
    fault in such an array compacts memory on the spot to find a huge page, and the engine's gigabyte of
    ray-trace buffers then faults in slowly: ``airt plan --method ai`` took 23.0 s with the advice against
    17.9 s without it, its engine set-up 4.2-5.5 s against 1.9-2.1 s (median of 5 alternating runs,
    ``benchmarks/RESULTS.md``). The environment variable ``NUMPY_MADVISE_HUGEPAGE`` set by the
    administrator wins over this (numpy reads it as an integer, 0 = off). Returns whether numpy's advice
    is now off.
    """
    value = os.environ.get("NUMPY_MADVISE_HUGEPAGE")
    if value is not None:
        try:
            return int(value) == 0
        except ValueError:  # numpy itself refuses to import with such a value
            return False
    import numpy as np

    core = getattr(np, "_core", None) or getattr(np, "core", None)  # numpy 2 / numpy 1
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if setter is None:  # a numpy without the switch (it has had it since 1.20)
        return False
    setter(False)
    return True


def planning_memory_policy(*, numpy_hugepages: bool = False) -> bool:
    """The memory policy of a process that plans (the node's planning process, ``airt plan``, ``airt train
    --make-data``, the benchmarks that time planning): numpy's huge-page advice off
    (:func:`no_numpy_hugepages`; ``numpy_hugepages`` leaves it on, for comparisons) and the memory a job
    frees kept for the next (:func:`keep_freed_memory`, whose answer is returned)."""
    if not numpy_hugepages:
        no_numpy_hugepages()
    return keep_freed_memory()


#: Above this the C library would hand freed memory back (its trim threshold is an ``int`` of bytes): the
#: reserve stays below it.
MAX_RESERVE_MB = 1900.0


#: The reserve is written in blocks of this size, a job arriving meanwhile ending it after the block.
RESERVE_BLOCK_MB = 64


def reserve_memory(mb: float, stop: Callable[[], bool] | None = None) -> tuple[float, float]:
    """Write ``mb`` MiB once and free them, so that (with :func:`keep_freed_memory`) this process's heap holds
    them as pages already faulted in: the first job's buffers then cost what a later job's cost. The engine's
    ray trace filling fresh pages from two threads took 3.4 s against 1.5 s on pages written before (a
    170,000-voxel, 180-control-point trace). Written in blocks of :data:`RESERVE_BLOCK_MB`, ending early when
    ``stop()`` is true (a job arrived: it waits for one block at most); capped at :data:`MAX_RESERVE_MB`.
    Returns the MiB written and the seconds it took."""
    t0 = time.perf_counter()
    blocks: list[bytearray] = []
    want = min(max(mb, 0.0), MAX_RESERVE_MB)
    while len(blocks) * RESERVE_BLOCK_MB < want and not (stop is not None and stop()):
        blocks.append(bytearray(RESERVE_BLOCK_MB * 2**20))  # zero-filled: every page written
    done = float(len(blocks) * RESERVE_BLOCK_MB)
    blocks.clear()
    return done, time.perf_counter() - t0


def _peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def serve(plan: PlanFunction, conn: Connection, parent_pid: int, warm_up: bool, reserve_mb: float = 0.0) -> None:
    """Entry point of the planning process: keep freed memory and reserve ``reserve_mb`` MiB, warm up, then plan
    each ``(request, out_dir, method, result_path)`` received on ``conn`` and answer ``("done", peak MiB)``;
    ends on None or a closed pipe."""
    started = time.perf_counter()
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s [plan %(process)d]: %(message)s")
    for noisy in ("numba", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not planning_memory_policy():
        log.info("the C library keeps its own memory policy (not glibc): engine buffers are fresh pages each job")
    elif reserve_mb > 0:
        log.info("planning process reserved %.0f MiB in %.1f s", *reserve_memory(reserve_mb, lambda: conn.poll(0)))
    warm = getattr(plan, "warm_up", None)
    # Warm up only when no job came within WARM_UP_AFTER_IDLE_S of the start (the reserve included): a job
    # that is already there is planned at once (cold costs are a few seconds; the warm-up, a whole small
    # plan, costs more).
    if warm_up and callable(warm) and not conn.poll(max(0.0, WARM_UP_AFTER_IDLE_S - (time.perf_counter() - started))):
        t0 = time.perf_counter()
        try:
            warm()
            log.info("planning process warmed up in %.1f s", time.perf_counter() - t0)
        except Exception:  # a failed warm-up costs speed, not correctness: the job plans as usual
            log.exception("planning process warm-up failed; planning goes on without it")
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        request, out_dir, method, result_path = job
        _plan_one(plan, request, Path(out_dir), method, Path(result_path), conn)
        conn.send(("done", _peak_rss_mb()))


class PlannerProcess:
    """The worker's handle on its planning process (see the module docstring).

    Parameters
    ----------
    plan
        The planning function the process runs.
    warm_up
        Whether the process warms up before its first job (``worker.warm_up``).
    max_jobs
        Jobs a process plans before it is replaced (``worker.planner_jobs``).
    max_rss_mb
        Peak memory after which it is replaced (``worker.planner_max_rss_mb``).
    reserve_mb
        Memory a new process writes and keeps before its first job (``worker.planner_reserve_mb``).
    """

    def __init__(self, plan: PlanFunction, *, warm_up: bool, max_jobs: int, max_rss_mb: float,
                 reserve_mb: float = 0.0) -> None:
        self.plan = plan
        self.warm_up = warm_up
        self.max_jobs = max_jobs
        self.max_rss_mb = max_rss_mb
        self.reserve_mb = reserve_mb
        self._ctx = mp.get_context("spawn")
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self.jobs = 0
        """Jobs the current process has planned."""
        self.peak_rss_mb = 0.0
        self.deliverable: dict[str, Any] = {}
        """The summary of the last case the process said may be sent."""

    @property
    def pid(self) -> int | None:
        """The current process's pid; None when there is none."""
        return None if self._proc is None else self._proc.pid

    @property
    def exitcode(self) -> int | None:
        """The exit code of a process that ended; None while it runs (or when there is none)."""
        return None if self._proc is None else self._proc.exitcode

    def start(self) -> None:
        """Start a fresh process (it warms up in the background) unless one is running."""
        if self._proc is not None and self._proc.exitcode is None:
            return
        self.kill()
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=serve, name="planner", daemon=True,
                                 args=(self.plan, child, os.getpid(), self.warm_up, self.reserve_mb))
        proc.start()
        child.close()
        self._proc, self._conn, self.jobs, self.peak_rss_mb = proc, parent, 0, 0.0
        log.info("planning process %s started%s", proc.pid, " (warming up)" if self.warm_up else "")

    def submit(self, request: CaseRequest, out_dir: Path, method: str | None, result_path: Path) -> None:
        """Send one case to the process (started first when there is none)."""
        self.start()
        assert self._conn is not None
        self._conn.send((request, str(out_dir), method, str(result_path)))

    def wait(self, timeout_s: float) -> str | None:
        """Wait up to ``timeout_s`` for news of the case sent last: ``"deliverable"`` (its summary in
        :attr:`deliverable`), ``"done"`` (its result file written), or None (still running, or the process
        died: see :attr:`exitcode`)."""
        assert self._conn is not None and self._proc is not None
        try:
            if not self._conn.poll(timeout_s):
                return None
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            return None
        if kind == "deliverable":
            self.deliverable = value
            return "deliverable"
        self.peak_rss_mb = value
        self.jobs += 1
        return "done"

    def recycle_if_due(self) -> None:
        """Replace the process when it planned ``max_jobs`` cases or its peak memory passed ``max_rss_mb``."""
        if self._proc is None:
            return
        why = (f"{self.jobs} jobs planned" if self.jobs >= self.max_jobs else
               f"peak memory {self.peak_rss_mb:.0f} MiB > {self.max_rss_mb:g} MiB"
               if self.peak_rss_mb > self.max_rss_mb else "")
        if why:
            log.info("planning process %s replaced: %s", self._proc.pid, why)
            self.close()
            self.start()

    def kill(self) -> None:
        """Stop the process now (a running plan is lost)."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None and proc.exitcode is None:
            proc.kill()
            proc.join(10)

    def close(self) -> None:
        """Let the process end after its current case; killed if it does not within 10 s."""
        if self._conn is not None and self._proc is not None and self._proc.exitcode is None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._proc.join(10)
        self.kill()
