"""Grid segmentation (seed 000): connected zones, virtual buses, zonal sensitivity indices.

Buses are clustered by *electrical distance*: each bus is described by its column
of the nodal sensitivity matrices (how an injection there moves every monitored
loading and voltage), each row scaled to the largest magnitude of that row so
that every monitored element counts alike, and the loading and voltage blocks
weighted equally. Zones are connected subgraphs of the grid as switched.

Methods:

``agglomerative`` (default)
    Ward's agglomerative clustering with the grid's adjacency as connectivity
    constraint (scikit-learn's ``ward_tree``): only adjacent clusters merge, so
    every zone is connected. One hierarchy serves every K: :class:`ZoneHierarchy`
    builds it once and cuts it at any K.
``spectral``
    Spectral clustering on a Gaussian affinity of the same distance, restricted to
    grid edges; a zone that comes out disconnected is split into its connected
    pieces and the smallest pieces are merged into their most similar neighbour
    until there are K connected zones.

The **virtual bus** of a zone carries its flexibility; its **sensitivity index** for
each monitored element is the weighted mean of the nodal sensitivities of the
zone's buses: S_zone = S_nodal @ W, W[b, z] = w_b / sum of w in z. Weight
policies: ``capacity`` (flexible capacity at the bus; a zone without any falls
back to uniform), ``uniform``, ``load`` (peak load at the bus). The zone's
**medoid** is the real bus nearest to all others (weighted), for maps.

The **approximation error** of a zone is the weighted mean absolute difference
between its index and its buses' nodal sensitivities, relative to the weighted
mean absolute nodal sensitivity, over all monitored elements: 0 when every bus
of the zone acts like the virtual bus, 1 when the error is as large as the
effect itself. It is computed separately for loading and voltage rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import numpy as np
import pandapower.topology as top
import pandas as pd
import scipy.sparse as sp
from scipy.spatial.distance import cdist

from lfm_zonal.config import SEGMENTATION_METHODS, WEIGHT_POLICIES
from lfm_zonal.errors import InputError
from lfm_zonal.grid.powerflow import HorizonPowerFlow
from lfm_zonal.grid.sensitivity import (
    LinearisationCache,
    SensitivityArrays,
    linearisation,
    one_blas_thread,
    sensitivity_arrays,
)
from lfm_zonal.limits import require_memory
from lfm_zonal.zones.streamed import (
    EXACT_SEGMENTATION_MAX_BUSES,
    SensitivityColumns,
    curve_ks,
    leaf_order,
    sketch_features,
    streamed_curve,
    streamed_error_terms_of,
)

SENSITIVITY_NAMES = ("loading_p", "loading_q", "vm_p", "vm_q")


@dataclass(frozen=True)
class Zones:
    """A partition of the energised buses into ``k`` connected zones numbered 0..k-1.

    Zone numbers follow the smallest pandapower bus index of each zone, so the
    same partition always gets the same numbers.
    """

    k: int
    method: str
    zone_of_bus: pd.Series  # index: bus, value: zone

    @property
    def buses(self) -> pd.Index:
        return self.zone_of_bus.index

    def members(self, zone: int) -> pd.Index:
        return self.zone_of_bus.index[self.zone_of_bus.to_numpy() == zone]

    def shares(self, weights: pd.Series) -> np.ndarray:
        """Each bus's share in its zone: w_b / sum of w over its zone (uniform where that sum is 0)."""
        zone = self.zone_of_bus.to_numpy()
        w = weights.reindex(self.buses).fillna(0.0).to_numpy(float)
        total = np.bincount(zone, weights=w, minlength=self.k)
        count = np.bincount(zone, minlength=self.k)
        return np.where(
            total[zone] > 0, w / np.where(total[zone] > 0, total[zone], 1.0), 1.0 / count[zone]
        )

    def aggregation(self, weights: pd.Series) -> sp.csr_matrix:
        """W (n_bus x k, sparse: one entry per bus): W[b, z] = the share of bus b in zone z."""
        zone = self.zone_of_bus.to_numpy()
        return sp.csr_matrix(
            (self.shares(weights), (np.arange(len(zone)), zone)), shape=(len(zone), self.k)
        )


def _numbered(labels: np.ndarray, buses: pd.Index, k: int, method: str) -> Zones:
    """Renumber cluster labels by the smallest bus of each cluster."""
    order = pd.Series(buses.to_numpy(), index=labels).groupby(level=0).min().sort_values()
    new = pd.Series(np.arange(len(order)), index=order.index)
    return Zones(
        k, method, pd.Series(new.loc[labels].to_numpy(), index=buses.rename("bus"), name="zone")
    )


