"""Tables checked at the door (grid JSON, profiles CSV, resources CSV) and degenerate but
valid inputs that must run clean (issue 11, items 2 and 5)."""

from __future__ import annotations

import csv
import json
import logging
import warnings

import numpy as np
import pandapower as pp
import pandapower.networks as pn
import pandas as pd
import pytest

from lfm_zonal import Horizon, load_grid, load_profiles
from lfm_zonal.errors import GridError, InputError
from lfm_zonal.study.results import run_scenario
from lfm_zonal.study.scenario import parse_scenario

warnings.filterwarnings("ignore")

PEAK2 = Horizon(start="2016-01-14 17:00", n_mtu=2)


# --------------------------------------------------------------------------- grid JSON


def _set(table: str, column: str, value, index=None):
    def change(net):
        rows = net[table].index if index is None else [index]
        net[table].loc[rows, column] = value

    return change


GRID_CASES = {
    "load on unknown bus": (_set("load", "bus", 999, 3), "load 3: bus 999 is not a bus"),
    "sgen on unknown bus": (_set("sgen", "bus", 999, 2), "sgen 2: bus 999 is not a bus"),
    "zero line impedance": (
        lambda n: (_set("line", "r_ohm_per_km", 0.0)(n), _set("line", "x_ohm_per_km", 0.0)(n)),
        "line 0: zero impedance",
    ),
    "NaN reactance": (_set("line", "x_ohm_per_km", np.nan, 4), "line 4: x_ohm_per_km = nan"),
    "zero trafo rating": (_set("trafo", "sn_mva", 0.0, 0), "trafo 0: sn_mva = 0"),
    "vn_kv 0": (_set("bus", "vn_kv", 0.0, 5), "bus 5: vn_kv = 0"),
    "line length 0": (_set("line", "length_km", 0.0, 3), "line 3: length_km = 0"),
    "slack at 0 p.u.": (_set("ext_grid", "vm_pu", 0.0), "ext_grid 0: vm_pu = 0"),
    "max_i_ka 0": (_set("line", "max_i_ka", 0.0, 2), "line 2: max_i_ka = 0"),
    "max_i_ka NaN": (_set("line", "max_i_ka", np.nan, 2), "line 2: max_i_ka = nan"),
    "no ext_grid": (lambda n: n.__setitem__("ext_grid", n.ext_grid.iloc[0:0]), "no in-service"),
}


@pytest.fixture(scope="module")
def cigre_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "cigre.json"
    pp.to_json(pn.create_cigre_network_mv(with_der="pv_wind"), str(path))
    return path


def _edit_json(src, dst, table: str, edit) -> None:
    data = json.loads(src.read_text())
    frame = json.loads(data["_object"][table]["_object"])
    edit(frame)
    data["_object"][table]["_object"] = json.dumps(frame)
    dst.write_text(json.dumps(data))


@pytest.mark.parametrize("case", list(GRID_CASES))
def test_bad_grid_is_refused_naming_the_element(case, tmp_path):
    change, expected = GRID_CASES[case]
    net = pn.create_cigre_network_mv(with_der="pv_wind")
    change(net)
    path = tmp_path / "bad.json"
    pp.to_json(net, str(path))
    with pytest.raises(GridError) as err:
        load_grid(path)
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_grid_without_line_table_is_refused(cigre_json, tmp_path):
    data = json.loads(cigre_json.read_text())
    del data["_object"]["line"]
    path = tmp_path / "noline.json"
    path.write_text(json.dumps(data))
    with pytest.raises(GridError, match="switch 0 refers to unknown line 12"):
        load_grid(path)


def test_string_bus_index_is_refused(cigre_json, tmp_path):
    path = tmp_path / "strbus.json"
    _edit_json(cigre_json, path, "bus", lambda f: f["index"].__setitem__(5, "five"))
    with pytest.raises(GridError, match=r"bus index 'five' \(row 5 of the bus table\)"):
        load_grid(path)
    path = tmp_path / "strload.json"
    col = None

    def edit(frame):
        nonlocal col
        col = frame["columns"].index("bus")
        frame["data"][2][col] = "x7"

    _edit_json(cigre_json, path, "load", edit)
    with pytest.raises(GridError, match="load 2: bus 'x7' is not a bus index"):
        load_grid(path)


