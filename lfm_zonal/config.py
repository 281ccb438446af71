"""One typed model of every input: the scenario TOML and the tender parameters.

This module is the single source of the defaults, types and bounds of what a user
can set (pydantic v2 models, one per TOML section of a scenario, one for the
tender parameters), of the text of ``lfm-zonal scenarios --schema``, and of the
parsing of command-line overrides. Every rejection is one
:class:`~lfm_zonal.errors.InputError` line naming the file and the dotted key::

    case.toml: 'grid.vm_max_pu' must be finite, got inf

Bounds are of two kinds: physics and meaning (a share in [0, 1], an efficiency in
(0, 1], vm_min below vm_max, a cost below the penalty of unmet need, which is the
one price cap of every market), and what keeps the machine safe (no count or
horizon that would allocate without end; every number finite).

The module is imported by the heavy stage modules for their option names
(``MARKET_METHODS`` and the like), so it imports nothing heavy itself: no numpy,
pandas, pandapower, Pyomo or HiGHS (a test checks it).
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from lfm_zonal.errors import InputError

# ----------------------------------------------------------------------------- option names
# The stage modules import these from here (market, sensitivity, segmentation).

MARKET_METHODS = ("nodal", "zonal", "needs_based")
PRICING = ("pay_as_bid", "pay_as_clear")
NEEDS_RULES = ("registered_capacity", "unlimited")
SENSITIVITY_METHODS = ("jacobian", "dc_ptdf", "lindistflow")
SEGMENTATION_METHODS = ("agglomerative", "spectral")
WEIGHT_POLICIES = ("capacity", "uniform", "load")
#: Rules choosing the MTU the zones are computed at (besides an MTU number), default first.
REFERENCE_MTU_RULES = ("worst", "peak")
TRUNCATION_RULES = ("resample", "clip")
NODE_VOLUME_RULES = ("equal_bid_size", "equal_volume")
SIZING_RULES = ("A", "B")

# ----------------------------------------------------------------------------- defaults

DEFAULT_SCENARIO = "cigre_mv_evening_peak"
DEFAULT_VM_MIN_PU = 0.95
DEFAULT_VM_MAX_PU = 1.05
DEFAULT_LOADING_MAX_PERCENT = 100.0
DEFAULT_START = "2016-01-14 00:00"
DEFAULT_PENALTY_EUR_PER_MWH = 10_000.0
DEFAULT_MAX_STEPS = 10

# ----------------------------------------------------------------------------- bounds

#: Beyond any sane price of energy (EUR/MWh): the penalty of unmet need, and so every
#: cost and bid (which must stay below it), is at most this.
MAX_PRICE_EUR_PER_MWH = 1e6
MAX_VM_PU = 2.0
MAX_LOADING_PERCENT = 1_000.0
MAX_SCALE = 1_000.0  # load_scale and sgen_scale
#: One leap year of 15-minute MTUs (a SimBench year).
MAX_N_MTU = 35_136
MAX_MTU_MINUTES = 1_440  # one day
#: pandas' nanosecond timestamps span 1677-09-21 .. 2262-04-11; every MTU stays inside.
EARLIEST_START = datetime(1678, 1, 1)
LATEST_END = datetime(2262, 1, 1)
MAX_ZONES = 100_000
MAX_ZONE_COUNTS = 100  # entries of zones.k
MAX_UNITS_PER_ELEMENT = 100
MAX_AGGREGATORS = 1_000
MAX_STORAGE_UNITS = 10_000
MAX_STORAGE_P_MW = 1_000.0
MAX_STORAGE_HOURS = 1_000.0
MAX_MAX_STEPS = 1_000
# Tender: sizes that bound the candidate arrays (offers x points_per_offer per curve).
MAX_POWER_MW = 100_000.0
MAX_VOLUME_RATIO = 1_000.0
MAX_BIDS_PER_NODE = 1_000
MAX_POINTS_PER_OFFER = 1_000
MAX_CANDIDATES_PER_CURVE = 100_000  # bids per node x points per offer
MAX_MC_SAMPLES = 10_000_000
MAX_STD_RATIO = 10.0
MAX_KURTOSIS = 100.0

_SIMBENCH_CODE = re.compile(r"^1-[A-Za-z_]+-[A-Za-z0-9]+-[A-Za-z0-9.]*-[0-2]-(?:sw|no_sw)$")


def is_simbench_code(source: str) -> bool:
    """Whether ``source`` has the form of a SimBench code (without importing simbench)."""
    return bool(_SIMBENCH_CODE.match(source))


def _rule(key: str, problem: str, value: Any) -> PydanticCustomError:
    """A cross-field rule broken at ``key`` (dotted, relative to the model that raises it)."""
    return PydanticCustomError(
        "lfm_rule", "{problem}", {"key": key, "problem": problem, "value": value}
    )


def time_problem(text: str) -> str | None:
    """Why ``text`` is not a start time lfm-zonal can use, or None: an ISO 8601 date and
    time (``2016-01-14 00:00``, ``2016-01-14T00:00+01:00``) within pandas' time range."""
    if not text.strip():
        return "must be a date and time such as '2016-01-14 00:00', not empty"
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        return "must be an ISO date and time such as '2016-01-14 00:00' or '2016-01-14'"
    if not EARLIEST_START <= t.replace(tzinfo=None) < LATEST_END:
        return (
            f"must lie between {EARLIEST_START:%Y-%m-%d} and {LATEST_END:%Y-%m-%d} "
            "(pandas' time range)"
        )
    return None


