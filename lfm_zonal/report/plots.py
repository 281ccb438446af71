"""PNG plots: zones on the grid, error against K (more in later stages).

Plots use matplotlib's non-interactive Agg backend and fixed metadata, so the
same data give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.transforms import Bbox

PNG_METADATA = {"Software": None}  # no library version in the file: stable bytes


def save(fig: plt.Figure, path: Path, laid_out: bool = False) -> None:
    """``fig`` as PNG, cropped to what is drawn; ``laid_out``: already fitted to its figure
    by ``tight_layout`` (not cropped again: the crop draws the figure twice, 0.15 s of the
    0.4-0.55 s of each of the main job's two wide plots)."""
    fig.savefig(path, dpi=120, metadata=PNG_METADATA, bbox_inches=None if laid_out else "tight")
    plt.close(fig)


# Zone maps: a few artists (LineCollection, scatter) whatever the size of the grid.
BUS_LABEL_MAX_BUSES = 60  # bus numbers on the map up to this many buses, none above
#: Where a bus number is tried, in points from its bus (lower left corner of the text).
BUS_LABEL_OFFSETS = ((-4, -11), (3, 3), (-11, 3), (3, -11), (5, -4), (-15, -4), (-4, 6), (-4, -19))
SLACK_MARKER_SIZE = 160  # a slack's square on a zone map, points squared (as scatter's s)
BIG_MAP_BUSES = 500  # above: a larger figure, thin lines, small bus dots without outline
ZONE_LABEL_TRIED_ZONES = 200  # zone labels tried for the largest zones only (time)
ZONE_LEGEND_MAX_ZONES = 9  # up to this many zones: a colour each, every zone in the legend
# Zone colours: tab10 without its grey (kept for lines that carry no power). Above
# ZONE_LEGEND_MAX_ZONES zones they repeat, never on two zones joined by a line.
ZONE_PALETTE = plt.get_cmap("tab10")(np.array([0, 1, 2, 3, 4, 5, 6, 8, 9]))
LABEL_BOX = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}
BUS_LABEL_BOX = {
    "boxstyle": "square,pad=0.05",
    "facecolor": "white",
    "edgecolor": "none",
    "alpha": 0.7,
}
# One style per kind of line, shared by the map and its legend.
LINE_STYLES = {
    "inner": {"linestyle": "solid", "label": "line inside a zone (zone colour)"},
    "border": {
        "color": "black",
        "linestyle": (0, (3.0, 1.5)),
        "label": "line across a zone border (dashed, X at its middle)",
    },
    "open": {
        "color": "0.55",
        "linestyle": (0, (1.0, 1.5)),
        "label": "line or trafo not connected (open switch or out of service)",
    },
}


def zone_adjacency(graph: nx.Graph, zone_of_bus: pd.Series) -> list[set[int]]:
    """For each zone, the zones joined to it by an edge of the graph."""
    k = int(zone_of_bus.max()) + 1
    neighbours: list[set[int]] = [set() for _ in range(k)]
    edges = np.array([(a, b) for a, b in graph.edges() if a in zone_of_bus and b in zone_of_bus])
    if len(edges):
        za = zone_of_bus.reindex(edges[:, 0]).to_numpy()
        zb = zone_of_bus.reindex(edges[:, 1]).to_numpy()
        for a, b in zip(za[za != zb], zb[za != zb], strict=True):
            neighbours[int(a)].add(int(b))
            neighbours[int(b)].add(int(a))
    return neighbours


