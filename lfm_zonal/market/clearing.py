"""The market: DSO needs, clearing (nodal, zonal, needs-based), dispatch, AC check, KPIs.

``clear_market`` runs one method for one zone count::

    zones -> MTUs with a base-case violation -> linearised grid (zonal indices per MTU)
    -> DSO needs -> bids -> clearing -> dispatch to resources -> AC check
    -> (margin rounds: rows the check violates tightened, cleared and checked again) -> KPIs

Methods:

``nodal``       one zone per bus and the nodal sensitivities (the benchmark);
``zonal``       K zones, the clearing LP on the zonal indices;
``needs_based`` K zones, each zone covers its published need by merit order, no
                substitution across zones (the simplest zonal market).

**DSO need** (published per MTU, zone and direction): the least total zonal
activation, in MW, that removes every linearised violation of the MTU with each
zone's activation capped at the flexibility offered there (``needs_rule =
"registered_capacity"``, the default; where the offers cannot remove every
violation, what they can do) or with unlimited flexibility at every zone's virtual
bus (``"unlimited"``) (``clearing.dso_needs``).
**Unmet need** after a clearing is the same quantity on the linearised state left
by the accepted bids: the MW the DSO still misses.

**Dispatch**: in a zone every step of an aggregator has the same zonal index, so
the steps the LP accepts are already its least-cost portfolio for the accepted
zonal quantity (storage energy limits included); each accepted step is dispatched
to the resource behind it, at its real bus. That is what the AC check sees.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lfm_zonal.check.ac import (
    RESIDUAL_COLUMNS,
    ACCheck,
    ac_check,
    residual_mw_per_mtu,
    residual_violations,
    violation_kpis,
)
from lfm_zonal.check.kpis import KPI_NAMES
from lfm_zonal.config import DEFAULT_PENALTY_EUR_PER_MWH, MARKET_METHODS, NEEDS_RULES, PRICING
from lfm_zonal.errors import InputError, LfmError, SolverError
from lfm_zonal.grid.linear import LinearGrid, linear_grid
from lfm_zonal.grid.powerflow import HorizonPowerFlow
from lfm_zonal.grid.sensitivity import LinearisationCache
from lfm_zonal.market.bids import (
    DEFAULT_MAX_STEPS,
    Bids,
    build_bids,
    dispatch_steps,
    merit_order_fill,
    sorted_rows,
)
from lfm_zonal.market.lp import Solution, SolveStats, SolveStatus, require_optimal
from lfm_zonal.market.needs import dso_needs
from lfm_zonal.market.resources import Resources
from lfm_zonal.market.strategies import (
    MARGIN_MAX_ROUNDS,
    MARGIN_PATIENCE,
    MARGIN_PROGRESS,
    RowMargins,
    SequentialLP,
    column_quota,
    place_rows,
    select_rows,
    sequential_clearing,
    solve_clearing,
)
from lfm_zonal.zones.segmentation import Zones, nodal_zones

log = logging.getLogger(__name__)

_LP_SIZE = ("n_variables", "n_constraints", "n_nonzeros", "n_grid_rows")  # SolveStats
#: A step bought for more than this many MW is accepted (its MW in the bid table, its
#: dispatch, its group's marginal price); below, solver noise: rejected.
ACCEPTED_MIN_MW = 1e-9


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
    unmet: pd.DataFrame  # time, mtu, unmet_mw, unfixable_mw, unmet_linear_mw, unmet_ac_mw
    ac: ACCheck
    kpis: dict = field(default_factory=dict)
    #: (MTU, element) still violated after the AC check: validation.residual_violations
    residual: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=RESIDUAL_COLUMNS))


@dataclass(frozen=True)
class MarketInputs:
    """What a market clears against, the same for the zonal and the needs-based market of
    one set of zones (a study makes it once per K): the areas' linearised grid, the bids
    and the DSO's needs (``prepare_market``)."""

    zones: Zones
    W: sp.spmatrix  # internal bus x area weights (zones.aggregation)
    grid: LinearGrid
    bids: Bids
    active: pd.DataFrame  # the bid steps of the MTUs to clear
    needs: pd.DataFrame
    unfixable: np.ndarray
    needs_rows: np.ndarray  # the grid rows the DSO-needs LP rests on (DsoNeeds.rows)
    needs_rule: str
    sensitivity_method: str  # of the grid, and of its re-linearisations