def nodal_zones(buses: pd.Index) -> Zones:
    """One zone per bus (the nodal market's areas), numbered as any partition: zone z is
    the z-th smallest pandapower bus. No segmentation needed."""
    buses = pd.Index(buses)
    return _numbered(np.arange(len(buses)), buses, len(buses), "nodal")


def bus_graph(net, buses: pd.Index) -> nx.Graph:
    """Graph of the energised ``buses`` of ``net`` as switched (open switches and
    out-of-service elements respected)."""
    graph = top.create_nxgraph(
        net, respect_switches=True, include_out_of_service=False, multi=False
    )
    return nx.Graph(graph.subgraph(buses))


def electrical_features(sens: SensitivityArrays) -> np.ndarray:
    """Bus feature vectors (one row per bus): normalised columns of d loading/dP and d vm/dP."""
    blocks = []
    for matrix in (sens.loading_p, sens.vm_p):
        scale = np.abs(matrix).max(axis=1, keepdims=True)
        rows = np.divide(matrix, scale, out=np.zeros_like(matrix), where=scale > 0)
        rows = rows[(scale > 0).ravel()]
        if len(rows):
            blocks.append(rows / np.sqrt(len(rows)))  # each block weighs the same
    return np.vstack(blocks).T if blocks else np.zeros((sens.vm_p.shape[1], 1))


def zone_count_problem(
    k, n_buses: int, n_parts: int = 1, name: str = "the grid", label: str = "number of zones K"
) -> str | None:
    """What is wrong with the zone count ``k`` (called ``label``) on grid ``name`` of
    ``n_buses`` energised buses in ``n_parts`` separate parts; None: nothing. The one rule
    of zone counts: every part has a zone of its own, every zone a bus."""
    if int(k) != k or not 1 <= k <= n_buses:
        return (
            f"{label} = {k} is out of range: the grid has {n_buses} energised buses, "
            f"so {max(n_parts, 1)} <= K <= {n_buses}"
        )
    if k < n_parts:
        return (
            f"{label} = {k} is below the {n_parts} separate parts of grid {name}: "
            f"choose K >= {n_parts}"
        )
    return None


def _check_k(k: int, n: int, n_parts: int = 1, name: str = "the grid") -> None:
    problem = zone_count_problem(k, n, n_parts, name)
    if problem:
        raise InputError(problem)


def _connectivity(buses: pd.Index, graph: nx.Graph) -> sp.csr_matrix:
    """Adjacency of the buses (positions in ``buses``) with the diagonal set."""
    n = len(buses)
    position = pd.Series(np.arange(n), index=buses)
    edges = np.array(
        [(position[a], position[b]) for a, b in graph.edges() if a != b], dtype=np.int64
    ).reshape(-1, 2)
    connectivity = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return (connectivity + connectivity.T + sp.eye(n)).tocsr()


def grid_parts(buses: pd.Index, graph: nx.Graph) -> np.ndarray:
    """The separate part of the energised grid (as switched) of each bus, numbered by the
    first bus of each part in ``buses`` order."""
    return sp.csgraph.connected_components(_connectivity(pd.Index(buses), graph))[1]


class ZoneHierarchy:
    """One contiguity-constrained Ward hierarchy of the buses, cut at any K >= the number of
    separate parts of the grid.

    A grid of several parts (substations not connected as switched) gets one Ward tree per
    part; their merges are combined by merge distance (Ward's sqrt(2 x increase of
    within-cluster variance), comparable across parts: the same features), each part's
    merges keeping their own order. The result is one hierarchy: cuts are nested, every
    part keeps at least one zone, and K = number of parts gives one zone per part.
    """

    def __init__(
        self, buses: pd.Index, features: np.ndarray, graph: nx.Graph, name: str = "the grid"
    ) -> None:
        import heapq

        from sklearn.cluster import ward_tree

        self.buses = pd.Index(buses)
        self.name = name
        n = len(self.buses)
        connectivity = _connectivity(self.buses, graph)
        self.n_parts, self.part = sp.csgraph.connected_components(connectivity)
        trees = []  # per part: its buses (positions), children and merge distances
        for p in range(self.n_parts):
            idx = np.flatnonzero(self.part == p)
            if len(idx) < 2:
                continue
            children, _, _, _, distance = ward_tree(
                features[idx], connectivity=connectivity[idx][:, idx], return_distance=True
            )
            trees.append((idx, children, distance))
        # k-way merge of the parts' merge sequences by distance (ties: part, then step).
        heap = [(float(d[0]), t, 0) for t, (_, _, d) in enumerate(trees)]
        heapq.heapify(heap)
        node_of = [{} for _ in trees]  # per tree: local merge node -> global node
        children = []
        while heap:
            _, t, step = heapq.heappop(heap)
            idx, local, distance = trees[t]
            pair = []
            for c in local[step]:
                c = int(c)
                pair.append(int(idx[c]) if c < len(idx) else node_of[t][c])
            node_of[t][len(idx) + step] = n + len(children)
            children.append(pair)
            if step + 1 < len(local):
                heapq.heappush(heap, (float(distance[step + 1]), t, step + 1))
        self.children = np.array(children, dtype=np.int64).reshape(-1, 2)

    def labels(self, k: int) -> np.ndarray:
        """Cluster labels (internal node ids) of every bus after the first N - K merges."""
        n = len(self.buses)
        steps = n - k
        parent = np.arange(n + steps)
        parent[self.children[:steps].ravel()] = np.repeat(n + np.arange(steps), 2)
        while True:  # pointer jumping to each bus's root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                return parent[:n]
            parent = nxt

    def cut(self, k: int) -> Zones:
        _check_k(k, len(self.buses), self.n_parts, self.name)
        return _numbered(self.labels(k), self.buses, k, "agglomerative")


