"""AC power flow of every MTU, reusing one network structure over the horizon.

pandapower builds its internal model (``ppci``: Ybus, Yf, Yt, bus types) once,
at the grid as stored. Every MTU then only changes the bus injections, so a
Newton-Raphson on the same matrices, warm-started from the previous MTU, gives
the same answer as ``pandapower.runpp`` (a test checks it to 1e-6) at a fraction
of the cost (``benchmarks/bench_foundation.py``).

The mapping between pandapower indices and internal matrix indices lives in
:class:`NetworkModel` and nowhere else: buses merged by closed bus-bus switches
share one internal index, isolated or out-of-service buses have none.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandapower as pp
import pandas as pd
import scipy.sparse as sp
from pandapower.pypower.idx_brch import BR_R, BR_X, F_BUS, T_BUS
from pandapower.pypower.idx_bus import BASE_KV
from scipy.sparse.linalg import splu, spsolve

try:  # SuperLU's one-shot solve, as spsolve calls it (newton_raphson: without its overhead)
    from scipy.sparse.linalg._dsolve._superlu import gssv as _gssv
except ImportError:  # pragma: no cover
    _gssv = None
from tqdm import tqdm

from lfm_zonal.errors import GridError, InputError, PowerFlowNotConverged
from lfm_zonal.grid.profiles import Profiles
from lfm_zonal.grid.sources import Grid
from lfm_zonal.grid.violations import (
    VIOLATION_TOLERANCE_LOADING_PERCENT,
    VIOLATION_TOLERANCE_VM_PU,
    excess,
)

log = logging.getLogger(__name__)

#: Row labels of branch tables: (element type, pandapower index).
BRANCH_INDEX_NAMES = ("element_type", "element")
#: A trafo3w is monitored as its three windings, element types ``trafo3w_hv``,
#: ``trafo3w_mv``, ``trafo3w_lv`` with the trafo3w's index: per winding, its side of
#: pandapower's internal star (hv bus -> star, star -> mv bus, star -> lv bus), the end
#: at the winding's bus, its rating and rated voltage.
TRAFO3W_WINDINGS = ("hv", "mv", "lv")


def pandapower_loading_percent(net: pp.pandapowerNet, branches: pd.MultiIndex) -> pd.Series:
    """``loading_percent`` of the monitored ``branches`` ((element_type, element), as
    ``NetworkModel.branches``) from pandapower's results of a solved ``net``: the
    ``res_line`` and ``res_trafo`` values, and each trafo3w winding's loading, of which
    ``res_trafo3w.loading_percent`` is the largest (the winding's current at its bus,
    ``100 i_ka vn_kv sqrt(3) / sn_mva``). The engine's ``NetworkModel.loading_percent``
    reproduces these to the power flow's tolerance (tested)."""
    parts = {
        kind: net[f"res_{kind}"].loading_percent for kind in ("line", "trafo") if len(net[kind])
    }
    if len(net.trafo3w):
        t3, res = net.trafo3w, net.res_trafo3w
        for w in TRAFO3W_WINDINGS:
            parts[f"trafo3w_{w}"] = (
                100.0 * np.sqrt(3) * res[f"i_{w}_ka"] * t3[f"vn_{w}_kv"] / t3[f"sn_{w}_mva"]
            )
    loading = pd.concat(parts) if parts else pd.Series(dtype=float)
    loading.index = loading.index.set_names(BRANCH_INDEX_NAMES)
    return loading.reindex(branches).rename("loading_percent")


def _runpp_or_grid_error(net: pp.pandapowerNet, name: str) -> None:
    """pandapower's power flow; anything but non-convergence is a grid it cannot model."""
    try:
        with np.errstate(all="ignore"):
            _runpp(net)
    except pp.LoadflowNotConverged:
        raise
    except Exception as exc:  # pandapower raises many types for a network it cannot build
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise GridError(
            f"grid {name}: pandapower cannot build its power flow model "
            f"({type(exc).__name__}: {first})"
        ) from None


