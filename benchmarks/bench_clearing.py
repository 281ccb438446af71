"""Clearing benchmark: a 96-MTU day on SimBench MV rural with about 600 resources.

    python benchmarks/bench_clearing.py

Scenario: 2016-04-16 with sgens x1.8 (a windy night: reverse-flow overloads and
overvoltage), every load and sgen split into 3 resources of 3 aggregators.
For the nodal market and zonal K = 1, 4, 16 it prints: the time to build the
LPs (Pyomo model + standard-form compile + hand-over), HiGHS's own solve time
inside the pipeline, the AC-check time, the LP size, and two ratios against a
*pure* HiGHS solve of the same LPs handed over as a matrix (each LP the pipeline
solved, taken from HiGHS after the last round and solved again from scratch):

* LP pipeline / pure: build + hand-over + solve of every LP (rows and columns
  generated, sequential-LP rounds) against the pure solves of those LPs;
* whole clearing / pure: everything ``clear_market`` does (DSO-needs LPs,
  re-linearisations, dispatch, AC check) against the same pure solves.

Absolute times drift on a shared machine; the ratios are the result.
"""

from __future__ import annotations

import sys
import time
import warnings

import highspy
import numpy as np

from lfm_zonal import Horizon, load_grid, load_profiles, run_horizon
from lfm_zonal.check.ac import ac_check
from lfm_zonal.grid.sensitivity import LinearisationCache
from lfm_zonal.market import strategies as clearing_module
from lfm_zonal.market.clearing import clear_market, mtus_to_clear
from lfm_zonal.market.resources import FlexibilitySpec, generate_resources
from lfm_zonal.zones.segmentation import prepare_segmentation

warnings.filterwarnings("ignore")

captured: list = []  # every LP the clearing solved (the benchmark's instrumentation only)
_solve = clearing_module.ClearingModel.solve


def _capturing_solve(self):
    sol = _solve(self)
    needs_lp = bool(np.isinf(self.bids.quantity).all())  # DSO-needs LP: unbounded unit bids
    captured.append((needs_lp, self.highs.getLp()))
    return sol


clearing_module.ClearingModel.solve = _capturing_solve


def pure_solve_s(lp) -> float:
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.passModel(lp)
    started = time.perf_counter()
    h.run()
    return time.perf_counter() - started


def main() -> int:
    grid = load_grid("1-MV-rural--0-sw")
    profiles = load_profiles(grid, Horizon(start="2016-04-16", n_mtu=96), sgen_scale=1.8)
    pf = run_horizon(grid, profiles)
    resources = generate_resources(
        pf,
        FlexibilitySpec(
            units_per_element=3, load_up_share=0.4, load_down_share=0.3, sgen_down_share=0.8
        ),
        seed=1,
    )
    seg = prepare_segmentation(pf, 10, flexible_capacity_mw=resources.capacity_per_bus())
    print(
        f"SimBench 1-MV-rural--0-sw, 96 MTUs ({len(mtus_to_clear(pf))} with violations), "
        f"{len(resources)} resources"
    )
    cache = LinearisationCache(pf.model)  # the base points, linearised once as in a study

    def clear(method: str, k: int | None):
        zones = None if k is None else seg.zones(k)
        return clear_market(pf, resources, method, zones, weights=seg.weights, cache=cache)

    clear("zonal", 2)  # warm-up
    header = (
        f"{'market':<10} {'build s':>8} {'HiGHS s':>8} {'AC chk s':>8} {'whole s':>8} "
        f"{'columns':>8} {'rows':>7} {'nonzeros':>9} {'LPs':>4} {'pure s':>7} "
        f"{'LP/pure':>8} {'whole/pure':>10}"
    )
    print(header)
    for method, k in (("nodal", None), ("zonal", 1), ("zonal", 4), ("zonal", 16)):
        captured.clear()
        started = time.perf_counter()
        result = clear(method, k)
        whole = time.perf_counter() - started
        started = time.perf_counter()
        ac_check(pf, result.dispatch)
        t_ac = time.perf_counter() - started
        # The clearing LPs (not the DSO-needs LPs, which have 2 columns per area and MTU).
        kpis = result.kpis
        pure_clearing = sum(pure_solve_s(lp) for needs, lp in captured if not needs)
        pure = pure_clearing + sum(pure_solve_s(lp) for needs, lp in captured if needs)
        lp_time = kpis["build_s"] + kpis["solve_s"]
        last = max((c for c in captured if not c[0]), key=lambda c: c[1].num_col_)[1]
        label = "nodal" if method == "nodal" else f"K={k}"
        print(
            f"{label:<10} {kpis['build_s']:8.2f} {kpis['solve_s']:8.2f} {t_ac:8.2f} {whole:8.2f} "
            f"{last.num_col_:8d} {last.num_row_:7d} {len(last.a_matrix_.value_):9d} "
            f"{len(captured):4d} {pure:7.2f} {lp_time / max(pure_clearing, 1e-9):8.1f} "
            f"{whole / max(pure, 1e-9):10.1f}"
        )
    print(
        "pure s: every LP of the run (clearing and DSO needs) solved again from scratch by HiGHS "
        "from its matrix; LP/pure: the clearing LPs' build + solve against their pure solves; "
        "columns/rows/nonzeros: the largest clearing LP"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
