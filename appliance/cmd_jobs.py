"""``airt jobs list|show ID|retry ID|cancel ID|release ID``: inspect and steer the job queue (physicists)."""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy import select

from appliance.config import Settings, load_settings
from appliance.report import format_candidates
from appliance.web_pages import fmt, fmt_time, verdict_label
from core.errors import InputError
from storage.db import Database
from storage.models import Delivery, Job, JobEvent
from storage.states import DeliveryState, JobState, transition, transition_delivery

RETRYABLE = {JobState.FAILED, JobState.CANCELLED, JobState.SUPERSEDED}
CANCELLABLE = {JobState.PENDING, JobState.RUNNING}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``airt jobs``."""
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file")
    sub = parser.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="the newest jobs, one line each")
    ls.add_argument("--state", choices=[s.value for s in JobState], help="only jobs in this state")
    ls.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    for name, text in (("show", "state history, reasons, timings, DVH metrics and goal results of a job"),
                       ("retry", "re-queue a failed/cancelled/superseded job; for a succeeded job, resend "
                                 "its failed deliveries"),
                       ("cancel", "cancel a pending or running job"),
                       ("release", "send a succeeded job whose deliveries were held (a priority-1 goal failed "
                                   "and planning.when_p1_fails = hold), after review")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id", type=int, metavar="ID")


def _get_job(s: Any, job_id: int) -> Job:
    job = s.get(Job, job_id)
    if job is None:
        raise InputError(f"there is no job {job_id}; see airt jobs list")
    return job  # type: ignore[no-any-return]


def cmd_list(db: Database, state: str | None, limit: int) -> int:
    """Print the newest jobs."""
    with db.session() as s:
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            q = q.where(Job.state == JobState(state))
        jobs = list(s.scalars(q))
    print(f"{'ID':>5}  {'STATE':<10} {'CREATED (UTC)':<19}  {'PROFILE':<18} {'METHOD':<8} {'D98 Gy':>7} "
          f"{'HI':>6}  {'GOALS':<9} {'SEND':<5} STUDY / REASON")
    for j in jobs:
        tail = j.study_uid + (f"  {j.failure_reason[:80]}" if j.failure_reason else "")
        send = "HELD" if j.hold_reason else "-" if j.state != JobState.SUCCEEDED else "yes"
        print(f"{j.id:>5}  {j.state.value:<10} {fmt_time(j.created_at):<19}  {fmt(j.profile):<18} {fmt(j.method):<8} "
              f"{fmt(j.ptv_d98_gy):>7} {fmt(j.ptv_hi, 3):>6}  {verdict_label(j.metrics):<9} {send:<5} {tail}")
    if not jobs:
        print("(no jobs)")
    return 0


def _print_metrics(metrics: dict[str, Any]) -> None:
    how = [f"method {metrics.get('method', '-')}"]
    refine = metrics.get("ai_refine")
    if isinstance(refine, dict):
        how.append(f"networks' fluence refined by {fmt(refine.get('iterations'))} optimizer evaluations on "
                   f"{fmt(refine.get('voxels'))} voxels near the PTV")
    start = metrics.get("arc_start")
    if isinstance(start, dict):
        how.append(f"leaf sweeps over {fmt(start.get('group'))} sectors ({fmt(start.get('mu'))} MU) as the arc's start")
    elif metrics.get("sequencer_aperture_threshold") is not None:
        how.append(f"sequencer threshold {fmt(metrics['sequencer_aperture_threshold'])}")
    arc = metrics.get("arc_optimizer")
    if isinstance(arc, dict):
        how.append(f"arc's leaves and MU optimised by {fmt(arc.get('iterations'))} evaluations on "
                   f"{fmt(arc.get('voxels'))} voxels")
    print("\nPlanned with: " + "; ".join(how))
    verdict = metrics.get("verdict")
    if isinstance(verdict, dict):
        print(f"Verdict (clinical goals): {verdict.get('text', '?')}")
    rescue = metrics.get("rescue")
    if isinstance(rescue, dict):
        print(f"Rescue of failing P1 goals: {len(rescue.get('tries', [])) - 1} round(s), kept round "
              f"{rescue.get('kept_round')}")
    structures = metrics.get("structures")
    if isinstance(structures, dict) and structures:
        keys: list[str] = []
        for m in structures.values():
            if isinstance(m, dict):
                keys += [k for k in m if k not in keys and isinstance(m[k], int | float)]
        keys = keys[:10]
        print("\nDVH metrics of the final dose:")
        print(f"  {'structure':<14}" + "".join(f"{k:>12}" for k in keys))
        for name, m in structures.items():
            if isinstance(m, dict):
                print(f"  {name:<14}" + "".join(f"{fmt(m.get(k), 3):>12}" for k in keys))
    goals = metrics.get("goals")
    if isinstance(goals, list) and goals:
        print("\nClinical goals:")
        for g in goals:
            if not isinstance(g, dict):
                continue
            ok = g.get("passed", g.get("pass"))
            mark = "PASS" if ok else "FAIL" if ok is not None else "  ? "
            desc = " ".join(str(g.get(k, "")) for k in ("structure", "metric", "comparison", "limit"))
            print(f"  [{mark}] {desc:<30} value {fmt(g.get('value'), 3)}  (priority {g.get('priority', '-')})")
    plan = metrics.get("plan")
    if isinstance(plan, dict) and "total_MU" in plan:
        print(f"\nPlan: {fmt(plan.get('total_MU'), 1)} MU, {plan.get('control_points', '-')} control points")
    candidates = metrics.get("candidates")
    if isinstance(candidates, list) and candidates:
        print("\n" + format_candidates(candidates), end="")

def cmd_show(db: Database, job_id: int) -> int:
    """Print everything known about one job."""
    with db.session() as s:
        job = _get_job(s, job_id)
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
        deliveries = list(s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))
    print(f"Job {job.id}: {job.state.value}")
    print(f"  study            {job.study_uid}")
    print(f"  CT series        {fmt(job.ct_series_uid)}")
    print(f"  RT Struct        {fmt(job.rtstruct_uid)}")
    print(f"  profile          {fmt(job.profile)}" + (f"  ({job.profile_reason})" if job.profile_reason else ""))
    print(f"  method           {fmt(job.method)}    attempts {job.attempts}    worker {fmt(job.worker)}")
    print(f"  created/started/finished (UTC)  {fmt_time(job.created_at)} / {fmt_time(job.started_at)} / "
          f"{fmt_time(job.finished_at)}")
    print(f"  output           {fmt(job.output_dir)}")
    if job.failure_reason:
        print(f"  reason           {job.failure_reason}")
    if job.hold_reason:
        print(f"  deliveries HELD  {job.hold_reason}")
    print("\nHistory:")
    for e in events:
        frm = e.from_state.value if e.from_state else "(new)"
        print(f"  {fmt_time(e.at)}  {frm:>10} -> {e.to_state.value:<10} {e.message or ''}")
    if job.timings:
        print("\nTimings (s):")
        for k, v in job.timings.items():
            if isinstance(v, dict):
                print(f"  {k}: " + ", ".join(f"{sk} {fmt(sv, 3)}" for sk, sv in v.items()))
            else:
                print(f"  {k:<16} {fmt(v, 3)}")
    if job.metrics:
        _print_metrics(job.metrics)
    if deliveries:
        print("\nDeliveries:")
        for d in deliveries:
            print(f"  {d.destination:<16} {d.ae_title}@{d.host}:{d.port}  {d.state.value:<9} attempts {d.attempts}"
                  + (f"  next try {fmt_time(d.next_try_at)}" if d.state == DeliveryState.PENDING else "")
                  + (f"  last error: {d.last_error}" if d.last_error else ""))
    return 0


def cmd_retry(db: Database, job_id: int) -> int:
    """Re-queue a job, or resend a succeeded job's failed deliveries."""
    with db.session() as s:
        job = _get_job(s, job_id)
        if job.state in RETRYABLE:
            transition(s, job_id, {job.state}, JobState.PENDING, "re-queued by airt jobs retry",
                       values={"attempts": 0, "started_at": None})
            print(f"job {job_id}: {job.state.value} -> PENDING")
            return 0
        if job.state == JobState.SUCCEEDED:
            failed = list(s.scalars(select(Delivery).where(Delivery.job_id == job_id,
                                                           Delivery.state == DeliveryState.FAILED)))
            from storage.states import utcnow

            for d in failed:
                transition_delivery(s, d.id, {DeliveryState.FAILED}, DeliveryState.PENDING,
                                    values={"next_try_at": utcnow(), "attempts": 0})
            print(f"job {job_id}: {len(failed)} failed delivery(ies) re-queued")
            return 0
    raise InputError(f"job {job_id} is {job.state.value}; only {sorted(s.value for s in RETRYABLE)} jobs "
                     "can be retried (or SUCCEEDED ones with failed deliveries)")


