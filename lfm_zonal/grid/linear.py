"""The linearised grid of the MTUs to clear, seen through K market areas.

Per MTU t, element row r and area a: the base-point loading and voltage and their
sensitivities to an area's active and reactive injection (Jacobian sensitivities of
the nodal model, spread over each area's buses by its weights W). The clearing LP takes
its grid rows from here; a sequential LP re-linearises at the AC point of its last round.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from lfm_zonal.grid.powerflow import HorizonPowerFlow
from lfm_zonal.grid.sensitivity import LinearisationCache, sensitivity_arrays
from lfm_zonal.grid.violations import (
    VIOLATION_TOLERANCE_LOADING_PERCENT,
    VIOLATION_TOLERANCE_VM_PU,
    beyond_limits,
)
from lfm_zonal.limits import require_memory


@dataclass(frozen=True)
class LinearGrid:
    """The linearised grid of the MTUs to clear, seen through K market areas.

    Arrays are indexed [MTU position in ``mtus``, element, area].
    """

    mtus: np.ndarray
    dt_h: float
    branches: pd.MultiIndex
    buses: pd.Index
    loading0: np.ndarray  # (T, n_branch) loading_percent at the base point
    vm0: np.ndarray  # (T, n_bus)
    sl_p: np.ndarray  # (T, n_branch, K) loading_percent per MW
    sl_q: np.ndarray
    sv_p: np.ndarray  # (T, n_bus, K) p.u. per MW
    sv_q: np.ndarray
    loading_max_percent: float
    vm_min_pu: float
    vm_max_pu: float
    #: (T, rows) the MW-equivalent unit of each row's slack; None: the row's own largest
    #: coefficient. A sequential LP fixes it at the base case, so that every round prices
    #: a violation alike.
    scales: np.ndarray | None = None

    @property
    def k(self) -> int:
        return self.sl_p.shape[2]

    def after(self, p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Linearised loading and voltage after area injections p, q (T x K)."""
        loading = (
            self.loading0
            + np.einsum("tlk,tk->tl", self.sl_p, p)
            + np.einsum("tlk,tk->tl", self.sl_q, q)
        )
        vm = (
            self.vm0 + np.einsum("tmk,tk->tm", self.sv_p, p) + np.einsum("tmk,tk->tm", self.sv_q, q)
        )
        return loading, vm

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

    def row_scales(self) -> np.ndarray:
        """Per MTU and row of the violation layout (T x (n_branch + 2 n_bus)): the row's largest
        |sensitivity| to an area injection, so that an excess / scale is the MW of the most
        effective flexibility that would remove it (the unit of the LP's slacks)."""
        if self.scales is not None:
            return self.scales
        sv = row_scale(self.sv_p, self.sv_q)
        return np.concatenate([row_scale(self.sl_p, self.sl_q), sv, sv], axis=1)

    def select(self, keep: np.ndarray) -> LinearGrid:
        """The same grid on the MTUs where ``keep`` (one flag per MTU) is true."""
        if np.all(keep):
            return self
        arrays = ("mtus", "loading0", "vm0", "sl_p", "sl_q", "sv_p", "sv_q")
        kept = {name: getattr(self, name)[keep] for name in arrays}
        return replace(self, **kept, scales=None if self.scales is None else self.scales[keep])

    def shifted(self, p: np.ndarray, q: np.ndarray) -> LinearGrid:
        """The same grid with the base point moved by area injections p, q."""
        loading, vm = self.after(p, q)
        return replace(self, loading0=loading, vm0=vm)


