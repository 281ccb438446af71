"""Nodal sensitivities of branch loading and bus voltage to active and reactive injections.

Injections are *net injections* at a bus (generation positive): flexibility
"up" raises it. For each MTU, at its solved AC operating point:

* ``loading_p`` = d loading_percent / d P_mw, ``loading_q`` = d loading_percent / d Q_mvar
  (rows: monitored (element_type, element); columns: pandapower bus),
* ``vm_p`` = d vm_pu / d P_mw, ``vm_q`` = d vm_pu / d Q_mvar (rows and columns: bus).

Methods:

``jacobian`` (reference)
    One sparse LU factorisation of the Newton-Raphson Jacobian J at the solved
    point; the state change of an injection is dx = J^-1 e, loading and voltage
    follow from the exact derivatives of the branch-end currents. The slack
    absorbs every injection; a PV bus holds its voltage (so Q injected there moves
    nothing). Tests compare it with finite differences of real AC power flows.
``dc_ptdf``
    DC power transfer distribution factors: loading moves by sign(P) x PTDF x
    rating factor, at 1 p.u. voltage; voltages and Q are invisible (zero
    sensitivity). Cheap, and blind to the resistive voltage drop of feeders.
``lindistflow``
    Linearised DistFlow for radial feeders: d V_i / d P_j = R_ij / V_i with R_ij
    the resistance of the path shared by i and j to the slack (X_ij for Q);
    branch flows are the sums of downstream injections (lossless).
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import networkx as nx
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pandapower.pypower.makePTDF import makePTDF
from threadpoolctl import ThreadpoolController

from lfm_zonal.config import SENSITIVITY_METHODS
from lfm_zonal.errors import GridError, InputError
from lfm_zonal.grid.powerflow import (
    HorizonPowerFlow,
    NetworkModel,
    TransposedFactor,
    pandapower_loading_percent,
)


@functools.cache
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()


def one_blas_thread():
    """A context with one BLAS thread: the solves are small (a few hundred states), and
    OpenBLAS's threads, spinning for a core on a busy 2-core machine, made them 400x
    slower (0.2 s instead of 0.5 ms per MTU on SimBench MV, measured with other processes
    running). The thread pools are looked up once (``threadpool_limits`` reads them on every
    call: 4 ms, 15 s of a nodal market on SimBench MV+LV)."""
    return _threadpools().limit(limits=1, user_api="blas")


def in_one_blas_thread(function):
    """``function`` run with one BLAS thread (``one_blas_thread``)."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        with one_blas_thread():
            return function(*args, **kwargs)

    return run


@dataclass(frozen=True)
class SensitivityArrays:
    """Sensitivities as arrays, columns in ``model.buses`` order (the engine's fast path)."""

    loading_p: np.ndarray  # (n_branches, n_buses) loading_percent per MW
    loading_q: np.ndarray  # loading_percent per Mvar
    vm_p: np.ndarray  # (n_buses, n_buses) p.u. per MW
    vm_q: np.ndarray  # p.u. per Mvar


@dataclass(frozen=True)
class Sensitivities:
    """Labelled sensitivity matrices of one MTU (see the module docstring for units)."""

    method: str
    time: pd.Timestamp
    loading_p: pd.DataFrame
    loading_q: pd.DataFrame
    vm_p: pd.DataFrame
    vm_q: pd.DataFrame
    isolated_buses: tuple[int, ...]


def sensitivities(
    pf: HorizonPowerFlow,
    mtu: int | pd.Timestamp | str,
    method: str = "jacobian",
    cache: LinearisationCache | None = None,
) -> Sensitivities:
    """Labelled sensitivities at the solved operating point of one MTU (``cache``: as in
    ``sensitivity_arrays``)."""
    t = pf.mtu_position(mtu)
    if not pf.converged.iloc[t]:
        raise InputError(f"MTU {t} ({pf.times[t]}) has no converged power flow: no sensitivities")
    arrays = sensitivity_arrays(pf.model, pf.V[t], method, cache=cache)
    buses = pf.model.buses.rename("bus")
    branches = pf.model.branches

    def frame(values: np.ndarray, rows: pd.Index) -> pd.DataFrame:
        return pd.DataFrame(values, index=rows.copy(), columns=buses.copy())

    return Sensitivities(
        method=method,
        time=pf.times[t],
        loading_p=frame(arrays.loading_p, branches),
        loading_q=frame(arrays.loading_q, branches),
        vm_p=frame(arrays.vm_p, buses),
        vm_q=frame(arrays.vm_q, buses),
        isolated_buses=tuple(int(b) for b in pf.model.isolated_buses),
    )


