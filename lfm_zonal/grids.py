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

from lfm_zonal.errors import GridError, InputError

log = logging.getLogger(__name__)

#: Default operating limits (a scenario can override each one).
DEFAULT_VM_MIN_PU = 0.95
DEFAULT_VM_MAX_PU = 1.05
DEFAULT_LOADING_MAX_PERCENT = 100.0


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
}

_SYNTHETIC = re.compile(r"^synthetic_radial_(\d+)(?:_seed(\d+))?$")


def synthetic_radial_feeder(n_bus: int = 1000, seed: int = 0) -> pp.pandapowerNet:
    """A seeded radial 110/20 kV grid of exactly ``n_bus`` buses (for scaling tests).

    Feeders of about 100 buses leave the MV busbar; each grows as a trunk with
    laterals (each new bus hangs off the last one with probability 0.75, else off
    a random earlier bus). Every MV bus has a load, about 30% have PV. Geodata
    draw each feeder as a fan in its own sector around the substation.
    """
    if n_bus < 4:
        raise InputError(f"synthetic_radial_{n_bus}: needs at least 4 buses")
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
    pp.create_transformer(net, hv, mv, std_type="63 MVA 110/20 kV", parallel=2)
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
        "any pandapower JSON network (profiles from a CSV file or one MTU as stored)"
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
            origin = "seeded synthetic radial feeder (lfm_zonal.grids.synthetic_radial_feeder)"
            net = synthetic_radial_feeder(int(m.group(1)), int(m.group(2) or 0))
        elif text in simbench_codes():
            name, profiles = text, "simbench"
            origin = f"SimBench {text} (Meinecke et al. 2020, simbench package)"
            net = simbench_net(text)
        elif text.lower().endswith(".json") or Path(text).exists():
            net = _read_json(Path(text))
            name, origin, profiles = Path(text).stem, f"pandapower JSON file {text}", "synthetic"
        else:
            raise InputError(
                f"unknown grid '{text}': give a built-in name ({', '.join(BUILTIN_GRIDS)}), "
                "synthetic_radial_<N>, a SimBench code or a path to a pandapower JSON file "
                "(`lfm-zonal grids` lists them)"
            )
    _check_and_normalise(net, name)
    return Grid(name=name, net=net, origin=origin, profile_source=profiles, **limits)


def _read_json(path: Path) -> pp.pandapowerNet:
    if not path.is_file():
        raise InputError(f"grid file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = pp.from_json(str(path))
    except Exception as exc:  # pandapower raises many types for a bad file
        raise InputError(f"{path}: not a readable pandapower JSON network ({exc})") from None
    if not isinstance(net, pp.pandapowerNet) or "bus" not in net:
        raise InputError(f"{path}: not a pandapower network")
    return net


def _check_and_normalise(net: pp.pandapowerNet, name: str) -> None:
    """Refuse what the engine cannot model; make loads constant-power (documented)."""
    if len(net.bus) == 0:
        raise GridError(f"grid {name}: has no bus")
    slack = net.ext_grid[net.ext_grid.in_service.astype(bool)]
    if len(slack) == 0 and not (len(net.gen) and net.gen.get("slack", False).any()):
        raise GridError(f"grid {name}: has no in-service ext_grid (slack)")
    for table in ("line", "trafo"):
        for col in ("from_bus", "to_bus") if table == "line" else ("hv_bus", "lv_bus"):
            missing = ~net[table][col].isin(net.bus.index)
            if missing.any():
                idx = net[table].index[missing][0]
                raise GridError(
                    f"grid {name}: {table} {idx} refers to unknown bus {net[table].at[idx, col]}"
                )
    if len(net.trafo) and (net.trafo.df.astype(float) <= 0).any():
        idx = net.trafo.index[net.trafo.df.astype(float) <= 0][0]
        raise GridError(f"grid {name}: trafo {idx} has rating factor df <= 0")
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
