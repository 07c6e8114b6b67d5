"""``airt send FILES... --to AE@HOST:PORT``: C-STORE files (or folders of them) to a peer."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.config import load_settings
from appliance.scu import client_ssl_context, is_stored, parse_peer, send_files
from core.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``airt send``."""
    parser.add_argument("files", nargs="+", metavar="FILE", help="DICOM files or folders (sent in the order given)")
    parser.add_argument("--to", required=True, metavar="AE@HOST:PORT", help="the peer to send to")
    parser.add_argument("--aet", default=None, help="our calling AE title (default: node.ae_title)")
    parser.add_argument("--tls", action="store_true", help="use TLS with the [tls] files of the configuration")
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file")


def _expand(items: list[str]) -> list[Path]:
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p} is neither a file nor a folder")
    if not out:
        raise InputError(f"no files to send in {items}")
    return out


def run(args: argparse.Namespace) -> int:
    """Send; prints one line per file; 0 when every file was stored, 1 otherwise."""
    settings = load_settings(args.config)
    peer = parse_peer(args.to)
    files = _expand(args.files)
    results = send_files(files, peer, calling_aet=args.aet or settings.node.ae_title,
                         tls=client_ssl_context(settings.tls) if args.tls else None)
    for p, status in results:
        print(f"{p}: " + (f"status 0x{status:04X}" if status >= 0 else "no accepted presentation context"))
    ok = len(results) == len(files) and all(is_stored(st) for _, st in results)
    if len(results) < len(files):
        print(f"stopped after a failure: {len(files) - len(results)} file(s) not sent")
    return 0 if ok else 1