# ----------------------------------------------------------------------------- scenario sections

_STRICT = ConfigDict(
    strict=True, allow_inf_nan=False, extra="forbid", frozen=True, defer_build=True
)


def _key(default: Any, doc: str, **bounds) -> Any:
    """A scenario key: its default (lists copied per scenario), meaning and bounds."""
    if isinstance(default, list):
        return Field(default_factory=lambda: list(default), description=doc, **bounds)
    return Field(default=default, description=doc, **bounds)


#: [mean, standard deviation] of a cost in EUR/MWh (each finite and >= 0; the mean > 0 and
#: below the penalty is a rule of the model).
MeanStd = Annotated[
    list[Annotated[float, Field(ge=0, le=MAX_PRICE_EUR_PER_MWH)]],
    Field(min_length=2, max_length=2),
]


class _Section(BaseModel):
    model_config = _STRICT


class GridSection(_Section):
    """[grid]: the feeder and its operating limits."""

    source: str = Field(
        description="built-in name, SimBench code, or pandapower JSON path "
        "(relative to the scenario file)",
        min_length=1,
    )
    vm_min_pu: float = _key(DEFAULT_VM_MIN_PU, "lower voltage limit", gt=0, le=MAX_VM_PU)
    vm_max_pu: float = _key(DEFAULT_VM_MAX_PU, "upper voltage limit", gt=0, le=MAX_VM_PU)
    loading_max_percent: float = _key(
        DEFAULT_LOADING_MAX_PERCENT,
        "loading limit of lines, trafos and trafo3w windings",
        gt=0,
        le=MAX_LOADING_PERCENT,
    )

    @model_validator(mode="after")
    def _band(self) -> GridSection:
        if self.vm_min_pu >= self.vm_max_pu:
            raise _rule(
                "vm_min_pu", f"must be below 'grid.vm_max_pu' ({self.vm_max_pu})", self.vm_min_pu
            )
        return self


class HorizonSection(_Section):
    """[horizon]: the market time units."""

    start: str = _key(
        DEFAULT_START, "start of the first MTU (ISO date and time; no time zone on SimBench)"
    )
    n_mtu: int = _key(96, "number of MTUs", gt=0, le=MAX_N_MTU)
    mtu_minutes: int = _key(15, "length of one MTU", gt=0, le=MAX_MTU_MINUTES)

    @model_validator(mode="after")
    def _within_pandas(self) -> HorizonSection:
        if problem := time_problem(self.start):
            raise _rule("start", problem, self.start)
        end = self.start_time.replace(tzinfo=None) + timedelta(
            minutes=self.n_mtu * self.mtu_minutes
        )
        if end >= LATEST_END:
            raise _rule(
                "n_mtu",
                f"x 'horizon.mtu_minutes' ({self.mtu_minutes}) from {self.start} ends after "
                f"{LATEST_END:%Y-%m-%d} (pandas' time range)",
                self.n_mtu,
            )
        return self

    @property
    def start_time(self) -> datetime:
        return datetime.fromisoformat(self.start.strip())


class ProfilesSection(_Section):
    """[profiles]: load and sgen time series."""

    csv: str = _key("", "CSV file of element profiles (empty: the grid's own source)")
    load_scale: float = _key(1.0, "factor on every load", ge=0, le=MAX_SCALE)
    sgen_scale: float = _key(1.0, "factor on every sgen", ge=0, le=MAX_SCALE)


