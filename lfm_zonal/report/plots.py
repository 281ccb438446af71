"""PNG plots: zones on the grid, error against K (more in later stages).

Plots use matplotlib's non-interactive Agg backend and fixed metadata, so the
same data give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patheffects as pe
import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection

PNG_METADATA = {"Software": None}  # no library version in the file: stable bytes


def save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=120, metadata=PNG_METADATA, bbox_inches="tight")
    plt.close(fig)


def zone_colours(k: int) -> np.ndarray:
    """k distinguishable colours, none pale on white: tab10 up to 10 zones, then tab10
    followed by its darkened shades up to 20, then evenly spaced hues."""
    tab10 = plt.get_cmap("tab10")(np.arange(10))
    if k <= 10:
        return tab10[:k]
    if k <= 20:
        dark = tab10.copy()
        dark[:, :3] *= 0.55
        return np.vstack([tab10, dark])[:k]
    return plt.get_cmap("hsv")(np.linspace(0, 1, k, endpoint=False))


def bus_positions(net, graph: nx.Graph) -> dict[int, tuple[float, float]]:
    """Geodata where every bus of the graph has it, else a deterministic graph layout."""
    pos = {}
    if "geo" in net.bus:
        for bus, geo in net.bus.geo.items():
            if isinstance(geo, str) and geo:
                coords = json.loads(geo).get("coordinates")
                if coords and len(coords) == 2:
                    pos[int(bus)] = (float(coords[0]), float(coords[1]))
    if all(b in pos for b in graph.nodes):
        return pos
    if nx.is_tree(graph) or graph.number_of_nodes() <= 400:
        return nx.kamada_kawai_layout(graph)
    return nx.spring_layout(graph, seed=0)


def plot_zones(
    graph: nx.Graph, net, zone_of_bus: pd.Series, medoids: pd.Series, path: Path, title: str
) -> None:
    """Buses coloured by zone; edges inside a zone in its colour, between zones grey;
    each zone's medoid drawn as a star with the zone number."""
    pos = bus_positions(net, graph)
    k = int(zone_of_bus.max()) + 1
    colours = zone_colours(k)
    fig, ax = plt.subplots(figsize=(9, 7))
    inner, inner_c, cross = [], [], []
    for a, b in graph.edges():
        seg = (pos[a], pos[b])
        if zone_of_bus[a] == zone_of_bus[b]:
            inner.append(seg)
            inner_c.append(colours[zone_of_bus[a]])
        else:
            cross.append(seg)
    ax.add_collection(LineCollection(cross, colors="0.6", linewidths=1.0, linestyles="dotted"))
    ax.add_collection(LineCollection(inner, colors=inner_c, linewidths=2.5))
    buses = zone_of_bus.index
    xy = np.array([pos[b] for b in buses])
    ax.scatter(
        xy[:, 0],
        xy[:, 1],
        c=colours[zone_of_bus.to_numpy()],
        s=28,
        zorder=3,
        edgecolors="black",
        linewidths=0.4,
    )
    if len(buses) <= 60:  # small grids: bus numbers for the engineer
        for b, (x, y) in zip(buses, xy, strict=True):
            ax.annotate(
                str(b),
                (x, y),
                xytext=(-4, -11),
                textcoords="offset points",
                fontsize=7,
                color="0.35",
            )
    slack = [b for b in net.ext_grid.bus[net.ext_grid.in_service.astype(bool)] if b in pos]
    if slack:
        sxy = np.array([pos[b] for b in slack])
        ax.scatter(
            sxy[:, 0],
            sxy[:, 1],
            marker="s",
            s=110,
            facecolors="none",
            edgecolors="black",
            linewidths=1.5,
            zorder=4,
        )
    for zone, bus in medoids.items():
        x, y = pos[bus]
        ax.scatter(
            [x],
            [y],
            marker="*",
            s=260,
            c=[colours[zone]],
            edgecolors="black",
            linewidths=0.9,
            zorder=4,
        )
        ax.annotate(
            f"Z{zone}",
            (x, y),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=11,
            fontweight="bold",
            color=colours[zone],
            zorder=5,
            path_effects=[pe.withStroke(linewidth=3, foreground="white")],
        )
    ax.set_title(title)
    ax.set_aspect("equal", adjustable="datalim")
    ax.autoscale_view()
    ax.set_xticks([])
    ax.set_yticks([])
    handles = [
        plt.Line2D(
            [],
            [],
            marker="o",
            ls="",
            color=colours[z],
            label=f"Z{z}: {int((zone_of_bus == z).sum())} buses",
        )
        for z in range(k)
    ]
    handles.append(
        plt.Line2D(
            [],
            [],
            marker="*",
            ls="",
            color="0.3",
            markersize=12,
            label="medoid (virtual bus location)",
        )
    )
    if k <= 20:  # beside the map, never over a zone
        ax.legend(
            handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False
        )
    save(fig, path)


