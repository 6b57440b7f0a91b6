"""Tests for sklearn_lib.plotting, headless (Agg backend)."""

import builtins
import copy

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from sklearn_lib import InteractionBasis, InteractionGraph  # noqa: E402
from sklearn_lib.evaluation import compare_node_ablation, edge_ablation_curve  # noqa: E402
from sklearn_lib.plotting import (  # noqa: E402
    plot_ablation_curves,
    plot_edges,
    plot_layer_spectra,
    plot_spectrum,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def layer(rng):
    X = rng.normal(size=(120, 5)) @ rng.normal(size=(5, 5))
    W = rng.normal(size=(5, 3))
    return X, W, (X @ W).argmax(1)


def legend_labels(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


# --------------------------------------------------------------------------- ablation curves
def test_compare_frame_one_line_per_basis(layer):
    X, W, y = layer
    bases = {"PCA": PCA().fit(X), "PCA(3)": PCA(3).fit(X)}
    curves = compare_node_ablation(bases, X, y, forward=lambda a: a @ W)
    ax = plot_ablation_curves(curves, ylabel="accuracy")
    lines = ax.get_lines()
    assert len(lines) == 3  # two bases and the shared reference
    assert legend_labels(ax) == ["PCA", "PCA(3)", "unablated"]
    np.testing.assert_array_equal(lines[1].get_xdata(), [1, 2, 3])
    assert ax.get_xlabel() == "number of directions kept"
    assert ax.get_ylabel() == "accuracy"


@pytest.mark.parametrize("as_frame", [True, False])
def test_dict_of_results_edges_and_options(layer, as_frame):
    X, W, y = layer
    pca = PCA().fit(X)
    E = np.abs(np.random.default_rng(1).normal(size=(5, 5)))
    curve = edge_ablation_curve(pca, pca, X, y, section=lambda a: a, forward=lambda a: a @ W,
                                edges=E, schedule=[1, 5, 25], as_frame=as_frame)
    fig, ax = plt.subplots()
    returned = plot_ablation_curves({"PCA": curve}, ax=ax, reference=False, logx=True,
                                    color="k")
    assert returned is ax
    assert len(ax.get_lines()) == 1 and ax.get_lines()[0].get_color() == "k"
    assert legend_labels(ax) == ["PCA"]
    assert ax.get_xlabel() == "number of edges kept" and ax.get_xscale() == "log"


def test_single_curve_without_legend_names():
    curve = {"n_directions": np.array([2, 1]), "score": np.array([1.0, 0.5]),
             "reference": np.ones(2)}
    ax = plot_ablation_curves(curve)
    line, reference = ax.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [1, 2])  # sorted by count
    assert legend_labels(ax) == ["unablated"]
    np.testing.assert_array_equal(reference.get_ydata(), [1.0, 1.0])


def test_ablation_curve_errors():
    node = {"n_directions": np.arange(1, 3), "score": np.ones(2), "reference": np.ones(2)}
    edge = {"n_edges": np.arange(1, 3), "score": np.ones(2), "reference": np.ones(2)}
    with pytest.raises(ValueError, match="mix node"):
        plot_ablation_curves({"a": node, "b": edge})
    with pytest.raises(ValueError, match="ablation result"):
        plot_ablation_curves([1, 2, 3])
    with pytest.raises(ValueError, match="n_directions or n_edges"):
        plot_ablation_curves({"score": np.ones(2)})


# --------------------------------------------------------------------------- spectrum
def test_spectrum_of_pca_lib_pipeline_and_array(layer):
    X, W, _ = layer
    J = np.broadcast_to(W.T, (len(X), 3, 5))
    lib = InteractionBasis(truncation_threshold=1e-9).fit(X, jacobians=J)
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(4))]).fit(X)
    bases = {"PCA": PCA().fit(X), "LIB": lib, "pipeline": pipe, "values": [3.0, 1.0]}
    ax = plot_spectrum(bases)
    lines = ax.get_lines()
    assert [len(line.get_xdata()) for line in lines] == [5, 3, 4, 2]
    np.testing.assert_allclose(lines[1].get_ydata(), lib.interaction_strengths_)
    np.testing.assert_allclose(lines[0].get_ydata(), bases["PCA"].explained_variance_)
    assert legend_labels(ax) == list(bases)
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "direction"
    assert plot_spectrum({"PCA": bases["PCA"]}, log=False).get_yscale() == "linear"