class SensitivitySection(_Section):
    """[sensitivity]."""

    method: Literal[SENSITIVITY_METHODS] = _key("jacobian", "nodal sensitivity method")


class ZonesSection(_Section):
    """[zones]: the segmentations to compare."""

    k: Annotated[
        list[Annotated[int, Field(gt=0, le=MAX_ZONES)]],
        Field(min_length=1, max_length=MAX_ZONE_COUNTS),
    ] = _key([1, 2, 4, 8], "zone counts to compare (each 1 .. number of buses)")
    method: Literal[SEGMENTATION_METHODS] = _key("agglomerative", "segmentation method")
    weights: Literal[WEIGHT_POLICIES] = _key("capacity", "weights of the virtual bus")
    reference_mtu: Literal[REFERENCE_MTU_RULES] | Annotated[int, Field(ge=0)] = _key(
        "worst",
        'MTU the zones are computed at ("worst": largest base-case violation in MW-equivalent, '
        'peak where none; "peak": highest total load; or an MTU number)',
    )

    @model_validator(mode="after")
    def _distinct(self) -> ZonesSection:
        if len(set(self.k)) != len(self.k):
            raise _rule("k", "must give each zone count once", self.k)
        return self


COSTS = ("cost_load_up", "cost_load_down", "cost_sgen_down", "cost_storage")


class FlexibilitySection(_Section):
    """[flexibility]: resources generated from the grid (or read from a CSV)."""

    csv: str = _key("", "CSV file of resources (empty: generated from the grid)")
    load_up_share: float = _key(0.3, "share of each load that can be reduced", ge=0, le=1)
    load_down_share: float = _key(0.15, "share of each load that can be increased", ge=0, le=1)
    sgen_down_share: float = _key(0.5, "share of each sgen that can be curtailed", ge=0, le=1)
    units_per_element: int = _key(
        1, "resources each load/sgen is split into", gt=0, le=MAX_UNITS_PER_ELEMENT
    )
    n_aggregators: int = _key(3, "number of aggregators", gt=0, le=MAX_AGGREGATORS)
    storage_units: int = _key(
        0, "batteries placed at random load buses", ge=0, le=MAX_STORAGE_UNITS
    )
    storage_p_mw: float = _key(0.5, "battery power", gt=0, le=MAX_STORAGE_P_MW)
    storage_hours: float = _key(2.0, "battery energy / power", gt=0, le=MAX_STORAGE_HOURS)
    storage_efficiency: float = _key(0.95, "one-way efficiency", gt=0, le=1)
    cost_load_up: MeanStd = _key([120.0, 40.0], "[mean, std] EUR/MWh of load reduction")
    cost_load_down: MeanStd = _key([40.0, 15.0], "[mean, std] EUR/MWh of load increase")
    cost_sgen_down: MeanStd = _key([60.0, 20.0], "[mean, std] EUR/MWh of curtailment")
    cost_storage: MeanStd = _key([80.0, 20.0], "[mean, std] EUR/MWh of storage")
    max_steps: int = _key(
        DEFAULT_MAX_STEPS, "steps per aggregator curve and area", gt=0, le=MAX_MAX_STEPS
    )

    @model_validator(mode="after")
    def _means(self) -> FlexibilitySection:
        for name in COSTS:
            if getattr(self, name)[0] <= 0:
                raise _rule(
                    name, "must be [mean, standard deviation] with mean > 0", getattr(self, name)
                )
        return self


class MarketSection(_Section):
    """[market]: which markets clear, and how."""

    methods: Annotated[
        list[Literal[MARKET_METHODS]], Field(min_length=1, max_length=len(MARKET_METHODS))
    ] = _key(list(MARKET_METHODS), "markets to run and compare")
    pricing: Literal[PRICING] = _key("pay_as_bid", "pay_as_bid | pay_as_clear")
    penalty_eur_per_mwh: float = _key(
        DEFAULT_PENALTY_EUR_PER_MWH,
        "price of unmet need (slack penalty): the one price cap of every market",
        gt=0,
        le=MAX_PRICE_EUR_PER_MWH,
    )
    needs: Literal[NEEDS_RULES] = _key(
        "registered_capacity",
        "DSO needs: registered_capacity (each zone capped at its offers) | unlimited",
    )

    @model_validator(mode="after")
    def _distinct(self) -> MarketSection:
        if len(set(self.methods)) != len(self.methods):
            raise _rule("methods", "must name each method once", self.methods)
        return self