def zone_colour_index(
    graph: nx.Graph, zone_of_bus: pd.Series, pos: dict | None = None
) -> np.ndarray:
    """A colour number per zone, different for zones joined by an edge (deterministic).

    Up to ZONE_LEGEND_MAX_ZONES zones each zone has its own colour. Above, a greedy
    colouring of the zone adjacency graph: zones with most neighbours first (then by
    number), each taking, among the colours of ZONE_PALETTE that none of its neighbours
    has, the one least often found two zones away or on zones whose extent on the map
    (``pos``) overlaps its own, then the least used, then the first. A zone whose
    neighbours hold every colour gets a new one (``_palette`` extends the palette)."""
    k = int(zone_of_bus.max()) + 1
    if k <= ZONE_LEGEND_MAX_ZONES:
        return np.arange(k)
    neighbours = zone_adjacency(graph, zone_of_bus)
    near = [set().union(*(neighbours[n] for n in neighbours[z])) for z in range(k)]
    if pos is not None and k <= 2000:  # map extents overlapping: k x k booleans
        xy = np.array([pos[b] for b in zone_of_bus.index], dtype=float)
        box = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}).groupby(zone_of_bus.to_numpy())
        lo, hi = box.min().reindex(range(k)).to_numpy(), box.max().reindex(range(k)).to_numpy()
        overlap = np.all(
            (lo[:, None, :] <= hi[None, :, :]) & (lo[None, :, :] <= hi[:, None, :]), axis=2
        )
        for a, b in zip(*np.nonzero(overlap), strict=True):
            near[int(a)].add(int(b))
    colour = np.full(k, -1)
    used = [0] * len(ZONE_PALETTE)
    for z in sorted(range(k), key=lambda z: (-len(neighbours[z]), z)):
        taken = {int(colour[n]) for n in neighbours[z]}
        free = [c for c in range(len(used)) if c not in taken] or [len(used)]
        used += [0] * (free[-1] + 1 - len(used))
        nearby = np.bincount(
            [colour[n] for n in near[z] if n != z and colour[n] >= 0], minlength=len(used)
        )
        colour[z] = min(free, key=lambda c: (nearby[c], used[c], c))
        used[colour[z]] += 1
    return colour


def zone_colours(colour_index: np.ndarray) -> np.ndarray:
    """RGBA of each zone from its colour number (``zone_colour_index``): the one mapping
    of the PNG and the HTML map, so the two agree."""
    return _palette(len(colour_index))[colour_index]