def sensitivity_arrays(
    model: NetworkModel,
    V: np.ndarray,
    method: str = "jacobian",
    patterns: sp.spmatrix | None = None,
    cache: LinearisationCache | None = None,
) -> SensitivityArrays:
    """Sensitivities at internal voltages ``V`` by ``method`` (one of SENSITIVITY_METHODS).

    Columns are the buses, or with ``patterns`` (n_buses x m, column j spreads 1 MW
    over buses, as a zone's aggregation does) the m injection patterns: the result
    is then the bus sensitivities @ patterns. The Jacobian method solves for the m
    patterns directly (m right-hand sides instead of two per bus), on the linearisation
    at ``V`` taken from ``cache`` (one of ``model``; None: linearised afresh).
    """
    if method == "jacobian":
        return linearisation(model, V, cache).sensitivities(patterns)
    if method == "dc_ptdf":
        arrays = _dc_ptdf(model, V)
    elif method == "lindistflow":
        arrays = _lindistflow(model, V)
    else:
        raise InputError(
            f"unknown sensitivity method '{method}': choose one of {', '.join(SENSITIVITY_METHODS)}"
        )
    if patterns is None:
        return arrays
    return SensitivityArrays(
        **{name: getattr(arrays, name) @ patterns for name in SensitivityArrays.__annotations__}
    )


def _active_end(model: NetworkModel, V: np.ndarray):
    """Per monitored branch: the end that sets loading_percent, its current, voltage and factor."""
    i_f, i_t = model.branch_currents(V)
    from_end = model.loading_per_i_from * np.abs(i_f) >= model.loading_per_i_to * np.abs(i_t)
    current = np.where(from_end, i_f, i_t)
    bus = np.where(from_end, model.branch_from, model.branch_to)
    factor = np.where(from_end, model.loading_per_i_from, model.loading_per_i_to)
    return from_end, current, bus, factor


#: Linearisations a LinearisationCache keeps by default (an MTU's base point is linearised
#: once for every market and zone count of a study; each holds a sparse LU and sparse
#: derivatives).
LINEARISATION_CACHE_SIZE = 256
#: Bytes of linearisations a LinearisationCache keeps by default, as estimated by
#: ``LinearisationCache.entry_bytes``: the count bound alone let 256 linearisations of a
#: 5,479-bus grid (1-MVLV-rural-all-0-sw, about 4.6 MB each) reach 1.2 GB. On that grid
#: (8 MTUs, nodal and 2 x 4 zonal markets) a 512 MiB budget let resident memory grow from
#: 0.9 to 1.7 GB over the markets, 128 MiB from 0.7 to 1.2 GB, none stay at 0.6-0.7 GB
#: and ran 5% faster (re-linearising a base point there takes 8 ms): at this size the
#: factorisations cost more memory than they save time, each market process keeping its
#: own. A grid of a few hundred buses (under 0.1 MB a linearisation) stays bound by the
#: count. What every market of a study asks for, it keeps once for all of them
#: (STUDY_POINTS_BYTES).
LINEARISATION_CACHE_BYTES = 64 * 2**20
#: Bytes of linearisations a study keeps for its whole run (``LinearisationCache.keep``): the
#: base points of the MTUs it clears, which every market linearises and checks its dispatch
#: from. Linearised before the market workers are forked, they are shared by all of them.
#: SimBench 1-MVLV-rural-all-0-sw, 96 MTUs (benchmarks/bench_scale.py case A, 72 MTUs to
#: clear, 330 MB of linearisations): CPU time of the study 0.90 of what it was without
#: (three runs in turn), wall time 0.93, the largest process's peak 40 MB higher.
STUDY_POINTS_BYTES = 512 * 2**20
#: Resident bytes of a SuperLU factorisation per stored nonzero (SuperLU's ``nnz``, L and U
#: with their supernodes): 12 for the float64 value and its int32 row index, the rest the
#: factorisation's own bookkeeping. Measured as the growth of resident memory per ``splu``
#: of the Jacobian kept alive: 30.6 on synthetic_radial_2000, 32.0 on 1-MVLV-rural-all-0-sw.
SUPERLU_BYTES_PER_NONZERO = 32


