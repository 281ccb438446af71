"""The clearing LP: one formulation for the nodal and the zonal market (Pyomo, solved by HiGHS).

For the MTUs t to clear, market areas a (zones; one zone per bus is the nodal
market) and bid steps b::

    min   sum_b price_b dt x_b  +  sum_rows penalty dt s_row / g_row
    s.t.  0 <= x_b <= q_b                                          (bid steps)
          p_at = sum_{b in a,t} sigma_b x_b,  q_at = sum sigma_b tan_phi_b x_b   (area injections)
          L0_lt + sum_a (SLp_lat p_at + SLq_lat q_at) <= Lmax + s_lt            (loading)
          vmin - s_mt <= V0_mt + sum_a (SVp_mat p_at + SVq_mat q_at) <= vmax + s_mt  (voltage)
          0 <= soc0_r - dt sum_{tau <= t} (x_up_r,tau / eta_r - eta_r x_down_r,tau) <= E_r   (storage)

sigma_b is +1 for up and -1 for down; S are the zonal sensitivity indices of
each MTU (the nodal sensitivities when every bus is a zone). g_row, the largest
|coefficient| of a row on active power, turns a slack into the MW of the most
effective flexibility that would remove it, so the penalty is a price per MWh of unmet
need. A slack above zero is unmet need and is reported, never hidden.

Rows are screened: the LP starts with the rows violated or within a margin of
their limit (at most ROWS_PER_MTU_AND_ROUND per MTU, the most violated first),
and after every solve the linearised state of *every* monitored element is
checked; rows the activations violate are added (the same cap per round) and the
LP is solved again (constraint generation), so no element is dropped and no new
congestion is created in the linear model.

Coefficients are numpy arrays computed before the model is built. The market
side (bids, area injections, storage, bid cost) is a Pyomo model (``MarketLP``),
built and compiled to one sparse matrix once per market: every LP of that market
takes its columns from it. The grid rows are the
sensitivity arrays themselves: they join the persistent HiGHS instance as sparse
blocks with their slack columns (``ClearingModel._add_grid_rows``), the screened
ones first and the generated ones later, without a rebuild. Building them as Pyomo
expressions (one object per nonzero, dense rows over areas) cost more than HiGHS's
solve on SimBench MV.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields, replace
from enum import StrEnum

import highspy
import numpy as np
import pandas as pd
import pyomo.environ as pyo
from pyomo.common.gc_manager import PauseGC
from pyomo.core.expr.numeric_expr import LinearExpression
from pyomo.repn.plugins.standard_form import LinearStandardFormCompiler

from lfm_zonal.config import DEFAULT_PENALTY_EUR_PER_MWH
from lfm_zonal.errors import LfmError, SolverError
from lfm_zonal.grid.linear import LinearGrid, row_scale
from lfm_zonal.market.bids import merit_order_fill

log = logging.getLogger(__name__)

SCREEN_LOADING_MARGIN_PERCENT = 5.0
SCREEN_VM_MARGIN_PU = 0.005
#: Rows an MTU brings into the LP at once (screen, then each generation round): the most
#: violated ones in MW-equivalent. On a long radial feeder hundreds of buses can be below
#: the band in one MTU, each row dense over the areas; fixing the worst usually fixes most.
ROWS_PER_MTU_AND_ROUND = 20
GENERATION_TOLERANCE = 1e-6  # loading percent / p.u.: constraint generation in the linear model
MAX_GENERATION_ROUNDS = 30


class SolveStatus(StrEnum):
    """How a clearing ended: its value is the ``solver_status`` KPI.

    ``OPTIMAL`` is the one LP outcome with a solution. ``NOTHING_TO_CLEAR`` (no MTU with
    a violation) and ``MERIT_ORDER`` (the needs-based market) are clearings without an
    LP. Every other member is a HiGHS model status other than optimal, in HiGHS's words.
    """

    OPTIMAL = "optimal"
    NOTHING_TO_CLEAR = "nothing to clear"
    MERIT_ORDER = "merit order"
    NOT_SET = "Not Set"
    LOAD_ERROR = "Load error"
    MODEL_ERROR = "Model error"
    PRESOLVE_ERROR = "Presolve error"
    SOLVE_ERROR = "Solve error"
    POSTSOLVE_ERROR = "Postsolve error"
    MODEL_EMPTY = "Empty"
    INFEASIBLE = "Infeasible"
    UNBOUNDED_OR_INFEASIBLE = "Primal infeasible or unbounded"
    UNBOUNDED = "Unbounded"
    OBJECTIVE_BOUND = "Bound on objective reached"
    OBJECTIVE_TARGET = "Target for objective reached"
    TIME_LIMIT = "Time limit reached"
    ITERATION_LIMIT = "Iteration limit reached"
    UNKNOWN = "Unknown"
    SOLUTION_LIMIT = "Solution limit reached"
    INTERRUPT = "Interrupted by user"
    MEMORY_LIMIT = "Memory limit reached"
    HIGHS_INTERRUPT = "Interrupted by HiGHS"

    @classmethod
    def of(cls, highs: highspy.Highs) -> SolveStatus:
        """The model status of HiGHS's last run (``UNKNOWN`` for a status it adds later)."""
        status = highs.getModelStatus()
        if status == highspy.HighsModelStatus.kOptimal:
            return cls.OPTIMAL
        try:
            return cls(highs.modelStatusToString(status))
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True)
class SolveStats:
    """What clearing LPs took (summed over the LPs solved) and the size of the last one."""

    rounds: int = 0  # LP solves: constraint-generation rounds
    column_rounds: int = 0  # clearing LPs: column-generation rounds
    build_s: float = 0.0  # building the market side, handing it over, adding grid rows
    solve_s: float = 0.0  # HiGHS runs, wall clock
    highs_s: float = 0.0  # HiGHS runs, HiGHS's own clock
    simplex_iterations: int = 0
    # Size of the last LP solved to optimality (0 where none was).
    n_variables: int = 0
    n_constraints: int = 0
    n_nonzeros: int = 0
    n_grid_rows: int = 0

    def __add__(self, later: SolveStats) -> SolveStats:
        """The effort of both (rounds, times, iterations summed) and the size of ``later``."""
        size = {f.name for f in fields(self) if f.name.startswith("n_")}
        return SolveStats(
            **{
                f.name: getattr(later, f.name)
                if f.name in size
                else getattr(self, f.name) + getattr(later, f.name)
                for f in fields(self)
            }
        )


