"""Grids: built-in test feeders, SimBench networks by code, pandapower JSON files.

A :class:`Grid` is a private copy of a pandapower network plus what the market
needs to know about it: where it comes from, which profiles it has, and its
operating limits (voltage band, loading limit). The caller's network is never
modified.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandapower as pp
import pandapower.networks as pn
import pandas as pd

from lfm_zonal.config import DEFAULTS
from lfm_zonal.errors import GridError, InputError, UnknownGridError
from lfm_zonal.files.inputs import require_file

log = logging.getLogger(__name__)

#: Default operating limits (a scenario can override each one).
DEFAULT_VM_MIN_PU: float = DEFAULTS["grid"]["vm_min_pu"]
DEFAULT_VM_MAX_PU: float = DEFAULTS["grid"]["vm_max_pu"]
DEFAULT_LOADING_MAX_PERCENT: float = DEFAULTS["grid"]["loading_max_percent"]
#: The largest power of one element (load, generator, resource) in MW or Mvar: 10 GW is
#: beyond any distribution grid, so a larger value is a unit mistake.
MAX_ELEMENT_MW = 1e4


@dataclass(frozen=True)
class Grid:
    """A network and its operating limits.

    ``net`` is lfm-zonal's own copy: stages read it and copy it again before
    they change anything. Monitored elements are the in-service lines and
    two-winding transformers (their loading against ``loading_max_percent``)
    and every energised bus (its voltage against the band).
    """

    name: str
    net: pp.pandapowerNet
    origin: str
    profile_source: str  # "simbench" or "synthetic"
    vm_min_pu: float = DEFAULT_VM_MIN_PU
    vm_max_pu: float = DEFAULT_VM_MAX_PU
    loading_max_percent: float = DEFAULT_LOADING_MAX_PERCENT

    def __post_init__(self) -> None:
        if not 0.0 < self.vm_min_pu < self.vm_max_pu:
            raise InputError(
                f"grid {self.name}: voltage band needs 0 < vm_min_pu < vm_max_pu, "
                f"got {self.vm_min_pu} .. {self.vm_max_pu}"
            )
        if not self.loading_max_percent > 0.0:
            raise InputError(
                f"grid {self.name}: loading_max_percent must be > 0, got {self.loading_max_percent}"
            )

    def with_limits(
        self,
        vm_min_pu: float | None = None,
        vm_max_pu: float | None = None,
        loading_max_percent: float | None = None,
    ) -> Grid:
        """The same grid with other operating limits (None keeps the current one)."""
        changes = {
            k: float(v)
            for k, v in {
                "vm_min_pu": vm_min_pu,
                "vm_max_pu": vm_max_pu,
                "loading_max_percent": loading_max_percent,
            }.items()
            if v is not None
        }
        return dataclasses.replace(self, **changes)

    @property
    def monitored_lines(self) -> np.ndarray:
        return self.net.line.index[self.net.line.in_service.to_numpy(bool)].to_numpy()

    @property
    def monitored_trafos(self) -> np.ndarray:
        return self.net.trafo.index[self.net.trafo.in_service.to_numpy(bool)].to_numpy()

    def summary(self) -> dict[str, object]:
        net = self.net
        return {
            "name": self.name,
            "buses": len(net.bus),
            "lines": len(net.line),
            "trafos": len(net.trafo),
            "switches_open": int((~net.switch.closed.astype(bool)).sum()),
            "loads": len(net.load),
            "sgens": len(net.sgen),
            "voltage_levels_kv": sorted({float(v) for v in net.bus.vn_kv}),
            "profiles": self.profile_source,
        }


# --------------------------------------------------------------------------- built-in feeders


def _cigre_mv() -> pp.pandapowerNet:
    return pn.create_cigre_network_mv(with_der="pv_wind")


def _ieee33() -> pp.pandapowerNet:
    net = pn.case33bw()
    # The Baran-Wu data have no thermal ratings (pandapower stores 99999 kA).
    # Ratings are set to 1.25 x the current of the published base case, rounded
    # up to 5 A: a documented, synthetic choice (see grids/README.md).
    pp.runpp(net, numba=False)
    i_ka = net.res_line.i_ka.to_numpy()
    rating_ka = np.ceil(np.maximum(i_ka, 1e-3) * 1.25 / 0.005) * 0.005
    in_service = net.line.in_service.to_numpy(bool)
    # Tie lines (open in the published case) get the rating of the weakest branch.
    rating_ka[~in_service] = rating_ka[in_service].min()
    net.line["max_i_ka"] = rating_ka
    for table in ("res_bus", "res_line", "res_ext_grid", "res_load"):
        net[table] = net[table].iloc[0:0]
    return net


def _mv_oberrhein() -> pp.pandapowerNet:
    # pandapower's "load" case stores loads at scaling 0.6 and PV at scaling 0 (and its
    # "generation" case loads at 0.1, PV at 0.8). The synthetic daily shapes do that work
    # here, so each element keeps the scaling of its own worst case: loads 0.6 (the
    # published peak-load case), PV 0.8 (the published peak-generation case).
    # It runs a power flow with pandapower's default numba=True, whose warning that numba
    # is not installed would precede every command's output: numba is not needed (every
    # power flow of the engine is its own, or pandapower's with numba=False).
    quiet = logging.getLogger("pandapower.auxiliary")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        net = pn.mv_oberrhein()
    finally:
        quiet.setLevel(level)
    net.load["scaling"] = 0.6
    net.sgen["scaling"] = 0.8
    for table in [t for t in net.keys() if t.startswith("res_")]:
        net[table] = net[table].iloc[0:0]
    return net


@dataclass(frozen=True)
class _Builtin:
    build: Callable[[], pp.pandapowerNet]
    origin: str


BUILTIN_GRIDS: dict[str, _Builtin] = {
    "cigre_mv": _Builtin(
        _cigre_mv,
        "CIGRE TF C6.04.02 (2014) European MV benchmark, 20 kV, with PV and wind "
        "(pandapower.networks.create_cigre_network_mv(with_der='pv_wind'))",
    ),
    "ieee33": _Builtin(
        _ieee33,
        "IEEE 33-bus feeder, Baran & Wu (1989), 12.66 kV (pandapower.networks.case33bw); "
        "line ratings synthetic: 1.25 x base-case current",
    ),
    "mv_oberrhein": _Builtin(
        _mv_oberrhein,
        "MV Oberrhein, a real German 20 kV grid of two 110/20 kV substations in two separate "
        "parts as switched (pandapower.networks.mv_oberrhein); loads at scaling 0.6 and PV "
        "at 0.8 (pandapower's load and generation cases)",
    ),
}

_SYNTHETIC = re.compile(r"^synthetic_radial_(\d+)(?:_seed(\d+))?$")


#: Largest synthetic feeder built on request (ten times a large DSO network).
MAX_SYNTHETIC_BUSES = 100_000


def synthetic_radial_feeder(n_bus: int = 1000, seed: int = 0) -> pp.pandapowerNet:
    """A seeded radial 110/20 kV grid of exactly ``n_bus`` buses (for scaling tests).

    Feeders of about 100 buses leave the MV busbar; each grows as a trunk with
    laterals (each new bus hangs off the last one with probability 0.75, else off
    a random earlier bus). Every MV bus has a load, about 30% have PV. The substation has
    one 63 MVA 110/20 kV trafo per 5 feeders (at least 2), so that it carries the load of
    any size (about 12 MW per feeder). Geodata
    draw each feeder as a fan in its own sector around the substation.
    """
    if not 4 <= n_bus <= MAX_SYNTHETIC_BUSES:
        raise InputError(
            f"synthetic_radial_{n_bus}: give between 4 and {MAX_SYNTHETIC_BUSES} buses "
            "(a real DSO network has 5,000-10,000)"
        )
    rng = np.random.default_rng(seed)
    n_mv = n_bus - 2
    n_feeders = max(1, round(n_mv / 100))
    sizes = np.full(n_feeders, n_mv // n_feeders)
    sizes[: n_mv - sizes.sum()] += 1
    # Topology first: parent of every feeder bus (0 = the MV busbar), then positions.
    feeders = []
    for size in sizes:
        parent = [0]
        for k in range(1, size + 1):
            parent.append(k - 1 if (rng.random() < 0.75 or k == 1) else int(rng.integers(1, k)))
        feeders.append(np.array(parent))
    net = pp.create_empty_network(name=f"synthetic_radial_{n_bus}_seed{seed}")
    hv = pp.create_bus(net, 110.0, name="HV", geodata=(0.0, -1.0))
    mv = pp.create_bus(net, 20.0, name="MV busbar", geodata=(0.0, 0.0))
    pp.create_ext_grid(net, hv, vm_pu=1.02)
    pp.create_transformer(
        net, hv, mv, std_type="63 MVA 110/20 kV", parallel=max(2, math.ceil(n_feeders / 5))
    )
    # Draw every element first (same order of draws per bus), then create them in bulk:
    # pandapower's one-element create functions take milliseconds each.
    names, geo, parents, lengths, stds, loads, pvs = [], [], [], [], [], [], []
    for f, parent in enumerate(feeders):
        xy = _fan_layout(
            parent, centre_rad=2 * np.pi * f / n_feeders, width_rad=1.6 * np.pi / n_feeders
        )
        depth = np.zeros(len(parent), int)
        offset = len(names) - 1  # position of this feeder's bus k is offset + k
        for k in range(1, len(parent)):
            depth[k] = depth[parent[k]] + 1
            names.append(f"F{f}-{k}")
            geo.append(tuple(xy[k]))
            parents.append(-1 if parent[k] == 0 else offset + int(parent[k]))
            lengths.append(float(rng.uniform(0.05, 0.25)))
            stds.append(
                "NA2XS2Y 1x240 RM/25 12/20 kV" if depth[k] < 10 else "NA2XS2Y 1x95 RM/25 12/20 kV"
            )
            p_mw = float(rng.uniform(0.04, 0.2))
            loads.append(p_mw)
            if rng.random() < 0.3:
                pvs.append((len(names) - 1, float(rng.uniform(0.05, 0.25))))
    buses = np.asarray(pp.create_buses(net, len(names), 20.0, name=names, geodata=geo))
    parents_arr = np.asarray(parents)
    from_bus = np.where(parents_arr < 0, mv, buses[np.maximum(parents_arr, 0)])
    for std in sorted(set(stds)):  # create_lines takes one standard type per call
        idx = [i for i, s in enumerate(stds) if s == std]
        pp.create_lines(
            net, from_bus[idx], buses[idx], np.asarray(lengths)[idx], std_type=std, index=idx
        )
    net.line = net.line.sort_index()  # line i feeds bus i, as drawn
    p_load = np.asarray(loads)
    pp.create_loads(net, buses, p_mw=p_load, q_mvar=0.33 * p_load)
    if pvs:
        at, p_pv = zip(*pvs, strict=True)
        pp.create_sgens(net, buses[list(at)], p_mw=list(p_pv), type="PV")
    return net


def _fan_layout(parent: np.ndarray, centre_rad: float, width_rad: float) -> np.ndarray:
    """Tree drawn as a fan: radius = depth, angle = the node's leaf-order position in the sector."""
    children: dict[int, list[int]] = {}
    for k in range(1, len(parent)):
        children.setdefault(int(parent[k]), []).append(k)
    leaf_pos = np.zeros(len(parent))
    depth = np.zeros(len(parent))
    counter = 0.0

    def visit(node: int) -> None:  # iterative: feeders are deeper than the recursion limit
        nonlocal counter
        stack = [(node, False)]
        while stack:
            n, done = stack.pop()
            kids = children.get(n, [])
            if done:
                leaf_pos[n] = np.mean(leaf_pos[kids])
                continue
            if not kids:
                leaf_pos[n] = counter
                counter += 1.0
                continue
            stack.append((n, True))
            for c in reversed(kids):
                depth[c] = depth[n] + 1
                stack.append((c, False))

    visit(0)
    angle = centre_rad + width_rad * (leaf_pos / max(counter - 1.0, 1.0) - 0.5)
    radius = 1.0 + depth
    return np.c_[radius * np.cos(angle), radius * np.sin(angle)]


