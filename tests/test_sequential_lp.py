"""The sequential LP: its objective, convergence to the AC optimum, and never a worse round."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from types import SimpleNamespace

import highspy
import numpy as np
import pandas as pd
import pytest
from conftest import SCENARIOS
from test_ac_check import factorisations  # noqa: F401  (fixture)
from test_margins import battery_case, margin_round
from test_market import clear_on, hand_case, market_case  # noqa: F401  (module fixture)

import lfm_zonal.market.clearing as clearing_module
import lfm_zonal.market.formulation as formulation
import lfm_zonal.market.strategies as market_module
from lfm_zonal.check.ac import ac_check, solve_with_injections
from lfm_zonal.config import DEFAULT_PENALTY_EUR_PER_MWH
from lfm_zonal.errors import SolverError
from lfm_zonal.grid.linear import DenseRows, LinearGrid, RowScales, linear_grid
from lfm_zonal.grid.violations import VIOLATION_TOLERANCE_LOADING_PERCENT
from lfm_zonal.market.bids import build_bids
from lfm_zonal.market.clearing import clear_market, mtus_to_clear
from lfm_zonal.market.formulation import MarketBids, slack_prices
from lfm_zonal.market.lp import SolveStats, SolveStatus
from lfm_zonal.market.strategies import (
    DUAL_SIMPLEX,
    UNKNOWN_RETRIES,
    ClearingModel,
    solve_clearing,
)
from lfm_zonal.study.job import run_study
from lfm_zonal.study.scenario import parse_scenario


def test_lp_objective_is_bid_cost_plus_slack_penalty(hand_case):  # noqa: F811
    """One bid too small for the overload on line 1: the LP buys it and pays the rest as slack.

    By hand on the linearised grid: the slack of line 1's row, in MW of the most effective
    injection (bus 2), is excess / g - 0.5 MW, and the objective is
    80 EUR/MWh x 0.5 MW x 1 h + penalty x 1 h x slack."""
    pf, _, seg = hand_case
    zones = seg.zones(seg.n_buses)
    grid = linear_grid(
        pf, zones.aggregation(seg.weights), seg.sensitivity_method, mtus_to_clear(pf)
    )
    zone2 = int(zones.zone_of_bus.loc[2])
    bids = pd.DataFrame(
        {
            "mtu": [0],
            "zone": [zone2],
            "direction": ["up"],
            "quantity_mw": [0.5],
            "price_eur_per_mwh": [80.0],
            "tan_phi": [0.0],
            "resource_id": ["B"],
            "aggregator": ["agg2"],
        }
    )
    sol = solve_clearing(grid, bids)
    line1 = list(grid.branches).index(("line", 1))
    coef = grid.rows.sl_p[0, line1]
    g = RowScales(grid).of([0], [line1])[0]
    assert g == pytest.approx(np.abs(coef).max())  # P moves the line: its largest P coefficient
    excess = grid.loading0[0, line1] - grid.loading_max_percent
    slack = excess / g - 0.5 * abs(coef[zone2]) / g
    assert sol.accepted_mw[0] == pytest.approx(0.5)
    assert sol.slack_mw[0] == pytest.approx(slack, rel=1e-6)
    expected = 80.0 * 0.5 * grid.dt_h + DEFAULT_PENALTY_EUR_PER_MWH * grid.dt_h * slack
    assert sol.objective_eur == pytest.approx(expected, rel=1e-7)


def _two_lines(loading0: np.ndarray, dt: float = 0.25) -> LinearGrid:
    """A linear grid of two lines (and one bus no injection moves) seen through two areas,
    one row of ``loading0`` per MTU: area 0 moves line 0 by -5 and line 1 by +1 pp/MW, area
    1 moves line 1 by +10 pp/MW."""
    T = len(loading0)
    sl_p = np.broadcast_to(np.array([[-5.0, 0.0], [1.0, 10.0]]), (T, 2, 2)).copy()
    no_bus = np.zeros((T, 1, 2))
    return LinearGrid(
        mtus=np.arange(T),
        dt_h=dt,
        branches=pd.MultiIndex.from_tuples([("line", 0), ("line", 1)]),
        buses=pd.Index([0]),
        loading0=np.asarray(loading0, float),
        vm0=np.ones((T, 1)),
        rows=DenseRows(sl_p, np.zeros((T, 2, 2)), no_bus, no_bus),
        loading_max_percent=100.0,
        vm_min_pu=0.9,
        vm_max_pu=1.1,
    )


def _bids(zone, direction, quantity, price) -> pd.DataFrame:
    n = len(zone)
    return pd.DataFrame(
        {
            "mtu": [0] * n,
            "zone": zone,
            "direction": direction,
            "quantity_mw": quantity,
            "price_eur_per_mwh": price,
            "tan_phi": [0.0] * n,
            "resource_id": [""] * n,
            "aggregator": ["agg"] * n,
        }
    )


def test_a_violation_the_market_would_create_costs_more_than_one_it_removes(monkeypatch):
    """By hand (``_two_lines``): line 0 is at 110% and line 1 at 99%; the one bid (area 0,
    up, up to 5 MW at 10 EUR/MWh) relieves line 0 by 5 pp/MW and loads line 1 by 1 pp/MW,
    which area 1 (no bid) moves by 10 pp/MW. In MW-equivalent (g: 5 and 10 pp/MW), each MW
    bought removes 1 of line 0's violation and, beyond 1 MW, adds 0.1 of line 1's: at one
    price for every slack the LP buys 2 MW and takes line 1, within its limit before, to
    101%. Its slack priced NEW_VIOLATION_PENALTY_FACTOR times higher, the LP buys 1 MW:
    line 1 at its limit, line 0 at 105%, 1 MW-equivalent unmet. A bid priced above the
    penalty (area 1 down, which would make room on line 1) is never bought."""
    dt = 0.25
    grid = _two_lines(np.array([[110.0, 99.0]]), dt)
    bids = _bids([0], ["up"], [5.0], [10.0])
    penalty = DEFAULT_PENALTY_EUR_PER_MWH
    sol = solve_clearing(grid, bids)
    assert sol.accepted_mw[0] == pytest.approx(1.0)
    assert sol.slack_mw[0] == pytest.approx(1.0)
    assert sol.objective_eur == pytest.approx((10.0 * 1.0 + penalty * 1.0) * dt)
    loading, _ = grid.after(sol.p_mw, sol.q_mvar)
    assert loading[0] == pytest.approx([105.0, 100.0])
    dear = _bids([0, 1], ["up", "down"], [5.0, 1.0], [10.0, 2.0 * penalty])
    capped = solve_clearing(grid, dear)
    assert capped.accepted_mw == pytest.approx([1.0, 0.0])
    monkeypatch.setattr(formulation, "NEW_VIOLATION_PENALTY_FACTOR", 1.0)
    one_price = solve_clearing(grid, bids)
    assert one_price.accepted_mw[0] == pytest.approx(2.0)
    assert grid.after(one_price.p_mw, one_price.q_mvar)[0][0] == pytest.approx([100.0, 101.0])


def _one_offer_cleared(quantity_mw: float, dt: float):
    """``_two_lines`` with line 0 at 110% and line 1 at 99%, cleared against one up offer
    of ``quantity_mw`` at 10 EUR/MWh in area 0: the grid, its market side and the LP's
    solution."""
    grid = _two_lines(np.array([[110.0, 99.0]]), dt)
    bids = _bids([0], ["up"], [quantity_mw], [10.0])
    market = MarketBids(grid.mtus, grid.k, dt, bids, None)
    return grid, market, solve_clearing(grid, bids, market=market)


def _judged_at(monkeypatch, grid, market, sol, loading, penalty):
    """``_judge`` of a one-MTU round on ``_two_lines`` with its AC power flow stubbed to
    the lines' ``loading`` (percent)."""
    solved = np.ones((1, 2), complex), np.array([True])
    monkeypatch.setattr(market_module, "solve_with_injections", lambda *a, **k: solved)
    model = SimpleNamespace(
        loading_percent=lambda V: np.array([loading]), vm_pu=lambda V: np.ones((1, 1))
    )
    pf = SimpleNamespace(model=model)
    return market_module._judge(
        pf, grid, solved[0], market, sol, np.eye(2), RowScales(grid), penalty, 1
    )


