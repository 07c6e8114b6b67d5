"""``airt plan CASE_DIR --out DIR [--method ai|optimize] [--profile NAME] [--config PATH] [--candidate BLADDER:RECTUM ...]``."""

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
    parser.add_argument("--profile", metavar="NAME", default=None,
                        help="protocol profile ([[profiles]] name: prescription and goal list); default: the "
                             "one the PTV's name carries the dose of, else planning.profile")
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration (default: built-in defaults)")
    parser.add_argument("--candidate", action="append", default=None, metavar="BLADDER:RECTUM",
                        help="also make an AI candidate plan with these suppression factors s_o in [0, 0.5] "
                             "(repeatable; replaces planning.candidate_sparings), written under OUT/candidates/")


def parse_candidate(text: str) -> tuple[float, float]:
    """``"0.2:0.4"`` -> (bladder s_o, rectum s_o); ConfigError naming the expected form otherwise."""
    from appliance.config import check_sparing_pair
    from core.errors import ConfigError

    parts = text.split(":")
    if len(parts) != 2:
        raise ConfigError(f"--candidate {text!r}: expected BLADDER:RECTUM suppression factors, e.g. 0:0.4")
    return check_sparing_pair(parts, f"--candidate {text!r}")


def run(args: argparse.Namespace) -> int:
    """Plan the folder and print the summary."""
    from appliance.dicom.case_loader import request_from_folder
    from appliance.plan_process import planning_memory_policy
    from appliance.planning import plan_request
    from appliance.report import format_summary

    planning_memory_policy()  # the engine's buffers fault in without compaction; later stages reuse them
    settings = load_settings(args.config)
    candidates = None if args.candidate is None else [parse_candidate(c) for c in args.candidate]
    _, metrics = plan_request(request_from_folder(args.case_dir), args.out, settings, method=args.method,
                              profile=args.profile, candidates=candidates)
    print(format_summary(metrics), end="")
    print(f"outputs in {args.out}/: rtplan.dcm rtdose.dcm metrics.json report_dvh.png report_slices.png report.txt")
    return 0