def spectral_zones(
    buses: pd.Index, features: np.ndarray, graph: nx.Graph, k: int, seed: int = 0
) -> Zones:
    """Spectral clustering on grid edges, repaired into exactly k connected zones."""
    from sklearn.cluster import SpectralClustering

    n = len(buses)
    _check_k(k, n)
    if k in (1, n):
        return _numbered(
            np.zeros(n, int) if k == 1 else np.arange(n), pd.Index(buses), k, "spectral"
        )
    position = pd.Series(np.arange(n), index=buses)
    a, b = (
        np.array([position[u] for u, v in graph.edges()]),
        np.array([position[v] for u, v in graph.edges()]),
    )
    dist2 = ((features[a] - features[b]) ** 2).sum(axis=1)
    sigma2 = np.median(dist2[dist2 > 0]) if (dist2 > 0).any() else 1.0
    aff = np.exp(-dist2 / sigma2) + 1e-9
    affinity = sp.coo_matrix((np.r_[aff, aff], (np.r_[a, b], np.r_[b, a])), shape=(n, n)).tocsr()
    labels = SpectralClustering(
        n_clusters=k, affinity="precomputed", random_state=seed, assign_labels="cluster_qr"
    ).fit_predict(affinity)
    # Repair: split disconnected clusters into connected pieces, then merge the smallest
    # piece into its most similar neighbouring piece until k pieces remain.
    g = nx.relabel_nodes(graph, dict(zip(buses, range(n), strict=True)))
    pieces = []
    for c in np.unique(labels):
        pieces += [set(p) for p in nx.connected_components(g.subgraph(np.flatnonzero(labels == c)))]
    while len(pieces) > k:
        pieces.sort(key=lambda p: (len(p), min(p)))
        small = pieces.pop(0)
        centre = features[list(small)].mean(axis=0)
        neighbours = [
            i for i, p in enumerate(pieces) if any(g.has_edge(u, v) for u in small for v in p)
        ]
        best = min(
            neighbours,
            key=lambda i: (
                np.linalg.norm(features[list(pieces[i])].mean(axis=0) - centre),
                min(pieces[i]),
            ),
        )
        pieces[best] |= small
    out = np.empty(n, int)
    for i, p in enumerate(pieces):
        out[list(p)] = i
    return _numbered(out, pd.Index(buses), k, "spectral")


@dataclass(frozen=True)
class ZonalIndices:
    """Zonal sensitivity indices of one MTU and the segmentation error behind them.

    ``loading_p``: rows (element_type, element), columns zone; ``vm_p``: rows bus,
    columns zone (likewise for Q). ``error``: per zone, relative approximation error
    of loading and voltage rows (see the module docstring) and the zone's weight.
    """

    zones: Zones
    weights: pd.Series
    loading_p: pd.DataFrame
    loading_q: pd.DataFrame
    vm_p: pd.DataFrame
    vm_q: pd.DataFrame
    error: pd.DataFrame
    element_error: pd.DataFrame  # (element) x zone: weighted mean |S_zone - S_bus| in native units

    def overall_error(self) -> dict[str, float]:
        """Weighted over all zones: the relative error of loading rows, of voltage rows, and their mean."""
        return overall_error(self.error)


def overall_error(error: pd.DataFrame) -> dict[str, float]:
    """Capacity-weighted over zones (by bus count where no zone has any weight)."""
    zone_weight = error["weight"] if error["weight"].sum() > 0 else error["buses"].astype(float)
    out = {}
    for name in ("loading", "vm"):
        den = float((zone_weight * error[f"{name}_ref"]).sum())
        out[name] = float((zone_weight * error[f"{name}_abs"]).sum()) / den if den > 0 else 0.0
    out["mean"] = 0.5 * (out["loading"] + out["vm"])
    return out


