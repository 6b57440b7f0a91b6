"""Tests for the interaction-graph figure (sklearn_lib.plotting._graph_plot), headless (Agg backend)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402

from sklearn_lib import InteractionGraph, ModularityClustering  # noqa: E402
from sklearn_lib.plotting import plot_interaction_graph  # noqa: E402

GREY = to_rgba((0.75, 0.75, 0.75))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def fitted():
    """A graph with constant nodes on layers 0 and 1 (the final layer is unrotated)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    return InteractionGraph(constant_node=True).fit_model(
        net, [":input", "1", "2"], torch.randn(300, 4))


@pytest.fixture
def graph(rng):
    """Edges over six decades, 4 - 5 - 3 nodes, four missing edges, three modules."""
    widths = [4, 5, 3]
    edges = [10.0 ** rng.uniform(-6, 0, size=(widths[l + 1], widths[l])) for l in range(2)]
    edges[0][0, :] = 0.0
    labels = np.array([0, 0, 1, 1, 0, 1, 2, 2, 1, 0, 1, 2])
    return edges, labels


def drawn_edges(ax):
    """``{(source node, target node): linewidth}`` read back from the figure."""
    lines, nodes = ax.collections[:2]
    node_of = {tuple(np.round(p, 12)): k for k, p in enumerate(nodes.get_offsets())}
    return {(node_of[tuple(np.round(a, 12))], node_of[tuple(np.round(b, 12))]): w
            for (a, b), w in zip(lines.get_segments(), lines.get_linewidths())}


def expected_edges(edges, keep):
    """Brute force: the (source, target) node pairs of every kept edge."""
    widths = [edges[0].shape[1]] + [E.shape[0] for E in edges]
    offsets = np.concatenate([[0], np.cumsum(widths)])
    pairs = set()
    for l, E in enumerate(edges):
        for i in range(E.shape[0]):
            for j in range(E.shape[1]):
                if keep(l, E, i, j):
                    pairs.add((offsets[l] + j, offsets[l + 1] + i))
    return pairs


# --------------------------------------------------------------------------- fitted graphs
def test_columns_node_sizes_and_constant_nodes(fitted):
    ax = plot_interaction_graph(fitted, node_size=(4.0, 120.0))
    lines, directions, constants = ax.collections
    assert isinstance(lines, LineCollection) and isinstance(directions, PathCollection)
    widths = np.diff(fitted.layer_offsets_)
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        f"{name}\n({w})" for name, w in zip(fitted.layer_names_, widths)]
    # One constant node per rotated layer; the unrotated final layer has none.
    assert len(constants.get_offsets()) == 2
    np.testing.assert_array_equal(constants.get_offsets()[:, 0], [0, 1])
    # Area grows linearly with Lambda, relative to the layer's largest.
    sizes = directions.get_sizes()
    start = 0
    for basis in fitted.bases_:
        values = basis.interaction_strengths_
        np.testing.assert_allclose(sizes[start:start + len(values)],
                                   4 + 116 * values / values.max())
        start += len(values)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["constant node"]


def test_clustering_estimator_or_its_labels(fitted):
    modules = ModularityClustering(random_state=0).fit(fitted)
    by_estimator = plot_interaction_graph(fitted, modules)
    by_labels = plot_interaction_graph(fitted, modules.labels_)
    np.testing.assert_array_equal(by_estimator.collections[1].get_facecolors(),
                                  by_labels.collections[1].get_facecolors())
    with pytest.raises(NotFittedError):
        plot_interaction_graph(fitted, ModularityClustering())


def test_layer_names_and_strengths_override(graph):
    edges, _ = graph
    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"]
    strengths = [np.arange(4.0), np.ones(5), np.array([0.0, 2.0, 1.0])]
    ax = plot_interaction_graph(edges, layer_names=names, strengths=strengths, node_size=(0, 10))
    ticks = ax.get_xticklabels()
    assert [t.get_text().split("\n")[0] for t in ticks] == names
    assert ticks[0].get_rotation() == 20  # long names of several layers are slanted
    np.testing.assert_allclose(ax.collections[1].get_sizes(),
                               10 * np.r_[np.arange(4) / 3, np.ones(5), 0, 1, 0.5])
    # Bare edges: nodes of one size, no legend.
    plain = plot_interaction_graph(edges, node_size=(4, 100))
    np.testing.assert_allclose(plain.collections[1].get_sizes(), 20.0)
    assert plain.get_legend() is None


