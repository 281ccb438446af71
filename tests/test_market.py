"""Market clearing: hand-computed optimum, nodal AC residuals, K = N equals nodal, AC truth check."""

from __future__ import annotations

import copy

import numpy as np
import pandapower as pp
import pandas as pd
import pytest

from lfm_zonal import Horizon, InputError, load_grid, load_profiles, run_horizon
from lfm_zonal.check.ac import dispatched_net
from lfm_zonal.market.bids import Bids, build_bids, dispatch_steps, sorted_rows
from lfm_zonal.market.clearing import clear_market, clearing_prices
from lfm_zonal.market.resources import FlexibilitySpec, generate_resources, read_resources
from lfm_zonal.zones.segmentation import prepare_segmentation

# ----------------------------------------------------------------------------- hand-built feeder


def three_bus_feeder(
    load_q_mvar: float = 0.0, bus1_load_mw: float | None = None
) -> pp.pandapowerNet:
    """Slack - line 0 (strong) - bus 1 - line 1 (150 A) - bus 2 with a 6 MW load (load 0, and
    ``load_q_mvar``): line 1 overloaded. With ``bus1_load_mw``, load 1 at bus 1."""
    net = pp.create_empty_network()
    b0, b1, b2 = (pp.create_bus(net, 20.0) for _ in range(3))
    pp.create_ext_grid(net, b0, vm_pu=1.0)
    pp.create_line_from_parameters(
        net, b0, b1, 2.0, r_ohm_per_km=0.2, x_ohm_per_km=0.12, c_nf_per_km=0.0, max_i_ka=1.0
    )
    pp.create_line_from_parameters(
        net, b1, b2, 2.0, r_ohm_per_km=0.2, x_ohm_per_km=0.12, c_nf_per_km=0.0, max_i_ka=0.15
    )
    pp.create_load(net, b2, p_mw=6.0, q_mvar=load_q_mvar)
    if bus1_load_mw is not None:
        pp.create_load(net, b1, p_mw=bus1_load_mw, q_mvar=0.0)
    return net


def ac_relief_needed_mw(net: pp.pandapowerNet) -> float:
    """By bisection on real AC power flows: the load reduction at bus 2 that brings line 1 to 100%."""
    lo, hi = 0.0, 6.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        n = copy.deepcopy(net)
        n.load.at[0, "p_mw"] = 6.0 - mid
        pp.runpp(n, numba=False)
        lo, hi = (mid, hi) if n.res_line.at[1, "loading_percent"] > 100.0 else (lo, mid)
    return 0.5 * (lo + hi)


RESOURCES = """resource_id,aggregator,bus,kind,direction,p_max_mw,cost_up_eur_per_mwh,cost_down_eur_per_mwh,energy_mwh,soc_init_mwh,efficiency
A,agg1,2,load,up,4,50,0,,,
B,agg2,2,load,up,4,80,0,,,
C,agg1,1,load,up,5,20,0,,,
D,agg2,2,sgen,down,3,0,10,,,
S,agg1,2,storage,both,4,30,30,1.0,0.5,0.95
"""


def feeder_case(folder, resources_csv: str, load_q_mvar: float = 0.0, bus1_load_mw=None):
    """The three-bus feeder (``three_bus_feeder``) for one hour at 6 MW, the resources CSV
    text ``resources_csv`` read into it, and its segmentation at that hour."""
    (folder / "resources.csv").write_text(resources_csv)
    profile = {"load_0_p_mw": [6.0]}
    if bus1_load_mw is not None:
        profile["load_1_p_mw"] = [bus1_load_mw]
    pd.DataFrame(profile).to_csv(folder / "profiles.csv", index=False)
    net = three_bus_feeder(load_q_mvar, bus1_load_mw)
    grid = load_grid(net, vm_min_pu=0.9, vm_max_pu=1.1)
    pf = run_horizon(
        grid, load_profiles(grid, Horizon(n_mtu=1, mtu_minutes=60), csv=folder / "profiles.csv")
    )
    res = read_resources(folder / "resources.csv", pf)
    seg = prepare_segmentation(pf, 0, flexible_capacity_mw=res.capacity_per_bus())
    return pf, res, seg


@pytest.fixture(scope="module")
def hand_case(tmp_path_factory):
    return feeder_case(tmp_path_factory.mktemp("hand"), RESOURCES)


