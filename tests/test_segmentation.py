"""Segmentation: connected zones, K = N is nodal, K = 1 is one zone, errors shrink with K."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from lfm_zonal import Horizon, InputError, load_grid, load_profiles, run_horizon
from lfm_zonal.zones.segmentation import (
    SEGMENTATION_METHODS,
    overall_error,
    prepare_segmentation,
)


@pytest.fixture(scope="module")
def segs(cigre_pf, ieee33_pf, simbench_mv_pf, ring_pf, mixed_pf):
    return {
        name: prepare_segmentation(pf, 0)
        for name, pf in {
            "cigre": cigre_pf,
            "ieee33": ieee33_pf,
            "simbench": simbench_mv_pf,
            "ring": ring_pf,
            "mixed": mixed_pf,
        }.items()
    }


@pytest.mark.parametrize("name", ["cigre", "ieee33", "simbench", "ring", "mixed"])
@pytest.mark.parametrize("method", SEGMENTATION_METHODS)
def test_every_zone_is_connected_and_every_bus_has_one(segs, name, method):
    seg = segs[name]
    for k in (1, 2, 3, 5, 8, seg.n_buses // 2, seg.n_buses):
        zones = seg.zones(k, method)
        assert zones.k == k and sorted(zones.zone_of_bus.unique()) == list(range(k))
        assert zones.buses.equals(seg.pf.model.buses)
        for z in range(k):
            assert nx.is_connected(seg.graph.subgraph(zones.members(z))), (name, method, k, z)


def test_open_switches_are_respected(segs):
    # CIGRE S1 (open) sits on line 14 between buses 14 and 8; the ring variant closes it.
    assert not segs["cigre"].graph.has_edge(8, 14)
    assert segs["ring"].graph.has_edge(8, 14)


@pytest.mark.parametrize("name", ["cigre", "ieee33", "simbench", "mixed"])
def test_k_equals_n_reproduces_the_nodal_sensitivities(segs, name):
    seg = segs[name]
    zones = seg.zones(seg.n_buses)
    idx = seg.indices(zones)
    bus_of_zone = zones.zone_of_bus.reset_index().set_index("zone")["bus"].sort_index()
    assert np.array_equal(
        idx.loading_p.to_numpy(), seg.sens.loading_p[:, np.argsort(zones.zone_of_bus.to_numpy())]
    )
    np.testing.assert_array_equal(
        idx.vm_q.to_numpy(), seg.sens.vm_q[:, seg.pf.model.buses.get_indexer(bus_of_zone)]
    )
    assert idx.overall_error() == {"loading": 0.0, "vm": 0.0, "mean": 0.0}


def test_k_equals_one_is_the_whole_feeder(segs):
    seg = segs["ieee33"]
    zones = seg.zones(1)
    assert (zones.zone_of_bus == 0).all()
    # Capacity-weighted mean of all nodal columns, computed by hand.
    w = seg.weights.reindex(seg.pf.model.buses).to_numpy()
    expected = seg.sens.loading_p @ w / w.sum()
    np.testing.assert_allclose(seg.indices(zones).loading_p[0].to_numpy(), expected, rtol=1e-12)


def test_weighted_mean_by_hand_and_medoid_in_zone(segs):
    seg = segs["cigre"]
    zones = seg.zones(4)
    idx = seg.indices(zones)
    medoids = seg.medoids(zones)
    for z in range(4):
        members = zones.members(z)
        pos = seg.pf.model.buses.get_indexer(members)
        w = seg.weights[members].to_numpy()
        w = w if w.sum() > 0 else np.ones(len(w))
        np.testing.assert_allclose(idx.vm_p[z].to_numpy(), seg.sens.vm_p[:, pos] @ w / w.sum())
        assert medoids[z] in members


@pytest.mark.parametrize("name", ["cigre", "ieee33", "simbench"])
def test_error_shrinks_as_k_grows_and_reaches_zero(segs, name):
    curve = segs[name].error_curve()
    err = curve.segmentation_error.to_numpy()
    assert err[-1] == 0.0 and err[0] > 0.5
    # Ward merges always join the two closest adjacent clusters: on these feeders the
    # capacity-weighted error never grows when a zone is split.
    assert (np.diff(err) <= 1e-12).all()


def test_zones_and_numbering_are_deterministic():
    def zones_once():
        grid = load_grid("ieee33")
        pf = run_horizon(grid, load_profiles(grid, Horizon(n_mtu=2)))
        seg = prepare_segmentation(pf, 0)
        return [seg.zones(k, m, seed=7).zone_of_bus for k in (3, 6) for m in SEGMENTATION_METHODS]

    for a, b in zip(zones_once(), zones_once(), strict=True):
        assert a.equals(b)
        # Numbering follows the smallest bus of each zone.
        assert list(a.groupby(a).apply(lambda s: s.index.min()).sort_values().index) == list(
            range(a.max() + 1)
        )


@pytest.mark.parametrize("k", [0, -1, 34])
def test_k_out_of_range_is_refused(segs, k):
    with pytest.raises(InputError, match=r"K = .* out of range: the grid has 33 energised buses"):
        segs["ieee33"].zones(k)


def test_indices_recomputed_per_mtu(segs):
    seg = segs["cigre"]
    zones = seg.zones(4)
    at_ref, later = seg.indices(zones), seg.indices(zones, mtu=7)
    assert not np.allclose(at_ref.loading_p.to_numpy(), later.loading_p.to_numpy())
    assert later.zones is zones


def test_zones_command_writes_tables_and_maps(tmp_path):
    import pandas as pd

    from lfm_zonal.cli import main

    out = tmp_path / "z"
    assert (
        main(
            ["zones", "--grid", "ieee33", "--n-mtu", "4", "--k", "1", "--k", "5", "--out", str(out)]
        )
        == 0
    )
    zones = pd.read_csv(out / "zones.csv")
    assert set(zones.k) == {1, 5} and zones.groupby("k").medoid.sum().to_dict() == {1: 1, 5: 5}
    curve = pd.read_csv(out / "error_curve.csv")
    assert list(curve.k) == list(range(1, 34)) and curve.segmentation_error.iloc[-1] == 0
    for f in ("zones_k1.png", "zones_k5.png", "error_curve.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name", ["cigre", "simbench"])
def test_merge_sweep_equals_indices_at_every_k(segs, name):
    seg = segs[name]
    fast = seg.error_curve()
    ks = list(range(1, seg.n_buses + 1, max(1, seg.n_buses // 12)))
    slow = seg.error_curve(ks)
    np.testing.assert_allclose(
        fast.set_index("k").loc[ks, ["loading_error", "vm_error"]].to_numpy(),
        slow[["loading_error", "vm_error"]].to_numpy(),
        rtol=1e-9,
        atol=1e-12,
    )


def test_primed_indices_are_the_per_k_ones_in_one_streamed_pass(simbench_mv_pf, monkeypatch):
    # The streamed path forced on a small grid: prime_indices solves the bus columns once for
    # every partition, and each partition's indices are bitwise those of its own pass.
    from lfm_zonal.zones.streamed import COLUMN_CHUNK, SensitivityColumns

    seg = prepare_segmentation(simbench_mv_pf, 0, exact_max_buses=10)
    assert seg.streamed and seg.n_buses > 2 * COLUMN_CHUNK  # several blocks
    zone_sets = [seg.zones(1), seg.zones(5), seg.zones(17), seg.zones(5, "spectral")]
    per_k = [seg._indices(zones, None) for zones in zone_sets]  # one pass each, no memo
    solved = []
    block = SensitivityColumns.block
    monkeypatch.setattr(
        SensitivityColumns, "block", lambda cols, pos: solved.append(len(pos)) or block(cols, pos)
    )
    seg.prime_indices(zone_sets + [seg.zones(5)])  # an equal partition is computed once
    assert sum(solved) == seg.n_buses and len(solved) == -(-seg.n_buses // COLUMN_CHUNK)
    for zones, alone in zip(zone_sets, per_k, strict=True):
        primed = seg.indices(zones)  # a memo hit
        for name in ("error", "element_error", "loading_p", "loading_q", "vm_p", "vm_q"):
            a, b = getattr(primed, name), getattr(alone, name)
            assert a.index.equals(b.index) and a.columns.equals(b.columns)
            assert np.array_equal(a.to_numpy(), b.to_numpy()), (zones.k, name)
        assert seg.error(zones) == overall_error(alone.error)["mean"]
    seg.prime_indices(zone_sets)  # all in the memo: no pass
    assert sum(solved) == seg.n_buses
