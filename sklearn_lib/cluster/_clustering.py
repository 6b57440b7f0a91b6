"""Modules of an interaction graph: Leiden modularity maximisation.

Modules are groups of basis directions that interact mostly with each other
(SPEC section 3); :class:`ModularityClustering` finds them by maximising Newman's
modularity with the Leiden algorithm of networkit. The edge normalisations and
the modularity itself live in :mod:`sklearn_lib.cluster._modularity` and are exposed here.
"""

import numbers
import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClusterMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted

from ..graph._normalize import NORMS, normalize_edges, normalize_values
from ..utils._backend import is_tensor
from ..utils._validation import check_finite
from ._modularity import (
    _check_adjacency,
    _modularity_csr,
    _row_indices,
    _symmetrized,
    modularity,
    select_log_eps,
)

__all__ = [
    "ModularityClustering",
    "modularity",
    "normalize_edges",
    "select_log_eps",
]


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
    ``modularity_`` is 0.0. Modularity is scale-free, so the (normalised,
    symmetrised) weights are divided by their largest before Leiden runs: a
    graph gives the same modules and ``modularity_`` whether its weights are
    near 1e-300, 1 or 1e300.

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
        "normalization": [StrOptions(set(NORMS))],
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
            adj.data = normalize_values(adj.data, self.normalization, self.eps_)
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
