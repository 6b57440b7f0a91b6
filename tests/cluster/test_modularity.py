"""Tests for sklearn_lib.cluster._modularity: edge normalisation and the modularity function.

Exact comparisons are of values the functions select or copy from their input
(``select_log_eps``, ``norm="identity"``) or of booleans from comparing those
same values; computed weights and modularities are compared with tolerances.
"""

import numpy as np
import pytest
import scipy.sparse as sp
from _graphs import cliques, nx_modularity, sbm
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.utils._param_validation import InvalidParameterError

from sklearn_lib.cluster import (
    ModularityClustering,
    modularity,
    normalize_edges,
    select_log_eps,
)


def test_modularity_matches_networkx():
    A, blocks = sbm(seed=1)
    mc = ModularityClustering(random_state=0).fit(A)
    assert mc.modularity_ == pytest.approx(nx_modularity(A, mc.labels_), abs=1e-12)
    rng = np.random.default_rng(0)
    random_labels = rng.integers(0, 5, A.shape[0])
    for gamma in (0.5, 1.0, 2.0):
        assert modularity(A, random_labels, gamma) == pytest.approx(
            nx_modularity(A, random_labels, gamma), abs=1e-12
        )


def test_modularity_bad_labels_raise():
    with pytest.raises(ValueError, match=r"expected shape \(6,\), got \(5,\)"):
        modularity(cliques(2, 3), np.zeros(5))


def test_normalize_edges_known_values():
    E = np.array([[0.0, 1e-3, 1.0], [10.0, 1e3, 0.5]])
    np.testing.assert_array_equal(normalize_edges(E), E)
    np.testing.assert_allclose(normalize_edges(E, "sqrt"), np.sqrt(E))
    np.testing.assert_allclose(
        normalize_edges(E, "log", eps=1.0), [[0, 0, 0], [1, 3, 0]]
    )
    np.testing.assert_allclose(
        normalize_edges(E, "log", eps=1e-4), [[0, 1, 4], [5, 7, np.log10(5e3)]]
    )
    sparse = normalize_edges(sp.csr_array(E), "log", eps=1.0)
    assert sp.issparse(sparse) and sparse.nnz == 2
    np.testing.assert_allclose(sparse.toarray(), normalize_edges(E, "log", eps=1.0))


def test_normalize_edges_errors():
    with pytest.raises(ValueError, match="needs a positive eps; got eps=None"):
        normalize_edges(np.ones((2, 2)), "log")
    with pytest.raises(ValueError, match="non-negative"):
        normalize_edges(-np.ones((2, 2)), "sqrt")
    with pytest.raises(InvalidParameterError, match="'norm' parameter"):
        normalize_edges(np.ones((2, 2)), "square")


def test_select_log_eps():
    E0 = np.array([[5.0, 1.0, 0.0], [3.0, 0.0, 2.0]])
    E1 = sp.csr_array(np.array([[0.0, 4.0], [7.0, 0.0]]))
    np.testing.assert_array_equal(select_log_eps([E0, E1], [1, 2]), [5.0, 4.0])
    np.testing.assert_array_equal(select_log_eps([E0, E1], [3, 1]), [2.0, 7.0])
    # More kept than there are positive edges: the smallest positive one.
    np.testing.assert_array_equal(select_log_eps([E0, E1], [6, 4]), [1.0, 4.0])
    # Nothing kept: every weight of that layer becomes 0.
    eps = select_log_eps([E0, np.zeros((2, 2))], [0, 2])
    np.testing.assert_array_equal(eps, [np.inf, np.inf])
    assert not normalize_edges(E0, "log", eps=eps[0]).any()
    # The kept edges are exactly those above eps after normalisation.
    kept = normalize_edges(E0, "log", eps=select_log_eps([E0], [3])[0]) > 0
    np.testing.assert_array_equal(kept, E0 > 2.0)


def test_select_log_eps_errors():
    E = np.ones((2, 2))
    with pytest.raises(ValueError, match=r"expected shape \(2,\), got \(1,\)"):
        select_log_eps([E, E], [1])
    with pytest.raises(ValueError, match=r"keep_counts\[0\] must lie in \[0, 4\]"):
        select_log_eps([E], [5])
    with pytest.raises(ValueError, match="integers"):
        select_log_eps([E], [1.5])


@st.composite
def graphs_and_labels(draw):
    n = draw(st.integers(2, 12))
    weights = draw(arrays(np.float64, (n, n), elements=st.floats(0, 10, width=32)))
    mask = draw(arrays(np.bool_, (n, n)))
    upper = np.triu(weights * mask, k=1)
    labels = draw(arrays(np.int64, n, elements=st.integers(0, 3)))
    return upper + upper.T, labels


@settings(max_examples=60, deadline=None)
@given(graphs_and_labels(), st.randoms(use_true_random=False), st.floats(1e-3, 1e3))
def test_modularity_invariances(graph, random, scale):
    A, labels = graph
    Q = modularity(A, labels)
    perm = np.array(random.sample(range(A.shape[0]), A.shape[0]))
    assert modularity(A[np.ix_(perm, perm)], labels[perm]) == pytest.approx(Q, abs=1e-12)
    # Renaming the modules does not matter either.
    assert modularity(A, (labels + 5) * 3) == pytest.approx(Q, abs=1e-12)
    assert modularity(A * scale, labels) == pytest.approx(Q, abs=1e-12)
    assert -0.5 - 1e-12 <= Q <= 1.0
    if A.any():
        assert Q == pytest.approx(nx_modularity(A, labels), abs=1e-12)


@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_modularity_of_extreme_weights_is_finite_and_scale_free(scale):
    # Two disjoint edges, each its own module: Q = 0.5 at every scale (2m would
    # overflow at 1e300 and the degree products underflow at 1e-300).
    A = np.kron(np.eye(2), np.ones((2, 2))) - np.eye(4)
    assert modularity(A * scale, [0, 0, 1, 1]) == pytest.approx(0.5, rel=1e-14)
    assert modularity(np.triu(A * scale), [0, 0, 1, 1]) == pytest.approx(0.5, rel=1e-14)


def test_log_normalisation_of_extreme_ratios_is_finite():
    # E / eps overflows float64 although log10(E) - log10(eps) = 600 does not.
    E = np.array([[1e300, 0.0], [1.0, 1e-300]])
    out = normalize_edges(E, "log", eps=1e-300)
    np.testing.assert_allclose(out, [[600.0, 0.0], [300.0, 0.0]], rtol=1e-14)
    assert np.isfinite(normalize_edges(sp.csr_array(E), "log", eps=1e-300).data).all()
