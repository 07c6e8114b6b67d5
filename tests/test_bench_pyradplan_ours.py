"""``benchmarks.bench_pyradplan``'s reading of our plans: several ``--ours`` files merged per case, a later
file's method winning, and the replacement said."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from appliance.config import Settings
from benchmarks.bench_pyradplan import ours_by_case, protocol_from_settings


def _file(path: Path, methods: dict[str, float], seeds: range) -> Path:
    goal = {"structure": "rectum", "metric": "V36Gycc", "comparison": "<=", "limit": 2.0, "priority": 1,
            "value": 1.0, "passed": True}
    rows: list[dict[str, Any]] = [
        {"set": "synth", "seed": s, "profile": "prostate_40gy_5fx",
         "methods": {m: {"exported": {"rectum_Dmean_Gy": v}, "goals": [goal]} for m, v in methods.items()}}
        for s in seeds]
    path.write_text(json.dumps({"rows": rows}))
    return path


def test_files_merge_per_case_and_a_later_files_method_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    protocol = protocol_from_settings(Settings(), "prostate_40gy_5fx")
    planner = _file(tmp_path / "gate.json", {"optimize": 3.0, "ai": 9.0}, range(2000, 2003))
    ai = _file(tmp_path / "new_ai.json", {"ai": 2.0}, range(2000, 2002))
    ours = ours_by_case([planner, ai], protocol)
    assert ours[("synth", 2000)]["ai"]["exported"]["rectum_Dmean_Gy"] == 2.0
    assert ours[("synth", 2002)]["ai"]["exported"]["rectum_Dmean_Gy"] == 9.0  # only the first file has it
    assert ours[("synth", 2001)]["optimize"]["exported"]["rectum_Dmean_Gy"] == 3.0
    assert ours[("synth", 2000)]["ai"]["p1_met"] is True
    out = capsys.readouterr().out
    assert "the ai rows of new_ai.json replace those of gate.json on 2 case(s)" in out
    ours_by_case([ai, planner], protocol)  # the other order: the planner file's AI rows win, and that is said
    assert "the ai rows of gate.json replace those of new_ai.json on 2 case(s)" in capsys.readouterr().out
