"""The symmetric sparse adjacency matrix of a layered graph (InteractionGraph.adjacency)."""

import numpy as np
import scipy.sparse as sp

from ._normalize import normalize_edges

__all__ = ["layered_adjacency", "layered_edges"]


def layered_edges(edges, offsets, norm, eps):
    """The non-zero normalised edges of all layer pairs as ``(targets, sources, weights)``.

    Node ``offsets[l] + j`` is direction ``j`` of layer ``l``; an edge joins
    ``sources`` (layer ``l``) to ``targets`` (layer ``l+1``) with weight
    ``normalize_edges(edges[l], norm, eps_l)[i, j]``. ``offsets`` are the cumulative
    node counts of the layers; ``norm`` and ``eps`` are those of
    :meth:`sklearn_lib.InteractionGraph.adjacency`.
    """
    n_pairs = len(edges)
    if norm == "log":
        if eps is None:
            eps = [E[E > 0].min() / 10 if (E > 0).any() else 1.0 for E in edges]
        elif np.ndim(eps) == 0:
            eps = [eps] * n_pairs
        else:
            eps = list(np.asarray(eps, dtype=np.float64).ravel())
            if len(eps) != n_pairs:
                raise ValueError(
                    f"eps must be a float or one value per pair of adjacent layers: "
                    f"expected {n_pairs}, got {len(eps)}."
                )
        eps = [float(e) for e in eps]
    else:
        eps = [None] * n_pairs
    rows, cols, vals = [], [], []
    for l, E in enumerate(edges):
        W = normalize_edges(E, norm, eps=eps[l])
        i, j = np.nonzero(W)
        rows.append(i + offsets[l + 1])
        cols.append(j + offsets[l])
        vals.append(W[i, j])
    return tuple(np.concatenate(a) for a in (rows, cols, vals))


def layered_adjacency(edges, offsets, norm, eps):
    """Blocks ``(l+1, l)`` and ``(l, l+1)`` hold ``normalize_edges(edges[l])`` and its transpose.

    The arguments are those of :func:`layered_edges`.
    """
    rows, cols, vals = layered_edges(edges, offsets, norm, eps)
    n = int(offsets[-1])
    A = sp.coo_array(
        (np.concatenate([vals, vals]),
         (np.concatenate([rows, cols]), np.concatenate([cols, rows]))),
        shape=(n, n),
    )
    return A.tocsr()