def mtus_to_clear(pf: HorizonPowerFlow) -> np.ndarray:
    """Converged MTUs with a base-case overload or voltage outside the band."""
    v = pf.violations()
    bad = ((v.overloaded_branches + v.undervoltage_buses + v.overvoltage_buses) > 0).fillna(False)
    return np.flatnonzero((bad & v.converged).to_numpy(bool))


def clear_market(
    pf: HorizonPowerFlow,
    resources: Resources,
    method: str,
    zones: Zones | None = None,
    *,
    weights: pd.Series | None = None,
    sensitivity_method: str = "jacobian",
    segmentation_error: float | None = None,
    pricing: str = "pay_as_bid",
    penalty_eur_per_mwh: float | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    grid: LinearGrid | None = None,
    needs_rule: str = "registered_capacity",
    cache: LinearisationCache | None = None,
    grid_rows: str = "auto",
    inputs: MarketInputs | None = None,
) -> MarketResult:
    """Clear one market on the base case ``pf`` and check it in AC.

    The market areas: for ``method`` nodal one per bus (``zones`` None, or a partition into
    one zone per bus); for zonal and needs_based the given ``zones`` of ``pf``'s buses (e.g.
    ``Segmentation.zones(k)``). An area's injection is spread over its buses by ``weights``
    (per pandapower bus, as ``Segmentation.weights``; None: every bus alike, the ``uniform``
    policy) and the grid linearised by ``sensitivity_method``. ``segmentation_error`` is the
    zones' KPI (``Segmentation.error``; None: 0 for the nodal market, NaN for zones).

    ``cache`` (of ``pf.model``): the Jacobian linearisations shared with the other markets
    of a study, so that each MTU's base point is linearised once (None: this market's own).
    ``grid_rows``: the representation of the linearised grid's rows (``grid.linear``:
    "dense", "adjoint", or "auto" by size; the same coefficients either way). ``inputs``:
    the areas' grid, bids and needs already made (``prepare_market``) for these zones.
    """
    if method not in MARKET_METHODS:
        raise InputError(
            f"unknown market method '{method}': choose one of {', '.join(MARKET_METHODS)}"
        )
    if pricing not in PRICING:
        raise InputError(f"unknown pricing '{pricing}': choose one of {', '.join(PRICING)}")
    if needs_rule not in NEEDS_RULES:
        raise InputError(
            f"unknown needs rule '{needs_rule}': choose one of {', '.join(NEEDS_RULES)}"
        )
    if segmentation_error is None:
        segmentation_error = 0.0 if method == "nodal" else np.nan
    cache = LinearisationCache(pf.model) if cache is None else cache
    if inputs is None:
        inputs = prepare_market(
            pf,
            resources,
            method,
            zones,
            weights,
            sensitivity_method,
            max_steps,
            needs_rule,
            cache,
            grid,
            grid_rows,
        )
    elif inputs.needs_rule != needs_rule:
        raise LfmError("the market inputs were prepared for another needs rule")
    zones, grid, bids, active = inputs.zones, inputs.grid, inputs.bids, inputs.active
    unfixable, times = inputs.unfixable, pf.times
    penalty = DEFAULT_PENALTY_EUR_PER_MWH if penalty_eur_per_mwh is None else penalty_eur_per_mwh
    # Cleared, dispatched and checked in AC; cleared again with margins on the rows its AC
    # check violates that margins are for (RowMargins), until none is left, their excess
    # stalls (MARGIN_PROGRESS, MARGIN_PATIENCE) or MARGIN_MAX_ROUNDS. Kept: the fewest MTUs
    # whose check failed, then the least excess left in AC, then the cheapest.
    started = time.perf_counter()
    mtus = grid.mtus
    margins = RowMargins(
        grid, grid.violations(pf.loading_percent.to_numpy()[mtus], pf.vm_pu.to_numpy()[mtus])
    )
    last = kept = None
    clearings = idle = 0
    least = np.inf  # the least shortfall so far
    while True:
        try:
            this, real_excess, unmet_rows = _clear_in_model(
                pf, method, zones.k, inputs, resources.table, penalty, cache, margins, last
            )
        except SolverError as error:
            if last is None:
                raise
            log.warning(
                "%s K = %d: a margin round failed (%s); kept the clearings before",
                method,
                zones.k,
                error,
            )
            break
        clearings += 1
        if last is None:
            solved = this.solved
        else:  # a margin round's effort; the size stays the whole LP's (it solves parts)
            solved += replace(this.solved, **{n: getattr(solved, n) for n in _LP_SIZE})
        if kept is None or (this.left, this.cost_eur) < (kept.left, kept.cost_eur):
            kept = this
        idle = 0 if this.shortfall <= MARGIN_PROGRESS * least else idle + 1
        least = min(least, this.shortfall)
        if this.n_unmet == 0 or idle == MARGIN_PATIENCE or clearings > MARGIN_MAX_ROUNDS:
            break
        margins.grow(real_excess, unmet_rows)
        last = this
    clear_s = time.perf_counter() - started - kept.ac_s  # the kept check is the AC check
    grid, accepted, dispatch = kept.grid, kept.accepted, kept.dispatch
    ac = replace(kept.ac, V=None)  # its voltages were for the next round's check
    status, slp, needs = kept.status, kept.slp, kept.needs
    result_bids = _bid_table(
        bids.steps, active.index, accepted, kept.price, pf.profiles.horizon.mtu_hours
    )
    p, q = _area_injections(active, accepted, grid)
    # Started with the rows the kept clearing (or its needs) rested on: what it left is there.
    rows = kept.needs_rows if kept.solution is None else kept.solution.rows
    residual, still_unfixable, _ = dso_needs(grid.shifted(p, q), rows=rows)
    left = residual_violations(
        pf, ac, resources, dispatch, cache, predicted=(grid.mtus, kept.predicted)
    )
    unmet = _unmet_table(grid, residual, still_unfixable, unfixable, times, left)
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
        residual=left,
    )
    effort = (solved, slp, clear_s, clearings - 1, kept.n_unmet)
    kpis = _kpis(res, pf, pricing, status, effort, segmentation_error, penalty)
    return MarketResult(**{**res.__dict__, "kpis": kpis})