def zoned_edges(graph: nx.Graph, buses: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """The graph's edges with both ends among ``buses``, as the positions of their two
    ends in ``buses`` (edges to buses left out of the zones are not drawn)."""
    edges = np.array(list(graph.edges()), dtype=np.int64).reshape(-1, 2)
    ia, ib = buses.get_indexer(edges[:, 0]), buses.get_indexer(edges[:, 1])
    both = (ia >= 0) & (ib >= 0)
    return ia[both], ib[both]


def _palette(n: int) -> np.ndarray:
    """n colours: ZONE_PALETTE, then its darkened shades, then evenly spaced hues."""
    dark = ZONE_PALETTE.copy()
    dark[:, :3] *= 0.55
    both = np.vstack([ZONE_PALETTE, dark])
    hues = plt.get_cmap("hsv")(np.linspace(0, 1, max(n - len(both), 0), endpoint=False))
    return np.vstack([both, hues])[: max(n, len(ZONE_PALETTE))]


def bus_positions(net, graph: nx.Graph) -> dict[int, tuple[float, float]]:
    """Geodata where every bus of the graph has it, else a deterministic graph layout of
    each connected part (a grid with several substations), side by side in order of their
    lowest bus, each scaled with the square root of its number of buses."""
    pos = {}
    if "geo" in net.bus:
        for bus, geo in net.bus.geo.items():
            if isinstance(geo, str) and geo:
                coords = json.loads(geo).get("coordinates")
                if coords and len(coords) == 2:
                    pos[int(bus)] = (float(coords[0]), float(coords[1]))
    if all(b in pos for b in graph.nodes):
        return pos
    # Edge lengths for the layout: a line's length; a trafo or bus-bus switch (pandapower's
    # weight 0, which would put its buses on one point) the median line's.
    lengths = nx.get_edge_attributes(graph, "weight")
    positive = [w for w in lengths.values() if w > 0]
    typical = float(np.median(positive)) if positive else 1.0
    laid = nx.Graph()
    laid.add_nodes_from(graph.nodes)
    laid.add_weighted_edges_from(
        (a, b, lengths.get((a, b), 0.0) or typical) for a, b in graph.edges
    )
    pos, x0 = {}, 0.0
    for part in sorted(nx.connected_components(laid), key=min):
        sub = laid.subgraph(sorted(part))
        n = sub.number_of_nodes()
        if n <= 2:
            layout = {b: np.array([float(i), 0.0]) for i, b in enumerate(sub.nodes)}
        elif nx.is_tree(sub) or n <= 400:
            layout = nx.kamada_kawai_layout(sub)
        else:
            layout = nx.spring_layout(sub, seed=0)
        xy = np.array([layout[b] for b in sub.nodes], dtype=float)
        xy -= xy.min(axis=0)
        span = float(xy.max())
        xy *= np.sqrt(n) / span if span > 0 else 0.0
        xy[:, 0] += x0
        x0 = float(xy[:, 0].max()) + max(1.0, 0.2 * np.sqrt(n))
        pos.update({int(b): (float(x), float(y)) for b, (x, y) in zip(sub.nodes, xy, strict=True)})
    return pos


#: The bus pairs each branch table joins on a map (a trafo3w: its hv bus to the other two).
BRANCH_ENDS = {
    "line": (("from_bus", "to_bus"),),
    "trafo": (("hv_bus", "lv_bus"),),
    "trafo3w": (("hv_bus", "mv_bus"), ("hv_bus", "lv_bus")),
}
_SWITCH_ET = {"line": "l", "trafo": "t", "trafo3w": "t3"}  # a bus-branch switch's ``et``


def not_connected(net, pos: dict) -> tuple[list, list]:
    """Lines and trafos (a trafo3w: each side it does not feed) with both ends on the map
    that carry no power (an open switch or out of service), as segments, and every open
    switch as a point: a quarter along its line or trafo from its bus, half way along a
    bus-bus switch."""
    segments, switches = [], []
    cut: dict[tuple[str, int], list[int]] = {}
    opened = net.switch.loc[~net.switch.closed.astype(bool), ["bus", "element", "et"]]
    for bus, element, et in opened.itertuples(index=False):
        cut.setdefault((et, int(element)), []).append(int(bus))
    marked: set = set()  # (et, element, bus) of the switches placed
    for table, pairs in BRANCH_ENDS.items():
        frame = net[table] if table in net else None
        if frame is None or not len(frame):
            continue
        et = _SWITCH_ET[table]
        for a_col, b_col in pairs:
            ends = zip(frame.index, frame[a_col], frame[b_col], frame.in_service, strict=True)
            for idx, a, b, on in ends:
                at = [s for s in cut.get((et, int(idx)), []) if s in (a, b)]
                if (bool(on) and not at) or a not in pos or b not in pos:
                    continue
                pa, pb = np.asarray(pos[a]), np.asarray(pos[b])
                segments.append((pa, pb))
                for s in at:
                    if (et, int(idx), s) not in marked:  # a trafo3w's hv switch: once
                        marked.add((et, int(idx), s))
                        switches.append(pa + 0.25 * (pb - pa) if s == a else pb + 0.25 * (pa - pb))
    for (et, element), at in cut.items():
        for bus in at:
            if et == "b" and bus in pos and element in pos:
                pa, pb = np.asarray(pos[bus]), np.asarray(pos[element])
                segments.append((pa, pb))
                switches.append((pa + pb) / 2)
    return segments, switches


def draw_zones(
    graph: nx.Graph,
    net,
    zone_of_bus: pd.Series,
    medoids: pd.Series,
    title: str,
    pos: dict | None = None,
) -> plt.Figure:
    """The zone map as a figure (``plot_zones`` saves it).

    Buses and the lines inside a zone in its colour (``zone_colour_index``: neighbouring
    zones never share one); lines between zones black dashed with an X at their middle;
    lines and trafos that carry no power grey dotted, open switches as white diamonds;
    every in-service ext_grid as an open square; each zone's medoid as a star with its
    zone number where the label fits beside the others; bus numbers only up to
    BUS_LABEL_MAX_BUSES buses. A few collections whatever the size of the grid, and a
    legend naming every line style and marker drawn. ``pos``: the buses' positions
    (``bus_positions``; computed when not given)."""
    pos = bus_positions(net, graph) if pos is None else pos
    buses = pd.Index(zone_of_bus.index)
    zone = zone_of_bus.to_numpy()
    n, k = len(buses), int(zone.max()) + 1
    big = n > BIG_MAP_BUSES
    colour_index = zone_colour_index(graph, zone_of_bus, pos)
    colours = zone_colours(colour_index)
    width = 1.0 if big else 2.5
    fig, ax = plt.subplots(figsize=(13, 10) if big else (9, 7))
    handles: list = []

    def lines(kind: str, segments, colors, lw: float, zorder: float, marker="") -> None:
        style = LINE_STYLES[kind]
        collection = LineCollection(
            segments, colors=colors, linewidths=lw, linestyles=[style["linestyle"]], zorder=zorder
        )
        ax.add_collection(collection, autolim=False)
        collection.set_label(style["label"])
        handles.append(
            plt.Line2D(
                [],
                [],
                color=style.get("color", "0.3"),
                ls=style["linestyle"],
                lw=lw,
                marker=marker,
                label=style["label"],
            )
        )

    def marks(points, label: str, size: float, zorder: float, face="0.5", **style) -> None:
        points = np.asarray(points, dtype=float).reshape(-1, 2)
        ax.scatter(points[:, 0], points[:, 1], s=size, zorder=zorder, label=label, **style)
        handles.append(
            plt.Line2D(
                [],
                [],
                ls="",
                marker=style["marker"],
                markersize=min(np.sqrt(size), 12),
                markerfacecolor=face,
                markeredgecolor="black",
                label=label,
            )
        )

    xy = np.array([pos[b] for b in buses], dtype=float)
    ia, ib = zoned_edges(graph, buses)
    ends = np.stack([xy[ia], xy[ib]], axis=1)
    inside = zone[ia] == zone[ib]
    off_segments, open_switches = not_connected(net, pos)
    if off_segments:
        lines("open", off_segments, LINE_STYLES["open"]["color"], width, 1)
    if inside.any():
        lines("inner", ends[inside], colours[zone[ia[inside]]], 1.6 * width, 2)
    if (~inside).any():
        lines("border", ends[~inside], "black", min(width, 1.5), 3, marker="X")
        mid = ends[~inside].mean(axis=1)
        ax.scatter(mid[:, 0], mid[:, 1], s=25 if big else 40, zorder=5, marker="X", c="black")
    marks(
        xy,
        "bus (zone colour)",
        6 if big else 28,
        4,
        marker="o",
        c=colours[zone],
        edgecolors="none" if big else "black",
        linewidths=0.4,
    )
    if open_switches:
        marks(
            open_switches,
            "open switch",
            22 if big else 40,
            6,
            face="white",
            marker="D",
            facecolors="white",
            edgecolors="black",
            linewidths=0.8,
        )
    in_service = net.ext_grid.in_service.astype(bool)
    slack_buses = [b for b in net.ext_grid.bus[in_service] if b in pos]
    star_size = 260 if k <= 20 else 150  # a medoid's star, points squared (as scatter's s)
    if slack_buses:  # every substation of a grid with several
        marks(
            [pos[b] for b in slack_buses],
            "slack (ext_grid)",
            SLACK_MARKER_SIZE,
            8.5,
            face="none",
            marker="s",
            facecolors="none",
            edgecolors="black",
            linewidths=2.0,
        )
    placed = medoids[medoids.isin(list(pos))]
    if len(placed):
        marks(
            [pos[b] for b in placed],
            "zone medoid (virtual bus location), label Zn",
            star_size,
            8,
            marker="*",
            c=colours[placed.index.to_numpy()],
            edgecolors="black",
            linewidths=0.9,
        )
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="box")
    _set_limits(ax, np.vstack([xy, *[np.asarray(seg) for seg in off_segments]]))
    zone_labels = _zone_labels(fig, ax, placed, pos, colours, zone_of_bus, k)
    shown = len(zone_labels)
    if n <= BUS_LABEL_MAX_BUSES:  # small grids: bus numbers for the engineer
        markers = [(b, star_size) for b in placed] + [(b, SLACK_MARKER_SIZE) for b in slack_buses]
        taken = [(box, None) for box in zone_labels] + _marker_boxes(fig, ax, pos, markers)
        _bus_labels(fig, ax, buses, xy, taken)
    if k <= ZONE_LEGEND_MAX_ZONES:
        sizes = np.bincount(zone, minlength=k)
        handles += [
            plt.Line2D([], [], marker="o", ls="", color=colours[z], label=f"Z{z}: {sizes[z]} buses")
            for z in range(k)
        ]
    else:
        handles.append(
            plt.Line2D(
                [],
                [],
                ls="",
                label=f"{k} zones in {len(np.unique(colour_index))} colours (zones joined by "
                f"a line differ); {shown} of {k} labels fit",
            )
        )
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False
    )
    return fig