def test_a_round_is_judged_as_the_lp_prices_its_slacks(monkeypatch):
    """A sequential-LP round's merit (``_judge``) is its bid cost plus its AC excess beyond
    SLP_TOLERANCE_SHARE of the tolerance, in MW-equivalent, priced as the LP prices its
    slacks. By hand on ``_two_lines`` (the LP buys 1 MW at 10 EUR/MWh), AC stubbed to
    line 0 at 105% and line 1 at 101%: line 0, over its limit in the base case, 5 pp at
    g = 5 pp/MW at the penalty; line 1, within it, 1 pp at g = 10 pp/MW at
    NEW_VIOLATION_PENALTY_FACTOR times the penalty."""
    dt, penalty = 0.25, DEFAULT_PENALTY_EUR_PER_MWH
    grid, market, sol = _one_offer_cleared(5.0, dt)
    assert sol.accepted_mw[0] == pytest.approx(1.0)
    judged = _judged_at(monkeypatch, grid, market, sol, [105.0, 101.0], penalty)
    tol = market_module.SLP_TOLERANCE_SHARE * VIOLATION_TOLERANCE_LOADING_PERCENT
    factor = formulation.NEW_VIOLATION_PENALTY_FACTOR
    residual = penalty * dt * ((5.0 - tol) / 5.0 + factor * (1.0 - tol) / 10.0)
    assert judged.merit_eur[0] == pytest.approx(10.0 * 1.0 * dt + residual, rel=1e-12)
    assert not judged.as_modelled[0]  # the LP said 105% and 100%


