"""Command line: ``lfm-zonal <subcommand> --help``.

A user mistake prints one line ``lfm-zonal: error: ...`` and exits with code 2;
no traceback. A solver failure (:class:`~lfm_zonal.errors.SolverError`) prints the same
line and exits with code 1.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading

STARTING_INTERRUPTED = "lfm-zonal: interrupted while starting; nothing was written"


def _interrupted_while_starting(signum, frame) -> None:
    # Ctrl-C while the libraries below load: one line, no traceback, nothing written yet.
    sys.stderr.write(STARTING_INTERRUPTED + "\n")
    sys.stderr.flush()
    os._exit(130)


_STARTING = threading.current_thread() is threading.main_thread()
if _STARTING:
    _SIGINT_BEFORE = signal.signal(signal.SIGINT, _interrupted_while_starting)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from lfm_zonal import __version__  # noqa: E402
from lfm_zonal.config import (  # noqa: E402
    DEFAULTS,
    MARKET_METHODS,
    PRICING,
    SEGMENTATION_METHODS,
    SENSITIVITY_METHODS,
    WEIGHT_POLICIES,
    with_overrides,
)
from lfm_zonal.errors import InputError, LfmError, SolverError, WorkerDied  # noqa: E402
from lfm_zonal.files import SENSITIVITY_FORMATS  # noqa: E402
from lfm_zonal.progress import (  # noqa: E402
    COMMAND_SIGNALS,
    SIGNALLED,
    Terminated,
    checked_when_accepted,
    finished,
    inputs_accepted,
    raise_if_signalled,
    reporting,
    signal_exception,
    stage,
)
from lfm_zonal.study.scenario import (  # noqa: E402
    DEFAULT_SCENARIO,
    Scenario,
    builtin_scenarios,
    load_scenario,
    schema_text,
    validate_values,
)

if _STARTING:
    signal.signal(signal.SIGINT, _SIGINT_BEFORE)

log = logging.getLogger("lfm_zonal")

# Command-line flags that override scenario keys: flag -> (section, key).
OVERRIDES = {
    "grid": ("grid", "source"),
    "start": ("horizon", "start"),
    "n_mtu": ("horizon", "n_mtu"),
    "mtu_minutes": ("horizon", "mtu_minutes"),
    "profiles": ("profiles", "csv"),
    "load_scale": ("profiles", "load_scale"),
    "sgen_scale": ("profiles", "sgen_scale"),
    "vm_min_pu": ("grid", "vm_min_pu"),
    "vm_max_pu": ("grid", "vm_max_pu"),
    "loading_max_percent": ("grid", "loading_max_percent"),
    "method": ("sensitivity", "method"),
    "k": ("zones", "k"),
    "segmentation": ("zones", "method"),
    "weights": ("zones", "weights"),
    "reference_mtu": ("zones", "reference_mtu"),
    "market": ("market", "methods"),
    "pricing": ("market", "pricing"),
    "resources": ("flexibility", "csv"),
}


#: Flags that name an input file (read relative to the working directory).
FILE_FLAGS = {flag: OVERRIDES[flag] for flag in ("grid", "profiles", "resources")}


def _add_out_folder(p: argparse.ArgumentParser, default: str, what: str = "output folder") -> None:
    """--out, a folder (``default`` unless given), and --overwrite."""
    p.add_argument("--out", default=default, help=f"{what} (default: {default})")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {what}")


def _add_zone_options(p: argparse.ArgumentParser) -> None:
    """How a market's zones are made: their numbers, the segmentation and the weights."""
    z = DEFAULTS["zones"]
    p.add_argument(
        "--k",
        action=_WholeNumbers,
        help="zone counts: 1,2,4 or a range 1:8 (repeatable; default: the --scenario's "
        f"zones.k; zones without --scenario: {','.join(map(str, z['k']))})",
    )
    p.add_argument(
        "--segmentation",
        choices=SEGMENTATION_METHODS,
        help=f"segmentation method (default: the scenario's, {z['method']} without one)",
    )
    p.add_argument(
        "--weights",
        choices=WEIGHT_POLICIES,
        help=f"virtual-bus weight policy (default: the scenario's, {z['weights']} without one)",
    )


