"""Margins: a market clears again with tightened limits where its real dispatch violates
in AC a row that its model met (``market.strategies.RowMargins``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from test_market import market_case

import lfm_zonal.market.clearing as clearing_module
from lfm_zonal.check.ac import ac_check
from lfm_zonal.grid.violations import (
    VIOLATION_TOLERANCE_LOADING_PERCENT,
    VIOLATION_TOLERANCE_VM_PU,
    excess,
)
from lfm_zonal.market.clearing import clear_market
from lfm_zonal.market.strategies import MARGIN_SLOPE_RANGE, SLP_COST_RTOL, RowMargins


def _margins(n_rows: int = 3) -> RowMargins:
    """Margins of one MTU over voltage rows only (their tolerance)."""
    grid = SimpleNamespace(
        mtus=np.array([0]),
        n_rows=n_rows,
        row_tolerances=lambda: np.full(n_rows, VIOLATION_TOLERANCE_VM_PU),
    )
    return RowMargins(grid)


def test_a_row_is_met_in_two_rounds_when_ac_answers_linearly():
    """AC excess e(m) = e0 - s m for a row whose zonal sensitivity overstates the dispatch's
    (s = 0.3 instead of 1). By hand: m1 = e0 + tol/2, e1 = e0 - s m1; the secant gives
    slope -s, so m2 = m1 + e1 / s + tol/2 and e2 = -s tol/2: inside the limit."""
    tol, e0, s = VIOLATION_TOLERANCE_VM_PU, 0.002, 0.3
    margins = _margins(1)
    predicted = np.array([[-1e-6]])  # the model meets it (at its tightened limit)
    base = np.array([[0.01]])  # violated in the base case
    real = np.array([[e0]])
    unmet = margins.unmet(real, predicted, base)
    assert unmet.all()
    margins.grow(real, unmet)
    m1 = margins.values[0, 0]
    assert m1 == pytest.approx(e0 + tol / 2)
    np.testing.assert_array_equal(margins.grown, [True])
    real = np.array([[e0 - s * m1]])
    margins.grow(real, margins.unmet(real, predicted, base))
    e2 = e0 - s * margins.values[0, 0]
    assert e2 == pytest.approx(-s * tol / 2)
    assert not margins.unmet(np.array([[e2]]), predicted, base).any()


def test_margins_go_to_rows_the_model_met_or_the_dispatch_created():
    """Row 0: violated in AC, met by the model (margin); row 1: violated in the base case
    and left violated by the model (offers short: no margin would help); row 2: met in AC;
    row 3: the model itself violates it, but the base case did not (the dispatch created
    it: margin). An MTU that did not converge (NaN) gets none. A row that does not answer
    its margin at all grows by at most 1 / |MARGIN_SLOPE_RANGE[1]| times its excess."""
    tol = VIOLATION_TOLERANCE_VM_PU
    margins = _margins(4)
    real = np.array([[0.004, 0.004, -0.001, 0.002]])
    predicted = np.array([[0.0, 0.003, -0.002, 0.001]])
    base = np.array([[0.01, 0.01, 0.01, -0.001]])
    unmet = margins.unmet(real, predicted, base)
    np.testing.assert_array_equal(unmet, [[True, False, False, True]])
    assert not margins.unmet(np.full((1, 4), np.nan), predicted, base).any()
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
