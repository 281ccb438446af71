"""Sensitivities against finite differences of real AC power flows (pandapower.runpp)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from lfm_zonal import GridError, sensitivities
from lfm_zonal.grid.sensitivity import finite_difference_sensitivities, sensitivity_error

TOLERANCE = 0.01  # relative error of the significant entries


def sample_buses(pf, extra=(), n=6, seed=0):
    """A seeded sample of energised non-slack buses, plus the ones a test names."""
    slack = set(pf.grid.net.ext_grid.bus)
    candidates = [b for b in pf.model.buses if b not in slack]
    rng = np.random.default_rng(seed)
    picked = rng.choice(candidates, size=min(n, len(candidates)), replace=False)
    return sorted({*map(int, picked), *extra})


def assert_close_to_fd(pf, mtu, buses, method="jacobian", tolerance=TOLERANCE):
    fd = finite_difference_sensitivities(pf, mtu, buses)
    est = sensitivities(pf, mtu, method)
    err = sensitivity_error(est, fd)
    assert all(e <= tolerance for e in err.values()), err
    return err


def test_jacobian_cigre_mv(cigre_pf):
    assert_close_to_fd(cigre_pf, 7, sample_buses(cigre_pf, extra=(1, 12)))


def test_jacobian_ieee33(ieee33_pf):
    assert_close_to_fd(ieee33_pf, 7, sample_buses(ieee33_pf, extra=(17, 32)))


def test_jacobian_simbench_mv_with_switches(simbench_mv_pf):
    net = simbench_mv_pf.grid.net
    # Buses merged by the bus-bus switches as shipped, and buses behind the HV/MV trafo.
    merged = [
        int(b)
        for b in net.switch.loc[net.switch.et == "b", ["bus", "element"]].to_numpy().ravel()
        if b in simbench_mv_pf.model.buses and b not in set(net.ext_grid.bus)
    ]
    behind_trafo = [int(net.trafo.lv_bus.iloc[0])]
    assert_close_to_fd(simbench_mv_pf, 1, sample_buses(simbench_mv_pf, extra=merged + behind_trafo))


def test_jacobian_two_voltage_levels_and_merged_buses(mixed_pf):
    net = mixed_pf.grid.net
    lv = [int(b) for b in net.bus.index[net.bus.vn_kv == 0.4]]
    merged = int(net.bus.index[net.bus.name == "merged with bus 5"][0])
    buses = sample_buses(mixed_pf, extra=(*lv, merged, 5), n=3)
    assert_close_to_fd(mixed_pf, 7, buses)
    sens = sensitivities(mixed_pf, 7)
    # Merged buses are one node: identical columns.
    assert sens.loading_p[merged].equals(sens.loading_p[5])
    assert set(sens.isolated_buses) and set(sens.isolated_buses).isdisjoint(sens.vm_p.columns)


def test_jacobian_ring(ring_pf):
    assert_close_to_fd(ring_pf, 7, sample_buses(ring_pf))


def test_physical_signs(ieee33_pf):
    """Injecting P at the end of a radial feeder raises every voltage on its path and
    unloads the first branch; the slack bus column is zero."""
    sens = sensitivities(ieee33_pf, 7)
    assert (sens.vm_p[17].drop(0) > 0).all()
    assert sens.loading_p.loc[("line", 0), 17] < 0
    assert (sens.vm_p[0] == 0).all() and (sens.loading_p[0] == 0).all()


def test_lindistflow_is_close_on_a_radial_feeder(ieee33_pf):
    """LinDistFlow neglects losses and the voltage in the flow terms: documented error
    on IEEE 33 (see README), checked here so that a regression shows."""
    fd = finite_difference_sensitivities(ieee33_pf, 7, sample_buses(ieee33_pf, extra=(17, 32)))
    err = sensitivity_error(sensitivities(ieee33_pf, 7, "lindistflow"), fd)
    assert max(err.values()) < 0.25, err
    assert err["vm_p"] > 1e-3  # an approximation, not the Jacobian


def test_dc_ptdf_sees_no_voltage(ieee33_pf):
    fd = finite_difference_sensitivities(ieee33_pf, 7, [17, 32])
    dc = sensitivities(ieee33_pf, 7, "dc_ptdf")
    err = sensitivity_error(dc, fd)
    assert err["vm_p"] == pytest.approx(1.0) and (dc.vm_p.to_numpy() == 0).all()
    assert 0.05 < err["loading_p"] < 0.5, err  # sign(P) x PTDF ignores the Q part of |S|


def test_lindistflow_refuses_a_ring(ring_pf):
    with pytest.raises(GridError, match="radial"):
        sensitivities(ring_pf, 0, "lindistflow")


@pytest.mark.parametrize("method", ["jacobian", "lindistflow"])
def test_zone_patterns_equal_bus_sensitivities_aggregated(mixed_pf, ieee33_pf, method):
    """Solving for the zones' injection patterns gives the bus sensitivities @ W."""
    from lfm_zonal.grid.sensitivity import sensitivity_arrays
    from lfm_zonal.zones.segmentation import Zones

    pf = mixed_pf if method == "jacobian" else ieee33_pf  # merged buses, two levels
    buses = pf.model.buses
    rng = np.random.default_rng(3)
    zones = Zones(3, "test", pd.Series(np.arange(len(buses)) % 3, index=buses.rename("bus")))
    W = zones.aggregation(pd.Series(rng.uniform(0.0, 2.0, len(buses)), index=buses))
    full = sensitivity_arrays(pf.model, pf.V[7], method)
    zonal = sensitivity_arrays(pf.model, pf.V[7], method, W)
    for name in ("loading_p", "loading_q", "vm_p", "vm_q"):
        expected = getattr(full, name) @ W
        assert getattr(zonal, name).shape == (getattr(full, name).shape[0], 3)
        np.testing.assert_allclose(getattr(zonal, name), expected, rtol=1e-9, atol=1e-12)