class ScenarioConfig(BaseModel):
    """A whole scenario: the top-level keys, then one model per section."""

    model_config = _STRICT

    name: str = _key("scenario", "short name, used in reports", min_length=1, max_length=200)
    description: str = _key("", "what the scenario shows", max_length=10_000)
    seed: int = _key(42, "seed of every random draw", ge=0)
    grid: GridSection
    horizon: HorizonSection = Field(default_factory=HorizonSection)
    profiles: ProfilesSection = Field(default_factory=ProfilesSection)
    sensitivity: SensitivitySection = Field(default_factory=SensitivitySection)
    zones: ZonesSection = Field(default_factory=ZonesSection)
    flexibility: FlexibilitySection = Field(default_factory=FlexibilitySection)
    market: MarketSection = Field(default_factory=MarketSection)

    @model_validator(mode="before")
    @classmethod
    def _grid_table(cls, data: Any) -> Any:
        if isinstance(data, dict) and "grid" not in data:
            data = {**data, "grid": {}}  # a missing [grid] names its required key
        return data

    @model_validator(mode="after")
    def _across_sections(self) -> ScenarioConfig:
        if not self.name.isprintable():  # it is printed on the terminal and in the report
            raise _rule("name", "must hold no control character", self.name)
        ref, n_mtu = self.zones.reference_mtu, self.horizon.n_mtu
        if ref not in REFERENCE_MTU_RULES and ref >= n_mtu:
            raise _rule("zones.reference_mtu", f"must be below 'horizon.n_mtu' ({n_mtu})", ref)
        if is_simbench_code(self.grid.source) and self.horizon.start_time.tzinfo is not None:
            raise _rule(
                "horizon.start",
                f"must have no time zone on the SimBench grid {self.grid.source} "
                "(its profiles are in local time)",
                self.horizon.start,
            )
        cap = self.market.penalty_eur_per_mwh
        for name in COSTS:
            if getattr(self.flexibility, name)[0] >= cap:
                raise _rule(
                    f"flexibility.{name}",
                    f"must have a mean below 'market.penalty_eur_per_mwh' ({cap:g}), "
                    "the one price cap",
                    getattr(self.flexibility, name),
                )
        return self

    def values(self) -> dict[str, dict[str, Any]]:
        """``values[section][key]`` ("" for the top level), as ``Scenario.values`` holds them."""
        out = {"": {key: getattr(self, key) for key in TOP_LEVEL}}
        for section in SECTIONS:
            if section:
                out[section] = getattr(self, section).model_dump()
        return out


#: The keys outside any section (fields of ScenarioConfig itself).
TOP_LEVEL = ("name", "description", "seed")

#: Section name -> model; "" is the top level (ScenarioConfig's own keys).
SECTIONS: dict[str, type[BaseModel]] = {
    "": ScenarioConfig,
    "grid": GridSection,
    "horizon": HorizonSection,
    "profiles": ProfilesSection,
    "sensitivity": SensitivitySection,
    "zones": ZonesSection,
    "flexibility": FlexibilitySection,
    "market": MarketSection,
}


def section_fields(section: str) -> dict[str, FieldInfo]:
    """The keys of a section ("" the top level) with their pydantic field info."""
    fields = SECTIONS[section].model_fields
    return {k: fields[k] for k in TOP_LEVEL} if section == "" else dict(fields)


def _defaults() -> dict[str, dict[str, Any]]:
    out = {}
    for section in SECTIONS:
        out[section] = {
            key: info.get_default(call_default_factory=True)
            for key, info in section_fields(section).items()
            if not info.is_required()
        }
    return out


#: Section -> key -> default (read from the models; required keys absent).
DEFAULTS: dict[str, dict[str, Any]] = _defaults()

#: Rules across keys and sections, as ``lfm-zonal scenarios --schema`` prints them.
RULES = (
    "grid.vm_min_pu < grid.vm_max_pu",
    "horizon.start + n_mtu x mtu_minutes within pandas' time range (1678 .. 2262)",
    "horizon.start without a time zone on a SimBench grid (its profiles are local time)",
    "zones.reference_mtu < horizon.n_mtu",
    "flexibility.cost_*: mean > 0 and below market.penalty_eur_per_mwh (the one price cap)",
    "market.methods: each method once",
)


