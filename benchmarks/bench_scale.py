"""Scale benchmark (issue 13's targets): the main job on large grids, each case in a fresh process.

    python benchmarks/bench_scale.py [--case A|B|C|all] [--quick]

* A: SimBench ``1-MVLV-rural-all-0-sw`` (MV + LV, about 5500 buses), 29 May 2016, 96 MTUs of
  15 min, sgens x2.2; nodal, zonal and needs-based at K = 1, 4, 16, 64, each with its AC
  check. Targets: under 60 s, under 4 GB, 0 new violations.
* B: the seeded ``synthetic_radial_10000`` feeder, the same markets. Targets: under 120 s,
  under 4 GB.
* C: the main job (``run_scenario``, results written to a temporary folder) of the built-in
  ``simbench_mv_windy_day`` with a warm SimBench cache (a first run fills it): under 5 s; and
  of ``synthetic_radial_1000``: under 10 s.
* Every market: whole clearing (clear_s) against HiGHS alone (solve_s), target <= 2x.
* The nodal market of A and B: its residual where the offers it left could remove it (the
  residual rows not ``offers_short``; of them, where the offers not dispatched could
  remove it alone, without withdrawing a dispatch that worsens the row), and its residual
  beyond what its own model expected (``excess - model_excess``: what it did not leave as
  priced unmet need), target 0.01 pp and 1e-4 p.u.

A and B run ``run_study`` with timers wrapped around its stages (base case, resources,
segmentation, zones of each K, each market's linearised grid, DSO needs, bids, clearing, AC
check, residual table); the timers only measure. ``--workers`` (default: one per core, as
``lfm-zonal run``) processes clear the markets at once; a market's row is its own wall time,
in its worker. Peak memory is the case's processes together: the larger of their summed
proportional set sizes (sampled every PSS_SAMPLE_S seconds; pages the forked workers share with
the parent count once) and the largest single process's peak RSS (``wait4``). ``--quick`` clears 8
MTUs (from 10:00, where the PV overloads are) for a smoke run. Progress lines carry the elapsed time, the RSS so far and the load average: the machine
is shared, absolute times drift with the load.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from bench_main_job import CASES as MAIN_JOB_CASES  # a script beside this one

from lfm_zonal.limits import available_cores

MARKETS = 'methods = ["nodal", "zonal", "needs_based"]'
CASES = {
    "A": f"""
name = "bench_scale_mvlv"
description = "SimBench MV+LV rural, 29 May, PV x2.2"
seed = 42
[grid]
source = "1-MVLV-rural-all-0-sw"
[horizon]
start = "2016-05-29 00:00"
n_mtu = 96
mtu_minutes = 15
[profiles]
sgen_scale = 2.2
[zones]
k = [1, 4, 16, 64]
[market]
{MARKETS}
""",
    "B": f"""
name = "bench_scale_synthetic_10000"
seed = 42
[grid]
source = "synthetic_radial_10000"
[horizon]
start = "2016-01-14 00:00"
n_mtu = 96
mtu_minutes = 15
[zones]
k = [1, 4, 16, 64]
[market]
{MARKETS}
""",
    # C: the main job of the built-in scenario, and of the 1000-bus feeder as bench_main_job.
    "C_mv": "builtin:simbench_mv_windy_day",
    "C_1000": MAIN_JOB_CASES["synthetic_radial_1000"],  # the same case as bench_main_job
}
TARGETS = {"A": (60.0, 4.0), "B": (120.0, 4.0), "C_mv": (5.0, None), "C_1000": (10.0, None)}
RATIO_TARGET = 2.0
GB = 2**30
STARTED = time.perf_counter()


def rss_gb() -> float:
    """This process's current resident set (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GB


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def progress(message: str) -> None:
    say(
        f"  [{time.perf_counter() - STARTED:7.1f} s, RSS {rss_gb():5.2f} GB, load {load()}] "
        f"{message}"
    )