def _weighted_error(S: np.ndarray, Sz: np.ndarray, zone: np.ndarray, w: np.ndarray, k: int):
    """Per zone: sum_b w_b sum_l |S[l,b] - Sz[l,z]| and sum_b w_b sum_l |S[l,b]|; per element too."""
    diff = np.abs(S - Sz[:, zone])  # rows x buses
    per_bus_abs = diff.sum(axis=0) * w
    per_bus_ref = np.abs(S).sum(axis=0) * w
    abs_z = np.bincount(zone, weights=per_bus_abs, minlength=k)
    ref_z = np.bincount(zone, weights=per_bus_ref, minlength=k)
    wz = np.bincount(zone, weights=w, minlength=k)
    onehot = sp.csr_matrix((w, (np.arange(len(zone)), zone)), shape=(len(zone), k))
    element = np.asarray(diff @ onehot) / np.where(wz > 0, wz, 1.0)
    return abs_z, ref_z, element


def zonal_indices(
    zones: Zones, sens: SensitivityArrays, weights: pd.Series, branches: pd.MultiIndex
) -> ZonalIndices:
    """Zonal indices as the weighted mean of the nodal sensitivities of each zone's buses."""
    zone = zones.zone_of_bus.to_numpy()
    W = zones.aggregation(weights)
    w_eff = zones.shares(weights)  # each bus's share in its zone (sums to 1 per zone)
    frames = {name: getattr(sens, name) @ W for name in ("loading_p", "loading_q", "vm_p", "vm_q")}
    terms = _weighted_error(sens.loading_p, frames["loading_p"], zone, w_eff, zones.k)
    terms += _weighted_error(sens.vm_p, frames["vm_p"], zone, w_eff, zones.k)
    return _assemble(zones, weights, branches, frames, terms)


def streamed_zonal_indices(
    zones: Zones,
    cols: SensitivityColumns,
    frames: SensitivityArrays,
    weights: pd.Series,
    branches: pd.MultiIndex,
) -> ZonalIndices:
    """``zonal_indices`` without the dense nodal matrices: ``frames`` are the zonal indices
    (the nodal sensitivities @ W, solved for the K patterns), the error terms are summed over
    blocks of bus columns of ``cols``."""
    return streamed_zonal_indices_of([(zones, frames)], cols, weights, branches)[0]


def streamed_zonal_indices_of(
    partitions: list[tuple[Zones, SensitivityArrays]],
    cols: SensitivityColumns,
    weights: pd.Series,
    branches: pd.MultiIndex,
) -> list[ZonalIndices]:
    """``streamed_zonal_indices`` of several (zones, frames) with one pass over the bus
    columns (``streamed_error_terms_of``; bitwise the same as one pass each)."""
    shares = [zones.shares(weights) for zones, _ in partitions]
    all_terms = streamed_error_terms_of(
        cols,
        [
            (zones.zone_of_bus.to_numpy(), w_eff, zones.k, frames.loading_p, frames.vm_p)
            for (zones, frames), w_eff in zip(partitions, shares, strict=True)
        ],
    )
    out = []
    for (zones, frames), w_eff, terms in zip(partitions, shares, all_terms, strict=True):
        wz = np.bincount(zones.zone_of_bus.to_numpy(), weights=w_eff, minlength=zones.k)
        abs_l, ref_l, el_l, abs_v, ref_v, el_v = terms
        wz = np.where(wz > 0, wz, 1.0)
        terms = (abs_l, ref_l, el_l / wz, abs_v, ref_v, el_v / wz)
        out.append(
            _assemble(
                zones, weights, branches, {n: getattr(frames, n) for n in SENSITIVITY_NAMES}, terms
            )
        )
    return out


def _assemble(
    zones: Zones, weights: pd.Series, branches: pd.MultiIndex, frames: dict, terms: tuple
) -> ZonalIndices:
    abs_l, ref_l, el_l, abs_v, ref_v, el_v = terms
    buses = zones.buses
    zone = zones.zone_of_bus.to_numpy()
    cols = pd.RangeIndex(zones.k, name="zone")
    error = pd.DataFrame(
        {
            "buses": np.bincount(zone, minlength=zones.k),
            "weight": np.bincount(
                zone, weights=weights.reindex(buses).fillna(0.0).to_numpy(), minlength=zones.k
            ),
            "loading_error": np.divide(abs_l, ref_l, out=np.zeros(zones.k), where=ref_l > 0),
            "vm_error": np.divide(abs_v, ref_v, out=np.zeros(zones.k), where=ref_v > 0),
            "loading_abs": abs_l,
            "loading_ref": ref_l,
            "vm_abs": abs_v,
            "vm_ref": ref_v,
        },
        index=cols,
    )
    element_rows = pd.MultiIndex.from_tuples(
        [("loading_percent_per_mw", *b) for b in branches]
        + [("vm_pu_per_mw", "bus", int(b)) for b in buses],
        names=("quantity", "element_type", "element"),
    )
    element_error = pd.DataFrame(np.vstack([el_l, el_v]), index=element_rows, columns=cols)
    return ZonalIndices(
        zones=zones,
        weights=weights.reindex(buses).fillna(0.0).rename("weight"),
        loading_p=pd.DataFrame(frames["loading_p"], index=branches.copy(), columns=cols),
        loading_q=pd.DataFrame(frames["loading_q"], index=branches.copy(), columns=cols),
        vm_p=pd.DataFrame(frames["vm_p"], index=buses.rename("bus"), columns=cols),
        vm_q=pd.DataFrame(frames["vm_q"], index=buses.rename("bus"), columns=cols),
        error=error,
        element_error=element_error,
    )


