"""The planning worker: claims one job at a time and plans it in a separate process.

For each claimed job the worker links (or copies) the job's instance files into
``DATA_DIR/jobs/<id>/input``, runs ``appliance.planning.plan_folder`` in a child process
(multiprocessing *spawn*: no inherited threads or sockets) writing into ``DATA_DIR/jobs/<id>/output``,
and waits. A crash or hang of the child cannot take the node down: a child running longer than
``worker.plan_timeout_s`` is killed and the job FAILED ("plan exceeded N s"); a child that dies
without a result (segfault, out of memory) puts the job back to PENDING until
``worker.max_attempts`` starts were made. A planning error (``AirtError``) fails the job with the
planner's message. On success the job stores per-stage timings and the DVH metrics of
``metrics.json`` and gets one delivery row per configured destination, in the same transaction as
its SUCCEEDED state.

The child dies with its parent (``PR_SET_PDEATHSIG`` on Linux, plus a watch on the parent pid), so
a node killed with SIGKILL leaves no orphan writing into a job folder that recovery re-queues.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.config import P1Policy, Settings
from appliance.planning import json_default
from core.errors import AirtError
from storage.db import Database, claim_next_job
from storage.models import Delivery, Instance, Job, JobInstance
from storage.states import DeliveryState, JobState, TransitionError, transition, utcnow

if TYPE_CHECKING:
    from appliance.metrics import NodeMetrics

log = logging.getLogger(__name__)

PLAN_FUNCTION = "appliance.planning:plan_folder"
"""``module:function`` the child process calls: ``f(case_dir, out_dir, settings, *, method=None) -> dict``."""

STATE_POLL_S = 0.5
"""How often the worker checks a running job for cancellation and its child for exit, s."""


# ------------------------------------------------------------------------------------------------
# The child process


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


def plan_child(case_dir: str, out_dir: str, settings: Settings, method: str | None, result_path: str,
               parent_pid: int, plan_function: str = PLAN_FUNCTION,
               routing: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Entry point of the planning child: plan, then write ``result_path`` (JSON) atomically.

    The result is ``{"ok": true, "metrics": {...}, "plan_s": t}`` or
    ``{"ok": false, "error": message, "kind": exception class}``.
    """
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s [plan %(process)d]: %(message)s")
    for noisy in ("numba", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    result: dict[str, Any]
    try:
        module_name, func_name = plan_function.split(":")
        module = __import__(module_name, fromlist=[func_name])
        fn: Callable[..., Mapping[str, Any]] = getattr(module, func_name)
        metrics = dict(fn(Path(case_dir), Path(out_dir), settings, method=method, **(routing or {})))
        result = {"ok": True, "metrics": metrics, "plan_s": time.perf_counter() - t0}
    except AirtError as exc:
        result = {"ok": False, "error": str(exc), "kind": type(exc).__name__}
    except Exception as exc:
        result = {"ok": False, "kind": type(exc).__name__,
                  "error": f"internal error in planning ({type(exc).__name__}: {exc}); see the node log",
                  "traceback": traceback.format_exc()}
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(result, default=json_default), encoding="utf-8")
    os.replace(tmp, result_path)


# ------------------------------------------------------------------------------------------------
# Metrics summary


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def _find_role(metrics: Mapping[str, Any], role: str) -> Mapping[str, Any] | None:
    for container in (metrics, *(v for k, v in metrics.items()
                                 if isinstance(v, Mapping) and _norm(k) in ("structures", "dvh", "metrics"))):
        for k, v in container.items():
            if isinstance(v, Mapping) and _norm(k) == role:
                return v
    return None


def _find_value(table: Mapping[str, Any] | None, *names: str) -> float | None:
    if table is None:
        return None
    wanted = {_norm(n) for n in names}
    for k, v in table.items():
        if _norm(k) in wanted and isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


