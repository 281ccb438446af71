"""Requests beyond the machine are refused before any allocation; every sampler ends."""

from __future__ import annotations

import contextlib
import math
import signal
import time

import numpy as np
import pytest

from lfm_zonal import InputError, limits
from lfm_zonal.market.resources import _costs
from lfm_zonal.tender import sizing as T
from lfm_zonal.tender.congestion import congestion_needs

TABLE_I = T.TenderParameters()


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# ----------------------------------------------------------------------------- require_memory


def test_memory_estimate_passes_small_and_names_dimensions_when_refused(monkeypatch):
    monkeypatch.delenv(limits.MEMORY_ENV, raising=False)
    small = [[(96, "MTUs"), (150, "branches"), (10, "areas"), (4, "arrays")]]
    assert limits.require_memory("main job", small) == 96 * 150 * 10 * 4 * 8
    huge = [[(35040, "MTUs"), (1e6, "branches"), (1000, "areas"), (4, "arrays")]]
    with pytest.raises(InputError) as info:
        limits.require_memory("main job", huge)
    text = one_line(info)
    assert text.startswith("main job: this request needs about ")
    assert "(35040 MTUs x 1000000 branches x 1000 areas x 4 arrays x 8 bytes)" in text
    assert "the machine has" in text and "GiB available" in text


def test_memory_budget_override_and_unbounded_counts(monkeypatch):
    monkeypatch.setenv(limits.MEMORY_ENV, "0.001")  # 1 MiB
    with pytest.raises(InputError, match=r"about 0.00745 GiB .*the budget is 0.001 GiB"):
        limits.require_memory("x", [[(1e6, "items")]])
    monkeypatch.setenv(limits.MEMORY_ENV, "1")
    with pytest.raises(InputError, match="needs unbounded memory"):
        limits.require_memory("x", [[(math.inf, "offers")], [(3, "nodes")]])
    monkeypatch.setenv(limits.MEMORY_ENV, "lots")
    with pytest.raises(InputError, match=limits.MEMORY_ENV):
        limits.require_memory("x", [[(1, "item")]])
    monkeypatch.delenv(limits.MEMORY_ENV)
    assert 0 < limits.available_memory_bytes() < math.inf


# ----------------------------------------------------------------------------- samplers


def redraw_loop(rng, mean, std, low, high, n):
    """The former unbounded sampler: the stream truncated_normal keeps where it can."""
    x = rng.normal(mean, std, n)
    out = (x < low) | (x > high)
    while out.any():
        x[out] = rng.normal(mean, std, int(out.sum()))
        out = (x < low) | (x > high)
    return x


@pytest.mark.parametrize("mean, std", [(54_000, 12_000), (450, 100), (30_000, 60_000)])
def test_truncated_normal_keeps_the_redraw_stream(mean, std):
    for seed in range(20):
        a = redraw_loop(np.random.default_rng(seed), mean, std, 0.0, 60_000.0, 25)
        b = limits.truncated_normal(np.random.default_rng(seed), mean, std, 0.0, 60_000.0, 25)
        assert np.array_equal(a, b)


@pytest.mark.parametrize("std", [10 * 60_000, 1e9 * 60_000, 1e300, math.inf])
def test_truncated_normal_ends_for_any_spread(std):
    rng = np.random.default_rng(0)
    with deadline(5):
        x = limits.truncated_normal(rng, 54_000.0, std, 0.0, 60_000.0, 10_000)
    assert ((x >= 0) & (x <= 60_000)).all()
    # The window is a sliver of the spread: the draws are close to uniform on it.
    assert abs(x.mean() - 30_000) < 1_500


