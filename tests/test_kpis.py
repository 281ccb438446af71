"""Residual KPIs after the AC check: one tolerance, non-converged MTUs, the security-adjusted
cost (hand-computed), and violations the offers cannot fix named with their unmet need."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandapower as pp
import pandas as pd
import pytest
from test_market import clear_on, feeder_case, market_case, three_bus_feeder

from lfm_zonal import Horizon, load_grid, load_profiles, run_horizon
from lfm_zonal.check.ac import ACCheck, ac_check, residual_violations, violation_kpis
from lfm_zonal.check.kpis import KPI_NAMES, markdown_table
from lfm_zonal.config import DEFAULT_PENALTY_EUR_PER_MWH
from lfm_zonal.errors import LfmError
from lfm_zonal.grid.violations import VIOLATION_TOLERANCE_LOADING_PERCENT, VIOLATION_TOLERANCE_VM_PU
from lfm_zonal.market.clearing import clear_market
from lfm_zonal.market.resources import FlexibilitySpec, generate_resources, read_resources
from lfm_zonal.study.report import residual_warnings
from lfm_zonal.zones.segmentation import prepare_segmentation

HEADER = (
    "resource_id,aggregator,bus,kind,direction,p_max_mw,cost_up_eur_per_mwh,"
    "cost_down_eur_per_mwh,energy_mwh,soc_init_mwh,efficiency\n"
)


def line1_loading(net: pp.pandapowerNet, bus: int | None = None, dp_mw: float = 0.0) -> float:
    """AC loading of line 1 with dp_mw more net injection at ``bus`` (pandapower runpp)."""
    n = copy.deepcopy(net)
    if bus is not None:
        pp.create_sgen(n, bus, p_mw=dp_mw)
    pp.runpp(n, tolerance_mva=1e-10, numba=False)
    return float(n.res_line.at[1, "loading_percent"])


def assert_finite_kpis(kpis: dict) -> None:
    for key, value in kpis.items():
        if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            assert np.isfinite(value), (key, value)


# ----------------------------------------------------------------------------- hand-computed


def test_security_adjusted_cost_is_hand_computed(tmp_path):
    """One offer dearer than the penalty: nothing is bought, so the residual is the base-case
    overload of line 1, in MW-equivalent over its largest nodal sensitivity (central finite
    differences of runpp)."""
    pf, res, seg = feeder_case(tmp_path, HEADER + "A,agg1,2,load,up,4,1000000,0,,,\n")
    net = pf.grid.net
    loading = line1_loading(net)
    assert loading > 110
    h = 1e-3
    g = max(
        abs(line1_loading(net, bus, h) - line1_loading(net, bus, -h)) / (2 * h) for bus in (1, 2)
    )
    residual_mw = (loading - 100.0) / g  # one MTU of one hour: MWh = MW
    result = clear_market(pf, res, "nodal")
    k = result.kpis
    assert k["cost_eur"] == 0.0
    assert k["residual_mwh"] == pytest.approx(residual_mw, rel=1e-5)
    assert k["security_adjusted_cost_eur"] == pytest.approx(
        DEFAULT_PENALTY_EUR_PER_MWH * residual_mw, rel=1e-5
    )
    # A penalty of the scenario is the one that prices it.
    k2 = clear_market(pf, res, "nodal", penalty_eur_per_mwh=5000.0).kpis
    assert k2["security_adjusted_cost_eur"] == pytest.approx(5000.0 * residual_mw, rel=1e-5)
    # The unmet need agrees with the AC check: never 0 while line 1 stays overloaded.
    assert k["unmet_mwh"] >= residual_mw * (1 - 1e-9)
    row = result.residual.iloc[0]
    assert (row.element_type, row.element, row.violation) == ("line", 1, "overload")
    assert row.excess == pytest.approx(loading - 100.0, abs=1e-5)
    assert row.sensitivity_per_mw == pytest.approx(g, rel=1e-5)
    assert not bool(row.offers_exhausted) and row.relieving_offered_mw == pytest.approx(4.0)
    # Left: 4 MW at bus 2, the most effective bus (bus 1 does not move line 1).
    assert row.relief_left == pytest.approx(4.0 * g, rel=1e-5)
    assert not bool(row.offers_short)
    # Nothing bought: the market's model (linearised at the base point) expected it all.
    assert row.model_excess == pytest.approx(row.excess, rel=1e-9)
    assert row.missed_by_model is False
    assert_finite_kpis(k)


def test_offers_that_cannot_fix_an_element_are_reported(tmp_path):
    """0.5 MW of load reduction at bus 2 is far less than line 1 needs: all of it is bought,
    line 1 stays overloaded, and the market says so: by name, with unmet need, exhausted."""
    pf, res, seg = feeder_case(tmp_path, HEADER + "A,agg1,2,load,up,0.5,50,0,,,\n")
    for method, k in (("nodal", None), ("zonal", 1), ("needs_based", 1)):
        result = clear_on(seg, res, method, k)
        left = result.residual
        assert len(left) == 1, method
        row = left.iloc[0]
        assert (row.element_type, int(row.element), row.mtu) == ("line", 1, 0)
        assert row.ac_converged and row.residual_mw > 0
        if method != "needs_based":  # the needs-based market buys its published need only
            assert result.dispatch.p_mw.sum() == pytest.approx(0.5, abs=1e-6)
            assert bool(row.offers_exhausted)
            assert row.relieving_offered_mw == pytest.approx(0.5)
            assert row.relieving_dispatched_mw == pytest.approx(0.5)
            assert row.relief_left == pytest.approx(0.0, abs=1e-9)
        assert bool(row.offers_short)
        # Each market expected what is left: the nodal and the zonal one at the AC point of
        # their model (exact there), the needs-based one at the base point (0.5 MW away).
        tol = 2e-3 if method == "needs_based" else 1e-6
        assert row.model_excess == pytest.approx(row.excess, abs=tol * row.excess)
        assert result.kpis["unmet_mwh"] > 0
        assert result.unmet.unmet_mw.iloc[0] >= row.residual_mw
        assert result.kpis["residual_violations"] == 1
        assert result.kpis["security_adjusted_cost_eur"] > result.kpis["cost_eur"]
        table = left.assign(method=result.method, k=result.k)
        warnings = residual_warnings(pd.DataFrame([result.kpis]), table)
        assert len(warnings) == 1 and "line 1 (overload" in warnings[0]
        assert_finite_kpis(result.kpis)


def test_offers_not_used_are_not_exhausted(tmp_path):
    """Enough offers but a penalty below their price: the market leaves line 1 overloaded
    although the offers could fix it, and says they were not exhausted."""
    pf, res, seg = feeder_case(tmp_path, HEADER + "A,agg1,2,load,up,4,50,0,,,\n")
    result = clear_market(pf, res, "nodal", penalty_eur_per_mwh=1.0)
    row = result.residual.iloc[0]
    assert (row.element_type, int(row.element)) == ("line", 1)
    assert not bool(row.offers_exhausted)
    assert row.relieving_offered_mw == pytest.approx(4.0)
    assert result.kpis["residual_offers_exhausted"] == 0
    assert row.relief_left == pytest.approx(4.0 * row.sensitivity_per_mw, rel=1e-6)  # float32
    assert not bool(row.offers_short) and row.relief_left > row.excess


def test_offers_left_too_small_are_short_though_not_exhausted(tmp_path):
    """0.5 MW at bus 2, not bought (a penalty below its price): not exhausted, but what it
    could still do, 0.5 MW x the bus's sensitivity, is less than line 1's excess: short,
    and the warning says so."""
    pf, res, seg = feeder_case(tmp_path, HEADER + "A,agg1,2,load,up,0.5,50,0,,,\n")
    result = clear_market(pf, res, "nodal", penalty_eur_per_mwh=1.0)
    row = result.residual.iloc[0]
    assert result.dispatch.empty and not bool(row.offers_exhausted)
    assert row.relief_left == pytest.approx(0.5 * row.sensitivity_per_mw, rel=1e-6)  # float32
    assert row.relief_left < row.excess and bool(row.offers_short)
    table = result.residual.assign(method=result.method, k=result.k)
    (warning,) = residual_warnings(pd.DataFrame([result.kpis]), table)
    assert "offers short for 1 of them (exhausted for 0)" in warning


def test_a_dispatch_that_worsens_a_row_counts_as_relief_left(tmp_path):
    """A dispatch of 3 MW of load increase at bus 2 (B down) takes line 1 from within its
    limit to far over it; 0.2 MW of load reduction (A up) there is offered. Withdrawing B's
    3 MW and dispatching A's 0.2 MW could still remove 3.2 MW x the bus's sensitivity of
    the excess, more than the excess: not short, though A is far too small alone."""
    (tmp_path / "resources.csv").write_text(
        HEADER + "A,agg1,2,load,up,0.2,50,0,,,\nB,agg1,2,load,down,3,0,50,,,\n"
    )
    pd.DataFrame({"load_0_p_mw": [4.5]}).to_csv(tmp_path / "profiles.csv", index=False)

    grid = load_grid(three_bus_feeder(), vm_min_pu=0.9, vm_max_pu=1.1)
    pf = run_horizon(
        grid,
        load_profiles(grid, Horizon(n_mtu=1, mtu_minutes=60), csv=tmp_path / "profiles.csv"),
    )
    assert pf.loading_percent.iloc[0][("line", 1)] < 100.0
    res = read_resources(tmp_path / "resources.csv", pf)
    dispatch = pd.DataFrame(
        {
            "time": pf.times[[0]],
            "mtu": [0],
            "resource_id": ["B"],
            "aggregator": ["agg1"],
            "bus": [2],
            "direction": ["down"],
            "p_mw": [-3.0],
            "q_mvar": [0.0],
        }
    )
    left = residual_violations(pf, ac_check(pf, dispatch), res, dispatch)
    (row,) = left.itertuples(index=False)
    assert (row.element_type, row.element) == ("line", 1)
    assert row.relieving_offered_mw == pytest.approx(0.2)  # A only: B worsens line 1
    assert 0.2 * row.sensitivity_per_mw < row.excess
    assert row.relief_left == pytest.approx(3.2 * row.sensitivity_per_mw, rel=1e-6)
    assert row.relief_withdrawn == pytest.approx(3.0 * row.sensitivity_per_mw, rel=1e-6)
    assert not row.offers_short and not row.offers_exhausted


# ----------------------------------------------------------------------------- one tolerance


@pytest.fixture(scope="module")
def cigre_pf():
    grid = load_grid("cigre_mv")
    return run_horizon(
        grid, load_profiles(grid, Horizon(start="2016-01-14 16:00", n_mtu=8), load_scale=1.25)
    )


def base_check(pf) -> ACCheck:
    return ACCheck(pf.loading_percent.copy(), pf.vm_pu.copy(), pf.converged.copy(), ())


def test_one_tolerance_for_violated(cigre_pf):
    pf = cigre_pf
    limit = pf.grid.loading_max_percent
    ac = base_check(pf)
    ac.loading_percent.iloc[:, :] = 50.0
    ac.vm_pu.iloc[:, :] = 1.0
    ac.loading_percent.iloc[0, 0] = limit + 0.5 * VIOLATION_TOLERANCE_LOADING_PERCENT
    ac.vm_pu.iloc[1, 2] = pf.grid.vm_min_pu - 0.5 * VIOLATION_TOLERANCE_VM_PU
    k = violation_kpis(pf, ac)
    assert k["residual_overload_mtu_count"] == 0 and k["residual_overload_max_percent"] == 0.0
    assert k["residual_voltage_mtu_count"] == 0 and k["residual_voltage_max_pu"] == 0.0
    assert residual_violations(pf, ac).empty
    ac.loading_percent.iloc[0, 0] = limit + 2 * VIOLATION_TOLERANCE_LOADING_PERCENT
    ac.vm_pu.iloc[1, 2] = pf.grid.vm_min_pu - 2 * VIOLATION_TOLERANCE_VM_PU
    k = violation_kpis(pf, ac)
    assert k["residual_overload_mtu_count"] == 1
    assert k["residual_overload_max_percent"] == pytest.approx(
        2 * VIOLATION_TOLERANCE_LOADING_PERCENT
    )
    assert k["residual_voltage_mtu_count"] == 1
    assert k["residual_voltage_max_pu"] == pytest.approx(2 * VIOLATION_TOLERANCE_VM_PU)
    left = residual_violations(pf, ac)
    assert list(left.violation) == ["overload", "undervoltage"]
    assert list(left.mtu) == [0, 1]


def test_an_mtu_whose_ac_check_does_not_converge(cigre_pf):
    """A NaN MTU is counted as not converged and never turns a KPI into 0, NaN or inf."""
    pf = cigre_pf
    ac = base_check(pf)
    over = (pf.loading_percent - pf.grid.loading_max_percent).clip(lower=0).max(axis=1)
    assert (over > 1).sum() >= 2
    failed = int(over.to_numpy().argmax())
    kept = over.drop(over.index[failed]).max()
    ac.loading_percent.iloc[failed] = np.nan
    ac.vm_pu.iloc[failed] = np.nan
    ac.converged.iloc[failed] = False
    ac = replace(ac, failures=(f"MTU {failed}: did not converge",))
    k = violation_kpis(pf, ac)
    assert k["mtus_not_converged_after"] == 1
    assert k["residual_overload_max_percent"] == pytest.approx(kept)
    assert k["residual_overload_mtu_count"] == int((over > 0).sum()) - 1
    assert k["vm_min_after_pu"] == pytest.approx(
        np.nanmin(np.delete(pf.vm_pu.to_numpy(), failed, 0))
    )
    assert_finite_kpis(k)
    # The residual table lists its base-case violations, marked as not converged.
    left = residual_violations(pf, ac)
    at_failed = left[left.mtu == failed]
    assert len(at_failed) and not at_failed.ac_converged.any()
    assert at_failed.excess.max() == pytest.approx(over.iloc[failed])
    # Every MTU failing: still no NaN or inf.
    nothing = ACCheck(
        pf.loading_percent * np.nan,
        pf.vm_pu * np.nan,
        pf.converged & False,
        tuple(f"MTU {t}" for t in range(len(pf.times))),
    )
    k = violation_kpis(pf, nothing)
    assert k["mtus_not_converged_after"] == len(pf.times)
    assert_finite_kpis(k)


def test_kpis_of_real_markets_are_finite(cigre_pf):
    pf = cigre_pf
    res = generate_resources(
        pf, FlexibilitySpec(load_up_share=0.05, load_down_share=0.05, sgen_down_share=0.05), seed=3
    )
    seg = prepare_segmentation(pf, 0, flexible_capacity_mw=res.capacity_per_bus())
    for method, k in (("nodal", None), ("zonal", 2), ("needs_based", 2)):
        result = clear_on(seg, res, method, k)
        assert tuple(result.kpis) == KPI_NAMES  # every KPI is in the schema, in its order
        assert_finite_kpis(result.kpis)
        assert result.kpis["security_adjusted_cost_eur"] >= result.kpis["cost_eur"]
        # Unmet need never 0 in an MTU that the AC check leaves violated.
        unmet = result.unmet.set_index("mtu").unmet_mw
        for mtu, mw in result.residual.groupby("mtu").residual_mw.max().items():
            assert unmet[mtu] >= mw > 0


def test_residual_sensitivity_is_the_nodal_jacobian_row(cigre_pf):
    """The row-by-row sensitivity of residual_violations is the row of sensitivity_arrays."""
    from lfm_zonal.grid.sensitivity import sensitivity_arrays

    pf = cigre_pf
    left = residual_violations(pf, base_check(pf))
    assert {"overload", "undervoltage"} <= set(left.violation)
    for rec in left.groupby("violation").head(2).itertuples():
        sens = sensitivity_arrays(pf.model, pf.V[rec.mtu])
        if rec.violation == "overload":
            row = sens.loading_p[pf.model.branches.get_loc((rec.element_type, rec.element))]
        else:
            row = sens.vm_p[pf.model.buses.get_loc(rec.element)]
        assert rec.sensitivity_per_mw == pytest.approx(np.abs(row).max(), rel=1e-9)
        assert rec.residual_mw == pytest.approx(rec.excess / np.abs(row).max(), rel=1e-9)


def test_readme_kpi_table_is_the_schema():
    """The README's column list of kpis.csv is produced from the KPI schema."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme, "refresh the README's KPI table: check.kpis.markdown_table()"


