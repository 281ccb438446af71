"""Sweep benchmark: 7 days x 5 zone counts of the SimBench MV scenario (nodal and zonal),
one Dask worker against one per core, then a resume of the finished sweep.

    python benchmarks/bench_sweep.py [--days 7]

Prints the wall time of each and the speed-up; absolute times drift on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import pandas as pd

from lfm_zonal.study.scenario import load_scenario
from lfm_zonal.study.sweep import run_sweep

warnings.filterwarnings("ignore")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--days", type=int, default=7)
    args = parser.parse_args()
    scenario = load_scenario("simbench_mv_windy_day")
    days = [f"{d:%Y-%m-%d}" for d in pd.date_range("2016-04-10", periods=args.days)]
    ks = [1, 2, 4, 8, 16]
    cores = os.cpu_count() or 1
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, cores):
            started = time.perf_counter()
            table = run_sweep(
                scenario, days, ks, [0], f"{tmp}/w{workers}", methods=["nodal", "zonal"],
                workers=workers,
            )  # fmt: skip
            times[workers] = time.perf_counter() - started
        started = time.perf_counter()
        run_sweep(scenario, days, ks, [0], f"{tmp}/w{cores}", methods=["nodal", "zonal"])
        resume = time.perf_counter() - started
        same = (
            open(f"{tmp}/w1/sweep.csv", "rb").read()
            == open(f"{tmp}/w{cores}/sweep.csv", "rb").read()
        )
    print(
        f"SimBench MV windy-day scenario: {len(days)} days x {len(ks)} zone counts + nodal, {len(table)} rows"
    )
    print(f"  1 worker      {times[1]:7.1f} s")
    print(f"  {cores} workers     {times[cores]:7.1f} s   speed-up {times[1] / times[cores]:.2f}x")
    print(f"  resume of the finished sweep: {resume:.1f} s (nothing recomputed)")
    print(f"  same sweep.csv bytes with 1 and {cores} workers: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
