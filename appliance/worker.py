"""The planning worker: claims one job at a time and plans it in a separate process.

For each claimed job the worker links (or copies) the job's instance files into
``DATA_DIR/jobs/<id>/input``, makes the :class:`~core.request.CaseRequest` of the CT series and RT
Structure Set the scheduler chose, and sends it to its long-lived planning process
(:mod:`appliance.plan_process`), which runs the planning function the worker was given (the node's
is :class:`appliance.planning.Planner`) writing into ``DATA_DIR/jobs/<id>/output``, and waits. A
crash or hang of the planning process cannot take the node down: one running longer than
``worker.plan_timeout_s`` is killed and the job FAILED ("plan exceeded N s"); one that dies
without a result (segfault, out of memory) puts the job back to PENDING until
``worker.max_attempts`` starts were made; either way a fresh process plans the next job. A planning
error (``AirtError``) fails the job with the planner's message. On success the job stores per-stage timings, the figures of the
plan's :class:`~appliance.plan_summary.PlanSummary` and its ``metrics.json``, and gets one delivery
row per configured destination, in the same transaction as its SUCCEEDED state.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from appliance.config import Destination, P1Policy, Settings, WorkerSettings
from appliance.job_inputs import ClaimedJob, job_request
from appliance.plan_process import PlanFunction, PlannerProcess
from appliance.plan_summary import PLAN_FILES, PlanSummary
from appliance.web_pages import fmt
from core.errors import PlanningError
from core.request import CaseRequest
from storage.db import Database, claim_next_job
from storage.models import Delivery, Instance, Job, JobInstance
from storage.states import DeliveryState, JobState, TransitionError, transition, utcnow

if TYPE_CHECKING:
    from appliance.metrics import NodeMetrics

log = logging.getLogger(__name__)

STATE_POLL_S = 0.5
"""How often the worker checks a running job for cancellation and its child for exit, s."""


# ------------------------------------------------------------------------------------------------
# The worker


class Worker:
    """Claims and runs planning jobs, one at a time.

    Parameters
    ----------
    db
        The queue database.
    plan
        The planning function run in the planning process (:data:`~appliance.plan_process.PlanFunction`;
        the node's is :class:`appliance.planning.Planner`).
    settings
        The ``[worker]`` section: timeout and number of starts of a planning process.
    data_dir
        The node's data directory (instance files; job folders under ``jobs/``).
    destinations
        Where a finished plan is sent: one delivery row each.
    when_p1_fails
        What happens to a plan that failed a priority-1 goal (``planning.when_p1_fails``).
    poll_interval_s
        How long the loop sleeps when no job is pending (``scheduler.poll_interval_s``).
    name
        Recorded as ``jobs.worker``; default ``host:pid``.
    metrics
        Counts planning processes by outcome into it (None: nothing is counted).
    """

    def __init__(self, db: Database, plan: PlanFunction, *, settings: WorkerSettings, data_dir: Path,
                 destinations: Sequence[Destination], when_p1_fails: P1Policy, poll_interval_s: float,
                 name: str | None = None, metrics: NodeMetrics | None = None) -> None:
        self.db = db
        self.settings = settings
        self.data_dir = Path(data_dir)
        self.destinations = tuple(destinations)
        self.when_p1_fails = when_p1_fails
        self.poll_interval_s = poll_interval_s
        self.metrics = metrics
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.jobs_dir = self.data_dir / "jobs"
        self.on_queued: Callable[[], None] | None = None
        """Called after a job's deliveries were queued (the node sends them at once instead of at the next poll)."""
        self.planner = PlannerProcess(plan, warm_up=settings.warm_up, max_jobs=settings.planner_jobs,
                                      max_rss_mb=settings.planner_max_rss_mb, reserve_mb=settings.planner_reserve_mb)
        weakref.finalize(self, self.planner.kill)  # a dropped worker leaves no planning process behind
        self._stop = threading.Event()
        self.current_job: int | None = None
        self.last_beat = time.monotonic()

    @classmethod
    def for_node(cls, settings: Settings, db: Database, *, plan: PlanFunction | None = None, name: str | None = None,
                 metrics: NodeMetrics | None = None) -> Worker:
        """The worker of a node configured by ``settings``; ``plan`` defaults to the planner
        (:class:`appliance.planning.Planner` with these settings)."""
        if plan is None:
            from appliance.planning import Planner

            plan = Planner(settings)
        return cls(db, plan, settings=settings.worker, data_dir=settings.data_dir, destinations=settings.destinations,
                   when_p1_fails=settings.planning.when_p1_fails, poll_interval_s=settings.scheduler.poll_interval_s,
                   name=name, metrics=metrics)

    # -- loop ---------------------------------------------------------------------------------------

    def run_forever(self, wake: threading.Event | None = None) -> None:
        """Plan jobs until :meth:`stop`; sleeps ``poll_interval_s`` (or until ``wake``) when idle."""
        log.info("worker %s started", self.name)
        try:
            while not self._stop.is_set():
                self.last_beat = time.monotonic()
                self.planner.start()  # warm for the next job (no-op while one runs)
                try:
                    job_id = self.run_once()
                except Exception:
                    log.exception("worker %s: unexpected error; continuing", self.name)
                    job_id = None
                if job_id is None:
                    if wake is not None:
                        wake.wait(self.poll_interval_s)
                        wake.clear()
                    else:
                        self._stop.wait(self.poll_interval_s)
        finally:
            self.planner.close()
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
            claimed = ClaimedJob(job.id, job.attempts, job.created_at, job.method, job.study_uid, job.ct_series_uid,
                               job.rtstruct_uid)
            rows = s.execute(select(Instance.path, Instance.modality, Instance.sop_instance_uid,
                                    Instance.called_ae_title, Instance.calling_ae_title)
                             .join(JobInstance, JobInstance.instance_id == Instance.id)
                             .where(JobInstance.job_id == job.id)).all()
        self.current_job = claimed.job_id
        try:
            self._run_claimed(claimed, rows)
        finally:
            self.current_job = None
        return claimed.job_id

    def _fail(self, job_id: int, reason: str, timings: dict[str, Any] | None = None,
              values: dict[str, Any] | None = None) -> None:
        try:
            with self.db.session() as s:
                transition(s, job_id, {JobState.RUNNING}, JobState.FAILED, reason,
                           values={**({"timings": timings} if timings else {}), **(values or {})} or None)
        except TransitionError as exc:
            log.warning("job %d: could not record failure (%s)", job_id, exc)

    def _back_to_pending(self, job_id: int, reason: str, values: dict[str, Any]) -> None:
        try:
            with self.db.session() as s:
                transition(s, job_id, {JobState.RUNNING}, JobState.PENDING, reason, values=values)
        except TransitionError as exc:
            log.warning("job %d: %s", job_id, exc)

    def _run_claimed(self, job: ClaimedJob, rows: Sequence[Any]) -> None:
        job_id, attempts = job.job_id, job.attempts
        t_start = time.perf_counter()
        timings: dict[str, Any] = {"queue_wait_s": round((utcnow() - job.created).total_seconds(), 3)}
        max_attempts = self.settings.max_attempts
        if attempts > max_attempts:
            self._fail(job_id, f"gave up after {attempts - 1} start(s) (worker.max_attempts = {max_attempts}); "
                               "the planning process kept stopping: see the node log, then airt jobs retry")
            return
        log.info("job %d claimed by %s (attempt %d of %d, %d instances)", job_id, self.name, attempts,
                 max_attempts, len(rows))
        job_dir = self.jobs_dir / str(job_id)
        in_dir, out_dir = job_dir / "input", job_dir / "output"
        try:
            request = job_request(job, rows, self.data_dir, in_dir, out_dir)
        except PlanningError as exc:
            self._fail(job_id, str(exc))
            return
        except OSError as exc:
            self._fail(job_id, f"cannot prepare the job folder {job_dir}: {exc}; check disk space and permissions")
            return
        timings["inputs_s"] = round(time.perf_counter() - t_start, 3)
        t_plan = time.perf_counter()

        def deliverable(summary: PlanSummary) -> None:
            timings["plan_process_s"] = round(time.perf_counter() - t_plan, 3)
            self._succeed(job_id, out_dir, summary, timings)

        outcome, detail, plan_wall = self._run_child(job_id, request, out_dir, job.method, deliverable)
        timings.setdefault("plan_process_s", round(plan_wall, 3))
        if self.metrics is not None:
            self.metrics.planning_process("ok" if outcome == "delivered" else outcome)
        if outcome == "delivered":
            self._complete_metrics(job_id, out_dir, detail)
        elif outcome == "ok":
            assert isinstance(detail, PlanSummary)
            self._succeed(job_id, out_dir, detail, timings)
        elif outcome == "cancelled":
            log.info("job %d cancelled while planning; child stopped", job_id)
        elif outcome == "stopping":
            self._back_to_pending(job_id, "node shutting down; planning interrupted, will restart",
                                  {"attempts": Job.attempts - 1, "started_at": None})
        elif outcome == "crashed" and attempts < max_attempts:
            self._back_to_pending(job_id, f"{detail}; retrying (attempt {attempts} of {max_attempts})",
                                  {"timings": timings})
        else:
            self._fail(job_id, str(detail), timings)

    def _complete_metrics(self, job_id: int, out_dir: Path, problem: PlanSummary | str | None) -> None:
        """After a plan was recorded as deliverable: the job's metrics from the completed metrics.json
        (fidelity, candidates, all stage timings), or a warning when the rest of the planning failed."""
        if problem is not None:
            log.warning("job %d: its plan was recorded and queued; what planning does after that (fidelity check, "
                        "report) did not complete: %s", job_id, problem)
            return
        try:
            document = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("job %d: completed metrics.json not readable (%s); the job keeps the first one", job_id, exc)
            return
        with self.db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(metrics=document))

    def _run_child(self, job_id: int, request: CaseRequest, out_dir: Path, method: str | None,
                   deliverable: Callable[[PlanSummary], None]) -> tuple[str, PlanSummary | str | None, float]:
        """Run the case in the planning process; returns (outcome, detail, wall s) with outcome one of ok
        (detail: the plan's summary), failed / crashed / timeout (detail: reason), cancelled, stopping, or
        delivered: the process said the plan may be sent and ``deliverable(summary)`` recorded it then
        (detail: None, or why the rest of the planning did not complete)."""
        result_path = out_dir.parent / "result.json"
        result_path.unlink(missing_ok=True)
        timeout = self.settings.plan_timeout_s
        t0 = time.perf_counter()
        self.planner.submit(request, out_dir, method, result_path)
        log.info("job %d: sent to planning process %s (timeout %.0f s)", job_id, self.planner.pid, timeout)
        outcome, delivered = "", False
        while (event := self.planner.wait(STATE_POLL_S)) != "done":
            self.last_beat = time.monotonic()
            if event == "deliverable" and not delivered:
                try:
                    early = PlanSummary.from_dict(self.planner.deliverable)
                except PlanningError as exc:
                    log.warning("job %d: %s; waiting for the final result", job_id, exc)
                else:
                    deliverable(early)
                    delivered = True
                continue
            exitcode = self.planner.exitcode
            if exitcode is not None:
                self.planner.kill()
                reason = f"planning process exited with code {exitcode} without a result (crash or out of memory)"
                return ("delivered", reason, time.perf_counter() - t0) if delivered else ("crashed", reason,
                                                                                          time.perf_counter() - t0)
            if time.perf_counter() - t0 > timeout:
                outcome = "timeout"
            elif self._stop.is_set():
                outcome = "stopping"
            elif not delivered:
                with self.db.session() as s:
                    state = s.scalar(select(Job.state).where(Job.id == job_id))
                if state != JobState.RUNNING:
                    outcome = "cancelled"
            if outcome:
                self.planner.kill()
                break
        wall = time.perf_counter() - t0
        if outcome and delivered:
            return "delivered", f"the planning process was stopped ({outcome})", wall
        if outcome == "timeout":
            return outcome, (f"plan exceeded {timeout:g} s (worker.plan_timeout_s); the planning process was "
                             "stopped. Raise the timeout or check the case size"), wall
        if outcome:
            return outcome, None, wall
        self.planner.recycle_if_due()
        result: dict[str, Any] = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else {
            "ok": False, "error": "planning process answered without writing its result file"}
        if not result.get("ok"):
            if result.get("traceback"):
                log.error("job %d: planning raised:\n%s", job_id, result["traceback"])
            error = str(result.get("error") or "planning failed without a message")
            return ("delivered", error, wall) if delivered else ("failed", error, wall)
        if delivered:
            return "delivered", None, wall
        try:
            return "ok", PlanSummary.from_dict(result["summary"]), wall
        except PlanningError as exc:
            return "failed", str(exc), wall

    def _succeed(self, job_id: int, out_dir: Path, summary: PlanSummary, timings: dict[str, Any]) -> None:
        """Record a finished plan; queue its deliveries, hold them or fail the job, as
        ``planning.when_p1_fails`` says for a plan that failed a priority-1 goal."""
        missing = [n for n in PLAN_FILES if not (out_dir / n).is_file()]
        if missing:
            self._fail(job_id, f"planning reported success but did not write {missing} in {out_dir}", timings)
            return
        try:
            document = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            self._fail(job_id, f"the plan's metrics.json in {out_dir} is not JSON ({exc})", timings)
            return
        timings["plan_stages_s"] = dict(summary.stages_s)
        policy = self.when_p1_fails
        values: dict[str, Any] = {
            "metrics": document, "timings": timings, "output_dir": str(out_dir.relative_to(self.data_dir)),
            "profile": summary.profile, "profile_reason": summary.profile_reason,
            "ptv_d98_gy": summary.ptv_d98_gy, "ptv_hi": summary.ptv_hi,
            "bladder_dmean_gy": summary.bladder_dmean_gy, "rectum_dmean_gy": summary.rectum_dmean_gy}
        if summary.p1_failed and policy is P1Policy.FAIL:
            self._fail(job_id, f"the plan fails a priority-1 clinical goal ({summary.verdict}) and "
                               "planning.when_p1_fails = fail; nothing was sent. Its files are in "
                               f"{values['output_dir']}; airt jobs retry re-plans it", timings,
                       values={k: v for k, v in values.items() if k != "timings"})
            return
        held = summary.p1_failed and policy is P1Policy.HOLD
        if held:
            values["hold_reason"] = (f"a priority-1 clinical goal failed ({summary.verdict}); "
                                     "planning.when_p1_fails = hold: review, then airt jobs release "
                                     f"{job_id}")
        now = utcnow()
        try:
            with self.db.session() as s:
                transition(s, job_id, {JobState.RUNNING}, JobState.SUCCEEDED,
                           f"planned in {timings['plan_process_s']:.1f} s" + ("; deliveries held" if held else ""),
                           values=values)
                if not held:
                    queue_deliveries(s, job_id, self.destinations, now)
        except TransitionError as exc:
            log.warning("job %d finished planning but was moved meanwhile (%s); results kept in %s",
                        job_id, exc, out_dir)
            return
        if not held and self.destinations and self.on_queued is not None:
            self.on_queued()
        log.log(logging.WARNING if summary.p1_failed else logging.INFO,
                "job %d SUCCEEDED: queue %.1f s, inputs %.2f s, planning %.1f s; profile %s; PTV D98 %s Gy, HI %s; "
                "goals: %s; %s", job_id, timings["queue_wait_s"], timings["inputs_s"], timings["plan_process_s"],
                summary.profile, fmt(summary.ptv_d98_gy, 2), fmt(summary.ptv_hi, 3), summary.verdict,
                f"deliveries HELD until airt jobs release {job_id}" if held
                else f"{len(self.destinations)} delivery(ies) queued")


def queue_deliveries(session: Session, job_id: int, destinations: Sequence[Destination], now: Any) -> int:
    """One PENDING delivery row per destination for a job; returns how many."""
    for d in destinations:
        session.add(Delivery(job_id=job_id, destination=d.name, ae_title=d.ae_title, host=d.host, port=d.port,
                             state=DeliveryState.PENDING, next_try_at=now, created_at=now, updated_at=now))
    return len(destinations)


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
    worker = Worker.for_node(settings, Database(settings.database_url))
    if args.once:
        job = worker.run_once()
        print(job if job is not None else "")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    worker.run_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