@pytest.mark.parametrize(("ac_line0", "beyond_slack_mw"), [(106.0, 0.0), (99.0, 0.2), (108.0, 0.0)])
def test_the_model_error_of_a_row_short_of_offers_counts_beyond_its_slack(
    monkeypatch, ac_line0, beyond_slack_mw
):
    """``_two_lines``, one 0.5 MW offer where line 0 needs 2 MW: the LP buys it and takes
    7.5 pp of slack (1.5 MW-equivalent at g = 5 pp/MW), priced at the penalty. AC with 1.5 pp
    more room than the model (106%) only lowers the slack the merit already prices: no
    model error. At 99% the row needs 0.2 MW-equivalent less than the offer bought, beyond
    its slack: that counts, at the row's dual (the penalty). At 108%, less room: the
    slack grows, no bid is freed."""
    dt, penalty = 0.25, DEFAULT_PENALTY_EUR_PER_MWH
    grid, market, sol = _one_offer_cleared(0.5, dt)
    assert sol.accepted_mw[0] == pytest.approx(0.5)
    assert sol.rows.tolist() == [[0, 0]] and sol.row_slack_mw == pytest.approx([1.5])
    assert sol.row_duals == pytest.approx([penalty * dt])
    judged = _judged_at(monkeypatch, grid, market, sol, [ac_line0, 99.5], penalty)
    assert judged.model_error_eur == pytest.approx(penalty * dt * beyond_slack_mw, abs=1e-9)


def test_rows_within_their_limit_are_those_of_the_base_case_mtu():
    """A row within its limit (not over it, even within the tolerance) is priced as a new
    violation; through a block's view, each MTU keeps its own."""
    tol = VIOLATION_TOLERANCE_LOADING_PERCENT
    scales = RowScales(_two_lines(np.array([[110.0, 99.0], [99.0, 100.0 + tol / 2]])))
    t, r = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    assert scales.within_at_base(t, r).tolist() == [False, True, True, False]
    second = scales.select(np.array([False, True]))
    assert second.within_at_base(np.array([0, 0]), np.array([0, 1])).tolist() == [True, False]
    price = slack_prices(second, np.array([0, 0]), np.array([0, 1]), 10.0)
    assert price.tolist() == [10.0 * formulation.NEW_VIOLATION_PENALTY_FACTOR, 10.0]


def test_a_worse_second_round_returns_the_first(hand_case, monkeypatch):  # noqa: F811
    """Round 2's linearisation is made wrong (line 1 seen 30 pp lower than it is): the LP
    sells back flexibility, AC overloads line 1 again, and every later round inside the
    shrinking trust region is worse too. The market must return round 1's dispatch."""
    pf, res, seg = hand_case
    monkeypatch.setattr(market_module, "SLP_MAX_ROUNDS", 1)
    first = clear_market(pf, res, "nodal")
    monkeypatch.undo()

    real = market_module.linear_grid

    def misleading(*args, **kwargs):  # every re-linearisation wrong (the base case is the
        grid = real(*args, **kwargs)  # market's own, made before the loop)
        return dataclasses.replace(grid, loading0=grid.loading0 - 30)

    monkeypatch.setattr(market_module, "linear_grid", misleading)
    result = clear_market(pf, res, "nodal")
    assert result.kpis["ac_rounds"] > 1
    assert result.kpis["ac_best_round"] == 1
    pd.testing.assert_frame_equal(result.dispatch, first.dispatch)
    assert result.kpis["cost_eur"] == pytest.approx(first.kpis["cost_eur"])


def test_nodal_clearing_converges_to_the_ac_band_edge():
    """IEEE 33 at a heavy evening: the first round, linearised at the base case, is off
    (its AC point leaves the band); the loop goes on until the binding voltages sit at
    the limit: within the band to the tolerance and not over-bought inside it."""
    pf, res, seg = market_case("ieee33", 1.3, 0.8, n_mtu=4)
    one = _clear_with_rounds(pf, res, 1)
    full = clear_market(pf, res, "nodal")
    vmin = pf.grid.vm_min_pu
    assert full.kpis["ac_converged"] == 1
    assert full.kpis["ac_rounds"] >= 2
    assert full.kpis["vm_min_after_pu"] == pytest.approx(vmin, abs=1e-5)
    assert full.kpis["unmet_mwh"] == 0.0
    # One round is either outside the band or dearer: the loop never trades one for the other.
    assert one.kpis["vm_min_after_pu"] < vmin - 1e-5 or one.kpis["cost_eur"] >= full.kpis[
        "cost_eur"
    ] * (1 - 5e-4)


