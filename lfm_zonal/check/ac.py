"""AC truth check: apply the dispatched resources to each MTU and run an AC power flow.

The grid sees resources at their real buses, whatever market area they were
cleared in: a zonal market's approximation shows up here as residual overloads,
voltage violations, or violations created where there were none.

**Violated** means beyond one tolerance (``grid.violations``), the same in every KPI
and table.

**Residual MW** of a violated row (``residual_violations``), like the clearing
LP's slack: its AC excess beyond the limit divided by the row's largest
|d row / d P| over the buses (nodal Jacobian sensitivity at the MTU's base point),
i.e. the MW of the most effective flexibility that would remove it. The residual
MW of an MTU is the largest over its violated rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandapower as pp
import pandas as pd

from lfm_zonal.errors import LfmError, PowerFlowNotConverged
from lfm_zonal.grid.powerflow import (
    HorizonPowerFlow,
    converged,
    mismatch,
    newton_raphson,
)
from lfm_zonal.grid.sensitivity import LinearisationCache, linearisation
from lfm_zonal.grid.violations import (
    VIOLATION_TOLERANCE_LOADING_PERCENT,
    VIOLATION_TOLERANCE_VM_PU,
    excess,
    largest_per_mtu,
    layout_rows,
    violated_state,
)

#: Relative size below which a resource's effect on a row counts as none (numerical noise).
_EFFECT_NOISE = 1e-6

RESIDUAL_COLUMNS = [
    "time",
    "mtu",
    "element_type",
    "element",
    "violation",
    "value",
    "limit",
    "excess",
    "model_excess",
    "ac_converged",
    "sensitivity_per_mw",
    "residual_mw",
    "relieving_offered_mw",
    "relieving_dispatched_mw",
    "relief_left",
    "relief_withdrawn",
    "offers_exhausted",
    "offers_short",
    "missed_by_model",
]


@dataclass(frozen=True)
class ACCheck:
    """AC state of every MTU after the dispatch (MTUs without dispatch keep the base case)."""

    loading_percent: pd.DataFrame  # time x (element_type, element)
    vm_pu: pd.DataFrame  # time x bus
    converged: pd.Series
    failures: tuple[str, ...]
    #: Internal voltages per MTU of the horizon where a dispatch was solved (NaN rows: none,
    #: or not converged): a later check of a dispatch that differs in some MTUs only keeps
    #: the others (``ac_check``'s ``solved``).
    V: np.ndarray | None = field(default=None, repr=False, compare=False)


def solve_with_injections(
    pf: HorizonPowerFlow,
    mtus,
    bus_p_mw: np.ndarray,
    bus_q_mvar: np.ndarray,
    start: np.ndarray | None = None,
    factorised=None,
    solved: np.ndarray | None = None,
    cache: LinearisationCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """AC power flow of ``mtus`` with extra injections per bus (rows: MTU, columns: model.buses).

    From each MTU's base point, or warm-started from ``start`` (internal voltages, one row
    per MTU; a NaN row: the base point) and from the base point again where that start
    does not converge. A start closer to the solution takes fewer Newton steps and reaches
    the same power flow to the tolerance: a sequential LP's round starts from the AC point
    its LP was linearised at (on SimBench 1-MVLV-rural-all-0-sw, 72 MTUs: 1.1 to 2.1
    factorisations per MTU and round instead of 2.9). ``factorised`` (with ``start``; one
    per MTU, or None): the Jacobian at the MTU's start already factorised
    (``newton_raphson``'s ``lu0``, the first step without a factorisation of its own).

    ``solved`` (internal voltages, one row per MTU, NaN rows ignored): points that may
    already solve these injections, kept as the MTU's power flow where their mismatch is
    within ``grid.powerflow.NR_TOLERANCE_PU`` (the test that ends every Newton-Raphson)
    without a step; the others are solved as above. Returns internal voltages (NaN rows
    where it did not converge) and a converged mask.

    ``cache`` (of ``pf.model``): a start it holds the linearisation of (the base point, a
    sequential LP's linearisation point) takes that Jacobian's factorisation for its first
    Newton step (``newton_raphson``'s ``first_lu``): the same power flow, bit for bit.
    """
    model = pf.model
    if cache is not None:
        cache.require_model(model)
    mtus = np.asarray(mtus, dtype=np.int64)
    internal = model.bus_lookup.to_numpy()
    V = np.full((len(mtus), model.n_bus), np.nan + 0j)
    ok = np.zeros(len(mtus), bool)
    for i, t in enumerate(mtus):
        dS = np.zeros(model.n_bus, complex)
        np.add.at(dS, internal, (bus_p_mw[i] + 1j * bus_q_mvar[i]) / model.base_mva)
        Sbus = pf.Sbus[t] + dS
        if solved is not None and converged(mismatch(model, Sbus, solved[i])[0]):
            V[i], ok[i] = solved[i], True
            continue
        starts = [(pf.V[t], None)]  # the base point, its Jacobian factorised afresh
        if start is not None and np.all(np.isfinite(start[i])):
            starts.insert(0, (start[i], None if factorised is None else factorised[i]))
        for V0, lu0 in starts:
            held = None if lu0 is not None or cache is None else cache.held(V0)
            try:
                V[i] = newton_raphson(
                    model, Sbus, V0, lu0=lu0, first_lu=None if held is None else held.lu
                )
            except PowerFlowNotConverged:
                continue
            ok[i] = True
            break
    return V, ok


def ac_check(
    pf: HorizonPowerFlow,
    dispatch: pd.DataFrame,
    solved: np.ndarray | None = None,
    cache: LinearisationCache | None = None,
) -> ACCheck:
    """AC power flow of every MTU with a dispatch, from its base point (as the base case).

    ``solved`` (internal voltages, one row per MTU of the horizon; NaN rows: none): the AC
    point a market's own model of this dispatch reached, or the check of an earlier
    dispatch (``ACCheck.V``; a margin round changes some MTUs only), kept where it solves
    the dispatch's injections to the tolerance (``solve_with_injections``). The nodal market's
    model is its dispatch (one bus per area): its check is then its best round's AC point,
    on SimBench 1-MVLV-rural-all-0-sw (72 MTUs) with 0 factorisations instead of 209 (0.07 s
    instead of 1.3). Tested, not assumed: the P at each bus is the model's, but an
    aggregator's step of several resources at one bus bids their mean tan_phi, and a partly
    accepted step is dispatched to the cheapest of them with their own Q; such an MTU is
    solved. A zonal market's dispatch is not its model's; warm-started from that model's
    point, its check took 2.92 factorisations per MTU instead of 2.94 from the base point,
    and ended further from the exact power flow within the tolerance (1e-9 p.u. of
    voltage instead of 1e-11): it starts from the base point, with its Jacobian's
    factorisation where ``cache`` (the study's linearisations) holds it.
    """
    model = pf.model
    converged = pf.converged.copy()
    failures = []
    if dispatch.empty:
        return ACCheck(pf.loading_percent.copy(), pf.vm_pu.copy(), converged, ())
    mtus = np.unique(dispatch.mtu.to_numpy(np.int64))
    position = pd.Series(np.arange(len(model.buses)), index=model.buses)
    p = np.zeros((len(mtus), len(model.buses)))
    q = np.zeros_like(p)
    row = pd.Series(np.arange(len(mtus)), index=mtus).reindex(dispatch.mtu).to_numpy()
    col = position.reindex(dispatch.bus.to_numpy()).to_numpy()
    np.add.at(p, (row, col), dispatch.p_mw.to_numpy())
    np.add.at(q, (row, col), dispatch.q_mvar.to_numpy())
    V, ok = solve_with_injections(
        pf, mtus, p, q, solved=None if solved is None else solved[mtus], cache=cache
    )
    V_all = np.full_like(pf.V, np.nan)
    V_all[mtus[ok]] = V[ok]
    loading_values = pf.loading_percent.to_numpy(copy=True)
    vm_values = pf.vm_pu.to_numpy(copy=True)
    for i, t in enumerate(mtus):
        if ok[i]:
            loading_values[t] = model.loading_percent(V[i])
            vm_values[t] = model.vm_pu(V[i])
        else:
            loading_values[t] = vm_values[t] = np.nan
            failures.append(
                f"MTU {t} ({pf.times[t]}): AC power flow after dispatch did not converge"
            )
    converged.iloc[mtus[~ok]] = False
    loading = pd.DataFrame(
        loading_values, index=pf.loading_percent.index, columns=pf.loading_percent.columns
    )
    vm = pd.DataFrame(vm_values, index=pf.vm_pu.index, columns=pf.vm_pu.columns)
    return ACCheck(loading, vm, converged, tuple(failures), V_all)


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


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def violation_kpis(pf: HorizonPowerFlow, ac: ACCheck) -> dict[str, float]:
    """Residual overloads and voltage violations after the AC check, and violations created.

    Every count and size uses the one tolerance of this module; MTUs whose AC check did not
    converge (NaN rows) are left out of the maxima and sums and counted in
    ``mtus_not_converged_after`` (they never turn a KPI into 0, and no KPI is NaN or inf).
    """
    dt = pf.profiles.horizon.mtu_hours
    after = excess(pf.grid, ac.loading_percent, ac.vm_pu)
    before = excess(pf.grid, pf.loading_percent, pf.vm_pu)
    tolerances = (VIOLATION_TOLERANCE_LOADING_PERCENT,) + 2 * (VIOLATION_TOLERANCE_VM_PU,)
    created = sum(
        int(((a > tol) & ~(b > tol)).to_numpy().sum())
        for a, b, tol in zip(after, before, tolerances, strict=True)
    )
    over_after, dev_after = violated_state(pf.grid, ac.loading_percent, ac.vm_pu)
    over, dev = over_after.to_numpy(), dev_after.to_numpy()
    loading, vm = _finite(ac.loading_percent.to_numpy()), _finite(ac.vm_pu.to_numpy())
    not_converged = int((pf.converged.to_numpy() & ~ac.converged.to_numpy()).sum())
    return {
        "residual_overload_max_percent": float(_finite(over).max(initial=0.0)),
        "residual_overload_mtu_count": int((over_after > 0).any(axis=1).sum()),
        "residual_overload_percent_h": float(np.nansum(over) * dt),
        "loading_max_after_percent": float(loading.max(initial=0.0)),
        # No converged bus at all (every MTU failed): 0, and mtus_not_converged_after says why.
        "vm_min_after_pu": float(vm.min()) if len(vm) else 0.0,
        "vm_max_after_pu": float(vm.max(initial=0.0)),
        "residual_voltage_max_pu": float(_finite(dev).max(initial=0.0)),
        "residual_voltage_mtu_count": int((dev_after > 0).any(axis=1).sum()),
        "residual_voltage_pu_h": float(np.nansum(dev) * dt),
        "new_violations": created,
        "mtus_not_converged_after": max(len(ac.failures), not_converged),
    }


def residual_violations(
    pf: HorizonPowerFlow,
    ac: ACCheck,
    resources=None,
    dispatch: pd.DataFrame | None = None,
    cache: LinearisationCache | None = None,
    rows_per_mtu: int | None = None,
    predicted: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Every (MTU, element) still violated after the AC check, with its residual MW.

    One row per violated loading or voltage row (``violation``: overload, undervoltage,
    overvoltage; ``element_type`` line / trafo / trafo3w_hv, _mv, _lv (a winding) / bus,
    ``element`` its pandapower index).
    ``excess`` is beyond the limit (pp or p.u.); ``model_excess`` what the market's own
    model expected of it after its clearing: with ``predicted`` (the MTUs it cleared, and
    its linearised grid's excess per MTU and row after the clearing, T x (branches +
    2 buses), ``LinearGrid.violations``), beyond the limit or 0; NaN in an MTU it did not
    clear or whose AC check failed, or without ``predicted``. About ``excess`` (to the
    linearisation's error): its model foresaw the violation and left it as unmet need (an
    LP market: the optimum of its linear model, within the sequential LP's trust region,
    over the steps priced up to the penalty; the needs-based market: what its needs and
    merit order left). Below it by more than the violation tolerance
    (``missed_by_model``): its model missed the rest (its zones, its linearisation, a
    sequential LP stopped before converging; None where ``model_excess`` is NaN).
    ``sensitivity_per_mw`` g is the row's
    largest |d row / d P| over the buses at the MTU's base point (Jacobian, nodal);
    ``residual_mw`` = excess / g. An MTU whose AC check did not converge is listed with its
    base-case violations (``ac_converged`` False): its state after the dispatch is unknown.

    With ``resources`` (and the market's ``dispatch``): ``relieving_offered_mw`` is the MW
    offered in that MTU by every resource whose effect on the row relieves it (up raises its
    bus's net injection, down lowers it; P plus tan_phi Q), ``relieving_dispatched_mw`` what
    of it was dispatched, and ``offers_exhausted`` is True when each of those resources was
    dispatched to its full offer (also when none relieves the row). ``relief_left`` (pp or
    p.u., as ``excess``) is how much of the excess the offers could still remove, linear at
    the MTU's base point: the relieving ones' MW not dispatched, and the dispatch that
    worsens the row withdrawn (``relief_withdrawn``: that part of it; the rest is what the
    offers not dispatched could remove alone). ``offers_short`` is True when that is less
    than the excess:
    the offers could not remove the violation, whatever their price (False: the market
    chose not to, at its prices, or its zones did not see it). On SimBench MV+LV every
    residual row of the nodal market has relieving offers left, a few kW far from the bus
    (``offers_exhausted`` False), and most are short. ``cache`` holds the
    base points' linearisations when the market already took them (see ``sensitivity``).
    ``rows_per_mtu`` keeps, of each kind of violation in each MTU, only that many rows of
    largest excess (None: every row).
    """
    g = pf.grid
    model = pf.model
    failed = pf.converged.to_numpy() & ~ac.converged.to_numpy()
    # After the AC check where it converged, the base case where it did not.
    loading = ac.loading_percent.copy()
    vm = ac.vm_pu.copy()
    loading.iloc[failed] = pf.loading_percent.iloc[failed].to_numpy()
    vm.iloc[failed] = pf.vm_pu.iloc[failed].to_numpy()
    over, under, overv = excess(g, loading, vm)
    n_b = len(model.buses)
    # Every violated row: MTU, kind (0 overload, 1 undervoltage, 2 overvoltage), position.
    parts = []
    for kind, beyond, tol in (
        (0, over, VIOLATION_TOLERANCE_LOADING_PERCENT),
        (1, under, VIOLATION_TOLERANCE_VM_PU),
        (2, overv, VIOLATION_TOLERANCE_VM_PU),
    ):
        values = beyond.to_numpy()
        t, r = np.nonzero(values > tol)
        if rows_per_mtu is not None:  # the largest excesses of the kind in each MTU
            t, r = largest_per_mtu(t, r, values[t, r], rows_per_mtu)
        parts.append((t, np.full(len(t), kind), r, values[t, r], np.full(len(t), tol)))
    t, kind, r, amount, tol = (np.concatenate([p[i] for p in parts]) for i in range(5))
    if len(t) == 0:
        return pd.DataFrame(columns=RESIDUAL_COLUMNS)
    order = np.lexsort((kind, r, kind != 0, t))  # per MTU: overloads, then buses by position
    t, kind, r, amount, tol = t[order], kind[order], r[order], amount[order], tol[order]
    is_line = kind == 0
    model_excess = np.full(len(t), np.nan)
    if predicted is not None:  # the grid rows: branches, overvoltage, undervoltage
        mtus, beyond = predicted
        n_l = len(model.branches)
        if beyond.shape != (len(mtus), n_l + 2 * n_b):
            raise LfmError("the market's predicted excess is not on this grid's MTUs and rows")
        at = pd.Index(mtus).get_indexer(t)
        cleared = (at >= 0) & ~failed[t]  # a failed check lists the base case's rows
        row = layout_rows(kind == 0, kind != 1, r, n_l, n_b)  # kind 1: undervoltage
        model_excess[cleared] = beyond[at[cleared], row[cleared]].clip(0.0, None)
    offers = None
    if resources is not None:
        offers = _offers_by_mtu(resources, dispatch, pd.Series(np.arange(n_b), index=model.buses))
    gain = np.zeros(len(t))
    offered_mw, done_mw = np.full(len(t), np.nan), np.full(len(t), np.nan)
    relief_left, withdrawn = np.full(len(t), np.nan), np.full(len(t), np.nan)
    exhausted = np.full(len(t), None, dtype=object)
    relieving_sign = np.where(kind == 1, 1.0, -1.0)
    known = _row_facts(cache, resources)
    for mtu in np.unique(t):
        at_mtu = np.flatnonzero(t == mtu)
        point = pf.V[mtu].tobytes()

        def key(i, mtu=int(mtu), point=point):  # the row's facts depend on these alone
            return mtu, point, int(kind[i]), int(r[i])

        facts = [known.get(key(i)) for i in at_mtu]
        todo = at_mtu[[f is None for f in facts]]
        offer = None if offers is None else offers(int(mtu))
        if len(todo):  # transposed solves, a chunk of rows at a time
            lin = linearisation(model, pf.V[mtu], cache)
            for start in range(0, len(todo), _ROWS_PER_SOLVE):
                at = todo[start : start + _ROWS_PER_SOLVE]
                line, bus = at[is_line[at]], at[~is_line[at]]
                at = np.r_[line, bus]
                cp, cq = lin.rows_sensitivity(r[line], r[bus])
                row_gain = np.abs(cp).max(axis=1, initial=0.0)
                relieves, relief = [None] * len(at), [None] * len(at)
                if offer is not None:
                    _, _, col, direction, tan_phi = offer
                    effect = direction * (cp[:, col] + tan_phi * cq[:, col])  # rows x offers
                    noise = _EFFECT_NOISE * np.maximum(
                        row_gain, np.abs(cq).max(axis=1, initial=0.0)
                    )
                    effect *= relieving_sign[at, None]  # > 0: relieves, < 0: worsens
                    mask = np.abs(effect) > noise[:, None]
                    relieves = np.packbits(mask, axis=1)  # the offers that move the row
                    # and by how much per MW (float32), in their order
                    relief = [e[m].astype(np.float32) for e, m in zip(effect, mask, strict=True)]
                for i, g_i, rel, per_mw in zip(at, row_gain, relieves, relief, strict=True):
                    known[key(i)] = (float(g_i), rel, per_mw)
            facts = [known[key(i)] for i in at_mtu]
        gain[at_mtu] = [f[0] for f in facts]
        if offer is None:
            continue
        offered, done = offer[0], offer[1]
        done = np.minimum(done, offered)
        for start in range(0, len(at_mtu), _ROWS_PER_SOLVE):  # rows x offers at a time
            part = slice(start, start + _ROWS_PER_SOLVE)
            rows, kept = at_mtu[part], facts[part]
            moves = np.unpackbits(np.stack([f[1] for f in kept]), axis=1, count=len(offered))
            # Each row's effect per MW of every offer, 0 where it does not move the row (the
            # mask's True entries in row-major order are those of each row's per-MW list).
            effect = np.zeros(moves.shape)
            effect[moves.astype(bool)] = np.concatenate([f[2] for f in kept])
            relieves = effect > 0
            # Relieving MW not dispatched, and the dispatch that worsens the row withdrawn.
            withdrawn[rows] = -(effect.clip(None, 0) @ done)
            relief_left[rows] = effect.clip(0, None) @ (offered - done) + withdrawn[rows]
            offered_mw[rows] = relieves @ offered
            done_mw[rows] = relieves @ done
            exhausted[rows] = (~relieves | (done >= offered - 1e-6)).all(axis=1).tolist()
    line, bus = np.flatnonzero(is_line), np.flatnonzero(~is_line)
    value = np.empty(len(t))
    value[line] = loading.to_numpy()[t[line], r[line]]
    value[bus] = vm.to_numpy()[t[bus], r[bus]]
    limit = np.select(
        [is_line, kind == 1], [g.loading_max_percent, g.vm_min_pu], default=g.vm_max_pu
    )
    element_type = np.full(len(t), "bus", dtype=object)
    element = np.empty(len(t), np.int64)
    element_type[line] = model.branches.get_level_values(0).to_numpy()[r[line]]
    element[line] = model.branches.get_level_values(1).to_numpy()[r[line]]
    element[bus] = model.buses.to_numpy()[r[bus]]
    out = pd.DataFrame(
        {
            "time": pf.times[t],
            "mtu": t,
            "element_type": element_type,
            "element": element,
            "violation": np.array(["overload", "undervoltage", "overvoltage"])[kind],
            "value": value,
            "limit": limit.astype(float),
            "excess": amount.astype(float),
            "model_excess": model_excess,
            "ac_converged": ~failed[t],
            "sensitivity_per_mw": gain,
            # A row no injection moves (e.g. the slack bus voltage): 1 unit per MW, as the LP.
            "residual_mw": amount / np.where(gain > 0, gain, 1.0),
            "relieving_offered_mw": offered_mw,
            "relieving_dispatched_mw": done_mw,
            "relief_left": relief_left,
            "relief_withdrawn": withdrawn,
            "offers_exhausted": exhausted,
            "offers_short": np.where(np.isnan(relief_left), None, relief_left < amount),
            "missed_by_model": np.where(np.isnan(model_excess), None, amount - model_excess > tol),
        }
    )
    return out[list(RESIDUAL_COLUMNS)]


#: Rows whose sensitivities one batch of transposed solves computes (memory: rows x buses),
#: and whose effects on the offers are summed at once (rows x offers).
_ROWS_PER_SOLVE = 256
#: Bytes of violated rows' facts (largest sensitivity, which offers move it and by how
#: much) a study keeps (``_row_facts``): on SimBench MV+LV about 1.3 KB of bits and up to
#: 48 KB of effects per row (4 bytes per offer that moves it).
_ROW_FACTS_MAX_BYTES = 256 * 2**20


def _row_facts(cache: LinearisationCache | None, resources) -> dict:
    """A violated row's facts at its MTU's base point, by (MTU, point, kind, row): its
    largest |sensitivity| to an active injection, which of the MTU's offers move it
    (packed bits over the MTU's offers) and the relief per MW of each (negative: worsens;
    None without ``resources``). They depend on the MTU (its offers), its base point and
    the resources only, so the markets of a study share
    them through its linearisation ``cache`` (SimBench MV+LV, 9 markets: every market left
    2,000-3,000 rows violated, mostly the same ones, at a transposed solve each). Without
    a cache: a fresh table. Beyond _ROW_FACTS_MAX_BYTES it starts afresh."""
    if cache is None:
        return {}
    key = ("residual row facts", id(resources))
    kept = cache.derived.get(key)
    if kept is None or kept[0] is not resources or _nbytes(kept[1]) > _ROW_FACTS_MAX_BYTES:
        kept = cache.derived[key] = (resources, {})
    return kept[1]


#: Bytes counted per row fact beside its arrays (key, tuple, float).
_ROW_FACT_OVERHEAD_BYTES = 400


def _nbytes(facts: dict) -> int:
    """Bytes of a table of row facts: its arrays, an overhead per row, and the MTU points
    in its keys (each bytes object once)."""
    points = {id(key[1]): len(key[1]) for key in facts}
    arrays = sum(a.nbytes for f in facts.values() for a in f[1:] if a is not None)
    return arrays + _ROW_FACT_OVERHEAD_BYTES * len(facts) + sum(points.values())


def _offers_by_mtu(resources, dispatch: pd.DataFrame | None, position: pd.Series):
    """A function of the MTU: offered MW, dispatched MW, bus column, direction (+1 up, -1
    down) and tan_phi of every (resource, direction) with an offer in that MTU."""
    table = resources.table
    col = position.reindex(table.bus.to_numpy()).to_numpy()
    energised = ~np.isnan(col)
    col = np.where(energised, col, 0).astype(np.int64)
    tan_phi = table.tan_phi.to_numpy(float)
    up = resources.up_mw.reindex(columns=table.index).fillna(0.0).to_numpy()
    down = resources.down_mw.reindex(columns=table.index).fillna(0.0).to_numpy()
    done_up = np.zeros_like(up)
    done_down = np.zeros_like(down)
    if dispatch is not None and len(dispatch):
        r = pd.Series(np.arange(len(table)), index=table.index).reindex(dispatch.resource_id)
        t = dispatch.mtu.to_numpy(np.int64)
        mw = np.abs(dispatch.p_mw.to_numpy(float))
        is_up = dispatch.direction.to_numpy() == "up"
        ok = r.notna().to_numpy()
        r = r.to_numpy()
        np.add.at(done_up, (t[ok & is_up], r[ok & is_up].astype(np.int64)), mw[ok & is_up])
        np.add.at(done_down, (t[ok & ~is_up], r[ok & ~is_up].astype(np.int64)), mw[ok & ~is_up])

    def at(t: int):
        offered = np.r_[up[t], down[t]]
        keep = (offered > 1e-9) & np.r_[energised, energised]
        direction = np.r_[np.ones(len(table)), -np.ones(len(table))]
        return (
            offered[keep],
            np.r_[done_up[t], done_down[t]][keep],
            np.r_[col, col][keep],
            direction[keep],
            np.r_[tan_phi, tan_phi][keep],
        )

    return at


def residual_mw_per_mtu(residual: pd.DataFrame) -> pd.Series:
    """The residual MW of each MTU with a violation: the largest over its violated rows."""
    if residual.empty:
        return pd.Series(dtype=float, name="residual_mw")
    return residual.groupby("mtu").residual_mw.max()
