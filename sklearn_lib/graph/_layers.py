"""Addressing a fitted graph's layers (``InteractionGraph.transform`` and its users).

A layer's index from its name or position, and a row-wise basis method applied to
rows or to the positions of sequence activations alike.
"""

from numbers import Integral

import numpy as np
from sklearn.utils.validation import check_is_fitted

__all__ = ["layer_index", "per_position"]


def layer_index(graph, layer):
    """The index in ``[0, n_layers_)`` of ``layer``, a name or an int (negative from the end)."""
    check_is_fitted(graph)
    if isinstance(layer, str):
        if layer not in graph.layer_names_:
            raise ValueError(f"unknown layer {layer!r}; layers: {graph.layer_names_}.")
        return graph.layer_names_.index(layer)
    if not isinstance(layer, Integral) or not -graph.n_layers_ <= layer < graph.n_layers_:
        raise ValueError(
            f"layer must be a name from {graph.layer_names_} or an int in "
            f"[-{graph.n_layers_}, {graph.n_layers_}), got {layer!r}."
        )
    return int(layer) % graph.n_layers_


def per_position(method, X):
    """Apply a row-wise basis method to rows or to (batch, position, feature) activations."""
    if not hasattr(X, "reshape"):
        X = np.asarray(X)
    if X.ndim != 3:
        return method(X)
    n, P, d = X.shape
    out = method(X.reshape(n * P, d))
    return out.reshape(n, P, out.shape[-1])
