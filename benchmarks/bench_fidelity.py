"""Fidelity of the nodal market against an AC OPF, and its speed against a runopp loop.

    python benchmarks/bench_fidelity.py [--ratio-mtus 0,8,20,32,44,60] [--timing all|ratio]

Scenario ``simbench_mv_windy_day``: SimBench ``1-MV-rural--0-sw`` on 2016-04-16 with
sgens x1.8, 594 resources of 3 aggregators, overloads and overvoltage in 72 of 96 MTUs.

**Fidelity.** For every MTU of ``--ratio-mtus`` (default: 6 congested MTUs spread over
the day) it prints the engine's nodal pay-as-bid cost of that MTU over the AC OPF's
(``lfm_zonal.market.opf_reference``: pandapower ``runopp``, PIPS, the same resources as
controllable sgens with Q tied to P by their tan_phi, the same limits):

* ``day``: the MTU's share of the engine's whole-day nodal clearing (what a run reports);
* ``alone``: the engine clearing that MTU alone (a horizon of one MTU), like the OPF.

with the largest limit violation each leaves in an AC power flow. Target (issue 10):
every ratio within 1%.

**Speed.** The engine's whole-day nodal clearing (``clear_market``: every congested
MTU, its AC check included) against a loop of ``runopp`` over the same MTUs
(``--timing all``, the default; ``--timing ratio`` times only the ratio MTUs and scales
to the day, marked as such). The loop's time is runopp's alone (net set-up and the
runpp check of each MTU excluded: the comparison favours the OPF). Target: the engine
at least 10x faster. Peak memory (``getrusage``, max RSS) is printed after each stage.

**PIPS settings**, as ``opf_reference`` uses them:

* ``calculate_voltage_angles=False``: SimBench's two 110/20 kV trafos have a 150
  degree vector group shift. With angles on, PIPS does not converge here (tried at
  00:00 and 07:00, from a flat start and from a power flow). The grid is radial below
  each trafo with one slack, so the shift changes no voltage magnitude, current or
  loading: the OPF answers the same question.
* ``init="flat"`` (flat start, 1 p.u. and 0 degrees): every MTU's OPF starts from the
  same point, whatever was solved before; ``init="pf"`` gave the same costs where tried.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
import warnings

import numpy as np
import pandas as pd

from lfm_zonal.grid.powerflow import run_horizon
from lfm_zonal.grid.profiles import Horizon, load_profiles
from lfm_zonal.market.clearing import clear_market, mtus_to_clear
from lfm_zonal.market.opf_reference import opf_reference
from lfm_zonal.market.resources import Resources
from lfm_zonal.study.job import prepare_base_case, prepare_resources, prepare_segmentation_of
from lfm_zonal.study.scenario import load_scenario

warnings.filterwarnings("ignore")

SCENARIO = "simbench_mv_windy_day"
RATIO_TOLERANCE = 0.01
SPEED_UP_TARGET = 10.0


def peak_mib() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def violation(g, loading: np.ndarray, vm: np.ndarray) -> tuple[float, float]:
    """Largest overload (pp) and largest distance outside the band (p.u.), 0 if none."""
    over = max(0.0, float(np.nanmax(loading)) - g.loading_max_percent)
    dev = max(0.0, float(np.nanmax(g.vm_min_pu - vm)), float(np.nanmax(vm - g.vm_max_pu)))
    return over, dev


def clear_alone(base, resources: Resources, mtu: int) -> tuple[float, float, float]:
    """The engine's nodal clearing of one MTU on a one-MTU horizon: cost and violations."""
    sc, pf = base.scenario, base.powerflow
    when = pf.times[mtu]
    horizon = Horizon(start=str(when), n_mtu=1, mtu_minutes=sc["horizon"]["mtu_minutes"])
    p = sc["profiles"]
    profiles = load_profiles(
        pf.grid,
        horizon,
        csv=sc.resolve_path(p["csv"]) if p["csv"] else None,
        load_scale=p["load_scale"],
        sgen_scale=p["sgen_scale"],
    )
    one = run_horizon(pf.grid, profiles, model=pf.model)
    res = dataclasses.replace(
        resources, up_mw=resources.up_mw.loc[[when]], down_mw=resources.down_mw.loc[[when]]
    )
    result = clear_market(one, res, "nodal")
    over, dev = violation(pf.grid, result.ac.loading_percent.to_numpy(), result.ac.vm_pu.to_numpy())
    return float(result.kpis["cost_eur"]), over, dev


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio-mtus", default="", help="comma-separated MTU numbers")
    parser.add_argument("--timing", choices=("all", "ratio"), default="all")
    args = parser.parse_args()

    started = time.perf_counter()
    scenario = load_scenario(SCENARIO)
    base = prepare_base_case(scenario)
    resources = prepare_resources(base)
    seg = prepare_segmentation_of(base, resources)
    pf, g = base.powerflow, base.grid
    prep_s = time.perf_counter() - started
    congested = mtus_to_clear(pf)
    print(
        f"{SCENARIO}: {g.name}, {len(pf.model.buses)} buses, {len(resources)} resources, "
        f"{len(congested)} of {len(pf.times)} MTUs congested; limits {g.vm_min_pu}-"
        f"{g.vm_max_pu} p.u., {g.loading_max_percent}%"
    )
    print(f"base case, resources, segmentation: {prep_s:.1f} s; peak memory {peak_mib():.0f} MiB")

    started, cpu_started = time.perf_counter(), time.process_time()
    day = clear_market(pf, resources, "nodal", sensitivity_method=seg.sensitivity_method)
    engine_s = time.perf_counter() - started
    engine_cpu_s = time.process_time() - cpu_started
    print(
        f"engine, whole-day nodal clearing: {engine_s:.2f} s ({engine_cpu_s:.2f} s CPU), "
        f"{day.kpis['cost_eur']:.2f} EUR, "
        f"AC rounds {day.kpis.get('ac_rounds')}; peak memory {peak_mib():.0f} MiB"
    )
    day_cost = day.bids.groupby("mtu").cost_pay_as_bid_eur.sum()

    if args.ratio_mtus:
        ratio_mtus = [int(t) for t in args.ratio_mtus.split(",")]
    else:
        ratio_mtus = sorted({int(congested[int(i)]) for i in np.linspace(0, len(congested) - 1, 6)})
    print()
    header = (
        f"{'MTU':>4} {'time':>5} {'OPF EUR':>9} {'day EUR':>9} {'day/OPF':>8} {'alone EUR':>9} "
        f"{'alone/OPF':>9}  {'left: OPF':>16}  {'day':>16}  {'alone':>16}  {'runopp s':>8}"
    )
    print(header)
    rows, opf_runs = [], {}
    for t in ratio_mtus:
        opf = opf_reference(pf, resources, t)
        opf_runs[t] = opf
        d_over, d_dev = violation(
            g, day.ac.loading_percent.iloc[t].to_numpy(), day.ac.vm_pu.iloc[t].to_numpy()
        )
        alone_eur, a_over, a_dev = clear_alone(base, resources, t)
        day_eur = float(day_cost.get(t, 0.0))
        row = {
            "mtu": t,
            "opf_eur": opf.cost_eur,
            "day_ratio": day_eur / opf.cost_eur,
            "alone_ratio": alone_eur / opf.cost_eur,
        }
        rows.append(row)

        def left(over: float, dev: float) -> str:
            return f"{over:.3f}pp {dev:.1e}pu"

        print(
            f"{t:>4} {pf.times[t]:%H:%M} {opf.cost_eur:>9.2f} {day_eur:>9.2f} "
            f"{row['day_ratio']:>8.4f} {alone_eur:>9.2f} {row['alone_ratio']:>9.4f}  "
            f"{left(opf.overload_max_percent, opf.voltage_violation_max_pu):>16}  "
            f"{left(d_over, d_dev):>16}  {left(a_over, a_dev):>16}  {opf.solve_s:>8.2f}"
            + ("" if opf.converged else "  OPF NOT CONVERGED")
        )
    table = pd.DataFrame(rows)
    print(f"peak memory {peak_mib():.0f} MiB")

    timing_mtus = [int(t) for t in congested] if args.timing == "all" else ratio_mtus
    runopp_s, total_s, loop_cpu_s, failed = 0.0, 0.0, 0.0, []
    for t in timing_mtus:
        if t in opf_runs:
            opf = opf_runs[t]
        else:
            cpu_started = time.process_time()
            opf = opf_reference(pf, resources, t)
            # CPU share of runopp alone: its wall share of this call.
            loop_cpu_s += (time.process_time() - cpu_started) * opf.solve_s / opf.total_s
        runopp_s += opf.solve_s
        total_s += opf.total_s
        if not opf.converged:
            failed.append(t)
    scale = len(congested) / len(timing_mtus)
    note = (
        "" if args.timing == "all" else f" (timed on {len(timing_mtus)} MTUs, scaled x{scale:.1f})"
    )
    loop_s = runopp_s * scale
    print()
    print(
        f"runopp loop over the {len(congested)} congested MTUs: {loop_s:.1f} s of runopp"
        f"{note}, {total_s * scale:.1f} s with net set-up and runpp check; "
        f"{len(failed)} not converged {failed}; peak memory {peak_mib():.0f} MiB"
    )
    speed_up = loop_s / engine_s
    n_cpu = len([t for t in timing_mtus if t not in opf_runs])
    cpu_note = (
        f", {loop_cpu_s / n_cpu * len(congested) / engine_cpu_s:.1f}x in CPU time" if n_cpu else ""
    )
    print(
        f"speed-up: {speed_up:.1f}x in wall time{cpu_note} (engine's clearing {engine_s:.2f} s); "
        f"{loop_s / (engine_s + prep_s):.1f}x with the engine's base case and segmentation "
        f"({engine_s + prep_s:.2f} s)"
    )
    ok_ratio = bool(
        (table[["day_ratio", "alone_ratio"]].sub(1.0).abs() <= RATIO_TOLERANCE).all(None)
    )
    ok_speed = speed_up >= SPEED_UP_TARGET
    print(
        f"targets: every ratio within {RATIO_TOLERANCE:.0%}: {'yes' if ok_ratio else 'NO'} "
        f"(day {table.day_ratio.min():.4f}-{table.day_ratio.max():.4f}, alone "
        f"{table.alone_ratio.min():.4f}-{table.alone_ratio.max():.4f}); "
        f"engine >= {SPEED_UP_TARGET:.0f}x faster: {'yes' if ok_speed else 'NO'}"
    )
    return 0 if ok_ratio and ok_speed else 1


if __name__ == "__main__":
    sys.exit(main())