def test_the_model_error_priced_by_duals_is_the_next_rounds_change(monkeypatch):
    """SimBench MV's windy night (16 MTUs), nodal and zonal K = 8. A round whose AC point is
    as its model said (and whose optimum rests on no trust-region bound) prices the model's
    error on its binding rows by their duals: to first order, the merit change of the LP
    re-linearised there. Each round's estimate is the next round's change to 20% (round 1,
    a long step) and to 2% (round 2, where second order is negligible): 0.112 against
    0.1125 EUR, 0.483 against 0.486. Where it is below SLP_COST_RTOL the loop stops there:
    a round fewer than waiting for two merits that agree, with the same result (the round
    it skipped was within the tolerance, and the best round is kept either way)."""
    text = (SCENARIOS / "simbench_mv_windy_day.toml").read_text()
    text = text.replace("n_mtu = 96", "n_mtu = 16").replace("00:00", "02:00")
    text = text.replace("k = [1, 2, 4, 8, 16, 32]", "k = [8]")
    text = text.replace('"nodal", "zonal", "needs_based"', '"nodal", "zonal"')
    scenario = parse_scenario(text, "windy night")
    judge = market_module._judge
    rounds = []

    def recorded(*args, ignore_error=False, **kwargs):
        judged = judge(*args, **kwargs)
        rounds.append(judged)
        return dataclasses.replace(judged, model_error_eur=np.inf) if ignore_error else judged

    monkeypatch.setattr(market_module, "_judge", recorded)
    early = run_study(scenario).markets
    assert [m.kpis["ac_rounds"] for m in early] == [2, 2]
    rounds.clear()
    monkeypatch.setattr(market_module, "_judge", functools.partial(recorded, ignore_error=True))
    waited = run_study(scenario).markets
    assert [m.kpis["ac_rounds"] for m in waited] == [3, 3]
    for market in (rounds[:3], rounds[3:]):
        for this, after, rel in ((market[0], market[1], 0.2), (market[1], market[2], 0.02)):
            assert this.as_modelled.all() and not this.sol.trust_bound
            assert this.merit - after.merit == pytest.approx(this.model_error_eur, rel=rel)
        assert market[2].model_error_eur < 1e-4  # at its own AC point, the model is exact
    for a, b in zip(early, waited, strict=True):
        assert a.kpis["ac_best_round"] == b.kpis["ac_best_round"] == 2
        assert a.kpis["cost_eur"] == b.kpis["cost_eur"]
        pd.testing.assert_frame_equal(a.dispatch, b.dispatch)


@pytest.mark.parametrize("grid_rows", ["dense", "adjoint"])
def test_warm_started_power_flows_are_those_from_the_base_point(
    grid_rows,
    monkeypatch,
    factorisations,  # noqa: F811
):
    """Each round's power flows start from its linearisation point (with the Jacobian the
    adjoint rows hold factorised there), the AC check from the best round's AC point: they
    reach the power flows a start from the base point reaches, to the Newton-Raphson
    tolerance. The nodal market's dispatch is its own model's, so its AC check keeps that
    point without a factorisation."""
    pf, res, seg = market_case("ieee33", 1.3, 0.8, n_mtu=4)
    rounds, checked = [], []
    judge, check = market_module._judge, clearing_module.ac_check

    def judged(pf, lp_grid, lp_V, market, sol, W, *rest):
        this = judge(pf, lp_grid, lp_V, market, sol, W, *rest)
        rounds.append((lp_grid.mtus, sol.p_mw @ W.T, sol.q_mvar @ W.T, this.V, this.converged))
        return this

    def counted(*args, **kwargs):
        before = factorisations[0]
        out = check(*args, **kwargs)
        checked.append(factorisations[0] - before)
        return out

    monkeypatch.setattr(market_module, "_judge", judged)
    monkeypatch.setattr(clearing_module, "ac_check", counted)
    result = clear_market(pf, res, "nodal", grid_rows=grid_rows)
    assert len(rounds) >= 2
    for mtus, p, q, V, ok in rounds:
        base, base_ok = solve_with_injections(pf, mtus, p, q)
        np.testing.assert_array_equal(ok, base_ok)
        np.testing.assert_allclose(V[ok], base[ok], rtol=0, atol=1e-9)
    assert checked == [0]
    fresh = ac_check(pf, result.dispatch)
    np.testing.assert_allclose(result.ac.vm_pu, fresh.vm_pu, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.ac.loading_percent, fresh.loading_percent, rtol=0, atol=1e-6)


def _clear_with_rounds(pf, res, rounds: int):
    saved = market_module.SLP_MAX_ROUNDS
    market_module.SLP_MAX_ROUNDS = rounds
    try:
        return clear_market(pf, res, "nodal")
    finally:
        market_module.SLP_MAX_ROUNDS = saved


def test_every_highs_model_status_is_a_solve_status():
    highs = highspy.Highs()
    for status in highspy.HighsModelStatus.__members__.values():
        name = highs.modelStatusToString(status)
        if status != highspy.HighsModelStatus.kOptimal:
            assert SolveStatus(name).value == name


def test_solve_stats_sum_the_effort_and_keep_the_later_size():
    first = SolveStats(rounds=2, column_rounds=1, build_s=0.5, solve_s=1.0, n_variables=10)
    later = SolveStats(rounds=1, column_rounds=1, build_s=0.25, n_variables=12, n_grid_rows=3)
    total = first + later
    assert (total.rounds, total.column_rounds, total.build_s, total.solve_s) == (3, 2, 0.75, 1.0)
    assert (total.n_variables, total.n_grid_rows) == (12, 3)


