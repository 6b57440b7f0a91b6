import pickle
import warnings

import numpy as np
import pytest
import torch
from _reference import (
    align_signs,
    assert_same_up_to_rounding,
    random_invertible,
    reference_basis,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from sklearn_lib import InteractionBasis
from sklearn_lib.basis._stats import InteractionStatistics


def make_layer(rng, n=300, d=6, o=4, rank=None):
    """Correlated activations (optionally rank-deficient) and random Jacobians."""
    rank = d if rank is None else rank
    X = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) + rng.normal(size=d)
    J = rng.normal(size=(n, o, d)) + rng.normal(size=(o, d))
    return X, J


@parametrize_with_checks([InteractionBasis(), InteractionBasis(n_components=1, center=False)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("n_components", [None, 2])
@pytest.mark.parametrize("rank", [6, 4])
def test_matches_bruteforce_reference(rng, center, n_components, rank):
    X, J = make_layer(rng, rank=rank)
    basis = InteractionBasis(n_components, center=center).fit(X, jacobians=J)
    C, C_pinv, L, mu = reference_basis(X, J, center=center, threshold=1e-9,
                                       n_components=n_components)
    assert basis.n_components_ == C.shape[1]
    np.testing.assert_allclose(basis.interaction_strengths_, L, rtol=1e-9)
    np.testing.assert_allclose(basis.components_.T, C, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(basis.inverse_components_, C_pinv, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(basis.mean_, mu, atol=1e-12)
    Mp = np.einsum("xoi,xoj->ij", J, J) / len(X)
    np.testing.assert_allclose(basis.jacobian_gram_, Mp, rtol=1e-12)


def test_sample_weight_matches_reference_and_repetition(rng):
    X, J = make_layer(rng, n=80)
    w = rng.integers(0, 4, size=80).astype(float)
    weighted = InteractionBasis().fit(X, jacobians=J, sample_weight=w)
    C, _, L, _ = reference_basis(X, J, sample_weight=w, threshold=1e-9)
    np.testing.assert_allclose(weighted.components_.T, C, rtol=1e-7, atol=1e-9)
    repeat = np.repeat(np.arange(80), w.astype(int))
    repeated = InteractionBasis().fit(X[repeat], jacobians=J[repeat])
    np.testing.assert_allclose(weighted.interaction_strengths_, repeated.interaction_strengths_,
                               rtol=1e-10)
    np.testing.assert_allclose(weighted.components_, repeated.components_, rtol=1e-8,
                               atol=1e-10)


# --- SPEC section 1 identities -------------------------------------------------------


@pytest.mark.parametrize("n_components", [None, 3])
def test_identity_a_reduces_to_pca(rng, n_components):
    X, _ = make_layer(rng, n=120)
    basis = InteractionBasis(n_components).fit(X)
    pca = PCA(n_components if n_components else X.shape[1]).fit(X)
    Z_pca = pca.transform(X)
    Z = basis.transform(X)
    np.testing.assert_allclose(align_signs(Z_pca, Z), Z_pca, atol=1e-10)
    np.testing.assert_allclose(
        basis.interaction_strengths_, pca.explained_variance_ * (len(X) - 1) / len(X),
        rtol=1e-10,
    )
    assert basis.n_outputs_ is None


@pytest.mark.parametrize("with_jacobians", [True, False])
def test_identity_b_variance_is_importance(rng, with_jacobians):
    X, J = make_layer(rng, rank=4)
    basis = InteractionBasis().fit(X, jacobians=J if with_jacobians else None)
    Z = basis.transform(X)
    np.testing.assert_allclose(Z.T @ Z / len(X), np.diag(basis.interaction_strengths_),
                               atol=1e-9 * basis.interaction_strengths_[0])


def test_identity_c_orthonormal_downstream_jacobian(rng):
    X, J = make_layer(rng, rank=5)
    basis = InteractionBasis().fit(X, jacobians=J)
    J_hat = J @ basis.inverse_components_.T
    second_moment = np.einsum("xoi,xoj->ij", J_hat, J_hat) / len(X)
    np.testing.assert_allclose(second_moment, np.eye(basis.n_components_), atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log_cond=st.floats(0, 4),
       center=st.booleans())
def test_identity_d_reparameterisation_invariance(seed, log_cond, center):
    """Fitting on X' = X @ A is invariant when J' is the chain-rule Jacobian.

    With row vectors, x = x' @ inv(A), so dJ/dx' = J @ inv(A).T. (SPEC 1(d) writes
    ``J @ inv(A)``, which is the same only for symmetric A; the chain rule is what
    the invariance needs, and with J @ inv(A) this test fails for generic A.)
    """
    rng = np.random.default_rng(seed)
    X, J = make_layer(rng, n=100, d=5, o=3)
    A = random_invertible(seed, 5, log_cond)
    Z = InteractionBasis(center=center).fit_transform(X, jacobians=J)
    Z_A = InteractionBasis(center=center).fit_transform(X @ A, jacobians=J @ np.linalg.inv(A).T)
    np.testing.assert_allclose(align_signs(Z, Z_A), Z, atol=1e-7 * np.abs(Z).max())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), column=st.integers(0, 4), scale=st.floats(-3, 3))
def test_identity_d_duplicated_feature_changes_nothing(seed, column, scale):
    rng = np.random.default_rng(seed)
    X, J = make_layer(rng, n=100, d=5, o=3)
    # The downstream map ignores the copy, so its Jacobian column is zero.
    X_dup = np.hstack([X, scale * X[:, [column]]])
    J_dup = np.concatenate([J, np.zeros((100, 3, 1))], axis=2)
    Z = InteractionBasis().fit_transform(X, jacobians=J)
    basis = InteractionBasis().fit(X_dup, jacobians=J_dup)
    Z_dup = basis.transform(X_dup)
    assert basis.n_components_ == Z.shape[1]
    np.testing.assert_allclose(align_signs(Z, Z_dup), Z, atol=1e-7 * np.abs(Z).max())


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunks", [[150, 150], [2, 97, 201]])
def test_identity_e_partial_fit_equals_fit(rng, chunks, weighted):
    X, J = make_layer(rng, n=sum(chunks))
    w = rng.uniform(0.5, 2, size=len(X)) if weighted else None
    full = InteractionBasis().fit(X, jacobians=J, sample_weight=w)
    streamed = InteractionBasis()
    start = 0
    for size in chunks:
        rows = slice(start, start + size)
        streamed.partial_fit(X[rows], jacobians=J[rows],
                             sample_weight=None if w is None else w[rows])
        start += size
    assert streamed.n_samples_seen_ == len(X)
    np.testing.assert_allclose(streamed.mean_, full.mean_, rtol=1e-12)
    np.testing.assert_allclose(streamed.gram_, full.gram_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(streamed.components_, full.components_, rtol=1e-8, atol=1e-10)


def test_fit_in_chunks_equals_one_pass(rng):
    X, J = make_layer(rng, n=101)
    one = InteractionBasis().fit(X, jacobians=J)
    chunked = InteractionBasis(batch_size=7).fit(X, jacobians=J)
    np.testing.assert_allclose(chunked.components_, one.components_, rtol=1e-9, atol=1e-11)


def test_statistics_merge_is_numerically_sound(rng):
    """Two halves far from the origin merge to the exact centred Gram (np.cov)."""
    X = rng.normal(size=(400, 3)) + 1e7
    stats = [
        InteractionStatistics(3, None, center=True, device=torch.device("cpu"),
                              dtype=torch.float64).update(part)
        for part in (X[:123], X[123:])
    ]
    merged = stats[0] + stats[1]
    np.testing.assert_allclose(merged.gram.numpy(), np.cov(X.T, bias=True), rtol=1e-8)
    np.testing.assert_allclose(merged.mean.numpy(), X.mean(0), rtol=1e-15)
    with pytest.raises(ValueError, match="different layers"):
        merged + InteractionStatistics(4, None, center=True, device=torch.device("cpu"),
                                       dtype=torch.float64)


# --- SPEC section 2: chaining two layers by hand -----------------------------------------


def test_two_layer_chain_has_derived_answer(rng):
    """X0 -> X1 = X0 W0 (W0 orthogonal) -> X2 = X1 W1, final layer unrotated.

    With whitened X0, layer 1 sees M' = W1 W1^T, so C1 = R1 diag(s1) for the SVD
    W1 = R1 diag(s1) Q1^T. Layer 0 then sees M' = W0 C1 C1^T W0^T = (W0 W1)(W0 W1)^T,
    hence C0 = W0 R1 diag(s1) and Lambda0 = Lambda1 = s1^2: an orthogonal layer
    carries the interaction basis along unchanged, Z0 == Z1.
    """
    n, d = 500, 4
    X0 = rng.normal(size=(n, d))
    X0 -= X0.mean(0)
    X0 = X0 @ np.linalg.inv(np.linalg.cholesky(X0.T @ X0 / n)).T  # exactly whitened
    W0, _ = np.linalg.qr(rng.normal(size=(d, d)))
    R1 = np.linalg.qr(rng.normal(size=(d, d)))[0]
    s1 = np.array([3.0, 2.0, 1.0, 0.5])
    W1 = R1 @ np.diag(s1) @ np.linalg.qr(rng.normal(size=(d, d)))[0].T
    X1 = X0 @ W0
    # Section 1 -> 2: Jacobian of X2 w.r.t. X1 is W1^T; the final layer is unrotated.
    layer1 = InteractionBasis().fit(X1, jacobians=np.broadcast_to(W1.T, (n, d, d)))
    C1 = layer1.components_.T
    J_hat0 = np.einsum("xoi,or->xri", np.broadcast_to(W0.T, (n, d, d)), C1)
    layer0 = InteractionBasis().fit(X0, jacobians=J_hat0)

    np.testing.assert_allclose(layer1.interaction_strengths_, s1**2, rtol=1e-10)
    np.testing.assert_allclose(layer0.interaction_strengths_, s1**2, rtol=1e-10)
    expected_C0 = W0 @ R1 @ np.diag(s1)
    np.testing.assert_allclose(align_signs(expected_C0, layer0.components_.T), expected_C0,
                               atol=1e-10)
    np.testing.assert_allclose(align_signs(layer1.transform(X1), layer0.transform(X0)),
                               layer1.transform(X1), atol=1e-10)


# --- truncation ---------------------------------------------------------------------------


def test_truncation_drops_null_directions(rng):
    X, J = make_layer(rng, d=6, rank=3)
    basis = InteractionBasis().fit(X, jacobians=J)
    assert basis.n_components_ == 3
    assert basis.gram_eigenvalues_.shape == (6,)
    assert np.all(np.diff(basis.gram_eigenvalues_) <= 0)


def _rank_k_downstream(seed, rank, n):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)) @ rng.normal(size=(5, 5))
    W = rng.normal(size=(4, rank)) @ rng.normal(size=(rank, 5))
    return InteractionBasis().fit(X, jacobians=np.broadcast_to(W, (n, 4, 5)))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rank=st.integers(1, 4), n=st.integers(50, 2000))
