"""Package boundaries (house style rule 1): imports flow appliance -> storage, pipeline -> sequencing -> core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "core": {"torch", "numba", "pydicom", "pynetdicom", "sqlalchemy", "highdicom", "apscheduler", "appliance",
             "pipeline", "sequencing", "storage"},
    "pipeline": {"pydicom", "pynetdicom", "sqlalchemy", "appliance", "storage", "highdicom", "apscheduler"},
    "sequencing": {"pydicom", "pynetdicom", "sqlalchemy", "appliance", "storage", "highdicom", "apscheduler", "torch",
                   "pipeline"},
    "storage": {"torch", "pipeline", "sequencing", "numba", "pynetdicom", "appliance"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_forbidden_modules(package: str) -> None:
    bad: list[str] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            for forbidden in FORBIDDEN[package]:
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_sequencing_and_shared_contracts_load_without_torch() -> None:
    modules = [p.stem for p in (ROOT / "sequencing").glob("*.py") if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('sequencing.' + m)\n"
        "import core.case, core.errors, core.machine, appliance.config\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
