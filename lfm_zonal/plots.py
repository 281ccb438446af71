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
    """k distinguishable colours: tab10/tab20 up to 20 zones, then evenly spaced hues."""
    if k <= 10:
        return plt.get_cmap("tab10")(np.arange(k))
    if k <= 20:
        return plt.get_cmap("tab20")(np.arange(k))
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
    if k <= 20:
        ax.legend(handles=handles, loc="best", fontsize=8, framealpha=0.9)
    save(fig, path)


def plot_error_curve(curve: pd.DataFrame, path: Path, title: str) -> None:
    """Segmentation error against K, one line per method and quantity."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, part in curve.groupby("method", sort=True):
        ax.plot(part.k, part.loading_error, "-", label=f"{method}: loading rows")
        ax.plot(part.k, part.vm_error, "--", label=f"{method}: voltage rows")
    ax.set_xlabel("number of zones K")
    ax.set_ylabel("relative approximation error (capacity-weighted)")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    save(fig, path)