def test_auto_threshold_keeps_the_rank_of_the_downstream_map(seed, rank, n):
    """A rank-k downstream map keeps its k directions; anything more is rounding noise."""
    basis = _rank_k_downstream(seed, rank, n)
    strengths = np.asarray(basis.interaction_strengths_)
    assert basis.n_components_ >= rank
    assert np.all(strengths[rank:] < 1e-11 * strengths[0])


@pytest.mark.xfail(strict=False, reason=(
    "known gap: with n identical Jacobians the rounding of M' grows faster than the "
    "sqrt(n o) of the 'auto' bound, so a 5e-14 relative noise direction can survive "
    "(seed=1, rank=1, n=2000 keeps 2); depends on the BLAS summation order"))
def test_auto_threshold_drops_the_rounding_noise_of_identical_jacobians():
    assert _rank_k_downstream(1, 1, 2000).n_components_ == 1


def test_absolute_threshold(rng):
    X = rng.normal(size=(400, 3)) * np.array([1.0, 1e-2, 1e-4])
    assert InteractionBasis(truncation_threshold=1e-5).fit(X).n_components_ == 2
    assert InteractionBasis().fit(X).n_components_ == 3


def test_n_components_beyond_rank_warns_and_clamps(rng):
    X, J = make_layer(rng, d=6, rank=3)
    with pytest.warns(UserWarning, match="n_components=5 is larger than the 3"):
        basis = InteractionBasis(5).fit(X, jacobians=J)
    assert basis.n_components_ == 3


