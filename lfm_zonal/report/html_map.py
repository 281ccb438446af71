"""Interactive zone map: the PNG's map (``plots.draw_zones``) as one self-contained HTML page.

On a grid of thousands of buses (SimBench MV+LV, 5,479 buses, K = 64) the PNG cannot show
which bus is in which zone; here a DSO engineer hovers a bus for its pandapower index,
name, zone and voltage level, zooms, and clicks a zone in the legend to hide it (double
click: that zone alone). matplotlib cannot hover or zoom in a file, hence plotly.

plotly is an optional extra (``pip install .[html]``): without it no page is written and
nothing fails. The page embeds plotly.js (it opens offline), has a fixed div id and
coordinates rounded to a millionth of the map's extent, so the same inputs give the same
bytes; one trace per zone and per kind of element keeps it a few MB on any grid.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
from matplotlib.colors import to_hex

from lfm_zonal.report.plots import (
    BIG_MAP_BUSES,
    LINE_STYLES,
    bus_positions,
    not_connected,
    zone_colour_index,
    zone_colours,
    zoned_edges,
)

#: plotly.js beside the pages (``include_plotlyjs="directory"`` names it so).
PLOTLY_BUNDLE = "plotly.min.js"
HTML_DIV_ID = "lfm-zonal-zone-map"  # plotly writes a random div id otherwise: stable bytes
HTML_CONFIG = {"scrollZoom": True, "displaylogo": False}
TRAFO_MARKER = {"color": "white", "size": 9, "line": {"color": "black", "width": 1}}
SIGNIFICANT_DIGITS_OF_SPAN = 6  # coordinates rounded to a step of 1e-6 to 1e-5 of the map's extent
# Line styles of the PNG (LINE_STYLES) in plotly's terms.
BORDER_LINE = {"color": "black", "dash": "dash", "width": 1.5}
OPEN_LINE = {"color": to_hex(LINE_STYLES["open"]["color"]), "dash": "dot", "width": 1.2}
ZONE_LEGEND_RANK = 100  # zones listed after the kinds of element, in zone order


def plotly_available() -> bool:
    """Whether plotly (the ``html`` extra) can be imported."""
    return _graph_objects() is not None


def _graph_objects():
    """``plotly.graph_objects``, or None when plotly is not installed."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        return None
    return go


def _decimals(xy: np.ndarray) -> int:
    """Decimals keeping SIGNIFICANT_DIGITS_OF_SPAN digits of the map's extent."""
    span = float(np.ptp(xy, axis=0).max()) if len(xy) else 0.0
    if span <= 0:
        return SIGNIFICANT_DIGITS_OF_SPAN
    return max(0, SIGNIFICANT_DIGITS_OF_SPAN - math.ceil(math.log10(span)))


def _listed(values: np.ndarray) -> list:
    """Plain floats for the JSON of the page (short, the same in every plotly version);
    NaN, a gap between segments, as None."""
    return [None if math.isnan(v) else v for v in values.tolist()]


def _segments(starts: np.ndarray, ends: np.ndarray, decimals: int) -> dict:
    """x and y of many segments as one line trace: each segment's two ends, then a gap."""
    points = np.full((len(starts), 3, 2), np.nan)
    points[:, 0], points[:, 1] = starts, ends
    points = np.round(points.reshape(-1, 2), decimals)
    return {"x": _listed(points[:, 0]), "y": _listed(points[:, 1])}


def _points(xy, decimals: int) -> dict:
    """x and y of markers."""
    xy = np.round(np.asarray(xy, dtype=float).reshape(-1, 2), decimals)
    return {"x": _listed(xy[:, 0]), "y": _listed(xy[:, 1])}


def _name(value) -> str:
    """An element's name for hover text ('' when it has none), HTML-escaped."""
    return "" if value is None or pd.isna(value) else html.escape(str(value))


def _branches_between(net) -> dict[tuple[int, int], list[str]]:
    """Lines, trafos, trafo3w and bus-bus switches by the (lower, higher) buses they join:
    the elements behind an edge of the bus graph, named in the border's hover text."""
    named: dict[tuple[int, int], list[str]] = {}
    switches = net.switch[net.switch.et == "b"]
    joins = [("line", net.line, "from_bus", "to_bus"), ("trafo", net.trafo, "hv_bus", "lv_bus")]
    if "trafo3w" in net:  # pandapower's graph joins each pair of its three buses
        joins += [
            ("trafo3w", net.trafo3w, a, b)
            for a, b in (("hv_bus", "mv_bus"), ("hv_bus", "lv_bus"), ("mv_bus", "lv_bus"))
        ]
    for table, frame, a_col, b_col in (*joins, ("switch", switches, "bus", "element")):
        for idx, a, b in zip(frame.index, frame[a_col], frame[b_col], strict=True):
            named.setdefault((min(int(a), int(b)), max(int(a), int(b))), []).append(
                f"{table} {idx}"
            )
    return named


