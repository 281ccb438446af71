"""Regression against the nodal model: every shipped scenario's nodal results against its
golden file (tests/golden/, refreshed on purpose with `lfm-zonal golden --refresh`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lfm_zonal.study.regression import GOLDEN_KPIS, differences, nodal_kpis, read_golden
from lfm_zonal.study.scenario import builtin_scenarios, load_scenario

GOLDEN = Path(__file__).parent / "golden"


#: Shipped scenarios whose nodal market leaves a residual beyond the bounds below, checked
#: against their golden file on its own (``test_the_dso_scale_nodal_result_matches``).
#: SimBench MV+LV (5,479 buses): its nodal market leaves 0.011 p.u. of overvoltage at the
#: 20 kV buses 16160/16161, where flexibility does not suffice (0.008 p.u./MW; all but
#: 0.03-0.08 MW of the relieving offers dispatched).
WITH_A_RESIDUAL = {"simbench_mvlv_rural_pv_noon"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(builtin_scenarios()) - WITH_A_RESIDUAL))
def test_nodal_results_match_the_golden_file(name):
    expected = read_golden(GOLDEN, name)
    actual = nodal_kpis(load_scenario(name))
    assert differences(expected, actual) == []
    # The nodal market leaves (almost) nothing behind in AC on every shipped scenario.
    assert actual["residual_overload_max_percent"] <= 1.0
    assert actual["residual_voltage_max_pu"] <= 0.002
    assert actual["new_violations"] == 0


@pytest.mark.slow
def test_the_dso_scale_nodal_result_matches():
    """SimBench MV+LV's nodal market (15-25 s): the one shipped grid whose nodal rows are
    long enough to go through the feeders' equivalents (``grid.feeders``), an exact
    rewriting of the LP: its golden file is the result of the rows written step by step
    (cost 1012.806721 EUR; 1022.929399 since slacks are priced per MW of the offers they
    stand for, ``RowScales.price_factor``: the rows written step by step, LONG_ROW_STEPS
    out of reach, give the same KPIs to the last digit)."""
    name = "simbench_mvlv_rural_pv_noon"
    actual = nodal_kpis(load_scenario(name))
    assert differences(read_golden(GOLDEN, name), actual) == []
    assert actual["new_violations"] == 0 and actual["residual_overload_max_percent"] <= 1.0


def test_every_shipped_scenario_has_a_golden_file():
    """The scenarios left out above are still in ``lfm-zonal golden``: their files exist."""
    for name in builtin_scenarios():
        assert set(read_golden(GOLDEN, name)) == set(GOLDEN_KPIS), name


def test_a_drift_beyond_tolerance_is_reported():
    expected = read_golden(GOLDEN, "cigre_mv_evening_peak")
    assert set(expected) == set(GOLDEN_KPIS)
    drifted = dict(expected, cost_eur=expected["cost_eur"] * 1.001)
    lines = differences(expected, drifted)
    assert len(lines) == 1 and lines[0].startswith("cost_eur:")
    within = dict(expected, cost_eur=expected["cost_eur"] * (1 + 1e-6))
    assert differences(expected, within) == []


def test_a_missing_golden_file_is_not_to_be_made_up(tmp_path):
    """Outside the repository (no tests/golden) the check says where the files are; a
    missing file says how to record one on purpose, never to refresh blindly."""
    from lfm_zonal import InputError

    with pytest.raises(InputError, match="no such folder of golden files .* give --dir"):
        read_golden(tmp_path / "tests" / "golden", "cigre_mv_evening_peak")
    with pytest.raises(InputError, match="from results you have checked: lfm-zonal golden"):
        read_golden(tmp_path, "cigre_mv_evening_peak")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"cost_eur": ', "not a readable golden file"),
        (b"", "not a readable golden file"),
        (b"\xff\xfe", "not a readable golden file"),
        (b'{"cost_eur": "abc"}', "'cost_eur' is 'abc', not a number"),
        (b"[1, 2]", "not a golden file (a JSON object of KPIs)"),
    ],
)
def test_a_broken_golden_file_is_named_in_one_line(tmp_path, data, expected):
    from lfm_zonal import InputError

    (tmp_path / "cigre_mv_evening_peak.json").write_bytes(data)
    with pytest.raises(InputError, match=re.escape(expected)) as refused:
        read_golden(tmp_path, "cigre_mv_evening_peak")
    assert "cigre_mv_evening_peak.json" in str(refused.value)


def test_refresh_writes_into_an_existing_writable_folder_only(tmp_path, monkeypatch):
    """``golden --refresh`` outside the repository made ./tests/golden, and found a
    read-only --dir only after clearing every scenario: both refused before the first run
    (nodal_kpis would fail the test), nothing created."""
    from lfm_zonal import InputError
    from lfm_zonal.study import regression

    def no_run(scenario):
        raise AssertionError("a refused refresh cleared a market")

    monkeypatch.setattr(regression, "nodal_kpis", no_run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="no such folder of golden files"):
        regression.refresh(Path("tests/golden"), ["cigre_mv_evening_peak"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="--dir /etc is under /etc, a system folder"):
        regression.refresh(Path("/etc"), ["cigre_mv_evening_peak"])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    # As another user than root (who writes into it anyway), the folder is not writable.
    monkeypatch.setattr(regression.os, "access", lambda path, mode: Path(path) != locked)
    with pytest.raises(InputError, match="locked: the folder of golden files is not writable"):
        regression.refresh(locked, ["cigre_mv_evening_peak"])
    assert list(locked.iterdir()) == []
