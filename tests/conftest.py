"""Shared fixtures: grids and base-case power flows, built once per test session."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pandapower as pp
import pandapower.networks as pn
import pytest

from lfm_zonal import Horizon, load_grid, load_profiles, run_horizon

warnings.filterwarnings("ignore")

SCENARIOS = Path(__file__).parents[1] / "scenarios"


def small_scenario(
    folder: Path, k: str = "1, 2", methods: str = '"nodal", "zonal"', name: str = "small.toml"
) -> Path:
    """The default scenario on 4 MTUs of its evening peak, ``methods`` at the K of ``k``,
    written to ``folder / name``."""
    text = (SCENARIOS / "cigre_mv_evening_peak.toml").read_text()
    text = re.sub(r"n_mtu = \d+", "n_mtu = 4", text).replace("00:00", "17:00")
    text = re.sub(r"(?m)^k = .*$", f"k = [{k}]", text)
    text = re.sub(r"(?m)^methods = .*$", f"methods = [{methods}]", text)
    path = folder / name
    path.write_text(text)
    return path


# A short horizon around the evening peak keeps the suite fast.
PEAK = Horizon(start="2016-01-14 17:00", n_mtu=8, mtu_minutes=15)


def cigre_with_lv_and_switches() -> pp.pandapowerNet:
    """CIGRE MV plus what real grids have: a closed bus-bus switch that merges two buses,
    a 20/0.4 kV trafo with an LV feeder behind it, an isolated bus, an open bus-bus
    switch that isolates a load, and an out-of-service line."""
    net = pn.create_cigre_network_mv(with_der="pv_wind")
    merged = pp.create_bus(net, 20.0, name="merged with bus 5")
    pp.create_switch(net, 5, merged, et="b", closed=True)
    lv0 = pp.create_bus(net, 0.4, name="LV busbar")
    pp.create_transformer(net, merged, lv0, std_type="0.63 MVA 20/0.4 kV")
    lv1 = pp.create_bus(net, 0.4, name="LV 1")
    lv2 = pp.create_bus(net, 0.4, name="LV 2")
    pp.create_line(net, lv0, lv1, 0.15, std_type="NAYY 4x150 SE")
    pp.create_line(net, lv1, lv2, 0.10, std_type="NAYY 4x150 SE")
    pp.create_load(net, lv1, p_mw=0.12, q_mvar=0.03)
    pp.create_load(net, lv2, p_mw=0.10, q_mvar=0.02)
    pp.create_sgen(net, lv2, p_mw=0.05, type="PV")
    pp.create_bus(net, 20.0, name="isolated")
    cut = pp.create_bus(net, 20.0, name="behind open bus-bus switch")
    pp.create_switch(net, 9, cut, et="b", closed=False)
    pp.create_load(net, cut, p_mw=0.2, q_mvar=0.05)
    oos = pp.create_bus(net, 20.0, name="end of out-of-service line")
    pp.create_line(net, 10, oos, 0.5, std_type="NA2XS2Y 1x95 RM/25 12/20 kV", in_service=False)
    return net


@pytest.fixture(scope="session")
def cigre():
    return load_grid("cigre_mv")


@pytest.fixture(scope="session")
def cigre_pf(cigre):
    return run_horizon(cigre, load_profiles(cigre, PEAK))


@pytest.fixture(scope="session")
def ieee33_pf():
    grid = load_grid("ieee33")
    return run_horizon(grid, load_profiles(grid, PEAK))


@pytest.fixture(scope="session")
def simbench_mv_pf():
    grid = load_grid("1-MV-rural--0-sw")
    return run_horizon(grid, load_profiles(grid, Horizon(start="2016-06-01 12:00", n_mtu=4)))


@pytest.fixture(scope="session")
def mixed_pf():
    grid = load_grid(cigre_with_lv_and_switches())
    return run_horizon(grid, load_profiles(grid, PEAK))


@pytest.fixture(scope="session")
def ring_pf():
    net = pn.create_cigre_network_mv(with_der="pv_wind")
    net.switch["closed"] = True  # S1, S2, S3 closed: two rings
    grid = load_grid(net)
    return run_horizon(grid, load_profiles(grid, PEAK))
