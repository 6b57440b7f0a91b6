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
    """SPEC 1: a rank-k map keeps k, for X @ A up to cond(A) 1e6 (float64), 1e2 (float32)."""
    k = 1 + int(k_fraction * (d - 1))
    max_log_cond = 6 if dtype == "float64" else 2
    X, J = rank_k_layer(seed, d, k)
    A = reparameterisation(seed, d, 10 ** (log_cond * max_log_cond), rotated)
    XA, JA = (X @ A).astype(dtype), (J @ np.linalg.inv(A).T).astype(dtype)
    assert InteractionBasis(dtype=dtype).fit(X.astype(dtype), jacobians=J.astype(dtype)
                                             ).n_components_ == k
    assert InteractionBasis(dtype=dtype).fit(XA, jacobians=JA).n_components_ == k


@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("dtype, cond", [("float32", 1e4), ("float64", 1e9)])
def test_precision_running_out_is_named(rotated, dtype, cond):
    """Beyond the resolvable range the message blames the precision, not the data."""
    X, J = rank_k_layer(0, 8, 1)
    A = reparameterisation(0, 8, cond, rotated)
    XA, JA = (X @ A).astype(dtype), (J @ np.linalg.inv(A).T).astype(dtype)
    with pytest.raises(ValueError, match=rf"precision of {dtype} .*ran out.*condition number"):
        InteractionBasis(dtype=dtype).fit(XA, jacobians=JA)


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