def _set_limits(ax, xy: np.ndarray) -> None:
    """Limits around every bus with a margin, then the equal aspect applied, so that the
    label placement below sees the final data-to-pixel transform."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    pad = 0.04 * max(float((hi - lo).max()), 1e-9)
    ax.set_xlim(lo[0] - pad, hi[0] + pad)
    ax.set_ylim(lo[1] - pad, hi[1] + pad)
    ax.apply_aspect()


def _marker_boxes(fig, ax, pos: dict, markers: list) -> list:
    """(pixel box, bus) of markers given as (bus, size in points squared, as ``scatter``)."""
    boxes = []
    for bus, size in markers:
        x, y = ax.transData.transform(pos[bus])
        half = 0.5 * np.sqrt(size) * fig.dpi / 72.0
        boxes.append((Bbox.from_extents(x - half, y - half, x + half, y + half), int(bus)))
    return boxes


def _bus_labels(fig, ax, buses: pd.Index, xy: np.ndarray, taken: list) -> None:
    """Each bus number beside its bus, on white above the lines, where it overlaps no number
    placed before nor a box of ``taken`` ((box, bus): zone labels, and the stars and slack
    squares of other buses) and its own bus is the one nearest to it, tried in the order
    of BUS_LABEL_OFFSETS (below left first); where none is, the place that overlaps least
    (buses a layout puts on one spot)."""
    renderer = fig.canvas.get_renderer()
    points = ax.transData.transform(xy)  # pixels (the limits and aspect are final)
    boxes: list = list(taken)

    def number(b, x, y, dx, dy):
        return ax.annotate(
            str(b),
            (x, y),
            xytext=(dx, dy),
            textcoords="offset points",
            fontsize=7,
            color="0.3",
            zorder=8.5,  # above the lines and markers, below the zone labels
            bbox=BUS_LABEL_BOX,
        )

    for i, (b, (x, y)) in enumerate(zip(buses, xy, strict=True)):
        tried = []  # (overlaps, not nearest its own bus, order, offset)
        for order, (dx, dy) in enumerate(BUS_LABEL_OFFSETS):
            text = number(b, x, y, dx, dy)
            box = text.get_window_extent(renderer)
            centre = np.array([(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2])
            astray = int(np.argmin(np.hypot(*(points - centre).T))) != i
            overlaps = sum(box.overlaps(other) for other, owner in boxes if owner != b)
            if not astray and not overlaps:
                break
            text.remove()
            tried.append((overlaps, astray, order, (dx, dy)))
        else:
            box = number(b, x, y, *min(tried)[3]).get_window_extent(renderer)
        boxes.append((box, None))


def _zone_labels(fig, ax, medoids: pd.Series, pos: dict, colours, zone_of_bus, k: int) -> list:
    """``Zn`` beside each zone's medoid where it overlaps no label placed before (largest
    zones first, then by number, the ZONE_LABEL_TRIED_ZONES largest only; four positions
    tried around the star). Returns their pixel boxes."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    sizes = zone_of_bus.value_counts()
    boxes: list = []
    order = sorted(medoids.index, key=lambda z: (-int(sizes.get(z, 0)), int(z)))
    for zone in order[:ZONE_LABEL_TRIED_ZONES]:
        x, y = pos[medoids[zone]]
        for dx, dy, ha, va in (
            (6, 6, "left", "bottom"),
            (-6, 6, "right", "bottom"),
            (6, -6, "left", "top"),
            (-6, -6, "right", "top"),
        ):
            text = ax.annotate(
                f"Z{zone}",
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=11 if k <= 20 else 8,
                fontweight="bold",
                color=colours[zone] if k <= ZONE_LEGEND_MAX_ZONES else "0.1",
                zorder=9,
                bbox=LABEL_BOX,  # cheaper to draw than a stroke (path effect) around the text
            )
            box = text.get_window_extent(renderer).expanded(1.1, 1.2)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in boxes):
                boxes.append(box)
                break
            text.remove()
    return boxes


