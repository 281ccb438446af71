"""Sweeps for researchers: many days x zone counts x seeds of one scenario into one tidy table.

A **case** is one day and one seed of the scenario: its base case, resources and
segmentation are shared by every zone count, so a case clears the nodal market once
and every market method at every K. Cases run in parallel on Dask (a local cluster
of one process per core by default, or an existing scheduler given by address), each
writing ``cases/<day>_seed<seed>.csv`` atomically when it finishes. A sweep is
resumable: a case whose file holds every requested (method, K) row is not run
again, so an interrupted sweep picks up where it stopped. ``sweep.csv`` (the tidy
table: day, seed, method, k, KPIs) is written when every case is done.

Wall-clock timing columns are left out of the table, so the same sweep gives the
same bytes; ``timings.csv`` has them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from lfm_zonal.errors import InputError, LfmError, SolverError
from lfm_zonal.files.outputs import (
    MARKER,
    MARKER_TEXT,
    atomic_file,
    claim_output,
    json_text,
    write_csv,
)
from lfm_zonal.limits import available_cores, share_memory
from lfm_zonal.study.scenario import Scenario, validate_values

log = logging.getLogger(__name__)

CASES = "cases"
MANIFEST = "sweep.json"
WORKERS_PER_CORE = 4  # more local worker processes than this is refused
SCHEDULER_TIMEOUT_S = 5  # an unreachable scheduler is reported after this
#: A partial file: ``.NAME.partial-<pid>`` (files.outputs.atomic_file), or ``NAME.partial``
#: and ``NAME.partial-<pid>`` left by earlier versions.
_PARTIAL = re.compile(r"\.partial(-\d+)?$")


def case_scenario(scenario: Scenario, day: str, seed: int, ks, methods) -> Scenario:
    """The scenario moved to ``day`` (same time of day) with ``seed``, zone counts and methods."""
    values = {section: dict(keys) for section, keys in scenario.values.items()}
    try:
        start = pd.Timestamp(values["horizon"]["start"])
        day_start = pd.Timestamp(day)
    except ValueError as exc:
        raise InputError(f"sweep day '{day}': not a date ({exc})") from None
    values["horizon"]["start"] = str(day_start.normalize() + (start - start.normalize()))
    values[""]["seed"] = int(seed)
    values["zones"]["k"] = [int(k) for k in ks]
    values["market"]["methods"] = list(methods)
    return Scenario(
        f"{scenario.path} [{day}, seed {seed}]",
        validate_values(values, scenario.path),
        scenario.flags,
    )


def case_name(day: str, seed: int) -> str:
    return f"{pd.Timestamp(day):%Y-%m-%d}_seed{seed}"


def expected_rows(ks, methods) -> set[tuple[str, int]]:
    """(method, k) rows a finished case holds (nodal once, with k = number of buses)."""
    return {(m, int(k)) for m in methods if m != "nodal" for k in ks}


def run_case(
    scenario: Scenario, day: str, seed: int, ks, methods, folder: str, sharing: int = 1
) -> str:
    """Run one case and write its rows (atomically); returns the case file's path.
    ``sharing``: processes of this machine that may each run a case at once (the local
    Dask workers): the case's memory requests get their share of the budget
    (``limits.share_memory``), refused with an estimate rather than killed by the system."""
    import warnings

    from lfm_zonal.study.job import run_study

    share_memory(sharing)
    warnings.filterwarnings("ignore")
    path = Path(folder) / CASES / f"{case_name(day, seed)}.csv"
    held = pd.read_csv(path) if path.is_file() else None
    ks, methods = _still_to_run(held, ks, methods)
    try:
        study = run_study(case_scenario(scenario, day, seed, ks, methods))
    except SolverError as exc:  # which case: the day and seed (the market is named)
        raise SolverError(f"case {case_name(day, seed)}: {exc}") from None
    kpis = study.kpis()
    rows = kpis.assign(day=f"{pd.Timestamp(day):%Y-%m-%d}", seed=seed)
    rows = rows[["day", "seed", *kpis.columns]]
    if held is not None:  # the markets run before, then the new ones (collect sorts them)
        ran = {(m, int(k)) for m, k in zip(rows.method, rows.k, strict=True)}
        before = [(m, int(k)) not in ran for m, k in zip(held.method, held.k, strict=True)]
        rows = pd.concat([held[before], rows], ignore_index=True)
    with atomic_file(path) as partial:
        write_csv(rows, partial, index=False)
    return str(path)


def _still_to_run(held: pd.DataFrame | None, ks, methods) -> tuple[list[int], list[str]]:
    """The zone counts and methods a case still needs, its file holding ``held`` (the rows
    of an earlier sweep in this folder with fewer zone counts; None: none): the
    nodal market if it is not there, and the markets of every zone count one of them
    misses. Each market depends on its own inputs only, so its row is the one a run of
    them all gives (the timing columns aside)."""
    if held is None:
        return list(ks), list(methods)
    have = {(m, int(k)) for m, k in zip(held.method, held.k, strict=True)}
    zonal = [m for m in methods if m != "nodal"]
    missing = [k for k in ks if any((m, int(k)) not in have for m in zonal)]
    run = zonal if missing else []
    if "nodal" in methods and not held.method.eq("nodal").any():
        run.insert(0, "nodal")
    return (missing or list(ks)), run


def finished(path: Path, ks, methods) -> bool:
    """A case file that holds every requested row (no market still to run)."""
    return path.is_file() and not _still_to_run(pd.read_csv(path), ks, methods)[1]


def run_sweep(
    scenario: Scenario,
    days,
    ks,
    seeds,
    out: str | Path,
    *,
    methods=None,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = False,
    on_case: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Run every (day, seed) case not yet finished in ``out``; write and return sweep.csv.

    ``workers``: local Dask worker processes (default: one per core; 0 runs the cases
    one after the other in this process, without Dask). ``scheduler``: address of an
    existing Dask scheduler (then ``workers`` is ignored).
    """
    methods = list(methods or scenario["market"]["methods"])
    days = [f"{pd.Timestamp(d):%Y-%m-%d}" for d in _dates(days)]
    ks, seeds = [int(k) for k in ks], [int(s) for s in seeds]
    if not days or not ks or not seeds:
        raise InputError("a sweep needs at least one day, one zone count and one seed")
    # Every argument is checked before anything is written: a refused sweep leaves nothing.
    check_workers(workers)
    if scheduler is not None:
        check_scheduler(scheduler)
    for d in days:
        for s in seeds:
            case_scenario(scenario, d, s, ks, methods)
    out = Path(out)
    manifest = {"scenario": scenario.values, "methods": methods}
    # A sweep resumes its own folder (its manifest, written before anything else) and never
    # writes into another, nor into another command's results folder (the marker only).
    resumed = (out / MANIFEST).is_file()
    hint = f"no {MANIFEST} in it: choose another --out"
    with claim_output(out, overwrite=resumed, markers=(MARKER, MANIFEST), not_empty=hint):
        _check_manifest(out / MANIFEST, manifest, write=False)
        check_cases(scenario, days, ks, seeds, methods)  # --out first: it costs nothing
        fresh = not out.exists()
        written = set(_case_files(out))
        try:
            out.mkdir(exist_ok=True)
            (out / CASES).mkdir(exist_ok=True)
            _remove_partials(out)
            _check_manifest(out / MANIFEST, manifest)
            (out / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
            return _run_cases(
                scenario, days, ks, seeds, out, methods, workers, scheduler, progress, on_case
            )
        except BaseException:
            if set(_case_files(out)) == written:  # nothing finished: leave no trace
                _undo(out, fresh, resumed)
            raise


def check_cases(scenario: Scenario, days: list[str], ks, seeds, methods) -> None:
    """What every case would refuse in its inputs, found before any case runs: the grid
    (loaded once), every day's horizon against the profile data (not read, only their
    times) and the zone counts against the grid as switched. What only a case's own data
    show (its resources, its reference MTU's power flow) is still found by the case."""
    from lfm_zonal.grid.powerflow import build_network_model
    from lfm_zonal.grid.profiles import horizon_check
    from lfm_zonal.study.job import (
        check_zone_counts,
        load_scenario_grid,
        profiles_csv,
        scenario_horizon,
    )
    from lfm_zonal.zones.segmentation import bus_graph

    cases = {day: case_scenario(scenario, day, seeds[0], ks, methods) for day in days}
    grid = load_scenario_grid(cases[days[0]])
    csv = profiles_csv(scenario)
    if len(days) > 1 and csv is None and grid.profile_source != "simbench":
        log.warning(
            "grid %s has synthetic profiles, one daily shape for every date: the %d days "
            "give the same results (the seeds differ; give profiles.csv for days that do)",
            grid.name,
            len(days),
        )
    covered = horizon_check(grid, csv)
    for day, case in cases.items():
        try:
            covered(scenario_horizon(case))
        except InputError as exc:
            raise InputError(f"sweep day {day}: {exc}") from None
    buses = build_network_model(grid).buses
    check_zone_counts(ks, scenario.where("zones.k"), grid.name, buses, bus_graph(grid.net, buses))


def _case_files(out: Path) -> list[Path]:
    folder = out / CASES
    return sorted(folder.glob("*.csv")) if folder.is_dir() else []


def _undo(out: Path, fresh: bool, resumed: bool) -> None:
    """Remove what a refused or failed sweep created (it finished no case)."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        (out / CASES).rmdir()  # only if empty
    if not resumed:
        for name in (MANIFEST, MARKER):
            with contextlib.suppress(OSError):
                (out / name).unlink()


def _remove_partials(out: Path) -> None:
    """Partial files of a killed sweep (this one holds the folder's lock)."""
    for folder in (out, out / CASES):
        for entry in folder.iterdir():
            if _PARTIAL.search(entry.name) and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()


def check_workers(workers: int | None) -> None:
    """``workers``: None (one per core), 0 (no Dask) or a number this machine can run."""
    if workers is None:
        return
    limit = WORKERS_PER_CORE * available_cores()
    if workers < 0:
        raise InputError(f"--workers {workers}: give 0 (no Dask) or a number of processes >= 1")
    if workers > limit:
        raise InputError(
            f"--workers {workers}: at most {limit} local processes on this machine "
            f"({WORKERS_PER_CORE} per core); use --scheduler to go beyond one machine"
        )


def check_scheduler(address: str) -> None:
    """A Dask scheduler address (tcp://host:port) that answers, or one line saying why not."""
    m = re.fullmatch(r"(tcp|tls)://(\[[^\]]+\]|[^:/\[\]]+):(\d{1,5})/?", address.strip())
    if not m:
        raise InputError(
            f"--scheduler '{address}': give the address of a Dask scheduler as tcp://host:port"
        )
    host, port = m[2].strip("[]"), int(m[3])
    if not 0 < port < 65536:
        raise InputError(f"--scheduler '{address}': port {port} is out of range")
    try:
        with socket.create_connection((host, port), timeout=SCHEDULER_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise InputError(f"--scheduler {address}: no Dask scheduler answers ({reason})") from None


def _run_cases(scenario, days, ks, seeds, out, methods, workers, scheduler, progress, on_case):
    from tqdm import tqdm

    cases = [(d, s) for d in days for s in seeds]
    todo = [
        (d, s)
        for d, s in cases
        if not finished(out / CASES / f"{case_name(d, s)}.csv", ks, methods)
    ]
    bar = tqdm(
        total=len(cases),
        initial=len(cases) - len(todo),
        desc="sweep",
        unit="case",
        disable=None if progress else True,
    )
    if todo:
        if workers == 0 and scheduler is None:
            for d, s in todo:
                path = run_case(scenario, d, s, ks, methods, str(out))
                bar.update()
                if on_case:
                    on_case(path)
        else:
            _run_on_dask(scenario, todo, ks, methods, out, workers, scheduler, bar, on_case)
    bar.close()
    return collect(out, cases, ks, methods)


def _run_on_dask(scenario, todo, ks, methods, out, workers, scheduler, bar, on_case) -> None:
    from dask.distributed import Client, LocalCluster, as_completed

    logging.getLogger("distributed").setLevel(logging.ERROR)  # the scheduler runs in this process
    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{2 * SCHEDULER_TIMEOUT_S}s")
        except Exception as exc:  # refused, timed out, or something that is not Dask answered
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise InputError(
                f"--scheduler {scheduler}: no Dask scheduler answers there ({reason})"
            ) from None
        cluster, n = None, 1  # the scheduler's workers: on their own machines, as they are
    else:
        n = workers or available_cores()
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.CRITICAL,  # a case's error is raised here, in one line
        )
        client = Client(cluster)
    try:
        futures = [
            client.submit(run_case, scenario, d, s, ks, methods, str(out.resolve()), n, pure=False)
            for d, s in todo
        ]
        names = {f.key: case_name(d, s) for f, (d, s) in zip(futures, todo, strict=True)}
        for future in as_completed(futures):
            try:
                path = future.result()  # re-raises a case's error (an LfmError names it)
            except LfmError:
                raise
            except Exception as exc:
                if type(exc).__name__ != "KilledWorker":
                    raise
                raise LfmError(
                    f"case {names[future.key]}: its Dask worker died (out of memory?); "
                    "finished cases are kept, run the sweep again to resume"
                ) from None
            bar.update()
            if on_case:
                on_case(path)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def collect(out: Path, cases, ks, methods) -> pd.DataFrame:
    """Stack the finished cases into sweep.csv (timing columns into timings.csv)."""
    from lfm_zonal.check.kpis import TIMING_COLUMNS

    frames = []
    for d, s in cases:
        rows = pd.read_csv(out / CASES / f"{case_name(d, s)}.csv")
        keep = rows.method.eq("nodal") & ("nodal" in methods)
        keep |= [
            (m, int(k)) in expected_rows(ks, methods)
            for m, k in zip(rows.method, rows.k, strict=True)
        ]
        frames.append(rows[keep])
    table = pd.concat(frames, ignore_index=True).sort_values(
        ["day", "seed", "method", "k"], kind="stable", ignore_index=True
    )
    timing = [c for c in TIMING_COLUMNS if c in table]
    tidy = table.drop(columns=timing)
    for name, frame in (
        ("timings.csv", table[["day", "seed", "method", "k", *timing]]),
        ("sweep.csv", tidy),
    ):
        with atomic_file(out / name) as partial:
            write_csv(frame, partial, index=False)
    return tidy


def _dates(days) -> list[pd.Timestamp]:
    out = []
    for d in days:
        try:
            out.append(pd.Timestamp(d))
        except ValueError as exc:
            raise InputError(f"sweep day '{d}': not a date ({exc})") from None
    return out


def _check_manifest(path: Path, manifest: dict, *, write: bool = True) -> None:
    """A sweep folder belongs to one scenario: refuse to resume another one into it."""
    text = json.dumps(manifest, sort_keys=True, indent=1, default=str)
    json_text(manifest, path.name)  # standard JSON: no inf or NaN in the scenario
    if path.is_file():
        try:
            same = path.read_text(encoding="utf-8") == text + "\n"
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            raise InputError(
                f"{path.parent}: holds a sweep of another scenario or method set "
                "(choose another --out, or delete the folder to start over)"
            )
    if write:
        with atomic_file(path) as partial:
            partial.write_text(text + "\n", encoding="utf-8")