# --------------------------------------------------------------------------- loading


@cache
def simbench_codes() -> tuple[str, ...]:
    import simbench as sb

    return tuple(sb.collect_all_simbench_codes())


def simbench_net(code: str) -> pp.pandapowerNet:
    """SimBench network ``code`` with its profiles, through a cache.

    SimBench extracts a network from its CSV tables in about 3 s, in every process
    that asks. The extracted network is kept as a pickle in the user's cache folder
    (``$LFM_ZONAL_CACHE``, else ``$XDG_CACHE_HOME/lfm-zonal``, else
    ``~/.cache/lfm-zonal``), keyed by the code and the simbench, pandapower and
    pandas versions; ``LFM_ZONAL_CACHE=off`` turns it off. A cache that cannot be read or
    written is skipped, never an error.
    """
    import simbench as sb

    folder = _cache_folder()
    if folder is None:
        return sb.get_simbench_net(code)
    versions = f"sb{sb.__version__}-pp{pp.__version__}-pd{pd.__version__}"
    path = folder / f"simbench-{code}-{versions}.pickle"
    try:
        with path.open("rb") as f:
            return pickle.load(f)
    except Exception:  # missing, truncated or from other package internals: extract again
        pass
    net = sb.get_simbench_net(code)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_bytes(pickle.dumps(net, protocol=pickle.HIGHEST_PROTOCOL))
        partial.replace(path)  # atomic: parallel workers never read half a file
    except OSError as err:
        log.info("SimBench cache not written (%s)", err)
    return net


