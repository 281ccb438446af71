"""Scenario files (TOML): a validated schema, built-in scenarios, clear errors.

Every key has a type and a default; an unknown key, a wrong type or a value out
of range is refused with one message that names the file and the key. The
schema is documented in ``scenarios/README.md`` and by ``lfm-zonal scenarios``.
"""

from __future__ import annotations

import importlib.resources
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm_zonal.errors import InputError
from lfm_zonal.grids import DEFAULT_LOADING_MAX_PERCENT, DEFAULT_VM_MAX_PU, DEFAULT_VM_MIN_PU
from lfm_zonal.market import MARKET_METHODS, NEEDS_RULES, PRICING
from lfm_zonal.profiles import DEFAULT_START
from lfm_zonal.segmentation import SEGMENTATION_METHODS, WEIGHT_POLICIES
from lfm_zonal.sensitivity import SENSITIVITY_METHODS

DEFAULT_SCENARIO = "cigre_mv_evening_peak"


@dataclass(frozen=True)
class Key:
    """One scenario key: its type, default, and an optional check returning an error text."""

    kind: type | tuple[type, ...]
    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None


def _positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _one_of(options) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(map(str, options))}"


def _zone_counts(v) -> str | None:
    if not v or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in v):
        return "must be a non-empty list of integers >= 1"
    return None


def _mean_std(v) -> str | None:
    ok = len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    return (
        None
        if ok and v[0] > 0 and v[1] >= 0
        else "must be [mean, standard deviation] with mean > 0"
    )


def _methods(v) -> str | None:
    if not v or any(m not in MARKET_METHODS for m in v) or len(set(v)) != len(v):
        return f"must be a non-empty list of distinct methods out of {', '.join(MARKET_METHODS)}"
    return None


def _share(v) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def _reference_mtu(v) -> str | None:
    if (
        isinstance(v, bool)
        or (isinstance(v, str) and v != "peak")
        or (isinstance(v, int) and v < 0)
    ):
        return 'must be "peak" or an MTU number >= 0'
    return None


SCHEMA: dict[str, dict[str, Key]] = {
    "": {
        "name": Key(str, "scenario", "short name, used in reports"),
        "description": Key(str, "", "what the scenario shows"),
        "seed": Key(int, 42, "seed of every random draw", _non_negative),
    },
    "grid": {
        "source": Key(
            str,
            None,
            "built-in name, SimBench code, or pandapower JSON path (relative to the scenario file)",
        ),
        "vm_min_pu": Key(float, DEFAULT_VM_MIN_PU, "lower voltage limit", _positive),
        "vm_max_pu": Key(float, DEFAULT_VM_MAX_PU, "upper voltage limit", _positive),
        "loading_max_percent": Key(
            float, DEFAULT_LOADING_MAX_PERCENT, "loading limit of lines and trafos", _positive
        ),
    },
    "horizon": {
        "start": Key(str, DEFAULT_START, "start of the first MTU"),
        "n_mtu": Key(int, 96, "number of MTUs", _positive),
        "mtu_minutes": Key(int, 15, "length of one MTU", _positive),
    },
    "profiles": {
        "csv": Key(str, "", "CSV file of element profiles (empty: the grid's own source)"),
        "load_scale": Key(float, 1.0, "factor on every load", _non_negative),
        "sgen_scale": Key(float, 1.0, "factor on every sgen", _non_negative),
    },
    "sensitivity": {
        "method": Key(str, "jacobian", "nodal sensitivity method", _one_of(SENSITIVITY_METHODS)),
    },
    "zones": {
        "k": Key(
            list, [1, 2, 4, 8], "zone counts to compare (each 1 .. number of buses)", _zone_counts
        ),
        "method": Key(str, "agglomerative", "segmentation method", _one_of(SEGMENTATION_METHODS)),
        "weights": Key(str, "capacity", "weights of the virtual bus", _one_of(WEIGHT_POLICIES)),
        "reference_mtu": Key(
            (str, int),
            "peak",
            'MTU the zones are computed at ("peak": highest total load)',
            _reference_mtu,
        ),
    },
    "flexibility": {
        "csv": Key(str, "", "CSV file of resources (empty: generated from the grid)"),
        "load_up_share": Key(float, 0.3, "share of each load that can be reduced", _share),
        "load_down_share": Key(float, 0.15, "share of each load that can be increased", _share),
        "sgen_down_share": Key(float, 0.5, "share of each sgen that can be curtailed", _share),
        "units_per_element": Key(int, 1, "resources each load/sgen is split into", _positive),
        "n_aggregators": Key(int, 3, "number of aggregators", _positive),
        "storage_units": Key(int, 0, "batteries placed at random load buses", _non_negative),
        "storage_p_mw": Key(float, 0.5, "battery power", _positive),
        "storage_hours": Key(float, 2.0, "battery energy / power", _positive),
        "storage_efficiency": Key(float, 0.95, "one-way efficiency", _share),
        "cost_load_up": Key(
            list, [120.0, 40.0], "[mean, std] EUR/MWh of load reduction", _mean_std
        ),
        "cost_load_down": Key(
            list, [40.0, 15.0], "[mean, std] EUR/MWh of load increase", _mean_std
        ),
        "cost_sgen_down": Key(list, [60.0, 20.0], "[mean, std] EUR/MWh of curtailment", _mean_std),
        "cost_storage": Key(list, [80.0, 20.0], "[mean, std] EUR/MWh of storage", _mean_std),
        "max_steps": Key(int, 10, "steps per aggregator curve and area", _positive),
    },
    "market": {
        "methods": Key(
            list, ["nodal", "zonal", "needs_based"], "markets to run and compare", _methods
        ),
        "pricing": Key(str, "pay_as_bid", "pay_as_bid | pay_as_clear", _one_of(PRICING)),
        "penalty_eur_per_mwh": Key(
            float, 10000.0, "price of unmet need (slack penalty)", _positive
        ),
        "needs": Key(
            str,
            "registered_capacity",
            "DSO needs: registered_capacity (each zone capped at its offers) | unlimited",
            _one_of(NEEDS_RULES),
        ),
    },
}


