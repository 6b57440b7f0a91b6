"""Tests for sklearn_lib.basis._linalg: "auto" truncation (SPEC section 1) and its messages."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_lib import InteractionBasis


def orthogonal(gen, d):
    return np.linalg.qr(gen.normal(size=(d, d)))[0]


def rank_k_layer(seed, d, k, n=200):
    """Well-conditioned activations and a rank-k Jacobian map with Lambdas within 36x.

    ``J_x = c_x W^T`` with ``W`` (d, k) of singular values 1..3 and a positive
    factor per sample, so ``M'`` has rank exactly k and the count to keep is k.
    """
    gen = np.random.default_rng(seed)
    X = gen.normal(size=(n, d)) @ (orthogonal(gen, d) * np.linspace(1, 2, d)) + 3.0
    W = orthogonal(gen, d)[:, :k] * np.linspace(1, 3, k)
    J = np.broadcast_to(W.T, (n, k, d)) * (1 + 0.5 * gen.random(n))[:, None, None]
    return X, J


def reparameterisation(seed, d, cond, rotated):
    """``A = Q1 diag(s) Q2`` (or a permuted ``diag(s)``), s log-spaced in [1, cond]."""
    gen = np.random.default_rng(seed + 1)
    s = np.logspace(0, np.log10(cond), d)
    if not rotated:
        return np.diag(gen.permutation(s))
    return orthogonal(gen, d) @ np.diag(s) @ orthogonal(gen, d)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    d=st.integers(2, 10),
    k_fraction=st.floats(0, 1),
    log_cond=st.floats(0, 1),
    dtype=st.sampled_from(["float64", "float32"]),
    rotated=st.booleans(),
)
def test_auto_keeps_rank_k_under_resolvable_reparameterisations(
    seed, d, k_fraction, log_cond, dtype, rotated
):
    """SPEC 1: a rank-k map keeps k, for X @ A up to cond(A) 1e12 (float64), 1e4 (float32).

    (The Gram route kept the count to 1e6 and 1e2; whitening from the R factor and
    squaring the Jacobians in its frame move the limit to about 1 / (c eps).)
    """
    k = 1 + int(k_fraction * (d - 1))
    max_log_cond = 12 if dtype == "float64" else 4
    X, J = rank_k_layer(seed, d, k)
    A = reparameterisation(seed, d, 10 ** (log_cond * max_log_cond), rotated)
    XA, JA = (X @ A).astype(dtype), (J @ np.linalg.inv(A).T).astype(dtype)
    assert InteractionBasis(dtype=dtype).fit(X.astype(dtype), jacobians=J.astype(dtype)
                                             ).n_components_ == k
    assert InteractionBasis(dtype=dtype).fit(XA, jacobians=JA).n_components_ == k


@pytest.mark.parametrize("dtype, cond", [("float32", 1e7), ("float64", 1e16)])
def test_precision_running_out_is_named(dtype, cond):
    """Beyond the resolvable range the message blames the precision, not the data.

    Whitening from the R factor resolves about ``eps cond(A)``, so the range ends
    near cond(A) = 1/eps (it ended near 1/sqrt(eps) with the Gram route).
    """
    X, J = rank_k_layer(0, 8, 1)
    A = reparameterisation(0, 8, cond, rotated=True)
    XA, JA = (X @ A).astype(dtype), (J @ np.linalg.inv(A).T).astype(dtype)
    with pytest.raises(ValueError, match=rf"precision of {dtype} .*ran out.*condition number"):
        InteractionBasis(dtype=dtype).fit(XA, jacobians=JA)


@pytest.mark.parametrize("dtype, cond", [("float32", 1e8), ("float64", 1e17)])
def test_rescaled_features_are_resolved_at_any_condition(dtype, cond):
    """A diagonal reparameterisation is undone exactly by equilibrating R's columns."""
    X, J = rank_k_layer(0, 8, 3)
    A = reparameterisation(0, 8, cond, rotated=False)
    XA, JA = (X @ A).astype(dtype), (J @ np.linalg.inv(A).T).astype(dtype)
    expected = InteractionBasis().fit(X, jacobians=J).interaction_strengths_
    basis = InteractionBasis(dtype=dtype).fit(XA, jacobians=JA)
    np.testing.assert_allclose(basis.interaction_strengths_, expected,
                               rtol=100 * np.finfo(dtype).eps)


@pytest.mark.parametrize("value", [0.0, 0.1, 3.0, 1e200])
def test_constant_activations_are_named(value):
    # 0.1 and 1e200 do not centre to exact zeros: the residue is rounding.
    J = np.random.default_rng(0).normal(size=(10, 2, 3))
    with pytest.raises(ValueError, match="the activations are constant"):
        InteractionBasis().fit(np.full((10, 3), value), jacobians=J)


