"""Bids: each aggregator's stepwise price-quantity curve per market area, direction and MTU.

A market area is a zone of the segmentation; the nodal market is the zonal one
with one zone per bus. In an area an aggregator offers its resources there as a
merit order of at most ``max_steps`` steps: resources sorted by cost are grouped
into consecutive blocks, each block one step at the quantity-weighted mean cost of
its resources (so a fully accepted step pays exactly their cost) and with their
quantity-weighted ``tan_phi``. Storage units are energy-limited, so each keeps a
step of its own, linked to its state of charge.

``Bids.members`` is the aggregator's private side: which resources stand behind
each step. After clearing, each aggregator dispatches an accepted step to its
resources cheapest first (``dispatch_steps``): that is what the grid sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lfm_zonal.config import DEFAULTS
from lfm_zonal.market.resources import Resources
from lfm_zonal.zones.segmentation import Zones

DEFAULT_MAX_STEPS: int = DEFAULTS["flexibility"]["max_steps"]
STEP_COLUMNS = [
    "bid_id",
    "time",
    "mtu",
    "aggregator",
    "zone",
    "direction",
    "step",
    "quantity_mw",
    "price_eur_per_mwh",
    "tan_phi",
    "resource_id",
]


@dataclass(frozen=True)
class Bids:
    """``steps``: one row per bid step (``resource_id`` is set for storage steps only);
    ``members``: bid_id, resource_id, bus, quantity_mw, cost_eur_per_mwh, tan_phi, by
    bid_id and each step's cheapest first."""

    steps: pd.DataFrame
    members: pd.DataFrame

    def __len__(self) -> int:
        return len(self.steps)


