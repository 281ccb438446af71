"""Sweeps: a tidy table over days x zone counts x seeds, resumable, the same on Dask as serial."""

from __future__ import annotations

import pandas as pd
import pytest

from lfm_zonal import InputError
from lfm_zonal.files.outputs import MARKER, MARKER_TEXT, partial_path
from lfm_zonal.study.scenario import Scenario, load_scenario, validate_values
from lfm_zonal.study.sweep import _remove_partials, run_sweep

DAYS = ["2016-01-13", "2016-01-14"]


@pytest.fixture(scope="module")
def short_scenario() -> Scenario:
    """The default scenario on the two evening hours around its peak."""
    base = load_scenario("cigre_mv_evening_peak")
    values = {s: dict(v) for s, v in base.values.items()}
    values["horizon"] |= {"start": "2016-01-14 17:00", "n_mtu": 8}
    return Scenario(base.path, validate_values(values, base.path))


def test_an_interrupted_sweep_resumes_without_recomputing(short_scenario, tmp_path, monkeypatch):
    done: list[str] = []

    def interrupt_after_first(path: str) -> None:
        done.append(path)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(
            short_scenario, DAYS, [1, 3], [0], tmp_path, workers=0,
            methods=["nodal", "zonal"], on_case=interrupt_after_first,
        )  # fmt: skip
    assert not (tmp_path / "sweep.csv").exists()  # nothing that looks complete
    first = tmp_path / "cases" / "2016-01-13_seed0.csv"
    stamp = first.stat().st_mtime_ns
    recomputed: list[str] = []
    table = run_sweep(
        short_scenario, DAYS, [1, 3], [0], tmp_path, workers=0,
        methods=["nodal", "zonal"], on_case=recomputed.append,
    )  # fmt: skip
    assert [p.rsplit("/", 1)[-1] for p in recomputed] == ["2016-01-14_seed0.csv"]
    assert first.stat().st_mtime_ns == stamp
    assert len(table) == 2 * 3  # per day: nodal, zonal K=1, zonal K=3
    assert set(table.day) == set(DAYS) and set(table.k) == {1, 3, 15}
    # Every row is a real market: zonal K = 1 never beats the nodal cost on the same day.
    cost = table.set_index(["day", "method", "k"]).cost_eur
    for day in DAYS:
        assert cost[(day, "zonal", 1)] >= cost[(day, "nodal", 15)] - 1e-6
    # A larger sweep in the same folder only runs what is new: K = 5 of both days, no other
    # market (each case file keeps its rows and gains the new ones).
    recomputed.clear()
    before = first.read_text().splitlines()
    ran = []
    from lfm_zonal.study import job

    study = job.run_study

    def spy(scenario, *args, **kwargs):
        ran.append((scenario["market"]["methods"], scenario["zones"]["k"]))
        return study(scenario, *args, **kwargs)

    monkeypatch.setattr(job, "run_study", spy)
    larger = run_sweep(
        short_scenario, DAYS, [1, 3, 5], [0], tmp_path, workers=0,
        methods=["nodal", "zonal"], on_case=recomputed.append,
    )  # fmt: skip
    assert len(recomputed) == 2 and ran == [(["zonal"], [5])] * 2
    assert first.read_text().splitlines()[: len(before)] == before
    # The same table as a sweep of K = 1, 3, 5 from scratch.
    monkeypatch.undo()
    fresh = run_sweep(
        short_scenario, DAYS, [1, 3, 5], [0], tmp_path / "fresh", workers=0,
        methods=["nodal", "zonal"],
    )  # fmt: skip
    pd.testing.assert_frame_equal(larger, fresh)


def test_a_case_run_before_runs_the_markets_it_misses_only():
    """The nodal market where its row is missing; every method at each zone count that one
    of them misses (both share the zones and the bids of that K)."""
    from lfm_zonal.study.sweep import _still_to_run

    held = pd.DataFrame({"method": ["nodal", "zonal", "needs_based"], "k": [15, 2, 2]})
    methods = ["nodal", "zonal", "needs_based"]
    assert _still_to_run(None, [2, 4], methods) == ([2, 4], methods)
    assert _still_to_run(held, [2, 4], methods) == ([4], ["zonal", "needs_based"])
    assert _still_to_run(held[1:], [2], methods) == ([2], ["nodal"])
    assert _still_to_run(held[:2], [2, 4], methods) == ([2, 4], ["zonal", "needs_based"])


@pytest.mark.slow
def test_dask_workers_give_the_same_table_as_one_process(short_scenario, tmp_path):
    serial = run_sweep(short_scenario, DAYS, [2], [0, 1], tmp_path / "a", workers=0)
    parallel = run_sweep(short_scenario, DAYS, [2], [0, 1], tmp_path / "b", workers=2)
    assert (tmp_path / "a" / "sweep.csv").read_bytes() == (
        tmp_path / "b" / "sweep.csv"
    ).read_bytes()
    assert len(parallel) == len(serial) == 2 * 2 * 3  # days x seeds x (nodal, zonal, needs)
    assert set(pd.unique(parallel.seed)) == {0, 1}


