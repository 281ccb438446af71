"""Main-job benchmark: `lfm-zonal run` in a fresh process, as a user runs it, on the SimBench MV
scenario and on the synthetic 1000-bus feeder (96 MTUs, nodal plus four zone counts, AC check).

    python benchmarks/bench_main_job.py [--skip-1000]

Targets (issue): SimBench MV under 15 s, synthetic 1000-bus under 60 s on the 2-core
machine. Prints the wall time of the whole command and of its clearing, and the peak memory
of the process. SimBench MV runs
twice: with an empty SimBench cache (a user's first run: SimBench extracts the network
from its CSV tables) and with the cache it left (every later run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

CASES = {
    "SimBench MV (simbench_mv_windy_day)": """
name = "bench_simbench_mv"
seed = 42
[grid]
source = "1-MV-rural--0-sw"
[horizon]
start = "2016-04-16 00:00"
n_mtu = 96
[profiles]
sgen_scale = 1.8
[flexibility]
load_up_share = 0.4
load_down_share = 0.3
sgen_down_share = 0.8
units_per_element = 3
[zones]
k = [2, 4, 8, 16]
[market]
methods = ["nodal", "zonal"]
""",
    "synthetic_radial_1000": """
name = "bench_synthetic_1000"
seed = 42
[grid]
source = "synthetic_radial_1000"
[horizon]
start = "2016-01-14 00:00"
n_mtu = 96
[zones]
k = [2, 4, 8, 16]
[market]
methods = ["nodal", "zonal"]
""",
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-1000", action="store_true", help="only the SimBench MV case")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        for label, text in CASES.items():
            if args.skip_1000 and "1000" in label:
                continue
            runs = ["cold SimBench cache", "warm SimBench cache"] if "SimBench" in label else [""]
            for run in runs:
                name = f"{label}, {run}" if run else label
                run_case(name, text, {**os.environ, "LFM_ZONAL_CACHE": cache}, args.timeout)
    return 0


def run_case(label: str, text: str, env: dict, timeout: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.toml"
        path.write_text(text)
        command = ["lfm-zonal", "run", str(path), "--out", f"{tmp}/out", "--quiet"]
        with open(Path(tmp) / "stderr.txt", "w+") as stderr:
            started = time.perf_counter()
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
            timer = threading.Timer(timeout, child.kill)
            timer.start()
            _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory
            wall = time.perf_counter() - started
            timer.cancel()
            stderr.seek(0)
            errors = stderr.read()
        if os.waitstatus_to_exitcode(status) != 0:
            why = f"not finished after {timeout:.0f} s" if wall >= timeout else errors[-300:]
            print(f"{label}: failed: {why.strip()}")
            return
        kpis = pd.read_csv(f"{tmp}/out/kpis.csv")
        print(
            f"{label}: whole command {wall:.1f} s, of which clearing + AC check "
            f"{kpis.clear_s.sum():.1f} s ({len(kpis)} markets; nodal {kpis.clear_s.iloc[0]:.1f} s, "
            f"largest LP {kpis.n_variables.max()} columns); peak memory "
            f"{usage.ru_maxrss / 2**20:.2f} GB"
        )


if __name__ == "__main__":
    sys.exit(main())
