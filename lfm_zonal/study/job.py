"""The main job: a scenario from grid to results folder.

Stages are called in pipeline order; each returns plain data for the next.
What a run writes is listed in ``write_results`` and in the README.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from lfm_zonal.check.ac import RESIDUAL_COLUMNS
from lfm_zonal.check.kpis import KPI_NAMES, REPORT_COLUMNS, TIMING_COLUMNS
from lfm_zonal.errors import InputError, PowerFlowNotConverged
from lfm_zonal.files.outputs import result_folder, write_csv, write_json
from lfm_zonal.grid.powerflow import HorizonPowerFlow, run_horizon
from lfm_zonal.grid.profiles import Horizon, Profiles, load_profiles
from lfm_zonal.grid.sensitivity import LinearisationCache, Sensitivities
from lfm_zonal.grid.sources import Grid, load_grid
from lfm_zonal.grid.violations import (
    VIOLATION_TOLERANCE_LOADING_PERCENT,
    VIOLATION_TOLERANCE_VM_PU,
    violated_state,
)
from lfm_zonal.limits import require_memory
from lfm_zonal.market.clearing import MarketResult, clear_market
from lfm_zonal.market.resources import (
    FlexibilitySpec,
    Resources,
    generate_resources,
    read_resources,
)
from lfm_zonal.report.plots import (
    plot_before_after,
    plot_error_curve,
    plot_k_comparison,
    plot_zones,
)
from lfm_zonal.study.scenario import Scenario
from lfm_zonal.zones.segmentation import Segmentation, Zones, prepare_segmentation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseCase:
    """Grid, profiles and base-case AC power flow of a scenario's horizon."""

    scenario: Scenario
    grid: Grid
    profiles: Profiles
    powerflow: HorizonPowerFlow

    @property
    def reference_mtu(self) -> int:
        """The converged MTU of highest total load (zones are computed there)."""
        converged = self.powerflow.converged.to_numpy()
        if not converged.any():
            peak = float(self.profiles.total_load_mw().max())
            raise PowerFlowNotConverged(
                f"grid {self.grid.name}: the AC power flow converges in none of the "
                f"{len(converged)} MTU(s) of the horizon (highest total load {peak:.4g} MW): "
                "more load or generation than the grid can carry"
            )
        total = self.profiles.total_load_mw().to_numpy()
        return int(np.where(converged, total, -np.inf).argmax())


def prepare_base_case(scenario: Scenario, progress: bool = False) -> BaseCase:
    g, h, p = scenario["grid"], scenario["horizon"], scenario["profiles"]
    source = g["source"]
    if source.lower().endswith(".json"):
        source = scenario.resolve_path(source)
    grid = load_grid(
        source,
        vm_min_pu=g["vm_min_pu"],
        vm_max_pu=g["vm_max_pu"],
        loading_max_percent=g["loading_max_percent"],
    )
    _require_memory_for_horizon(scenario, grid)
    horizon = Horizon(start=h["start"], n_mtu=h["n_mtu"], mtu_minutes=h["mtu_minutes"])
    profiles = load_profiles(
        grid,
        horizon,
        csv=scenario.resolve_path(p["csv"]) if p["csv"] else None,
        load_scale=p["load_scale"],
        sgen_scale=p["sgen_scale"],
    )
    return BaseCase(scenario, grid, profiles, run_horizon(grid, profiles, progress=progress))


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
                (len(net.bus) + len(net.line) + len(net.trafo), "buses and branches"),
                (4, "base-case tables"),
            ],  # fmt: skip
            [(T, "MTUs"), (units, "resources"), (2, "directions")],
        ],
        hint="clear a shorter horizon or fewer resource units",
    )