def _case_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A command on one grid case: a scenario, with its keys overridden by flags."""
    p = sub.add_parser(name, help=help)
    p.add_argument(
        "--scenario",
        help="scenario name or TOML file giving the defaults (default: the schema defaults, "
        "grid cigre_mv)",
    )
    p.add_argument(
        "--grid",
        help="grid: built-in name, SimBench code or pandapower JSON file (a file named on the "
        "command line is relative to the working directory, also with --scenario)",
    )
    p.add_argument("--start", help="start of the first MTU, e.g. '2016-01-14 00:00'")
    # Values stay text here: the scenario model reads and checks them, naming the key.
    p.add_argument("--n-mtu", help="number of MTUs")
    p.add_argument("--mtu-minutes", help="MTU length in minutes")
    p.add_argument(
        "--profiles", help="CSV file of element profiles (relative to the working directory)"
    )
    p.add_argument("--load-scale", help="factor on every load")
    p.add_argument("--sgen-scale", help="factor on every sgen")
    p.add_argument("--vm-min-pu", help="lower voltage limit")
    p.add_argument("--vm-max-pu", help="upper voltage limit")
    p.add_argument("--loading-max-percent", help="loading limit")
    _add_quiet(p)
    return p


def _add_quiet(p: argparse.ArgumentParser) -> None:
    """--quiet for the commands with stage lines (PROGRESS_COMMANDS)."""
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars and no stage lines on stderr"
    )


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The scenario named by --scenario (default: schema defaults on cigre_mv) with every
    given flag applied on top, validated like a file."""
    if args.scenario is None:
        values = {"grid": {"source": "cigre_mv"}}
        origin = "command line"
    else:
        base = load_scenario(args.scenario)
        values = {section: dict(keys) for section, keys in base.values.items()}
        origin = base.path
    overrides = {
        (section, key): getattr(args, flag, None) for flag, (section, key) in OVERRIDES.items()
    }
    if overrides[("zones", "k")] is not None:  # --k: a tuple of distinct counts
        overrides[("zones", "k")] = list(overrides[("zones", "k")])
    # A file named on the command line is relative to the working directory; the scenario
    # resolves its own paths against its folder, so hand it the path from there.
    folder = Path(origin).parent if args.scenario is not None else None
    if folder is not None and not origin.startswith("builtin:"):
        for flag, (section, key) in FILE_FLAGS.items():
            value = getattr(args, flag, None)
            if value and (flag != "grid" or value.lower().endswith(".json")):
                if not Path(value).is_absolute():
                    overrides[(section, key)] = os.path.relpath(value, folder)
    # The scenario file was checked as it was read: a key refused now, a flag set it.
    flags = {
        f"{section}.{key}": f"--{flag.replace('_', '-')}"
        for flag, (section, key) in OVERRIDES.items()
        if getattr(args, flag, None) is not None
    }
    try:
        checked = validate_values(with_overrides(values, overrides), origin)
    except InputError as exc:
        message = str(exc)
        blamed = [f for key, f in flags.items() if f"'{key}'" in message or f"'{key}[" in message]
        if blamed and message.startswith(f"{origin}:"):
            raise InputError(" ".join(blamed) + message[len(origin) :]) from None
        raise
    return Scenario(origin, checked, flags)


def cmd_grids(args: argparse.Namespace) -> None:
    from lfm_zonal.grid.sources import available_grids

    grids = available_grids()
    width = max(map(len, grids))
    for name, origin in grids.items():
        print(f"{name:<{width}}  {origin}")


def cmd_scenarios(args: argparse.Namespace) -> None:
    if args.schema:
        print(schema_text())
        return
    for name, description in builtin_scenarios().items():
        print(f"{name:<32} {description}")


def cmd_powerflow(args: argparse.Namespace) -> None:
    import pandas as pd

    from lfm_zonal.files.outputs import result_file, write_csv
    from lfm_zonal.study.job import prepare_base_case

    if args.rows < 1:
        raise InputError(f"--rows must be >= 1, got {args.rows}")
    base = prepare_base_case(scenario_from_args(args), progress=not args.quiet)
    base.require_converged()  # a table of nothing but failures is no result
    table = base.powerflow.violations()
    if args.out is not None:
        with result_file(args.out, overwrite=args.overwrite) as partial:
            inputs_accepted()  # the last check: --out may be written
            write_csv(table, partial)
        stage(f"violations per MTU written to {args.out}")
        print(f"wrote {args.out}")
    pd.set_option("display.width", 160)
    print(
        f"{base.grid.name}: {base.profiles.horizon.n_mtu} MTUs from {base.profiles.horizon.start}, "
        f"profiles {base.profiles.source}"
    )
    print(table.round(4).to_string(max_rows=args.rows))
    for failure in base.powerflow.failures:
        print(f"not converged: {failure}")


def cmd_sensitivities(args: argparse.Namespace) -> None:
    from lfm_zonal.files.outputs import result_folder
    from lfm_zonal.grid.sensitivity import sensitivities
    from lfm_zonal.study.job import prepare_base_case
    from lfm_zonal.study.results import (
        select_sensitivities,
        sensitivity_csv_bytes,
        sensitivity_labels,
        write_sensitivities,
    )

    elements = _elements(args.elements) if args.elements else None
    buses = list(_numbers(args.buses, int, "--buses")) if args.buses is not None else None
    scenario = scenario_from_args(args)
    base = prepare_base_case(scenario, progress=not args.quiet)
    pf = base.powerflow
    method = scenario["sensitivity"]["method"]
    model = pf.model  # every MTU and row checked before the first is computed
    mtus = []  # positions: an MTU given by number or by time is one MTU, named by its number
    for t in args.mtu or [base.reference_mtu]:
        position = pf.mtu_position(_mtu(t))
        if position in mtus:
            raise InputError(f"--mtu {t}: MTU {position} ({pf.times[position]}) is given twice")
        if not pf.converged.iloc[position]:
            raise InputError(
                f"--mtu {t}: MTU {position} ({pf.times[position]}) has no converged power flow, "
                "so no sensitivities"
            )
        mtus.append(position)
    sensitivity_labels(model.branches, model.buses.rename("bus"), elements, buses)
    formats, biggest = set(), 0
    with result_folder(args.out, overwrite=args.overwrite) as folder:
        inputs_accepted()  # the MTUs, the rows and --out are checked
        for t in mtus:  # one MTU's matrices in memory at a time (0.96 GB on 5,479 buses)
            sens = sensitivities(pf, t, method)
            stage(f"sensitivities: MTU {t} ({sens.time}) computed by {method}")
            if elements is not None or buses is not None:
                sens = select_sensitivities(sens, elements, buses)
            biggest = max(biggest, sensitivity_csv_bytes(sens))
            written = write_sensitivities(sens, folder / f"mtu_{t}", args.format)
            formats.add(written)
            stage(f"sensitivities: MTU {t} written as {written}")
            del sens
    stage(f"results written to {args.out}")
    print(
        f"wrote {method} sensitivities of {len(mtus)} MTU(s) to {args.out} as "
        f"{' and '.join(sorted(formats))}"
    )
    if args.format == "auto" and "npz" in formats:
        print(
            f"  (about {biggest / 2**30:.2f} GiB per MTU as CSV: written as sensitivities.npz; "
            "--format csv forces CSV, --elements and --buses choose rows and columns)"
        )


