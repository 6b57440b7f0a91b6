"""The picture of a layered interaction graph (:func:`plot_interaction_graph`).

Drawn with a bounded number of artists whatever the graph's size: every edge in
one :class:`~matplotlib.collections.LineCollection`, the directions in one
scatter (the constant nodes, if any, in a second), and a legend of at most
``max_modules + 2`` entries, so that a graph of 512 directions per layer draws
as fast and reads as well as one of 5.
"""

from numbers import Integral, Real

import numpy as np

from ..graph._normalize import normalize_edges
from ..graph._view import graph_view, module_labels
from ._mpl import axes

__all__ = ["plot_interaction_graph"]

# Default log threshold, relative to the strongest edge of a layer pair: edges
# weaker than a thousandth of it are not drawn (the figure shows three decades).
_LOG_DECADES = 3
_EDGE_GREY = (0.45, 0.45, 0.45)
_OTHER_GREY = (0.75, 0.75, 0.75)


def _check_options(norm, eps, n_pairs, max_edges, min_share, node_size, max_modules,
                   node_order, labels):
    if norm not in ("identity", "sqrt", "log"):
        raise ValueError(f"norm must be 'identity', 'sqrt' or 'log', got {norm!r}.")
    if eps is not None:
        eps = np.broadcast_to(np.asarray(eps, dtype=np.float64), (n_pairs,)) \
            if np.ndim(eps) == 0 else np.asarray(eps, dtype=np.float64)
        if eps.shape != (n_pairs,) or not np.all(eps > 0) or not np.all(np.isfinite(eps)):
            raise ValueError(f"eps must be a positive float or one per layer pair ({n_pairs}), "
                             f"got {eps!r}.")
    if max_edges is not None and (not isinstance(max_edges, Integral) or max_edges < 1):
        raise ValueError(f"max_edges must be a positive integer or None, got {max_edges!r}.")
    if min_share is not None and not (isinstance(min_share, Real) and 0 <= min_share < 1):
        raise ValueError(f"min_share must be a float in [0, 1) or None, got {min_share!r}.")
    sizes = np.atleast_1d(np.asarray(node_size, dtype=np.float64))
    if (sizes.shape not in ((1,), (2,)) or not np.isfinite(sizes).all() or (sizes < 0).any()
            or sizes[0] > sizes[-1]):
        raise ValueError("node_size must be a non-negative area or a pair (smallest, largest) "
                         f"with smallest <= largest, got {node_size!r}.")
    if not isinstance(max_modules, Integral) or max_modules < 1:
        raise ValueError(f"max_modules must be a positive integer, got {max_modules!r}.")
    if node_order not in ("index", "module"):
        raise ValueError(f"node_order must be 'index' or 'module', got {node_order!r}.")
    if node_order == "module" and labels is None:
        raise ValueError("node_order='module' needs the labels of the nodes' modules.")
    return eps, sizes


def _selected_edges(view, norm, eps, max_edges, min_share):
    """``(sources, targets, strength in (0, 1])`` of the edges drawn, weakest first."""
    sources, targets, strengths = [], [], []
    for l, E in enumerate(view.edges):
        top = E.max(initial=0.0)
        if top == 0:
            continue
        pair_eps = None
        if norm == "log":
            pair_eps = eps[l] if eps is not None else top * 10.0 ** -_LOG_DECADES
        W = normalize_edges(E, norm, eps=pair_eps)
        keep = W > 0
        if min_share is not None:
            keep &= E >= min_share * E.sum()
        i, j = np.nonzero(keep)
        if max_edges is not None and len(i) > max_edges:
            strongest = np.argsort(-E[i, j], kind="stable")[:max_edges]
            i, j = i[strongest], j[strongest]
        if len(i) == 0:
            continue
        sources.append(view.offsets[l] + j)
        targets.append(view.offsets[l + 1] + i)
        strengths.append(W[i, j] / W.max())  # each pair's strongest edge gets 1
    if not sources:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    sources, targets, strengths = map(np.concatenate, (sources, targets, strengths))
    order = np.argsort(strengths, kind="stable")  # strong edges are drawn on top
    return sources[order], targets[order], strengths[order]