@dataclass(frozen=True)
class JacobianLinearisation:
    """The AC power flow linearised at one operating point.

    State x = [Va(pv, pq), Vm(pq)]; a unit injection in mismatch row k moves it by
    column k of J^-1 (``lu`` solves with J).
    """

    lu: TransposedFactor
    dloading_dx: sp.csr_matrix  # loading_percent per unit state change (branches x states)
    E_p: sp.csr_matrix  # states x buses: the P mismatch row of each pandapower bus
    E_q: sp.csr_matrix  # the Q mismatch row (also the bus's Vm state; PQ buses only)
    base_mva: float
    J: sp.csc_matrix | None = field(default=None, repr=False, compare=False)  # factorised in lu
    # [E_p W, E_q W] by pattern W, shared by the linearisations of one model (E_p and E_q
    # depend on the bus types only) that a LinearisationCache holds; None: made each time.
    pattern_rhs: PatternRhs | None = field(default=None, repr=False, compare=False)

    def state_sensitivity(self, patterns: sp.spmatrix | None) -> np.ndarray:
        """dx per MW, then per Mvar, of every pattern (states x 2 patterns): one solve with
        J of all the patterns' right-hand sides."""
        rhs = None if self.pattern_rhs is None else self.pattern_rhs.get(patterns)
        if rhs is None:
            E_p, E_q = self.E_p, self.E_q
            if patterns is not None:
                E_p, E_q = E_p @ patterns, E_q @ patterns
            rhs = sp.hstack([E_p, E_q]).toarray()
            if self.pattern_rhs is not None and patterns is not None:
                self.pattern_rhs.put(patterns, rhs)
        return self.lu.solve(rhs) / self.base_mva

    def sensitivities(self, patterns: sp.spmatrix | None) -> SensitivityArrays:
        dx = self.state_sensitivity(patterns)
        m = dx.shape[1] // 2
        dloading = self.dloading_dx @ dx  # loading_percent per MW (Mvar)
        dvm = self.E_q.T @ dx
        return SensitivityArrays(
            loading_p=dloading[:, :m],
            loading_q=dloading[:, m:],
            vm_p=dvm[:, :m],
            vm_q=dvm[:, m:],
        )

    def state_change(self, p_mw: np.ndarray, q_mvar: np.ndarray) -> np.ndarray:
        """dx of net bus injections p_mw, q_mvar (per pandapower bus, ``E_p`` columns): one
        solve with J."""
        return self.lu.solve(self.E_p @ p_mw + self.E_q @ q_mvar) / self.base_mva

    def rows_sensitivity(
        self, branches: np.ndarray, vm_buses: np.ndarray, patterns: sp.spmatrix | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``sensitivities(patterns)``: d loading_percent of the monitored ``branches``
        (positions), then d vm_pu of the buses at positions ``vm_buses``, per MW and per Mvar
        of every pattern (rows x patterns), by transposed solves (one per row) instead of
        solves for every pattern (the adjoint method)."""
        seeds = self.row_seeds(branches, vm_buses).toarray()
        w = self.lu.solve(seeds.T, trans="T") / self.base_mva  # states x rows
        dp, dq = (self.E_p.T @ w).T, (self.E_q.T @ w).T  # rows x buses
        if patterns is not None:
            dp, dq = np.asarray(dp @ patterns), np.asarray(dq @ patterns)
        return dp, dq

    def row_seeds(self, branches: np.ndarray, vm_buses: np.ndarray) -> sp.csr_matrix:
        """d row / dx of the monitored ``branches``' loading_percent, then of the vm_pu of
        the buses at positions ``vm_buses`` (rows x states, sparse)."""
        return sp.vstack([self.dloading_dx[branches], self.E_q[:, vm_buses].T]).tocsr()

    def row_sensitivity(self, loading: bool, row: int) -> tuple[np.ndarray, np.ndarray]:
        """One row of ``sensitivities(None)``: d loading_percent of monitored branch ``row``
        (or d vm_pu of bus ``row``) per MW and per Mvar at every bus, by one transposed solve
        instead of two solves per bus."""
        one, none = np.array([row]), np.zeros(0, np.int64)
        dp, dq = self.rows_sensitivity(one if loading else none, none if loading else one)
        return dp[0], dq[0]


#: Largest right-hand side a PatternRhs keeps (bytes; it keeps up to ``size`` of them).
PATTERN_RHS_MAX_BYTES = 4 * 2**20


class PatternRhs:
    """The right-hand sides [E_p W, E_q W] (dense, read-only) of the sensitivities of one
    network model for the last few injection patterns W, by the pattern object itself.

    A market linearises every MTU with the same W (``grid.linear.linear_grid``): the
    product and its dense copy, half the time of a zonal MTU's sensitivities, are then made
    once per call instead of once per MTU. The entry holds W, so its id is not reused while
    it is kept; W is not to be changed in place after use (no caller does).
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._by_id: OrderedDict[int, tuple[object, np.ndarray]] = OrderedDict()

    def get(self, patterns) -> np.ndarray | None:
        hit = self._by_id.get(id(patterns))
        if hit is None or hit[0] is not patterns:
            return None
        self._by_id.move_to_end(id(patterns))
        return hit[1]

    def put(self, patterns, rhs: np.ndarray) -> None:
        if rhs.nbytes > PATTERN_RHS_MAX_BYTES:  # a few zones' columns are kept, not every bus's
            return
        rhs.flags.writeable = False  # shared by every MTU's solve (SuperLU copies it)
        self._by_id[id(patterns)] = (patterns, rhs)
        self._by_id.move_to_end(id(patterns))
        if len(self._by_id) > self.size:
            self._by_id.popitem(last=False)


class LinearisationCache:
    """Jacobian linearisations of one network model by operating point, the least recently
    used dropped beyond ``size`` entries or beyond ``budget_bytes`` of them (estimated by
    :meth:`entry_bytes`; the newest entry is kept even if it alone is larger).

    Created by whoever runs several stages on the same operating points (a study: the
    segmentation, every market's base case and its AC check linearise the same MTUs) and
    passed to them; each point is then linearised once. A cached linearisation is the one
    a fresh linearisation would give, so the cache changes no number.

    A dropped linearisation is still found while something else holds it (a market's grid
    with adjoint rows holds one per MTU for the whole market, so its AC checks start from
    the base points with their factorisations whatever the budget keeps): the cache refers
    to every linearisation it made weakly too, which keeps none of them. One that nothing
    holds any more is linearised again when asked for.

    Points a study asks for in every market can be kept for the cache's life instead,
    beside the LRU and its budget, up to a budget of their own (:meth:`keep`).
    """

    def __init__(
        self,
        model: NetworkModel,
        size: int = LINEARISATION_CACHE_SIZE,
        budget_bytes: int = LINEARISATION_CACHE_BYTES,
    ) -> None:
        if size < 1:
            raise ValueError(f"a linearisation cache holds at least one point, not {size}")
        if budget_bytes < 0:
            raise ValueError(
                f"a linearisation cache's budget is at least 0 bytes, not {budget_bytes}"
            )
        self.model = model
        self.size = size
        self.budget_bytes = budget_bytes
        # point -> (linearisation, its estimated bytes), least recently used first
        self._by_point: OrderedDict[bytes, tuple[JacobianLinearisation, int]] = OrderedDict()
        self._bytes = 0  # sum of the LRU entries' estimated bytes
        # point -> linearisation, every one made, for as long as anything holds it
        self._alive: weakref.WeakValueDictionary[bytes, JacobianLinearisation] = (
            weakref.WeakValueDictionary()
        )
        # point -> linearisation, kept for the cache's life whatever the budget (``keep``)
        self._kept: dict[bytes, JacobianLinearisation] = {}
        self._kept_bytes = 0  # their estimated bytes
        self._pattern_rhs = PatternRhs()
        #: What callers derive from the linearisations of these points and key themselves
        #: (``check.ac.residual_violations``: a row's facts at an MTU's base point, asked for
        #: again by every market of a study that leaves the row violated).
        self.derived: dict = {}

    def __len__(self) -> int:
        """Entries of the LRU (not the points ``keep`` holds)."""
        return len(self._by_point)

    @property
    def nbytes(self) -> int:
        """Estimated bytes of the LRU's entries (see :meth:`entry_bytes`)."""
        return self._bytes

    @property
    def kept_bytes(self) -> int:
        """Estimated bytes of the points ``keep`` holds."""
        return self._kept_bytes

    def clear(self) -> None:
        self._by_point.clear()
        self._alive.clear()
        self._kept.clear()
        self._bytes = self._kept_bytes = 0
        self._pattern_rhs = PatternRhs()
        self.derived = {}

    @staticmethod
    def entry_bytes(lin: JacobianLinearisation) -> int:
        """Estimated resident bytes of one linearisation: the sparse LU's stored nonzeros at
        SUPERLU_BYTES_PER_NONZERO each and its two int32 permutations, plus the arrays of
        the sparse derivatives (within about 10% of the measured growth of resident memory on
        synthetic_radial_2000 and 1-MVLV-rural-all-0-sw)."""
        lu_bytes = lin.lu.nnz * SUPERLU_BYTES_PER_NONZERO + 2 * 4 * lin.lu.shape[0]
        matrices = [m for m in (lin.dloading_dx, lin.E_p, lin.E_q, lin.J) if m is not None]
        return lu_bytes + sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in matrices)

    def require_model(self, model: NetworkModel) -> None:
        """Refuse to serve the linearisations of another network model than ``model``."""
        if self.model is not model:
            raise ValueError("the linearisation cache belongs to another network model")

    def held(self, V: np.ndarray) -> JacobianLinearisation | None:
        """The linearisation at internal voltages ``V`` if kept, or dropped but still held
        elsewhere; else None (nothing made)."""
        return self._held(np.ascontiguousarray(V).tobytes())

    def keep(self, points: np.ndarray, budget_bytes: int = STUDY_POINTS_BYTES) -> int:
        """Linearise the internal voltages ``points`` (one point a row) and keep them for the
        cache's life, besides its least-recently-used entries and outside their size and
        budget (an entry already there moves over): in order, as long as all the kept
        points, of this call and earlier ones, hold within ``budget_bytes`` (``entry_bytes``
        each; the first point over it goes to the LRU). Returns how many of ``points`` are
        kept.

        A study keeps the base points of the MTUs it clears: every market linearises them,
        and its AC checks start from them; kept in the study's process before its market
        workers are forked, every worker finds them at hand (the same memory pages).
        """
        count = 0
        for V in points:
            key = np.ascontiguousarray(V).tobytes()
            if key not in self._kept:
                entry = self._by_point.pop(key, None)  # kept from now on: out of the LRU
                if entry is not None:
                    self._bytes -= entry[1]
                    lin = entry[0]
                else:
                    lin = self._alive.get(key)
                    if lin is None:
                        lin = self._alive[key] = self._linearised(V)
                nbytes = self.entry_bytes(lin)
                if self.kept_bytes + nbytes > budget_bytes:  # over: left to the LRU
                    self._add_recent(key, lin, nbytes)
                    break
                self._kept[key] = lin
                self._kept_bytes += nbytes
            count += 1
        return count

    def _held(self, key: bytes) -> JacobianLinearisation | None:
        kept = self._kept.get(key)
        if kept is not None:
            return kept
        entry = self._by_point.get(key)
        if entry is None:
            return self._alive.get(key)
        self._by_point.move_to_end(key)
        return entry[0]

    def at(self, V: np.ndarray) -> JacobianLinearisation:
        """The linearisation at internal voltages ``V``, linearised on first use."""
        key = np.ascontiguousarray(V).tobytes()
        held = self._held(key)
        if held is not None:
            return held
        lin = self._alive[key] = self._linearised(V)
        self._add_recent(key, lin, self.entry_bytes(lin))
        return lin

    def _linearised(self, V: np.ndarray) -> JacobianLinearisation:
        return replace(_linearise(self.model, V), pattern_rhs=self._pattern_rhs)

    def _add_recent(self, key: bytes, lin: JacobianLinearisation, nbytes: int) -> None:
        """``lin`` the newest entry of the LRU (the least recent dropped beyond the size or
        the budget)."""
        cached = self._by_point
        cached[key] = (lin, nbytes)
        self._bytes += nbytes
        while len(cached) > 1 and (len(cached) > self.size or self._bytes > self.budget_bytes):
            _, (_, dropped_bytes) = cached.popitem(last=False)
            self._bytes -= dropped_bytes


