"""What the node's job pages show, read from the queue database: the job list's rows, one job's page
(state history, verdict, clinical goals, DVH metrics, candidate plans, deliveries, timings) and the
report images of a job's output folder. :mod:`appliance.web` serves them.

No patient data is read: jobs carry Study/Series/SOP Instance UIDs, ROI names and figures only.
Every value is made a string for a table cell here (:func:`fmt`), so the templates
(:mod:`appliance.web_templates`) only place them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import select

from storage.db import Database
from storage.models import Delivery, Job, JobEvent
from storage.states import DeliveryState, JobState

REPORT_IMAGES: dict[str, str] = {"report_dvh.png": "DVH of the final dose",
                                 "report_slices.png": "Dose slices through the isocenter"}
"""The only files of a job's output folder the server sends (name -> alt text)."""

DVH_COLUMNS = (("name", "ROI name"), ("volume_cm3", "Volume (cm3)"), ("Dmean_Gy", "Dmean (Gy)"),
               ("D98_Gy", "D98 (Gy)"), ("D95_Gy", "D95 (Gy)"), ("D50_Gy", "D50 (Gy)"), ("D2_Gy", "D2 (Gy)"),
               ("Dmax_Gy", "Dmax (Gy)"), ("HI", "HI"), ("CI_paddick", "CI (Paddick)"))
"""Columns of the DVH table (metrics.json key, heading), shown when some structure has the key."""


# ------------------------------------------------------------------------------------------------
# Formatting


def fmt(v: Any, nd: int = 2) -> str:
    """A value for a table cell: numbers with ``nd`` decimals, None as ``-``."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def fmt_time(t: Any) -> str:
    """A UTC timestamp as ``YYYY-MM-DD HH:MM:SS`` (``-`` when unset)."""
    return "-" if t is None else str(t.strftime("%Y-%m-%d %H:%M:%S"))


def verdict_label(metrics: Mapping[str, Any] | None) -> str:
    """``P1 met`` or ``P1 FAIL`` from a job's metrics, ``-`` when it has no verdict (as ``airt jobs list``)."""
    verdict = (metrics or {}).get("verdict")
    if not isinstance(verdict, Mapping) or "p1_met" not in verdict:
        return "-"
    return "P1 met" if verdict["p1_met"] else "P1 FAIL"