def _elements(items: list[str]) -> dict[str, list[int]]:
    """--elements TYPE:LIST (repeatable): rows of the sensitivity matrices by pandapower index."""
    chosen: dict[str, list[int]] = {}
    for item in items:
        element, sep, numbers = item.partition(":")
        element = element.strip().lower()
        if not sep or not re.fullmatch(r"[a-z_0-9]+", element) or not numbers.strip():
            raise InputError(
                f"--elements '{item}': write TYPE:INDICES, e.g. line:3,7 or bus:10:20 or trafo:0"
            )
        values = _numbers(numbers, int, f"--elements {element}")
        known = chosen.setdefault(element, [])
        repeated = next((v for v in values if v in known), None)
        if repeated is not None:
            raise InputError(f"--elements {element}:{repeated} is given twice")
        known += values
    return chosen


def _mtu(text: str):
    """An MTU as given: its number (negative too: refused as outside the horizon), or a time."""
    try:
        return _whole(str(text))
    except ValueError:
        return text


def cmd_zones(args: argparse.Namespace) -> None:
    from lfm_zonal.files.outputs import result_folder
    from lfm_zonal.grid.sensitivity import LinearisationCache
    from lfm_zonal.limits import available_cores
    from lfm_zonal.study.job import prepare_base_case, prepare_resources, prepare_segmentation_of
    from lfm_zonal.study.results import write_zones

    scenario = scenario_from_args(args)
    base = prepare_base_case(scenario, progress=not args.quiet)
    # The worst MTU's search and the segmentation linearise the same point: once. The
    # weights are the main job's (capacity: the scenario's resources' flexible capacity).
    seg = prepare_segmentation_of(
        base, prepare_resources(base), cache=LinearisationCache(base.powerflow.model)
    )
    z = scenario["zones"]
    zone_sets = []
    with result_folder(args.out, overwrite=args.overwrite) as folder:
        inputs_accepted()  # the reference MTU, the zone counts and --out are checked
        for k in z["k"]:
            zone_sets.append(seg.zones(k, z["method"], scenario.seed))
            stage(f"zones: K = {k} done")
        write_zones(seg, zone_sets, folder, base.grid.name, workers=available_cores())
    stage(f"results written to {args.out}")
    print(
        f"{base.grid.name}: {seg.n_buses} buses, zones at MTU {seg.reference_mtu} "
        f"({base.powerflow.times[seg.reference_mtu]}), method {z['method']}, weights {z['weights']}"
    )
    print(f"  reference MTU rule {seg.reference_rule}")
    for zones in zone_sets:
        err = seg.indices(zones).overall_error()
        print(
            f"  K = {zones.k:>4}: segmentation error loading {err['loading']:.3f}, "
            f"voltage {err['vm']:.3f}"
        )
    print(
        f"wrote zones.csv, zone_errors.csv, error_curve.csv, zonal_indices/ and maps to {args.out}"
    )


def cmd_clear(args: argparse.Namespace) -> None:
    import pandas as pd

    from lfm_zonal.check.kpis import TERMINAL_COLUMNS
    from lfm_zonal.study.results import run_scenario

    if args.market == "nodal" and args.k is not None:
        raise InputError("--k: the nodal market clears one area per bus; give no --k")
    if args.market != "nodal" and args.k is None and args.scenario is None:
        raise InputError(f"--market {args.market} needs --k (or a --scenario with zones.k)")
    scenario = scenario_from_args(args)
    out = run_scenario(scenario, args.out, overwrite=args.overwrite, progress=not args.quiet)
    kpis = pd.read_csv(out / "kpis.csv")
    print(kpis[list(TERMINAL_COLUMNS)].to_string(index=False))
    print(f"wrote bids, activations, needs, unmet need, KPIs and plots to {out}/")
    _warn_residuals(out)


def _warn_residuals(out: Path) -> None:
    """One warning line (stderr) per market that leaves a violation after the AC check."""
    import pandas as pd

    from lfm_zonal.study.report import residual_warnings

    kpis = pd.read_csv(out / "kpis.csv")
    residual = pd.read_csv(out / "residual_violations.csv")
    for line in residual_warnings(kpis, residual):
        print(f"lfm-zonal: warning: {line} (see residual_violations.csv)", file=sys.stderr)


def _mtu_or_peak(text: str):
    return int(text) if text.isdigit() else text


def cmd_run(args: argparse.Namespace) -> None:
    from lfm_zonal.limits import available_cores
    from lfm_zonal.study.results import run_scenario

    # One per core, at most MAX_MARKET_WORKERS (a study has fewer groups of markets anyway).
    workers = min(available_cores(), MAX_MARKET_WORKERS) if args.workers is None else args.workers
    if not 0 <= workers <= MAX_MARKET_WORKERS:
        raise InputError(
            f"--workers {args.workers}: give a number of processes from 0 to "
            f"{MAX_MARKET_WORKERS} (0 or 1: one market at a time, in this process)"
        )
    scenario = load_scenario(args.scenario)
    out = run_scenario(
        scenario, args.out, overwrite=args.overwrite, progress=not args.quiet, workers=workers
    )
    print(f"results of scenario {scenario.name} in {out}/")
    _warn_residuals(out)


