"""Tests for sklearn_lib.cluster: Leiden modules (ModularityClustering).

Exact comparisons here are of integers (labels, counts, node indices) or of
literal results (Q = 0.0 of a graph without edges). Labels of seeded, single-
threaded Leiden are compared exactly only where the two graphs handed to
networkit are provably bitwise identical (the same input in another format,
the diagonal removed, a one-sided matrix whose completion is an exact power-of-
two multiple, weights that all normalise to exactly 1), or where the partition
is forced (disconnected cliques, the planted blocks with ARI 1 then relabelled
by first appearance). Graphs that differ by rounding (``A * 1e300``) are
compared as partitions (adjusted Rand index 1) with Q within a tolerance.
"""

import numpy as np
import pytest
import scipy.sparse as sp
from _graphs import cliques, nx_modularity, sbm
from sklearn.base import clone
from sklearn.metrics import adjusted_rand_score
from sklearn.utils._param_validation import InvalidParameterError

from sklearn_lib.cluster import (
    ModularityClustering,
    modularity,
    normalize_edges,
)

# --------------------------------------------------------------------------- #
# A stand-in interaction graph
# --------------------------------------------------------------------------- #


class FakeGraph:
    """Stands in for a fitted InteractionGraph: adjacency() and layer_offsets_."""

    def __init__(self, adjacency, layer_offsets):
        self._adjacency = sp.csr_array(adjacency)
        self.layer_offsets_ = np.asarray(layer_offsets)
        self.calls = []

    def adjacency(self, norm="identity", eps=None):
        self.calls.append((norm, eps))
        return normalize_edges(self._adjacency, norm, eps=eps)


# --------------------------------------------------------------------------- #
# Clustering quality and modularity
# --------------------------------------------------------------------------- #


def test_sbm_blocks_recovered():
    A, blocks = sbm()
    mc = ModularityClustering(random_state=0).fit(A)
    assert adjusted_rand_score(blocks, mc.labels_) == 1.0
    assert mc.n_clusters_ == 4
    # Exact: the same partition (ARI 1), relabelled by first appearance, is the
    # blocks' numbering because the blocks come in node order.
    np.testing.assert_array_equal(mc.labels_, blocks)


def test_modularity_ignores_self_loops():
    A, blocks = sbm(n_blocks=2, block_size=10, seed=2)
    with_loops = A + np.diag(np.arange(20.0))
    assert modularity(with_loops, blocks) == pytest.approx(nx_modularity(A, blocks))
    labels_plain = ModularityClustering(random_state=0).fit(A).labels_
    labels_loops = ModularityClustering(random_state=0).fit(with_loops).labels_
    # Exact: without its diagonal, with_loops is bitwise A, and the seed is the same.
    np.testing.assert_array_equal(labels_plain, labels_loops)


@pytest.mark.parametrize("n_cliques", [2, 3, 5])
def test_disjoint_cliques_closed_form(n_cliques):
    # Each of k equal disjoint components holds 1/k of the edges and 1/k of the
    # degree: Q = k * (1/k - gamma / k**2) = 1 - gamma / k.
    A = cliques(n_cliques, 4)
    mc = ModularityClustering(random_state=0).fit(A)
    # Exact: the components are the only maximiser; labels are integers.
    np.testing.assert_array_equal(mc.labels_, np.repeat(np.arange(n_cliques), 4))
    assert mc.modularity_ == pytest.approx(1 - 1 / n_cliques)
    assert modularity(A, mc.labels_, resolution=0.5) == pytest.approx(1 - 0.5 / n_cliques)
    # Everything in one module gives Q = 1 - gamma.
    assert modularity(A, np.zeros(A.shape[0])) == pytest.approx(0.0, abs=1e-15)


