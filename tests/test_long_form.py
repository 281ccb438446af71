"""Offers that change hour by hour: the long-form resources table (one row per resource,
direction and MTU) clears in one run with each MTU's own prices."""

from __future__ import annotations

import pandas as pd
import pytest
from test_market import ac_relief_needed_mw, three_bus_feeder

from lfm_zonal import Horizon, InputError, load_grid, load_profiles, run_horizon
from lfm_zonal.market.clearing import clear_market
from lfm_zonal.market.resources import read_resources

#: A cheap in the first hour, dear in the second; B the same price in both.
LONG = """resource_id,aggregator,bus,kind,direction,time,available_mw,price_eur_per_mwh
A,agg1,2,load,up,2016-01-14 17:00,4,50
A,agg1,2,load,up,2016-01-14 18:00,4,90
B,agg2,2,load,up,2016-01-14 17:00,4,80
B,agg2,2,load,up,2016-01-14 18:00,4,80
B,agg2,2,load,up,2016-01-15 09:00,4,10
"""
ONE_ROW = """resource_id,aggregator,bus,kind,direction,p_max_mw,cost_up_eur_per_mwh,cost_down_eur_per_mwh
A,agg1,2,load,up,4,50,0
B,agg2,2,load,up,4,80,0
"""


@pytest.fixture(scope="module")
def two_hours(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long")
    profiles = folder / "profiles.csv"
    profiles.write_text("time,load_0_p_mw\n2016-01-14 17:00,6.0\n2016-01-14 18:00,6.0\n")
    grid = load_grid(three_bus_feeder(), vm_min_pu=0.9, vm_max_pu=1.1)
    horizon = Horizon(start="2016-01-14 17:00", n_mtu=2, mtu_minutes=60)
    pf = run_horizon(grid, load_profiles(grid, horizon, csv=profiles))
    return folder, pf


def clear(folder, pf, text: str, name: str):
    path = folder / name
    path.write_text(text)
    res = read_resources(path, pf)
    return res, clear_market(pf, res, "nodal")


def test_each_mtu_clears_at_its_own_prices(two_hours):
    folder, pf = two_hours
    res, result = clear(folder, pf, LONG, "long.csv")
    assert res.price_eur_per_mwh("up").tolist() == [[50.0, 80.0], [90.0, 80.0]]
    d = result.dispatch.groupby(["mtu", "resource_id"]).p_mw.sum()
    need = ac_relief_needed_mw(pf.grid.net)  # the same load in both hours
    assert set(d.index) == {(0, "A"), (1, "B")}  # the cheaper one in each hour
    assert d[(0, "A")] == pytest.approx(need, abs=2e-3)
    assert d[(1, "B")] == pytest.approx(need, abs=2e-3)
    assert result.kpis["cost_eur"] == pytest.approx((50 + 80) * need, abs=0.2)


def test_constant_prices_clear_as_the_one_row_form(two_hours):
    folder, pf = two_hours
    constant = LONG.replace(",90\n", ",50\n")
    _, long = clear(folder, pf, constant, "constant.csv")
    _, one = clear(folder, pf, ONE_ROW, "one_row.csv")
    assert long.kpis["cost_eur"] == pytest.approx(one.kpis["cost_eur"], rel=1e-9)
    pd.testing.assert_frame_equal(long.dispatch, one.dispatch)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("A,agg1,1,load,up,2016-01-14 18:00,1,50", "row 7 ('A'): aggregator, bus, kind or tan_phi"),
        ("A,agg1,2,load,up,2016-01-14 17:00,1,50", "row 7 ('A'): a second up offer in MTU 0"),
        ("S,agg1,2,storage,up,2016-01-14 17:00,1,50", "row 7 ('S'): kind 'storage'"),
        ("C,agg1,2,load,up,2016-01-14 17:00,1,inf", "row 7 ('C'): price_eur_per_mwh"),
        ("C,agg1,2,load,up,yesterday,1,5", "row 7 ('C'): time 'yesterday'"),
    ],
)
def test_a_bad_long_form_row_is_named(two_hours, row, message):
    folder, pf = two_hours
    path = folder / "bad.csv"
    path.write_text(LONG + row + "\n")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_resources(path, pf)


def test_offers_all_outside_the_horizon_are_a_warning_not_silence(two_hours, caplog):
    """Every offer row on another day (a wrong year is easy to type): the file is read, no
    resource offers anything, and a warning says why every market clears nothing."""
    folder, pf = two_hours
    other_day = LONG.replace("2016-01-14", "2020-01-14").replace("2016-01-15", "2020-01-15")
    path = folder / "other_day.csv"
    path.write_text(other_day)
    with caplog.at_level("WARNING"):
        res = read_resources(path, pf)
    assert (
        "none of its 5 offer row(s) is at an MTU of the horizon 2016-01-14 17:00:00" in caplog.text
    )
    assert res.up_mw.to_numpy().sum() == 0.0
    caplog.clear()
    path.write_text(LONG)  # one row outside: skipped without a warning
    with caplog.at_level("WARNING"):
        read_resources(path, pf)
    assert "outside the horizon" not in caplog.text