#: Market worker processes of one run at most (a study has one nodal market and a group of
#: markets per K; more processes than cores only share them).
MAX_MARKET_WORKERS = 64
#: Days one sweep may hold (a case is a day; a year of them takes hours already).
MAX_SWEEP_DAYS = 366
#: Values one --flag first:last[:step] range may give (the studies check sizes again).
MAX_RANGE_VALUES = 100_000


def _whole(text: str) -> int:
    """A whole number written as such, read exactly (1e30 or 2.0 are not)."""
    if not re.fullmatch(r"\s*[+-]?\d+\s*", text):
        raise ValueError(text)
    return int(text)


def _numbers(text: str, kind: type, flag: str) -> tuple:
    """Distinct numbers: a comma list ("0,2,5") or an inclusive range "first:last[:step]"."""
    parse = _whole if kind is int else float
    try:
        if ":" in text:
            parts = [parse(v) for v in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] <= 0):
                raise ValueError(text)
            if not all(math.isfinite(v) for v in parts if isinstance(v, float)):
                raise InputError(f"{flag} '{text}': the range bounds must be finite numbers")
            first, last = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else 1
            if first > last:
                raise InputError(
                    f"{flag} '{text}': a range runs up, first to last (not {first} > {last})"
                )
            # Whole numbers exactly; decimals with room for rounding (0:0.3:0.1 has 4 values).
            span = (
                (last - first) // step if kind is int else math.floor((last - first) / step + 1e-9)
            )
            count = int(span) + 1
            if count > MAX_RANGE_VALUES:
                raise InputError(
                    f"{flag} '{text}' gives {count} values; at most {MAX_RANGE_VALUES} per range"
                )
            values = [first + i * step for i in range(max(count, 0))]
            if kind is float:
                values = [round(v, 10) for v in values]
        else:
            items = text.split(",")
            if any(not v.strip() for v in items):
                raise InputError(f"{flag} '{text}': an empty value in the list")
            values = [parse(v) for v in items]
        if not values:
            raise ValueError(text)
    except InputError:
        raise
    except (ValueError, OverflowError):
        raise InputError(
            f"{flag} '{text}': give a comma list (0,2,5) or a range first:last[:step]"
            + (" of whole numbers" if kind is int else "")
        ) from None
    repeated = _first_repeat(values)
    if repeated is not None:
        raise InputError(f"{flag} '{text}': {repeated} is given twice")
    return tuple(values)


def _first_repeat(values):
    """The first value seen before in ``values`` (a set: linear in their number), or None."""
    seen: set = set()
    return next((v for v in values if v in seen or seen.add(v)), None)


class _WholeNumbers(argparse.Action):
    """A flag of whole numbers (zone counts, seeds): a comma list (1,2,4) or a range
    first:last[:step], and repeatable (``--k 1 --k 2`` is ``--k 1,2``); each value once, and
    an empty one refused (not read as "the scenario's")."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest) or ()
        if not values.strip(" ,"):
            raise InputError(f"{option_string} '{values}' is empty")
        added = _numbers(values, int, option_string)  # each value once within this flag
        repeated = _first_repeat(before + added)  # and across its repeats
        if repeated is not None:
            raise InputError(f"{option_string} {repeated} is given twice")
        setattr(namespace, self.dest, before + added)


#: The tender flags that belong to some studies only: their default and those studies
#: ("all" runs optimum, temporal and spatial). Given to another study, a flag is refused:
#: it would change nothing (tender grid --n-nodes 5 ran the grid study as without it).
TENDER_STUDY_FLAGS = {
    "scenario": (DEFAULT_SCENARIO, ("grid",)),
    "forecast_error": (0.1, ("grid",)),
    "k": (None, ("grid",)),
    "sigma_mu": ("0:10", ("temporal", "all")),
    "n_mtu": ("2:20", ("temporal", "all")),
    "gini": ("0:0.7:0.05", ("spatial", "all")),
    "n_nodes": ("2:20", ("spatial", "all")),
}


def _tender_help(dest: str, what: str) -> str:
    """A tender flag's help: its study, what it gives, its default (TENDER_STUDY_FLAGS)."""
    default, studies = TENDER_STUDY_FLAGS[dest]
    return f"{studies[0]} study: {what} (default {default})"


def _tender_flags(args: argparse.Namespace) -> None:
    """Refuse a flag given to a study it does not belong to; set the defaults of the others."""
    for dest, (default, studies) in TENDER_STUDY_FLAGS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
        elif args.study not in studies:
            flag = "--" + dest.replace("_", "-")
            raise InputError(
                f"{flag} is for tender {' or '.join(studies)}, not tender {args.study}: "
                "it would change nothing"
            )


def cmd_tender(args: argparse.Namespace) -> None:
    from lfm_zonal.files.outputs import result_folder
    from lfm_zonal.tender.sizing import (
        check_seeds,
        load_parameters,
        parameter_sets,
        run_tender_studies,
    )

    if args.list:
        for name, description in parameter_sets().items():
            print(f"{name:<16} {description}")
        return
    _tender_flags(args)
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set '{item}': write KEY=VALUE, e.g. --set sigma_mw=3")
        overrides[key.strip()] = value
    params = load_parameters(args.params, overrides)
    if args.seeds < 1:
        raise InputError(f"--seeds must be >= 1, got {args.seeds}")
    seeds = range(args.seeds)  # a range: checked before the grid study's base case too
    check_seeds(seeds)
    ranges = {
        "sigma_mu_mw": _numbers(args.sigma_mu, float, "--sigma-mu"),
        "n_mtu": _numbers(args.n_mtu, int, "--n-mtu"),
        "gini": _numbers(args.gini, float, "--gini"),
        "n_nodes": _numbers(args.n_nodes, int, "--n-nodes"),
    }
    if args.study == "grid":
        _tender_grid(args, params, seeds)
        return
    with result_folder(args.out, overwrite=args.overwrite) as folder:
        tables = run_tender_studies(
            params, args.study, folder, seeds=seeds, label=args.params or "table1", **ranges
        )
    if "deterministic" in tables:
        rules = tables["deterministic"].groupby("rule", sort=False)
        print(rules[["q_mw", "cost_eur_per_h", "extra_cost_percent"]].mean().round(2).to_string())
    for name in ("temporal_summary", "spatial_summary"):
        if name in tables:
            s = tables[name]
            print(
                f"{name}: c_aggr from {s.c_aggr_percent.min():.2f}% to {s.c_aggr_percent.max():.2f}%"
            )
    print(f"wrote {', '.join(sorted(tables))} (CSV) and figures to {args.out}/")