def plot_error_curve(curve: pd.DataFrame, path: Path, title: str) -> None:
    """Segmentation error against K, one line per method and quantity."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, part in curve.groupby("method", sort=True):
        ax.plot(part.k, part.loading_error, "-", label=f"{method}: loading rows")
        ax.plot(part.k, part.vm_error, "--", label=f"{method}: voltage rows")
    ax.set_xlabel("number of zones K (log scale)")
    ax.set_ylabel("relative approximation error (capacity-weighted)")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    save(fig, path)


def plot_k_comparison(kpis: pd.DataFrame, path: Path, grid_name: str) -> None:
    """Cost, security-adjusted cost (cost plus the AC residual priced at the penalty) and AC
    residuals against K: one line per zonal method, the nodal market as a line."""
    panels = [
        ("cost_eur", "procurement cost (EUR)"),
        (
            "security_adjusted_cost_eur",
            "security-adjusted cost: cost + penalty x AC residual (EUR)",
        ),
        ("residual_overload_percent_h", "residual overload after AC check (%-points x h)"),
        ("unmet_mwh", "unmet need, linear model or AC (MWh)"),
    ]
    panels = [p for p in panels if p[0] in kpis]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.3))
    nodal = kpis[kpis.method == "nodal"]
    zonal = kpis[kpis.method != "nodal"]
    styles = {"zonal": ("tab:blue", "o-"), "needs_based": ("tab:orange", "s--")}
    for ax, (column, label) in zip(axes, panels, strict=True):
        for method, part in zonal.groupby("method", sort=True):
            colour, style = styles.get(method, ("tab:green", "^-"))
            part = part.sort_values("k")
            ax.plot(part.k, part[column], style, color=colour, label=method.replace("_", "-"))
        if len(nodal):
            ax.axhline(
                float(nodal[column].iloc[0]),
                color="black",
                lw=1.5,
                ls=":",
                label=f"nodal (K = {int(nodal.k.iloc[0])})",
            )
        ks = sorted({int(k) for k in kpis.k})
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("number of zones K (log scale)")
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    voltage = kpis.set_index(["method", "k"]).residual_voltage_max_pu
    if (voltage > 0).any():
        worst = voltage.idxmax()
        axes[-2].annotate(
            f"max residual voltage deviation: {voltage.max():.4f} p.u. ({worst[0]}, K={worst[1]})",
            (0.02, 0.95),
            xycoords="axes fraction",
            fontsize=8,
            va="top",
        )
    fig.suptitle(f"{grid_name}: market performance against the number of zones")
    fig.tight_layout()
    save(fig, path)


def plot_before_after(pf, ac_by_market: dict, mtu: int, path: Path) -> None:
    """Loading of every monitored branch and voltage of every bus at one MTU: base case and
    after each market's dispatch (AC), with the limits."""
    g = pf.grid
    fig, (ax_l, ax_v) = plt.subplots(2, 1, figsize=(12, 7.5))
    branches = pf.loading_percent.columns
    x_l = _before_after_lines(ax_l, "loading_percent", pf, ac_by_market, mtu)
    ax_l.axhline(g.loading_max_percent, color="red", ls="--", lw=1, label="limit")
    ax_l.set_ylabel("loading (%)")
    ax_l.set_xlabel("monitored line (l) / trafo (t), pandapower index")
    step = max(1, len(branches) // 25)
    ax_l.set_xticks(
        x_l[::step], [f"{t[0][0]}{t[1]}" for t in branches[::step]], fontsize=7, rotation=90
    )
    buses = pf.vm_pu.columns
    x_v = _before_after_lines(ax_v, "vm_pu", pf, ac_by_market, mtu)
    ax_v.axhline(g.vm_min_pu, color="red", ls="--", lw=1)
    ax_v.axhline(g.vm_max_pu, color="red", ls="--", lw=1, label="band")
    ax_v.set_ylabel("voltage (p.u.)")
    ax_v.set_xlabel("bus (pandapower index)")
    step = max(1, len(buses) // 30)
    ax_v.set_xticks(x_v[::step], [str(b) for b in buses[::step]], fontsize=7, rotation=90)
    for ax in (ax_l, ax_v):
        ax.grid(True, alpha=0.3)
    ax_l.legend(fontsize=7, ncol=3, loc="best")
    fig.suptitle(f"{g.name}: worst MTU {mtu} ({pf.times[mtu]}) before and after clearing (AC)")
    fig.tight_layout()
    save(fig, path)


def _before_after_lines(ax, quantity: str, pf, ac_by_market: dict, mtu: int) -> np.ndarray:
    """``quantity`` (a per-element table of the power flow and of each AC check) at one MTU:
    the base case in black, then after each market. Returns the x positions."""
    base = getattr(pf, quantity)
    x = np.arange(base.shape[1])
    ax.plot(x, base.iloc[mtu].to_numpy(), "k-", lw=2, label="base case")
    for i, (label, ac) in enumerate(ac_by_market.items()):
        ax.plot(
            x,
            getattr(ac, quantity).iloc[mtu].to_numpy(),
            lw=1.2,
            alpha=0.85,
            color=plt.get_cmap("tab10")(i % 10),
            label=f"after {label}",
        )
    return x


def plot_tender_cost_curve(curve: pd.DataFrame, rules: pd.DataFrame, path: Path, title: str):
    """Eq. 1 and its three terms against the procured quantity, with the chosen quantities."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    terms = [
        ("availability_eur_per_h", "availability"),
        ("activation_eur_per_h", "expected activation"),
        ("unmet_eur_per_h", "expected unmet need x VoLL"),
    ]
    for column, label in terms:
        ax.plot(curve.q_mw, curve[column], lw=1.2, label=label)
    ax.plot(curve.q_mw, curve.cost_eur_per_h, "k-", lw=2, label="expected cost (Eq. 1)")
    for i, rec in enumerate(rules.itertuples()):
        ax.axvline(rec.q_mw, color=plt.get_cmap("tab10")(i + 3), ls="--", lw=1)
        ax.annotate(
            f"{rec.rule}\nQ = {rec.q_mw:.2f} MW, {rec.cost_eur_per_h:.0f} EUR/h",
            (rec.q_mw, 0.97 - 0.12 * i),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            va="top",
            ha="left",
        )
    ax.set_yscale("symlog", linthresh=10)
    finite = curve.cost_eur_per_h[np.isfinite(curve.cost_eur_per_h)]
    if len(finite) and 0 < finite.max() < 1e300:
        ax.set_ylim(0, 2 * float(finite.max()))
    ax.set_xlabel("procured availability Q (MW)")
    ax.set_ylabel("EUR per hour of the window (symlog)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    save(fig, path)


def plot_tender_temporal(summary: pd.DataFrame, path: Path, title: str) -> None:
    """Fig. 3: c_aggr against the number of MTUs in one product, one line per sigma_mu."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    sigmas = sorted(summary.sigma_mu_mw.unique())
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.95, len(sigmas)))
    for colour, s in zip(colours, sigmas, strict=True):
        part = summary[summary.sigma_mu_mw == s].sort_values("n_mtu")
        ax.plot(part.n_mtu, part.c_aggr_percent, "o-", ms=3, color=colour, label=f"{s:g} MW")
    ax.set_xticks(sorted(summary.n_mtu.unique()))
    ax.set_xlabel("MTUs aggregated in one product")
    ax.set_ylabel("extra cost of aggregation c_aggr (%)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(title="sigma_mu", fontsize=7, title_fontsize=8, ncol=2, loc="upper left")
    ax.set_title(title)
    save(fig, path)


def plot_tender_spatial(summary: pd.DataFrame, path: Path, title: str) -> None:
    """Fig. 5: c_aggr over (nodes, Gini) as filled contours (log colour scale), the probability
    that a node's cleared offer misses the median of its need as black lines, and the
    largest reachable Gini index (every offer at one node) in red."""
    from matplotlib.colors import LogNorm

    grid = summary.pivot(index="gini", columns="n_nodes", values="c_aggr_percent")
    miss = summary.pivot(index="gini", columns="n_nodes", values="p_node_below_median")
    x, y = grid.columns.to_numpy(float), grid.index.to_numpy(float)
    if len(x) < 2 or len(y) < 2:
        _plot_tender_spatial_lines(summary, path, title)
        return
    fig, ax = plt.subplots(figsize=(8, 5.2))
    values = np.ma.masked_invalid(np.clip(grid.to_numpy(), 0.1, None))
    top = max(float(values.max()) if values.count() else 1.0, 1.0)
    decades = 10.0 ** np.arange(-1, np.ceil(np.log10(top)) + 1)
    levels = np.unique(np.outer(decades, [1, 2, 5]).ravel())
    levels = levels[: np.searchsorted(levels, top) + 1]
    filled = ax.contourf(x, y, values, levels=levels, norm=LogNorm(), cmap="magma_r", extend="min")
    fig.colorbar(filled, ax=ax, label="extra cost of aggregation c_aggr (%)", format="%g")
    miss_values = np.ma.masked_invalid(miss.to_numpy())
    if miss_values.count() and np.ptp(miss_values.compressed()) > 0:
        lines = ax.contour(x, y, miss_values, levels=[0.2, 0.5, 0.8], colors="black", linewidths=1)
        ax.clabel(lines, fmt=lambda v: f"P(miss) {v:.1f}", fontsize=7)
    n = np.linspace(x.min(), x.max(), 200)
    ax.plot(n, (n - 1) / n, "r-", lw=1.5, label="largest Gini: every offer at one node")
    ax.set_ylim(y.min(), y.max())
    ax.set_xlabel("grid nodes aggregated in one product")
    ax.set_ylabel("Gini index of the number of offers per node")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    save(fig, path)


def _plot_tender_spatial_lines(summary: pd.DataFrame, path: Path, title: str) -> None:
    """Fig. 5 for a single Gini index or node count (no surface to contour): c_aggr against
    the dimension that varies, one line per value of the other, P(miss) on a second axis."""
    by_gini = summary.n_nodes.nunique() < 2 and summary.gini.nunique() >= 2
    x_col, line_col = ("gini", "n_nodes") if by_gini else ("n_nodes", "gini")
    label = {"gini": "Gini index {:g}", "n_nodes": "{:g} nodes"}
    fig, ax = plt.subplots(figsize=(8, 4.8))
    twin = ax.twinx()
    values = sorted(summary[line_col].unique())
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.95, max(len(values), 1)))
    for colour, v in zip(colours, values, strict=True):
        part = summary[summary[line_col] == v].sort_values(x_col)
        ax.plot(
            part[x_col],
            part.c_aggr_percent,
            "o-",
            ms=4,
            color=colour,
            label=label[line_col].format(v),
        )
        twin.plot(part[x_col], part.p_node_below_median, "x:", ms=4, color=colour, lw=1)
    ax.set_xlabel(
        "Gini index of the number of offers per node"
        if by_gini
        else "grid nodes aggregated in one product"
    )
    ax.set_ylabel("extra cost of aggregation c_aggr (%)")
    twin.set_ylabel("P(a node's cleared offer misses its median need) (dotted)")
    twin.set_ylim(-0.05, 1.05)
    finite = summary.c_aggr_percent[np.isfinite(summary.c_aggr_percent)]
    ax.set_ylim(0, max(float(finite.max()) * 1.1, 1e-3) if len(finite) else 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title)
    save(fig, path)


def plot_zonal_tenders(summary: pd.DataFrame, path: Path, title: str) -> None:
    """Extra cost of one tender per zone over one per bus, against K, with the number of tenders."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(summary.k, summary.c_aggr_percent, "o-", ms=3, color="tab:red", label="c_aggr")
    ax.set_xlabel("number of zones K")
    ax.set_ylabel("extra cost of zonal tenders over per-bus tenders (%)", color="tab:red")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    twin = ax.twinx()
    twin.step(summary.k, summary.tenders, where="post", color="grey", lw=1, label="tenders")
    twin.set_ylabel("zones with a need (tenders)", color="grey")
    twin.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    save(fig, path)