def test_same_seed_same_labels_and_threads_restored():
    import networkit as nk

    # A structureless random graph, where Leiden's random choices do matter.
    rng = np.random.default_rng(3)
    upper = np.triu(rng.random((150, 150)) < 0.05, k=1) * rng.random((150, 150))
    A = sp.csr_array(upper + upper.T)
    threads = nk.getMaxNumberOfThreads()
    first = ModularityClustering(random_state=42).fit(A).labels_
    assert nk.getMaxNumberOfThreads() == threads
    second = ModularityClustering(random_state=42).fit(A).labels_
    # Exact: identical input, seed and one thread make networkit deterministic.
    np.testing.assert_array_equal(first, second)
    rs = np.random.RandomState(7)
    third = ModularityClustering(random_state=rs).fit(A).labels_
    fourth = ModularityClustering(random_state=np.random.RandomState(7)).fit(A).labels_
    np.testing.assert_array_equal(third, fourth)


def test_resolution_gives_more_modules():
    A = cliques(12, 5, ring=True)
    counts = [
        ModularityClustering(resolution=gamma, random_state=0).fit(A).n_clusters_
        for gamma in (0.02, 0.1, 1.0, 5.0)
    ]
    assert counts == sorted(counts)
    assert counts[0] < 12 <= counts[-1]


# --------------------------------------------------------------------------- #
# Input formats
# --------------------------------------------------------------------------- #


def test_dense_and_sparse_inputs_agree():
    A, _ = sbm(seed=4)
    expected = ModularityClustering(random_state=0).fit(A)
    int32 = sp.csr_matrix(A)
    int32.indices = int32.indices.astype(np.int32)
    int32.indptr = int32.indptr.astype(np.int32)
    coo32 = sp.coo_array(A)
    coo32.row, coo32.col = coo32.row.astype(np.int32), coo32.col.astype(np.int32)
    for form in (sp.csr_array(A), sp.csc_matrix(A), int32, coo32, A.tolist()):
        mc = ModularityClustering(random_state=0).fit(form)
        # Exact: every format becomes the same sorted float64 CSR (no arithmetic).
        np.testing.assert_array_equal(mc.labels_, expected.labels_)
        assert mc.modularity_ == pytest.approx(expected.modularity_)


def test_one_sided_input_is_symmetrised():
    A, blocks = sbm(seed=5)
    upper = np.triu(A)
    for norm in ("identity", "log"):
        full = ModularityClustering(random_state=0, normalization=norm, eps=0.6).fit(A)
        half = ModularityClustering(random_state=0, normalization=norm, eps=0.6).fit(upper)
        # Exact: (U + U.T) / 2 is A / 2 to the bit, and both are divided by their
        # largest weight, so networkit sees bitwise identical graphs.
        np.testing.assert_array_equal(full.labels_, half.labels_)
        # Halving every weight leaves the modularity unchanged.
        assert half.modularity_ == pytest.approx(full.modularity_)


def test_input_is_not_modified():
    A, _ = sbm(seed=6)
    A[0, 0] = 3.0
    dense = A.copy()
    coo = sp.coo_array(np.triu(A))
    coo_copy = coo.copy()
    ModularityClustering(random_state=0, normalization="sqrt").fit(dense)
    ModularityClustering(random_state=0, normalization="log").fit(coo)
    # Exact: the inputs must be untouched, not merely close.
    np.testing.assert_array_equal(dense, A)
    np.testing.assert_array_equal(coo.toarray(), coo_copy.toarray())


def test_roundoff_asymmetry_accepted_without_symmetrize():
    A, blocks = sbm(seed=7)
    noisy = A * (1 + 1e-14 * np.random.default_rng(0).random(A.shape))
    mc = ModularityClustering(random_state=0, symmetrize=False).fit(noisy)
    assert adjusted_rand_score(blocks, mc.labels_) == 1.0


# --------------------------------------------------------------------------- #
# Degenerate graphs
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("A", [np.zeros((5, 5)), sp.csr_array((5, 5)), np.eye(5)])
def test_graph_without_edges(A):
    mc = ModularityClustering(random_state=0).fit(A)
    np.testing.assert_array_equal(mc.labels_, np.arange(5))
    assert mc.n_clusters_ == 5
    assert mc.modularity_ == 0.0
    assert modularity(A, np.zeros(5)) == 0.0


def test_single_node():
    mc = ModularityClustering().fit(np.zeros((1, 1)))
    np.testing.assert_array_equal(mc.labels_, [0])
    assert mc.modularity_ == 0.0