def tidy(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """A time x element table as long rows (time, element labels..., value)."""
    out = frame.stack(list(range(frame.columns.nlevels)), future_stack=True).rename(value)
    return out.reset_index()


def write_sensitivities(sens: Sensitivities, folder: Path) -> None:
    """The four matrices as CSV: rows monitored element or bus, columns bus (pandapower indices)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("loading_p", "loading_q", "vm_p", "vm_q"):
        write_csv(getattr(sens, name), folder / f"{name}.csv")


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
    csv = base.scenario["flexibility"]["csv"]
    if csv:
        return read_resources(base.scenario.resolve_path(csv), base.powerflow)
    return generate_resources(base.powerflow, flexibility_spec(base.scenario), base.scenario.seed)


def prepare_segmentation_of(
    base: BaseCase, resources: Resources | None = None, cache: LinearisationCache | None = None
) -> Segmentation:
    """Segmentation inputs at the scenario's reference MTU (capacity weights from the resources;
    ``cache``: the study's linearisations)."""
    z = base.scenario["zones"]
    ref = base.reference_mtu if z["reference_mtu"] == "peak" else z["reference_mtu"]
    seg = prepare_segmentation(
        base.powerflow,
        ref,
        sensitivity_method=base.scenario["sensitivity"]["method"],
        weight_policy=z["weights"],
        flexible_capacity_mw=None if resources is None else resources.capacity_per_bus(),
        cache=cache,
    )
    too_many = [k for k in z["k"] if k > seg.n_buses]
    if too_many:
        raise InputError(
            f"{base.scenario.path}: 'zones.k' = {too_many[0]} is out of range: the grid "
            f"has {seg.n_buses} energised buses, so 1 <= K <= {seg.n_buses}"
        )
    return seg


def write_zones(seg: Segmentation, zone_sets: list[Zones], folder: Path, grid_name: str) -> None:
    """zones.csv, zone_errors.csv, zonal indices per K, error curve over every K, zone maps."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, errors = [], []
    for zones in zone_sets:
        idx = seg.indices(zones)
        med = seg.medoids(zones)
        table = pd.DataFrame(
            {
                "k": zones.k,
                "bus": zones.buses,
                "zone": zones.zone_of_bus.to_numpy(),
                "medoid": zones.buses.isin(med.to_numpy()),
                "weight_mw": idx.weights.to_numpy(),
            }
        )
        rows.append(table)
        errors.append(
            idx.error[["buses", "weight", "loading_error", "vm_error"]]
            .assign(k=zones.k, medoid=med)
            .reset_index()
        )
        sub = folder / "zonal_indices" / f"k{zones.k}"
        sub.mkdir(parents=True, exist_ok=True)
        for name in ("loading_p", "loading_q", "vm_p", "vm_q"):
            write_csv(getattr(idx, name), sub / f"{name}.csv")
        write_csv(idx.element_error, sub / "element_error.csv")
        err = idx.overall_error()
        plot_zones(
            seg.graph,
            seg.pf.grid.net,
            zones.zone_of_bus,
            med,
            folder / f"zones_k{zones.k}.png",
            f"{grid_name}: K = {zones.k} zones ({zones.method}), error "
            f"loading {err['loading']:.2f} / voltage {err['vm']:.2f}",
        )
    write_csv(pd.concat(rows, ignore_index=True), folder / "zones.csv", index=False)
    columns = ["k", "zone", "buses", "weight", "medoid", "loading_error", "vm_error"]
    write_csv(
        pd.concat(errors, ignore_index=True)[columns], folder / "zone_errors.csv", index=False
    )
    method = zone_sets[0].method
    curve = seg.error_curve(method=method)
    write_csv(curve, folder / "error_curve.csv", index=False)
    plot_error_curve(
        curve, folder / "error_curve.png", f"{grid_name}: segmentation error against K ({method})"
    )


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
    """The main job's results in memory: base case, segmentation, one MarketResult per case."""

    base: BaseCase
    resources: Resources
    segmentation: Segmentation
    markets: list[MarketResult]

    def kpis(self) -> pd.DataFrame:
        """One row per market, the columns of the KPI schema in its order."""
        return pd.DataFrame([m.kpis for m in self.markets], columns=list(KPI_NAMES))


def run_study(scenario: Scenario, progress: bool = False) -> StudyResult:
    """Every market case of the scenario, from the grid to the AC check (no files written)."""
    base = prepare_base_case(scenario, progress=progress)
    resources = prepare_resources(base)
    # Every market linearises the same base points: each once, for the whole study.
    cache = LinearisationCache(base.powerflow.model)
    seg = prepare_segmentation_of(base, resources, cache)
    m = scenario["market"]
    markets = []
    for method, k in tqdm(
        market_cases(scenario),
        desc="markets",
        unit="case",
        disable=None if progress else True,
        leave=False,
    ):
        # The market takes plain inputs: the base case, the resources and its areas.
        zones = (
            None if method == "nodal" else seg.zones(k, scenario["zones"]["method"], scenario.seed)
        )
        markets.append(
            clear_market(
                base.powerflow,
                resources,
                method,
                zones,
                weights=seg.weights,
                sensitivity_method=seg.sensitivity_method,
                segmentation_error=None if zones is None else seg.error(zones),
                pricing=m["pricing"],
                penalty_eur_per_mwh=m["penalty_eur_per_mwh"],
                needs_rule=m["needs"],
                max_steps=scenario["flexibility"]["max_steps"],
                cache=cache,
            )
        )
    return StudyResult(base, resources, seg, markets)


def _label(m: MarketResult) -> str:
    return "nodal" if m.method == "nodal" else f"{m.method}_k{m.k}"


def _long(frames: list[tuple[MarketResult, pd.DataFrame]]) -> pd.DataFrame:
    """Stack per-market tables with method and k in front (the header alone when every
    table is empty: a horizon where nothing is accepted still has its columns)."""
    parts = [f.assign(method=m.method, k=m.k) for m, f in frames if len(f)]
    if not parts:
        columns = [c for m, f in frames[:1] for c in f.columns]
        return pd.DataFrame(
            columns=["method", "k", *[c for c in columns if c not in ("method", "k")]]
        )
    out = pd.concat(parts, ignore_index=True)
    return out[["method", "k", *[c for c in out.columns if c not in ("method", "k")]]]


def write_results(study: StudyResult, folder: Path) -> None:
    """Every output file of the main job (listed in the README)."""
    base, seg = study.base, study.segmentation
    pf = base.powerflow
    kpis = study.kpis()
    write_csv(kpis, folder / "kpis.csv", index=False)
    write_csv(base.powerflow.violations(), folder / "base_case.csv")
    write_csv(
        _long(
            [(m, m.bids[m.bids.accepted_mw > 0].drop(columns=["time"])) for m in study.markets]
        ).assign(time=lambda d: pf.times[d.mtu.to_numpy(np.int64)]),
        folder / "accepted_bids.csv",
        index=False,
    )
    write_csv(
        _long([(m, m.dispatch) for m in study.markets]), folder / "activations.csv", index=False
    )
    write_csv(
        _long([(m, m.activations) for m in study.markets]),
        folder / "zone_activations.csv",
        index=False,
    )
    write_csv(
        _long([(m, m.needs) for m in study.markets if m.method != "needs_based"]),
        folder / "needs.csv",
        index=False,
    )
    write_csv(_long([(m, m.unmet) for m in study.markets]), folder / "unmet.csv", index=False)
    residual = residual_table(study.markets)
    write_csv(residual, folder / "residual_violations.csv", index=False)
    resources = study.resources.table.reset_index()
    write_csv(resources, folder / "resources.csv", index=False)
    zone_sets = sorted(
        {m.zones.k: m.zones for m in study.markets if m.method != "nodal"}.values(),
        key=lambda z: z.k,
    ) or [seg.zones(1)]
    write_zones(seg, zone_sets, folder / "zones", base.grid.name)
    plot_k_comparison(kpis, folder / "k_comparison.png", base.grid.name)
    worst = worst_mtu(pf)
    if worst is not None:
        plot_before_after(
            pf,
            {_label(m): m.ac for m in study.markets if m.method != "needs_based"},
            worst,
            folder / "before_after.png",
        )
    summary = {
        "scenario": base.scenario.name,
        "scenario_source": base.scenario.path,
        "seed": base.scenario.seed,
        "grid": base.grid.summary()
        | {"origin": base.grid.origin, "profiles": base.profiles.source},
        "limits": {
            "vm_min_pu": base.grid.vm_min_pu,
            "vm_max_pu": base.grid.vm_max_pu,
            "loading_max_percent": base.grid.loading_max_percent,
        },
        "horizon": {
            "start": str(base.profiles.horizon.start),
            "n_mtu": base.profiles.horizon.n_mtu,
            "mtu_minutes": base.profiles.horizon.mtu_minutes,
            "profiles": base.profiles.source,
        },
        "mtus_not_converged": list(pf.failures),
        "reference_mtu": {"position": seg.reference_mtu, "time": str(pf.times[seg.reference_mtu])},
        "worst_mtu": None if worst is None else {"position": worst, "time": str(pf.times[worst])},
        "resources": {
            "count": len(study.resources),
            "aggregators": int(study.resources.table.aggregator.nunique())
            if len(study.resources)
            else 0,
        },
        "base_case": base_case_summary(pf),
        "markets": kpis.drop(columns=list(TIMING_COLUMNS)).to_dict("records"),
    }
    write_json(summary, folder / "summary.json")
    (folder / "report.md").write_text(
        report_markdown(study, kpis, worst, residual), encoding="utf-8"
    )


def residual_table(markets: list[MarketResult]) -> pd.DataFrame:
    """residual_violations.csv: every market's (MTU, element) still violated after the AC check
    (``validation.residual_violations``), with method and k in front; the header alone if none."""
    table = _long([(m, m.residual) for m in markets])
    if table.empty:
        return pd.DataFrame(columns=["method", "k", *RESIDUAL_COLUMNS])
    return table


def residual_warnings(kpis: pd.DataFrame, residual: pd.DataFrame, limit: int = 4) -> list[str]:
    """One line per market that leaves a violation after the AC check (or an MTU whose AC
    check did not converge): how many, where (elements named, worst first), whether the
    offers there were exhausted, and the residual MW-equivalent it leaves."""
    lines = []
    for rec in kpis.itertuples(index=False):
        label = "nodal" if rec.method == "nodal" else f"{rec.method} K = {rec.k}"
        rows = (
            residual[(residual.method == rec.method) & (residual.k == rec.k)]
            if len(residual)
            else residual
        )
        failed = int(getattr(rec, "mtus_not_converged_after", 0))
        if rows.empty and not failed:
            continue
        parts = []
        if len(rows):
            worst = rows.sort_values("residual_mw", ascending=False, kind="stable").drop_duplicates(
                ["element_type", "element", "violation"]
            )
            named = [
                f"{r.element_type} {int(r.element)} ({r.violation} "
                + (f"{r.excess:.3g} pp" if r.violation == "overload" else f"{r.excess:.3g} p.u.")
                + ")"
                for r in worst.head(limit).itertuples(index=False)
            ]
            more = len(worst) - len(named)
            exhausted = rows.offers_exhausted.eq(True)
            parts.append(
                f"{len(rows)} violation(s) left after the AC check in {rows.mtu.nunique()} MTU(s): "
                + ", ".join(named)
                + (f" and {more} more" if more > 0 else "")
                + f"; offers exhausted for {int(exhausted.sum())} of them"
                + f"; residual {float(rec.residual_mwh):.3g} MWh-equivalent"
            )
        if failed:
            parts.append(f"AC check did not converge in {failed} MTU(s)")
        lines.append(f"{label}: " + "; ".join(parts))
    return lines


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


def worst_mtu(pf: HorizonPowerFlow) -> int | None:
    """The MTU with the largest base-case violation (overload in percent points, voltage x 100)."""
    over, dev = violated_state(pf.grid, pf.loading_percent, pf.vm_pu)
    score = (over.max(axis=1) + 100 * dev.max(axis=1)).fillna(0.0)
    return int(score.to_numpy().argmax()) if score.max() > 0 else None


def report_markdown(
    study: StudyResult, kpis: pd.DataFrame, worst: int | None, residual: pd.DataFrame | None = None
) -> str:
    base = study.base
    pf = base.powerflow
    b = base_case_summary(pf)
    table = kpis[list(REPORT_COLUMNS)].copy()
    lines = [
        f"# {base.scenario.name}",
        "",
        base.scenario.values[""]["description"] or "",
        "",
        f"Grid **{base.grid.name}** ({base.grid.origin}); {base.profiles.horizon.n_mtu} MTUs of "
        f"{base.profiles.horizon.mtu_minutes} min from {base.profiles.horizon.start}, profiles "
        f"{base.profiles.source}; limits {base.grid.vm_min_pu}-{base.grid.vm_max_pu} p.u., "
        f"{base.grid.loading_max_percent:g}% loading; {len(study.resources)} resources.",
        "",
        f"Base case: max loading {b['loading_max_percent']:.1f}% ({b['mtus_with_overload']} MTUs "
        f"overloaded), voltage {b['vm_min_pu']:.3f}-{b['vm_max_pu']:.3f} p.u. "
        f"({b['mtus_with_voltage_violation']} MTUs out of band).",
        "",
        "## Markets (after the AC check)",
        "",
        _markdown_table(table),
        "",
        "Residuals are measured by an AC power flow of the real dispatch; the nodal market is "
        "the benchmark. A row is violated beyond "
        f"{VIOLATION_TOLERANCE_LOADING_PERCENT:g} pp of loading or {VIOLATION_TOLERANCE_VM_PU:g} "
        "p.u. of voltage. Unmet need is the larger of the MW the DSO still misses in the linear "
        "model after the clearing and the AC residual in MW-equivalent (reported, never hidden). "
        "The security-adjusted cost adds that AC residual priced at the penalty of unmet need "
        f"({_penalty(kpis)}).",
        "",
        "![cost and residuals against K](k_comparison.png)",
        "",
        "## Violations left after the AC check",
        "",
    ]
    if residual is None:
        residual = residual_table(study.markets)
    warnings = residual_warnings(kpis, residual, limit=8)
    if warnings:
        lines += [f"* {w}" for w in warnings]
        lines += [
            "",
            "Each (MTU, element) is in `residual_violations.csv`, with its excess, its residual MW "
            "(excess over the element's largest nodal sensitivity to an injection) and whether "
            "the offers there were exhausted: every resource whose activation relieves the "
            "element was dispatched to its full offer in that MTU. Offers exhausted: the "
            "flexibility offered cannot fix it; not exhausted: the market chose not to, or its "
            "model did not see it.",
            "",
        ]
    else:
        lines += ["None: every market leaves every element within its limits.", ""]
    if worst is not None:
        lines += [
            f"Worst MTU: {worst} ({pf.times[worst]}).",
            "",
            "![before and after](before_after.png)",
            "",
        ]
    lines += ["Zones: see `zones/` (maps `zones_k<K>.png`, error curve `error_curve.png`).", ""]
    return "\n".join(lines)


def _penalty(kpis: pd.DataFrame) -> str:
    values = sorted(set(kpis.penalty_eur_per_mwh)) if "penalty_eur_per_mwh" in kpis else []
    return ", ".join(f"{v:g} EUR/MWh" for v in values) or "none"


def _markdown_table(table: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "---|" * len(table.columns)
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def run_scenario(
    scenario: Scenario, out: str | Path, *, overwrite: bool = False, progress: bool = False
) -> Path:
    """Run the main job of ``scenario`` and write its results folder ``out`` (complete or absent)."""
    started = time.perf_counter()
    study = run_study(scenario, progress=progress)
    with result_folder(out, overwrite=overwrite) as folder:
        write_results(study, folder)
    log.info("finished in %.1f s", time.perf_counter() - started)
    return Path(out)
