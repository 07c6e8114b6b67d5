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

What the pages show is read from the database in :mod:`appliance.web_pages` (no patient data: jobs
carry Study/Series/SOP Instance UIDs, ROI names and figures only) and laid out by the templates of
:mod:`appliance.web_templates`; this module routes requests and sends answers. Every page carries the banner "Research output; not clinically approved". The server has no
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

from appliance.config import HttpSettings, Settings
from appliance.health import Readiness
from appliance.metrics import NodeMetrics
from appliance.web_pages import REPORT_IMAGES, job_page, job_rows, report_image
from appliance.web_templates import TEMPLATES
from storage.db import Database
from storage.states import JobState

log = logging.getLogger(__name__)

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
                page = job_page(web.db, web.data_dir, int(m[1]))
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
        path = report_image(web.db, web.data_dir, job_id, name)
        if path is None:
            self._error(404, "Not Found", f"job {job_id} has no {name}", "report_image", head)
            return
        self._send(200, path.read_bytes(), "image/png", "report_image", head)

    def _html(self, code: int, template: str, context: Mapping[str, Any], route: str, head: bool) -> None:
        web = self.server.web
        body = web.templates.get_template(template).render(node_ae=web.node_ae, **context)
        self._send(code, body.encode("utf-8"), "text/html; charset=utf-8", route, head,
                   headers={"Content-Security-Policy": HTML_CSP})

    def _error(self, code: int, title: str, message: str, route: str, head: bool) -> None:
        self._html(code, "error.html", {"code": code, "title": title, "message": message}, route, head)

    def _send(self, code: int, body: bytes, content_type: str, route: str, head: bool,
              headers: Mapping[str, str] | None = None) -> None:
        # Counted before anything is written: a client that has its answer finds it counted by the next scrape.
        self.server.web.metrics.http_request(route, code)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


class WebServer:
    """The HTTP endpoint of a node (see the module docstring), served from a thread.

    Parameters
    ----------
    db
        The queue database (read only, except the readiness probe's rolled-back write).
    metrics
        The node's metrics (``/metrics``; requests are counted into it).
    readiness
        The checks of ``/readyz``.
    http
        The ``[http]`` section: address and port.
    node_ae
        The node's AE title (page titles).
    data_dir
        The data directory (report images of the jobs).
    """

    def __init__(self, db: Database, metrics: NodeMetrics, readiness: Readiness, *, http: HttpSettings, node_ae: str,
                 data_dir: Path) -> None:
        self.http = http
        self.node_ae = node_ae
        self.data_dir = Path(data_dir)
        self.db = db
        self.metrics = metrics
        self.readiness = readiness
        self.templates = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), autoescape=True,
                                            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def for_node(cls, settings: Settings, db: Database, metrics: NodeMetrics, readiness: Readiness) -> WebServer:
        """The HTTP endpoint of a node configured by ``settings``."""
        return cls(db, metrics, readiness, http=settings.http, node_ae=settings.node.ae_title,
                   data_dir=settings.data_dir)

    def start(self) -> tuple[str, int]:
        """Listen on ``http.bind_address:http.port`` and serve from a thread; returns the bound address.

        Raises
        ------
        OSError
            When the address cannot be bound (port in use, address not on this host).
        """
        server = _Server((self.http.bind_address, self.http.port), _Handler)
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
        host = str(self._server.server_address[0]) if self._server is not None else self.http.bind_address
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
