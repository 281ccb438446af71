"""Markets and plots in forked worker processes: the same bytes as one process, errors
raised in the parent as one line, a dead worker named."""

from __future__ import annotations

import filecmp
import functools
import hashlib
import logging
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import small_scenario

from lfm_zonal.check.kpis import TIMING_COLUMNS
from lfm_zonal.cli import main
from lfm_zonal.errors import InputError, LfmError
from lfm_zonal.study import job
from lfm_zonal.study.job import market_groups
from lfm_zonal.study.scenario import load_scenario
from lfm_zonal.study.workers import IN_ORDER_AHEAD, forked, in_order


def _children() -> set[str]:
    """This process's child processes (Linux; none known elsewhere)."""
    listing = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    return set(listing.read_text().split()) if listing.exists() else set()


def _scenario(folder: Path) -> Path:
    """The default scenario on 4 MTUs of its evening peak, every market at K = 1, 2, 4."""
    return small_scenario(folder, "1, 2, 4", '"nodal", "zonal", "needs_based"')


def test_forked_tasks_run_in_other_processes_and_come_back_by_index():
    here = os.getpid()
    tasks = [lambda i=i: (i * i, os.getpid()) for i in range(5)]
    with forked(tasks, processes=2) as done:
        results = dict(done)
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert [results[i][0] for i in range(5)] == [0, 1, 4, 9, 16]
    pids = {pid for _, pid in results.values()}
    assert here not in pids and 1 <= len(pids) <= 2
    # processes = 0: here, in list order, as the results are read.
    ran = []
    with forked([lambda i=i: ran.append(i) or os.getpid() for i in range(3)], 0) as done:
        assert ran == []
        assert list(done) == [(0, here), (1, here), (2, here)]
    assert ran == [0, 1, 2]


def test_in_order_gives_the_results_in_the_items_order_within_another_block():
    """The first item takes longest: the results still come in the items' order, made in
    other processes; inside another forked block too (the plots' process while a table's
    text is made)."""
    here = os.getpid()

    def slow_first(i):
        time.sleep(0.3 if i == 0 else 0.0)
        return i * i, os.getpid()

    with forked([lambda: "plot"], processes=1) as drawn:
        results = list(in_order(slow_first, range(5), processes=2))
        assert list(drawn) == [(0, "plot")]
    assert [r for r, _ in results] == [0, 1, 4, 9, 16]
    assert here not in {pid for _, pid in results}
    assert [r for r, _ in in_order(slow_first, [3], processes=2)] == [9]  # one item: here


def test_in_order_runs_only_a_few_calls_ahead_of_its_caller():
    """A slow caller (a table's writer): the processes start at most IN_ORDER_AHEAD calls
    each beyond the results it has taken, not every call at once (their results would all
    wait in memory)."""
    started = multiprocessing.get_context("fork").Value("i", 0)

    def counted(i):
        with started.get_lock():
            started.value += 1
        return i

    ahead = IN_ORDER_AHEAD * 2
    taken = []
    for i in in_order(counted, range(12), processes=2):
        time.sleep(0.05)  # the processes would run on meanwhile
        taken.append(i)
        assert started.value <= ahead + len(taken), (started.value, len(taken))
    assert taken == list(range(12)) and started.value == 12


def test_calls_submitted_after_the_fork_take_their_arguments_along():
    """The first calls fork the processes; a call submitted later carries arguments made
    after the fork (a study's zones) and runs in one of them, numbered in submission
    order; with processes = 0, here, in that order."""
    here = os.getpid()

    def scaled(values, factor):
        return [v * factor for v in values], os.getpid()

    for processes in (2, 0):
        with forked([scaled], processes, calls=[(0, ([1, 2], 10))]) as done:
            later = [3, 4, 5]  # made after the processes were forked
            assert done.submit(0, later, 2) == 1
            results = dict(done)
        assert [results[i][0] for i in (0, 1)] == [[10, 20], [6, 8, 10]]
        pids = {pid for _, pid in results.values()}
        assert (here in pids) == (processes == 0)


def test_a_refusal_while_the_nodal_market_clears_is_one_line_and_no_folder(
    tmp_path, capfd, monkeypatch
):
    """With two workers the nodal market is forked before the segmentation: a refusal there
    (after the zone counts were checked) stops it and is the command's one line, exit 2,
    no folder and no process left behind: the market's warnings are held in its worker and
    written by the command with its results."""

    started, inner = tmp_path / "nodal market started", job.clear_market

    def warn(pf, resources, method, *args, **kwargs):  # the nodal market, in its worker
        logging.getLogger("lfm_zonal.market.strategies").warning("a warning of the market")
        started.touch()
        return inner(pf, resources, method, *args, **kwargs)

    def refuse(*args, **kwargs):
        time.sleep(3)  # the nodal market clears meanwhile, and logs its warning
        raise InputError("segmentation refused for the test")

    monkeypatch.setattr(job, "clear_market", warn)
    monkeypatch.setattr(job, "prepare_segmentation", refuse)
    out = tmp_path / "out"
    before = _children()  # other tests' processes (a Dask cluster) may still be there
    code = main(["run", str(_scenario(tmp_path)), "--out", str(out), "--workers", "2"])
    err = capfd.readouterr().err
    assert code == 2
    assert err == "lfm-zonal: error: segmentation refused for the test\n"
    assert started.exists()  # the nodal market cleared before the refusal
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert _children() <= before  # the nodal market's worker is gone


