"""Weights and quality of an interaction graph: edge normalisation and modularity.

The nodes of an interaction graph are the basis directions of all layers and its
weighted, undirected edges join directions of adjacent layers (SPEC section 3).
Edge weights are normalised before clustering by
:func:`sklearn_lib.graph._normalize.normalize_edges`; ``eps`` of the log form is
chosen here (:func:`select_log_eps`).

Modules are scored by Newman's modularity

    Q = (1 / 2m) * sum_ij [A_ij - gamma * k_i k_j / (2m)] * delta(c_i, c_j)

(``k_i = sum_j A_ij``, ``2m = sum_ij A_ij``). Self-loops are ignored throughout:
the diagonal of every adjacency matrix is treated as zero, both here and when
clustering in :mod:`sklearn_lib.cluster`. Interaction graphs have no self-loops,
and without them the matrix form of Q above, networkx's convention (which counts
a self-loop twice in a node's degree) and the graph handed to networkit all agree.

The public functions are exposed as ``sklearn_lib.cluster.normalize_edges``,
``sklearn_lib.cluster.select_log_eps`` and ``sklearn_lib.cluster.modularity``.
"""

import numbers

import numpy as np
import scipy.sparse as sp
from sklearn.utils._param_validation import Interval, validate_params
from sklearn.utils.validation import check_array

from ..graph._normalize import normalize_edges
from ..utils._validation import check_edge_values

__all__ = ["modularity", "normalize_edges", "select_log_eps"]

# Relative tolerance under which an asymmetry counts as floating-point round-off
# rather than a directed graph (used with ``symmetrize=False``).
_SYMMETRY_RTOL = 1e-10


@validate_params(
    {"edge_matrices": [list, tuple], "keep_counts": ["array-like"]},
    prefer_skip_nested_validation=True,
)
def select_log_eps(edge_matrices, keep_counts):
    """Pick ``eps`` for the log normalisation, per layer, from an edge ablation.

    The reference work sets ``eps`` to the smallest edge that matters; an edge
    ablation (elsewhere in the package) says how many of each layer's strongest
    edges must be kept to preserve the network's behaviour. ``eps_l`` is then the
    ``k_l``-th largest edge of layer ``l``. With this ``eps`` the kept edges map
    to ``log10(E / eps_l) >= 0`` and everything weaker to 0 (the ``k_l``-th edge
    itself, and ties with it, also get weight 0).

    Parameters
    ----------
    edge_matrices : list of array-like or sparse matrix
        Non-negative edge matrices, one per pair of adjacent layers.
    keep_counts : array-like of int of shape (len(edge_matrices),)
        ``k_l``, the number of edges of matrix ``l`` that the ablation keeps,
        ``0 <= k_l <= E_l.size``.

    Returns
    -------
    eps : ndarray of shape (len(edge_matrices),)
        Per-layer thresholds. Zero entries are not edges: if ``k_l`` exceeds the
        number of positive edges, ``eps_l`` is the smallest positive edge. If
        ``k_l == 0`` or the matrix has no positive edge, ``eps_l = inf`` (every
        weight of that layer becomes 0).

    See Also
    --------
    normalize_edges : Apply the log normalisation with these thresholds.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_lib.cluster import select_log_eps
    >>> E0 = np.array([[5.0, 1.0], [3.0, 0.0]])
    >>> E1 = np.array([[2.0, 8.0]])
    >>> select_log_eps([E0, E1], keep_counts=[2, 1])
    array([3., 8.])
    """
    keep_counts = np.asarray(keep_counts)
    if keep_counts.shape != (len(edge_matrices),):
        raise ValueError(
            f"keep_counts must hold one count per edge matrix: expected shape "
            f"({len(edge_matrices)},), got {keep_counts.shape}."
        )
    if keep_counts.size and not np.issubdtype(keep_counts.dtype, np.integer):
        raise ValueError(
            f"keep_counts must be integers, got dtype {keep_counts.dtype}."
        )
    eps = np.empty(len(edge_matrices))
    for layer, (E, k) in enumerate(zip(edge_matrices, keep_counts)):
        if sp.issparse(E):
            size = E.shape[0] * E.shape[1]
            values = sp.csr_array(E, dtype=np.float64).data
        else:
            E = check_array(E, dtype=np.float64, input_name=f"edge_matrices[{layer}]")
            size = E.size
            values = E.ravel()
        check_edge_values(values, f"edge_matrices[{layer}]")
        if not 0 <= k <= size:
            raise ValueError(
                f"keep_counts[{layer}] must lie in [0, {size}] (the number of entries "
                f"of edge_matrices[{layer}]), got {k}."
            )
        positive = values[values > 0]
        if k == 0 or positive.size == 0:
            eps[layer] = np.inf
        elif k >= positive.size:
            eps[layer] = positive.min()
        else:
            # The k-th largest value, in linear time.
            eps[layer] = np.partition(positive, positive.size - k)[positive.size - k]
    return eps


# --------------------------------------------------------------------------- #
# Adjacency checks and modularity
# --------------------------------------------------------------------------- #


def _row_indices(adj):
    """Row index (int64) of every stored entry of a CSR array."""
    return np.repeat(np.arange(adj.shape[0], dtype=np.int64), np.diff(adj.indptr))


