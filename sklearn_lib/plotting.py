"""Figures of spectra, ablation curves, edge matrices and interaction graphs.

matplotlib is an optional extra (``pip install sklearn_lib[plot]``); it is
imported when a function here is called, not when the module is imported. Every
function draws on ``ax`` (a new figure's axes when None) and returns the axes,
so figures compose and can be styled further.
"""

from numbers import Integral

import numpy as np
from sklearn.utils.validation import check_array, check_is_fitted

__all__ = [
    "plot_ablation_curves",
    "plot_edges",
    "plot_interaction_graph",
    "plot_spectrum",
]

_COUNT_LABELS = {"n_directions": "directions kept", "n_edges": "edges kept"}


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "sklearn_lib.plotting needs matplotlib, an optional extra: "
            "pip install sklearn_lib[plot]"
        ) from error
    return plt


def _axes(ax):
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots()
    return ax


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
    ax = _axes(ax)
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
    ax = _axes(ax)
    for name, values in spectra.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("direction")
    ax.set_ylabel("strength (variance of the coordinate)")
    ax.legend()
    return ax


def _check_edges(E, name="E"):
    E = check_array(E, dtype=np.float64, input_name=name)
    if (E < 0).any():
        raise ValueError(f"{name} must be non-negative (edge strengths).")
    return E


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
    E = _check_edges(E)
    ax = _axes(ax)
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


def plot_interaction_graph(edges, labels=None, ax=None, *, max_edges=500, node_size=20,
                           cmap="tab10"):
    """The layered interaction graph: basis directions as nodes, strongest edges as lines.

    Layer ``l`` is the column ``x = l``; its directions are spread over the
    height in order of importance (direction 0 at the top). Each layer pair's
    edges are divided by that pair's strongest edge, and the ``max_edges``
    strongest of these normalised strengths are drawn as one
    :class:`~matplotlib.collections.LineCollection` with opacity and width
    growing with the strength (strong edges on top). Pass log-normalised edges
    (SPEC section 3) to show a wide dynamic range.

    Parameters
    ----------
    edges : list of array-like, element l of shape (r_{l+1}, r_l)
        Edge matrices of consecutive layer pairs, e.g. ``InteractionGraph.edges_``.
    labels : array-like of shape (sum_l r_l,), default=None
        Module of every node, layer by layer (e.g. ``ModularityClustering.labels_``
        on the graph's adjacency); nodes are coloured by it.
    ax : matplotlib Axes, default=None
        Axes to draw on; None makes a new figure.
    max_edges : int or None, default=500
        Number of strongest edges drawn; None draws every non-zero edge.
    node_size : float, default=20
        Marker area of the nodes.
    cmap : str or Colormap, default="tab10"
        Colours of the modules (cycled when there are more modules than colours).

    Returns
    -------
    ax : matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from sklearn_lib.plotting import plot_interaction_graph
    >>> rng = np.random.default_rng(0)
    >>> edges = [rng.random((3, 4)), rng.random((2, 3))]  # layers of 4, 3 and 2 directions
    >>> ax = plot_interaction_graph(edges, labels=[0, 0, 1, 1, 0, 1, 1, 0, 1], max_edges=10)
    >>> lines, nodes = ax.collections
    >>> len(lines.get_segments()), len(nodes.get_offsets())
    (10, 9)
    >>> matplotlib.pyplot.close(ax.figure)
    """
    if isinstance(edges, np.ndarray) and edges.ndim == 2:
        edges = [edges]
    if not isinstance(edges, (list, tuple)):
        raise TypeError(
            "edges must be a list of edge matrices, e.g. a fitted InteractionGraph's "
            f"edges_, got {type(edges).__name__}."
        )
    if len(edges) == 0:
        raise ValueError("edges must be a non-empty list of edge matrices.")
    edges = [_check_edges(E, f"edges[{l}]") for l, E in enumerate(edges)]
    for l in range(1, len(edges)):
        if edges[l].shape[1] != edges[l - 1].shape[0]:
            raise ValueError(
                f"edges[{l}] has {edges[l].shape[1]} input directions but edges[{l - 1}] "
                f"has {edges[l - 1].shape[0]} output directions; consecutive matrices must "
                "chain as (r_{l+1}, r_l)."
            )
    if max_edges is not None and (not isinstance(max_edges, Integral) or max_edges < 1):
        raise ValueError(f"max_edges must be a positive integer or None, got {max_edges!r}.")
    widths = [edges[0].shape[1]] + [E.shape[0] for E in edges]
    offsets = np.concatenate([[0], np.cumsum(widths)])
    x = np.concatenate([np.full(r, l, dtype=np.float64) for l, r in enumerate(widths)])
    y = np.concatenate([1 - (np.arange(r) + 0.5) / r for r in widths])

    sources, targets, strengths = [], [], []
    for l, E in enumerate(edges):
        i, j = np.nonzero(E)
        sources.append(offsets[l] + j)
        targets.append(offsets[l + 1] + i)
        strengths.append(E[i, j] / E.max())  # empty (no warning) when E is all zero
    sources, targets, strengths = map(np.concatenate, (sources, targets, strengths))
    # Strongest max_edges, then drawn weakest first so that strong edges lie on top.
    keep = np.argsort(-strengths, kind="stable")[:max_edges][::-1]
    sources, targets, strengths = sources[keep], targets[keep], strengths[keep]

    ax = _axes(ax)
    import matplotlib as mpl
    from matplotlib.collections import LineCollection

    segments = np.stack([np.column_stack([x[sources], y[sources]]),
                         np.column_stack([x[targets], y[targets]])], axis=1)
    colors = np.zeros((len(strengths), 4))
    colors[:, :3] = 0.2
    colors[:, 3] = 0.1 + 0.9 * strengths
    ax.add_collection(LineCollection(segments, colors=colors,
                                     linewidths=0.3 + 2.7 * strengths, zorder=1))

    n_nodes = offsets[-1]
    if labels is None:
        node_colors = "C0"
    else:
        labels = np.asarray(labels)
        if labels.shape != (n_nodes,):
            raise ValueError(
                f"labels must hold one module per node ({n_nodes} = {' + '.join(map(str, widths))} "
                f"directions, layer by layer), got shape {labels.shape}."
            )
        colormap = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
        codes = np.unique(labels, return_inverse=True)[1]
        node_colors = colormap(codes % colormap.N)
    ax.scatter(x, y, c=node_colors, s=node_size, edgecolors="k", linewidths=0.3, zorder=2)

    ax.set_xlim(-0.5, len(widths) - 0.5)
    ax.set_ylim(0, 1)
    ax.set_xticks(range(len(widths)), [f"layer {l}" for l in range(len(widths))])
    ax.set_yticks([])
    ax.set_xlabel("layer")
    return ax