def cmd_release(db: Database, job_id: int, settings: Settings) -> int:
    """Queue the deliveries of a job held because a priority-1 goal failed (a person reviewed it)."""
    import getpass

    from appliance.worker import queue_deliveries
    from storage.states import utcnow

    with db.session() as s:
        job = _get_job(s, job_id)
        if job.state != JobState.SUCCEEDED or not job.hold_reason:
            raise InputError(f"job {job_id} is {job.state.value} and its deliveries are not held; only a "
                             "SUCCEEDED job held by planning.when_p1_fails = hold can be released")
        now = utcnow()
        n = queue_deliveries(s, job_id, settings.destinations, now)
        released = (f"deliveries released by airt jobs release (user {getpass.getuser()}) after: "
                    f"{job.hold_reason}")
        s.add(JobEvent(job_id=job_id, at=now, from_state=JobState.SUCCEEDED, to_state=JobState.SUCCEEDED,
                       message=released[:2000]))
        job.hold_reason = None
    print(f"job {job_id}: released, {n} delivery(ies) queued")
    return 0


def cmd_cancel(db: Database, job_id: int) -> int:
    """Cancel a pending or running job (a running plan is stopped by its worker)."""
    with db.session() as s:
        job = _get_job(s, job_id)
        if job.state not in CANCELLABLE:
            raise InputError(f"job {job_id} is {job.state.value}; only PENDING or RUNNING jobs can be cancelled")
        transition(s, job_id, {job.state}, JobState.CANCELLED, "cancelled by airt jobs cancel")
    print(f"job {job_id}: {job.state.value} -> CANCELLED")
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    settings = load_settings(args.config)
    db = Database(settings.database_url)
    try:
        if args.jobs_command == "list":
            return cmd_list(db, args.state, args.limit)
        if args.jobs_command == "show":
            return cmd_show(db, args.job_id)
        if args.jobs_command == "retry":
            return cmd_retry(db, args.job_id)
        if args.jobs_command == "release":
            return cmd_release(db, args.job_id, settings)
        return cmd_cancel(db, args.job_id)
    finally:
        db.dispose()


