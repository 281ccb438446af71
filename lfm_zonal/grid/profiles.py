"""Horizons and profiles: the loads and sgens of every market time unit (MTU).

Three sources, one result (:class:`Profiles`, one column per pandapower element):

* SimBench grids use their own 2016 profiles (15-minute, one row per quarter hour);
* built-in feeders and JSON files get a documented synthetic daily shape
  (labelled ``synthetic``) applied to the element's stored power;
* a CSV file with one column per element (``load_<index>_p_mw``,
  ``load_<index>_q_mvar``, ``sgen_<index>_p_mw``, ``sgen_<index>_q_mvar``), one row
  per MTU and an optional ``time`` column.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lfm_zonal.config import DEFAULTS
from lfm_zonal.errors import HorizonError, InputError
from lfm_zonal.files.inputs import read_csv_cells
from lfm_zonal.grid.sources import MAX_ELEMENT_MW, Grid

log = logging.getLogger(__name__)

SIMBENCH_YEAR_START = pd.Timestamp("2016-01-01 00:00")
SIMBENCH_STEP_MINUTES = 15
DEFAULT_START: str = DEFAULTS["horizon"]["start"]

# Synthetic daily shapes, hourly values at hh:00, linearly interpolated in between.
# Load: a residential/commercial mix, evening peak 1.0 at 19:00, night valley 0.45.
SYNTHETIC_LOAD_SHAPE = np.array([
    0.55, 0.50, 0.47, 0.45, 0.45, 0.48, 0.58, 0.72, 0.80, 0.80, 0.78, 0.78,
    0.80, 0.78, 0.74, 0.74, 0.78, 0.88, 0.97, 1.00, 0.95, 0.85, 0.73, 0.62,
])  # fmt: skip
# Wind: 0.35 +/- 0.15 over the day, windier at night.
SYNTHETIC_WIND_SHAPE = 0.35 + 0.15 * np.cos(2 * np.pi * np.arange(24) / 24)


def synthetic_pv_shape(hour: np.ndarray) -> np.ndarray:
    """Clear-sky PV output per unit of installed power: 0 before 06:00 and after 20:00, 1 at 13:00."""
    x = np.clip((hour - 6.0) / 14.0, 0.0, 1.0)
    return np.sin(np.pi * x) ** 1.5


@dataclass(frozen=True)
class Horizon:
    """``n_mtu`` market time units of ``mtu_minutes`` each, from ``start``."""

    start: pd.Timestamp = field(default_factory=lambda: pd.Timestamp(DEFAULT_START))
    n_mtu: int = DEFAULTS["horizon"]["n_mtu"]
    mtu_minutes: int = DEFAULTS["horizon"]["mtu_minutes"]

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "start", pd.Timestamp(self.start))
        except (ValueError, TypeError):
            raise InputError(f"horizon start '{self.start}' is not a date and time") from None
        if int(self.n_mtu) != self.n_mtu or self.n_mtu < 1:
            raise InputError(f"horizon needs n_mtu >= 1, got {self.n_mtu}")
        if int(self.mtu_minutes) != self.mtu_minutes or self.mtu_minutes < 1:
            raise InputError(f"horizon needs mtu_minutes >= 1, got {self.mtu_minutes}")

    @property
    def times(self) -> pd.DatetimeIndex:
        return pd.date_range(
            self.start, periods=self.n_mtu, freq=f"{self.mtu_minutes}min", name="time"
        )

    @property
    def mtu_hours(self) -> float:
        return self.mtu_minutes / 60.0


@dataclass(frozen=True)
class Profiles:
    """Active and reactive power of every load and sgen per MTU (index: MTU start time)."""

    horizon: Horizon
    source: str
    load_p_mw: pd.DataFrame
    load_q_mvar: pd.DataFrame
    sgen_p_mw: pd.DataFrame
    sgen_q_mvar: pd.DataFrame

    def total_load_mw(self) -> pd.Series:
        return self.load_p_mw.sum(axis=1)


def load_profiles(
    grid: Grid,
    horizon: Horizon | None = None,
    *,
    csv: str | Path | None = None,
    load_scale: float = 1.0,
    sgen_scale: float = 1.0,
) -> Profiles:
    """Profiles for ``grid`` over ``horizon``: from ``csv`` if given, else the grid's own source.

    ``load_scale`` and ``sgen_scale`` multiply every load and every sgen (both P and Q).
    """
    horizon = horizon or Horizon()
    if csv is not None:
        profiles = _from_csv(grid, horizon, Path(csv))
    elif grid.profile_source == "simbench":
        profiles = _from_simbench(grid, horizon)
    else:
        profiles = _synthetic(grid, horizon)
    if load_scale != 1.0 or sgen_scale != 1.0:
        if (
            not (np.isfinite(load_scale) and np.isfinite(sgen_scale))
            or min(load_scale, sgen_scale) < 0
        ):
            raise InputError(
                f"load_scale and sgen_scale must be finite and >= 0, got {load_scale}, {sgen_scale}"
            )
        notes = [
            note
            for element, scale in (("load", load_scale), ("sgen", sgen_scale))
            if (note := _unscaled(grid, element, scale))
        ]
        profiles = Profiles(
            horizon,
            f"{profiles.source} (loads x{load_scale:g}, sgens x{sgen_scale:g}"
            + "".join(f"; {n}" for n in notes)
            + ")",
            profiles.load_p_mw * load_scale,
            profiles.load_q_mvar * load_scale,
            profiles.sgen_p_mw * sgen_scale,
            profiles.sgen_q_mvar * sgen_scale,
        )
    return profiles


def _unscaled(grid: Grid, element: str, scale: float) -> str:
    """What ``scale`` cannot change: in-service elements at pandapower ``scaling = 0`` stay at
    0 MW whatever their profile (the power flow multiplies by ``scaling``). Refused where that
    is every one of them (the factor would do nothing), else said in a warning and returned as
    a note for the profile label ("" where nothing is left out)."""
    table = grid.net[element]
    if scale == 1.0 or len(table) == 0:
        return ""
    on = table.in_service.fillna(False).astype(bool).to_numpy()
    off = on & (table.scaling.to_numpy(float) == 0)
    if not off.any():
        return ""
    first = table.index[np.flatnonzero(off)[0]]
    if off.sum() == on.sum():
        raise InputError(
            f"profiles.{element}_scale = {scale:g} would change nothing: every in-service "
            f"{element} of grid {grid.name} has pandapower scaling = 0 (first: {element} {first}); "
            f"set their scaling in the grid file to use them, or leave {element}_scale at 1"
        )
    log.warning(
        "grid %s: %d of %d in-service %ss have pandapower scaling = 0 (first: %s %s): "
        "%s_scale x%g leaves them at 0 MW",
        grid.name,
        int(off.sum()),
        int(on.sum()),
        element,
        element,
        first,
        element,
        scale,
    )
    return f"{int(off.sum())} {element}s at pandapower scaling 0 stay at 0 MW"


def _frame(
    values: np.ndarray, times: pd.DatetimeIndex, columns: pd.Index, name: str
) -> pd.DataFrame:
    out = pd.DataFrame(np.asarray(values, dtype=float), index=times, columns=columns.copy())
    out.columns.name = name
    return out


def _synthetic(grid: Grid, horizon: Horizon) -> Profiles:
    net = grid.net
    times = horizon.times
    hour = (times.hour + times.minute / 60.0).to_numpy()
    load_f = np.interp(
        hour, np.arange(25), np.append(SYNTHETIC_LOAD_SHAPE, SYNTHETIC_LOAD_SHAPE[0])
    )
    wind_f = np.interp(
        hour, np.arange(25), np.append(SYNTHETIC_WIND_SHAPE, SYNTHETIC_WIND_SHAPE[0])
    )
    pv_f = synthetic_pv_shape(hour)
    sgen_type = net.sgen.get("type", pd.Series("", index=net.sgen.index)).fillna("").astype(str)
    is_pv = sgen_type.str.upper().str.contains("PV").to_numpy()
    is_wind = sgen_type.str.upper().str.contains("WP|WIND|WT").to_numpy()
    sgen_f = np.where(is_pv, pv_f[:, None], np.where(is_wind, wind_f[:, None], 1.0))
    lp = load_f[:, None] * net.load.p_mw.to_numpy()[None, :]
    lq = load_f[:, None] * net.load.q_mvar.to_numpy()[None, :]
    sp = sgen_f * net.sgen.p_mw.to_numpy()[None, :]
    sq = sgen_f * net.sgen.q_mvar.to_numpy()[None, :]
    return Profiles(
        horizon,
        "synthetic",
        _frame(lp, times, net.load.index, "load"),
        _frame(lq, times, net.load.index, "load"),
        _frame(sp, times, net.sgen.index, "sgen"),
        _frame(sq, times, net.sgen.index, "sgen"),
    )


def _simbench_rows(horizon: Horizon) -> np.ndarray:
    """Row numbers of SimBench's 2016 quarter-hour table covered by each MTU."""
    if horizon.mtu_minutes % SIMBENCH_STEP_MINUTES:
        raise InputError(
            f"SimBench profiles are 15-minute: mtu_minutes must be a multiple of 15, "
            f"got {horizon.mtu_minutes}"
        )
    offset = (horizon.start - SIMBENCH_YEAR_START) / pd.Timedelta(minutes=SIMBENCH_STEP_MINUTES)
    per_mtu = horizon.mtu_minutes // SIMBENCH_STEP_MINUTES
    n_rows = 366 * 96
    first, last = offset, offset + horizon.n_mtu * per_mtu - 1
    if offset != int(offset):
        raise HorizonError(
            f"horizon start {horizon.start}: SimBench profiles are quarter-hourly, start on a "
            "quarter hour (:00, :15, :30 or :45)"
        )
    if first < 0 or last >= n_rows:
        end = SIMBENCH_YEAR_START + pd.Timedelta(minutes=15 * n_rows)
        raise HorizonError(
            f"horizon {horizon.times[0]} .. {horizon.times[-1]} is outside the SimBench profile "
            f"range {SIMBENCH_YEAR_START} .. {end}"
        )
    return (int(offset) + np.arange(horizon.n_mtu * per_mtu)).reshape(horizon.n_mtu, per_mtu)