def _runpp(net: pp.pandapowerNet, **kwargs) -> None:
    """pandapower's power flow without numba: the engine runs it once per grid for the
    structure, and compiling pandapower's kernels for that costs seconds per process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp.runpp(net, numba=False, **kwargs)


@dataclass(frozen=True)
class NetworkModel:
    """The grid in pandapower's internal form, with the index maps both ways.

    ``bus_lookup`` maps every energised pandapower bus to its internal index;
    ``branch_rows`` maps every monitored branch to its internal branch row, with the
    factors that turn branch-end current (p.u.) into ``loading_percent`` exactly as
    pandapower does. Monitored: every line and trafo, and each winding of a trafo3w
    (``TRAFO3W_WINDINGS``: pandapower's ``res_trafo3w.loading_percent`` is the largest of
    its three windings' loadings, each at its own bus).
    """

    base_mva: float
    Ybus: sp.csr_matrix
    Yf: sp.csr_matrix
    Yt: sp.csr_matrix
    ref: np.ndarray
    pv: np.ndarray
    pq: np.ndarray
    V_init: np.ndarray
    Sbus_init: np.ndarray
    bus_lookup: pd.Series  # pandapower bus -> internal index (energised buses only)
    isolated_buses: pd.Index  # in-service buses without connection to a slack
    branches: pd.MultiIndex  # monitored (element_type, element)
    branch_rows: np.ndarray  # internal branch row of each monitored branch
    branch_from: np.ndarray  # internal from/to bus of each monitored branch
    branch_to: np.ndarray
    loading_per_i_from: np.ndarray  # loading_percent per p.u. current at the from end
    loading_per_i_to: np.ndarray
    load_bus: np.ndarray  # internal bus of each load (-1: not energised)
    load_factor: np.ndarray  # scaling x in_service of each load at the build point
    load_p_init: np.ndarray
    load_q_init: np.ndarray
    sgen_bus: np.ndarray
    sgen_factor: np.ndarray
    sgen_p_init: np.ndarray
    sgen_q_init: np.ndarray
    ppci_bus: np.ndarray = field(repr=False)  # pandapower's internal bus and branch tables
    ppci_branch: np.ndarray = field(repr=False)

    @property
    def all_branch_from(self) -> np.ndarray:
        return self.ppci_branch[:, F_BUS].real.astype(np.int64)

    @property
    def all_branch_to(self) -> np.ndarray:
        return self.ppci_branch[:, T_BUS].real.astype(np.int64)

    @property
    def all_branch_r_pu(self) -> np.ndarray:
        return self.ppci_branch[:, BR_R].real.astype(float)

    @property
    def all_branch_x_pu(self) -> np.ndarray:
        return self.ppci_branch[:, BR_X].real.astype(float)

    @cached_property
    def jacobian(self) -> JacobianBuilder:
        return JacobianBuilder(self.Ybus, self.pv, self.pq)

    @property
    def n_bus(self) -> int:
        return self.Ybus.shape[0]

    @property
    def buses(self) -> pd.Index:
        return self.bus_lookup.index

    def sbus(self, load_p_mw, load_q_mvar, sgen_p_mw, sgen_q_mvar) -> np.ndarray:
        """Complex bus injections (p.u.) for given element powers; rows are MTUs."""
        dS_load = (np.atleast_2d(load_p_mw) - self.load_p_init) + 1j * (
            np.atleast_2d(load_q_mvar) - self.load_q_init
        )
        dS_sgen = (np.atleast_2d(sgen_p_mw) - self.sgen_p_init) + 1j * (
            np.atleast_2d(sgen_q_mvar) - self.sgen_q_init
        )
        out = np.tile(self.Sbus_init, (dS_load.shape[0], 1))
        for dS, bus, factor, sign in (
            (dS_load, self.load_bus, self.load_factor, -1.0),
            (dS_sgen, self.sgen_bus, self.sgen_factor, 1.0),
        ):
            ok = bus >= 0
            if ok.any():
                contrib = sign * dS[:, ok] * factor[ok] / self.base_mva
                np.add.at(out.T, bus[ok], contrib.T)
        return out

    @cached_property
    def monitored_admittance(self) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """Yf and Yt restricted to the monitored branches (rows in ``branches`` order)."""
        return sp.csr_matrix(self.Yf[self.branch_rows]), sp.csr_matrix(self.Yt[self.branch_rows])

    def branch_currents(self, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Complex from- and to-end currents (p.u.) of the monitored branches, for internal
        voltages ``V`` of one MTU (n_bus) or of several (rows are MTUs)."""
        Yf, Yt = self.monitored_admittance
        return (Yf @ V.T).T, (Yt @ V.T).T

    def loading_percent(self, V: np.ndarray) -> np.ndarray:
        """pandapower's loading_percent of the monitored branches (one MTU or rows of MTUs)."""
        i_f, i_t = self.branch_currents(V)
        return np.maximum(
            self.loading_per_i_from * np.abs(i_f), self.loading_per_i_to * np.abs(i_t)
        )

    def vm_pu(self, V: np.ndarray) -> np.ndarray:
        """Voltage magnitude of every energised pandapower bus (one MTU or rows of MTUs)."""
        return np.abs(V[..., self.bus_lookup.to_numpy()])


def _internal_without_branches(ppc: dict, lookup: np.ndarray) -> tuple[dict, np.ndarray]:
    """pandapower's internal model of a grid with no energised branch, built by hand, and
    the bus lookup into it.

    pandapower skips the power flow when no line or trafo connects a bus to a slack, and
    keeps no internal model. Every energised bus is then a slack bus (type 3) at its set
    voltage; nothing is monitored and nothing flows. Isolated buses (type 4) get an index
    past the internal ones, as in pandapower's own internal model.
    """
    from pandapower.pypower.idx_bus import BUS_TYPE, NONE, PD, QD, VA, VM

    bus = np.array(ppc["bus"])
    energised = bus[:, BUS_TYPE].real != NONE
    order = np.r_[np.flatnonzero(energised), np.flatnonzero(~energised)]
    position = np.empty(len(bus), np.int64)
    position[order] = np.arange(len(bus))
    bus = bus[energised]
    n = len(bus)
    empty = sp.csr_matrix((0, n), dtype=complex)
    internal = {
        "bus": bus,
        "branch": np.zeros((0, np.shape(ppc["branch"])[1])),
        "branch_is": np.zeros(len(ppc["branch"]), bool),  # none energised: none monitored
        "Ybus": sp.csr_matrix((n, n), dtype=complex),
        "Yf": empty,
        "Yt": empty,
        "ref": np.arange(n, dtype=np.int64),
        "pv": np.zeros(0, np.int64),
        "pq": np.zeros(0, np.int64),
        "V": bus[:, VM].real * np.exp(1j * np.deg2rad(bus[:, VA].real)),
        "Sbus": -(bus[:, PD].real + 1j * bus[:, QD].real) / ppc["baseMVA"],
    }
    return internal, np.where(lookup >= 0, position[np.maximum(lookup, 0)], lookup)


def build_network_model(grid: Grid) -> NetworkModel:
    """Run pandapower once on a copy of the grid and keep its internal model."""
    net = copy.deepcopy(grid.net)
    try:
        _runpp_or_grid_error(net, grid.name)
    except pp.LoadflowNotConverged:
        # The structure is all we need: build it at zero load.
        for element in ("load", "sgen"):
            net[element][["p_mw", "q_mvar"]] = 0.0
        try:
            _runpp_or_grid_error(net, grid.name)
        except pp.LoadflowNotConverged:
            longest = ""
            if len(net.line):  # the usual culprit: a length or impedance in the wrong unit
                i = net.line.length_km.idxmax()
                longest = f" (longest line: line {i}, {net.line.at[i, 'length_km']:g} km)"
            raise GridError(
                f"grid {grid.name}: no AC power flow converges, even at zero load{longest}"
            ) from None
    ppc = net._ppc
    internal = ppc["internal"]
    lookup = np.asarray(net._pd2ppc_lookups["bus"])
    if "bus" not in internal or "branch" not in internal:  # pandapower skipped the power flow
        internal, lookup = _internal_without_branches(ppc, lookup)
    n_int = internal["Ybus"].shape[0]
    in_service_bus = net.bus.index[net.bus.in_service.to_numpy(bool)]
    internal_of = lookup[in_service_bus.to_numpy()]
    energised = (internal_of >= 0) & (internal_of < n_int)
    bus_lookup = pd.Series(internal_of[energised], index=in_service_bus[energised], name="internal")
    isolated = in_service_bus[~energised]
    if len(isolated):
        log.info(
            "grid %s: %d isolated buses have no sensitivity: %s",
            grid.name,
            len(isolated),
            list(isolated[:10]),
        )

    # Branch rows: pandapower's ppc branch order per element, in-service rows kept in ppci.
    branch_is = np.asarray(internal["branch_is"], bool)
    ppci_row = np.cumsum(branch_is) - 1
    ppci_branch = internal["branch"]
    base_kv = internal["bus"][:, BASE_KV].real
    base_mva = ppc["baseMVA"]

    def per_current(vn_kv: float, at_kv: float, rating_mva: float) -> float:
        """loading_percent per p.u. current at a trafo's end: 100 i_ka vn_kv sqrt(3) /
        rating (pandapower's trafo_loading="current"), i_ka = |I_pu| base_mva / (sqrt(3)
        base_kv)."""
        return 100.0 * base_mva * vn_kv / at_kv / rating_mva

    def line(table, idx, f, t) -> tuple[float, float]:
        i_max_ka = table.at[idx, "max_i_ka"] * table.at[idx, "df"] * table.at[idx, "parallel"]
        # loading = 100 i_ka / i_max, i_ka = |I_pu| base_mva / (sqrt(3) base_kv)
        return (
            100.0 * base_mva / (np.sqrt(3) * base_kv[f] * i_max_ka),
            100.0 * base_mva / (np.sqrt(3) * base_kv[t] * i_max_ka),
        )

    def trafo(table, idx, f, t) -> tuple[float, float]:
        rating = table.at[idx, "sn_mva"] * table.at[idx, "parallel"] * table.at[idx, "df"]
        return (
            per_current(table.at[idx, "vn_hv_kv"], base_kv[f], rating),
            per_current(table.at[idx, "vn_lv_kv"], base_kv[t], rating),
        )

    def winding(name: str):
        """A trafo3w winding, loaded at its bus only: the hv winding's internal branch runs
        hv bus -> star, the mv and lv ones star -> their bus."""

        def factors(table, idx, f, t) -> tuple[float, float]:
            at = f if name == "hv" else t
            c = per_current(
                table.at[idx, f"vn_{name}_kv"], base_kv[at], table.at[idx, f"sn_{name}_mva"]
            )
            return (c, 0.0) if name == "hv" else (0.0, c)

        return factors

    # (label, pandapower table, block of its internal rows, loading factors per end):
    # pandapower's internal rows hold every hv winding of the trafo3w, then every mv, then
    # every lv one (results_branch._get_trafo3w_results).
    kinds = [("line", "line", 0, line), ("trafo", "trafo", 0, trafo)]
    kinds += [
        (f"trafo3w_{name}", "trafo3w", block, winding(name))
        for block, name in enumerate(TRAFO3W_WINDINGS)
    ]
    labels, rows, per_from, per_to = [], [], [], []
    for label, element, block, factors in kinds:
        if element not in net._pd2ppc_lookups["branch"] or len(net[element]) == 0:
            continue
        table = net[element]
        start = net._pd2ppc_lookups["branch"][element][0] + block * len(table)
        for pos, idx in enumerate(table.index):
            r = start + pos
            if not bool(table.at[idx, "in_service"]) or not branch_is[r]:
                continue
            row = ppci_row[r]
            f = int(ppci_branch[row, F_BUS].real)
            t = int(ppci_branch[row, T_BUS].real)
            cf, ct = factors(table, idx, f, t)
            labels.append((label, int(idx)))
            rows.append(row)
            per_from.append(cf)
            per_to.append(ct)
    rows = np.asarray(rows, dtype=np.int64)

    def element_map(element: str) -> tuple[np.ndarray, ...]:
        table = net[element]
        lk = lookup[table.bus.to_numpy()]
        on = table.in_service.to_numpy(bool) & net.bus.in_service.reindex(table.bus).to_numpy(bool)
        bus = np.where(on & (lk >= 0) & (lk < n_int), lk, -1).astype(np.int64)
        factor = table.scaling.to_numpy(float) * on
        return bus, factor, table.p_mw.to_numpy(float), table.q_mvar.to_numpy(float)

    load_bus, load_factor, load_p, load_q = element_map("load")
    sgen_bus, sgen_factor, sgen_p, sgen_q = element_map("sgen")
    for element, bus in (("load", load_bus), ("sgen", sgen_bus)):
        cut = (bus < 0) & net[element].in_service.to_numpy(bool)
        if cut.any():
            first = net[element].index[np.flatnonzero(cut)[0]]
            log.warning(
                "grid %s: %d in-service %s(s) have no path to the slack and are left out "
                "(first: %s %s at bus %s)",
                grid.name,
                int(cut.sum()),
                element,
                element,
                first,
                net[element].at[first, "bus"],
            )
    return NetworkModel(
        base_mva=float(ppc["baseMVA"]),
        Ybus=sp.csr_matrix(internal["Ybus"]),
        Yf=sp.csr_matrix(internal["Yf"]),
        Yt=sp.csr_matrix(internal["Yt"]),
        ref=np.asarray(internal["ref"], np.int64),
        pv=np.asarray(internal["pv"], np.int64),
        pq=np.asarray(internal["pq"], np.int64),
        V_init=np.asarray(internal["V"], complex),
        Sbus_init=np.asarray(internal["Sbus"], complex),
        bus_lookup=bus_lookup,
        isolated_buses=isolated,
        branches=pd.MultiIndex.from_tuples(labels, names=BRANCH_INDEX_NAMES),
        branch_rows=rows,
        branch_from=ppci_branch[rows, F_BUS].real.astype(np.int64),
        branch_to=ppci_branch[rows, T_BUS].real.astype(np.int64),
        loading_per_i_from=np.asarray(per_from, float),
        loading_per_i_to=np.asarray(per_to, float),
        load_bus=load_bus,
        load_factor=load_factor,
        load_p_init=load_p,
        load_q_init=load_q,
        sgen_bus=sgen_bus,
        sgen_factor=sgen_factor,
        sgen_p_init=sgen_p,
        sgen_q_init=sgen_q,
        ppci_bus=np.array(internal["bus"]),
        ppci_branch=np.array(ppci_branch),
    )


class JacobianBuilder:
    """The Newton-Raphson Jacobian on a fixed sparsity pattern, filled by vector operations.

    J = d[P(pvpq); Q(pq)] / d[Va(pvpq); Vm(pq)]. With I = Ybus V, its entries are
    (pypower's dSbus_dV) dS/dVa = j diag(V) conj(diag(I) - Ybus diag(V)) and
    dS/dVm = diag(V) conj(Ybus diag(V/|V|)) + conj(diag(I)) diag(V/|V|). The
    pattern of J and where each entry goes are computed once per network; each
    call only evaluates the entries (scipy's generic slicing costs ~4x more).
    """

    def __init__(self, Ybus: sp.csr_matrix, pv: np.ndarray, pq: np.ndarray) -> None:
        Y = sp.csr_matrix(Ybus)
        Y.sort_indices()
        n = Y.shape[0]
        self.Ybus = Y
        self.rows_y = np.repeat(np.arange(n), np.diff(Y.indptr))
        self.cols_y = Y.indices.astype(np.int64)
        self.pvpq = np.r_[pv, pq].astype(np.int64)
        self.pq = np.asarray(pq, np.int64)
        n_pvpq = len(self.pvpq)
        self.n_x = n_pvpq + len(self.pq)
        pos_pvpq = np.full(n, -1)
        pos_pvpq[self.pvpq] = np.arange(n_pvpq)
        pos_pq = np.full(n, -1)
        pos_pq[self.pq] = n_pvpq + np.arange(len(self.pq))
        # Entries: every Ybus entry (i, k), then the diagonal terms (i, i).
        rows = np.r_[self.rows_y, np.arange(n)]
        cols = np.r_[self.cols_y, np.arange(n)]
        blocks = []  # (entry ids, J rows, J cols, takes dS/dVa?, takes real part?)
        for row_pos, col_pos, d_va, real in (
            (pos_pvpq, pos_pvpq, True, True),
            (pos_pvpq, pos_pq, False, True),
            (pos_pq, pos_pvpq, True, False),
            (pos_pq, pos_pq, False, False),
        ):
            ok = (row_pos[rows] >= 0) & (col_pos[cols] >= 0)
            blocks.append((np.flatnonzero(ok), row_pos[rows[ok]], col_pos[cols[ok]], d_va, real))
        j_rows = np.concatenate([b[1] for b in blocks])
        j_cols = np.concatenate([b[2] for b in blocks])
        keys = j_cols * self.n_x + j_rows  # CSC order: by column, then row
        unique, self.target = np.unique(keys, return_inverse=True)
        self.indices = (unique % self.n_x).astype(np.int32)
        self.indptr = np.searchsorted(unique // self.n_x, np.arange(self.n_x + 1)).astype(np.int32)
        self.nnz = len(unique)
        self.blocks = [(ids, d_va, real) for ids, _, _, d_va, real in blocks]
        # The same entries as one gather from [dS/dVa, dS/dVm]: real parts, then imaginary.
        n_va = len(self.rows_y) + n
        real = [ids + (0 if va else n_va) for ids, va, re in self.blocks if re]
        imag = [ids + (0 if va else n_va) for ids, va, re in self.blocks if not re]
        if [re for _, _, re in self.blocks] != [True] * len(real) + [False] * len(imag):
            raise AssertionError("Jacobian blocks: real parts first")  # as built above
        self.take_real = np.concatenate(real)
        self.take_imag = np.concatenate(imag)

    def __call__(self, V: np.ndarray) -> sp.csc_matrix:
        return sp.csc_matrix(
            (self.values(V), self.indices, self.indptr), shape=(self.n_x, self.n_x)
        )

    def values(self, V: np.ndarray, i_bus: np.ndarray | None = None) -> np.ndarray:
        """The Jacobian's nonzeros at ``V`` in CSC order (``i_bus``: Ybus V if known)."""
        Y = self.Ybus.data
        if i_bus is None:
            i_bus = self.Ybus @ V
        yv = Y * V[self.cols_y]
        Vi = V[self.rows_y]
        unit = V / np.abs(V)
        entries = np.concatenate(
            (
                -1j * Vi * np.conj(yv),
                1j * V * np.conj(i_bus),
                Vi * np.conj(Y * unit[self.cols_y]),
                np.conj(i_bus) * unit,
            )
        )
        values = np.concatenate((entries[self.take_real].real, entries[self.take_imag].imag))
        return np.bincount(self.target, weights=values, minlength=self.nnz)

    def solve(self, V: np.ndarray, rhs: np.ndarray, i_bus: np.ndarray | None = None) -> np.ndarray:
        """J(V)^-1 rhs: what ``spsolve(self(V), rhs)`` returns (SuperLU's gssv on the same
        arrays, NaN where J is singular), without building a sparse matrix object each call.

        SuperLU orders the columns (COLAMD, from the pattern alone) on every call; the pattern
        is the network's, so the order is found on the first call and the columns are handed
        over in it, with no ordering of SuperLU's own: the same factorisation, bit for bit,
        about 10% less time (8.2-8.7 -> 7.5-7.7 ms a solve on SimBench
        1-MVLV-rural-all-0-sw, measured on a shared machine)."""
        data = self.values(V, i_bus)
        if _gssv is None:  # pragma: no cover - a SciPy without the private entry point
            return spsolve(sp.csc_matrix((data, self.indices, self.indptr), (self.n_x,) * 2), rhs)
        order = self.__dict__.get("_column_order")
        if order is None:
            J = sp.csc_matrix((data, self.indices, self.indptr), (self.n_x,) * 2)
            try:
                column = splu(J).perm_c  # column j of J goes to position column[j]
            except RuntimeError:  # singular here: ordered another time
                column = None
            if column is not None:
                source = np.argsort(column)  # the ordered matrix's k-th column is J's source[k]
                take = np.concatenate(
                    [np.arange(self.indptr[j], self.indptr[j + 1]) for j in source]
                )
                lengths = np.diff(self.indptr)[source]
                order = self._column_order = (
                    source,
                    take,
                    self.indices[take].astype(np.int32),
                    np.r_[0, np.cumsum(lengths)].astype(np.int32),
                )
        if order is None:  # SuperLU orders them itself (COLAMD)
            source, columns, indices, indptr, options = None, data, self.indices, self.indptr, None
        else:
            source, take, indices, indptr = order
            columns, options = data[take], "NATURAL"
        y, info = _gssv(
            self.n_x,
            self.nnz,
            columns,
            indices,
            indptr,
            np.asarray(rhs, float),
            1,
            options={"ColPerm": options},
        )
        x = y.ravel()
        if source is not None:  # back in J's column order
            x = np.empty(self.n_x)
            x[source] = y.ravel()
        if info != 0:
            x.fill(np.nan)
        return x


#: SuperLU's diag_pivot_thresh for the Jacobians (``TransposedFactor``).
DIAGONAL_PIVOT = 1e-3


class TransposedFactor:
    """J factorised as its transpose (SuperLU of J^T), solving as SuperLU of J would.

    SuperLU solves with its factors' own matrix blockwise over all right-hand sides at
    once, and with the transposed one right-hand side at a time. The rows' transposed
    solves (J^T w = row seed, tens of right-hand sides a call) are most of the solves of a
    nodal market and of the zonal rows at large K: they take the blocked path. On SimBench
    1-MVLV-rural-all-0-sw (10,964 states), per right-hand side: 16 rows 0.18 ms instead
    of 0.37-0.44, one solve with J 0.34 ms instead of 0.6 (Newton's first step, the
    market's state changes); solves with J of many right-hand sides (state sensitivities,
    the segmentation's features) 0.37-0.40 ms instead of 0.19-0.27. Its nodal market (72
    MTUs): the rows' solves 15.1 s -> 9.4 s; the same memory as one factorisation.

    Ordered by minimum degree on the pattern of J + J^T, pivots on the diagonal unless it is
    below a thousandth of its column (SuperLU's setting for a symmetric pattern with a strong
    diagonal, as a power flow Jacobian has). On the same grid, against COLAMD with partial
    pivoting (best of three): L + U 104k -> 77k nonzeros, a factorisation 8.1 -> 6.2 ms (the
    nodal market and zonal K = 64 of benchmarks/bench_scale.py's case A factorise about 600
    times each), the solves about as fast (16 rows 0.21 -> 0.18 ms each).
    """

    def __init__(self, J: sp.spmatrix) -> None:
        self._lu = splu(
            sp.csc_matrix(J.T), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=DIAGONAL_PIVOT
        )
        self.nnz = self._lu.nnz
        self.shape = self._lu.shape

    def solve(self, rhs: np.ndarray, trans: str = "N") -> np.ndarray:
        """J^-1 rhs (``trans`` "N") or J^-T rhs ("T"), as ``SuperLU.solve``."""
        return self._lu.solve(rhs, trans="T" if trans == "N" else "N")


#: Largest |mismatch| (p.u.) at which a Newton-Raphson has converged (every AC power flow).
NR_TOLERANCE_PU = 1e-8


def mismatch(model: NetworkModel, Sbus: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Newton-Raphson mismatch at ``V`` (P at PV and PQ buses, then Q at PQ buses) for
    injections ``Sbus``, and Ybus V."""
    with np.errstate(all="ignore"):
        i_bus = model.Ybus @ V
        mis = V * np.conj(i_bus) - Sbus
    return np.concatenate((mis[model.jacobian.pvpq].real, mis[model.pq].imag)), i_bus


def converged(F: np.ndarray, tol_pu: float = NR_TOLERANCE_PU) -> bool:
    """Whether a mismatch ``F`` is finite and within ``tol_pu``."""
    return bool(np.all(np.isfinite(F)) and np.max(np.abs(F), initial=0.0) < tol_pu)


#: A step with a Jacobian factorised at an earlier point (a chord step) is kept on with
#: while each one divides the largest mismatch by at least this much; after a slower one,
#: Newton-Raphson goes on with a fresh Jacobian every step.
CHORD_MIN_REDUCTION = 4.0
#: Chord steps at most in one power flow.
CHORD_MAX_STEPS = 12
#: Chord steps go on within the tolerance down to this share of it (while they contract):
#: they converge linearly, and end about as close to the solution as Newton's last
#: quadratic step lands (within 1e-9 p.u. of voltage on the test grids).
CHORD_FINAL_SHARE = 1e-2


def newton_raphson(
    model: NetworkModel,
    Sbus: np.ndarray,
    V0: np.ndarray,
    tol_pu: float = NR_TOLERANCE_PU,
    max_iter: int = 30,
    lu0=None,
    first_lu=None,
) -> np.ndarray:
    """Solve the AC power flow for injections ``Sbus`` from ``V0``; raise if it does not converge.

    A modified Newton-Raphson: the Jacobian factorised at V0 (``lu0``, as a linearisation
    at V0 holds it, or factorised by the first step) is kept for the next steps (chord
    steps) while each divides the largest mismatch by CHORD_MIN_REDUCTION or more; from
    the first slower one on (or one that makes it worse: undone), every step factorises
    the Jacobian at its own point (Newton). An AC check or a sequential-LP round starts
    near its solution, where chord steps cost a solve instead of a factorisation; the
    same power flow to the tolerance ``tol_pu`` (chord steps go on to CHORD_FINAL_SHARE
    of it while they contract). On SimBench 1-MVLV-rural-all-0-sw the
    factorisation is most of a Newton step (8 of 10 ms), a chord step under 1 ms.
    ``max_iter`` bounds the Newton steps (CHORD_MAX_STEPS the chord steps).

    ``first_lu`` (without ``lu0``): the Jacobian at V0 already factorised (a cached
    linearisation's, ``TransposedFactor``), taken by the first step instead of the one it
    would make: the same iterations, bit for bit, one factorisation fewer.
    """
    V = V0.copy()
    jacobian = model.jacobian
    pvpq, pq = jacobian.pvpq, model.pq
    n_pvpq = len(pvpq)
    # Ybus V of the mismatch is the Jacobian's I (the builder sorted the model's own arrays)
    same_y = jacobian.Ybus.data is model.Ybus.data and jacobian.Ybus.indices is model.Ybus.indices
    chord, chord_steps, newton_steps = lu0, 0, 0
    largest, before = np.inf, None  # the last chord step's mismatch and starting point
    while True:
        F, i_bus = mismatch(model, Sbus, V)
        size = float(np.max(np.abs(F), initial=0.0)) if np.all(np.isfinite(F)) else np.inf
        slow = before is not None and size * CHORD_MIN_REDUCTION > largest
        if converged(F, tol_pu) and (
            chord is None
            or slow
            or chord_steps >= CHORD_MAX_STEPS
            or size < tol_pu * CHORD_FINAL_SHARE
        ):
            return V
        if chord is not None and (slow or chord_steps >= CHORD_MAX_STEPS):
            chord = None  # Newton from here; from before a chord step that made it worse
            if size > largest:
                V = before
                F, i_bus = mismatch(model, Sbus, V)
        if not np.all(np.isfinite(F)):
            break
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a singular Jacobian: not converged
                if chord is not None:
                    dx = chord.solve(-F)
                    chord_steps += 1
                    largest, before = size, V
                elif newton_steps >= max_iter:  # max_iter Newton steps, as before
                    break
                elif newton_steps == 0 and lu0 is None:  # the first step: kept for the next
                    chord = TransposedFactor(jacobian(V)) if first_lu is None else first_lu
                    dx = chord.solve(-F)
                    newton_steps += 1
                else:
                    dx = jacobian.solve(V, -F, i_bus if same_y else None)
                    newton_steps += 1
        except (RuntimeError, FloatingPointError, np.linalg.LinAlgError):
            break
        if not np.all(np.isfinite(dx)):
            break
        if chord is None:
            before = None
        Va, Vm = np.angle(V), np.abs(V)
        Va[pvpq] += dx[:n_pvpq]
        Vm[pq] += dx[n_pvpq:]
        V = Vm * np.exp(1j * Va)
    raise PowerFlowNotConverged("Newton-Raphson did not converge")


@dataclass(frozen=True)
class HorizonPowerFlow:
    """Base-case AC power flow of every MTU of a horizon.

    ``vm_pu`` (time x bus) and ``loading_percent`` (time x (element_type, element))
    are NaN for an MTU that did not converge; ``converged`` says which did, and
    ``failures`` says why the others did not.
    """

    grid: Grid
    profiles: Profiles
    model: NetworkModel
    V: np.ndarray  # internal complex voltages, one row per MTU
    converged: pd.Series
    vm_pu: pd.DataFrame
    loading_percent: pd.DataFrame
    failures: tuple[str, ...]

    @property
    def times(self) -> pd.DatetimeIndex:
        return self.profiles.horizon.times

    @cached_property
    def Sbus(self) -> np.ndarray:
        """Complex bus injections (p.u.) of every MTU, internal bus order."""
        p = self.profiles
        return self.model.sbus(
            p.load_p_mw.to_numpy(),
            p.load_q_mvar.to_numpy(),
            p.sgen_p_mw.to_numpy(),
            p.sgen_q_mvar.to_numpy(),
        )

    def mtu_position(self, mtu: int | pd.Timestamp | str) -> int:
        """Position of an MTU given by number or by start time."""
        if isinstance(mtu, (int, np.integer)):
            if not 0 <= mtu < len(self.times):
                raise InputError(f"MTU {mtu} is outside the horizon (0 .. {len(self.times) - 1})")
            return int(mtu)
        try:
            ts = pd.Timestamp(mtu)
        except (ValueError, TypeError):
            raise InputError(f"MTU '{mtu}' is neither a number nor a time") from None
        if ts not in self.times:
            raise InputError(f"no MTU of the horizon starts at {ts}")
        return int(self.times.get_loc(ts))

    def operating_point(self, mtu: int | pd.Timestamp | str) -> pp.pandapowerNet:
        """A pandapower net with the loads and sgens of one MTU (a copy; not yet solved)."""
        t = self.mtu_position(mtu)
        net = copy.deepcopy(self.grid.net)
        p = self.profiles
        net.load["p_mw"] = p.load_p_mw.iloc[t].to_numpy()
        net.load["q_mvar"] = p.load_q_mvar.iloc[t].to_numpy()
        net.sgen["p_mw"] = p.sgen_p_mw.iloc[t].to_numpy()
        net.sgen["q_mvar"] = p.sgen_q_mvar.iloc[t].to_numpy()
        return net

    def violations(self) -> pd.DataFrame:
        """Base-case violations per MTU: overloads and voltages outside the band
        (``overloaded_branches`` counts monitored rows: each overloaded trafo3w winding).
        An MTU that did not converge has no state: its counts are missing (pandas' NA, an
        empty cell in a CSV), like its maxima, not 0."""
        over, under, overv = excess(self.grid, self.loading_percent, self.vm_pu)
        loading_max = self.loading_percent.max(axis=1)
        if not self.loading_percent.shape[1]:  # nothing monitored: a converged MTU loads 0 %
            loading_max = loading_max.where(~self.converged, 0.0)

        def count(beyond: pd.DataFrame, tolerance: float) -> pd.Series:
            return (beyond > tolerance).sum(axis=1).astype("Int64").where(self.converged)

        return pd.DataFrame(
            {
                "converged": self.converged,
                "loading_max_percent": loading_max,
                "overloaded_branches": count(over, VIOLATION_TOLERANCE_LOADING_PERCENT),
                "vm_min_pu": self.vm_pu.min(axis=1),
                "vm_max_pu": self.vm_pu.max(axis=1),
                "undervoltage_buses": count(under, VIOLATION_TOLERANCE_VM_PU),
                "overvoltage_buses": count(overv, VIOLATION_TOLERANCE_VM_PU),
            }
        )


def run_horizon(
    grid: Grid, profiles: Profiles, model: NetworkModel | None = None, progress: bool = False
) -> HorizonPowerFlow:
    """AC power flow of every MTU; an MTU that does not converge is reported and skipped."""
    model = model or build_network_model(grid)
    S = model.sbus(
        profiles.load_p_mw.to_numpy(),
        profiles.load_q_mvar.to_numpy(),
        profiles.sgen_p_mw.to_numpy(),
        profiles.sgen_q_mvar.to_numpy(),
    )
    times = profiles.horizon.times
    V = np.full(S.shape, np.nan + 0j)
    ok = np.zeros(len(times), bool)
    failures = []
    V_prev = model.V_init
    for t in tqdm(
        range(len(times)),
        desc="AC power flow",
        unit="MTU",
        disable=None if progress else True,
        leave=False,
    ):
        try:
            V[t] = newton_raphson(model, S[t], V_prev)
        except PowerFlowNotConverged:
            try:  # a warm start can mislead: try once more from the structure's own point
                V[t] = newton_raphson(model, S[t], model.V_init)
            except PowerFlowNotConverged:
                failures.append(f"MTU {t} ({times[t]}): AC power flow did not converge; skipped")
                continue
        ok[t] = True
        V_prev = V[t]
    # One line for the horizon; every MTU is in the table (converged False). Where none
    # converged, the commands refuse the horizon in a line of their own (require_converged).
    if failures and ok.any():
        first = int(np.flatnonzero(~ok)[0])
        log.warning(
            "grid %s: the AC power flow did not converge in %d of %d MTUs, skipped (first: MTU %d "
            "at %s)",
            grid.name,
            len(failures),
            len(times),
            first,
            times[first],
        )
    vm = np.full((len(times), len(model.buses)), np.nan)
    loading = np.full((len(times), len(model.branches)), np.nan)
    if ok.any():
        vm[ok] = model.vm_pu(V[ok])
        loading[ok] = model.loading_percent(V[ok])
    vm_df = pd.DataFrame(vm, index=times, columns=model.buses.rename("bus"))
    loading_df = pd.DataFrame(loading, index=times, columns=model.branches)
    return HorizonPowerFlow(
        grid,
        profiles,
        model,
        V,
        pd.Series(ok, index=times, name="converged"),
        vm_df,
        loading_df,
        tuple(failures),
    )