def linearisation(
    model: NetworkModel, V: np.ndarray, cache: LinearisationCache | None = None
) -> JacobianLinearisation:
    """The Jacobian linearisation at internal voltages ``V``: from ``cache`` (which must be
    ``model``'s), or linearised afresh without one."""
    if cache is None:
        return _linearise(model, V)
    cache.require_model(model)
    return cache.at(V)


def _linearise(model: NetworkModel, V: np.ndarray) -> JacobianLinearisation:
    va_state, vm_state, E_p, E_q, admittance = _model_constants(model)
    # d loading / d[Va, Vm] of the end that sets each branch's loading: entry by entry of
    # that end's admittance row, d I = Y_bc (j V_c dVa_c + V_c / |V_c| dVm_c), projected on
    # the current's direction and scaled to loading_percent (one sparse build, no products).
    from_end, current, _, factor = _active_end(model, V)
    magnitude = np.abs(current)
    unit = np.divide(np.conj(current), magnitude, out=np.zeros_like(current), where=magnitude > 0)
    rows, cols, y = [], [], []
    for (coo_row, coo_col, coo_data), end in zip(admittance, (from_end, ~from_end), strict=True):
        keep = end[coo_row]
        rows.append(coo_row[keep])
        cols.append(coo_col[keep])
        y.append(coo_data[keep])
    row, col, y = np.concatenate(rows), np.concatenate(cols), np.concatenate(y)
    scale = y * (unit * factor)[row]
    va, vm = va_state[col], vm_state[col]
    on_va, on_vm = va >= 0, vm >= 0
    dloading_dx = sp.csr_matrix(
        (
            np.r_[(scale * 1j * V[col])[on_va].real, (scale * V[col] / np.abs(V[col]))[on_vm].real],
            (np.r_[row[on_va], row[on_vm]], np.r_[va[on_va], vm[on_vm]]),
        ),
        shape=(len(model.branch_rows), E_p.shape[0]),
    )
    J = model.jacobian(V)
    return JacobianLinearisation(
        lu=TransposedFactor(J),
        dloading_dx=dloading_dx,
        E_p=E_p,
        E_q=E_q,
        base_mva=model.base_mva,
        J=J,
    )