def validate_scenario(data: dict[str, Any], origin: str) -> ScenarioConfig:
    """The scenario of TOML-like data (top-level keys and section tables), or one InputError
    line naming ``origin`` and the dotted key."""
    try:
        return ScenarioConfig.model_validate(data)
    except ValidationError as exc:
        raise InputError(_scenario_message(exc, origin)) from None


def nested_to_data(nested: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``values[section][key]`` ("" for the top level) as TOML-like data."""
    data = dict(nested.get("", {}))
    data.update({section: keys for section, keys in nested.items() if section})
    return data


# ----------------------------------------------------------------------------- messages

#: Fields whose type is a union: pydantic reports one error per member, cut to the field.
_UNION_FIELDS = ("reference_mtu",)


def _location(error: dict) -> tuple:
    loc = tuple(error["loc"])
    for i, part in enumerate(loc):
        if part in _UNION_FIELDS:
            loc = loc[: i + 1]
            break
    if error["type"] == "lfm_rule" and error["ctx"]["key"]:
        loc = loc + tuple(error["ctx"]["key"].split("."))
    return loc


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:
            out += f".{part}" if out else str(part)
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _interval(metadata: list) -> str | None:
    """ "[0, 1)" for a field bounded on both sides within a share-like range, else None."""
    low = high = None
    for m in metadata:
        if isinstance(m, annotated_types.Gt):
            low = f"({_number(m.gt)}"
        elif isinstance(m, annotated_types.Ge):
            low = f"[{_number(m.ge)}"
        elif isinstance(m, annotated_types.Lt) and m.lt <= 1:
            high = f"{_number(m.lt)})"
        elif isinstance(m, annotated_types.Le) and m.le <= 1:
            high = f"{_number(m.le)}]"
    return f"{low}, {high}" if low and high else None


def _problem(error: dict, metadata: list | None = None) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    bounds = {
        "greater_than": ("gt", ">"),
        "greater_than_equal": ("ge", ">="),
        "less_than": ("lt", "<"),
        "less_than_equal": ("le", "<="),
    }
    if kind in bounds:
        if metadata and (interval := _interval(metadata)):
            return f"must be in {interval}"
        name, sign = bounds[kind]
        return f"must be {sign} {_number(ctx[name])}"
    types = {
        "int_type": "must be of type int",
        "int_parsing": "must be of type int",
        "int_from_float": "must be of type int",
        "float_type": "must be of type float",
        "float_parsing": "must be of type float",
        "string_type": "must be of type str",
        "bool_type": "must be of type bool",
        "bool_parsing": "must be of type bool",
        "list_type": "must be a list",
        "model_type": "must be a table",
        "model_attributes_type": "must be a table",
        "dict_type": "must be a table",
        "finite_number": "must be finite",
        "string_too_short": "must not be empty",
    }
    if kind in types:
        return types[kind]
    if kind == "literal_error":
        return "must be one of " + ", ".join(re.findall(r"'([^']*)'", ctx["expected"]))
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} entries"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} entries"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind == "lfm_rule":
        return ctx["problem"]
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return error["msg"]


def _value(error: dict) -> Any:
    return error["ctx"]["value"] if error["type"] == "lfm_rule" else error["input"]


def _more(errors: list) -> str:
    count = len({_dotted(_location(e)[:2]) for e in errors})
    return f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""


def _errors(exc: ValidationError) -> list[dict]:
    """The errors, unknown keys first (a misspelt key explains the missing one)."""
    unknown = ("extra_forbidden", "unexpected_keyword_argument")
    return sorted(exc.errors(include_url=False), key=lambda e: e["type"] not in unknown)


def _scenario_message(exc: ValidationError, origin: str) -> str:
    errors = _errors(exc)
    error = errors[0]
    loc = _location(error)
    key = _dotted(loc)
    more = _more(errors)
    if error["type"] == "extra_forbidden":
        section = loc[0] if len(loc) > 1 else ""
        if section == "" and isinstance(error["input"], dict):
            known = ", ".join(s for s in SECTIONS if s)
            return f"{origin}: unknown section [{key}] (known: {known})"
        known = ", ".join(_dotted((section, k)) for k in section_fields(section))
        return f"{origin}: unknown key '{key}' (known here: {known})" + more
    section, name = (loc[0], loc[1]) if len(loc) > 1 and loc[0] in SECTIONS else ("", loc[0])
    info = section_fields(section).get(name) if name in SECTIONS[section].model_fields else None
    if error["type"] == "missing" and info is not None:
        return f"{origin}: missing key '{key}' ({info.description})" + more
    if name in _UNION_FIELDS and error["type"] != "lfm_rule":
        problem = 'must be "worst", "peak" or an MTU number >= 0'
    else:
        problem = _problem(error, list(info.metadata) if info is not None else None)
    return f"{origin}: '{key}' {problem}, got {_show(_value(error))}" + more


# ----------------------------------------------------------------------------- field facts


def _members(annotation: Any) -> tuple:
    return get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()


def _kind_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _kind_name(get_args(annotation)[0])
    if origin is Literal:
        return type(get_args(annotation)[0]).__name__
    if origin is list:
        return "list"
    if members := _members(annotation):
        return "/".join(dict.fromkeys(_kind_name(a) for a in members))
    return getattr(annotation, "__name__", str(annotation))


_KINDS = {"str": str, "int": int, "float": float, "list": list, "bool": bool}


def field_kind(section: str, key: str) -> type | tuple[type, ...]:
    """The Python type of a scenario key (``str/int`` keys give a tuple)."""
    name = _kind_name(section_fields(section)[key].annotation)
    kinds = tuple(_KINDS[n] for n in name.split("/"))
    return kinds[0] if len(kinds) == 1 else kinds


def _bounds_text(metadata: list, unit: str = "entries") -> str:
    low = high = lengths = ""
    for m in metadata:
        if isinstance(m, annotated_types.Gt):
            low = f"> {_number(m.gt)}"
        elif isinstance(m, annotated_types.Ge):
            low = f">= {_number(m.ge)}"
        elif isinstance(m, annotated_types.Lt):
            high = f"< {_number(m.lt)}"
        elif isinstance(m, annotated_types.Le):
            high = f"<= {_number(m.le)}"
        elif isinstance(m, annotated_types.MinLen) and m.min_length:
            lengths = f"{m.min_length}+ {unit}"
        elif isinstance(m, annotated_types.MaxLen):
            lengths = f"{lengths.split('+')[0] if lengths else 0}..{m.max_length} {unit}"
    return ", ".join(p for p in (low, high, lengths) if p)


def _rule_text(annotation: Any, metadata: list) -> str:
    """What a field takes, from its type and bounds (for the schema text)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        extra = [m for x in extra for m in (x.metadata if isinstance(x, FieldInfo) else [x])]
        return _rule_text(inner, [*extra, *metadata])
    if origin is Literal:
        return " | ".join(map(str, get_args(annotation)))
    if origin is list:
        (item,) = get_args(annotation)
        lengths = _bounds_text(metadata)
        return f"list of {_rule_text(item, []) or _kind_name(item)}" + (
            f" ({lengths})" if lengths else ""
        )
    if members := _members(annotation):
        return " or ".join(_rule_text(a, []) or _kind_name(a) for a in members)
    text = _bounds_text(metadata, "characters" if annotation is str else "entries")
    if annotation is float:
        return "finite" + (f", {text}" if text else "")
    return text


def _field_lines(fields: dict[str, FieldInfo], defaults: dict[str, Any]) -> list[str]:
    lines = []
    for key, info in fields.items():
        kind = _kind_name(info.annotation)
        default = f"default {defaults[key]!r}" if key in defaults else "required"
        rule = _rule_text(info.annotation, list(info.metadata))
        doc = (info.description or "") + (f" [{rule}]" if rule else "")
        lines.append(f"  {key:<24} {kind:<7} {default:<29} {doc}")
    return lines


def schema_text() -> str:
    """Every scenario key with its type, default, meaning and bounds (``scenarios --schema``)."""
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]" if section else "# top level")
        lines += _field_lines(section_fields(section), DEFAULTS[section])
        lines.append("")
    lines.append("# rules across keys")
    lines += [f"  {rule}" for rule in RULES]
    return "\n".join(lines) + "\n"


