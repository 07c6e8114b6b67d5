"""``airt plan CASE_DIR --out DIR [--method ai|optimize] [--config PATH]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.config import load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``airt plan``."""
    parser.add_argument("case_dir", type=Path, help="folder with the CT series and the RT Structure Set")
    parser.add_argument("--out", type=Path, required=True, help="output folder (rtplan.dcm, rtdose.dcm, metrics.json, report)")
    parser.add_argument("--method", choices=["ai", "optimize"], default=None,
                        help="planning method (default: planning.method of the configuration)")
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration (default: built-in defaults)")


def run(args: argparse.Namespace) -> int:
    """Plan the folder and print the summary."""
    from appliance.planning import plan_folder
    from appliance.report import format_summary

    settings = load_settings(args.config)
    metrics = plan_folder(args.case_dir, args.out, settings, method=args.method)
    print(format_summary(metrics), end="")
    print(f"outputs in {args.out}/: rtplan.dcm rtdose.dcm metrics.json report_dvh.png report_slices.png report.txt")
    return 0
