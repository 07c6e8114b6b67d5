"""``airt demo``: the README's main job, with real processes and real DICOM associations.

1. write a synthetic prostate case (CT series + RT Structure Set) as DICOM;
2. start a results receiver (dcmtk ``storescp``, a real independent DICOM peer);
3. start the node (``airt serve`` in its own process) on loopback with a demo configuration;
4. push the case with a real DICOM client (dcmtk ``storescu``);
5. wait until the RT Plan and RT Dose arrive at the receiver, then print the metrics and timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom

from appliance.scu import free_port, wait_for_port

log = logging.getLogger(__name__)

NODE_AET = "AIRT"
PUSHER_AET = "DEMO_CT"
RECEIVER_AET = "RESULTS"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``airt demo``."""
    parser.add_argument("--workdir", type=Path, default=None, help="keep everything in this folder (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic case")
    parser.add_argument("--slices", type=int, default=96, help="CT slices of the synthetic case (2.5 mm)")
    parser.add_argument("--method", choices=["auto", "ai", "optimize"], default="auto", help="planning method")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")


def _write_config(path: Path, *, data_dir: Path, node_port: int, receiver_port: int, method: str,
                  http_port: int) -> None:
    path.write_text(
        f"""# airt demo configuration (loopback only)
[node]
ae_title = "{NODE_AET}"
bind_address = "127.0.0.1"
port = {node_port}

[[peers]]
ae_title = "{PUSHER_AET}"
host = "127.0.0.1"

[[destinations]]
name = "demo-receiver"
ae_title = "{RECEIVER_AET}"
host = "127.0.0.1"
port = {receiver_port}

[storage]
data_dir = "{data_dir}"
min_free_disk_mb = 100

[scheduler]
stable_age_s = 3.0
poll_interval_s = 1.0

[delivery]
retry_initial_s = 2.0

[http]
port = {http_port}

[planning]
method = "{method}"
"""
    )


def _start_receiver(out: Path, port: int) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["storescp", "-aet", RECEIVER_AET, "-od", str(out), "-uf", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _push(case_dir: Path, port: int) -> float:
    """Send every file of the case; returns the wall time of the push."""
    t0 = time.perf_counter()
    cmd = ["storescu", "-aet", PUSHER_AET, "-aec", NODE_AET, "+sd", "+r", "-nh", "127.0.0.1", str(port), str(case_dir)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def _received(out: Path) -> dict[str, Path]:
    """The complete files the receiver wrote, by modality (an RT Dose counts once all its pixels are there)."""
    found: dict[str, Path] = {}
    for p in out.rglob("*"):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p)
            modality = str(ds.get("Modality", ""))
            if modality == "RTDOSE" and len(ds.PixelData) < (int(ds.Rows) * int(ds.Columns)
                                                           * int(ds.NumberOfFrames) * int(ds.BitsAllocated) // 8):
                continue
        except Exception:  # a file still being written
            continue
        found[modality] = p
    return found


def _job_metrics(data_dir: Path) -> dict[str, Any] | None:
    files = sorted(data_dir.glob("jobs/*/output/metrics.json"))
    return json.loads(files[-1].read_text()) if files else None


#: How long the demo waits, after the plan arrived, for the planning process to finish what it does
#: after sending (the fidelity check and the report) before it stops the node.
REPORT_WAIT_S = 120.0


def _await_report(data_dir: Path, node: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait until the job's metrics.json records the report stage (the planning process completes it after
    the plan was sent), so that stopping the node does not cut its last job short; at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and node.poll() is None:
        try:
            metrics = _job_metrics(data_dir)
        except (OSError, ValueError):  # being rewritten
            metrics = None
        if metrics is not None and "report" in metrics.get("timings_s", {}):
            print(f"[demo] report written: {data_dir / 'jobs'}/*/output (removed with the demo's folder unless "
                  "--workdir is given)")
            return
        time.sleep(0.2)
    print(f"[demo] the job's report was not written within {timeout_s:.0f} s; stopping the node", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit status 0 when plan and dose arrived and link correctly."""
    from appliance.report import format_summary
    from appliance.synth_dicom import write_synth_case

    missing = [t for t in ("storescu", "storescp") if shutil.which(t) is None]
    if missing:
        print(f"airt demo: needs dcmtk ({', '.join(missing)} not found): run `make system-deps` or "
              "`apt-get install dcmtk`", file=sys.stderr)
        return 2
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="airt-demo-")
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    node: subprocess.Popen[bytes] | None = None
    receiver: subprocess.Popen[bytes] | None = None
    try:
        print(f"[demo] working in {work}")
        case_dir = work / "case"
        if case_dir.exists():
            shutil.rmtree(case_dir)
        t0 = time.perf_counter()
        written = write_synth_case(case_dir, args.seed, n_slices=args.slices)
        print(f"[demo] synthetic case seed {args.seed}: {args.slices} CT slices + RTSTRUCT in "
              f"{time.perf_counter() - t0:.1f} s (study {written.study_instance_uid})")

        node_port, receiver_port, http_port = free_port(), free_port(), free_port()
        received_dir = work / "received"
        if received_dir.exists():
            shutil.rmtree(received_dir)
        receiver = _start_receiver(received_dir, receiver_port)
        wait_for_port(receiver_port, 10.0, receiver)
        print(f"[demo] results receiver {RECEIVER_AET} listening on 127.0.0.1:{receiver_port}")

        data_dir = work / "node-data"
        if data_dir.exists():
            shutil.rmtree(data_dir)
        cfg = work / "airt-demo.toml"
        _write_config(cfg, data_dir=data_dir, node_port=node_port, receiver_port=receiver_port, method=args.method,
                      http_port=http_port)
        node = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--config", str(cfg)])
        wait_for_port(node_port, 60.0, node)
        print(f"[demo] node {NODE_AET} listening on 127.0.0.1:{node_port} (data in {data_dir}); job pages and "
              f"metrics at http://127.0.0.1:{http_port}/ while it runs")

        push_s = _push(case_dir, node_port)
        t_pushed = time.perf_counter()
        print(f"[demo] pushed the case with dcmtk storescu in {push_s:.1f} s; waiting for the plan (the job starts "
              "as soon as the study is complete)...")

        deadline = time.monotonic() + args.timeout
        found: dict[str, Path] = {}
        while time.monotonic() < deadline:
            found = _received(received_dir)
            if "RTPLAN" in found and "RTDOSE" in found:
                break
            if node.poll() is not None:
                print(f"[demo] the node exited with status {node.returncode}", file=sys.stderr)
                return 1
            time.sleep(0.1)  # the figure below is to a tenth of a second
        else:
            print(f"[demo] no results after {args.timeout:.0f} s; see `airt jobs list --config {cfg}`", file=sys.stderr)
            return 1
        elapsed = time.perf_counter() - t_pushed
        plan = pydicom.dcmread(found["RTPLAN"], stop_before_pixels=True)
        dose = pydicom.dcmread(found["RTDOSE"], stop_before_pixels=True)
        linked = dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
        print(f"[demo] received {found['RTPLAN'].name} (RT Plan, {plan.BeamSequence[0].NumberOfControlPoints} "
              f"control points) and {found['RTDOSE'].name} (RT Dose) {elapsed:.1f} s after the last C-STORE; "
              f"dose references plan: {'yes' if linked else 'NO'}")
        metrics = _job_metrics(data_dir)
        if metrics is not None:
            print()
            print(format_summary(metrics), end="")
        _await_report(data_dir, node, REPORT_WAIT_S)
        return 0 if linked else 1
    finally:
        for proc in (node, receiver):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if tmp is not None:
            tmp.cleanup()