def with_overrides(
    nested: dict[str, dict[str, Any]], overrides: dict[tuple[str, str], Any]
) -> dict[str, dict[str, Any]]:
    """``nested`` (section -> key -> value) with command-line values on top: text is read as
    the key's type (a list key takes one value or a list); the model then checks them."""
    out = {section: dict(keys) for section, keys in nested.items()}
    for (section, key), value in overrides.items():
        if value is None:
            continue
        kind = field_kind(section, key)
        if kind is list and not isinstance(value, list):
            value = [value]
        elif isinstance(value, str) and kind in (int, float):
            value = parse_text(_dotted((section, key)), value, kind, "command line")
        out.setdefault(section, {})[key] = value
    return out


# ----------------------------------------------------------------------------- tender parameters


def _tender_field(default: Any, doc: str, **bounds) -> Any:
    return Field(default=default, description=doc, **bounds)


@pydantic_dataclass(frozen=True, config=ConfigDict(strict=True, allow_inf_nan=False))
class TenderParameters:
    """Table I of Vannoni et al. (seed 001), plus the options where the paper is open.

    Every value is checked on construction (also by :meth:`replace`); a bad one is
    one :class:`InputError` line naming the parameter.
    """

    # Offers (per node; sizes relative to mu_mu)
    offered_volume_ratio: float = _tender_field(
        7.5, "sum of the quantity offered at a node / mu_mu", gt=0, le=MAX_VOLUME_RATIO
    )
    bid_size_ratio: float = _tender_field(
        0.3, "average bid size / mu_mu", gt=0, le=MAX_VOLUME_RATIO
    )
    gini: float = _tender_field(0.0, "Gini index of the number of offers across nodes", ge=0, lt=1)
    p_av_mean_ratio: float = _tender_field(0.9, "mean availability price / cap", gt=0, le=1)
    p_av_std_ratio: float = _tender_field(
        0.2, "standard deviation of the availability price / cap", ge=0, le=MAX_STD_RATIO
    )
    p_act_mean_ratio: float = _tender_field(0.9, "mean activation price / cap", gt=0, le=1)
    p_act_std_ratio: float = _tender_field(
        0.2, "standard deviation of the activation price / cap", ge=0, le=MAX_STD_RATIO
    )
    p_av_cap_eur_per_mw_year: float = _tender_field(
        60_000.0, "availability price cap", gt=0, le=MAX_PRICE_EUR_PER_MWH * 8760
    )
    p_act_cap_eur_per_mwh: float = _tender_field(
        500.0, "activation price cap", gt=0, le=MAX_PRICE_EUR_PER_MWH
    )
    # Need
    mu_mu_mw: float = _tender_field(
        8.0, "mean of the average load of the aggregated items", gt=0, le=MAX_POWER_MW
    )
    sigma_mu_mw: float = _tender_field(
        0.0, "standard deviation of the average load among items", ge=0, le=MAX_POWER_MW
    )
    sigma_mw: float = _tender_field(
        2.0, "load standard deviation (forecast uncertainty)", ge=0, le=MAX_POWER_MW
    )
    skewness: float = _tender_field(
        0.0, "skewness of the load (skew-normal need; 0: normal)", gt=-0.99, lt=0.99
    )
    kurtosis: float = _tender_field(
        3.0,
        "kurtosis of the load (Student t need, heavier-tailed; 3: normal, the least)",
        ge=3,
        le=MAX_KURTOSIS,
    )
    capacity_mw: float = _tender_field(4.0, "grid capacity C", ge=0, le=MAX_POWER_MW)
    voll_eur_per_mwh: float = _tender_field(
        28_400.0, "value of lost load", gt=0, le=MAX_PRICE_EUR_PER_MWH
    )
    utilisation: float = _tender_field(0.5, "utilisation factor w", gt=0, le=1)
    # Options
    truncation: Literal[TRUNCATION_RULES] = _tender_field(
        "resample", "prices kept within [0, cap] by resampling or clipping"
    )
    w_on_voll: bool = _tender_field(True, "w weighs the VoLL term too")
    node_volume: Literal[NODE_VOLUME_RULES] = _tender_field(
        "equal_bid_size", "per-node offers of equal bid size or of equal volume"
    )
    sizing_rule: Literal[SIZING_RULES] = _tender_field(
        "A", "spatial aggregation: A (true nodal costs) or B (pooled need)"
    )
    points_per_offer: int = _tender_field(
        32, "candidate quantities inside every offer", ge=1, le=MAX_POINTS_PER_OFFER
    )
    mc_samples: int = _tender_field(
        20_000, "Monte Carlo samples (non-normal need, sizing rule B)", ge=100, le=MAX_MC_SAMPLES
    )

    @model_validator(mode="after")
    def _consistent(self) -> TenderParameters:
        if self.skewness != 0 and self.kurtosis != 3:
            raise _rule(
                "kurtosis",
                "set either 'skewness' (skew-normal need) or 'kurtosis' (Student t need), not both",
                self.kurtosis,
            )
        bids = self.bids_per_node
        if bids > MAX_BIDS_PER_NODE:
            raise _rule(
                "bid_size_ratio",
                f"gives {bids} bids per node (offered_volume_ratio / bid_size_ratio), "
                f"more than {MAX_BIDS_PER_NODE}",
                self.bid_size_ratio,
            )
        if bids * self.points_per_offer > MAX_CANDIDATES_PER_CURVE:
            raise _rule(
                "points_per_offer",
                f"x {bids} bids per node gives {bids * self.points_per_offer} candidate "
                f"quantities per curve, more than {MAX_CANDIDATES_PER_CURVE}",
                self.points_per_offer,
            )
        return self

    @property
    def voll_weight(self) -> float:
        return self.utilisation if self.w_on_voll else 1.0

    @property
    def bids_per_node(self) -> int:
        return max(1, round(self.offered_volume_ratio / self.bid_size_ratio))

    def replace(self, **changes) -> TenderParameters:
        return dataclasses.replace(self, **changes)


