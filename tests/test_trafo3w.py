"""A substation with a three-winding trafo: each winding monitored as pandapower loads it,
its sensitivities against finite differences, its overload removed by the markets in AC
(checked by pandapower) at the AC OPF reference's cost, and drawn on the maps."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pandapower as pp
import pytest
from test_opf_reference import COST_RTOL, HARD_LIMITS_EUR_PER_MWH

from lfm_zonal import Horizon, InputError, load_grid, load_profiles, run_horizon
from lfm_zonal.check.ac import dispatched_net
from lfm_zonal.grid.powerflow import pandapower_loading_percent
from lfm_zonal.grid.sensitivity import (
    finite_difference_sensitivities,
    sensitivities,
    sensitivity_error,
)
from lfm_zonal.market.clearing import clear_market
from lfm_zonal.market.opf_reference import opf_reference
from lfm_zonal.market.resources import FlexibilitySpec, generate_resources
from lfm_zonal.report import plots
from lfm_zonal.report.html_map import _branches_between, zone_map_dict
from lfm_zonal.report.plots import bus_positions, not_connected
from lfm_zonal.study.results import sensitivity_labels
from lfm_zonal.zones.segmentation import prepare_segmentation

WINDINGS = ["trafo3w_hv", "trafo3w_mv", "trafo3w_lv"]
LV_WINDING = ("trafo3w_lv", 0)


def _trafo3w(net, hv: int, mv: int, lv: int, index: int | None = None, **given) -> None:
    """A 110/20/10 kV trafo3w of 25/20/5 MVA (``given`` overrides)."""
    kw = dict(
        vn_hv_kv=110, vn_mv_kv=20, vn_lv_kv=10, sn_hv_mva=25, sn_mv_mva=20, sn_lv_mva=5,
        vk_hv_percent=10, vk_mv_percent=10, vk_lv_percent=10, vkr_hv_percent=0.3,
        vkr_mv_percent=0.3, vkr_lv_percent=0.3, pfe_kw=10, i0_percent=0.1,
    )  # fmt: skip
    pp.create_transformer3w_from_parameters(net, hv, mv, lv, index=index, **(kw | given))


def _line(net, a: int, b: int, length_km: float = 1.0) -> None:
    pp.create_line_from_parameters(
        net, a, b, length_km=length_km, r_ohm_per_km=0.16, x_ohm_per_km=0.12,
        c_nf_per_km=200, max_i_ka=0.4,
    )  # fmt: skip


def _feeder(net, root: int, n: int, kv: float, load_mw: float, pv_mw: float = 0.0, km=1.0):
    """n buses in a row from ``root``, each with a load (and a PV unit of ``pv_mw``)."""
    for _ in range(n):
        bus = pp.create_bus(net, kv)
        _line(net, root, bus, km)
        pp.create_load(net, bus, p_mw=load_mw, q_mvar=0.1)
        if pv_mw:
            pp.create_sgen(net, bus, p_mw=pv_mw, type="PV")
        root = bus


def substation_3w() -> pp.pandapowerNet:
    """110 kV slack, a 110/20/10 kV trafo3w (25/20/5 MVA), a 20 kV feeder of 8 buses with
    PV and a 10 kV feeder of 6 buses with 0.9 MW loads: at the evening peak the 5 MVA LV
    winding is overloaded, and nothing else is."""
    net = pp.create_empty_network(sn_mva=1.0)
    hv, mv, lv = (pp.create_bus(net, kv) for kv in (110.0, 20.0, 10.0))
    pp.create_ext_grid(net, hv, vm_pu=1.02)
    _trafo3w(net, hv, mv, lv)
    _feeder(net, mv, 8, 20.0, 0.6, pv_mw=1.2, km=1.5)
    _feeder(net, lv, 6, 10.0, 0.9, pv_mw=0.3, km=1.5)
    return net


@pytest.fixture(scope="module")
def t3w_case():
    grid = load_grid(substation_3w())
    pf = run_horizon(grid, load_profiles(grid, Horizon(start="2016-01-14 17:00", n_mtu=12)))
    share = 0.5
    res = generate_resources(
        pf,
        FlexibilitySpec(load_up_share=share, load_down_share=share, sgen_down_share=share),
        seed=3,
    )
    worst = int(pf.loading_percent[LV_WINDING].to_numpy().argmax())
    seg = prepare_segmentation(pf, worst, flexible_capacity_mw=res.capacity_per_bus())
    return pf, res, seg, worst


def test_each_winding_is_monitored_as_pandapower_loads_it(t3w_case):
    pf, _, _, worst = t3w_case
    assert list(pf.model.branches[-3:]) == [(w, 0) for w in WINDINGS]
    loading = pf.loading_percent
    # The case: the LV winding overloaded at the peak, every line within its limit.
    assert loading[LV_WINDING].max() > 105.0
    assert loading["line"].to_numpy().max() < 100.0
    for t in (0, worst, len(pf.times) - 1):
        net = pf.operating_point(t)
        pp.runpp(net, numba=False, tolerance_mva=1e-10)
        # pandapower's own trafo3w loading is the largest of the engine's three windings.
        assert loading.iloc[t][WINDINGS].max() == pytest.approx(
            net.res_trafo3w.at[0, "loading_percent"], abs=1e-6
        )
        np.testing.assert_allclose(
            loading.iloc[t].to_numpy(),
            pandapower_loading_percent(net, pf.model.branches).to_numpy(),
            atol=1e-6,
        )
    # The overload is a violation of the base case, named by the winding.
    assert pf.violations().overloaded_branches.iloc[worst] == 1


def five_trafo3w() -> pp.pandapowerNet:
    """Five trafo3w of one slack, indices 7, 3, 5, 1, 2 (not in creation order): 7 with a
    tap on its mv side and a 21 kV mv bus; 3 out of service; 5 and 1 with an open switch
    on the mv and the hv side (their mv buses fed by lines from 7's); 2 with its tap at
    the star point, phase shifts and its losses on the lv side."""
    net = pp.create_empty_network(sn_mva=1.0)
    hv = pp.create_bus(net, 110.0)
    pp.create_ext_grid(net, hv, vm_pu=1.02)
    tap = dict(tap_pos=2, tap_neutral=0, tap_min=-5, tap_max=5, tap_changer_type="Ratio")
    mv7, lv7 = pp.create_bus(net, 21.0), pp.create_bus(net, 10.0)
    _trafo3w(net, hv, mv7, lv7, 7, tap_side="mv", tap_step_percent=1.5, **tap)
    _feeder(net, mv7, 3, 21.0, 0.8)
    _feeder(net, lv7, 3, 10.0, 0.9)
    _trafo3w(net, hv, pp.create_bus(net, 20.0), pp.create_bus(net, 10.0), 3, in_service=False)
    for index, open_at in ((5, "mv"), (1, "hv")):
        mv, lv = pp.create_bus(net, 21.0), pp.create_bus(net, 10.0)
        _trafo3w(net, hv, mv, lv, index, vn_mv_kv=21)
        pp.create_switch(net, mv if open_at == "mv" else hv, index, et="t3", closed=False)
        _line(net, mv7, mv)
        _feeder(net, lv, 2, 10.0, 0.6)
    mv2, lv2 = pp.create_bus(net, 20.0), pp.create_bus(net, 10.0)
    _trafo3w(
        net, hv, mv2, lv2, 2, loss_side="lv", shift_lv_degree=150, shift_mv_degree=30,
        tap_side="hv", tap_step_percent=1.25, tap_at_star_point=True, **(tap | {"tap_pos": -2}),
    )  # fmt: skip
    _feeder(net, mv2, 2, 20.0, 1.0)
    _feeder(net, lv2, 2, 10.0, 0.8)
    return net


def test_several_trafo3w_each_winding_as_pandapower_loads_it():
    grid = load_grid(five_trafo3w())
    pf = run_horizon(grid, load_profiles(grid, Horizon(start="2016-01-14 17:00", n_mtu=2)))
    monitored = [b for b in pf.model.branches if b[0].startswith("trafo3w")]
    # Winding by winding, in service only (an open side stays monitored: 0 % as pandapower).
    assert monitored == [(w, i) for w in WINDINGS for i in (7, 5, 1, 2)]
    for t in range(2):
        net = pf.operating_point(t)
        pp.runpp(net, numba=False, tolerance_mva=1e-10)
        np.testing.assert_allclose(
            pf.loading_percent.iloc[t].to_numpy(),
            pandapower_loading_percent(net, pf.model.branches).to_numpy(),
            atol=1e-6,
        )
        for i in (7, 5, 1, 2):
            assert pf.loading_percent.iloc[t][[(w, i) for w in WINDINGS]].max() == (
                pytest.approx(net.res_trafo3w.at[i, "loading_percent"], abs=1e-6)
            )
        assert pf.loading_percent.iloc[t][("trafo3w_mv", 5)] == 0.0  # its open side


def test_winding_sensitivities_against_finite_differences(t3w_case):
    pf, _, _, worst = t3w_case
    buses = [int(b) for b in pf.model.buses[[1, 2, 5, 14, 16]]]  # mv, lv busbars, feeders
    fd = finite_difference_sensitivities(pf, worst, buses)
    windings = fd.loading_p.index.get_level_values(0).str.startswith("trafo3w")
    assert np.abs(fd.loading_p[windings].to_numpy()).max() > 1.0  # loading moves with P
    err = sensitivity_error(sensitivities(pf, worst), fd)
    assert max(err.values()) < 1e-3


@pytest.mark.parametrize("method, k", [("nodal", None), ("zonal", 2), ("needs_based", 2)])
def test_markets_remove_the_winding_overload_in_ac(t3w_case, method, k):
    pf, res, seg, worst = t3w_case
    if method == "nodal":
        result = clear_market(pf, res, "nodal")
    else:
        zones = seg.zones(k)
        result = clear_market(
            pf, res, method, zones, weights=seg.weights, segmentation_error=seg.error(zones)
        )
    assert result.kpis["new_violations"] == 0 and result.kpis["unmet_mwh"] == 0.0
    assert result.kpis["cost_eur"] > 0
    after = result.ac.loading_percent[LV_WINDING].to_numpy()
    assert after.max() <= pf.grid.loading_max_percent + 0.01
    # pandapower's own power flow of the dispatch, as an independent truth.
    net = dispatched_net(pf, result.dispatch, worst)
    pp.runpp(net, numba=False)
    assert net.res_trafo3w.at[0, "loading_percent"] == pytest.approx(after[worst], abs=1e-4)


#: The LV winding's tap off neutral (+5 %), and its rated voltage above its bus's (10.5 kV
#: on 10 kV): pandapower loads a winding at its bus with its own vn_kv, PYPOWER limits
#: its internal branch at both ends (opf_reference._winding_limits_at_their_buses).
WINDING_CASES = {
    "neutral": {},
    "lv tap +5%": dict(
        tap_side="lv",
        tap_pos=2,
        tap_neutral=0,
        tap_step_percent=2.5,
        tap_min=-5,
        tap_max=5,
        tap_changer_type="Ratio",
    ),  # fmt: skip
    "lv winding 10.5 kV": dict(vn_lv_kv=10.5),
}


@pytest.mark.parametrize("case", list(WINDING_CASES))
def test_nodal_market_at_the_ac_optimum_of_the_winding_overload(t3w_case, case):
    pf, _, _, worst = t3w_case
    net = substation_3w()
    for column, value in WINDING_CASES[case].items():
        net.trafo3w[column] = value
    grid = load_grid(net)
    one = run_horizon(grid, load_profiles(grid, Horizon(start=str(pf.times[worst]), n_mtu=1)))
    assert one.loading_percent[LV_WINDING].iloc[0] > 103.0
    resources = generate_resources(
        one, FlexibilitySpec(load_up_share=0.5, load_down_share=0.5, sgen_down_share=0.5), seed=3
    )
    opf = opf_reference(one, resources, 0)
    assert opf.converged and opf.overload_max_percent < 1e-4
    assert opf.loading_percent[LV_WINDING] == pytest.approx(100.0, abs=1e-3)  # binding
    market = clear_market(one, resources, "nodal", penalty_eur_per_mwh=HARD_LIMITS_EUR_PER_MWH)
    assert market.kpis["cost_eur"] == pytest.approx(opf.cost_eur, rel=COST_RTOL)


def test_maps_name_and_cut_the_trafo3w(t3w_case):
    pf, _, seg, _ = t3w_case
    net = copy.deepcopy(pf.grid.net)
    mv_bus = int(net.trafo3w.at[0, "mv_bus"])
    pp.create_switch(net, mv_bus, 0, et="t3", closed=False)
    pos = {int(b): (float(b), float(b % 3)) for b in net.bus.index}
    segments, switches = not_connected(net, pos)
    hv = np.asarray(pos[int(net.trafo3w.at[0, "hv_bus"])])
    # The open mv side only: its segment and one switch, a quarter from the mv bus.
    assert len(segments) == 1 and len(switches) == 1
    assert {tuple(p) for p in segments[0]} == {tuple(hv), pos[mv_bus]}
    mv = np.asarray(pos[mv_bus])
    np.testing.assert_allclose(switches[0], mv + 0.25 * (hv - mv))
    zones = seg.zones(2)
    figure = zone_map_dict(seg.graph, pf.grid.net, zones.zone_of_bus, seg.medoids(zones), "t3w")
    hover = [t for trace in figure["data"] for t in trace.get("text") or []]
    assert any(t.startswith("trafo3w 0<br>") and "5 MVA" in t for t in hover)
    # A border between two of its buses names it (each pair of the three).
    named = _branches_between(pf.grid.net)
    assert [named[pair] for pair in ((0, 1), (0, 2), (1, 2))] == [["trafo3w 0"]] * 3


def test_winding_rows_are_the_same_in_both_representations(t3w_case):
    """The nodal market with adjoint rows (state rows, feeder equivalents) reaches the dense
    market's optimum: the winding rows' coefficients are the same either way."""
    pf, res, _, _ = t3w_case
    dense = clear_market(pf, res, "nodal", grid_rows="dense")
    adjoint = clear_market(pf, res, "nodal", grid_rows="adjoint")
    assert adjoint.kpis["cost_eur"] == pytest.approx(dense.kpis["cost_eur"], rel=1e-6)
    np.testing.assert_allclose(
        adjoint.bids.accepted_mw.to_numpy(), dense.bids.accepted_mw.to_numpy(), atol=1e-6
    )


def test_a_grid_without_geodata_is_laid_out_with_its_trafos_apart(t3w_case):
    """pandapower's graph weighs a trafo (and a trafo3w's three sides) 0 km: laid out at
    the median line's length instead, no bus lands on another and no division by zero."""
    pf, _, seg, _ = t3w_case
    assert "geo" not in pf.grid.net.bus or pf.grid.net.bus.geo.isna().all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pos = bus_positions(pf.grid.net, seg.graph)
    xy = np.array([pos[b] for b in seg.graph.nodes])
    edge = np.median([np.hypot(*np.subtract(pos[a], pos[b])) for a, b in seg.graph.edges])
    gaps = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    assert gaps[np.triu_indices(len(xy), 1)].min() > 0.3 * edge