def test_markets_of_a_study_share_the_facts_of_their_residual_rows(cigre_pf, monkeypatch):
    """A second market leaving the same rows violated finds their largest sensitivity and
    relieving offers in the study's cache (no transposed solve), and its table is the one a
    fresh computation gives, with its own dispatch."""
    import lfm_zonal.grid.sensitivity as sensitivity
    from lfm_zonal.grid.sensitivity import LinearisationCache

    pf = cigre_pf
    res = generate_resources(
        pf, FlexibilitySpec(load_up_share=0.05, load_down_share=0.05, sgen_down_share=0.05), seed=3
    )
    ac = base_check(pf)
    ac.loading_percent.iloc[:3, :2] = pf.grid.loading_max_percent + 5.0
    ac.vm_pu.iloc[2:5, 3:6] = pf.grid.vm_min_pu - 0.01
    one = res.table.index[0]
    dispatches = [
        pd.DataFrame(columns=["mtu", "resource_id", "direction", "p_mw"]),
        pd.DataFrame({"mtu": [0, 2], "resource_id": [one, one], "direction": "up", "p_mw": 0.01}),
    ]
    cache = LinearisationCache(pf.model)
    solves = []
    inner = sensitivity.JacobianLinearisation.rows_sensitivity
    monkeypatch.setattr(
        sensitivity.JacobianLinearisation,
        "rows_sensitivity",
        lambda self, *a, **k: solves.append(1) or inner(self, *a, **k),
    )
    first = residual_violations(pf, ac, res, dispatches[0], cache)
    assert len(first) >= 3 * 2 + 3 * 3 and solves
    solves.clear()
    second = residual_violations(pf, ac, res, dispatches[1], cache)
    assert not solves  # every row's facts known
    fresh = residual_violations(pf, ac, res, dispatches[1])
    pd.testing.assert_frame_equal(second, fresh)
    assert (second.relieving_dispatched_mw > 0).any()  # the dispatch is this market's own


