"""Modules of an interaction graph: edge normalisation and modularity clustering.

The nodes of an interaction graph are the basis directions of all layers and its
weighted, undirected edges join directions of adjacent layers (SPEC section 3).
Modules are groups of directions that interact mostly with each other; they are
found by maximising Newman's modularity

    Q = (1 / 2m) * sum_ij [A_ij - gamma * k_i k_j / (2m)] * delta(c_i, c_j)

(``k_i = sum_j A_ij``, ``2m = sum_ij A_ij``) with the Leiden algorithm of
networkit. Self-loops are ignored throughout: the diagonal of every adjacency
matrix is treated as zero, both when clustering and in :func:`modularity`.
Interaction graphs have no self-loops, and without them the matrix form of Q
above, networkx's convention (which counts a self-loop twice in a node's
degree) and the graph handed to networkit all agree.

Edge weights can be normalised before clustering: ``"identity"``,
``"sqrt"`` (``sqrt(E)``) or ``"log"`` (``max(0, log10(E / eps))``). All three map
0 to 0, so they act on the stored entries of sparse matrices only.
"""

import numbers
import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClusterMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params
from sklearn.utils.validation import check_array, check_is_fitted

from ._backend import is_tensor
from ._validation import check_finite

__all__ = [
    "ModularityClustering",
    "modularity",
    "normalize_edges",
    "select_log_eps",
]

_NORMS = ("identity", "sqrt", "log")

# Relative tolerance under which an asymmetry counts as floating-point round-off
# rather than a directed graph (used with ``symmetrize=False``).
_SYMMETRY_RTOL = 1e-10


# --------------------------------------------------------------------------- #
# Edge normalisation
# --------------------------------------------------------------------------- #


def _normalize_values(values, norm, eps):
    """Apply ``norm`` to a 1-D array of non-negative edge values (a new array)."""
    if norm == "identity":
        return values.copy()
    if norm == "sqrt":
        return np.sqrt(values)
    # Only edges above eps get a positive weight; computing the log on those alone
    # avoids log10(0) warnings for the zeros of a dense matrix.
    out = np.zeros_like(values)
    above = values > eps
    out[above] = np.log10(values[above] / eps)
    return out


def _check_log_eps(norm, eps):
    if norm == "log" and eps is None:
        raise ValueError(
            "norm='log' computes max(0, log10(E / eps)) and needs a positive eps; "
            "got eps=None. Pick one per layer with select_log_eps."
        )


@validate_params(
    {
        "E": ["array-like", "sparse matrix"],
        "norm": [StrOptions(set(_NORMS))],
        # inf is allowed: select_log_eps returns it for a layer that keeps nothing.
        "eps": [Interval(numbers.Real, 0, np.inf, closed="right"), None],
    },
    prefer_skip_nested_validation=True,
)
def normalize_edges(E, norm="identity", eps=None):
    """Normalise the non-negative edge weights of one edge matrix.

    Parameters
    ----------
    E : array-like or sparse matrix of shape (n_out, n_in)
        Non-negative, finite edge strengths, e.g. ``InteractionGraph.edges_[l]``.
    norm : {"identity", "sqrt", "log"}, default="identity"
        ``"identity"`` returns ``E``; ``"sqrt"`` returns ``sqrt(E)``; ``"log"``
        returns ``max(0, log10(E / eps))``, so edges at or below ``eps`` get
        weight 0 and the dynamic range of the rest is compressed.
    eps : float > 0, default=None
        Threshold of the log form; required when ``norm="log"``, ignored
        otherwise.

    Returns
    -------
    E_norm : ndarray or sparse matrix of the shape of ``E``
        Normalised weights as float64; sparse input gives a CSR sparse array
        with the same sparsity pattern (all three forms map 0 to 0).

    See Also
    --------
    select_log_eps : Pick ``eps`` per layer from an edge ablation.
    ModularityClustering : Cluster the normalised graph.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_lib.cluster import normalize_edges
    >>> E = np.array([[0.0, 1.0], [100.0, 4.0]])
    >>> normalize_edges(E, "sqrt")
    array([[ 0.,  1.],
           [10.,  2.]])
    >>> normalize_edges(E, "log", eps=1.0)
    array([[0.     , 0.     ],
           [2.     , 0.60206]])
    """
    _check_log_eps(norm, eps)
    if sp.issparse(E):
        E = sp.csr_array(E, dtype=np.float64)
        values = E.data
    else:
        E = check_array(E, dtype=np.float64, input_name="E", ensure_all_finite=True)
        values = E.ravel()
    _check_finite_non_negative(values, "E")
    out = _normalize_values(values, norm, eps)
    if sp.issparse(E):
        result = sp.csr_array((out, E.indices, E.indptr), shape=E.shape)
        result.eliminate_zeros()
        return result
    return out.reshape(E.shape)


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
        _check_finite_non_negative(values, f"edge_matrices[{layer}]")
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


