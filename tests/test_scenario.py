"""Scenario files: every mistake is named by key."""

from __future__ import annotations

import pytest

from lfm_zonal import Horizon, InputError
from lfm_zonal.grid.sources import simbench_codes
from lfm_zonal.study.scenario import (
    builtin_scenarios,
    load_scenario,
    parse_scenario,
    validate_values,
)

#: The DSO-scale built-in scenario (issue 13), too slow to run end to end in the test suite
#: (``lfm-zonal run`` 2.5-3 min, 2 GB peak RSS on the shared 2-core machine; README).
MVLV = "simbench_mvlv_rural_pv_noon"


def test_builtin_scenarios_are_valid():
    for name in builtin_scenarios():
        assert load_scenario(name).name == name


def test_mvlv_scenario_is_the_simbench_mvlv_grid_over_eight_midday_mtus():
    """The file of the MV+LV scenario loads and validates, names SimBench's 5,479-bus MV+LV
    rural grid, and its horizon is the 8 MTUs from 10:00 on 29 May 2016 (the PV overloads),
    which keeps its run to minutes. Its results are in the README, not run here."""
    assert MVLV in builtin_scenarios()
    s = load_scenario(MVLV)
    assert s.name == MVLV and s.path == f"builtin:{MVLV}"
    assert validate_values(s.values, s.path) == s.values
    assert s.config.values() == s.values
    assert s["grid"]["source"] == "1-MVLV-rural-all-0-sw"
    assert s["grid"]["source"] in simbench_codes()  # a SimBench code, not a file name
    h = s["horizon"]
    times = Horizon(start=h["start"], n_mtu=h["n_mtu"], mtu_minutes=h["mtu_minutes"]).times
    assert [t.strftime("%Y-%m-%d %H:%M") for t in (times[0], times[-1])] == [
        "2016-05-29 10:00",
        "2016-05-29 11:45",
    ]
    assert len(times) == 8 and h["mtu_minutes"] == 15
    assert s["profiles"]["sgen_scale"] == 2.2
    assert s["zones"]["k"] == [1, 4, 16, 64]
    assert s["market"]["methods"] == ["nodal", "zonal", "needs_based"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[grid]\nsource = "cigre_mv"\nvm_min = 0.9', "unknown key 'grid.vm_min'"),
        (
            '[grid]\nsource = "cigre_mv"\n[horizon]\nn_mtu = "96"',
            "'horizon.n_mtu' must be of type int",
        ),
        ('[grid]\nsource = "cigre_mv"\n[horizon]\nn_mtu = 0', "'horizon.n_mtu' must be > 0"),
        ("[grid]\nvm_min_pu = 0.9", "missing key 'grid.source'"),
        ('[grids]\nsource = "x"', "unknown section [grids]"),
        ('[grid]\nsource = "cigre_mv"\nvm_min_pu = 1.1', "must be below 'grid.vm_max_pu'"),
        (
            '[grid]\nsource = "cigre_mv"\n[sensitivity]\nmethod = "ptdf"',
            "'sensitivity.method' must be one of",
        ),
        ("[grid\nsource=", "not valid TOML"),
    ],
)
def test_bad_scenarios_name_the_key(text, message):
    with pytest.raises(InputError, match="^case.toml: ") as info:
        parse_scenario(text, "case.toml")
    assert message in str(info.value)
