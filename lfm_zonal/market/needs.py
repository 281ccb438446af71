"""The DSO's needs per market area: the least activation that removes every linearised
violation, for the needs-based market (Vannoni et al.'s DSO-needs LP)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from lfm_zonal.grid.linear import LinearGrid, RowScales
from lfm_zonal.market.lp import require_optimal
from lfm_zonal.market.strategies import place_rows, select_rows, solve_clearing


def unlimited_bids(grid: LinearGrid, capacity_mw: np.ndarray | None = None) -> pd.DataFrame:
    """One bid per MTU, area and direction at 1 EUR/MWh: the DSO-needs LP. Unbounded, or
    bounded by ``capacity_mw`` (T x K x 2, up then down; none where that is 0)."""
    T, K = len(grid.mtus), grid.k
    t, a, d = np.meshgrid(np.arange(T), np.arange(K), [0, 1], indexing="ij")
    t, a, d = t.ravel(), a.ravel(), d.ravel()
    if capacity_mw is not None:
        offered = capacity_mw[t, a, d] > 0
        t, a, d = t[offered], a[offered], d[offered]
    return pd.DataFrame(
        {
            "mtu": grid.mtus[t],
            "zone": a,
            "direction": np.where(d == 0, "up", "down"),
            "quantity_mw": np.inf if capacity_mw is None else capacity_mw[t, a, d],
            "price_eur_per_mwh": 1.0,
            "tan_phi": 0.0,
            "resource_id": "",
            "aggregator": "DSO",
        }
    )


class DsoNeeds(NamedTuple):
    """``dso_needs``'s result."""

    needs: pd.DataFrame  # mtu, zone, direction, need_mw (positive needs only)
    unfixable: np.ndarray  # per MTU of the grid: MW-equivalent the rule's flexibility cannot fix
    #: The grid rows its LP's optimum rests on, (MTU position in the grid, row) pairs
    #: (``Solution.rows``): a clearing on the same linearisation starts with them.
    rows: np.ndarray


def dso_needs(
    grid: LinearGrid, registered: pd.DataFrame | None = None, rows: np.ndarray | None = None
) -> DsoNeeds:
    """Per MTU, area and direction: the least total area activation (MW) that removes every
    linearised violation.

    Without ``registered`` (the "unlimited" rule), each area has unlimited flexibility.
    With ``registered`` (the bids offered: mtu, zone, direction, quantity_mw; the
    "registered_capacity" rule), each area's activation per MTU and direction is capped at
    the MW offered there, so no need is published where nothing can meet it. In an MTU
    where the offers cannot remove every violation, the need is what they can do: the
    same LP minimises first the violation left (the slack penalty) and then the MW, so
    the need is at most the registered capacity, everywhere.

    Returns the needs (columns mtu, zone, direction, need_mw, only positive needs), per
    MTU what the flexibility of the rule cannot fix (MW-equivalent slack; with
    ``registered``: what the offers cannot fix), and the grid rows its optimum rests on.
    ``rows`` (as ``DsoNeeds.rows``): grid rows its LP starts with besides its screen.
    """
    excess = grid.violations(grid.loading0, grid.vm0)
    violated = (excess > grid.row_tolerances()).any(axis=1)
    if not violated.any():  # no linearised violation: no need, no LP
        empty = pd.DataFrame(
            {
                "mtu": np.zeros(0, np.int64),
                "zone": np.zeros(0, np.int64),
                "direction": np.zeros(0, object),
                "need_mw": np.zeros(0),
            }
        )
        return DsoNeeds(empty, np.zeros(len(grid.mtus)), np.zeros((0, 2), np.int64))
    # MTUs without a violation need nothing: the LP covers the others only.
    sub = grid.select(violated)
    capacity = None
    if registered is not None:  # MW offered per MTU, area and direction (up, down)
        capacity = np.zeros((len(sub.mtus), sub.k, 2))
        t = pd.Series(np.arange(len(sub.mtus)), index=sub.mtus).reindex(registered.mtu)
        keep = t.notna().to_numpy()
        np.add.at(
            capacity,
            (
                t.to_numpy()[keep].astype(np.int64),
                registered.zone.to_numpy(np.int64)[keep],
                (registered.direction.to_numpy() != "up")[keep].astype(np.int64),
            ),
            registered.quantity_mw.to_numpy(float)[keep],
        )
    bids = unlimited_bids(sub, capacity)
    # What is within the tolerance of its limit needs nothing; the rows' units and which of
    # them the base case violates are the untolerated grid's.
    sol = require_optimal(
        solve_clearing(
            sub.tolerated(),
            bids,
            scales=RowScales(sub, capacity),
            rows=None if rows is None else select_rows(rows, violated),
        ),
        "DSO-needs LP",
    )
    out = bids[["mtu", "zone", "direction"]].assign(need_mw=sol.accepted_mw)
    unfixable = np.zeros(len(grid.mtus))
    unfixable[violated] = sol.slack_mw
    return DsoNeeds(
        out[out.need_mw > 1e-6].reset_index(drop=True), unfixable, place_rows(sol.rows, violated)
    )