def model_states(
    model: NetworkModel,
) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix, sp.csr_matrix]:
    """The state index of each internal bus's angle and magnitude (-1: none; also its P and
    Q mismatch row) and the selectors E_p, E_q (states x pandapower buses) of ``model``."""
    va_state, vm_state, E_p, E_q, _ = _model_constants(model)
    return va_state, vm_state, E_p, E_q


def _model_constants(model: NetworkModel):
    """What every linearisation of ``model`` shares, made on its first (kept on the model):
    the state index of each internal bus's angle and magnitude (-1: none), the selectors
    E_p and E_q (states x pandapower buses) and the monitored branch-end admittance rows
    as COO arrays. Read-only for every linearisation."""
    found = model.__dict__.get("_linearisation_constants")
    if found is not None:
        return found
    pv, pq = model.pv, model.pq
    n_pvpq, n_x = len(pv) + len(pq), len(pv) + 2 * len(pq)
    # State index of each internal bus's angle (pv, pq) and magnitude (pq); -1: none.
    va_state = np.full(model.n_bus, -1)
    va_state[np.r_[pv, pq]] = np.arange(n_pvpq)
    vm_state = np.full(model.n_bus, -1)
    vm_state[pq] = n_pvpq + np.arange(len(pq))
    internal = model.bus_lookup.to_numpy()

    def selector(rows: np.ndarray) -> sp.csr_matrix:  # n_x x n_buses, one 1 per bus with a row
        buses = np.flatnonzero(rows >= 0)
        return sp.csr_matrix(
            (np.ones(len(buses)), (rows[buses], buses)), shape=(n_x, len(internal))
        )

    admittance = []
    for Y in model.monitored_admittance:
        coo = Y.tocoo()
        admittance.append((coo.row, coo.col, coo.data))
    for array in (va_state, vm_state, *(a for triple in admittance for a in triple)):
        array.flags.writeable = False
    found = (
        va_state,
        vm_state,
        selector(va_state[internal]),
        selector(vm_state[internal]),
        tuple(admittance),
    )
    object.__setattr__(model, "_linearisation_constants", found)  # a frozen dataclass
    return found