def test_truncated_normal_far_tail_and_degenerate_cases():
    rng = np.random.default_rng(0)
    with deadline(5):
        tail = limits.truncated_normal(rng, 0.0, 0.01, 1.0, math.inf, 1000)  # 100 deviations
    assert (tail >= 1.0).all() and tail.max() < 1.01
    assert (limits.truncated_normal(rng, 5.0, 0.0, 0.0, 1.0, 3) == 1.0).all()
    with pytest.raises(InputError):
        limits.truncated_normal(rng, math.nan, 1.0, 0.0, 1.0, 3)
    with pytest.raises(InputError):
        limits.truncated_normal(rng, 0.0, math.inf, 0.0, math.inf, 3)


def test_tender_prices_bounded_for_the_largest_spread():
    params = TABLE_I.replace(p_av_std_ratio=10.0, p_act_std_ratio=10.0)
    with deadline(5):
        av, act = T.price_draws(params, 100_000, np.random.default_rng(0))
    assert ((av >= 0) & (av <= params.p_av_cap_eur_per_mw_year)).all()
    assert ((act >= 0) & (act <= params.p_act_cap_eur_per_mwh)).all()
    for ratio in (1e6, 1e300):  # beyond the parameter bounds: the sampler itself still ends
        with deadline(5):
            x = T._truncated_normal(np.random.default_rng(0), 500.0, 0.9, ratio, 1000, "resample")
        assert ((x >= 0) & (x <= 500)).all()


def test_resource_costs_bounded_and_at_least_one_euro():
    with deadline(10):
        far = _costs(np.random.default_rng(0), (0.001, 1e-6), 10_000)  # 1e6 deviations away
        wide = _costs(np.random.default_rng(0), (50.0, 1e12), 10_000)
    assert (far == 1.0).all() and (wide >= 1.0).all()
    assert (_costs(np.random.default_rng(0), (0.5, 0.0), 3) == 1.0).all()


def test_student_t_at_the_normal_limit_is_finite():
    params = TABLE_I.replace(kurtosis=3.0000000000000004)
    z = T.standardised_samples(params, np.random.default_rng(0))
    assert np.isfinite(z).all() and abs(z.std() - 1) < 0.05


# ----------------------------------------------------------------------------- tender requests


BAD_REQUESTS = [
    (
        "points_per_offer",
        dict(study="temporal", n_mtu=(35_136,), params={"points_per_offer": 1000}),
        "MTUs x 25 offers per node",
    ),
    (
        "small bids, many points",
        dict(
            study="spatial",
            n_nodes=(2, 200),
            params={"bid_size_ratio": 0.0075, "points_per_offer": 100},
        ),
        "200 nodes x 1000 offers per node x 100 points per offer x 12 arrays",
    ),
    ("many nodes", dict(study="spatial", n_nodes=(10**5,)), "100000 nodes x 25 offers"),
    (
        "sigma_mu nan",
        dict(study="temporal", sigma_mu_mw=(0, math.nan)),
        "sigma_mu (--sigma-mu) must be finite",
    ),
    (
        "sigma_mu inf",
        dict(study="temporal", sigma_mu_mw=(math.inf,)),
        "sigma_mu (--sigma-mu) must be finite",
    ),
    ("negative sigma_mu", dict(study="temporal", sigma_mu_mw=(-1,)), ">= 0, got -1"),
    (
        "zero MTUs",
        dict(study="temporal", n_mtu=(0,)),
        "n_mtu (--n-mtu) must be finite and whole",
    ),
    ("gini nan", dict(study="spatial", gini=(math.nan,)), "gini (--gini) must be finite"),
    ("gini 1.5", dict(study="spatial", gini=(0.1, 1.5)), "in [0, 1), got 1.5"),
    ("half a node", dict(study="spatial", n_nodes=(2.5,)), "whole and >= 1, got 2.5"),
    ("no seed", dict(seeds=()), "at least one seed"),
    ("a billion seeds", dict(seeds=range(10**9)), "1000000000 asked"),
    ("a billion MTU counts", dict(study="temporal", n_mtu=range(1, 10**9)), "at most 100000"),
    # beyond a leap year of quarter hours (as a scenario's horizon), or a million seeds:
    # hours of drawing without a word, now refused at once
    ("a year and a day", dict(study="temporal", n_mtu=(35_137,)), "in [1, 35137), got 35137"),
    ("a million seeds", dict(seeds=range(10**6)), "seeds (--seeds): 1000000 asked; at most"),
    ("unknown study", dict(study="both"), "unknown tender study"),
]


