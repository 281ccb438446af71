"""The linearised grid of the MTUs to clear, seen through K market areas.

Per MTU t, element row r and area a: the base-point loading and voltage and their
sensitivities to an area's active and reactive injection (the Jacobian sensitivities of
the nodal model, spread over each area's buses by its weights W). The clearing LP takes
its grid rows from here; a sequential LP re-linearises at the AC point of its last round.

Rows are numbered in the *violation layout*: the monitored branches (loading), then every
bus's upper voltage limit, then every bus's lower one (``grid.violations``).

The sensitivities have two representations with the same values:

``DenseRows``
    Arrays (MTU x rows x areas) of every row's coefficients on every area, from K solves
    per MTU. For a few areas (zones): every coefficient at hand, memory MTUs x (branches +
    buses) x K.
``AdjointRows``
    Per MTU the sparse factorised Jacobian J, the sparse derivatives of loading and
    voltage with respect to the state [dtheta; dV], and W. A row's coefficients on the
    areas are computed when the LP asks for that row, by one transposed solve
    (w = J^-T d row / dx, coefficients = W^T E^T w), or, for a few areas once an MTU's
    rows asked for cost as much as its 2K state columns (STATE_COLUMN_COST_IN_ROWS rows
    each), from the state's sensitivity to every area
    (``StateSensitivities``: J^-1 E W, kept for the last MTUs); the linearised state of
    every row after area injections p is one solve per MTU (J dx = E W p). Memory grows
    with the branches and MTUs, not with buses x areas: the nodal market and large K.

``linear_grid`` picks the dense arrays where they fit in DENSE_ROWS_MAX_BYTES, else the
adjoint rows (``representation`` forces one; a test checks that both clear alike).

Holding the linearised power flow itself as LP rows (J dx = E W p per MTU, loading rows
sparse in dx) was measured and left: on SimBench 1-MVLV-rural-all-0-sw (72 violated MTUs,
790,000 state rows) HiGHS's dual simplex stopped without a status on a single MTU and its
interior point took 0.7 s per MTU, growing faster than the MTUs; the same LP with the
screened rows as dense adjoint rows (1,007 rows) solved in 11 s on a loaded machine.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lfm_zonal.errors import InputError
from lfm_zonal.grid.feeders import AreaFeeders, area_feeders
from lfm_zonal.grid.powerflow import HorizonPowerFlow
from lfm_zonal.grid.sensitivity import (
    JacobianLinearisation,
    LinearisationCache,
    linearisation,
    one_blas_thread,
    sensitivity_arrays,
)
from lfm_zonal.grid.violations import (
    VIOLATION_TOLERANCE_LOADING_PERCENT,
    VIOLATION_TOLERANCE_VM_PU,
    beyond_limits,
    split_layout,
)
from lfm_zonal.limits import require_memory

#: Representations of the grid rows (``linear_grid``'s ``representation``).
REPRESENTATIONS = ("auto", "dense", "adjoint")
#: The dense arrays (P and Q coefficients of every branch and bus on every area: 2 x MTUs
#: x (branches + buses) x K floats) are used up to this size; beyond it the adjoint rows.
#: SimBench MV+LV (5,479 buses), 72 MTUs, K = 16: 203 MB, dense (its zonal market 18.0 s at
#: 1.66 GB peak RSS, adjoint 27.3 s at 2.23 GB: the adjoint rows hold every MTU's LU);
#: K = 64: 812 MB, adjoint.
DENSE_ROWS_MAX_BYTES = 256 * 2**20
#: Rows whose coefficients one transposed solve computes at a time (bounds its memory:
#: states x rows).
ADJOINT_CHUNK_ROWS = 256
#: Up to this many areas, adjoint rows take an MTU's coefficients from the state's
#: sensitivity to every area (one solve of 2K right-hand sides per linearisation, kept in
#: ``StateSensitivities``) instead of one transposed solve per row: a zonal LP asks for
#: far more than 2K rows of an MTU over its generation rounds and its scales. The nodal
#: market (K = buses) stays with the transposed solves.
FORWARD_MAX_AREAS = 128
#: What one right-hand side of a state sensitivity costs in rows' transposed solves: the
#: rows go blockwise through SuperLU (``TransposedFactor``), the state's columns one at a
#: time. On SimBench 1-MVLV-rural-all-0-sw 0.37-0.40 ms a column against 0.17-0.27 ms a
#: row in batches of 4-64; its zonal market at K = 64 (72 MTUs): rows and state
#: sensitivities 6.2 s, against 7.2 s switching at 2K rows.
STATE_COLUMN_COST_IN_ROWS = 2
#: Bytes of state sensitivities an AdjointRows keeps (the last MTUs' linearisations).
FORWARD_CACHE_BYTES = 64 * 2**20
#: Bytes of row coefficients an AdjointRows keeps (``KnownRows``), up to FORWARD_MAX_AREAS
#: areas. SimBench 1-MVLV-rural-all-0-sw, 96 MTUs: its zonal market at K = 64 asks for
#: 31,750 rows, 14,669 of them distinct (15 MB of coefficients). Its nodal market asks
#: for 24,151, 17,410 distinct, of 88 kB each (1.5 GB): not kept.
KNOWN_ROWS_BYTES = 128 * 2**20


class GridRows(Protocol):
    """The sensitivities of a linear grid's rows to the area injections (one representation)."""

    @property
    def k(self) -> int: ...

    #: True where every row's coefficients are at hand (the screen ranks rows by them).
    dense: bool
    #: The feeders by area (``grid.feeders.AreaFeeders``) whose equivalents ``equivalents``
    #: gives per MTU, or None.
    feeders: AreaFeeders | None

    def delta(self, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Change of loading (T x branches) and voltage (T x buses) after area injections p,
        q (T x K)."""

    def coefficients(self, t: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coefficients of rows (t, r) of the violation layout on p and q (rows x K)."""

    def select(self, keep: np.ndarray) -> GridRows:
        """The rows of the MTUs where ``keep``."""


@dataclass(frozen=True)
class DenseRows:
    """Every row's coefficients on every area, per MTU."""

    sl_p: np.ndarray  # (T, n_branch, K) loading_percent per MW
    sl_q: np.ndarray
    sv_p: np.ndarray  # (T, n_bus, K) p.u. per MW
    sv_q: np.ndarray
    dense = True
    feeders = None  # every coefficient is at hand: no feeder equivalents

    @property
    def k(self) -> int:
        return self.sl_p.shape[2]

    def delta(self, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loading = np.einsum("tlk,tk->tl", self.sl_p, p) + np.einsum("tlk,tk->tl", self.sl_q, q)
        vm = np.einsum("tmk,tk->tm", self.sv_p, p) + np.einsum("tmk,tk->tm", self.sv_q, q)
        return loading, vm

    def coefficients(self, t: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        is_line, _, at = split_layout(r, self.sl_p.shape[1], self.sv_p.shape[1])
        line, bus = at[is_line], at[~is_line]
        cp, cq = np.empty((len(t), self.k)), np.empty((len(t), self.k))
        cp[is_line], cq[is_line] = self.sl_p[t[is_line], line], self.sl_q[t[is_line], line]
        cp[~is_line], cq[~is_line] = self.sv_p[t[~is_line], bus], self.sv_q[t[~is_line], bus]
        return cp, cq

    def select(self, keep: np.ndarray) -> DenseRows:
        return DenseRows(self.sl_p[keep], self.sl_q[keep], self.sv_p[keep], self.sv_q[keep])

    def all_scales(self) -> np.ndarray:
        """``row_scale`` of every row (T x rows of the violation layout)."""
        sv = row_scale(self.sv_p, self.sv_q)
        return np.concatenate([row_scale(self.sl_p, self.sl_q), sv, sv], axis=1)


class _PerLinearisation:
    """What a grid's rows keep per linearisation object, least recently used first, within
    ``budget_bytes``. Keyed by the object's id; each entry (a list) holds the object first,
    so that its id is not reused while the entry is kept."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._by_id: OrderedDict[int, list] = OrderedDict()
        self._bytes = 0  # of the kept entries (``_entry_bytes``)

    @staticmethod
    def _entry_bytes(entry: list) -> int:
        raise NotImplementedError

    def _entry(self, lin: JacobianLinearisation, new=None) -> list | None:
        """``lin``'s entry, now the most recently used; None if there is none, or (``new``
        given) ``new()`` kept as its entry. An entry of an earlier object under the same id
        is dropped, its bytes given back."""
        key = id(lin)
        entry = self._by_id.get(key)
        if entry is not None and entry[0] is not lin:
            self._bytes -= self._entry_bytes(self._by_id.pop(key))
            entry = None
        if entry is None:
            if new is None:
                return None
            entry = self._by_id[key] = new()
        self._by_id.move_to_end(key)
        return entry

    def _drop_beyond_budget(self) -> None:
        """Drop the least recently used entries that hold bytes (never the newest) until
        the kept ones are within the budget."""
        for key in list(self._by_id):
            if self._bytes <= self.budget_bytes:
                return
            nbytes = self._entry_bytes(self._by_id[key])
            if nbytes and key != next(reversed(self._by_id)):
                self._bytes -= nbytes
                del self._by_id[key]


class StateSensitivities(_PerLinearisation):
    """dx per area injection (states x 2K, ``JacobianLinearisation.state_sensitivity``) of
    the linearisations whose rows are asked for most, up to ``budget_bytes``.

    A linearisation's state sensitivity costs one solve of 2K right-hand sides, its rows
    one right-hand side each by transposed solves, each about half a state's column
    (STATE_COLUMN_COST_IN_ROWS). Which pays depends on how many rows will be asked for,
    so rows are solved apart until they cost as much as the state sensitivity; then it
    is made and kept (at most twice the work of the better choice made in hindsight).
    The least recently used are dropped beyond the budget, and their count starts again.
    """

    # entry: [lin, its state sensitivity or None, rows asked for while None]

    def __init__(self, budget_bytes: int = FORWARD_CACHE_BYTES) -> None:
        super().__init__(budget_bytes)

    @staticmethod
    def _entry_bytes(entry: list) -> int:
        return 0 if entry[1] is None else entry[1].nbytes

    def kept(self, lin: JacobianLinearisation) -> np.ndarray | None:
        """The state sensitivity of ``lin`` if it is kept, else None."""
        entry = self._entry(lin)
        return None if entry is None else entry[1]

    def rows(
        self, lin: JacobianLinearisation, W: sp.csr_matrix, branches: np.ndarray, buses: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The coefficients of rows (the loading of ``branches``, then the vm of ``buses``)
        on the areas' P and Q (``rows_sensitivity`` with the patterns W)."""
        K = W.shape[1]
        entry = self._entry(lin, lambda: [lin, None, 0])
        dx = entry[1]
        if dx is None:
            entry[2] += len(branches) + len(buses)
            if entry[2] < 2 * K * STATE_COLUMN_COST_IN_ROWS:
                return lin.rows_sensitivity(branches, buses, W)
            dx = entry[1] = lin.state_sensitivity(W)
            self._bytes += dx.nbytes
            self._drop_beyond_budget()
        c = lin.row_seeds(branches, buses) @ dx
        return c[:, :K], c[:, K:]


class KnownRows(_PerLinearisation):
    """The coefficients of the rows already computed, per linearisation, up to
    ``budget_bytes`` (the least recently used linearisation's dropped beyond it).

    A market asks for the same rows of the same linearisation again: its DSO-needs LP and
    the first clearing round are on the base case, a margin round is on the linearisation
    of the clearing before, the needs-based market's needs with margins on the base case
    again; each row would be a transposed solve again.
    """

    # entry: [lin, {row: position}, cp, cq]

    def __init__(self, budget_bytes: int = KNOWN_ROWS_BYTES) -> None:
        super().__init__(budget_bytes)

    @staticmethod
    def _entry_bytes(entry: list) -> int:
        return entry[2].nbytes + entry[3].nbytes

    def find(self, lin: JacobianLinearisation, rows: np.ndarray) -> tuple[np.ndarray, tuple]:
        """Positions of ``rows`` in ``lin``'s entry (-1: not known) and its (cp, cq)."""
        entry = self._entry(lin)
        if entry is None:
            return np.full(len(rows), -1, np.int64), (None, None)
        index = entry[1]
        return np.array([index.get(r, -1) for r in rows.tolist()], np.int64), (entry[2], entry[3])

    def add(self, lin: JacobianLinearisation, rows: np.ndarray, cp: np.ndarray, cq: np.ndarray):
        """Keep the coefficients of ``rows`` (not known yet, distinct) of ``lin``."""
        entry = self._entry(lin, lambda: [lin, {}, cp[:0], cq[:0]])
        index = entry[1]
        n = len(index)
        index.update(zip(rows.tolist(), range(n, n + len(rows)), strict=True))
        entry[2], entry[3] = np.concatenate([entry[2], cp]), np.concatenate([entry[3], cq])
        self._bytes += cp.nbytes + cq.nbytes
        self._drop_beyond_budget()


@dataclass(frozen=True)
class AdjointRows:
    """Per MTU the Jacobian linearisation and the areas' weights W; coefficients on demand."""

    linearisations: tuple[JacobianLinearisation, ...]  # one per MTU
    W: sp.csr_matrix  # (n_bus, K)
    n_branch: int
    n_bus: int
    dense = False
    #: The feeders (``grid.feeders``) where every area is one bus, else None.
    feeders: AreaFeeders | None = None
    # Shared by the copies ``select`` makes (the blocks of one market's LPs).
    states: StateSensitivities = field(
        default_factory=StateSensitivities, repr=False, compare=False
    )
    known: KnownRows = field(default_factory=KnownRows, repr=False, compare=False)
    _equivalents: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def k(self) -> int:
        return self.W.shape[1]

    def delta(self, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        T = len(self.linearisations)
        loading, vm = np.zeros((T, self.n_branch)), np.zeros((T, self.n_bus))
        with one_blas_thread():
            for i, lin in enumerate(self.linearisations):
                if np.any(p[i]) or np.any(q[i]):
                    kept = self.states.kept(lin)  # no solve where it is at hand
                    if kept is not None:
                        dx = kept @ np.r_[p[i], q[i]]
                    else:
                        dx = lin.state_change(self.W @ p[i], self.W @ q[i])
                    loading[i], vm[i] = lin.dloading_dx @ dx, lin.E_q.T @ dx
        return loading, vm

    def coefficients(self, t: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cp, cq = np.empty((len(t), self.k)), np.empty((len(t), self.k))
        keep = self.k <= FORWARD_MAX_AREAS  # the nodal market's rows: not kept (KNOWN_ROWS_BYTES)
        with one_blas_thread():
            for tt in np.unique(t):
                lin, at = self.linearisations[tt], np.flatnonzero(t == tt)
                found, (known_p, known_q) = (
                    self.known.find(lin, r[at]) if keep else (np.full(len(at), -1), (None, None))
                )
                old = found >= 0
                if old.any():
                    cp[at[old]], cq[at[old]] = known_p[found[old]], known_q[found[old]]
                if old.all():
                    continue
                new, where = np.unique(r[at[~old]], return_inverse=True)
                new_p, new_q = np.empty((len(new), self.k)), np.empty((len(new), self.k))
                for start in range(0, len(new), ADJOINT_CHUNK_ROWS):
                    part = slice(start, start + ADJOINT_CHUNK_ROWS)
                    new_p[part], new_q[part] = self._solve_rows(lin, new[part])
                cp[at[~old]], cq[at[~old]] = new_p[where], new_q[where]
                if keep:
                    self.known.add(lin, new, new_p, new_q)
        return cp, cq

    def _solve_rows(self, lin: JacobianLinearisation, r: np.ndarray) -> tuple[np.ndarray, ...]:
        """The coefficients of rows ``r`` (violation layout) of one MTU's linearisation."""
        is_line, _, at = split_layout(r, self.n_branch, self.n_bus)
        branches, buses = at[is_line], at[~is_line]
        if self.k <= FORWARD_MAX_AREAS:
            dp, dq = self.states.rows(lin, self.W, branches, buses)
        else:
            dp, dq = lin.rows_sensitivity(branches, buses, self.W)
        order = np.argsort(np.r_[np.flatnonzero(is_line), np.flatnonzero(~is_line)])
        return dp[order], dq[order]

    def select(self, keep: np.ndarray) -> AdjointRows:
        kept = tuple(lin for lin, k in zip(self.linearisations, keep, strict=True) if k)
        return replace(self, linearisations=kept)

    def equivalents(self, t: int) -> np.ndarray:
        """The feeder equivalents of MTU t's linearisation by area (``AreaFeeders.equivalents``;
        computed once per linearisation)."""
        lin = self.linearisations[t]
        entry = self._equivalents.get(id(lin))
        if entry is None or entry[0] is not lin:
            with one_blas_thread():
                entry = self._equivalents[id(lin)] = (lin, self.feeders.equivalents(lin))
        return entry[1]


@dataclass(frozen=True)
class LinearGrid:
    """The linearised grid of the MTUs to clear, seen through K market areas."""

    mtus: np.ndarray
    dt_h: float
    branches: pd.MultiIndex
    buses: pd.Index
    loading0: np.ndarray  # (T, n_branch) loading_percent with no area injection
    vm0: np.ndarray  # (T, n_bus)
    rows: GridRows  # the sensitivities of every row to the area injections
    loading_max_percent: float
    vm_min_pu: float
    vm_max_pu: float

    @property
    def k(self) -> int:
        return self.rows.k

    @property
    def n_rows(self) -> int:
        """Rows of the violation layout per MTU."""
        return len(self.branches) + 2 * len(self.buses)

    def after(self, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Linearised loading and voltage after area injections p, q (T x K)."""
        loading, vm = self.rows.delta(p, q)
        return self.loading0 + loading, self.vm0 + vm

    def violations(self, loading: np.ndarray, vm: np.ndarray) -> np.ndarray:
        """Per row (T x (n_branch + 2 n_bus)): how far above its limit (<= 0: satisfied)."""
        over, under, overv = beyond_limits(self, loading, vm)
        return np.concatenate([over, overv, under], axis=1)

    def row_tolerances(self) -> np.ndarray:
        """VIOLATION_TOLERANCE_LOADING_PERCENT / _VM_PU per row of the violation layout."""
        return np.r_[
            np.full(len(self.branches), VIOLATION_TOLERANCE_LOADING_PERCENT),
            np.full(2 * len(self.buses), VIOLATION_TOLERANCE_VM_PU),
        ]

    def tolerated(self) -> LinearGrid:
        """The same grid with every limit widened by its tolerance."""
        return replace(
            self,
            loading_max_percent=self.loading_max_percent + VIOLATION_TOLERANCE_LOADING_PERCENT,
            vm_max_pu=self.vm_max_pu + VIOLATION_TOLERANCE_VM_PU,
            vm_min_pu=self.vm_min_pu - VIOLATION_TOLERANCE_VM_PU,
        )

    def tightened(self, margins: np.ndarray) -> LinearGrid:
        """The same grid with each (MTU, row) limit tightened by ``margins`` (T x n_rows in
        the layout of ``violations``, >= 0).

        A margin is applied as a shift of the row's base value toward its limit, which the
        LP and every excess see alike. A bus has one voltage for two limits: its margins
        on overvoltage and undervoltage shift it by their difference (the other limit is
        a band's width away, 0.1 p.u. against margins of 1e-3).
        """
        nb, n = len(self.branches), len(self.buses)
        return replace(
            self,
            loading0=self.loading0 + margins[:, :nb],
            vm0=self.vm0 + margins[:, nb : nb + n] - margins[:, nb + n :],
        )

    def select(self, keep: np.ndarray) -> LinearGrid:
        """The same grid on the MTUs where ``keep`` (one flag per MTU) is true."""
        if np.all(keep):
            return self
        return replace(
            self,
            mtus=self.mtus[keep],
            loading0=self.loading0[keep],
            vm0=self.vm0[keep],
            rows=self.rows.select(keep),
        )

    def shifted(self, p: np.ndarray, q: np.ndarray) -> LinearGrid:
        """The same grid with the base point moved by area injections p, q."""
        loading, vm = self.after(p, q)
        return replace(self, loading0=loading, vm0=vm)


class RowScales:
    """The MW-equivalent unit of every (MTU, row) of one linear grid: the row's largest
    |coefficient| on an area's active injection (``row_scale``), so that an excess / scale
    is the MW of the most effective flexibility that would remove it (the unit of the LP's
    slacks and of unmet need).

    With ``capacity_mw`` (MTU x area x (up, down): the MW offered at up to the penalty,
    ``MarketBids.capacity_mw``), also each row's ``price_factor``: how much more than a
    MW-equivalent its slack is priced, so that the penalty of unmet need is per MW of the
    flexibility on offer it would take.

    Computed on first use of a row (every row at once for dense rows) and kept: a
    sequential LP fixes the scales of its base case for every round, so that every round
    prices a violation alike. For the same reason it keeps which rows the base case has
    within their limits (``within_at_base``): a violation there would be the market's.
    """

    def __init__(self, grid: LinearGrid, capacity_mw: np.ndarray | None = None) -> None:
        self._rows = grid.rows
        self._tolerances = grid.row_tolerances()
        # Within the limit itself: a row over it, even by less than the tolerance, already
        # has a slack at no activation, which is not the market's doing.
        excess = grid.violations(grid.loading0, grid.vm0)
        self._within = excess <= 0.0
        if grid.rows.dense:
            self._value = grid.rows.all_scales()
        else:
            self._value = np.full((len(grid.mtus), grid.n_rows), np.nan)
        self._factor = None
        if capacity_mw is not None:  # what a row's slack stands for: at least its tolerance
            self._capacity = np.asarray(capacity_mw, float)
            self._excess = np.maximum(excess, self._tolerances)
            rows = np.arange(grid.n_rows)
            self._upper = split_layout(rows, len(grid.branches), len(grid.buses))[1]
            self._factor = np.full(self._value.shape, np.nan)
        self._t = np.arange(len(grid.mtus))  # this object's MTUs in the store

    def of(self, t: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Scales of rows (t, r)."""
        t, r = self._t[np.asarray(t, np.int64)], np.asarray(r, np.int64)
        missing = np.isnan(self._value[t, r])
        if missing.any():
            self._compute(t[missing], r[missing])
        return self._value[t, r]

    def price_factor(self, t: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Per row (t, r), its scale over the coefficient of the offer at the margin of
        removing its violation (``offered_scale``), from 1 to SLACK_PRICE_FACTOR_MAX; 1
        where the offers together fall short, none relieves the row, P does not move it,
        the row is within its limits at the base case, or without ``capacity_mw``. A slack priced at the penalty times this costs the
        penalty per MW of the offers it stands for. Without it, a violation that only
        remote offers could remove (an LV bus whose own offers are taken: a hundredth of
        its own sensitivity left) was left for a fraction of the penalty, below the price
        of those offers."""
        if self._factor is None:
            return np.ones(len(np.asarray(t)))
        t, r = self._t[np.asarray(t, np.int64)], np.asarray(r, np.int64)
        missing = np.isnan(self._factor[t, r])
        if missing.any():
            self._compute(t[missing], r[missing])
        return self._factor[t, r]

    def _compute(self, t: np.ndarray, r: np.ndarray) -> None:
        """Scales (and price factors) of store rows (t, r), from their coefficients."""
        todo = np.unique(np.c_[t, r], axis=0)
        cp, cq = self._rows.coefficients(todo[:, 0], todo[:, 1])
        self._keep(todo[:, 0], todo[:, 1], cp, cq)

    def _keep(self, t: np.ndarray, r: np.ndarray, cp: np.ndarray, cq: np.ndarray) -> None:
        scale = row_scale(cp, cq)
        self._value[t, r] = scale
        if self._factor is None:
            return
        # A row within its limits at the base case: 1, unused (the new-violation factor of
        # ``slack_prices``, above any price factor, prices its slack).
        self._factor[t, r] = 1.0
        todo = np.flatnonzero(~self._within[t, r])
        sense = np.where(self._upper[r], 1.0, -1.0)
        for i in range(0, len(todo), _FACTOR_ROWS):  # rows x areas temporaries, a chunk at a time
            at = todo[i : i + _FACTOR_ROWS]
            tt, rr = t[at], r[at]
            margin = offered_scale(
                cp[at], sense[at], self._capacity[tt], self._excess[tt, rr], scale[at]
            )
            self._factor[tt, rr] = scale[at] / margin

    def learn(
        self, rows: GridRows, t: np.ndarray, r: np.ndarray, cp: np.ndarray, cq: np.ndarray
    ) -> None:
        """Keep the scales of rows (t, r) from their coefficients ``cp``, ``cq`` on ``rows``
        where those are this object's own linearisation of MTU t (a market's first LPs, on
        the base case), so that ``of`` needs no second solve for them."""
        own = getattr(self._rows, "linearisations", None)
        theirs = getattr(rows, "linearisations", None)
        if own is None or theirs is None or len(t) == 0:
            return  # dense rows: every scale is at hand
        t, r = np.asarray(t, np.int64), np.asarray(r, np.int64)
        same = np.array([theirs[i] is own[j] for i, j in zip(t, self._t[t], strict=True)])
        self._keep(self._t[t[same]], r[same], cp[same], cq[same])

    def within_at_base(self, t: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Whether rows (t, r) are within their limits in the grid these scales were made
        on: a market's base case (the DSO-needs LP: the grid its needs are for)."""
        return self._within[self._t[np.asarray(t, np.int64)], np.asarray(r, np.int64)]

    def ranking(self, t: np.ndarray, r: np.ndarray) -> np.ndarray:
        """A unit that orders rows for the screen: the scales where every coefficient is at
        hand, else each row's violation tolerance (the adjoint rows would need a solve per
        candidate). Which rows enter the LP first does not change its optimum: row
        generation adds every violated one."""
        if self._rows.dense:
            return self.of(t, r)
        return self._tolerances[np.asarray(r, np.int64)]

    def select(self, keep: np.ndarray) -> RowScales:
        """The scales of the MTUs where ``keep``: the same store, so that a scale computed
        through either is known to both."""
        out = copy.copy(self)
        out._t = self._t[np.asarray(keep, bool)]
        return out


def linear_grid(
    pf: HorizonPowerFlow,
    W: sp.spmatrix,
    sensitivity_method: str,
    mtus,
    V: np.ndarray | None = None,
    p_prev: np.ndarray | None = None,
    q_prev: np.ndarray | None = None,
    cache: LinearisationCache | None = None,
    representation: str = "auto",
) -> LinearGrid:
    """The grid of the MTUs to clear, linearised in K market areas.

    ``W`` (sparse, internal bus x area) spreads an area's injection over its buses: the
    zones' aggregation matrix, the identity for the nodal market.

    By default at the base case; given internal voltages ``V`` (one row per MTU to
    clear) of an AC point reached with area injections ``p_prev``, ``q_prev``, the
    linearisation is taken there and shifted so that it is exact at p_prev, q_prev
    (one step of a sequential LP). Zonal indices are recomputed at every MTU. ``cache``
    (of ``pf.model``) keeps the Jacobian linearisations for the next market at the same
    points. ``representation``: "dense", "adjoint" or "auto" (dense where it fits in
    DENSE_ROWS_MAX_BYTES; the adjoint rows need the jacobian method).
    """
    if representation not in REPRESENTATIONS:
        raise InputError(
            f"unknown grid-row representation '{representation}': choose one of "
            f"{', '.join(REPRESENTATIONS)}"
        )
    mtus = np.asarray(list(mtus), dtype=np.int64)
    model = pf.model
    V = pf.V[mtus] if V is None else V
    W = sp.csr_matrix(W)
    K = W.shape[1]
    T, n_l, n_b = len(mtus), len(model.branches), len(model.buses)
    dense_bytes = 2 * T * (n_l + n_b) * K * 8
    if representation == "auto":
        fits = dense_bytes <= DENSE_ROWS_MAX_BYTES
        representation = "dense" if fits or sensitivity_method != "jacobian" else "adjoint"
    if representation == "adjoint" and sensitivity_method != "jacobian":
        raise InputError(
            f"the adjoint grid rows need the jacobian sensitivities, not '{sensitivity_method}'"
        )
    if representation == "dense":
        rows = _dense_rows(pf, W, sensitivity_method, mtus, V, cache)
    else:
        with one_blas_thread():
            lins = tuple(linearisation(model, V[i], cache) for i in range(T))
        rows = AdjointRows(lins, W, n_l, n_b, area_feeders(model, W))
    loading0 = model.loading_percent(V).reshape(T, n_l)
    vm0 = model.vm_pu(V).reshape(T, n_b)
    if p_prev is not None:
        q_prev = np.zeros_like(p_prev) if q_prev is None else q_prev
        dl, dv = rows.delta(p_prev, q_prev)
        loading0, vm0 = loading0 - dl, vm0 - dv
    g = pf.grid
    return LinearGrid(
        mtus=mtus,
        dt_h=pf.profiles.horizon.mtu_hours,
        branches=model.branches,
        buses=model.buses,
        loading0=loading0,
        vm0=vm0,
        rows=rows,
        loading_max_percent=g.loading_max_percent,
        vm_min_pu=g.vm_min_pu,
        vm_max_pu=g.vm_max_pu,
    )


def _dense_rows(pf, W, sensitivity_method, mtus, V, cache) -> DenseRows:
    model = pf.model
    K = W.shape[1]
    T, n_l, n_b = len(mtus), len(model.branches), len(model.buses)
    # Four arrays; a sequential LP holds up to three of these grids (the base case, its best
    # round and the current one).
    require_memory(
        f"grid {pf.grid.name}: the linearised grid of {T} MTUs in {K} market areas",
        [
            [(T, "MTUs"), (n_l, "branches"), (K, "areas"), (2, "arrays"), (3, "grids")],
            [(T, "MTUs"), (n_b, "buses"), (K, "areas"), (2, "arrays"), (3, "grids")],
        ],
        hint="clear fewer MTUs, or let the grid rows be adjoint (representation 'auto')",
    )
    sl_p, sl_q = np.empty((T, n_l, K)), np.empty((T, n_l, K))
    sv_p, sv_q = np.empty((T, n_b, K)), np.empty((T, n_b, K))
    with one_blas_thread():
        for i in range(T):
            s = sensitivity_arrays(model, V[i], sensitivity_method, W, cache)
            sl_p[i], sl_q[i], sv_p[i], sv_q[i] = s.loading_p, s.loading_q, s.vm_p, s.vm_q
    return DenseRows(sl_p, sl_q, sv_p, sv_q)


#: Rows whose price factors are computed at once (about ten rows x areas arrays: on the
#: nodal market of a 5,000-bus grid, 11 MB each).
_FACTOR_ROWS = 256
#: Most times a row's MW-equivalent its slack is priced at (``offered_scale``): a tenth
#: of market.formulation.NEW_VIOLATION_PENALTY_FACTOR, so that a MW-equivalent of new
#: violation still costs at least ten times one left (at 100, as much: SimBench MV+LV's
#: needs-based markets at K = 16 and 64 traded one new violation each for old ones).
#: Enough for an offer a hundredth as effective as the row's own area at a tenth of the
#: penalty.
SLACK_PRICE_FACTOR_MAX = 10.0


def offered_scale(
    cp: np.ndarray,
    sense: np.ndarray,
    capacity_mw: np.ndarray,
    excess: np.ndarray,
    scale: np.ndarray,
) -> np.ndarray:
    """Per row, the |P coefficient| of the area at the margin of removing ``excess`` with
    the offers ``capacity_mw`` (rows x areas x (up, down)), most effective first: the least
    effective one needed; at least ``scale`` / SLACK_PRICE_FACTOR_MAX. ``scale`` where the
    offers together fall short of the excess (what they would take is not defined: its
    slack is priced per MW-equivalent, so that no weak offer is bought at up to ten times
    the penalty for a violation it cannot remove; SimBench MV+LV, case A: the nodal cost
    +8% and three new violations of a needs-based market when those rows took the least
    effective offer's factor), where no offer relieves the row, or where P does not move
    it (``row_scale``'s fallback to Q: offers are MW of P). ``sense``: +1 for a row with an
    upper limit, -1 a lower."""
    # An up offer raises its area's injection: it relieves a row where cp * sense < 0.
    relieving = np.where(cp * sense[:, None] < 0, capacity_mw[..., 0], capacity_mw[..., 1])
    moved = (relieving > 0) & (cp != 0)
    effect = np.where(moved, np.abs(cp), 0.0)
    order = np.argsort(-effect, axis=-1, kind="stable")
    effect = np.take_along_axis(effect, order, axis=-1)
    offered = np.take_along_axis(np.where(moved, relieving, 0.0), order, axis=-1)
    relief = np.cumsum(effect * offered, axis=-1)  # capacity inf: unlimited
    at = (relief < excess[:, None]).sum(axis=-1)  # the areas before the margin
    suffice = at < cp.shape[-1]
    suffice[suffice] = effect[suffice, at[suffice]] > 0
    margin = np.zeros(len(cp))
    margin[suffice] = effect[suffice, at[suffice]]
    with_p = np.abs(cp).max(axis=-1, initial=0.0) > 0
    return np.where(suffice & with_p, np.maximum(margin, scale / SLACK_PRICE_FACTOR_MAX), scale)


def row_scale(cp: np.ndarray, cq: np.ndarray) -> np.ndarray:
    """Per row, its largest |coefficient| on active power over the areas (the last axis): a
    slack / scale is MW of the most effective flexibility, as the residual of the AC check
    (``check.ac.residual_violations``) counts it. A row that P does not move falls back
    to its largest Q coefficient, then to 1."""
    scale_p = np.abs(cp).max(axis=-1, initial=0.0)
    scale_q = np.abs(cq).max(axis=-1, initial=0.0)
    return np.where(scale_p > 0, scale_p, np.where(scale_q > 0, scale_q, 1.0))
