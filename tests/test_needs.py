"""DSO needs that a market can meet: the registered-capacity rule (issue 10, item 5)."""

from __future__ import annotations

import numpy as np
import pandapower as pp
import pandas as pd
import pytest
from test_market import clear_on

from lfm_zonal import Horizon, InputError, load_grid, load_profiles, run_horizon
from lfm_zonal.market.resources import FlexibilitySpec, generate_resources, read_resources
from lfm_zonal.study.scenario import parse_scenario
from lfm_zonal.zones.segmentation import prepare_segmentation

HEADER = (
    "resource_id,aggregator,bus,kind,direction,p_max_mw,cost_up_eur_per_mwh,cost_down_eur_per_mwh"
)


def long_feeder() -> pp.pandapowerNet:
    """Slack - bus 1 - bus 2 (3 MW load) - bus 3 (2 MW load), 6 km per section: bus 3 at
    0.942 p.u., below the 0.95 band; reducing load at bus 3 is the most effective fix."""
    net = pp.create_empty_network()
    buses = [pp.create_bus(net, 20.0) for _ in range(4)]
    pp.create_ext_grid(net, buses[0], vm_pu=1.0)
    for a, b in zip(buses[:-1], buses[1:], strict=True):
        pp.create_line_from_parameters(
            net, a, b, 6.0, r_ohm_per_km=0.3, x_ohm_per_km=0.2, c_nf_per_km=0.0, max_i_ka=1.0
        )
    pp.create_load(net, buses[2], p_mw=3.0, q_mvar=0.0)
    pp.create_load(net, buses[3], p_mw=2.0, q_mvar=0.0)
    return net


@pytest.fixture(scope="module")
def feeder_pf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feeder")
    pd.DataFrame({"load_0_p_mw": [3.0], "load_1_p_mw": [2.0]}).to_csv(
        folder / "profiles.csv", index=False
    )
    grid = load_grid(long_feeder(), vm_min_pu=0.95, vm_max_pu=1.05)
    pf = run_horizon(
        grid, load_profiles(grid, Horizon(n_mtu=1, mtu_minutes=60), csv=folder / "profiles.csv")
    )
    assert pf.vm_pu.iloc[0][3] < 0.945
    return pf


def offers_at_bus_2_only(pf, tmp_path, p_max_mw: float):
    """Load reduction offered at bus 2 only: bus 3, the most effective, offers nothing."""
    path = tmp_path / "resources.csv"
    path.write_text(f"{HEADER}\nL2,a,2,load,up,{p_max_mw},100,0\n")
    res = read_resources(path, pf)
    seg = prepare_segmentation(pf, 0, flexible_capacity_mw=res.capacity_per_bus())
    return res, seg


def zone_of(result, bus: int) -> int:
    return int(result.zones.zone_of_bus[bus])


def test_the_need_goes_to_the_zone_with_offers(feeder_pf, tmp_path):
    res, seg = offers_at_bus_2_only(feeder_pf, tmp_path, 2.0)
    # One zone per bus, so "the zone" of a bus is the bus.
    unlimited = clear_on(seg, res, "needs_based", seg.n_buses, needs_rule="unlimited")
    registered = clear_on(seg, res, "needs_based", seg.n_buses)  # the default rule
    # Unlimited: the whole need at bus 3, where nothing is offered, so nothing is bought.
    assert set(unlimited.needs.zone) == {zone_of(unlimited, 3)}
    assert unlimited.kpis["activated_mwh"] == 0
    assert unlimited.kpis["unmet_mwh"] > 0.4
    # Registered capacity: the need is published at bus 2, more MW (bus 2 is less effective),
    # all of it bought there; the voltage is fixed up to the linearisation's error.
    need = registered.needs.set_index("zone").need_mw
    assert list(need.index) == [zone_of(registered, 2)]
    assert need.iloc[0] > unlimited.needs.need_mw.sum()
    assert registered.kpis["activated_mwh"] == pytest.approx(need.iloc[0], rel=1e-6)
    assert registered.kpis["unmet_mwh"] < 0.01
    assert registered.kpis["vm_min_after_pu"] > 0.9495


def test_offers_that_cannot_fix_it_are_all_asked_for_and_never_more(feeder_pf, tmp_path):
    res, seg = offers_at_bus_2_only(feeder_pf, tmp_path, 0.3)
    result = clear_on(seg, res, "needs_based", seg.n_buses)
    assert result.needs.need_mw.to_numpy() == pytest.approx([0.3])
    assert result.kpis["activated_mwh"] == pytest.approx(0.3)
    assert result.unmet.unfixable_mw.iloc[0] > 0  # what the offers there cannot fix


@pytest.fixture(scope="module")
def cigre_day():
    grid = load_grid("cigre_mv")
    pf = run_horizon(
        grid,
        load_profiles(grid, Horizon(start="2016-01-14 16:00", n_mtu=12), load_scale=1.25),
    )
    res = generate_resources(
        pf, FlexibilitySpec(load_up_share=0.35, units_per_element=2, storage_units=1), seed=3
    )
    seg = prepare_segmentation(
        pf,
        int(pf.profiles.total_load_mw().to_numpy().argmax()),
        flexible_capacity_mw=res.capacity_per_bus(),
    )
    return pf, res, seg


@pytest.mark.parametrize("k", [2, 4, 8])
def test_registered_capacity_needs_never_exceed_what_is_registered(cigre_day, k):
    _, res, seg = cigre_day
    result = clear_on(seg, res, "needs_based", k)
    keys = ["mtu", "zone", "direction"]
    registered = result.bids.groupby(keys).quantity_mw.sum()
    need = result.needs.set_index(keys).need_mw
    assert len(need) > 0
    assert (need <= registered.reindex(need.index).fillna(0.0) + 1e-6).all()
    # So the merit order meets every published need in full.
    bought = result.bids.groupby(keys).accepted_mw.sum().reindex(need.index).fillna(0.0)
    assert np.allclose(bought, need, atol=1e-6)


def test_unlimited_needs_can_exceed_what_is_registered(cigre_day):
    """The reason for the rule: on the same case, today's needs pile up beyond the offers."""
    _, res, seg = cigre_day
    result = clear_on(seg, res, "needs_based", 8, needs_rule="unlimited")
    keys = ["mtu", "zone", "direction"]
    registered = result.bids.groupby(keys).quantity_mw.sum()
    need = result.needs.set_index(keys).need_mw
    assert (need > registered.reindex(need.index).fillna(0.0) + 1e-6).any()


def test_needs_rule_is_checked(cigre_day):
    _, res, seg = cigre_day
    with pytest.raises(InputError, match="unknown needs rule 'everything'"):
        clear_on(seg, res, "needs_based", 2, needs_rule="everything")


def test_needs_rule_is_a_scenario_key():
    base = '[grid]\nsource = "cigre_mv"\n'
    assert parse_scenario(base, "s.toml")["market"]["needs"] == "registered_capacity"
    chosen = parse_scenario(base + '[market]\nneeds = "unlimited"\n', "s.toml")
    assert chosen["market"]["needs"] == "unlimited"
    with pytest.raises(InputError, match="'market.needs' must be one of"):
        parse_scenario(base + '[market]\nneeds = "all"\n', "s.toml")
