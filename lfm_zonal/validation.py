"""AC truth check: apply the dispatched resources to each MTU and run an AC power flow.

The grid sees resources at their real buses, whatever market area they were
cleared in: a zonal market's approximation shows up here as residual overloads,
voltage violations, or violations created where there were none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandapower as pp
import pandas as pd

from lfm_zonal.errors import PowerFlowNotConverged
from lfm_zonal.powerflow import HorizonPowerFlow, newton_raphson


@dataclass(frozen=True)
class ACCheck:
    """AC state of every MTU after the dispatch (MTUs without dispatch keep the base case)."""

    loading_percent: pd.DataFrame  # time x (element_type, element)
    vm_pu: pd.DataFrame  # time x bus
    converged: pd.Series
    failures: tuple[str, ...]


def solve_with_injections(
    pf: HorizonPowerFlow, mtus, bus_p_mw: np.ndarray, bus_q_mvar: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """AC power flow of ``mtus`` with extra injections per bus (rows: MTU, columns: model.buses).

    Warm-started from each MTU's base point; returns internal voltages (NaN rows
    where it did not converge) and a converged mask.
    """
    model = pf.model
    mtus = np.asarray(mtus, dtype=np.int64)
    internal = model.bus_lookup.to_numpy()
    V = np.full((len(mtus), model.n_bus), np.nan + 0j)
    ok = np.zeros(len(mtus), bool)
    for i, t in enumerate(mtus):
        dS = np.zeros(model.n_bus, complex)
        np.add.at(dS, internal, (bus_p_mw[i] + 1j * bus_q_mvar[i]) / model.base_mva)
        try:
            V[i] = newton_raphson(model, pf.Sbus[t] + dS, pf.V[t])
            ok[i] = True
        except PowerFlowNotConverged:
            continue
    return V, ok


def ac_check(pf: HorizonPowerFlow, dispatch: pd.DataFrame) -> ACCheck:
    """AC power flow of every MTU with a dispatch, from its base point (same model as the base case)."""
    model = pf.model
    loading = pf.loading_percent.copy()
    vm = pf.vm_pu.copy()
    converged = pf.converged.copy()
    failures = []
    if dispatch.empty:
        return ACCheck(loading, vm, converged, ())
    mtus = np.array(sorted({int(t) for t in dispatch.mtu}))
    position = pd.Series(np.arange(len(model.buses)), index=model.buses)
    p = np.zeros((len(mtus), len(model.buses)))
    q = np.zeros_like(p)
    row = pd.Series(np.arange(len(mtus)), index=mtus).reindex(dispatch.mtu).to_numpy()
    col = position.reindex(dispatch.bus.to_numpy()).to_numpy()
    np.add.at(p, (row, col), dispatch.p_mw.to_numpy())
    np.add.at(q, (row, col), dispatch.q_mvar.to_numpy())
    V, ok = solve_with_injections(pf, mtus, p, q)
    for i, t in enumerate(mtus):
        if ok[i]:
            loading.iloc[t] = model.loading_percent(V[i])
            vm.iloc[t] = model.vm_pu(V[i])
        else:
            converged.iloc[t] = False
            loading.iloc[t] = np.nan
            vm.iloc[t] = np.nan
            failures.append(
                f"MTU {t} ({pf.times[t]}): AC power flow after dispatch did not converge"
            )
    return ACCheck(loading, vm, converged, tuple(failures))


def dispatched_net(pf: HorizonPowerFlow, dispatch: pd.DataFrame, mtu: int) -> pp.pandapowerNet:
    """A pandapower net of one MTU with the dispatch as extra sgens (for an independent check)."""
    net = pf.operating_point(mtu)
    rows = dispatch[dispatch.mtu == mtu]
    for rec in rows.itertuples():
        pp.create_sgen(
            net,
            int(rec.bus),
            p_mw=float(rec.p_mw),
            q_mvar=float(rec.q_mvar),
            name=f"flex {rec.resource_id}",
        )
    return net


def violation_kpis(pf: HorizonPowerFlow, ac: ACCheck) -> dict[str, float]:
    """Residual overloads and voltage violations after the AC check, and violations created."""
    g = pf.grid
    dt = pf.profiles.horizon.mtu_hours
    over_after = (ac.loading_percent - g.loading_max_percent).clip(lower=0.0)
    over_before = (pf.loading_percent - g.loading_max_percent).clip(lower=0.0)
    dev_after = (g.vm_min_pu - ac.vm_pu).clip(lower=0.0) + (ac.vm_pu - g.vm_max_pu).clip(lower=0.0)
    dev_before = (g.vm_min_pu - pf.vm_pu).clip(lower=0.0) + (pf.vm_pu - g.vm_max_pu).clip(lower=0.0)
    tol_l, tol_v = 1e-6, 1e-9
    created = int(
        ((over_after > tol_l) & ~(over_before > tol_l)).to_numpy().sum()
        + ((dev_after > tol_v) & ~(dev_before > tol_v)).to_numpy().sum()
    )
    return {
        "residual_overload_max_percent": float(
            np.nan_to_num(over_after.to_numpy().max(initial=0.0))
        ),
        "residual_overload_mtu_count": int((over_after > tol_l).any(axis=1).sum()),
        "residual_overload_percent_h": float(over_after.to_numpy().sum() * dt),
        "loading_max_after_percent": float(np.nanmax(ac.loading_percent.to_numpy(), initial=0.0)),
        "vm_min_after_pu": float(np.nanmin(ac.vm_pu.to_numpy(), initial=np.inf)),
        "vm_max_after_pu": float(np.nanmax(ac.vm_pu.to_numpy(), initial=0.0)),
        "residual_voltage_max_pu": float(np.nan_to_num(dev_after.to_numpy().max(initial=0.0))),
        "residual_voltage_mtu_count": int((dev_after > tol_v).any(axis=1).sum()),
        "residual_voltage_pu_h": float(dev_after.to_numpy().sum() * dt),
        "new_violations": created,
        "mtus_not_converged_after": len(ac.failures),
    }