def test_the_market_takes_its_areas_as_plain_inputs(hand_case, monkeypatch):
    """The nodal market needs no segmentation; zones must be given for a zonal one and be of
    the grid's buses. With a shared cache, a second market linearises no base point again."""
    from lfm_zonal.grid import sensitivity
    from lfm_zonal.zones.segmentation import Zones

    pf, res, seg = hand_case
    with pytest.raises(InputError, match="the zonal market clears zones"):
        clear_market(pf, res, "zonal")
    with pytest.raises(InputError, match="one area per bus, not K = 1"):
        clear_market(pf, res, "nodal", seg.zones(1))
    other = Zones(1, "test", pd.Series(0, index=pd.Index([0, 1], name="bus")))
    with pytest.raises(InputError, match="other buses"):
        clear_market(pf, res, "zonal", other)
    cache = sensitivity.LinearisationCache(pf.model)
    first = clear_market(pf, res, "nodal", cache=cache)
    linearised = []
    real = sensitivity._linearise
    monkeypatch.setattr(
        sensitivity, "_linearise", lambda model, V: linearised.append(V) or real(model, V)
    )
    again = clear_market(pf, res, "nodal", seg.zones(seg.n_buses), cache=cache)
    base = {pf.V[t].tobytes() for t in first.ac.loading_percent.index.map(pf.mtu_position)}
    assert not base & {V.tobytes() for V in linearised}
    assert again.kpis["cost_eur"] == first.kpis["cost_eur"]


def test_an_accepted_step_is_dispatched_to_its_cheapest_resources_first():
    """By hand: step 0 (r1 1 MW at 10, r2 2 MW at 20) accepted for 0.5 MW takes it from r1;
    step 1 (r3) not accepted; step 2 (r4 1.5 MW at 7, r5 1 MW at 9, r6 at 30) accepted for
    2 MW takes r4 whole and 0.5 MW of r5; an accepted id without members takes nothing. The
    accepted MW in any order, zeros among them."""
    members = pd.DataFrame(
        {
            "bid_id": [0, 0, 1, 2, 2, 2],
            "resource_id": ["r1", "r2", "r3", "r4", "r5", "r6"],
            "bus": [1, 2, 3, 4, 5, 6],
            "quantity_mw": [1.0, 2.0, 1.0, 1.5, 1.0, 1.0],
            "cost_eur_per_mwh": [10.0, 20.0, 5.0, 7.0, 9.0, 30.0],
            "tan_phi": [0.0, 0.1, 0.0, 0.2, 0.3, 0.0],
        }
    )
    accepted = pd.Series([2.0, 0.5, 0.0, 1.0], index=[2, 0, 1, 5])
    used = dispatch_steps(Bids(pd.DataFrame(), members), accepted)
    assert used.bid_id.tolist() == [0, 2, 2]
    assert used.resource_id.tolist() == ["r1", "r4", "r5"]
    assert used.bus.tolist() == [1, 4, 5]
    np.testing.assert_allclose(used.dispatched_mw, [0.5, 1.5, 0.5])
    np.testing.assert_allclose(used.tan_phi, [0.0, 0.2, 0.3])


def test_each_bid_step_is_its_members_offers(cigre_market):
    """CIGRE MV in four zones, batteries among the resources: every offer (resource, MTU,
    direction with MW available) stands behind exactly one step of its aggregator, zone,
    MTU and direction; a step's MW is its members' sum, its price their quantity-weighted
    cost (to 4 decimals); at most max_steps steps per curve besides one per battery; the
    members listed by step, each step's cheapest first."""
    pf, _, seg = cigre_market
    spec = FlexibilitySpec(storage_units=2, units_per_element=4)
    res = generate_resources(pf, spec, seed=7)
    zones, max_steps = seg.zones(4), 3
    bids = build_bids(res, zones, pf.times, max_steps)
    steps, members = bids.steps.set_index("bid_id"), bids.members
    table = res.table
    offered = []
    for direction, available in (("up", res.up_mw), ("down", res.down_mw)):
        mw = available[table.index].to_numpy()
        t, r = np.nonzero(mw > 1e-9)
        offered.append(
            pd.DataFrame(
                {"mtu": t, "resource_id": table.index[r], "direction": direction, "mw": mw[t, r]}
            )
        )
    offered = pd.concat(offered).set_index(["mtu", "resource_id", "direction"]).mw.sort_index()
    step = steps.loc[members.bid_id.to_numpy()]
    behind = pd.Series(
        members.quantity_mw.to_numpy(),
        index=pd.MultiIndex.from_arrays(
            [step.mtu.to_numpy(), members.resource_id.to_numpy(), step.direction.to_numpy()]
        ),
    ).sort_index()
    assert behind.index.is_unique and behind.index.equals(offered.index)
    np.testing.assert_array_equal(behind.to_numpy(), offered.to_numpy())
    resource = table.loc[members.resource_id.to_numpy()]
    np.testing.assert_array_equal(step.aggregator.to_numpy(), resource.aggregator.to_numpy())
    zone_of = zones.zone_of_bus.reindex(resource.bus.to_numpy()).to_numpy()
    np.testing.assert_array_equal(step.zone.to_numpy(), zone_of)
    by_step = members.groupby("bid_id")
    np.testing.assert_allclose(by_step.quantity_mw.sum(), steps.quantity_mw, rtol=1e-12)
    mean_cost = (members.quantity_mw * members.cost_eur_per_mwh).groupby(members.bid_id).sum()
    np.testing.assert_allclose(
        steps.price_eur_per_mwh, (mean_cost / by_step.quantity_mw.sum()).round(4), atol=1e-9
    )
    plain = steps[steps.resource_id == ""]
    assert plain.groupby(["mtu", "zone", "direction", "aggregator"]).size().max() <= max_steps
    assert (steps.resource_id != "").sum() > 0  # the batteries' own steps
    order = members.sort_values(["bid_id", "cost_eur_per_mwh"], kind="stable")
    np.testing.assert_array_equal(order.index.to_numpy(), members.index.to_numpy())