def test_the_warnings_of_a_worker_are_written_here_in_the_order_of_one_process(
    tmp_path, caplog, monkeypatch
):
    """A market's warnings logged in a worker come to this process's handlers with its
    results: the same lines, in the same order per market, as in one process."""
    inner = job.clear_market

    def warn(pf, resources, method, *args, **kwargs):
        k = kwargs["inputs"].zones.k
        logging.getLogger("lfm_zonal.market.strategies").warning("%s K = %d", method, k)
        return inner(pf, resources, method, *args, **kwargs)

    monkeypatch.setattr(job, "clear_market", warn)
    scenario = load_scenario(str(small_scenario(tmp_path, "1, 2", '"nodal", "zonal"')))
    seen = {}
    for workers in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lfm_zonal"):
            job.run_study(scenario, workers=workers)
        seen[workers] = sorted(r.getMessage() for r in caplog.records if " K = " in r.getMessage())
    assert seen[1] == seen[2] == ["nodal K = 15", "zonal K = 1", "zonal K = 2"]


def test_a_task_error_is_raised_here_and_a_dead_worker_is_named():
    def refuse():
        raise InputError("bids.csv, row 3: price is not a number")

    started = time.monotonic()
    with (
        pytest.raises(InputError, match="row 3"),
        forked([refuse, lambda: time.sleep(60)], 2) as done,
    ):
        list(done)
    assert time.monotonic() - started < 20  # the other task is stopped, not waited for

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(LfmError, match="worker process died"), forked([die], 1) as done:
        list(done)


def test_market_groups_put_the_nodal_market_first_and_keep_each_k_together():
    cases = [("nodal", None), ("zonal", 1), ("zonal", 4), ("needs_based", 1), ("needs_based", 4)]
    assert market_groups(cases) == [[0], [1, 3], [2, 4]]
    assert market_groups(cases, largest_k_first=True) == [[0], [2, 4], [1, 3]]
    assert market_groups(cases[1:]) == [[0, 2], [1, 3]]


def test_two_workers_write_the_bytes_of_one_process(tmp_path):
    """Every market computed from the same inputs alone: the same files, byte for byte, but
    the wall-clock columns of kpis.csv."""
    scenario = _scenario(tmp_path)
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert main(["run", str(scenario), "--out", str(out), "--quiet", "--workers", workers]) == 0
    one, two = tmp_path / "w1", tmp_path / "w2"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert len(files) > 20
    differ = [f for f in files if not filecmp.cmp(one / f, two / f, shallow=False)]
    assert differ == [Path("kpis.csv")]
    a, b = (pd.read_csv(d / "kpis.csv").drop(columns=list(TIMING_COLUMNS)) for d in (one, two))
    pd.testing.assert_frame_equal(a, b)
    assert len(a) == 7  # nodal, zonal and needs-based at three K


def test_a_market_refused_in_a_worker_is_one_line_and_no_folder(tmp_path, capfd, monkeypatch):
    inner = job.clear_market

    def refuse_k2(pf, resources, method, *args, **kwargs):
        if kwargs["inputs"].zones.k == 2:
            raise InputError("zone K = 2: refused for the test")
        return inner(pf, resources, method, *args, **kwargs)

    monkeypatch.setattr(job, "clear_market", refuse_k2)  # inherited by the forked workers
    out = tmp_path / "out"
    code = main(["run", str(_scenario(tmp_path)), "--out", str(out), "--quiet", "--workers", "2"])
    err = capfd.readouterr().err
    assert code == 2
    assert err == "lfm-zonal: error: zone K = 2: refused for the test\n"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("workers", ["-1", "65"])