def _cache_folder() -> Path | None:
    setting = os.environ.get("LFM_ZONAL_CACHE", "")
    if setting.lower() == "off":
        return None
    if setting:
        return Path(setting)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lfm-zonal"


def available_grids() -> dict[str, str]:
    """Grid names that :func:`load_grid` accepts, with their origin."""
    out = {name: b.origin for name, b in BUILTIN_GRIDS.items()}
    out["synthetic_radial_<N>[_seed<S>]"] = "seeded synthetic radial 110/20 kV feeder of N buses"
    for code in simbench_codes():
        if "--0-" in code and ("-MV-" in code or "-LV-" in code):
            out[code] = "SimBench (Meinecke et al. 2020) with its 2016 15-minute profiles"
    out["<path>.json"] = (
        "any pandapower JSON network (profiles from a CSV file, else the synthetic daily shape "
        "applied to its stored powers)"
    )
    return out


def load_grid(
    spec: str | Path | pp.pandapowerNet,
    *,
    vm_min_pu: float = DEFAULT_VM_MIN_PU,
    vm_max_pu: float = DEFAULT_VM_MAX_PU,
    loading_max_percent: float = DEFAULT_LOADING_MAX_PERCENT,
) -> Grid:
    """A grid by built-in name, SimBench code, path to a pandapower JSON file, or net.

    Raises :class:`InputError` naming the problem for an unknown name or a
    missing or malformed file, and :class:`GridError` for a network that
    cannot be modelled (no slack, ...).
    """
    limits = {
        "vm_min_pu": vm_min_pu,
        "vm_max_pu": vm_max_pu,
        "loading_max_percent": loading_max_percent,
    }
    if isinstance(spec, pp.pandapowerNet):
        net = copy.deepcopy(spec)
        name, origin, profiles = (
            str(net.name or "custom"),
            "pandapower net given in Python",
            "synthetic",
        )
    else:
        text = str(spec)
        if text in BUILTIN_GRIDS:
            name, origin, profiles = text, BUILTIN_GRIDS[text].origin, "synthetic"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = BUILTIN_GRIDS[text].build()
        elif m := _SYNTHETIC.match(text):
            name, profiles = text, "synthetic"
            origin = (
                "seeded synthetic radial feeder (lfm_zonal.grid.sources.synthetic_radial_feeder)"
            )
            net = synthetic_radial_feeder(int(m.group(1)), int(m.group(2) or 0))
        elif text in simbench_codes():
            name, profiles = text, "simbench"
            origin = f"SimBench {text} (Meinecke et al. 2020, simbench package)"
            net = simbench_net(text)
        elif text.lower().endswith(".json") or Path(text).exists():
            net = _read_json(Path(text))
            name, origin, profiles = Path(text).stem, f"pandapower JSON file {text}", "synthetic"
        else:
            raise UnknownGridError(
                f"unknown grid '{text}': give a built-in name ({', '.join(BUILTIN_GRIDS)}), "
                "synthetic_radial_<N>, a SimBench code or a path to a pandapower JSON file "
                "(`lfm-zonal grids` lists them)"
            )
    _check_and_normalise(net, name if isinstance(spec, pp.pandapowerNet) else str(spec))
    return Grid(name=name, net=net, origin=origin, profile_source=profiles, **limits)


