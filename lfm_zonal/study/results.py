"""The main job's results folder: every file a run writes (listed in the README), from a
study in memory (``job.run_study``)."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from lfm_zonal.check.ac import RESIDUAL_COLUMNS
from lfm_zonal.check.kpis import TIMING_COLUMNS
from lfm_zonal.errors import InputError, WorkerDied
from lfm_zonal.files import SENSITIVITY_FORMATS
from lfm_zonal.files.outputs import result_folder, write_csv, write_json, write_npz, write_table
from lfm_zonal.grid.powerflow import BRANCH_INDEX_NAMES, TRAFO3W_WINDINGS, HorizonPowerFlow
from lfm_zonal.grid.sensitivity import Sensitivities
from lfm_zonal.grid.violations import violated_state
from lfm_zonal.market.clearing import MarketResult
from lfm_zonal.progress import elapsed_s as progress_elapsed_s
from lfm_zonal.progress import stage
from lfm_zonal.report.html_map import write_zone_map_html
from lfm_zonal.report.plots import (
    bus_positions,
    plot_before_after,
    plot_error_curve,
    plot_k_comparison,
    plot_zones,
)
from lfm_zonal.study.job import StudyResult, base_case_summary, run_study
from lfm_zonal.study.report import has_k_comparison, report_markdown
from lfm_zonal.study.scenario import Scenario
from lfm_zonal.study.workers import forked, in_order
from lfm_zonal.zones.segmentation import Segmentation, Zones

log = logging.getLogger(__name__)


def tidy(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """A time x element table as long rows (time, element labels..., value)."""
    out = frame.stack(list(range(frame.columns.nlevels)), future_stack=True).rename(value)
    return out.reset_index()


#: Sensitivity matrices, each a file of ``write_sensitivities``.
SENSITIVITY_MATRICES = ("loading_p", "loading_q", "vm_p", "vm_q")
#: Bytes of one value in a sensitivity CSV (``%.10g``, a separator: 15-17 measured).
CSV_BYTES_PER_VALUE = 17
#: ``--format auto`` writes CSV up to this estimate per MTU, a binary ``.npz`` above it (a
#: grid of about 2,000 buses; SimBench MV+LV, 5,479 buses, would be 1.9 GB of CSV).
SENSITIVITY_CSV_MAX_BYTES = 256 * 2**20


def sensitivity_labels(
    branches: pd.MultiIndex,
    buses: pd.Index,
    elements: dict[str, list[int]] | None = None,
    columns: list[int] | None = None,
) -> tuple[pd.MultiIndex, pd.Index, pd.Index]:
    """Rows of the loading matrices, rows of the voltage matrices and bus columns chosen from
    a grid's monitored ``branches`` and energised ``buses``: ``elements`` maps an element type
    to pandapower indices (``line``, ``trafo``, ``trafo3w_hv``, ... rows of the loading
    matrices, ``trafo3w`` its three windings' rows, ``bus`` rows of the voltage matrices;
    None: every row; a type not named keeps no row), ``columns`` are
    bus indices (None: every bus), in the order given. An index the grid does not have is
    refused naming the flag (``--elements``, ``--buses``) and the index."""
    loading_rows, vm_rows = branches, buses
    if elements is not None:
        types = set(branches.get_level_values(0))
        windings = [f"trafo3w_{w}" for w in TRAFO3W_WINDINGS]
        if types & set(windings):
            types.add("trafo3w")  # a trafo3w: its windings' rows (those monitored)
        picked: dict[tuple[str, int], None] = {}  # in order, each row once
        for element, indices in elements.items():
            if element != "bus" and element not in types:
                known = ", ".join(sorted(types | {"bus"}))
                raise InputError(
                    f"--elements {element}: the grid has no monitored element of this type "
                    f"(types: {known})"
                )
            if element == "trafo3w":
                for i in indices:
                    rows = [(w, int(i)) for w in windings if (w, int(i)) in branches]
                    if not rows:
                        raise InputError(
                            f"--elements trafo3w:{i}: the grid has no monitored trafo3w {i}"
                        )
                    picked.update(dict.fromkeys(rows))
            elif element != "bus":
                picked.update(dict.fromkeys((element, int(i)) for i in indices))
        _require(branches, list(picked), "--elements", "no monitored {0} {1}")
        loading_rows = pd.MultiIndex.from_tuples(list(picked), names=branches.names)
        vm_rows = pd.Index([int(i) for i in elements.get("bus", [])], name=buses.name)
        _require(buses, [("bus", b) for b in vm_rows], "--elements", "no energised {0} {1}")
    out = buses
    if columns is not None:
        out = pd.Index([int(b) for b in columns], name=buses.name)
        _require(buses, [("bus", b) for b in out], "--buses", "no energised {0} {1}")
    return loading_rows, vm_rows, out


def _require(index: pd.Index, labels: list[tuple[str, int]], flag: str, what: str) -> None:
    keys = labels if isinstance(index, pd.MultiIndex) else [i for _, i in labels]
    missing = next((lab for lab, key in zip(labels, keys, strict=True) if key not in index), None)
    if missing is not None:
        element, i = missing
        shown = f"{element}:{i}" if flag == "--elements" else str(i)
        raise InputError(f"{flag} {shown}: the grid has {what.format(element, i)}")


def select_sensitivities(
    sens: Sensitivities, elements: dict | None = None, columns: list[int] | None = None
) -> Sensitivities:
    """The rows and bus columns of ``sensitivity_labels`` (the same arguments)."""
    loading_rows, vm_rows, buses = sensitivity_labels(
        sens.loading_p.index, sens.vm_p.columns, elements, columns
    )
    return replace(
        sens,
        loading_p=sens.loading_p.loc[loading_rows, buses],
        loading_q=sens.loading_q.loc[loading_rows, buses],
        vm_p=sens.vm_p.loc[vm_rows, buses],
        vm_q=sens.vm_q.loc[vm_rows, buses],
    )


def sensitivity_csv_bytes(sens: Sensitivities) -> int:
    """About how many bytes the four matrices take as CSV."""
    return CSV_BYTES_PER_VALUE * sum(getattr(sens, name).size for name in SENSITIVITY_MATRICES)


def sensitivity_format(sens: Sensitivities, fmt: str) -> str:
    """``csv`` or ``npz``: ``auto`` is CSV up to ``SENSITIVITY_CSV_MAX_BYTES`` per MTU."""
    if fmt != "auto":
        return fmt
    return "csv" if sensitivity_csv_bytes(sens) <= SENSITIVITY_CSV_MAX_BYTES else "npz"


def write_sensitivities(sens: Sensitivities, folder: Path, fmt: str = "csv") -> str:
    """The four matrices of one MTU into ``folder``, labelled with pandapower indices; returns
    the format written. ``csv``: one file per matrix, rows monitored element or bus, columns
    bus. ``npz`` (numpy, read with ``np.load``, no pickle): ``sensitivities.npz`` holding the
    matrices under their names, their labels ``branch_element_type`` and ``branch_element``
    (rows of ``loading_*``), ``bus_row`` (rows of ``vm_*``) and ``bus`` (columns of all
    four), and ``method``, ``time``, ``isolated_buses`` (see ``read_sensitivities``)."""
    fmt = sensitivity_format(sens, fmt)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        for name in SENSITIVITY_MATRICES:
            write_csv(getattr(sens, name), folder / f"{name}.csv")
        return fmt
    if fmt != "npz":
        raise InputError(f"sensitivity format '{fmt}': one of {', '.join(SENSITIVITY_FORMATS)}")
    rows = sens.loading_p.index
    arrays = {name: getattr(sens, name).to_numpy(float) for name in SENSITIVITY_MATRICES}
    write_npz(
        arrays
        | {
            "branch_element_type": np.asarray(rows.get_level_values(0), dtype=str),
            "branch_element": np.asarray(rows.get_level_values(1), dtype=np.int64),
            "bus_row": sens.vm_p.index.to_numpy(np.int64),
            "bus": sens.vm_p.columns.to_numpy(np.int64),
            "method": np.asarray(sens.method),
            "time": np.asarray(str(sens.time)),
            "isolated_buses": np.asarray(sens.isolated_buses, dtype=np.int64),
        },
        folder / "sensitivities.npz",
    )
    return fmt


def read_sensitivities(path: str | Path) -> Sensitivities:
    """A ``sensitivities.npz`` of ``write_sensitivities`` as labelled matrices."""
    with np.load(path, allow_pickle=False) as data:
        rows = pd.MultiIndex.from_arrays(
            [data["branch_element_type"].astype(object), data["branch_element"]],
            names=BRANCH_INDEX_NAMES,
        )
        buses = pd.Index(data["bus"], name="bus")
        bus_rows = pd.Index(data["bus_row"], name="bus")

        def frame(name: str, index: pd.Index) -> pd.DataFrame:
            return pd.DataFrame(data[name], index=index, columns=buses.copy())

        return Sensitivities(
            method=str(data["method"]),
            time=pd.Timestamp(str(data["time"])),
            loading_p=frame("loading_p", rows),
            loading_q=frame("loading_q", rows),
            vm_p=frame("vm_p", bus_rows),
            vm_q=frame("vm_q", bus_rows),
            isolated_buses=tuple(int(b) for b in data["isolated_buses"]),
        )


def write_zones(
    seg: Segmentation, zone_sets: list[Zones], folder: Path, grid_name: str, workers: int = 1
) -> None:
    """zones.csv, zone_errors.csv, zonal indices per K, error curve over every K, zone maps
    (PNG, and HTML when plotly is installed; the bus positions computed once for every K).
    The indices of every K are computed together (``Segmentation.prime_indices``: one pass over
    the bus columns on a big grid; the main job has them already). On a big grid (the
    streamed path) with ``workers`` > 1, the error curve, a pass of its own over the bus
    columns, is computed by a forked process while this one writes the indices and maps:
    ``lfm-zonal zones`` on SimBench MV+LV 17.8-18.3 s -> 14.5-14.8 s. The main job keeps
    it here: its market workers have the cores (measured: no faster)."""
    folder.mkdir(parents=True, exist_ok=True)
    seg.prime_indices(zone_sets)
    method = zone_sets[0].method
    beside = seg.streamed and workers > 1
    curve = None
    try:
        with forked([functools.partial(seg.error_curve, method=method)], int(beside)) as curves:
            _write_zone_sets(seg, zone_sets, folder, grid_name)
            ((_, curve),) = list(curves)
    except WorkerDied:  # its process was killed (out of memory?): once more, alone, here
        log.warning("the error curve's process died (out of memory?); computing it here")
    if curve is None:
        curve = seg.error_curve(method=method)
    write_csv(curve, folder / "error_curve.csv", index=False)
    plot_error_curve(
        curve, folder / "error_curve.png", f"{grid_name}: segmentation error against K ({method})"
    )
    stage(f"zones: error curve over {len(curve)} zone counts written")


def _write_zone_sets(
    seg: Segmentation, zone_sets: list[Zones], folder: Path, grid_name: str
) -> None:
    """zones.csv, zone_errors.csv, the zonal indices and maps of every K (``write_zones``)."""
    rows, errors = [], []
    net = seg.pf.grid.net
    pos = bus_positions(net, seg.graph)
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
        title = (
            f"{grid_name}: K = {zones.k} zones ({zones.method}), error "
            f"loading {err['loading']:.2f} / voltage {err['vm']:.2f}"
        )
        for draw, suffix in ((plot_zones, "png"), (write_zone_map_html, "html")):
            draw(
                seg.graph,
                net,
                zones.zone_of_bus,
                med,
                folder / f"zones_k{zones.k}.{suffix}",
                title,
                pos,
            )
        stage(f"zones: K = {zones.k} indices and map written")
    write_csv(pd.concat(rows, ignore_index=True), folder / "zones.csv", index=False)
    columns = ["k", "zone", "buses", "weight", "medoid", "loading_error", "vm_error"]
    write_csv(
        pd.concat(errors, ignore_index=True)[columns], folder / "zone_errors.csv", index=False
    )


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


def write_results(
    study: StudyResult, folder: Path, workers: int = 1, zones_written: bool = False
) -> None:
    """Every output file of the main job (listed in the README); its zones folder unless
    ``zones_written`` (``run_scenario`` writes it while the markets clear). With ``workers``
    > 1 the plots are drawn by a forked process while this one writes the tables, the big
    tables' text made by ``workers`` more."""
    base = study.base
    if not zones_written:
        write_zones(study.segmentation, study.zone_sets, folder / "zones", base.grid.name)
    pf = base.powerflow
    kpis = study.kpis()
    worst = worst_mtu(pf)
    plots = []
    if has_k_comparison(kpis):
        plots.append(
            functools.partial(plot_k_comparison, kpis, folder / "k_comparison.png", base.grid.name)
        )
    if worst is not None:
        plots.append(
            functools.partial(
                plot_before_after,
                pf,
                {_label(m): m.ac for m in study.markets if m.method != "needs_based"},
                worst,
                folder / "before_after.png",
            )
        )
    with forked(plots, processes=1 if workers > 1 else 0) as drawn:
        _write_tables(study, kpis, worst, folder, workers)
        for _ in drawn:  # here, or waited for
            pass