def test_zero_jacobians_on_the_varying_directions_are_named():
    gen = np.random.default_rng(0)
    X = np.c_[gen.normal(size=(50, 2)), np.zeros((50, 2))]
    J = np.concatenate([np.zeros((50, 3, 2)), gen.normal(size=(50, 3, 2))], axis=2)
    with pytest.raises(ValueError, match="the Jacobians are zero on the 2 directions"):
        InteractionBasis().fit(X, jacobians=J)
    with pytest.raises(ValueError, match="the Jacobians are zero"):
        InteractionBasis().fit(X[:, :2], jacobians=np.zeros((50, 3, 2)))


def test_a_float_threshold_that_removes_everything_is_named():
    X, J = rank_k_layer(0, 4, 2)
    with pytest.raises(ValueError, match=r"below truncation_threshold=1e\+06"):
        InteractionBasis(truncation_threshold=1e6).fit(X, jacobians=J)
    with pytest.raises(ValueError, match=r"Gram eigenvalue is at or below"):
        InteractionBasis(truncation_threshold=1e9).fit(X, jacobians=J)


@pytest.mark.filterwarnings("ignore:The basis is exact:RuntimeWarning")
@pytest.mark.parametrize(
    "x_scale, j_scale",
    [(1e200, 1.0), (1.0, 1e150), (1e200, 1e-200), (1e-200, 1e200), (1e300, 1e-300),
     (1e-300, 1.0), (1.0, 1e-300)],
)
def test_any_finite_scale_fits_like_the_unscaled_data(x_scale, j_scale):
    """SPEC 1(d) with A = c I: Z(c X, J / c) = Z(X, J); and Z(X, c' J) = c' Z(X, J).

    Fitting on ``c X`` with Jacobians ``c' J`` gives ``C -> C c'``, so the output
    is ``c c'`` times the unscaled one (up to signs). Squares of these values
    overflow or underflow float64; the fit must not.
    """
    X, J = rank_k_layer(0, 4, 3)
    Z = InteractionBasis().fit_transform(X, jacobians=J)
    basis = InteractionBasis().fit(X * x_scale, jacobians=J * j_scale)
    Z_scaled = basis.transform(X * x_scale)
    expected = np.abs(Z) * (x_scale * j_scale)
    np.testing.assert_allclose(np.abs(Z_scaled), expected, rtol=1e-10,
                               atol=1e-12 * np.abs(expected).max())


def test_strengths_beyond_the_float_range_warn():
    X, J = rank_k_layer(0, 4, 3)
    with pytest.warns(RuntimeWarning, match="reported as inf or 0"):
        basis = InteractionBasis().fit(X * 1e200, jacobians=J)
    assert np.isinf(basis.interaction_strengths_).all()


@pytest.mark.filterwarnings("ignore:The basis is exact:RuntimeWarning")
@pytest.mark.parametrize("scales", [(1e200, 1.0, 1e-200), (1.0, 1e-300, 1e150)])
def test_partial_fit_of_differently_scaled_chunks_equals_fit(scales):
    """SPEC 1(e) when chunks' squares differ by more than the float range."""
    X, J = rank_k_layer(1, 4, 3, n=90)
    factors = np.repeat(scales, 30)[:, None, None]
    J = J * factors
    full = InteractionBasis().fit(X, jacobians=J)
    streamed = InteractionBasis()
    for rows in (slice(0, 30), slice(30, 60), slice(60, 90)):
        streamed.partial_fit(X[rows], jacobians=J[rows])
    assert streamed.n_components_ == full.n_components_
    np.testing.assert_allclose(streamed.components_, full.components_, rtol=1e-9)
    np.testing.assert_allclose(streamed.mean_, full.mean_, rtol=1e-14)


