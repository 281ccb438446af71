"""The clearing LP: one formulation for the nodal and the zonal market, as matrix blocks.

For the MTUs t to clear, market areas a (zones; one zone per bus is the nodal market)
and bid steps b::

    min   sum_b price_b dt x_b  +  sum_rows penalty_row dt s_row              (objective)
    s.t.  0 <= x_b <= q_b                                                  (bid variables)
          0 <= soc0_r - dt sum_{tau <= t} (x_up_r,tau / eta_r - eta_r x_down_r,tau) <= E_r
                                                                            (storage)
          (L0_lt + sum_a (SLp_lat p_at + SLq_lat q_at) - Lmax) / g_lt <= s_lt     (grid rows:
          (V0_mt + sum_a (SVp_mat p_at + SVq_mat q_at) - vmax) / g_mt <= s_mt      loading,
          (vmin - V0_mt - sum_a (SVp_mat p_at + SVq_mat q_at)) / g_mt <= s_mt      voltage)
          lo_at <= p_at <= hi_at                          (trust region of a sequential round)
    where p_at = sum_{b in a,t} sigma_b x_b and q_at = sum sigma_b tan_phi_b x_b

are the area injections, substituted into the rows: a grid row has a coefficient on
every bid step of its MTU. (Kept as free columns with one balance row per MTU and area,
they made the nodal LP of SimBench 1-MVLV-rural-all-0-sw, 8 MTUs, 174k columns by 84k
rows, take HiGHS 365 s.) The area prices are the duals of the grid rows (and of a trust
region row) summed over an area's coefficients: what a free MW injected there is worth.

sigma_b is +1 for up and -1 for down; S are the zonal sensitivity indices of each MTU
(the nodal sensitivities when every bus is a zone), from either representation of the
linear grid (``grid.linear``: dense arrays or adjoint rows, the same coefficients). g,
the row's largest |coefficient| on active power (``grid.linear.RowScales``), turns a
slack into the MW of the most effective flexibility that would remove it, so the
penalty is a price per MWh of unmet need. A slack above zero is unmet need and is
reported, never hidden. penalty_row is that penalty times the row's price factor on a row
the base case has beyond its limit (``RowScales.price_factor``: per MW of the offers at
the margin of removing it, not of its most effective area, which may offer nothing; at
most SLACK_PRICE_FACTOR_MAX, 1 where the offers fall short), and
NEW_VIOLATION_PENALTY_FACTOR times it on a row the base case has within it, the larger
of the two (``slack_prices``): the market buys flexibility to fix violations, not to
trade them for new ones. A step priced above the penalty is never bought (the one price
cap). Areas are only those with a bid in the MTU: an area without one cannot inject.

``build_clearing_lp`` lists the blocks; each ``define_*`` adds its columns, rows and
coefficients to an ``LpBuilder`` as numpy arrays, and HiGHS receives the whole matrix
in one call (``LpBuilder.highs``), or the grid rows that row generation adds later in
one ``addVars`` and one ``addRows`` (``LpBuilder.append_to``). How the LP is solved
(which grid rows, which bid steps, the sequential AC loop) is ``market.strategies``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property

import highspy
import numpy as np
import pandas as pd
import scipy.sparse as sp

from lfm_zonal.errors import LfmError
from lfm_zonal.grid.linear import LinearGrid, RowScales
from lfm_zonal.grid.violations import split_layout

INF = highspy.kHighsInf
#: Selected bid steps per (MTU, area) pair from which the area injections are columns of
#: their own (``wants_area_columns``). A grid row then has K coefficients instead of one per
#: step: zonal K = 64 on SimBench 1-MVLV-rural-all-0-sw has about 160 steps per pair.
AREA_COLUMNS_STEPS_PER_PAIR = 4
#: A grid row written over at least LONG_ROW_STEPS bid steps leaves out its
#: smallest terms while what they can do sums to at most ROW_LEAVE_OUT_SHARE of its
#: violation tolerance, and its limit is tightened by that (``leave_out_small_terms``):
#: every solution of the LP keeps the full linear row, and the LP is at most one tolerance
#: (0.01 pp, 1e-5 p.u.) more cautious, below what a violation is reported at. Far from a
#: bus, a nodal row on a big grid has thousands of steps that together move it by less:
#: on SimBench MV+LV (about 10,000 steps per MTU) a third of the nodal rows' coefficients
#: go, and the nodal market of case A takes 111 s instead of 145 s (HiGHS 26 s instead of
#: 49 s). Shorter rows cost the simplex little and stay whole, so the LPs of feeders up to
#: a thousand buses are exact. Ten tolerances left out two thirds, but moved the nodal
#: cost on CIGRE MV 5% above the AC OPF.
ROW_LEAVE_OUT_SHARE = 1.0
#: An MTU with at least this many selected bid steps has *long rows* when the area
#: injections are substituted: its rows are written through the feeder equivalents where
#: the grid has them (``define_feeder_columns``), and a row whose direct steps are still
#: this many leaves out its small terms (``leave_out_small_terms``).
LONG_ROW_STEPS = 5_000


#: A grid row that the base case has within its limit prices its slack this many times the
#: penalty of unmet need (``slack_prices``): a violation the market would create costs more
#: than any it removes (README, "A new violation costs more than an old one": the case of
#: SimBench MV+LV's zonal K = 16). A slack, not a hard row: the LP stays feasible where a
#: re-linearised or margin round's limit cannot be met.
NEW_VIOLATION_PENALTY_FACTOR = 100.0


def slack_prices(
    scales: RowScales, t: np.ndarray, r: np.ndarray, penalty_eur_per_mwh: float
) -> np.ndarray:
    """EUR per MW-equivalent and hour of the slacks of grid rows (t, r): the penalty of
    unmet need per MW of the offer at the margin of removing the row's violation
    (``RowScales.price_factor``), NEW_VIOLATION_PENALTY_FACTOR times the penalty on rows
    within their limits in the base case (``RowScales.within_at_base``), whichever is
    more."""
    factor = np.where(scales.within_at_base(t, r), NEW_VIOLATION_PENALTY_FACTOR, 1.0)
    return penalty_eur_per_mwh * np.maximum(factor, scales.price_factor(t, r))


class LpBuilder:
    """Columns, rows and coefficients of an LP, numbered from ``first_col``/``first_row`` (the
    size of the LP they will join)."""

    def __init__(self, first_col: int = 0, first_row: int = 0) -> None:
        self.first_col, self.first_row = first_col, first_row
        self.n_col, self.n_row = first_col, first_row
        self._cols: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._rows: list[tuple[np.ndarray, np.ndarray]] = []
        self._entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def columns(self, cost, lower, upper) -> np.ndarray:
        """Add columns (cost, bounds; +-inf allowed); their numbers."""
        cost = np.asarray(cost, float)
        n = len(cost)
        self._cols.append(
            (cost, np.broadcast_to(lower, n).astype(float), np.broadcast_to(upper, n).astype(float))
        )
        self.n_col += n
        return np.arange(self.n_col - n, self.n_col, dtype=np.int64)

    def rows(self, lower, upper) -> np.ndarray:
        """Add rows (bounds on the row's activity); their numbers."""
        lower = np.asarray(lower, float)
        n = len(lower)
        self._rows.append((lower, np.broadcast_to(upper, n).astype(float)))
        self.n_row += n
        return np.arange(self.n_row - n, self.n_row, dtype=np.int64)

    def coefficients(self, row, col, value) -> None:
        """Add matrix entries (row, column, value); repeated entries are summed."""
        self._entries.append(
            (np.asarray(row, np.int64), np.asarray(col, np.int64), np.asarray(value, float))
        )

    def set_cost(self, col: np.ndarray, cost: np.ndarray) -> None:
        """Cost of columns added to this builder."""
        offset = 0
        for c, _, _ in self._cols:
            at = (col >= self.first_col + offset) & (col < self.first_col + offset + len(c))
            c[col[at] - self.first_col - offset] = np.asarray(cost, float)[at]
            offset += len(c)

    def _arrays(self):
        def cat(parts, i):
            return np.concatenate([p[i] for p in parts]) if parts else np.zeros(0)

        cols = [cat(self._cols, i) for i in range(3)]
        rows = [cat(self._rows, i) for i in range(2)]
        r, c, v = (cat(self._entries, i) for i in range(3))
        shape = (self.n_row - self.first_row, self.n_col)
        A = sp.csr_matrix((v, (r.astype(np.int64) - self.first_row, c.astype(np.int64))), shape)
        A.sum_duplicates()
        A.eliminate_zeros()
        return [np.clip(x, -INF, INF) for x in cols], [np.clip(x, -INF, INF) for x in rows], A

    def highs(self) -> highspy.Highs:
        """A new HiGHS instance holding the LP (one ``passModel``); its bounds are kept as
        ``col_bounds`` and ``row_bounds`` (the basis statuses are read from them)."""
        (cost, lower, upper), (row_lower, row_upper), A = self._arrays()
        self.col_bounds, self.row_bounds = (lower, upper), (row_lower, row_upper)
        A = A.tocsc()
        highs = highspy.Highs()
        highs.setOptionValue("output_flag", False)
        # Presolve found little to remove in these LPs (dense grid rows over the bid steps)
        # and cost 5x the simplex: a nodal LP of one MTU on SimBench MV+LV (11.5k columns,
        # 5.4k rows, 2.6M nonzeros) solved in 1.6 s with it, in 0.26 s without.
        highs.setOptionValue("presolve", "off")
        # The arrays as they are (HighsLp's attributes copy element by element: 2.5x slower).
        status = highs.passModel(
            self.n_col,
            self.n_row,
            A.nnz,
            int(highspy.MatrixFormat.kColwise),
            int(highspy.ObjSense.kMinimize),
            0.0,
            cost,
            lower,
            upper,
            row_lower,
            row_upper,
            A.indptr.astype(np.int32),
            A.indices.astype(np.int32),
            A.data,
            np.zeros(self.n_col, np.int32),  # continuous
        )
        if status == highspy.HighsStatus.kError:
            raise LfmError("HiGHS refused the clearing LP")
        return highs

    def append_to(self, highs: highspy.Highs) -> None:
        """Add the columns, then the rows (with their entries), to a running HiGHS instance."""
        if highs.getNumCol() != self.first_col or highs.getNumRow() != self.first_row:
            raise LfmError("the LP changed since these blocks were numbered")
        (cost, lower, upper), (row_lower, row_upper), A = self._arrays()
        n_new = self.n_col - self.first_col
        if n_new:
            highs.addVars(n_new, lower, upper)
            new = np.arange(self.first_col, self.n_col, dtype=np.int32)
            highs.changeColsCost(n_new, new, cost)
        if len(row_lower):
            highs.addRows(
                len(row_lower),
                row_lower,
                row_upper,
                A.nnz,
                A.indptr[:-1].astype(np.int32),
                A.indices.astype(np.int32),
                A.data,
            )


class MarketBids:
    """The bid steps of one market on the MTUs it clears, as arrays (its LP's market side).

    It depends on the bids and the MTUs only, not on the linearisation: a market makes it
    once, and every LP it solves (sequential AC rounds, column generation) takes its blocks
    from it.
    """

    def __init__(
        self,
        mtus: np.ndarray,
        k: int,
        dt_h: float,
        bids: pd.DataFrame,
        resources_table: pd.DataFrame | None = None,
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
        self.floor = np.zeros(len(self.quantity))  # the least MW taken (``held``)
        self.price = bids.price_eur_per_mwh.to_numpy(float)
        self.resource = bids.resource_id.to_numpy()
        self.storage = self._storage_chains(resources_table)
        self._index_pairs()

    def _index_pairs(self) -> None:
        # The (MTU, area) pairs with a bid: each has an injection and a balance.
        key = self.t_of_bid * self.k + self.area_of_bid
        self.pair_key, self.pair_of_bid = np.unique(key, return_inverse=True)
        self.pair_of_bid = self.pair_of_bid.ravel()

    def blocks(self, max_steps: int) -> list[np.ndarray]:
        """The MTU positions of LP blocks that can be solved apart: the MTUs a storage
        resource links (its state of charge) form one block; the others are taken in order,
        an MTU joining the block before it while that holds at most ``max_steps`` bid steps."""
        T = len(self.mtus)
        linked = np.zeros(T, bool)
        for _, t, *_ in self.storage:
            linked[t] = True
        steps = np.bincount(self.t_of_bid, minlength=T)
        blocks, current, size = [], [], 0
        for t in np.flatnonzero(~linked):
            if current and size + steps[t] > max_steps:
                blocks.append(np.array(current, np.int64))
                current, size = [], 0
            current.append(t)
            size += steps[t]
        if current:
            blocks.append(np.array(current, np.int64))
        if linked.any():
            blocks.append(np.flatnonzero(linked))
        return sorted(blocks, key=lambda b: b[0])

    def restricted(self, mtu_positions: np.ndarray) -> tuple[MarketBids, np.ndarray]:
        """The bids of the MTUs at ``mtu_positions`` (a block: every storage resource's MTUs
        in it or none), and the positions of those bids among these."""
        keep = np.zeros(len(self.mtus), bool)
        keep[mtu_positions] = True
        bid = np.flatnonzero(keep[self.t_of_bid])
        new_t = np.cumsum(keep) - 1
        new_bid = np.full(len(self), -1, np.int64)
        new_bid[bid] = np.arange(len(bid))
        out = object.__new__(MarketBids)
        out.mtus, out.k, out.dt_h = self.mtus[keep], self.k, self.dt_h
        out.t_of_bid = new_t[self.t_of_bid[bid]]
        for name in ("area_of_bid", "sign", "tan_phi", "quantity", "floor", "price", "resource"):
            setattr(out, name, getattr(self, name)[bid])
        out.storage = []
        for idx, t, energy, soc0, capacity in self.storage:
            if keep[t].any() != keep[t].all():
                raise LfmError("a storage resource's MTUs were split between LP blocks")
            if keep[t].all():
                out.storage.append((new_bid[idx], new_t[t], energy, soc0, capacity))
        out._index_pairs()
        return out, bid

    def held(self, bids: np.ndarray, accepted_mw: np.ndarray) -> MarketBids:
        """The same market with ``bids`` (a flag per bid) fixed at ``accepted_mw``."""
        out = copy.copy(self)
        out.quantity = np.where(bids, accepted_mw, self.quantity)
        out.floor = np.where(bids, accepted_mw, self.floor)
        return out

    def capacity_mw(self, price_cap_eur_per_mwh: float) -> np.ndarray:
        """MTU x area x (up, down): the MW offered at or below the price cap (the steps
        an LP can take: ``RowScales``)."""
        out = np.zeros((len(self.mtus), self.k, 2))
        taken = self.price <= price_cap_eur_per_mwh
        at = (self.t_of_bid[taken], self.area_of_bid[taken], (self.sign[taken] < 0).astype(int))
        np.add.at(out, at, self.quantity[taken])
        return out

    def __len__(self) -> int:
        return len(self.quantity)

    def t_index(self, mtus: np.ndarray) -> np.ndarray:
        """Position of each MTU in the cleared set."""
        return pd.Series(np.arange(len(self.mtus)), index=self.mtus).reindex(mtus).to_numpy()

    @cached_property
    def pair_t(self) -> np.ndarray:
        return self.pair_key // self.k

    @cached_property
    def pair_area(self) -> np.ndarray:
        return self.pair_key % self.k

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


@dataclass(frozen=True)
class GridRows:
    """Grid rows in an LP: their (t, r), row and slack numbers and their scaled coefficients
    on the area injections (rows x K; q all zero without reactive bids)."""

    rows: np.ndarray  # (n, 2) MTU position and row of the violation layout
    row: np.ndarray
    slack_col: np.ndarray
    cp: np.ndarray
    cq: np.ndarray

    @staticmethod
    def none(k: int) -> GridRows:
        empty = np.zeros(0, np.int64)
        return GridRows(empty.reshape(0, 2), empty, empty, np.zeros((0, k)), np.zeros((0, k)))

    @staticmethod
    def joined(parts: list[GridRows]) -> GridRows:
        """The rows of ``parts`` in order, as one (joined once: a generation round only adds a
        part, where joining every round copied the nodal coefficients quadratically)."""
        if len(parts) == 1:
            return parts[0]
        return GridRows(*(np.concatenate([getattr(p, f) for p in parts]) for f in _GRID_ROW_FIELDS))


_GRID_ROW_FIELDS = ("rows", "row", "slack_col", "cp", "cq")


@dataclass(frozen=True)
class ClearingLp:
    """A built clearing LP and where its blocks sit."""

    builder: LpBuilder
    x_col: np.ndarray  # per bid (-1: step not in this LP)
    storage_rows: np.ndarray
    trust_rows: np.ndarray  # per (MTU, area) pair with a bid (-1: unbounded or area columns)
    areas: AreaColumns | None  # the area injections as columns (None: substituted)
    feeders: FeederColumns | None  # the feeder equivalents of long-row MTUs (None: none)
    grid: GridRows


@dataclass(frozen=True)
class AreaColumns:
    """The area injections as columns of their own, one per (MTU, area) pair with a bid
    (``bids.pair_key``), each tied to its steps by a balance row: p_at - sum sigma_b x_b = 0
    (and q_at with tan_phi, where a step has one)."""

    p_col: np.ndarray
    p_row: np.ndarray
    q_col: np.ndarray | None
    q_row: np.ndarray | None


@dataclass(frozen=True)
class FeederColumns:
    """The feeder equivalents of an LP's long-row MTUs as columns (``grid.feeders``): per
    (MTU, feeder) with a selected step, P_eq where the boundary is not a slack and Q_eq
    where it is a PQ bus (a slack boundary's feeder moves no row outside it), each
    tied to the feeder's steps by one row: P_eq - sum_b sigma_b (dP_eq/dp_a + tan_phi_b
    dP_eq/dq_a) x_b = 0. A grid row outside a feeder reads these two columns with its own
    coefficients on P and Q at the feeder's boundary, instead of one term per step."""

    long: np.ndarray  # (T,) the MTUs whose rows are written through the feeders
    p_col: np.ndarray  # (T, feeders): column of P_eq (-1: none)
    q_col: np.ndarray  # (T, feeders): column of Q_eq (-1: none)
    cols: np.ndarray  # every one of them (basic in a warm start)
    rows: np.ndarray  # their tie rows (nonbasic in a warm start)


def define_feeder_columns(
    lp: LpBuilder, grid: LinearGrid, bids: MarketBids, x_col: np.ndarray
) -> FeederColumns | None:
    """P_eq and Q_eq with their tie rows for every long-row MTU (at least LONG_ROW_STEPS
    selected steps) and feeder with a selected step there; None without any."""
    feeders = grid.rows.feeders
    if feeders is None:
        return None
    T = len(grid.mtus)
    selected = x_col >= 0
    long = np.bincount(bids.t_of_bid[selected], minlength=T) >= LONG_ROW_STEPS
    equivalents = {int(tt): grid.rows.equivalents(tt) for tt in np.flatnonzero(long)}
    for tt, eq_t in equivalents.items():
        long[tt] = eq_t is not None  # a singular feeder block: that MTU step by step
    b = np.flatnonzero(selected & long[bids.t_of_bid])
    f = feeders.of_area[bids.area_of_bid[b]]
    b, f = b[f >= 0], f[f >= 0]
    if len(b) == 0:
        return None
    t = bids.t_of_bid[b]
    n_f = len(feeders)
    cols, rows = [], []
    p_col, q_col = np.full((T, n_f), -1, np.int64), np.full((T, n_f), -1, np.int64)
    pair, at = np.unique(t * n_f + f, return_inverse=True)
    pt, pf = pair // n_f, pair % n_f
    eq = np.zeros((4, len(b)))  # dP_eq/dp, dP_eq/dq, dQ_eq/dp, dQ_eq/dq of each step's area
    for tt in np.unique(pt):
        i = t == tt
        eq[:, i] = equivalents[int(tt)][:, bids.area_of_bid[b[i]]]
    for out, has, dp, dq in (
        (p_col, feeders.has_p, eq[0], eq[1]),
        (q_col, feeders.has_q, eq[2], eq[3]),
    ):
        with_it = has[pf]
        n = int(with_it.sum())
        col, row = lp.columns(np.zeros(n), -INF, INF), lp.rows(np.zeros(n), 0.0)
        lp.coefficients(row, col, np.ones(n))
        out[pt[with_it], pf[with_it]] = col
        number = np.full(len(pair), -1, np.int64)
        number[with_it] = row
        on = with_it[at]
        lp.coefficients(
            number[at[on]],
            x_col[b[on]],
            -bids.sign[b[on]] * (dp[on] + bids.tan_phi[b[on]] * dq[on]),
        )
        cols.append(col)
        rows.append(row)
    return FeederColumns(long, p_col, q_col, np.concatenate(cols), np.concatenate(rows))


def wants_area_columns(bids: MarketBids, selected: np.ndarray) -> bool:
    """Whether the area injections should be columns of their own: where the selected steps
    are at least AREA_COLUMNS_STEPS_PER_PAIR per (MTU, area) pair, a grid row is sparser on
    the areas than on the steps (a zonal market); one step or two per pair (the nodal
    market): substituted, without the balance rows."""
    pairs = np.count_nonzero(np.bincount(bids.pair_of_bid[selected], minlength=1))
    return int(selected.sum()) >= AREA_COLUMNS_STEPS_PER_PAIR * max(pairs, 1)


def define_bid_variables(lp: LpBuilder, bids: MarketBids, selected: np.ndarray) -> np.ndarray:
    """floor_b <= x_b <= q_b for the selected steps (floor 0 but where ``MarketBids.held``;
    an infinite quantity is an unbounded bid); the column of each bid, -1 where it is left
    out."""
    x_col = np.full(len(bids), -1, np.int64)
    x_col[selected] = lp.columns(
        np.zeros(int(selected.sum())), bids.floor[selected], bids.quantity[selected]
    )
    return x_col


def define_area_columns(
    lp: LpBuilder,
    bids: MarketBids,
    x_col: np.ndarray,
    p_bounds: tuple[np.ndarray, np.ndarray] | None,
) -> AreaColumns:
    """p_at (within the trust region ``p_bounds``, T x K, as its bounds) and q_at (where a
    step has a tan_phi), each with its balance row, for every (MTU, area) pair with a bid."""
    n = len(bids.pair_key)
    selected = x_col >= 0

    def balance(coef: np.ndarray, lower, upper) -> tuple[np.ndarray, np.ndarray]:
        col = lp.columns(np.zeros(n), lower, upper)
        row = lp.rows(np.zeros(n), 0.0)
        lp.coefficients(row, col, np.ones(n))
        lp.coefficients(row[bids.pair_of_bid[selected]], x_col[selected], -coef[selected])
        return col, row

    lower, upper = _pair_bounds(bids, p_bounds)
    p_col, p_row = balance(bids.sign, lower, upper)
    if not np.any(bids.tan_phi[selected] != 0):
        return AreaColumns(p_col, p_row, None, None)
    q_col, q_row = balance(bids.sign * bids.tan_phi, -INF, INF)
    return AreaColumns(p_col, p_row, q_col, q_row)


def _pair_bounds(bids: MarketBids, p_bounds) -> tuple[np.ndarray, np.ndarray]:
    """The trust region's bounds of every (MTU, area) pair with a bid (+-inf: none)."""
    if p_bounds is None:
        n = len(bids.pair_key)
        return np.full(n, -INF), np.full(n, INF)
    return tuple(np.asarray(b, float)[bids.pair_t, bids.pair_area] for b in p_bounds)


def define_trust_region(
    lp: LpBuilder,
    bids: MarketBids,
    x_col: np.ndarray,
    p_bounds: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """lo_at <= sum sigma_b x_b <= hi_at for every (MTU, area) pair with a bid and a finite
    bound (``p_bounds``: lower and upper, T x K); the row of each pair, -1 where unbounded."""
    trust = np.full(len(bids.pair_key), -1, np.int64)
    if p_bounds is None:
        return trust
    lower, upper = _pair_bounds(bids, p_bounds)
    bounded = np.isfinite(lower) | np.isfinite(upper)
    trust[bounded] = lp.rows(lower[bounded], upper[bounded])
    selected = x_col >= 0
    b = np.flatnonzero(selected & bounded[bids.pair_of_bid])
    lp.coefficients(trust[bids.pair_of_bid[b]], x_col[b], bids.sign[b])
    return trust


def define_storage(lp: LpBuilder, bids: MarketBids, x_col: np.ndarray) -> np.ndarray:
    """soc0 - E <= energy delivered up to t <= soc0 after every MTU with a storage bid."""
    rows = []
    for idx, t, energy, soc0, capacity in bids.storage:
        times = np.unique(t)
        row = lp.rows(np.full(len(times), soc0 - capacity), soc0)
        upto = t[None, :] <= times[:, None]  # MTUs x the resource's bids
        r, b = np.nonzero(upto & (x_col[idx] >= 0)[None, :])
        lp.coefficients(row[r], x_col[idx[b]], energy[b])
        rows.append(row)
    return np.concatenate(rows) if rows else np.zeros(0, np.int64)


def define_objective(lp: LpBuilder, bids: MarketBids, x_col: np.ndarray) -> None:
    """Pay-as-bid cost of the accepted steps (the grid rows' slacks add their penalty)."""
    selected = x_col >= 0
    lp.set_cost(x_col[selected], bids.price[selected] * bids.dt_h)


def leave_out_small_terms(
    coef: np.ndarray, quantity: np.ndarray, budget: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``coef`` (rows x bid steps, each step between 0 and its ``quantity``) without
    their smallest terms, and what the left-out terms can do at worst (rows x 2: the most
    they can add, the most they can take away; to tighten an upper and a lower limit).

    A row leaves out its terms of least reach (|coefficient| x quantity) while the reaches
    left out sum to at most its ``budget``; an unbounded step is never left out. A row
    with the limit tightened by that worst case holds for every solution that keeps the
    shortened row: the LP stays on the safe side of the full one, by at most ``budget``.
    """
    bounded = np.isfinite(quantity)
    mw = np.where(bounded, quantity, 0.0)  # an unbounded step's reach: set below
    reach = np.abs(coef) * mw
    if not bounded.all():  # an unbounded step reaches without bound, unless its coefficient is 0
        reach[:, ~bounded] = np.where(coef[:, ~bounded] != 0.0, np.inf, 0.0)
    # Ordered in single precision (twice as fast as double; a nodal row of SimBench MV+LV has
    # 10,000 terms) and compared in it, within a budget shrunk by more than its rounding:
    # what is left out still sums to at most the budget.
    single = reach.astype(np.float32)
    ordered = np.sort(single, axis=1)
    shrunk = (1.0 - 1e-6) * budget[:, None]
    prefix = int((ordered <= shrunk).sum(axis=1).max(initial=0))  # only these can fit
    fits = (np.cumsum(ordered[:, :prefix].astype(np.float64), axis=1) <= shrunk).sum(axis=1)
    # Left out: the reaches below the first one that does not fit (ties stay in).
    first_kept = np.append(ordered, np.full((len(coef), 1), np.inf, np.float32), axis=1)[
        np.arange(len(coef)), fits
    ]
    out = single < first_kept[:, None]
    worst = coef * mw * out
    most = np.clip(worst, 0.0, None).sum(axis=1)
    towards = np.stack([most, worst.sum(axis=1) - most], axis=1)
    return coef * ~out, towards


def define_grid_rows(
    lp: LpBuilder,
    grid: LinearGrid,
    scales: RowScales,
    bids: MarketBids,
    x_col: np.ndarray,
    rows: np.ndarray,
    penalty_eur_per_mwh: float,
    areas: AreaColumns | None,
    feeders: FeederColumns | None = None,
) -> GridRows:
    """Grid rows (t, r) of the violation layout, each with its penalised slack column
    (``slack_prices``).

    Row (t, r) (loading, then upper, then lower voltage limits) reads
    ``sum_a cp_a p_ta + cq_a q_ta - sense s <= or >= rhs`` on the area columns, or (``areas``
    None) with the area injections written out over the MTU's selected bid steps (in a
    long-row MTU, the steps of a feeder the row is outside of through the feeder's
    equivalents, ``feeders``; over LONG_ROW_STEPS steps or more, less the terms
    ``leave_out_small_terms`` leaves out and with the limit tightened by what they can
    do), every coefficient divided by the row's scale g so that its slack s is
    MW-equivalent."""
    n = len(rows)
    if n == 0:
        return GridRows.none(grid.k)
    t, r = rows[:, 0], rows[:, 1]
    is_line, upper, at = split_layout(r, len(grid.branches), len(grid.buses))
    cp, cq = grid.rows.coefficients(t, r)
    scales.learn(grid.rows, t, r, cp, cq)
    base = np.empty(n)
    base[is_line] = grid.loading0[t[is_line], at[is_line]]
    base[~is_line] = grid.vm0[t[~is_line], at[~is_line]]
    limit = np.where(
        is_line, grid.loading_max_percent, np.where(upper, grid.vm_max_pu, grid.vm_min_pu)
    )
    g = scales.of(t, r)
    cp, cq = cp / g[:, None], cq / g[:, None]
    rhs, sense = (limit - base) / g, np.where(upper, 1.0, -1.0)
    slack = lp.columns(slack_prices(scales, t, r, penalty_eur_per_mwh) * grid.dt_h, 0.0, INF)
    if areas is None:  # each row on the selected steps of its MTU
        budget = ROW_LEAVE_OUT_SHARE * grid.row_tolerances()[r] / g
        selected = np.flatnonzero(x_col >= 0)
        by_mtu = selected[np.argsort(bids.t_of_bid[selected], kind="stable")]
        starts = np.searchsorted(bids.t_of_bid[by_mtu], np.arange(len(grid.mtus) + 1))
        terms = []
        for tt in np.unique(t):
            i = np.flatnonzero(t == tt)
            b = by_mtu[starts[tt] : starts[tt + 1]]
            direct, equivalent = [(i, b)], []
            if feeders is not None and feeders.long[tt]:
                direct, equivalent = _through_feeders(grid, bids, feeders, tt, i, r, b, cp, cq)
            for ii, bb in direct:
                terms.append(_direct(bids, x_col, ii, bb, cp, cq, budget, upper, rhs))
            terms += equivalent
    row = lp.rows(np.where(sense > 0, -INF, rhs), np.where(sense > 0, rhs, INF))
    lp.coefficients(row, slack, -sense)
    if areas is not None:  # each row on the area columns of its MTU: cp_a, cq_a
        pair = np.flatnonzero(np.isin(bids.pair_t, t))
        pt, pa = bids.pair_t[pair], bids.pair_area[pair]
        for tt in np.unique(t):
            i, j = np.flatnonzero(t == tt), pair[pt == tt]
            a = pa[pt == tt]
            for col, c in ((areas.p_col, cp), (areas.q_col, cq)):
                if col is not None:
                    ii, jj = np.nonzero(c[np.ix_(i, a)])
                    lp.coefficients(row[i[ii]], col[j[jj]], c[i[ii], a[jj]])
        return GridRows(rows, row, slack, cp, cq)
    for i, col, coef in terms:  # sigma_b (cp_a + tan_phi_b cq_a) on the MTU's steps b
        lp.coefficients(row[i], col, coef)
    return GridRows(rows, row, slack, cp, cq)


def _direct(bids, x_col, i, b, cp, cq, budget, upper, rhs) -> tuple:
    """Rows i on steps b of one MTU, term by term: sigma_b (cp_a + tan_phi_b cq_a); a row
    over at least LONG_ROW_STEPS steps less the terms ``leave_out_small_terms`` leaves out,
    its limit in ``rhs`` tightened by what they can do."""
    a = bids.area_of_bid[b]
    coef = bids.sign[b] * (cp[np.ix_(i, a)] + bids.tan_phi[b] * cq[np.ix_(i, a)])
    if len(b) >= LONG_ROW_STEPS:
        coef, towards = leave_out_small_terms(coef, bids.quantity[b], budget[i])
        rhs[i] -= np.where(upper[i], towards[:, 0], towards[:, 1])
    ii, jj = np.nonzero(coef)
    return i[ii], x_col[b[jj]], coef[ii, jj]


def _through_feeders(grid, bids, feeders, tt, i, r, b, cp, cq) -> tuple[list, list]:
    """Rows i of MTU tt on its steps b through the feeders: each row on the steps of its own
    feeder (if any) and of no feeder, as (rows, steps) for ``_direct``, and on the
    P_eq and Q_eq of every other feeder (its coefficients on P and Q at that feeder's
    boundary), as (rows, columns, coefficients)."""
    af = grid.rows.feeders
    fa, fr = af.of_area[bids.area_of_bid[b]], af.of_row[r[i]]
    direct = []
    for f in np.unique(fr):  # rows outside every feeder (-1), then each feeder's own rows
        rows, steps = fr == f, (fa < 0) | (fa == f)
        direct.append((i[rows], b[steps]))
    equivalent = []
    for col, c in ((feeders.p_col[tt], cp), (feeders.q_col[tt], cq)):
        has = np.flatnonzero(col >= 0)
        coef = c[np.ix_(i, af.boundary_area[has])]
        coef[fr[:, None] == has[None, :]] = 0.0  # a row inside a feeder: its steps direct
        m, n = np.nonzero(coef)
        equivalent.append((i[m], col[has[n]], coef[m, n]))
    return direct, equivalent


def build_clearing_lp(
    grid: LinearGrid,
    scales: RowScales,
    bids: MarketBids,
    selected: np.ndarray,
    grid_rows: np.ndarray,
    penalty_eur_per_mwh: float,
    p_bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> ClearingLp:
    """The clearing LP of the ``selected`` bid steps against ``grid_rows`` ((t, r) pairs),
    within the trust region ``p_bounds`` (lower, upper area injections, T x K; None: none)."""
    if not np.array_equal(grid.mtus, bids.mtus) or grid.k != bids.k:
        raise LfmError("the bids were made for other MTUs or areas than the grid")
    lp = LpBuilder()
    x_col = define_bid_variables(lp, bids, selected)
    storage = define_storage(lp, bids, x_col)
    if wants_area_columns(bids, selected):
        areas = define_area_columns(lp, bids, x_col, p_bounds)
        trust = np.full(len(bids.pair_key), -1, np.int64)
    else:
        areas, trust = None, define_trust_region(lp, bids, x_col, p_bounds)
    feeders = None if areas is not None else define_feeder_columns(lp, grid, bids, x_col)
    define_objective(lp, bids, x_col)
    rows = define_grid_rows(
        lp, grid, scales, bids, x_col, grid_rows, penalty_eur_per_mwh, areas, feeders
    )
    return ClearingLp(lp, x_col, storage, trust, areas, feeders, rows)