def _flow_based(
    model: NetworkModel,
    V: np.ndarray,
    dflow: np.ndarray,
    include_q: bool,
    vm_p: np.ndarray,
    vm_q: np.ndarray,
) -> SensitivityArrays:
    """Loading sensitivities from d P_flow(from end) / d P_injection (internal columns)."""
    from_end, current, bus, factor = _active_end(model, V)
    S_end = V[bus] * np.conj(current)  # power entering the branch at its active end
    sign_end = np.where(from_end, 1.0, -1.0)  # lossless: flow at the to end is -flow at from
    if include_q:
        mag = np.abs(S_end)
        w_p = np.divide(S_end.real, mag, out=np.zeros_like(mag), where=mag > 0)
        w_q = np.divide(S_end.imag, mag, out=np.zeros_like(mag), where=mag > 0)
        scale = factor / np.abs(V[bus])
    else:
        w_p, w_q, scale = np.sign(S_end.real), np.zeros(len(bus)), factor
    internal = model.bus_lookup.to_numpy()
    d = dflow[:, internal] * sign_end[:, None] * scale[:, None] / model.base_mva
    return SensitivityArrays(
        loading_p=d * w_p[:, None], loading_q=d * w_q[:, None], vm_p=vm_p, vm_q=vm_q
    )