@pytest.mark.parametrize("case, request_, message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_tender_request_is_one_line_before_any_output(
    tmp_path, monkeypatch, case, request_, message
):
    monkeypatch.setenv(limits.MEMORY_ENV, "1")
    request_ = dict(request_)
    params = TABLE_I.replace(**request_.pop("params", {}))
    study = request_.pop("study", "all")
    with deadline(5), pytest.raises(InputError) as info:
        T.run_tender_studies(params, study, tmp_path, **request_)
    assert message in one_line(info)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_the_studies_refuse_on_their_own(monkeypatch):
    monkeypatch.setenv(limits.MEMORY_ENV, "1")
    with deadline(5):
        with pytest.raises(InputError, match=r"sigma_mu \(--sigma-mu\) must be finite"):
            T.temporal_study(TABLE_I, (math.nan,), (2,), (0,))
        with pytest.raises(InputError, match=r"gini \(--gini\) must be finite"):
            T.spatial_study(TABLE_I, (math.nan,), (2,), (0,))
        with pytest.raises(InputError, match="GiB"):
            T.temporal_study(TABLE_I.replace(points_per_offer=1000), (0,), (35_136,), (0,))


def test_grid_forecast_error_must_be_finite():
    for bad in (math.inf, math.nan, -0.1, 1e300):
        with pytest.raises(InputError, match="forecast error must be within"):
            congestion_needs(None, None, bad)


@pytest.mark.parametrize(
    "gini, n_nodes", [((0.1,), (2,)), ((0.0, 0.2, 0.4), (4,)), ((0.2,), (2, 3, 5))]
)
def test_single_gini_or_node_count_runs_and_plots(tmp_path, gini, n_nodes):
    tables = T.run_tender_studies(
        TABLE_I, "spatial", tmp_path, gini=gini, n_nodes=n_nodes, seeds=(0,)
    )
    assert len(tables["spatial_summary"]) == len(gini) * len(n_nodes)
    assert (tmp_path / "spatial.png").stat().st_size > 10_000


