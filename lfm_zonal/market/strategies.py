"""How the clearing LP (``market.formulation``) is solved.

**Row generation** (``ClearingModel``). The LP starts with the grid rows violated or
within a margin of their limit (at most ROWS_PER_MTU_AND_ROUND per MTU, the most
violated first), plus the rows a nearby LP rested on (``solve_clearing``'s ``rows``), and
after every solve the linearised state of *every* monitored
element is checked; rows the activations violate are added (the same cap per round) to
the running, warm-started HiGHS instance and the LP is solved again, so no element is
dropped and no new congestion is created in the linear model.

**Column generation** (``solve_clearing``). With a quota, each group of competing
steps (MTU, area, direction) enters with its cheapest steps up to the quota; after a
solve, every step left out is priced with the area's marginal prices and those that
would lower the cost are added. The result is the LP optimum over all bids.

**Sequential AC loop** (``sequential_clearing``). Clear, re-linearise at the AC point
of the market's own model of the result, clear again, until the rounds agree with AC.

**Margins** (``RowMargins``). Where the AC check of the real dispatch violates a row that
the market's model met (a zonal market spreads a zone's activation by the virtual bus's
weights, the dispatch puts it where the offers are), the row's limit is tightened and the
market clears again on the same linearisation, in the MTUs concerned
(``market.clearing.clear_market``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import highspy
import numpy as np
import pandas as pd

from lfm_zonal.check.ac import solve_with_injections
from lfm_zonal.config import DEFAULT_PENALTY_EUR_PER_MWH
from lfm_zonal.errors import LfmError
from lfm_zonal.grid.linear import LinearGrid, RowScales, linear_grid
from lfm_zonal.grid.powerflow import HorizonPowerFlow
from lfm_zonal.grid.sensitivity import LinearisationCache
from lfm_zonal.grid.violations import largest_per_mtu
from lfm_zonal.market.bids import merit_order_fill
from lfm_zonal.market.formulation import (
    GridRows,
    LpBuilder,
    MarketBids,
    build_clearing_lp,
    define_grid_rows,
    slack_prices,
)
from lfm_zonal.market.lp import (
    MarketBasis,
    Solution,
    SolveStats,
    SolveStatus,
    require_optimal,
)

log = logging.getLogger(__name__)

SCREEN_LOADING_MARGIN_PERCENT = 5.0
SCREEN_VM_MARGIN_PU = 0.005
#: Rows an MTU brings into the LP at once (screen, then each generation round): the most
#: violated ones. On a long radial feeder hundreds of buses can be beyond the band in one
#: MTU, each row dense over the areas; fixing the worst usually fixes most.
ROWS_PER_MTU_AND_ROUND = 20
#: Bid steps an LP block holds before the next MTU starts a block of its own
#: (``solve_clearing``): a simplex iteration costs with the size of the LP. The DSO-needs LP
#: of SimBench 1-MVLV-rural-all-0-sw (72 violated MTUs, 740k columns in one LP) took 140 s
#: and 6.8 GB; MTU by MTU (10k columns each) 62 s and 1.7 GB.
BLOCK_MAX_STEPS = 5_000
GENERATION_TOLERANCE = 1e-6  # loading percent / p.u.: constraint generation in the linear model
MAX_GENERATION_ROUNDS = 30

#: Sequential LP (``sequential_clearing``): its round cap, the relative change of cost (plus
#: priced residual), made or predicted (``_Round.model_error_eur``), under which it has
#: converged, and the smallest trust region worth a round.
SLP_MAX_ROUNDS = 20
SLP_COST_RTOL = 5e-4
SLP_MIN_STEP_MW = 1e-4
#: Share of the result tolerances the sequential LP works to: it ends its AC point closer to
#: its model (and the binding limits) than a result must be to count as violated.
SLP_TOLERANCE_SHARE = 0.1
#: Margin rounds (``RowMargins``) at most: clearings after the first, each followed by an
#: AC check of its real dispatch.
MARGIN_MAX_ROUNDS = 6
#: Margin rounds stop when the AC excess on the rows margins are for (in row tolerances,
#: summed) has not fallen below MARGIN_PROGRESS of its least so far for MARGIN_PATIENCE
#: rounds in a row (a round can trade rows for others, e.g. where storage moves energy).
MARGIN_PROGRESS = 0.9
MARGIN_PATIENCE = 2
#: The range of a row's AC excess per unit of margin (``RowMargins``): a margin grows by
#: at most 1 / 0.1 = 10 times the row's excess in one round.
MARGIN_SLOPE_RANGE = (-1.0, -0.1)
#: Relative rounding of a row's tolerance under which a model's prediction still meets it.
MARGIN_ROUNDING = 1e-6
#: A dual below this (a reduced cost below this share of its column's cost) is zero.
DUAL_TOLERANCE = 1e-9
#: A step taken within this of a bound is at it (HiGHS's primal feasibility tolerance).
PRIMAL_TOLERANCE_MW = 1e-7
#: A trust-region dual below this share of its MTU's largest area price leaves the MTU's
#: prices to the offers (CIGRE MV nodal: duals of 0.02-0.5 EUR/MWh beside prices of 190).
TRUST_PRICE_SHARE = 0.01


#: HiGHS options set, one after the other, on an LP whose simplex ended in the model status
#: "Unknown" (``ClearingModel._run``), each solving it again from scratch: the primal
#: simplex, then presolve as well. The dual simplex can stop with a dual infeasibility its
#: clean-up does not remove when the costs span 0.25 EUR (a bid step's MWh) to 250,000 EUR
#: (a new violation's slack): SimBench MV rural on 10 April 2016 from 12:00 (48 MTUs),
#: the nodal DSO-needs LP of its first 26 MTUs (5,356 columns, 520 rows), one dual
#: infeasibility of 2.6e-5 after 120 iterations (run again from there, any simplex stops
#: there again); the primal simplex from scratch: optimal, the same objective to 1e-9
#: relative. It took the whole run down before.
UNKNOWN_RETRIES = (("simplex_strategy", 4), ("presolve", "on"))
#: HiGHS's simplex strategy of every other run (its default, the dual simplex): set back
#: after a retry, for the rows row generation adds later (with a cut row, the primal
#: simplex from the warm start took 5x the iterations of the dual on a 400 x 300 LP).
DUAL_SIMPLEX = 1

#: HiGHS's basis statuses by code (made once: constructing them one by one was half the
#: time of handing a basis over).
_STATUS = {int(v): v for v in highspy.HighsBasisStatus.__members__.values()}


# ---------------------------------------------------------------------- row generation
class ClearingModel:
    """One clearing LP: the selected steps in a HiGHS instance, plus grid rows.

    The grid rows start from a screen and the rows an earlier LP needed
    (``initial_rows``) and grow by row generation,
    added to the running (warm-started) HiGHS instance without a rebuild.
    """

    def __init__(
        self,
        grid: LinearGrid,
        bids: MarketBids,
        selected: np.ndarray,
        penalty_eur_per_mwh: float = DEFAULT_PENALTY_EUR_PER_MWH,
        known_rows: list[tuple[int, int]] | None = None,
        p_bounds: tuple[np.ndarray, np.ndarray] | None = None,
        basis: MarketBasis | None = None,
        scales: RowScales | None = None,
    ) -> None:
        self.grid = grid
        self.bids = bids
        self.selected = selected
        self.known_rows = known_rows or []
        self.p_bounds = p_bounds
        self.start_basis = basis
        self.penalty = penalty_eur_per_mwh
        self.scales = (
            RowScales(grid, bids.capacity_mw(penalty_eur_per_mwh)) if scales is None else scales
        )
        self.rows: list[tuple[int, int]] = []  # (t, row number in the violation layout)
        self.stats = SolveStats(column_rounds=1)  # one clearing LP

    def _worst_rows(self, excess: np.ndarray, candidate: np.ndarray) -> list[tuple[int, int]]:
        """Of the candidate rows (T x rows mask), per MTU the ROWS_PER_MTU_AND_ROUND with the
        largest excess (in MW-equivalent where the scales are at hand, ``RowScales.ranking``)."""
        t, r = np.nonzero(candidate)
        if len(t) == 0:
            return []
        need = excess[t, r] / self.scales.ranking(t, r)
        t, r = largest_per_mtu(t, r, need, ROWS_PER_MTU_AND_ROUND)
        return list(zip(t.tolist(), r.tolist(), strict=True))

    def initial_rows(self) -> list[tuple[int, int]]:
        """Rows violated or within a margin of their limit, plus rows an earlier solve needed."""
        g = self.grid
        margin = np.concatenate(
            [
                np.full(len(g.branches), SCREEN_LOADING_MARGIN_PERCENT),
                np.full(2 * len(g.buses), SCREEN_VM_MARGIN_PU),
            ]
        )
        excess = g.violations(g.loading0, g.vm0)
        rows = set(self._worst_rows(excess, excess > -margin))
        return sorted(rows | set(self.known_rows))

    def _build(self, rows: list[tuple[int, int]]) -> None:
        """The HiGHS instance of the selected steps and the first grid rows."""
        self.lp = build_clearing_lp(
            self.grid,
            self.scales,
            self.bids,
            self.selected,
            _pairs(rows),
            self.penalty,
            self.p_bounds,
        )
        self.highs = self.lp.builder.highs()
        self.grid_parts = [self.lp.grid]  # the LP's grid rows, joined once solved (_solution)
        self.rows = list(rows)

    def _add_grid_rows(self, rows: list[tuple[int, int]]) -> None:
        """Add generated grid rows, each with its penalised slack column."""
        lp = LpBuilder(self.highs.getNumCol(), self.highs.getNumRow())
        added = define_grid_rows(
            lp,
            self.grid,
            self.scales,
            self.bids,
            self.lp.x_col,
            _pairs(rows),
            self.penalty,
            self.lp.areas,
            self.lp.feeders,
        )
        lp.append_to(self.highs)
        self.grid_parts.append(added)
        self.rows += rows

    def _spent(self, **effort) -> None:
        """Add rounds, seconds or iterations to this LP's statistics."""
        self.stats += SolveStats(**effort)

    def _run(self) -> SolveStatus:
        """Run HiGHS; where it ends in the model status "Unknown", again from scratch with
        each of UNKNOWN_RETRIES in turn until it does not (then the dual simplex again for
        the instance's later runs; presolve, skipped from a basis, stays)."""
        started = time.perf_counter()
        status = self._run_once()
        retried = False
        for option, value in UNKNOWN_RETRIES:
            if status is not SolveStatus.UNKNOWN:
                break
            self.highs.setOptionValue(option, value)
            self.highs.clearSolver()  # from scratch: from where it stopped, it stops again
            status, retried = self._run_once(), True
        if retried:
            self.highs.setOptionValue("simplex_strategy", DUAL_SIMPLEX)
        self._spent(rounds=1, solve_s=time.perf_counter() - started)
        return status

    def _run_once(self) -> SolveStatus:
        """One HiGHS run, its time (HiGHS's clock runs on over the instance's runs) and
        iterations added to the statistics."""
        before = self.highs.getRunTime()
        self.highs.run()
        self._spent(
            highs_s=self.highs.getRunTime() - before,
            simplex_iterations=int(self.highs.getInfo().simplex_iteration_count),
        )
        return SolveStatus.of(self.highs)

    def solve(self) -> Solution:
        started = time.perf_counter()
        self._build(self.initial_rows())
        if self.start_basis is not None:
            self._set_basis(self.start_basis)
        self._spent(build_s=time.perf_counter() - started)
        while True:
            status = self._run()
            if status is not SolveStatus.OPTIMAL:
                return self._failed(status)
            x, p, q = self._values()
            loading, vm = self.grid.after(p, q)
            excess = self.grid.violations(loading, vm)
            candidate = excess > GENERATION_TOLERANCE
            if self.rows:
                candidate[tuple(np.array(self.rows).T)] = False
            missing = self._worst_rows(excess, candidate)
            if not missing:
                break
            if self.stats.rounds >= MAX_GENERATION_ROUNDS:
                log.warning(
                    "constraint generation stopped after %d rounds with %d violated rows "
                    "of the linear model not in the LP",
                    MAX_GENERATION_ROUNDS,
                    int(candidate.sum()),
                )
                break
            started = time.perf_counter()
            self._add_grid_rows(missing)
            self._spent(build_s=time.perf_counter() - started)
        return self._solution(x, p, q)

    def _set_basis(self, basis: MarketBasis) -> None:
        """Start from a market basis: grid and trust-region rows basic, area columns and
        feeder equivalents basic and their balances tight, slacks at zero (HiGHS makes the
        rest of it valid, as an alien basis)."""
        n_col, n_row = self.highs.getNumCol(), self.highs.getNumRow()
        col = np.full(n_col, int(highspy.HighsBasisStatus.kLower))
        x_col = self.lp.x_col
        kept = x_col >= 0
        col[x_col[kept]] = basis.bid_status[kept]
        row = np.full(n_row, int(highspy.HighsBasisStatus.kBasic))
        row[self.lp.storage_rows] = basis.row_status
        areas = self.lp.areas
        if areas is not None:  # the area columns basic in place of their balance rows
            for c, r in ((areas.p_col, areas.p_row), (areas.q_col, areas.q_row)):
                if c is not None:
                    col[c] = int(highspy.HighsBasisStatus.kBasic)
                    row[r] = int(highspy.HighsBasisStatus.kLower)
        feeders = self.lp.feeders
        if feeders is not None:  # the feeder equivalents basic in place of their tie rows
            col[feeders.cols] = int(highspy.HighsBasisStatus.kBasic)
            row[feeders.rows] = int(highspy.HighsBasisStatus.kLower)
        start = highspy.HighsBasis()
        start.col_status = [_STATUS[v] for v in col.tolist()]
        start.row_status = [_STATUS[v] for v in row.tolist()]
        start.alien = True
        self.highs.setBasis(start)

    def _basis(self, solution: highspy.HighsSolution) -> MarketBasis:
        """The market side's part of the final basis (``solution``: the LP's)."""
        x_col, storage = self.lp.x_col, self.lp.storage_rows
        kept = x_col >= 0
        bid = np.full(len(x_col), int(highspy.HighsBasisStatus.kLower), np.int8)
        if self.highs.getNumNz() == 0:
            # No matrix entry (no grid row, no storage, no balance): HiGHS solves it without
            # the simplex, and getBasicVariables then ends the process (a segmentation
            # fault, highspy 1.11-1.13). Such an LP is small: its basis as getBasis has it.
            basis = self.highs.getBasis()
            col = np.array([int(s) for s in basis.col_status], np.int8)
            row = np.array([int(s) for s in basis.row_status], np.int8)
            bid[kept] = col[x_col[kept]]
            return MarketBasis(bid, row[storage])
        _, basic = self.highs.getBasicVariables()
        bid[kept] = _basis_status(
            x_col[kept],
            basic[basic >= 0],
            np.asarray(solution.col_value),
            np.asarray(solution.col_dual),
            self.lp.builder.col_bounds,
            upper_if_fixed_dual=-1.0,
        )
        row = _basis_status(
            storage,
            -1 - basic[basic < 0],
            np.asarray(solution.row_value),
            np.asarray(solution.row_dual),
            self.lp.builder.row_bounds,
            upper_if_fixed_dual=1.0,
        )
        return MarketBasis(bid, row)

    def _values(self):
        """Accepted MW of the selected steps, area injections p and q (T x K)."""
        values = np.asarray(self.highs.getSolution().col_value)
        kept = self.lp.x_col >= 0
        x = np.zeros(len(kept))
        x[kept] = np.clip(values[self.lp.x_col[kept]], 0.0, None)
        b = self.bids
        p, q = (
            np.zeros((len(self.grid.mtus), self.grid.k)),
            np.zeros((len(self.grid.mtus), self.grid.k)),
        )
        np.add.at(p, (b.t_of_bid, b.area_of_bid), b.sign * x)
        np.add.at(q, (b.t_of_bid, b.area_of_bid), b.sign * b.tan_phi * x)
        return x[kept], p, q

    def _area_prices(
        self, rows: GridRows, duals: np.ndarray, solution: highspy.HighsSolution
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """EUR/MWh (EUR/Mvarh) of a free injection in each area and MTU: the duals of the grid
        rows (``rows``, the LP's; ``duals`` of every row) weighted by the area's
        coefficients, plus the trust region's (NaN in an area without a bid in the MTU):
        what column generation prices a step left out at. And the MTUs whose duals carry
        the model's prices, not only offers' (``Solution.priced_by_model``); and whether a
        bound of the trust region has a dual (``Solution.trust_bound``)."""
        T, K, b = len(self.grid.mtus), self.grid.k, self.bids
        price_p, price_q = np.zeros((T, K)), np.zeros((T, K))
        reduced = np.asarray(solution.col_dual)
        areas = self.lp.areas
        if areas is not None:  # the balance rows' duals (p_at - sum sigma x = 0)
            price_p[b.pair_t, b.pair_area] = -duals[areas.p_row]
            if areas.q_row is not None:
                price_q[b.pair_t, b.pair_area] = -duals[areas.q_row]
            trust = reduced[areas.p_col]  # the trust region: the bounds of p_at
        else:
            y = duals[rows.row]
            for tt in np.unique(rows.rows[:, 0]):
                i = rows.rows[:, 0] == tt
                price_p[tt], price_q[tt] = y[i] @ rows.cp[i], y[i] @ rows.cq[i]
            bounded = self.lp.trust_rows >= 0
            trust = np.zeros(len(b.pair_t))
            trust[bounded] = duals[self.lp.trust_rows[bounded]]
            price_p[b.pair_t[bounded], b.pair_area[bounded]] += trust[bounded]
        # A trust-region bound whose dual moves the MTU's prices by TRUST_PRICE_SHARE or more.
        by_model = np.zeros(T, bool)
        scale = np.abs(price_p).max(axis=1, initial=0.0)[b.pair_t]
        by_model[
            b.pair_t[np.abs(trust) > np.maximum(TRUST_PRICE_SHARE * scale, DUAL_TOLERANCE)]
        ] = True
        # A row priced at its slack's penalty: its slack taken (or free to be: reduced cost 0).
        t, r = rows.rows[:, 0], rows.rows[:, 1]
        penalty = slack_prices(self.scales, t, r, self.penalty) * self.grid.dt_h
        at_penalty = (np.abs(duals[rows.row]) > DUAL_TOLERANCE) & (
            reduced[rows.slack_col] <= DUAL_TOLERANCE * penalty
        )
        by_model[t[at_penalty]] = True
        # A battery's stored energy carries them to its other MTUs where one of its steps
        # is marginal (taken in part: its offer sets prices there), and on to other batteries.
        values = np.asarray(solution.col_value)
        parts = []
        for idx, linked, *_ in b.storage:
            col = self.lp.x_col[idx]
            x = np.where(col >= 0, values[np.maximum(col, 0)], 0.0)
            part = (
                (col >= 0) & (x > PRIMAL_TOLERANCE_MW) & (x < b.quantity[idx] - PRIMAL_TOLERANCE_MW)
            )
            parts.append((linked, linked[part]))
        carried = True
        while carried:
            before = by_model.copy()
            for linked, marginal in parts:
                if by_model[linked].any():
                    by_model[marginal] = True
            carried = not np.array_equal(before, by_model)
        nan = np.full((T, K), np.nan)
        nan[b.pair_t, b.pair_area] = 0.0
        price_p, price_q = (price_p + nan) / self.grid.dt_h, (price_q + nan) / self.grid.dt_h
        return price_p, price_q, by_model, bool((np.abs(trust) > DUAL_TOLERANCE).any())

    def _solution(self, x, p, q) -> Solution:
        T = len(self.grid.mtus)
        held = GridRows.joined(self.grid_parts)
        lp_solution = self.highs.getSolution()
        slack = np.asarray(lp_solution.col_value)[held.slack_col]
        # The rows the optimum rests on (a dual price): the next LP on these MTUs starts
        # with them. (Every row held: as many generation rounds fewer, but building the rows
        # the optimum did not need cost more than the rounds; nodal, SimBench MV+LV.)
        duals = np.asarray(lp_solution.row_dual)
        priced = np.abs(duals[held.row]) > DUAL_TOLERANCE
        binding = held.rows[priced]
        slack_mw = np.zeros(T)
        if len(self.rows):  # the worst row of each MTU: MW the best area would need
            t = np.array([row[0] for row in self.rows], np.int64)
            np.maximum.at(slack_mw, t, slack)
        price_p, price_q, by_model, trust_bound = self._area_prices(held, duals, lp_solution)
        info = self.highs.getInfo()
        self.stats = replace(
            self.stats,
            n_variables=self.highs.getNumCol(),
            n_constraints=self.highs.getNumRow(),
            n_nonzeros=self.highs.getNumNz(),
            n_grid_rows=len(self.rows),
        )
        accepted = np.zeros(len(self.selected))
        accepted[self.selected] = x
        return Solution(
            SolveStatus.OPTIMAL,
            accepted,
            p,
            q,
            slack_mw,
            price_p,
            price_q,
            float(info.objective_function_value),
            self.stats,
            self._basis(lp_solution),
            binding,
            by_model,
            row_duals=np.abs(duals[held.row][priced]),
            row_slack_mw=slack[priced],
            trust_bound=trust_bound,
        )

    def _failed(self, status: SolveStatus) -> Solution:
        return _failed(len(self.grid.mtus), self.grid.k, len(self.selected), status, self.stats)


def _failed(T: int, K: int, n_bids: int, status: SolveStatus, stats: SolveStats) -> Solution:
    """A clearing without a solution: nothing accepted, NaN prices and unmet need."""
    zeros = np.zeros((T, K))
    return Solution(
        status,
        np.zeros(n_bids),
        zeros,
        zeros.copy(),
        np.full(T, np.nan),
        np.full((T, K), np.nan),
        np.full((T, K), np.nan),
        float("nan"),
        stats,
        priced_by_model=np.ones(T, bool),
    )


def _basis_status(
    index: np.ndarray,
    basic: np.ndarray,
    value: np.ndarray,
    dual: np.ndarray,
    bounds: tuple[np.ndarray, np.ndarray],
    upper_if_fixed_dual: float,
) -> np.ndarray:
    """HiGHS basis status codes of the columns (or rows) ``index`` of a solved LP, as
    ``Highs.getBasis`` gives them, from its ``basic`` ones (``getBasicVariables``) and its
    solution: a nonbasic one at the bound it sits nearer to (``bounds``: of the LP as
    built); a fixed one at its upper bound where its dual has the sign of
    ``upper_if_fixed_dual`` (-1 for columns, +1 for rows, HiGHS's sign conventions).
    getBasis builds a Python list of every column's and row's status: 11 ms per nodal LP
    of SimBench MV+LV, 3.6 s per nodal market, where this takes a fraction of one."""
    lower, upper = bounds[0][index], bounds[1][index]
    v, d = value[index], dual[index]
    at_upper = np.where(
        lower == upper, d * upper_if_fixed_dual > 0, np.abs(upper - v) < np.abs(v - lower)
    )
    status = np.where(
        at_upper, int(highspy.HighsBasisStatus.kUpper), int(highspy.HighsBasisStatus.kLower)
    ).astype(np.int8)
    status[np.isin(index, basic)] = int(highspy.HighsBasisStatus.kBasic)
    return status


def _pairs(rows: list[tuple[int, int]]) -> np.ndarray:
    return np.array(rows, np.int64).reshape(-1, 2)


# ---------------------------------------------------------------------- column generation
def solve_clearing(
    grid: LinearGrid,
    bids: pd.DataFrame,
    resources_table: pd.DataFrame | None = None,
    penalty_eur_per_mwh: float = DEFAULT_PENALTY_EUR_PER_MWH,
    quota_mw: np.ndarray | None = None,
    market: MarketBids | None = None,
    p_bounds: tuple[np.ndarray, np.ndarray] | None = None,
    include: np.ndarray | None = None,
    basis: MarketBasis | None = None,
    scales: RowScales | None = None,
    only: np.ndarray | None = None,
    previous: Solution | None = None,
    rows: np.ndarray | None = None,
) -> Solution:
    """Clear ``bids`` against the linearised grid: the LP over all its MTUs.

    The LP is separable by MTU except where a storage resource links MTUs: it is solved
    in blocks of MTUs (``MarketBids.blocks``, at most BLOCK_MAX_STEPS bid steps each where
    no storage links them), whose optima together are its optimum. A simplex iteration
    costs with the size of the LP it works on, so a big grid's MTUs are solved one by one.

    With ``quota_mw`` (per MTU), columns are screened too: each group of competing
    steps (MTU, area, direction) enters the LP with its cheapest steps up to the
    quota, storage steps always. After a solve, every step left out is priced with
    the area's marginal prices (its reduced cost: price - sigma (lambda_p + tan_phi
    lambda_q)); those that would lower the cost are added and the LP is solved again
    (column generation). The result is the LP optimum over all bids.

    ``market``, these bids as arrays on these MTUs, saves its rebuild when the same bids
    are cleared against several linearisations. ``p_bounds`` (lower, upper; T x K) bound
    the area injections (the trust region of a sequential-LP round); ``include`` (one flag
    per bid) puts steps in the LP from the start whatever the quota (the steps of the
    point the trust region is centred on, so that it stays reachable). ``basis``
    warm-starts the first LP (each column-generation round starts from the one before).
    ``scales``: the rows' MW-equivalent units (default: the grid's own). ``only`` (one
    flag per MTU, with ``previous``, a solution of these bids on these MTUs): every MTU
    that no storage links is a block of its own, and the blocks without a flagged MTU keep
    ``previous``'s solution instead of being solved again (the objective is then NaN: a
    kept block's is not known); hold a linked block's unflagged MTUs' bids with
    ``MarketBids.held``. ``rows`` ((MTU position, row) pairs, as ``Solution.rows``): grid
    rows the LP starts with besides its screen, those an LP on these MTUs rested on at a
    nearby point (a sequential-LP or margin round's, or the DSO-needs LP's, whose bids
    differ), so that row generation finds fewer.
    """
    stats = SolveStats()
    rows = np.zeros((0, 2), np.int64) if rows is None else np.asarray(rows, np.int64)
    if market is None:
        started = time.perf_counter()
        market = MarketBids(
            grid.mtus, grid.k, grid.dt_h, bids.reset_index(drop=True), resources_table
        )
        stats += SolveStats(build_s=time.perf_counter() - started)
    elif len(market) != len(bids):
        raise LfmError("the market side was built for other bids")
    scales = RowScales(grid, market.capacity_mw(penalty_eur_per_mwh)) if scales is None else scales
    n_bids = len(market)
    if quota_mw is None:
        selected = np.ones(n_bids, bool)
    else:
        # Competing steps: same MTU, area and direction.
        group = (market.t_of_bid * grid.k + market.area_of_bid) * 2 + (market.sign > 0)
        order = np.lexsort((np.arange(n_bids), market.price, group))
        # Per group in merit order, the steps needed to reach the quota (at least one).
        quota = np.asarray(quota_mw, float)[market.t_of_bid]
        _, before = merit_order_fill(market.quantity, group, order, quota)
        selected = before < quota
        selected |= market.resource != ""  # storage: energy-limited, always in
    if include is not None:
        selected |= np.asarray(include, bool)
    blocks = market.blocks(BLOCK_MAX_STEPS if only is None else 0)
    if len(blocks) == 1 and (only is None or only.any()):
        sol = _clear_block(
            grid, market, selected, penalty_eur_per_mwh, p_bounds, basis, scales, stats, rows
        )
        return sol if only is None else _prices_held(sol, only, previous)
    T, K = len(grid.mtus), grid.k
    accepted, slack_mw = np.zeros(n_bids), np.zeros(T)
    p, q, price_p, price_q = (np.zeros((T, K)) for _ in range(4))
    by_model = np.zeros(T, bool)
    bid_status = np.full(n_bids, int(highspy.HighsBasisStatus.kLower), np.int8)
    row_status, objective = np.zeros(0, np.int8), 0.0
    held_rows = []  # each block's rows with a dual price, at the whole LP's MTU positions
    row_duals, row_slacks, trust_bound = [], [], False
    last_rows = np.zeros((0, 2), np.int64)  # the rows the block solved last rested on
    for block in blocks:
        keep = np.zeros(T, bool)
        keep[block] = True
        sub, bid = market.restricted(block)
        if only is not None and not only[block].any():
            sol = _kept_block(previous, keep, bid, sub)
        else:
            sol = _clear_block(
                grid.select(keep),
                sub,
                selected[bid],
                penalty_eur_per_mwh,
                None if p_bounds is None else (p_bounds[0][keep], p_bounds[1][keep]),
                None if basis is None else _basis_of_block(basis, bid, sub),
                scales.select(keep),
                SolveStats(),
                _with_rows_before(select_rows(rows, keep), len(block), last_rows),
            )
            last_rows = sol.rows
        stats = stats.beside(sol.stats)
        if sol.status is not SolveStatus.OPTIMAL:
            return _failed(T, K, n_bids, sol.status, stats)
        accepted[bid], slack_mw[keep], objective = (
            sol.accepted_mw,
            sol.slack_mw,
            objective + sol.objective_eur,
        )
        p[keep], q[keep], price_p[keep], price_q[keep], by_model[keep] = (
            sol.p_mw,
            sol.q_mvar,
            sol.marginal_price,
            sol.marginal_price_q,
            sol.priced_by_model,
        )
        bid_status[bid] = sol.basis.bid_status
        if sub.storage:
            row_status = sol.basis.row_status
        held_rows.append(place_rows(sol.rows, keep))
        row_duals.append(sol.row_duals)
        row_slacks.append(sol.row_slack_mw)
        trust_bound |= sol.trust_bound
    solution = Solution(
        SolveStatus.OPTIMAL,
        accepted,
        p,
        q,
        slack_mw,
        price_p,
        price_q,
        objective,
        stats,
        MarketBasis(bid_status, row_status),
        np.concatenate([np.zeros((0, 2), np.int64), *held_rows]).astype(np.int64),
        by_model,
        row_duals=np.concatenate([np.zeros(0), *row_duals]),
        row_slack_mw=np.concatenate([np.zeros(0), *row_slacks]),
        trust_bound=trust_bound,
    )
    return solution if only is None else _prices_held(solution, only, previous)


def _prices_held(solution: Solution, only: np.ndarray, previous: Solution) -> Solution:
    """The MTUs ``only`` does not flag keep ``previous``'s marginal prices: a block solved
    again held their bids at its acceptances (``MarketBids.held``), and a held step's
    bounds take any dual, so the LP's prices there price nothing (CIGRE MV with its
    battery, zonal K = 1, margin rounds: 454 of 463 accepted steps paid 0)."""
    price_p, price_q = solution.marginal_price.copy(), solution.marginal_price_q.copy()
    by_model = solution.priced_by_model.copy()
    price_p[~only], price_q[~only], by_model[~only] = (
        previous.marginal_price[~only],
        previous.marginal_price_q[~only],
        previous.priced_by_model[~only],
    )
    return replace(
        solution, marginal_price=price_p, marginal_price_q=price_q, priced_by_model=by_model
    )


def _kept_block(previous: Solution, keep: np.ndarray, bid: np.ndarray, sub: MarketBids):
    """A block's part of an earlier solution (``solve_clearing``'s ``only``); its objective
    is not known (NaN)."""
    return Solution(
        SolveStatus.OPTIMAL,
        previous.accepted_mw[bid],
        previous.p_mw[keep],
        previous.q_mvar[keep],
        previous.slack_mw[keep],
        previous.marginal_price[keep],
        previous.marginal_price_q[keep],
        float("nan"),
        SolveStats(),
        _basis_of_block(previous.basis, bid, sub),
        select_rows(previous.rows, keep),
        previous.priced_by_model[keep],
        row_duals=previous.row_duals[keep[previous.rows[:, 0]]],
        row_slack_mw=previous.row_slack_mw[keep[previous.rows[:, 0]]],
        trust_bound=previous.trust_bound,
    )


def _with_rows_before(rows: np.ndarray, n_mtus: int, before: np.ndarray) -> np.ndarray:
    """A one-MTU block's ``rows`` (at position 0) and the rows the block solved before it
    rested on, at its MTU: an MTU later, mostly the same elements bind (the nodal DSO-needs
    LP of SimBench MV+LV, one block per MTU: 9.3 -> 6.5 s)."""
    if n_mtus != 1 or len(before) == 0:
        return rows
    before = np.column_stack([np.zeros(len(before), np.int64), before[:, 1]])
    return np.unique(np.concatenate([rows, before]), axis=0)


def select_rows(rows: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The (MTU position, row) pairs of ``rows`` in the MTUs ``keep`` flags, at their
    positions among them (as ``LinearGrid.select(keep)`` numbers them)."""
    kept = rows[keep[rows[:, 0]]]
    return np.column_stack([(np.cumsum(keep) - 1)[kept[:, 0]], kept[:, 1]])


def place_rows(rows: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``rows`` of the MTUs ``keep`` flags back at their positions among all (the inverse
    of ``select_rows``)."""
    return np.column_stack([np.flatnonzero(keep)[rows[:, 0]], rows[:, 1]])


def _basis_of_block(basis: MarketBasis, bid: np.ndarray, sub: MarketBids) -> MarketBasis:
    """The part of a market basis on one block's bids (the storage rows: all in one block)."""
    return MarketBasis(
        basis.bid_status[bid], basis.row_status if sub.storage else basis.row_status[:0]
    )


def _clear_block(
    grid: LinearGrid,
    market: MarketBids,
    selected: np.ndarray,
    penalty_eur_per_mwh: float,
    p_bounds: tuple[np.ndarray, np.ndarray] | None,
    basis: MarketBasis | None,
    scales: RowScales,
    stats: SolveStats,
    known_rows: np.ndarray,
) -> Solution:
    """Row and column generation on one block of MTUs (``solve_clearing``), starting with
    its ``known_rows`` besides the screen. A step priced above the penalty of unmet need,
    the one price cap, never enters: with a row's slack priced higher (``slack_prices``),
    the LP would otherwise buy it to avoid a new violation."""
    affordable = market.price <= penalty_eur_per_mwh
    selected = selected & affordable
    rows = list(map(tuple, known_rows.tolist()))
    while True:
        model = ClearingModel(
            grid, market, selected.copy(), penalty_eur_per_mwh, rows, p_bounds, basis, scales
        )
        sol = model.solve()
        basis = sol.basis
        rows = model.rows
        stats += sol.stats
        if sol.status is not SolveStatus.OPTIMAL or selected.all():
            break
        t, a = market.t_of_bid, market.area_of_bid
        value = market.sign * (
            sol.marginal_price[t, a] + market.tan_phi * sol.marginal_price_q[t, a]
        )
        improving = ~selected & affordable & (market.price < value - 1e-7)
        if not improving.any():
            break
        selected |= improving
    return replace(sol, stats=stats)


# ---------------------------------------------------------------------- sequential AC loop
@dataclass(frozen=True)
class SequentialLP:
    """The course of a sequential LP: rounds solved, the round returned (the best in AC),
    and whether it converged before its round cap (no loop: 0 rounds, converged)."""

    rounds: int = 0
    best_round: int = 0
    converged: bool = True
    #: The best round's AC point (internal voltages of the market's model of its dispatch,
    #: one row per MTU cleared, NaN where it diverged), which the market's AC check keeps
    #: where it solves the dispatch (``check.ac.ac_check``). None: no loop.
    ac_point: np.ndarray | None = field(default=None, repr=False, compare=False)
    #: The market side and the rows' MW-equivalent units the loop cleared with: a later
    #: clearing of the same bids (a margin round) reuses them.
    market: MarketBids | None = field(default=None, repr=False, compare=False)
    scales: RowScales | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class _Round:
    """One sequential-LP round judged in AC: its LP solution and the AC point it reaches."""

    number: int
    sol: Solution
    V: np.ndarray  # internal voltages of the market's model of the dispatch (NaN: diverged)
    converged: np.ndarray  # per MTU
    merit_eur: np.ndarray  # per MTU: bid cost plus the AC residual priced as the LP's slacks
    as_modelled: np.ndarray  # per MTU: AC no worse than the round's linear model, to tolerance
    grid: LinearGrid  # the linearisation the round's LP was solved on
    #: The AC point's distance from the model on the rows the LP's optimum rests on, priced
    #: by their duals: to first order, what the LP re-linearised there would change.
    model_error_eur: float

    @property
    def merit(self) -> float:
        return float(self.merit_eur.sum())


def column_quota(needs: pd.DataFrame, mtus: np.ndarray) -> np.ndarray:
    """Column quota per MTU (``solve_clearing``): the DSO need of the base case, with margin
    (a sequential LP's later rounds also take the steps of its best round; column
    generation brings in whatever else pays)."""
    return 1.5 * needs.groupby("mtu").need_mw.sum().reindex(mtus, fill_value=0.0).to_numpy()


def sequential_clearing(
    pf: HorizonPowerFlow,
    k: int,
    W,
    sensitivity_method: str,
    grid: LinearGrid,
    active: pd.DataFrame,
    resources_table: pd.DataFrame | None,
    penalty_eur_per_mwh: float,
    needs: pd.DataFrame,
    cache: LinearisationCache,
    rows: np.ndarray | None = None,
):
    """Sequential LP: clear, re-linearise at the AC point of the market's own model of the
    result, clear again, until the rounds agree with AC.

    The market's model injects each area's activation at its virtual bus, spread over
    the area's buses by W (internal bus x area, the zones' aggregation): for the nodal
    market (one bus per area) that is the real dispatch, so the nodal loop converges to
    the AC optimum of the bids; for a zonal market it is the DSO's zonal view, and the
    AC check of the real dispatch measures what that view misses.

    Every round is judged by its merit: bid cost plus the AC excess beyond the limits'
    tolerances, in MW-equivalent as the LP's slacks, priced as them (``slack_prices``). A
    round better than the best so far (or as good, where the best was not as modelled) is
    accepted and the grid is re-linearised at its AC point (exact there). A worse one is
    rejected, and the next LP is solved again around the best point. The LP's area
    injections stay in a trust region around the best point, per MTU: unbounded for the
    first step from the base case, then half the last step in an MTU whose AC point came
    out worse than its linear model said (a step too long for the linearisation, or an
    LP oscillating between near-equal dispatches) or whose merit got worse, and twice the
    last step where the model predicted it. The loop has converged when every MTU's AC
    point of an accepted round is as its model said to the tolerances (within limits, or
    short by exactly the unmet need the model reports) and either the round moved the
    merit by less than SLP_COST_RTOL, or the model's error on the rows its LP's optimum
    rests on, priced by their duals, is below that (``_Round.model_error_eur``: to first
    order what the next round would change; the optimum resting on no bound of the trust
    region); the first round too, where its step from the base case was as modelled. On
    SimBench MV's windy day 6 of its 7 LP markets stop a round earlier so, with the same
    results: the round they skipped moved the merit by about 1e-4 of it and was not kept.
    It has converged too when a rejected round is that close to a best round that is as
    modelled. It also stops when the trust region has shrunk below SLP_MIN_STEP_MW, and at
    SLP_MAX_ROUNDS (both with a warning when not converged). The best round is returned,
    never a worse later one.

    Every round's grid has the base case's representation of its rows. The first round's
    LP starts with ``rows`` (grid rows an LP needed on the base case's linearisation: the
    DSO-needs LP's), a later one with the best round's.
    Returns the best round's solution and grid, the LPs' effort and the loop's course.
    """
    # The market side (bids, balances, storage) is the same in every round: made once.
    started = time.perf_counter()
    market = MarketBids(
        grid.mtus, grid.k, grid.dt_h, active.reset_index(drop=True), resources_table
    )
    solved = SolveStats(build_s=time.perf_counter() - started)
    # MW-equivalent of an excess, fixed at the base case for every round's LP and merit.
    scales = RowScales(grid, market.capacity_mw(penalty_eur_per_mwh))
    T = len(grid.mtus)
    best: _Round | None = None
    lp_grid = grid  # the linearisation at the best point (the base case before round 1)
    lp_V = pf.V[grid.mtus]  # its point per MTU
    radius = np.full(T, np.inf)  # trust region on the area injections, MW per MTU
    converged = False
    quota = column_quota(needs, grid.mtus)
    for number in range(1, SLP_MAX_ROUNDS + 1):
        p0 = np.zeros((T, grid.k)) if best is None else best.sol.p_mw
        sol = solve_clearing(
            lp_grid,
            active,
            resources_table,
            penalty_eur_per_mwh=penalty_eur_per_mwh,
            quota_mw=quota,
            market=market,
            p_bounds=(p0 - radius[:, None], p0 + radius[:, None]) if best else None,
            include=None if best is None else best.sol.accepted_mw > 0,
            basis=None if best is None else best.sol.basis,
            scales=scales,
            rows=rows if best is None else best.sol.rows,
        )
        require_optimal(sol, "clearing LP")
        solved += sol.stats
        this = _judge(pf, lp_grid, lp_V, market, sol, W, scales, penalty_eur_per_mwh, number, cache)
        step = np.abs(sol.p_mw - p0).max(axis=1, initial=0.0)
        if best is None or _better(this, best):
            # Settled: the merit moved less than the tolerance; or the LP's optimum rests on
            # no bound of the trust region and the model's error priced by its duals is
            # below it: re-linearised at this AC point, the LP would move the merit by about
            # that much.
            settled = (best is not None and _close(best.merit, this.merit)) or (
                not sol.trust_bound and _negligible(this.model_error_eur, this.merit)
            )
            best = this
            converged = settled and bool(this.as_modelled.all())
            if number > 1:  # the base point's first step is taken whole, then at most doubled
                radius = np.where(
                    this.as_modelled, np.maximum(2.0 * step, SLP_MIN_STEP_MW), 0.5 * step
                )
            if converged:
                break
            # Re-linearised at the new AC point, exact there (MTUs that diverged: base case).
            keep = this.converged[:, None]
            lp_V = np.where(keep, this.V, pf.V[grid.mtus])
            lp_grid = linear_grid(
                pf,
                W,
                sensitivity_method,
                grid.mtus,
                lp_V,
                np.where(keep, sol.p_mw, 0.0),
                np.where(keep, sol.q_mvar, 0.0),
                cache=cache,
                representation="dense" if grid.rows.dense else "adjoint",
            )
        else:
            if _close(best.merit, this.merit) and best.as_modelled.all():
                converged = True
                break
            worse = this.merit_eur > best.merit_eur + 1e-9
            radius = np.where(worse | ~this.as_modelled, 0.5 * step, radius)
        if np.all(radius < SLP_MIN_STEP_MW):
            break
    if not converged:
        log.warning(
            "sequential LP (K = %d) stopped after %d rounds before converging; "
            "returning its best round (%d)",
            k,
            number,
            best.number,
        )
    course = SequentialLP(number, best.number, converged, best.V, market, scales)
    return best.sol, best.grid, solved, course


def _judge(
    pf, lp_grid, lp_V, market, sol, W, scales, penalty_eur_per_mwh, number, cache=None
) -> _Round:
    """AC power flow of a round's market model, its merit per MTU (bid cost plus the AC
    residual priced as the LP's slacks; inf where the flow diverged) and whether AC is as
    the round's linear model said. ``lp_V``: the internal voltages per MTU the round's
    grid was linearised at; ``cache``: the study's linearisations (``solve_with_injections``)."""
    # From the round's linearisation point (the best AC point so far; the base case in round
    # 1), with the Jacobian factorised there where the grid rows hold it (adjoint rows): the
    # first Newton step is then the LP's own linear prediction. On SimBench
    # 1-MVLV-rural-all-0-sw (72 MTUs, 3 rounds) factorisations per MTU and round: nodal 2.9
    # -> 1.1, K = 64 (adjoint) 2.9 -> 1.07, K = 4 (dense) 2.9 -> 1.9. Dense rows hold none:
    # the first step takes the factorisation of that point's linearisation where the
    # study's cache keeps it (every base point of the MTUs a study clears, its kept points,
    # and the latest others).
    held = getattr(lp_grid.rows, "linearisations", None)
    V, ok = solve_with_injections(
        pf,
        lp_grid.mtus,
        sol.p_mw @ W.T,
        sol.q_mvar @ W.T,
        lp_V,
        None if held is None else [lin.lu for lin in held],
        cache=cache,
    )
    excess = np.full((len(lp_grid.mtus), lp_grid.n_rows), np.inf)
    model = pf.model
    excess[ok] = lp_grid.violations(model.loading_percent(V[ok]), model.vm_pu(V[ok]))
    cost = np.zeros(len(lp_grid.mtus))
    np.add.at(cost, market.t_of_bid, market.price * sol.accepted_mw * lp_grid.dt_h)
    # Priced as the LP prices its slacks (MW-equivalent, slack_prices, summed over rows),
    # for what is violated: beyond the tolerance. Within it, AC differs from the model by
    # second-order noise that would otherwise decide between rounds of the same cost.
    tol = SLP_TOLERANCE_SHARE * lp_grid.row_tolerances()
    beyond = np.clip(excess - tol, 0.0, None)
    t, r = np.nonzero(np.isfinite(beyond) & (beyond > 0))
    residual_eur = np.where(ok, 0.0, np.inf)
    price = slack_prices(scales, t, r, penalty_eur_per_mwh) * lp_grid.dt_h
    np.add.at(residual_eur, t, price * beyond[t, r] / scales.of(t, r))
    predicted = lp_grid.violations(*lp_grid.after(sol.p_mw, sol.q_mvar))
    as_modelled = (excess <= np.maximum(predicted, 0.0) + tol).all(axis=1)
    merit = cost + residual_eur
    # The model's error on the rows the optimum rests on, priced by their duals: to first
    # order, what the LP re-linearised at this AC point would change. On a row whose slack
    # is taken (priced at its penalty), room AC has within the slack only lowers the slack
    # (the merit prices the AC excess already); beyond it, the bids it would free count.
    t, r = sol.rows[:, 0], sol.rows[:, 1]
    room = (predicted[t, r] - excess[t, r]) / scales.of(t, r)  # MW-eq beyond the model's
    taken = sol.row_slack_mw > PRIMAL_TOLERANCE_MW
    error = np.where(taken, np.clip(room - sol.row_slack_mw, 0.0, None), np.abs(room))
    known = np.isfinite(error)  # not in an MTU whose power flow diverged (not as modelled)
    model_error_eur = float(sol.row_duals[known] @ error[known])
    return _Round(number, sol, V, ok, merit, as_modelled, lp_grid, model_error_eur)


def _better(this: _Round, best: _Round) -> bool:
    """A lower merit; or the same merit (to SLP_COST_RTOL) reached as the model said where
    the best round's AC point was not."""
    if _close(this.merit, best.merit):
        return bool(this.as_modelled.all() and not best.as_modelled.all())
    return this.merit < best.merit


def _close(a: float, b: float) -> bool:
    """Merits equal to the sequential LP's relative tolerance."""
    return _negligible(abs(a - b), max(abs(a), abs(b)))


def _negligible(change_eur: float, merit_eur: float) -> bool:
    """A change of a merit within the sequential LP's relative tolerance."""
    return change_eur <= SLP_COST_RTOL * max(abs(merit_eur), 1e-9)


# ---------------------------------------------------------------------- margins
class RowMargins:
    """Margins on a market's row limits, grown where its real dispatch violates in AC a row
    that its model met.

    A market's model injects each area's activation at its virtual bus (spread over the
    area by the aggregation weights); the real dispatch injects it where the accepted
    offers are. For the nodal market the two are the same; for a zonal one the AC check
    can find rows violated, often where the base case had none, that the model met. Such
    a row (violated in AC beyond its tolerance while the model predicts it within its
    limit and the tolerance, or the base case had it within) gets a margin and the market
    clears again: the limits that flow-based market coupling keeps as reliability
    margins, here learnt from the check.

    A margin round clears again on the linearisation of the clearing before (the margins
    absorb its error too), in the MTUs whose margins grew (``grown``); the others keep
    their solution.

    A row's first margin is its AC excess; a later one grows by the excess divided by how
    much the excess fell per unit of margin in the round before (a secant, bounded by
    MARGIN_SLOPE_RANGE), so that a row whose zonal sensitivity overstates the dispatch's
    is met in a few rounds. Each step adds half the row's tolerance, so that the row ends
    inside it. A row the model leaves violated (offers short, priced as unmet need) gets
    no margin: the market could not meet it any better.
    """

    def __init__(self, grid: LinearGrid, base_excess: np.ndarray) -> None:
        self.values = np.zeros((len(grid.mtus), grid.n_rows))
        self._tolerances = grid.row_tolerances()
        self._base = base_excess  # the base case's excess per row (T x n_rows)
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # margins, excess before
        self.grown = np.zeros(len(grid.mtus), bool)  # MTUs whose margins the last grow moved

    def unmet(self, real_excess: np.ndarray, predicted_excess: np.ndarray) -> np.ndarray:
        """Rows the real dispatch violates in AC (T x n_rows excess beyond the limits; NaN:
        not converged) that the model met at their limits (``predicted_excess``, without
        the margins), to the tolerance (the needs-based market's needs leave rows at it:
        ``dso_needs``) and rounding, or that the base case did not violate (a violation the
        dispatch created, which less of it would avoid: the needs-based market, filling
        each zone's need on its own, can create one in its model too)."""
        tol = self._tolerances
        marginable = (predicted_excess <= tol * (1.0 + MARGIN_ROUNDING)) | (self._base <= tol)
        with np.errstate(invalid="ignore"):
            return (real_excess > tol) & marginable

    def grow(self, real_excess: np.ndarray, unmet: np.ndarray) -> None:
        """Margins for the next clearing, on the ``unmet`` rows."""
        step = real_excess
        if self._last is not None:
            before, excess_before = self._last
            moved = self.values - before
            with np.errstate(invalid="ignore"):
                slope = np.divide(
                    real_excess - excess_before,
                    moved,
                    out=np.full_like(moved, MARGIN_SLOPE_RANGE[0]),
                    where=moved > 0,
                )
                step = real_excess / -np.clip(slope, *MARGIN_SLOPE_RANGE)
        self._last = (self.values.copy(), real_excess)
        self.values = self.values + np.where(unmet, step + 0.5 * self._tolerances, 0.0)
        self.grown = unmet.any(axis=1)
