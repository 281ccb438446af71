"""Segmentation of large grids without the dense bus x bus sensitivity matrices.

On a grid of more than ``EXACT_SEGMENTATION_MAX_BUSES`` energised buses (and the Jacobian
sensitivity method) segmentation never holds d loading/dP and d vm/dP whole (branches x
buses and buses x buses). It works on the Jacobian linearisation at the reference MTU:

* **Columns on demand** (:class:`SensitivityColumns`): the sensitivities of a block of
  ``COLUMN_CHUNK`` buses come from one sparse LU solve with that many right-hand sides;
  S @ X (a zone's mean column) and S^T @ Y (a combination of rows) cost one solve per
  column of X or Y. Memory is O(rows x chunk).
* **Features by a randomized SVD** (:func:`sketch_features`): the normalised sensitivity
  matrix F (buses x monitored rows, each row scaled to its largest magnitude, as
  ``segmentation.electrical_features``) is replaced by its projection on its leading
  ``SKETCH_RANK`` right singular vectors, F V_d (buses x SKETCH_RANK), found with
  (2 x ``SKETCH_POWER_ITERATIONS`` + 2) x (SKETCH_RANK + SKETCH_OVERSAMPLING) solves after
  one pass over the columns for the row maxima. The distances between buses are those of
  F projected on that subspace: exact when F has at most that rank, otherwise the spectral
  tail is dropped. The Gaussian test matrix has a fixed seed (deterministic zones).
* **Errors streamed** (:func:`streamed_error_terms`, :func:`streamed_curve`): the
  segmentation error of a partition is summed over blocks of bus columns against the
  zones' mean columns; those of several partitions (a study's K) in one pass of blocks
  (:func:`streamed_error_terms_of`). The error curve of the Ward hierarchy is computed in
  one pass for ``CURVE_POINTS`` values of K between the number of grid parts and N (every
  zone of every K is a contiguous run of the hierarchy's leaf order, so a block needs only
  the mean columns of zones that cross its edges, found beforehand by one solve each).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import splu

from lfm_zonal.grid.sensitivity import (
    JacobianLinearisation,
    SensitivityArrays,
    in_one_blas_thread,
)

#: Energised buses above which segmentation streams the sensitivities (and the features are
#: a randomized sketch); at or below it the dense exact path is used.
EXACT_SEGMENTATION_MAX_BUSES = 2000
#: Bus columns solved at once in a streamed pass (memory: monitored rows x chunk floats;
#: SuperLU solves slow down sharply beyond about 64 right-hand sides at a time).
COLUMN_CHUNK = 32
#: Rank of the randomized SVD of the normalised sensitivity matrix (feature dimension).
SKETCH_RANK = 256
#: Extra test vectors of the randomized range finder, and its power iterations.
SKETCH_OVERSAMPLING = 16
SKETCH_POWER_ITERATIONS = 2
#: Seed of the sketch's Gaussian test matrix.
SKETCH_SEED = 0
#: Values of K (log-spaced from the number of grid parts to N) of a large grid's error curve.
CURVE_POINTS = 32


@dataclass(frozen=True)
class SensitivityColumns:
    """d loading_percent / d P_mw (``L``, monitored branches x buses) and d vm_pu / d P_mw
    (``V``, buses x buses) of one Jacobian linearisation, in column blocks on demand
    (columns in ``model.buses`` order)."""

    lin: JacobianLinearisation

    @cached_property
    def _forward(self):
        """A factorisation of J itself for the column solves (many right-hand sides with J:
        SuperLU's blocked path; the linearisation holds J^T's, see ``TransposedFactor``):
        on SimBench 1-MVLV-rural-all-0-sw 0.19-0.27 instead of 0.37-0.40 ms a column,
        for one more factorisation (6 ms) per segmentation."""
        return self.lin.lu if self.lin.J is None else splu(sp.csc_matrix(self.lin.J))

    @property
    def n_buses(self) -> int:
        return self.lin.E_p.shape[1]

    @property
    def n_branches(self) -> int:
        return self.lin.dloading_dx.shape[0]

    def _solve(self, rhs, trans: str = "N") -> np.ndarray:
        """J^-1 rhs (J^-T with trans "T") / base_mva, ``COLUMN_CHUNK`` columns at a time."""
        rhs = rhs.toarray() if sp.issparse(rhs) else np.asarray(rhs, dtype=float)
        out = np.empty_like(rhs)
        for j in range(0, rhs.shape[1], COLUMN_CHUNK):
            chunk = np.ascontiguousarray(rhs[:, j : j + COLUMN_CHUNK])
            if trans == "N":
                out[:, j : j + COLUMN_CHUNK] = self._forward.solve(chunk)
            else:
                out[:, j : j + COLUMN_CHUNK] = self.lin.lu.solve(chunk, trans="T")
        return out / self.lin.base_mva

    def _rows(self, dx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.lin.dloading_dx @ dx), np.asarray(self.lin.E_q.T @ dx)

    def block(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The columns of the buses at ``positions``: (L block, V block)."""
        return self.times(self.lin.E_p[:, positions])

    def times(self, patterns, reactive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(L @ patterns, V @ patterns) for patterns (buses x m), or patterns already in the
        state space (states x m); ``reactive``: of d/dQ instead of d/dP."""
        E = self.lin.E_q if reactive else self.lin.E_p
        rhs = patterns if patterns.shape[0] == E.shape[0] else E @ patterns
        return self._rows(self._solve(rhs))

    def zonal(self, W: sp.spmatrix) -> SensitivityArrays:
        """The zonal indices S @ W of all four sensitivities (2 x K solves)."""
        loading_p, vm_p = self.times(W)
        loading_q, vm_q = self.times(W, reactive=True)
        return SensitivityArrays(loading_p, loading_q, vm_p, vm_q)

    def transposed_times(self, y_l: np.ndarray, y_v: np.ndarray) -> np.ndarray:
        """L^T @ y_l + V^T @ y_v (buses x m): one transposed solve per column."""
        seed = np.asarray(self.lin.dloading_dx.T @ y_l) + np.asarray(self.lin.E_q @ y_v)
        return np.asarray(self.lin.E_p.T @ self._solve(seed, trans="T"))

    def blocks(
        self, order: np.ndarray | None = None, size: int = COLUMN_CHUNK
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(start, positions, L block, V block) over every bus in ``order`` (default: model order)."""
        order = np.arange(self.n_buses) if order is None else np.asarray(order)
        for start in range(0, len(order), size):
            positions = order[start : start + size]
            L, V = self.block(positions)
            yield start, positions, L, V


@in_one_blas_thread
def row_maxima(cols: SensitivityColumns) -> tuple[np.ndarray, np.ndarray]:
    """Largest |entry| of every row of L and V (one pass over the columns)."""
    max_l, max_v = np.zeros(cols.n_branches), np.zeros(cols.n_buses)
    for _, _, L, V in cols.blocks():
        np.maximum(max_l, np.abs(L).max(axis=1, initial=0.0), out=max_l)
        np.maximum(max_v, np.abs(V).max(axis=1, initial=0.0), out=max_v)
    return max_l, max_v


@in_one_blas_thread
def sketch_features(
    cols: SensitivityColumns,
    rank: int = SKETCH_RANK,
    oversampling: int = SKETCH_OVERSAMPLING,
    power_iterations: int = SKETCH_POWER_ITERATIONS,
    seed: int = SKETCH_SEED,
) -> np.ndarray:
    """Bus features (buses x at most ``rank``): F V_d, the normalised sensitivity matrix F of
    ``segmentation.electrical_features`` on its leading right singular vectors, by a
    randomized SVD (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1) whose products
    with F and F^T are sparse LU solves."""
    n = cols.n_buses
    scale = []
    for maxima in row_maxima(cols):
        kept = maxima > 0
        scale.append(
            np.divide(1.0, maxima * np.sqrt(kept.sum()), out=np.zeros_like(maxima), where=kept)
        )
    d_l, d_v = scale
    n_rows = int((d_l > 0).sum() + (d_v > 0).sum())
    if n_rows == 0:
        return np.zeros((n, 1))
    m = min(rank + oversampling, n, n_rows)

    def F(x: np.ndarray) -> np.ndarray:  # buses x m
        return cols.transposed_times(d_l[:, None] * x[: len(d_l)], d_v[:, None] * x[len(d_l) :])

    def Ft(y: np.ndarray) -> np.ndarray:  # (branches + buses) x m
        L, V = cols.times(y)
        return np.vstack([d_l[:, None] * L, d_v[:, None] * V])

    rng = np.random.default_rng(seed)
    Y = F(rng.standard_normal((len(d_l) + len(d_v), m)))
    for _ in range(power_iterations):
        Q = _orthonormal(Y)
        Y = F(_orthonormal(Ft(Q)))
    Q = _orthonormal(Y)
    B = Ft(Q).T  # m x rows: Q^T F
    U, s, _ = np.linalg.svd(B, full_matrices=False)
    d = min(rank, len(s))
    return (Q @ U[:, :d]) * s[:d]


def _orthonormal(a: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of ``a`` (economic QR)."""
    from scipy.linalg import qr

    return qr(a, mode="economic", overwrite_a=True, check_finite=False)[0]


def zone_terms(
    zone: np.ndarray, weights: np.ndarray, k: int, by_count: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Each bus's share in its zone (w_b / zone total, uniform where that is 0) and each
    zone's weight in the overall error (its total weight; its bus count when ``by_count``)."""
    total = np.bincount(zone, weights=weights, minlength=k)
    count = np.bincount(zone, minlength=k)
    share = np.where(
        total[zone] > 0, weights / np.where(total[zone] > 0, total[zone], 1.0), 1.0 / count[zone]
    )
    return share, (count.astype(float) if by_count else total)


def streamed_error_terms(
    cols: SensitivityColumns,
    zone: np.ndarray,
    share: np.ndarray,
    k: int,
    Sz_l: np.ndarray,
    Sz_v: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Per zone sum_b share_b sum_rows |S - S_zone| and sum_b share_b sum_rows |S| of L and V,
    and per (row, zone) sum_b share_b |S - S_zone| (``zonal_indices``' terms), summed over
    blocks of columns (one partition: :func:`streamed_error_terms_of`)."""
    return streamed_error_terms_of(cols, [(zone, share, k, Sz_l, Sz_v)])[0]


@in_one_blas_thread
def streamed_error_terms_of(
    cols: SensitivityColumns,
    partitions: list[tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]],
) -> list[tuple[np.ndarray, ...]]:
    """:func:`streamed_error_terms` of several partitions (zone, share, k, Sz_l, Sz_v) in one
    pass of column blocks: each block is solved once and serves every partition.

    The column solves are most of a pass (synthetic_radial_10000: 7-9.5 s of solves, then
    1.4 s of a partition's own terms at K = 1, 2.5 s at K = 64), so a study's K cost one pass
    of solves instead of one each. A partition's terms take the same operations in the same
    order as on its own (the blocks and their columns do not depend on the partitions): the
    results are bitwise the same. Memory: (branches + buses) x k floats per partition for
    the (row, zone) terms, besides the zonal indices the caller holds anyway.
    """
    if not partitions:
        return []
    out = [
        (np.zeros(k), np.zeros(k), np.zeros((cols.n_branches, k)))
        + (np.zeros(k), np.zeros(k), np.zeros((cols.n_buses, k)))
        for _, _, k, _, _ in partitions
    ]  # per partition: abs_l, ref_l, el_l, abs_v, ref_v, el_v
    for _, pos, L, V in cols.blocks():
        sum_abs = (np.abs(L).sum(axis=0), np.abs(V).sum(axis=0))  # the same for every partition
        for (zone, share, k, Sz_l, Sz_v), terms in zip(partitions, out, strict=True):
            z, w = zone[pos], share[pos]
            onehot = sp.csr_matrix((w, (np.arange(len(pos)), z)), shape=(len(pos), k))
            for S, Sz, sum_abs_S, (a, r, el) in (
                (L, Sz_l, sum_abs[0], terms[:3]),
                (V, Sz_v, sum_abs[1], terms[3:]),
            ):
                diff = np.abs(S - Sz[:, z])
                a += np.bincount(z, weights=diff.sum(axis=0) * w, minlength=k)
                r += np.bincount(z, weights=sum_abs_S * w, minlength=k)
                el += np.asarray(diff @ onehot)
    return out


def leaf_order(children: np.ndarray, n: int) -> np.ndarray:
    """Buses in the order of the hierarchy's leaves (left child first, roots by their first
    merge's absence: roots in increasing node id): every cluster is a contiguous run."""
    m = len(children)
    is_child = np.zeros(n + m, bool)
    is_child[children.ravel()] = True
    roots = np.flatnonzero(~is_child)
    out = []
    for root in roots:
        stack = [int(root)]
        while stack:
            node = stack.pop()
            if node < n:
                out.append(node)
            else:
                a, b = children[node - n]
                stack += [int(b), int(a)]
    return np.array(out, dtype=np.int64)


def curve_ks(n_parts: int, n: int, points: int = CURVE_POINTS) -> list[int]:
    """``points`` values of K, log-spaced from n_parts to n (both included)."""
    ks = np.unique(np.round(np.geomspace(n_parts, n, points)).astype(np.int64))
    return sorted({int(k) for k in ks} | {n_parts, n})


@in_one_blas_thread
def streamed_curve(
    cols: SensitivityColumns,
    order: np.ndarray,
    partitions: dict[int, np.ndarray],
    weights: np.ndarray,
    by_count: bool,
    size: int = COLUMN_CHUNK,
) -> dict[int, np.ndarray]:
    """Weighted error terms (abs_l, ref_l, abs_v, ref_v, as ``overall_error`` sums them) of
    several partitions whose zones are contiguous runs of ``order``, in one pass of blocks.

    ``partitions``: K -> zone of each bus (model order). A zone's error depends on its
    buses alone (its mean column, each bus's share in it and weight), so each distinct run
    of ``order`` is computed once, whichever partitions hold it (a hierarchy's zones
    persist from one K to the next), and a run of one bus, its own mean, has none: on
    SimBench 1-MVLV-rural-all-0-sw's 30 values of K, 67k bus columns instead of 159k. A
    block holds ``size`` buses of ``order``; a run inside it gets its mean column from the
    block itself, a run crossing its edge from one solve made beforehand.
    """
    n = len(order)
    edges = np.arange(size, n, size)  # block starts (positions in order) after the first
    runs: dict[tuple[int, int], int] = {}  # (start, end) in order -> run number
    new_runs: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # start, end, shares, weights
    plans = {}  # K -> (its runs of two or more buses, each position's weight in the curve)
    for k, zone in partitions.items():
        z_in_order = zone[order]
        starts = np.r_[0, np.flatnonzero(np.diff(z_in_order)) + 1]  # run starts in order
        ends = np.r_[starts[1:], n]
        if len(starts) != k:
            raise ValueError(f"the zones of K = {k} are not contiguous runs of the leaf order")
        share, zone_weight = zone_terms(zone, weights, k, by_count)
        share, bus_weight = share[order], share[order] * zone_weight[z_in_order]
        mine = []
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            if b - a > 1:
                number = runs.setdefault((a, b), len(runs))
                if number == len(new_runs):
                    new_runs.append((a, b, share[a:b], bus_weight[a:b]))
                mine.append(number)
        plans[k] = (np.asarray(mine, np.int64), bus_weight)
    # The distinct runs in layers of disjoint runs: a block computes each layer's runs in it
    # with a few array operations.
    layers = _layers(new_runs)
    bounds = np.array([(a, b) for a, b, _, _ in new_runs], np.int64).reshape(-1, 2)
    after = np.searchsorted(edges, bounds[:, 0], side="right")  # the first edge after a start
    crossing = (
        np.flatnonzero(
            (after < len(edges)) & (edges[np.minimum(after, len(edges) - 1)] < bounds[:, 1])
        )
        if len(edges)
        else np.zeros(0, np.int64)
    )
    far_of = np.full(len(new_runs), -1)
    far_of[crossing] = np.arange(len(crossing))
    if len(crossing):
        members = [order[bounds[r, 0] : bounds[r, 1]] for r in crossing]
        pat = sp.csc_matrix(
            (
                np.concatenate([new_runs[r][2] for r in crossing]),
                (
                    np.concatenate(members),
                    np.repeat(np.arange(len(crossing)), [len(m) for m in members]),
                ),
            ),
            shape=(n, len(crossing)),
        )
        far_l, far_v = cols.times(pat)
    else:
        far_l, far_v = np.zeros((cols.n_branches, 0)), np.zeros((cols.n_buses, 0))
    diff_l, diff_v = np.zeros(len(new_runs)), np.zeros(len(new_runs))
    ref_l, ref_v = np.zeros(n), np.zeros(n)  # per position in order: sum_rows |S|
    for start, pos, L, V in cols.blocks(order, size):
        stop = start + len(pos)
        ref_l[start:stop], ref_v[start:stop] = np.abs(L).sum(axis=0), np.abs(V).sum(axis=0)
        for at, run, share, weight in layers:
            lo, hi = np.searchsorted(at, [start, stop])
            if lo == hi:
                continue
            local, r = at[lo:hi] - start, run[lo:hi]  # this layer's columns in the block
            cuts = np.r_[0, np.flatnonzero(np.diff(r)) + 1]
            first, far = r[cuts], far_of[r[cuts]]
            spans = np.diff(np.r_[cuts, len(r)])
            for S, far_cols, total in ((L, far_l, diff_l), (V, far_v, diff_v)):
                part = S[:, local]
                Sz = np.add.reduceat(part * share[lo:hi], cuts, axis=1)
                if (far >= 0).any():
                    Sz[:, far >= 0] = far_cols[:, far[far >= 0]]
                part -= np.repeat(Sz, spans, axis=1)
                np.abs(part, out=part)
                total[first] += np.add.reduceat(part.sum(axis=0) * weight[lo:hi], cuts)
    return {
        k: np.array([diff_l[mine].sum(), ref_l @ w, diff_v[mine].sum(), ref_v @ w])
        for k, (mine, w) in plans.items()
    }


def _layers(runs: list[tuple[int, int, np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, ...]]:
    """Runs (start, end, shares, weights) in layers of disjoint runs, each layer as arrays
    over its positions in increasing order: position, run number, share, weight."""
    layers: list[list[int]] = []
    ends: list[int] = []  # each layer's last end
    for number in sorted(range(len(runs)), key=lambda i: runs[i][0]):
        a = runs[number][0]
        for j, end in enumerate(ends):  # the first layer this run fits after
            if end <= a:
                layers[j].append(number)
                ends[j] = runs[number][1]
                break
        else:
            layers.append([number])
            ends.append(runs[number][1])
    out = []
    for members in layers:
        out.append(
            (
                np.concatenate([np.arange(runs[i][0], runs[i][1]) for i in members]),
                np.repeat(members, [runs[i][1] - runs[i][0] for i in members]),
                np.concatenate([runs[i][2] for i in members]),
                np.concatenate([runs[i][3] for i in members]),
            )
        )
    return out
