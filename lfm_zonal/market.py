"""The market: DSO needs, clearing (nodal, zonal, needs-based), dispatch, AC check, KPIs.

``clear_market`` runs one method for one zone count::

    zones -> MTUs with a base-case violation -> linearised grid (zonal indices per MTU)
    -> DSO needs -> bids -> clearing -> dispatch to resources -> AC check -> KPIs

Methods:

``nodal``       one zone per bus and the nodal sensitivities (the benchmark);
``zonal``       K zones, the clearing LP on the zonal indices;
``needs_based`` K zones, each zone covers its published need by merit order, no
                substitution across zones (the simplest zonal market).

**DSO need** (published per MTU, zone and direction): the least total zonal
activation, in MW, that removes every linearised violation of the MTU if each
zone had unlimited flexibility at its virtual bus (``clearing.dso_needs``).
**Unmet need** after a clearing is the same quantity on the linearised state left
by the accepted bids: the MW the DSO still misses.

**Dispatch**: in a zone every step of an aggregator has the same zonal index, so
the steps the LP accepts are already its least-cost portfolio for the accepted
zonal quantity (storage energy limits included); each accepted step is dispatched
to the resource behind it, at its real bus. That is what the AC check sees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lfm_zonal.bids import DEFAULT_MAX_STEPS, Bids, build_bids, dispatch_steps
from lfm_zonal.clearing import (
    LinearGrid,
    MarketLP,
    Solution,
    dso_needs,
    linear_grid,
    solve_clearing,
)
from lfm_zonal.errors import InputError
from lfm_zonal.powerflow import HorizonPowerFlow
from lfm_zonal.resources import Resources
from lfm_zonal.segmentation import Segmentation, Zones, overall_error
from lfm_zonal.validation import ACCheck, ac_check, solve_with_injections, violation_kpis

MARKET_METHODS = ("nodal", "zonal", "needs_based")
#: Sequential-LP rounds: re-linearise at the AC point of the market's own model of the dispatch.
AC_ROUNDS = 6
AC_TOLERANCE_LOADING_PERCENT = 0.05
AC_TOLERANCE_VM_PU = 2e-4
PRICING = ("pay_as_bid", "pay_as_clear")


@dataclass(frozen=True)
class MarketResult:
    """Everything one clearing produced, indexed by pandapower indices and MTU times."""

    method: str
    k: int
    zones: Zones
    needs: pd.DataFrame  # time, mtu, zone, direction, need_mw
    bids: pd.DataFrame  # every bid with accepted_mw, status, clearing price and cost
    activations: pd.DataFrame  # time, mtu, zone, p_mw, q_mvar (net per zone)
    dispatch: pd.DataFrame  # time, mtu, resource_id, aggregator, bus, direction, p_mw, q_mvar
    unmet: pd.DataFrame  # time, mtu, unmet_mw, unfixable_mw
    ac: ACCheck
    kpis: dict = field(default_factory=dict)


def mtus_to_clear(pf: HorizonPowerFlow) -> np.ndarray:
    """Converged MTUs with a base-case overload or voltage outside the band."""
    v = pf.violations()
    bad = (v.overloaded_branches + v.undervoltage_buses + v.overvoltage_buses) > 0
    return np.flatnonzero((bad & v.converged).to_numpy())


def market_zones(
    seg: Segmentation, method: str, k: int, segmentation_method: str, seed: int
) -> Zones:
    if method not in MARKET_METHODS:
        raise InputError(
            f"unknown market method '{method}': choose one of {', '.join(MARKET_METHODS)}"
        )
    return seg.zones(seg.n_buses) if method == "nodal" else seg.zones(k, segmentation_method, seed)


def clear_market(
    seg: Segmentation,
    resources: Resources,
    method: str,
    k: int | None = None,
    *,
    segmentation_method: str = "agglomerative",
    pricing: str = "pay_as_bid",
    penalty_eur_per_mwh: float | None = None,
    seed: int = 0,
    max_steps: int = DEFAULT_MAX_STEPS,
    grid: LinearGrid | None = None,
) -> MarketResult:
    """Clear one market (``method`` with ``k`` zones; nodal ignores ``k``) and check it in AC."""
    if pricing not in PRICING:
        raise InputError(f"unknown pricing '{pricing}': choose one of {', '.join(PRICING)}")
    pf = seg.pf
    zones = market_zones(seg, method, k or seg.n_buses, segmentation_method, seed)
    started = time.perf_counter()
    grid = grid or linear_grid(pf, seg, zones, mtus_to_clear(pf))
    t_grid = time.perf_counter() - started
    times = pf.times
    needs, unfixable = dso_needs(grid)
    bids = build_bids(resources, zones, times, max_steps)
    active = bids.steps[bids.steps.mtu.isin(grid.mtus)]
    kwargs = {} if penalty_eur_per_mwh is None else {"penalty_eur_per_mwh": penalty_eur_per_mwh}
    started = time.perf_counter()
    if len(grid.mtus) == 0:  # no MTU with a violation: nothing to buy
        accepted, price = np.zeros(len(active)), np.full(len(active), np.nan)
        stats = {"status": "nothing to clear", "n_variables": 0, "n_constraints": 0}
    elif method == "needs_based":
        accepted, price = _merit_order_to_needs(active, needs, grid)
        stats = {"status": "merit order", "n_variables": 0, "n_constraints": 0}
    else:
        sol, grid, stats = _sequential_clearing(seg, zones, grid, active, resources, kwargs, needs)
        accepted, price = sol.accepted_mw, _bid_prices(active, sol, grid)
    stats["clear_s"] = time.perf_counter() - started
    stats["grid_s"] = t_grid
    result_bids = _bid_table(
        bids.steps, active.index, accepted, price, pf.profiles.horizon.mtu_hours
    )
    p, q = _area_injections(active, accepted, grid)
    residual, still_unfixable = dso_needs(grid.shifted(p, q))
    unmet = _unmet_table(grid, residual, still_unfixable, unfixable, times)
    dispatch = _dispatch(bids, result_bids)
    ac = ac_check(pf, dispatch)
    res = MarketResult(
        method=method,
        k=zones.k,
        zones=zones,
        needs=needs.assign(time=times[needs.mtu.to_numpy()])[
            ["time", "mtu", "zone", "direction", "need_mw"]
        ],
        bids=result_bids,
        activations=_activation_table(grid, p, q, times),
        dispatch=dispatch,
        unmet=unmet,
        ac=ac,
    )
    err = overall_error(seg.indices(zones).error)["mean"]
    kpis = _kpis(res, pf, pricing, stats, err)
    return MarketResult(**{**res.__dict__, "kpis": kpis})


def _sequential_clearing(
    seg: Segmentation,
    zones: Zones,
    grid: LinearGrid,
    active: pd.DataFrame,
    resources: Resources,
    kwargs: dict,
    needs: pd.DataFrame,
):
    """Clear, then re-linearise at the AC point of the market's own model of the result
    and clear again, until that model has no violation (sequential LP).

    The market's model injects each area's activation at its virtual bus, spread over
    the area's buses by the segmentation weights: for the nodal market (one bus per
    area) that is the real dispatch, so nodal clearing converges to an AC-feasible
    dispatch; for a zonal market it is the DSO's zonal view, and the AC check of the
    real dispatch measures what that view misses.
    """
    pf = seg.pf
    W = zones.aggregation(seg.weights)
    totals = {
        "status": "optimal",
        "rounds": 0,
        "ac_rounds": 0,
        "build_s": 0.0,
        "solve_s": 0.0,
        "highs_s": 0.0,
    }
    sol = None
    worst = np.inf
    # The market side (bids, balances, storage) is the same in every round: built once.
    market = MarketLP(grid.mtus, grid.k, grid.dt_h, active.reset_index(drop=True), resources.table)
    totals["build_s"] += market.build_s
    for ac_round in range(AC_ROUNDS):
        # Column quota per MTU: the DSO need of the MTU at this linearisation, with margin.
        if ac_round > 0:  # re-linearised: the needs of the new linearisation
            needs, _ = dso_needs(grid)
        quota = (
            1.5 * needs.groupby("mtu").need_mw.sum().reindex(grid.mtus, fill_value=0.0).to_numpy()
        )
        sol = solve_clearing(grid, active, resources.table, quota_mw=quota, market=market, **kwargs)
        if sol.status != "optimal":
            raise InputError(f"clearing with K = {zones.k}: solver status {sol.status}")
        for key in ("rounds", "build_s", "solve_s", "highs_s"):
            totals[key] += sol.stats[key]
        totals["column_rounds"] = totals.get("column_rounds", 0) + sol.stats["column_rounds"]
        totals.update({k: sol.stats[k] for k in ("n_variables", "n_constraints", "n_grid_rows")})
        totals["ac_rounds"] = ac_round + 1
        V, ok = solve_with_injections(pf, grid.mtus, sol.p_mw @ W.T, sol.q_mvar @ W.T)
        if not ok.all():
            break
        model = pf.model
        loading = np.array([model.loading_percent(v) for v in V])
        vm = np.array([model.vm_pu(v) for v in V])
        excess = grid.violations(loading, vm)
        tol = np.r_[
            np.full(len(grid.branches), AC_TOLERANCE_LOADING_PERCENT),
            np.full(2 * len(grid.buses), AC_TOLERANCE_VM_PU),
        ]
        # Stop when the model is AC-feasible, or when another round no longer helps (what is
        # left is unmet need that the slack pays for).
        now = float(np.max(excess - tol, initial=0.0))
        if now <= 0 or now > 0.9 * worst or ac_round == AC_ROUNDS - 1:
            break
        worst = now
        grid = linear_grid(pf, seg, zones, grid.mtus, V, sol.p_mw, sol.q_mvar)
    return sol, grid, totals


def _bid_prices(active: pd.DataFrame, sol: Solution, grid: LinearGrid) -> np.ndarray:
    """Pay-as-clear price of each bid: the zonal marginal price of its direction and MTU."""
    t = pd.Series(np.arange(len(grid.mtus)), index=grid.mtus).reindex(active.mtu).to_numpy()
    z = active.zone.to_numpy()
    lam = sol.marginal_price[t, z] + active.tan_phi.to_numpy() * sol.marginal_price_q[t, z]
    return np.where(active.direction.to_numpy() == "up", lam, -lam)


def _merit_order_to_needs(active: pd.DataFrame, needs: pd.DataFrame, grid: LinearGrid):
    """Each zone and direction buys its published need from its cheapest steps (no substitution)."""
    accepted = np.zeros(len(active))
    price = np.full(len(active), np.nan)
    need = needs.set_index(["mtu", "zone", "direction"]).need_mw
    frame = active.reset_index(drop=True)
    for key, group in frame.groupby(["mtu", "zone", "direction"], sort=True):
        target = float(need.get(key, 0.0))
        if target <= 0:
            continue
        order = group.sort_values(["price_eur_per_mwh", "bid_id"], kind="stable")
        cum = order.quantity_mw.cumsum().to_numpy()
        take = np.clip(
            target - (cum - order.quantity_mw.to_numpy()), 0.0, order.quantity_mw.to_numpy()
        )
        accepted[order.index.to_numpy()] = take
        marginal = order.price_eur_per_mwh.to_numpy()[take > 1e-9]
        if len(marginal):
            price[order.index.to_numpy()] = marginal.max()
    return accepted, price


def _bid_table(
    bids: pd.DataFrame, active_index: pd.Index, accepted: np.ndarray, price: np.ndarray, dt_h: float
) -> pd.DataFrame:
    out = bids.copy()
    out["accepted_mw"] = 0.0
    out["clearing_price_eur_per_mwh"] = np.nan
    out.loc[active_index, "accepted_mw"] = np.where(accepted > 1e-9, accepted, 0.0)
    out.loc[active_index, "clearing_price_eur_per_mwh"] = price
    full = out.accepted_mw >= out.quantity_mw - 1e-9
    out["status"] = np.where(
        out.accepted_mw <= 0, "rejected", np.where(full, "accepted", "partial")
    )
    out["cost_pay_as_bid_eur"] = out.accepted_mw * out.price_eur_per_mwh * dt_h
    out["cost_pay_as_clear_eur"] = (
        out.accepted_mw * out.clearing_price_eur_per_mwh.fillna(0.0) * dt_h
    )
    return out


def _area_injections(active: pd.DataFrame, accepted: np.ndarray, grid: LinearGrid):
    T, K = len(grid.mtus), grid.k
    t = pd.Series(np.arange(T), index=grid.mtus).reindex(active.mtu).to_numpy()
    sign = np.where(active.direction.to_numpy() == "up", 1.0, -1.0)
    p, q = np.zeros((T, K)), np.zeros((T, K))
    np.add.at(p, (t, active.zone.to_numpy()), sign * accepted)
    np.add.at(q, (t, active.zone.to_numpy()), sign * accepted * active.tan_phi.to_numpy())
    return p, q


def _activation_table(grid: LinearGrid, p: np.ndarray, q: np.ndarray, times) -> pd.DataFrame:
    T, K = p.shape
    t, z = np.meshgrid(np.arange(T), np.arange(K), indexing="ij")
    out = pd.DataFrame(
        {
            "time": times[grid.mtus[t.ravel()]],
            "mtu": grid.mtus[t.ravel()],
            "zone": z.ravel(),
            "p_mw": p.ravel(),
            "q_mvar": q.ravel(),
        }
    )
    return out[(out.p_mw.abs() > 1e-9) | (out.q_mvar.abs() > 1e-9)].reset_index(drop=True)


def _unmet_table(
    grid: LinearGrid,
    residual: pd.DataFrame,
    still_unfixable: np.ndarray,
    unfixable_before: np.ndarray,
    times,
) -> pd.DataFrame:
    unmet = residual.groupby("mtu").need_mw.sum().reindex(grid.mtus, fill_value=0.0).to_numpy()
    return pd.DataFrame(
        {
            "time": times[grid.mtus],
            "mtu": grid.mtus,
            "unmet_mw": unmet,
            "unfixable_mw": np.maximum(still_unfixable, unfixable_before)
            if len(grid.mtus)
            else np.zeros(0),
        }
    )


def _dispatch(bids: Bids, result: pd.DataFrame) -> pd.DataFrame:
    """Accepted steps dispatched to resources (cheapest first): signed change of net injection."""
    used = dispatch_steps(bids, result.set_index("bid_id").accepted_mw)
    step = result.set_index("bid_id").loc[used.bid_id.to_numpy()]
    sign = np.where(step.direction.to_numpy() == "up", 1.0, -1.0)
    out = pd.DataFrame(
        {
            "time": step.time.to_numpy(),
            "mtu": step.mtu.to_numpy(),
            "bid_id": used.bid_id.to_numpy(),
            "resource_id": used.resource_id.to_numpy(),
            "aggregator": step.aggregator.to_numpy(),
            "bus": used.bus.to_numpy(),
            "zone": step.zone.to_numpy(),
            "direction": step.direction.to_numpy(),
            "p_mw": sign * used.dispatched_mw.to_numpy(),
            "q_mvar": sign * used.dispatched_mw.to_numpy() * used.tan_phi.to_numpy(),
        }
    )
    return out.sort_values(["mtu", "resource_id", "direction"], ignore_index=True)


def _kpis(
    res: MarketResult, pf: HorizonPowerFlow, pricing: str, stats: dict, segmentation_error: float
) -> dict:
    dt = pf.profiles.horizon.mtu_hours
    bids = res.bids
    cost_bid = float(bids.cost_pay_as_bid_eur.sum())
    cost_clear = float(bids.cost_pay_as_clear_eur.sum())
    return {
        "method": res.method,
        "k": res.k,
        "pricing": pricing,
        "cost_eur": cost_bid if pricing == "pay_as_bid" else cost_clear,
        "cost_pay_as_bid_eur": cost_bid,
        "cost_pay_as_clear_eur": cost_clear,
        "activated_mwh": float(bids.accepted_mw.sum() * dt),
        "accepted_bids": int((bids.accepted_mw > 0).sum()),
        "need_mwh": float(res.needs.need_mw.sum() * dt),
        "unmet_mwh": float(res.unmet.unmet_mw.sum() * dt),
        "unmet_mw_max": float(res.unmet.unmet_mw.max()) if len(res.unmet) else 0.0,
        **violation_kpis(pf, res.ac),
        "segmentation_error": segmentation_error,
        "solver_status": stats.get("status", ""),
        "solve_s": stats.get("solve_s", 0.0),
        "build_s": stats.get("build_s", 0.0),
        "clear_s": stats.get("clear_s", 0.0),
        "n_variables": stats.get("n_variables", 0),
        "n_constraints": stats.get("n_constraints", 0),
        "generation_rounds": stats.get("rounds", 0),
        "ac_rounds": stats.get("ac_rounds", 0),
        "column_rounds": stats.get("column_rounds", 0),
    }
