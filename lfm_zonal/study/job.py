"""The main job in memory: a scenario from its grid to every market checked in AC.

Stages are called in pipeline order; each returns plain data for the next. The results
folder is written by ``results`` (``run_scenario``), the report by ``report``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import logging.handlers
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
from tqdm import tqdm

from lfm_zonal.check.ac import ACCheck, residual_violations
from lfm_zonal.check.kpis import KPI_NAMES
from lfm_zonal.config import REFERENCE_MTU_RULES
from lfm_zonal.errors import (
    HorizonError,
    InputError,
    PowerFlowNotConverged,
    SolverError,
    UnknownGridError,
)
from lfm_zonal.files.inputs import require_file
from lfm_zonal.grid.powerflow import HorizonPowerFlow, run_horizon
from lfm_zonal.grid.profiles import Horizon, Profiles, load_profiles
from lfm_zonal.grid.sensitivity import STUDY_POINTS_BYTES, LinearisationCache
from lfm_zonal.grid.sources import Grid, load_grid
from lfm_zonal.limits import memory_budget_bytes, release_free_memory, require_memory
from lfm_zonal.market.clearing import MarketResult, clear_market, mtus_to_clear, prepare_market
from lfm_zonal.market.resources import (
    FlexibilitySpec,
    Resources,
    generate_resources,
    read_resources,
)
from lfm_zonal.progress import inputs_accepted, stage
from lfm_zonal.study.scenario import Scenario
from lfm_zonal.study.workers import forked
from lfm_zonal.zones.segmentation import (
    Segmentation,
    Zones,
    bus_graph,
    grid_parts,
    prepare_segmentation,
    require_converged_reference,
    zone_count_problem,
)

log = logging.getLogger(__name__)

#: Violated rows of each kind and MTU weighed in MW-equivalent for the worst MTU.
WORST_CANDIDATES_PER_MTU = 20


@dataclass(frozen=True)
class BaseCase:
    """Grid, profiles and base-case AC power flow of a scenario's horizon."""

    scenario: Scenario
    grid: Grid
    profiles: Profiles
    powerflow: HorizonPowerFlow

    @property
    def reference_mtu(self) -> int:
        """The converged MTU of highest total load ("peak"; the default MTU of the
        ``sensitivities`` command). The zones' reference MTU follows ``zones.reference_mtu``:
        see :meth:`zones_reference`."""
        converged = self.require_converged()
        total = self.profiles.total_load_mw().to_numpy()
        return int(np.where(converged, total, -np.inf).argmax())

    def require_converged(self) -> np.ndarray:
        """Which MTUs converged; PowerFlowNotConverged where none did (nothing to study)."""
        converged = self.powerflow.converged.to_numpy()
        if not converged.any():
            peak = float(self.profiles.total_load_mw().max())
            raise PowerFlowNotConverged(
                f"grid {self.grid.name}: the AC power flow converges in none of the "
                f"{len(converged)} MTU(s) of the horizon (highest total load {peak:.4g} MW): "
                "more load or generation than the grid can carry"
            )
        return converged

    def worst_violation(self, cache: LinearisationCache | None = None) -> pd.Series | None:
        """The base-case violation of largest MW-equivalent over every MTU and monitored
        element, or None without any: the row of ``check.ac.residual_violations`` (the one
        definition of MW-equivalent: excess beyond the limit / the element's largest
        |sensitivity| to an active injection) applied to the base case itself. Ties: the
        earliest MTU (then overloads before voltages, as that table is ordered). Of each kind
        of violation in each MTU, the WORST_CANDIDATES_PER_MTU largest excesses are weighed
        (each costs a transposed solve; a big grid has tens of thousands of violated rows)."""
        pf = self.powerflow
        as_is = ACCheck(pf.loading_percent, pf.vm_pu, pf.converged, ())
        rows = residual_violations(pf, as_is, cache=cache, rows_per_mtu=WORST_CANDIDATES_PER_MTU)
        if rows.empty:
            return None
        return rows.loc[rows.residual_mw.to_numpy().argmax()]

    def zones_reference(
        self, setting: str | int = REFERENCE_MTU_RULES[0], cache: LinearisationCache | None = None
    ) -> ReferenceMtu:
        """The MTU the zones are computed at, by ``zones.reference_mtu``: "worst" (the MTU of
        the largest base-case violation in MW-equivalent; the peak when no MTU has one),
        "peak" (highest total load) or an MTU number."""
        pf = self.powerflow
        if setting == "worst":
            worst = self.worst_violation(cache)
            if worst is not None:
                t = int(worst["mtu"])
                element = f"{worst['element_type']} {int(worst['element'])}"
                return ReferenceMtu(
                    t,
                    "worst",
                    f"largest base-case violation in MW-equivalent: {worst['violation']} of "
                    f"{element}, {float(worst['residual_mw']):.3g} MW",
                )
            return ReferenceMtu(
                self.reference_mtu, "peak", "highest total load (no base-case violation)"
            )
        if setting == "peak":
            return ReferenceMtu(self.reference_mtu, "peak", "highest total load")
        t = pf.mtu_position(int(setting))
        return ReferenceMtu(t, "given", "set by zones.reference_mtu")