def test_isolated_nodes_are_own_modules():
    A = np.zeros((10, 10))
    A[:4, :4] = cliques(1, 4)
    A[6:, 6:] = cliques(1, 4)
    mc = ModularityClustering(random_state=0).fit(A)
    np.testing.assert_array_equal(mc.labels_, [0, 0, 0, 0, 1, 2, 3, 3, 3, 3])
    assert mc.modularity_ == pytest.approx(0.5)


def test_log_normalisation_removes_all_edges():
    A = cliques(2, 3)
    mc = ModularityClustering(normalization="log", eps=2.0, random_state=0).fit(A)
    np.testing.assert_array_equal(mc.labels_, np.arange(6))
    assert mc.modularity_ == 0.0


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "A, match",
    [
        (-cliques(2, 3), "non-negative"),
        (np.full((3, 3), np.nan), "NaN"),
        (np.full((3, 3), np.inf), "infinity"),
        (sp.csr_array(np.array([[0.0, np.nan], [np.nan, 0.0]])), "NaN"),
        (np.ones((3, 4)), r"square adjacency matrix.*got shape \(3, 4\)"),
        (np.ones(3), "2D array"),
    ],
)
def test_bad_adjacency_raises(A, match):
    with pytest.raises(ValueError, match=match):
        ModularityClustering().fit(A)
    with pytest.raises(ValueError, match=match):
        modularity(A, np.zeros(A.shape[0]))


def test_asymmetric_without_symmetrize_raises():
    A = np.triu(cliques(2, 3))
    with pytest.raises(ValueError, match=r"symmetric when symmetrize=False"):
        ModularityClustering(symmetrize=False).fit(A)


def test_bad_layer_sizes_raise():
    A = cliques(2, 3)
    with pytest.raises(ValueError, match="must sum to the number of nodes 6"):
        ModularityClustering().fit(A, layer_sizes=[3, 2])
    with pytest.raises(ValueError, match="non-negative integers"):
        ModularityClustering().fit(A, layer_sizes=[7, -1])
    with pytest.raises(ValueError, match="1-D"):
        ModularityClustering().fit(A, layer_sizes=[[3, 3]])


def test_array_eps_with_matrix_raises():
    with pytest.raises(ValueError, match="eps must be a positive scalar when A is a matrix"):
        ModularityClustering(normalization="log", eps=[1.0, 2.0]).fit(cliques(2, 3))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"resolution": -1.0}, "'resolution' parameter"),
        ({"n_iterations": 0}, "'n_iterations' parameter"),
        ({"normalization": "cube"}, "'normalization' parameter"),
        ({"eps": 0.0}, "'eps' parameter"),
        ({"symmetrize": "yes"}, "'symmetrize' parameter"),
        ({"random_state": "seed"}, "'random_state' parameter"),
    ],
)
def test_parameter_validation(params, match):
    with pytest.raises(InvalidParameterError, match=match):
        ModularityClustering(**params).fit(cliques(2, 3))


# --------------------------------------------------------------------------- #
# Normalisations inside fit
# --------------------------------------------------------------------------- #


def test_fit_normalisations_equal_prenormalised_identity():
    A, _ = sbm(seed=8)
    for norm, eps in (("sqrt", None), ("log", 0.7)):
        mc = ModularityClustering(random_state=0, normalization=norm, eps=eps).fit(A)
        ref = ModularityClustering(random_state=0).fit(normalize_edges(A, norm, eps=eps))
        # Exact: the same elementwise function of the same values, then the same graph.
        np.testing.assert_array_equal(mc.labels_, ref.labels_)
        assert mc.modularity_ == pytest.approx(ref.modularity_)
        assert mc.eps_ == eps


def test_log_default_eps_keeps_every_edge():
    A, _ = sbm(seed=9)
    mc = ModularityClustering(normalization="log", random_state=0).fit(A)
    assert mc.eps_ == pytest.approx(A[A > 0].min() / 10)
    binary = (A > 0).astype(float)
    log = ModularityClustering(normalization="log", random_state=0).fit(binary)
    ident = ModularityClustering(random_state=0).fit(binary)
    # Exact: every weight of both graphs is the same number, and x / x == 1.0, so
    # both reach networkit as the same unit-weight graph.
    np.testing.assert_array_equal(log.labels_, ident.labels_)


