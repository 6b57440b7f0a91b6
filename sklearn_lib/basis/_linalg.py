"""The basis math of SPEC section 1: sorted eigh, truncation, whitening, rotation.

:func:`interaction_basis` is the single place where an interaction basis is
computed from statistics; :class:`~sklearn_lib.InteractionBasis`, its
``partial_fit`` and :class:`~sklearn_lib.InteractionGraph` all call it.

How "auto" truncation tells directions from rounding noise
-----------------------------------------------------------
The interaction strengths ``Lambda`` (eigenvalues of ``G M'``) do not change
under a reparameterisation ``X @ A`` (``G -> A^T G A``, ``M' -> A^-1 M' A^-T``);
rounding does. ``G`` and ``M'`` are accumulated with absolute errors of about
``eps`` times their size, and ``M = D^1/2 U^T M' U D^1/2`` carries ``M'``'s
errors times ``D``: rounding noise in ``Lambda`` is about
``eps * D_max * |M'|``, which grows like ``cond(A)^2`` (SPEC's resolvable range,
float64 to cond(A) 1e6 and float32 to 1e2, is where that stays well below the
interactions). The tolerances are therefore

* ``tau_D = eps * max(d, sqrt(n)) * D_max`` (numerical rank of the Gram matrix;
  ``sqrt(n)`` is the random-walk growth of errors summed over ``n`` rows), and
* ``tau_Lambda = eps * max(m, sqrt(n o)) * max(D_max * |M'|_F, Lambda_max)``.

A feature whose variance is below the rounding of its own mean (a constant
column, up to the ulps that centring leaves) counts as constant. The statistics
arrive divided by powers of four (see :mod:`sklearn_lib.basis._stats`), so data of
any finite magnitude fit, and the basis is returned in the data's units. When
nothing survives, :func:`interaction_basis` says which of three things
happened: constant activations, Jacobians that vanish where the activations
vary, or a precision that cannot resolve the interactions in these coordinates
(naming the dtype and the condition number).
"""

import math
import warnings
from dataclasses import dataclass
from numbers import Integral

import torch

from ..utils._threads import lapack_threads
from ._stats import scale_by_power_of_two