def say(line: str) -> None:
    """One line to stdout in one write: the market workers share the pipe, and a line
    written in pieces could be cut by another worker's (atomic up to PIPE_BUF bytes)."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def scenario_text(case: str, quick: bool) -> str:
    text = CASES[case]
    if text.startswith("builtin:"):
        from lfm_zonal.files.inputs import shipped_toml_text

        text = shipped_toml_text(text.removeprefix("builtin:"))
    if quick:
        text = re.sub(r"(?m)^n_mtu = \d+", "n_mtu = 8", text)
        text = re.sub(r'(?m)^start = "(\d{4}-\d\d-\d\d) 00:00"', r'start = "\1 10:00"', text)
    return text


# --- child: one case in this process -------------------------------------------------------


class StageTimers:
    """Wall-time wrappers around the study's stages (names looked up in the calling modules)."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.market: dict[str, float] = {}

    def wrap(self, owner, name: str, label: str, market_part: bool = False) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            if not market_part:
                progress(f"{label} ...")
            started = time.perf_counter()
            out = inner(*args, **kwargs)
            seconds = time.perf_counter() - started
            if market_part:
                self.market[label] = self.market.get(label, 0.0) + seconds
            else:
                self.stages[label] = self.stages.get(label, 0.0) + seconds
                progress(f"{label} done in {seconds:.1f} s")
            return out

        setattr(owner, name, timed)

    def wrap_markets(self, owner) -> None:
        """A market's row: its ``prepare_market`` (linearised grid, bids, DSO needs; the
        needs-based market shares the zonal one's of its K and has none) and ``clear_market``."""
        prepare, inner = owner.prepare_market, owner.clear_market
        self.prepared_s = 0.0

        def timed_prepare(*args, **kwargs):
            started = time.perf_counter()
            out = prepare(*args, **kwargs)
            self.prepared_s = time.perf_counter() - started
            return out

        def timed(pf, resources, method, *args, **kwargs):
            zones = kwargs["inputs"].zones
            label = method if method == "nodal" else f"{method} K={zones.k}"
            progress(f"market {label} ...")
            started = time.perf_counter()
            result = inner(pf, resources, method, *args, **kwargs)
            wall = time.perf_counter() - started + self.prepared_s
            k = result.kpis
            row = {
                "market": label,
                "wall_s": wall,
                **{f"{part}_s": s for part, s in self.market.items()},
                **{
                    name: _plain(k[name])
                    for name in (
                        "clear_s",
                        "build_s",
                        "solve_s",
                        "n_variables",
                        "n_constraints",
                        "cost_eur",
                        "new_violations",
                        "residual_overload_max_percent",
                        "residual_voltage_max_pu",
                        "solver_status",
                        "ac_rounds",
                    )
                },
                "load": load(),
            }
            if method == "nodal":
                row.update(residual_where_offers_suffice(result))
            # A market may clear in a forked worker process: its row goes to the parent
            # through the case's stdout (run_case collects the MARKET lines).
            say("MARKET " + json.dumps(row))
            progress(
                f"market {label} done in {wall:.1f} s (clear {k['clear_s']:.1f} s, "
                f"HiGHS {k['solve_s']:.1f} s, AC check {self.market.get('ac', 0):.1f} s)"
            )
            self.market, self.prepared_s = {}, 0.0
            return result

        owner.prepare_market, owner.clear_market = timed_prepare, timed


def residual_where_offers_suffice(result) -> dict:
    """The issue's "nodal residual where flexibility suffices", three ways, each as a
    number of rows and the largest excess (pp, p.u.): ``suffice``, the residual rows the
    offers left could remove whatever their price (not ``offers_short``: relief left,
    linear, at least the excess, counting the dispatch that worsens the row as withdrawn),
    ``alone``, those the offers not dispatched could remove without that withdrawal
    (``relief_left - relief_withdrawn``), and ``missed``, the residual beyond what the
    market's own model expected (``excess - model_excess``): the rest the market left as
    unmet need, priced at the penalty times the row's price factor, where nothing it
    could still buy removes it for less."""
    res = result.residual
    is_bus = res.element_type == "bus"
    out = {}
    left_alone = res.relief_left - res.relief_withdrawn >= res.excess
    for name, rows, amount in (
        ("suffice", res.offers_short.eq(False), res.excess),
        ("alone", left_alone, res.excess),  # implies not offers_short
        ("missed", res.missed_by_model.eq(True), res.excess - res.model_excess),
    ):
        out[f"{name}_rows"] = int(rows.sum())
        out[f"{name}_overload_pp"] = (
            float(amount[rows & ~is_bus].max()) if (rows & ~is_bus).any() else 0.0
        )
        out[f"{name}_voltage_pu"] = (
            float(amount[rows & is_bus].max()) if (rows & is_bus).any() else 0.0
        )
    return out


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def run_child(case: str, quick: bool, workers: int) -> dict:
    warnings.filterwarnings("ignore")
    faulthandler.register(signal.SIGUSR1)  # where a case was when the parent stops it
    from lfm_zonal.study import job
    from lfm_zonal.study.scenario import parse_scenario

    progress(f"case {case}: imports done")
    scenario = parse_scenario(scenario_text(case, quick), f"bench_scale:{case}")
    if case.startswith("C_"):
        from lfm_zonal.study.results import run_scenario

        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            run_scenario(scenario, Path(tmp) / "out", workers=workers)
            seconds = time.perf_counter() - started
        progress(f"main job done in {seconds:.1f} s")
        return {"main_job_s": seconds, "load": load()}

    from lfm_zonal.market import clearing
    from lfm_zonal.zones.segmentation import Segmentation

    t = StageTimers()
    t.wrap(job, "prepare_base_case", "base case (grid, profiles, AC power flows)")
    t.wrap(job, "prepare_resources", "resources")
    t.wrap(job, "plan_zones", "reference MTU, zone counts")
    t.wrap(job, "prepare_segmentation_of", "segmentation")
    t.wrap(Segmentation, "zones", "zones(K)")
    t.wrap(Segmentation, "error", "segmentation error(K)")
    t.wrap(Segmentation, "prime_indices", "segmentation error(K)")
    t.wrap_markets(job)
    for name, label in (
        ("linear_grid", "linear_grid"),
        ("build_bids", "bids"),
        ("dso_needs", "needs"),
        ("ac_check", "ac"),
        ("residual_violations", "residual"),
    ):
        t.wrap(clearing, name, label, market_part=True)
    started = time.perf_counter()
    study = job.run_study(scenario, workers=workers)
    total = time.perf_counter() - started
    pf = study.base.powerflow
    t.stages["markets (wall, all workers)"] = total - sum(t.stages.values())
    return {
        "total_s": total,
        "workers": workers,
        "stages": t.stages,
        "grid": f"{study.base.grid.name}: {len(pf.model.buses)} buses, {len(pf.times)} MTUs, "
        f"{len(study.resources)} resources",
        "load": load(),
    }


