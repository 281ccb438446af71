"""Feeders and their equivalents (``grid.feeders``): the hanging sets a nodal LP writes
through two columns each, exact in the linearised power flow."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import lfm_zonal.grid.feeders as feeders_module
import lfm_zonal.market.formulation as formulation
from lfm_zonal.grid.feeders import area_feeders, find_feeders
from lfm_zonal.grid.linear import linear_grid
from lfm_zonal.grid.sensitivity import linearisation
from lfm_zonal.market.bids import build_bids
from lfm_zonal.market.clearing import mtus_to_clear
from lfm_zonal.market.needs import dso_needs
from lfm_zonal.market.strategies import solve_clearing
from lfm_zonal.study.job import prepare_base_case, prepare_resources
from lfm_zonal.study.scenario import load_scenario
from lfm_zonal.zones.segmentation import nodal_zones


def _graph(edges, n) -> sp.csr_matrix:
    """A Ybus-like matrix with the graph's edges (and a diagonal)."""
    i, j = np.array(edges).T
    A = sp.coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    return sp.csr_matrix(A + A.T + sp.eye(n))


# 0 (slack) - 1 - 2 - 3 - 8, a loop 1 - 9 - 10 - 1 and a lateral 2 - 4 - 5 - 6 - 7.
EDGES = [(0, 1), (1, 2), (2, 3), (3, 8), (1, 9), (9, 10), (10, 1), (2, 4), (4, 5), (5, 6), (6, 7)]


def _sets(f):
    return sorted(
        (int(f.boundary[k]), sorted(np.flatnonzero(f.of_bus == k).tolist())) for k in range(len(f))
    )


def test_feeders_by_hand():
    """The hanging sets, largest first, siblings packed up to the size; a loop hangs whole."""
    f = find_feeders(_graph(EDGES, 11), np.array([0]), max_buses=4, min_buses=2)
    assert _sets(f) == [(1, [9, 10]), (2, [3, 8]), (2, [4, 5, 6, 7])]
    # Up to 8 buses: everything below bus 1 hangs off it in one feeder (the loop apart: it
    # is packed after, as the next sibling does not fit).
    f = find_feeders(_graph(EDGES, 11), np.array([0]), max_buses=8, min_buses=2)
    assert _sets(f) == [(1, [2, 3, 4, 5, 6, 7, 8]), (1, [9, 10])]
    # Too small to be worth their columns: none.
    assert len(find_feeders(_graph(EDGES, 11), np.array([0]), max_buses=4, min_buses=5)) == 0


def test_a_feeder_holds_no_slack():
    """A second slack (a substation at bus 7) keeps the sets above it out of the feeders."""
    f = find_feeders(_graph(EDGES, 11), np.array([0, 7]), max_buses=4, min_buses=2)
    assert _sets(f) == [(1, [9, 10]), (2, [3, 8])]


@pytest.fixture(scope="module", params=["simbench_mv_windy_day", "mv_oberrhein_two_substations"])
def small_feeders(request):
    """A shipped grid cut into feeders of at most 16 buses (many feeders on a small grid)."""
    scenario = load_scenario(request.param)
    base = prepare_base_case(scenario)
    mp = pytest.MonkeyPatch()
    mp.setattr(feeders_module, "FEEDER_MAX_BUSES", 16)
    mp.setattr(feeders_module, "FEEDER_MIN_BUSES", 2)
    base.powerflow.model.__dict__.pop("_feeders", None)
    yield scenario, base, mp
    mp.undo()
    base.powerflow.model.__dict__.pop("_feeders", None)


def test_feeders_hang_off_their_boundary(small_feeders):
    """Every feeder's buses reach the rest of the grid only through its boundary bus, and no
    feeder holds a slack."""
    _, base, _ = small_feeders
    model = base.powerflow.model
    f = feeders_module.model_feeders(model)
    assert len(f) >= 3
    Y = sp.coo_matrix(model.Ybus)
    for k, m in enumerate(f.boundary):
        inside = f.of_bus == k
        assert not inside[m] and not np.isin(model.ref, np.flatnonzero(inside)).any()
        out = Y.col[inside[Y.row] & ~inside[Y.col]]
        assert set(out.tolist()) == {int(m)}