def linear_grid(
    pf: HorizonPowerFlow,
    W: np.ndarray | sp.spmatrix,
    sensitivity_method: str,
    mtus,
    V: np.ndarray | None = None,
    p_prev: np.ndarray | None = None,
    q_prev: np.ndarray | None = None,
    scales: np.ndarray | None = None,
    cache: LinearisationCache | None = None,
) -> LinearGrid:
    """The grid of the MTUs to clear, linearised in K market areas.

    ``W`` (internal bus x area) spreads an area's injection over its buses: the zones'
    aggregation matrix, the identity for the nodal market.

    By default at the base case; given internal voltages ``V`` (one row per MTU to
    clear) of an AC point reached with area injections ``p_prev``, ``q_prev``, the
    linearisation is taken there and shifted so that it is exact at p_prev, q_prev
    (one step of a sequential LP). Zonal indices are recomputed at every MTU. ``scales``
    fixes the MW-equivalent unit of the slacks (``LinearGrid.scales``). ``cache`` (of
    ``pf.model``) keeps the Jacobian linearisations for the next market at the same points.
    """
    mtus = np.asarray(list(mtus), dtype=np.int64)
    model = pf.model
    V = pf.V[mtus] if V is None else V
    K = W.shape[1]
    T, n_l, n_b = len(mtus), len(model.branches), len(model.buses)
    # Dense rows over the areas, four arrays; a sequential LP holds up to three of these grids
    # (the base case, its best round and the current one).
    require_memory(
        f"grid {pf.grid.name}: the linearised grid of {T} MTUs in {K} market areas",
        [
            [(T, "MTUs"), (n_l, "branches"), (K, "areas"), (2, "arrays"), (3, "grids")],
            [(T, "MTUs"), (n_b, "buses"), (K, "areas"), (2, "arrays"), (3, "grids")],
        ],
        hint="clear fewer MTUs, or zones instead of the nodal market",
    )
    # Filled MTU by MTU (nodal on 1000 buses: 168 MB per array and 21 MTUs, no copies).
    sl_p, sl_q = np.empty((T, n_l, K)), np.empty((T, n_l, K))
    sv_p, sv_q = np.empty((T, n_b, K)), np.empty((T, n_b, K))
    # One BLAS thread: the solves are small (a few hundred states), and OpenBLAS's threads,
    # spinning for a core on a busy 2-core machine, made them 400x slower (0.2 s instead of
    # 0.5 ms per MTU on SimBench MV, measured with other processes running).
    with threadpool_limits(1, user_api="blas"):
        for i in range(T):
            s = sensitivity_arrays(model, V[i], sensitivity_method, W, cache)
            sl_p[i], sl_q[i], sv_p[i], sv_q[i] = s.loading_p, s.loading_q, s.vm_p, s.vm_q
    loading0 = model.loading_percent(V).reshape(len(mtus), n_l)
    vm0 = model.vm_pu(V).reshape(len(mtus), n_b)
    if p_prev is not None:
        q_prev = np.zeros_like(p_prev) if q_prev is None else q_prev
        loading0 = (
            loading0 - np.einsum("tlk,tk->tl", sl_p, p_prev) - np.einsum("tlk,tk->tl", sl_q, q_prev)
        )
        vm0 = vm0 - np.einsum("tmk,tk->tm", sv_p, p_prev) - np.einsum("tmk,tk->tm", sv_q, q_prev)
    g = pf.grid
    return LinearGrid(
        mtus=mtus,
        dt_h=pf.profiles.horizon.mtu_hours,
        branches=model.branches,
        buses=model.buses,
        loading0=loading0,
        vm0=vm0,
        sl_p=sl_p,
        sl_q=sl_q,
        sv_p=sv_p,
        sv_q=sv_q,
        loading_max_percent=g.loading_max_percent,
        vm_min_pu=g.vm_min_pu,
        vm_max_pu=g.vm_max_pu,
        scales=scales,
    )


def row_scale(cp: np.ndarray, cq: np.ndarray) -> np.ndarray:
    """Per row, its largest |coefficient| on active power over the areas (the last axis): a
    slack / scale is MW of the most effective flexibility, as the residual of the AC check
    (``validation.residual_violations``) counts it. A row that P does not move falls back
    to its largest Q coefficient, then to 1."""
    scale_p = np.abs(cp).max(axis=-1, initial=0.0)
    scale_q = np.abs(cq).max(axis=-1, initial=0.0)
    return np.where(scale_p > 0, scale_p, np.where(scale_q > 0, scale_q, 1.0))