def _read_json(path: Path) -> pp.pandapowerNet:
    require_file(path, "grid file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = pp.from_json(str(path))
    except Exception as exc:  # pandapower raises many types for a bad file
        raise InputError(f"{path}: not a readable pandapower JSON network ({exc})") from None
    if not isinstance(net, pp.pandapowerNet) or "bus" not in net:
        raise InputError(f"{path}: not a pandapower network")
    tables = ("bus", *(t for t in _BUS_COLUMNS if t in net))
    broken = [t for t in tables if not isinstance(net[t], pd.DataFrame)]
    if broken:
        raise InputError(f"{path}: '{broken[0]}' is not a pandapower table")
    return net


#: Columns of each pandapower table that name a bus.
_BUS_COLUMNS = {
    "line": ("from_bus", "to_bus"),
    "trafo": ("hv_bus", "lv_bus"),
    "trafo3w": ("hv_bus", "mv_bus", "lv_bus"),
    "impedance": ("from_bus", "to_bus"),
    "dcline": ("from_bus", "to_bus"),
    "switch": ("bus",),
    "load": ("bus",),
    "sgen": ("bus",),
    "gen": ("bus",),
    "ext_grid": ("bus",),
    "shunt": ("bus",),
    "storage": ("bus",),
    "ward": ("bus",),
    "xward": ("bus",),
    "asymmetric_load": ("bus",),
    "asymmetric_sgen": ("bus",),
}
#: Table a bus-branch switch points at, by its ``et``.
_SWITCH_TARGET = {"b": "bus", "l": "line", "t": "trafo", "t3": "trafo3w"}
#: Numbers every in-service element needs: (table, column, rule). Rules: "pos" finite > 0,
#: "nonneg" finite >= 0, "finite", "power" finite within +-MAX_ELEMENT_MW, "vm" a slack
#: setpoint within SLACK_VM_RANGE_PU.
_NUMBER_RULES = (
    ("bus", "vn_kv", "pos"),
    ("line", "length_km", "pos"),
    ("line", "r_ohm_per_km", "nonneg"),
    ("line", "x_ohm_per_km", "finite"),
    ("line", "c_nf_per_km", "nonneg"),
    ("line", "max_i_ka", "pos"),
    ("line", "parallel", "pos"),
    ("line", "df", "pos"),
    ("trafo", "sn_mva", "pos"),
    ("trafo", "vn_hv_kv", "pos"),
    ("trafo", "vn_lv_kv", "pos"),
    ("trafo", "vk_percent", "pos"),
    ("trafo", "vkr_percent", "nonneg"),
    ("trafo", "pfe_kw", "nonneg"),
    ("trafo", "i0_percent", "nonneg"),
    ("trafo", "parallel", "pos"),
    ("trafo", "df", "pos"),
    ("trafo3w", "sn_hv_mva", "pos"),
    ("trafo3w", "sn_mv_mva", "pos"),
    ("trafo3w", "sn_lv_mva", "pos"),
    ("trafo3w", "vn_hv_kv", "pos"),
    ("trafo3w", "vn_mv_kv", "pos"),
    ("trafo3w", "vn_lv_kv", "pos"),
    ("trafo3w", "vk_hv_percent", "pos"),
    ("trafo3w", "vk_mv_percent", "pos"),
    ("trafo3w", "vk_lv_percent", "pos"),
    ("impedance", "sn_mva", "pos"),
    ("ext_grid", "vm_pu", "vm"),
    ("ext_grid", "va_degree", "finite"),
    ("gen", "vm_pu", "vm"),
    ("gen", "p_mw", "power"),
    ("load", "p_mw", "power"),
    ("load", "q_mvar", "power"),
    ("load", "scaling", "nonneg"),
    ("sgen", "p_mw", "power"),
    ("sgen", "q_mvar", "power"),
    ("sgen", "scaling", "nonneg"),
    ("shunt", "p_mw", "power"),
    ("shunt", "q_mvar", "power"),
    ("storage", "p_mw", "power"),
    ("storage", "q_mvar", "power"),
)
_RULE_TEXT = {
    "pos": "a finite number > 0",
    "nonneg": "a finite number >= 0",
    "finite": "a finite number",
    "power": f"a finite number within +-{MAX_ELEMENT_MW:g} (the unit is MW or Mvar)",
}
#: Plausible voltage setpoints of a slack or PV generator (p.u.).
SLACK_VM_RANGE_PU = (0.5, 1.5)


def _show(value: object) -> str:
    """A table value for a message: numbers as 0.5 or nan, the rest quoted."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return f"{float(value):g}"
    return repr(value)


def _in_service(table: pd.DataFrame) -> np.ndarray:
    if "in_service" not in table:
        return np.ones(len(table), bool)
    return table.in_service.fillna(False).astype(bool).to_numpy()


def _integer_labels(values: pd.Index | pd.Series) -> tuple[np.ndarray, int | None]:
    """The values as int64, and the position of the first one that is not an integer."""
    numbers = pd.to_numeric(pd.Series(np.asarray(values, dtype=object)), errors="coerce")
    arr = numbers.to_numpy(float)
    bad = ~np.isfinite(arr) | (arr != np.round(arr))
    if bad.any():
        return np.zeros(len(arr), np.int64), int(np.flatnonzero(bad)[0])
    return arr.astype(np.int64), None


def _check_tables(net: pp.pandapowerNet, name: str) -> None:
    """Indices, bus references and element numbers: one GridError naming the element."""
    bus_idx, bad = _integer_labels(net.bus.index)
    if bad is not None:
        raise GridError(
            f"grid {name}: bus index {net.bus.index[bad]!r} (row {bad} of the bus table) "
            "is not an integer"
        )
    net.bus.index = pd.Index(bus_idx)
    for table, columns in _BUS_COLUMNS.items():
        if table not in net or not isinstance(net[table], pd.DataFrame) or len(net[table]) == 0:
            continue
        frame = net[table]
        idx, bad = _integer_labels(frame.index)
        if bad is not None:
            raise GridError(
                f"grid {name}: {table} index {frame.index[bad]!r} (row {bad} of the {table} "
                "table) is not an integer"
            )
        frame.index = pd.Index(idx)
        for col in columns:
            if col not in frame:
                raise GridError(f"grid {name}: the {table} table has no column '{col}'")
            values, bad = _integer_labels(frame[col])
            if bad is not None:
                raise GridError(
                    f"grid {name}: {table} {frame.index[bad]}: {col} {frame[col].iloc[bad]!r} "
                    "is not a bus index"
                )
            missing = ~np.isin(values, bus_idx)
            if missing.any():
                i = int(np.flatnonzero(missing)[0])
                raise GridError(
                    f"grid {name}: {table} {frame.index[i]}: {col} {values[i]} is not a bus "
                    "of the grid"
                )
            frame[col] = values
    if len(net.switch):
        for idx, et, element in zip(
            net.switch.index, net.switch.et, net.switch.element, strict=True
        ):
            target = _SWITCH_TARGET.get(str(et))
            if target is None:
                raise GridError(
                    f"grid {name}: switch {idx}: et {et!r} is not one of {', '.join(_SWITCH_TARGET)}"
                )
            known = net[target].index if target in net else pd.Index([])
            if element not in known:
                absent = "" if len(known) else f" (the grid has no {target} table)"
                raise GridError(
                    f"grid {name}: switch {idx} refers to unknown {target} {element}{absent}"
                )
    for table, col, rule in _NUMBER_RULES:
        if table not in net or not isinstance(net[table], pd.DataFrame) or len(net[table]) == 0:
            continue
        frame = net[table]
        if col not in frame:
            if rule in ("pos", "vm") and table in ("bus", "line", "trafo", "ext_grid"):
                raise GridError(f"grid {name}: the {table} table has no column '{col}'")
            continue
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(float)
        on = _in_service(frame)
        if rule == "pos":
            bad, text = ~(np.isfinite(values) & (values > 0)), _RULE_TEXT[rule]
        elif rule == "nonneg":
            bad, text = ~(np.isfinite(values) & (values >= 0)), _RULE_TEXT[rule]
        elif rule == "finite":
            bad, text = ~np.isfinite(values), _RULE_TEXT[rule]
        elif rule == "power":
            bad, text = ~(np.abs(values) <= MAX_ELEMENT_MW), _RULE_TEXT[rule]
        else:
            lo, hi = SLACK_VM_RANGE_PU
            bad = ~(np.isfinite(values) & (values >= lo) & (values <= hi))
            text = f"a voltage setpoint between {lo} and {hi} p.u."
        bad &= on
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise GridError(
                f"grid {name}: {table} {frame.index[i]}: {col} = {_show(frame[col].iloc[i])}, "
                f"must be {text}"
            )
    if len(net.line):
        on = _in_service(net.line)
        r = net.line.r_ohm_per_km.to_numpy(float)
        x = net.line.x_ohm_per_km.to_numpy(float)
        zero = on & (r == 0) & (x == 0)
        if zero.any():
            i = int(np.flatnonzero(zero)[0])
            raise GridError(
                f"grid {name}: line {net.line.index[i]}: zero impedance (r_ohm_per_km = "
                "x_ohm_per_km = 0); model a zero-impedance connection as a bus-bus switch"
            )
    if len(net.trafo):
        on = _in_service(net.trafo)
        vk = net.trafo.vk_percent.to_numpy(float)
        vkr = net.trafo.vkr_percent.to_numpy(float)
        wrong = on & (vkr > vk)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise GridError(
                f"grid {name}: trafo {net.trafo.index[i]}: vkr_percent ({vkr[i]:g}) exceeds "
                f"vk_percent ({vk[i]:g})"
            )


def _check_and_normalise(net: pp.pandapowerNet, name: str) -> None:
    """Refuse what the engine cannot model; make loads constant-power (documented)."""
    if "bus" not in net or len(net.bus) == 0:
        raise GridError(f"grid {name}: has no bus")
    for table in ("line", "trafo", "load", "sgen", "ext_grid", "gen", "switch"):
        if table not in net or not isinstance(net[table], pd.DataFrame):
            raise GridError(f"grid {name}: has no {table} table (pandapower nets hold every one)")
    _check_tables(net, name)
    slack = net.ext_grid[_in_service(net.ext_grid)]
    gen_slack = (
        len(net.gen) > 0
        and "slack" in net.gen
        and bool((net.gen.slack.fillna(False).astype(bool).to_numpy() & _in_service(net.gen)).any())
    )
    if len(slack) == 0 and not gen_slack:
        raise GridError(f"grid {name}: has no in-service ext_grid (slack)")
    volt_dep = [c for c in net.load.columns if c.startswith(("const_z", "const_i"))]
    if volt_dep and (net.load[volt_dep].fillna(0.0).to_numpy() != 0).any():
        log.warning("grid %s: voltage-dependent loads are modelled as constant power", name)
        net.load[volt_dep] = 0.0
    if len(net.controller):
        log.warning(
            "grid %s: %d controllers are ignored (no controller loop in the market model)",
            name,
            len(net.controller),
        )
