"""Tender sizing on a real feeder: one tender per zone (seed 001 on the zones of seed 000).

Reading (the brief's "need mapped through the zone's sensitivity to its congested
element", made additive so that seed 001's per-node model applies unchanged):

* The **congested element** is the monitored line, trafo or trafo3w winding with the
  largest overload of the horizon, at its worst MTU. Its forecast loading is normal: the base-case
  loading, with a standard deviation from independent load (or, for reverse-flow
  congestion, generation) forecast errors of ``forecast_error`` x their MW,
  propagated through the nodal sensitivities.
* **Relief direction**: up if injections at the buses lower the loading (load-driven),
  down otherwise. The **effect** of bus b is the loading percent that 1 MW of relief
  at b removes; buses whose effect is below ``min_effect`` of the largest, or that
  have no flexibility in that direction, are not nodes.
* The overload is attributed to the nodes in proportion to effect x the MW that
  causes it there (loads for up, sgens for down; by effect alone if none), and each
  node's share is expressed in MW at its own bus: L_b = share_b x loading / effect_b,
  C_b = share_b x limit / effect_b, sigma_b = share_b x sigma_loading / effect_b. The
  nodal needs then add up to exactly the element's overload.
* **Offers**: every resource of the scenario at a node, its available MW at that MTU
  in the relief direction, its own marginal cost as activation price and an
  availability price drawn per Table I (seeded).
* For K zones, every zone with nodes runs one pooled tender (seed 001's spatial
  model: each bus keeps the volume cleared at it, costs evaluated per bus, the
  nodes' loads moving together). The extra cost of K zonal tenders over per-bus
  tenders is c_aggr(K); it is 0 at K = N (one bus per zone), exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lfm_zonal.errors import InputError
from lfm_zonal.grid.sensitivity import sensitivities
from lfm_zonal.grid.violations import beyond_limits
from lfm_zonal.limits import require_memory
from lfm_zonal.market.resources import Resources
from lfm_zonal.tender.sizing import (
    Need,
    Offers,
    TenderParameters,
    check_seeds,
    pooled_tender,
    price_draws,
)
from lfm_zonal.zones.segmentation import Segmentation

DEFAULT_FORECAST_ERROR = 0.1
DEFAULT_MIN_EFFECT = 0.01
MAX_FORECAST_ERROR = 10.0  # a deviation of 10 x the MW forecast: beyond any forecast


@dataclass(frozen=True)
class CongestionNeeds:
    """The congested element and the per-bus needs attributed to it."""

    element: tuple[str, int]
    mtu: int
    time: pd.Timestamp
    direction: str
    loading_percent: float
    loading_sd_percent: float
    limit_percent: float
    nodes: pd.DataFrame  # index bus: effect, share, mu_mw, sigma_mw, capacity_mw, need_mw

    def needs(self, buses) -> list[Need]:
        rows = self.nodes.loc[list(buses)]
        return [
            Need(float(r.mu_mw), float(r.sigma_mw), float(r.capacity_mw)) for r in rows.itertuples()
        ]


def congestion_needs(
    seg: Segmentation,
    resources: Resources,
    forecast_error: float = DEFAULT_FORECAST_ERROR,
    min_effect: float = DEFAULT_MIN_EFFECT,
) -> CongestionNeeds:
    """The congested element of the horizon and its need attributed to the flexible buses."""
    if not (0 <= forecast_error <= MAX_FORECAST_ERROR):
        raise InputError(
            f"the forecast error must be within [0, {MAX_FORECAST_ERROR:g}] (a share of each "
            f"load's MW: 0.1 is a standard deviation of 10%), got {forecast_error}"
        )
    pf = seg.pf
    limit = pf.grid.loading_max_percent
    over = beyond_limits(pf.grid, pf.loading_percent, pf.vm_pu)[0].where(
        pf.converged, np.nan, axis=0
    )
    if not (over.to_numpy() > 0).any():
        raise InputError(
            f"{pf.grid.name}: no monitored line, trafo or trafo3w winding is overloaded in the "
            "horizon; the zonal tender needs a congestion (choose a scenario with overloads)"
        )
    mtu = int(np.nanargmax(over.max(axis=1).to_numpy()))
    element = over.iloc[mtu].idxmax()
    sens = sensitivities(pf, mtu, seg.sensitivity_method).loading_p.loc[element]
    direction = "up" if (-sens).clip(lower=0).sum() >= sens.clip(lower=0).sum() else "down"
    effect = -sens if direction == "up" else sens
    net = pf.grid.net
    profiles = pf.profiles
    load = profiles.load_p_mw.iloc[mtu].groupby(net.load.bus.to_numpy()).sum()
    sgen = profiles.sgen_p_mw.iloc[mtu].groupby(net.sgen.bus.to_numpy()).sum()
    cause = (load if direction == "up" else sgen).reindex(effect.index, fill_value=0.0)
    sd = float(np.sqrt(((sens * cause.abs() * forecast_error) ** 2).sum()))
    available = (resources.up_mw if direction == "up" else resources.down_mw).iloc[mtu]
    flexible = available[available > 1e-9].groupby(resources.table.bus).sum()
    is_node = (effect >= min_effect * effect.max()) & effect.index.isin(flexible.index)
    if not is_node.any():
        raise InputError(
            f"{pf.grid.name}: no bus with {direction} flexibility relieves {element[0]} "
            f"{element[1]}; no tender to size"
        )
    eff = effect[is_node]
    weight = eff * cause[is_node].abs()
    share = (weight if weight.sum() > 0 else eff) / (weight if weight.sum() > 0 else eff).sum()
    loading = float(pf.loading_percent.iloc[mtu][element])
    nodes = pd.DataFrame(
        {
            "effect_percent_per_mw": eff,
            "share": share,
            "mu_mw": share * loading / eff,
            "sigma_mw": share * sd / eff,
            "capacity_mw": share * limit / eff,
            "need_mw": share * (loading - limit) / eff,
            "offered_mw": flexible.reindex(eff.index),
        }
    ).rename_axis("bus")
    return CongestionNeeds(
        element=(str(element[0]), int(element[1])),
        mtu=mtu,
        time=pf.times[mtu],
        direction=direction,
        loading_percent=loading,
        loading_sd_percent=sd,
        limit_percent=float(limit),
        nodes=nodes,
    )


def grid_offers(
    params: TenderParameters,
    resources: Resources,
    congestion: CongestionNeeds,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """One offer per resource at a node: bus, quantity, availability price (Table I draw),
    activation price (the resource's own cost)."""
    direction = congestion.direction
    available = (resources.up_mw if direction == "up" else resources.down_mw).iloc[congestion.mtu]
    table = resources.table.assign(quantity_mw=available.reindex(resources.table.index))
    table = table[table.bus.isin(congestion.nodes.index) & (table.quantity_mw > 1e-9)]
    p_av, _ = price_draws(params, len(table), rng)
    return pd.DataFrame(
        {
            "bus": table.bus.to_numpy(),
            "quantity_mw": table.quantity_mw.to_numpy(),
            "p_av_eur_per_mw_year": p_av,
            "p_act_eur_per_mwh": table[f"cost_{direction}_eur_per_mwh"].to_numpy(),
        },
        index=table.index,
    )


def zonal_tender_study(
    seg: Segmentation,
    resources: Resources,
    ks,
    params: TenderParameters,
    *,
    forecast_error: float = DEFAULT_FORECAST_ERROR,
    seeds=(0, 1, 2, 3, 4),
    segmentation_method: str = "agglomerative",
) -> tuple[pd.DataFrame, CongestionNeeds]:
    """c_aggr of one tender per zone against one tender per bus, for every K in ``ks``."""
    check_seeds(seeds)
    if len(ks) == 0:
        raise InputError("give at least one zone count K")
    congestion = congestion_needs(seg, resources, forecast_error)
    nodes = congestion.nodes.index
    n_offers = int(resources.table.bus.isin(nodes).sum())  # at most one offer per resource
    require_memory(
        "tender grid",
        [
            [(n_offers, "offers"), (params.points_per_offer, "points per offer"), (12, "arrays")],
            [(n_offers, "offers"), (len(nodes), "nodes"), (6, "arrays")],
            [(len(ks), "zone counts"), (len(seeds), "seeds"), (100, "values per row")],
        ],
        hint="lower points_per_offer or ask fewer zone counts or seeds",
    )
    rows = []
    for seed in seeds:
        offers = grid_offers(params, resources, congestion, np.random.default_rng(seed))
        for k in ks:
            zones = seg.zones(int(k), segmentation_method, seed=0)
            zone_of = zones.zone_of_bus.reindex(nodes).to_numpy()
            separate = pooled = q = 0.0
            below = 0
            for z in np.unique(zone_of):
                members = nodes[zone_of == z]
                position = pd.Series(np.arange(len(members)), index=members)
                part = offers[offers.bus.isin(members)]
                case = pooled_tender(
                    params,
                    Offers(
                        position.reindex(part.bus).to_numpy(),
                        part.quantity_mw.to_numpy(),
                        part.p_av_eur_per_mw_year.to_numpy(),
                        part.p_act_eur_per_mwh.to_numpy(),
                    ),
                    congestion.needs(members),
                    np.random.default_rng(seed),
                    correlated=True,
                )
                separate += case.cost_separate_eur_per_h
                pooled += case.cost_pooled_eur_per_h
                q += case.q_pooled_mw
                below += case.nodes_below_median
            err = seg.error(zones)
            rows.append(
                {
                    "k": zones.k,
                    "seed": seed,
                    "tenders": len(np.unique(zone_of)),
                    "nodes": len(nodes),
                    "c_aggr_percent": (pooled - separate) / separate * 100.0,
                    "cost_zonal_eur_per_h": pooled,
                    "cost_per_bus_eur_per_h": separate,
                    "q_procured_mw": q,
                    "nodes_below_median": below,
                    "segmentation_error": err,
                }
            )
    return pd.DataFrame(rows), congestion


def write_zonal_tenders(
    table: pd.DataFrame, congestion: CongestionNeeds, folder, grid_name: str
) -> pd.DataFrame:
    """zonal_tenders.csv (per K and seed), its mean over seeds, the needs per bus, a plot."""
    from lfm_zonal.files.outputs import write_csv
    from lfm_zonal.report.plots import plot_zonal_tenders

    summary = table.drop(columns="seed").groupby("k", sort=True).mean().reset_index()
    write_csv(table, folder / "zonal_tenders.csv", index=False)
    write_csv(summary, folder / "zonal_tenders_summary.csv", index=False)
    write_csv(congestion.nodes, folder / "zonal_tender_needs.csv")
    element = f"{congestion.element[0]} {congestion.element[1]}"
    plot_zonal_tenders(
        summary,
        folder / "zonal_tenders.png",
        f"{grid_name}: one tender per zone for {element} ({congestion.loading_percent:.0f}% "
        f"+/- {congestion.loading_sd_percent:.1f}, {congestion.time}), {congestion.direction}",
    )
    return summary
