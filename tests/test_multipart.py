"""Grids of several substations: separate parts, two slacks in one part; the streamed
segmentation of large grids against the exact one; the worst-MTU reference rule."""

from __future__ import annotations

import logging

import networkx as nx
import numpy as np
import pandapower as pp
import pandapower.networks as pn
import pandas as pd
import pytest

from lfm_zonal import Horizon, InputError, load_grid, load_profiles, run_horizon
from lfm_zonal.grid.sensitivity import (
    finite_difference_sensitivities,
    sensitivities,
    sensitivity_error,
)
from lfm_zonal.zones.segmentation import prepare_segmentation

DAY = Horizon(start="2016-05-29 10:00", n_mtu=4, mtu_minutes=60)


@pytest.fixture(scope="module")
def oberrhein_seg():
    grid = load_grid("mv_oberrhein")
    pf = run_horizon(grid, load_profiles(grid, DAY))
    return prepare_segmentation(pf, 0)


def _connected(seg, zones) -> bool:
    return all(nx.is_connected(seg.graph.subgraph(zones.members(z))) for z in range(zones.k))


@pytest.mark.parametrize("method", ["agglomerative", "spectral"])
def test_two_substations_in_separate_parts_are_segmented_from_k_parts_to_n(oberrhein_seg, method):
    seg = oberrhein_seg
    assert seg.n_parts == 2 and len(seg.pf.grid.net.ext_grid) == 2
    parts = seg.parts
    n = seg.n_buses
    for k in (2, 3, 4, 7, 20, n // 2, n):
        zones = seg.zones(k, method)
        assert zones.k == k and sorted(zones.zone_of_bus.unique()) == list(range(k))
        assert _connected(seg, zones), (method, k)
        zone = zones.zone_of_bus.to_numpy()
        # No zone spans both parts; every part has at least one zone.
        assert all(len(np.unique(parts[zone == z])) == 1 for z in range(k))
        assert set(parts[np.unique(zone, return_index=True)[1]]) == {0, 1}
        medoids = seg.medoids(zones)
        assert all(medoids[z] in zones.members(z) for z in range(k))
    # K = number of parts: one zone per part.
    two = seg.zones(2, method).zone_of_bus.to_numpy()
    assert np.array_equal(two, parts)


def test_k_below_the_number_of_parts_is_refused_with_the_number(oberrhein_seg):
    for method in ("agglomerative", "spectral"):
        with pytest.raises(
            InputError,
            match=r"K = 1 is below the 2 separate parts of grid mv_oberrhein: choose K >= 2",
        ):
            oberrhein_seg.zones(1, method)


def test_hierarchy_of_two_parts_is_nested_and_the_curve_starts_at_two(oberrhein_seg):
    seg = oberrhein_seg
    curve = seg.error_curve()
    assert list(curve.k) == list(range(2, seg.n_buses + 1))
    assert curve.segmentation_error.iloc[-1] == 0.0
    # Nested cuts: each zone at K + 1 lies inside one zone at K.
    for k in (2, 5, 11, 40):
        a, b = seg.zones(k).zone_of_bus.to_numpy(), seg.zones(k + 1).zone_of_bus.to_numpy()
        assert all(len(np.unique(a[b == z])) == 1 for z in range(k + 1))
    # The curve's fast merge sweep equals the indices at every K (K = parts included).
    ks = [2, 3, 9, 30]
    slow = [seg.error(seg.zones(k)) for k in ks]
    np.testing.assert_allclose(curve.set_index("k").segmentation_error[ks], slow, rtol=1e-9)


def two_slacks_in_one_part() -> pp.pandapowerNet:
    """mv_oberrhein with its two substations coupled: the open line switch nearest both parts
    closed, so one connected part holds both ext_grids."""
    net = pn.mv_oberrhein()
    net.load["scaling"] = 0.6
    net.sgen["scaling"] = 0.8
    import pandapower.topology as top

    g = top.create_nxgraph(net, respect_switches=True)
    part_of = {b: i for i, c in enumerate(nx.connected_components(g)) for b in c}
    for sw in net.switch[(~net.switch.closed) & (net.switch.et == "l")].itertuples():
        line = net.line.loc[sw.element]
        if part_of.get(line.from_bus) != part_of.get(line.to_bus):
            net.switch.at[sw.Index, "closed"] = True
            return net
    raise AssertionError("no coupling switch in mv_oberrhein")


@pytest.fixture(scope="module")
def coupled_pf():
    grid = load_grid(two_slacks_in_one_part())
    return run_horizon(grid, load_profiles(grid, DAY))


def test_two_ext_grids_in_one_part_power_flow_sensitivities_and_zones(coupled_pf):
    pf = coupled_pf
    assert pf.converged.all() and len(pf.model.ref) == 2
    seg = prepare_segmentation(pf, 0)
    assert seg.n_parts == 1
    # Jacobian sensitivities (both slacks absorb an injection) against finite differences.
    buses = [int(b) for b in pf.model.buses[[5, 60, 140]]]
    fd = finite_difference_sensitivities(pf, 0, buses)
    err = sensitivity_error(sensitivities(pf, 0), fd)
    assert max(err["loading_p"], err["vm_p"], err["vm_q"]) < 1e-3
    for k in (1, 2, 6, seg.n_buses):
        zones = seg.zones(k)
        assert _connected(seg, zones)
    assert seg.error_curve().k.iloc[0] == 1


def test_streamed_path_against_the_exact_one_on_a_mid_size_grid():
    # 600 buses forced onto the streamed path: the sketch of rank 256 < 600 truncates the
    # features, so Ward may merge a near-tie otherwise. Measured: the same zones at K <= 2,
    # error curves within 0.0072 of each other (0.01 asserted).
    grid = load_grid("synthetic_radial_600")
    pf = run_horizon(grid, load_profiles(grid, Horizon(start="2016-01-14 18:00", n_mtu=1)))
    exact = prepare_segmentation(pf, 0)
    streamed = prepare_segmentation(pf, 0, exact_max_buses=100)
    assert exact.sens is not None and streamed.sens is None
    for k in (1, 2):
        assert exact.zones(k).zone_of_bus.equals(streamed.zones(k).zone_of_bus)
    curve = streamed.error_curve()
    assert curve.k.iloc[0] == 1 and curve.k.iloc[-1] == 600 and len(curve) <= 32
    assert curve.segmentation_error.iloc[-1] == 0.0
    exact_curve = exact.error_curve().set_index("k").segmentation_error
    gap = np.abs(exact_curve[curve.k].to_numpy() - curve.segmentation_error.to_numpy())
    assert gap.max() <= 0.01
    for k in (5, 40):
        a, b = exact.zones(k), streamed.zones(k)
        assert _connected(streamed, b)
        # The streamed error of a partition is the exact error of that partition, and the
        # curve's value at K is the error of the cut at K.
        np.testing.assert_allclose(streamed.error(a), exact.error(a), rtol=1e-9)
        if k in set(curve.k):
            np.testing.assert_allclose(
                curve.set_index("k").segmentation_error[k], streamed.error(b), rtol=1e-9
            )
        med = streamed.medoids(b)
        assert all(med[z] in b.members(z) for z in range(k))
    assert streamed.error(streamed.zones(600)) == 0.0


def pv_feeder() -> pp.pandapowerNet:
    """A 0.4 kV feeder: evening load peak, PV noon overvoltage (computed by hand below)."""
    net = pp.create_empty_network(name="pv_feeder")
    buses = [pp.create_bus(net, 0.4) for _ in range(4)]
    pp.create_ext_grid(net, buses[0], vm_pu=1.03)
    for a, b in zip(buses[:-1], buses[1:], strict=True):
        pp.create_line(net, a, b, 0.25, std_type="NAYY 4x150 SE")
    for b in buses[1:]:
        pp.create_load(net, b, p_mw=0.02, q_mvar=0.005)
        pp.create_sgen(net, b, p_mw=0.06, type="PV")
    return net


def test_worst_mtu_is_the_noon_overvoltage_not_the_evening_peak(tmp_path):
    from lfm_zonal.check.ac import ACCheck, residual_violations
    from lfm_zonal.study.job import prepare_base_case
    from lfm_zonal.study.scenario import load_scenario

    pp.to_json(pv_feeder(), str(tmp_path / "pv.json"))
    (tmp_path / "pv.toml").write_text(
        'name = "pv"\n[grid]\nsource = "pv.json"\n'
        '[horizon]\nstart = "2016-06-01 00:00"\nn_mtu = 24\nmtu_minutes = 60\n'
        "[zones]\nk = [1, 2]\n",
        encoding="utf-8",
    )
    base = prepare_base_case(load_scenario(tmp_path / "pv.toml"))
    pf = base.powerflow
    peak = base.reference_mtu
    assert pf.times[peak].hour == 19  # the synthetic load peak
    # By hand: MW-equivalent of every violated row = excess / largest |d row / d P|.
    vm = pf.vm_pu.to_numpy()
    assert vm[peak].max() <= pf.grid.vm_max_pu  # no violation at the peak
    rows = residual_violations(pf, ACCheck(pf.loading_percent, pf.vm_pu, pf.converged, ()))
    assert set(rows.violation) == {"overvoltage"}
    by_mtu = rows.groupby("mtu").residual_mw.max()
    expected = int(by_mtu.idxmax())
    assert 10 <= pf.times[expected].hour <= 15
    sens = sensitivities(pf, expected)
    worst = rows.loc[rows.residual_mw.idxmax()]
    by_hand = (vm[expected, pf.model.buses.get_loc(worst.element)] - pf.grid.vm_max_pu) / (
        sens.vm_p.loc[worst.element].abs().max()
    )
    assert worst.residual_mw == pytest.approx(by_hand, rel=1e-9)
    ref = base.zones_reference("worst")
    assert (ref.position, ref.rule) == (expected, "worst") and "overvoltage of bus" in ref.reason
    assert base.zones_reference("peak").position == peak
    assert base.zones_reference(5).position == 5
    # Without any violation the worst rule falls back to the peak.
    text = (tmp_path / "pv.toml").read_text(encoding="utf-8")
    (tmp_path / "calm.toml").write_text(
        text.replace('source = "pv.json"', 'source = "pv.json"\nvm_max_pu = 1.5'), encoding="utf-8"
    )
    calm = prepare_base_case(load_scenario(tmp_path / "calm.toml"))
    assert calm.worst_violation() is None
    ref = calm.zones_reference("worst")
    assert (ref.position, ref.rule) == (calm.reference_mtu, "peak")


def test_zones_command_says_which_reference_rule(tmp_path, capsys):
    from lfm_zonal.cli import main

    out = tmp_path / "z"
    assert main(["zones", "--grid", "mv_oberrhein", "--n-mtu", "4", "--k", "2", "--k", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "reference MTU rule" in printed
    curve = pd.read_csv(out / "error_curve.csv")
    assert curve.k.iloc[0] == 2
    assert main(["zones", "--grid", "mv_oberrhein", "--n-mtu", "4", "--k", "1",
                 "--out", str(tmp_path / "y")]) == 2  # fmt: skip
    assert "below the 2 separate parts of grid mv_oberrhein: choose K >= 2" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_nodal_only_run_on_two_parts_writes_zones_of_one_per_part(tmp_path, workers):
    """A nodal market needs no zones, but its results folder has a zones folder: on a grid of
    two separate parts its zones are the fewest the grid allows, K = 2 (K = 1 was refused
    there, failing the run at the last step)."""
    import re

    from lfm_zonal.cli import main
    from lfm_zonal.files.inputs import shipped_toml_text

    text = shipped_toml_text("mv_oberrhein_two_substations")
    text = re.sub(r"(?m)^methods = .*$", 'methods = ["nodal"]', text)
    text = re.sub(r"(?m)^n_mtu = .*$", "n_mtu = 2", text)
    (tmp_path / "nodal.toml").write_text(text, encoding="utf-8")
    out = str(tmp_path / "out")
    assert main(["run", str(tmp_path / "nodal.toml"), "--out", out, "--workers", workers]) == 0
    zones = pd.read_csv(tmp_path / "out" / "zones" / "zones.csv")
    assert set(zones.k) == {2}
    assert (tmp_path / "out" / "zones" / "zones_k2.png").exists()


def test_the_streamed_curve_is_the_error_of_every_cut():
    """The streamed error curve computes each distinct zone of the hierarchy once, whichever
    cuts hold it, and no zone of one bus: at every K it is still the error of the cut at K
    computed zone by zone on its own (``Segmentation.error``)."""
    grid = load_grid("synthetic_radial_600")
    pf = run_horizon(grid, load_profiles(grid, Horizon(start="2016-01-14 18:00", n_mtu=1)))
    streamed = prepare_segmentation(pf, 0, exact_max_buses=100)
    curve = streamed.error_curve().set_index("k")
    assert len(curve) >= 25
    zones = [streamed.zones(k) for k in curve.index]
    streamed.prime_indices(zones)  # every cut's error in one pass of the columns
    np.testing.assert_allclose(
        curve[["loading_error", "vm_error", "segmentation_error"]].to_numpy(),
        [list(streamed.indices(z).overall_error().values()) for z in zones],
        rtol=1e-9,
        atol=0,
    )


def test_a_big_grids_curve_is_written_when_its_process_dies(tmp_path, monkeypatch, caplog):
    """``write_zones`` computes a big grid's error curve in a forked process beside the
    maps; killed there (out of memory), the curve is computed again in this process: the
    same file as in one process, and a warning."""
    import os

    from lfm_zonal.study.results import write_zones

    grid = load_grid("synthetic_radial_600")
    pf = run_horizon(grid, load_profiles(grid, Horizon(start="2016-01-14 18:00", n_mtu=1)))
    seg = prepare_segmentation(pf, 0, exact_max_buses=100)
    zones = [seg.zones(2)]
    write_zones(seg, zones, tmp_path / "alone", "g", workers=1)
    parent, curve = os.getpid(), type(seg).error_curve

    def dies_in_a_child(self, *args, **kwargs):
        if os.getpid() != parent:
            os._exit(1)
        return curve(self, *args, **kwargs)

    monkeypatch.setattr(type(seg), "error_curve", dies_in_a_child)
    write_zones(seg, zones, tmp_path / "beside", "g", workers=2)
    assert "error curve's process died" in caplog.text
    for name in ("error_curve.csv", "zones.csv"):
        assert (tmp_path / "beside" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()


def test_mv_oberrhein_loads_without_pandapower_warnings(caplog):
    """Its built-in net runs pandapower's power flow with numba=True: the warning that numba
    is missing would precede every command's output (one line per mistake, nothing else)."""
    from lfm_zonal.grid import sources

    with caplog.at_level(logging.DEBUG):
        net = sources._mv_oberrhein()
    assert len(net.bus) == 179
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert logging.getLogger("pandapower.auxiliary").level == logging.NOTSET