@dataclass(frozen=True)
class ReferenceMtu:
    """The MTU the zones are computed at, the rule that chose it and why (for reports)."""

    position: int
    rule: str  # worst, peak or given
    reason: str


def load_scenario_grid(scenario: Scenario) -> Grid:
    """The scenario's grid, refused in one line if its file is bad or its horizon's tables
    would not fit in memory."""
    g = scenario["grid"]
    source = g["source"]
    if source.lower().endswith(".json"):
        source = scenario_file(scenario, "grid.source", "grid file")
    try:
        grid = load_grid(
            source,
            vm_min_pu=g["vm_min_pu"],
            vm_max_pu=g["vm_max_pu"],
            loading_max_percent=g["loading_max_percent"],
        )
    except UnknownGridError as error:  # a name: where it was given
        raise InputError(f"{scenario.where('grid.source')}: 'grid.source': {error}") from None
    _require_memory_for_horizon(scenario, grid)
    return grid


def scenario_file(scenario: Scenario, key: str, what: str) -> str:
    """The file the scenario's ``key`` ("section.key") names, resolved against the scenario
    file's folder; refused in one line naming where it was set (the scenario file or
    flag) and the ``what`` (e.g. "resource file") if it is missing or not a file."""
    section, name = key.split(".")
    path = scenario.resolve_path(scenario[section][name])
    try:
        require_file(Path(path), what)
    except InputError as error:
        raise InputError(f"{scenario.where(key)}: '{key}': {error}") from None
    return path


def scenario_horizon(scenario: Scenario) -> Horizon:
    """The scenario's horizon: its first MTU's start, number of MTUs and their length."""
    h = scenario["horizon"]
    return Horizon(start=h["start"], n_mtu=h["n_mtu"], mtu_minutes=h["mtu_minutes"])


def profiles_csv(scenario: Scenario) -> str | None:
    """The scenario's profiles CSV (resolved), or None: the grid's own profiles."""
    return (
        scenario_file(scenario, "profiles.csv", "profile file")
        if scenario["profiles"]["csv"]
        else None
    )


def prepare_base_case(scenario: Scenario, progress: bool = False) -> BaseCase:
    """Grid, profiles and the AC power flow of every MTU of the horizon (``progress``: a
    progress bar on a terminal); says so in a stage line."""
    grid = load_scenario_grid(scenario)
    p = scenario["profiles"]
    try:
        profiles = load_profiles(
            grid,
            scenario_horizon(scenario),
            csv=profiles_csv(scenario),
            load_scale=p["load_scale"],
            sgen_scale=p["sgen_scale"],
        )
    except HorizonError as error:  # where the start was given
        raise InputError(f"{scenario.where('horizon.start')}: 'horizon.start': {error}") from None
    pf = run_horizon(grid, profiles, progress=progress)
    stage(
        f"base case: {len(pf.times)} MTUs on grid {grid.name} ({len(pf.model.buses)} buses), "
        f"{int((~pf.converged).sum())} not converged"
    )
    return BaseCase(scenario, grid, profiles, pf)