def test_the_kpis_carry_the_status_and_the_statistics(hand_case):  # noqa: F811
    pf, res, seg = hand_case
    kpis = clear_market(pf, res, "nodal").kpis
    assert kpis["solver_status"] == "optimal" and type(kpis["solver_status"]) is str
    assert kpis["generation_rounds"] >= kpis["column_rounds"] >= kpis["ac_rounds"] >= 1
    assert kpis["n_variables"] > 0 and kpis["n_constraints"] > 0
    needs_based = clear_on(seg, res, "needs_based", 2).kpis
    assert needs_based["solver_status"] == "merit order" and needs_based["n_variables"] == 0


def test_a_solver_failure_is_a_solver_error(hand_case, monkeypatch):  # noqa: F811
    """An LP HiGHS does not solve is not an input mistake: a SolverError names the LP."""
    pf, res, seg = hand_case
    real = market_module.solve_clearing

    def infeasible(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), status=SolveStatus.INFEASIBLE)

    monkeypatch.setattr(market_module, "solve_clearing", infeasible)
    with pytest.raises(SolverError, match=r"^clearing LP: solver status Infeasible$"):
        clear_market(pf, res, "nodal")
    monkeypatch.undo()
    monkeypatch.setattr(ClearingModel, "_run", lambda self: SolveStatus.TIME_LIMIT)
    with pytest.raises(SolverError, match=r"^DSO-needs LP: solver status Time limit reached$"):
        clear_market(pf, res, "nodal")


@pytest.mark.parametrize("storage_mtus", [None, [3, 4, 5, 9]])
def test_lp_blocks_give_the_joint_optimum(monkeypatch, storage_mtus):
    """Solved MTU by MTU (a block per MTU, the MTUs a battery links in one) the clearing LP
    has the optimum of the whole LP at once: the LP is separable by MTU but for storage."""
    pf, res, seg = market_case(
        "cigre_mv", 1.25, 0.05, n_mtu=16, storage_units=2, storage_p_mw=2.0, storage_hours=0.5
    )
    zones = seg.zones(seg.n_buses)
    grid = linear_grid(
        pf, zones.aggregation(seg.weights), seg.sensitivity_method, mtus_to_clear(pf)
    )
    steps = build_bids(res, zones, pf.times, 4).steps
    steps = steps[steps.mtu.isin(grid.mtus)].reset_index(drop=True)
    storage = steps.resource_id != ""
    if storage_mtus is None:
        steps = steps[~storage].reset_index(drop=True)
    else:  # the batteries bid in some MTUs only: those are linked, the rest stand apart
        linked = grid.mtus[storage_mtus]
        steps = steps[~storage | steps.mtu.isin(linked)].reset_index(drop=True)
    market = MarketBids(grid.mtus, grid.k, grid.dt_h, steps, res.table)
    blocks = market.blocks(1)
    if storage_mtus is None:
        assert [b.tolist() for b in blocks] == [[t] for t in range(len(grid.mtus))]
    else:
        assert storage_mtus in [b.tolist() for b in blocks]
        assert sorted(np.concatenate(blocks).tolist()) == list(range(len(grid.mtus)))
    quota = np.full(len(grid.mtus), 1.0)  # column generation in every block too
    joint = solve_clearing(grid, steps, res.table, quota_mw=quota)
    monkeypatch.setattr(market_module, "BLOCK_MAX_STEPS", 1)
    apart = solve_clearing(grid, steps, res.table, quota_mw=quota)
    assert joint.status is apart.status is SolveStatus.OPTIMAL
    assert apart.objective_eur == pytest.approx(joint.objective_eur, rel=1e-7)
    cost = steps.price_eur_per_mwh.to_numpy() * grid.dt_h
    assert (cost * apart.accepted_mw).sum() == pytest.approx(
        (cost * joint.accepted_mw).sum(), rel=1e-6
    )
    np.testing.assert_allclose(apart.slack_mw, joint.slack_mw, atol=1e-7)
    assert joint.accepted_mw.sum() > 0