def sorted_eigh(A):
    """Eigendecompose a symmetric matrix; return ``|eigenvalues|`` descending and vectors.

    The matrix is symmetrised first so that rounding asymmetries of a Gram
    matrix accumulated in chunks cannot make ``eigh`` read only one triangle of
    a slightly wrong matrix. Absolute values follow the reference
    implementation: tiny negative eigenvalues of a PSD matrix are rounding.
    Small CPU matrices are decomposed on one thread (:func:`lapack_threads`).
    """
    A = (A + A.T) / 2
    with lapack_threads(A):
        values, vectors = torch.linalg.eigh(A)
    values = values.abs()
    order = torch.argsort(values, descending=True, stable=True)
    return values[order], vectors[:, order]


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
    before ``n_components`` is applied. All are in the units of the data;
    ``interaction_strengths`` and ``gram_eigenvalues`` are infinite where they
    exceed the float range (the basis itself is computed in scaled units).
    """

    components: torch.Tensor
    inverse_components: torch.Tensor
    interaction_strengths: torch.Tensor
    gram_eigenvalues: torch.Tensor
    n_kept_gram: int
    n_available: int


# Centring leaves each value of a constant feature off by a few ulps of its mean.
_CENTRING_ULPS = 8


def constant_feature_floor(mean, exponent):
    """Per-feature variance, in the units of the scaled Gram, that centring can fake.

    A feature whose Gram diagonal is at or below ``(8 eps |mean_i|)**2`` varies
    by no more than the rounding of its mean: it is constant. ``exponent`` is the
    power of four the Gram matrix was divided by (see ``scaled_moments``).
    """
    eps = torch.finfo(mean.dtype).eps
    return scale_by_power_of_two(_CENTRING_ULPS * eps * mean.abs(), -exponent).square()


def rounding_tolerance(largest, size, n_terms, dtype):
    """``eps * max(size, sqrt(n_terms)) * largest``: the "auto" floor of rounding noise.

    ``largest`` is the scale of the matrix's errors (its largest eigenvalue, or
    ``D_max |M'|_F`` for the whitened ``M``), ``size`` its order and ``n_terms``
    the number of outer products summed into it (module docstring).
    """
    return float(largest) * max(size, n_terms**0.5) * torch.finfo(dtype).eps if size else 0.0


def gram_spectrum(gram, n_rows, constant_floor=None):
    """``(G, D, U, tau_D)``: the Gram matrix with constant features zeroed, its sorted
    eigendecomposition and the "auto" tolerance of its numerical rank (``D > tau_D``).

    The first truncation of :func:`interaction_basis` and the activation rank of
    :class:`~sklearn_lib.degeneracy.DegeneracyReport` are this one rule.
    """
    if constant_floor is not None:
        # Features that vary by no more than the rounding of their mean are
        # constant: their rows of G are centring residue, not directions.
        varying = (gram.diagonal() > constant_floor).to(gram.dtype)
        gram = gram * torch.outer(varying, varying)
    D_all, U_all = sorted_eigh(gram)
    largest = float(D_all[0]) if len(D_all) else 0.0
    return gram, D_all, U_all, rounding_tolerance(largest, gram.shape[0], n_rows, gram.dtype)


def interaction_basis(
    gram,
    jacobian_gram,
    *,
    threshold="auto",
    n_components=None,
    n_terms=(1, 1),
    exponents=(0, 0),
    constant_floor=None,
):
    """Interaction basis from the Gram matrix ``G`` and Jacobian second moment ``M'``.

    Implements steps 2-7 of SPEC section 1: ``G = U D U^T`` truncated at
    ``D > tau_D``; ``M = D^1/2 U^T M' U D^1/2 = V Lambda V^T`` truncated at
    ``Lambda >= tau_Lambda`` and to ``n_components``;
    ``C = U D^-1/2 V Lambda^1/2`` and ``C_pinv = Lambda^-1/2 V^T D^1/2 U^T``.
    ``threshold="auto"`` uses the tolerances of the module docstring.

    Parameters
    ----------
    gram : torch.Tensor of shape (d, d)
        ``G / 4**exponents[0]``.
    jacobian_gram : torch.Tensor of shape (d, d) or None
        ``M' / 4**exponents[1]``; None for the identity downstream map.
    threshold : "auto" or float
        A float is SPEC's absolute threshold on ``D`` and ``Lambda`` (in the
        units of the data).
    n_components : int, float in (0, 1) or None
        Upper bound on the number of directions (the caller warns when it
        exceeds what survives), or the share of the summed interaction
        strengths of the surviving directions to keep (:func:`kept_count`).
    n_terms : (int, int)
        Number of outer products accumulated into ``gram`` and ``jacobian_gram``
        (rows of X; rows of X times outputs), for the "auto" tolerance.
    exponents : (int, int)
        Powers of four that ``gram`` and ``jacobian_gram`` were divided by.
    constant_floor : torch.Tensor of shape (d,) or None
        Gram diagonal entries at or below this are constant features (see
        :func:`constant_feature_floor`); None means only exact zeros are.

    Returns
    -------
    BasisResult

    Raises
    ------
    ValueError
        If no direction survives truncation, saying whether the activations are
        constant, the Jacobians vanish where they vary, or the precision ran out.
    """
    auto = threshold == "auto"
    d = gram.shape[0]
    gram_exponent, jacobian_exponent = exponents
    gram, D_all, U_all, tau_D = gram_spectrum(gram, n_terms[0], constant_floor)
    if not auto:
        tau_D = scale_by_power_of_two(float(threshold), -2 * gram_exponent)
    m = int((D_all > tau_D).sum())
    D, U = D_all[:m], U_all[:, :m]
    sqrt_D = D.sqrt()
    if jacobian_gram is None:
        jacobian_gram = torch.eye(d, dtype=gram.dtype, device=gram.device)
    K = U * sqrt_D
    Lambda, V = sorted_eigh(K.T @ jacobian_gram @ K)
    if auto:
        # M carries M''s absolute rounding errors times D (module docstring).
        scale = float(D[0] * torch.linalg.matrix_norm(jacobian_gram)) if m else 0.0
        tau = rounding_tolerance(max(scale, float(Lambda[0]) if m else 0.0), m, n_terms[1],
                                 gram.dtype)
    else:
        tau = scale_by_power_of_two(float(threshold), -2 * (gram_exponent + jacobian_exponent))
    # SPEC: the second truncation keeps Lambda >= tau (the first keeps D > tau);
    # "auto" and a zero threshold must still drop exact zeros.
    keep = Lambda > tau if auto or tau == 0 else Lambda >= tau
    n_available = int(keep.sum())
    if n_available == 0:
        raise ValueError(
            _nothing_survives(threshold, gram, jacobian_gram, D_all, m, Lambda, exponents)
        )
    r = kept_count(Lambda[:n_available], n_components)
    Lambda, V = Lambda[:r], V[:, :r]
    sqrt_Lambda = Lambda.sqrt()
    # C = U D^-1/2 V Lambda^1/2 and its left inverse, each as one product. With the
    # statistics of X / 2**e_G and J / 2**e_M the basis is C / 2**e_M (X's scale
    # cancels), so one exact power of two restores the data's units.
    C = scale_by_power_of_two((U / sqrt_D) @ (V * sqrt_Lambda), jacobian_exponent)
    C_pinv = scale_by_power_of_two((V / sqrt_Lambda).T @ K.T, -jacobian_exponent)
    if not bool(torch.isfinite(C).all() and torch.isfinite(C_pinv).all()):
        raise ValueError(
            "The basis overflows the float range: the Jacobians are too large or too "
            "small for their components to be represented. Rescale the Jacobians."
        )
    strengths = scale_by_power_of_two(Lambda, 2 * (gram_exponent + jacobian_exponent))
    if not bool(torch.isfinite(strengths).all() and (strengths > 0).all()):
        warnings.warn(
            "The basis is exact, but the interaction strengths (and gram_, "
            "gram_eigenvalues_) of data this large or small lie beyond the float "
            "range and are reported as inf or 0; rescale the data to read them.",
            RuntimeWarning,
            stacklevel=4,
        )
    signs = flip_signs(C)
    return BasisResult(
        components=C * signs,
        inverse_components=C_pinv * signs[:, None],
        interaction_strengths=strengths,
        gram_eigenvalues=scale_by_power_of_two(D_all, 2 * gram_exponent),
        n_kept_gram=m,
        n_available=n_available,
    )


def kept_count(strengths, n_components):
    """How many of the descending ``strengths`` ``n_components`` keeps.

    None keeps all, an int at most that many, and a share ``0 < f < 1`` the
    fewest leading ones whose sum is at least ``f`` times the total.
    """
    n = len(strengths)
    if n_components is None:
        return n
    if isinstance(n_components, Integral):
        return min(int(n_components), n)
    share = torch.cumsum(strengths, 0) / strengths.sum()
    return min(n, int((share < n_components).sum()) + 1)


def _nothing_survives(threshold, gram, jacobian_gram, D_all, m, Lambda, exponents):
    """The message when no direction survives: which of three causes it is."""
    head = "No direction survives truncation: "
    if threshold != "auto":
        if m == 0:
            return head + (
                f"every Gram eigenvalue is at or below truncation_threshold={threshold:g}; "
                "the activations are constant or the threshold is too large for their "
                "scale. Lower truncation_threshold or use 'auto'."
            )
        largest = scale_by_power_of_two(float(Lambda[0]), 2 * sum(exponents))
        return head + (
            f"every interaction strength is below truncation_threshold={threshold:g} "
            f"(the largest is {largest:.3g}); the Jacobians are (nearly) zero on the "
            f"{m} directions in which the activations vary, or the threshold is too "
            "large for their scale. Lower truncation_threshold or use 'auto'."
        )
    if m == 0:
        return head + (
            "the activations are constant: no feature varies by more than the "
            "rounding of its mean."
        )
    # Each G_ii M'_ii is zero exactly when feature i is constant or its Jacobian
    # column is zero; if all are, G M' = 0 (Cauchy-Schwarz) and nothing can survive.
    if float((gram.diagonal() * jacobian_gram.diagonal()).max()) == 0.0:
        return head + (
            f"the Jacobians are zero on the {m} directions in which the activations "
            "vary (every feature that varies has a zero Jacobian column)."
        )
    eps = torch.finfo(gram.dtype).eps
    smallest = float(D_all[-1])
    cond = float(D_all[0]) / smallest if smallest > 0 else math.inf
    precision = f"{str(gram.dtype).removeprefix('torch.')} (eps = {eps:.1e})"
    # Rounding errors of relative size eps reach Lambda amplified by about cond:
    # once that leaves fewer than half of the digits, precision is the cause
    # (unless the activations are exactly linearly dependent, which rounding
    # cannot tell from nearly so; the message says both).
    if cond * eps >= math.sqrt(eps):
        return head + (
            f"the precision of {precision} ran out. The activations are not constant, "
            f"but their coordinates are ill-conditioned (condition number {cond:.1e} "
            "of their Gram matrix), which amplifies rounding errors of relative size "
            "eps by about that factor, above every interaction strength (unless the "
            "activations are linearly dependent and the Jacobians vanish on the "
            "directions in which they vary). Fit with dtype='float64', or decorrelate "
            "or rescale the features (e.g. whiten them with PCA) before fitting."
        )
    return head + (
        f"the Jacobians vanish, to the rounding of {precision}, on the {m} directions "
        "in which the activations vary. The activations are well-conditioned there "
        f"(condition number {cond:.1e}), so precision is not the cause."
    )