# --------------------------------------------------------------------------- profiles CSV

PROFILE_CASES = {
    "duplicated time": (
        "time,load_1_p_mw\n2016-01-14 17:00,1\n2016-01-14 17:00,1\n2016-01-14 17:15,1\n",
        "rows 2 and 3, column 'time'",
    ),
    "inf": ("time,load_1_p_mw\n2016-01-14 17:00,inf\n2016-01-14 17:15,1\n", "row 2, column"),
    "huge": ("time,load_1_p_mw\n2016-01-14 17:00,1\n2016-01-14 17:15,1e12\n", "row 3, column"),
    "bad time": (
        "time,load_1_p_mw\n2016-01-14 17:00,1\nyesterday,1\n",
        "row 3, column 'time': 'yesterday'",
    ),
    "time zone": (
        "time,load_1_p_mw\n2016-01-14 17:00+01:00,1\n2016-01-14 17:15+01:00,1\n",
        "time zone",
    ),
    "empty cell": ("time,load_1_p_mw\n2016-01-14 17:00,\n2016-01-14 17:15,1\n", "row 2, column"),
    "duplicated column": (
        "time,load_1_p_mw,load_1_p_mw\n2016-01-14 17:00,1,1\n2016-01-14 17:15,1,1\n",
        "'load_1_p_mw' appears twice",
    ),
    "no data row": ("time,load_1_p_mw\n", "no data row"),
    "value without header": (
        "time,load_1_p_mw,\n2016-01-14 17:00,1,\n2016-01-14 17:15,1,3\n",
        "row 3, column 3",
    ),
}


@pytest.mark.parametrize("case", list(PROFILE_CASES))
def test_bad_profiles_are_refused_naming_row_and_column(case, cigre, tmp_path):
    text, expected = PROFILE_CASES[case]
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_profiles(cigre, PEAK2, csv=path)
    assert expected in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("trailing", [",", ""])
def test_trailing_comma_and_p_only_profile(trailing, cigre, tmp_path, caplog):
    path = tmp_path / "p.csv"
    path.write_text(
        f"time,load_1_p_mw{trailing}\n2016-01-14 17:00,2.0{trailing}\n"
        f"2016-01-14 17:15,3.0{trailing}\n"
    )
    with caplog.at_level(logging.WARNING):
        prof = load_profiles(cigre, PEAK2, csv=path)
    stored = cigre.net.load.loc[1]
    assert prof.load_p_mw[1].tolist() == [2.0, 3.0]
    # Q follows P at the stored power factor, and a warning says so.
    np.testing.assert_allclose(
        prof.load_q_mvar[1], np.array([2.0, 3.0]) * stored.q_mvar / stored.p_mw
    )
    assert "stored power factor" in caplog.text
    assert prof.source == f"csv:{path}"


def test_rows_finer_than_the_mtus_are_averaged_and_a_gap_is_named(cigre, tmp_path):
    """A profiles CSV every 5 min on 15-min MTUs: each MTU takes the mean of its three rows
    (as SimBench's profiles), not the row at its start; rows 30 min apart on 15-min MTUs
    are refused naming the first start without a row and both steps."""
    path = tmp_path / "p.csv"
    times = pd.date_range("2016-01-14 17:00", periods=6, freq="5min")
    values = [1.0, 2.0, 6.0, 4.0, 4.0, 7.0]
    lines = [f"{t:%Y-%m-%d %H:%M},{v},0.5" for t, v in zip(times, values, strict=True)]
    path.write_text("time,load_1_p_mw,load_1_q_mvar\n" + "\n".join(lines[::-1]) + "\n")
    prof = load_profiles(cigre, PEAK2, csv=path)  # the rows in any order
    assert prof.load_p_mw[1].tolist() == [3.0, 5.0]
    assert prof.load_q_mvar[1].tolist() == [0.5, 0.5]
    path.write_text(
        "time,load_1_p_mw\n2016-01-14 16:30,1\n2016-01-14 17:00,1\n2016-01-14 17:30,1\n"
    )
    with pytest.raises(InputError) as err:
        load_profiles(cigre, PEAK2, csv=path)
    assert "no row at 2016-01-14 17:15:00" in str(err.value)
    assert "30 min apart, the MTUs 15 min" in str(err.value)