def _from_simbench(grid: Grid, horizon: Horizon) -> Profiles:
    """SimBench's relative profiles times each element's stored power, averaged per MTU.

    Only the quarter hours of the horizon are read and scaled: the relative tables (a year of
    35,136 rows per profile) are sliced before they are spread over the elements, so the work
    grows with MTUs x elements, not with a year x elements (1-MVLV-rural-all-0-sw: 5,373
    loads, 0.1 s instead of 15 s and 4.7 GB). The numbers are SimBench's
    ``get_absolute_values`` at those rows (tested)."""
    from simbench import merge_dataframes
    from simbench.networks.profiles import get_absolute_profiles_from_relative_profiles

    rows = _simbench_rows(horizon)
    net = grid.net
    first, stop = int(rows.min()), int(rows.max()) + 1
    used = [net.profiles[name] for name in ("load", "powerplants", "renewables")]
    if not all(_quarter_hours_in_order(table, stop) for table in used):
        first, stop = 0, None  # not the year's rows in order: take them by position, whole
    load, powerplants, renewables = (table.iloc[first:stop] for table in used)
    relative = {"load": load, "sgen": merge_dataframes([powerplants, renewables])}
    times = horizon.times
    local = rows - first

    def pick(element: str, column: str) -> pd.DataFrame:
        table = net[element]
        stored = np.broadcast_to(table[column].to_numpy(float), (len(times), len(table)))
        # sb.get_absolute_values gives load P and Q and sgen P; sgen Q stays as stored.
        known = (element, column) in {("load", "p_mw"), ("load", "q_mvar"), ("sgen", "p_mw")}
        if not known or len(table) == 0:
            return _frame(stored, times, table.index, element)
        absolute = get_absolute_profiles_from_relative_profiles(
            net, element, column, relative_profiles=relative[element]
        )
        values = absolute.reindex(columns=table.index).to_numpy(float)
        mean = values[local].mean(axis=1)  # average the quarter hours of each MTU
        return _frame(np.where(np.isnan(mean), stored, mean), times, table.index, element)

    return Profiles(
        horizon,
        "simbench",
        pick("load", "p_mw"),
        pick("load", "q_mvar"),
        pick("sgen", "p_mw"),
        pick("sgen", "q_mvar"),
    )


