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

from lfm_zonal.errors import PowerFlowNotConverged
from lfm_zonal.grids import Grid, load_grid
from lfm_zonal.output import result_folder, write_csv, write_json
from lfm_zonal.plots import plot_error_curve, plot_zones
from lfm_zonal.powerflow import HorizonPowerFlow, run_horizon
from lfm_zonal.profiles import Horizon, Profiles, load_profiles
from lfm_zonal.scenario import Scenario
from lfm_zonal.segmentation import Segmentation, Zones, prepare_segmentation
from lfm_zonal.sensitivity import Sensitivities, sensitivities

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
            raise PowerFlowNotConverged("no MTU of the horizon has a converged power flow")
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
    horizon = Horizon(start=h["start"], n_mtu=h["n_mtu"], mtu_minutes=h["mtu_minutes"])
    profiles = load_profiles(
        grid,
        horizon,
        csv=scenario.resolve_path(p["csv"]) if p["csv"] else None,
        load_scale=p["load_scale"],
        sgen_scale=p["sgen_scale"],
    )
    return BaseCase(scenario, grid, profiles, run_horizon(grid, profiles, progress=progress))


def tidy(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """A time x element table as long rows (time, element labels..., value)."""
    out = frame.stack(list(range(frame.columns.nlevels)), future_stack=True).rename(value)
    return out.reset_index()


def write_sensitivities(sens: Sensitivities, folder: Path) -> None:
    """The four matrices as CSV: rows monitored element or bus, columns bus (pandapower indices)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("loading_p", "loading_q", "vm_p", "vm_q"):
        write_csv(getattr(sens, name), folder / f"{name}.csv")


def prepare_segmentation_of(base: BaseCase) -> Segmentation:
    """Segmentation inputs at the scenario's reference MTU."""
    z = base.scenario["zones"]
    ref = base.reference_mtu if z["reference_mtu"] == "peak" else z["reference_mtu"]
    return prepare_segmentation(
        base.powerflow,
        ref,
        sensitivity_method=base.scenario["sensitivity"]["method"],
        weight_policy=z["weights"],
    )


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


def run_scenario(
    scenario: Scenario, out: str | Path, *, overwrite: bool = False, progress: bool = False
) -> Path:
    """Run the main job of ``scenario`` and write its results folder ``out``."""
    started = time.perf_counter()
    base = prepare_base_case(scenario, progress=progress)
    ref = base.reference_mtu
    sens = sensitivities(base.powerflow, ref, scenario["sensitivity"]["method"])
    seg = prepare_segmentation_of(base)
    zone_sets = [
        seg.zones(k, scenario["zones"]["method"], scenario.seed) for k in scenario["zones"]["k"]
    ]
    with result_folder(out, overwrite=overwrite) as folder:
        write_zones(seg, zone_sets, folder / "zones", base.grid.name)
        violations = base.powerflow.violations()
        write_csv(violations, folder / "base_case.csv")
        write_csv(
            tidy(base.powerflow.loading_percent, "loading_percent"),
            folder / "loading_percent.csv",
            index=False,
        )
        write_csv(tidy(base.powerflow.vm_pu, "vm_pu"), folder / "vm_pu.csv", index=False)
        write_sensitivities(sens, folder / "sensitivities")
        summary = {
            "scenario": scenario.name,
            "scenario_source": scenario.path,
            "grid": base.grid.summary() | {"origin": base.grid.origin},
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
            "mtus_not_converged": list(base.powerflow.failures),
            "reference_mtu": {"position": ref, "time": str(base.powerflow.times[ref])},
            "base_case": {
                "loading_max_percent": float(violations.loading_max_percent.max()),
                "mtus_with_overload": int((violations.overloaded_branches > 0).sum()),
                "vm_min_pu": float(violations.vm_min_pu.min()),
                "vm_max_pu": float(violations.vm_max_pu.max()),
                "mtus_with_voltage_violation": int(
                    ((violations.undervoltage_buses + violations.overvoltage_buses) > 0).sum()
                ),
            },
            "sensitivity_method": sens.method,
            "zones": {
                "method": scenario["zones"]["method"],
                "weights": scenario["zones"]["weights"],
                "reference_mtu": seg.reference_mtu,
                "segmentation_error": {
                    str(z.k): seg.indices(z).overall_error()["mean"] for z in zone_sets
                },
            },
            "isolated_buses": list(sens.isolated_buses),
        }
        write_json(summary, folder / "summary.json")
    log.info("finished in %.1f s", time.perf_counter() - started)
    return Path(out)
