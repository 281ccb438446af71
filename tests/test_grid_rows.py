"""The two representations of the linearised grid's rows (dense arrays, adjoint rows) are one
formulation: the same coefficients, the same linearised state, the same LP optimum."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import lfm_zonal.market.formulation as formulation
from lfm_zonal.grid.linear import RowScales, linear_grid
from lfm_zonal.grid.sensitivity import LinearisationCache
from lfm_zonal.market.bids import build_bids
from lfm_zonal.market.clearing import clear_market, mtus_to_clear
from lfm_zonal.market.needs import dso_needs
from lfm_zonal.market.strategies import solve_clearing
from lfm_zonal.study.job import prepare_base_case, prepare_resources, prepare_segmentation_of
from lfm_zonal.study.scenario import builtin_scenarios, load_scenario
from lfm_zonal.zones.segmentation import nodal_zones

SHIPPED = sorted(builtin_scenarios())
#: Scenarios cleared here on their first MTU only: SimBench MV+LV (5,479 buses), whose dense
#: nodal rows over its 8 MTUs would be 8 x 10,962 rows x 5,479 buses, 3.8 GB per array; on
#: one MTU, dense, its nodal market takes about 50 s at 5.4 GB peak.
FIRST_MTU_ONLY = {"simbench_mvlv_rural_pv_noon"}
#: Rows compared coefficient by coefficient per MTU, at most (a random sample beyond).
COMPARED_ROWS = 3_000


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    scenario = load_scenario(request.param)
    if request.param in FIRST_MTU_ONLY:
        scenario = dataclasses.replace(
            scenario, values={**scenario.values, "horizon": {**scenario["horizon"], "n_mtu": 1}}
        )
    base = prepare_base_case(scenario)
    resources = prepare_resources(base)
    cache = LinearisationCache(base.powerflow.model)
    seg = prepare_segmentation_of(base, resources, cache)
    return scenario, base, resources, seg, cache


def _both(pf, W, cache):
    mtus = mtus_to_clear(pf)
    return tuple(
        linear_grid(pf, W, "jacobian", mtus, cache=cache, representation=rep)
        for rep in ("dense", "adjoint")
    )


@pytest.mark.slow
@pytest.mark.parametrize("areas", ["nodal", "zones"])
def test_dense_and_adjoint_rows_clear_alike(shipped, areas, monkeypatch):
    """On every shipped scenario, nodal and at the scenario's second zone count: every row's
    coefficients, the linearised state after an injection, and the optimum of the clearing
    LP and of the DSO-needs LP agree between the representations."""
    scenario, base, resources, seg, cache = shipped
    pf = base.powerflow
    if areas == "nodal":
        zones = nodal_zones(pf.model.buses)
    else:
        ks = scenario["zones"]["k"]
        zones = seg.zones(ks[min(1, len(ks) - 1)])
    dense, adjoint = _both(pf, zones.aggregation(seg.weights), cache)
    assert dense.rows.dense and not adjoint.rows.dense
    T = len(dense.mtus)
    assert T > 0  # every shipped scenario has something to clear

    # Coefficients of every row of two MTUs (the first and the last; of a big grid, a sample).
    rng = np.random.default_rng(0)
    for t in (0, T - 1):
        r = np.arange(dense.n_rows)
        if len(r) > COMPARED_ROWS:
            r = np.sort(rng.choice(r, COMPARED_ROWS, replace=False))
        tt = np.full(len(r), t)
        for a, b in zip(
            dense.rows.coefficients(tt, r), adjoint.rows.coefficients(tt, r), strict=True
        ):
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * np.abs(a).max())
    # The state after an injection in every area, and the MW-equivalent scales.
    p, q = rng.normal(0, 0.05, (T, dense.k)), rng.normal(0, 0.02, (T, dense.k))
    for a, b in zip(dense.after(p, q), adjoint.after(p, q), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-9)
    t, r = np.nonzero(np.ones((T, dense.n_rows), bool))
    np.testing.assert_allclose(
        RowScales(adjoint).of(t, r), RowScales(dense).of(t, r), rtol=1e-9, atol=1e-12
    )

    bids = build_bids(resources, zones, pf.times, scenario["flexibility"]["max_steps"]).steps
    active = bids[bids.mtu.isin(dense.mtus)]

    def optima():
        lp = [solve_clearing(g, active, resources.table).objective_eur for g in (dense, adjoint)]
        needs = [dso_needs(g, active)[0].need_mw.sum() for g in (dense, adjoint)]
        return lp, needs

    # An MTU of at least LONG_ROW_STEPS steps writes its rows differently in each
    # representation (dense: without their smallest terms; adjoint: through the feeder
    # equivalents, then without them), each on the safe side. Without those devices the
    # LPs are the same.
    lp, needs = optima()
    # (the DSO-needs LP has two steps per area and MTU)
    steps = max(active.groupby("mtu").size().max(), 2 * dense.k)
    long_rows = steps >= formulation.LONG_ROW_STEPS
    with monkeypatch.context() as patch:
        patch.setattr(formulation, "LONG_ROW_STEPS", np.iinfo(np.int64).max)
        exact, exact_needs = optima() if long_rows else (lp, needs)
    assert exact[1] == pytest.approx(exact[0], rel=1e-7)
    assert exact_needs[1] == pytest.approx(exact_needs[0], rel=1e-6, abs=1e-9)
    for cost in lp:  # no cheaper than the exact LP, and near it
        assert exact[0] * (1 - 1e-9) <= cost <= exact[0] * (1 + 1e-3)
    assert needs[1] == pytest.approx(needs[0], rel=2e-3, abs=1e-9)


@pytest.mark.slow
def test_nodal_market_with_adjoint_rows_is_the_dense_market(shipped):
    """The whole nodal market (sequential AC loop, AC check) with adjoint rows reaches the
    cost and AC residual of the dense one, on every shipped scenario."""
    scenario, base, resources, seg, cache = shipped
    kw = dict(weights=seg.weights, cache=cache, max_steps=scenario["flexibility"]["max_steps"])
    dense = clear_market(base.powerflow, resources, "nodal", grid_rows="dense", **kw).kpis
    adjoint = clear_market(base.powerflow, resources, "nodal", grid_rows="adjoint", **kw).kpis
    assert adjoint["security_adjusted_cost_eur"] == pytest.approx(
        dense["security_adjusted_cost_eur"], rel=1e-3
    )
    assert adjoint["residual_violations"] == dense["residual_violations"]


def test_rows_come_by_transposed_solves_then_from_the_state_sensitivity():
    """Adjoint rows of a few zones: the first rows asked for of an MTU come by transposed
    solves; once they cost as much as the state's sensitivity to every area (2K right-hand
    sides, STATE_COLUMN_COST_IN_ROWS rows each), it is made and kept, and every row after
    comes from it. Both give the dense coefficients; beyond
    the budget the least recently used is dropped and its count starts again."""
    from test_market import market_case

    from lfm_zonal.grid.linear import STATE_COLUMN_COST_IN_ROWS, StateSensitivities

    pf, _, seg = market_case("cigre_mv", 1.25, 0.2)
    zones = seg.zones(3)
    dense, adjoint = _both(pf, zones.aggregation(seg.weights), None)
    lin0, lin1 = adjoint.rows.linearisations[:2]
    states = adjoint.rows.states
    switch = 2 * 3 * STATE_COLUMN_COST_IN_ROWS
    rows = np.random.default_rng(1).permutation(dense.n_rows)[: switch + 4]
    for i, r in enumerate(rows):
        assert (states.kept(lin0) is not None) == (i >= switch)  # made by the switch-th row
        got = adjoint.rows.coefficients(np.array([0]), np.array([r]))
        want = dense.rows.coefficients(np.array([0]), np.array([r]))
        for a, b in zip(want, got, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    # A budget for one: the next MTU's state sensitivity drops the first one's.
    small = StateSensitivities(budget_bytes=1)
    seeds = np.arange(switch), np.arange(0)
    for lin in (lin0, lin1):
        small.rows(lin, adjoint.rows.W, *seeds)
    assert small.kept(lin0) is None and small.kept(lin1) is not None
    dp, _ = small.rows(lin0, adjoint.rows.W, np.arange(1), np.arange(0))  # counted anew
    assert small.kept(lin0) is None
    np.testing.assert_allclose(dp, dense.rows.coefficients(np.array([0]), np.array([0]))[0])


def test_scales_learnt_from_the_base_rows_only():
    """RowScales keeps the scales of rows whose coefficients a market's first LP computed on
    the base linearisation (no second solve), through a block's view too, and ignores
    coefficients of another linearisation (a later sequential-LP round)."""
    from test_market import market_case

    pf, _, seg = market_case("cigre_mv", 1.25, 0.2)
    W = seg.zones(3).aggregation(seg.weights)
    mtus = mtus_to_clear(pf)
    base = linear_grid(pf, W, "jacobian", mtus, representation="adjoint")
    other = linear_grid(pf, W, "jacobian", mtus[::-1], representation="adjoint")
    assert len(mtus) > 1
    t, r = np.array([1, 1]), np.array([0, base.n_rows - 1])
    truth = RowScales(base).of(t, r)
    scales = RowScales(base)
    keep = np.zeros(len(mtus), bool)
    keep[1] = True
    block, in_block = base.select(keep), scales.select(keep)
    cp, cq = block.rows.coefficients(np.zeros(2, np.int64), r)
    in_block.learn(other.select(keep).rows, np.zeros(2, np.int64), r, 7 * cp, 7 * cq)
    assert np.isnan(scales._value[t, r]).all()  # not its linearisation: not learnt
    in_block.learn(block.rows, np.zeros(2, np.int64), r, cp, cq)
    np.testing.assert_array_equal(scales._value[t, r], truth)


def test_rows_asked_again_come_from_the_known_rows(monkeypatch):
    """Adjoint rows asked for again (in any order, repeated in one request, through a
    block's view) come from ``KnownRows`` with no solve, equal to the dense coefficients;
    beyond its budget the least recently used linearisation's rows are dropped."""
    from test_market import market_case

    from lfm_zonal.grid.linear import AdjointRows, KnownRows

    pf, _, seg = market_case("cigre_mv", 1.25, 0.2)
    dense, adjoint = _both(pf, seg.zones(3).aggregation(seg.weights), None)
    solved = []
    solve = AdjointRows._solve_rows
    monkeypatch.setattr(
        AdjointRows,
        "_solve_rows",
        lambda self, lin, r: solved.append(len(r)) or solve(self, lin, r),
    )
    n_l = len(dense.branches)
    r = np.array([dense.n_rows - 1, 0, n_l + 2, 0, n_l - 1, 5])  # buses and lines, mixed
    t = np.array([0, 0, 1, 0, 1, 1])

    def check(grid, t, r, want=dense):
        for a, b in zip(want.rows.coefficients(t, r), grid.rows.coefficients(t, r), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)

    check(adjoint, t, r)
    assert sorted(solved) == [2, 3]  # each MTU's distinct rows, once
    solved.clear()
    check(adjoint, t[::-1], r[::-1])
    keep = np.zeros(len(adjoint.mtus), bool)
    keep[1] = True
    check(adjoint.select(keep), np.zeros(2, np.int64), np.array([5, n_l + 2]), dense.select(keep))
    assert solved == []  # all known, through the view too
    check(adjoint, np.array([1, 1]), np.array([5, 6]))
    assert solved == [1]  # only the new one
    check(adjoint, np.array([1, 1, 1]), np.array([6, 5, n_l + 2]))  # after a second add
    assert solved == [1]
    # Rows solved in any order (buses before lines) come back in that order.
    lin0, lin1 = adjoint.rows.linearisations[:2]
    rows = np.array([n_l + 3, 2, dense.n_rows - 2, 0])
    for a, b in zip(
        dense.rows.coefficients(np.zeros(4, np.int64), rows),
        solve(adjoint.rows, lin0, rows),
        strict=True,
    ):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)

    small = KnownRows(budget_bytes=1)
    one = np.ones((1, 3))
    small.add(lin0, np.array([4]), one, one)
    small.add(lin1, np.array([4]), one, one)  # over budget: lin0's rows dropped
    assert small.find(lin0, np.array([4]))[0].tolist() == [-1]
    assert small.find(lin1, np.array([4]))[0].tolist() == [0]


