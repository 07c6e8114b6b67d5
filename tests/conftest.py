"""Shared fixtures of the test suite."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

# Keep tests deterministic and light on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    """Path of an external program; skips the test when it is absent (CI installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make system-deps installs it)")
    return path