def _require_memory_for_horizon(scenario: Scenario, grid) -> None:
    """Refuse a horizon whose per-MTU tables would not fit in memory, before any is built:
    profiles (P and Q of every load and sgen), the base case (voltages, loadings) and the
    resources' availability (up and down per unit)."""
    net, f = grid.net, scenario["flexibility"]
    T = scenario["horizon"]["n_mtu"]
    elements = len(net.load) + len(net.sgen)
    units = f["units_per_element"] * elements + f["storage_units"]
    require_memory(
        f"scenario {scenario.name}: a horizon of {T} MTUs on grid {grid.name}",
        [
            [(T, "MTUs"), (elements, "loads and sgens"), (4, "profiles")],
            [
                (T, "MTUs"),
                (
                    len(net.bus) + len(net.line) + len(net.trafo) + 3 * len(net.trafo3w),
                    "buses and branches",
                ),
                (4, "base-case tables"),
            ],  # fmt: skip
            [(T, "MTUs"), (units, "resources"), (2, "directions")],
        ],
        hint="clear a shorter horizon or fewer resource units",
    )


def flexibility_spec(scenario: Scenario) -> FlexibilitySpec:
    f = scenario["flexibility"]
    return FlexibilitySpec(
        load_up_share=f["load_up_share"],
        load_down_share=f["load_down_share"],
        sgen_down_share=f["sgen_down_share"],
        units_per_element=f["units_per_element"],
        n_aggregators=f["n_aggregators"],
        storage_units=f["storage_units"],
        storage_p_mw=f["storage_p_mw"],
        storage_hours=f["storage_hours"],
        storage_efficiency=f["storage_efficiency"],
        cost_load_up=tuple(f["cost_load_up"]),
        cost_load_down=tuple(f["cost_load_down"]),
        cost_sgen_down=tuple(f["cost_sgen_down"]),
        cost_storage=tuple(f["cost_storage"]),
    )


def prepare_resources(base: BaseCase) -> Resources:
    """The scenario's resources: its CSV file, or generated from the grid with its seed."""
    if base.scenario["flexibility"]["csv"]:
        path = scenario_file(base.scenario, "flexibility.csv", "resource file")
        return read_resources(path, base.powerflow)
    return generate_resources(base.powerflow, flexibility_spec(base.scenario), base.scenario.seed)


def _warn_priced_above_penalty(scenario: Scenario, resources: Resources) -> None:
    """A warning when resources offer above the penalty of unmet need, the one price cap."""
    penalty = scenario["market"]["penalty_eur_per_mwh"]
    n, dearest = resources.priced_above(penalty)
    if n:
        log.warning(
            "%d resource(s) offer at prices above the penalty of unmet need "
            "('market.penalty_eur_per_mwh' = %g EUR/MWh, up to %g EUR/MWh): a bid step "
            "priced above it is never bought (an aggregator's step averages the prices of "
            "its resources, and can be)",
            n,
            penalty,
            dearest,
        )


@dataclass(frozen=True)
class ZonePlan:
    """The zones' reference MTU and the graph of the grid as switched, the zone counts
    checked against it (``plan_zones``)."""

    reference: ReferenceMtu
    graph: nx.Graph


def plan_zones(
    base: BaseCase, cache: LinearisationCache | None = None, keep: np.ndarray | None = None
) -> ZonePlan:
    """The zones' reference MTU and the zone counts, checked before any segmentation work
    (each refusal its one line; ``cache``: the study's linearisations).

    ``keep`` (internal voltages, one point a row): points ``cache`` keeps for the study
    (``LinearisationCache.keep``, within STUDY_POINTS_BYTES and an eighth of the memory
    budget), linearised once the zone counts and a given reference MTU are accepted, and
    before the worst MTU is looked for (which linearises the violated MTUs' base points).
    """
    z = base.scenario["zones"]
    pf = base.powerflow
    graph = bus_graph(pf.grid.net, pf.model.buses)
    check_zone_counts(z["k"], base.scenario.where("zones.k"), base.grid.name, pf.model.buses, graph)
    rule = z["reference_mtu"]
    ref = None
    if rule not in REFERENCE_MTU_RULES:  # a given MTU: the worst and the peak converged
        ref = base.zones_reference(rule)
        require_converged_reference(pf, ref.position)
    if keep is not None and cache is not None:
        cache.keep(keep, int(min(STUDY_POINTS_BYTES, memory_budget_bytes()[0] / 8)))
    return ZonePlan(base.zones_reference(rule, cache) if ref is None else ref, graph)


