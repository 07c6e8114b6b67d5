"""The ``airt`` command.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so
``airt config check`` does not import torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from core.errors import AirtError

log = logging.getLogger(__name__)

#: ``GOMP_SPINCOUNT`` of every ``airt`` process unless its environment sets one. libgomp, the OpenMP
#: runtime of torch's and numba's CPU threads, lets an idle thread spin 300 000 times after each parallel
#: region before it sleeps; an arc evaluation runs dozens of them (torch operations, numba kernels), and
#: on a host where another process wants a core the spinning takes it from the threads that compute (30
#: arc evaluations took 14 s instead of 4.5 s beside two busy processes). 10 000 costs nothing measurable on
#: an idle machine (``benchmarks/bench_contention.py``). Read by libgomp when torch loads it, so set
#: before any subcommand imports torch; the planning processes inherit it.
OPENMP_SPIN_COUNT = "10000"

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("appliance.cmd_serve", "run the DICOM node in the foreground (systemd runs this)"),
    "plan": ("appliance.cmd_plan", "plan a folder of DICOM files (CT series + RTSTRUCT) without the network"),
    "synth": ("appliance.cmd_synth", "write synthetic prostate cases (CT series + RTSTRUCT) as DICOM"),
    "jobs": ("appliance.cmd_jobs", "inspect and steer the job queue"),
    "echo": ("appliance.cmd_echo", "C-ECHO a DICOM peer"),
    "send": ("appliance.cmd_send", "C-STORE files to a DICOM peer"),
    "config": ("appliance.cmd_config", "validate a configuration file and print the effective settings"),
    "train": ("appliance.cmd_train", "train the AIRT networks on synthetic or clinical data"),
    "demo": ("appliance.cmd_demo", "start a node, push a synthetic case, receive plan and dose, print metrics"),
}


def configure_logging(verbosity: int) -> None:
    """Log to stderr (journald under systemd); the only place handlers are configured."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if os.environ.get("INVOCATION_ID"):  # under systemd: journald adds the timestamp
        fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    for noisy in ("pynetdicom", "numba", "apscheduler", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the chosen subcommand's module is imported."""
    parser = argparse.ArgumentParser(prog="airt", description="Automated radiotherapy planning DICOM node (research use)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    args_list = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in args_list if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``airt``; returns the process exit status."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    configure_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args._run(args))
    except AirtError as exc:
        print(f"airt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