def test_cost_curve_plot_ignores_non_finite_costs(tmp_path):
    import pandas as pd

    from lfm_zonal.report.plots import plot_tender_cost_curve

    curve = pd.DataFrame(
        {
            "q_mw": [0.0, 1.0, 2.0],
            "availability_eur_per_h": [0.0, 1.0, 2.0],
            "activation_eur_per_h": [0.0, 1.0, math.nan],
            "unmet_eur_per_h": [math.inf, 5.0, 1.0],
            "cost_eur_per_h": [math.inf, 7.0, math.nan],
        }
    )
    rules = pd.DataFrame({"rule": ["x"], "q_mw": [1.0], "cost_eur_per_h": [7.0]})
    plot_tender_cost_curve(curve, rules, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").is_file()


def test_shipped_parameters_take_well_under_the_budget():
    started = time.perf_counter()
    for name in T.parameter_sets():
        needed = T.check_tender_request(
            T.load_parameters(name),
            "all",
            sigma_mu_mw=range(11),
            n_mtu=range(2, 21),
            gini=T.SPATIAL_GINI,
            n_nodes=range(2, 21),
            seeds=range(5),
        )
        assert needed < 50 * 2**20  # 50 MiB
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize(
    "files, cores",
    [
        ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no quota
        ({"cpu.max": "200000 100000\n"}, 2.0),  # docker --cpus 2
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({}, None),  # no cgroup files
    ],
)
def test_cgroup_cpu_quota_read_from_v2_or_v1_files(tmp_path, monkeypatch, files, cores):
    """A container's CPU quota bounds the cores the commands use (one market worker per
    core): read from cgroup v2 or v1, none where there is no quota; rounded up, never 0."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert limits.cgroup_cpu_quota(str(tmp_path)) == cores
    monkeypatch.setattr(limits, "CGROUP_ROOT", str(tmp_path))
    monkeypatch.setattr(limits.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    expected = 64 if cores is None else max(1, math.ceil(cores))
    assert limits.available_cores() == expected


def test_worker_processes_share_the_memory_budget(monkeypatch):
    """A request in one of N worker processes gets a Nth of the budget (the others may hold
    theirs at once): accepted alone, refused when shared, the message says so; and the
    forked workers of a command are set up with their number."""
    from lfm_zonal.study.workers import forked

    monkeypatch.setenv(limits.MEMORY_ENV, "8")
    three_gib = [[(3 * 2**30 / 8, "items")]]
    assert limits.require_memory("request", three_gib) == 3 * 2**30
    monkeypatch.setattr(limits, "_sharing", 1)
    limits.share_memory(4)
    assert limits.memory_budget_bytes() == (2 * limits.GIB, 2 * limits.GIB)
    with pytest.raises(InputError, match="for each of 4 worker processes"):
        limits.require_memory("request", three_gib)
    limits.share_memory(1)
    with forked([limits.memory_budget_bytes], 2, [(0, ()), (0, ())]) as done:
        budgets = [budget for _, (budget, _) in done]
    assert budgets == [4 * limits.GIB, 4 * limits.GIB]
    assert limits.memory_budget_bytes()[0] == 8 * limits.GIB  # this process: all of it


def _cgroup_tree(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_tightest_cgroup_limit_on_the_way_to_the_root_counts(tmp_path):
    """A batch job's or systemd unit's limits sit in the process's own cgroup, below the
    hierarchy's root (which a container sees as its own): the smallest quota and memory
    room from the process's cgroup up to the root, v2 and v1 alike; folders that do not
    exist (a container without its own cgroup namespace) are skipped."""
    v2 = "0::/slurm/job_7/step_0\n"
    _cgroup_tree(tmp_path, {
        "cpu.max": "max 100000\n",
        "slurm/cpu.max": "800000 100000\n",
        "slurm/job_7/cpu.max": "300000 100000\n",  # the job: 3 cores
        "slurm/job_7/step_0/cpu.max": "max 100000\n",
        "memory.max": "max\n", "memory.current": "9000000000\n",
        "slurm/job_7/memory.max": "4000000000\n", "slurm/job_7/memory.current": "1500000000\n",
        "slurm/job_7/step_0/memory.max": "max\n", "slurm/job_7/step_0/memory.current": "1\n",
    })  # fmt: skip
    assert limits.cgroup_cpu_quota(str(tmp_path), v2) == 3.0
    assert limits.cgroup_memory_room(str(tmp_path), v2) == 2_500_000_000
    # The same process seen from its own cgroup namespace: "/" is the root, no limit there.
    assert limits.cgroup_cpu_quota(str(tmp_path), "0::/\n") is None
    assert limits.cgroup_memory_room(str(tmp_path), "0::/\n") is None
    # cgroup v1: a hierarchy per controller; a path that does not exist here is skipped.
    v1 = tmp_path / "v1"
    _cgroup_tree(v1, {
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
        "cpu/batch/cpu.cfs_quota_us": "150000\n", "cpu/batch/cpu.cfs_period_us": "100000\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n",
        "memory/memory.usage_in_bytes": "5\n",
        "memory/batch/memory.limit_in_bytes": "2000000000\n",
        "memory/batch/memory.usage_in_bytes": "500000000\n",
    })  # fmt: skip
    own = "4:memory:/batch/gone\n2:cpu,cpuacct:/batch\n0::/\n"
    assert limits.cgroup_cpu_quota(str(v1), own) == 1.5
    assert limits.cgroup_memory_room(str(v1), own) == 1_500_000_000
    assert limits.cgroup_cpu_quota(str(v1), "") is None  # no /proc line: the root only