@dataclass(frozen=True)
class Solution:
    """What a clearing LP returns (arrays aligned with its inputs)."""

    status: SolveStatus
    accepted_mw: np.ndarray  # per bid
    p_mw: np.ndarray  # (T, K) net area injections
    q_mvar: np.ndarray
    slack_mw: np.ndarray  # (T,) unmet need in MW-equivalent: sum of slack / g per MTU
    marginal_price: np.ndarray  # (T, K) EUR/MWh of active up injection in each area (from duals)
    marginal_price_q: np.ndarray  # (T, K) EUR/Mvarh of reactive injection (zero without Q)
    objective_eur: float
    stats: SolveStats = SolveStats()
    basis: MarketBasis | None = None  # where the LP ended, to warm-start the next one


@dataclass(frozen=True)
class MarketBasis:
    """Simplex basis status (HiGHS codes) of the market side's compiled columns and rows.

    An LP of the same market against another linearisation starts from it (HiGHS
    completes it into a valid basis: new grid rows basic, new columns at a bound), so a
    sequential-LP round or a column-generation round re-optimises instead of
    solving from scratch."""

    col_status: np.ndarray  # one per compiled column of the market side
    row_status: np.ndarray  # one per market row


class MarketLP:
    """The market side of the clearing LP, in Pyomo: bid steps, area injections, storage, bid cost.

    It depends on the bids and the MTUs only, not on the linearisation, so a market
    builds and compiles it once (Pyomo's standard-form compiler, one sparse matrix)
    and every LP it solves (sequential AC rounds, column generation) takes its
    columns from that matrix. The grid rows join each LP in HiGHS
    (``ClearingModel._add_grid_rows``).
    """

    def __init__(
        self,
        mtus: np.ndarray,
        k: int,
        dt_h: float,
        bids: pd.DataFrame,
        resources_table: pd.DataFrame | None,
    ) -> None:
        self.mtus, self.k, self.dt_h = np.asarray(mtus), k, dt_h
        t_of_bid = self.t_index(bids.mtu.to_numpy())
        if np.isnan(t_of_bid.astype(float)).any():
            raise LfmError("bids refer to an MTU that is not being cleared")
        self.t_of_bid = t_of_bid.astype(np.int64)
        self.area_of_bid = bids.zone.to_numpy(np.int64)
        self.sign = np.where(bids.direction.to_numpy() == "up", 1.0, -1.0)
        self.tan_phi = bids.tan_phi.to_numpy(float)
        self.quantity = bids.quantity_mw.to_numpy(float)
        self.price = bids.price_eur_per_mwh.to_numpy(float)
        self.resource = bids.resource_id.to_numpy()
        self.has_q = bool(np.any(self.tan_phi != 0))
        self.storage = self._storage_chains(resources_table)
        started = time.perf_counter()
        # Tens of thousands of small Pyomo objects: the cyclic garbage collector, run on
        # every allocation burst, would take most of the build time (measured 2.7-5x).
        with PauseGC():
            self.model = self._build()
            self._compile()
        self.build_s = time.perf_counter() - started

    def t_index(self, mtus: np.ndarray) -> np.ndarray:
        """Position of each MTU in the cleared set."""
        return pd.Series(np.arange(len(self.mtus)), index=self.mtus).reindex(mtus).to_numpy()

    # ------------------------------------------------------------------ formulation
    def _build(self) -> pyo.ConcreteModel:
        m = pyo.ConcreteModel("lfm_clearing")
        self._define_bid_variables(m)
        self._define_area_injections(m, len(self.mtus) * self.k)
        self._define_storage_constraints(m)
        self._define_objective(m)
        return m

    def _define_bid_variables(self, m: pyo.ConcreteModel) -> None:
        """0 <= x_b <= q_b (an infinite quantity is an unbounded bid)."""
        m.x = pyo.Var(range(len(self.quantity)), domain=pyo.NonNegativeReals)
        for var, q in zip(m.x.values(), self.quantity, strict=True):
            if np.isfinite(q):
                var.setub(float(q))

    def _define_area_injections(self, m: pyo.ConcreteModel, n_at: int) -> None:
        """p_at = sum sigma_b x_b (and q_at with tan_phi) for every area and MTU."""
        key = self.t_of_bid * self.k + self.area_of_bid
        order = np.argsort(key, kind="stable")
        bounds = np.searchsorted(key[order], np.arange(n_at + 1))
        members = [order[bounds[i] : bounds[i + 1]] for i in range(n_at)]
        m.p = pyo.Var(range(n_at))
        x = m.x

        def balance(coef: np.ndarray, var) -> pyo.Constraint:
            return pyo.Constraint(
                range(n_at),
                rule=lambda _, i: (
                    LinearExpression(
                        constant=0.0,
                        linear_coefs=[1.0, *(-coef[members[i]])],
                        linear_vars=[var[i], *(x[int(b)] for b in members[i])],
                    )
                    == 0.0
                ),
            )

        m.balance_p = balance(self.sign, m.p)
        if self.has_q:
            m.q = pyo.Var(range(n_at))
            m.balance_q = balance(self.sign * self.tan_phi, m.q)

    def _storage_chains(self, table: pd.DataFrame | None) -> list:
        """Per storage resource: its bids, their MTU and the energy each MW takes from the store."""
        if table is None or not (table.kind == "storage").any():
            return []
        chains = []
        for rid, row in table[table.kind == "storage"].iterrows():
            idx = np.flatnonzero(self.resource == rid)
            if len(idx):
                eta = float(row.efficiency)
                # Up discharges 1/eta per MW delivered, down charges eta per MW taken.
                energy = np.where(self.sign[idx] > 0, 1.0 / eta, -eta) * self.dt_h
                chains.append(
                    (
                        idx,
                        self.t_of_bid[idx],
                        energy,
                        float(row.soc_init_mwh),
                        float(row.energy_mwh),
                    )
                )
        return chains

    def _define_storage_constraints(self, m: pyo.ConcreteModel) -> None:
        """0 <= soc0 - cumulative energy delivered <= E after every MTU with a bid."""
        m.soc = pyo.ConstraintList()
        for idx, t, energy, soc0, capacity in self.storage:
            for tt in np.unique(t):
                upto = t <= tt
                expr = LinearExpression(
                    constant=0.0,
                    linear_coefs=list(energy[upto]),
                    linear_vars=[m.x[int(b)] for b in idx[upto]],
                )
                m.soc.add(pyo.inequality(soc0 - capacity, expr, soc0))

    def _define_objective(self, m: pyo.ConcreteModel) -> None:
        """Pay-as-bid cost of the accepted steps (the slacks of the grid rows add theirs)."""
        bid_cost = LinearExpression(
            constant=0.0,
            linear_coefs=list(self.price * self.dt_h),
            linear_vars=list(m.x.values()),
        )
        m.cost = pyo.Objective(expr=bid_cost)

    def _compile(self) -> None:
        """Standard form of the Pyomo model, and where its variables and balances sit."""
        sf = LinearStandardFormCompiler().write(self.model, mixed_form=True, set_sense=None)
        col_of = {id(v): j for j, v in enumerate(sf.columns)}
        row_of: dict[int, int] = {}
        for i, entry in enumerate(sf.rows):
            row_of.setdefault(id(entry.constraint), i)
        kind = np.array([entry.bound_type for entry in sf.rows], np.int64).reshape(-1)
        rhs = np.asarray(sf.rhs, float).reshape(-1)
        self.row_lower = np.where(kind <= 0, rhs, -highspy.kHighsInf)
        self.row_upper = np.where(kind >= 0, rhs, highspy.kHighsInf)
        self.col_cost = np.asarray(sf.c.toarray()).ravel()
        self.col_lower = np.array(
            [-highspy.kHighsInf if v.lb is None else v.lb for v in sf.columns]
        )
        self.col_upper = np.array([highspy.kHighsInf if v.ub is None else v.ub for v in sf.columns])
        self.A = sf.A.tocsc()
        m, n_at = self.model, len(self.mtus) * self.k

        def cols(var) -> np.ndarray:
            return np.array([col_of[id(v)] for v in var.values()], np.int64)

        def rows(con) -> np.ndarray:
            return np.array([row_of[id(con[i])] for i in range(n_at)], np.int64)

        self.x_col, self.p_col = cols(m.x), cols(m.p)
        self.balance_p_row = rows(m.balance_p)
        if self.has_q:
            self.q_col, self.balance_q_row = cols(m.q), rows(m.balance_q)

    def highs_for(self, selected: np.ndarray) -> tuple[highspy.Highs, np.ndarray]:
        """A new HiGHS instance holding the market side with the ``selected`` bid steps only.

        Returns it and the new column of every compiled column (-1 where left out)."""
        keep = np.ones(self.A.shape[1], bool)
        keep[self.x_col[~selected]] = False
        new_col = np.cumsum(keep) - 1
        new_col[~keep] = -1
        A = self.A[:, keep]
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = int(keep.sum()), A.shape[0]
        lp.col_cost_ = self.col_cost[keep]
        lp.col_lower_, lp.col_upper_ = self.col_lower[keep], self.col_upper[keep]
        lp.row_lower_, lp.row_upper_ = self.row_lower, self.row_upper
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
        highs = highspy.Highs()
        highs.setOptionValue("output_flag", False)
        highs.passModel(lp)
        return highs, new_col