def test_residual_row_facts_are_the_mtus_own(cigre_pf):
    """Two MTUs at one operating point but with other offers: each MTU's relieving offers
    are its own (the facts are kept by MTU, not by operating point alone)."""
    import dataclasses

    from lfm_zonal.grid.sensitivity import LinearisationCache
    from lfm_zonal.market.resources import Resources

    V = cigre_pf.V.copy()
    V[1] = V[0]
    pf = dataclasses.replace(cigre_pf, V=V)
    res = generate_resources(
        pf, FlexibilitySpec(load_up_share=0.05, load_down_share=0.05, sgen_down_share=0.05), seed=3
    )
    up = res.up_mw.copy()
    up.iloc[1, ::2] = 0.0  # MTU 1 offers less
    res = Resources(res.table, up, res.down_mw)
    ac = base_check(pf)
    ac.loading_percent.iloc[:3, :2] = pf.grid.loading_max_percent + 5.0
    ac.vm_pu.iloc[:3, 3:6] = pf.grid.vm_max_pu + 0.01
    kept = residual_violations(pf, ac, res, None, LinearisationCache(pf.model))
    V2 = V.copy()
    V2[1] = V[0] * (1 + 1e-15)  # the same point to rounding, another key
    apart = residual_violations(dataclasses.replace(pf, V=V2), ac, res, None)
    np.testing.assert_allclose(kept.relieving_offered_mw, apart.relieving_offered_mw, rtol=1e-9)
    at = kept.mtu.isin([0, 1])
    assert not np.allclose(  # the two MTUs' offers differ, and so do their rows' figures
        kept[at & (kept.mtu == 0)].relieving_offered_mw.to_numpy()[:3],
        kept[at & (kept.mtu == 1)].relieving_offered_mw.to_numpy()[:3],
    )