def test_reconstruction_on_kept_span(rng):
    X, J = make_layer(rng, d=6, rank=4)
    basis = InteractionBasis().fit(X, jacobians=J)
    np.testing.assert_allclose(basis.inverse_transform(basis.transform(X)), X, atol=1e-9)
    np.testing.assert_allclose(basis.inverse_components_ @ basis.components_.T,
                               np.eye(basis.n_components_), atol=1e-10)


# --- inputs and outputs ---------------------------------------------------------------


def test_tensor_in_tensor_out(rng):
    X, J = make_layer(rng)
    from_numpy = InteractionBasis().fit(X, jacobians=J)
    basis = InteractionBasis().fit(torch.from_numpy(X), jacobians=torch.from_numpy(J))
    Z = basis.transform(torch.from_numpy(X))
    assert isinstance(Z, torch.Tensor) and Z.dtype == torch.float64
    np.testing.assert_allclose(Z.numpy(), from_numpy.transform(X), atol=1e-12)
    back = basis.inverse_transform(Z)
    assert isinstance(back, torch.Tensor)
    assert isinstance(basis.transform(X), np.ndarray)


def test_memmap_input_is_read_not_written(rng, tmp_path):
    X, J = make_layer(rng, n=64)
    paths = {}
    for name, array in {"X": X, "J": J}.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], array)
    X_map = np.load(paths["X"], mmap_mode="r")
    J_map = np.load(paths["J"], mmap_mode="r")
    basis = InteractionBasis(batch_size=10).fit(X_map, jacobians=J_map)
    np.testing.assert_allclose(basis.components_,
                               InteractionBasis().fit(X, jacobians=J).components_, atol=1e-10)
    np.testing.assert_array_equal(np.load(paths["J"]), J)