class ClearingModel:
    """One clearing LP: the market side's selected steps in a HiGHS instance, plus grid rows.

    The grid rows start from a screen (``initial_rows``) and grow by constraint
    generation, added to the running (warm-started) HiGHS instance without a rebuild.
    """

    def __init__(
        self,
        grid: LinearGrid,
        market: MarketLP,
        selected: np.ndarray,
        penalty_eur_per_mwh: float = DEFAULT_PENALTY_EUR_PER_MWH,
        known_rows: list[tuple[int, int]] | None = None,
        p_bounds: tuple[np.ndarray, np.ndarray] | None = None,
        basis: MarketBasis | None = None,
    ) -> None:
        if not np.array_equal(grid.mtus, market.mtus) or grid.k != market.k:
            raise LfmError("the market side was built for other MTUs or areas than the grid")
        self.grid = grid
        self.market = market
        self.selected = selected
        self.known_rows = known_rows or []
        self.p_bounds = p_bounds
        self.start_basis = basis
        self.penalty = penalty_eur_per_mwh
        self.has_q = market.has_q
        self.rows: list[tuple[int, int]] = []  # (t, row number in the violation layout)
        self.stats = SolveStats(column_rounds=1)  # one clearing LP

    def _grid_row_block(self, rows: list[tuple[int, int]]):
        """Grid rows in MW-equivalent, as a sparse block on the area-injection columns.

        Row (t, r) of the violation layout (loadings, then upper, then lower voltage
        limits) reads ``sum_a cp_a p_ta + cq_a q_ta - sense s <= or >= rhs``, every
        coefficient divided by the row's largest |P coefficient| g so that its slack s is
        the MW of the most effective flexibility that would remove it. Returns the
        scaled coefficients on p and q (rows x areas), the right-hand sides and senses.
        """
        t = np.array([row[0] for row in rows], np.int64)
        r = np.array([row[1] for row in rows], np.int64)
        g = self.grid
        n_l, n_b = len(g.branches), len(g.buses)
        is_line, upper = r < n_l, r < n_l + n_b
        cp, cq = self._row_coefficients(t, r)
        base = np.empty(len(rows))
        base[is_line] = g.loading0[t[is_line], r[is_line]]
        base[~is_line] = g.vm0[t[~is_line], (r[~is_line] - n_l) % n_b]
        limit = np.where(is_line, g.loading_max_percent, np.where(upper, g.vm_max_pu, g.vm_min_pu))
        scale = self._scale(t, r, cp, cq)
        sense = np.where(upper, 1.0, -1.0)
        return cp / scale[:, None], cq / scale[:, None], (limit - base) / scale, sense

    def _row_coefficients(self, t: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sensitivities of rows (t, r) to area injections p and q (rows x areas)."""
        g = self.grid
        n_l, n_b = len(g.branches), len(g.buses)
        is_line = r < n_l
        lt, line = t[is_line], r[is_line]
        bt, bus = t[~is_line], (r[~is_line] - n_l) % n_b
        cp, cq = np.empty((len(t), g.k)), np.empty((len(t), g.k))
        cp[is_line], cq[is_line] = g.sl_p[lt, line], g.sl_q[lt, line]
        cp[~is_line], cq[~is_line] = g.sv_p[bt, bus], g.sv_q[bt, bus]
        return cp, cq

    def _scale(self, t: np.ndarray, r: np.ndarray, cp: np.ndarray, cq: np.ndarray) -> np.ndarray:
        """MW-equivalent unit of rows (t, r): the grid's fixed scales, or their own coefficients."""
        if self.grid.scales is not None:
            return self.grid.scales[t, r]
        return row_scale(cp, cq)

    def _worst_rows(self, excess: np.ndarray, candidate: np.ndarray) -> list[tuple[int, int]]:
        """Of the candidate rows (T x rows mask), per MTU the ROWS_PER_MTU_AND_ROUND with
        the largest excess in MW-equivalent (excess / the row's largest coefficient)."""
        t, r = np.nonzero(candidate)
        if len(t) == 0:
            return []
        cp, cq = self._row_coefficients(t, r)
        need_mw = excess[t, r] / self._scale(t, r, cp, cq)
        order = np.lexsort((r, -need_mw, t))  # per MTU, the largest need first
        t, r = t[order], r[order]
        first = np.searchsorted(t, t, side="left")
        keep = np.arange(len(t)) - first < ROWS_PER_MTU_AND_ROUND
        return list(zip(t[keep].tolist(), r[keep].tolist(), strict=True))

    def _add_grid_rows(self, rows: list[tuple[int, int]]) -> None:
        """Add grid rows, each with its slack column (penalised), to the HiGHS instance."""
        if not rows:
            return
        cp, cq, rhs, sense = self._grid_row_block(rows)
        n, K = len(rows), self.grid.k
        t = np.array([row[0] for row in rows], np.int64)
        first = self.highs.getNumCol()
        cost = self.penalty * self.grid.dt_h
        self.highs.addVars(n, np.zeros(n), np.full(n, highspy.kHighsInf))
        self.highs.changeColsCost(n, np.arange(first, first + n, dtype=np.int32), np.full(n, cost))
        area_cols = t[:, None] * K + np.arange(K)[None, :]
        blocks = [(cp, self.p_col[area_cols])]
        if self.has_q:
            blocks.append((cq, self.q_col[area_cols]))
        coef = np.concatenate([c for c, _ in blocks] + [-sense[:, None]], axis=1)
        cols = np.concatenate(
            [c for _, c in blocks] + [np.arange(first, first + n)[:, None]], axis=1
        )
        keep = coef != 0
        starts = np.concatenate([[0], np.cumsum(keep.sum(axis=1))[:-1]]).astype(np.int32)
        lower = np.where(sense > 0, -highspy.kHighsInf, rhs)
        upper = np.where(sense > 0, rhs, highspy.kHighsInf)
        self.highs.addRows(
            n,
            lower,
            upper,
            int(keep.sum()),
            starts,
            cols[keep].astype(np.int32),
            coef[keep].astype(float),
        )
        self.slack_cols = np.concatenate([self.slack_cols, np.arange(first, first + n)])
        self.rows += rows

    # ------------------------------------------------------------------ solving
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

    def _hand_over(self) -> None:
        """A HiGHS instance with the market side's selected steps; where its columns sit."""
        mk = self.market
        self.highs, new_col = mk.highs_for(self.selected)
        self.new_col = new_col
        self.x_col = new_col[mk.x_col[self.selected]]
        self.p_col = new_col[mk.p_col]
        self.q_col = new_col[mk.q_col] if self.has_q else None
        self.slack_cols = np.zeros(0, np.int64)
        if self.p_bounds is not None:  # trust region of a sequential-LP round
            lower, upper = (np.asarray(b, float).ravel() for b in self.p_bounds)
            self.highs.changeColsBounds(len(self.p_col), self.p_col.astype(np.int32), lower, upper)

    def _spent(self, **effort) -> None:
        """Add rounds, seconds or iterations to this LP's statistics."""
        self.stats += SolveStats(**effort)

    def _run(self) -> SolveStatus:
        started = time.perf_counter()
        self.highs.run()
        self._spent(
            rounds=1,
            solve_s=time.perf_counter() - started,
            highs_s=self.highs.getRunTime(),
            simplex_iterations=int(self.highs.getInfo().simplex_iteration_count),
        )
        return SolveStatus.of(self.highs)

    def solve(self) -> Solution:
        started = time.perf_counter()
        self._hand_over()
        self._add_grid_rows(self.initial_rows())
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
        """Start from a market basis: grid rows basic, their slacks at zero (HiGHS makes the
        rest of it valid, as an alien basis)."""
        n_col, n_row = self.highs.getNumCol(), self.highs.getNumRow()
        col = np.full(n_col, int(highspy.HighsBasisStatus.kLower))
        kept = self.new_col >= 0
        col[self.new_col[kept]] = basis.col_status[kept]
        row = np.full(n_row, int(highspy.HighsBasisStatus.kBasic))
        row[: len(basis.row_status)] = basis.row_status
        start = highspy.HighsBasis()
        start.col_status = [highspy.HighsBasisStatus(v) for v in col.tolist()]
        start.row_status = [highspy.HighsBasisStatus(v) for v in row.tolist()]
        start.alien = True
        self.highs.setBasis(start)

    def _basis(self) -> MarketBasis:
        """The market side's part of the final basis, in compiled columns."""
        basis = self.highs.getBasis()
        col = np.fromiter((int(v) for v in basis.col_status), np.int8, self.highs.getNumCol())
        row = np.fromiter((int(v) for v in basis.row_status), np.int8, self.highs.getNumRow())
        compiled = np.full(len(self.new_col), int(highspy.HighsBasisStatus.kLower), np.int8)
        kept = self.new_col >= 0
        compiled[kept] = col[self.new_col[kept]]
        return MarketBasis(compiled, row[: self.market.A.shape[0]])

    def _values(self):
        """Accepted MW of the selected steps, area injections p and q (T x K)."""
        T, K = len(self.grid.mtus), self.grid.k
        values = np.asarray(self.highs.getSolution().col_value)
        x = np.clip(values[self.x_col], 0.0, None)
        p = values[self.p_col].reshape(T, K)
        q = values[self.q_col].reshape(T, K) if self.has_q else np.zeros((T, K))
        return x, p, q

    def _area_prices(self, balance_rows: np.ndarray) -> np.ndarray:
        """-d cost / d rhs of "p - sum sigma x = 0": EUR/MWh of a free injection in the area."""
        T, K = len(self.grid.mtus), self.grid.k
        duals = np.asarray(self.highs.getSolution().row_dual)
        return -duals[balance_rows].reshape(T, K) / self.grid.dt_h

    def _solution(self, x, p, q) -> Solution:
        T, K = len(self.grid.mtus), self.grid.k
        slack = np.asarray(self.highs.getSolution().col_value)[self.slack_cols]
        slack_mw = np.zeros(T)
        if len(self.rows):  # the worst row of each MTU: MW the best area would need
            t = np.array([row[0] for row in self.rows], np.int64)
            np.maximum.at(slack_mw, t, slack)
        price = self._area_prices(self.market.balance_p_row)
        price_q = self._area_prices(self.market.balance_q_row) if self.has_q else np.zeros((T, K))
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
            price,
            price_q,
            float(info.objective_function_value),
            self.stats,
            self._basis(),
        )

    def _failed(self, status: SolveStatus) -> Solution:
        T, K = len(self.grid.mtus), self.grid.k
        zeros = np.zeros((T, K))
        return Solution(
            status,
            np.zeros(len(self.selected)),
            zeros,
            zeros.copy(),
            np.full(T, np.nan),
            np.full((T, K), np.nan),
            np.full((T, K), np.nan),
            float("nan"),
            self.stats,
        )


