"""An independent AC OPF reference: pandapower's ``runopp`` (PIPS) over the market's own bids.

For one MTU the reference solves, on the pandapower net of that MTU
(``pf.operating_point``), with every resource r that has MW available::

    min   dt * sum_r ( c_up_r p_up_r + c_down_r p_down_r )                 (EUR)
    s.t.  AC power flow of the whole net (pandapower's model, PIPS)
          0 <= p_up_r <= up_r,   0 <= p_down_r <= down_r                   (availability)
          q_r = tan_phi_r * (p_up_r - p_down_r)                            (power factor of the change)
          vm_min <= |V_b| <= vm_max                      for every bus b    (the grid's band)
          loading_l <= loading_max                       for every line, trafo and trafo3w winding

``up`` raises the net injection at the resource's bus, ``down`` lowers it, as
in the engine's dispatch (``market._dispatch``): each direction is one
controllable sgen, ``p_mw`` in ``[0, up]`` with ``poly_cost`` ``c_up`` or in
``[-down, 0]`` with ``poly_cost`` ``-c_down`` (so its cost ``-c_down p`` is >= 0).
Everything else (loads, sgens, gens, storage of the grid) is not controllable;
the ext_grid is the slack at cost 0. Storage has one MTU only: its MW are capped
by the energy it can deliver or take in that MTU, ``up <= soc0 eta / dt`` and
``down <= (E - soc0) / (eta dt)`` (the engine's storage rows for one MTU).

**Q tied to P.** pandapower's element tables cannot state ``q = tan_phi p``
(``min_q_mvar``/``max_q_mvar`` are constants, and a ``q_capability_characteristic``
is evaluated at the element's *given* P, not at the OPF's). PYPOWER's OPF,
which ``runopp`` calls, does accept extra linear constraints from a
``formulation`` callback (``add_userfcn``, the way pandapower itself ties the two
ends of a DC line). While ``runopp`` runs, ``_tied_q`` wraps the ``opf`` function
``pandapower.optimal_powerflow`` calls and adds, for every flexibility sgen g,
the equality row ``Qg - tan_phi_g Pg = 0`` on PIPS's own variables. So the
constraint is exact, not a fixed-point iteration over Q bounds. The box on Q
(``min_q_mvar``/``max_q_mvar``) is set to the segment's extremes, so it never binds.

**PIPS settings.** ``calculate_voltage_angles=False``: SimBench's HV/MV trafos
have a 150 degree vector group shift; with angles on, PIPS does not converge on
SimBench MV rural (tried at 00:00 and 07:00 of the windy day, flat start or
``init="pf"``). In a grid with one slack and no parallel paths across voltage
levels the shift changes no voltage magnitude, current or loading, so nothing the
market sees changes. ``init="flat"`` (1 p.u., 0 degrees): every MTU's OPF starts
from the same point, independent of any earlier solution (``init="pf"`` reached
the same costs on the MTUs tried). Termination tolerances: ``PIPS_OPTIONS``.
Branch limits are PYPOWER's current limits (``OPF_FLOW_LIM = 2``, runopp's
default), the engine's ``loading_percent`` by current. A trafo3w winding is an internal
branch between its bus and the trafo3w's star point, limited by PYPOWER at both ends,
where pandapower and the engine load it at its bus only: its rating is set so that the
limit falls where the winding's loading at its bus reaches the limit, whatever its tap
or rated voltage (``_winding_limits_at_their_buses``; without it a +5% tap stopped the
reference at 95.2%).

**Verification.** The OPF's dispatch is put back into the net as fixed sgens and
solved by ``runpp``: ``loading_percent`` and ``vm_pu`` of the result come from that
power flow, not from the OPF (``opf_pf_mismatch_pu`` says how far they differ).

``penalty_eur_per_mwh``: like the engine's slack, it makes the problem always
feasible. Every energised bus gets an up and a down "unmet need" sgen (Q = 0) at
that price; what they provide is ``unmet_mw`` and costs ``penalty_cost_eur``
(never part of ``cost_eur``, the bid cost).
"""

from __future__ import annotations

import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandapower as pp
import pandapower.optimal_powerflow as pp_opf
import pandas as pd
import scipy.sparse as sp
from pandapower.pypower.add_userfcn import add_userfcn
from pandapower.pypower.idx_brch import F_BUS, RATE_A, T_BUS, TAP
from pandapower.pypower.idx_bus import BASE_KV