@pytest.mark.parametrize("k", [1, 3, 12])
def test_area_injections_as_columns_or_substituted_give_one_optimum(monkeypatch, k):
    """The area injections as columns with balance rows (a zonal market's many steps per
    area) or written out over the steps (the nodal market's few): the same LP, the same
    optimum, the same area prices (the balance rows' duals or the grid rows' duals summed
    over the area's coefficients), and the whole sequential market at the same cost."""
    import lfm_zonal.market.formulation as formulation

    pf, res, seg = market_case("cigre_mv", 1.25, 0.2)
    zones = seg.zones(k)
    grid = linear_grid(
        pf, zones.aggregation(seg.weights), seg.sensitivity_method, mtus_to_clear(pf)
    )
    steps = build_bids(res, zones, pf.times, 4).steps
    steps = steps[steps.mtu.isin(grid.mtus)].reset_index(drop=True)
    assert (steps.tan_phi != 0).any()
    bounds = (np.full((len(grid.mtus), k), -0.3), np.full((len(grid.mtus), k), 0.3))
    out = {}
    for form, ratio in (("columns", 0), ("substituted", 10**9)):
        monkeypatch.setattr(formulation, "AREA_COLUMNS_STEPS_PER_PAIR", ratio)
        out[form] = (
            solve_clearing(grid, steps, res.table),
            solve_clearing(grid, steps, res.table, p_bounds=bounds),
            clear_on(seg, res, "zonal", k).kpis,
        )
    for free, trust in [
        (out["columns"][0], out["substituted"][0]),
        (out["columns"][1], out["substituted"][1]),
    ]:
        assert free.status is trust.status is SolveStatus.OPTIMAL
        assert free.objective_eur == pytest.approx(trust.objective_eur, rel=1e-7)
        np.testing.assert_allclose(free.slack_mw, trust.slack_mw, atol=1e-7)
        np.testing.assert_allclose(free.marginal_price, trust.marginal_price, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(
            free.marginal_price_q, trust.marginal_price_q, rtol=1e-5, atol=1e-4
        )
    assert out["columns"][1].objective_eur > out["columns"][0].objective_eur  # the bounds bind
    assert out["columns"][2]["cost_eur"] == pytest.approx(
        out["substituted"][2]["cost_eur"], rel=1e-6
    )


def test_leave_out_small_terms_by_hand_and_at_every_corner():
    """Terms of least reach (|coefficient| x quantity) go while their reaches sum to at most
    the budget, never an unbounded step; what they can do at worst is exactly the extreme
    of the left-out part over the box of the steps (so a tightened limit is safe), and the
    next term would not have fitted."""
    from lfm_zonal.market.formulation import leave_out_small_terms

    # By hand: reaches 0.1, 0.2, 3, 0 and an unbounded step; budget 0.35 leaves out 0.1 and
    # 0.2 (sum 0.3; adding 3 would not fit), the zero, and never the unbounded one.
    coef = np.array([[0.1, -0.2, 3.0, 0.0, 1e-9]])
    quantity = np.array([1.0, 1.0, 1.0, 2.0, np.inf])
    kept, towards = leave_out_small_terms(coef, quantity, np.array([0.35]))
    np.testing.assert_array_equal(kept, [[0.0, 0.0, 3.0, 0.0, 1e-9]])
    np.testing.assert_allclose(towards, [[0.1, -0.2]])
    # Random rows: every corner of the box [0, quantity] stays within what they can do.
    rng = np.random.default_rng(7)
    coef = rng.normal(size=(6, 9)) * rng.choice([1e-4, 1e-2, 1.0], size=(6, 9))
    quantity = rng.uniform(0.1, 2.0, size=9)
    budget = rng.uniform(0.0, 0.05, size=6)
    kept, towards = leave_out_small_terms(coef, quantity, budget)
    out = (kept == 0) & (coef != 0)
    reach = np.abs(coef) * quantity
    assert out.any() and (~out).any()
    assert ((reach * out).sum(1) <= budget + 1e-15).all()
    for i in range(len(coef)):  # the next smallest kept term would not have fitted
        if (~out[i]).any():
            assert (reach[i] * out[i]).sum() + reach[i][~out[i]].min() > budget[i]
    corners = np.array(np.meshgrid(*[[0.0, 1.0]] * 9)).reshape(9, -1).T * quantity
    left_out = (coef - kept) @ corners.T
    np.testing.assert_allclose(left_out.max(1), towards[:, 0], atol=1e-15)
    np.testing.assert_allclose(left_out.min(1), towards[:, 1], atol=1e-15)


def test_rows_without_their_small_terms_stay_on_the_safe_side(monkeypatch):
    """A nodal LP whose grid rows leave out small terms (20 tolerances here, so that many
    go): its solution keeps every full linear row, even where the steps of the left-out
    terms are all taken, and it costs at least the full LP's optimum, and little more;
    without a budget no term is left out."""
    import lfm_zonal.market.formulation as formulation

    pf, res, seg = market_case("cigre_mv", 1.1, 0.3)
    zones = seg.zones(seg.n_buses)
    grid = linear_grid(
        pf, zones.aggregation(seg.weights), seg.sensitivity_method, mtus_to_clear(pf)
    )
    steps = build_bids(res, zones, pf.times, 4).steps
    steps = steps[steps.mtu.isin(grid.mtus)].reset_index(drop=True)
    left_out = []
    inner = formulation.leave_out_small_terms

    def counted(coef, quantity, budget):
        kept, towards = inner(coef, quantity, budget)
        left_out.append(int(((kept == 0) & (coef != 0)).sum()))
        return kept, towards

    monkeypatch.setattr(formulation, "leave_out_small_terms", counted)
    monkeypatch.setattr(formulation, "LONG_ROW_STEPS", 1)  # CIGRE's rows are short
    # Paid to be accepted: every step is taken up to what the rows allow, the steps of the
    # left-out terms too, so the rows are met only thanks to the tightened limits.
    steps["price_eur_per_mwh"] = -1.0
    out = {}
    for share in (0.0, 20.0):
        monkeypatch.setattr(formulation, "ROW_LEAVE_OUT_SHARE", share)
        left_out.clear()
        out[share] = solve_clearing(grid, steps, res.table, penalty_eur_per_mwh=1e5)
        out[share, "left out"] = sum(left_out)
    full, short = out[0.0], out[20.0]
    assert out[0.0, "left out"] == 0 and out[20.0, "left out"] > 0
    assert full.status is short.status is SolveStatus.OPTIMAL
    assert full.slack_mw.max() == short.slack_mw.max() == 0.0  # every row can be met
    for sol in (full, short):
        loading, vm = grid.after(sol.p_mw, sol.q_mvar)
        assert (grid.violations(loading, vm) <= 1e-3 * grid.row_tolerances()).all()
    assert (
        full.objective_eur
        <= short.objective_eur
        <= full.objective_eur + 0.01 * abs(full.objective_eur)
    )


def _highs_basis(highs: highspy.Highs) -> tuple[np.ndarray, np.ndarray]:
    basis = highs.getBasis()
    return (
        np.array([int(s) for s in basis.col_status]),
        np.array([int(s) for s in basis.row_status]),
    )


def test_basis_statuses_read_from_the_solution_are_highs_own():
    """``_basis_status`` (from the basic variables, the values and the duals) gives
    getBasis's status of every column and row of an LP with each case by hand: basic,
    nonbasic at a lower or an upper bound, and fixed columns and equality rows whose
    side only their dual's sign tells (one each way)."""
    lp = formulation.LpBuilder()
    inf = np.inf
    # x0, x1 basic on equality rows (cost +1 and -1: row duals of both signs); x2, x3 fixed
    # (cost +1, -1); x4 at its upper bound, x5 at its lower; x6 and x7 basic under rows
    # at their upper and lower bounds.
    x = lp.columns(
        [1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0],
        [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -5.0],
        [5.0, 5.0, 1.0, 1.0, 3.0, 3.0, 10.0, 10.0],
    )
    r = lp.rows([1.0, 1.0, -inf, 1.0], [1.0, 1.0, 2.0, inf])
    lp.coefficients(r, x[[0, 1, 6, 7]], np.ones(4))
    highs = lp.highs()
    highs.run()
    col, row = _highs_basis(highs)
    S = highspy.HighsBasisStatus
    lower, upper, basic = int(S.kLower), int(S.kUpper), int(S.kBasic)
    assert col[[2, 3, 4, 5]].tolist() == [lower, upper, upper, lower]
    assert sorted(row[:2].tolist()) == [lower, upper]  # equality rows: one each side
    assert row[2:].tolist() == [upper, lower] and (col[[0, 1, 6, 7]] == basic).all()
    solution = highs.getSolution()
    _, variables = highs.getBasicVariables()
    read_col = market_module._basis_status(
        x,
        variables[variables >= 0],
        np.asarray(solution.col_value),
        np.asarray(solution.col_dual),
        lp.col_bounds,
        upper_if_fixed_dual=-1.0,
    )
    read_row = market_module._basis_status(
        r,
        -1 - variables[variables < 0],
        np.asarray(solution.row_value),
        np.asarray(solution.row_dual),
        lp.row_bounds,
        upper_if_fixed_dual=1.0,
    )
    np.testing.assert_array_equal(read_col, col)
    np.testing.assert_array_equal(read_row, row)


def test_every_clearing_lp_carries_highs_own_market_basis(monkeypatch):
    """The market basis a solved clearing LP hands on (its bid steps and storage rows) is
    getBasis's, in every LP of a clearing with batteries and of a margin round after it
    (the bids of the MTUs a battery links to the re-cleared ones held: fixed columns,
    whose side only their dual tells): steps basic and at both bounds, storage rows
    basic and at a bound."""
    grid, steps, res = battery_case(k=None)
    read = ClearingModel._basis
    seen_bid, seen_row, fixed = set(), set(), []

    def compared(self, solution):
        basis = read(self, solution)
        col, row = _highs_basis(self.highs)
        kept = self.lp.x_col >= 0
        np.testing.assert_array_equal(basis.bid_status[kept], col[self.lp.x_col[kept]])
        np.testing.assert_array_equal(basis.row_status, row[self.lp.storage_rows])
        seen_bid.update(basis.bid_status[kept].tolist())
        seen_row.update(basis.row_status.tolist())
        lower, upper = (b[self.lp.x_col[kept]] for b in self.lp.builder.col_bounds)
        fixed.extend(basis.bid_status[kept][lower == upper].tolist())
        return basis

    monkeypatch.setattr(ClearingModel, "_basis", compared)
    quota = np.full(len(grid.mtus), 1.0)
    first = solve_clearing(grid, steps, res.table, quota_mw=quota)
    assert first.status is SolveStatus.OPTIMAL
    only = np.zeros(len(grid.mtus), bool)
    only[4] = True  # re-cleared: the battery's other MTUs 3, 5, 9 held in its block
    again, _ = margin_round(grid, steps, res.table, first, only, quota)
    assert again.status is SolveStatus.OPTIMAL
    S = highspy.HighsBasisStatus
    assert seen_bid == {int(S.kLower), int(S.kUpper), int(S.kBasic)}
    assert int(S.kBasic) in seen_row and len(seen_row) >= 2
    assert {int(S.kLower), int(S.kUpper)} <= set(fixed)  # held steps on both sides


def test_an_lp_without_matrix_entries_hands_on_its_basis():
    """A trust-region LP of an MTU far from its limits (no grid row) whose only bounded
    area has nothing selected: rows (its trust row) but no matrix entry. HiGHS solves it
    without the simplex, where getBasicVariables would end the process; its basis is
    getBasis's, and nothing is bought."""
    grid = _two_lines(np.array([[50.0, 50.0]]))  # no row within the screen's margin
    penalty = DEFAULT_PENALTY_EUR_PER_MWH
    bids = _bids([0, 1], ["up", "up"], [5.0, 1.0], [2.0 * penalty, 10.0])
    bounds = (np.array([[-1.0, -np.inf]]), np.array([[1.0, np.inf]]))
    sol = solve_clearing(grid, bids, p_bounds=bounds)
    assert sol.status is SolveStatus.OPTIMAL
    np.testing.assert_array_equal(sol.accepted_mw, [0.0, 0.0])
    assert sol.basis.bid_status.tolist() == [int(highspy.HighsBasisStatus.kLower)] * 2


def test_an_lp_highs_leaves_unknown_is_solved_again_from_scratch(monkeypatch):
    """SimBench MV rural on 10 April 2016 from 12:00: HiGHS 1.13's dual simplex left the
    nodal DSO-needs LP of the first MTUs with one dual infeasibility (model status
    "Unknown"), which stopped the whole run. Solved again from scratch with the primal
    simplex (UNKNOWN_RETRIES), the market clears and its AC check leaves nothing violated."""
    from lfm_zonal.study.job import prepare_base_case, prepare_resources
    from lfm_zonal.study.scenario import parse_scenario

    shipped = Path(__file__).parents[1] / "scenarios" / "simbench_mv_windy_day.toml"
    text = shipped.read_text().replace("2016-04-16 00:00", "2016-04-10 12:00")
    scenario = parse_scenario(text.replace("n_mtu = 96", "n_mtu = 48"), str(shipped))
    base = prepare_base_case(scenario)
    resources = prepare_resources(base)
    seen = []
    real = SolveStatus.of

    def of(highs):
        status = real(highs)
        seen.append(status)
        return status

    monkeypatch.setattr(SolveStatus, "of", staticmethod(of))
    result = clear_market(base.powerflow, resources, "nodal")
    assert result.kpis["solver_status"] == "optimal"
    assert result.kpis["new_violations"] == 0
    assert result.residual.empty and result.kpis["unmet_mwh"] == 0.0
    if SolveStatus.UNKNOWN not in seen:  # another HiGHS may solve it at once
        pytest.skip(f"highspy {highspy.__version__}: no LP of this case ends Unknown")


def test_unknown_is_retried_with_each_setting_until_it_is_not(hand_case, monkeypatch):  # noqa: F811
    """Each retry of UNKNOWN_RETRIES in order, on a cleared solver, until a status that is
    not "Unknown" (optimal here); then the dual simplex again. The clearing is the one
    without retries."""
    pf, res, seg = hand_case
    plain = clear_market(pf, res, "nodal")
    calls = []
    real_run, real_clear, real_set = (
        highspy.Highs.run,
        highspy.Highs.clearSolver,
        highspy.Highs.setOptionValue,
    )
    real_of = SolveStatus.of

    def of(highs):
        calls.append("of")
        return SolveStatus.UNKNOWN if calls.count("of") <= 2 else real_of(highs)

    monkeypatch.setattr(SolveStatus, "of", staticmethod(of))
    monkeypatch.setattr(
        highspy.Highs, "clearSolver", lambda h: calls.append("clear") or real_clear(h)
    )
    monkeypatch.setattr(highspy.Highs, "run", lambda h: calls.append("run") or real_run(h))
    monkeypatch.setattr(
        highspy.Highs,
        "setOptionValue",
        lambda h, name, value: calls.append((name, value)) or real_set(h, name, value),
    )
    retried = clear_market(pf, res, "nodal")
    first = calls.index("run")
    assert calls[first : first + 11] == [
        "run", "of",
        UNKNOWN_RETRIES[0], "clear", "run", "of",
        UNKNOWN_RETRIES[1], "clear", "run", "of",
        ("simplex_strategy", DUAL_SIMPLEX),
    ]  # fmt: skip
    assert retried.kpis["cost_eur"] == pytest.approx(plain.kpis["cost_eur"], rel=1e-9)