def medoids(zones: Zones, features: np.ndarray, weights: pd.Series) -> pd.Series:
    """Per zone: the bus minimising the weighted electrical distance to the zone's buses
    (uniform weights in a zone without any; ties: the smallest bus)."""
    zone = zones.zone_of_bus.to_numpy()
    share = zones.shares(weights)
    out = {}
    for z in range(zones.k):
        idx = np.flatnonzero(zone == z)
        out[z] = int(zones.buses[idx[_medoid(features[idx], share[idx])]])
    return pd.Series(out, name="medoid").rename_axis("zone")


#: Zones up to this many buses: the exact bus x bus distances at once (no screen).
MEDOID_SCREEN_ABOVE = 64


def _medoid(x: np.ndarray, w: np.ndarray) -> int:
    """Row of ``x`` of least weighted Euclidean distance to all rows (weights ``w``):
    ``argmin(cdist(x, x) @ w)``, the first of rows with the same features.

    A large zone is screened first with distances from one matrix product (|a|^2 + |b|^2 -
    2 a.b, BLAS; cdist's pairwise loop took 2 s of the 1000-bus main job at K = 2): every
    row whose screened cost is within the screen's rounding bound of the least is then
    costed exactly as before (cdist rows), so the exact minimiser is always among them.
    """
    n = len(x)
    if n <= MEDOID_SCREEN_ABOVE:
        return int(np.argmin(cdist(x, x) @ w))
    sq = np.einsum("ij,ij->i", x, x)
    with one_blas_thread():  # a screen only: its bits decide nothing
        d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    screened = np.sqrt(np.clip(d2, 0.0, None)) @ w
    # |d2 error| <= 4 m eps max|x|^2 (dot products of m terms), so each distance is off by
    # at most its square root, the weighted sum by sum(|w|) times that; margin x 4.
    bound = np.sqrt(4.0 * x.shape[1] * np.finfo(float).eps * sq.max(initial=0.0))
    margin = 4.0 * (np.abs(w).sum() * bound + np.finfo(float).eps * np.abs(screened).max())
    candidates = np.flatnonzero(screened <= screened.min() + margin)
    exact = cdist(x[candidates], x) @ w
    best = candidates[np.argmin(exact)]
    # Buses of identical features (joined by a bus-bus switch) cost the same: the first.
    return int(candidates[(x[candidates] == x[best]).all(axis=1)].min())


def centroid_medoids(zones: Zones, features: np.ndarray, weights: pd.Series) -> pd.Series:
    """Per zone: the bus nearest the zone's weighted centroid in feature space, i.e. the bus
    minimising the weighted *squared* electrical distance to the zone's buses (O(N x features),
    no bus x bus distances; ties: the first bus in model order)."""
    zone = zones.zone_of_bus.to_numpy()
    share = zones.shares(weights)
    onehot = sp.csr_matrix((share, (zone, np.arange(len(zone)))), shape=(zones.k, len(zone)))
    centroid = np.asarray(onehot @ features)
    dist = ((features - centroid[zone]) ** 2).sum(axis=1)
    order = np.lexsort((np.arange(len(zone)), dist, zone))  # by zone, distance, position
    first = order[np.r_[0, np.flatnonzero(np.diff(zone[order])) + 1]]
    return pd.Series(
        zones.buses[first].astype(int).to_numpy(), index=np.arange(zones.k), name="medoid"
    ).rename_axis("zone")


