"""Figures of spectra, ablation curves, edge matrices and interaction graphs.

matplotlib is an optional extra (``pip install sklearn_lib[plot]``); it is
imported when a function here is called, not when the module is imported. Every
function draws on ``ax`` (a new figure's axes when None) and returns the axes,
so figures compose and can be styled further; :func:`plot_layer_spectra` draws
one panel per layer on ``axes`` and returns them. The graph figure lives in
:mod:`sklearn_lib.plotting._graph_plot`.
"""

import numpy as np
from sklearn.utils.validation import check_is_fitted

from ..graph._view import check_edges
from ._graph_plot import plot_interaction_graph
from ._mpl import axes, pyplot

__all__ = [
    "plot_ablation_curves",
    "plot_edges",
    "plot_interaction_graph",
    "plot_layer_spectra",
    "plot_spectrum",
]

_COUNT_LABELS = {"n_directions": "directions kept", "n_edges": "edges kept"}


def _is_curve(obj):
    return hasattr(obj, "keys") and "score" in obj.keys()


def _split_curves(curves):
    """``[(label, count_name, counts, scores, references)]`` from any accepted input."""
    if _is_curve(curves):
        tables = {None: curves}
    elif isinstance(curves, dict) and curves and all(_is_curve(c) for c in curves.values()):
        tables = curves
    else:
        raise ValueError(
            "curves must be an ablation result (DataFrame or dict with columns "
            "n_directions or n_edges, score, reference), possibly with a 'basis' column, "
            "or a dict mapping names to such results."
        )
    split = []
    for name, table in tables.items():
        columns = list(table.keys())
        count_name = next((c for c in _COUNT_LABELS if c in columns), None)
        if count_name is None:
            raise ValueError(f"an ablation result needs n_directions or n_edges, got {columns}.")
        column = {c: np.asarray(table[c]) for c in columns}
        if "basis" in column:
            groups = [(label, column["basis"] == label) for label in dict.fromkeys(column["basis"])]
        else:
            groups = [(name, slice(None))]
        for label, rows in groups:
            counts = column[count_name][rows]
            order = np.argsort(counts, kind="stable")
            references = column["reference"][rows] if "reference" in column else []
            split.append((
                None if label is None else str(label), count_name, counts[order],
                column["score"][rows][order], np.unique(references),
            ))
    if len({count_name for _, count_name, *_ in split}) > 1:
        raise ValueError("curves mix node (n_directions) and edge (n_edges) ablations.")
    return split


def plot_ablation_curves(curves, ax=None, *, reference=True, logx=False, ylabel="score",
                         **line_kwargs):
    """Ablation curves of one or several bases on one axis.

    Parameters
    ----------
    curves : DataFrame, dict of ndarray, or dict of str to either
        A result of :func:`~sklearn_lib.evaluation.node_ablation_curve` or
        :func:`~sklearn_lib.evaluation.edge_ablation_curve`; a long table of
        :func:`~sklearn_lib.evaluation.compare_node_ablation` (one line per value
        of its ``basis`` column); or a dict mapping names to results.
    ax : matplotlib Axes, default=None
        Axes to draw on; None makes a new figure.
    reference : bool, default=True
        Draw the unablated score as a dashed horizontal line.
    logx : bool, default=False
        Logarithmic count axis (useful for edge counts).
    ylabel : str, default="score"
        Label of the score axis.
    **line_kwargs
        Passed to :meth:`~matplotlib.axes.Axes.plot` for every curve.

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from sklearn_lib.plotting import plot_ablation_curves
    >>> curves = {
    ...     "PCA": {"n_directions": np.arange(1, 4), "score": np.array([0.4, 0.8, 1.0]),
    ...             "reference": np.ones(3)},
    ...     "LIB": {"n_directions": np.arange(1, 4), "score": np.array([0.7, 1.0, 1.0]),
    ...             "reference": np.ones(3)},
    ... }
    >>> ax = plot_ablation_curves(curves, ylabel="accuracy")
    >>> [text.get_text() for text in ax.get_legend().get_texts()]
    ['PCA', 'LIB', 'unablated']
    >>> matplotlib.pyplot.close(ax.figure)
    """
    split = _split_curves(curves)
    ax = axes(ax)
    line_kwargs = {"marker": "o", "markersize": 3, **line_kwargs}
    for label, _, counts, scores, _ in split:
        ax.plot(counts, scores, label=label, **line_kwargs)
    if reference:
        values = np.unique(np.concatenate([refs for *_, refs in split]))
        for i, value in enumerate(values):
            ax.axhline(value, color="0.4", linestyle="--", linewidth=1,
                       label="unablated" if i == 0 else None)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(f"number of {_COUNT_LABELS[split[0][1]]}")
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[1]:
        ax.legend()
    return ax