def check_zone_counts(ks, where: str, grid_name: str, buses: pd.Index, graph) -> None:
    """Zone counts ``ks`` (set by ``where``: ``Scenario.where("zones.k")``) against the grid
    as switched (``zone_count_problem``; ``graph``: ``bus_graph`` of its energised
    ``buses``): the first one out of range is named."""
    n_parts = int(grid_parts(buses, graph).max(initial=-1)) + 1
    for k in ks:
        problem = zone_count_problem(k, len(buses), n_parts, grid_name, "'zones.k'")
        if problem:
            raise InputError(f"{where}: {problem}")


def prepare_segmentation_of(
    base: BaseCase,
    resources: Resources | None = None,
    cache: LinearisationCache | None = None,
    plan: ZonePlan | None = None,
) -> Segmentation:
    """Segmentation inputs at the scenario's reference MTU (capacity weights from the resources;
    ``cache``: the study's linearisations; ``plan``: ``plan_zones`` if already made)."""
    plan = plan_zones(base, cache) if plan is None else plan
    seg = prepare_segmentation(
        base.powerflow,
        plan.reference.position,
        reference_rule=f"{plan.reference.rule}: {plan.reference.reason}",
        sensitivity_method=base.scenario["sensitivity"]["method"],
        weight_policy=base.scenario["zones"]["weights"],
        flexible_capacity_mw=None if resources is None else resources.capacity_per_bus(),
        cache=cache,
        graph=plan.graph,
    )
    stage(f"zones: sensitivities and features at MTU {seg.reference_mtu}")
    return seg


def market_cases(scenario: Scenario) -> list[tuple[str, int | None]]:
    """(method, K) pairs of a scenario: nodal once, zonal and needs-based at every K."""
    cases = []
    for method in scenario["market"]["methods"]:
        if method == "nodal":
            cases.append(("nodal", None))
        else:
            cases += [(method, k) for k in scenario["zones"]["k"]]
    return cases


@dataclass(frozen=True)
class StudyResult:
    """The main job's results in memory: base case, segmentation, one MarketResult per case
    (its ``bids``: the accepted steps only, as ``accepted_bids.csv``; every step of a
    5,000-bus grid's day is millions of rows per market, its KPIs are already counted)."""

    base: BaseCase
    resources: Resources
    segmentation: Segmentation
    markets: list[MarketResult]
    zone_sets: list[Zones]  # every K's zones, K ascending (the fewest for a nodal-only study)

    def kpis(self) -> pd.DataFrame:
        """One row per market, the columns of the KPI schema in its order."""
        return pd.DataFrame([m.kpis for m in self.markets], columns=list(KPI_NAMES))