def test_model_excess_is_read_at_each_rows_mtu_and_row():
    """``predicted`` gives the market's model per cleared MTU (in any order, with gaps) and
    row (branches, overvoltage, undervoltage): each residual row reads its own, NaN in an
    MTU not cleared or whose AC check failed (its rows are the base case's)."""
    pf, _, _ = market_case("cigre_mv", 1.25, 0.5)
    T, n_l, n_b = len(pf.times), len(pf.model.branches), len(pf.model.buses)
    ac = ACCheck(pf.loading_percent.copy(), pf.vm_pu.copy(), pf.converged.copy(), ())
    failed = int((pf.loading_percent.max(axis=1)).to_numpy().argmax())
    ac.loading_percent.iloc[failed] = np.nan
    ac.vm_pu.iloc[failed] = np.nan
    ac.converged.iloc[failed] = False
    cleared = np.arange(failed % 2, T, 2)[::-1]  # every other MTU, the failed one's, last first
    # Each entry names its MTU and its row kind: 1000 x MTU + 1 / 2 / 3 (branch / over / under).
    kind_of_row = np.r_[np.full(n_l, 1.0), np.full(n_b, 2.0), np.full(n_b, 3.0)]
    beyond = 1000.0 * cleared[:, None] + kind_of_row
    left = residual_violations(pf, ac, predicted=(cleared, beyond))
    assert len(left) and (left.mtu == failed).any()
    read = left.mtu.isin(cleared) & (left.mtu != failed)
    assert read.any() and (~left.mtu.isin(cleared)).any()
    code = {"overload": 1.0, "overvoltage": 2.0, "undervoltage": 3.0}
    expected = 1000.0 * left.mtu[read] + left.violation[read].map(code)
    np.testing.assert_array_equal(left.model_excess[read], expected)
    assert left.model_excess[~read].isna().all() and left.missed_by_model[~read].isna().all()
    with pytest.raises(LfmError, match="not on this grid's MTUs and rows"):
        residual_violations(pf, ac, predicted=(cleared, beyond[:-1]))


