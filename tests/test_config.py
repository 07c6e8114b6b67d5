"""Configuration: parsing, validation messages, the reference file, structure-name mapping."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from appliance.config import (
    Comparison,
    Goal,
    NodeSettings,
    Settings,
    StructureSettings,
    iter_settings,
    load_settings,
    settings_from_dict,
    unit_of,
)
from core.case import Role
from core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "config" / "airt.toml"


def test_reference_file_is_valid_and_holds_the_defaults() -> None:
    s = load_settings(REFERENCE)
    d = Settings()
    for f in dataclasses.fields(Settings):
        if f.name in ("peers", "destinations"):
            continue  # the reference file shows example entries
        assert getattr(s, f.name) == getattr(d, f.name), f.name
    assert [p.ae_title for p in s.peers] == ["TPS"]
    assert [x.name for x in s.destinations] == ["tps"]


def _documented_keys(text: str) -> dict[str, str]:
    """Keys of the reference file that have a comment line right above them, as dotted names, with that comment."""
    keys: dict[str, str] = {}
    table = ""
    prev = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[[") and line.endswith("]]"):
            table = line[2:-2].replace(".", "[].") + "[]"  # [[profiles.goals]] -> profiles[].goals[]
        elif line.startswith("[") and line.endswith("]"):
            table = line[1:-1]
        elif "=" in line and not line.startswith("#"):
            key = line.split("=", 1)[0].strip()
            if prev.startswith("#") or table == "structures.patterns":
                keys[f"{table}.{key}" if table else key] = prev
        prev = line
    return keys


def test_reference_file_documents_every_setting() -> None:
    """Every setting of the schema is in config/airt.toml, under a comment giving its meaning and unit."""
    text = REFERENCE.read_text()
    documented = _documented_keys(text)
    missing = []
    for key, f in iter_settings():
        if key == "structures.patterns":
            if "[structures.patterns]" not in text:
                missing.append(key)
            continue
        if key not in documented:
            missing.append(key)
        else:
            assert f.description, f"{key} has no description"
            unit = unit_of(f)
            expected = f"# {f.description}" + (f" [{unit}]" if unit else "")
            assert documented[key].startswith(expected), f"{key}: the comment above it is not {expected!r}"
    assert not missing, f"settings not documented in config/airt.toml: {missing}"
    # every role has patterns in the reference file
    patterns = tomllib.loads(text)["structures"]["patterns"]
    assert set(patterns) == {r.value for r in Role}


def _profile(**kw: object) -> dict[str, object]:
    """A minimal valid [[profiles]] table, with ``kw`` overriding its keys."""
    table: dict[str, object] = {"name": "p", "protocol": "test", "dose_gy": 40.0, "fractions": 5,
                                "goals": [{"structure": "ptv", "metric": "D98%", "comparison": ">=", "limit": 38.0}]}
    return {**table, **kw}


def test_unknown_key_is_refused_with_its_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['stable_age'\] in \[scheduler\]"):
        settings_from_dict({"scheduler": {"stable_age": 10}})
    with pytest.raises(ConfigError, match="unknown setting"):
        settings_from_dict({"nodes": {}})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"planning": {"method": "magic"}}, r"planning.method = 'magic' is not allowed; allowed values: \['auto', 'ai', 'optimize'\]"),
        ({"node": {"port": 70000}}, r"node.port must be a TCP port"),
        ({"node": {"ae_title": "A" * 17}}, r"node.ae_title"),
        ({"node": {"max_associations": "8"}}, r"node.max_associations must be an integer"),
        ({"scheduler": {"stable_age_s": -1}}, r"scheduler.stable_age_s must be >= 0"),
        ({"planning": {"device": "gpu"}}, r"planning.device 'gpu': allowed auto, cpu, cuda, cuda:N"),
        ({"machine": {"arc_direction": "CCW"}}, r"allowed values: \['CW', 'CC'\]"),
        ({"planning": {"arc_start": "slide"}}, r"planning.arc_start = 'slide' is not allowed; allowed values: \['sweep', 'rule'\]"),
        ({"planning": {"arc_max_mu_per_cgy": 0.5}}, r"planning.arc_max_mu_per_cgy must be in \[1, 20\]"),
        ({"planning": {"arc_mu_weight": -1.0}}, r"planning.arc_mu_weight must be in \[0, 50\]"),
        ({"planning": {"oar_mean_weight": 80.0}}, r"planning.oar_mean_weight must be in \[0, 50\]"),
        ({"profiles": [_profile(goals=[{"structure": "ptv", "metric": "D98", "comparison": ">=", "limit": 38.0}])]},
         r"profiles\[0\]\.goals\[0\]\.metric 'D98': allowed Dx%, Dxcc"),
        ({"profiles": [_profile(goals=[{"structure": "liver", "metric": "Dmean", "comparison": "<=", "limit": 1.0}])]},
         r"profiles\[0\]\.goals\[0\]\.structure 'liver': allowed \['bladder'"),
        ({"profiles": [_profile(goals=[])]}, r"profiles\[0\]\.goals is empty: every plan is judged against its goal list"),
        ({"profiles": [_profile(name="p 1")]}, r"profiles\[0\]\.name 'p 1': use 1-64 letters"),
        ({"profiles": [_profile()], "planning": {"profile": "q"}}, r"planning.profile 'q' is not a profile; known: \['p'\]"),
        ({"profiles": [_profile(), _profile(name="q")]}, r"planning.profile 'prostate_40gy_5fx' is not a profile"),
        ({"profiles": [_profile(called_ae_title="AIRT")], "planning": {"profile": "p"}}, r"must differ .* node.ae_title"),
        ({"profiles": [_profile(called_ae_title="X"), _profile(name="q", called_ae_title="X")],
          "planning": {"profile": "p"}}, r"called_ae_title must differ"),
        ({"profiles": [_profile(calling_ae_titles=["TPS"]), _profile(name="q", calling_ae_titles=["TPS"])],
          "planning": {"profile": "p"}}, r"calling AE title is listed by two profiles"),
        ({"profiles": [_profile(match_ptv_name=True), _profile(name="q", match_ptv_name=True)],
          "planning": {"profile": "p"}}, r"two profiles with match_ptv_name = true have the same dose"),
        ({"prescription": {"dose_gy": 60.0}}, r"now belong to a protocol profile; write them in a \[\[profiles\]\]"),
        ({"goals": []}, r"now belong to a protocol profile"),
        ({"scheduler": {"stable_age_s": float("nan")}}, r"scheduler.stable_age_s must be a finite number, got nan"),
        ({"worker": {"plan_timeout_s": float("inf")}}, r"worker.plan_timeout_s must be a finite number, got inf"),
        ({"profiles": [_profile(dose_gy=float("nan"))]}, r"dose_gy must be a finite number"),
        ({"structures": {"patterns": {"spleen": ["spleen"]}}}, r"unknown role 'spleen'"),
        ({"structures": {"patterns": {"ptv": ["ptv("]}}}, r"bad regular expression"),
        ({"tls": {"enabled": True}}, r"tls.enabled = true needs"),
        ({"destinations": [{"name": "a", "ae_title": "X", "host": "h"}]}, r"missing required setting\(s\) \['port'\]"),
        ({"planning": {"hu_to_density": [[0.0, 1.0], [-10.0, 0.9]]}}, r"strictly increasing HU"),
        ({"profiles": [_profile(normalisation="max")]}, r"allowed values: \['ptv_dx', 'ptv_mean', 'none'\]"),
    ],
)
def test_bad_values_are_refused_with_key_and_allowed_values(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_dict(table)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.node.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("PTV", Role.PTV), ("PTV_4000", Role.PTV), ("ptv 40", Role.PTV), ("PTV_Prostate", Role.PTV),
        ("PTV 36.25", Role.PTV), ("BLADDER", Role.BLADDER), ("Bladder", Role.BLADDER), ("Blase", Role.BLADDER),
        ("Rectum_O", Role.RECTUM), ("rectum", Role.RECTUM), ("Rektum", Role.RECTUM), ("External", Role.BODY),
        ("BODY", Role.BODY), ("Body", Role.BODY), ("Femur_Head_L", Role.FEMUR_HEAD_L),
        ("Femur_Head_R", Role.FEMUR_HEAD_R), ("FemoralHead_Left", Role.FEMUR_HEAD_L), (" Bladder ", Role.BLADDER),
    ],
)
def test_default_structure_names_map_to_roles(name: str, role: Role) -> None:
    assert StructureSettings().role_of(name) is role


@pytest.mark.parametrize("name", ["CTV", "PTV_Ring", "PTV-CTV", "Prostate", "z_PTV_opt", "Bowel_Small", "PTV∩Rectum"])
def test_helper_structures_do_not_map(name: str) -> None:
    assert StructureSettings().role_of(name) is None


def test_custom_patterns_replace_defaults() -> None:
    s = settings_from_dict({"structures": {"patterns": {"ptv": ["zielvolumen"], "bladder": ["hb"]}}})
    assert s.structures.role_of("Zielvolumen") is Role.PTV
    assert s.structures.role_of("PTV") is None


def test_config_check_command(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "config", "check", str(REFERENCE)],
        capture_output=True, text=True, check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "[node]" in ok.stdout and 'ae_title = "AIRT"' in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nprot = 104\n")
    res = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "config", "check", str(bad)],
        capture_output=True, text=True, check=False,
    )
    assert res.returncode == 2
    assert "unknown setting(s) ['prot'] in [node]" in res.stderr


def test_nan_and_inf_in_a_file_are_refused_by_config_check(tmp_path: Path) -> None:
    """TOML has nan and inf literals; ``airt config check`` refuses them, naming the key."""
    cfg = tmp_path / "airt.toml"
    cfg.write_text("[scheduler]\nstable_age_s = nan\n")
    r = subprocess.run([sys.executable, "-m", "appliance.cli", "config", "check", str(cfg)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "scheduler.stable_age_s must be a finite number, got nan" in r.stderr, r.stderr


def _minimal_profile_toml(goal_extra: str = "") -> str:
    return ('[planning]\nprofile = "p"\n\n[[profiles]]\nname = "p"\nprotocol = "test"\ndose_gy = 40.0\nfractions = 5\n\n'
            '[[profiles.goals]]\nstructure = "ptv"\nmetric = "D98%"\ncomparison = ">="\nlimit = 38.0\n' + goal_extra)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[planning]\ndose_grid_mm = nan\n", "planning.dose_grid_mm must be a finite number, got nan"),
        ("[planning]\ndose_grid_mm = inf\n", "planning.dose_grid_mm must be a finite number, got inf"),
        ("[planning]\ndose_grid_mm = -inf\n", "planning.dose_grid_mm must be a finite number, got -inf"),
        ("[planning]\nhu_to_density = [[-1000.0, nan], [0.0, 1.0]]\n",
         "planning.hu_to_density[0][1] must be a finite number, got nan"),
        (_minimal_profile_toml().replace("limit = 38.0", "limit = nan"),
         "profiles[0].goals[0].limit must be a finite number, got nan"),
    ],
)
def test_nan_and_inf_are_refused_naming_the_key(tmp_path: Path, toml: str, message: str) -> None:
    cfg = tmp_path / "airt.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"planning": {"dose_grid_mm": 0.5}}, "planning.dose_grid_mm must be in [1, 10], got 0.5"),
        ({"planning": {"aperture_threshold": 1.0}}, "planning.aperture_threshold must be in (0, 1), got 1.0"),
        ({"planning": {"ai_aperture_thresholds": [0.4, 0.0]}},
         "planning.ai_aperture_thresholds[1] must be in (0, 1), got 0.0"),
        ({"planning": {"candidate_sparings": [[0.0, 0.6]]}}, "planning.candidate_sparings[0][1] must be in [0, 0.5], got 0.6"),
        ({"planning": {"candidate_sparings": [[0.0, 0.1]] * 9}}, "planning.candidate_sparings must have at most 8 items, got 9"),
        ({"destinations": [{"name": "a", "ae_title": "X", "host": "h", "port": 0}]},
         "destinations[0].port must be a TCP port in [1, 65535], got 0"),
        ({"node": {"max_pdu_bytes": 1024}}, "node.max_pdu_bytes must be >= 4096, got 1024"),
        ({"worker": {"plan_timeout_s": 0}}, "worker.plan_timeout_s must be > 0, got 0"),
        ({"machine": {"collimator_deg": 360.0}}, "machine.collimator_deg must be in [0, 360), got 360.0"),
        ({"machine": {"arc_start_deg": 90.0, "arc_stop_deg": 90.0}},
         "machine.arc_start_deg and arc_stop_deg must differ, both are 90.0"),
        ({"profiles": [_profile(goals=[{"structure": "ptv", "metric": "D98%", "comparison": ">=", "limit": 38.0,
                                        "priority": 4}])], "planning": {"profile": "p"}},
         "profiles[0].goals[0].priority must be in [1, 3], got 4"),
        ({"storage": {"data_dir": ""}}, "storage.data_dir must not be empty"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(table)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"node": {"port": "104"}}, "node.port must be an integer, got '104'"),
        ({"node": {"port": 104.0}}, "node.port must be an integer, got 104.0"),
        ({"node": {"port": True}}, "node.port must be an integer, got true"),
        ({"worker": {"enabled": 1}}, "worker.enabled must be true or false, got 1"),
        ({"worker": {"enabled": "yes"}}, "worker.enabled must be true or false, got 'yes'"),
        ({"planning": {"dose_grid_mm": "4"}}, "planning.dose_grid_mm must be a number, got '4'"),
        ({"planning": {"dose_grid_mm": True}}, "planning.dose_grid_mm must be a number, got true"),
        ({"planning": {"device": 0}}, "planning.device must be a string, got 0"),
        ({"planning": {"ai_aperture_thresholds": 0.2}}, "planning.ai_aperture_thresholds must be a list, got 0.2"),
        ({"node": []}, "node must be a table, got a list"),
        ({"destinations": {"name": "a"}}, "destinations must be a list, got a table"),
        ({"profiles": [_profile(fractions=5.5)], "planning": {"profile": "p"}},
         "profiles[0].fractions must be an integer, got 5.5"),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_converted(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(table)
    assert str(info.value) == message


def test_an_integer_is_taken_for_a_number() -> None:
    s = settings_from_dict({"scheduler": {"stable_age_s": 10}})
    assert s.scheduler.stable_age_s == 10.0 and isinstance(s.scheduler.stable_age_s, float)


def test_unknown_key_in_a_nested_table_is_refused_with_the_known_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "airt.toml"
    cfg.write_text(_minimal_profile_toml(goal_extra="weight = 2.0\n"))
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert str(info.value) == ("unknown setting(s) ['weight'] in [profiles[0].goals[0]]; "
                               "known: ['comparison', 'limit', 'metric', 'priority', 'structure']")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['nodes'\] in the top level; known: \['delivery'"):
        settings_from_dict({"nodes": {}})


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"node": {"port": -1, "ae_title": ""}, "planning": {"dose_grid_mm": "4", "speed": 1}})
    text = str(info.value)
    assert text.startswith("4 settings are invalid:\n")
    for part in ("node.port must be a TCP port in [0, 65535], got -1", "node.ae_title '': an AE title is",
                 "planning.dose_grid_mm must be a number, got '4'", "unknown setting(s) ['speed'] in [planning]"):
        assert part in text


def test_sections_built_in_code_are_validated_too() -> None:
    """Constructing a section, and dataclasses.replace, validate it and raise ConfigError naming the field."""
    s = Settings()
    with pytest.raises(ConfigError, match=r"^PlanningSettings.dose_grid_mm must be in \[1, 10\], got 0.5$"):
        dataclasses.replace(s.planning, dose_grid_mm=0.5)
    with pytest.raises(ConfigError, match=r"^NodeSettings.acse_timeout_s must be a finite number, got nan$"):
        NodeSettings(acse_timeout_s=float("nan"))
    with pytest.raises(ConfigError, match=r"^Settings.planning.profile 'nope' is not a profile"):
        dataclasses.replace(s, planning=dataclasses.replace(s.planning, profile="nope"))
    with pytest.raises(ConfigError, match=r"^Goal.metric 'D98': allowed"):
        Goal("ptv", "D98", Comparison.AT_MOST, 1.0)
    changed = dataclasses.replace(s, machine=dataclasses.replace(s.machine, collimator_deg=10))
    assert changed.machine.collimator_deg == 10.0 and changed.node is s.node


def test_airt_sets_a_short_openmp_spin_unless_the_environment_has_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # the value libgomp reads when torch loads it: set by airt's entry point before any subcommand runs,
    # inherited by the planning processes; an administrator's own value is kept
    from appliance import cli

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["GOMP_SPINCOUNT"] == cli.OPENMP_SPIN_COUNT == "10000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "500")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["GOMP_SPINCOUNT"] == "500"
    # a planning process started from airt sees it
    monkeypatch.delenv("GOMP_SPINCOUNT")
    script = ("import os, subprocess, sys; from appliance import cli\n"
              "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
              "print(subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"GOMP_SPINCOUNT\"))'],"
              " capture_output=True, text=True).stdout.strip())")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"})
    assert r.stdout.strip().splitlines()[-1] == "10000", r.stdout + r.stderr
