"""The node's HTTP endpoint: health, readiness, Prometheus metrics and read-only job pages.

Routes (GET and HEAD only; any other method gets 405):

==============================  =====================================================================
``/healthz``                    200 ``ok`` while the process serves HTTP (liveness)
``/readyz``                     200 JSON when every check of :class:`appliance.health.Readiness`
                                passes, else 503 JSON naming the failing checks
``/metrics``                    the node's metrics, Prometheus text format (OpenMetrics on request)
``/`` (``?state=S&limit=N``)    the job list, newest first (the columns of ``airt jobs list``)
``/jobs/<id>``                  one job: state history, reasons, profile, verdict, clinical goals,
                                DVH metrics, candidate plans, deliveries, timings, report images
``/jobs/<id>/report_dvh.png``,  the report images the planner wrote into the job's output folder;
``/jobs/<id>/report_slices.png``  only these two names are served (matched on the raw path, never
                                decoded or joined from user input): anything else is 404
==============================  =====================================================================

No patient data is read or shown: jobs carry Study/Series/SOP Instance UIDs, ROI names and figures
only. Every page carries the banner "Research output; not clinically approved". The server has no
authentication and binds to loopback by default (``[http]``); put a reverse proxy with TLS and
authentication in front of it to reach it from elsewhere.

Why the standard library's :class:`http.server.ThreadingHTTPServer`: the endpoint is a handful of
read-only GET routes for an administrator's probes and a physicist's browser; the standard library
serves them with no new dependency, in a thread of the node's own process (no event loop to run
beside pynetdicom's threads). No web framework is installed in the environment, and adding one
(and a WSGI/ASGI server) would bring more code than the router below. The libraries that do the
delicate parts are well kept ones: Jinja2 (autoescaping templates) and ``prometheus_client`` (the
exposition format). Each request runs in its own thread with a 30 s socket timeout, so a slow
client cannot hold the server.
"""

from __future__ import annotations

import http.server
import json
import logging
import re
import socket
import socketserver
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jinja2
from sqlalchemy import select

from appliance.config import Settings
from appliance.health import Readiness
from appliance.metrics import NodeMetrics
from appliance.web_templates import TEMPLATES
from storage.db import Database
from storage.models import Delivery, Job, JobEvent
from storage.states import DeliveryState, JobState

log = logging.getLogger(__name__)

REPORT_IMAGES: dict[str, str] = {"report_dvh.png": "DVH of the final dose",
                                 "report_slices.png": "Dose slices through the isocenter"}
"""The only files of a job's output folder the server sends (name -> alt text)."""

JOB_RE = re.compile(r"/jobs/([1-9][0-9]{0,17})")
IMAGE_RE = re.compile(r"/jobs/([1-9][0-9]{0,17})/(" + "|".join(re.escape(n) for n in REPORT_IMAGES) + ")")
MAX_LIST = 1000
"""Most jobs the list shows (``?limit=``)."""
DEFAULT_LIST = 200

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
HTML_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'")
"""Pages load their report images from this server and nothing else; no script runs."""

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