# --------------------------------------------------------------------------- edges drawn
def test_log_threshold_and_top_edges_per_pair(graph):
    edges, _ = graph
    ax = plot_interaction_graph(edges, max_edges=6)
    drawn = drawn_edges(ax)

    def keep(l, E, i, j):  # above a thousandth of the pair's maximum, among its 6 strongest
        return E[i, j] > E.max() / 1e3 and E[i, j] >= np.sort(E.ravel())[-6]

    assert set(drawn) == expected_edges(edges, keep)
    # Width grows with log10(E / eps) / log10(max / eps): the pair's strongest is widest.
    offsets = [0, 4, 9]
    for (s, t), width in drawn.items():
        l = 0 if s < 4 else 1
        E = edges[l]
        share = np.log10(E[t - offsets[l + 1], s - offsets[l]] / (E.max() / 1e3)) / 3
        assert width == pytest.approx(0.2 + 1.8 * share)
    # Drawn weakest first: the last segments are fully opaque.
    alphas = ax.collections[0].get_colors()[:, 3]
    assert np.all(np.diff(alphas) >= 0) and alphas[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("norm", ["identity", "sqrt"])
def test_share_of_total_and_every_nonzero_edge(graph, norm):
    edges, _ = graph
    every = drawn_edges(plot_interaction_graph(edges, norm=norm, max_edges=None))
    assert set(every) == expected_edges(edges, lambda l, E, i, j: E[i, j] > 0)
    assert len(every) == 20 + 15 - 4
    share = drawn_edges(plot_interaction_graph(edges, norm=norm, max_edges=None,
                                               min_share=0.05))
    assert set(share) == expected_edges(edges, lambda l, E, i, j: E[i, j] >= 0.05 * E.sum())


def test_explicit_log_eps_per_pair(graph):
    edges, _ = graph
    eps = [1e-2, 1e-4]
    drawn = drawn_edges(plot_interaction_graph(edges, eps=eps, max_edges=None))
    assert set(drawn) == expected_edges(edges, lambda l, E, i, j: E[i, j] > eps[l])


def test_segments_join_the_right_nodes_in_either_order():
    E = np.zeros((2, 3))
    E[1, 2] = 1.0  # input direction 2 of layer 0 -> output direction 1 of layer 1
    for order in ("index", "module"):
        ax = plot_interaction_graph([E], labels=[1, 0, 1, 0, 1], node_order=order)
        (segment,) = ax.collections[0].get_segments()
        nodes = ax.collections[1].get_offsets()
        np.testing.assert_allclose(segment, [nodes[2], nodes[3 + 1]])


@settings(max_examples=25, deadline=None)
@given(scales=st.lists(st.floats(1e-6, 1e6), min_size=2, max_size=2),
       norm=st.sampled_from(["log", "sqrt", "identity"]),
       min_share=st.sampled_from([None, 0.02]))
def test_figure_does_not_depend_on_the_units_of_a_pair(scales, norm, min_share):
    """Each pair is shown relative to its strongest edge: rescaling a pair changes nothing."""
    rng = np.random.default_rng(1)
    edges = [10.0 ** rng.uniform(-5, 0, size=(5, 4)), 10.0 ** rng.uniform(-5, 0, size=(3, 5))]
    options = dict(norm=norm, min_share=min_share, max_edges=8)
    before = drawn_edges(plot_interaction_graph(edges, **options))
    after = drawn_edges(plot_interaction_graph([s * E for s, E in zip(scales, edges)],
                                               **options))
    assert before.keys() == after.keys()
    np.testing.assert_allclose([after[k] for k in before], list(before.values()), rtol=1e-9)
    plt.close("all")


# --------------------------------------------------------------------------- modules
def test_largest_modules_coloured_and_named(rng):
    sizes = np.arange(1, 16)  # module m has m + 1 nodes
    labels = rng.permutation(np.repeat(np.arange(15), sizes))
    n = len(labels)  # 120 nodes: layers of 50 and 70
    edges = [rng.random((70, 50))]
    ax = plot_interaction_graph(edges, labels, max_modules=4, max_edges=None, norm="identity")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "module 14 (15)", "module 13 (14)", "module 12 (13)", "module 11 (12)",
        f"11 other modules ({n - 15 - 14 - 13 - 12})"]
    colors = ax.collections[1].get_facecolors()
    big = labels >= 11
    assert np.all(colors[~big] == GREY)
    assert len(np.unique(colors[big], axis=0)) == 4
    for m in range(11, 15):
        assert len(np.unique(colors[labels == m], axis=0)) == 1
    # An edge inside a coloured module takes its colour; any other edge is dark grey.
    segments = drawn_edges(ax)
    line_colors = ax.collections[0].get_colors()[:, :3]
    for (s, t), color in zip(segments, line_colors):
        expected = colors[s, :3] if labels[s] == labels[t] and big[s] else [0.45] * 3
        np.testing.assert_allclose(color, expected)