def solve_clearing(
    grid: LinearGrid,
    bids: pd.DataFrame,
    resources_table: pd.DataFrame | None = None,
    penalty_eur_per_mwh: float = DEFAULT_PENALTY_EUR_PER_MWH,
    quota_mw: np.ndarray | None = None,
    market: MarketLP | None = None,
    p_bounds: tuple[np.ndarray, np.ndarray] | None = None,
    include: np.ndarray | None = None,
    basis: MarketBasis | None = None,
) -> Solution:
    """Clear ``bids`` against the linearised grid (one LP over all its MTUs).

    With ``quota_mw`` (per MTU), columns are screened too: each group of competing
    steps (MTU, area, direction) enters the LP with its cheapest steps up to the
    quota, storage steps always. After a solve, every step left out is priced with
    the area's marginal prices (its reduced cost: price - sigma (lambda_p + tan_phi
    lambda_q)); those that would lower the cost are added and the LP is solved again
    (column generation). The result is the LP optimum over all bids.

    ``market``, the compiled market side of these bids on these MTUs, saves its
    rebuild when the same bids are cleared against several linearisations.
    ``p_bounds`` (lower, upper; T x K) bound the area injections (the trust region of a
    sequential-LP round); ``include`` (one flag per bid) puts steps in the LP from the
    start whatever the quota (the steps of the point the trust region is centred on, so
    that it stays reachable). ``basis`` warm-starts the first LP (each column-generation
    round starts from the one before).
    """
    stats = SolveStats()
    if market is None:
        market = MarketLP(
            grid.mtus, grid.k, grid.dt_h, bids.reset_index(drop=True), resources_table
        )
        stats += SolveStats(build_s=market.build_s)
    elif len(market.quantity) != len(bids):
        raise LfmError("the market side was built for other bids")
    n_bids = len(market.quantity)
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
    rows: list[tuple[int, int]] = []
    while True:
        model = ClearingModel(
            grid, market, selected.copy(), penalty_eur_per_mwh, rows, p_bounds, basis
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
        improving = ~selected & (market.price < value - 1e-7)
        if not improving.any():
            break
        selected |= improving
    return replace(sol, stats=stats)


def require_optimal(sol: Solution, lp: str) -> Solution:
    """``sol`` when its LP was solved to optimality; else a SolverError naming ``lp``."""
    if sol.status is not SolveStatus.OPTIMAL:
        raise SolverError(f"{lp}: solver status {sol.status.value}")
    return sol