def _strengths(basis, name):
    """Per-direction strengths of a fitted basis (or the values themselves)."""
    if isinstance(basis, (np.ndarray, list, tuple)):
        values = np.asarray(basis, dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"bases[{name!r}] must be 1-D, got shape {values.shape}.")
        return values
    check_is_fitted(basis)
    # A pipeline's directions are those of its last step.
    step = basis[-1] if hasattr(basis, "steps") else basis
    for attribute in ("interaction_strengths_", "explained_variance_"):
        if hasattr(step, attribute):
            return np.asarray(getattr(step, attribute), dtype=np.float64)
    raise ValueError(
        f"bases[{name!r}] ({type(step).__name__}) has neither interaction_strengths_ "
        "(InteractionBasis) nor explained_variance_ (PCA)."
    )


def plot_spectrum(bases, ax=None, *, log=True):
    """Strength of each direction of several bases on one axis.

    ``interaction_strengths_`` (Lambda) of an :class:`~sklearn_lib.InteractionBasis`
    and ``explained_variance_`` of a PCA are both the variance of each
    coordinate on the training data (Lambda averages over n, PCA over n - 1),
    so they share the axis.

    Parameters
    ----------
    bases : dict of str to fitted basis or 1-D array
        Name -> InteractionBasis, PCA, a Pipeline ending in one, or the values.
    ax : matplotlib Axes, default=None
        Axes to draw on; None makes a new figure.
    log : bool, default=True
        Logarithmic strength axis.

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from sklearn.decomposition import PCA
    >>> from sklearn_lib import InteractionBasis
    >>> from sklearn_lib.plotting import plot_spectrum
    >>> X = np.random.default_rng(0).normal(size=(100, 4))
    >>> ax = plot_spectrum({"PCA": PCA().fit(X), "LIB": InteractionBasis().fit(X)})
    >>> len(ax.get_lines()), ax.get_yscale()
    (2, 'log')
    >>> matplotlib.pyplot.close(ax.figure)
    """
    if not isinstance(bases, dict) or not bases:
        raise ValueError("bases must be a non-empty dict mapping names to fitted bases.")
    spectra = {name: _strengths(basis, name) for name, basis in bases.items()}
    ax = axes(ax)
    for name, values in spectra.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("direction")
    ax.set_ylabel("strength (variance of the coordinate)")
    ax.legend()
    return ax


def _check_graphs(graphs):
    """``{name: fitted graph}`` from one graph or a dict; every graph has the same layers."""
    if not isinstance(graphs, dict):
        graphs = {None: graphs}
    if not graphs:
        raise ValueError("graphs must be a fitted InteractionGraph or a non-empty dict of them.")
    for name, graph in graphs.items():
        if not hasattr(graph, "bases_") and not hasattr(graph, "adjacency"):
            raise TypeError(
                "graphs must be fitted InteractionGraphs (or a dict of them), got "
                f"{type(graph).__name__}" + ("" if name is None else f" for {name!r}") + "."
            )
        check_is_fitted(graph)
    names = {tuple(g.layer_names_) for g in graphs.values()}
    if len(names) > 1:
        raise ValueError(f"the graphs must have the same layers, got {sorted(names)}.")
    return graphs, list(next(iter(graphs.values())).layer_names_)