def test_float32_dtype(rng):
    X, J = make_layer(rng)
    basis = InteractionBasis(dtype="float32").fit(X, jacobians=J)
    assert basis.transform(X).dtype == np.float32
    reference = InteractionBasis().fit(X, jacobians=J)
    np.testing.assert_allclose(basis.interaction_strengths_,
                               reference.interaction_strengths_, rtol=1e-3)


def test_pandas_output_and_feature_names(rng):
    pd = pytest.importorskip("pandas")
    X, J = make_layer(rng)
    frame = pd.DataFrame(X, columns=[f"unit{i}" for i in range(X.shape[1])])
    basis = InteractionBasis(3).set_output(transform="pandas").fit(frame, jacobians=J)
    out = basis.transform(frame)
    assert list(out.columns) == ["interactionbasis0", "interactionbasis1", "interactionbasis2"]
    assert list(basis.feature_names_in_) == list(frame.columns)


def test_clone_and_pickle_roundtrip(rng):
    X, J = make_layer(rng)
    basis = InteractionBasis(2, batch_size=50).fit(X, jacobians=J)
    restored = pickle.loads(pickle.dumps(basis))
    assert_same_up_to_rounding(restored.transform(X), basis.transform(X))  # two GEMM runs
    restored.partial_fit(X, jacobians=J)  # the statistics survive pickling too
    assert restored.n_samples_seen_ == 2 * len(X)
    assert clone(basis).get_params() == basis.get_params()


# --- score --------------------------------------------------------------------------------


def _bruteforce_gini_score(C, C_pinv, mu, X, J):
    Z = (X - mu) @ C
    E = np.zeros((J.shape[1], C.shape[1]))
    for x in range(len(X)):
        E += (J[x] @ C_pinv.T * Z[x]) ** 2
    v = np.sort((E / len(X)).ravel())
    n = v.size
    return sum((2 * (i + 1) - n - 1) * v[i] for i in range(n)) / (n * v.sum())


def test_score_is_gini_of_edges(rng):
    X, J = make_layer(rng, rank=5)
    basis = InteractionBasis().fit(X[:200], jacobians=J[:200])
    expected = _bruteforce_gini_score(basis.components_.T, basis.inverse_components_,
                                      basis.mean_, X[200:], J[200:])
    assert basis.score(X[200:], jacobians=J[200:]) == pytest.approx(expected, rel=1e-10)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_J, match",
    [
        (lambda J: J[:-1], r"one Jacobian per sample.*\(299, 4, 6\)"),
        (lambda J: J[:, :, :-1], r"last axis.*\(300, 4, 5\)"),
        (lambda J: J[0], "3-D"),
    ],
)
def test_bad_jacobian_shapes(rng, make_J, match):
    X, J = make_layer(rng)
    with pytest.raises(ValueError, match=match):
        InteractionBasis().fit(X, jacobians=make_J(J))