TENDER_FIELDS: dict[str, FieldInfo] = TenderParameters.__pydantic_fields__


def _tender_problem(exc: ValidationError) -> tuple[str, str]:
    """(parameter, "'parameter' problem, got value") of a TenderParameters validation."""
    errors = _errors(exc)
    error = errors[0]
    key = _dotted(_location(error))
    if error["type"] == "unexpected_keyword_argument":
        return key, f"unknown tender parameter '{key}' (known: {', '.join(TENDER_FIELDS)})"
    info = TENDER_FIELDS.get(key)
    problem = _problem(error, list(info.metadata) if info is not None else None)
    return key, f"'{key}' {problem}, got {_show(_value(error))}" + _more(errors)


_validated_init = TenderParameters.__init__


def _build(**values: Any) -> TenderParameters:
    """TenderParameters, raising pydantic's ValidationError (the key is still known)."""
    params = object.__new__(TenderParameters)
    _validated_init(params, **values)
    return params


def _init(self, *args, **kwargs) -> None:
    try:
        _validated_init(self, *args, **kwargs)
    except ValidationError as exc:
        raise InputError("tender parameters: " + _tender_problem(exc)[1]) from None


TenderParameters.__init__ = _init  # a bad value is one InputError line wherever it is built


def parse_text(key: str, value: Any, kind: type, source: str) -> Any:
    """A command-line value given as text (``--set sigma_mw=3``) as ``kind``; other values
    pass unchanged (the model checks them: "inf" becomes inf, which it refuses)."""
    if not isinstance(value, str) or kind is str:
        return value
    text = value.strip().lower()
    try:
        if kind is bool:
            if text not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
                raise ValueError(value)
            return text in ("true", "1", "on", "yes")
        return kind(value.strip())
    except ValueError:
        raise InputError(
            f"{source}: '{key}' must be of type {kind.__name__}, got {value!r}"
        ) from None