def test_module_order_groups_modules_top_down_largest_first():
    labels = np.array([2, 0, 2, 1, 2, 0, 2])  # layers of 3 and 4 nodes
    ax = plot_interaction_graph([np.ones((4, 3))], labels, node_order="module")
    y = ax.collections[1].get_offsets()[:, 1]
    rank = {2: 0, 0: 1, 1: 2}  # modules by size: 4, 2 and 1 nodes
    for layer in (np.arange(3), np.arange(3, 7)):
        top_down = layer[np.argsort(-y[layer])]
        assert list(top_down) == sorted(layer, key=lambda k: (rank[labels[k]], k))


def test_drawing_stays_bounded_at_512_nodes_per_layer(rng):
    def children(width):
        edges = [rng.random((width, width)) for _ in range(2)]
        labels = rng.integers(0, 40, size=3 * width)
        fig, ax = plt.subplots(figsize=(8, 6))
        plot_interaction_graph(edges, labels, ax=ax, max_edges=300)
        return fig, ax

    fig, ax = children(512)
    lines, nodes = ax.collections
    assert len(lines.get_segments()) == 2 * 300
    assert len(nodes.get_offsets()) == 3 * 512
    assert len(ax.get_legend().get_texts()) == 10 + 1
    fig.canvas.draw()  # renders
    _, small = children(16)
    assert len(ax.get_children()) == len(small.get_children())
    assert len(ax.texts) == 0 and len(ax.lines) == 0


# --------------------------------------------------------------------------- refusals
def test_graph_errors(graph, fitted):
    edges, labels = graph
    with pytest.raises(ValueError, match="must chain"):
        plot_interaction_graph([edges[0], edges[0]])
    with pytest.raises(ValueError, match=r"one module per node \(12 = 4 \+ 5 \+ 3"):
        plot_interaction_graph(edges, labels[:-1])
    with pytest.raises(ValueError, match="non-empty list"):
        plot_interaction_graph([])
    with pytest.raises(TypeError, match="fitted InteractionGraph or a list of edge matrices"):
        plot_interaction_graph("edges")
    with pytest.raises(NotFittedError):
        plot_interaction_graph(InteractionGraph())
    with pytest.raises(ValueError, match="layer_names must name the 3 layers"):
        plot_interaction_graph(fitted, layer_names=["a", "b"])
    with pytest.raises(ValueError, match=r"strengths\[1\] must hold one value per node"):
        plot_interaction_graph(edges, strengths=[np.ones(4), np.ones(4), np.ones(3)])


@pytest.mark.parametrize("option, message", [
    (dict(max_edges=0), "max_edges"),
    (dict(min_share=1.0), "min_share"),
    (dict(node_size=(10, 1)), "node_size"),
    (dict(node_size=-1), "node_size"),
    (dict(node_size=(1, np.nan)), "node_size"),
    (dict(max_modules=0), "max_modules"),
    (dict(node_order="size"), "node_order"),
    (dict(norm="log2"), "norm"),
    (dict(eps=[1e-3]), r"one per layer pair \(2\)"),
    (dict(eps=0.0), "positive float"),
])
def test_option_errors(graph, option, message):
    edges, labels = graph
    with pytest.raises(ValueError, match=message):
        plot_interaction_graph(edges, labels, **option)


def test_module_order_needs_labels(graph):
    with pytest.raises(ValueError, match="needs the labels"):
        plot_interaction_graph(graph[0], node_order="module")
