"""Regression against the nodal model: every shipped scenario's nodal results against its
golden file (tests/golden/, refreshed on purpose with `lfm-zonal golden --refresh`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lfm_zonal.study.regression import GOLDEN_KPIS, differences, nodal_kpis, read_golden
from lfm_zonal.study.scenario import builtin_scenarios, load_scenario

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(builtin_scenarios()))
def test_nodal_results_match_the_golden_file(name):
    expected = read_golden(GOLDEN, name)
    actual = nodal_kpis(load_scenario(name))
    assert differences(expected, actual) == []
    # The nodal market leaves (almost) nothing behind in AC on every shipped scenario.
    assert actual["residual_overload_max_percent"] <= 1.0
    assert actual["residual_voltage_max_pu"] <= 0.002
    assert actual["new_violations"] == 0


def test_a_drift_beyond_tolerance_is_reported():
    expected = read_golden(GOLDEN, "cigre_mv_evening_peak")
    assert set(expected) == set(GOLDEN_KPIS)
    drifted = dict(expected, cost_eur=expected["cost_eur"] * 1.001)
    lines = differences(expected, drifted)
    assert len(lines) == 1 and lines[0].startswith("cost_eur:")
    within = dict(expected, cost_eur=expected["cost_eur"] * (1 + 1e-6))
    assert differences(expected, within) == []