def plot_zones(
    graph: nx.Graph,
    net,
    zone_of_bus: pd.Series,
    medoids: pd.Series,
    path: Path,
    title: str,
    pos: dict | None = None,
) -> None:
    """The zone map (``draw_zones``) as a PNG."""
    save(draw_zones(graph, net, zone_of_bus, medoids, title, pos), path)


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
    save(fig, path, laid_out=True)


#: Short names of the monitored element types on an axis (then the pandapower index).
BRANCH_TICK = {
    "line": "l",
    "trafo": "t",
    "trafo3w_hv": "t3hv",
    "trafo3w_mv": "t3mv",
    "trafo3w_lv": "t3lv",
}


def plot_before_after(pf, ac_by_market: dict, mtu: int, path: Path) -> None:
    """Loading of every monitored branch and voltage of every bus at one MTU: base case and
    after each market's dispatch (AC), with the limits."""
    g = pf.grid
    fig, (ax_l, ax_v) = plt.subplots(2, 1, figsize=(12, 7.5))
    branches = pf.loading_percent.columns
    x_l = _before_after_lines(ax_l, "loading_percent", pf, ac_by_market, mtu)
    ax_l.axhline(g.loading_max_percent, color="red", ls="--", lw=1, label="limit")
    ax_l.set_ylabel("loading (%)")
    kinds = set(branches.get_level_values(0))
    windings = " / trafo3w winding (t3hv, t3mv, t3lv)" if kinds - {"line", "trafo"} else ""
    ax_l.set_xlabel(f"monitored line (l) / trafo (t){windings}, pandapower index")
    step = max(1, len(branches) // 25)
    ax_l.set_xticks(
        x_l[::step],
        [f"{BRANCH_TICK.get(t[0], t[0])}{t[1]}" for t in branches[::step]],
        fontsize=7,
        rotation=90,
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
    save(fig, path, laid_out=True)


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
    # The rules' quantities as dashed lines named in the legend (notes beside the lines
    # overlapped each other and the curves where the quantities are close).
    for i, rec in enumerate(rules.itertuples()):
        ax.axvline(
            rec.q_mw,
            color=plt.get_cmap("tab10")(i + 3),
            ls="--",
            lw=1,
            label=f"{rec.rule}: Q = {rec.q_mw:.2f} MW, {rec.cost_eur_per_h:.0f} EUR/h",
        )
    ax.set_yscale("symlog", linthresh=10)
    finite = curve.cost_eur_per_h[np.isfinite(curve.cost_eur_per_h)]
    if len(finite) and 0 < finite.max() < 1e300:
        ax.set_ylim(0, 2 * float(finite.max()))
    ax.set_xlabel("procured availability Q (MW)")
    ax.set_ylabel("EUR per hour of the window (symlog)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
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
    ax.legend(  # beside the axes: inside, it hid the peaks at few MTUs
        title="sigma_mu", fontsize=7, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    ax.set_title(title)
    save(fig, path)


#: The levels of P(miss) drawn on the spatial figure, each with its line style.
MISS_LEVELS = ((0.2, "dotted"), (0.5, "solid"), (0.8, "dashed"))


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
    handles = []
    if miss_values.count() and np.ptp(miss_values.compressed()) > 0:
        # One style per level, named in the legend (labels on the lines overlapped where the
        # levels lie close together).
        levels, styles = zip(*MISS_LEVELS, strict=True)
        ax.contour(x, y, miss_values, levels=levels, colors="black", linewidths=1.2,
                   linestyles=styles)  # fmt: skip
        handles = [
            plt.Line2D([], [], color="black", lw=1.2, ls=style, label=f"P(miss) = {level:g}")
            for level, style in MISS_LEVELS
        ]
    n = np.linspace(x.min(), x.max(), 200)
    (edge,) = ax.plot(n, (n - 1) / n, "r-", lw=1.5, label="largest Gini: every offer at one node")
    ax.set_ylim(y.min(), y.max())
    ax.set_xlabel("grid nodes aggregated in one product")
    ax.set_ylabel("Gini index of the number of offers per node")
    ax.legend(
        handles=[edge, *handles],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(0.0, -0.13),
        ncol=4,
        frameon=False,
        title="P(miss): probability that a node's cleared offer misses the median of its need",
        title_fontsize=7,
    )
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
    if x_col == "n_nodes":  # whole nodes (one count alone got ticks 0.96 ... 1.04)
        ax.set_xticks(sorted(summary.n_nodes.unique()))
    twin.set_ylabel("P(a node's cleared offer misses its median need), x markers")
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
