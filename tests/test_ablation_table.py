"""The ablation table (``benchmarks.ablation_table``): paired against the full planner on the cases all planned."""

from __future__ import annotations

from typing import Any

from benchmarks.ablation_table import METRICS, table


def _plan(value: float, *, p1_ok: bool = True, p2_ok: bool = True, seconds: float = 9.0) -> dict[str, Any]:
    goal = {"structure": "rectum", "metric": "V36Gycc", "comparison": "<=", "limit": 2.0, "value": 1.0}
    return {"exported": {k: value for k in METRICS},
            "goals": [{**goal, "priority": 1, "passed": p1_ok}, {**goal, "priority": 2, "passed": p2_ok}],
            "to_exported_arc_s": seconds}


def test_medians_paired_differences_goals_and_times_on_the_common_cases() -> None:
    planner = {("synth", s): _plan(1.0, seconds=20.0) for s in range(2000, 2004)}
    planner[("heldout", 5000)] = _plan(9.0)
    # the variant misses seed 2003: the table uses the three seeds both planned
    variant = {("synth", 2000): _plan(1.5, p1_ok=False), ("synth", 2001): _plan(2.0, p2_ok=False),
               ("synth", 2002): _plan(3.5, seconds=7.0)}
    seeds, rows = table(planner, [("v", variant)], "synth", 10)
    assert seeds == [2000, 2001, 2002]
    head, row = rows
    assert head[0] == "full planner (optimize)" and head[1] == "1.000" and head[-3:] == ["3/3", "3/3", "20.0"]
    assert row[0] == "v"
    assert row[1] == "2.000 (+1.333)"  # HI: median 2.0, mean difference (0.5 + 1.0 + 2.5) / 3
    assert row[2] == "2.00 (+1.33)"
    assert row[-3:] == ["2/3", "2/3", "9.0"]
    seeds, _ = table(planner, [("v", variant)], "synth", 2)
    assert seeds == [2000, 2001]


def test_a_set_no_variant_planned_has_no_cases() -> None:
    planner = {("synth", 2000): _plan(1.0)}
    assert table(planner, [("v", {("synth", 2000): _plan(1.0)})], "heldout", 10) == ([], [])
    assert table(planner, [("v", {})], "synth", 10) == ([], [])