def zone_map_dict(
    graph: nx.Graph,
    net,
    zone_of_bus: pd.Series,
    medoids: pd.Series,
    title: str,
    pos: dict | None = None,
) -> dict:
    """The zone map as plotly's figure JSON (``data``, ``layout``), as plotly's own
    ``graph_objects`` would write it (``go.Figure(zone_map_dict(...))``, tested);
    ``write_zone_map_html`` writes it without plotly's checks (plotly's checks of every property were 0.5 s of the 0.8 s of
    SimBench MV's six HTML maps).

    The PNG's map (``plots.draw_zones``) with the same positions (``bus_positions``) and
    colours (``zone_colour_index``, ``zone_colours``): per zone one trace of its buses
    (in the legend as ``Zn: m buses``; hover: pandapower index, name, zone, vn_kv) and one
    of its inner lines (toggled with it); lines across a zone border black dashed with an X
    at their middle (hover: the lines, trafos or switches and the two zones, customdata the
    two buses); lines and trafos that carry no power grey dotted, open switches white
    diamonds; in-service trafos as triangles at their middle and ext_grids as open squares
    (hover: index, name); each zone's medoid as a star. ``pos``: the buses' positions
    (computed when not given)."""
    pos = bus_positions(net, graph) if pos is None else pos
    buses = pd.Index(zone_of_bus.index)
    zone = zone_of_bus.to_numpy()
    k = int(zone.max()) + 1
    hex_colour = [to_hex(c) for c in zone_colours(zone_colour_index(graph, zone_of_bus, pos))]
    xy = np.array([pos[b] for b in buses], dtype=float)
    decimals = _decimals(xy)
    ia, ib = zoned_edges(graph, buses)
    inside = zone[ia] == zone[ib]
    traces: list = []

    def markers(points, name: str, rank: int, text: list[str], **marker) -> None:
        if len(text):
            traces.append(
                _scatter(
                    **_points(points, decimals),
                    mode="markers",
                    name=name,
                    legendrank=rank,
                    marker=marker,
                    text=text,
                    hoverinfo="text",
                )
            )

    off_segments, open_switches = not_connected(net, pos)
    if off_segments:
        ends = np.asarray(off_segments, dtype=float)
        traces.append(
            _scatter(
                **_segments(ends[:, 0], ends[:, 1], decimals),
                mode="lines",
                name=LINE_STYLES["open"]["label"],
                legendrank=3,
                line=OPEN_LINE,
                hoverinfo="skip",
            )
        )
    for z in range(k):  # inner lines under every marker, shown and hidden with their zone
        mine = inside & (zone[ia] == z)
        if mine.any():
            traces.append(
                _scatter(
                    **_segments(xy[ia[mine]], xy[ib[mine]], decimals),
                    mode="lines",
                    name=f"Z{z}: {LINE_STYLES['inner']['label']}",
                    legendgroup=f"Z{z}",
                    showlegend=False,
                    line={"color": hex_colour[z], "width": 2},
                    hoverinfo="skip",
                )
            )
    if (~inside).any():
        a, b = buses[ia[~inside]], buses[ib[~inside]]
        traces.append(
            _scatter(
                **_segments(xy[ia[~inside]], xy[ib[~inside]], decimals),
                mode="lines",
                name=LINE_STYLES["border"]["label"],
                legendgroup="border",
                legendrank=1,
                line=BORDER_LINE,
                hoverinfo="skip",
            )
        )
        named = _branches_between(net)
        za, zb = zone[ia[~inside]], zone[ib[~inside]]
        traces.append(
            _scatter(
                **_points((xy[ia[~inside]] + xy[ib[~inside]]) / 2, decimals),
                mode="markers",
                name="zone border",
                legendgroup="border",
                showlegend=False,
                marker={"symbol": "x", "color": "black", "size": 7},
                customdata=[[int(p), int(q)] for p, q in zip(a, b, strict=True)],
                text=[
                    f"zone border: {', '.join(named.get((min(p, q), max(p, q)), ['edge']))}"
                    f"<br>bus {p} (Z{zp}) - bus {q} (Z{zq})"
                    for p, q, zp, zq in zip(a, b, za, zb, strict=True)
                ],
                hoverinfo="text",
            )
        )
    names = net.bus.name.reindex(buses)
    vn_kv = net.bus.vn_kv.reindex(buses).to_numpy()
    sizes = np.bincount(zone, minlength=k)
    big = len(buses) > BIG_MAP_BUSES
    for z in range(k):
        at = np.flatnonzero(zone == z)
        traces.append(
            _scatter(
                **_points(xy[at], decimals),
                mode="markers",
                name=f"Z{z}: {sizes[z]} buses",
                legendgroup=f"Z{z}",
                legendrank=ZONE_LEGEND_RANK + z,
                marker={
                    "color": hex_colour[z],
                    "size": 5 if big else 9,
                    "line": {"width": 0 if big else 0.6, "color": "black"},
                },
                customdata=[int(b) for b in buses[at]],
                text=[
                    f"bus {buses[i]}<br>{_name(names.iloc[i])}<br>zone Z{z}<br>{vn_kv[i]:g} kV"
                    for i in at
                ],
                hoverinfo="text",
            )
        )
    markers(
        open_switches,
        "open switch",
        4,
        ["open switch"] * len(open_switches),
        symbol="diamond",
        color="white",
        size=8,
        line={"color": "black", "width": 1},
    )
    trafos = net.trafo[
        net.trafo.in_service.astype(bool)
        & net.trafo.hv_bus.isin(list(pos))
        & net.trafo.lv_bus.isin(list(pos))
    ]
    markers(
        [
            (np.asarray(pos[h]) + np.asarray(pos[lv])) / 2
            for h, lv in zip(trafos.hv_bus, trafos.lv_bus, strict=True)
        ],
        "trafo",
        5,
        [
            f"trafo {i}<br>{_name(t['name'])}<br>{t.vn_hv_kv:g} / {t.vn_lv_kv:g} kV, {t.sn_mva:g} MVA"
            for i, t in trafos.iterrows()
        ],
        symbol="triangle-up",
        **TRAFO_MARKER,
    )
    if "trafo3w" in net:
        on = net.trafo3w.in_service.astype(bool)
        for side in ("hv_bus", "mv_bus", "lv_bus"):
            on &= net.trafo3w[side].isin(list(pos))
        trafos3w = net.trafo3w[on]
        markers(
            [
                np.mean([pos[h], pos[m], pos[lv]], axis=0)
                for h, m, lv in zip(trafos3w.hv_bus, trafos3w.mv_bus, trafos3w.lv_bus, strict=True)
            ],
            "trafo3w",
            5,
            [
                f"trafo3w {i}<br>{_name(t['name'])}<br>{t.vn_hv_kv:g} / {t.vn_mv_kv:g} / "
                f"{t.vn_lv_kv:g} kV, {t.sn_hv_mva:g} / {t.sn_mv_mva:g} / {t.sn_lv_mva:g} MVA"
                for i, t in trafos3w.iterrows()
            ],
            symbol="triangle-down",
            **TRAFO_MARKER,
        )
    placed = medoids[medoids.isin(list(pos))]
    markers(
        [pos[b] for b in placed],
        "zone medoid (virtual bus location)",
        6,
        [f"Z{z} medoid (virtual bus location): bus {b}" for z, b in placed.items()],
        symbol="star",
        color=[hex_colour[z] for z in placed.index],
        size=14 if k <= 20 else 11,
        line={"color": "black", "width": 1},
    )
    slack = net.ext_grid[net.ext_grid.in_service.astype(bool) & net.ext_grid.bus.isin(list(pos))]
    markers(
        [pos[b] for b in slack.bus],
        "slack (ext_grid)",
        7,
        [f"ext_grid {i} (slack) at bus {g.bus}<br>{_name(g['name'])}" for i, g in slack.iterrows()],
        symbol="square-open",
        color="black",
        size=16,
        line={"width": 2},
    )
    layout = {
        "title": {"text": html.escape(title)},
        "template": _template(),
        "hovermode": "closest",
        "xaxis": {"visible": False},
        "yaxis": {"visible": False, "scaleanchor": "x", "scaleratio": 1},
        "legend": {
            "title": {"text": "click: hide, double click: only this"},
            "itemsizing": "constant",
            "groupclick": "togglegroup",
        },
        "margin": {"l": 10, "r": 10, "t": 50, "b": 10},
    }
    return {"data": traces, "layout": layout}


