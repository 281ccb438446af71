"""Regression against the nodal model: golden nodal results of the shipped scenarios.

For every built-in scenario the nodal market is cleared over its whole horizon and
checked in AC; the KPIs below are stored as JSON (``tests/golden/<scenario>.json``)
and compared with tolerances on every change (``tests/test_regression.py``, in CI).
``lfm-zonal golden`` compares; ``lfm-zonal golden --refresh`` rewrites them on purpose.

Tolerances: LP optima are unique in cost but not always in dispatch (ties between
equal-price steps), so cost and need are tight, volumes looser, and the AC residuals
are compared in absolute terms at the resolution the market promises.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lfm_zonal.check.kpis import GOLDEN_TOLERANCES
from lfm_zonal.errors import InputError
from lfm_zonal.files.outputs import atomic_file, require_outside_system_folders
from lfm_zonal.study.scenario import Scenario, builtin_scenarios, load_scenario

#: KPI -> (relative tolerance, absolute tolerance): the base case's, then the market KPIs'
#: from the KPI schema (``check.kpis``).
GOLDEN_KPIS: dict[str, tuple[float, float]] = {
    "base_loading_max_percent": (1e-6, 1e-6),
    "base_vm_min_pu": (0.0, 1e-7),
    "base_vm_max_pu": (0.0, 1e-7),
    **GOLDEN_TOLERANCES,
}


def nodal_kpis(scenario: Scenario) -> dict[str, float]:
    """The golden KPIs of one scenario: its nodal market over the whole horizon."""
    from lfm_zonal.study.job import base_case_summary, run_study

    values = {section: dict(keys) for section, keys in scenario.values.items()}
    values["market"]["methods"] = ["nodal"]
    study = run_study(Scenario(scenario.path, values))
    kpis = study.markets[0].kpis
    base = base_case_summary(study.base.powerflow)
    out = {
        "base_loading_max_percent": base["loading_max_percent"],
        "base_vm_min_pu": base["vm_min_pu"],
        "base_vm_max_pu": base["vm_max_pu"],
    }
    out |= {key: kpis[key] for key in GOLDEN_KPIS if key in kpis}
    return {key: float(f"{float(v):.10g}") for key, v in out.items()}


def differences(expected: dict[str, float], actual: dict[str, float]) -> list[str]:
    """Every golden KPI outside its tolerance, as readable lines (empty: all agree)."""
    lines = []
    for key, (rel, abs_) in GOLDEN_KPIS.items():
        if key not in expected:
            lines.append(f"{key}: missing in the golden file (refresh it)")
            continue
        e, a = expected[key], actual[key]
        if not math.isclose(a, e, rel_tol=rel, abs_tol=abs_):
            lines.append(f"{key}: {a:.10g} against golden {e:.10g} (rel {rel:g}, abs {abs_:g})")
    return lines


def golden_file(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.json"


def _require_folder(folder: Path) -> None:
    """An existing folder of golden files: they are the repository's, never made here."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder of golden files (give --dir a folder)")
    if not folder.is_dir():
        raise InputError(
            f"{folder}: no such folder of golden files (they are the repository's "
            "tests/golden: run from its root, or give --dir)"
        )


def read_golden(folder: Path, name: str) -> dict[str, float]:
    path = golden_file(folder, name)
    _require_folder(folder)
    if not path.is_file():
        raise InputError(
            f"{path}: no golden file of {name} (record one on purpose, from results you "
            f"have checked: lfm-zonal golden --refresh {name} --dir {folder})"
        )
    try:
        golden = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable golden file ({exc})") from None
    if not isinstance(golden, dict):
        raise InputError(f"{path}: not a golden file (a JSON object of KPIs)")
    for key, value in golden.items():
        if not _is_number(value):
            raise InputError(f"{path}: not a golden file: '{key}' is {value!r}, not a number")
    return golden


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def write_golden(folder: Path, name: str, kpis: dict[str, float]) -> Path:
    path = golden_file(folder, name)
    with atomic_file(path) as partial:
        partial.write_text(json.dumps(kpis, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def scenario_names(names: list[str] | None) -> list[str]:
    known = list(builtin_scenarios())
    for name in names or []:
        if name not in known:
            raise InputError(f"unknown built-in scenario '{name}' (known: {', '.join(known)})")
    return list(names) if names else known


def check(folder: Path, names: list[str] | None = None) -> dict[str, list[str]]:
    """Differences per scenario between its nodal run now and its golden file (every file
    read before the first run: a missing one is reported at once)."""
    golden = {name: read_golden(folder, name) for name in scenario_names(names)}
    return {
        name: differences(kpis, nodal_kpis(load_scenario(name))) for name, kpis in golden.items()
    }


def refresh(folder: Path, names: list[str] | None = None) -> list[Path]:
    """Rewrite the golden files from the current code (on purpose: review the diff); the
    folder must exist and be writable, checked before the first run."""
    folder = Path(folder)
    _require_folder(folder)
    require_outside_system_folders(folder.resolve(), f"--dir {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: the folder of golden files is not writable")
    return [
        write_golden(folder, name, nodal_kpis(load_scenario(name)))
        for name in scenario_names(names)
    ]