@dataclass(frozen=True)
class Scenario:
    """A validated scenario: ``values[section][key]``, with defaults filled in."""

    path: str
    values: dict[str, dict[str, Any]]

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    @property
    def name(self) -> str:
        return self.values[""]["name"]

    @property
    def seed(self) -> int:
        return self.values[""]["seed"]

    def resolve_path(self, value: str) -> str:
        """A path in the scenario file, relative to the file's folder."""
        p = Path(value)
        if p.is_absolute() or self.path.startswith("builtin:"):
            return str(p)
        return str(Path(self.path).parent / p)


def builtin_scenarios() -> dict[str, str]:
    """Names of the shipped scenarios, with their description."""
    out = {}
    for entry in sorted(
        importlib.resources.files("lfm_zonal.scenarios").iterdir(), key=lambda e: e.name
    ):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            out[entry.name[:-5]] = str(data.get("description", ""))
    return out


def load_scenario(spec: str | Path | None = None) -> Scenario:
    """A scenario by built-in name or path to a TOML file (default: the built-in default)."""
    spec = str(spec) if spec is not None else DEFAULT_SCENARIO
    if not spec.endswith(".toml") and spec in builtin_scenarios():
        text = (
            importlib.resources.files("lfm_zonal.scenarios")
            .joinpath(f"{spec}.toml")
            .read_text(encoding="utf-8")
        )
        return parse_scenario(text, f"builtin:{spec}")
    path = Path(spec)
    if not path.is_file():
        known = ", ".join(builtin_scenarios())
        raise InputError(f"scenario not found: {spec} (not a file; built-in scenarios: {known})")
    return parse_scenario(path.read_text(encoding="utf-8"), str(path))


def parse_scenario(text: str, origin: str) -> Scenario:
    """A scenario from TOML text; ``origin`` names it in error messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{origin}: not valid TOML ({exc})") from None
    nested: dict[str, dict[str, Any]] = {"": {}}
    for name, value in raw.items():
        if isinstance(value, dict):
            if name not in SCHEMA or name == "":
                raise InputError(
                    f"{origin}: unknown section [{name}] "
                    f"(known: {', '.join(s for s in SCHEMA if s)})"
                )
            nested[name] = value
        else:
            nested[""][name] = value
    return Scenario(origin, validate_values(nested, origin))


def validate_values(nested: dict[str, dict[str, Any]], origin: str) -> dict[str, dict[str, Any]]:
    """Check every key of ``nested`` (section -> key -> value) and fill in the defaults."""
    values: dict[str, dict[str, Any]] = {section: {} for section in SCHEMA}
    for section, keys in nested.items():
        for key, value in keys.items():
            values[section][key] = _validated(origin, section, key, value)
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            if key not in values[section]:
                if spec.default is None:
                    raise InputError(
                        f"{origin}: missing key '{_dotted(section, key)}' ({spec.doc})"
                    )
                values[section][key] = spec.default
    g = values["grid"]
    if g["vm_min_pu"] >= g["vm_max_pu"]:
        raise InputError(
            f"{origin}: 'grid.vm_min_pu' ({g['vm_min_pu']}) must be below "
            f"'grid.vm_max_pu' ({g['vm_max_pu']})"
        )
    return values


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _validated(origin: str, section: str, key: str, value: Any) -> Any:
    spec = SCHEMA[section].get(key)
    name = _dotted(section, key)
    if spec is None:
        known = ", ".join(_dotted(section, k) for k in SCHEMA[section])
        raise InputError(f"{origin}: unknown key '{name}' (known here: {known})")
    kind = spec.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if not ok:
        kind_name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise InputError(f"{origin}: key '{name}' must be of type {kind_name}, got {value!r}")
    if spec.check is not None and (problem := spec.check(value)):
        raise InputError(f"{origin}: key '{name}' {problem}, got {value!r}")
    return value


def schema_text() -> str:
    """The schema as text (for ``lfm-zonal scenarios --schema`` and the docs)."""
    lines = []
    for section, keys in SCHEMA.items():
        lines.append(f"[{section}]" if section else "# top level")
        for key, spec in keys.items():
            kind = (
                spec.kind.__name__
                if isinstance(spec.kind, type)
                else "/".join(k.__name__ for k in spec.kind)
            )
            default = "required" if spec.default is None else f"default {spec.default!r}"
            lines.append(f"  {key:<22} {kind:<6} {default:<22} {spec.doc}")
        lines.append("")
    return "\n".join(lines)