def _offers(resources: Resources, zones: Zones, times: pd.DatetimeIndex) -> pd.DataFrame:
    """One row per resource, MTU and direction with available MW."""
    table = resources.table
    zone_of = zones.zone_of_bus.reindex(table.bus.to_numpy()).to_numpy()
    frames = []
    for direction, avail in (("up", resources.up_mw), ("down", resources.down_mw)):
        q = avail[table.index].to_numpy()  # time x resource
        price = resources.price_eur_per_mwh(direction)
        mtu, res = np.nonzero(q > 1e-9)
        frames.append(
            pd.DataFrame(
                {
                    "mtu": mtu,
                    "aggregator": table.aggregator.to_numpy()[res],
                    "zone": zone_of[res].astype(np.int64),
                    "direction": direction,
                    "quantity_mw": q[mtu, res],
                    "cost_eur_per_mwh": price[mtu, res],
                    "resource_id": table.index.to_numpy()[res],
                    "bus": table.bus.to_numpy()[res],
                    "tan_phi": table.tan_phi.to_numpy()[res],
                    "storage": (table.kind.to_numpy() == "storage")[res],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def build_bids(
    resources: Resources, zones: Zones, times: pd.DatetimeIndex, max_steps: int = DEFAULT_MAX_STEPS
) -> Bids:
    """All bid steps of the horizon, in a stable order (see the module docstring)."""
    if len(resources) == 0:  # nothing offered: typed empty tables, so every step downstream runs
        steps = pd.DataFrame(
            {
                "bid_id": np.zeros(0, np.int64),
                "time": pd.DatetimeIndex([]),
                "mtu": np.zeros(0, np.int64),
                "aggregator": np.zeros(0, object),
                "zone": np.zeros(0, np.int64),
                "direction": np.zeros(0, object),
                "step": np.zeros(0, np.int64),
                "quantity_mw": np.zeros(0),
                "price_eur_per_mwh": np.zeros(0),
                "tan_phi": np.zeros(0),
                "resource_id": np.zeros(0, object),
            }
        )
        members = pd.DataFrame(
            {
                "bid_id": np.zeros(0, np.int64),
                "resource_id": np.zeros(0, object),
                "bus": np.zeros(0, np.int64),
                "quantity_mw": np.zeros(0),
                "cost_eur_per_mwh": np.zeros(0),
                "tan_phi": np.zeros(0),
            }
        )
        return Bids(steps[STEP_COLUMNS], members)
    offers = _offers(resources, zones, times)
    # Sorted and grouped on integer codes in the order of the text they stand for (pandas
    # factorises a text column on every sort and group by it: most of this function's time);
    # the text is put back at the end, the same rows in the same order.
    offers, text = _coded(offers, ["aggregator", "direction", "resource_id"])
    curve = ["mtu", "zone", "direction", "aggregator"]
    offers = sorted_rows(offers, [*curve, "storage", "cost_eur_per_mwh", "resource_id"])
    # Block number within each curve: storage units alone, the rest in <= max_steps blocks.
    # (Sorted by curve first, so each curve's offers are consecutive.)
    plain = ~offers.storage.to_numpy()
    keys = [offers[c].to_numpy() for c in curve]
    first = np.ones(len(offers), bool)
    for k in keys:
        first[1:] &= k[1:] == k[:-1]
    first = ~first
    if len(first):
        first[0] = True
    start = np.flatnonzero(first)
    curve_of = np.cumsum(first) - 1
    rank = np.arange(len(offers)) - start[curve_of]
    n_plain = np.add.reduceat(plain.astype(np.int64), start)[curve_of] if len(start) else rank
    block = np.where(
        plain, (rank * max_steps) // np.maximum(n_plain, 1), max_steps + rank - n_plain
    )
    offers["block"] = block
    offers["qc"] = offers.quantity_mw * offers.cost_eur_per_mwh
    offers["qt"] = offers.quantity_mw * offers.tan_phi
    steps = (
        offers.groupby([*curve, "block"], sort=True)
        .agg(
            quantity_mw=("quantity_mw", "sum"),
            qc=("qc", "sum"),
            qt=("qt", "sum"),
            storage=("storage", "first"),
            first_resource=("resource_id", "first"),
        )
        .reset_index()
    )
    steps["group"] = np.arange(len(steps))
    steps["price_eur_per_mwh"] = np.round(steps.qc / steps.quantity_mw, 4)
    steps["tan_phi"] = steps.qt / steps.quantity_mw
    steps = sorted_rows(steps, [*curve[:3], "price_eur_per_mwh", "aggregator", "block"])
    steps["step"] = steps.groupby(curve).cumcount() + 1
    steps["bid_id"] = np.arange(len(steps))
    steps["time"] = times[steps.mtu.to_numpy()]
    # Each offer's step: the offers of a step are consecutive (sorted by curve, then blocks
    # in ascending order within it), the steps were made in that order (numbered by
    # ``group`` before their sort by price).
    new_step = first.copy()
    new_step[1:] |= block[1:] != block[:-1]
    group_of_offer = np.cumsum(new_step) - 1
    bid_of_group = np.empty(len(steps), np.int64)
    bid_of_group[steps.group.to_numpy()] = steps.bid_id.to_numpy()
    offers["bid_id"] = bid_of_group[group_of_offer]
    members = offers[["bid_id", "resource_id", "bus", "quantity_mw", "cost_eur_per_mwh", "tan_phi"]]
    members = sorted_rows(members, ["bid_id", "cost_eur_per_mwh", "resource_id"])
    steps = _decoded(steps, text | {"first_resource": text.get("resource_id")})
    steps["resource_id"] = np.where(steps.storage, steps.first_resource, "")
    return Bids(steps[STEP_COLUMNS], _decoded(members, text))


def _coded(frame: pd.DataFrame, columns: list[str]) -> tuple[pd.DataFrame, dict]:
    """``frame`` with each of ``columns`` (without missing values) as integer codes in the
    sort order of its values (``pandas.factorize(sort=True)``, the order in which pandas
    sorts them), and per column replaced its values by code (for ``_decoded``)."""
    out, text = frame.copy(deep=False), {}
    for column in columns:
        codes, values = pd.factorize(frame[column].to_numpy(), sort=True)
        if len(codes) and codes.min() < 0:  # a missing value: left as it is
            continue
        out[column] = codes.astype(np.int64)
        text[column] = np.asarray(values, dtype=frame[column].dtype)
    return out, text


def sorted_rows(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``frame.sort_values(columns, kind="stable", ignore_index=True)``: by ``np.lexsort``
    (stable too) where every key is numeric without NaN or text, a text key by its codes in
    the order pandas sorts its values (``pandas.factorize(sort=True)``), the same order
    without pandas' sorting machinery; other keys are left to pandas."""
    keys = []
    for column in columns:
        values = frame[column]
        key = values.to_numpy()
        if values.dtype == object and pd.api.types.infer_dtype(key, skipna=False) == "string":
            key = pd.factorize(key, sort=True)[0]
        if key.dtype.kind not in "biuf" or (key.dtype.kind == "f" and np.isnan(key).any()):
            return frame.sort_values(columns, kind="stable", ignore_index=True)
        keys.append(key)
    out = frame.take(np.lexsort(keys[::-1]))
    # A new index, not reset_index (which copies the taken frame again, block by block:
    # 1.2 s of the nodal market's bids on SimBench MV+LV).
    out.index = pd.RangeIndex(len(out))
    return out


def _decoded(frame: pd.DataFrame, text: dict) -> pd.DataFrame:
    """The coded columns of ``frame`` back to their values (``_coded``)."""
    out = frame.copy(deep=False)
    for column, values in text.items():
        if values is not None and column in out:
            out[column] = values[frame[column].to_numpy()]
    return out


def merit_order_fill(
    quantity: np.ndarray, group: np.ndarray, order: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fill each group's target from its steps in merit order (``order``: the steps sorted
    by group, then merit). ``target`` is per step (its group's). Returns, per step in the
    original order, the MW taken (the marginal step partly) and the MW its group took
    before it."""
    q = quantity[order]
    before_sorted = pd.Series(q).groupby(group[order]).cumsum().to_numpy() - q
    taken, before = np.empty(len(q)), np.empty(len(q))
    taken[order] = np.clip(target[order] - before_sorted, 0.0, q)
    before[order] = before_sorted
    return taken, before


def dispatch_steps(bids: Bids, accepted_mw: pd.Series) -> pd.DataFrame:
    """Each aggregator's least-cost dispatch of its accepted steps: cheapest resources first.

    Returns bid_id, resource_id, bus, dispatched_mw, tan_phi (one row per resource used).
    """
    accepted = accepted_mw[accepted_mw.to_numpy() > 0].sort_index()
    # The members of the accepted steps only (a few percent of all on a big grid), found by
    # bisection: they are listed by bid_id, each step's cheapest first.
    listed, ids = bids.members.bid_id.to_numpy(), accepted.index.to_numpy()
    first = np.searchsorted(listed, ids, "left")
    count = np.searchsorted(listed, ids, "right") - first
    members = bids.members.iloc[
        np.arange(count.sum()) + np.repeat(first - count.cumsum() + count, count)
    ]
    dispatched, _ = merit_order_fill(
        members.quantity_mw.to_numpy(),
        members.bid_id.to_numpy(),
        np.arange(len(members)),
        np.repeat(accepted.to_numpy(), count),
    )
    out = members.assign(dispatched_mw=dispatched)
    return out[out.dispatched_mw > 1e-9][
        ["bid_id", "resource_id", "bus", "dispatched_mw", "tan_phi"]
    ]
