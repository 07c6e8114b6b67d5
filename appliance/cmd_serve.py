"""``airt serve [--config PATH]``: run the DICOM node in the foreground (systemd runs this)."""

from __future__ import annotations

import argparse

from appliance.config import load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``airt serve``."""
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file (default: built-in settings)")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a clean stop."""
    from appliance.service import Node

    Node(load_settings(args.config)).serve_forever()
    return 0
