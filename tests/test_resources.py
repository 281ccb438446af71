"""Resources within physics: a load never reduces more than it consumes, an sgen never
curtails more than it produces, in every MTU (issue 10, item 6)."""

from __future__ import annotations

import logging

import numpy as np
import pandapower as pp
import pandas as pd
import pytest

from lfm_zonal import Horizon, load_grid, load_profiles, run_horizon
from lfm_zonal.market.resources import (
    FlexibilitySpec,
    bus_power_mw,
    generate_resources,
    read_resources,
)

HEADER = (
    "resource_id,aggregator,bus,kind,direction,p_max_mw,cost_up_eur_per_mwh,cost_down_eur_per_mwh"
)


def small_feeder() -> pp.pandapowerNet:
    """Slack - bus 1 (a 0.084 MW load and a 0.05 MW PV, scaling 2) - bus 2 (a 0.2 MW load)."""
    net = pp.create_empty_network()
    b0, b1, b2 = (pp.create_bus(net, 20.0) for _ in range(3))
    pp.create_ext_grid(net, b0, vm_pu=1.0)
    for a, b in ((b0, b1), (b1, b2)):
        pp.create_line_from_parameters(
            net, a, b, 1.0, r_ohm_per_km=0.2, x_ohm_per_km=0.1, c_nf_per_km=0.0, max_i_ka=0.3
        )
    pp.create_load(net, b1, p_mw=0.084, q_mvar=0.0)
    pp.create_load(net, b2, p_mw=0.2, q_mvar=0.0)
    pp.create_sgen(net, b1, p_mw=0.05, scaling=2.0)
    return net


@pytest.fixture(scope="module")
def small_pf(tmp_path_factory):
    """Two MTUs: the load at bus 1 consumes 0.084 then 0.2 MW; the PV produces 2 x 0.05, then 0."""
    folder = tmp_path_factory.mktemp("small")
    pd.DataFrame({"load_0_p_mw": [0.084, 0.2], "sgen_0_p_mw": [0.05, 0.0]}).to_csv(
        folder / "profiles.csv", index=False
    )
    grid = load_grid(small_feeder())
    return run_horizon(
        grid, load_profiles(grid, Horizon(n_mtu=2, mtu_minutes=60), csv=folder / "profiles.csv")
    )


def read(pf, tmp_path, *rows: str):
    path = tmp_path / "resources.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return read_resources(path, pf)


def test_bus_power_sums_loads_and_sgens_with_their_scaling(small_pf):
    load, sgen = bus_power_mw(small_pf, "load"), bus_power_mw(small_pf, "sgen")
    assert load[1].to_numpy() == pytest.approx([0.084, 0.2])
    assert load[2].to_numpy() == pytest.approx([0.2, 0.2])
    assert sgen[1].to_numpy() == pytest.approx([0.1, 0.0])


def test_a_csv_load_resource_larger_than_its_load_is_capped_with_a_warning(
    small_pf, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="lfm_zonal.market.resources"):
        res = read(small_pf, tmp_path, "L1,a,1,load,up,0.12,100,0")
    # MTU 0: the bus consumes 0.084 MW, so 0.084 MW is all the load can reduce; MTU 1: 0.2 MW.
    assert res.up_mw["L1"].to_numpy() == pytest.approx([0.084, 0.12])
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "L1" in warning and "bus 1" in warning and "0.036 MW" in warning


def test_within_its_load_a_resource_is_left_alone(small_pf, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lfm_zonal.market.resources"):
        res = read(small_pf, tmp_path, "L2,a,2,load,up,0.15,100,0")
    assert res.up_mw["L2"].to_numpy() == pytest.approx([0.15, 0.15])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_load_resources_at_one_bus_share_the_cap_pro_rata(small_pf, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lfm_zonal.market.resources"):
        res = read(
            small_pf,
            tmp_path,
            "L1,a,1,load,both,0.1,100,40",
            "L2,b,1,load,up,0.05,90,0",
            "L3,b,2,load,up,0.1,90,0",
        )
    # 0.15 MW offered at bus 1: MTU 0 scales both by 0.084 / 0.15, MTU 1 (0.2 MW) keeps them.
    assert res.up_mw["L1"].to_numpy() == pytest.approx([0.1 * 0.084 / 0.15, 0.1])
    assert res.up_mw["L2"].to_numpy() == pytest.approx([0.05 * 0.084 / 0.15, 0.05])
    together = res.up_mw[["L1", "L2"]].sum(axis=1).to_numpy()
    assert (together <= small_pf.profiles.load_p_mw[0].to_numpy() + 1e-12).all()
    # A load increase (down) is physically fine: left as offered.
    assert res.down_mw["L1"].to_numpy() == pytest.approx([0.1, 0.1])
    assert res.up_mw["L3"].to_numpy() == pytest.approx([0.1, 0.1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "L1, L2" in warnings[0] and "L3" not in warnings[0]


def test_sgen_curtailment_is_capped_at_the_output(small_pf, tmp_path, caplog):
    path = tmp_path / "with_storage.csv"
    path.write_text(
        HEADER
        + ",energy_mwh,soc_init_mwh,efficiency\n"
        + "G1,a,1,sgen,both,0.3,50,60,,,\n"
        + "G2,a,2,sgen,down,0.1,0,60,,,\n"
        + "S,a,2,storage,both,0.5,80,80,1.0,0.5,0.95\n"
    )
    with caplog.at_level(logging.WARNING, logger="lfm_zonal.market.resources"):
        res = read_resources(path, small_pf)
    assert res.down_mw["G1"].to_numpy() == pytest.approx([0.1, 0.0])  # 2 x 0.05, then night
    assert res.up_mw["G1"].to_numpy() == pytest.approx([0.3, 0.3])  # an increase: left alone
    assert res.down_mw["G2"].to_numpy() == pytest.approx([0.0, 0.0])
    assert res.up_mw["S"].to_numpy() == pytest.approx([0.5, 0.5])  # storage: not capped
    warnings = " | ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "G1" in warnings and "bus 1" in warnings and "G2" in warnings and "bus 2" in warnings
    assert "S " not in warnings


@pytest.mark.parametrize("grid_name", ["cigre_mv", "ieee33"])
def test_generated_resources_stay_within_their_element_even_with_shares_above_one(
    grid_name, caplog
):
    grid = load_grid(grid_name)
    pf = run_horizon(grid, load_profiles(grid, Horizon(start="2016-01-14 10:00", n_mtu=8)))
    spec = FlexibilitySpec(
        load_up_share=1.7, load_down_share=1.5, sgen_down_share=2.5, units_per_element=3
    )
    with caplog.at_level(logging.WARNING, logger="lfm_zonal.market.resources"):
        res = generate_resources(pf, spec, seed=1)
    assert any("capped at 1" in r.getMessage() for r in caplog.records)
    table = res.table
    for kind, avail in (("load", res.up_mw), ("sgen", res.down_mw)):
        mine = table[table.kind == kind]
        assert len(mine) or kind == "sgen"  # IEEE 33 has no sgen
        per_element = avail[mine.index].T.groupby(mine.element.to_numpy()).sum().T
        net_table = grid.net[kind]
        frame = pf.profiles.load_p_mw if kind == "load" else pf.profiles.sgen_p_mw
        produced = frame[per_element.columns] * net_table.scaling[per_element.columns]
        assert (per_element.to_numpy() <= produced.clip(lower=0).to_numpy() + 1e-9).all()
        assert np.allclose(per_element.to_numpy(), produced.clip(lower=0).to_numpy())
