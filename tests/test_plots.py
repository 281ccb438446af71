"""Zone maps: colours, labels, legend, several substations, stable bytes (report/plots.py)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
import pandapower as pp
import pandapower.topology as top
import pandas as pd
import pytest
from matplotlib.collections import LineCollection

from lfm_zonal.grid.sources import load_grid
from lfm_zonal.report import plots


def dfs_blocks(graph: nx.Graph, k: int) -> tuple[pd.Series, pd.Series]:
    """A fake partition: k contiguous blocks of each part's depth-first order (zones made
    without a segmentation), and the middle bus of each block as its medoid."""
    order = [
        b
        for part in sorted(nx.connected_components(graph), key=min)
        for b in nx.dfs_preorder_nodes(graph, min(part))
    ]
    blocks = np.array_split(np.array(order), k)
    zone = pd.Series({int(b): z for z, block in enumerate(blocks) for b in block}).sort_index()
    return zone, pd.Series({z: int(block[len(block) // 2]) for z, block in enumerate(blocks)})


def energised_graph(net) -> nx.Graph:
    graph = top.create_nxgraph(
        net, respect_switches=True, include_out_of_service=False, multi=False
    )
    return nx.Graph(graph.subgraph(sorted(graph.nodes)))


def legend_of(fig) -> dict[str, object]:
    legend = fig.axes[0].get_legend()
    return {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)}


@pytest.fixture(scope="module")
def big_feeder():
    """A radial feeder of 800 buses with geodata, above every size limit of the map."""
    net = load_grid("synthetic_radial_800").net
    graph = energised_graph(net)
    zone, medoids = dfs_blocks(graph, 40)
    return net, graph, zone, medoids


@pytest.mark.parametrize(
    "graph",
    [
        nx.balanced_tree(3, 5),  # radial: zones of a tree
        nx.convert_node_labels_to_integers(nx.grid_2d_graph(30, 30)),  # meshed
        nx.convert_node_labels_to_integers(nx.triangular_lattice_graph(20, 20)),  # dense mesh
    ],
)
def test_neighbouring_zones_never_share_a_colour(graph):
    for k in (5, 12, 64, 150):
        zone, _ = dfs_blocks(graph, k)
        colour = plots.zone_colour_index(graph, zone)
        assert (colour >= 0).all() and len(colour) == k
        for z, neighbours in enumerate(plots.zone_adjacency(graph, zone)):
            assert all(colour[z] != colour[n] for n in neighbours)
        assert np.array_equal(colour, plots.zone_colour_index(graph, zone))  # deterministic
        if k <= plots.ZONE_LEGEND_MAX_ZONES:
            assert len(set(colour)) == k  # a colour per zone, listed in the legend
        if nx.is_tree(graph):  # a tree of zones needs two colours; the palette has room
            assert colour.max() < len(plots.ZONE_PALETTE)
        rgba = plots._palette(k)[colour]
        for z, neighbours in enumerate(plots.zone_adjacency(graph, zone)):
            assert all(not np.array_equal(rgba[z], rgba[n]) for n in neighbours)


def test_big_map_has_no_bus_labels_few_artists_and_a_full_legend(big_feeder, tmp_path):
    net, graph, zone, medoids = big_feeder
    assert len(zone) > max(plots.BUS_LABEL_MAX_BUSES, plots.BIG_MAP_BUSES)
    fig = plots.draw_zones(graph, net, zone, medoids, "big")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert 0 < len(texts) <= zone.max() + 1  # zone labels only, where they fit
    assert all(t.startswith("Z") for t in texts)
    assert len(ax.collections) <= 8  # one artist per kind, not per element
    legend = legend_of(fig)
    lines = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert {c.get_label() for c in lines} >= {
        plots.LINE_STYLES["inner"]["label"],
        plots.LINE_STYLES["border"]["label"],
    }
    for c in lines:  # every line style drawn is named in the legend, with that style
        handle = legend[c.get_label()]
        offset, dashes = c.get_linestyle()[0]  # scaled by the line width
        width = c.get_linewidth()[0]
        unscaled = None if dashes is None else np.asarray(dashes) / width
        legend_dashes = handle._dash_pattern[1]  # matplotlib keeps no public getter
        if unscaled is None:
            assert legend_dashes is None
        else:
            assert np.allclose(unscaled, np.asarray(legend_dashes) / handle.get_linewidth())
    for c in ax.collections:
        assert c.get_label() in legend or c.get_label().startswith("_")
    assert any("slack" in label for label in legend)
    plt.close(fig)
    plots.plot_zones(graph, net, zone, medoids, tmp_path / "a.png", "big")
    plots.plot_zones(graph, net, zone, medoids, tmp_path / "b.png", "big")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_small_map_names_every_bus_zone_and_open_switch():
    net = load_grid("cigre_mv").net
    graph = energised_graph(net)
    zone, medoids = dfs_blocks(graph, 4)
    fig = plots.draw_zones(graph, net, zone, medoids, "small")
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {str(b) for b in zone.index} <= texts  # bus numbers below BUS_LABEL_MAX_BUSES
    assert {f"Z{z}" for z in range(4)} <= texts  # four labels fit
    legend = legend_of(fig)
    assert {f"Z{z}: {(zone == z).sum()} buses" for z in range(4)} <= set(legend)
    assert "open switch" in legend  # CIGRE MV has open switches
    assert plots.LINE_STYLES["open"]["label"] in legend
    plt.close(fig)


@pytest.mark.parametrize("k", [4, 8, 16])
def test_bus_numbers_overlap_none_and_sit_nearest_their_own_bus(k):
    """IEEE 33 has no geodata: its layout puts buses 1 and 5, 25 and 26 a few pixels
    apart, where every number below left of its bus stacked two numbers, or beside the
    other bus. Each number is written once, overlaps no other and no zone label, and its
    own bus is the one nearest to it."""
    net = load_grid("ieee33").net
    graph = energised_graph(net)
    zone, medoids = dfs_blocks(graph, k)
    fig = plots.draw_zones(graph, net, zone, medoids, "ieee33")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    written = [t for t in ax.texts if t.get_text().isdigit()]
    assert sorted((t.get_text() for t in written), key=int) == [str(b) for b in zone.index]
    numbers = {t.get_text(): t for t in written}
    boxes = {name: t.get_window_extent(renderer) for name, t in numbers.items()}
    names = list(boxes)
    for i, a in enumerate(names):
        assert not any(boxes[a].overlaps(boxes[b]) for b in names[i + 1 :]), a
    zone_labels = [t.get_window_extent(renderer) for t in ax.texts if t.get_text()[:1] == "Z"]
    assert zone_labels and not any(b.overlaps(z) for b in boxes.values() for z in zone_labels)
    pos = plots.bus_positions(net, graph)
    points = ax.transData.transform(np.array([pos[b] for b in zone.index], float))
    for name, box in boxes.items():
        centre = np.array([(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2])
        assert zone.index[np.argmin(np.hypot(*(points - centre).T))] == int(name)
    plt.close(fig)


def two_substations() -> pp.pandapowerNet:
    """Two feeders, each with its own ext_grid, not connected to each other; no geodata."""
    net = pp.create_empty_network()
    for feeder in range(2):
        buses = [pp.create_bus(net, 20.0) for _ in range(6 + 4 * feeder)]
        pp.create_ext_grid(net, buses[0])
        for a, b in zip(buses[:-1], buses[1:], strict=True):
            pp.create_line(net, a, b, 1.0, std_type="NA2XS2Y 1x95 RM/25 12/20 kV")
    return net


def test_several_substations_are_each_drawn_as_a_part_with_its_slack():
    net = two_substations()
    graph = energised_graph(net)
    parts = sorted(nx.connected_components(graph), key=min)
    assert len(parts) == 2
    pos = plots.bus_positions(net, graph)
    boxes = [np.array([pos[b] for b in part]) for part in parts]
    for box in boxes:  # each part has an extent of its own (not squashed to a point)
        assert np.ptp(box, axis=0).max() > 1.0
    assert boxes[0][:, 0].max() < boxes[1][:, 0].min()  # side by side, not overlapping
    zone, medoids = dfs_blocks(graph, 3)
    fig = plots.draw_zones(graph, net, zone, medoids, "two substations")
    ax = fig.axes[0]
    (slack,) = [c for c in ax.collections if c.get_label() == "slack (ext_grid)"]
    drawn = {tuple(xy) for xy in slack.get_offsets()}
    assert drawn == {pos[b] for b in net.ext_grid.bus}
    plt.close(fig)
