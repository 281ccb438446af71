"""Scenario files: every mistake is named by key."""

from __future__ import annotations

import pytest

from lfm_zonal import InputError
from lfm_zonal.study.scenario import builtin_scenarios, load_scenario, parse_scenario


def test_builtin_scenarios_are_valid():
    for name in builtin_scenarios():
        assert load_scenario(name).name == name


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