def _write_tables(
    study: StudyResult, kpis: pd.DataFrame, worst: int | None, folder: Path, workers: int = 1
) -> None:
    """The CSV tables, summary.json and report.md of ``write_results``; the text of the
    big tables made by ``workers`` processes (if more than one) while this one writes it."""
    base, seg = study.base, study.segmentation
    pf = base.powerflow
    write_csv(kpis, folder / "kpis.csv", index=False)
    write_csv(base.powerflow.violations(), folder / "base_case.csv")
    # The tables that grow with resources x MTUs x markets: gzip above GZIP_ABOVE_ROWS rows,
    # their text made by the workers (SimBench MV+LV, 9 markets: 2.4M rows of activations).
    parts = functools.partial(in_order, processes=workers)
    write_table(
        _long(
            [(m, m.bids[m.bids.accepted_mw > 0].drop(columns=["time"])) for m in study.markets]
        ).assign(time=lambda d: pf.times[d.mtu.to_numpy(np.int64)]),
        folder / "accepted_bids.csv",
        map_parts=parts,
    )
    write_table(
        _long([(m, m.dispatch) for m in study.markets]),
        folder / "activations.csv",
        map_parts=parts,
    )
    write_table(
        _long([(m, m.activations) for m in study.markets]),
        folder / "zone_activations.csv",
        map_parts=parts,
    )
    write_csv(_long([(m, m.needs) for m in study.markets]), folder / "needs.csv", index=False)
    write_csv(_long([(m, m.unmet) for m in study.markets]), folder / "unmet.csv", index=False)
    residual = residual_table(study.markets)
    write_csv(residual, folder / "residual_violations.csv", index=False)
    resources = study.resources.table.reset_index()
    write_csv(resources, folder / "resources.csv", index=False)
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
        "reference_mtu": {
            "position": seg.reference_mtu,
            "time": str(pf.times[seg.reference_mtu]),
            "rule": seg.reference_rule,
        },
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


def worst_mtu(pf: HorizonPowerFlow) -> int | None:
    """The MTU with the largest base-case violation (overload in percent points, voltage x 100)."""
    over, dev = violated_state(pf.grid, pf.loading_percent, pf.vm_pu)
    score = (over.max(axis=1) + 100 * dev.max(axis=1)).fillna(0.0)
    return int(score.to_numpy().argmax()) if score.max() > 0 else None


def run_scenario(
    scenario: Scenario,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = False,
    workers: int = 1,
) -> Path:
    """Run the main job of ``scenario`` and write its results folder ``out`` (complete or
    absent); ``workers``: processes clearing markets at once (``run_study``)."""
    started = time.perf_counter()
    with result_folder(out, overwrite=overwrite) as folder:
        study = run_study(
            scenario,
            progress=progress,
            workers=workers,
            alongside=lambda seg, zone_sets: write_zones(
                seg, zone_sets, folder / "zones", seg.pf.grid.name
            ),
        )
        write_results(study, folder, workers=workers, zones_written=True)
    stage(f"results written to {out}")
    if progress_elapsed_s() is None:  # the command line says it in its last stage line
        log.info("finished in %.1f s", time.perf_counter() - started)
    return Path(out)
