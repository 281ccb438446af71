"""Feeders hanging off one bus: the exact two-port (here one-port) reduction of the
linearised grid that keeps the nodal LP's rows short.

A *feeder* is a set F of internal buses, none a slack, whose every connection to the rest
of the grid is at one bus m outside F, its *boundary* (an LV grid under its MV/LV trafo,
hung at the trafo's MV bus; the tail of a radial MV feeder). Eliminating F's states from
the linearised power flow J dx = dS (a Schur complement) leaves the rest of the grid
seeing F's injections only as one extra injection at m::

    dS_m,eq = -J_mF J_FF^-1 dS_F        (a P and a Q mismatch: two numbers)

So any quantity whose derivative involves no state of F (a branch with neither end in F,
a bus voltage outside F) moves with F's injections exactly as with that equivalent
injection at m: its coefficient on an injection at a bus of F is its coefficient on P and
Q at m times the *equivalents* alpha (dP_eq / d injection, dQ_eq / d injection), which
``feeder_equivalents`` computes per operating point. The clearing LP then writes such a
row with two coefficients per feeder (on columns P_eq, Q_eq tied to the feeder's steps by
one row each) instead of one per bid step of the feeder (``market.formulation``).

Feeders are found once per network model on the graph of the bus admittance matrix (the
coupling of J): the hanging sets of the block-cut tree rooted at the slack, taken top
down as the largest that hold at most FEEDER_MAX_BUSES buses, and siblings at the same
boundary packed together up to that size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import splu

from lfm_zonal.grid.powerflow import NetworkModel
from lfm_zonal.grid.sensitivity import JacobianLinearisation, model_states

#: Largest feeder (internal buses). A row inside a feeder is written over the feeder's own
#: steps, the rest of the grid's and two per other feeder: a few hundred keeps every row
#: short on SimBench 1-MVLV-rural-all-0-sw (LV grids of 14-128 buses under 91 trafos).
FEEDER_MAX_BUSES = 128
#: Smallest feeder worth its two columns and two rows per MTU.
FEEDER_MIN_BUSES = 4


@dataclass(frozen=True)
class Feeders:
    """Feeders of one network model (internal bus numbering)."""

    of_bus: np.ndarray  # feeder of each internal bus (-1: none, the rest of the grid)
    boundary: np.ndarray  # internal bus each feeder hangs off

    def __len__(self) -> int:
        return len(self.boundary)


def model_feeders(model: NetworkModel) -> Feeders:
    """The feeders of ``model`` (FEEDER_MAX_BUSES, FEEDER_MIN_BUSES; made once per model and
    sizes, kept on it)."""
    max_buses, min_buses = FEEDER_MAX_BUSES, FEEDER_MIN_BUSES
    kept = model.__dict__.setdefault("_feeders", {})  # a frozen dataclass: its __dict__
    key = (max_buses, min_buses)
    if key not in kept:
        kept[key] = find_feeders(model.Ybus, model.ref, max_buses, min_buses)
    return kept[key]


def find_feeders(Ybus: sp.spmatrix, slack: np.ndarray, max_buses: int, min_buses: int) -> Feeders:
    """Feeders on the graph of ``Ybus``'s off-diagonal entries, hung from the slack buses."""
    n = Ybus.shape[0]
    coo = sp.coo_matrix(Ybus)
    off = coo.row != coo.col
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from(zip(coo.row[off].tolist(), coo.col[off].tolist(), strict=True))
    of_bus = np.full(n, -1, np.int64)
    boundary: list[int] = []
    for part in nx.connected_components(graph):
        roots = [int(s) for s in slack if int(s) in part]
        if not roots:
            continue  # not energised from a slack: no rows, no bids
        sub = graph.subgraph(part)
        _hang(sub, roots[0], set(roots), max_buses, min_buses, of_bus, boundary)
    return Feeders(of_bus, np.array(boundary, np.int64))