def test_sgen_scale_on_sgens_at_scaling_zero(tmp_path, caplog):
    net = pn.create_cigre_network_mv(with_der="pv_wind")
    net.sgen["scaling"] = 0.0
    grid = load_grid(net)
    with pytest.raises(InputError, match="sgen_scale = 3 would change nothing"):
        load_profiles(grid, PEAK2, sgen_scale=3.0)
    net.sgen.loc[0, "scaling"] = 1.0
    grid = load_grid(net)
    with caplog.at_level(logging.WARNING):
        prof = load_profiles(grid, PEAK2, sgen_scale=3.0)
    assert "scaling = 0" in caplog.text and "stay at 0 MW" in prof.source


# --------------------------------------------------------------------------- resources CSV

HEADER = (
    "resource_id,aggregator,bus,kind,direction,p_max_mw,cost_up_eur_per_mwh,"
    "cost_down_eur_per_mwh,tan_phi\n"
)


@pytest.mark.parametrize(
    "row, expected",
    [
        ("R,a,4,load,up,1,50,50,1e6", "row 2 ('R'): tan_phi must be a finite number with"),
        ("R,a,4,load,up,1,1e300,50,0", "row 2 ('R'): cost_up_eur_per_mwh must be a finite"),
        ("R,a,4,load,up,1e9,50,50,0", "row 2 ('R'): p_max_mw must be a finite number >= 0 <="),
        ("R,a,4,load,up,1,50,50,0,7", "row 2, column 10: a value without a header"),
        (
            "R,a,4,storage,both,1,50,50,0",
            "row 2 ('R'): a storage resource needs the column(s) "
            "energy_mwh, soc_init_mwh, efficiency",
        ),
    ],
)
def test_bad_resources_are_refused(row, expected, cigre_pf, tmp_path):
    from lfm_zonal.market.resources import read_resources

    path = tmp_path / "r.csv"
    header = HEADER.rstrip("\n") + ("," if row.count(",") > 8 else "") + "\n"
    path.write_text(header + row + "\n")
    with pytest.raises(InputError) as err:
        read_resources(path, cigre_pf)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_a_row_longer_than_its_header_is_refused(cigre_pf, tmp_path):
    """A decimal comma (p_max_mw 1,5) makes a row one value longer than the header: it was
    read with its last value dropped and the others shifted one column on (p_max 1, cost
    up 5 ...), without a word."""
    from lfm_zonal.market.resources import read_resources

    path = tmp_path / "r.csv"
    path.write_text(HEADER + "R,a,4,load,up,1,50,50,0\nS,a,4,load,up,1,5,120,40,0\n")
    with pytest.raises(InputError) as err:
        read_resources(path, cigre_pf)
    assert str(err.value) == (
        f"{path}, row 3: 10 values, the header has 9 columns (a decimal comma? write 1.5, not 1,5)"
    )
    # Rows counted as pandas counts them (blank lines skipped), a long quoted cell read.
    path.write_text('a,b\n"' + "x" * 200_000 + '",2\n\n3,4\n5,6,7\n')
    limit = 131_072  # the csv module's default
    csv.field_size_limit(limit)
    with pytest.raises(InputError, match=r"r.csv, row 4: 3 values, the header has 2 columns"):
        read_resources(path, cigre_pf)
    assert csv.field_size_limit() == limit  # the csv module's limit (the process's) given back
    # The same row with an empty last value (1,5 in a row of trailing commas, its neighbours
    # without): named the same way, not in pandas' tokenizer's words.
    path.write_text("a,b,c\n1,2,\n3,4,5,\n6,7,8\n")
    with pytest.raises(InputError) as err:
        read_resources(path, cigre_pf)
    assert str(err.value) == (
        f"{path}, row 3: 4 values, the header has 3 columns (a decimal comma? write 1.5, not 1,5)"
    )


def test_resources_csv_with_trailing_comma(cigre_pf, tmp_path):
    from lfm_zonal.market.resources import read_resources

    path = tmp_path / "r.csv"
    path.write_text(HEADER.rstrip("\n") + ",\nR,a,4,load,up,0.1,50,50,0,\n")
    assert list(read_resources(path, cigre_pf).table.index) == ["R"]