def test_transposed_jacobians_are_named(rng):
    X, J = make_layer(rng)
    with pytest.raises(ValueError, match="looks transposed"):
        InteractionBasis().fit(X, jacobians=np.swapaxes(J, 1, 2))


@pytest.mark.parametrize("where", ["X", "jacobians"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_non_finite_input(rng, where, value, as_tensor):
    X, J = make_layer(rng)
    (X if where == "X" else J)[5, 0] = value
    wrap = torch.from_numpy if as_tensor else np.asarray
    with pytest.raises(ValueError, match="NaN|infinity"):
        InteractionBasis(batch_size=64).fit(wrap(X), jacobians=wrap(J))


def test_partial_fit_rejects_bad_chunk_and_keeps_state(rng):
    X, J = make_layer(rng)
    basis = InteractionBasis().partial_fit(X[:100], jacobians=J[:100])
    before = basis.components_.copy()
    with pytest.raises(ValueError, match="6 features"):
        basis.partial_fit(X[100:, :5], jacobians=J[100:, :, :5])
    with pytest.raises(ValueError, match="8 outputs but the estimator was fitted with 4"):
        basis.partial_fit(X[100:], jacobians=np.concatenate([J[100:], J[100:]], axis=1))
    with pytest.raises(ValueError, match="first called with jacobians"):
        basis.partial_fit(X[100:])
    bad = J[100:].copy()
    bad[-1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        basis.partial_fit(X[100:], jacobians=bad)
    assert basis.n_samples_seen_ == 100
    np.testing.assert_array_equal(basis.components_, before)  # exact: never rewritten


def test_too_few_samples(rng):
    with pytest.raises(ValueError, match="minimum of 2"):
        InteractionBasis().fit(rng.normal(size=(1, 3)))
    with pytest.raises(ValueError, match="minimum of 2"):
        InteractionBasis().fit(torch.zeros(1, 3, dtype=torch.float64))


def test_constant_data_has_no_directions():
    with pytest.raises(ValueError, match="No direction survives truncation"):
        InteractionBasis().fit(np.ones((10, 3)))


def test_not_fitted():
    with pytest.raises(NotFittedError):
        InteractionBasis().transform(np.zeros((2, 3)))


def test_cuda_unavailable_is_clear():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        InteractionBasis(device="cuda").fit(np.random.default_rng(0).normal(size=(5, 2)))


def test_auto_device_runs(rng):
    X, J = make_layer(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InteractionBasis(device="auto").fit(X, jacobians=J)


# --- misuse is refused with what was expected and what was given (issue 8) --------------


@pytest.mark.parametrize("method", ["fit", "partial_fit", "score"])
def test_jacobians_passed_positionally_are_refused(rng, method):
    """fit(X, J) binds J to the ignored y: it used to fit (and score) as PCA."""
    X, J = make_layer(rng)
    basis = InteractionBasis().fit(X, jacobians=J) if method == "score" else InteractionBasis()
    with pytest.raises(ValueError, match=r"3-D array as y.*jacobians=J"):
        getattr(basis, method)(X, J)


@pytest.mark.parametrize("y", [np.zeros(300), np.zeros((300, 6))])
def test_targets_of_a_pipeline_are_still_ignored(rng, y):
    X, J = make_layer(rng)
    with_y = InteractionBasis().fit(X, y, jacobians=J)
    np.testing.assert_allclose(with_y.components_,
                               InteractionBasis().fit(X, jacobians=J).components_)


def test_score_refuses_jacobians_of_another_downstream_map(rng):
    X, J = make_layer(rng)
    fitted = InteractionBasis().fit(X, jacobians=J)
    other = np.concatenate([J, J], axis=1)
    for method in (fitted.score, fitted.edges):
        with pytest.raises(ValueError, match="8 outputs but the estimator was fitted with 4"):
            method(X, jacobians=other)
        with pytest.raises(ValueError, match="fitted with Jacobians.*scored without"):
            method(X)
    pca_like = InteractionBasis().fit(X)
    with pytest.raises(ValueError, match="fitted without Jacobians.*sklearn_lib.PCA"):
        pca_like.score(X, jacobians=J)
    # Fitted and scored without Jacobians is PCA against the identity map: fine.
    assert 0 <= pca_like.score(X) < 1


def _sparse(a):
    return torch.from_numpy(a).to_sparse()


def _with_a_dict(a):
    a = a.astype(object)
    a[0, 0] = {}
    return a


def _ragged(a):
    rows = a.tolist()
    rows[0] = rows[0][:-1]
    return rows


@pytest.mark.parametrize(
    "where, make, error, match",
    [
        ("X", _sparse, ValueError, r"X is a sparse tensor.*to_dense"),
        ("X", _ragged, ValueError, r"X must be a rectangular array.*ragged"),
        ("X", lambda a: a.astype(str), ValueError, r"X must hold real numbers, got strings"),
        ("X", lambda a: torch.from_numpy(a.astype(complex)), ValueError,
         r"X must hold real numbers.*complex128"),
        ("X", lambda a: torch.from_numpy(a[:, :0].copy()), ValueError, r"0 feature\(s\)"),
        ("X", _with_a_dict, TypeError, r"X must hold real numbers.*not 'dict'"),
        ("jacobians", _sparse, ValueError, r"jacobians is a sparse tensor.*to_dense"),
        ("jacobians", _ragged, ValueError, r"jacobians must be a rectangular array"),
        ("jacobians", lambda a: a.astype(complex), ValueError,
         r"jacobians must hold real numbers.*complex128"),
        ("jacobians", lambda a: a.astype(str), ValueError, r"jacobians must hold real numbers"),
        ("jacobians", lambda a: a[:, :0], ValueError, r"jacobians has 0 outputs"),
        ("jacobians", lambda a: torch.from_numpy(a).long(), ValueError,
         r"jacobians must be a floating-point tensor.*torch.int64"),
        ("sample_weight", lambda a: np.ones(len(a)) + 0j, ValueError,
         r"sample_weight must hold real numbers"),
        ("sample_weight", lambda a: torch.ones(len(a)).to_sparse(), ValueError,
         r"sample_weight is a sparse tensor"),
        ("sample_weight", lambda a: np.r_[1.0, np.zeros(len(a) - 1)], ValueError,
         r"positive weight to 1 of 300 samples"),
    ],
)
def test_unusable_input_is_refused_clearly(rng, where, make, error, match):
    X, J = make_layer(rng)
    inputs = {"X": X, "jacobians": J, "sample_weight": None}
    inputs[where] = make(inputs[where] if where != "sample_weight" else X)
    with pytest.raises(error, match=match):
        InteractionBasis().fit(inputs["X"], jacobians=inputs["jacobians"],
                               sample_weight=inputs["sample_weight"])


@pytest.mark.parametrize("method", ["transform", "inverse_transform", "edges"])
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda a: torch.from_numpy(a.astype(complex)), "must hold real numbers"),
        (_sparse, "is a sparse tensor"),
        (lambda a: a.astype(str), "must hold real numbers, got strings"),
    ],
)
def test_transform_like_methods_refuse_unusable_input(rng, method, make, match):
    """A complex tensor used to lose its imaginary part silently in transform."""
    X, J = make_layer(rng)
    basis = InteractionBasis(3).fit(X, jacobians=J)
    data = basis.transform(X) if method == "inverse_transform" else X
    kwargs = {"jacobians": J} if method == "edges" else {}
    with pytest.raises(ValueError, match=match):
        getattr(basis, method)(make(data), **kwargs)


def test_edges_refuse_non_finite_jacobians(rng):
    X, J = make_layer(rng)
    basis = InteractionBasis().fit(X, jacobians=J)
    J[3, 1, 2] = np.nan
    with pytest.raises(ValueError, match="jacobians contains NaN"):
        basis.edges(X, jacobians=J)


@pytest.mark.parametrize(
    "device, match",
    [
        ("tpu", "not a device torch knows"),
        ("meta", "not supported: sklearn_lib computes on CPU and CUDA"),
        (torch.device("meta"), "not supported: sklearn_lib computes on CPU and CUDA"),
        ("mps", "not supported"),
    ],
)
def test_unsupported_devices_are_refused(rng, device, match):
    X, J = make_layer(rng)
    with pytest.raises(ValueError, match=match):
        InteractionBasis(device=device).fit(X, jacobians=J)


def test_cuda_device_object_without_cuda_is_clear(rng):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    X, _ = make_layer(rng)
    with pytest.raises(ValueError, match="CUDA is not available"):
        InteractionBasis(device=torch.device("cuda")).fit(X)


# --- shares of Lambda ----------------------------------------------------------------
def _known_spectrum(rng, D, n=200):
    """X with Gram eigenvalues exactly ``D`` (centred columns, orthonormal then rotated)."""
    d = len(D)
    A = rng.normal(size=(n, d))
    Q, _ = np.linalg.qr(A - A.mean(0))
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return np.sqrt(n) * (Q * np.sqrt(D)) @ rotation


# Shares 0.5, 0.75, 0.875, 0.9375, 1: each fraction lies strictly between two of them.
SPECTRUM = np.array([8.0, 4.0, 2.0, 1.0, 1.0])


@pytest.mark.parametrize("share, expected", [(0.3, 1), (0.6, 2), (0.8, 3), (0.9, 4), (0.99, 5)])
def test_fractional_n_components_keeps_that_share_of_lambda(rng, share, expected):
    X = _known_spectrum(rng, SPECTRUM)
    fractional = InteractionBasis(n_components=share).fit(X)
    # Without Jacobians Lambda = D (identity (a)), known in closed form.
    assert fractional.n_components_ == expected
    np.testing.assert_allclose(fractional.interaction_strengths_, SPECTRUM[:expected],
                               rtol=1e-10)
    counted = InteractionBasis(n_components=expected).fit(X)
    np.testing.assert_allclose(fractional.transform(X), counted.transform(X), rtol=0,
                               atol=1e-12 * np.abs(X).max())


@settings(max_examples=15, deadline=None, derandomize=True)
@given(share=st.floats(0.01, 0.99), seed=st.integers(0, 2**16))
def test_fractional_n_components_is_the_fewest_reaching_the_share(share, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(40, 6)) * rng.uniform(0.1, 3, size=6)
    W = rng.normal(size=(6, 4))
    J = np.broadcast_to(W.T, (40, 4, 6))
    all_directions = InteractionBasis().fit(X, jacobians=J).interaction_strengths_
    cumulative = np.cumsum(all_directions) / all_directions.sum()
    r = InteractionBasis(n_components=share).fit(X, jacobians=J).n_components_
    assert cumulative[r - 1] >= share * (1 - 1e-12)
    assert r == 1 or cumulative[r - 2] < share * (1 + 1e-12)


@pytest.mark.parametrize("n_components", [0.0, 1.0, 1.5, -0.5])
def test_fractional_n_components_outside_the_open_interval_is_refused(rng, n_components):
    with pytest.raises(ValueError, match="n_components"):
        InteractionBasis(n_components=n_components).fit(rng.normal(size=(10, 3)))


# --- few samples ---------------------------------------------------------------------
@pytest.mark.parametrize("center, n, warns", [(True, 6, True), (True, 7, False),
                                              (False, 5, True), (False, 6, False)])
def test_more_features_than_samples_warns(rng, center, n, warns):
    X = rng.normal(size=(n, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        basis = InteractionBasis(center=center).fit(X)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if warns:
        assert messages == [
            f"X has 6 features but only {n} samples (rows; positions count as samples): its "
            f"basis can have at most {n - center} directions "
            f"({'n - 1 after centring' if center else 'n'}), so the other directions are "
            "missing, not unimportant. Fit on more samples, or, for a layer with channels, "
            "heads or positions, declare them with sklearn_lib.Layer(feature_axes=...)."
        ]
        assert caught[0].filename == __file__
        assert basis.n_components_ == n - center
    else:
        assert messages == []


def test_partial_fit_does_not_warn_about_its_early_chunks(rng):
    X = rng.normal(size=(40, 6))
    basis = InteractionBasis()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for chunk in np.array_split(X, 10):
            basis.partial_fit(chunk)
    assert basis.n_components_ == 6
