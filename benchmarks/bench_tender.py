"""Tender-sizing benchmark: the full Fig. 5 grid and Fig. 3 grid, and the vectorised spatial
case against a plain loop over pooled offers (same result, the speed-up is the point).

    python benchmarks/bench_tender.py

Target (issue): the full Fig. 5 grid (G 0 to 0.7, N 2 to 20, 5 seeds) under 60 s on
the 2-core machine. Absolute times drift on a shared machine; the ratios are the result.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from lfm_zonal.tender import sizing as T


def looped_spatial_c_aggr(params: T.TenderParameters, counts, seed: int) -> float:
    """Reference: for every pooled candidate, walk the merit order offer by offer in Python,
    clear each node's volume and cost it with Eq. 1 (rule A)."""
    rng = np.random.default_rng(seed)
    counts = np.asarray(counts)
    offers = T.generate_offers(params, counts, rng)
    need = T.need_of(params, params.mu_mu_mw, rng)
    m = params.points_per_offer
    separate = sum(
        float(np.min(T.expected_cost(params, T.clear_curve(offers.at(n), m), need)))
        for n in range(len(counts))
    )
    order = T.merit_order(offers)
    best = np.inf
    for j in range(len(order) * m + 1):
        q_left = 0.0 if j == 0 else offers.quantity_mw[order][: (j - 1) // m].sum()
        if j > 0:
            q_left += offers.quantity_mw[order[(j - 1) // m]] * (((j - 1) % m) + 1) / m
        volume = np.zeros(len(counts))
        avail = np.zeros(len(counts))
        spend = np.zeros(len(counts))
        for i in order:  # one Python step per offer
            if q_left <= 1e-12:
                break
            take = min(offers.quantity_mw[i], q_left)
            n = offers.node[i]
            volume[n] += take
            avail[n] += take * offers.p_av_eur_per_mw_year[i] / T.HOURS_PER_YEAR
            spend[n] += take * offers.p_act_eur_per_mwh[i]
            q_left -= take
        cost = 0.0
        for n in range(len(counts)):
            unmet = float(need.expected_unmet(np.array([volume[n]]))[..., 0])
            act = float(need.expected_need()) - unmet
            mean_act = spend[n] / volume[n] if volume[n] > 0 else 0.0
            cost += avail[n] + params.utilisation * act * mean_act
            cost += params.voll_weight * params.voll_eur_per_mwh * unmet
        best = min(best, cost)
    return (best - separate) / separate * 100


def main() -> int:
    params = T.TenderParameters()
    started = time.perf_counter()
    spatial = T.spatial_study(params)
    t_spatial = time.perf_counter() - started
    started = time.perf_counter()
    T.spatial_study(params.replace(sizing_rule="B"))
    t_spatial_b = time.perf_counter() - started
    started = time.perf_counter()
    T.temporal_study(params)
    t_temporal = time.perf_counter() - started
    cases = int(spatial.reachable.sum())
    print(
        f"Fig. 5 grid, rule A: {len(spatial)} cases ({cases} reachable), {t_spatial:.1f} s "
        f"({60 / t_spatial:.0f}x under the 60 s target)"
    )
    print(f"Fig. 5 grid, rule B (Monte Carlo pooled need): {t_spatial_b:.1f} s")
    print(f"Fig. 3 grid (sigma_mu 0..10 x 2..20 MTUs x 5 seeds): {t_temporal:.2f} s")
    print("vectorised spatial case vs a Python loop over pooled offers (rule A, same c_aggr):")
    for n, g in ((5, 0.2), (10, 0.3)):
        counts = T.offer_counts(n, n * params.bids_per_node, g)
        small = params.replace(points_per_offer=4)
        started = time.perf_counter()
        fast = T.spatial_case(small, counts, np.random.default_rng(0)).c_aggr_percent
        t_fast = time.perf_counter() - started
        started = time.perf_counter()
        slow = looped_spatial_c_aggr(small, counts, 0)
        t_slow = time.perf_counter() - started
        print(
            f"  N = {n:2d}, G = {g}: c_aggr {fast:.6f}% vs {slow:.6f}%  "
            f"{t_fast * 1e3:.1f} ms vs {t_slow * 1e3:.0f} ms  ->  {t_slow / t_fast:.0f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