def _module_colors(labels, max_modules, cmap):
    """RGBA of every node, its module's rank by size, and the legend's entries.

    The ``max_modules`` largest modules get the colormap's colours, all others one
    grey, so that a graph of many small modules stays legible. Legend entries are
    ``(label, colour, count)``, largest module first.
    """
    import matplotlib as mpl

    colormap = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    modules, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    rank = np.empty(len(modules), dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(len(modules))
    n_coloured = min(max_modules, len(modules))
    if colormap.N > 32:  # a continuous colormap: evenly spaced samples
        palette = colormap(np.linspace(0, 1, n_coloured))
    else:  # a qualitative one: its colours in order, cycled
        palette = colormap(np.arange(n_coloured) % colormap.N)
    colors = np.tile(mpl.colors.to_rgba(_OTHER_GREY), (len(modules), 1))
    colors[rank < n_coloured] = palette[rank[rank < n_coloured]]
    entries = [(f"module {modules[m]} ({counts[m]})", colors[m], counts[m])
               for m in np.argsort(rank)[:n_coloured]]
    others = rank >= n_coloured
    if others.any():
        entries.append((f"{others.sum()} other modules ({counts[others].sum()})",
                        colors[others][0], counts[others].sum()))
    return colors[inverse], rank[inverse], entries


def _node_sizes(view, sizes):
    if len(sizes) == 1:
        return np.full(view.n_nodes, sizes[0])
    smallest, largest = sizes
    values = np.clip(view.strengths, 0, None)
    out = np.full(view.n_nodes, np.sqrt(smallest * largest))  # Lambda unknown
    for l in range(len(view.widths)):
        layer = slice(view.offsets[l], view.offsets[l + 1])
        known = ~np.isnan(values[layer])
        top = values[layer][known].max(initial=0.0)
        if top > 0:
            out[layer][known] = smallest + (largest - smallest) * values[layer][known] / top
    return out


def _positions(view, codes, node_order):
    """x = layer, y in (0, 1) from the top: by index, or by module then index."""
    y = np.empty(view.n_nodes)
    for l, width in enumerate(view.widths):
        nodes = np.arange(view.offsets[l], view.offsets[l + 1])
        if node_order == "module":
            # Constant nodes stay at the bottom of their layer.
            nodes = nodes[np.lexsort((nodes, codes[nodes], view.constant[nodes]))]
        y[nodes] = 1 - (np.arange(width) + 0.5) / width
    return view.layer.astype(np.float64), y


def _label_columns(ax, view):
    names = [f"{name}\n({width})" for name, width in zip(view.layer_names, view.widths)]
    ax.set_xticks(range(len(names)), names, fontsize="small")
    # Long names of many layers would overlap: slant them.
    if max(map(len, view.layer_names)) * len(names) > 60:
        ax.tick_params(axis="x", labelrotation=20)
        for text in ax.get_xticklabels():
            text.set_horizontalalignment("right")


def plot_interaction_graph(graph, labels=None, ax=None, *, layer_names=None, strengths=None,
                           norm="log", eps=None, max_edges=200, min_share=None,
                           node_size=(4.0, 120.0), max_modules=10, node_order="index",
                           cmap="tab10", legend=True):
    """The layered interaction graph: basis directions as nodes, strongest edges as lines.

    Layer ``l`` is the column ``x = l``, labelled with its name and its number
    of nodes; its directions are spread over the height in order of importance
    (direction 0 at the top). A node's area grows linearly with its Lambda
    (``interaction_strengths_``) relative to the layer's largest. Edges are
    normalised per layer pair as in :meth:`~sklearn_lib.InteractionGraph.adjacency`
    (``norm``, ``eps``), thresholded, and drawn with width and opacity growing
    with the normalised strength (each pair's strongest edge fully opaque, the
    strong on top); an edge inside a module takes its module's colour.

    Parameters
    ----------
    graph : InteractionGraph or list of array-like
        A fitted graph (layer names, Lambdas and constant nodes are read from
        it), or edge matrices of consecutive layer pairs, element ``l`` of shape
        ``(r_{l+1}, r_l)``, e.g. ``InteractionGraph.edges_``.
    labels : array-like of shape (n_nodes,) or ModularityClustering, default=None
        Module of every node, layer by layer (e.g. a fitted
        :class:`~sklearn_lib.ModularityClustering` or its ``labels_``); nodes
        are coloured by it, with a legend.
    ax : matplotlib Axes, default=None
        Axes to draw on; None makes a new figure.
    layer_names : list of str, default=None
        Column labels; default the graph's ``layer_names_`` (``"layer l"`` for
        bare edge matrices).
    strengths : list of array-like, default=None
        Lambda of every node, one array per layer; default the bases'
        ``interaction_strengths_`` (bare edge matrices: nodes of one size).
    norm : {"log", "sqrt", "identity"}, default="log"
        Normalisation of the edges: ``max(0, log10(E / eps))``, ``sqrt(E)`` or
        ``E`` (SPEC section 3, :func:`sklearn_lib.cluster.normalize_edges`).
    eps : float, list of float or None, default=None
        Threshold of the log form, one for all pairs or one per pair; edges at
        or below it are not drawn. None: a thousandth of the pair's strongest
        edge (three decades). Ignored by the other norms.
    max_edges : int or None, default=200
        Number of strongest edges drawn per layer pair; None draws every
        edge that passes the thresholds.
    min_share : float in [0, 1) or None, default=None
        Also leave out edges weaker than this share of the total strength of
        their layer pair (``E[i, j] < min_share * E.sum()``).
    node_size : float or (float, float), default=(4.0, 120.0)
        Marker area of every node, or the areas of Lambda 0 and of the layer's
        largest Lambda (nodes of unknown Lambda get their geometric mean).
    max_modules : int, default=10
        Modules coloured and named in the legend, largest first; the others
        share one grey.
    node_order : {"index", "module"}, default="index"
        Order of the nodes within a layer: by direction, or grouped by module,
        largest module at the top as in the legend (then by direction), which
        shows modules as bands.
    cmap : str or Colormap, default="tab10"
        Colours of the modules.
    legend : bool, default=True
        Legend of the modules (and of the constant node) beside the axes.

    Returns
    -------
    ax : matplotlib Axes
        ``ax.collections`` are the edges (a LineCollection), the directions
        and, if the graph has them, the constant nodes (drawn as squares).

    See Also
    --------
    sklearn_lib.export.to_networkx : The same graph, with node attributes, for networkx.
    plot_layer_spectra : The Lambdas of every layer.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from sklearn_lib.plotting import plot_interaction_graph
    >>> rng = np.random.default_rng(0)
    >>> edges = [rng.random((3, 4)), rng.random((2, 3))]  # layers of 4, 3 and 2 directions
    >>> ax = plot_interaction_graph(edges, labels=[0, 0, 1, 1, 0, 1, 1, 0, 1], max_edges=5)
    >>> lines, nodes = ax.collections
    >>> len(lines.get_segments()), len(nodes.get_offsets())
    (10, 9)
    >>> [text.get_text() for text in ax.get_legend().get_texts()]
    ['module 1 (5)', 'module 0 (4)']
    >>> matplotlib.pyplot.close(ax.figure)
    """
    view = graph_view(graph, layer_names=layer_names, strengths=strengths)
    labels = module_labels(labels, view)
    eps, sizes = _check_options(norm, eps, len(view.edges), max_edges, min_share, node_size,
                                max_modules, node_order, labels)
    sources, targets, strength = _selected_edges(view, norm, eps, max_edges, min_share)

    ax = axes(ax)
    import matplotlib as mpl
    from matplotlib.collections import LineCollection
    from matplotlib.lines import Line2D

    entries = []
    if labels is None:
        node_colors = np.tile(mpl.colors.to_rgba("C0"), (view.n_nodes, 1))
        codes = np.zeros(view.n_nodes, dtype=np.int64)
        edge_rgb = np.tile(_EDGE_GREY, (len(strength), 1))
    else:
        node_colors, codes, entries = _module_colors(labels, max_modules, cmap)
        coloured = (codes[sources] == codes[targets]) & (
            node_colors[sources, :3] != _OTHER_GREY).any(axis=1)
        edge_rgb = np.where(coloured[:, None], node_colors[sources, :3], _EDGE_GREY)
    x, y = _positions(view, codes, node_order)

    segments = np.stack([np.column_stack([x[sources], y[sources]]),
                         np.column_stack([x[targets], y[targets]])], axis=1)
    ax.add_collection(LineCollection(
        segments, colors=np.column_stack([edge_rgb, 0.1 + 0.9 * strength ** 2]),
        linewidths=0.2 + 1.8 * strength, zorder=1))
    area = _node_sizes(view, sizes)
    for constant, marker in ((False, "o"), (True, "s")):
        nodes = view.constant == constant
        if nodes.any():
            ax.scatter(x[nodes], y[nodes], s=area[nodes], c=node_colors[nodes], marker=marker,
                       edgecolors="k", linewidths=0.3, zorder=2)

    handles = [Line2D([], [], linestyle="", marker="o", markerfacecolor=color,
                      markeredgecolor="k", markeredgewidth=0.3, label=label)
               for label, color, _ in entries]
    if view.constant.any():
        handles.append(Line2D([], [], linestyle="", marker="s", markerfacecolor="none",
                              markeredgecolor="k", label="constant node"))
    if legend and handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False, fontsize="small", title="modules (nodes)" if entries else None)

    ax.set_xlim(-0.5, len(view.widths) - 0.5)
    ax.set_ylim(-0.02, 1.02)  # room for the largest markers at either end
    _label_columns(ax, view)
    ax.set_yticks([])
    ax.set_ylabel("direction (strongest on top)" if node_order == "index"
                  else "module, then direction")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return ax