def plot_layer_spectra(graphs, axes=None, *, layers=None, log=True, ncols=4):
    """The Lambdas of every layer of one or several graphs, one panel per layer.

    Panel ``l`` is :func:`plot_spectrum` of ``bases_[l]`` of every graph,
    titled with the layer's name and number of directions. Comparing an
    interaction graph with a PCA graph (``basis="pca"``) of the same layers
    shows, layer by layer, how fast each basis concentrates its strength.

    Parameters
    ----------
    graphs : InteractionGraph or dict of str to InteractionGraph
        Fitted graph(s), all with the same ``layer_names_``.
    axes : array-like of matplotlib Axes, default=None
        At least one axes per layer shown; None makes a new figure with
        ``ncols`` panels per row.
    layers : list of int or str, default=None
        Layers shown (indices or names); None shows all.
    log : bool, default=True
        Logarithmic strength axes.
    ncols : int, default=4
        Panels per row of a new figure.

    Returns
    -------
    axes : ndarray of matplotlib Axes
        One per layer shown, in order (unused panels of a new figure are hidden).

    See Also
    --------
    plot_spectrum : One panel, any bases.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import torch
    >>> from sklearn_lib import InteractionGraph
    >>> from sklearn_lib.plotting import plot_layer_spectra
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    >>> X = torch.randn(200, 4)
    >>> graphs = {b: InteractionGraph(basis=b).fit_model(net, [":input", "1", "2"], X)
    ...           for b in ("interaction", "pca")}
    >>> axes = plot_layer_spectra(graphs)  # the titles give r per graph
    >>> [ax.get_title() for ax in axes]
    [':input (4)', '1 (3 / 6)', '2 (3)']
    >>> matplotlib.pyplot.close(axes[0].figure)
    """
    graphs, names = _check_graphs(graphs)
    if layers is None:
        layers = list(range(len(names)))
    indices = []
    for layer in layers:
        if isinstance(layer, str) and layer in names:
            indices.append(names.index(layer))
        elif isinstance(layer, (int, np.integer)) and -len(names) <= layer < len(names):
            indices.append(int(layer) % len(names))
        else:
            raise ValueError(f"layers must be names from {names} or indices in "
                             f"[-{len(names)}, {len(names)}), got {layer!r}.")
    if not indices:
        raise ValueError("layers must name at least one layer.")
    if axes is None:
        if not isinstance(ncols, (int, np.integer)) or ncols < 1:
            raise ValueError(f"ncols must be a positive integer, got {ncols!r}.")
        ncols = min(ncols, len(indices))
        nrows = -(-len(indices) // ncols)
        _, grid = pyplot().subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows),
                                    squeeze=False, constrained_layout=True)
        grid = grid.ravel()
        for unused in grid[len(indices):]:
            unused.set_visible(False)
        axes = grid[:len(indices)]
    else:
        axes = np.ravel(np.asarray(axes, dtype=object))
        if len(axes) < len(indices):
            raise ValueError(f"axes must hold one axes per layer shown ({len(indices)}), "
                             f"got {len(axes)}.")
        axes = axes[:len(indices)]
    for panel, (ax, l) in enumerate(zip(axes, indices)):
        bases = {("strength" if name is None else name): graph.bases_[l]
                 for name, graph in graphs.items()}
        plot_spectrum(bases, ax=ax, log=log)
        counts = dict.fromkeys(str(len(b.interaction_strengths_)) for b in bases.values())
        ax.set_title(f"{names[l]} ({' / '.join(counts)})")
        ax.set_ylabel("Lambda" if panel == 0 else "")
        # One legend is enough: every panel shows the same graphs.
        if panel > 0 or len(graphs) == 1:
            ax.get_legend().remove()
    return axes


def plot_edges(E, ax=None, *, log=True, cmap="viridis", colorbar=True):
    """Heatmap of an edge matrix between the directions of two layers.

    Parameters
    ----------
    E : array-like of shape (r_out, r_in)
        ``E[i, j]`` between input direction ``j`` (columns) and output
        direction ``i`` (rows), non-negative.
    ax : matplotlib Axes, default=None
        Axes to draw on; None makes a new figure.
    log : bool, default=True
        Logarithmic colour scale over the positive edges; zero edges are left
        blank. Falls back to a linear scale when no edge is positive.
    cmap : str or Colormap, default="viridis"
    colorbar : bool, default=True
        Add a colorbar to the axes' figure.

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from sklearn_lib.plotting import plot_edges
    >>> ax = plot_edges(np.array([[1.0, 1e-3], [0.0, 1e-6]]))
    >>> len(ax.get_images()), ax.get_images()[0].norm.vmin
    (1, 1e-06)
    >>> matplotlib.pyplot.close(ax.figure)
    """
    E = check_edges(E)
    ax = axes(ax)
    from matplotlib.colors import LogNorm

    positive = E[E > 0]
    if log and positive.size:
        data = np.ma.masked_less_equal(E, 0)
        norm = LogNorm(vmin=positive.min(), vmax=positive.max())
    else:
        data, norm = E, None
    image = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="edge strength")
    ax.set_xlabel("input direction j (layer l)")
    ax.set_ylabel("output direction i (layer l+1)")
    return ax