def test_a_rows_price_factor_is_the_offer_at_the_margin_of_removing_it():
    """``offered_scale`` by hand, one overload row (upper limit) over three areas moving it
    by 0.3, 0.02 and 0.004 per MW (down offers relieve it: 1 and 5 MW at the last two;
    an up offer at the first does not): an excess of 0.01 takes half of the second
    area's MW (margin 0.02, factor 15, capped at SLACK_PRICE_FACTOR_MAX); 0.025 takes all
    of it and 1.25 MW of the third (0.004: capped); 0.05 is beyond the 0.04 the offers
    can remove (factor 1, as a row P does not move). Unlimited capacity at the most
    effective area gives factor 1."""
    from lfm_zonal.grid.linear import SLACK_PRICE_FACTOR_MAX, offered_scale

    cp = np.array([[0.3, 0.02, 0.004]] * 3 + [[0.0, 0.0, 0.0]])
    capacity = np.zeros((4, 3, 2))
    capacity[:, 0, 0] = 10.0  # up at the first area: worsens an upper row moved by +0.3
    capacity[:, 1, 1], capacity[:, 2, 1] = 1.0, 5.0
    scale = np.array([0.3, 0.3, 0.3, 1.0])
    margin = offered_scale(cp, np.ones(4), capacity, np.array([0.01, 0.025, 0.05, 0.01]), scale)
    floor = 0.3 / SLACK_PRICE_FACTOR_MAX
    assert margin == pytest.approx([max(0.02, floor), max(0.004, floor), 0.3, 1.0])
    unlimited = capacity[:1].copy()
    unlimited[0, 0, 1] = np.inf
    assert offered_scale(cp[:1], np.ones(1), unlimited, np.array([5.0]), scale[:1]) == [0.3]
    # A lower limit (undervoltage): up offers relieve where the coefficient is positive.
    assert offered_scale(cp[:1], -np.ones(1), capacity[:1], np.array([1.0]), scale[:1]) == [0.3]
