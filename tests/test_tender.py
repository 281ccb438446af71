"""Tender sizing (seed 001): closed forms, the newsvendor optimum, Eq. 1 by hand, Eq. 2 bounds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from lfm_zonal import InputError
from lfm_zonal.tender import sizing as T

TABLE_I = T.TenderParameters()


def test_closed_forms_agree_with_monte_carlo_of_the_load():
    rng = np.random.default_rng(7)
    mu, sigma, cap = 8.0, 2.0, 4.0
    load = rng.normal(mu, sigma, 400_000)
    need_samples = np.maximum(load - cap, 0.0)
    q = np.array([0.0, 2.0, 4.0, 6.5, 10.0])
    closed = T.Need(mu, sigma, cap)
    mc_unmet = np.maximum(need_samples[:, None] - q[None, :], 0).mean(axis=0)
    mc_activation = np.minimum(need_samples[:, None], q[None, :]).mean(axis=0)
    np.testing.assert_allclose(closed.expected_unmet(q), mc_unmet, atol=0.01)
    np.testing.assert_allclose(closed.expected_activation(q), mc_activation, atol=0.01)
    # The engine's own Monte Carlo path (sorted samples) on the same draws is exact in the sample.
    mc = T.Need(mu, sigma, cap, samples=(load - mu) / sigma)
    np.testing.assert_allclose(mc.expected_unmet(q), mc_unmet, rtol=1e-9, atol=1e-12)


def test_heavier_tail_needs_more_availability():
    offers = T.generate_offers(TABLE_I, [TABLE_I.bids_per_node], np.random.default_rng(0))
    normal = T.optimal_quantity(TABLE_I, offers, T.need_of(TABLE_I, 8.0))
    heavy_params = TABLE_I.replace(kurtosis=6.0)
    heavy = T.optimal_quantity(heavy_params, offers, T.need_of(heavy_params, 8.0))
    assert heavy.q_mw > normal.q_mw


def test_optimum_is_the_newsvendor_critical_fractile_with_flat_prices():
    flat = TABLE_I.replace(p_av_std_ratio=0.0, p_act_std_ratio=0.0, points_per_offer=200)
    offers = T.generate_offers(flat, [flat.bids_per_node], np.random.default_rng(1))
    need = T.need_of(flat, flat.mu_mu_mw)
    optimum = T.optimal_quantity(flat, offers, need)
    p_av = 0.9 * flat.p_av_cap_eur_per_mw_year
    p_act = 0.9 * flat.p_act_cap_eur_per_mwh
    # P(Q_d > Q*) = (p_av / 8760) / (w VoLL - w p_act)
    ratio = (p_av / 8760) / (0.5 * 28_400 - 0.5 * p_act)
    expected = 8.0 - 4.0 + 2.0 * norm.ppf(1 - ratio)
    assert T.critical_fractile_mw(flat, p_av, p_act) == pytest.approx(expected)
    resolution = flat.bid_size_ratio * flat.mu_mu_mw / flat.points_per_offer
    assert optimum.q_mw == pytest.approx(expected, abs=resolution)


def test_expected_cost_by_hand():
    """Two offers, merit order by availability price, the marginal one divisible."""
    params = TABLE_I.replace(points_per_offer=4)
    offers = T.Offers(
        node=np.array([0, 0]),
        quantity_mw=np.array([2.0, 4.0]),
        p_av_eur_per_mw_year=np.array([50_000.0, 20_000.0]),
        p_act_eur_per_mwh=np.array([100.0, 400.0]),
    )
    need = T.Need(8.0, 2.0, 4.0)
    table = T.cost_curve_table(params, offers, need).set_index("q_mw")
    # Q = 5 MW: all of the 20 kEUR offer (4 MW), 1 MW of the 50 kEUR one.
    avail = (4 * 20_000 + 1 * 50_000) / 8760
    mean_act = (4 * 400 + 1 * 100) / 5
    z = (4.0 + 5.0 - 8.0) / 2.0
    unmet = 2.0 * (norm.pdf(z) - z * norm.sf(z))
    z0 = (4.0 - 8.0) / 2.0
    expected_need = 2.0 * (norm.pdf(z0) - z0 * norm.sf(z0))
    cost = avail + 0.5 * (expected_need - unmet) * mean_act + 0.5 * unmet * 28_400
    row = table.loc[5.0]
    assert row.availability_eur_per_h == pytest.approx(avail)
    assert row.cost_eur_per_h == pytest.approx(cost)
    # Without w on VoLL the unmet term doubles.
    plain = T.cost_curve_table(params.replace(w_on_voll=False), offers, need).set_index("q_mw")
    assert plain.loc[5.0].unmet_eur_per_h == pytest.approx(unmet * 28_400)


def test_temporal_extra_cost_is_zero_for_identical_mtus_and_never_negative():
    table = T.temporal_study(TABLE_I, sigma_mu_mw=(0, 2, 6), n_mtu=(2, 5, 12), seeds=(0, 1))
    assert (table.c_aggr_percent >= 0).all()
    assert (table[table.sigma_mu_mw == 0].c_aggr_percent == 0).all()
    summary = T.summarise(table, ["sigma_mu_mw", "n_mtu"]).set_index(["sigma_mu_mw", "n_mtu"])
    c = summary.c_aggr_percent
    assert c[(6, 12)] > c[(2, 12)] > 0  # grows with the spread of the needs
    assert c.max() < 20  # temporal aggregation costs a few percent


def test_spatial_extra_cost_is_zero_for_one_node_and_when_offers_sit_at_one_node():
    params = TABLE_I.replace(points_per_offer=8)
    one = T.spatial_case(params, [25], np.random.default_rng(0))
    assert one.c_aggr_percent == 0.0
    concentrated = T.spatial_case(params, [0, 0, 75], np.random.default_rng(0))
    assert concentrated.c_aggr_percent == 0.0
    assert concentrated.nodes_below_median == 2  # the nodes without offers
    table = T.spatial_study(params, gini=(0.0, 0.2, 0.5), n_nodes=(2, 4), seeds=(0, 1))
    reached = table[table.reachable]
    assert (reached.c_aggr_percent >= 0).all()
    assert not table[(table.n_nodes == 2) & (table.gini == 0.5)].empty
    # Uneven offers cost more than even ones.
    s = T.summarise(reached, ["gini", "n_nodes"]).set_index(["gini", "n_nodes"]).c_aggr_percent
    assert s[(0.2, 4)] > s[(0.0, 4)]


def test_sizing_rule_b_costs_at_least_rule_a():
    """Rule A picks the pooled Q that minimises the true nodal costs, so B cannot beat it."""
    a = T.spatial_case(TABLE_I, [10, 20, 45], np.random.default_rng(3))
    b = T.spatial_case(TABLE_I.replace(sizing_rule="B"), [10, 20, 45], np.random.default_rng(3))
    assert b.cost_pooled_eur_per_h >= a.cost_pooled_eur_per_h - 1e-9
    assert a.cost_separate_eur_per_h == pytest.approx(b.cost_separate_eur_per_h)


def test_offer_counts_follow_the_gini_index():
    for n in (2, 5, 20):
        for g in (0.0, 0.1, 0.3):
            counts = T.offer_counts(n, 25 * n, g)
            assert counts.sum() == 25 * n
            assert T.gini_index(counts) == pytest.approx(g, abs=0.02 if n > 2 else 0.011)
    assert T.gini_index([0, 0, 0, 10]) == pytest.approx(T.max_gini(4))
    with pytest.raises(InputError, match="out of reach with 2 nodes"):
        T.offer_counts(2, 50, 0.6)


def test_same_seed_same_numbers():
    first = T.spatial_study(TABLE_I, gini=(0.1, 0.3), n_nodes=(3, 6), seeds=(4,))
    again = T.spatial_study(TABLE_I, gini=(0.1, 0.3), n_nodes=(3, 6), seeds=(4,))
    pd.testing.assert_frame_equal(first, again)
    other = T.spatial_study(TABLE_I, gini=(0.1, 0.3), n_nodes=(3, 6), seeds=(5,))
    assert not np.allclose(first.c_aggr_percent, other.c_aggr_percent)


def test_probabilistic_optimum_beats_the_deterministic_rule():
    table = T.deterministic_comparison(TABLE_I, seeds=(0, 1))
    best = table[table.rule == "probabilistic optimum"].set_index("seed").cost_eur_per_h
    for _, rows in table[table.rule != "probabilistic optimum"].groupby("rule"):
        assert (rows.set_index("seed").cost_eur_per_h >= best - 1e-9).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sigma_mw": "-1"}, "'sigma_mw' must be >= 0"),
        ({"gini": "1.0"}, "'gini' must be in [0, 1)"),
        ({"gini": "-0.1"}, "'gini' must be in [0, 1)"),
        ({"p_av_cap_eur_per_mw_year": "0"}, "'p_av_cap_eur_per_mw_year' must be > 0"),
        ({"p_act_cap_eur_per_mwh": "-5"}, "'p_act_cap_eur_per_mwh' must be > 0"),
        ({"sizing_rule": "C"}, "'sizing_rule' must be one of A, B"),
        ({"sigma": "2"}, "unknown tender parameter 'sigma'"),
        ({"sigma_mw": "two"}, "'sigma_mw' must be of type float"),
    ],
)
def test_bad_parameters_are_named(overrides, message):
    with pytest.raises(InputError) as info:
        T.load_parameters(None, overrides)
    assert message in str(info.value)


def test_parameter_files_name_file_and_key(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("sigma_mw = -2.0\n")
    with pytest.raises(InputError, match=rf"^{path}: .*'sigma_mw' must be >= 0"):
        T.load_parameters(path)
    mindflex = T.load_parameters("mindflex_2025")
    assert 0.9 * mindflex.p_av_cap_eur_per_mw_year == pytest.approx(475_500, rel=1e-4)
    assert 0.9 * mindflex.p_act_cap_eur_per_mwh == pytest.approx(57.6)


def test_tender_command_writes_tables_and_figures(tmp_path):
    out = tmp_path / "tender"
    argv = ["tender", "all", "--out", str(out), "--seeds", "2", "--n-mtu", "2:6"]
    argv += ["--sigma-mu", "0,3", "--gini", "0:0.4:0.2", "--n-nodes", "2,5"]
    done = subprocess.run(
        [sys.executable, "-m", "lfm_zonal.cli", *argv], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for name in ("cost_curve", "temporal", "spatial"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    summary = pd.read_csv(out / "spatial_summary.csv")
    assert set(summary.n_nodes) == {2, 5} and set(summary.gini) == {0.0, 0.2, 0.4}
    bad = subprocess.run(
        [
            *(sys.executable, "-m", "lfm_zonal.cli", "tender", "--set", "gini=2"),
            *("--out", str(tmp_path / "refused")),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "'gini' must be in [0, 1)" in bad.stderr
    assert not (tmp_path / "refused").exists()


# ----------------------------------------------------------------------------- bridge to the grid


@pytest.fixture(scope="module")
def cigre_congestion():
    from lfm_zonal import Horizon, load_grid, load_profiles, run_horizon
    from lfm_zonal.market.resources import FlexibilitySpec, generate_resources
    from lfm_zonal.zones.segmentation import prepare_segmentation

    grid = load_grid("cigre_mv")
    pf = run_horizon(
        grid, load_profiles(grid, Horizon(start="2016-01-14 17:00", n_mtu=12), load_scale=1.25)
    )
    res = generate_resources(pf, FlexibilitySpec(units_per_element=2), seed=1)
    seg = prepare_segmentation(pf, 8, flexible_capacity_mw=res.capacity_per_bus())
    return seg, res


def test_nodal_needs_add_up_to_the_overload(cigre_congestion):
    from lfm_zonal.tender.congestion import congestion_needs

    seg, res = cigre_congestion
    c = congestion_needs(seg, res, forecast_error=0.1)
    assert c.loading_percent > c.limit_percent and c.direction == "up"
    nodes = c.nodes
    relief = (nodes.effect_percent_per_mw * nodes.need_mw).sum()
    assert relief == pytest.approx(c.loading_percent - c.limit_percent, rel=1e-9)
    # Each node's need is its share of the same normal loading, in MW at its bus.
    np.testing.assert_allclose(
        nodes.sigma_mw * nodes.effect_percent_per_mw / nodes.share, c.loading_sd_percent
    )
    assert c.loading_sd_percent > 0


def test_zonal_tender_extra_cost_is_zero_per_bus_and_never_negative(cigre_congestion):
    from lfm_zonal.tender.congestion import zonal_tender_study

    seg, res = cigre_congestion
    ks = (1, 3, seg.n_buses)
    table, c = zonal_tender_study(seg, res, ks, TABLE_I, seeds=(0, 1))
    assert (table.c_aggr_percent >= 0).all()
    nodal = table[table.k == seg.n_buses]
    assert (nodal.c_aggr_percent == 0).all() and (nodal.tenders == len(c.nodes)).all()
    assert (table[table.k == 1].tenders == 1).all()
    # One per-bus benchmark per seed, whatever K (summed in another order).
    spread = table.groupby("seed").cost_per_bus_eur_per_h.agg(np.ptp)
    assert (spread < 1e-9 * table.cost_per_bus_eur_per_h.max()).all()


def test_zonal_tender_needs_a_congestion(ieee33_pf):
    from lfm_zonal.market.resources import FlexibilitySpec, generate_resources
    from lfm_zonal.tender.congestion import congestion_needs
    from lfm_zonal.zones.segmentation import prepare_segmentation

    res = generate_resources(ieee33_pf, FlexibilitySpec(), seed=0)
    seg = prepare_segmentation(ieee33_pf, 0)
    with pytest.raises(
        InputError, match="no monitored line, trafo or trafo3w winding is overloaded"
    ):
        congestion_needs(seg, res)
