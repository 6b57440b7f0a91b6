"""The nodes and edges of a layered interaction graph as plain arrays.

Figures (:mod:`sklearn_lib.plotting`) and exports (:mod:`sklearn_lib.export`)
accept either a fitted :class:`~sklearn_lib.InteractionGraph` or its bare
``edges_`` list; :func:`graph_view` turns both into one :class:`GraphView`, and
:func:`module_labels` checks the module of every node, so that both read a
graph, its layer names, its Lambdas and its constant nodes the same way.
"""

from typing import NamedTuple

import numpy as np
from sklearn.utils.validation import check_array, check_is_fitted

__all__ = ["GraphView", "check_edges", "graph_view", "module_labels"]


class GraphView(NamedTuple):
    """Nodes ``offsets[l]:offsets[l + 1]`` are layer ``l``'s, in the order of ``edges``."""

    edges: list            # float64 arrays of shape (width_{l+1}, width_l)
    layer_names: list      # str, one per layer
    offsets: np.ndarray    # int64, cumulative node counts, shape (n_layers + 1,)
    strengths: np.ndarray  # float64 Lambda of every node; NaN where unknown or constant
    constant: np.ndarray   # bool, the constant node of a layer (constant_node=True)

    @property
    def widths(self):
        return np.diff(self.offsets)

    @property
    def n_nodes(self):
        return int(self.offsets[-1])

    @property
    def layer(self):
        """Layer index of every node."""
        return np.repeat(np.arange(len(self.widths)), self.widths)

    @property
    def index(self):
        """Index of every node within its layer."""
        return np.arange(self.n_nodes) - np.repeat(self.offsets[:-1], self.widths)


def check_edges(E, name="E"):
    """One edge matrix as float64, finite and non-negative."""
    E = check_array(E, dtype=np.float64, input_name=name)
    if (E < 0).any():
        raise ValueError(f"{name} must be non-negative (edge strengths).")
    return E


def _is_graph(obj):
    return hasattr(obj, "edges_") or (hasattr(obj, "fit") and hasattr(obj, "adjacency"))


def _from_graph(graph):
    check_is_fitted(graph)
    offsets = np.asarray(graph.layer_offsets_, dtype=np.int64)
    edges = [check_edges(E, f"edges_[{l}]") for l, E in enumerate(graph.edges_)]
    strengths = np.full(offsets[-1], np.nan)
    constant = np.zeros(offsets[-1], dtype=bool)
    for l, basis in enumerate(graph.bases_):
        values = np.asarray(basis.interaction_strengths_, dtype=np.float64)
        start = offsets[l]
        strengths[start:start + len(values)] = values
        # The layer's one node beyond its directions is its constant node.
        constant[start + len(values):offsets[l + 1]] = True
    return edges, list(graph.layer_names_), offsets, strengths, constant


def _from_edges(edges):
    if isinstance(edges, np.ndarray) and edges.ndim == 2:
        edges = [edges]
    if not isinstance(edges, (list, tuple)):
        raise TypeError(
            "graph must be a fitted InteractionGraph or a list of edge matrices (its "
            f"edges_), got {type(edges).__name__}."
        )
    if len(edges) == 0:
        raise ValueError("graph must be a fitted InteractionGraph or a non-empty list of "
                         "edge matrices.")
    edges = [check_edges(E, f"edges[{l}]") for l, E in enumerate(edges)]
    for l in range(1, len(edges)):
        if edges[l].shape[1] != edges[l - 1].shape[0]:
            raise ValueError(
                f"edges[{l}] has {edges[l].shape[1]} input directions but edges[{l - 1}] "
                f"has {edges[l - 1].shape[0]} output directions; consecutive matrices must "
                "chain as (r_{l+1}, r_l)."
            )
    widths = [edges[0].shape[1]] + [E.shape[0] for E in edges]
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    names = [f"layer {l}" for l in range(len(widths))]
    return edges, names, offsets, np.full(offsets[-1], np.nan), np.zeros(offsets[-1], bool)


def graph_view(graph, *, layer_names=None, strengths=None):
    """A :class:`GraphView` of a fitted InteractionGraph or a list of edge matrices.

    Parameters
    ----------
    graph : InteractionGraph or list of array-like
        A fitted graph, or edge matrices ``(r_{l+1}, r_l)`` of consecutive layers.
    layer_names : list of str, default=None
        Replaces the graph's layer names (``"layer 0"``, ... for bare edges).
    strengths : list of array-like, default=None
        Lambda of every layer's nodes (one 1-D array per layer); replaces the
        bases' ``interaction_strengths_``.
    """
    if _is_graph(graph):
        edges, names, offsets, values, constant = _from_graph(graph)
    else:
        edges, names, offsets, values, constant = _from_edges(graph)
    widths = np.diff(offsets)
    if layer_names is not None:
        layer_names = [str(name) for name in layer_names]
        if len(layer_names) != len(widths):
            raise ValueError(f"layer_names must name the {len(widths)} layers, got "
                             f"{len(layer_names)} names.")
        names = layer_names
    if strengths is not None:
        if len(strengths) != len(widths):
            raise ValueError(f"strengths must hold one array per layer ({len(widths)}), got "
                             f"{len(strengths)}.")
        values = np.full(offsets[-1], np.nan)
        for l, layer_values in enumerate(strengths):
            layer_values = check_array(np.asarray(layer_values, dtype=np.float64),
                                       ensure_2d=False, input_name=f"strengths[{l}]")
            if layer_values.shape != (widths[l],):
                raise ValueError(f"strengths[{l}] must hold one value per node of layer {l} "
                                 f"({widths[l]}), got shape {layer_values.shape}.")
            values[offsets[l]:offsets[l + 1]] = layer_values
        constant = np.zeros(offsets[-1], dtype=bool)
    return GraphView(edges, names, offsets, values, constant)


def module_labels(labels, view):
    """The module of every node, from an array or a fitted ModularityClustering (or None)."""
    if labels is None:
        return None
    if hasattr(labels, "fit") and hasattr(labels, "get_params"):
        check_is_fitted(labels)
        labels = labels.labels_
    labels = np.asarray(labels)
    if labels.shape != (view.n_nodes,):
        raise ValueError(
            f"labels must hold one module per node ({view.n_nodes} = "
            f"{' + '.join(map(str, view.widths))} nodes, layer by layer), got shape "
            f"{labels.shape}."
        )
    return labels