def bus_weights(
    pf: HorizonPowerFlow, policy: str = "capacity", flexible_capacity_mw: pd.Series | None = None
) -> pd.Series:
    """Per-bus weights of a policy (MW; all buses of ``pf.model.buses``).

    ``capacity`` uses ``flexible_capacity_mw`` when given (the resources' capacity
    per bus); without it, the flexible potential of the grid: each bus's peak
    load plus its installed sgen power over the horizon.
    """
    if policy not in WEIGHT_POLICIES:
        raise InputError(
            f"unknown weight policy '{policy}': choose one of {', '.join(WEIGHT_POLICIES)}"
        )
    buses = pf.model.buses
    net, prof = pf.grid.net, pf.profiles
    if policy == "uniform":
        return pd.Series(1.0, index=buses, name="weight")
    load_peak = prof.load_p_mw.abs().max().groupby(net.load.bus).sum()
    if policy == "load":
        return load_peak.reindex(buses).fillna(0.0).rename("weight")
    if flexible_capacity_mw is not None:
        return flexible_capacity_mw.reindex(buses).fillna(0.0).rename("weight")
    sgen_peak = prof.sgen_p_mw.abs().max().groupby(net.sgen.bus).sum()
    return load_peak.add(sgen_peak, fill_value=0.0).reindex(buses).fillna(0.0).rename("weight")


