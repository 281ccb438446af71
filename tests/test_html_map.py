"""Interactive zone map (report/html_map.py): the PNG's zones, colours, borders and markers
in plotly traces, stable bytes, and nothing written (nor failing) without plotly."""

from __future__ import annotations

import sys

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from conftest import cigre_with_lv_and_switches
from matplotlib.colors import to_hex
from test_plots import dfs_blocks, energised_graph

from lfm_zonal.grid.sources import load_grid
from lfm_zonal.report import html_map, plots

needs_plotly = pytest.mark.skipif(
    not html_map.plotly_available(), reason="plotly not installed (pip install .[html])"
)


@pytest.fixture(
    scope="module",
    params=[("cigre_lv_switches", 4), ("synthetic_radial_800", 40)],
    ids=["cigre_lv_switches-K4", "radial_800-K40"],
)
def case(request):
    """A grid, its energised bus graph, K fake zones, their medoids, positions and the
    plotly figure: CIGRE MV with an LV feeder, switches and an out-of-service line (a zone
    colour each), and a feeder of 800 buses with geodata at K = 40 (colours repeat)."""
    name, k = request.param
    if name == "cigre_lv_switches":
        net = cigre_with_lv_and_switches()
        net.bus.loc[3, "name"] = "a<b & c"  # hover text is HTML: escaped
    else:
        net = load_grid(name).net
    graph = energised_graph(net)
    zone, medoids = dfs_blocks(graph, k)
    pos = plots.bus_positions(net, graph)
    import plotly.graph_objects as go

    figure = go.Figure(html_map.zone_map_dict(graph, net, zone, medoids, "test", pos))
    return net, graph, zone, medoids, pos, figure


def zone_traces(figure) -> dict[int, object]:
    """The bus trace of each zone, by zone number (the ones listed in the legend)."""
    traces = [t for t in figure.data if t.legendgroup and t.legendgroup.startswith("Z")]
    return {int(t.legendgroup[1:]): t for t in traces if t.showlegend is not False}


def segments(trace) -> set[tuple[tuple[float, float], tuple[float, float]]]:
    """The segments of a line trace (two points, then a gap), each as an unordered pair."""
    x, y = list(trace.x), list(trace.y)
    assert len(x) % 3 == 0 and all(v is None for v in x[2::3] + y[2::3])
    return {tuple(sorted(((x[i], y[i]), (x[i + 1], y[i + 1])))) for i in range(0, len(x), 3)}


def rounded(pos: dict, bus: int, decimals: int) -> tuple[float, float]:
    return tuple(float(v) for v in np.round(np.asarray(pos[bus], dtype=float), decimals))


def named(figure, name: str):
    (trace,) = [t for t in figure.data if t.name == name]
    return trace


@needs_plotly
def test_one_trace_per_zone_holds_its_buses_with_hover_text(case):
    net, graph, zone, _, pos, figure = case
    k = int(zone.max()) + 1
    traces = zone_traces(figure)
    assert sorted(traces) == list(range(k))
    for z, trace in traces.items():
        buses = zone.index[zone == z]
        assert list(trace.customdata) == list(buses)  # pandapower indices, zone order
        assert trace.name == f"Z{z}: {len(buses)} buses"
        xy = np.array([pos[b] for b in buses], dtype=float)
        # Six significant digits of the extent: a rounding step below 1e-5 of it.
        span = float(np.ptp(np.array(list(pos.values()), dtype=float), axis=0).max())
        assert np.allclose(np.c_[trace.x, trace.y], xy, rtol=0, atol=5e-6 * span)
        for bus, text in zip(buses, trace.text, strict=True):
            name = net.bus.name[bus]
            lines = text.split("<br>")
            assert lines[0] == f"bus {bus}"
            assert lines[2] == f"zone Z{z}"
            assert lines[3] == f"{net.bus.vn_kv[bus]:g} kV"
            if isinstance(name, str) and name:
                assert lines[1] == name.replace("&", "&amp;").replace("<", "&lt;")
    if 3 in zone.index and net.bus.name[3] == "a<b & c":
        (text,) = [t for tr in traces.values() for t in tr.text if t.startswith("bus 3<")]
        assert "a&lt;b &amp; c" in text