def prepare_market(
    pf: HorizonPowerFlow,
    resources: Resources,
    method: str,
    zones: Zones | None = None,
    weights: pd.Series | None = None,
    sensitivity_method: str = "jacobian",
    max_steps: int = DEFAULT_MAX_STEPS,
    needs_rule: str = "registered_capacity",
    cache: LinearisationCache | None = None,
    grid: LinearGrid | None = None,
    grid_rows: str = "auto",
) -> MarketInputs:
    """The market areas' linearised grid at the base case, the bids and the DSO's needs
    (the arguments as ``clear_market``'s)."""
    zones = _market_areas(pf, method, zones)
    W = zones.aggregation(pd.Series(1.0, index=zones.buses) if weights is None else weights)
    grid = grid or linear_grid(
        pf, W, sensitivity_method, mtus_to_clear(pf), cache=cache, representation=grid_rows
    )
    bids = build_bids(resources, zones, pf.times, max_steps)
    active = bids.steps[bids.steps.mtu.isin(grid.mtus)]
    needs = dso_needs(grid, active if needs_rule == "registered_capacity" else None)
    return MarketInputs(zones, W, grid, bids, active, *needs, needs_rule, sensitivity_method)


def _market_areas(pf: HorizonPowerFlow, method: str, zones: Zones | None) -> Zones:
    """The zones a market clears: one per bus for the nodal market, else the given zones of
    ``pf``'s buses."""
    buses = pf.model.buses
    if zones is None:
        if method != "nodal":
            raise InputError(f"the {method} market clears zones: give them (Segmentation.zones)")
        return nodal_zones(buses)
    if not zones.buses.equals(buses):
        raise InputError(
            f"the zones partition other buses than the energised buses of grid {pf.grid.name}"
        )
    if method == "nodal" and zones.k != len(buses):
        raise InputError(f"the nodal market clears one area per bus, not K = {zones.k} zones")
    return zones


@dataclass
class _Cleared:
    """One clearing of a market (with the margins of its round), dispatched and checked."""

    grid: LinearGrid  # the linearisation the clearing was made on (the best SLP round's)
    needs: pd.DataFrame  # the needs it cleared against (with the margins: needs-based)
    needs_rows: np.ndarray  # the grid rows their LPs rested on (DsoNeeds.rows)
    accepted: np.ndarray  # MW per active step
    price: np.ndarray  # clearing price per active step
    status: SolveStatus
    solved: SolveStats
    slp: SequentialLP
    solution: Solution | None  # the LP's (None: merit order, or nothing to clear)
    dispatch: pd.DataFrame
    ac: ACCheck
    ac_s: float
    cost_eur: float
    predicted: np.ndarray  # its model's excess per (MTU, row) of grid (without margins)
    n_unmet: int  # rows its AC check violates that margins are for (RowMargins.unmet)
    shortfall: float  # their AC excess in tolerances, summed
    left: tuple[int, float]  # MTUs whose AC check failed; violated rows' excess (tolerances)