@dataclass(frozen=True)
class Segmentation:
    """Everything segmentation needs at the reference MTU, computed once for any K.

    Exact path (``sens`` set): the dense nodal sensitivities. Streamed path (``columns`` set,
    grids above ``EXACT_SEGMENTATION_MAX_BUSES`` buses): the Jacobian linearisation, sketch
    features, errors summed over blocks of columns (``zones.streamed``).
    """

    pf: HorizonPowerFlow
    reference_mtu: int
    sensitivity_method: str
    sens: SensitivityArrays | None
    features: np.ndarray
    graph: nx.Graph
    weights: pd.Series
    columns: SensitivityColumns | None = None
    reference_rule: str = "given"  # how the reference MTU was chosen (worst, peak, given)

    @property
    def n_buses(self) -> int:
        return len(self.pf.model.buses)

    @property
    def streamed(self) -> bool:
        return self.sens is None

    @cached_property
    def parts(self) -> np.ndarray:
        """The separate part of the grid of each bus (model order)."""
        return grid_parts(self.pf.model.buses, self.graph)

    @property
    def n_parts(self) -> int:
        return int(self.parts.max()) + 1 if len(self.parts) else 0

    @cached_property
    def hierarchy(self) -> ZoneHierarchy:
        """Built on first use, then cut at every K."""
        return ZoneHierarchy(self.pf.model.buses, self.features, self.graph, self.pf.grid.name)

    def zones(self, k: int, method: str = "agglomerative", seed: int = 0) -> Zones:
        """K connected zones; on a grid of several parts each part gets at least one.

        Spectral clustering runs in each part with the part's share of K taken from the
        agglomerative hierarchy's cut at K (its global merge order decides which part gets
        how many zones).
        """
        if method == "agglomerative":
            return self.hierarchy.cut(k)
        if method == "spectral":
            buses = self.pf.model.buses
            _check_k(k, len(buses), self.n_parts, self.pf.grid.name)
            if self.n_parts == 1:
                return spectral_zones(buses, self.features, self.graph, k, seed)
            labels = self.hierarchy.labels(k)
            out = np.empty(len(buses), np.int64)
            offset = 0
            for p in range(self.n_parts):
                idx = np.flatnonzero(self.parts == p)
                k_p = len(np.unique(labels[idx]))
                sub = spectral_zones(
                    buses[idx], self.features[idx], self.graph.subgraph(buses[idx]), k_p, seed
                )
                out[idx] = sub.zone_of_bus.to_numpy() + offset
                offset += k_p
            return _numbered(out, buses, k, "spectral")
        raise InputError(
            f"unknown segmentation method '{method}': choose one of "
            f"{', '.join(SEGMENTATION_METHODS)}"
        )

    @cached_property
    def _reference_indices(self) -> dict:
        """The zonal indices at the reference MTU computed so far, by partition: a study asks
        for each K's several times (the zonal and the needs-based market's error KPI, the
        files), and on a big grid each is a pass over every bus's sensitivity column."""
        return {}

    def indices(self, zones: Zones, mtu: int | None = None) -> ZonalIndices:
        """Zonal indices of ``zones`` at ``mtu`` (default: the reference MTU)."""
        at_reference = mtu is None or mtu == self.reference_mtu
        if at_reference:
            key = _memo_key(zones)
            if key not in self._reference_indices:
                self._reference_indices[key] = self._indices(zones, None)
            return self._reference_indices[key]
        return self._indices(zones, mtu)

    def prime_indices(self, zone_sets: Iterable[Zones]) -> None:
        """Compute the zonal indices at the reference MTU of every partition of ``zone_sets``
        not yet in the memo, so that later ``indices``/``error`` calls find them there.

        On the streamed path all of them take one pass over the bus columns
        (``streamed_zonal_indices_of``, bitwise the results of one pass each): the column
        solves are most of the cost; synthetic_radial_10000 at K = 1, 4, 16, 64 took 30 s
        of CPU one K after another, 12.6 s at once. The exact path computes them one by one
        (cheap there).
        """
        todo = {}
        for zones in zone_sets:
            key = _memo_key(zones)
            if key not in self._reference_indices:
                todo.setdefault(key, zones)
        if not todo:
            return
        if not self.streamed:
            for key, zones in todo.items():
                self._reference_indices[key] = self._indices(zones, None)
            return
        partitions = [
            (zones, self.columns.zonal(zones.aggregation(self.weights))) for zones in todo.values()
        ]
        computed = streamed_zonal_indices_of(
            partitions, self.columns, self.weights, self.pf.model.branches
        )
        self._reference_indices.update(zip(todo, computed, strict=True))

    def _indices(self, zones: Zones, mtu: int | None) -> ZonalIndices:
        at_reference = mtu is None or mtu == self.reference_mtu
        branches = self.pf.model.branches
        if not self.streamed:
            sens = (
                self.sens
                if at_reference
                else sensitivity_arrays(self.pf.model, self.pf.V[mtu], self.sensitivity_method)
            )
            return zonal_indices(zones, sens, self.weights, branches)
        V = self.pf.V[self.reference_mtu if at_reference else mtu]
        cols = self.columns if at_reference else SensitivityColumns(linearisation(self.pf.model, V))
        frames = cols.zonal(zones.aggregation(self.weights))
        return streamed_zonal_indices(zones, cols, frames, self.weights, branches)

    def error(self, zones: Zones) -> float:
        """The overall segmentation error of ``zones`` at the reference MTU: the mean of its
        loading and voltage parts (``overall_error``; a market's KPI)."""
        return overall_error(self.indices(zones).error)["mean"]

    def medoids(self, zones: Zones) -> pd.Series:
        """Each zone's medoid bus at the reference MTU (for maps): on the exact path the bus
        of least weighted distance to its zone, on the streamed path the bus nearest the
        zone's weighted centroid (least weighted squared distance)."""
        if self.streamed:
            return centroid_medoids(zones, self.features, self.weights)
        return medoids(zones, self.features, self.weights)

    def error_curve(self, ks=None, method: str = "agglomerative") -> pd.DataFrame:
        """Overall segmentation error against K at the reference MTU (default: every K from
        the number of separate grid parts to N; on the streamed path ``CURVE_POINTS``
        log-spaced values of K).

        For the agglomerative method the whole curve is one pass over the hierarchy's
        merges: a merge changes only the merged zone's error terms. On the streamed path it
        is one pass over blocks of bus columns in the hierarchy's leaf order.
        """
        n = self.n_buses
        if method == "agglomerative" and ks is None and not self.streamed:
            curve = self._merge_sweep()
        elif method == "agglomerative" and self.streamed:
            curve = self._streamed_sweep(curve_ks(self.n_parts, n) if ks is None else ks)
        else:
            if ks is None:
                ks = range(self.n_parts, n + 1) if not self.streamed else curve_ks(self.n_parts, n)
            # One BLAS thread: spectral zones on 600 buses (streamed), 28 values of K, 2.6 s
            # instead of 3.2 on an idle machine, 4.4 s instead of 11.7 with both cores busy (as
            # the main job's market workers keep them).
            with one_blas_thread():
                curve = {
                    k: overall_error(self._indices(self.zones(k, method), None).error) for k in ks
                }
        return pd.DataFrame(
            [
                {
                    "k": k,
                    "method": method,
                    "loading_error": e["loading"],
                    "vm_error": e["vm"],
                    "segmentation_error": e["mean"],
                }
                for k, e in sorted(curve.items())
            ]
        )

    def _weights_array(self) -> tuple[np.ndarray, bool]:
        w = self.weights.reindex(self.pf.model.buses).fillna(0.0).to_numpy(float)
        return w, w.sum() <= 0  # as overall_error: zones weigh by bus count without capacity

    def _streamed_sweep(self, ks) -> dict[int, dict[str, float]]:
        n = self.n_buses
        for k in ks:
            _check_k(k, n, self.n_parts, self.pf.grid.name)
        w, by_count = self._weights_array()
        hierarchy = self.hierarchy
        order = leaf_order(hierarchy.children, n)
        curve = {n: np.zeros(4)} if n in ks else {}
        partitions = {}
        for k in ks:
            if k < n:
                labels = hierarchy.labels(k)
                partitions[k] = np.unique(labels, return_inverse=True)[1].ravel()
        curve.update(streamed_curve(self.columns, order, partitions, w, by_count))
        return {k: _as_error(t) for k, t in curve.items()}

    def _merge_sweep(self) -> dict[int, dict[str, float]]:
        n = self.n_buses
        w, by_count = self._weights_array()
        S = (self.sens.loading_p, self.sens.vm_p)

        def terms(members: np.ndarray) -> np.ndarray:
            wz = w[members]
            share = wz / wz.sum() if wz.sum() > 0 else np.full(len(members), 1.0 / len(members))
            weight = float(len(members)) if by_count else float(wz.sum())
            out = []
            for matrix in S:
                block = matrix[:, members]
                Sz = block @ share
                out += [
                    weight * float(np.abs(block - Sz[:, None]).sum(axis=0) @ share),
                    weight * float(np.abs(block).sum(axis=0) @ share),
                ]
            return np.array(out)  # weighted abs_l, ref_l, abs_v, ref_v

        members = {i: np.array([i]) for i in range(n)}
        contrib = {i: terms(members[i]) for i in range(n)}
        total = np.sum(list(contrib.values()), axis=0)
        curve = {n: _as_error(total)}
        for step, (a, b) in enumerate(self.hierarchy.children):
            a, b, node = int(a), int(b), n + step
            members[node] = np.concatenate([members.pop(a), members.pop(b)])
            contrib[node] = terms(members[node])
            total = total - contrib.pop(a) - contrib.pop(b) + contrib[node]
            curve[n - step - 1] = _as_error(total)
        return curve