def _quarter_hours_in_order(table: pd.DataFrame, stop: int) -> bool:
    """Whether a SimBench profile table's rows are the year's quarter hours in order (index
    0, 1, ..., at least ``stop`` of them), so that row i is quarter hour i after slicing."""
    index = table.index
    return (
        len(index) >= stop
        and index.is_unique
        and index.is_monotonic_increasing
        and index[0] == 0
        and index[-1] == len(index) - 1
    )


_CSV_COLUMN = re.compile(r"^(load|sgen)_(\d+)_(p_mw|q_mvar)$")
#: Largest |MW| or |Mvar| a profile value may hold per element (beyond: a unit mistake).


def horizon_check(grid: Grid, csv: str | Path | None = None) -> Callable[[Horizon], None]:
    """A check of horizons against the profile data ``load_profiles(grid, horizon, csv=csv)``
    reads (a CSV read once): it raises load_profiles's one-line InputError for a horizon
    the data does not cover, without reading the values."""
    if csv is not None:
        path = Path(csv)
        table = _csv_table(path)
        return lambda horizon: _csv_rows(path, table, horizon)
    if grid.profile_source == "simbench":
        return _simbench_rows
    return lambda horizon: None  # synthetic profiles cover any horizon


def _csv_table(path: Path) -> pd.DataFrame:
    """A profiles CSV as text cells, indexed by its times where it has a time column."""
    table = read_csv_cells(path, "profile file")
    if len(table) == 0:
        raise InputError(f"{path}: no data row")
    if "time" in table.columns:
        table.index = _csv_times(path, table.pop("time"))
        dup = table.index.duplicated(keep=False)
        if dup.any():
            rows = np.flatnonzero(dup)[:2] + 2
            raise InputError(
                f"{path}, rows {rows[0]} and {rows[1]}, column 'time': "
                f"{table.index[rows[0] - 2]} appears twice"
            )
    return table


