"""The horizon power flow reproduces pandapower.runpp MTU by MTU, on every kind of grid."""

from __future__ import annotations

import numpy as np
import pandapower as pp
import pandas as pd
import pytest

from lfm_zonal import Horizon, load_grid, load_profiles, run_horizon
from lfm_zonal.grid.sources import simbench_net
from lfm_zonal.grid.violations import VIOLATION_TOLERANCE_VM_PU


def runpp_results(pf, mtu):
    net = pf.operating_point(mtu)
    pp.runpp(net, numba=False)
    loading = pd.Series(
        [net[f"res_{kind}"].at[idx, "loading_percent"] for kind, idx in pf.model.branches],
        index=pf.model.branches,
    )
    return net.res_bus.vm_pu.reindex(pf.model.buses), loading


@pytest.mark.parametrize("name", ["cigre_pf", "ieee33_pf", "simbench_mv_pf", "mixed_pf", "ring_pf"])
def test_horizon_power_flow_equals_pandapower(name, request):
    pf = request.getfixturevalue(name)
    assert pf.converged.all()
    for mtu in (0, len(pf.times) - 1):
        vm, loading = runpp_results(pf, mtu)
        np.testing.assert_allclose(pf.vm_pu.iloc[mtu].to_numpy(), vm.to_numpy(), atol=1e-7)
        np.testing.assert_allclose(
            pf.loading_percent.iloc[mtu].to_numpy(), loading.to_numpy(), atol=1e-5
        )


def test_switches_isolation_and_out_of_service(mixed_pf):
    model = mixed_pf.model
    net = mixed_pf.grid.net
    merged = int(net.bus.index[net.bus.name == "merged with bus 5"][0])
    # Closed bus-bus switch: the two buses share one internal index and one voltage.
    assert model.bus_lookup[merged] == model.bus_lookup[5]
    assert mixed_pf.vm_pu[merged].equals(mixed_pf.vm_pu[5])
    # Isolated buses (no path to the slack) are flagged and carry no voltage column.
    isolated = set(
        net.bus.index[
            net.bus.name.isin(
                ["isolated", "behind open bus-bus switch", "end of out-of-service line"]
            )
        ]
    )
    assert isolated == set(model.isolated_buses)
    assert isolated.isdisjoint(mixed_pf.vm_pu.columns)
    # Out-of-service lines are not monitored; in-service lines and both trafo levels are.
    oos = set(net.line.index[~net.line.in_service.astype(bool)])
    monitored = set(model.branches)
    assert not {("line", i) for i in oos} & monitored
    assert {("trafo", i) for i in net.trafo.index} <= monitored


def test_unconverged_mtu_is_reported_and_skipped(tmp_path):
    grid = load_grid("ieee33")
    horizon = Horizon(start="2016-01-14 00:00", n_mtu=3)
    # MTU 1 asks 400 MW of the 12.66 kV feeder: no power flow solution exists.
    csv = tmp_path / "profiles.csv"
    pd.DataFrame({"load_17_p_mw": [0.09, 400.0, 0.09]}).to_csv(csv, index=False)
    pf = run_horizon(grid, load_profiles(grid, horizon, csv=csv))
    assert pf.converged.tolist() == [True, False, True]
    assert pf.vm_pu.iloc[1].isna().all()
    assert len(pf.failures) == 1 and "MTU 1 (2016-01-14 00:15:00)" in pf.failures[0]
    # Its violation counts are missing, as its maxima: no state, not 0 violations.
    v = pf.violations()
    counts = ["overloaded_branches", "undervoltage_buses", "overvoltage_buses"]
    assert v.loc[v.index[1], counts].isna().all() and v.vm_min_pu.isna().iloc[1]
    assert v.loc[v.index[[0, 2]], counts].notna().all().all()
    below = pf.vm_pu.iloc[0] < grid.vm_min_pu - VIOLATION_TOLERANCE_VM_PU
    assert v.undervoltage_buses.iloc[0] == below.sum()
    # The others are solved normally.
    vm, _ = runpp_results(pf, 2)
    np.testing.assert_allclose(pf.vm_pu.iloc[2].to_numpy(), vm.to_numpy(), atol=1e-7)


def test_simbench_profiles_follow_the_2016_table():
    import simbench as sb

    grid = load_grid("1-MV-rural--0-sw")
    horizon = Horizon(start="2016-03-01 10:00", n_mtu=2, mtu_minutes=30)
    profiles = load_profiles(grid, horizon)
    absolute = sb.get_absolute_values(grid.net, profiles_instead_of_study_cases=True)
    row = int(
        (pd.Timestamp("2016-03-01 10:00") - pd.Timestamp("2016-01-01")) / pd.Timedelta("15min")
    )
    expected = absolute[("load", "p_mw")].iloc[row : row + 2].mean()  # a 30-min MTU: mean of two
    np.testing.assert_allclose(profiles.load_p_mw.iloc[0].to_numpy(), expected.to_numpy())
    assert profiles.source == "simbench"


def test_simbench_cache_returns_the_extracted_network(tmp_path, monkeypatch):
    import simbench as sb

    code = "1-LV-rural1--0-sw"
    monkeypatch.setenv("LFM_ZONAL_CACHE", str(tmp_path))
    first = simbench_net(code)  # extracted, then written
    (written,) = tmp_path.glob(f"simbench-{code}-*.pickle")
    cached = simbench_net(code)  # read back
    fresh = sb.get_simbench_net(code)
    for table in ("bus", "line", "trafo", "load", "sgen", "ext_grid"):
        pd.testing.assert_frame_equal(cached[table], fresh[table])
    for name, frame in fresh.profiles.items():
        pd.testing.assert_frame_equal(cached.profiles[name], frame)
    assert cached is not first
    # A damaged cache file is extracted again and rewritten, not an error.
    written.write_bytes(b"not a pickle")
    pd.testing.assert_frame_equal(simbench_net(code).line, fresh.line)
    assert written.stat().st_size > 1000
    monkeypatch.setenv("LFM_ZONAL_CACHE", "off")
    pd.testing.assert_frame_equal(simbench_net(code).bus, fresh.bus)


def test_synthetic_profile_peaks_in_the_evening(cigre):
    profiles = load_profiles(cigre, Horizon())
    total = profiles.total_load_mw()
    assert total.idxmax().hour == 19
    pv = profiles.sgen_p_mw[cigre.net.sgen.index[cigre.net.sgen.type == "PV"]].sum(axis=1)
    assert pv.idxmax().hour == 13 and pv.iloc[0] == 0.0