def _tender_grid(args: argparse.Namespace, params, seeds: range) -> None:
    """One tender per zone of a scenario's feeder, for every K."""
    from lfm_zonal.files.outputs import result_folder
    from lfm_zonal.study.job import (
        check_zone_counts,
        prepare_base_case,
        prepare_resources,
        prepare_segmentation_of,
    )
    from lfm_zonal.tender.congestion import write_zonal_tenders, zonal_tender_study

    scenario = load_scenario(args.scenario)
    base = prepare_base_case(scenario, progress=True)
    resources = prepare_resources(base)
    seg = prepare_segmentation_of(base, resources)
    ks = args.k if args.k is not None else tuple(range(seg.n_parts, seg.n_buses + 1))
    check_zone_counts(ks, "--k", base.grid.name, seg.pf.model.buses, seg.graph)
    table, congestion = zonal_tender_study(
        seg,
        resources,
        ks,
        params,
        forecast_error=args.forecast_error,
        seeds=seeds,
        segmentation_method=scenario["zones"]["method"],
    )
    with result_folder(args.out, overwrite=args.overwrite) as folder:
        summary = write_zonal_tenders(table, congestion, folder, base.grid.name)
    print(
        f"{base.grid.name}: {congestion.element[0]} {congestion.element[1]} at "
        f"{congestion.loading_percent:.1f}% +/- {congestion.loading_sd_percent:.1f} "
        f"({congestion.time}), {len(congestion.nodes)} buses with {congestion.direction} flexibility"
    )
    table = summary[["k", "tenders", "c_aggr_percent", "q_procured_mw"]].round(3)
    # The mean number of tenders over the seeds: a whole number printed as one.
    print(table.assign(tenders=table.tenders.map("{:g}".format)).to_string(index=False))
    print(f"wrote zonal_tenders.csv, zonal_tender_needs.csv and zonal_tenders.png to {args.out}/")


def cmd_golden(args: argparse.Namespace) -> None:
    from lfm_zonal.study.regression import check, refresh

    if args.refresh:
        for path in refresh(Path(args.dir), args.scenario):
            print(f"wrote {path}")
        return
    failed = False
    for name, lines in check(Path(args.dir), args.scenario).items():
        print(f"{name}: {'agrees with the golden nodal results' if not lines else 'DIFFERS'}")
        for line in lines:
            print(f"  {line}")
        failed |= bool(lines)
    if failed:
        raise LfmError("nodal results differ from the golden files (see above)")


def _days(text: str) -> list[str]:
    """Days as a comma list or an inclusive range first:last (daily)."""
    import pandas as pd

    if not text.strip(" ,"):
        raise InputError(f"--days '{text}' is empty")
    try:
        if ":" in text:
            first, last = text.split(":")
            days = pd.date_range(first, last, freq="D")
        else:
            items = [d.strip() for d in text.split(",")]
            if not all(items):
                raise InputError(f"--days '{text}': an empty value in the list")
            days = pd.DatetimeIndex(items)
    except InputError:
        raise
    except (ValueError, TypeError):
        raise InputError(
            f"--days '{text}': give dates as a comma list or a range, e.g. 2016-04-10:2016-04-16"
        ) from None
    if len(days) == 0:
        raise InputError(f"--days '{text}': a range runs up, first to last")
    if days.has_duplicates:
        raise InputError(f"--days '{text}': {days[days.duplicated()][0]:%Y-%m-%d} is given twice")
    if len(days) > MAX_SWEEP_DAYS:
        raise InputError(
            f"--days '{text}' gives {len(days)} days; a sweep takes at most {MAX_SWEEP_DAYS} "
            "(one year): split it into several sweeps"
        )
    return [f"{d:%Y-%m-%d}" for d in days]


def cmd_sweep(args: argparse.Namespace) -> None:
    from lfm_zonal.study.sweep import run_sweep

    scenario = load_scenario(args.scenario)
    methods = None
    if args.methods is not None:
        text = ",".join(args.methods)
        if not text.strip(" ,"):  # an empty value is a mistake, not "use the scenario's"
            raise InputError(f"--methods '{text}' is empty")
        methods = [m.strip() for m in text.split(",")]
    ks = args.k if args.k is not None else tuple(scenario["zones"]["k"])
    seeds = args.seeds if args.seeds is not None else (int(scenario.seed),)
    if args.k is not None:  # the zone counts, checked against the grid in each case
        scenario = replace(scenario, flags={"zones.k": "--k"})
    # Each flag checked as the scenario's key it sets, before any case runs.
    values = {section: dict(keys) for section, keys in scenario.values.items()}
    values["zones"] = values["zones"] | {"k": list(ks)}
    validate_values(values, f"--k {','.join(map(str, ks))}")
    if methods is not None:
        values["market"] = values["market"] | {"methods": methods}
        validate_values(values, f"--methods {','.join(methods)}")
    for seed in seeds:
        validate_values(values | {"": values[""] | {"seed": seed}}, f"--seeds {seed}")
    table = run_sweep(
        scenario,
        _days(args.days),
        ks,
        seeds,
        args.out,
        methods=methods,
        workers=args.workers,
        scheduler=args.scheduler,
        progress=not args.quiet,
    )
    summary = table.groupby(["method", "k"], sort=True)[
        ["cost_eur", "unmet_mwh", "residual_overload_max_percent", "residual_voltage_max_pu"]
    ].mean()
    cases = f"{table.day.nunique()} days x {len(seeds)} seeds"
    print(f"mean over the {cases} of each market (every case: {args.out}/sweep.csv)")
    print(summary.round(4).to_string())