def tender_parameters(
    values: dict[str, Any], origin: str, overrides: dict[str, Any] | None = None
) -> TenderParameters:
    """Tender parameters from a file's ``values`` (named ``origin``) and command-line
    ``overrides`` (text or typed). Every error is one line naming where the value came
    from (``origin`` or ``command line``) and the parameter."""
    overrides = dict(overrides or {})
    typed = {}
    for source, items in ((origin, values), ("command line", overrides)):
        for key, value in items.items():
            if key not in TENDER_FIELDS:
                known = ", ".join(TENDER_FIELDS)
                raise InputError(f"{source}: unknown tender parameter '{key}' (known: {known})")
            kind = _KINDS[_kind_name(TENDER_FIELDS[key].annotation)]
            # Only the command line gives text to read; a file's values keep their TOML type.
            typed[key] = parse_text(key, value, kind, source) if source != origin else value
    try:
        return _build(**typed)
    except ValidationError as exc:
        key, problem = _tender_problem(exc)
        raise InputError(f"{'command line' if key in overrides else origin}: {problem}") from None


def tender_schema_text() -> str:
    """Every tender parameter with its type, default, meaning and bounds."""
    defaults = {key: info.default for key, info in TENDER_FIELDS.items()}
    lines = ["# tender parameters (keys of a TOML file, or --set KEY=VALUE)"]
    lines += _field_lines(TENDER_FIELDS, defaults)
    return "\n".join(lines) + "\n"