def _clear_in_model(
    pf: HorizonPowerFlow,
    method: str,
    k: int,
    inputs: MarketInputs,
    resources_table: pd.DataFrame,
    penalty: float,
    cache: LinearisationCache,
    margins: RowMargins,
    last: _Cleared | None,
) -> tuple[_Cleared, np.ndarray, np.ndarray]:
    """Clear the market on its model with ``margins``, dispatch it and check it in AC.

    The first clearing (``last`` None) is the sequential LP from the base case, or the
    needs-based merit order. A margin round clears again the MTUs whose margins grew
    (``RowMargins.grown``), the others keep the clearing before: an LP market on the
    linearisation of its last clearing (the LP warm-started from its solution), the
    needs-based market against the needs of its tightened limits.

    Returns the clearing, its AC excess per (MTU, row) of ``grid`` (NaN where the power
    flow failed) and the rows that margins are for (``RowMargins.unmet``).
    """
    grid, active, needs, needs_rows = inputs.grid, inputs.active, inputs.needs, inputs.needs_rows
    solved, slp, solution = SolveStats(), SequentialLP(), None
    if len(grid.mtus) == 0:  # no MTU with a violation: nothing to buy
        accepted, price = np.zeros(len(active)), np.full(len(active), np.nan)
        status = SolveStatus.NOTHING_TO_CLEAR
    elif method == "needs_based":
        if last is not None:
            needs, needs_rows = _needs_with_margins(last.needs, last.needs_rows, inputs, margins)
        accepted, price = _merit_order_to_needs(active, needs, penalty)
        status = SolveStatus.MERIT_ORDER
    else:
        if last is None:
            solution, grid, solved, slp = sequential_clearing(
                pf,
                k,
                inputs.W,
                inputs.sensitivity_method,
                grid,
                active,
                resources_table,
                penalty,
                needs,
                cache,
                inputs.needs_rows,
            )
        else:
            grid, slp = last.grid, last.slp
            # The MTUs not cleared again keep their solution: their own LP blocks are not
            # solved; where storage links them to those that are, their bids are held.
            held = ~margins.grown[slp.market.t_of_bid]
            solution = solve_clearing(
                grid.tightened(margins.values),
                active,
                resources_table,
                penalty_eur_per_mwh=penalty,
                quota_mw=column_quota(needs, grid.mtus),
                market=slp.market.held(held, last.solution.accepted_mw),
                include=last.solution.accepted_mw > 0,
                basis=last.solution.basis,
                scales=slp.scales,
                only=margins.grown,
                previous=last.solution,
                rows=last.solution.rows,
            )
            require_optimal(solution, "clearing LP with margins")
            solved = solution.stats
        status, accepted = solution.status, solution.accepted_mw
        price = _bid_prices(active, accepted, solution, grid)
    dt = pf.profiles.horizon.mtu_hours
    dispatch = _dispatch(
        inputs.bids, active, accepted, None if last is None else (last.accepted, last.dispatch)
    )
    # Kept by the AC check where they solve the dispatch's injections: a margin round's
    # clearing before (the MTUs it did not clear again); the best round's AC point, the
    # market's model of this dispatch (the nodal market's, see ac_check).
    solved_points = None if last is None else last.ac.V
    if last is None and slp.ac_point is not None:
        solved_points = np.full_like(pf.V, np.nan)
        solved_points[grid.mtus] = slp.ac_point
    started = time.perf_counter()
    ac = ac_check(pf, dispatch, solved_points, cache)
    ac_s = time.perf_counter() - started
    mtus = grid.mtus
    real = grid.violations(ac.loading_percent.to_numpy()[mtus], ac.vm_pu.to_numpy()[mtus])
    p, q = _area_injections(active, accepted, grid)
    if last is None or last.grid is not grid:
        predicted = grid.violations(*grid.after(p, q))
    else:  # a margin round: the MTUs not cleared again keep their dispatch, and its model
        grown = margins.grown
        predicted = last.predicted.copy()
        cleared = grid.select(grown)
        predicted[grown] = cleared.violations(*cleared.after(p[grown], q[grown]))
    unmet = margins.unmet(real, predicted)
    in_tolerances = real / grid.row_tolerances()  # > 1: violated (NaN: not converged)
    # What the AC check leaves, to rank the clearings: MTUs whose check failed, then every
    # violated row's excess in tolerances (the rows margins are for decide when to stop).
    failed = int((~ac.converged.to_numpy()[mtus] & pf.converged.to_numpy()[mtus]).sum())
    with np.errstate(invalid="ignore"):
        left = float(in_tolerances[in_tolerances > 1.0].sum())
    shortfall = float(in_tolerances[unmet].sum())
    cost = float((accepted * active.price_eur_per_mwh.to_numpy()).sum() * dt)
    this = _Cleared(
        grid,
        needs,
        needs_rows,
        accepted,
        price,
        status,
        solved,
        slp,
        solution,
        dispatch,
        ac,
        ac_s,
        cost,
        predicted,
        int(unmet.sum()),
        shortfall,
        (failed, left),
    )
    return this, real, unmet


