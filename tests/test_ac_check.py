"""The AC check's power flows: a warm start reaches the power flow a start from the base
point reaches (to the Newton-Raphson tolerance), in fewer factorisations, and falls back to
the base point where it fails; a point that already solves the injections is kept as it is;
chord steps reach the power flow of plain Newton-Raphson."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_market import market_case

from lfm_zonal.check.ac import ac_check, solve_with_injections
from lfm_zonal.grid import powerflow
from lfm_zonal.grid.powerflow import JacobianBuilder, TransposedFactor, newton_raphson
from lfm_zonal.grid.sensitivity import LinearisationCache
from lfm_zonal.market.clearing import clear_market


@pytest.fixture
def factorisations(monkeypatch):
    """A count of the Jacobians factorised by Newton-Raphson steps (``JacobianBuilder.solve``,
    and the first step's factorisation kept for chord steps)."""
    count = [0]
    real = JacobianBuilder.solve

    def counting(self, *args, **kwargs):
        count[0] += 1
        return real(self, *args, **kwargs)

    class CountingFactor(TransposedFactor):
        def __init__(self, J):
            count[0] += 1
            super().__init__(J)

    monkeypatch.setattr(JacobianBuilder, "solve", counting)
    monkeypatch.setattr(powerflow, "TransposedFactor", CountingFactor)
    return count


@pytest.fixture
def mismatches(monkeypatch):
    """A count of Newton-Raphson's mismatch evaluations (one per step, and one to stop)."""
    count = [0]
    real = powerflow.mismatch

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(powerflow, "mismatch", counting)
    return count


def _injections(pf, scale: float = 1.0):
    """Every MTU: 0.4 MW less load at the first three buses with a load, 0.1 Mvar at one
    of them (per MTU x model.buses), times ``scale``."""
    buses = pf.model.buses
    loaded = pf.grid.net.load.bus[pf.grid.net.load.bus.isin(buses)].unique()[:3]
    p = np.zeros((len(pf.times), len(buses)))
    q = np.zeros_like(p)
    p[:, buses.get_indexer(loaded)] = 0.4 * scale
    q[:, buses.get_indexer(loaded[:1])] = 0.1 * scale
    return p, q


def test_the_jacobian_factorised_at_the_start_takes_the_first_step(cigre_pf, factorisations):
    pf = cigre_pf
    model = pf.model
    p, q = _injections(pf)
    dS = np.zeros(model.n_bus, complex)
    np.add.at(dS, model.bus_lookup.to_numpy(), (p[0] + 1j * q[0]) / model.base_mva)
    S, V0 = pf.Sbus[0] + dS, pf.V[0]
    plain = newton_raphson(model, S, V0)
    steps = factorisations[0]
    assert steps >= 1
    held = newton_raphson(model, S, V0, lu0=TransposedFactor(model.jacobian(V0)))
    assert factorisations[0] - steps == steps - 1  # the same iterates, one factorisation less
    np.testing.assert_array_equal(held, plain)


def test_chord_steps_reach_the_power_flow_of_newton_steps(cigre_pf, factorisations, monkeypatch):
    """Near its solution (a dispatch's injections from the base point) the power flow takes
    one factorisation and chord steps; far from it (ten times the injections) the chord
    contracts too slowly and Newton-Raphson takes over. Either way the power flow is plain
    Newton-Raphson's (no chord step at all) to the tolerance, and a point that solves it."""
    pf = cigre_pf
    model = pf.model
    internal = model.bus_lookup.to_numpy()
    for scale, most in ((1.0, 1), (10.0, None)):
        p, q = _injections(pf, scale)
        dS = np.zeros(model.n_bus, complex)
        np.add.at(dS, internal, (p[0] + 1j * q[0]) / model.base_mva)
        S, V0 = pf.Sbus[0] + dS, pf.V[0]
        factorisations[0] = 0
        chord = newton_raphson(model, S, V0)
        used = factorisations[0]
        with monkeypatch.context() as m:
            m.setattr(powerflow, "CHORD_MAX_STEPS", 0)
            factorisations[0] = 0
            newton = newton_raphson(model, S, V0)
        assert used == most if most is not None else 1 < used < factorisations[0] + 1
        np.testing.assert_allclose(chord, newton, rtol=0, atol=1e-9)
        assert powerflow.converged(powerflow.mismatch(model, S, chord)[0])


def test_a_warm_start_reaches_the_power_flow_of_the_base_start(
    cigre_pf, factorisations, mismatches
):
    pf = cigre_pf
    mtus = np.arange(len(pf.times))
    p, q = _injections(pf)
    V, ok = solve_with_injections(pf, mtus, p, q)
    from_base, steps_from_base = factorisations[0], mismatches[0]
    assert ok.all()
    # From the AC point of nearby injections (a sequential LP's last round): the same
    # power flow, in no more factorisations and fewer steps.
    near, _ = solve_with_injections(pf, mtus, *_injections(pf, 0.9))
    factorisations[0] = mismatches[0] = 0
    warm, ok = solve_with_injections(pf, mtus, p, q, near)
    assert ok.all() and factorisations[0] <= from_base and mismatches[0] < steps_from_base
    np.testing.assert_allclose(warm, V, rtol=0, atol=1e-9)
    # From the AC point of these very injections: no step.
    factorisations[0] = 0
    same, _ = solve_with_injections(pf, mtus, p, q, V)
    assert factorisations[0] == 0
    np.testing.assert_array_equal(same, V)
    # A NaN row starts from the base point; a start that fails (zero voltages) falls back to
    # it: the very power flow of the base start.
    start = near.copy()
    start[0] = np.nan
    start[1] = 0.0
    fallback, ok = solve_with_injections(pf, mtus, p, q, start)
    assert ok.all()
    np.testing.assert_array_equal(fallback[:2], V[:2])


def test_a_start_the_cache_holds_takes_its_factorisation(cigre_pf, factorisations):
    """A base point whose linearisation the study's cache holds hands its factorisation to
    Newton-Raphson's first step: the very power flow, bit for bit, one factorisation fewer
    per such MTU; near the solution and far from it (five times the injections: the first
    step divides the mismatch by less than CHORD_MIN_REDUCTION in some MTUs, where a factor
    handed over as ``lu0``, for chord steps from the start, takes other steps). Nothing is
    linearised for it."""
    pf = cigre_pf
    mtus = np.arange(len(pf.times))
    cache = LinearisationCache(pf.model)
    held = mtus[::3]
    for t in held:
        cache.at(pf.V[t])
    for scale in (1.0, 5.0):
        p, q = _injections(pf, scale)
        factorisations[0] = 0
        plain, ok = solve_with_injections(pf, mtus, p, q)
        used = factorisations[0]
        factorisations[0] = 0
        cached, ok_cached = solve_with_injections(pf, mtus, p, q, cache=cache)
        assert factorisations[0] == used - len(held) and len(cache) == len(held)
        np.testing.assert_array_equal(cached, plain)
        np.testing.assert_array_equal(ok_cached, ok)
    assert ok.all()


def test_a_market_hands_the_study_cache_to_its_power_flows(factorisations, monkeypatch):
    """A zonal market's AC checks and sequential-LP rounds take the cached factorisations
    (CIGRE MV, two zones, dense rows): most factorisations of a cache that never holds a
    point are gone, the same result. A cache of another network model is refused."""
    pf, res, seg = market_case("cigre_mv", 1.25, 0.5)
    zones = seg.zones(2)
    used = clear_market(pf, res, "zonal", zones, weights=seg.weights)
    with_cache = factorisations[0]
    factorisations[0] = 0
    monkeypatch.setattr(LinearisationCache, "held", lambda self, V: None)
    fresh = clear_market(pf, res, "zonal", zones, weights=seg.weights)
    # 4 against 76 here; 40 where either the AC checks or the rounds go without the cache
    assert with_cache < factorisations[0] / 4
    pd.testing.assert_frame_equal(used.dispatch, fresh.dispatch)
    assert used.kpis["cost_eur"] == fresh.kpis["cost_eur"]
    other = LinearisationCache(market_case("ieee33", 1.3, 0.8)[0].model)
    with pytest.raises(ValueError, match="another network model"):
        solve_with_injections(pf, [0], np.zeros((1, len(pf.model.buses))), 0, cache=other)


def test_the_ac_check_keeps_a_point_only_where_it_solves_the_dispatch(cigre_pf, factorisations):
    pf = cigre_pf
    mtus = np.arange(len(pf.times))
    p, q = _injections(pf)
    t, col = np.nonzero(p)
    dispatch = pd.DataFrame(
        {"mtu": t, "bus": pf.model.buses[col], "p_mw": p[t, col], "q_mvar": q[t, col]}
    )
    base = ac_check(pf, dispatch)
    from_base = factorisations[0]
    assert from_base > 0
    # The AC point of these injections (a nodal market's best round): kept, no factorisation.
    V, _ = solve_with_injections(pf, mtus, p, q)
    factorisations[0] = 0
    kept = ac_check(pf, dispatch, V)
    assert factorisations[0] == 0
    pd.testing.assert_frame_equal(kept.vm_pu, base.vm_pu)
    # The AC point of other injections (a zonal model's), or none: the check from the base.
    other, _ = solve_with_injections(pf, mtus, *_injections(pf, 0.8))
    other[2] = np.nan
    factorisations[0] = 0
    checked = ac_check(pf, dispatch, other)
    assert factorisations[0] == from_base
    pd.testing.assert_frame_equal(checked.vm_pu, base.vm_pu)
    pd.testing.assert_frame_equal(checked.loading_percent, base.loading_percent)


def test_a_chord_step_that_makes_it_worse_is_undone(cigre_pf, monkeypatch):
    """With a factorisation of a Jacobian far from the start, the first chord step makes the
    mismatch worse: it is undone (the next mismatch is the start's again) and Newton-Raphson
    goes on from the start to plain Newton-Raphson's power flow."""
    model = cigre_pf.model
    S, V0 = cigre_pf.Sbus[0] * 2.0, cigre_pf.V[0]
    sizes = []
    real = powerflow.mismatch

    def recorded(model, Sbus, V):
        F, i_bus = real(model, Sbus, V)
        sizes.append(float(np.max(np.abs(F))))
        return F, i_bus

    monkeypatch.setattr(powerflow, "mismatch", recorded)
    far = TransposedFactor(model.jacobian(V0 * 0.3 * np.exp(0.5j)))  # a wrong Jacobian
    got = newton_raphson(model, S, V0, lu0=far)
    assert sizes[1] > sizes[0] and sizes[2] == sizes[0]
    monkeypatch.setattr(powerflow, "CHORD_MAX_STEPS", 0)
    np.testing.assert_allclose(got, newton_raphson(model, S, V0), rtol=0, atol=1e-9)


class _Forgetful(dict):
    """A cache's weak table that keeps nothing (the cache as it was without one)."""

    def __setitem__(self, key, value) -> None:
        pass


def test_a_market_finds_its_grids_linearisations_the_cache_dropped(factorisations):
    """A market's linearised grid with adjoint rows holds every MTU's base-point
    linearisation for the whole market; a cache whose byte budget keeps only the newest
    point still finds the others there (it refers to them weakly), so the market's AC
    checks start from the base point with those factorisations: far fewer factorisations,
    the same result, bit for bit."""
    pf, res, seg = market_case("cigre_mv", 1.25, 0.5)
    zones = seg.zones(2)

    def run(cache):
        factorisations[0] = 0
        result = clear_market(
            pf, res, "zonal", zones, weights=seg.weights, cache=cache, grid_rows="adjoint"
        )
        return result, factorisations[0]

    found, with_weak = run(LinearisationCache(pf.model, budget_bytes=0))
    forgetful = LinearisationCache(pf.model, budget_bytes=0)
    forgetful._alive = _Forgetful()
    fresh, without = run(forgetful)
    assert with_weak < without / 4  # 4 against 40 here
    for a, b in (
        (found.dispatch, fresh.dispatch),
        (found.ac.vm_pu, fresh.ac.vm_pu),
        (found.ac.loading_percent, fresh.ac.loading_percent),
    ):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert found.kpis["cost_eur"] == fresh.kpis["cost_eur"]