def test_rows_outside_a_feeder_see_its_steps_through_the_equivalents(small_feeders):
    """For every row a feeder's states do not enter, its sensitivity to P and Q at each bus
    of the feeder is its sensitivity at the boundary times the feeder's equivalents (the
    Schur complement of J): against the rows by transposed solves."""
    _, base, _ = small_feeders
    pf = base.powerflow
    model = pf.model
    W = nodal_zones(model.buses).aggregation(pd.Series(1.0, index=model.buses))
    af = area_feeders(model, W)
    t = int(mtus_to_clear(pf)[0])
    lin = linearisation(model, pf.V[t])
    eq = af.equivalents(lin)
    n_l, n_b = len(model.branches), len(model.buses)
    cp, cq = lin.rows_sensitivity(np.arange(n_l), np.arange(n_b), sp.csr_matrix(W))
    of_row = af.of_row[: n_l + n_b]
    checked = 0
    for k, m in enumerate(af.boundary_area):
        a = np.flatnonzero(af.of_area == k)
        outside = of_row != k
        for c, (dp, dq) in ((cp, (eq[0], eq[2])), (cq, (eq[1], eq[3]))):
            want = c[np.ix_(outside, a)]
            got = cp[outside, m][:, None] * dp[a] + cq[outside, m][:, None] * dq[a]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(cp).max())
        checked += int(np.abs(cp[np.ix_(outside, a)]).max() > 1e-6)
    assert checked >= 3  # the feeders do move rows outside them


def test_an_lp_through_the_feeders_is_the_lp_over_every_step(small_feeders, monkeypatch):
    """The nodal clearing LP and the DSO-needs LP written through the feeders' equivalents
    (every MTU's rows long, the steps substituted) have the optimum of the same LPs written
    step by step; the feeders' columns are really in them."""
    scenario, base, _ = small_feeders
    monkeypatch.setattr(formulation, "LONG_ROW_STEPS", 1)
    monkeypatch.setattr(formulation, "ROW_LEAVE_OUT_SHARE", 0.0)  # no term left out
    # Steps substituted into the rows however many an area has (where the feeders apply).
    monkeypatch.setattr(formulation, "AREA_COLUMNS_STEPS_PER_PAIR", 10**9)
    made = []
    define = formulation.define_feeder_columns
    monkeypatch.setattr(
        formulation,
        "define_feeder_columns",
        lambda *a: made.append(define(*a)) or made[-1],
    )
    pf = base.powerflow
    resources = prepare_resources(base)
    zones = nodal_zones(pf.model.buses)
    W = zones.aggregation(pd.Series(1.0, index=pf.model.buses))
    grid = linear_grid(pf, W, "jacobian", mtus_to_clear(pf), representation="adjoint")
    assert grid.rows.feeders is not None
    plain = dataclasses.replace(grid, rows=dataclasses.replace(grid.rows, feeders=None))
    bids = build_bids(resources, zones, pf.times, scenario["flexibility"]["max_steps"]).steps
    active = bids[bids.mtu.isin(grid.mtus)]
    through, direct = (solve_clearing(g, active, resources.table) for g in (grid, plain))
    assert through.objective_eur == pytest.approx(direct.objective_eur, rel=1e-7)
    np.testing.assert_allclose(through.marginal_price, direct.marginal_price, rtol=1e-6, atol=1e-6)
    needs = [dso_needs(g, active)[0].need_mw.sum() for g in (grid, plain)]
    assert needs[0] == pytest.approx(needs[1], rel=1e-6)
    through_feeders = [f for f in made if f is not None]
    assert through_feeders and all(f.long.any() and len(f.cols) for f in through_feeders)