def test_the_cost_of_a_direction_not_offered_may_be_empty(cigre_pf, tmp_path):
    """An up-only resource needs no down cost (it was refused: 'cost_down_eur_per_mwh must
    be a finite number'); a direction offered still needs its cost. An offer above the
    penalty is counted by ``priced_above`` (the study warns: no market buys it)."""
    from lfm_zonal.market.resources import read_resources

    path = tmp_path / "r.csv"
    path.write_text(HEADER + "U,a,4,load,up,0.1,50,,0\nD,a,4,load,down,0.1,,20000,0\n")
    res = read_resources(path, cigre_pf)
    assert res.table.cost_down_eur_per_mwh["U"] == 0.0
    assert res.table.cost_up_eur_per_mwh["D"] == 0.0
    assert res.priced_above(10_000.0) == (1, 20_000.0)
    assert res.priced_above(20_000.0)[0] == 0
    path.write_text(HEADER + "B,a,4,load,both,0.1,50,,0\n")
    with pytest.raises(InputError, match="row 2 \\('B'\\): cost_down_eur_per_mwh must be"):
        read_resources(path, cigre_pf)


# --------------------------------------------------------------------------- degenerate runs


def _run(tmp_path, body: str, name: str = "case") -> pd.DataFrame:
    scenario = parse_scenario(f'name = "{name}"\n' + body, str(tmp_path / f"{name}.toml"))
    out = run_scenario(scenario, tmp_path / f"out_{name}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["horizon"]["profiles"]
    return pd.read_csv(out / "kpis.csv")


CIGRE_PEAK = (
    '[grid]\nsource = "cigre_mv"\n[horizon]\nstart = "2016-01-14 17:00"\nn_mtu = 1\n'
    "[profiles]\nload_scale = 1.25\n[zones]\nk = [2]\n"
)


def test_quiet_hour_clears_to_nothing(tmp_path):
    body = '[grid]\nsource = "cigre_mv"\n[horizon]\nstart = "2016-01-14 03:00"\nn_mtu = 1\n'
    kpis = _run(tmp_path, body + "[zones]\nk = [1]\n")
    assert (kpis.activated_mwh == 0).all() and (kpis.unmet_mwh == 0).all()


@pytest.mark.parametrize(
    "flex",
    [
        "load_up_share = 0\nload_down_share = 0\nsgen_down_share = 0\n",  # no flexibility
        "load_up_share = 0\nload_down_share = 0.2\nsgen_down_share = 0.2\n",  # only down
    ],
)
def test_need_without_useful_offers_is_reported_unmet(flex, tmp_path):
    kpis = _run(tmp_path, CIGRE_PEAK + "[flexibility]\n" + flex)
    assert (kpis.activated_mwh == 0).all()
    assert (kpis.unmet_mwh > 0).all()


def test_zero_loads_run(tmp_path):
    body = CIGRE_PEAK.replace("load_scale = 1.25", "load_scale = 0")
    kpis = _run(tmp_path, body)
    assert np.isfinite(kpis.cost_eur).all()


def test_one_bus_with_flexibility_and_price_cap(tmp_path):
    """One resource at one bus priced above the penalty: no market buys it."""
    res = tmp_path / "r.csv"
    res.write_text(HEADER + "R,a,1,load,up,2,50000,50000,0\n")
    body = CIGRE_PEAK + f'[flexibility]\ncsv = "{res}"\n[market]\npenalty_eur_per_mwh = 10000\n'
    kpis = _run(tmp_path, body)
    assert (kpis.activated_mwh == 0).all() and (kpis.cost_eur == 0).all()
    assert (kpis.unmet_mwh > 0).all()
    res.write_text(HEADER + "R,a,1,load,up,2,50,50,0\n")
    kpis = _run(tmp_path, body, "cheap")
    assert (kpis.activated_mwh > 0).all()


def test_profiles_csv_is_named_in_the_summary(tmp_path):
    prof = tmp_path / "p.csv"
    prof.write_text("time,load_1_p_mw\n2016-01-14 17:00,5\n")
    body = (
        '[grid]\nsource = "cigre_mv"\n[horizon]\nstart = "2016-01-14 17:00"\nn_mtu = 1\n'
        f'[profiles]\ncsv = "{prof}"\n[zones]\nk = [1]\n[market]\nmethods = ["nodal"]\n'
    )
    scenario = parse_scenario('name = "c"\n' + body, str(tmp_path / "c.toml"))
    out = run_scenario(scenario, tmp_path / "out")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["horizon"]["profiles"] == f"csv:{prof}"
    assert summary["grid"]["profiles"] == f"csv:{prof}"


def _one_bus_grid(path, vm_pu: float, dead_branches: bool = False) -> None:
    """One slack bus, a second bus merged into it by a closed bus-bus switch, a load and
    a PV unit, and no line or trafo: nothing to monitor. A third bus, connected to nothing,
    holds a load that no power reaches. ``dead_branches``: in-service branches among buses
    no power reaches (a line from the third bus, a trafo3w behind it), monitored by none."""
    net = pp.create_empty_network(name="one_bus")
    b0 = pp.create_bus(net, vn_kv=20.0)
    b1 = pp.create_bus(net, vn_kv=20.0)
    b2 = pp.create_bus(net, vn_kv=20.0)
    pp.create_switch(net, b0, b1, et="b")
    pp.create_ext_grid(net, b0, vm_pu=vm_pu)
    pp.create_load(net, b1, p_mw=1.0, q_mvar=0.2)
    pp.create_load(net, b2, p_mw=0.4, q_mvar=0.1)
    pp.create_sgen(net, b0, p_mw=0.5)
    if dead_branches:
        b3, b4, b5 = (pp.create_bus(net, vn_kv=kv) for kv in (20.0, 10.0, 0.4))
        pp.create_line(net, b2, b3, 1.0, std_type="NA2XS2Y 1x95 RM/25 12/20 kV")
        pp.create_transformer3w(net, b3, b4, b5, std_type="63/25/38 MVA 110/20/10 kV")
    pp.to_json(net, str(path))


@pytest.mark.parametrize("dead_branches", [False, True])
def test_grid_with_nothing_to_monitor_runs(tmp_path, caplog, dead_branches):
    """No line or trafo (or none that power reaches): pandapower skips its power flow; the
    run still clears (to nothing), every energised bus sits at the slack's set voltage, no
    KPI is NaN, and the load that no power reaches is named."""
    grid = tmp_path / "one_bus.json"
    _one_bus_grid(grid, vm_pu=1.0, dead_branches=dead_branches)
    body = f'[grid]\nsource = "{grid}"\n[horizon]\nstart = "2016-01-14 17:00"\nn_mtu = 2\n'
    with caplog.at_level(logging.WARNING):
        kpis = _run(tmp_path, body + "[zones]\nk = [1]\n")
    assert "1 in-service load(s) have no path to the slack" in caplog.text
    assert "load 1 at bus 2" in caplog.text
    assert list(kpis.method) == ["nodal", "zonal", "needs_based"]
    assert (kpis.activated_mwh == 0).all() and (kpis.unmet_mwh == 0).all()
    assert np.allclose(kpis.vm_min_after_pu, 1.0) and np.allclose(kpis.vm_max_after_pu, 1.0)
    assert kpis.notna().all().all()


def test_grid_with_nothing_to_monitor_reports_a_slack_voltage_out_of_band(tmp_path):
    """A slack set at 1.07 p.u. is out of the 0.95-1.05 band and no flexibility moves it:
    every market reports it as unmet, on both pandapower buses."""
    grid = tmp_path / "one_bus.json"
    _one_bus_grid(grid, vm_pu=1.07)
    body = f'[grid]\nsource = "{grid}"\n[horizon]\nstart = "2016-01-14 17:00"\nn_mtu = 2\n'
    kpis = _run(tmp_path, body + "[zones]\nk = [1]\n")
    assert np.allclose(kpis.vm_max_after_pu, 1.07)
    assert (kpis.activated_mwh == 0).all() and (kpis.unmet_mwh > 0).all()
    assert np.allclose(kpis.residual_voltage_max_pu, 0.02)


def test_a_resources_column_twice_is_named(cigre_pf, tmp_path):
    from lfm_zonal.market.resources import read_resources

    path = tmp_path / "r.csv"
    path.write_text(HEADER.rstrip("\n") + ",bus\nR,a,4,load,up,0.1,50,50,0,4\n")
    with pytest.raises(InputError, match=f"^{path}: column 'bus' appears twice$"):
        read_resources(path, cigre_pf)