def _needs_with_margins(
    needs: pd.DataFrame, rows: np.ndarray, inputs: MarketInputs, margins: RowMargins
) -> tuple[pd.DataFrame, np.ndarray]:
    """The needs of the MTUs whose margins grew, on the tightened limits (``dso_needs``,
    started with the ``rows`` the needs before rested on); the other MTUs' as before. And
    the rows the new needs rest on."""
    grid, grown = inputs.grid, margins.grown
    registered = inputs.active if inputs.needs_rule == "registered_capacity" else None
    fresh = dso_needs(
        grid.tightened(margins.values).select(grown), registered, select_rows(rows, grown)
    )
    kept = needs[~needs.mtu.isin(grid.mtus[grown])]
    needs = pd.concat([kept, fresh.needs]).sort_values("mtu", kind="stable")
    rows = np.concatenate([rows[~grown[rows[:, 0]]], place_rows(fresh.rows, grown)])
    return needs.reset_index(drop=True), rows


def _bid_prices(
    active: pd.DataFrame, accepted: np.ndarray, sol: Solution, grid: LinearGrid
) -> np.ndarray:
    """Pay-as-clear price of each bid: the marginal price of its area, MTU and direction
    from the LP's duals, kept to the offers where the model priced them (``clearing_prices``)."""
    t, z = _positions(active, grid)
    lam = sol.marginal_price[t, z] + active.tan_phi.to_numpy(float) * sol.marginal_price_q[t, z]
    marginal = np.where(active.direction.to_numpy() == "up", lam, -lam)
    return clearing_prices(active, accepted, marginal, sol.priced_by_model[t])


def clearing_prices(
    active: pd.DataFrame,
    accepted: np.ndarray,
    marginal: np.ndarray | None = None,
    by_model: np.ndarray | None = None,
) -> np.ndarray:
    """Pay-as-clear price of each accepted step (EUR/MWh of its direction; NaN for a step
    not accepted).

    An LP market (``marginal``: the duals' price of each step's area, MTU and direction, P
    plus tan_phi times Q) pays that price, at least the step's own offer (a battery's
    step, which the duals price over its whole cycle, and a step held in a margin round
    too). Where ``by_model`` flags the step's MTU (``Solution.priced_by_model``: a row
    priced at the penalty of unmet need, the sequential LP's trust region, or a battery
    linking the MTU to one of those), the duals are the model's prices, not only offers':
    there it pays at most the dearest step accepted in the MTU and direction, as at a
    price cap. Elsewhere a price above every offer stands: a step that relieves more than
    the marginal one, or gives reactive power too, is worth more.

    The needs-based market (no duals) pays each zone and direction its marginal step: the
    dearest step accepted there."""
    prices = active.price_eur_per_mwh.to_numpy(float)
    bought = np.where(accepted > ACCEPTED_MIN_MW, prices, np.nan)
    keys = {
        "mtu": active.mtu.to_numpy(),
        "zone": active.zone.to_numpy(),
        "direction": active.direction.to_numpy() == "up",  # a flag groups faster than text
    }
    frame = pd.DataFrame({**keys, "bought": bought})
    if marginal is None:
        floor = frame.groupby(["mtu", "zone", "direction"], sort=False).bought.transform("max")
        return np.where(np.isnan(bought), np.nan, floor.to_numpy())
    cap = frame.groupby(["mtu", "direction"], sort=False).bought.transform("max").to_numpy()
    price = np.fmax(marginal, prices)
    price = np.where(by_model, np.minimum(price, cap), price)
    return np.where(np.isnan(bought), np.nan, price)