# --------------------------------------------------------------------------- #
# transform and per-layer summaries
# --------------------------------------------------------------------------- #


def test_transform_matches_brute_force():
    A, _ = sbm(seed=10)
    mc = ModularityClustering(random_state=0).fit(A)
    Z = np.random.default_rng(0).normal(size=(7, A.shape[0]))
    expected = np.column_stack(
        [np.linalg.norm(Z[:, mc.labels_ == c], axis=1) for c in range(mc.n_clusters_)]
    )
    np.testing.assert_allclose(mc.transform(Z), expected)
    with pytest.raises(ValueError, match=r"expected shape \(n_samples, 120\), got \(7, 3\)"):
        mc.transform(Z[:, :3])


def test_transform_tensor_in_tensor_out():
    import torch

    A, _ = sbm(seed=10)
    mc = ModularityClustering(random_state=0).fit(A)
    Z = np.random.default_rng(1).normal(size=(5, A.shape[0]))
    norms = mc.transform(torch.from_numpy(Z))
    assert isinstance(norms, torch.Tensor) and norms.dtype == torch.float64
    np.testing.assert_allclose(norms.numpy(), mc.transform(Z), rtol=1e-12)
    Z[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mc.transform(torch.from_numpy(Z))


def test_interaction_graph_path_and_layer_summaries():
    # Three layers of sizes 2, 3, 2; two chains of directions across the layers.
    edges = [(0, 2), (0, 3), (2, 5), (3, 5), (1, 4), (4, 6)]
    A = np.zeros((7, 7))
    for i, j in edges:
        A[i, j] = A[j, i] = 5.0
    graph = FakeGraph(A, layer_offsets=[0, 2, 5, 7])
    mc = ModularityClustering(random_state=0, normalization="log", eps=0.5).fit(graph)
    assert graph.calls == [("log", 0.5)]
    np.testing.assert_array_equal(mc.layer_sizes_, [2, 3, 2])
    np.testing.assert_array_equal(mc.labels_, [0, 1, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(mc.layer_counts_, [[1, 2, 1], [1, 1, 1]])
    first = mc.clusters_[0]
    assert first["size"] == 4 and (first["first_layer"], first["last_layer"]) == (0, 2)
    np.testing.assert_array_equal(first["nodes"], [0, 2, 3, 5])
    np.testing.assert_array_equal(first["directions"], [[0, 0], [1, 0], [1, 1], [2, 0]])
    np.testing.assert_array_equal(mc.clusters_[1]["directions"], [[0, 1], [1, 2], [2, 1]])
    summary = mc.cluster_summary()
    assert list(summary.columns) == ["size", "first_layer", "last_layer",
                                     "layer_0", "layer_1", "layer_2"]
    np.testing.assert_array_equal(summary["size"], [4, 3])
    # Same layers given explicitly are fine; contradicting ones are not.
    mc.fit(graph, layer_sizes=[2, 3, 2])
    with pytest.raises(ValueError, match="contradicts the graph's layers"):
        mc.fit(graph, layer_sizes=[3, 2, 2])
    with pytest.raises(ValueError, match="layer_offsets_ must be non-decreasing"):
        mc.fit(FakeGraph(A, layer_offsets=[0, 5, 6]))


def test_empty_layers_and_no_layers():
    A = cliques(2, 3)
    mc = ModularityClustering(random_state=0).fit(A, layer_sizes=[3, 0, 3])
    np.testing.assert_array_equal(mc.layer_counts_, [[3, 0, 0], [0, 0, 3]])
    np.testing.assert_array_equal(mc.clusters_[1]["directions"], [[2, 0], [2, 1], [2, 2]])
    plain = ModularityClustering(random_state=0).fit(A)
    assert plain.layer_sizes_ is None and plain.layer_counts_ is None
    assert plain.clusters_[0]["first_layer"] is None
    assert list(plain.cluster_summary().columns) == ["size"]


# --------------------------------------------------------------------------- #
# scikit-learn conventions
# --------------------------------------------------------------------------- #


def test_sklearn_conventions():
    mc = ModularityClustering(resolution=0.5, n_iterations=3, random_state=1)
    params = mc.get_params()
    assert params == {
        "resolution": 0.5,
        "n_iterations": 3,
        "random_state": 1,
        "normalization": "identity",
        "eps": None,
        "symmetrize": True,
    }
    clone_ = clone(mc)
    assert clone_.get_params() == params and clone_ is not mc
    assert mc.set_params(resolution=2.0) is mc and mc.resolution == 2.0
    A, blocks = sbm(seed=11)
    labels = ModularityClustering(random_state=0).fit_predict(A, layer_sizes=[60, 60])
    assert adjusted_rand_score(blocks, labels) == 1.0
    assert ModularityClustering().__sklearn_tags__().input_tags.pairwise
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        ModularityClustering().transform(np.ones((1, 3)))


def test_two_independent_halves_split_through_the_whole_pipeline():
    """activations -> graph -> modules on a network that is two networks side by side."""
    import torch
    from sklearn.metrics import adjusted_rand_score

    from sklearn_lib import InteractionGraph
    from sklearn_lib.collect import collect

    gen = torch.Generator().manual_seed(0)
    widths, layers = (4, 8, 3), []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        weight = torch.zeros(2 * d_out, 2 * d_in, dtype=torch.float64)
        # Block-diagonal: half 0 never reads half 1. Half 1 is 3x stronger so that
        # interaction strengths of the halves do not interleave (see plot_modules.py).
        weight[:d_out, :d_in] = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        weight[d_out:, d_in:] = 3 * torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        linear = torch.nn.Linear(2 * d_in, 2 * d_out).double()
        with torch.no_grad():
            linear.weight.copy_(weight)
        layers += [linear, torch.nn.ReLU()] if i == 0 else [linear]
    model = torch.nn.Sequential(*layers)
    X = np.random.default_rng(0).normal(size=(400, 8))
    activations, jacobians = collect(model, [":input", "1", "2"], X, verbose=False)
    graph = InteractionGraph().fit(activations, jacobians=jacobians)
    modules = ModularityClustering(resolution=0.5, normalization="sqrt",
                                   random_state=0).fit(graph)
    halves = np.concatenate([
        (basis.components_[:, w:] ** 2).sum(1) > (basis.components_[:, :w] ** 2).sum(1)
        for basis, w in zip(graph.bases_, widths)
    ])
    assert modules.n_clusters_ == 2
    assert adjusted_rand_score(halves, modules.labels_) == 1.0
    # Each direction lives in one half: the assignment above is unambiguous.
    for basis, w in zip(graph.bases_, widths):
        share = (basis.components_[:, w:] ** 2).sum(1) / (basis.components_ ** 2).sum(1)
        assert np.all((share < 0.05) | (share > 0.95))


# --------------------------------------------------------------------------- #
# Scale: modularity is scale-free, so are the modules
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("scale", [1e-300, 1e-100, 1.0, 1e100, 1e300])
@pytest.mark.parametrize("symmetric", [True, False])
def test_partition_and_modularity_do_not_depend_on_the_weight_scale(scale, symmetric):
    A, blocks = sbm(seed=12)
    if not symmetric:
        A = np.triu(A)  # (A + A.T) / 2 must not overflow at 1e300 either
    reference = ModularityClustering(random_state=0).fit(A)
    assert adjusted_rand_score(blocks, reference.labels_) == 1.0
    mc = ModularityClustering(random_state=0).fit(A * scale)
    # A * scale rounds each weight, so the graphs agree to an ulp, not bitwise:
    # the same partition (ARI 1) and Q to rounding.
    assert adjusted_rand_score(reference.labels_, mc.labels_) == 1.0
    assert mc.modularity_ == pytest.approx(reference.modularity_, rel=1e-12)
    assert modularity(A * scale, reference.labels_) == pytest.approx(
        reference.modularity_, rel=1e-12
    )