from lfm_zonal.errors import LfmError
from lfm_zonal.grid.powerflow import HorizonPowerFlow, pandapower_loading_percent
from lfm_zonal.grid.violations import excess
from lfm_zonal.market.resources import Resources

#: Availability below this (MW) is no resource in the OPF.
MIN_MW = 1e-6

#: PIPS's termination tolerances (PYPOWER's defaults are 1e-6 and leave ~1e-5 MW on
#: offers that should be 0).
PIPS_OPTIONS = {
    "PDIPM_FEASTOL": 1e-9,
    "PDIPM_GRADTOL": 1e-9,
    "PDIPM_COMPTOL": 1e-9,
    "PDIPM_COSTTOL": 1e-9,
}

_OPF_PATCH_LOCK = threading.Lock()


class OpfReferenceError(LfmError):
    """The OPF reference cannot be set up as asked (names the resource or MTU)."""


@dataclass(frozen=True)
class OpfResult:
    """One MTU's AC OPF over the resources.

    ``dispatch``: one row per resource and direction with MW available (index:
    pandapower index of its OPF sgen), columns resource_id, direction, bus,
    available_mw, price_eur_per_mwh, p_mw (signed change of net injection, as in
    the engine's dispatch), q_mvar, cost_eur. ``loading_percent`` (index
    element_type, element) and ``vm_pu`` (index bus): ``runpp`` of the net with
    that dispatch. NaN everywhere when ``converged`` is False.
    """

    mtu: int
    time: pd.Timestamp
    status: str  # "optimal" | "not converged"
    converged: bool
    cost_eur: float  # sum of price x |p| x dt over the resources (pay as bid)
    penalty_cost_eur: float
    unmet_mw: float
    objective_eur_per_h: float  # pandapower's res_cost (cost per hour, unmet need included)
    dispatch: pd.DataFrame
    loading_percent: pd.Series
    vm_pu: pd.Series
    loading_max_percent: float  # the grid's limits the OPF was solved with
    vm_min_pu: float
    vm_max_pu: float
    opf_pf_mismatch_pu: float  # max |vm_opf - vm_runpp| over buses
    solve_s: float  # runopp alone
    total_s: float  # set-up, runopp and the runpp check

    @property
    def overload_max_percent(self) -> float:
        """Largest loading above the limit after the OPF (0 if none), from the runpp check."""
        return float(np.nanmax(self._excess()[0], initial=0.0))

    @property
    def voltage_violation_max_pu(self) -> float:
        """Largest distance outside the voltage band after the OPF (0 if none)."""
        _, under, overv = self._excess()
        return float(max(np.nanmax(under, initial=0.0), np.nanmax(overv, initial=0.0)))

    def _excess(self) -> tuple[np.ndarray, ...]:
        return excess(self, self.loading_percent.to_numpy(), self.vm_pu.to_numpy())


def flexibility_offers(pf: HorizonPowerFlow, resources: Resources, mtu: int) -> pd.DataFrame:
    """Resource offers of one MTU: resource_id, direction, bus, available_mw, price, tan_phi.

    Storage is capped by the energy it can deliver (up) or take (down) in this MTU alone.
    """
    t = pf.mtu_position(mtu)
    when = pf.times[t]
    table = resources.table
    dt = pf.profiles.horizon.mtu_hours
    rows = []
    for direction, avail in (("up", resources.up_mw), ("down", resources.down_mw)):
        if when not in avail.index:
            raise OpfReferenceError(f"resources have no availability at MTU {t} ({when})")
        mw = avail.loc[when].reindex(table.index).fillna(0.0).to_numpy(float)
        storage = (table.kind == "storage").to_numpy()
        if storage.any():
            eta = table.efficiency.to_numpy(float)[storage]
            soc0 = table.soc_init_mwh.to_numpy(float)[storage]
            energy = table.energy_mwh.to_numpy(float)[storage]
            cap = soc0 * eta / dt if direction == "up" else (energy - soc0) / (eta * dt)
            mw[storage] = np.minimum(mw[storage], np.maximum(cap, 0.0))
        rows.append(
            pd.DataFrame(
                {
                    "resource_id": table.index.to_numpy(),
                    "direction": direction,
                    "bus": table.bus.to_numpy(np.int64),
                    "available_mw": mw,
                    "price_eur_per_mwh": resources.price_eur_per_mwh(direction)[t],
                    "tan_phi": table.tan_phi.to_numpy(float),
                }
            )
        )
    offers = pd.concat(rows, ignore_index=True)
    bad = ~np.isfinite(offers[["available_mw", "price_eur_per_mwh", "tan_phi"]].to_numpy()).all(1)
    if bad.any():
        rid = offers.resource_id[bad].iloc[0]
        raise OpfReferenceError(f"resource {rid!r}: availability, price or tan_phi is not finite")
    return offers[offers.available_mw > MIN_MW].reset_index(drop=True)


