"""Shared fixtures of the test suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.scu import free_port  # noqa: F401  (tests import it from here)

# Keep tests deterministic and light on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def require_tool(name: str) -> str:
    """Path of an external program; skips the test when it is absent (CI installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (make system-deps installs it)")
    return path


def plan_synthetic_case_cli(root: Path, seed: int, config: str, *extra: str) -> tuple[Path, Path, Path, str]:
    """Write a small synthetic DICOM case under ``root`` and run ``airt plan`` on it in a subprocess.

    Returns the case folder, the configuration file, the output folder and the command's stdout
    (the test fails with the command's stderr when it does not succeed).
    """
    from appliance.synth_dicom import write_synth_case

    case_dir = root / "case"
    write_synth_case(case_dir, seed, n_slices=56, matrix=256, pixel_mm=1.95, slice_mm=2.5)
    cfg = root / "airt.toml"
    cfg.write_text(config)
    out = root / "out"
    res = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "-q", "plan", str(case_dir), "--out", str(out), "--config", str(cfg),
         *extra],
        capture_output=True, text=True, check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return case_dir, cfg, out, res.stdout