def test_linearisation_is_reused_for_the_same_operating_point(cigre_pf):
    """A study linearises each MTU's base point once, through the cache it passes to every
    stage; the cached linearisation gives the same sensitivities as a fresh one, the cache
    stays bounded, and it refuses another network's model."""
    from lfm_zonal.grid import sensitivity as sens

    model = cigre_pf.model
    cache = sens.LinearisationCache(model)
    first = sens.sensitivity_arrays(model, cigre_pf.V[7], cache=cache)
    assert len(cache) == 1
    again = sens.sensitivity_arrays(model, cigre_pf.V[7], cache=cache)
    assert len(cache) == 1
    fresh = sens.sensitivity_arrays(model, cigre_pf.V[7])  # no cache: linearised afresh
    assert len(cache) == 1
    for name in ("loading_p", "loading_q", "vm_p", "vm_q"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
        np.testing.assert_allclose(getattr(fresh, name), getattr(first, name), rtol=1e-12)
    for t in range(sens.LINEARISATION_CACHE_SIZE + 3):
        sens.sensitivity_arrays(
            model, cigre_pf.V[t % len(cigre_pf.V)] * (1 + 1e-9 * t), cache=cache
        )
    assert len(cache) == sens.LINEARISATION_CACHE_SIZE
    other = sens.LinearisationCache(dataclasses.replace(model))
    with pytest.raises(ValueError, match="another network model"):
        sens.sensitivity_arrays(model, cigre_pf.V[7], cache=other)


@pytest.fixture
def linearised(monkeypatch):
    """The points linearised afresh (``sensitivity._linearise``), in order."""
    from lfm_zonal.grid import sensitivity as sens

    points = []
    original = sens._linearise

    def counting(model, V):
        points.append(V)
        return original(model, V)

    monkeypatch.setattr(sens, "_linearise", counting)
    return points


def test_linearisation_cache_is_bounded_in_bytes(cigre_pf, linearised):
    """Beyond its byte budget the cache drops the least recently used linearisations (the
    newest is kept even alone over budget); a dropped point asked for again is linearised
    afresh and gives the numbers it gave before."""
    from lfm_zonal.grid import sensitivity as sens

    model = cigre_pf.model
    points = [cigre_pf.V[t] for t in (0, 3, 6)]
    sizes = [sens.LinearisationCache.entry_bytes(sens.linearisation(model, V)) for V in points]
    lu = sens.linearisation(model, points[0]).lu
    assert sizes[0] > lu.nnz * sens.SUPERLU_BYTES_PER_NONZERO  # the LU and the derivatives

    def ask(cache, i):
        before = len(linearised)
        arrays = sens.sensitivity_arrays(model, points[i], cache=cache)
        return arrays, len(linearised) > before  # (sensitivities, linearised afresh)

    budget = sum(sizes) - min(sizes)  # any two fit, never all three
    cache = sens.LinearisationCache(model, budget_bytes=budget)
    first = [ask(cache, i)[0] for i in range(3)]  # 2 pushes 0 out
    assert len(cache) == 2 and cache.nbytes == sizes[1] + sizes[2] <= budget
    assert ask(cache, 1)[1] is False and ask(cache, 2)[1] is False  # kept: no new work
    again, fresh = ask(cache, 0)  # dropped: linearised again, pushing 1 (least recent) out
    assert fresh and len(cache) == 2 and cache.nbytes == sizes[2] + sizes[0]
    for name in ("loading_p", "loading_q", "vm_p", "vm_q"):
        np.testing.assert_allclose(getattr(again, name), getattr(first[0], name), rtol=1e-12)
    assert ask(cache, 2)[1] is False and ask(cache, 1)[1] is True
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    tiny = sens.LinearisationCache(model, budget_bytes=0)  # each entry alone is over budget
    ask(tiny, 0)
    ask(tiny, 1)
    assert len(tiny) == 1 and tiny.nbytes == sizes[1] and ask(tiny, 1)[1] is False
    with pytest.raises(ValueError, match="at least 0 bytes"):
        sens.LinearisationCache(model, budget_bytes=-1)


def test_a_dropped_linearisation_held_elsewhere_is_found_not_kept(cigre_pf, linearised):
    """A linearisation the cache dropped (beyond its budget) while something else still
    holds it is found, the same object, without linearising again and without being kept
    again; once nothing holds it, it is gone and linearised afresh."""
    import gc

    from lfm_zonal.grid import sensitivity as sens

    model = cigre_pf.model
    cache = sens.LinearisationCache(model, budget_bytes=0)  # keeps the newest only
    first = cache.at(cigre_pf.V[0])
    second = cache.at(cigre_pf.V[1])  # pushes the first out
    kept_bytes = cache.nbytes
    assert len(cache) == 1 and len(linearised) == 2
    assert cache.held(cigre_pf.V[0]) is first and cache.at(cigre_pf.V[0]) is first
    assert len(linearised) == 2 and len(cache) == 1 and cache.nbytes == kept_bytes
    del first
    gc.collect()
    assert cache.held(cigre_pf.V[0]) is None  # not kept by being found
    assert cache.held(cigre_pf.V[1]) is second
    cache.at(cigre_pf.V[0])
    assert len(linearised) == 3
    cache.clear()  # forgets the ones held elsewhere too
    assert cache.held(cigre_pf.V[1]) is None


def test_looking_a_point_up_makes_it_the_most_recently_used(cigre_pf):
    """``held`` (an AC check's look-up, which linearises nothing) counts as a use: the
    point it found outlives a point used before it when the budget drops one."""
    from lfm_zonal.grid import sensitivity as sens

    model = cigre_pf.model
    points = [cigre_pf.V[t] for t in (0, 3, 6)]
    cache = sens.LinearisationCache(model, size=2)
    kept = [cache.at(V) for V in points[:2]]
    assert cache.held(points[0]) is kept[0]  # 0 is now more recent than 1
    cache.at(points[2])  # one over the size: the least recently used goes
    del kept
    assert cache.held(points[0]) is not None and cache.held(points[1]) is None
    assert len(cache) == 2


def test_transposed_factor_solves_with_j_and_with_its_transpose(cigre_pf):
    """The linearisation's factor (SuperLU of J^T) solves J x = b and J^T w = b, one
    right-hand side or many, to the residual of a direct factorisation of J."""
    from lfm_zonal.grid.powerflow import TransposedFactor

    J = cigre_pf.model.jacobian(cigre_pf.V[5])
    dense = J.toarray()
    factor = TransposedFactor(J)
    rhs = np.random.default_rng(3).standard_normal((J.shape[0], 4))
    for b in (rhs, rhs[:, 0]):
        assert np.abs(dense @ factor.solve(b) - b).max() < 1e-9
        assert np.abs(dense.T @ factor.solve(b, trans="T") - b).max() < 1e-9
    assert factor.shape == J.shape and factor.nnz >= J.nnz


def test_kept_points_outlive_the_budget_up_to_their_own(cigre_pf, linearised):
    """``keep`` linearises points once and keeps them whatever the least-recently-used
    budget drops, as many as its own byte budget holds, in order; ``clear`` forgets them."""
    from lfm_zonal.grid import sensitivity as sens

    model = cigre_pf.model
    points = cigre_pf.V[[0, 3, 6]]
    sizes = [sens.LinearisationCache.entry_bytes(sens.linearisation(model, V)) for V in points]
    linearised.clear()
    cache = sens.LinearisationCache(model, budget_bytes=0)  # keeps the newest only
    assert cache.keep(points, budget_bytes=sum(sizes) - 1) == 2  # the third is over
    assert cache.kept_bytes == sizes[0] + sizes[1] and len(linearised) == 3
    kept = [cache.held(V) for V in points[:2]]
    for t in range(1, 20):  # the LRU entries come and go
        cache.at(cigre_pf.V[1] * (1 + 1e-9 * t))
    assert [cache.at(V) for V in points[:2]] == kept and len(linearised) == 3 + 19
    assert cache.keep(points[:2], budget_bytes=0) == 2  # kept already: nothing new
    # Beside the LRU: a point it holds moves over, its bytes with it; the LRU stays whole.
    lru = sens.LinearisationCache(model, size=2)
    held = [lru.at(cigre_pf.V[t]) for t in (1, 2)]
    assert lru.keep(cigre_pf.V[[1]]) == 1 and lru.held(cigre_pf.V[1]) is held[0]
    assert len(lru) == 1 and lru.nbytes == lru.entry_bytes(held[1])
    assert lru.kept_bytes == lru.entry_bytes(held[0])
    lru.keep(cigre_pf.V[[3, 4]])  # not through the LRU: the point it holds stays
    assert len(lru) == 1 and lru.held(cigre_pf.V[2]) is held[1]
    cache.clear()
    assert cache.kept_bytes == 0 and cache.held(points[0]) is None