def _tie_q_to_p(om, args):
    """PYPOWER ``formulation`` callback: rows Qg - tan_phi Pg = 0 for the given gens."""
    rows, tan_phi = args
    ng = om.get_ppc()["gen"].shape[0]
    n = len(rows)
    i = np.arange(n)
    A = sp.csr_matrix(
        (np.r_[-tan_phi, np.ones(n)], (np.r_[i, i], np.r_[rows, ng + rows])), shape=(n, 2 * ng)
    )
    om.add_constraints("lfm_flex_power_factor", A, np.zeros(n), np.zeros(n), ["Pg", "Qg"])
    return om


def _winding_limits_at_their_buses(net: pp.pandapowerNet, ppci: dict) -> None:
    """A trafo3w winding is an internal branch between its bus and the star point (hv bus
    -> star, star -> mv or lv bus), which PYPOWER limits at both ends to RATE_A (p.u.
    current times baseMVA), where pandapower loads it at its bus only, with its own rated
    voltage: ``100 i_ka vn_kv sqrt(3) / sn_mva``. The limit at the bus is RATE_A x the
    bus's base kV / vn_kv; without shunt, the star end's current is the bus end's times
    the branch's ratio (hv) or divided by it (mv, lv), so RATE_A is set to the bus's
    limit times that factor where it exceeds 1: the star end then binds exactly where the
    bus end reaches the rating, and the bus end's own limit is slack."""
    if "trafo3w" not in net._pd2ppc_lookups["branch"] or not len(net.trafo3w):
        return
    start, end = net._pd2ppc_lookups["branch"]["trafo3w"]
    n = len(net.trafo3w)
    branch_is = np.asarray(ppci["internal"]["branch_is"], bool)
    ppc_rows = np.arange(start, end)[branch_is[start:end]]
    rows = (np.cumsum(branch_is) - 1)[ppc_rows]
    winding, position = np.divmod(ppc_rows - start, n)
    hv = winding == 0
    at = np.where(hv, ppci["branch"][rows, F_BUS].real, ppci["branch"][rows, T_BUS].real)
    base_kv = ppci["bus"][at.astype(np.int64), BASE_KV].real
    vn_kv = net.trafo3w[["vn_hv_kv", "vn_mv_kv", "vn_lv_kv"]].to_numpy(float)[position, winding]
    ratio = np.abs(ppci["branch"][rows, TAP].real)
    ratio = np.where(ratio == 0.0, 1.0, ratio)  # PYPOWER: 0 is a line's ratio 1
    star = np.where(hv, ratio, 1.0 / ratio)
    ppci["branch"][rows, RATE_A] *= base_kv / vn_kv * np.maximum(star, 1.0)


@contextmanager
def _tied_q(net: pp.pandapowerNet, sgens: np.ndarray, tan_phi: np.ndarray):
    """While ``runopp`` runs, add ``Qg = tan_phi Pg`` for ``sgens`` (pandapower sgen indices)."""
    real_opf = pp_opf.opf

    def opf(ppci, ppopt):
        f, _ = net._gen_order["sgen_controllable"]
        controllable = np.asarray(net._is_elements["sgen_controllable"], bool)
        position = pd.Series(np.arange(controllable.sum()), index=net.sgen.index[controllable])
        ppc_rows = f + position.reindex(sgens).to_numpy()
        if np.isnan(ppc_rows).any():
            raise OpfReferenceError("a flexibility sgen is not a controllable OPF generator")
        gen_is = np.asarray(ppci["internal"]["gen_is"], bool)
        ppci_rows = (np.cumsum(gen_is) - 1)[ppc_rows.astype(np.int64)]
        ppci = add_userfcn(ppci, "formulation", _tie_q_to_p, args=(ppci_rows, tan_phi))
        _winding_limits_at_their_buses(net, ppci)
        return real_opf(ppci, ppopt)

    with _OPF_PATCH_LOCK:
        pp_opf.opf = opf
        try:
            yield
        finally:
            pp_opf.opf = real_opf


