"""Flexibility resources: generated from the grid's loads and sgens, or read from a CSV file.

A resource is one flexible unit behind a bus, owned by an aggregator. Its change
of net injection is "up" (load reduction, generation increase, storage
discharge) or "down" (load increase, curtailment, storage charge); reactive power
changes with it by ``tan_phi`` (the power factor of the change). Availability
is MW per MTU and direction; storage also has an energy capacity, an initial state
of charge and a one-way efficiency.

CSV columns (one row per resource)::

    resource_id, aggregator, bus, kind (load|sgen|storage), direction (up|down|both),
    p_max_mw, cost_up_eur_per_mwh, cost_down_eur_per_mwh (empty: a direction not offered),
    [tan_phi], [energy_mwh, soc_init_mwh, efficiency]   (storage)

or, for offers that change hour by hour, the long form (one row per resource,
direction and MTU; MTUs not listed offer nothing; load and sgen resources)::

    resource_id, aggregator, bus, kind (load|sgen), direction (up|down),
    time (or mtu: its position in the horizon), available_mw, price_eur_per_mwh, [tan_phi]

A time not in the horizon is skipped (a day of offers serves any shorter horizon).

Every malformed row is refused with a message naming the file, row and column.

**Within physics.** A load's up flexibility (its reduction) never exceeds what it
consumes, and an sgen's down flexibility (curtailment) never exceeds what it
produces, in every MTU. Generated resources are shares (at most 1) of their
element's own profile. A CSV load or sgen resource stands for no single element:
per MTU, the up availability of the load resources at a bus is capped at the
bus's load consumption (profile x scaling, summed over its in-service loads), and
the down availability of its sgen resources at the bus's sgen output; several
resources at one bus share the cap pro rata. A capped resource is named in a
warning with its bus and largest excess. A load's increase (down) and an sgen's
increase (up) are left as offered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from lfm_zonal.config import DEFAULTS
from lfm_zonal.errors import InputError
from lfm_zonal.files.inputs import read_csv_cells
from lfm_zonal.grid.powerflow import HorizonPowerFlow
from lfm_zonal.grid.sources import MAX_ELEMENT_MW

log = logging.getLogger(__name__)

KINDS = ("load", "sgen", "storage")
DIRECTIONS = ("up", "down", "both")
#: Bounds of a resources CSV: a price beyond any market's sane penalty of unmet need, a
#: power factor of the change below 0.1 (|tan_phi| > 10), or more MW than an element can hold.
MAX_PRICE_EUR_PER_MWH = 1e6
MAX_TAN_PHI = 10.0
TABLE_COLUMNS = [
    "aggregator",
    "bus",
    "kind",
    "element",
    "tan_phi",
    "cost_up_eur_per_mwh",
    "cost_down_eur_per_mwh",
    "energy_mwh",
    "soc_init_mwh",
    "efficiency",
]


@dataclass(frozen=True)
class Resources:
    """``table``: one row per resource (index ``resource_id``, columns TABLE_COLUMNS);
    ``up_mw`` and ``down_mw``: available MW per MTU (time x resource_id); ``up_price`` and
    ``down_price``: EUR/MWh per MTU where offers change hour by hour (None: the table's
    cost columns hold in every MTU)."""

    table: pd.DataFrame
    up_mw: pd.DataFrame
    down_mw: pd.DataFrame
    up_price: pd.DataFrame | None = None
    down_price: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.table)

    def price_eur_per_mwh(self, direction: str) -> np.ndarray:
        """Offer price per MTU and resource (time x resource, the table's order)."""
        frame = self.up_price if direction == "up" else self.down_price
        if frame is not None:
            return frame[self.table.index].to_numpy(float)
        column = self.table[f"cost_{direction}_eur_per_mwh"].to_numpy(float)
        return np.broadcast_to(column, (len(self.up_mw), len(self.table)))

    def priced_above(self, cap_eur_per_mwh: float) -> tuple[int, float]:
        """Resources offering some MW at a price above ``cap_eur_per_mwh`` in some MTU, and
        the dearest such price (0, nan: none)."""
        dear, dearest = np.zeros(len(self.table), bool), np.nan
        for direction, mw in (("up", self.up_mw), ("down", self.down_mw)):
            price = self.price_eur_per_mwh(direction)
            above = (mw[self.table.index].to_numpy(float) > 0) & (price > cap_eur_per_mwh)
            if above.any():
                dear |= above.any(axis=0)
                dearest = np.fmax(dearest, price[above].max())
        return int(dear.sum()), float(dearest)

    @property
    def is_storage(self) -> pd.Series:
        return self.table.kind == "storage"

    def capacity_per_bus(self) -> pd.Series:
        """Largest available MW (up or down) summed per bus: the segmentation's capacity weights."""
        peak = np.maximum(self.up_mw.max(), self.down_mw.max())
        return peak.groupby(self.table.bus).sum().rename("flexible_capacity_mw")


def _name(path, row_no: int, text: str, column: str) -> str:
    """A resource_id or aggregator, stripped; printable, as it is written into warnings and
    tables."""
    value = text.strip()
    if not value.isprintable():
        raise InputError(f"{path}, row {row_no}: {column} {value!r} holds a control character")
    return value


_DEFAULT = DEFAULTS["flexibility"]  # the one source of defaults: lfm_zonal.config


@dataclass(frozen=True)
class FlexibilitySpec:
    """How a scenario turns the grid's loads and sgens into resources (all shares of the element's MW)."""

    load_up_share: float = _DEFAULT["load_up_share"]
    load_down_share: float = _DEFAULT["load_down_share"]
    sgen_down_share: float = _DEFAULT["sgen_down_share"]
    units_per_element: int = _DEFAULT["units_per_element"]
    n_aggregators: int = _DEFAULT["n_aggregators"]
    storage_units: int = _DEFAULT["storage_units"]
    storage_p_mw: float = _DEFAULT["storage_p_mw"]
    storage_hours: float = _DEFAULT["storage_hours"]
    storage_efficiency: float = _DEFAULT["storage_efficiency"]
    # Costs: mean and standard deviation (EUR/MWh).
    cost_load_up: tuple[float, float] = tuple(_DEFAULT["cost_load_up"])
    cost_load_down: tuple[float, float] = tuple(_DEFAULT["cost_load_down"])
    cost_sgen_down: tuple[float, float] = tuple(_DEFAULT["cost_sgen_down"])
    cost_storage: tuple[float, float] = tuple(_DEFAULT["cost_storage"])


def _costs(rng: np.random.Generator, mean_std: tuple[float, float], n: int) -> np.ndarray:
    """Normal costs conditioned on >= 1 EUR/MWh (no free flexibility), rounded to cents.

    ``limits.truncated_normal``: at most 100 redraw rounds (the stream of the former
    redraw loop), then scipy.stats' truncated normal for the rest, so bounded.
    """
    from lfm_zonal.limits import truncated_normal

    mean, std = mean_std
    if std == 0:
        return np.round(np.maximum(rng.normal(mean, std, n), 1.0), 2)
    return np.round(truncated_normal(rng, mean, std, 1.0, np.inf, n), 2)


def generate_resources(pf: HorizonPowerFlow, spec: FlexibilitySpec, seed: int) -> Resources:
    """Resources from every in-service load and sgen on an energised bus, plus storage units.

    Each element is split into ``units_per_element`` units with random shares
    (Dirichlet), each owned by a random aggregator: the customers behind one
    substation do not all sign with the same aggregator.
    """
    rng = np.random.default_rng(seed)
    net, prof = pf.grid.net, pf.profiles
    energised = set(pf.model.buses)
    # The table's columns and each unit's (up, down) per MTU, unit by unit.
    columns: dict[str, list] = {name: [] for name in ("resource_id", *TABLE_COLUMNS)}
    up, down = [], []
    aggregators = [f"A{i + 1}" for i in range(spec.n_aggregators)]
    # A load cannot reduce more than it consumes, an sgen not curtail more than it produces.
    load_up_share = min(spec.load_up_share, 1.0)
    sgen_down_share = min(spec.sgen_down_share, 1.0)
    if (load_up_share, sgen_down_share) != (spec.load_up_share, spec.sgen_down_share):
        log.warning(
            "load_up_share %g and sgen_down_share %g capped at 1: a load cannot reduce more "
            "than it consumes, an sgen cannot curtail more than it produces",
            spec.load_up_share,
            spec.sgen_down_share,
        )

    def add(
        rid: str,
        aggregator: str,
        bus: int,
        kind: str,
        element: int,
        tan_phi: float,
        cost_up: float,
        cost_down: float,
        storage: tuple = (np.nan, np.nan, np.nan),
    ):
        values = (rid, aggregator, bus, kind, element, tan_phi, cost_up, cost_down, *storage)
        for column, value in zip(columns.values(), values, strict=True):
            column.append(value)

    def add_units(
        kind: str,
        element: int,
        bus: int,
        tan_phi: float,
        up_mw: np.ndarray,
        down_mw: np.ndarray,
        cost_up: tuple,
        cost_down: tuple,
    ) -> None:
        shares = (
            rng.dirichlet(np.ones(spec.units_per_element))
            if spec.units_per_element > 1
            else np.ones(1)
        )
        c_up, c_down = _costs(rng, cost_up, len(shares)), _costs(rng, cost_down, len(shares))
        owner = rng.integers(0, len(aggregators), len(shares))
        for u, share in enumerate(shares):
            rid = f"{kind}{element}" + (f"-{u}" if len(shares) > 1 else "")
            add(rid, aggregators[owner[u]], bus, kind, element, tan_phi, c_up[u], c_down[u])
            up.append(share * up_mw)
            down.append(share * down_mw)

    for kind, table, p_frame, q_frame in (
        ("load", net.load, prof.load_p_mw, prof.load_q_mvar),
        ("sgen", net.sgen, prof.sgen_p_mw, prof.sgen_q_mvar),
    ):
        # Every element's columns at once (a column of a wide frame at a time: most of the
        # time of this function on a big grid).
        elements = table.index.to_numpy()
        scale = table.scaling.to_numpy(float)
        p_all = np.clip(p_frame[elements].to_numpy() * scale, 0.0, None)
        q_all = q_frame[elements].to_numpy() * scale
        buses, in_service = table.bus.to_numpy(np.int64), table.in_service.to_numpy(bool)
        for j, element in enumerate(elements.tolist()):
            bus = int(buses[j])
            if not in_service[j] or bus not in energised:
                continue
            p = p_all[:, j]
            if not p.any():
                continue
            q = q_all[:, j]
            peak = int(np.argmax(p))
            tan_phi = float(q[peak] / p[peak]) if p[peak] > 0 else 0.0
            if kind == "load":
                add_units(
                    kind,
                    element,
                    bus,
                    tan_phi,
                    load_up_share * p,
                    spec.load_down_share * p,
                    spec.cost_load_up,
                    spec.cost_load_down,
                )
            else:
                add_units(
                    kind,
                    element,
                    bus,
                    tan_phi,
                    0.0 * p,
                    sgen_down_share * p,
                    spec.cost_sgen_down,
                    spec.cost_sgen_down,
                )
    if spec.storage_units:
        load_buses = sorted({int(b) for b in net.load.bus if b in energised})
        if not load_buses:
            raise InputError("storage units need load buses to sit at; the grid has none energised")
        sites = rng.choice(
            load_buses, size=spec.storage_units, replace=spec.storage_units > len(load_buses)
        )
        costs = _costs(rng, spec.cost_storage, spec.storage_units)
        owner = rng.integers(0, len(aggregators), spec.storage_units)
        n = len(prof.horizon.times)
        energy = spec.storage_p_mw * spec.storage_hours
        for i, bus in enumerate(sites):
            storage = (energy, 0.5 * energy, spec.storage_efficiency)
            add(
                f"storage{i}",
                aggregators[owner[i]],
                int(bus),
                "storage",
                -1,
                0.0,
                costs[i],
                costs[i],
                storage,
            )
            up.append(np.full(n, spec.storage_p_mw))
            down.append(np.full(n, spec.storage_p_mw))
    ids = columns["resource_id"]
    return _assemble(
        pd.DataFrame(columns) if ids else pd.DataFrame(),
        dict(zip(ids, up, strict=True)),
        dict(zip(ids, down, strict=True)),
        prof.horizon.times,
    )


def _assemble(rows: pd.DataFrame, up: dict, down: dict, times: pd.DatetimeIndex) -> Resources:
    if rows.empty:
        table = pd.DataFrame(columns=["resource_id", *TABLE_COLUMNS]).set_index("resource_id")
    else:
        table = rows.set_index("resource_id")[TABLE_COLUMNS]
    table = table.astype({"bus": np.int64, "element": np.int64}) if len(table) else table
    ids = table.index
    frame = {  # one 2-D array each (a frame from a dict of thousands of columns: 10x slower)
        name: pd.DataFrame(
            np.column_stack(
                [np.broadcast_to(np.asarray(d[r], float), len(times)) for r in ids]
                or [np.zeros((len(times), 0))]
            ),
            index=times,
            columns=ids,
        )
        for name, d in (("up", up), ("down", down))
    }
    for f in frame.values():
        f.columns.name = "resource_id"
    return Resources(table, frame["up"], frame["down"])


def _bus_of(path: Path, row_no: int, rid: str, text: str, pf: HorizonPowerFlow) -> int:
    """The energised pandapower bus a resource row names, or one InputError line."""
    try:
        bus = int(text)
    except ValueError:
        raise InputError(
            f"{path}, row {row_no} ({rid!r}): bus {text!r} is not a bus index"
        ) from None
    if bus not in pf.model.bus_lookup.index:
        where = "not energised" if bus in pf.grid.net.bus.index else "unknown"
        raise InputError(
            f"{path}, row {row_no} ({rid!r}): bus {bus} is {where} in grid {pf.grid.name}"
        )
    return bus


LONG_FORM_REQUIRED = [
    "resource_id",
    "aggregator",
    "bus",
    "kind",
    "direction",
    "available_mw",
    "price_eur_per_mwh",
]


def _read_long_form(path: Path, raw: pd.DataFrame, pf: HorizonPowerFlow) -> Resources:
    """Resources from a long-form table (see the module docstring)."""
    when = [c for c in ("time", "mtu") if c in raw.columns]
    if len(when) != 1:
        raise InputError(f"{path}: a long-form table needs one column 'time' or 'mtu'")
    missing = [c for c in LONG_FORM_REQUIRED if c not in raw.columns]
    unknown = [c for c in raw.columns if c not in [*LONG_FORM_REQUIRED, *when, "tan_phi"]]
    if missing or unknown:
        what = f"missing column(s) {', '.join(missing)}" if missing else ""
        what += ("; " if missing and unknown else "") + (
            f"unknown column(s) {', '.join(unknown)}" if unknown else ""
        )
        raise InputError(f"{path}: long-form resources table: {what}")
    times = pf.profiles.horizon.times
    n = len(times)
    position = pd.Series(np.arange(n), index=times)
    attributes: dict[str, tuple] = {}
    first_row: dict[str, int] = {}
    offers: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    seen: set[tuple[str, str, int]] = set()
    skipped = 0

    def number(row_no: int, rid: str, column: str, text: str, low: float, high: float) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (np.isfinite(value) and low <= value <= high):
            raise InputError(
                f"{path}, row {row_no} ({rid!r}): {column} must be a finite number in "
                f"[{low:g}, {high:g}], got {text!r}"
            )
        return value

    for i, rec in enumerate(raw.to_dict("records")):
        row_no = i + 2
        rid = _name(path, row_no, rec["resource_id"], "resource_id")
        if not rid:
            raise InputError(f"{path}, row {row_no}: empty resource_id")
        kind, direction = rec["kind"].strip(), rec["direction"].strip()
        if kind not in ("load", "sgen"):
            raise InputError(
                f"{path}, row {row_no} ({rid!r}): kind {kind!r}: the long form takes load or "
                "sgen resources (storage needs the one-row form, for its state of charge)"
            )
        if direction not in ("up", "down"):
            raise InputError(
                f"{path}, row {row_no} ({rid!r}): direction {direction!r} (expected up or down)"
            )
        bus = _bus_of(path, row_no, rid, rec["bus"], pf)
        text = rec.get("tan_phi", "").strip()
        tan_phi = number(row_no, rid, "tan_phi", text, -MAX_TAN_PHI, MAX_TAN_PHI) if text else 0.0
        attrs = (_name(path, row_no, rec["aggregator"], "aggregator") or "A1", bus, kind, tan_phi)
        if attributes.setdefault(rid, attrs) != attrs:
            raise InputError(
                f"{path}, row {row_no} ({rid!r}): aggregator, bus, kind or tan_phi differ from "
                f"row {first_row[rid]} of the same resource"
            )
        first_row.setdefault(rid, row_no)
        stamp = rec[when[0]].strip()
        if when[0] == "mtu":
            t = int(number(row_no, rid, "mtu", stamp, 0, max(n - 1, 0)))
        else:
            try:
                moment = pd.Timestamp(stamp)
            except (ValueError, TypeError):
                raise InputError(
                    f"{path}, row {row_no} ({rid!r}): time {stamp!r} is not a date and time"
                ) from None
            if moment not in position.index:
                skipped += 1
                continue
            t = int(position[moment])
        if (rid, direction, t) in seen:
            raise InputError(
                f"{path}, row {row_no} ({rid!r}): a second {direction} offer in MTU {t}"
            )
        seen.add((rid, direction, t))
        mw, price = offers.setdefault((rid, direction), (np.zeros(n), np.zeros(n)))
        mw[t] = number(row_no, rid, "available_mw", rec["available_mw"], 0, MAX_ELEMENT_MW)
        price[t] = number(
            row_no, rid, "price_eur_per_mwh", rec["price_eur_per_mwh"], 0, MAX_PRICE_EUR_PER_MWH
        )
    if skipped and not offers:  # a wrong date is easy to make: say what it leaves
        log.warning(
            "%s: none of its %d offer row(s) is at an MTU of the horizon %s .. %s "
            "(%g-minute MTUs): every market clears nothing",
            path,
            skipped,
            times[0],
            times[-1],
            pf.profiles.horizon.mtu_minutes,
        )
    elif skipped:
        log.info("%s: %d offer row(s) outside the horizon skipped", path, skipped)
    rows, up, down, prices = [], {}, {}, {"up": {}, "down": {}}
    for rid, (aggregator, bus, kind, tan_phi) in attributes.items():
        mean = {}
        for direction, avail in (("up", up), ("down", down)):
            mw, price = offers.get((rid, direction), (np.zeros(n), np.zeros(n)))
            avail[rid], prices[direction][rid] = mw, price
            mean[direction] = float(np.average(price, weights=mw)) if mw.sum() > 0 else 0.0
        rows.append(
            {
                "resource_id": rid,
                "aggregator": aggregator,
                "bus": bus,
                "kind": kind,
                "element": -1,
                "tan_phi": tan_phi,
                "cost_up_eur_per_mwh": mean["up"],  # offered-MW-weighted mean, for tables
                "cost_down_eur_per_mwh": mean["down"],
                "energy_mwh": np.nan,
                "soc_init_mwh": np.nan,
                "efficiency": np.nan,
            }
        )
    rows = pd.DataFrame(rows)
    _cap_at_bus_totals(rows, up, down, pf)
    res = _assemble(rows, up, down, times)
    price_frames = {
        d: pd.DataFrame(prices[d], index=times, columns=res.table.index) for d in ("up", "down")
    }
    return replace(res, up_price=price_frames["up"], down_price=price_frames["down"])


def read_resources(path: str | Path, pf: HorizonPowerFlow) -> Resources:
    """Resources from a CSV file (see the module docstring); availability constant over the horizon."""
    path = Path(path)
    raw = read_csv_cells(path, "resource file")
    if raw.empty:  # the grid's need without offers; or a file cut short: said either way
        log.warning("%s: no resources (a header and no rows): every market clears nothing", path)
    if "available_mw" in raw.columns or "price_eur_per_mwh" in raw.columns:
        return _read_long_form(path, raw, pf)
    required = [
        "resource_id",
        "aggregator",
        "bus",
        "kind",
        "direction",
        "p_max_mw",
        "cost_up_eur_per_mwh",
        "cost_down_eur_per_mwh",
    ]
    optional = ["tan_phi", "energy_mwh", "soc_init_mwh", "efficiency"]
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    unknown = [c for c in raw.columns if c not in required + optional]
    if unknown:
        raise InputError(f"{path}: unknown column(s) {', '.join(unknown)}")
    seen: set[str] = set()
    rows, up, down = [], {}, {}

    def number(
        row_no: int,
        rec: dict,
        column: str,
        default: float | None = None,
        allow_negative: bool = False,
        bound: float | None = None,
    ) -> float:
        text = rec.get(column, "").strip()
        if text == "" and default is not None:
            return default
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        low = -bound if (allow_negative and bound is not None) else (None if allow_negative else 0)
        if (
            not np.isfinite(value)
            or (low is not None and value < low)
            or (bound is not None and value > bound)
        ):
            what = "a finite number" + ("" if allow_negative else " >= 0")
            if bound is not None:
                what += f" with |{column}| <= {bound:g}" if allow_negative else f" <= {bound:g}"
            raise InputError(
                f"{path}, row {row_no} ({rec['resource_id']!r}): {column} must be {what}, "
                f"got {text!r}"
            )
        return value

    for i, rec in enumerate(raw.to_dict("records")):
        row_no = i + 2  # header is row 1
        rid = _name(path, row_no, rec["resource_id"], "resource_id")
        if not rid:
            raise InputError(f"{path}, row {row_no}: empty resource_id")
        if rid in seen:
            raise InputError(f"{path}, row {row_no}: duplicate resource_id {rid!r}")
        seen.add(rid)
        kind, direction = rec["kind"].strip(), rec["direction"].strip()
        if kind not in KINDS:
            raise InputError(
                f"{path}, row {row_no} ({rid!r}): unknown kind {kind!r} "
                f"(expected {', '.join(KINDS)})"
            )
        if direction not in DIRECTIONS:
            raise InputError(
                f"{path}, row {row_no} ({rid!r}): unknown direction {direction!r} "
                f"(expected {', '.join(DIRECTIONS)})"
            )
        bus = _bus_of(path, row_no, rid, rec["bus"], pf)
        p_max = number(row_no, rec, "p_max_mw", bound=MAX_ELEMENT_MW)
        # The cost of a direction the resource does not offer may be left empty (0).
        cost_up, cost_down = (
            number(
                row_no,
                rec,
                f"cost_{side}_eur_per_mwh",
                0.0 if direction not in (side, "both") else None,
                bound=MAX_PRICE_EUR_PER_MWH,
            )
            for side in ("up", "down")
        )
        tan_phi = number(row_no, rec, "tan_phi", 0.0, allow_negative=True, bound=MAX_TAN_PHI)
        storage = {"energy_mwh": np.nan, "soc_init_mwh": np.nan, "efficiency": np.nan}
        if kind == "storage":
            absent = [c for c in storage if c not in raw.columns]
            if absent:
                raise InputError(
                    f"{path}, row {row_no} ({rid!r}): a storage resource needs the column(s) "
                    f"{', '.join(absent)}"
                )
            storage = {c: number(row_no, rec, c) for c in storage}
            if (
                storage["soc_init_mwh"] > storage["energy_mwh"]
                or not 0 < storage["efficiency"] <= 1
            ):
                raise InputError(
                    f"{path}, row {row_no} ({rid!r}): storage needs "
                    "0 <= soc_init_mwh <= energy_mwh and 0 < efficiency <= 1"
                )
        rows.append(
            {
                "resource_id": rid,
                "aggregator": _name(path, row_no, rec["aggregator"], "aggregator") or "A1",
                "bus": bus,
                "kind": kind,
                "element": -1,
                "tan_phi": tan_phi,
                "cost_up_eur_per_mwh": cost_up,
                "cost_down_eur_per_mwh": cost_down,
                **storage,
            }
        )
        up[rid] = p_max if direction in ("up", "both") else 0.0
        down[rid] = p_max if direction in ("down", "both") else 0.0
    rows = pd.DataFrame(rows)
    _cap_at_bus_totals(rows, up, down, pf)
    return _assemble(rows, up, down, pf.profiles.horizon.times)


def bus_power_mw(pf: HorizonPowerFlow, element: str) -> pd.DataFrame:
    """What the in-service loads (``element="load"``) consume or the sgens (``"sgen"``)
    produce at each bus, per MTU (time x bus, MW >= 0, profile x scaling)."""
    table = pf.grid.net[element]
    frame = pf.profiles.load_p_mw if element == "load" else pf.profiles.sgen_p_mw
    factor = table.scaling.to_numpy(float) * table.in_service.to_numpy(bool)
    p = np.clip(frame[table.index].to_numpy(float) * factor, 0.0, None)
    out = pd.DataFrame(p, index=frame.index, columns=table.bus.to_numpy(np.int64))
    return out.T.groupby(level=0).sum().T


def _cap_at_bus_totals(rows: pd.DataFrame, up: dict, down: dict, pf: HorizonPowerFlow) -> None:
    """Cap (in place) the CSV load resources' up and sgen resources' down availability per MTU
    at what the bus's loads consume / sgens produce, pro rata; a warning names the capped ones."""
    if rows.empty:
        return
    n = len(pf.profiles.horizon.times)
    for kind, avail, what in (
        ("load", up, "up flexibility (load reduction) but its loads consume"),
        ("sgen", down, "down flexibility (curtailment) but its sgens produce"),
    ):
        mine = rows[(rows.kind == kind) & (rows.element == -1)]
        if mine.empty:
            continue
        have = bus_power_mw(pf, kind)
        for bus, group in mine.groupby("bus", sort=True):
            ids = [rid for rid in group.resource_id if np.any(np.asarray(avail[rid]) > 0)]
            if not ids:
                continue
            offered = np.array([np.broadcast_to(np.asarray(avail[r], float), n) for r in ids])
            total = offered.sum(axis=0)
            limit = have[bus].to_numpy() if bus in have.columns else np.zeros(n)
            excess = total - limit
            if excess.max() <= 1e-9:
                continue
            factor = np.where(total > limit, limit / np.where(total > 0, total, 1.0), 1.0)
            for r, o in zip(ids, offered, strict=True):
                avail[r] = o * factor
            worst = int(np.argmax(excess))
            log.warning(
                "resource(s) %s (%s) at bus %d offer %.4g MW of %s %.4g MW in MTU %d: capped "
                "at it in every MTU (largest excess %.4g MW)",
                ", ".join(ids),
                kind,
                bus,
                total[worst],
                what,
                limit[worst],
                worst,
                excess[worst],
            )