# ------------------------------------------------------------------------------------------------
# The server


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer for IPv4 or IPv6 without the reverse DNS lookup of ``HTTPServer.server_bind``."""

    daemon_threads = True
    web: WebServer

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "airt"
    sys_version = ""
    timeout = 30.0
    """Socket timeout of a request, s: a client that stops sending is dropped."""

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _not_allowed(self) -> None:
        self._send(405, b"method not allowed: this endpoint is read-only (GET, HEAD)\n", "text/plain; charset=utf-8",
                   "method_not_allowed", head=False, headers={"Allow": "GET, HEAD"})

    def do_POST(self) -> None:
        self._not_allowed()

    def do_PUT(self) -> None:
        self._not_allowed()

    def do_DELETE(self) -> None:
        self._not_allowed()

    def do_PATCH(self) -> None:
        self._not_allowed()

    def do_OPTIONS(self) -> None:
        self._not_allowed()

    def _dispatch(self, *, head: bool) -> None:
        web = self.server.web
        try:
            parts = urlsplit(self.path)
            path = parts.path
            if path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8", "healthz", head)
            elif path == "/readyz":
                ready, body = web.readiness.report()
                self._send(200 if ready else 503, json.dumps(body, indent=1).encode() + b"\n",
                           "application/json", "readyz", head)
            elif path == "/metrics":
                body_b, ctype = web.metrics.exposition(self.headers.get("Accept"))
                self._send(200, body_b, ctype, "metrics", head)
            elif path in ("/", "/jobs"):
                self._job_list(parse_qs(parts.query), head)
            elif m := JOB_RE.fullmatch(path):
                page = job_page(web.db, web.settings.data_dir, int(m[1]))
                if page is None:
                    self._error(404, "Not Found", f"there is no job {int(m[1])}", "job", head)
                else:
                    self._html(200, "job.html", page, "job", head)
            elif m := IMAGE_RE.fullmatch(path):
                self._image(int(m[1]), m[2], head)
            else:
                self._error(404, "Not Found", "no such page", "not_found", head)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("http: client %s went away", self.client_address[0])
        except Exception:
            log.exception("http: %s %s failed", self.command, self.path[:200])
            self._error(500, "Internal Server Error", "the page could not be made; see the node log", "error", head)

    def _job_list(self, query: Mapping[str, list[str]], head: bool) -> None:
        state: JobState | None = None
        limit = DEFAULT_LIST
        try:
            if query.get("state"):
                state = JobState(query["state"][0])
            if query.get("limit"):
                limit = int(query["limit"][0])
                if not 1 <= limit <= MAX_LIST:
                    raise ValueError(limit)
        except ValueError:
            self._error(400, "Bad Request", f"state must be one of {[s.value for s in JobState]} and limit an "
                                            f"integer in [1, {MAX_LIST}]", "jobs", head)
            return
        rows = job_rows(self.server.web.db, state, limit)
        self._html(200, "jobs.html", {"jobs": rows, "state": state.value if state else "", "limit": limit,
                                      "states": [s.value for s in JobState]}, "jobs", head)

    def _image(self, job_id: int, name: str, head: bool) -> None:
        web = self.server.web
        with web.db.session() as s:
            output_dir = s.scalar(select(Job.output_dir).where(Job.id == job_id))
        out = report_folder(web.settings.data_dir, output_dir)
        path = None if out is None else out / name
        if path is None or not path.is_file():
            self._error(404, "Not Found", f"job {job_id} has no {name}", "report_image", head)
            return
        self._send(200, path.read_bytes(), "image/png", "report_image", head)

    def _html(self, code: int, template: str, context: Mapping[str, Any], route: str, head: bool) -> None:
        web = self.server.web
        body = web.templates.get_template(template).render(node_ae=web.settings.node.ae_title, **context)
        self._send(code, body.encode("utf-8"), "text/html; charset=utf-8", route, head,
                   headers={"Content-Security-Policy": HTML_CSP})

    def _error(self, code: int, title: str, message: str, route: str, head: bool) -> None:
        self._html(code, "error.html", {"code": code, "title": title, "message": message}, route, head)

    def _send(self, code: int, body: bytes, content_type: str, route: str, head: bool,
              headers: Mapping[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.server.web.metrics.http_request(route, code)


class WebServer:
    """The HTTP endpoint of a node (see the module docstring), served from a thread.

    Parameters
    ----------
    settings
        ``http`` (address and port), ``node.ae_title`` (page titles), ``storage.data_dir`` (report images).
    db
        The queue database (read only, except the readiness probe's rolled-back write).
    metrics
        The node's metrics (``/metrics``; requests are counted into it).
    readiness
        The checks of ``/readyz``.
    """

    def __init__(self, settings: Settings, db: Database, metrics: NodeMetrics, readiness: Readiness) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.readiness = readiness
        self.templates = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), autoescape=True,
                                            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Listen on ``http.bind_address:http.port`` and serve from a thread; returns the bound address.

        Raises
        ------
        OSError
            When the address cannot be bound (port in use, address not on this host).
        """
        server = _Server((self.settings.http.bind_address, self.settings.http.port), _Handler)
        server.web = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name=f"http-{self.port}", daemon=True)
        self._thread.start()
        log.info("HTTP endpoint %s (/healthz, /readyz, /metrics, job pages at /)", self.url)
        return str(server.server_address[0]), self.port

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("the HTTP server is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://ADDRESS:PORT/`` (IPv6 addresses in brackets)."""
        host = str(self._server.server_address[0]) if self._server is not None else self.settings.http.bind_address
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}/"

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            if self._thread is not None:
                self._thread.join(timeout=10)
            log.info("HTTP endpoint stopped")
