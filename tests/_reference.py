"""Independent reference computations the tests compare the library against."""

import numpy as np
import torch

from sklearn_lib.basis._linalg import flip_signs, orientation_signs
from sklearn_lib.basis._stats import output_weights


def reference_basis(X, J=None, *, sample_weight=None, center=True, threshold=1e-12,
                    n_components=None):
    """Brute-force numpy implementation of SPEC section 1, written from the text.

    Returns ``(C, C_pinv, Lambda, mu)`` with C (d, r) oriented like sklearn_lib: by
    the sign of ``C_pinv sum_x w_x J_x^T u`` for ``u`` the sum (else the alternating
    sum) of the outputs, and by ``svd_flip``'s rule without Jacobians.
    """
    n, d = X.shape
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, float)
    mu = (w @ X) / w.sum() if center else np.zeros(d)
    Xc = X - mu
    G = (Xc * w[:, None]).T @ Xc / w.sum()
    D, U = np.linalg.eigh(G)
    D = np.abs(D)
    order = np.argsort(-D)
    D, U = D[order], U[:, order]
    keep = D > threshold
    D, U = D[keep], U[:, keep]
    if J is None:
        Mp = np.eye(d)
    else:
        Mp = sum(w[x] * J[x].T @ J[x] for x in range(n)) / w.sum()
    M = np.diag(np.sqrt(D)) @ U.T @ Mp @ U @ np.diag(np.sqrt(D))
    L, V = np.linalg.eigh(M)
    L = np.abs(L)
    order = np.argsort(-L)
    L, V = L[order], V[:, order]
    keep = L >= threshold
    L, V = L[keep], V[:, keep]
    if n_components is not None:
        L, V = L[:n_components], V[:, :n_components]
    C = U @ np.diag(D ** -0.5) @ V @ np.diag(L ** 0.5)
    C_pinv = np.diag(L ** -0.5) @ V.T @ np.diag(D ** 0.5) @ U.T
    if J is None:
        signs = flip_signs(torch.from_numpy(C)).numpy()
    else:
        U = output_weights(J.shape[1]).numpy()
        sums = np.einsum("x,xoi,ok->ik", w, np.asarray(J, float), U)
        signs = orientation_signs(torch.from_numpy(C), torch.from_numpy(C_pinv),
                                  torch.from_numpy(sums)).numpy()
    return C * signs, C_pinv * signs[:, None], L, mu


def align_signs(A, B):
    """Flip the columns of B to agree in sign with those of A (for sign-ambiguous bases)."""
    signs = np.sign(np.sum(A * B, axis=0))
    signs[signs == 0] = 1
    return B * signs


def random_invertible(seed, d, log_cond):
    """A random (d, d) matrix with condition number exp(log_cond): Q1 diag(...) Q2."""
    gen = np.random.default_rng(seed)
    Q1, _ = np.linalg.qr(gen.normal(size=(d, d)))
    Q2, _ = np.linalg.qr(gen.normal(size=(d, d)))
    return Q1 @ np.diag(np.exp(np.linspace(0, log_cond, d))) @ Q2


def assert_same_up_to_rounding(actual, expected, *, ulps=64):
    """Assert two evaluations of the same float formula agree up to reordered rounding.

    Two runs of one computation with a different batch size, memory alignment or
    BLAS kernel (MKL's AVX-512 and AVX2 paths, its conditional-reproducibility
    modes, thread counts) sum the same products in another order: each result
    then moves by a few units in the last place of the largest terms, never more
    for the shallow computations tested with this. The tolerance is ``ulps``
    machine epsilons of the array's largest magnitude; a real defect (a wrong
    row, a missed sample, a float32 detour) is many orders larger.
    """
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = (expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor)
                else np.asarray(expected))
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    eps = np.finfo(expected.dtype).eps
    scale = float(np.max(np.abs(expected), initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=ulps * eps * scale)


def assert_same_graph_statistics(auto, generic, tol=1e-10):
    """Two graphs' edges and Jacobian Grams agree to ``tol`` of their largest entries."""
    assert len(auto.edges_) == len(generic.edges_)
    for E, E_ref in zip(auto.edges_, generic.edges_):
        assert np.abs(np.asarray(E) - np.asarray(E_ref)).max() <= tol * np.abs(E_ref).max()
    for b, b_ref in zip(auto.bases_, generic.bases_):
        G, G_ref = np.asarray(b.jacobian_gram_), np.asarray(b_ref.jacobian_gram_)
        assert np.abs(G - G_ref).max() <= tol * np.abs(G_ref).max()
