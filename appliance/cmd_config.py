"""``airt config check PATH``: validate a configuration file and print the effective settings."""

from __future__ import annotations

import argparse

from appliance.config import load_settings, render_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``airt config``."""
    sub = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = sub.add_parser("check", help="validate PATH and print the effective settings")
    check.add_argument("path", help="TOML configuration file")


def run(args: argparse.Namespace) -> int:
    """Validate and print; a bad file raises ConfigError (exit status 2 with the message)."""
    settings = load_settings(args.path)
    print(f"# {args.path}: valid")
    print(render_settings(settings))
    return 0
