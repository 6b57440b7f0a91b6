"""Tests for sklearn_lib.basis._stats: mergeable statistics at any magnitude."""

import numpy as np
import pytest
import torch

from sklearn_lib.basis._stats import InteractionStatistics, scale_by_power_of_two


def new_stats(d=3, o=2):
    return InteractionStatistics(d, o, center=True, device=torch.device("cpu"),
                                 dtype=torch.float64)


@pytest.mark.parametrize("k", [-2000, -1074, -5, 0, 7, 1023, 2000])
def test_scale_by_power_of_two_is_exact_and_invertible(k):
    x = torch.tensor([1.5, -3.0, 2.0**-20], dtype=torch.float64)
    y = scale_by_power_of_two(x, k)
    # Exact: multiplying by a power of two only changes the exponent while the
    # result stays a normal float; compare with numpy's ldexp, done in one step.
    if -1000 < k < 1000:
        np.testing.assert_array_equal(y.numpy(), np.ldexp(x.numpy(), k))
        np.testing.assert_array_equal(scale_by_power_of_two(y, -k).numpy(), x.numpy())


def log2_entries(matrix, exponent):
    """log2 of |entries| of ``matrix * 4**exponent``, finite even beyond the float range."""
    return np.log2(np.abs(matrix.numpy())) + 2 * exponent


@pytest.mark.parametrize("j_scale", [1e-200, 1e150, 1e200])
def test_squares_beyond_the_float_range_are_accumulated(j_scale):
    rng = np.random.default_rng(0)
    X, J = rng.normal(size=(40, 3)), rng.normal(size=(40, 2, 3))
    gram, jac, e_gram, e_jac = new_stats().update(X, J).scaled_moments()
    s_gram, s_jac, s_e_gram, s_e_jac = new_stats().update(X * 1e200, J * j_scale).scaled_moments()
    # G(c X) = c^2 G(X) and M'(c' J) = c'^2 M'(J), to the rounding of c X and c' J.
    np.testing.assert_allclose(log2_entries(s_gram, s_e_gram),
                               log2_entries(gram, e_gram) + 2 * np.log2(1e200), atol=1e-12)
    np.testing.assert_allclose(log2_entries(s_jac, s_e_jac),
                               log2_entries(jac, e_jac) + 2 * np.log2(j_scale), atol=1e-12)


def test_merging_differently_scaled_halves_equals_the_whole():
    """Chan's update across chunks whose squares differ by 1e400 (SPEC 1(e))."""
    rng = np.random.default_rng(1)
    X, J = rng.normal(size=(60, 3)), rng.normal(size=(60, 2, 3))
    J[30:] *= 1e-200
    X[30:] += 1e250  # the means differ by far more than the spreads
    whole = new_stats().update(X, J)
    halves = new_stats().update(X[:30], J[:30]) + new_stats().update(X[30:], J[30:])
    g_w, j_w, eg_w, ej_w = whole.scaled_moments()
    g_h, j_h, eg_h, ej_h = halves.scaled_moments()
    np.testing.assert_allclose(log2_entries(g_h, eg_h), log2_entries(g_w, eg_w), atol=1e-9)
    np.testing.assert_allclose(log2_entries(j_h, ej_h), log2_entries(j_w, ej_w), atol=1e-9)
    np.testing.assert_allclose(halves.mean.numpy(), whole.mean.numpy(), rtol=1e-15)


def test_non_finite_jacobians_still_refused():
    J = np.ones((4, 2, 3))
    J[1, 0, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        new_stats().update(np.ones((4, 3)), J)
