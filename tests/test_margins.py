"""Margins: a market clears again with tightened limits where its real dispatch violates
in AC a row that its model met (``market.strategies.RowMargins``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import SCENARIOS
from test_market import market_case

import lfm_zonal.market.clearing as clearing_module
from lfm_zonal.check.ac import ac_check
from lfm_zonal.grid.linear import linear_grid
from lfm_zonal.grid.violations import (
    VIOLATION_TOLERANCE_LOADING_PERCENT,
    VIOLATION_TOLERANCE_VM_PU,
    excess,
)
from lfm_zonal.market.bids import build_bids
from lfm_zonal.market.clearing import clear_market, mtus_to_clear, prepare_market
from lfm_zonal.market.formulation import MarketBids
from lfm_zonal.market.lp import SolveStatus
from lfm_zonal.market.strategies import (
    MARGIN_SLOPE_RANGE,
    SLP_COST_RTOL,
    RowMargins,
    solve_clearing,
)
from lfm_zonal.study.job import run_study
from lfm_zonal.study.report import residual_warnings
from lfm_zonal.study.scenario import parse_scenario


def _margins(base: np.ndarray) -> RowMargins:
    """Margins of one MTU over voltage rows only (their tolerance), the base case's excess
    ``base`` (1 x rows)."""
    n_rows = base.shape[1]
    grid = SimpleNamespace(
        mtus=np.array([0]),
        n_rows=n_rows,
        row_tolerances=lambda: np.full(n_rows, VIOLATION_TOLERANCE_VM_PU),
    )
    return RowMargins(grid, base)


def test_a_row_is_met_in_two_rounds_when_ac_answers_linearly():
    """AC excess e(m) = e0 - s m for a row whose zonal sensitivity overstates the dispatch's
    (s = 0.3 instead of 1). By hand: m1 = e0 + tol/2, e1 = e0 - s m1; the secant gives
    slope -s, so m2 = m1 + e1 / s + tol/2 and e2 = -s tol/2: inside the limit."""
    tol, e0, s = VIOLATION_TOLERANCE_VM_PU, 0.002, 0.3
    predicted = np.array([[-1e-6]])  # the model meets it (at its tightened limit)
    base = np.array([[0.01]])  # violated in the base case
    margins = _margins(base)
    real = np.array([[e0]])
    unmet = margins.unmet(real, predicted)
    assert unmet.all()
    margins.grow(real, unmet)
    m1 = margins.values[0, 0]
    assert m1 == pytest.approx(e0 + tol / 2)
    np.testing.assert_array_equal(margins.grown, [True])
    real = np.array([[e0 - s * m1]])
    margins.grow(real, margins.unmet(real, predicted))
    e2 = e0 - s * margins.values[0, 0]
    assert e2 == pytest.approx(-s * tol / 2)
    assert not margins.unmet(np.array([[e2]]), predicted).any()


def test_margins_go_to_rows_the_model_met_or_the_dispatch_created():
    """Row 0: violated in AC, met by the model (margin); row 1: violated in the base case
    and left violated by the model (offers short: no margin would help); row 2: met in AC;
    row 3: the model itself violates it, but the base case did not (the dispatch created
    it: margin). An MTU that did not converge (NaN) gets none. A row that does not answer
    its margin at all grows by at most 1 / |MARGIN_SLOPE_RANGE[1]| times its excess."""
    tol = VIOLATION_TOLERANCE_VM_PU
    real = np.array([[0.004, 0.004, -0.001, 0.002]])
    predicted = np.array([[0.0, 0.003, -0.002, 0.001]])
    base = np.array([[0.01, 0.01, 0.01, -0.001]])
    margins = _margins(base)
    unmet = margins.unmet(real, predicted)
    np.testing.assert_array_equal(unmet, [[True, False, False, True]])
    assert not margins.unmet(np.full((1, 4), np.nan), predicted).any()
    margins.grow(real, unmet)
    np.testing.assert_allclose(margins.values, [[0.004 + tol / 2, 0.0, 0.0, 0.002 + tol / 2]])
    margins.grow(real, unmet)  # the same excess again: the rows did not answer
    step = 0.004 / -MARGIN_SLOPE_RANGE[1] + tol / 2
    assert margins.values[0, 0] == pytest.approx(0.004 + tol / 2 + step)


@pytest.fixture(scope="module")
def ieee33_case():
    return market_case("ieee33", 1.3, 0.8)


def test_a_zonal_market_meets_in_ac_what_its_model_meets(ieee33_case, monkeypatch):
    """IEEE 33, two zones: the zonal model (each zone's activation spread by the virtual
    bus's weights) meets every row, but its real dispatch, cheapest resources first, leaves
    undervoltage in AC. With margins the market buys more until a fresh AC power flow of
    its dispatch has no violation left; it then costs more than without them, and no less
    than the nodal market, the AC optimum of the same bids. The nodal market's model is its
    dispatch: it takes no margin round."""
    pf, res, seg = ieee33_case
    zones = seg.zones(2)
    nodal = clear_market(pf, res, "nodal")
    assert nodal.kpis["margin_rounds"] == 0
    assert nodal.kpis["residual_violations"] == 0
    with_margins = clear_market(pf, res, "zonal", zones, weights=seg.weights)
    monkeypatch.setattr(clearing_module, "MARGIN_MAX_ROUNDS", 0)
    without = clear_market(pf, res, "zonal", zones, weights=seg.weights)
    assert without.kpis["margin_rounds"] == 0
    assert without.kpis["rows_unmet_in_ac"] > 0
    assert without.kpis["residual_violations"] > 0
    # Its residual table says so: each row left, its model had within the limit.
    missed = without.residual
    assert (missed.model_excess == 0.0).all() and missed.missed_by_model.eq(True).all()
    assert (
        "missed by its model for " + str(len(missed))
        in residual_warnings(pd.DataFrame([without.kpis]), missed.assign(method="zonal", k=2))[0]
    )
    k = with_margins.kpis
    assert k["margin_rounds"] >= 1
    assert k["rows_unmet_in_ac"] == 0
    assert k["new_violations"] == 0 and k["residual_violations"] == 0
    fresh = ac_check(pf, with_margins.dispatch)
    tolerances = (VIOLATION_TOLERANCE_LOADING_PERCENT,) + 2 * (VIOLATION_TOLERANCE_VM_PU,)
    for rows, tol in zip(
        excess(pf.grid, fresh.loading_percent, fresh.vm_pu), tolerances, strict=True
    ):
        assert np.nanmax(rows.to_numpy()) <= tol
    assert k["cost_eur"] > without.kpis["cost_eur"]
    assert k["cost_eur"] >= nodal.kpis["cost_eur"] * (1 - SLP_COST_RTOL)


def test_a_margin_round_expects_of_every_mtu_what_its_model_says(ieee33_case, monkeypatch):
    """A margin round works its model's excess out again in the MTUs it clears again only
    (the others keep their dispatch): every clearing's is its model's of its whole
    dispatch, in the zonal market of IEEE 33 and the needs-based market of CIGRE MV (two
    zones each), both with margin rounds on some of their MTUs."""
    cleared = []
    inner = clearing_module._clear_in_model

    def spy(pf, method, k, inputs, resources_table, penalty, cache, margins, last):
        out = inner(pf, method, k, inputs, resources_table, penalty, cache, margins, last)
        partly = last is not None and not margins.grown.all()
        cleared.append((method, inputs.active, out[0], partly))
        return out

    monkeypatch.setattr(clearing_module, "_clear_in_model", spy)
    for (pf, res, seg), method in (
        (ieee33_case, "zonal"),
        (market_case("cigre_mv", 1.25, 0.5), "needs_based"),
    ):
        clear_market(pf, res, method, seg.zones(2), weights=seg.weights)
        assert any(partly for m, _, _, partly in cleared if m == method), method
    for _, active, this, _ in cleared:
        p, q = clearing_module._area_injections(active, this.accepted, this.grid)
        whole = this.grid.violations(*this.grid.after(p, q))
        np.testing.assert_array_equal(this.predicted, whole)


#: The batteries of ``battery_case`` bid in these MTU positions only: one LP block.
LINKED = [3, 4, 5, 9]


def battery_case(k: int | None = 2):
    """CIGRE MV at 125% load with two batteries, 16 MTUs, in ``k`` zones (None: one per
    bus): the linear grid of the MTUs to clear, their bid steps (the batteries' in LINKED
    only) and the resources."""
    pf, res, seg = market_case(
        "cigre_mv", 1.25, 0.05, n_mtu=16, storage_units=2, storage_p_mw=2.0, storage_hours=0.5
    )
    zones = seg.zones(seg.n_buses if k is None else k)
    grid = linear_grid(
        pf, zones.aggregation(seg.weights), seg.sensitivity_method, mtus_to_clear(pf)
    )
    steps = build_bids(res, zones, pf.times, 4).steps
    steps = steps[steps.mtu.isin(grid.mtus)].reset_index(drop=True)
    storage = steps.resource_id != ""
    steps = steps[~storage | steps.mtu.isin(grid.mtus[LINKED])].reset_index(drop=True)
    assert (steps.resource_id != "").any()
    return grid, steps, res


def margin_round(grid, steps, table, previous, only, quota):
    """``solve_clearing`` as a margin round clears: the MTUs ``only`` again, the bids of
    those a battery links to them held at ``previous``; and each bid's MTU position."""
    market = MarketBids(grid.mtus, grid.k, grid.dt_h, steps, table)
    again = solve_clearing(
        grid,
        steps,
        table,
        quota_mw=quota,
        market=market.held(~only[market.t_of_bid], previous.accepted_mw),
        include=previous.accepted_mw > 0,
        basis=previous.basis,
        only=only,
        previous=previous,
    )
    return again, market.t_of_bid


def test_a_margin_round_keeps_the_mtus_it_does_not_clear():
    """``solve_clearing`` with ``only`` (a margin round): the MTUs not flagged keep the
    previous solution, those standing alone exactly (not solved), those a battery links to
    a flagged MTU (one LP block) through their bids held (``MarketBids.held``); with the
    same limits the flagged MTUs reach the same optimum again."""
    grid, steps, res = battery_case()
    quota = np.full(len(grid.mtus), 1.0)
    previous = solve_clearing(grid, steps, res.table, quota_mw=quota)
    only = np.zeros(len(grid.mtus), bool)
    only[[4, 7]] = True  # one MTU in the battery's block, one standing alone
    again, t = margin_round(grid, steps, res.table, previous, only, quota)
    assert again.status is SolveStatus.OPTIMAL
    alone = ~np.isin(t, LINKED + [7])
    assert alone.any()
    np.testing.assert_array_equal(again.accepted_mw[alone], previous.accepted_mw[alone])
    linked_held = np.isin(t, [3, 5, 9])
    np.testing.assert_allclose(
        again.accepted_mw[linked_held], previous.accepted_mw[linked_held], rtol=0, atol=1e-9
    )
    cost = steps.price_eur_per_mwh.to_numpy() * grid.dt_h
    assert (cost * again.accepted_mw).sum() == pytest.approx(
        (cost * previous.accepted_mw).sum(), rel=1e-6
    )
    np.testing.assert_allclose(again.slack_mw, previous.slack_mw, atol=1e-7)
    # Held bids price nothing (a fixed step takes any dual): the MTUs not flagged keep the
    # previous prices, and their duals value every accepted step but the batteries' (whose
    # value is in their stored energy too) at its offer or more, before the pay-as-clear
    # floor (clearing_prices) would.
    kept = ~only
    np.testing.assert_array_equal(again.marginal_price[kept], previous.marginal_price[kept])
    np.testing.assert_array_equal(again.marginal_price_q[kept], previous.marginal_price_q[kept])
    a = steps.zone.to_numpy()
    value = np.where(steps.direction == "up", 1.0, -1.0) * (
        again.marginal_price[t, a] + steps.tan_phi.to_numpy() * again.marginal_price_q[t, a]
    )
    paid = (again.accepted_mw > 1e-9) & (steps.resource_id == "").to_numpy()
    assert paid[np.isin(t, LINKED)].any()
    assert np.all(value[paid] >= steps.price_eur_per_mwh.to_numpy()[paid] - 1e-6)


def test_the_nodal_market_expects_what_it_leaves():
    """IEEE 33 at 130% load with 5% of it flexible: the nodal market cannot lift every
    voltage, and leaves rows as unmet need. Its model is its dispatch at the AC point of
    that dispatch, exact there: every row it leaves, overload or voltage, its model
    expected to the power flow's tolerance, and none is missed by it."""
    pf, res, _ = market_case("ieee33", 1.3, 0.05, n_mtu=2, start="2016-01-14 18:00")
    left = clear_market(pf, res, "nodal").residual
    assert (left.violation == "undervoltage").sum() >= 10
    np.testing.assert_allclose(left.model_excess, left.excess, rtol=0, atol=1e-8)
    assert left.missed_by_model.eq(False).all()


def test_a_margin_round_dispatches_again_only_the_mtus_whose_acceptances_moved():
    """``_dispatch`` with the clearing before: the MTUs where every step is accepted as
    before keep their rows, the others are dispatched again; bit for bit the dispatch made
    from scratch, whether no MTU, some (one emptied, one newly accepted) or every one moved."""
    pf, res, seg = market_case("ieee33", 1.3, 0.3, n_mtu=4)
    inputs = prepare_market(pf, res, "zonal", seg.zones(4), weights=seg.weights)
    bids, active = inputs.bids, inputs.active
    mtu = active.mtu.to_numpy()
    rng = np.random.default_rng(0)
    first = rng.uniform(0.0, 1.0, len(active)) * active.quantity_mw.to_numpy()
    first[mtu == mtu.max()] = 0.0  # nothing accepted in the last MTU
    before = (first, clearing_module._dispatch(bids, active, first))
    moved = first.copy()
    moved[mtu == mtu.min()] = 0.0  # the first MTU emptied
    moved[mtu == mtu.max()] = active.quantity_mw.to_numpy()[mtu == mtu.max()]
    everything = 0.5 * active.quantity_mw.to_numpy()
    for accepted in (first, moved, everything):
        fresh = clearing_module._dispatch(bids, active, accepted)
        again = clearing_module._dispatch(bids, active, accepted, before)
        pd.testing.assert_frame_equal(again, fresh, check_exact=True)
    assert len(before[1]) > 0 and len(set(before[1].mtu)) == len(set(mtu)) - 1


def test_pay_as_clear_pays_a_step_taken_in_part_its_offer_after_margin_rounds():
    """CIGRE MV's evening peak (16:00-19:00, the batteries among the offers: one LP block),
    zonal K = 1: its margin rounds clear some MTUs again, the others' bids held. A step
    the LP took in part (not a battery's, whose stored energy enters its value) is paid
    exactly its offer: its reduced cost is zero, in the round that cleared it. Before,
    held MTUs took the duals of the held LP (112 of 151 accepted steps below their offer),
    and a floor over the zone lifted a marginal step of one power factor to the offer of
    another (78.08 paid 103.07). Every accepted step, a battery's too, is paid at least
    its offer."""
    text = (SCENARIOS / "cigre_mv_evening_peak.toml").read_text()
    text = text.replace("n_mtu = 96", "n_mtu = 12").replace("00:00", "16:00")
    text = text.replace("k = [1, 2, 4, 8]", "k = [1]").replace(
        '"nodal", "zonal", "needs_based"', '"zonal"'
    )
    market = run_study(parse_scenario(text, "evening peak")).markets[0]
    assert market.kpis["margin_rounds"] >= 1
    paid = market.bids  # the accepted steps
    assert len(paid) > 100 and (paid.resource_id != "").any()
    assert (paid.clearing_price_eur_per_mwh >= paid.price_eur_per_mwh - 1e-9).all()
    part = paid[(paid.status == "partial") & (paid.resource_id == "")]
    assert len(part) >= 5
    np.testing.assert_allclose(part.clearing_price_eur_per_mwh, part.price_eur_per_mwh, rtol=1e-6)
    assert (paid.clearing_price_eur_per_mwh > paid.price_eur_per_mwh + 1.0).any()


def test_pay_as_clear_caps_only_the_mtus_the_model_prices(monkeypatch):
    """CIGRE MV's evening peak, nodal, the whole day: the sequential LP ends with its trust
    region binding (duals up to about 2,400 EUR/MWh in MTU 71), and the batteries link
    the MTUs around it. Those MTUs (``Solution.priced_by_model``) are paid at most the
    dearest offer accepted there; in the others a nodal price above every accepted offer
    stands (a bus that relieves more, or gives Q too, is worth more). Slacks priced per
    MW-equivalent (``RowScales.price_factor`` off): the case where the trust region binds."""
    from lfm_zonal.grid import linear

    monkeypatch.setattr(linear, "SLACK_PRICE_FACTOR_MAX", 1.0)
    seen = []
    price = clearing_module.clearing_prices
    monkeypatch.setattr(
        clearing_module,
        "clearing_prices",
        lambda active, accepted, *args: (
            seen.append((active, accepted, *args)) or price(active, accepted, *args)
        ),
    )
    text = (SCENARIOS / "cigre_mv_evening_peak.toml").read_text()
    text = text.replace('"nodal", "zonal", "needs_based"', '"nodal"')
    text = text.replace('pricing = "pay_as_bid"', 'pricing = "pay_as_clear"')
    market = run_study(parse_scenario(text, "evening peak")).markets[0]
    active, accepted, marginal, by_model = seen[-1]
    paid = price(active, accepted, marginal, by_model)
    taken = accepted > 1e-9
    dearest = (
        pd.Series(np.where(taken, active.price_eur_per_mwh, np.nan))
        .groupby([active.mtu.to_numpy(), active.direction.to_numpy()])
        .transform("max")
        .to_numpy()
    )
    assert by_model[taken].any() and not by_model[taken].all()
    assert (paid[taken & by_model] <= dearest[taken & by_model] + 1e-9).all()
    assert (marginal[taken & by_model] > dearest[taken & by_model] + 100.0).any()  # capped
    assert (paid[taken & ~by_model] > dearest[taken & ~by_model] + 1.0).any()  # stands
    np.testing.assert_allclose(
        np.sort(market.bids.clearing_price_eur_per_mwh), np.sort(paid[taken]), rtol=1e-12
    )