# ----------------------------------------------------------------------- thread count
def test_small_eigh_runs_on_one_thread_and_restores_the_count(monkeypatch):
    """Small LAPACK calls run single-threaded (robust when cores are shared), then restore."""
    import torch

    from sklearn_lib.basis import _linalg
    from sklearn_lib.utils._threads import lapack_threads

    seen = []
    real_eigh = torch.linalg.eigh

    def spy(A):
        seen.append((A.shape[0], torch.get_num_threads()))
        return real_eigh(A)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        A = torch.eye(5, dtype=torch.float64)
        values, _ = _linalg.sorted_eigh(A)
        torch.testing.assert_close(values, torch.ones(5, dtype=torch.float64))
        assert seen[-1] == (5, 1)
        assert torch.get_num_threads() == 2
        # Above the size limit the user's thread count is kept.
        with lapack_threads(A, max_size=4):
            assert torch.get_num_threads() == 2
        # An error inside the block still restores the count.
        with pytest.raises(RuntimeError, match="boom"):
            with lapack_threads(A):
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------- square roots, not squares
def test_gram_eigenvalues_resolve_eps_squared():
    """Gram eigenvalues come from R's singular values: resolved to eps^2 of the largest.

    ``eigh`` of ``G`` loses everything below ``eps`` of the largest eigenvalue; here
    the eigenvalues span 1e-16 and each is right to 1e-6.
    """
    gen = np.random.default_rng(3)
    s = np.logspace(0, -8, 6)
    centred = gen.normal(size=(600, 6))
    Q = np.linalg.qr(centred - centred.mean(0))[0]  # orthonormal columns of mean zero
    X = Q * s @ orthogonal(gen, 6) * np.sqrt(600) + 2.0
    J = gen.normal(size=(600, 2, 6))
    basis = InteractionBasis().fit(X, jacobians=J)
    np.testing.assert_allclose(basis.gram_eigenvalues_, s**2, rtol=1e-6)


def test_whitening_from_r_resolves_what_the_gram_matrix_cannot():
    """Strengths at cond(A) 1e7 (float64): right to 1e-6, where the Gram route keeps one."""
    X, J = rank_k_layer(2, 8, 8)
    A = reparameterisation(2, 8, 1e7, rotated=True)
    expected = InteractionBasis().fit(X, jacobians=J).interaction_strengths_
    basis = InteractionBasis().fit(X @ A, jacobians=J @ np.linalg.inv(A).T)
    np.testing.assert_allclose(basis.interaction_strengths_, expected, rtol=1e-6)


def test_dropping_a_resolvable_strength_warns_with_the_cause():
    """float32 at cond(A) 1e6: what the rounding of these coordinates hides is named."""
    X, J = rank_k_layer(0, 8, 1)
    A = reparameterisation(0, 8, 1e6, rotated=True)
    XA, JA = (X @ A).astype("float32"), (J @ np.linalg.inv(A).T).astype("float32")
    with pytest.warns(UserWarning, match=r"precision of float32 .*condition number"):
        InteractionBasis(dtype="float32").fit(XA, jacobians=JA)


@pytest.mark.parametrize("dtype, cond", [("float64", 1e6), ("float32", 1e3)])
def test_exact_zeros_are_dropped_silently(dtype, cond):
    """A rank-k map and a duplicated feature are no reason to warn, however conditioned."""
    import warnings

    X, J = rank_k_layer(4, 8, 3)
    A = reparameterisation(4, 8, cond, rotated=True)
    XA, JA = X @ A, J @ np.linalg.inv(A).T
    XA, JA = np.c_[XA, XA[:, :1]], np.concatenate([JA, np.zeros_like(JA[:, :, :1])], axis=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        basis = InteractionBasis(dtype=dtype).fit(XA.astype(dtype), jacobians=JA.astype(dtype))
    assert basis.n_components_ == 3


def test_orientation_falls_back_in_order():
    """The sum of the outputs decides; then their alternating sum; then svd_flip's rule."""
    import torch

    from sklearn_lib.basis._linalg import flip_signs, orientation_signs

    C = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 1.0, -0.1]])  # (d=2, r=3)
    C_pinv = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (r=3, d=2)
    sums = torch.tensor([[2.0, 0.0], [0.0, -1.0]])  # (d=2, 2): rows are features
    signs = orientation_signs(C, C_pinv, sums)
    # direction 0: output sum 2 > 0; direction 1: output sum 0, alternating -1 < 0;
    # direction 2: output sum 2 > 0.
    assert signs.tolist() == [1.0, -1.0, 1.0]
    zero = torch.zeros(2, 2)
    assert orientation_signs(C, C_pinv, zero).tolist() == flip_signs(C).tolist()
    noisy = orientation_signs(C, C_pinv, sums, noise=torch.full((3, 2), 5.0))
    assert noisy.tolist() == flip_signs(C).tolist()


def test_transform_is_equal_under_reparameterisation_not_only_up_to_signs():
    X, J = rank_k_layer(5, 6, 4)
    A = reparameterisation(5, 6, 1e4, rotated=True)
    Z = InteractionBasis().fit_transform(X, jacobians=J)
    Z_A = InteractionBasis().fit(X @ A, jacobians=J @ np.linalg.inv(A).T).transform(X @ A)
    np.testing.assert_allclose(Z_A, Z, rtol=0, atol=1e-8 * np.abs(Z).max())