def test_spectrum_errors(layer):
    X, _, _ = layer
    with pytest.raises(NotFittedError):
        plot_spectrum({"LIB": InteractionBasis()})
    with pytest.raises(ValueError, match="neither interaction_strengths_"):
        plot_spectrum({"scaler": StandardScaler().fit(X)})
    with pytest.raises(ValueError, match="must be 1-D"):
        plot_spectrum({"values": np.ones((2, 2))})
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_spectrum({})


# --------------------------------------------------------------------------- edges
def test_edges_heatmap_log_and_linear():
    E = np.array([[1.0, 1e-3, 0.0], [1e-6, 0.5, 0.2]])
    ax = plot_edges(E)
    (image,) = ax.get_images()
    assert isinstance(image.norm, LogNorm)
    assert image.norm.vmin == 1e-6 and image.norm.vmax == 1.0
    assert image.get_array().mask[0, 2]  # the zero edge is left blank
    assert len(ax.figure.axes) == 2  # the colorbar
    assert ax.get_xlabel().startswith("input direction")
    linear = plot_edges(E, log=False, colorbar=False)
    assert not isinstance(linear.get_images()[0].norm, LogNorm)
    assert len(linear.figure.axes) == 1
    zeros = plot_edges(np.zeros((2, 2)))  # nothing positive: linear scale
    assert not isinstance(zeros.get_images()[0].norm, LogNorm)


def test_edges_errors():
    with pytest.raises(ValueError, match="non-negative"):
        plot_edges(np.array([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        plot_edges(np.array([[1.0, np.nan]]))


# --------------------------------------------------------------------------- layer spectra
@pytest.fixture(scope="module")
def graphs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    X = torch.randn(200, 4)
    return {b: InteractionGraph(basis=b).fit_model(net, [":input", "1", "2"], X)
            for b in ("interaction", "pca")}


def test_layer_spectra_one_panel_per_layer(graphs):
    axes = plot_layer_spectra(graphs, ncols=2)
    assert len(axes) == 3
    figure_axes = axes[0].figure.axes
    assert len(figure_axes) == 4 and not figure_axes[3].get_visible()
    for l, ax in enumerate(axes):
        lines = ax.get_lines()
        for line, graph in zip(lines, graphs.values()):
            np.testing.assert_allclose(line.get_ydata(), graph.bases_[l].interaction_strengths_)
        counts = [str(len(g.bases_[l].interaction_strengths_)) for g in graphs.values()]
        expected = " / ".join(dict.fromkeys(counts))
        assert ax.get_title() == f"{graphs['pca'].layer_names_[l]} ({expected})"
    assert legend_labels(axes[0]) == ["interaction", "pca"]
    assert axes[1].get_legend() is None and axes[0].get_yscale() == "log"


def test_layer_spectra_chosen_layers_on_given_axes(graphs):
    graph = graphs["interaction"]
    fig, grid = plt.subplots(1, 2)
    axes = plot_layer_spectra(graph, grid, layers=["1", -1], log=False)
    assert list(axes) == list(grid)
    assert [ax.get_title() for ax in axes] == ["1 (3)", "2 (3)"]
    assert axes[0].get_legend() is None and axes[0].get_yscale() == "linear"
    np.testing.assert_allclose(axes[1].get_lines()[0].get_ydata(),
                               graph.bases_[2].interaction_strengths_)


def test_layer_spectra_errors(graphs):
    graph = graphs["interaction"]
    with pytest.raises(ValueError, match=r"layers must be names from \[':input', '1', '2'\]"):
        plot_layer_spectra(graph, layers=["3"])
    with pytest.raises(ValueError, match="at least one layer"):
        plot_layer_spectra(graph, layers=[])
    with pytest.raises(ValueError, match=r"one axes per layer shown \(3\), got 2"):
        plot_layer_spectra(graph, plt.subplots(1, 2)[1])
    with pytest.raises(ValueError, match="ncols"):
        plot_layer_spectra(graph, ncols=0)
    with pytest.raises(TypeError, match="fitted InteractionGraphs"):
        plot_layer_spectra({"edges": graph.edges_})
    with pytest.raises(NotFittedError):
        plot_layer_spectra(InteractionGraph())
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_layer_spectra({})
    renamed = copy.copy(graph)
    renamed.layer_names_ = ["x", "h", "y"]
    with pytest.raises(ValueError, match="same layers"):
        plot_layer_spectra({"a": graph, "b": renamed})


# --------------------------------------------------------------------------- optional extra
def test_missing_matplotlib_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"pip install sklearn_lib\[plot\]"):
        plot_edges(np.ones((2, 2)))