def test_rows_are_sorted_as_pandas_sorts_them():
    """sorted_rows gives the order of pandas' stable sort_values: numeric and text keys
    (codes in pandas' order of the text: upper case first, digits by character), ties
    kept in their order; keys with NaN, missing text, mixed kinds or categories (ordered as
    their categories) left to pandas."""
    rng = np.random.default_rng(3)
    n = 400
    frame = pd.DataFrame(
        {
            "mtu": rng.integers(0, 5, n),
            "resource_id": rng.choice(["load10-1", "load9-0", "Load2-0", "sgen1-2", "b"], n),
            "direction": rng.choice(["up", "down"], n),
            "price": rng.choice([3.5, 1.0, -2.0], n),
            "row": np.arange(n),
        }
    )
    cases = [
        (frame, ["mtu", "resource_id", "direction"]),
        (frame, ["direction", "price"]),  # ties: kept in their order
        (frame.assign(price=frame.price.where(frame.row % 7 > 0)), ["price", "mtu"]),
        (frame.assign(resource_id=frame.resource_id.where(frame.row % 5 > 0)), ["resource_id"]),
        (frame.assign(resource_id=frame.resource_id.where(frame.row % 5 > 0, 3)), ["mtu"]),
        # a categorical key: by its categories' order, not its text
        (frame.assign(direction=pd.Categorical(frame.direction, ["up", "down"])), ["direction"]),
    ]
    for table, columns in cases:
        expected = table.sort_values(columns, kind="stable", ignore_index=True)
        pd.testing.assert_frame_equal(sorted_rows(table, columns), expected)


def test_hand_computed_optimum(hand_case):
    pf, res, seg = hand_case
    assert pf.loading_percent.iloc[0][("line", 1)] > 110  # the congestion the market must fix
    result = clear_market(pf, res, "nodal", pricing="pay_as_clear")
    x_needed = ac_relief_needed_mw(pf.grid.net)
    # Merit order among what relieves line 1: storage S (30 EUR/MWh, but 0.5 MWh x 0.95 in one
    # hour), then A (50); B (80) is not needed, C (bus 1) does not relieve line 1, D (down) worsens it.
    s_mw = 0.5 * 0.95
    bids = result.bids.set_index("bid_id")
    by_resource = result.dispatch.set_index("resource_id").p_mw
    assert by_resource["S"] == pytest.approx(s_mw, abs=1e-6)
    assert by_resource["A"] == pytest.approx(x_needed - s_mw, abs=2e-3)
    assert set(by_resource.index) == {"S", "A"}
    expected_cost = 30 * s_mw + 50 * (x_needed - s_mw)
    assert result.kpis["cost_pay_as_bid_eur"] == pytest.approx(expected_cost, abs=0.1)
    # Binding constraint: line 1 at its limit in the AC check, nothing else violated.
    assert result.ac.loading_percent.iloc[0][("line", 1)] == pytest.approx(100.0, abs=0.05)
    assert result.kpis["residual_overload_max_percent"] < 0.05
    assert result.kpis["unmet_mwh"] == 0.0
    # Pay-as-clear: A is marginal, so every accepted MW is paid 50 EUR/MWh.
    accepted = bids[bids.accepted_mw > 0]
    assert accepted.clearing_price_eur_per_mwh.to_numpy() == pytest.approx(50.0, abs=1e-6)
    assert set(bids.status) >= {"partial", "rejected"}