def test_a_bad_number_of_workers_is_refused(tmp_path, capsys, workers):
    code = main(
        ["run", str(_scenario(tmp_path)), "--out", str(tmp_path / "o"), "--workers", workers]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"--workers {workers}" in err
    assert not (tmp_path / "o").exists()


def test_the_default_number_of_workers_is_one_per_core_up_to_the_cap(tmp_path, monkeypatch):
    """More cores than MAX_MARKET_WORKERS: a plain run takes the cap (it refused itself with
    "--workers None: give a number of processes from 1 to 64")."""
    from lfm_zonal import cli, limits
    from lfm_zonal.study import results

    asked = []

    def stop(scenario, out, **kwargs):
        asked.append(kwargs["workers"])
        raise InputError("stopped for the test")

    monkeypatch.setattr(limits, "available_cores", lambda: 96)
    monkeypatch.setattr(results, "run_scenario", stop)
    assert main(["run", str(_scenario(tmp_path)), "--out", str(tmp_path / "o")]) == 2
    assert asked == [cli.MAX_MARKET_WORKERS]


def _parent(tmp_path: Path, body: str) -> subprocess.Popen:
    path = tmp_path / "parent.py"
    path.write_text(textwrap.dedent(body))
    return subprocess.Popen(
        [sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_no_worker_outlives_a_killed_command(tmp_path):
    """A command killed outright (SIGKILL, the OOM killer) leaves no worker behind: one would
    hold the output's lock, the study's memory and the pipes of whoever waits for the command
    (bench_scale's stopped cases)."""
    p = _parent(
        tmp_path,
        """
        import time
        from lfm_zonal.study.workers import forked
        with forked([lambda: time.sleep(60)] * 2, 2) as done:
            print("forked", flush=True)
            list(done)
        """,
    )
    assert p.stdout.readline() == "forked\n"
    time.sleep(0.5)
    p.kill()
    p.wait()
    ready, _, _ = select.select([p.stdout], [], [], 20)
    assert ready and p.stdout.read() == ""  # end of file: no process holds the pipe


def test_a_worker_dying_while_sending_its_result_is_named(tmp_path):
    """A worker killed halfway through sending its result (out of memory while a large
    result goes out) is the error line of a dead worker, not a command waiting forever."""
    p = _parent(
        tmp_path,
        """
        import os, signal, struct, time
        import concurrent.futures.process as pool_module
        from lfm_zonal.errors import LfmError
        from lfm_zonal.study.workers import forked

        def half_sent():
            def send(result_queue, *args, **kwargs):
                result_queue._writer._send(struct.pack("!i", 1000) + b"x" * 10)
                os.kill(os.getpid(), signal.SIGKILL)
            pool_module._sendback_result = send  # in this worker only
            return 1

        try:
            with forked([half_sent, lambda: time.sleep(1)], 2) as done:
                list(done)
        except LfmError as exc:
            print(exc, flush=True)
        """,
    )
    try:
        out, _ = p.communicate(timeout=30)
    finally:
        p.kill()
    assert "a worker process died" in out, out


def test_run_study_and_write_results_from_python_write_the_zones_folder_too(tmp_path):
    """The Python API's two steps give the folder of the command line, zones included (the
    command writes them while its markets clear)."""
    from lfm_zonal.study.results import write_results
    from lfm_zonal.study.scenario import load_scenario

    study = job.run_study(load_scenario(_scenario(tmp_path)), workers=2)
    (tmp_path / "api").mkdir()
    write_results(study, tmp_path / "api", workers=2)
    assert main(["run", str(_scenario(tmp_path)), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    api, cli = tmp_path / "api", tmp_path / "cli"
    for name in ("zones/zones.csv", "zones/zone_errors.csv", "zones/error_curve.csv"):
        assert filecmp.cmp(api / name, cli / name, shallow=False), name
    assert [z.k for z in study.zone_sets] == [1, 2, 4]


def test_the_study_linearises_each_base_point_once_for_every_worker(tmp_path, monkeypatch):
    """A study keeps the base points of the MTUs it clears (``LinearisationCache.keep``)
    before forking its market workers: each is linearised once, in this process, however
    few the cache's least-recently-used budget holds (none here), and no worker linearises
    one again."""
    from lfm_zonal.grid import sensitivity as sens
    from lfm_zonal.market.clearing import mtus_to_clear

    made = tmp_path / "linearised.txt"
    original = sens._linearise

    def point(V) -> str:
        return hashlib.sha256(np.ascontiguousarray(V).tobytes()).hexdigest()

    def counting(model, V):
        with made.open("a") as f:  # one short line per write: whole lines from every process
            f.write(f"{os.getpid()} {point(V)}\n")
        return original(model, V)

    monkeypatch.setattr(sens, "_linearise", counting)
    monkeypatch.setattr(
        job, "LinearisationCache", functools.partial(sens.LinearisationCache, budget_bytes=0)
    )
    study = job.run_study(load_scenario(_scenario(tmp_path)), workers=2)
    pf = study.base.powerflow
    base = sorted(point(pf.V[t]) for t in mtus_to_clear(pf))
    lines = [line.split() for line in made.read_text().splitlines()]
    at_base = [(pid, h) for pid, h in lines if h in base]
    assert base and sorted(h for _, h in at_base) == base  # each once
    assert {pid for pid, _ in at_base} == {str(os.getpid())}
    assert len({pid for pid, _ in lines}) > 1  # the workers linearised their own points


def test_a_refused_zone_count_is_refused_before_the_study_linearises_anything(
    tmp_path, monkeypatch
):
    """The zone counts are checked before the study keeps its base points (``plan_zones``):
    a K beyond the grid's buses is refused in one line with nothing linearised."""
    from lfm_zonal.grid import sensitivity as sens

    made = []
    original = sens._linearise
    monkeypatch.setattr(sens, "_linearise", lambda model, V: made.append(1) or original(model, V))
    scenario = load_scenario(small_scenario(tmp_path, "1, 999", '"nodal", "zonal"'))
    with pytest.raises(InputError, match="999"):
        job.run_study(scenario, workers=2)
    assert made == []