def _memo_key(zones: Zones) -> tuple:
    """A partition's key in ``Segmentation._reference_indices``: K, its buses and their zones."""
    return (
        zones.k,
        zones.zone_of_bus.index.to_numpy().tobytes(),
        zones.zone_of_bus.to_numpy().tobytes(),
    )


def _as_error(t: np.ndarray) -> dict[str, float]:
    """Loading, voltage and mean error from the weighted terms (abs_l, ref_l, abs_v, ref_v)."""
    loading = t[0] / t[1] if t[1] > 0 else 0.0
    vm = t[2] / t[3] if t[3] > 0 else 0.0
    return {"loading": float(loading), "vm": float(vm), "mean": 0.5 * float(loading + vm)}


def require_converged_reference(pf: HorizonPowerFlow, reference_mtu: int) -> int:
    """The reference MTU's position, refused where its base case did not converge."""
    t = pf.mtu_position(reference_mtu)
    if not pf.converged.iloc[t]:
        raise InputError(f"reference MTU {t} ({pf.times[t]}) has no converged power flow")
    return t


def prepare_segmentation(
    pf: HorizonPowerFlow,
    reference_mtu: int,
    *,
    sensitivity_method: str = "jacobian",
    weight_policy: str = "capacity",
    flexible_capacity_mw: pd.Series | None = None,
    cache: LinearisationCache | None = None,
    reference_rule: str = "given",
    exact_max_buses: int = EXACT_SEGMENTATION_MAX_BUSES,
    graph: nx.Graph | None = None,
) -> Segmentation:
    """Sensitivities, features and graph at the reference MTU (zones are published from there).
    ``graph``: ``bus_graph`` of its grid if already made.

    ``cache`` (of ``pf.model``) shares the reference MTU's linearisation with the markets.
    Above ``exact_max_buses`` energised buses (Jacobian method) the streamed path is taken:
    no dense nodal matrices, sketch features (``zones.streamed``).
    """
    t = require_converged_reference(pf, reference_mtu)
    n = len(pf.model.buses)
    common = {
        "pf": pf,
        "reference_mtu": t,
        "sensitivity_method": sensitivity_method,
        "graph": bus_graph(pf.grid.net, pf.model.buses) if graph is None else graph,
        "weights": bus_weights(pf, weight_policy, flexible_capacity_mw),
        "reference_rule": reference_rule,
    }
    if sensitivity_method == "jacobian" and n > exact_max_buses:
        cols = SensitivityColumns(linearisation(pf.model, pf.V[t], cache))
        with one_blas_thread():
            features = sketch_features(cols)
        return Segmentation(sens=None, features=features, columns=cols, **common)
    rows = len(pf.model.branches) + n
    require_memory(
        f"segmentation of grid {pf.grid.name} ({sensitivity_method} sensitivities)",
        [[(rows, "monitored rows"), (n, "buses"), (5, "arrays")]],
        hint="use the jacobian sensitivity method (streamed above "
        f"{EXACT_SEGMENTATION_MAX_BUSES} buses)",
    )
    # One BLAS thread (grid.sensitivity.one_blas_thread): the solve for every bus's columns took
    # 1-4 s instead of 0.2 s on the 1000-bus feeder with another process running (same bits).
    with one_blas_thread():
        sens = sensitivity_arrays(pf.model, pf.V[t], sensitivity_method, cache=cache)
    return Segmentation(sens=sens, features=electrical_features(sens), **common)
