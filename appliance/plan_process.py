"""The planning process: one case planned in a child of the worker, its outcome written to a file.

The worker (:mod:`appliance.worker`) starts :func:`plan_in_child` in a process of its own
(multiprocessing *spawn*: no inherited threads or sockets) with the planning function it was
given (:class:`appliance.planning.Planner` on the node), the :class:`~core.request.CaseRequest` the
scheduler chose and the output folder. The child writes ``result.json`` atomically:
``{"ok": true, "summary": PlanSummary.to_dict(), "plan_s": t}`` or
``{"ok": false, "error": message, "kind": exception class}`` (a planning error's message is the
physicist's; any other exception is an internal error whose traceback goes to the node log).

The child dies with its parent (``PR_SET_PDEATHSIG`` on Linux, plus a watch on the parent pid), so
a node killed with SIGKILL leaves no orphan writing into a job folder that recovery re-queues.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.plan_summary import PlanSummary
from core.errors import AirtError
from core.request import CaseRequest

PlanFunction = Callable[[CaseRequest, Path, str | None], PlanSummary]
"""Plans one case into an output folder (RT Plan, RT Dose, metrics.json) with a method (None: the
configured one) and returns its summary; must be picklable (a module-level function or an
instance of a module-level class) to reach the spawned planning process."""


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


def plan_in_child(plan: PlanFunction, request: CaseRequest, out_dir: str, method: str | None, result_path: str,
                  parent_pid: int) -> None:
    """Entry point of the planning process: plan, then write ``result_path`` (JSON) atomically."""
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s [plan %(process)d]: %(message)s")
    for noisy in ("numba", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    result: dict[str, Any]
    try:
        summary = plan(request, Path(out_dir), method)
        if not isinstance(summary, PlanSummary):
            raise TypeError(f"the planning function returned {type(summary).__name__}, not a PlanSummary")
        result = {"ok": True, "summary": summary.to_dict(), "plan_s": time.perf_counter() - t0}
    except AirtError as exc:
        result = {"ok": False, "error": str(exc), "kind": type(exc).__name__}
    except Exception as exc:
        result = {"ok": False, "kind": type(exc).__name__,
                  "error": f"internal error in planning ({type(exc).__name__}: {exc}); see the node log",
                  "traceback": traceback.format_exc()}
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, result_path)