@needs_plotly
def test_border_lines_are_exactly_the_edges_between_zones(case):
    _, graph, zone, _, pos, figure = case
    decimals = html_map._decimals(np.array([pos[b] for b in zone.index], dtype=float))
    across = {frozenset((a, b)) for a, b in graph.edges() if zone[a] != zone[b]}
    within = [(a, b) for a, b in graph.edges() if zone[a] == zone[b]]
    assert across and within  # both kinds drawn in this case
    marks = named(figure, "zone border")
    assert {frozenset(pair) for pair in marks.customdata} == across
    assert len(marks.customdata) == len(across)
    border = named(figure, plots.LINE_STYLES["border"]["label"])
    assert border.line.dash == "dash" and border.line.color == "black"
    expected = {
        tuple(sorted((rounded(pos, a, decimals), rounded(pos, b, decimals))))
        for a, b in map(tuple, across)
    }
    assert segments(border) == expected
    for z, trace in zone_traces(figure).items():  # inner lines: the zone's edges only
        inner = [t for t in figure.data if t.legendgroup == f"Z{z}" and t.mode == "lines"]
        drawn = set().union(*(segments(t) for t in inner)) if inner else set()
        assert drawn == {
            tuple(sorted((rounded(pos, a, decimals), rounded(pos, b, decimals))))
            for a, b in within
            if zone[a] == z
        }
        assert all(t.line.color == trace.marker.color for t in inner)
        assert all(t.line.dash is None for t in inner)


@needs_plotly
def test_colours_are_the_png_colours(case):
    net, graph, zone, medoids, pos, figure = case
    colour_index = plots.zone_colour_index(graph, zone, pos)
    expected = [to_hex(c) for c in plots.zone_colours(colour_index)]
    traces = zone_traces(figure)
    assert [traces[z].marker.color for z in sorted(traces)] == expected
    png = plots.draw_zones(graph, net, zone, medoids, "test", pos)
    (dots,) = [c for c in png.axes[0].collections if c.get_label() == "bus (zone colour)"]
    png_colour = {
        tuple(np.round(xy, 9)): to_hex(c)
        for xy, c in zip(dots.get_offsets(), dots.get_facecolors(), strict=True)
    }
    plt.close(png)
    for trace in traces.values():  # each bus the colour the PNG gives it
        for bus in trace.customdata:
            assert png_colour[tuple(np.round(pos[bus], 9))] == trace.marker.color
    for z, neighbours in enumerate(plots.zone_adjacency(graph, zone)):
        assert all(traces[z].marker.color != traces[n].marker.color for n in neighbours)


@needs_plotly
def test_slack_trafos_switches_and_medoids_are_marked(case):
    net, graph, zone, medoids, pos, figure = case
    decimals = html_map._decimals(np.array([pos[b] for b in zone.index], dtype=float))
    slack = named(figure, "slack (ext_grid)")
    assert {(x, y) for x, y in zip(slack.x, slack.y, strict=True)} == {
        rounded(pos, b, decimals) for b in net.ext_grid.bus[net.ext_grid.in_service]
    }
    stars = named(figure, "zone medoid (virtual bus location)")
    assert [(x, y) for x, y in zip(stars.x, stars.y, strict=True)] == [
        rounded(pos, b, decimals) for b in medoids
    ]
    on = net.trafo[net.trafo.in_service.astype(bool)]
    if len(on):
        trafos = named(figure, "trafo")
        assert [t.split("<br>")[0] for t in trafos.text] == [f"trafo {i}" for i in on.index]
    segments_off, switches = plots.not_connected(net, pos)
    if switches:  # CIGRE: open switches and an out-of-service line, as in the PNG
        assert len(named(figure, "open switch").x) == len(switches)
        assert len(segments(named(figure, plots.LINE_STYLES["open"]["label"]))) == len(
            {tuple(sorted(map(tuple, np.round(s, decimals)))) for s in segments_off}
        )