# --- parent: one fresh process per case, its peak RSS from wait4 -------------------------


#: Seconds between two samples of the case's proportional set size. Reading smaps_rollup walks
#: each process's page tables: every 0.2 s it took 2 CPU-seconds of every 10 s of case A (a
#: fifth of a core, taken from the two the markets clear on); every second, a fifth of that.
#: A peak shorter than that may be missed by the sum, not by the largest single process's
#: (``wait4``), which is reported too.
PSS_SAMPLE_S = 1.0


def tree_pss_gb(pid: int) -> float | None:
    """Proportional set size of a process and its descendants together (GB; None once it
    has ended): pages shared by forked workers are counted once."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):
            if p == pid:
                return None
    return total * 1024 / GB


def run_case(case: str, args) -> dict | None:
    command = [sys.executable, __file__, "--child", case, "--workers", str(args.workers)]
    command += ["--quick"] if args.quick else []
    with tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        done, killed, peak_sum = threading.Event(), [], [0.0]

        def watchdog() -> None:  # stop a case beyond the time or memory cap
            while not done.wait(PSS_SAMPLE_S):
                rss = tree_pss_gb(child.pid)
                if rss is None:
                    return
                peak_sum[0] = max(peak_sum[0], rss)
                wall = time.perf_counter() - started
                if wall > args.timeout or rss > args.max_rss_gb:
                    killed.append(f"stopped at {wall:.0f} s, RSS {rss:.1f} GB")
                    child.send_signal(signal.SIGUSR1)  # the child's stack, to stderr
                    time.sleep(2)
                    child.kill()
                    return

        watcher = threading.Thread(target=watchdog, daemon=True)
        watcher.start()
        result, markets = None, []
        for line in child.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line.removeprefix("RESULT "))
            elif line.startswith("MARKET "):
                markets.append(json.loads(line.removeprefix("MARKET ")))
            else:
                print(line, end="", flush=True)
        done.set()
        watcher.join()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        stderr.seek(0)
        errors = stderr.read()
    if os.waitstatus_to_exitcode(status) != 0 or result is None:
        tail = "\n".join(errors.strip().splitlines()[-25:])
        print(f"case {case} FAILED ({'; '.join(killed) or 'exit ' + str(status)}):\n{tail}")
        return None
    result["process_s"] = wall
    result["markets"] = markets
    # The case's processes together (its market workers share the parent's pages until
    # written: proportional set sizes, sampled), and the largest single one (exact).
    result["peak_rss_gb"] = max(peak_sum[0], usage.ru_maxrss * 1024 / GB)  # ru_maxrss in KiB
    result["peak_single_rss_gb"] = usage.ru_maxrss * 1024 / GB
    return result


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report_study(case: str, r: dict) -> None:
    t_max, m_max = TARGETS[case]
    print(f"\n=== case {case}: {r['grid']} (load at end {r['load']})")
    print(
        f"run_study {r['total_s']:.1f} s (target < {t_max:.0f} s: "
        f"{verdict(r['total_s'] < t_max)}) with {r['workers']} market worker(s); process "
        f"{r['process_s']:.1f} s; peak memory {r['peak_rss_gb']:.2f} GB (target < {m_max:.0f} GB: "
        f"{verdict(r['peak_rss_gb'] < m_max)}; largest single process "
        f"{r['peak_single_rss_gb']:.2f} GB)"
    )
    print("stages: " + ", ".join(f"{name} {s:.1f} s" for name, s in r["stages"].items()))
    print(
        f"{'market':<16} {'wall s':>7} {'lingrid':>7} {'needs':>6} {'clear':>7} {'build':>6} "
        f"{'HiGHS':>6} {'cl/HiGHS':>8} {'AC chk':>6} {'resid':>6} {'columns':>8} {'rows':>8} "
        f"{'cost EUR':>9} {'new viol':>8} {'ovl pp':>6} {'V p.u.':>7} {'status':>9} {'load':>13}"
    )
    new_total = 0
    for m in r["markets"]:
        ratio = m["clear_s"] / m["solve_s"] if m["solve_s"] > 0 else float("nan")
        new_total += int(m["new_violations"])
        print(
            f"{m['market']:<16} {m['wall_s']:7.1f} {m.get('linear_grid_s', 0):7.1f} "
            f"{m.get('needs_s', 0):6.1f} {m['clear_s']:7.1f} {m['build_s']:6.1f} "
            f"{m['solve_s']:6.1f} {ratio:8.1f} {m.get('ac_s', 0):6.1f} "
            f"{m.get('residual_s', 0):6.1f} {m['n_variables']:8d} {m['n_constraints']:8d} "
            f"{m['cost_eur']:9.0f} {m['new_violations']:8d} "
            f"{m['residual_overload_max_percent']:6.2f} {m['residual_voltage_max_pu']:7.4f} "
            f"{str(m['solver_status'])[:9]:>9} {m['load']:>13}"
        )
    lp = [m for m in r["markets"] if m["solve_s"] > 0]
    worst = max(lp, key=lambda m: m["clear_s"] / m["solve_s"], default=None)
    if worst:
        ratio = worst["clear_s"] / worst["solve_s"]
        print(
            f"clear/HiGHS: worst {ratio:.1f}x ({worst['market']}; target <= {RATIO_TARGET:.0f}x: "
            f"{verdict(ratio <= RATIO_TARGET)})"
        )
    print(f"new violations: {new_total} in all (target 0: {verdict(new_total == 0)})")
    for m in r["markets"]:
        for name, what in (
            ("suffice", "where the offers left could remove it at any price (linear)"),
            ("alone", "where the offers not dispatched could remove it alone (linear)"),
            ("missed", "beyond what its model expected (the part not priced as unmet need)"),
        ):
            if f"{name}_rows" in m:
                ok = m[f"{name}_overload_pp"] <= 0.01 and m[f"{name}_voltage_pu"] <= 1e-4
                print(
                    f"{m['market']} residual {what}: {m[f'{name}_rows']} rows, at most "
                    f"{m[f'{name}_overload_pp']:.4f} pp and {m[f'{name}_voltage_pu']:.2e} "
                    f"p.u. (target 0.01 pp and 1e-4 p.u.: {verdict(ok)})"
                )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=["A", "B", "C", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="8 MTUs from 10:00: a smoke run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case process")
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="stop a case beyond it")
    parser.add_argument(
        "--workers",
        type=int,
        default=available_cores(),
        help="processes clearing markets at once (default: one per core, as lfm-zonal run)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args.quick, args.workers)), flush=True)
        return 0
    print(f"bench_scale ({'quick, 8 MTUs' if args.quick else '96 MTUs'}), load {load()}")
    failed = False
    for case in ("A", "B"):
        if args.case in (case, "all"):
            print(f"--- case {case}", flush=True)
            r = run_case(case, args)
            failed |= r is None
            if r:
                report_study(case, r)
    if args.case in ("C", "all"):
        lines = []
        for case, runs in (("C_mv", ("first run", "warm cache")), ("C_1000", ("first", "second"))):
            for run in runs:
                print(f"--- case {case}, {run}", flush=True)
                r = run_case(case, args)
                failed |= r is None
                if r:
                    target = TARGETS[case][0]
                    lines.append(
                        f"{case:<7} {run:<11} main job {r['main_job_s']:6.1f} s (target < "
                        f"{target:.0f} s: {verdict(r['main_job_s'] < target)}), process "
                        f"{r['process_s']:6.1f} s, peak memory {r['peak_rss_gb']:.2f} GB, "
                        f"load {r['load']}"
                    )
        print("\n=== case C: main job (run_scenario into a temporary folder)")
        print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