def _merit_order_to_needs(
    active: pd.DataFrame,
    needs: pd.DataFrame,
    penalty_eur_per_mwh: float = DEFAULT_PENALTY_EUR_PER_MWH,
):
    """Each zone and direction buys its published need from its cheapest steps (no
    substitution); every step of a group that bought is priced at its marginal step.
    A step priced above the penalty of unmet need is never bought (the need stays unmet,
    as the nodal and zonal LPs prefer their slack to it)."""
    frame = active.reset_index(drop=True)
    keys = ["mtu", "zone", "direction"]
    group = frame.groupby(keys, sort=True).ngroup().to_numpy()
    target = (
        needs.set_index(keys)
        .need_mw.reindex(pd.MultiIndex.from_frame(frame[keys]), fill_value=0.0)
        .to_numpy()
    )
    price_of = frame.price_eur_per_mwh.to_numpy()
    order = np.lexsort((frame.bid_id.to_numpy(), price_of, group))
    quantity = np.where(price_of <= penalty_eur_per_mwh, frame.quantity_mw.to_numpy(float), 0.0)
    accepted, _ = merit_order_fill(quantity, group, order, target)
    accepted = np.where(target > 0, accepted, 0.0)
    return accepted, clearing_prices(frame, accepted)


def _bid_table(
    bids: pd.DataFrame, active_index: pd.Index, accepted: np.ndarray, price: np.ndarray, dt_h: float
) -> pd.DataFrame:
    out = bids.copy()
    out["accepted_mw"] = 0.0
    out["clearing_price_eur_per_mwh"] = np.nan
    out.loc[active_index, "accepted_mw"] = np.where(accepted > ACCEPTED_MIN_MW, accepted, 0.0)
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
    t, z = _positions(active, grid)
    sign = np.where(active.direction.to_numpy() == "up", 1.0, -1.0)
    p, q = np.zeros((T, K)), np.zeros((T, K))
    np.add.at(p, (t, z), sign * accepted)
    np.add.at(q, (t, z), sign * accepted * active.tan_phi.to_numpy(float))
    return p, q