def _csv_rows(path: Path, table: pd.DataFrame, horizon: Horizon) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a profiles CSV (``_csv_table``) of each MTU of ``horizon``, as (rows,
    the MTU of each, ascending): by time, every row from the MTU's start to the next one
    (a file finer than the MTUs: the MTU takes their mean, as SimBench's profiles), a row
    at each start required; or the first rows of a table without a time column, one each."""
    times = horizon.times
    if not isinstance(table.index, pd.DatetimeIndex):
        if len(table) < horizon.n_mtu:
            raise InputError(f"{path}: {len(table)} rows, but the horizon has {horizon.n_mtu} MTUs")
        return np.arange(horizon.n_mtu), np.arange(horizon.n_mtu)
    missing = times.difference(table.index)
    if len(missing):
        first, last = table.index.min(), table.index.max()
        step = pd.Series(table.index.sort_values()).diff().median()
        if first <= missing[0] <= last and step > pd.Timedelta(minutes=horizon.mtu_minutes):
            raise InputError(
                f"{path}: no row at {missing[0]}, the start of an MTU: the rows are "
                f"{step.total_seconds() / 60:g} min apart, the MTUs "
                f"{horizon.mtu_minutes:g} min (give a row at the start of every MTU)"
            )
        where = "inside" if first <= missing[0] <= last else "outside"
        raise InputError(
            f"{path}: horizon {times[0]} .. {times[-1]}: no row at {missing[0]}, {where} the "
            f"profile range {first} .. {last}"
        )
    order = np.argsort(table.index.to_numpy(), kind="stable")
    at = table.index.to_numpy()[order]
    lo = np.searchsorted(at, times.to_numpy(), "left")
    hi = np.searchsorted(at, (times + pd.Timedelta(minutes=horizon.mtu_minutes)).to_numpy())
    count = hi - lo
    mtu = np.repeat(np.arange(len(times)), count)
    return order[np.arange(count.sum()) + np.repeat(lo - count.cumsum() + count, count)], mtu


def _from_csv(grid: Grid, horizon: Horizon, path: Path) -> Profiles:
    """Profiles from a CSV file; every malformed cell is refused naming its row and column
    (row 1 is the header). Elements without a column keep their stored power; an element
    with a P column but no Q column gets Q at its stored power factor (q = p x q/p as
    stored; Q as stored where the stored P is 0), said in a warning."""
    table = _csv_table(path)
    rows, mtu = _csv_rows(path, table, horizon)
    per_mtu = np.bincount(mtu, minlength=len(horizon.times))
    if (per_mtu > 1).any():
        log.info("%s: rows finer than the MTUs: each MTU takes the mean of its rows", path)
    times = horizon.times
    net = grid.net
    given: dict[tuple[str, str], dict[int, np.ndarray]] = {
        (e, c): {} for e in ("load", "sgen") for c in ("p_mw", "q_mvar")
    }
    for name in table.columns:
        m = _CSV_COLUMN.match(str(name))
        if m is None:
            raise InputError(
                f"{path}: column '{name}' is not of the form time, load_<index>_p_mw, "
                "load_<index>_q_mvar, sgen_<index>_p_mw or sgen_<index>_q_mvar"
            )
        element, index, column = m.group(1), int(m.group(2)), m.group(3)
        if index not in net[element].index:
            raise InputError(f"{path}: column '{name}': grid {grid.name} has no {element} {index}")
        text = table[name].to_numpy()[rows]
        values = pd.to_numeric(pd.Series(text), errors="coerce").to_numpy(float)
        bad = ~np.isfinite(values) | (np.abs(values) > MAX_ELEMENT_MW)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            why = (
                "not a finite number"
                if not np.isfinite(values[i])
                else f"beyond {MAX_ELEMENT_MW:g} (the unit is MW or Mvar)"
            )
            raise InputError(f"{path}, row {rows[i] + 2}, column '{name}': {text[i]!r} is {why}")
        if len(values) > len(per_mtu):  # the mean of each MTU's rows
            values = np.bincount(mtu, weights=values, minlength=len(per_mtu)) / per_mtu
        given[(element, column)][index] = values
    frames = {}
    for (element, column), columns in given.items():
        stored = np.broadcast_to(
            net[element][column].to_numpy(float), (len(times), len(net[element]))
        )
        frames[(element, column)] = _frame(stored.copy(), times, net[element].index, element)
        for index, values in columns.items():
            frames[(element, column)][index] = values
    for element in ("load", "sgen"):
        p_only = sorted(set(given[(element, "p_mw")]) - set(given[(element, "q_mvar")]))
        q_only = sorted(set(given[(element, "q_mvar")]) - set(given[(element, "p_mw")]))
        if p_only:
            p_stored = net[element].p_mw.reindex(p_only).to_numpy(float)
            q_stored = net[element].q_mvar.reindex(p_only).to_numpy(float)
            tan = np.divide(q_stored, p_stored, out=np.zeros(len(p_only)), where=p_stored != 0)
            p_new = frames[(element, "p_mw")][p_only].to_numpy()
            q = np.where(p_stored != 0, p_new * tan, q_stored)
            frames[(element, "q_mvar")][p_only] = q
            log.warning(
                "%s: %d %s(s) have a P column but no Q column (first: %s_%d_p_mw): their Q "
                "follows P at the grid's stored power factor (q = p x q_stored / p_stored)",
                path,
                len(p_only),
                element,
                element,
                p_only[0],
            )
        if q_only:
            log.warning(
                "%s: %d %s(s) have a Q column but no P column (first: %s_%d_q_mvar): their P "
                "stays at the grid's stored value",
                path,
                len(q_only),
                element,
                element,
                q_only[0],
            )
    return Profiles(horizon, f"csv:{path}", *frames.values())


def _csv_times(path: Path, column: pd.Series) -> pd.DatetimeIndex:
    """The 'time' column as naive timestamps; a bad cell is refused naming its row."""
    text = column.str.strip()
    try:
        parsed = pd.to_datetime(text, errors="coerce", format="ISO8601")
    except (ValueError, TypeError):  # mixed UTC offsets, out-of-range dates
        parsed = pd.Series(
            [pd.to_datetime(t, errors="coerce", format="ISO8601") for t in text], dtype=object
        )
    bad = parsed.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{path}, row {i + 2}, column 'time': {text.iloc[i]!r} is not a date and time "
            "(ISO 8601, such as 2016-01-14 17:00)"
        )
    if not isinstance(parsed.dtype, np.dtype) or parsed.dtype.kind != "M":
        first = next(i for i, t in enumerate(parsed) if getattr(t, "tzinfo", None) is not None)
        raise InputError(
            f"{path}, row {first + 2}, column 'time': {text.iloc[first]!r} has a time zone or "
            "UTC offset; give local times without one, as the horizon's start"
        )
    return pd.DatetimeIndex(parsed, name="time")