def test_sensitivities_command_takes_a_trafo3w_as_its_windings(t3w_case):
    pf, _, _, _ = t3w_case
    branches, buses = pf.model.branches, pf.model.buses.rename("bus")
    rows, _, _ = sensitivity_labels(branches, buses, {"trafo3w": [0], "line": [2]})
    assert list(rows) == [(w, 0) for w in WINDINGS] + [("line", 2)]
    rows, _, _ = sensitivity_labels(branches, buses, {"trafo3w_lv": [0], "trafo3w": [0]})
    assert list(rows) == [LV_WINDING, ("trafo3w_hv", 0), ("trafo3w_mv", 0)]  # each row once
    # Windings not monitored (out of service): the others.
    rows, _, _ = sensitivity_labels(branches.drop(LV_WINDING), buses, {"trafo3w": [0]})
    assert list(rows) == [("trafo3w_hv", 0), ("trafo3w_mv", 0)]
    with pytest.raises(InputError, match="trafo3w:1: the grid has no monitored trafo3w 1$"):
        sensitivity_labels(branches, buses, {"trafo3w": [1]})
    with pytest.raises(InputError, match=r"types: bus, line, trafo3w, trafo3w_hv"):
        sensitivity_labels(branches, buses, {"trafo": [0]})


def test_before_after_plot_names_each_winding(t3w_case, tmp_path, monkeypatch):
    pf, res, _, worst = t3w_case
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path, laid_out=False: figures.append(fig))
    plots.plot_before_after(pf, {"nodal": clear_market(pf, res, "nodal").ac}, worst, tmp_path)
    axis = figures[0].axes[0]
    ticks = [t.get_text() for t in axis.get_xticklabels()]
    assert ticks[-3:] == ["t3hv0", "t3mv0", "t3lv0"] and ticks[0] == "l0"
    assert "trafo3w winding (t3hv, t3mv, t3lv)" in axis.get_xlabel()