def _dc_ptdf(model: NetworkModel, V: np.ndarray) -> SensitivityArrays:
    if len(model.ref) != 1:
        raise GridError("dc_ptdf sensitivities need exactly one slack bus")
    ptdf = makePTDF(model.base_mva, model.ppci_bus, model.ppci_branch, slack=int(model.ref[0]))
    n = len(model.buses)
    zeros = np.zeros((n, n))
    return _flow_based(model, V, ptdf[model.branch_rows], False, zeros, zeros.copy())


def _lindistflow(model: NetworkModel, V: np.ndarray) -> SensitivityArrays:
    if len(model.ref) != 1:
        raise GridError("lindistflow sensitivities need exactly one slack bus")
    f, t = model.all_branch_from, model.all_branch_to
    z = model.all_branch_r_pu + 1j * model.all_branch_x_pu
    # Parallel branches (same two buses) act as one: z_eq = 1 / sum(1/z_k), each
    # carrying the share |z_eq / z_k| of the flow.
    pair = np.sort(np.c_[f, t], axis=1)
    pairs, group = np.unique(pair, axis=0, return_inverse=True)
    group = group.ravel()
    y_eq = np.zeros(len(pairs), complex)
    np.add.at(y_eq, group, 1.0 / np.where(z == 0, 1e-12, z))
    z_eq = 1.0 / y_eq
    share = np.abs(z_eq[group] / np.where(z == 0, 1e-12, z))
    graph = nx.Graph()
    graph.add_nodes_from(range(model.n_bus))
    graph.add_edges_from((int(a), int(b), {"k": k}) for k, (a, b) in enumerate(pairs))
    if not nx.is_tree(graph):
        cycles = nx.cycle_basis(graph)
        detail = f"; there is a ring through {len(cycles[0])} buses" if cycles else ""
        raise GridError(
            f"lindistflow sensitivities need a radial grid (a tree as switched){detail}"
        )
    # Path incidence: A[i, g] = 1 if branch group g lies on the path from the slack to bus i.
    A = np.zeros((model.n_bus, len(pairs)))
    for parent, child in nx.bfs_edges(graph, int(model.ref[0])):
        A[child] = A[parent]
        A[child, graph[parent][child]["k"]] = 1.0
    R = (A * z_eq.real) @ A.T
    X = (A * z_eq.imag) @ A.T
    internal = model.bus_lookup.to_numpy()
    vm = np.abs(V)[internal][:, None]
    vm_p = R[np.ix_(internal, internal)] / vm / model.base_mva
    vm_q = X[np.ix_(internal, internal)] / vm / model.base_mva
    # Flow at the from end, oriented from -> to: minus the injections beyond the branch.
    g = group[model.branch_rows]
    beyond = A.T[g]  # 1 where a bus lies beyond the branch, seen from the slack
    from_is_upstream = A[model.branch_to, g] == 1.0
    orient = np.where(from_is_upstream, -1.0, 1.0) * share[model.branch_rows]
    return _flow_based(model, V, beyond * orient[:, None], True, vm_p, vm_q)


