"""Foundation benchmark: speed ratios and sensitivity accuracy, measured in one run.

    python benchmarks/bench_foundation.py [--quick]

1. Jacobian sensitivities (all buses, one factorisation) against perturbation
   with one pandapower AC power flow per bus (target: >= 100x faster). On the
   1000-bus feeder the perturbation is timed on a sample of buses and scaled to
   all of them (stated in the output).
2. Base-case power flows of a 96-MTU day: lfm-zonal's horizon power flow (one
   network structure, warm-started Newton-Raphson) against a plain loop of
   ``pandapower.runpp`` (target: >= 5x faster).
3. Accuracy of every sensitivity method against finite differences of AC power
   flows (largest relative error of the significant entries), for the README.

Absolute times drift on a shared machine; the ratios are the result.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import numpy as np
import pandapower as pp

from lfm_zonal import Horizon, load_grid, load_profiles, run_horizon, sensitivities
from lfm_zonal.grid.powerflow import build_network_model
from lfm_zonal.grid.sensitivity import (
    SENSITIVITY_METHODS,
    finite_difference_sensitivities,
    sensitivity_error,
)

warnings.filterwarnings("ignore")


def timed(fn, repeat: int = 1):
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def perturbation_time_per_bus(pf, mtu: int, buses) -> float:
    """One pandapower AC power flow per bus with a 1 MW injection (what the Jacobian replaces)."""
    t0 = time.perf_counter()
    for bus in buses:
        net = pf.operating_point(mtu)
        pp.create_sgen(net, int(bus), p_mw=1.0)
        pp.runpp(net, numba=False)
    return (time.perf_counter() - t0) / len(buses)


def bench_sensitivities(name: str, sample: int | None) -> None:
    grid = load_grid(name)
    pf = run_horizon(grid, load_profiles(grid, Horizon(n_mtu=96)))
    mtu = int(pf.loading_percent.max(axis=1).to_numpy().argmax())
    sensitivities(pf, mtu)  # warm-up
    t_jac, _ = timed(lambda: sensitivities(pf, mtu), repeat=3)
    buses = pf.model.buses
    picked = (
        buses
        if sample is None or sample >= len(buses)
        else np.random.default_rng(0).choice(buses, sample, replace=False)
    )
    t_per_bus = perturbation_time_per_bus(pf, mtu, picked)
    t_pert = t_per_bus * len(buses)
    note = (
        ""
        if len(picked) == len(buses)
        else f" (timed on {len(picked)} buses, scaled to {len(buses)})"
    )
    print(
        f"  {name:<24} {len(buses):>5} buses  jacobian {t_jac:7.3f} s  "
        f"perturbation {t_pert:8.2f} s{note}  ratio {t_pert / t_jac:7.0f}x"
    )


def bench_horizon(name: str) -> None:
    grid = load_grid(name)
    profiles = load_profiles(grid, Horizon(n_mtu=96))
    run_horizon(grid, profiles)  # warm-up (caches)

    def engine():
        return run_horizon(grid, profiles, build_network_model(grid))

    def plain_loop():
        net = copy.deepcopy(grid.net)
        for t in range(96):
            net.load["p_mw"] = profiles.load_p_mw.iloc[t].to_numpy()
            net.load["q_mvar"] = profiles.load_q_mvar.iloc[t].to_numpy()
            net.sgen["p_mw"] = profiles.sgen_p_mw.iloc[t].to_numpy()
            net.sgen["q_mvar"] = profiles.sgen_q_mvar.iloc[t].to_numpy()
            pp.runpp(net, numba=False)

    t_engine, _ = timed(engine, repeat=3)
    t_loop, _ = timed(plain_loop, repeat=1)
    print(
        f"  {name:<24} engine {t_engine / 96 * 1e3:7.2f} ms/MTU (structure built once, included)  "
        f"runpp loop {t_loop / 96 * 1e3:7.2f} ms/MTU  ratio {t_loop / t_engine:5.1f}x"
    )


def bench_accuracy(name: str, n_buses: int) -> None:
    grid = load_grid(name)
    pf = run_horizon(grid, load_profiles(grid, Horizon(n_mtu=96)))
    mtu = int(pf.loading_percent.max(axis=1).to_numpy().argmax())
    slack = set(grid.net.ext_grid.bus)
    candidates = [b for b in pf.model.buses if b not in slack]
    buses = np.random.default_rng(1).choice(
        candidates, min(n_buses, len(candidates)), replace=False
    )
    fd = finite_difference_sensitivities(pf, mtu, buses)
    for method in SENSITIVITY_METHODS:
        try:
            err = sensitivity_error(sensitivities(pf, mtu, method), fd)
        except Exception as exc:  # lindistflow on a meshed grid
            print(f"  {name:<24} {method:<12} not applicable: {exc}")
            continue
        cells = "  ".join(f"{k} {100 * v:6.2f}%" for k, v in err.items())
        print(f"  {name:<24} {method:<12} {cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples (a smoke run)")
    args = parser.parse_args()
    sample = 20 if args.quick else 100
    print("1. Sensitivities: Jacobian vs one AC power flow per bus (target >= 100x)")
    bench_sensitivities("1-MV-rural--0-sw", None)
    bench_sensitivities("synthetic_radial_1000", sample)
    print(
        "2. Base-case power flows of a 96-MTU day vs a plain pandapower.runpp loop (target >= 5x)"
    )
    bench_horizon("1-MV-rural--0-sw")
    bench_horizon("synthetic_radial_1000")
    print(
        "3. Largest relative error of significant entries (>= 5% of the matrix max) vs "
        "finite differences, at the most loaded MTU"
    )
    for name in ("cigre_mv", "ieee33", "1-MV-rural--0-sw", "1-LV-rural1--0-sw"):
        bench_accuracy(name, 6 if args.quick else 12)
    return 0


if __name__ == "__main__":
    sys.exit(main())