def _check_finite_non_negative(values, name):
    if values.size and not np.isfinite(values).all():
        raise ValueError(f"{name} must be finite; got NaN or infinity.")
    if values.size and values.min() < 0:
        raise ValueError(
            f"{name} must be non-negative (edge weights); got a minimum entry of "
            f"{values.min():g}."
        )


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
    _check_finite_non_negative(adj.data, name)
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
    """Return ``(A + A.T) / 2`` as CSR without explicit zeros (``A`` if symmetric)."""
    if not is_symmetric:
        adj = sp.csr_array((adj + adj.T) / 2)
    adj.eliminate_zeros()
    return adj


def _modularity_csr(adj, labels, resolution):
    """Newman modularity of a symmetric, diagonal-free CSR adjacency.

    ``labels`` are integers in ``0..k-1``. A graph without edges has Q = 0.
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


# --------------------------------------------------------------------------- #
# Leiden via networkit
# --------------------------------------------------------------------------- #


def _leiden(adj, *, resolution, n_iterations, random_state):
    """Run networkit's ParallelLeiden on a symmetric diagonal-free CSR adjacency.

    Returns one raw community id per node.
    """
    try:
        # networkit's profiling module imports long-deprecated IPython names; the
        # warnings are about networkit's code, not the user's, so keep them quiet.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import networkit as nk
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ModularityClustering needs networkit; install it with "
            "`pip install sklearn_lib[cluster]` or `pip install networkit`."
        ) from exc

    row = _row_indices(adj)
    upper = row < adj.indices
    # networkit views the index arrays as C++ int64 ("intp") without checking their
    # dtype; scipy's int32 indices crashed it, hence the explicit int64 copies.
    row = np.ascontiguousarray(row[upper], dtype=np.int64)
    col = np.ascontiguousarray(adj.indices[upper], dtype=np.int64)
    weight = np.ascontiguousarray(adj.data[upper], dtype=np.float64)
    # An undirected networkit graph stores each (i, j) pair once given once.
    graph = nk.GraphFromCoo(
        (weight, (row, col)), n=adj.shape[0], weighted=True, directed=False
    )

    previous_threads = nk.getMaxNumberOfThreads()
    try:
        if random_state is not None:
            # Reproducibility needs both a seed and one thread: networkit keeps one
            # generator per thread and the parallel moves depend on scheduling.
            seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
            nk.setNumberOfThreads(1)
            nk.engineering.setSeed(seed, False)
        # gamma is the multi-resolution modularity parameter (1 = Newman's Q),
        # not CPM's resolution: ParallelLeiden optimises modularity.
        leiden = nk.community.ParallelLeiden(
            graph, randomize=True, iterations=n_iterations, gamma=float(resolution)
        )
        leiden.run()
        return np.asarray(leiden.getPartition().getVector(), dtype=np.int64)
    finally:
        nk.setNumberOfThreads(previous_threads)


def _relabel_by_first_appearance(raw):
    """Map arbitrary ids to 0..k-1 so that node 0 is in module 0, and so on."""
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inverse.ravel()]


def _is_interaction_graph(A):
    return callable(getattr(A, "adjacency", None)) and hasattr(A, "layer_offsets_")


def _check_layer_sizes(layer_sizes, n_nodes, name="layer_sizes"):
    sizes = np.asarray(layer_sizes)
    if sizes.ndim != 1 or sizes.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D array of layer sizes, got shape "
            f"{sizes.shape}."
        )
    if not np.issubdtype(sizes.dtype, np.integer) or (sizes < 0).any():
        raise ValueError(
            f"{name} must hold non-negative integers, got {sizes.tolist()}."
        )
    if sizes.sum() != n_nodes:
        raise ValueError(
            f"{name} must sum to the number of nodes {n_nodes}; got "
            f"{sizes.tolist()}, which sums to {int(sizes.sum())}."
        )
    return sizes.astype(np.int64)


class ModularityClustering(ClusterMixin, BaseEstimator):
    """Modules of a weighted undirected graph by Leiden modularity maximisation.

    Finds the partition of the nodes that (approximately) maximises the
    modularity at resolution ``gamma`` (SPEC section 3) with networkit's
    ``ParallelLeiden``. Built for interaction graphs, whose nodes are the basis
    directions of all layers, but any non-negative adjacency matrix works.

    Parameters
    ----------
    resolution : float >= 0, default=1.0
        ``gamma`` of the modularity that Leiden maximises. Larger values give more,
        smaller modules; the reference work uses 0.5 to 1. ``modularity_`` is
        always reported at ``gamma = 1``.
    n_iterations : int >= 1, default=10
        Maximum number of Leiden runs (networkit's ``iterations``).
    random_state : int, RandomState instance or None, default=None
        Seeds networkit's generator and, while Leiden runs, restricts networkit
        to one thread, so that a fixed value gives identical labels (networkit's
        previous thread count is restored afterwards; its global seed is not).
        ``None`` runs multi-threaded and is not reproducible.
    normalization : {"identity", "sqrt", "log"}, default="identity"
        Edge-weight normalisation, see :func:`normalize_edges`. A plain matrix
        is normalised entry by entry before symmetrisation (so a one-sided,
        triangular input gives the same labels as its symmetric completion); an
        interaction graph is asked for ``A.adjacency(norm=normalization, eps=eps)``.
    eps : float > 0, array-like or None, default=None
        Threshold of the log normalisation. For a plain matrix it must be a
        scalar; ``None`` picks a tenth of the smallest positive off-diagonal
        entry, so every edge is kept and the weakest gets weight 1 (on a 0/1
        matrix "log" then equals "identity"). For an interaction graph it is
        passed on unchanged (e.g. per-layer values from :func:`select_log_eps`).
        Ignored by "identity" and "sqrt".
    symmetrize : bool, default=True
        If True, an asymmetric matrix is replaced by ``(A + A.T) / 2`` (a
        symmetric one is used as is). If False, an asymmetric matrix raises a
        ValueError (asymmetry within round-off, relative 1e-10, is averaged away).

    Attributes
    ----------
    labels_ : ndarray of shape (n_nodes,)
        Module of each node, numbered ``0..n_clusters_-1`` in order of first
        appearance (node 0 is in module 0).
    n_clusters_ : int
        Number of modules. Isolated nodes are modules of their own.
    modularity_ : float
        Newman modularity (``gamma = 1``) of ``labels_`` on the normalised,
        symmetrised graph that was clustered, computed by :func:`modularity`;
        0.0 for a graph without edges.
    layer_sizes_ : ndarray of shape (n_layers,) or None
        Number of nodes per layer (from ``layer_sizes`` or the graph's
        ``layer_offsets_``); None when no layers were given.
    layer_counts_ : ndarray of shape (n_clusters, n_layers) or None
        ``layer_counts_[c, l]``: nodes of module ``c`` in layer ``l``.
    clusters_ : list of dict
        One summary per module ``c``, in label order, with keys ``"label"``,
        ``"size"``, ``"nodes"`` (sorted node indices), and, when layers are
        known (else None): ``"layer_counts"`` (n_layers,), ``"first_layer"``,
        ``"last_layer"`` (the span over layers) and ``"directions"``, an int
        array (size, 2) of ``(layer, index within layer)`` per node.
    eps_ : float, array-like or None
        ``eps`` used by the log normalisation (None for the other ones).
    n_features_in_ : int
        Number of nodes; ``transform`` expects this many columns.

    See Also
    --------
    modularity : The quality function, for any partition.
    normalize_edges : Edge normalisations.
    select_log_eps : Per-layer ``eps`` for the log normalisation.

    Notes
    -----
    Self-loops (the diagonal of ``A``) are ignored. A graph without edges is
    not handed to networkit: every node becomes its own module and
    ``modularity_`` is 0.0.

    networkit's seed and thread count are global to the process, so seeded fits
    running concurrently in threads of one process are not reproducible (joblib's
    default process-based backend is fine).

    Examples
    --------
    Two triangles joined by one edge:

    >>> import numpy as np
    >>> from sklearn_lib.cluster import ModularityClustering
    >>> A = np.zeros((6, 6))
    >>> for i, j in [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5), (2, 3)]:
    ...     A[i, j] = A[j, i] = 1.0
    >>> mc = ModularityClustering(random_state=0).fit(A, layer_sizes=[3, 3])
    >>> mc.labels_
    array([0, 0, 0, 1, 1, 1])
    >>> round(mc.modularity_, 4)
    0.3571
    >>> mc.clusters_[1]["first_layer"], mc.clusters_[1]["last_layer"]
    (1, 1)
    >>> mc.transform(np.ones((1, 6)))  # norm of each module's activations
    array([[1.73205081, 1.73205081]])
    """

    _parameter_constraints: dict = {
        "resolution": [Interval(numbers.Real, 0, None, closed="left")],
        "n_iterations": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "normalization": [StrOptions(set(_NORMS))],
        "eps": [Interval(numbers.Real, 0, np.inf, closed="right"), "array-like", None],
        "symmetrize": ["boolean"],
    }

    def __init__(
        self,
        *,
        resolution=1.0,
        n_iterations=10,
        random_state=None,
        normalization="identity",
        eps=None,
        symmetrize=True,
    ):
        self.resolution = resolution
        self.n_iterations = n_iterations
        self.random_state = random_state
        self.normalization = normalization
        self.eps = eps
        self.symmetrize = symmetrize

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # X is a (square) adjacency matrix: rows and columns index the same nodes.
        tags.input_tags.pairwise = True
        tags.input_tags.sparse = True
        tags.input_tags.positive_only = True
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, A, y=None, *, layer_sizes=None):
        """Find the modules of the graph ``A``.

        Parameters
        ----------
        A : {array-like, sparse matrix} of shape (n_nodes, n_nodes) or graph
            Non-negative adjacency matrix, dense or scipy sparse (any index
            dtype), or a fitted interaction graph: an object with a method
            ``adjacency(norm=..., eps=...)`` returning a sparse symmetric matrix
            and an attribute ``layer_offsets_`` (n_layers + 1 cumulative node
            offsets, first 0, last n_nodes), such as ``InteractionGraph``.
        y : None
            Ignored; present for API consistency.
        layer_sizes : array-like of int of shape (n_layers,), default=None
            Nodes per layer (in node order), summing to n_nodes; enables the
            per-layer summaries for a plain matrix. For a graph, it must match
            the graph's own layers if given.

        Returns
        -------
        self : ModularityClustering
            The fitted estimator.
        """
        if _is_interaction_graph(A):
            adjacency = A.adjacency(norm=self.normalization, eps=self.eps)
            adj, is_symmetric = _check_adjacency(
                adjacency, symmetrize=self.symmetrize, name="A.adjacency()"
            )
            n_nodes = adj.shape[0]
            graph_sizes = self._graph_layer_sizes(A.layer_offsets_, n_nodes)
            if layer_sizes is not None and not np.array_equal(
                np.asarray(layer_sizes), graph_sizes
            ):
                raise ValueError(
                    f"layer_sizes {np.asarray(layer_sizes).tolist()} contradicts the "
                    f"graph's layers {graph_sizes.tolist()} (from layer_offsets_); "
                    "leave layer_sizes=None for an interaction graph."
                )
            self.layer_sizes_ = graph_sizes
            self.eps_ = self.eps if self.normalization == "log" else None
        else:
            adj, is_symmetric = _check_adjacency(A, symmetrize=self.symmetrize)
            n_nodes = adj.shape[0]
            self.layer_sizes_ = (
                None if layer_sizes is None else _check_layer_sizes(layer_sizes, n_nodes)
            )
            self.eps_ = self._matrix_eps(adj)
            adj.data = _normalize_values(adj.data, self.normalization, self.eps_)
        adj = _symmetrized(adj, is_symmetric)

        if adj.nnz == 0:
            raw = np.arange(n_nodes)
        else:
            raw = _leiden(
                adj,
                resolution=self.resolution,
                n_iterations=self.n_iterations,
                random_state=self.random_state,
            )
        self.labels_ = _relabel_by_first_appearance(raw)
        self.n_clusters_ = int(self.labels_.max()) + 1
        self.modularity_ = _modularity_csr(adj, self.labels_, 1.0)
        self.n_features_in_ = n_nodes
        self._summarise()
        return self

    @staticmethod
    def _graph_layer_sizes(offsets, n_nodes):
        offsets = np.asarray(offsets)
        if (
            offsets.ndim != 1
            or offsets.size < 2
            or offsets[0] != 0
            or offsets[-1] != n_nodes
            or (np.diff(offsets) < 0).any()
        ):
            raise ValueError(
                "A.layer_offsets_ must be non-decreasing cumulative node offsets "
                f"from 0 to n_nodes={n_nodes}; got {offsets.tolist()}."
            )
        return _check_layer_sizes(np.diff(offsets), n_nodes, "np.diff(A.layer_offsets_)")

    def _matrix_eps(self, adj):
        """The eps of the log normalisation of a plain matrix (None otherwise)."""
        if self.normalization != "log":
            return None
        if self.eps is None:
            # Keep every edge and give the weakest weight log10(10) = 1.
            return adj.data.min() / 10 if adj.nnz else 1.0
        if not isinstance(self.eps, numbers.Real):
            raise ValueError(
                "eps must be a positive scalar when A is a matrix (per-layer eps "
                f"needs an interaction graph); got {self.eps!r}."
            )
        return float(self.eps)

    def _summarise(self):
        """Fill ``layer_counts_`` and ``clusters_`` from ``labels_``, vectorised."""
        labels = self.labels_
        order = np.argsort(labels, kind="stable")
        bounds = np.cumsum(np.bincount(labels, minlength=self.n_clusters_))[:-1]
        nodes_per_module = np.split(order, bounds)

        if self.layer_sizes_ is None:
            self.layer_counts_ = None
            self.clusters_ = [
                {
                    "label": c,
                    "size": nodes.size,
                    "nodes": nodes,
                    "layer_counts": None,
                    "first_layer": None,
                    "last_layer": None,
                    "directions": None,
                }
                for c, nodes in enumerate(nodes_per_module)
            ]
            return

        n_layers = self.layer_sizes_.size
        offsets = np.concatenate([[0], np.cumsum(self.layer_sizes_)])
        # side="right" skips empty layers (repeated offsets).
        layer = np.searchsorted(offsets, np.arange(labels.size), side="right") - 1
        index = np.arange(labels.size) - offsets[layer]
        counts = np.zeros((self.n_clusters_, n_layers), dtype=np.int64)
        np.add.at(counts, (labels, layer), 1)
        self.layer_counts_ = counts
        self.clusters_ = []
        for c, nodes in enumerate(nodes_per_module):
            present = np.flatnonzero(counts[c])
            self.clusters_.append(
                {
                    "label": c,
                    "size": nodes.size,
                    "nodes": nodes,
                    "layer_counts": counts[c],
                    "first_layer": int(present[0]),
                    "last_layer": int(present[-1]),
                    "directions": np.column_stack([layer[nodes], index[nodes]]),
                }
            )

    def cluster_summary(self):
        """Per-module summary as a pandas DataFrame (requires pandas).

        Returns
        -------
        summary : pandas.DataFrame
            One row per module (index ``label``) with columns ``size`` and, when
            layers are known, ``first_layer``, ``last_layer`` and one count column
            ``layer_<l>`` per layer.

        Examples
        --------
        >>> import numpy as np
        >>> from sklearn_lib.cluster import ModularityClustering
        >>> A = np.kron(np.eye(2), np.ones((2, 2)))  # two disjoint edges
        >>> mc = ModularityClustering(random_state=0).fit(A, layer_sizes=[2, 2])
        >>> print(mc.cluster_summary())
               size  first_layer  last_layer  layer_0  layer_1
        label
        0         2            0           0        2        0
        1         2            1           1        0        2
        """
        check_is_fitted(self)
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("cluster_summary needs pandas: `pip install pandas`.") from exc
        data = {"size": [c["size"] for c in self.clusters_]}
        if self.layer_counts_ is not None:
            data["first_layer"] = [c["first_layer"] for c in self.clusters_]
            data["last_layer"] = [c["last_layer"] for c in self.clusters_]
            for layer in range(self.layer_counts_.shape[1]):
                data[f"layer_{layer}"] = self.layer_counts_[:, layer]
        index = pd.RangeIndex(self.n_clusters_, name="label")
        return pd.DataFrame(data, index=index)

    def transform(self, Z):
        """Activation norm of each module.

        Parameters
        ----------
        Z : array-like or tensor of shape (n_samples, n_nodes)
            Activations of all clustered nodes in basis coordinates, layers
            concatenated in node order (e.g. ``np.hstack`` of every layer's
            ``InteractionBasis.transform``).

        Returns
        -------
        norms : ndarray or tensor of shape (n_samples, n_clusters)
            ``norms[x, c] = sqrt(sum over nodes i of module c of Z[x, i] ** 2)``;
            a tensor on ``Z``'s device for tensor input.
        """
        check_is_fitted(self)
        if is_tensor(Z):
            check_finite(Z, "Z")
        else:
            Z = check_array(Z, dtype=np.float64, input_name="Z")
        if Z.ndim != 2 or Z.shape[1] != self.n_features_in_:
            raise ValueError(
                "Z must hold one column per clustered node: expected shape "
                f"(n_samples, {self.n_features_in_}), got {tuple(Z.shape)}."
            )
        if is_tensor(Z):
            labels = torch.as_tensor(self.labels_, device=Z.device)
            squares = torch.zeros(Z.shape[0], self.n_clusters_, device=Z.device, dtype=Z.dtype)
            return squares.index_add_(1, labels, Z.square()).sqrt()
        membership = sp.csr_array(
            (
                np.ones(self.n_features_in_),
                (np.arange(self.n_features_in_), self.labels_),
            ),
            shape=(self.n_features_in_, self.n_clusters_),
        )
        return np.sqrt(np.asarray(Z**2 @ membership))