def test_clearing_prices_by_hand():
    """The pay-as-clear rule on nine steps. MTU 0, priced by offers: the duals' price
    stands, also above every offer (step 3: a zone worth more than the marginal one); a
    battery's charge whose dual is below its offer is paid its offer (4). MTU 1, priced by
    the model (unmet need): capped at the dearest offer accepted there (70), not at one
    rejected (900). A rejected step has no clearing price. The needs-based market pays
    each zone and direction its dearest accepted step."""
    steps = pd.DataFrame(
        {
            "mtu": [0, 0, 0, 0, 0, 1, 1, 1, 1],
            "zone": [0, 0, 0, 1, 1, 0, 1, 1, 0],
            "direction": ["up", "up", "up", "up", "down", "up", "up", "up", "down"],
            "price_eur_per_mwh": [10.0, 25.0, 40.0, 12.0, 30.0, 50.0, 70.0, 900.0, 20.0],
        }
    )
    accepted = np.array([1.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    marginal = np.array([25.0, 25.0, 25.0, 60.0, 5.0, 9000.0, 8000.0, 8000.0, -8000.0])
    by_model = steps.mtu.to_numpy() == 1
    nan = np.nan
    np.testing.assert_array_equal(
        clearing_prices(steps, accepted, marginal, by_model),
        [25.0, 25.0, nan, 60.0, 30.0, 70.0, 70.0, nan, 20.0],
    )
    np.testing.assert_array_equal(
        clearing_prices(steps, accepted), [25.0, 25.0, nan, 12.0, 30.0, 50.0, 70.0, nan, 20.0]
    )


@pytest.mark.parametrize("factor_max", [None, 1.0])
def test_a_violation_only_remote_offers_can_remove_is_priced_per_mw_of_them(
    tmp_path, monkeypatch, factor_max
):
    """The three-bus feeder with line 1 strong, 3 MW at bus 1 and vm_min 0.987: bus 2 at
    about 0.9848 p.u. A (bus 2, 0.2 MW, 50 EUR/MWh) removes a fifth of it; B (bus 1, 3 MW,
    800 EUR/MWh) moves bus 2 half as much per MW. Priced per MW-equivalent at bus 2 (penalty 1,000
    EUR/MWh), a MW of B is worth 500 EUR/MWh and the rest is left unmet (the price
    factor switched off: factor_max 1). Priced per MW of the offers it takes (B is the
    margin: factor 2), B is worth 1,000: about 1.6 MW of it is bought, as the linear
    relief says, and the AC check finds bus 2 within its limit."""
    from lfm_zonal.grid import linear
    from lfm_zonal.market.formulation import NEW_VIOLATION_PENALTY_FACTOR

    # A violation the market would create still costs more than any it leaves.
    assert linear.SLACK_PRICE_FACTOR_MAX < NEW_VIOLATION_PENALTY_FACTOR
    if factor_max is not None:  # None: the default
        monkeypatch.setattr(linear, "SLACK_PRICE_FACTOR_MAX", factor_max)
    pf, res, net = remote_offer_case(
        tmp_path, "A,agg1,2,load,up,0.2,50,0,,,\nB,agg2,1,load,up,3,800,0,,,"
    )
    result = clear_market(pf, res, "nodal", penalty_eur_per_mwh=1000.0)
    taken = result.dispatch.groupby("resource_id").p_mw.sum()
    assert taken["A"] == pytest.approx(0.2, abs=1e-9)
    if factor_max == 1.0:
        assert "B" not in taken and result.kpis["unmet_mwh"] > 0.5
        assert result.ac.vm_pu.iat[0, 2] < 0.987 - 1e-3
        return
    # Linear relief at the base point: (excess - A's relief) / B's per MW.
    d2, d1 = (ac_voltage_change(net, bus) for bus in (2, 1))
    needed_b = (0.987 - pf.vm_pu.iat[0, 2] - 0.2 * d2) / d1
    assert 1.0 < needed_b < 2.5 and d2 / d1 == pytest.approx(2.0, rel=0.05)
    assert taken["B"] == pytest.approx(needed_b, rel=0.05)
    assert result.kpis["unmet_mwh"] == 0.0
    assert result.ac.vm_pu.iat[0, 2] >= 0.987 - 1e-4


def remote_offer_case(folder, offers: str):
    """The three-bus feeder with line 1 strong, 3 MW at bus 1 and vm_min 0.987 (bus 2 at
    about 0.9848 p.u.), for one hour, with the resources ``offers`` (CSV rows)."""
    (folder / "resources.csv").write_text(f"{RESOURCES.splitlines()[0]}\n{offers}\n")
    profiles = {"load_0_p_mw": [6.0], "load_1_p_mw": [3.0]}
    pd.DataFrame(profiles).to_csv(folder / "profiles.csv", index=False)
    net = three_bus_feeder(bus1_load_mw=3.0)
    net.line.at[1, "max_i_ka"] = 1.0
    grid = load_grid(net, vm_min_pu=0.987, vm_max_pu=1.1)
    pf = run_horizon(
        grid, load_profiles(grid, Horizon(n_mtu=1, mtu_minutes=60), csv=folder / "profiles.csv")
    )
    assert 0.984 < pf.vm_pu.iat[0, 2] < 0.986  # the violation: about 0.002 p.u.
    return pf, read_resources(folder / "resources.csv", pf), net


def test_a_violation_the_offers_cannot_remove_is_priced_per_mw_equivalent(tmp_path):
    """As above with B (800 EUR/MWh) offering 1 MW: A and B together remove about two thirds
    of the violation. What it would take is not defined: its slack keeps the penalty per
    MW-equivalent, at which B's MW is worth 500 EUR/MWh: not bought. C (2 MW at bus 1,
    5,000 EUR/MWh, above the penalty, so never in the LP) would make the offers suffice if
    it counted: it does not."""
    for offers in ("", "\nC,agg1,1,load,up,2,5000,0,,,"):
        pf, res, _ = remote_offer_case(
            tmp_path, f"A,agg1,2,load,up,0.2,50,0,,,\nB,agg2,1,load,up,1,800,0,,,{offers}"
        )
        result = clear_market(pf, res, "nodal", penalty_eur_per_mwh=1000.0)
        taken = result.dispatch.groupby("resource_id").p_mw.sum()
        assert taken.to_dict() == pytest.approx({"A": 0.2}), offers
        assert result.kpis["unmet_mwh"] > 0.5


def ac_voltage_change(net: pp.pandapowerNet, bus: int, dp_mw: float = 0.01) -> float:
    """Bus 2's voltage rise per MW of load taken off ``bus``, by finite differences of AC
    power flows."""
    out = []
    for dp in (0.0, dp_mw):
        n = copy.deepcopy(net)
        pp.create_load(n, bus, p_mw=-dp)
        pp.runpp(n, numba=False, tolerance_mva=1e-10)
        out.append(n.res_bus.at[2, "vm_pu"])
    return (out[1] - out[0]) / dp_mw


def test_a_market_short_of_offers_pays_its_dearest_accepted_offer_not_the_penalty(tmp_path):
    """The three-bus feeder with 0.2 MW at bus 2 (A, 50 EUR/MWh) where about 1 MW is
    needed: A is taken whole and the rest is unmet need. The duals price line 1 at the
    penalty of unmet need, bus 2's marginal value thousands of EUR/MWh: pay-as-clear pays
    at most the dearest offer accepted in the MTU, A's 50 EUR/MWh, not B's 900 at bus 1
    (which relieves nothing) nor the dual."""
    header = RESOURCES.splitlines()[0]
    offers = "A,agg1,2,load,up,0.2,50,0,,,\nB,agg2,1,load,up,1,900,0,,,\n"
    pf, res, _ = feeder_case(tmp_path, f"{header}\n{offers}", bus1_load_mw=2.0)
    result = clear_market(pf, res, "nodal", pricing="pay_as_clear")
    assert result.kpis["unmet_mwh"] > 0.5
    assert result.dispatch.set_index("resource_id").p_mw.to_dict() == pytest.approx({"A": 0.2})
    accepted = result.bids[result.bids.accepted_mw > 0]
    assert accepted.clearing_price_eur_per_mwh.to_numpy() == pytest.approx(50.0, abs=1e-9)
    assert result.kpis["cost_pay_as_clear_eur"] == pytest.approx(0.2 * 50.0, abs=1e-9)


def test_a_step_giving_reactive_power_too_is_paid_its_worth_above_every_offer(tmp_path):
    """The three-bus feeder with a 3 Mvar load: X (4 MW at 20 EUR/MWh, P only) is the
    marginal offer, Y (0.2 MW at 30, tan_phi 1: it takes 0.2 Mvar off line 1 as well) is
    taken whole. X is paid its own offer, and Y what one MW of it is worth on line 1:
    20 x (1 + r), r the line's loading change per Mvar over its change per MW, by finite
    differences of AC power flows at the cleared point: above every offer, and no cap
    applies (the market is not short)."""
    header = RESOURCES.splitlines()[0] + ",tan_phi"
    offers = "X,agg1,2,load,up,4,20,0,,,,0\nY,agg2,2,load,up,0.2,30,0,,,,1.0\n"
    pf, res, _ = feeder_case(tmp_path, f"{header}\n{offers}", load_q_mvar=3.0)
    result = clear_market(pf, res, "nodal", pricing="pay_as_clear")
    assert result.kpis["unmet_mwh"] == 0.0
    taken = result.dispatch.set_index("resource_id").p_mw
    assert taken["Y"] == pytest.approx(0.2, abs=1e-9) and 0.0 < taken["X"] < 4.0
    net = three_bus_feeder(load_q_mvar=3.0)
    net.load.at[0, "p_mw"] -= taken.sum()
    net.load.at[0, "q_mvar"] -= taken["Y"]
    loading = []
    for dp, dq in ((0.0, 0.0), (1e-4, 0.0), (0.0, 1e-4)):
        n = copy.deepcopy(net)
        n.load.at[0, "p_mw"] -= dp
        n.load.at[0, "q_mvar"] -= dq
        pp.runpp(n, numba=False, tolerance_mva=1e-10)
        loading.append(n.res_line.at[1, "loading_percent"])
    r = (loading[0] - loading[2]) / (loading[0] - loading[1])
    bids = result.bids[result.bids.accepted_mw > 0]
    price = dict(zip(bids.tan_phi, bids.clearing_price_eur_per_mwh, strict=True))
    assert price[0.0] == pytest.approx(20.0, abs=1e-6)
    assert price[1.0] == pytest.approx(20.0 * (1.0 + r), rel=2e-3)
    assert price[1.0] > 30.0


# ----------------------------------------------------------------------------- real feeders


def clear_on(seg, res, method, k=None, **options):
    """A market as a study clears it: the nodal one, or K zones of ``seg`` with the
    segmentation's weights, sensitivity method and error."""
    if method == "nodal":
        return clear_market(
            seg.pf, res, "nodal", sensitivity_method=seg.sensitivity_method, **options
        )
    zones = seg.zones(k)
    error = seg.error(zones)
    return clear_market(
        seg.pf,
        res,
        method,
        zones,
        weights=seg.weights,
        sensitivity_method=seg.sensitivity_method,
        segmentation_error=error,
        **options,
    )


def market_case(
    name: str,
    load_scale: float,
    share: float,
    n_mtu: int = 12,
    start: str = "2016-01-14 16:00",
    **spec,
):
    grid = load_grid(name)
    pf = run_horizon(
        grid, load_profiles(grid, Horizon(start=start, n_mtu=n_mtu), load_scale=load_scale)
    )
    res = generate_resources(
        pf,
        FlexibilitySpec(load_up_share=share, load_down_share=share, sgen_down_share=share, **spec),
        seed=3,
    )
    seg = prepare_segmentation(
        pf,
        int(pf.profiles.total_load_mw().to_numpy().argmax()),
        flexible_capacity_mw=res.capacity_per_bus(),
    )
    return pf, res, seg


@pytest.fixture(scope="module")
def cigre_market():
    return market_case("cigre_mv", 1.25, 0.5)


@pytest.fixture(scope="module")
def ieee33_market():
    return market_case("ieee33", 1.3, 0.8)


@pytest.mark.parametrize("case", ["cigre_market", "ieee33_market"])
def test_nodal_clearing_fixes_overloads_and_voltages_in_ac(case, request):
    pf, res, seg = request.getfixturevalue(case)
    v = pf.violations()
    assert v.overloaded_branches.sum() > 0 and v.undervoltage_buses.sum() > 0  # both problems
    result = clear_market(pf, res, "nodal")
    g = pf.grid
    assert result.kpis["unmet_mwh"] == 0.0
    assert np.nanmax(result.ac.loading_percent.to_numpy()) <= g.loading_max_percent + 1.0
    assert np.nanmin(result.ac.vm_pu.to_numpy()) >= g.vm_min_pu - 0.002
    assert np.nanmax(result.ac.vm_pu.to_numpy()) <= g.vm_max_pu + 0.002
    assert result.kpis["new_violations"] == 0
    assert result.kpis["cost_eur"] > 0


def test_row_screening_is_only_a_speed_device(ieee33_market, monkeypatch):
    """One grid row per MTU and round at a time: constraint generation reaches the same
    optimum (IEEE 33 has up to 21 buses below the band and 16 overloads in one MTU)."""
    from lfm_zonal.market import strategies as clearing

    pf, res, seg = ieee33_market
    full = clear_market(pf, res, "nodal")
    monkeypatch.setattr(clearing, "ROWS_PER_MTU_AND_ROUND", 1)
    one_at_a_time = clear_market(pf, res, "nodal")
    assert one_at_a_time.kpis["generation_rounds"] > full.kpis["generation_rounds"]
    assert one_at_a_time.kpis["cost_eur"] == pytest.approx(full.kpis["cost_eur"], rel=1e-6)
    assert np.nanmin(one_at_a_time.ac.vm_pu.to_numpy()) >= pf.grid.vm_min_pu - 0.002


def test_rows_carried_to_the_next_lp_are_only_a_speed_device(ieee33_market, monkeypatch):
    """The rows an LP hands on (``Solution.rows``: those with a dual price) sit at their
    limits in its linear model, at the MTU they name, also solved MTU by MTU; an LP
    started with them reaches the same optimum in fewer generation rounds. The same for
    the DSO-needs LP's rows, also where only some MTUs are violated (its LP solves those)."""
    from lfm_zonal.grid.linear import linear_grid
    from lfm_zonal.market import needs as needs_module
    from lfm_zonal.market import strategies
    from lfm_zonal.market.bids import build_bids
    from lfm_zonal.market.clearing import mtus_to_clear
    from lfm_zonal.market.needs import dso_needs
    from lfm_zonal.zones.segmentation import nodal_zones

    pf, res, seg = ieee33_market
    zones = nodal_zones(pf.model.buses)
    grid = linear_grid(
        pf, zones.aggregation(pd.Series(1.0, index=zones.buses)), "jacobian", mtus_to_clear(pf)
    )
    steps = build_bids(res, zones, pf.times).steps
    active = steps[steps.mtu.isin(grid.mtus)]
    tolerance = grid.row_tolerances()

    def at_limits(rows, p, q, on=grid):
        excess = on.violations(*on.after(p, q))[rows[:, 0], rows[:, 1]]
        return np.all(excess >= -1e-6 * tolerance[rows[:, 1]])

    def injections(needs):
        fill = needs.assign(sign=np.where(needs.direction == "up", 1.0, -1.0))
        p = np.zeros((len(grid.mtus), grid.k))
        t = pd.Index(grid.mtus).get_indexer(fill.mtu)
        np.add.at(p, (t, fill.zone.to_numpy()), fill.sign * fill.need_mw)
        return p

    monkeypatch.setattr(strategies, "BLOCK_MAX_STEPS", 1)  # one LP block per MTU
    first = strategies.solve_clearing(grid, active, res.table)
    assert len(first.rows) > 0 and len(np.unique(first.rows[:, 0])) > 1
    assert at_limits(first.rows, first.p_mw, first.q_mvar)
    again = strategies.solve_clearing(grid, active, res.table, rows=first.rows)
    assert again.objective_eur == pytest.approx(first.objective_eur, rel=1e-9)
    assert again.stats.rounds < first.stats.rounds
    # Each MTU's block started with the rows the MTU before rested on: without them, the
    # same optimum in more rounds.
    with monkeypatch.context() as patch:
        patch.setattr(strategies, "_with_rows_before", lambda rows, n_mtus, before: rows)
        alone = strategies.solve_clearing(grid, active, res.table)
    assert first.objective_eur == pytest.approx(alone.objective_eur, rel=1e-9)
    assert first.stats.rounds < alone.stats.rounds

    needs = dso_needs(grid, active)
    assert len(needs.rows) > 0
    # The needs as an LP of their own: their injections, at the needs LP's rows' limits.
    p = injections(needs.needs)
    assert at_limits(needs.rows, p, np.zeros_like(p))

    # Half the MTUs relieved by their needs: the DSO-needs LP of the others names its rows
    # at their MTUs among all, and started with them it needs the same, in fewer rounds.
    half = np.arange(len(grid.mtus)) % 2 == 0
    shifted = grid.shifted(np.where(half[:, None], p, 0.0), np.zeros_like(p))
    solved = []
    solve = needs_module.solve_clearing
    monkeypatch.setattr(
        needs_module, "solve_clearing", lambda *a, **k: solved.append(solve(*a, **k)) or solved[-1]
    )
    rest = dso_needs(shifted)
    seeded = dso_needs(shifted, rows=rest.rows)
    assert len(rest.rows) > 0 and not half[rest.rows[:, 0]].any()
    p_rest = injections(rest.needs)
    assert at_limits(rest.rows, p_rest, np.zeros_like(p_rest), on=shifted.tolerated())
    pd.testing.assert_frame_equal(seeded.needs, rest.needs, rtol=1e-7, atol=1e-9)
    assert solved[1].stats.rounds < solved[0].stats.rounds


def test_zonal_with_k_equal_n_is_nodal(cigre_market):
    pf, res, seg = cigre_market
    nodal = clear_market(pf, res, "nodal")
    zonal = clear_on(seg, res, "zonal", seg.n_buses)
    assert zonal.kpis["cost_eur"] == pytest.approx(nodal.kpis["cost_eur"], rel=1e-6)
    pd.testing.assert_series_equal(zonal.bids.accepted_mw, nodal.bids.accepted_mw, atol=1e-7)


def test_zonal_residuals_equal_an_independent_ac_power_flow(cigre_market):
    pf, res, seg = cigre_market
    result = clear_on(seg, res, "zonal", 2)
    for mtu in sorted(result.dispatch.mtu.unique())[:4]:
        net = dispatched_net(pf, result.dispatch, int(mtu))
        pp.runpp(net, numba=False)
        loading = [net[f"res_{kind}"].at[idx, "loading_percent"] for kind, idx in pf.model.branches]
        np.testing.assert_allclose(
            result.ac.loading_percent.iloc[mtu].to_numpy(), loading, atol=1e-5
        )
        np.testing.assert_allclose(
            result.ac.vm_pu.iloc[mtu].to_numpy(),
            net.res_bus.vm_pu.reindex(pf.model.buses).to_numpy(),
            atol=1e-7,
        )
    # The reported KPIs are those of that AC state.
    over = (result.ac.loading_percent - pf.grid.loading_max_percent).clip(lower=0).to_numpy().max()
    assert result.kpis["residual_overload_max_percent"] == pytest.approx(over)


def test_zonal_costs_more_or_leaves_more_than_nodal(cigre_market):
    pf, res, seg = cigre_market
    nodal = clear_market(pf, res, "nodal").kpis
    for k in (1, 3):
        zonal = clear_on(seg, res, "zonal", k).kpis
        worse = (
            zonal["cost_eur"] >= nodal["cost_eur"] - 1e-6
            or zonal["residual_overload_percent_h"] > nodal["residual_overload_percent_h"]
            or zonal["unmet_mwh"] > nodal["unmet_mwh"]
        )
        assert worse, (k, zonal, nodal)


def test_too_little_flexibility_reports_unmet_need():
    pf, res, seg = market_case("cigre_mv", 1.25, 0.02)
    for method, k in (("nodal", None), ("zonal", 3), ("needs_based", 3)):
        result = clear_on(seg, res, method, k)
        assert result.kpis["unmet_mwh"] > 0 and result.kpis["unmet_mw_max"] > 0
        assert len(result.bids) and len(result.dispatch) and len(result.unmet)
        assert (result.bids.status == "accepted").any()


def test_storage_respects_its_state_of_charge():
    pf, res, seg = market_case(
        "cigre_mv", 1.25, 0.05, n_mtu=16, storage_units=3, storage_p_mw=2.0, storage_hours=0.5
    )
    result = clear_market(pf, res, "nodal")
    dt = pf.profiles.horizon.mtu_hours
    for rid, row in res.table[res.table.kind == "storage"].iterrows():
        d = result.dispatch[result.dispatch.resource_id == rid].groupby("mtu").p_mw.sum()
        energy = np.where(d > 0, d / row.efficiency, d * row.efficiency) * dt
        soc = row.soc_init_mwh - np.cumsum(energy)
        assert (soc >= -1e-6).all() and (soc <= row.energy_mwh + 1e-6).all()


def test_needs_based_buys_exactly_the_published_need_when_it_can(cigre_market):
    _, res, seg = cigre_market
    result = clear_on(seg, res, "needs_based", 3)
    bought = result.bids.groupby(["mtu", "zone", "direction"]).accepted_mw.sum()
    need = result.needs.set_index(["mtu", "zone", "direction"]).need_mw
    covered = bought.reindex(need.index).fillna(0.0)
    assert (covered <= need + 1e-9).all()
    assert result.kpis["need_mwh"] > 0


# ----------------------------------------------------------------------------- malformed bids


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("X,a,999,load,up,1,10,10,,,", "row 2 ('X'): bus 999 is unknown"),
        ("X,a,2,load,up,-1,10,10,,,", "row 2 ('X'): p_max_mw must be a finite number >= 0"),
        ("X,a,2,load,up,1,nan,10,,,", "row 2 ('X'): cost_up_eur_per_mwh must be a finite number"),
        ("X,a,2,load,sideways,1,10,10,,,", "row 2 ('X'): unknown direction 'sideways'"),
        ("X,a,2,battery,up,1,10,10,,,", "row 2 ('X'): unknown kind 'battery'"),
    ],
)
def test_malformed_resources_name_the_row(hand_case, tmp_path, row, message):
    pf = hand_case[0]
    header = RESOURCES.splitlines()[0]
    path = tmp_path / "bad.csv"
    path.write_text(f"{header}\n{row}\n")
    with pytest.raises(InputError) as info:
        read_resources(path, pf)
    assert message in str(info.value) and str(path) in str(info.value)