def summary_metrics(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The job columns shown in ``v_jobs_overview`` (PTV D98 and HI, bladder and rectum Dmean, Gy),
    found in a metrics.json by structure role and metric name whatever the exact key spelling
    (``D98_Gy``, ``D98%_Gy``, ``d98``...); None where absent."""
    ptv = _find_role(metrics, "ptv")
    return {
        "ptv_d98_gy": _find_value(ptv, "D98_Gy", "D98%_Gy", "D98", "D98pct_Gy"),
        "ptv_hi": _find_value(ptv, "HI"),
        "bladder_dmean_gy": _find_value(_find_role(metrics, "bladder"), "Dmean_Gy", "Dmean", "mean_Gy"),
        "rectum_dmean_gy": _find_value(_find_role(metrics, "rectum"), "Dmean_Gy", "Dmean", "mean_Gy"),
    }


# ------------------------------------------------------------------------------------------------
# The worker


class Worker:
    """Claims and runs planning jobs, one at a time.

    Parameters
    ----------
    settings
        ``worker``, ``planning``, ``destinations`` and ``storage`` are used; passed to the planner.
    db
        The queue database.
    name
        Recorded as ``jobs.worker``; default ``host:pid``.
    plan_function
        ``module:function`` the child calls (default :data:`PLAN_FUNCTION`).
    metrics
        Counts planning processes by outcome into it (None: nothing is counted).
    """

    def __init__(self, settings: Settings, db: Database, *, name: str | None = None,
                 plan_function: str = PLAN_FUNCTION, metrics: NodeMetrics | None = None) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.plan_function = plan_function
        self.jobs_dir = settings.data_dir / "jobs"
        self._ctx = mp.get_context("spawn")
        self._stop = threading.Event()
        self.current_job: int | None = None
        self.last_beat = time.monotonic()

    # -- loop ---------------------------------------------------------------------------------------

    def run_forever(self, wake: threading.Event | None = None) -> None:
        """Plan jobs until :meth:`stop`; sleeps ``scheduler.poll_interval_s`` (or until ``wake``) when idle."""
        log.info("worker %s started", self.name)
        while not self._stop.is_set():
            self.last_beat = time.monotonic()
            try:
                job_id = self.run_once()
            except Exception:
                log.exception("worker %s: unexpected error; continuing", self.name)
                job_id = None
            if job_id is None:
                if wake is not None:
                    wake.wait(self.settings.scheduler.poll_interval_s)
                    wake.clear()
                else:
                    self._stop.wait(self.settings.scheduler.poll_interval_s)
        log.info("worker %s stopped", self.name)

    def stop(self) -> None:
        """Ask the loop to end; a running plan is killed and its job put back to PENDING."""
        self._stop.set()

    # -- one job ------------------------------------------------------------------------------------

    def run_once(self) -> int | None:
        """Claim the oldest PENDING job and run it to a final state; returns its id, or None if idle."""
        with self.db.session() as s:
            job = claim_next_job(s, self.name)
            if job is None:
                return None
            job_id, attempts, created = job.id, job.attempts, job.created_at
            method = job.method
            rows = s.execute(select(Instance.path, Instance.called_ae_title, Instance.calling_ae_title)
                             .join(JobInstance, JobInstance.instance_id == Instance.id)
                             .where(JobInstance.job_id == job_id)).all()
        paths = [r.path for r in rows]
        # Which AE titles the study came by: they choose its protocol profile (appliance.profiles).
        routing = {"called_aets": tuple(sorted({r.called_ae_title for r in rows if r.called_ae_title})),
                   "calling_aets": tuple(sorted({r.calling_ae_title for r in rows}))}
        self.current_job = job_id
        try:
            self._run_claimed(job_id, attempts, created, method, paths, routing)
        finally:
            self.current_job = None
        return job_id

    def _fail(self, job_id: int, reason: str, timings: dict[str, Any] | None = None,
              values: dict[str, Any] | None = None) -> None:
        try:
            with self.db.session() as s:
                transition(s, job_id, {JobState.RUNNING}, JobState.FAILED, reason,
                           values={**({"timings": timings} if timings else {}), **(values or {})} or None)
        except TransitionError as exc:
            log.warning("job %d: could not record failure (%s)", job_id, exc)

    def _run_claimed(self, job_id: int, attempts: int, created: Any, method: str | None,
                     paths: list[str], routing: Mapping[str, tuple[str, ...]]) -> None:
        t_start = time.perf_counter()
        timings: dict[str, Any] = {"queue_wait_s": round((utcnow() - created).total_seconds(), 3)}
        max_attempts = self.settings.worker.max_attempts
        if attempts > max_attempts:
            self._fail(job_id, f"gave up after {attempts - 1} start(s) (worker.max_attempts = {max_attempts}); "
                               "the planning process kept stopping: see the node log, then airt jobs retry")
            return
        log.info("job %d claimed by %s (attempt %d of %d, %d instances)", job_id, self.name, attempts,
                 max_attempts, len(paths))
        job_dir = self.jobs_dir / str(job_id)
        in_dir, out_dir = job_dir / "input", job_dir / "output"
        try:
            for d in (in_dir, out_dir):
                if d.exists():
                    shutil.rmtree(d)
                d.mkdir(parents=True)
            for rel in paths:
                src = self.settings.data_dir / rel
                if not src.is_file():
                    self._fail(job_id, f"instance file {rel} of this job is missing from the data directory; "
                                       "send the study again")
                    return
                dst = in_dir / src.name
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
        except OSError as exc:
            self._fail(job_id, f"cannot prepare the job folder {job_dir}: {exc}; check disk space and permissions")
            return
        timings["inputs_s"] = round(time.perf_counter() - t_start, 3)
        outcome, detail, plan_wall = self._run_child(job_id, in_dir, out_dir, method, routing)
        timings["plan_process_s"] = round(plan_wall, 3)
        if self.metrics is not None:
            self.metrics.planning_process(outcome)
        if outcome == "ok":
            self._succeed(job_id, out_dir, detail, timings)
        elif outcome == "cancelled":
            log.info("job %d cancelled while planning; child stopped", job_id)
        elif outcome == "stopping":
            try:
                with self.db.session() as s:
                    transition(s, job_id, {JobState.RUNNING}, JobState.PENDING,
                               "node shutting down; planning interrupted, will restart",
                               values={"attempts": Job.attempts - 1, "started_at": None})
            except TransitionError as exc:
                log.warning("job %d: %s", job_id, exc)
        elif outcome == "crashed" and attempts < max_attempts:
            try:
                with self.db.session() as s:
                    transition(s, job_id, {JobState.RUNNING}, JobState.PENDING,
                               f"{detail}; retrying (attempt {attempts} of {max_attempts})",
                               values={"timings": timings})
            except TransitionError as exc:
                log.warning("job %d: %s", job_id, exc)
        else:
            self._fail(job_id, str(detail), timings)

    def _run_child(self, job_id: int, in_dir: Path, out_dir: Path, method: str | None,
                   routing: Mapping[str, tuple[str, ...]]) -> tuple[str, Any, float]:
        """Run the planning child; returns (outcome, detail, wall s) with outcome one of ok (detail:
        metrics), failed / crashed / timeout (detail: reason), cancelled, stopping."""
        result_path = in_dir.parent / "result.json"
        result_path.unlink(missing_ok=True)
        timeout = self.settings.worker.plan_timeout_s
        proc = self._ctx.Process(
            target=plan_child, name=f"plan-job-{job_id}", daemon=True,
            args=(str(in_dir), str(out_dir), self.settings, method, str(result_path), os.getpid(),
                  self.plan_function, dict(routing)))
        t0 = time.perf_counter()
        proc.start()
        log.info("job %d: planning process %s started (timeout %.0f s)", job_id, proc.pid, timeout)
        outcome = ""
        while True:
            proc.join(STATE_POLL_S)
            self.last_beat = time.monotonic()
            if proc.exitcode is not None:
                break
            if time.perf_counter() - t0 > timeout:
                outcome = "timeout"
            elif self._stop.is_set():
                outcome = "stopping"
            else:
                with self.db.session() as s:
                    state = s.scalar(select(Job.state).where(Job.id == job_id))
                if state != JobState.RUNNING:
                    outcome = "cancelled"
            if outcome:
                proc.kill()
                proc.join(10)
                break
        wall = time.perf_counter() - t0
        if outcome == "timeout":
            return outcome, (f"plan exceeded {timeout:g} s (worker.plan_timeout_s); the planning process was "
                             "stopped. Raise the timeout or check the case size"), wall
        if outcome:
            return outcome, None, wall
        if not result_path.is_file():
            return "crashed", (f"planning process exited with code {proc.exitcode} without a result "
                               "(crash or out of memory)"), wall
        result = json.loads(result_path.read_text(encoding="utf-8"))
        if not result.get("ok"):
            if result.get("traceback"):
                log.error("job %d: planning raised:\n%s", job_id, result["traceback"])
            return "failed", result.get("error") or "planning failed without a message", wall
        metrics_file = out_dir / "metrics.json"
        metrics = result.get("metrics") or {}
        if metrics_file.is_file():
            with contextlib.suppress(ValueError):
                metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        return "ok", metrics, wall

    def _succeed(self, job_id: int, out_dir: Path, metrics: dict[str, Any], timings: dict[str, Any]) -> None:
        """Record a finished plan; queue its deliveries, hold them or fail the job, as
        ``planning.when_p1_fails`` says for a plan that failed a priority-1 goal."""
        missing = [n for n in ("rtplan.dcm", "rtdose.dcm") if not (out_dir / n).is_file()]
        if missing:
            self._fail(job_id, f"planning reported success but did not write {missing} in {out_dir}", timings)
            return
        stage = (metrics.get("timings_s") or metrics.get("timings")) if isinstance(metrics, dict) else None
        if isinstance(stage, Mapping):
            timings["plan_stages_s"] = dict(stage)
        found = metrics.get("verdict")
        verdict: dict[str, Any] = found if isinstance(found, dict) else {}
        p1_failed = verdict.get("p1_met") is False
        found = metrics.get("profile")
        profile: dict[str, Any] = found if isinstance(found, dict) else {}
        policy = self.settings.planning.when_p1_fails
        values: dict[str, Any] = {"metrics": metrics, "timings": timings,
                                  "output_dir": str(out_dir.relative_to(self.settings.data_dir)),
                                  "profile": profile.get("name"), "profile_reason": profile.get("reason"),
                                  **summary_metrics(metrics)}
        if p1_failed and policy is P1Policy.FAIL:
            self._fail(job_id, f"the plan fails a priority-1 clinical goal ({verdict.get('text')}) and "
                               "planning.when_p1_fails = fail; nothing was sent. Its files are in "
                               f"{values['output_dir']}; airt jobs retry re-plans it", timings,
                       values={k: v for k, v in values.items() if k != "timings"})
            return
        held = p1_failed and policy is P1Policy.HOLD
        if held:
            values["hold_reason"] = (f"a priority-1 clinical goal failed ({verdict.get('text')}); "
                                     "planning.when_p1_fails = hold: review, then airt jobs release "
                                     f"{job_id}")
        now = utcnow()
        try:
            with self.db.session() as s:
                transition(s, job_id, {JobState.RUNNING}, JobState.SUCCEEDED,
                           f"planned in {timings['plan_process_s']:.1f} s" + ("; deliveries held" if held else ""),
                           values=values)
                if not held:
                    queue_deliveries(s, job_id, self.settings, now)
        except TransitionError as exc:
            log.warning("job %d finished planning but was moved meanwhile (%s); results kept in %s",
                        job_id, exc, out_dir)
            return
        s_m = summary_metrics(metrics)
        log.log(logging.WARNING if p1_failed else logging.INFO,
                "job %d SUCCEEDED: queue %.1f s, inputs %.2f s, planning %.1f s; profile %s; PTV D98 %s Gy, HI %s; "
                "goals: %s; %s", job_id, timings["queue_wait_s"], timings["inputs_s"], timings["plan_process_s"],
                profile.get("name", "?"), s_m["ptv_d98_gy"], s_m["ptv_hi"], verdict.get("text", "not evaluated"),
                f"deliveries HELD until airt jobs release {job_id}" if held
                else f"{len(self.settings.destinations)} delivery(ies) queued")


def queue_deliveries(session: Session, job_id: int, settings: Settings, now: Any) -> int:
    """One PENDING delivery row per configured destination for a job; returns how many."""
    for d in settings.destinations:
        session.add(Delivery(job_id=job_id, destination=d.name, ae_title=d.ae_title, host=d.host, port=d.port,
                             state=DeliveryState.PENDING, next_try_at=now, created_at=now, updated_at=now))
    return len(settings.destinations)


# ------------------------------------------------------------------------------------------------
# ``python -m appliance.worker``: a worker process without the SCP (scale-out, tests)


def main(argv: list[str] | None = None) -> int:
    """Run a worker loop against a configuration: ``python -m appliance.worker --config PATH [--once]``."""
    from appliance.config import load_settings

    parser = argparse.ArgumentParser(prog="python -m appliance.worker")
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--once", action="store_true", help="claim and run at most one job, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings(args.config)
    worker = Worker(settings, Database(settings.database_url))
    if args.once:
        job = worker.run_once()
        print(job if job is not None else "")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    worker.run_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