def _dict(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


# ------------------------------------------------------------------------------------------------
# Page data (from the database; nothing about the patient is read)


def job_rows(db: Database, state: JobState | None, limit: int) -> list[dict[str, Any]]:
    """The job list's rows, newest first."""
    with db.session() as s:
        q = select(Job).order_by(Job.id.desc()).limit(limit)
        if state is not None:
            q = q.where(Job.state == state)
        jobs = list(s.scalars(q))
    rows = []
    for j in jobs:
        goals = verdict_label(j.metrics)
        rows.append({
            "id": j.id, "state": j.state.value, "created": fmt_time(j.created_at), "finished": fmt_time(j.finished_at),
            "profile": fmt(j.profile), "method": fmt(j.method), "d98": fmt(j.ptv_d98_gy), "hi": fmt(j.ptv_hi, 3),
            "goals": goals, "goals_class": {"P1 met": "pass", "P1 FAIL": "fail"}.get(goals, ""),
            "send": "HELD" if j.hold_reason else "-" if j.state != JobState.SUCCEEDED else "yes",
            "study_uid": j.study_uid, "reason": (j.failure_reason or "")[:300],
        })
    return rows


def job_page(db: Database, data_dir: Path, job_id: int) -> dict[str, Any] | None:
    """Everything the job page shows, or None when there is no such job."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return None
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
        deliveries = list(s.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)))
    metrics = _dict(job.metrics)
    page: dict[str, Any] = {
        "job": {
            "id": job.id, "state": job.state.value, "study_uid": job.study_uid, "ct_series_uid": fmt(job.ct_series_uid),
            "rtstruct_uid": fmt(job.rtstruct_uid), "profile": fmt(job.profile), "profile_reason": job.profile_reason,
            "method": fmt(job.method), "attempts": job.attempts, "worker": fmt(job.worker),
            "created": fmt_time(job.created_at), "started": fmt_time(job.started_at),
            "finished": fmt_time(job.finished_at), "failure_reason": job.failure_reason,
            "hold_reason": job.hold_reason,
        },
        "events": [{"at": fmt_time(e.at), "from_state": e.from_state.value if e.from_state else "(new)",
                    "to_state": e.to_state.value, "message": e.message or ""} for e in events],
        "deliveries": [{"destination": d.destination, "peer": f"{d.ae_title}@{d.host}:{d.port}",
                        "state": d.state.value, "attempts": d.attempts,
                        "next_try": fmt_time(d.next_try_at) if d.state == DeliveryState.PENDING else "-",
                        "delivered": fmt_time(d.delivered_at), "last_error": d.last_error or ""}
                       for d in deliveries],
        "verdict": None, "goals": _goal_rows(metrics.get("goals")), "dvh": _dvh_table(metrics.get("structures")),
        "candidates": _candidate_rows(metrics.get("candidates")), "timings": _timing_rows(job.timings),
        "plan": "", "prescription": "", "images": [],
    }
    verdict = _dict(metrics.get("verdict"))
    if "p1_met" in verdict:
        page["verdict"] = {"p1_met": bool(verdict["p1_met"]), "label": verdict_label(metrics),
                           "text": str(verdict.get("text", ""))}
    plan = _dict(metrics.get("plan"))
    if plan:
        page["plan"] = (f"{fmt(plan.get('total_MU'), 1)} MU, {fmt(plan.get('control_points'))} control points, "
                        f"machine {fmt(plan.get('machine'))}")
    rx = _dict(metrics.get("prescription"))
    if rx:
        page["prescription"] = (f"{fmt(rx.get('dose_Gy'), 2)} Gy in {fmt(rx.get('fractions'))} fractions; "
                                f"normalisation {fmt(rx.get('normalisation'))}")
    out = report_folder(data_dir, job.output_dir)
    if out is not None:
        page["images"] = [{"id": name.removesuffix(".png"), "url": f"/jobs/{job.id}/{name}", "alt": alt}
                          for name, alt in REPORT_IMAGES.items() if (out / name).is_file()]
    return page


def report_folder(data_dir: Path, output_dir: str | None) -> Path | None:
    """A job's output folder, only when it lies inside the data directory."""
    if not output_dir:
        return None
    root = data_dir.resolve()
    out = (root / output_dir).resolve()
    return out if out.is_relative_to(root) and out.is_dir() else None


def _goal_rows(goals: Any) -> list[dict[str, Any]]:
    rows = []
    for g in goals if isinstance(goals, list) else []:
        if not isinstance(g, Mapping):
            continue
        passed = g.get("passed")
        unit = g.get("unit") or ""
        value = g.get("value")
        rows.append({
            "result": "PASS" if passed is True else "FAIL" if passed is False else "n/a",
            "css": "pass" if passed is True else "fail" if passed is False else "na",
            "priority": fmt(g.get("priority")), "structure": fmt(g.get("structure")), "metric": fmt(g.get("metric")),
            "goal": f"{fmt(g.get('comparison'))} {fmt(g.get('limit'))} {unit}".strip(),
            "value": f"{fmt(value, 2)} {unit}".strip() if value is not None else "-",
            "note": str(g.get("reason") or ""),
        })
    return rows


def _dvh_table(structures: Any) -> dict[str, Any]:
    table = _dict(structures)
    present = [(k, h) for k, h in DVH_COLUMNS if any(isinstance(m, Mapping) and k in m for m in table.values())]
    rows = [{"role": role, "cells": [fmt(m.get(k), 3 if k in ("HI", "CI_paddick") else 2) for k, _ in present]}
            for role, m in table.items() if isinstance(m, Mapping)]
    return {"columns": [h for _, h in present], "rows": rows}


def _candidate_rows(candidates: Any) -> list[dict[str, Any]]:
    rows = []
    for c in candidates if isinstance(candidates, list) else []:
        if not isinstance(c, Mapping):
            continue
        sp, st = _dict(c.get("sparing")), _dict(c.get("structures"))
        ptv = _dict(st.get("ptv"))
        rows.append({"s_bladder": fmt(sp.get("bladder")), "s_rectum": fmt(sp.get("rectum")), "hi": fmt(ptv.get("HI"), 3),
                     "d98": fmt(ptv.get("D98_Gy")), "bladder": fmt(_dict(st.get("bladder")).get("Dmean_Gy")),
                     "rectum": fmt(_dict(st.get("rectum")).get("Dmean_Gy")), "mu": fmt(c.get("total_MU"), 1),
                     "verdict": f"{verdict_label(c)}: {_dict(c.get('verdict')).get('text', '')}".rstrip(": "),
                     "folder": fmt(c.get("folder"))})
    return rows


def _timing_rows(timings: Any) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for k, v in _dict(timings).items():
        if isinstance(v, Mapping):
            rows += [(f"{k}: {sk}", fmt(sv, 3)) for sk, sv in v.items()]
        else:
            rows.append((str(k), fmt(v, 3)))
    return rows


def report_image(db: Database, data_dir: Path, job_id: int, name: str) -> Path | None:
    """The file of report image ``name`` (one of :data:`REPORT_IMAGES`) of a job, or None when the job,
    its output folder or the file is missing."""
    if name not in REPORT_IMAGES:
        return None
    with db.session() as s:
        output_dir = s.scalar(select(Job.output_dir).where(Job.id == job_id))
    out = report_folder(data_dir, output_dir)
    path = None if out is None else out / name
    return path if path is not None and path.is_file() else None