def _check_adjacency(A, *, symmetrize, name="A"):
    """Validate a square non-negative adjacency matrix.

    Returns its off-diagonal part as a new CSR array (float64, sorted indices, no
    explicit zeros) and whether that is exactly symmetric. Never modifies ``A``.
    """
    A = check_array(
        A,
        accept_sparse=("csr", "csc", "coo"),
        dtype=np.float64,
        ensure_all_finite=True,
        input_name=name,
    )
    if A.shape[0] != A.shape[1]:
        raise ValueError(
            f"{name} must be a square adjacency matrix of shape (n_nodes, n_nodes); "
            f"got shape {A.shape}."
        )
    # Our own copy: sum_duplicates sorts in place, and the caller's arrays must
    # not change. CSR keeps all later steps O(nnz) without COO's lexsort.
    adj = sp.csr_array(A.tocsr(copy=True) if sp.issparse(A) else A)
    adj.sum_duplicates()
    check_edge_values(adj.data, name)
    row = _row_indices(adj)
    keep = (row != adj.indices) & (adj.data != 0)
    if not keep.all():
        indptr = np.concatenate([[0], np.cumsum(np.bincount(row[keep], minlength=A.shape[0]))])
        adj = sp.csr_array((adj.data[keep], adj.indices[keep], indptr), shape=A.shape)
    diff = adj - adj.T
    asymmetry = np.abs(diff.data).max() if diff.nnz else 0.0
    if asymmetry > 0 and not symmetrize:
        scale = adj.data.max()
        if asymmetry > _SYMMETRY_RTOL * scale:
            raise ValueError(
                f"{name} must be symmetric when symmetrize=False (the graph is "
                f"undirected); got max |A - A.T| = {asymmetry:g} for max |A| = "
                f"{scale:g}. Pass symmetrize=True to use (A + A.T) / 2."
            )
    return adj, asymmetry == 0


def _symmetrized(adj, is_symmetric):
    """Return ``(A + A.T) / 2`` divided by its largest weight, as CSR without zeros.

    Modularity, and hence the partition that maximises it, does not change when
    every weight is multiplied by the same positive number; with weights at most
    1, ``2m`` and the degree products ``k_i k_j`` of weights near the ends of the
    float64 range (1e300, 1e-300) neither overflow nor underflow. Dividing once
    before the sum keeps ``A + A.T`` finite; dividing again after it makes the
    largest weight exactly 1, so that a one-sided matrix and its symmetric
    completion (``(U + U.T) / 2 == A / 2``) give bitwise identical graphs.
    ``adj`` is not modified.
    """
    adj = adj.copy()
    adj.eliminate_zeros()
    if adj.nnz == 0:
        return adj
    adj.data /= adj.data.max()
    if not is_symmetric:
        adj = sp.csr_array((adj + adj.T) / 2)
        adj.eliminate_zeros()
        adj.data /= adj.data.max()
    return adj


def _modularity_csr(adj, labels, resolution):
    """Newman modularity of a symmetric, diagonal-free CSR adjacency.

    ``labels`` are integers in ``0..k-1``. A graph without edges has Q = 0.
    ``adj`` comes from :func:`_symmetrized`, so its weights are at most 1 and
    the sums below cannot overflow.
    """
    two_m = adj.data.sum()
    if two_m == 0:
        return 0.0
    row = _row_indices(adj)
    intra = adj.data[labels[row] == labels[adj.indices]].sum()
    degree = np.bincount(row, weights=adj.data, minlength=adj.shape[0])
    module_degree = np.bincount(labels, weights=degree)
    return float(intra / two_m - resolution * np.sum(module_degree**2) / two_m**2)


@validate_params(
    {
        "A": ["array-like", "sparse matrix"],
        "labels": ["array-like"],
        "resolution": [Interval(numbers.Real, 0, None, closed="left")],
    },
    prefer_skip_nested_validation=True,
)
def modularity(A, labels, resolution=1.0):
    """Newman modularity of a partition of a weighted undirected graph.

    ``Q = (1/2m) sum_ij [A_ij - gamma k_i k_j / (2m)] delta(c_i, c_j)``, computed
    in O(nnz) with numpy/scipy. Self-loops are ignored (the diagonal of ``A`` is
    treated as zero) and an asymmetric ``A`` is replaced by ``(A + A.T) / 2``,
    exactly as in :class:`ModularityClustering`.

    Parameters
    ----------
    A : array-like or sparse matrix of shape (n_nodes, n_nodes)
        Non-negative adjacency matrix.
    labels : array-like of shape (n_nodes,)
        Module of each node (any hashable labels that numpy can sort).
    resolution : float >= 0, default=1.0
        ``gamma``; 1 gives the standard modularity.

    Returns
    -------
    Q : float
        The modularity; 0.0 for a graph without edges.

    See Also
    --------
    ModularityClustering : Find labels that maximise it.

    Examples
    --------
    Two disjoint edges, each its own module: ``Q = 2 * (1/2 - (1/2)**2) = 0.5``.

    >>> import numpy as np
    >>> from sklearn_lib.cluster import modularity
    >>> A = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    >>> modularity(A, [0, 0, 1, 1])
    0.5
    >>> modularity(A, [0, 1, 0, 1])
    -0.5
    """
    adj, is_symmetric = _check_adjacency(A, symmetrize=True)
    labels = np.asarray(labels)
    if labels.shape != (adj.shape[0],):
        raise ValueError(
            f"labels must hold one label per node: expected shape ({adj.shape[0]},), "
            f"got {labels.shape}."
        )
    _, codes = np.unique(labels, return_inverse=True)
    return _modularity_csr(_symmetrized(adj, is_symmetric), codes.ravel(), resolution)