def _controllable_sgens(
    net: pp.pandapowerNet,
    buses: np.ndarray,
    p_end_mw: np.ndarray,
    q_end_mvar: np.ndarray,
    cost_eur_per_mw: np.ndarray,
    names: list[str],
) -> np.ndarray:
    """Controllable sgens with P between 0 and ``p_end_mw``, Q between 0 and ``q_end_mvar``
    (a hair wider: the tied row decides Q), linear cost ``cost_eur_per_mw`` x P."""
    if len(buses) == 0:
        return np.zeros(0, np.int64)
    idx = pp.create_sgens(
        net,
        buses,
        p_mw=np.zeros(len(buses)),
        q_mvar=np.zeros(len(buses)),
        name=names,
        controllable=True,
        min_p_mw=np.minimum(p_end_mw, 0.0),
        max_p_mw=np.maximum(p_end_mw, 0.0),
        min_q_mvar=np.minimum(q_end_mvar, 0.0) - 1e-6,
        max_q_mvar=np.maximum(q_end_mvar, 0.0) + 1e-6,
    )
    pp.create_poly_costs(net, idx, "sgen", cp1_eur_per_mw=cost_eur_per_mw)
    return np.asarray(idx, np.int64)


def opf_net(
    pf: HorizonPowerFlow,
    offers: pd.DataFrame,
    mtu: int,
    penalty_eur_per_mwh: float | None = None,
) -> tuple[pp.pandapowerNet, pd.Index, pd.Index]:
    """The net of one MTU set up for ``runopp``: limits, costs, one controllable sgen per offer.

    Returns the net, the sgen indices of the offers (in ``offers`` order) and those of the
    unmet-need sgens (empty without a penalty).
    """
    g = pf.grid
    net = pf.operating_point(mtu)
    # Not controllable: fixed P and Q (gens: fixed P and voltage; ext_grid: the slack).
    for element in ("ext_grid", "load", "sgen", "gen", "storage"):
        if len(net[element]):
            net[element]["controllable"] = False
    for element in ("poly_cost", "pwl_cost"):
        if element in net and len(net[element]):
            net[element] = net[element].iloc[0:0]
    net.bus["min_vm_pu"] = g.vm_min_pu
    net.bus["max_vm_pu"] = g.vm_max_pu
    for element in ("line", "trafo", "trafo3w"):
        if len(net[element]):
            net[element]["max_loading_percent"] = g.loading_max_percent
    for eg in net.ext_grid.index:
        pp.create_poly_cost(net, eg, "ext_grid", cp1_eur_per_mw=0.0)

    sign = np.where(offers.direction.to_numpy() == "up", 1.0, -1.0)
    p_mw = sign * offers.available_mw.to_numpy(float)
    q_mvar = offers.tan_phi.to_numpy(float) * p_mw
    sgens = _controllable_sgens(
        net,
        offers.bus.to_numpy(np.int64),
        p_mw,
        q_mvar,
        sign * offers.price_eur_per_mwh.to_numpy(float),
        [f"flex {r} {d}" for r, d in zip(offers.resource_id, offers.direction, strict=True)],
    )
    slack = np.zeros(0, np.int64)
    if penalty_eur_per_mwh is not None:
        big = float(net.load.p_mw.abs().sum() + net.sgen.p_mw.abs().sum() + 1.0)
        buses = np.repeat(pf.model.buses.to_numpy(np.int64), 2)
        s_sign = np.tile([1.0, -1.0], len(pf.model.buses))
        slack = _controllable_sgens(
            net,
            buses,
            s_sign * big,
            np.zeros(len(buses)),
            s_sign * float(penalty_eur_per_mwh),
            [
                f"unmet {'up' if s > 0 else 'down'} bus {b}"
                for b, s in zip(buses, s_sign, strict=True)
            ],
        )
    return net, pd.Index(sgens), pd.Index(slack)


def _runopp(net: pp.pandapowerNet, sgens: pd.Index, tan_phi: np.ndarray) -> None:
    with warnings.catch_warnings(), _tied_q(net, sgens.to_numpy(), tan_phi):
        warnings.simplefilter("ignore")
        pp.runopp(
            net,
            calculate_voltage_angles=False,
            init="flat",
            numba=False,
            suppress_warnings=True,
            **PIPS_OPTIONS,
        )