def _scatter(**properties) -> dict:
    """A scatter trace as plotly's JSON."""
    return {"type": "scatter", **properties}


def _template() -> dict:
    """The ``plotly_white`` template, spelled out as a figure of ``graph_objects`` has it."""
    import plotly.io as pio

    return pio.templates["plotly_white"].to_plotly_json()


def write_zone_map_html(
    graph: nx.Graph,
    net,
    zone_of_bus: pd.Series,
    medoids: pd.Series,
    path: Path,
    title: str,
    pos: dict | None = None,
):
    """The zone map (``zone_map_dict``) as an HTML page that opens offline: plotly.js
    is ``plotly.min.js`` beside it (written once per folder, 4.8 MB; the maps of every K
    share it, each page is the map's data only), and the div id is fixed, so the same
    inputs give the same bytes. Returns the figure's JSON, or None and writes nothing when plotly
    is not installed."""
    if not plotly_available():
        return None
    import plotly.io as pio

    figure = zone_map_dict(graph, net, zone_of_bus, medoids, title, pos)
    page = pio.to_html(
        figure,
        validate=False,
        include_plotlyjs="directory",
        full_html=True,
        div_id=HTML_DIV_ID,
        config=HTML_CONFIG,
        default_height="100vh",
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    bundle = path.parent / PLOTLY_BUNDLE
    if not bundle.exists():
        from plotly.offline import get_plotlyjs

        bundle.write_text(get_plotlyjs(), encoding="utf-8")
    return figure