def _positions(active: pd.DataFrame, grid: LinearGrid) -> tuple[np.ndarray, np.ndarray]:
    """Each bid's MTU position in the cleared set and its area (integer arrays, also empty)."""
    t = pd.Series(np.arange(len(grid.mtus)), index=grid.mtus).reindex(active.mtu.to_numpy())
    return t.to_numpy(np.int64), active.zone.to_numpy(np.int64)


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
    ac_residual: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Unmet need per MTU: the larger of the linear model's (``unmet_linear_mw``) and the AC
    check's residual MW (``unmet_ac_mw``, validation.residual_violations), so it is never 0
    while an element stays violated in AC."""
    linear = residual.groupby("mtu").need_mw.sum().reindex(grid.mtus, fill_value=0.0)
    unfixable = pd.Series(
        np.maximum(still_unfixable, unfixable_before) if len(grid.mtus) else np.zeros(0),
        index=grid.mtus,
        dtype=float,
    )
    ac = residual_mw_per_mtu(ac_residual) if ac_residual is not None else pd.Series(dtype=float)
    mtus = np.union1d(grid.mtus, ac.index.to_numpy(np.int64)).astype(np.int64)
    linear = linear.reindex(mtus, fill_value=0.0).to_numpy(float)
    ac_mw = ac.reindex(mtus, fill_value=0.0).to_numpy(float)
    return pd.DataFrame(
        {
            "time": times[mtus],
            "mtu": mtus,
            "unmet_mw": np.maximum(linear, ac_mw),
            "unfixable_mw": unfixable.reindex(mtus, fill_value=0.0).to_numpy(float),
            "unmet_linear_mw": linear,
            "unmet_ac_mw": ac_mw,
        }
    )


def _dispatch(
    bids: Bids,
    steps: pd.DataFrame,
    accepted: np.ndarray,
    before: tuple[np.ndarray, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """The ``accepted`` MW of each of ``steps`` (bid steps; above ACCEPTED_MIN_MW)
    dispatched to resources, cheapest first: signed change of net injection.

    ``before``: an earlier clearing of the same steps (its accepted MW and this dispatch of
    them). An MTU's dispatch depends on its own steps only: where every one of them is
    accepted as before, bit for bit, the MTU keeps its rows, the others are dispatched again
    (a margin round clears some MTUs again; SimBench 1-MVLV-rural-all-0-sw, 96 MTUs: 317k
    rows, 0.18 s a dispatch).
    """
    if before is not None:
        accepted_before, dispatch_before = before
        mtu = steps.mtu.to_numpy()
        again = np.unique(mtu[accepted != accepted_before])
        kept = dispatch_before[~np.isin(dispatch_before.mtu.to_numpy(), again)]
        redo = np.isin(mtu, again)
        fresh = _dispatch(bids, steps[redo], accepted[redo])
        parts = [part for part in (kept, fresh) if len(part)] or [kept]
        # Each MTU's rows from one part, in their order: by MTU (stable) is the full order.
        return sorted_rows(pd.concat(parts, ignore_index=True), ["mtu"])
    taken = accepted > ACCEPTED_MIN_MW
    by_id = steps[taken].set_index("bid_id")
    used = dispatch_steps(bids, pd.Series(accepted[taken], index=by_id.index))
    step = by_id.loc[used.bid_id.to_numpy()]
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
    return sorted_rows(out, ["mtu", "resource_id", "direction"])


def _kpis(
    res: MarketResult,
    pf: HorizonPowerFlow,
    pricing: str,
    status: SolveStatus,
    effort: tuple[SolveStats, SequentialLP, float, int, int],
    segmentation_error: float,
    penalty_eur_per_mwh: float = DEFAULT_PENALTY_EUR_PER_MWH,
) -> dict:
    """The KPI row of a market; ``effort``: its LPs, sequential LP, clearing time, margin
    rounds and rows its AC check violates that margins are for."""
    solved, slp, clear_s, margin_rounds, rows_unmet = effort
    dt = pf.profiles.horizon.mtu_hours
    bids = res.bids
    cost_bid = float(bids.cost_pay_as_bid_eur.sum())
    cost_clear = float(bids.cost_pay_as_clear_eur.sum())
    cost = cost_bid if pricing == "pay_as_bid" else cost_clear
    left = res.residual
    # Residual after the AC check in MW-equivalent (validation.residual_violations), priced
    # at the penalty of unmet need: a cheaper market that leaves more cannot look better.
    residual_mwh = float(residual_mw_per_mtu(left).sum() * dt)
    values = {
        "method": res.method,
        "k": res.k,
        "pricing": pricing,
        "cost_eur": cost,
        "security_adjusted_cost_eur": cost + penalty_eur_per_mwh * residual_mwh,
        "residual_mwh": residual_mwh,
        "penalty_eur_per_mwh": float(penalty_eur_per_mwh),
        "residual_violations": len(left),
        "residual_elements": int(left[["element_type", "element"]].drop_duplicates().shape[0]),
        "residual_offers_exhausted": int(left.offers_exhausted.eq(True).sum()),
        "cost_pay_as_bid_eur": cost_bid,
        "cost_pay_as_clear_eur": cost_clear,
        "activated_mwh": float(bids.accepted_mw.sum() * dt),
        "accepted_bids": int((bids.accepted_mw > 0).sum()),
        "need_mwh": float(res.needs.need_mw.sum() * dt),
        "unmet_mwh": float(res.unmet.unmet_mw.sum() * dt),
        "unmet_mw_max": float(res.unmet.unmet_mw.max()) if len(res.unmet) else 0.0,
        **violation_kpis(pf, res.ac),
        "segmentation_error": segmentation_error,
        "solver_status": status.value,
        "solve_s": solved.solve_s,
        "build_s": solved.build_s,
        "clear_s": clear_s,
        "n_variables": solved.n_variables,
        "n_constraints": solved.n_constraints,
        "generation_rounds": solved.rounds,
        "ac_rounds": slp.rounds,
        "ac_best_round": slp.best_round,
        "ac_converged": int(slp.converged),
        "column_rounds": solved.column_rounds,
        "margin_rounds": margin_rounds,
        "rows_unmet_in_ac": rows_unmet,
    }
    outside = set(values) ^ set(KPI_NAMES)
    if outside:  # the schema orders and documents every column of kpis.csv
        raise LfmError(f"KPIs outside the schema (check.kpis): {sorted(outside)}")
    return {name: values[name] for name in KPI_NAMES}
