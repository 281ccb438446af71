"""The typed model of every input (lfm_zonal.config): bounds, defaults, schema text, import cost."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lfm_zonal import InputError
from lfm_zonal import config as C
from lfm_zonal.study.scenario import (
    SCHEMA,
    builtin_scenarios,
    load_scenario,
    parse_scenario,
    validate_values,
)
from lfm_zonal.tender.sizing import load_parameters

GRID = '[grid]\nsource = "cigre_mv"\n'
SIMBENCH = '[grid]\nsource = "1-MV-rural--0-sw"\n'
README = Path(__file__).resolve().parents[1] / "scenarios" / "README.md"


def refused(text: str) -> str:
    with pytest.raises(InputError) as info:
        parse_scenario(text, "case.toml")
    message = str(info.value)
    assert message.startswith("case.toml: ")
    assert len(message.splitlines()) == 1
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # inf and NaN anywhere
        (GRID + "vm_max_pu = inf", "'grid.vm_max_pu' must be finite, got inf"),
        (GRID + "vm_min_pu = nan", "'grid.vm_min_pu' must be finite, got nan"),
        (GRID + "loading_max_percent = -inf", "'grid.loading_max_percent' must be finite"),
        (GRID + "[profiles]\nload_scale = nan", "'profiles.load_scale' must be finite"),
        (GRID + "[flexibility]\ncost_load_up = [inf, 0]", "'flexibility.cost_load_up[0]' must be"),
        (GRID + "[flexibility]\ncost_storage = [80, nan]", "'flexibility.cost_storage[1]' must be"),
        (GRID + "[flexibility]\nstorage_p_mw = inf", "'flexibility.storage_p_mw' must be finite"),
        (GRID + "[market]\npenalty_eur_per_mwh = inf", "'market.penalty_eur_per_mwh' must be"),
        # physics and meaning
        (
            GRID + "[flexibility]\nstorage_efficiency = 0",
            "'flexibility.storage_efficiency' must be in (0, 1]",
        ),
        (
            GRID + "[flexibility]\nstorage_efficiency = 1.2",
            "'flexibility.storage_efficiency' must be in (0, 1]",
        ),
        (
            GRID + "[flexibility]\nload_up_share = -0.1",
            "'flexibility.load_up_share' must be in [0, 1]",
        ),
        (GRID + "[flexibility]\nstorage_hours = 0", "'flexibility.storage_hours' must be > 0"),
        (
            GRID + "vm_min_pu = 1.05\nvm_max_pu = 1.05",
            "'grid.vm_min_pu' must be below 'grid.vm_max_pu'",
        ),
        (GRID + "vm_min_pu = 1.1", "'grid.vm_min_pu' must be below 'grid.vm_max_pu' (1.05)"),
        (GRID + "vm_max_pu = 0", "'grid.vm_max_pu' must be > 0"),
        (
            GRID + "[flexibility]\ncost_load_up = [0, 10]",
            "'flexibility.cost_load_up' must be [mean",
        ),
        (
            GRID + "[flexibility]\ncost_load_up = [120]",
            "'flexibility.cost_load_up' must have at least 2",
        ),
        (GRID + "[zones]\nk = [0, 2]", "'zones.k[0]' must be > 0"),
        (GRID + "[zones]\nk = []", "'zones.k' must have at least 1 entries"),
        (
            GRID + "[zones]\nreference_mtu = 96",
            "'zones.reference_mtu' must be below 'horizon.n_mtu' (96)",
        ),
        (
            GRID + "[zones]\nreference_mtu = 'noon'",
            '\'zones.reference_mtu\' must be "worst", "peak" or an MTU',
        ),
        (
            GRID + "[zones]\nreference_mtu = -1",
            '\'zones.reference_mtu\' must be "worst", "peak" or an MTU',
        ),
        (
            GRID + "[market]\nmethods = ['nodal', 'nodal']",
            "'market.methods' must name each method once",
        ),
        (GRID + "[market]\nmethods = ['lmp']", "'market.methods[0]' must be one of nodal, zonal"),
        ("seed = -1\n" + GRID, "'seed' must be >= 0, got -1"),
        # prices: one cap (the penalty), and nothing beyond any sane bound
        (
            GRID + "[market]\npenalty_eur_per_mwh = 1e300",
            "'market.penalty_eur_per_mwh' must be <= 1e+06",
        ),
        (
            GRID + "[flexibility]\ncost_load_up = [1e300, 0]",
            "'flexibility.cost_load_up[0]' must be <= 1e+06",
        ),
        (
            GRID + "[flexibility]\ncost_sgen_down = [20000.0, 10.0]",
            "'flexibility.cost_sgen_down' must have a mean below 'market.penalty_eur_per_mwh' (10000)",
        ),
        (
            GRID + "[market]\npenalty_eur_per_mwh = 100",
            "'flexibility.cost_load_up' must have a mean below 'market.penalty_eur_per_mwh' (100)",
        ),
        # counts that would exhaust the machine
        (GRID + "[horizon]\nn_mtu = 1000000000", "'horizon.n_mtu' must be <= 35136"),
        (GRID + "[horizon]\nn_mtu = 0", "'horizon.n_mtu' must be > 0"),
        (GRID + "[horizon]\nmtu_minutes = 1000000000", "'horizon.mtu_minutes' must be <= 1440"),
        (
            GRID + "[flexibility]\nunits_per_element = 1000000",
            "'flexibility.units_per_element' must be <= 100",
        ),
        (
            GRID + "[flexibility]\nn_aggregators = 1000000000",
            "'flexibility.n_aggregators' must be <= 1000",
        ),
        (
            GRID + "[flexibility]\nstorage_units = 1000000000",
            "'flexibility.storage_units' must be <= 10000",
        ),
        (GRID + "[flexibility]\nmax_steps = 0", "'flexibility.max_steps' must be > 0"),
        (GRID + "[zones]\nk = [1000000000]", "'zones.k[0]' must be <= 100000"),
        # dates
        (GRID + "[horizon]\nstart = ''", "'horizon.start' must be a date and time such as"),
        (GRID + "[horizon]\nstart = '   '", "'horizon.start' must be a date and time such as"),
        (GRID + "[horizon]\nstart = 'yesterday'", "'horizon.start' must be an ISO date and time"),
        (
            GRID + "[horizon]\nstart = '3000-01-01 00:00'",
            "'horizon.start' must lie between 1678-01-01",
        ),
        (GRID + "[horizon]\nstart = '1500-01-01'", "'horizon.start' must lie between 1678-01-01"),
        (
            GRID + "[horizon]\nstart = '2261-12-31 23:00'",
            "'horizon.n_mtu' x 'horizon.mtu_minutes' (15) from 2261-12-31 23:00 ends after 2262",
        ),
        (
            SIMBENCH + "[horizon]\nstart = '2016-04-16 00:00+02:00'",
            "'horizon.start' must have no time zone on the SimBench grid 1-MV-rural--0-sw",
        ),
        # types, unknown and missing keys
        (GRID + "[horizon]\nn_mtu = true", "'horizon.n_mtu' must be of type int, got True"),
        (GRID + "[horizon]\nn_mtu = 4.0", "'horizon.n_mtu' must be of type int, got 4.0"),
        (GRID + "vm_min_pu = '0.9'", "'grid.vm_min_pu' must be of type float, got '0.9'"),
        (GRID + "[horizon]\nstart = 2016-01-14", "'horizon.start' must be of type str"),
        ('[grid]\nsource = ""', "'grid.source' must not be empty"),
        ("[grid]\nsource = 5", "'grid.source' must be of type str, got 5"),
        ('grid = "cigre_mv"', "'grid' must be a table, got 'cigre_mv'"),
        (
            '[horizon]\nn_mtu = 4\n[grid]\nsource = "cigre_mv"\nvm_mn_pu = 0.9',
            "unknown key 'grid.vm_mn_pu'",
        ),
        ("[horizon]\nn_mtu = 4", "missing key 'grid.source'"),
        ('[grids]\nsource = "x"', "unknown section [grids] (known: grid, horizon,"),
        ("title = 'x'\n" + GRID, "unknown key 'title' (known here: name, description, seed)"),
    ],
)
def test_bad_numbers_are_refused_in_one_line_naming_the_key(text, expected):
    assert expected in refused(text)


def test_several_problems_report_the_first_and_count_the_rest():
    message = refused(GRID + "vm_max_pu = inf\n[horizon]\nn_mtu = 0\nmtu_minutes = -1")
    assert "'grid.vm_max_pu' must be finite" in message and "(and 2 more problems)" in message


@pytest.mark.parametrize(
    "text",
    [
        GRID + "[horizon]\nstart = '2016-01-14'",
        GRID + "[horizon]\nstart = '2016-01-14T06:30:00+01:00'",  # a zone is fine off SimBench
        GRID + "[zones]\nreference_mtu = 95",
        GRID + "[flexibility]\nstorage_efficiency = 1\nload_up_share = 0",
        GRID + "[market]\npenalty_eur_per_mwh = 1e6",
        SIMBENCH + "[horizon]\nstart = '2016-04-16 00:00'",
    ],
)
def test_edge_values_within_bounds_are_accepted(text):
    parse_scenario(text, "case.toml")


def test_defaults_round_trip():
    scenario = parse_scenario(GRID, "case.toml")
    expected = {section: dict(keys) for section, keys in C.DEFAULTS.items()}
    expected["grid"]["source"] = "cigre_mv"
    assert scenario.values == expected
    # The values of a scenario validate to themselves, and the typed model dumps them back.
    for name in builtin_scenarios():
        s = load_scenario(name)
        assert validate_values(s.values, s.path) == s.values
        assert s.config.values() == s.values
        assert s.config.grid.vm_min_pu == s["grid"]["vm_min_pu"]
    # Defaults are copies: a scenario that changes its list does not change the next one.
    scenario["zones"]["k"].append(99)
    assert parse_scenario(GRID, "other.toml")["zones"]["k"] == [1, 2, 4, 8]
    # The legacy SCHEMA table reads the same defaults and types.
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            assert spec.default == C.DEFAULTS[section].get(key)
    assert SCHEMA["horizon"]["n_mtu"].kind is int and SCHEMA["zones"]["k"].kind is list
    assert SCHEMA["zones"]["reference_mtu"].kind == (str, int)


def test_schema_text_lists_every_key_with_its_default_and_bounds():
    text = C.schema_text()
    for section in C.SECTIONS:
        if section:
            assert f"[{section}]" in text
        for key in C.section_fields(section):
            assert re.search(rf"^  {key}\s", text, re.M), key
    assert re.search(r"^  n_mtu\s+int\s+default 96 .*<= 35136", text, re.M)
    assert re.search(r"^  source\s+str\s+required", text, re.M)
    assert "grid.vm_min_pu < grid.vm_max_pu" in text
    # The README documents every key too.
    readme = README.read_text(encoding="utf-8")
    for section in C.SECTIONS:
        for key in C.section_fields(section):
            assert re.search(rf"^{key}\s*=", readme, re.M), f"README lacks {section}.{key}"


def test_cli_overrides_are_parsed_by_the_model():
    values = C.with_overrides(
        {"grid": {"source": "cigre_mv"}},
        {("horizon", "n_mtu"): "4", ("zones", "k"): 3, ("grid", "vm_max_pu"): None},
    )
    checked = validate_values(values, "command line")
    assert checked["horizon"]["n_mtu"] == 4 and checked["zones"]["k"] == [3]
    with pytest.raises(InputError, match=r"^command line: 'horizon.n_mtu' must be of type int"):
        C.with_overrides({}, {("horizon", "n_mtu"): "many"})
    infinite = C.with_overrides({"grid": {"source": "cigre_mv"}}, {("grid", "vm_max_pu"): "inf"})
    with pytest.raises(InputError, match=r"^command line: 'grid.vm_max_pu' must be finite"):
        validate_values(infinite, "command line")


def test_cli_refuses_a_bad_number_in_one_line(capsys, tmp_path, monkeypatch):
    from lfm_zonal.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["powerflow", "--vm-max-pu", "inf"]) == 2
    err = capsys.readouterr().err
    assert "'grid.vm_max_pu' must be finite, got inf" in err and len(err.splitlines()) == 1
    assert main(["powerflow", "--start", ""]) == 2
    assert "'horizon.start' must be a date and time" in capsys.readouterr().err
    assert main(["scenarios", "--schema"]) == 0
    assert capsys.readouterr().out.strip() == C.schema_text().strip()


# ----------------------------------------------------------------------------- tender parameters


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"sigma_mw": "inf"}, "'sigma_mw' must be finite, got inf"),
        ({"sigma_mu_mw": "nan"}, "'sigma_mu_mw' must be finite, got nan"),
        ({"mu_mu_mw": "1e300"}, "'mu_mu_mw' must be <= 100000"),
        ({"points_per_offer": "1000000"}, "'points_per_offer' must be <= 1000"),
        ({"points_per_offer": "0"}, "'points_per_offer' must be >= 1"),
        (
            {"bid_size_ratio": "0.01", "points_per_offer": "200"},
            "'points_per_offer' x 750 bids per node gives 150000 candidate quantities",
        ),
        ({"bid_size_ratio": "1e-9"}, "'bid_size_ratio' gives 7500000000 bids per node"),
        ({"p_av_std_ratio": "1e9"}, "'p_av_std_ratio' must be <= 10"),
        ({"mc_samples": "1000000000000"}, "'mc_samples' must be <= 10000000"),
        ({"voll_eur_per_mwh": "1e300"}, "'voll_eur_per_mwh' must be <= 1e+06"),
        ({"utilisation": "0"}, "'utilisation' must be in (0, 1]"),
        ({"skewness": "0.995"}, "'skewness' must be in (-0.99, 0.99)"),
        ({"skewness": "0.5", "kurtosis": "4"}, "set either 'skewness'"),
        ({"kurtosis": "2"}, "'kurtosis' must be >= 3"),  # a Student t: never flatter
        ({"truncation": "cut"}, "'truncation' must be one of resample, clip"),
        ({"w_on_voll": "maybe"}, "'w_on_voll' must be of type bool"),
        ({"points_per_offer": "3.5"}, "'points_per_offer' must be of type int"),
    ],
)
def test_bad_tender_parameters_are_refused_in_one_line(overrides, expected):
    with pytest.raises(InputError) as info:
        load_parameters(None, overrides)
    message = str(info.value)
    assert message.startswith("command line: ") and expected in message
    assert len(message.splitlines()) == 1


def test_tender_parameters_from_files_and_code():
    table1 = load_parameters("table1")
    assert table1 == C.TenderParameters()  # table1.toml repeats the defaults
    assert load_parameters(None, {"w_on_voll": "off", "points_per_offer": "8"}).w_on_voll is False
    with pytest.raises(InputError, match=r"^tender parameters: 'gini' must be in \[0, 1\)"):
        table1.replace(gini=1.0)
    with pytest.raises(InputError, match=r"^tender parameters: 'sigma_mw' must be finite"):
        C.TenderParameters(sigma_mw=float("inf"))
    assert "mc_samples" in C.tender_schema_text()


def test_tender_file_errors_name_the_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("sigma_mw = inf\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: 'sigma_mw' must be finite"):
        load_parameters(path)
    path.write_text("sigma_mw = 2.0\n")
    with pytest.raises(InputError, match=r"^command line: 'sigma_mw' must be >= 0"):
        load_parameters(path, {"sigma_mw": "-1"})


# ----------------------------------------------------------------------------- import cost


HEAVY = {"pyomo", "highspy", "pandapower", "pandas", "numpy", "scipy", "simbench", "numba"}


def _imported(command: list[str]) -> set[str]:
    """Top-level packages a Python command imports (``-X importtime``)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *command], capture_output=True, text=True, check=True
    )
    return {
        line.split("|")[-1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def test_config_imports_nothing_heavy():
    modules = _imported(["-c", "import lfm_zonal.config"])
    assert not modules & HEAVY, sorted(modules & HEAVY)


def test_help_imports_nothing_heavy():
    """``lfm-zonal --help`` and a subcommand's help answer before any numerical library
    loads (about 0.15 s)."""
    for argv in (["--help"], ["run", "--help"], ["sweep", "--help"]):
        modules = _imported(["-m", "lfm_zonal.cli", *argv])
        assert not modules & HEAVY, (argv, sorted(modules & HEAVY))


def test_stage_modules_take_their_options_from_config():
    from lfm_zonal.grid import sensitivity
    from lfm_zonal.market import clearing as market
    from lfm_zonal.market import strategies as clearing
    from lfm_zonal.zones import segmentation

    assert market.MARKET_METHODS is C.MARKET_METHODS and market.PRICING is C.PRICING
    assert market.NEEDS_RULES is C.NEEDS_RULES
    assert sensitivity.SENSITIVITY_METHODS is C.SENSITIVITY_METHODS
    assert segmentation.SEGMENTATION_METHODS is C.SEGMENTATION_METHODS
    assert segmentation.WEIGHT_POLICIES is C.WEIGHT_POLICIES
    assert clearing.DEFAULT_PENALTY_EUR_PER_MWH == C.DEFAULTS["market"]["penalty_eur_per_mwh"]


def test_defaults_left_in_stage_modules_agree_with_config():
    """Stage modules take their defaults from the config (a number written out again there
    would drift)."""
    import dataclasses

    from lfm_zonal.grid import profiles
    from lfm_zonal.grid import sources as grids
    from lfm_zonal.market import bids, resources

    assert grids.DEFAULT_VM_MIN_PU == C.DEFAULTS["grid"]["vm_min_pu"]
    assert grids.DEFAULT_VM_MAX_PU == C.DEFAULTS["grid"]["vm_max_pu"]
    assert grids.DEFAULT_LOADING_MAX_PERCENT == C.DEFAULTS["grid"]["loading_max_percent"]
    assert profiles.DEFAULT_START == C.DEFAULTS["horizon"]["start"]
    horizon = profiles.Horizon()
    assert (horizon.n_mtu, horizon.mtu_minutes) == (
        C.DEFAULTS["horizon"]["n_mtu"],
        C.DEFAULTS["horizon"]["mtu_minutes"],
    )
    assert bids.DEFAULT_MAX_STEPS == C.DEFAULTS["flexibility"]["max_steps"]
    spec = dataclasses.asdict(resources.FlexibilitySpec())
    for key, value in spec.items():
        expected = C.DEFAULTS["flexibility"][key]
        assert (list(value) if isinstance(value, tuple) else value) == expected, key
