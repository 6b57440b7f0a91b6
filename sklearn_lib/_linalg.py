"""The basis math of SPEC section 1: sorted eigh, truncation, whitening, rotation.

:func:`interaction_basis` is the single place where an interaction basis is
computed from statistics; :class:`~sklearn_lib.InteractionBasis`, its
``partial_fit`` and :class:`~sklearn_lib.InteractionGraph` all call it.
"""

from dataclasses import dataclass

import torch


def sorted_eigh(A):
    """Eigendecompose a symmetric matrix; return ``|eigenvalues|`` descending and vectors.

    The matrix is symmetrised first so that rounding asymmetries of a Gram
    matrix accumulated in chunks cannot make ``eigh`` read only one triangle of
    a slightly wrong matrix. Absolute values follow the reference
    implementation: tiny negative eigenvalues of a PSD matrix are rounding.
    """
    values, vectors = torch.linalg.eigh((A + A.T) / 2)
    values = values.abs()
    order = torch.argsort(values, descending=True, stable=True)
    return values[order], vectors[:, order]


def truncation_tolerance(values, threshold, n_terms=1, scale=None):
    """Eigenvalues strictly above the returned value are kept.

    ``"auto"`` is the numerical-rank tolerance
    ``scale * max(size, sqrt(n_terms)) * eps`` of the dtype, where ``scale`` is
    the size of the matrix's absolute rounding errors (default: its largest
    eigenvalue) and ``n_terms`` the number of outer products summed into it.
    SPEC section 1 states ``max * size * eps``, which is what this is for the
    Gram matrix of few rows. It is too tight elsewhere, and kept rounding noise
    as directions (``Lambda ~ 1e-14 * max`` for a rank-2 map on 5 features):
    a sum of many rows carries noise of order ``sqrt(n_terms) * eps`` (a random
    walk of rounding errors), and the whitened ``M = D^1/2 U^T M' U D^1/2`` carries
    ``M'``'s absolute errors times ``D``, so its scale is ``D_max * |M'|``, not
    ``Lambda_max``. A float is an absolute threshold.
    """
    if threshold == "auto":
        if values.numel() == 0:
            return 0.0
        eps = torch.finfo(values.dtype).eps
        scale = float(values.max()) if scale is None else max(scale, float(values.max()))
        return scale * max(values.numel(), n_terms**0.5) * eps
    return float(threshold)


def flip_signs(C):
    """Signs making each column's largest-magnitude entry positive, like ``svd_flip``."""
    rows = torch.argmax(C.abs(), dim=0)
    signs = torch.sign(C[rows, torch.arange(C.shape[1], device=C.device)])
    signs[signs == 0] = 1
    return signs


@dataclass
class BasisResult:
    """What :func:`interaction_basis` computes.

    ``components`` is ``C`` (d, r), ``inverse_components`` is ``C_pinv`` (r, d),
    ``interaction_strengths`` is ``Lambda`` (r,), ``gram_eigenvalues`` are all d
    sorted Gram eigenvalues, ``n_kept_gram`` is m (directions surviving the first
    truncation) and ``n_available`` the number surviving both truncations,
    before ``n_components`` is applied.
    """

    components: torch.Tensor
    inverse_components: torch.Tensor
    interaction_strengths: torch.Tensor
    gram_eigenvalues: torch.Tensor
    n_kept_gram: int
    n_available: int


def interaction_basis(
    gram, jacobian_gram, *, threshold="auto", n_components=None, n_terms=(1, 1)
):
    """Interaction basis from the Gram matrix ``G`` and Jacobian second moment ``M'``.

    Implements steps 2-7 of SPEC section 1: ``G = U D U^T`` truncated at
    ``D > tau_D``; ``M = D^1/2 U^T M' U D^1/2 = V Lambda V^T`` truncated at
    ``Lambda >= tau_Lambda`` and to ``n_components``;
    ``C = U D^-1/2 V Lambda^1/2`` and ``C_pinv = Lambda^-1/2 V^T D^1/2 U^T``.

    Parameters
    ----------
    gram, jacobian_gram : torch.Tensor of shape (d, d)
    threshold : "auto" or float
    n_components : int or None
        Upper bound on the number of directions; the caller clamps and warns.
    n_terms : (int, int)
        Number of outer products accumulated into ``gram`` and ``jacobian_gram``
        (rows of X; rows of X times outputs), for the "auto" tolerance.

    Returns
    -------
    BasisResult
    """
    D_all, U_all = sorted_eigh(gram)
    m = int((D_all > truncation_tolerance(D_all, threshold, n_terms[0])).sum())
    D, U = D_all[:m], U_all[:, :m]
    sqrt_D = D.sqrt()
    M = sqrt_D[:, None] * (U.T @ jacobian_gram @ U) * sqrt_D[None, :]
    Lambda, V = sorted_eigh(M)
    # SPEC: the second truncation keeps Lambda >= tau (the first keeps D > tau);
    # "auto" must still drop exact zeros, hence the strict form when tau is 0.
    scale = float(D[0] * torch.linalg.matrix_norm(jacobian_gram)) if m else None
    tau = truncation_tolerance(Lambda, threshold, n_terms[1], scale)
    keep = Lambda > tau if tau == 0 else Lambda >= tau
    n_available = int(keep.sum())
    r = n_available if n_components is None else min(n_components, n_available)
    Lambda, V = Lambda[:r], V[:, :r]
    sqrt_Lambda = Lambda.sqrt()
    # C = U D^-1/2 V Lambda^1/2 and its left inverse, each as one product.
    C = (U / sqrt_D) @ (V * sqrt_Lambda)
    C_pinv = (V / sqrt_Lambda).T @ (U * sqrt_D).T
    signs = flip_signs(C)
    return BasisResult(
        components=C * signs,
        inverse_components=C_pinv * signs[:, None],
        interaction_strengths=Lambda,
        gram_eigenvalues=D_all,
        n_kept_gram=m,
        n_available=n_available,
    )