def _hang(graph, root, slacks, max_buses, min_buses, of_bus, boundary) -> None:
    """Choose feeders in one connected part (block-cut tree rooted at ``root``)."""
    blocks = [sorted(b) for b in nx.biconnected_components(graph)]
    if not blocks:
        return
    cuts = set(nx.articulation_points(graph))
    tree = nx.Graph()  # block i <-> its cut vertices
    for i, block in enumerate(blocks):
        tree.add_node(("b", i))
        tree.add_edges_from((("b", i), ("c", v)) for v in block if v in cuts)
    start = (
        ("c", root) if root in cuts else ("b", next(i for i, b in enumerate(blocks) if root in b))
    )
    parent = dict(nx.bfs_predecessors(tree, start))
    order = list(nx.bfs_tree(tree, start).nodes())  # start first, parents before children
    children: dict = {}
    for node in order[1:]:
        children.setdefault(parent[node], []).append(node)

    def own(node) -> list[int]:  # a block's buses but its parent cut vertex
        kind, ident = node
        if kind == "c":
            return []
        return [v for v in blocks[ident] if node == start or v != parent[node][1]]

    # Per tree node: buses below it, its smallest bus (sibling order), a slack below it.
    size, first, slack = {}, {}, {}
    none = graph.number_of_nodes() + max(graph.nodes)  # above every bus
    for node in reversed(order):
        mine = own(node)
        kids = children.get(node, [])
        size[node] = len(mine) + sum(size[c] for c in kids)
        first[node] = min([*mine, *(first[c] for c in kids)], default=none)
        slack[node] = any(v in slacks for v in mine) or any(slack[c] for c in kids)

    def buses_below(node) -> list[int]:
        out, todo = [], [node]
        while todo:
            x = todo.pop()
            out += own(x)
            todo += children.get(x, [])
        return out

    stack = [start]  # top down, without recursion (a radial feeder is a deep tree)
    while stack:
        node = stack.pop()
        kind, ident = node
        kids = children.get(node, [])
        if kind == "b":
            stack += kids
            continue
        group: list[int] = []  # cut vertex m: the sets hanging off it, packed
        for child in sorted(kids, key=first.__getitem__):
            if slack[child] or size[child] > max_buses:
                stack.append(child)
                continue
            if len(group) + size[child] > max_buses:
                _take(group, ident, min_buses, of_bus, boundary)
                group = []
            group += buses_below(child)
        _take(group, ident, min_buses, of_bus, boundary)


def _take(group: list[int], m: int, min_buses: int, of_bus, boundary) -> None:
    if len(group) >= min_buses:
        of_bus[np.array(group, np.int64)] = len(boundary)
        boundary.append(int(m))


@dataclass(frozen=True)
class FeederStates:
    """Where the feeders sit in a linearisation's state vector (x = [Va(pv, pq), Vm(pq)];
    the P mismatch row of a bus is its Va state, the Q row its Vm state)."""

    states: np.ndarray  # the states of every feeder bus (positions in x)
    feeder_of_state: np.ndarray  # feeder of each of ``states``
    p_row: np.ndarray  # P mismatch row of each feeder's boundary (-1: a slack)
    q_row: np.ndarray  # Q mismatch row (-1: a slack or PV boundary)


def feeder_states(feeders: Feeders, va_state: np.ndarray, vm_state: np.ndarray) -> FeederStates:
    buses = np.flatnonzero(feeders.of_bus >= 0)
    va, vm = va_state[buses], vm_state[buses]
    states = np.r_[va[va >= 0], vm[vm >= 0]]
    feeder = np.r_[feeders.of_bus[buses][va >= 0], feeders.of_bus[buses][vm >= 0]]
    order = np.argsort(states)
    return FeederStates(
        states[order], feeder[order], va_state[feeders.boundary], vm_state[feeders.boundary]
    )


def feeder_equivalents(J: sp.spmatrix, fs: FeederStates) -> np.ndarray | None:
    """The equivalent injections at each feeder's boundary per unit injection in its
    states' mismatch rows (2 x n_states: the P equivalent, then the Q one; zero outside
    the feeders and where the boundary has no such row): -J_mF J_FF^-1, for every feeder
    at once (J_FF is block diagonal over the feeders: two transposed solves). None where
    J_FF is singular (that MTU's rows are then written step by step)."""
    n = J.shape[0]
    out = np.zeros((2, n))
    if len(fs.states) == 0:
        return out
    J = sp.csr_matrix(J)
    J_FF = J[fs.states][:, fs.states].tocsc()
    try:
        lu = splu(J_FF)
    except RuntimeError:  # exactly singular
        return None
    for k, rows in enumerate((fs.p_row, fs.q_row)):
        has = np.flatnonzero(rows >= 0)
        if len(has) == 0:
            continue
        # sum over feeders of J[boundary row, own states]: each entry in one feeder's block
        block = sp.coo_matrix(J[rows[has]][:, fs.states])
        own = fs.feeder_of_state[block.col] == has[block.row]
        rhs = np.zeros(len(fs.states))
        np.add.at(rhs, block.col[own], block.data[own])
        out[k, fs.states] = -lu.solve(rhs, trans="T")
    return out