def run_study(
    scenario: Scenario,
    progress: bool = False,
    workers: int = 1,
    alongside: Callable[[Segmentation, list[Zones]], None] | None = None,
) -> StudyResult:
    """Every market case of the scenario, from the grid to the AC check (no files written).

    ``workers`` > 1: the markets are cleared by that many forked processes at once, each
    taking the next group of ``market_groups`` (heaviest first); the results are those of
    one process, byte for byte (every market is computed from the same inputs alone). The
    processes are forked once the zone counts are checked (``plan_zones``), before the
    segmentation: the nodal market (which needs no zones) clears while this process
    makes the zones, and the zonal groups follow with their zones as arguments.
    ``alongside(segmentation, zone_sets)``, if given, runs once the zones are made (in this
    process, while the markets clear): the main job writes its zones folder with it.
    """
    base = prepare_base_case(scenario, progress=progress)
    resources = prepare_resources(base)
    _warn_priced_above_penalty(scenario, resources)
    stage(f"resources: {len(resources)}")
    # Every market linearises the same base points and starts its AC checks from them: each
    # once, for the whole study, and kept before the workers are forked (they share them).
    pf = base.powerflow
    cache = LinearisationCache(pf.model)
    plan = plan_zones(base, cache, keep=pf.V[mtus_to_clear(pf)])
    cases = market_cases(scenario)
    parallel = workers > 1
    # In one process: ``alongside`` (the zone maps, seen early), the nodal market, then
    # K ascending. In several: the heaviest first, since the first free worker takes the
    # next group: the nodal market, then the groups of each K, largest first.
    groups = market_groups(cases, largest_k_first=parallel)
    nodal = [(0, (g, None, None, np.nan)) for g in groups if cases[g[0]][0] == "nodal"]
    tasks = [
        functools.partial(_clear_group, _MarketContext(scenario, base, resources, cache, cases))
    ]
    markets: list[MarketResult | None] = [None] * len(cases)
    bar = tqdm(
        total=len(cases),
        desc="markets",
        unit="case",
        disable=None if progress else True,
        leave=False,
    )
    with bar, contextlib.ExitStack() as stack:
        processes = min(workers, len(groups)) if parallel else 0
        done = stack.enter_context(forked(tasks, processes, nodal)) if parallel and nodal else None
        seg = prepare_segmentation_of(base, resources, cache, plan)
        # The last input checks (resources, zone counts, segmentation) are behind us. The
        # nodal market's worker writes no line: its market's line is written here.
        inputs_accepted()
        # The zones of every K, and their segmentation errors (each market's KPI) at once: on
        # a big grid one pass over every bus's sensitivity column for all K instead of one
        # per K (synthetic_radial_10000, K = 1, 4, 16, 64: 12.6 s of CPU instead of 30 s).
        zone_sets = {
            k: seg.zones(k, scenario["zones"]["method"], scenario.seed)
            for _, k in cases
            if k is not None
        }
        seg.prime_indices(zone_sets.values())
        if zone_sets:
            stage(f"zones: K = {', '.join(map(str, zone_sets))} and their segmentation errors done")
        # The zones folder's zones: every K of the study; for a nodal-only one, the fewest
        # zones the grid allows (one per separate part).
        zone_list = sorted(zone_sets.values(), key=lambda z: z.k) or [seg.zones(seg.n_parts)]
        zonal = []
        for g in groups:
            k = cases[g[0]][1]
            if cases[g[0]][0] != "nodal":
                zones = zone_sets[k]
                zonal.append((0, (g, zones, seg.weights, seg.error(zones))))
        if done is None:
            if alongside is not None and not parallel:
                alongside(seg, zone_list)
            done = stack.enter_context(forked(tasks, processes, nodal + zonal))
        else:
            for task, args in zonal:
                done.submit(task, *args)
        if alongside is not None and parallel:
            alongside(seg, zone_list)
            release_free_memory()  # the maps' drawing, held while the markets clear
        for _, (results, records) in done:
            for record in records:  # the group's warnings, in the order it logged them
                logging.getLogger(record.name).handle(record)
            for i, result in results:
                markets[i] = result
                method, k = cases[i]
                stage(
                    f"{method} market{'' if k is None else f' K = {k}'}: cleared and checked "
                    f"in AC, cost {result.kpis['cost_eur']:.2f} EUR"
                )
                bar.update()
    return StudyResult(base, resources, seg, markets, zone_list)


def market_groups(
    cases: list[tuple[str, int | None]], largest_k_first: bool = False
) -> list[list[int]]:
    """The cases (indices into ``cases``) cleared together: the nodal market alone, then the
    zonal and the needs-based market of each K, K ascending (or descending). A group
    shares its grid, bids and needs (clearing.MarketInputs), and only one group's are held
    at a time in a process."""
    by_k: dict[int | None, list[int]] = {}
    for i, (method, k) in enumerate(cases):
        by_k.setdefault(None if method == "nodal" else k, []).append(i)
    sign = -1 if largest_k_first else 1
    return [by_k[k] for k in sorted(by_k, key=lambda k: (k is not None, sign * (k or 0)))]