def test_the_relief_of_many_rows_at_once_is_that_of_each_row_alone(monkeypatch):
    """``residual_violations`` sums the offers' relief of up to ``_ROWS_PER_SOLVE`` rows of an
    MTU at once (rows x offers): the same columns as one row at a time, on ieee33's
    undervoltages (each row relieved by its own amounts) with part of the offers dispatched."""
    from lfm_zonal.check import ac

    pf, res, _ = market_case("ieee33", 1.3, 0.8, n_mtu=3, start="2016-01-14 17:00")
    as_is = ACCheck(pf.loading_percent, pf.vm_pu, pf.converged, ())
    table = res.table
    rng = np.random.default_rng(5)
    picked = rng.choice(len(table), size=len(table) // 2, replace=False)
    dispatch = pd.DataFrame(
        {
            "mtu": np.repeat(np.arange(3), len(picked)),
            "resource_id": np.tile(table.index.to_numpy()[picked], 3),
            "direction": np.tile(np.where(rng.random(len(picked)) < 0.5, "up", "down"), 3),
            "p_mw": np.tile(0.01 * rng.random(len(picked)), 3),
        }
    )
    columns = ["relief_left", "relief_withdrawn", "relieving_offered_mw", "relieving_dispatched_mw"]
    tables = {}
    for rows in (1, 2, 256):
        monkeypatch.setattr(ac, "_ROWS_PER_SOLVE", rows)
        tables[rows] = residual_violations(pf, as_is, res, dispatch)
    one = tables[1]
    assert one.groupby("mtu").relief_left.nunique().min() >= 3  # rows of their own per MTU
    assert (one.relieving_dispatched_mw > 0).any()
    for rows in (2, 256):
        np.testing.assert_allclose(tables[rows][columns], one[columns], rtol=1e-12, atol=1e-15)
        for flag in ("offers_exhausted", "offers_short"):
            assert tables[rows][flag].tolist() == one[flag].tolist()