def _check_with_runpp(net: pp.pandapowerNet, flex: pd.Index) -> None:
    """The OPF's dispatch as fixed sgens in a plain AC power flow (on ``net`` itself)."""
    net.sgen.loc[flex, "p_mw"] = net.res_sgen.loc[flex, "p_mw"]
    net.sgen.loc[flex, "q_mvar"] = net.res_sgen.loc[flex, "q_mvar"]
    net.sgen["controllable"] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp.runpp(net, calculate_voltage_angles=False, numba=False, tolerance_mva=1e-9)


def opf_reference(
    pf: HorizonPowerFlow,
    resources: Resources,
    mtu: int | pd.Timestamp | str,
    *,
    penalty_eur_per_mwh: float | None = None,
) -> OpfResult:
    """AC OPF of one MTU over the resources' flexibility (see the module docstring).

    A run that PIPS does not solve (infeasible without a penalty, or not converged)
    returns ``converged=False`` and NaN costs; it does not raise.
    """
    started = time.perf_counter()
    t = pf.mtu_position(mtu)
    g = pf.grid
    dt = pf.profiles.horizon.mtu_hours
    offers = flexibility_offers(pf, resources, t)
    net, flex, slack = opf_net(pf, offers, t, penalty_eur_per_mwh)
    tied = flex.append(slack)
    tan_phi = np.r_[offers.tan_phi.to_numpy(float), np.zeros(len(slack))]
    branches = pf.model.branches
    buses = pf.model.buses
    nan_result = {
        "mtu": t,
        "time": pf.times[t],
        "loading_max_percent": g.loading_max_percent,
        "vm_min_pu": g.vm_min_pu,
        "vm_max_pu": g.vm_max_pu,
    }
    solve_started = time.perf_counter()
    try:
        _runopp(net, tied, tan_phi)
        converged = True
    except pp.OPFNotConverged:
        converged = False
    solve_s = time.perf_counter() - solve_started
    dispatch = offers[["resource_id", "direction", "bus", "available_mw", "price_eur_per_mwh"]]
    dispatch = dispatch.set_index(flex.rename("sgen"))
    if not converged:
        return OpfResult(
            **nan_result,
            status="not converged",
            converged=False,
            cost_eur=float("nan"),
            penalty_cost_eur=float("nan"),
            unmet_mw=float("nan"),
            objective_eur_per_h=float("nan"),
            dispatch=dispatch.assign(p_mw=np.nan, q_mvar=np.nan, cost_eur=np.nan),
            loading_percent=pd.Series(np.nan, index=branches, name="loading_percent"),
            vm_pu=pd.Series(np.nan, index=buses, name="vm_pu"),
            opf_pf_mismatch_pu=float("nan"),
            solve_s=solve_s,
            total_s=time.perf_counter() - started,
        )
    p = net.res_sgen.loc[flex, "p_mw"].to_numpy(float)
    q = net.res_sgen.loc[flex, "q_mvar"].to_numpy(float)
    price = offers.price_eur_per_mwh.to_numpy(float)
    dispatch = dispatch.assign(p_mw=p, q_mvar=q, cost_eur=price * np.abs(p) * dt)
    unmet = float(net.res_sgen.loc[slack, "p_mw"].abs().sum()) if len(slack) else 0.0
    objective = float(net.res_cost)
    vm_opf = net.res_bus.vm_pu.reindex(buses).to_numpy(float)
    _check_with_runpp(net, tied)
    loading = pandapower_loading_percent(net, branches)
    vm = net.res_bus.vm_pu.reindex(buses).rename("vm_pu")
    mismatch = float(np.nanmax(np.abs(vm_opf - vm.to_numpy())))
    return OpfResult(
        **nan_result,
        status="optimal",
        converged=True,
        cost_eur=float(dispatch.cost_eur.sum()),
        penalty_cost_eur=unmet * float(penalty_eur_per_mwh or 0.0) * dt,
        unmet_mw=unmet,
        objective_eur_per_h=objective,
        dispatch=dispatch,
        loading_percent=loading,
        vm_pu=vm,
        opf_pf_mismatch_pu=mismatch,
        solve_s=solve_s,
        total_s=time.perf_counter() - started,
    )