class _LowerLevelFormatter(logging.Formatter):
    """Log lines as the command line's own: ``lfm-zonal: warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        return super().format(record)


def _one_line(exc: BaseException) -> str:
    """An error message on one line (a library's message may hold newlines)."""
    return " ".join(str(exc).split())


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors (exit code 2, no usage block)."""

    def error(self, message: str):
        command = self.prog.removeprefix("lfm-zonal").strip()  # "" for the top level
        where = f"{command}: " if command else ""
        sys.stderr.write(f"lfm-zonal: error: {where}{message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments; an argument its command does not know is refused by
    that command's parser (naming its help), one before the command by the top level's."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_at = argv.index(args.command) if args.command in argv else len(argv)
        before = unknown[0] in argv[:command_at]
        (parser if before else args.command_parser).error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    return args


def _name_their_parser(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """Every (sub)command's arguments carry its parser (``command_parser``), and every
    command takes -v too (before the command or after it)."""
    parser.set_defaults(command_parser=parser)
    if not top:
        parser.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _name_their_parser(command, top=False)


VERBOSE_HELP = "log progress details"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lfm-zonal",
        description="Zonal and nodal local flexibility markets on distribution grids.",
    )
    parser.add_argument("--version", action="version", version=f"lfm-zonal {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the main job: run a scenario into a results folder")
    p.add_argument(
        "scenario",
        nargs="?",
        default=DEFAULT_SCENARIO,
        help=f"built-in scenario name or TOML file (default: {DEFAULT_SCENARIO})",
    )
    _add_out_folder(p, "results", "results folder")
    p.add_argument(
        "--workers",
        type=int,
        help="processes clearing markets at once (default: one per core; 0 or 1: one by "
        "one, in this process; each holds one market's LP)",
    )
    _add_quiet(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("grids", help="list the grids lfm-zonal knows")
    p.set_defaults(func=cmd_grids)

    p = sub.add_parser("scenarios", help="list built-in scenarios, or print the scenario schema")
    p.add_argument(
        "--schema", action="store_true", help="print every scenario key with its default"
    )
    p.set_defaults(func=cmd_scenarios)

    p = _case_parser(sub, "powerflow", "base-case AC power flow of every MTU, violations per MTU")
    p.add_argument("--out", help="write the per-MTU table to this CSV file (its folder must exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--rows", type=int, default=20, help="rows to print (default 20)")
    p.set_defaults(func=cmd_powerflow)

    p = _case_parser(
        sub, "sensitivities", "write nodal sensitivity matrices of chosen MTUs (CSV or npz)"
    )
    p.add_argument(
        "--method",
        choices=SENSITIVITY_METHODS,
        help=f"sensitivity method (default: the scenario's, {DEFAULTS['sensitivity']['method']} "
        "without one)",
    )
    p.add_argument(
        "--mtu",
        action="append",
        help="MTU number or start time (repeatable; default: the MTU of highest load)",
    )
    p.add_argument(
        "--format",
        choices=SENSITIVITY_FORMATS,
        default="auto",
        help="csv (one file per matrix), npz (one numpy file) or auto (default: CSV up to "
        "about 256 MiB per MTU, npz above)",
    )
    p.add_argument(
        "--elements",
        action="append",
        metavar="TYPE:INDICES",
        help="rows to keep, by pandapower index: line:3,7, trafo:0, trafo3w:1 (its three "
        "windings; trafo3w_lv:1 one), bus:10:20 (repeatable; default every monitored element "
        "and every bus; a type not named keeps none)",
    )
    p.add_argument(
        "--buses", help="bus columns to keep, e.g. 0,5,9 or 0:99 (default every energised bus)"
    )
    _add_out_folder(p, "sensitivities")
    p.set_defaults(func=cmd_sensitivities)

    p = _case_parser(
        sub, "zones", "segment the grid into K connected zones; zonal indices, errors, maps"
    )
    p.add_argument(
        "--method",
        choices=SENSITIVITY_METHODS,
        help=f"sensitivity method (default: the scenario's, {DEFAULTS['sensitivity']['method']} "
        "without one)",
    )
    _add_zone_options(p)
    p.add_argument(
        "--reference-mtu",
        type=_mtu_or_peak,
        help="MTU number the zones are computed at, 'worst' (largest base-case violation in "
        "MW-equivalent; the default) or 'peak' (highest total load)",
    )
    _add_out_folder(p, "zones")
    p.set_defaults(func=cmd_zones)

    p = _case_parser(
        sub, "clear", "clear one market (nodal, zonal or needs-based) and check it in AC"
    )
    p.add_argument(
        "--market", choices=MARKET_METHODS, default="zonal", help="market (default zonal)"
    )
    _add_zone_options(p)
    p.add_argument(
        "--resources",
        help="CSV file of flexibility resources, relative to the working directory "
        "(default: generated)",
    )
    p.add_argument(
        "--pricing",
        choices=PRICING,
        help=f"default: the scenario's, {DEFAULTS['market']['pricing']} without one",
    )
    _add_out_folder(p, "clearing")
    p.set_defaults(func=cmd_clear)

    p = sub.add_parser(
        "sweep", help="many days x zone counts x seeds of a scenario into one tidy table (Dask)"
    )
    p.add_argument(
        "scenario",
        nargs="?",
        default=DEFAULT_SCENARIO,
        help=f"built-in scenario name or TOML file (default: {DEFAULT_SCENARIO})",
    )
    p.add_argument(
        "--days", required=True, help="days: comma list or range, e.g. 2016-04-10:2016-04-16"
    )
    p.add_argument(
        "--k", action=_WholeNumbers, help="zone counts, e.g. 1,2,4,8,16 (default: the scenario's)"
    )
    p.add_argument(
        "--seeds",
        action=_WholeNumbers,
        help="seeds, e.g. 0,1,2 or 0:4 (default: the scenario's seed)",
    )
    p.add_argument(
        "--methods",
        action="append",
        help="markets, e.g. nodal,zonal (repeatable; default: the scenario's)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="local Dask worker processes (default: one per core; 0: no Dask, one by one)",
    )
    p.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:port)")
    p.add_argument("--out", default="sweep", help="sweep folder, resumed if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "golden", help="compare the nodal results of the built-in scenarios with golden files"
    )
    p.add_argument("scenario", nargs="*", help="built-in scenarios (default: all)")
    p.add_argument(
        "--dir", default="tests/golden", help="folder of the golden files (default tests/golden)"
    )
    p.add_argument("--refresh", action="store_true", help="rewrite the golden files on purpose")
    p.set_defaults(func=cmd_golden)

    p = sub.add_parser(
        "tender",
        help="tender sizing under uncertainty (seed 001): optimum, temporal, spatial aggregation",
    )
    p.add_argument(
        "study",
        nargs="?",
        default="all",
        choices=("optimum", "temporal", "spatial", "all", "grid"),
        help="optimum: Eq. 1 against Q and the deterministic rule; temporal: Fig. 3; "
        "spatial: Fig. 5; all (default); grid: one tender per zone of a scenario's feeder",
    )
    p.add_argument(
        "--scenario",
        help=_tender_help("scenario", "the scenario whose feeder and resources are used"),
    )
    p.add_argument(
        "--forecast-error",
        type=float,
        help=_tender_help(
            "forecast_error",
            "load forecast error, its standard deviation as a share of each load's MW",
        ),
    )
    p.add_argument(
        "--k", action=_WholeNumbers, help="grid study: zone counts (default every K from 1 to N)"
    )
    p.add_argument(
        "--params", help="parameter set (see --list) or TOML file of Table I keys (default table1)"
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one parameter (repeatable)"
    )
    p.add_argument("--list", action="store_true", help="list the shipped parameter sets")
    p.add_argument("--sigma-mu", help=_tender_help("sigma_mu", "sigma_mu values in MW"))
    p.add_argument("--n-mtu", help=_tender_help("n_mtu", "MTUs per product"))
    p.add_argument("--gini", help=_tender_help("gini", "Gini indices"))
    p.add_argument("--n-nodes", help=_tender_help("n_nodes", "nodes per product"))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 averaged (default 5)")
    _add_out_folder(p, "tender")
    p.set_defaults(func=cmd_tender)
    _name_their_parser(parser)
    return parser


# Commands that write stage lines with elapsed times on stderr (progress.py), unless --quiet.
PROGRESS_COMMANDS = ("run", "clear", "zones", "powerflow", "sensitivities")
# What a command writes to --out: a results folder, one file, or a resumable sweep folder.
OUTPUT_KIND = {
    "run": "folder",
    "sensitivities": "folder",
    "zones": "folder",
    "clear": "folder",
    "tender": "folder",
    "powerflow": "file",
    "sweep": "sweep",
}
# Flags naming input files, with what they are (for the one-line message of a bad file).
INPUT_FLAGS = {
    "scenario": "scenario TOML",
    "grid": "grid JSON",
    "profiles": "profiles CSV",
    "resources": "resources CSV",
    "params": "tender parameters TOML",
}


def _declared_inputs(args: argparse.Namespace) -> list[Path]:
    """The input files named by the flags and inside a scenario TOML, each read once through
    ``read_input_text``: an undecodable file is refused before any work, and an output
    folder holding one of them is never replaced."""
    from lfm_zonal.files.inputs import read_input_text

    found: list[Path] = []
    for flag, what in INPUT_FLAGS.items():
        value = getattr(args, flag, None)
        if not isinstance(value, str) or not value or not Path(value).is_file():
            continue  # a built-in name, or missing: the loader says so
        text = read_input_text(value, what)
        found.append(Path(value))
        if value.lower().endswith(".toml"):
            found += _files_named_in(text, Path(value))
    return found


def _files_named_in(toml_text: str, origin: Path) -> list[Path]:
    import tomllib

    from lfm_zonal.files.inputs import read_input_text

    try:
        data = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError:
        return []  # the scenario loader reports it
    kinds = {".csv": "CSV file", ".json": "grid JSON", ".toml": "TOML file"}
    found = []
    stack = [data]
    while stack:
        item = stack.pop()
        values = item.values() if isinstance(item, dict) else item
        for value in values:
            if isinstance(value, (dict, list)):
                stack.append(value)
            elif isinstance(value, str) and Path(value).suffix.lower() in kinds:
                for candidate in (origin.parent / value, Path(value)):
                    if candidate.is_file():
                        read_input_text(candidate, kinds[candidate.suffix.lower()])
                        found.append(candidate)
    return found


def _written_out(args: argparse.Namespace) -> tuple[str, str, bool] | None:
    """(kind, --out, --overwrite) of a command that writes a folder or a file, else None."""
    kind = OUTPUT_KIND.get(args.command)
    out = getattr(args, "out", None)
    if kind not in ("folder", "file") or out is None or getattr(args, "list", False):
        return None
    return kind, out, getattr(args, "overwrite", False)


def _claim(args: argparse.Namespace, inputs: list[Path]):
    """Hold --out for the whole command: checked and locked before any work."""
    from lfm_zonal.files.outputs import claim_output

    written = _written_out(args)
    if written is None:
        return contextlib.nullcontext()
    kind, out, overwrite = written
    return claim_output(out, kind=kind, overwrite=overwrite, inputs=inputs, exists_ok=True)


def _writable(args: argparse.Namespace, inputs: list[Path]) -> None:
    """--out may be written as the command will write it (``_claim`` leaves the refusal of
    a taken --out to here, once the inputs are accepted, so that an input mistake is
    reported first and a taken folder before the work)."""
    from lfm_zonal.files.outputs import check_output_path

    written = _written_out(args)
    if written is not None:
        kind, out, overwrite = written
        check_output_path(out, kind=kind, overwrite=overwrite, inputs=inputs)


@contextlib.contextmanager
def _signals_as_exceptions():
    """SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP raise Terminated, so every
    partial output is removed on the way out; the previous handlers come back after."""
    SIGNALLED.clear()  # another command's, in this process
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_it(signum, frame):
        SIGNALLED.append(signum)
        raise signal_exception(signum)

    previous = {s: signal.signal(s, raise_it) for s in COMMAND_SIGNALS}
    try:
        yield
    finally:
        SIGNALLED.clear()  # this command's: no later output in this process refused for them
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _signalled(args: argparse.Namespace | None, exc: KeyboardInterrupt) -> int:
    """Say in one line what a signal left, and return the exit code (128 + the signal)."""
    # Before the arguments are read, nothing can have been written: as while starting.
    print(_interrupted(args, exc) if args is not None else STARTING_INTERRUPTED, file=sys.stderr)
    return 143 if isinstance(exc, Terminated) else 130


def _interrupted(args: argparse.Namespace, exc: KeyboardInterrupt) -> str:
    what = f"terminated ({exc.args[0]})" if isinstance(exc, Terminated) else "interrupted"
    return _what_is_left(args, what)


#: Errors of the storage a write names no file for (full disk, quota, read-only, I/O).
STORAGE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EFBIG", "EIO", "EROFS", "ESTALE")
    if hasattr(errno, name)
)


def _failed_write(args: argparse.Namespace | None, exc: OSError) -> str:
    """One line for an OSError: the file it names, else (a storage error, STORAGE_ERRNOS: a
    full disk's write names no file) the output being written, and what was left of it."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"lfm-zonal: error: {exc.filename}: {reason}"
    out = None if args is None else getattr(args, "out", None)
    if out is None:
        return f"lfm-zonal: error: {reason}"
    return _what_is_left(args, f"error: writing {out}: {reason}")


def _what_is_left(args: argparse.Namespace, what: str) -> str:
    """``what`` stopped the command, and what it left of its output."""
    kind, out = OUTPUT_KIND.get(args.command), getattr(args, "out", None)
    if out is None or kind is None or getattr(args, "list", False):
        return f"lfm-zonal: {what}"
    if kind == "sweep":
        return f"lfm-zonal: {what}; finished cases in {out}/ are kept (run again to resume)"
    # Not imported here: the signal may have come while it was being imported (with pandas),
    # and importing it again from a half-imported pandas fails with a traceback. If it is not
    # imported, nothing has been written.
    outputs = sys.modules.get("lfm_zonal.files.outputs")
    completed = getattr(outputs, "completed", None)
    if completed is not None and completed(out):
        return f"lfm-zonal: {what} after {out} was written completely"
    if kind == "file":
        return f"lfm-zonal: {what}; {out} was not written"
    return f"lfm-zonal: {what}; no results folder was written"


def main(argv: list[str] | None = None) -> int:
    with _signals_as_exceptions():
        args = None
        try:
            args = _parse(argv)
            handler = logging.StreamHandler()
            handler.setFormatter(_LowerLevelFormatter("lfm-zonal: %(levelname)s: %(message)s"))
            logging.basicConfig(
                level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler]
            )
            if not args.verbose:
                warnings.filterwarnings("ignore")
            inputs = _declared_inputs(args)
            shows_progress = args.command in PROGRESS_COMMANDS and not args.quiet
            with (
                _claim(args, inputs),
                checked_when_accepted(lambda: _writable(args, inputs)),
                reporting(shows_progress),
            ):
                args.func(args)
                raise_if_signalled()  # one swallowed after the output was made final
                finished()
        except LfmError as exc:
            print(f"lfm-zonal: error: {_one_line(exc)}", file=sys.stderr)
            return 1 if isinstance(exc, (SolverError, WorkerDied)) else 2
        except BrokenPipeError:  # stdout closed by the reader (| head): nothing to say
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except OSError as exc:
            if exc.filename is None and exc.errno not in STORAGE_ERRNOS:
                raise  # no file and not the disk's: a bug to see, not an input to name
            print(_failed_write(args, exc), file=sys.stderr)
            return 2
        except Exception:
            # A signal that came while a C extension was being imported (pandas) surfaces as
            # that import's own error (ImportError, AttributeError of a half-imported module).
            if not SIGNALLED:
                raise
            return _signalled(args, signal_exception(SIGNALLED[0]))
        except KeyboardInterrupt as exc:
            return _signalled(args, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
