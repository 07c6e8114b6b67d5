"""``airt echo AE@HOST:PORT``: C-ECHO a DICOM peer."""

from __future__ import annotations

import argparse
import time

from appliance.config import load_settings
from appliance.scu import client_ssl_context, echo, parse_peer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``airt echo``."""
    parser.add_argument("peer", metavar="AE@HOST:PORT", help="the peer to call, e.g. TPS@10.0.0.5:104")
    parser.add_argument("--aet", default=None, help="our calling AE title (default: node.ae_title)")
    parser.add_argument("--tls", action="store_true", help="use TLS with the [tls] files of the configuration")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the peer")
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file")


def run(args: argparse.Namespace) -> int:
    """0 when the peer answered Success, 1 otherwise (ExportError: exit status 2 with the message)."""
    settings = load_settings(args.config)
    peer = parse_peer(args.peer)
    t0 = time.perf_counter()
    status = echo(peer, calling_aet=args.aet or settings.node.ae_title, timeout_s=args.timeout,
                  tls=client_ssl_context(settings.tls) if args.tls else None)
    ms = (time.perf_counter() - t0) * 1000
    print(f"C-ECHO {peer}: status 0x{status:04X} in {ms:.0f} ms")
    return 0 if status == 0 else 1