def test_duplicate_resource_id_is_refused(hand_case, tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text(RESOURCES + "A,agg3,2,load,up,1,10,10,,,\n")
    with pytest.raises(InputError, match=r"row 7: duplicate resource_id 'A'"):
        read_resources(path, hand_case[0])


def test_a_horizon_without_violations_buys_nothing():
    pf, res, seg = market_case("cigre_mv", 1.0, 0.5, n_mtu=4, start="2016-01-14 03:00")
    assert pf.violations()[["overloaded_branches", "undervoltage_buses"]].to_numpy().sum() == 0
    for method, k in (("nodal", None), ("zonal", 2), ("needs_based", 2)):
        result = clear_on(seg, res, method, k)
        assert result.kpis["cost_eur"] == 0 and result.kpis["activated_mwh"] == 0
        assert result.needs.empty and result.dispatch.empty
        assert result.kpis["new_violations"] == 0
        assert (result.bids.status == "rejected").all()


def test_no_resources_at_all_clears_to_nothing_and_reports_the_need(hand_case, tmp_path, caplog):
    """A resources table with its header only (said in a warning: it may be a file cut
    short): every market clears to nothing, and the overload of line 1 stays as unmet need,
    named in the residual table."""
    pf, _, seg = hand_case
    path = tmp_path / "none.csv"
    path.write_text(RESOURCES.splitlines()[0] + "\n")
    with caplog.at_level("WARNING"):
        res = read_resources(path, pf)
    assert "no resources (a header and no rows)" in caplog.text
    for method, k in (("nodal", None), ("zonal", 1), ("needs_based", 1)):
        result = clear_on(seg, res, method, k)
        assert result.kpis["cost_eur"] == 0.0 and result.dispatch.empty
        assert result.kpis["unmet_mwh"] > 0
        left = result.residual
        assert ("line", 1) in set(zip(left.element_type, left.element, strict=True))