@needs_plotly
def test_two_writes_give_the_same_bytes_and_a_page_that_opens_offline(tmp_path):
    net = load_grid("cigre_mv").net
    graph = energised_graph(net)
    zone, medoids = dfs_blocks(graph, 5)
    for name in ("a.html", "b.html"):
        figure = html_map.write_zone_map_html(graph, net, zone, medoids, tmp_path / name, "t")
        assert figure is not None
    page = (tmp_path / "a.html").read_bytes()
    assert page == (tmp_path / "b.html").read_bytes()
    assert f'id="{html_map.HTML_DIV_ID}"'.encode() in page
    assert b'<script src="http' not in page  # plotly.js beside it: opens offline
    assert f'src="{html_map.PLOTLY_BUNDLE}"'.encode() in page
    bundle = (tmp_path / html_map.PLOTLY_BUNDLE).read_bytes()
    assert len(bundle) > 1_000_000 > len(page)  # once per folder, not in every page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html", "plotly.min.js"]


@needs_plotly
def test_the_page_holds_what_plotly_checked_figure_writes(case, tmp_path):
    """The page is written from the figure's JSON without plotly's property checks (0.5 s of
    six maps): the same traces and layout as the checked figure's, number for number (a
    property plotly would coerce, drop or refuse makes them differ)."""
    import json

    import plotly.io as pio

    net, graph, zone, medoids, pos, figure = case
    written = html_map.write_zone_map_html(
        graph, net, zone, medoids, tmp_path / "m.html", "test", pos
    )
    checked = json.loads(pio.to_json(figure))
    unchecked = json.loads(pio.to_json(written, validate=False))
    assert unchecked["data"] == checked["data"]
    assert unchecked["layout"] == checked["layout"]
    page = (tmp_path / "m.html").read_text(encoding="utf-8")
    assert json.dumps(checked["data"][0]["x"][:3], separators=(",", ":"))[1:-1] in page


@needs_plotly
def test_zones_command_writes_an_html_map_beside_each_png(tmp_path):
    from lfm_zonal.cli import main

    out = tmp_path / "z"
    args = ["zones", "--grid", "ieee33", "--n-mtu", "4", "--k", "1", "--k", "5"]
    assert main([*args, "--out", str(out)]) == 0
    zones = pd.read_csv(out / "zones.csv")
    for k in (1, 5):
        assert (out / f"zones_k{k}.png").is_file()
        page = (out / f"zones_k{k}.html").read_text(encoding="utf-8")
        assert "<html>" in page[:100] and page.rstrip().endswith("</html>")
        for z in range(k):  # a legend entry per zone, with the zone's size
            assert f"Z{z}: {int(((zones.k == k) & (zones.zone == z)).sum())} buses" in page


def test_without_plotly_no_html_is_written_and_nothing_fails(tmp_path, monkeypatch):
    from lfm_zonal.cli import main

    for module in [m for m in sys.modules if m == "plotly" or m.startswith("plotly.")]:
        monkeypatch.setitem(sys.modules, module, None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "plotly", None)
    assert not html_map.plotly_available()
    net = load_grid("cigre_mv").net
    graph = energised_graph(net)
    zone, medoids = dfs_blocks(graph, 3)
    path = tmp_path / "map.html"
    assert html_map.write_zone_map_html(graph, net, zone, medoids, path, "t") is None
    assert not path.exists()
    out = tmp_path / "z"
    assert main(["zones", "--grid", "ieee33", "--n-mtu", "4", "--k", "3", "--out", str(out)]) == 0
    assert (out / "zones_k3.png").is_file()
    assert not list(out.glob("*.html"))