@dataclass(frozen=True)
class AreaFeeders:
    """The feeders as a linear grid's market areas and rows see them (one bus per area: the
    nodal market), and the equivalents of each MTU's linearisation by area."""

    of_area: np.ndarray  # feeder of each area (-1: none)
    boundary_area: np.ndarray  # the area of each feeder's boundary bus
    of_row: np.ndarray  # feeder of each row of the violation layout (-1: outside every one)
    has_p: np.ndarray  # per feeder: its boundary has a P mismatch row (not a slack)
    has_q: np.ndarray  # a Q mismatch row (a PQ bus)
    states: FeederStates = field(repr=False)
    E_pW: sp.csr_matrix = field(repr=False)  # states x areas: P mismatch row of each area
    E_qW: sp.csr_matrix = field(repr=False)

    def __len__(self) -> int:
        return len(self.boundary_area)

    def equivalents(self, lin: JacobianLinearisation) -> np.ndarray:
        """(4, K): dP_eq / dp_a, dP_eq / dq_a, dQ_eq / dp_a, dQ_eq / dq_a of every area a at
        its feeder's boundary, MW per MW (zero outside the feeders); None where the
        feeders' block of J is singular."""
        alpha = feeder_equivalents(lin.J, self.states)  # 2 x states
        if alpha is None:
            return None
        p, q = alpha @ self.E_pW, alpha @ self.E_qW  # 2 x K each
        return np.stack([p[0], q[0], p[1], q[1]])


def area_feeders(model: NetworkModel, W: sp.spmatrix) -> AreaFeeders | None:
    """The feeders of ``model`` by market area, where every area is one bus (``W``'s columns
    are unit vectors) and some feeder's boundary is an area; else None."""
    W = sp.csc_matrix(W)
    if not (np.all(np.diff(W.indptr) == 1) and np.all(W.data == 1.0)):
        return None
    feeders = model_feeders(model)
    if len(feeders) == 0:
        return None
    internal = model.bus_lookup.to_numpy()
    bus_of_area = internal[W.indices]  # internal bus of each area
    area_of_bus = np.full(model.n_bus, -1, np.int64)
    area_of_bus[bus_of_area[::-1]] = np.arange(len(bus_of_area))[::-1]  # first area of a bus
    boundary_area = area_of_bus[feeders.boundary]
    va_state, vm_state, E_p, E_q = model_states(model)
    # A feeder whose boundary is no area is dropped: its steps stay direct. (One hung off a
    # slack is kept without columns: rows outside it do not move with its steps at all.)
    usable = boundary_area >= 0
    if not usable.any():
        return None
    renumber = np.full(len(feeders) + 1, -1, np.int64)
    renumber[np.flatnonzero(usable)] = np.arange(int(usable.sum()))
    of_bus = renumber[feeders.of_bus]  # -1 stays -1 (renumber[-1])
    kept = Feeders(of_bus, feeders.boundary[usable])
    of_row = np.r_[
        np.maximum(of_bus[model.branch_from], of_bus[model.branch_to]),
        of_bus[internal],
        of_bus[internal],
    ]
    return AreaFeeders(
        of_area=of_bus[bus_of_area],
        boundary_area=boundary_area[usable],
        of_row=of_row,
        has_p=va_state[kept.boundary] >= 0,
        has_q=vm_state[kept.boundary] >= 0,
        states=feeder_states(kept, va_state, vm_state),
        E_pW=sp.csr_matrix(E_p @ W),
        E_qW=sp.csr_matrix(E_q @ W),
    )