@dataclass(frozen=True)
class _MarketContext:
    """What every market of a study clears from (inherited by forked worker processes)."""

    scenario: Scenario
    base: BaseCase
    resources: Resources
    cache: LinearisationCache
    cases: list[tuple[str, int | None]]


def _clear_group(
    study: _MarketContext,
    group: list[int],
    zones: Zones | None,
    weights: pd.Series | None,
    segmentation_error: float,
) -> tuple[list[tuple[int, MarketResult]], list[logging.LogRecord]]:
    """(case index, MarketResult) of one group of cases (``market_groups``): the nodal
    market (``zones`` None), or the zonal and needs-based markets of ``zones`` with their
    virtual buses' ``weights`` and ``segmentation_error``; and the warnings they logged,
    held for the caller to write (a worker writes no line of its own: a nodal market
    forked before the inputs are accepted, and one process or several, the same order)."""
    scenario, m = study.scenario, study.scenario["market"]
    base = study.base
    method = study.cases[group[0]][0]
    release_free_memory()
    results = []
    with _held_log_records() as records:
        with _named_solver_errors(study.cases, group):
            inputs = prepare_market(
                base.powerflow,
                study.resources,
                method,
                zones,
                weights=weights,
                sensitivity_method=scenario["sensitivity"]["method"],
                max_steps=scenario["flexibility"]["max_steps"],
                needs_rule=m["needs"],
                cache=study.cache,
            )
        for i in group:
            with _named_solver_errors(study.cases, [i]):
                result = clear_market(
                    base.powerflow,
                    study.resources,
                    study.cases[i][0],
                    segmentation_error=None if zones is None else segmentation_error,
                    pricing=m["pricing"],
                    penalty_eur_per_mwh=m["penalty_eur_per_mwh"],
                    needs_rule=m["needs"],
                    cache=study.cache,
                    inputs=inputs,
                )
            result = replace(result, bids=result.bids[result.bids.accepted_mw > 0])
            release_free_memory()
            results.append((i, result))
    return results, records


@contextlib.contextmanager
def _named_solver_errors(cases: list[tuple[str, int | None]], markets: list[int]) -> Iterator[None]:
    """A SolverError raised within the block names the ``markets`` (case indices) it is
    about (the LP alone said which LP failed, not whose): the group whose inputs were
    being prepared, or the one market being cleared."""
    try:
        yield
    except SolverError as exc:
        k = cases[markets[0]][1]
        names = " and ".join(cases[i][0] for i in markets)
        label = f"{names} market{'s' if len(markets) > 1 else ''}"
        raise SolverError(f"{label}{'' if k is None else f' K = {k}'}: {exc}") from None


@contextlib.contextmanager
def _held_log_records() -> Iterator[list[logging.LogRecord]]:
    """The records logged by the package within the block, held instead of written (as
    ``logging.handlers.QueueHandler`` prepares them: their text, picklable); the list is
    filled when the block ends."""
    logger = logging.getLogger("lfm_zonal")
    queued: queue.SimpleQueue = queue.SimpleQueue()
    held = logging.handlers.QueueHandler(queued)
    propagate = logger.propagate
    logger.addHandler(held)
    logger.propagate = False
    records: list[logging.LogRecord] = []
    try:
        yield records
    finally:
        logger.removeHandler(held)
        logger.propagate = propagate
        while not queued.empty():
            records.append(queued.get())


def base_case_summary(pf: HorizonPowerFlow) -> dict:
    v = pf.violations()
    return {
        "loading_max_percent": float(v.loading_max_percent.max()),
        "mtus_with_overload": int((v.overloaded_branches > 0).sum()),
        "vm_min_pu": float(v.vm_min_pu.min()),
        "vm_max_pu": float(v.vm_max_pu.max()),
        "mtus_with_voltage_violation": int(
            ((v.undervoltage_buses + v.overvoltage_buses) > 0).sum()
        ),
    }