def finite_difference_sensitivities(
    pf: HorizonPowerFlow, mtu: int | pd.Timestamp | str, buses, delta_mw: float = 1e-5
) -> Sensitivities:
    """Sensitivities of the given bus columns by central differences of pandapower AC power flows.

    The reference that every method is tested against: for each bus, a small
    sgen of +/- ``delta_mw`` (then +/- ``delta_mw`` Mvar) is added and
    ``pandapower.runpp`` is solved to 1e-10 MVA.
    """
    import pandapower as pp

    t = pf.mtu_position(mtu)
    buses = pd.Index(list(buses), name="bus")
    branches = pf.model.branches

    def solve(bus: int, p_mw: float, q_mvar: float) -> tuple[np.ndarray, np.ndarray]:
        net = pf.operating_point(t)
        pp.create_sgen(net, bus, p_mw=p_mw, q_mvar=q_mvar)
        pp.runpp(net, tolerance_mva=1e-10, numba=False)
        loading = pandapower_loading_percent(net, branches).to_numpy()
        return loading, net.res_bus.vm_pu.reindex(pf.model.buses).to_numpy()

    out = {
        name: np.zeros(
            (len(branches) if name.startswith("loading") else len(pf.model.buses), len(buses))
        )
        for name in ("loading_p", "loading_q", "vm_p", "vm_q")
    }
    for j, bus in enumerate(buses):
        for kind, (dp, dq) in (("p", (delta_mw, 0.0)), ("q", (0.0, delta_mw))):
            up_l, up_v = solve(int(bus), dp, dq)
            dn_l, dn_v = solve(int(bus), -dp, -dq)
            out[f"loading_{kind}"][:, j] = (up_l - dn_l) / (2 * delta_mw)
            out[f"vm_{kind}"][:, j] = (up_v - dn_v) / (2 * delta_mw)
    rows = {"loading": branches, "vm": pf.model.buses.rename("bus")}
    frames = {
        name: pd.DataFrame(values, index=rows[name.split("_")[0]].copy(), columns=buses)
        for name, values in out.items()
    }
    return Sensitivities(method="finite_difference", time=pf.times[t], isolated_buses=(), **frames)


def sensitivity_error(
    estimate: Sensitivities, reference: Sensitivities, significant: float = 0.05
) -> dict[str, float]:
    """Largest relative error of the significant entries, per matrix.

    An entry is significant when its reference magnitude is at least
    ``significant`` times the largest of that matrix (and above 1e-9). Only the
    reference's columns are compared. A matrix with no significant entry gives NaN.
    """
    out = {}
    for name in ("loading_p", "loading_q", "vm_p", "vm_q"):
        ref = getattr(reference, name)
        est = getattr(estimate, name).reindex(index=ref.index, columns=ref.columns).to_numpy()
        ref = ref.to_numpy()
        mask = np.abs(ref) >= max(significant * np.abs(ref).max(initial=0.0), 1e-9)
        out[name] = (
            float(np.max(np.abs(est[mask] - ref[mask]) / np.abs(ref[mask])))
            if mask.any()
            else float("nan")
        )
    return out