def test_what_a_case_would_refuse_is_refused_before_any_case_runs(
    short_scenario, tmp_path, monkeypatch
):
    """A day the profile data do not cover (beyond SimBench's year, or missing from a
    profiles CSV between two it has) or a zone count beyond the grid: one error naming it,
    before any case runs, and no folder (the cases before it ran and stayed, half a sweep,
    and the Dask worker that met it printed its traceback)."""
    from lfm_zonal.study import sweep

    def no_case(*args, **kwargs):
        raise AssertionError("a case ran")

    monkeypatch.setattr(sweep, "run_case", no_case)
    lv = load_scenario("simbench_lv_pv_noon")
    with pytest.raises(InputError, match="sweep day 2017-01-01: horizon .* outside the SimBench"):
        run_sweep(lv, ["2016-12-31", "2017-01-01"], [2], [0], tmp_path / "a", workers=0)
    csv = tmp_path / "profiles.csv"
    covered = ["2016-01-13", "2016-01-15"]  # and not the day between
    times = [f"{day} {17 + q // 4}:{15 * (q % 4):02d}" for day in covered for q in range(8)]
    csv.write_text("time,load_1_p_mw\n" + "".join(f"{t},1.0\n" for t in times))
    values = {section: dict(keys) for section, keys in short_scenario.values.items()}
    values["profiles"] |= {"csv": str(csv)}
    with_csv = Scenario(short_scenario.path, validate_values(values, short_scenario.path))
    days = ["2016-01-15", "2016-01-14", "2016-01-13"]
    with pytest.raises(InputError, match="sweep day 2016-01-14: .*profiles.csv: horizon 2016-01"):
        run_sweep(with_csv, days, [2], [0], tmp_path / "b", workers=0)
    with pytest.raises(InputError, match="'zones.k' = 99 is out of range: the grid has 15"):
        run_sweep(short_scenario, DAYS, [2, 99], [0], tmp_path / "c", workers=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profiles.csv"]


def test_a_folder_of_another_sweep_is_refused(short_scenario, tmp_path):
    run_sweep(short_scenario, DAYS[:1], [1], [0], tmp_path, workers=0, methods=["zonal"])
    with pytest.raises(InputError, match="holds a sweep of another scenario"):
        run_sweep(short_scenario, DAYS[:1], [1], [0], tmp_path, workers=0, methods=["nodal"])


def test_a_results_folder_of_another_command_is_refused_untouched(short_scenario, tmp_path):
    """A folder lfm-zonal wrote (its marker) that holds no sweep (a ``run`` or ``zones``
    results folder) is not a sweep to resume: refused, and nothing in it changes."""
    (tmp_path / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    (tmp_path / "kpis.csv").write_text("method,k\n", encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError, match="exists and is not empty .no sweep.json in it"):
        run_sweep(short_scenario, DAYS[:1], [1], [0], tmp_path, workers=0, methods=["zonal"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_leftovers_of_a_killed_sweep_are_recognised(tmp_path):
    """The one atomic writer's partial files, and those of earlier versions, are removed by
    the next sweep on the folder; finished files stay."""
    cases = tmp_path / "cases"
    cases.mkdir()
    kept = [tmp_path / "sweep.json", tmp_path / "sweep.csv", cases / "2016-01-13_seed0.csv"]
    left = [
        partial_path(tmp_path / "sweep.csv"),
        partial_path(cases / "2016-01-14_seed0.csv"),
        tmp_path / "sweep.csv.partial",
        tmp_path / "sweep.json.partial-12",
        cases / "2016-01-14_seed0.partial-12",
    ]
    for path in kept + left:
        path.write_text("x")
    _remove_partials(tmp_path)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


@pytest.mark.parametrize("sharing", [1, 3])
def test_a_case_gets_its_share_of_the_memory_budget(short_scenario, tmp_path, monkeypatch, sharing):
    """A case in one of N local Dask workers (``run_case``'s ``sharing``) sizes its requests
    against a Nth of the budget, as a market worker of ``run --workers N`` does."""
    from lfm_zonal import limits
    from lfm_zonal.study import job, sweep

    monkeypatch.setenv(limits.MEMORY_ENV, "6")
    monkeypatch.setattr(limits, "_sharing", 2)  # as an earlier case in this process left it
    seen = []

    def budget_then_stop(scenario):
        seen.append(limits.memory_budget_bytes()[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run_study", budget_then_stop)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_case(short_scenario, DAYS[0], 0, [1], ["zonal"], str(tmp_path), sharing)
    assert seen == [6 * limits.GIB / sharing]


def test_a_solver_failure_names_its_case_and_market(short_scenario, tmp_path, monkeypatch):
    """An LP HiGHS does not solve stops the sweep with one line naming the case (day and
    seed) and the market; a sweep that finished no case leaves no folder."""
    from lfm_zonal import SolverError
    from lfm_zonal.market.lp import SolveStatus
    from lfm_zonal.market.strategies import ClearingModel

    monkeypatch.setattr(ClearingModel, "_run", lambda self: SolveStatus.INFEASIBLE)
    with pytest.raises(SolverError) as err:
        run_sweep(short_scenario, DAYS[:1], [2], [0], tmp_path / "a", workers=0)
    assert str(err.value) == (
        "case 2016-01-13_seed0: nodal market: DSO-needs LP: solver status Infeasible"
    )
    assert not (tmp_path / "a").exists()


def test_days_of_synthetic_profiles_are_said_to_be_alike(short_scenario, tmp_path, caplog):
    """A built-in feeder's synthetic profiles are one daily shape whatever the date: a sweep
    over its days gives the same rows every day, and says so before it runs."""
    import logging

    with caplog.at_level(logging.WARNING, logger="lfm_zonal"):
        table = run_sweep(short_scenario, DAYS, [2], [0], tmp_path / "a", workers=0)
    said = [r.getMessage() for r in caplog.records if "synthetic profiles" in r.getMessage()]
    assert len(said) == 1 and "the 2 days give the same results" in said[0]
    kpis = table.drop(columns=["day"]).groupby(table.day)
    first, second = (part.reset_index(drop=True) for _, part in kpis)
    pd.testing.assert_frame_equal(first, second)  # what the warning says
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lfm_zonal"):
        run_sweep(short_scenario, DAYS[:1], [2], [0], tmp_path / "b", workers=0)
    assert not [r for r in caplog.records if "synthetic profiles" in r.getMessage()]
