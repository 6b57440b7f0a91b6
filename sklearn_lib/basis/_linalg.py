"""The basis math of SPEC section 1, from square-root statistics, without squaring.

:func:`interaction_basis` is the single place where an interaction basis is
computed from statistics; :class:`~sklearn_lib.InteractionBasis`, its
``partial_fit`` and :class:`~sklearn_lib.InteractionGraph` all call it.

Conditioning
------------
The interaction strengths ``Lambda`` (eigenvalues of ``G M'``) do not change
under a reparameterisation ``X @ A``; rounding does. The Gram route of SPEC's
text (``eigh`` of ``G = X^T X / n``, then ``M'`` rotated into its eigenbasis)
loses ``eps cond(A)^2`` relative to the largest strength twice over: in ``G``
and in ``M'``, whose entries are large exactly where ``G``'s are small. Here

* the activations enter as the R factor of a QR of the centred rows
  (:mod:`sklearn_lib.basis._stats`); whitening reads the singular values and
  right singular vectors of ``R`` (with its columns equilibrated by exact
  powers of two), which resolve singular values down to ``eps`` times the
  largest: ``G``'s eigenvalues down to ``eps^2``, not ``eps``;
* the Jacobians enter as ``Y^T Y`` for ``Y = J F`` in a frame ``F`` that whitens
  them, so that ``M = B^T (Y^T Y) B / w^2`` with ``B = F^-1 E V S`` close to a
  rotation: its rounding is ``eps`` relative to the largest strength.

Measured (``benchmarks/bench_conditioning.py``: d = 8, n = 2000, worst of three
seeds, ``A = Q1 diag(s) Q2`` with ``s`` log-spaced in [1, cond(A)]), the largest
error of Lambda relative to the largest strength, against exact values from the
untransformed problem, is 2e-15, 1e-13, 7e-13, 8e-11, 6e-10 and 4e-9 at cond(A)
1, 1e2, 1e4, 1e6, 1e7 and 1e8 in float64 (the naive reference of issue 20 in
the same precision: 2e-15, 2e-13, 1e-9, 1e-5, 1e-3, 0.1), and 5e-7, 2e-6,
5e-6, 2e-5 and 2e-4 at cond(A) 1 to 1e4 in float32 (naive: 5e-6, 1e-6, 3e-5,
3e-3, 0.09). All 8 directions are resolved to 1% throughout, where the naive
reference keeps 1 at 1e8 (float64) and none at 1e4 (float32). That is about
``eps cond(A)``, the rounding of the reparameterised data themselves; a
rank-k map keeps k directions up to cond(A) 1e14 in float64 and 1e5 in float32.
Where the Gram route is cheaper and as good (equilibrated condition number below
``eps**(-1/8)``, :func:`~sklearn_lib.basis._stats.frame_condition`), the
Jacobians are squared without a frame, and the error is at most 1.5 times the
naive reference's (cond(A) 10 above).

How "auto" truncation tells directions from rounding noise
-----------------------------------------------------------
With ``c_x = max(d, sqrt(n))`` and ``c_M = max(m, sqrt(n o))`` (``sqrt`` is the
random-walk growth of rounding summed over that many terms):

* First truncation: singular values of the equilibrated ``R`` above
  ``eps c_x s_max`` (a QR is backward stable column by column, so anything
  below is within the rounding of the data itself).
* Second truncation: ``Lambda > max(tau_M, tau_in)``, where ``tau_M`` bounds the
  rounding of ``Y^T Y`` carried into ``M`` (``|err_ij| <= c_M eps b_i b_j``, ``b``
  the column scales of ``Y``; bounded by ``c_M eps || |B|^T b ||^2 / w^2``) and
  ``tau_in = (eps c_x)^2 |G| |M'|_F`` in equilibrated coordinates is the
  rounding of the activations and Jacobians as given (``eps`` relative per
  entry, amplified by their conditioning).

Rounding that a perfectly whitened computation would also make,
``Lambda_0 = eps c_M trace(M)``, is the floor of the precision itself:
directions below it are exact zeros to the working precision (a Jacobian map of
rank k, a duplicated feature) and are dropped silently. A direction dropped
above it was lost to the conditioning of the coordinates, not to the
precision, and a ``UserWarning`` says how many and why when its strength is
above ``sqrt(eps)`` times the largest (weaker ones carry less than half the
digits of the precision); so does a direction the first truncation dropped
although the Jacobians are large enough there to give it such a strength.
When nothing survives, the error names the cause: constant activations,
Jacobians that vanish where the activations vary, or a precision that cannot
resolve these coordinates (naming the dtype and the condition number).

Orientation
-----------
Each direction's sign is chosen so that ``C_pinv sum_x w_x J_x^T u`` is positive
for ``u`` the sum of the outputs (or, where that is within its rounding of zero,
their alternating sum): ``J C_pinv^T`` does not change under ``X @ A``, so
``transform`` gives equal values, not only equal up to signs. Without
Jacobians (PCA) and for closed-form scatters, which carry no such sums, and
where both sums vanish, sklearn's ``svd_flip`` rule is used.
"""

import math
import warnings
from dataclasses import dataclass
from numbers import Integral

import torch

from ..utils._threads import lapack_threads
from ._factors import (
    constant_feature_floor,
    equilibrate,
    scale_by_power_of_two,
    sorted_svd,
)

__all__ = [
    "BasisResult",
    "constant_feature_floor",
    "equilibrate",
    "flip_signs",
    "gram_eigenvalues",
    "gram_spectrum",
    "interaction_basis",
    "kept_count",
    "orientation_signs",
    "rounding_tolerance",
    "sorted_eigh",
    "sorted_svd",
]


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


def orientation_signs(C, C_pinv, jacobian_sums, noise=None):
    """Signs of the basis directions that do not change under reparameterisation.

    Parameters
    ----------
    C, C_pinv : torch.Tensor of shape (d, r) and (r, d)
    jacobian_sums : torch.Tensor of shape (d, 2) or None
        ``sum_x w_x J_x^T U`` (any positive multiple) with ``U`` from
        :func:`~sklearn_lib.basis._stats.output_weights`; None falls back to
        :func:`flip_signs` for every direction.
    noise : torch.Tensor of shape (r, 2) or None
        Rounding bound of ``C_pinv @ jacobian_sums``: a projection within it
        does not decide (None: only exact zeros do not).

    Returns
    -------
    signs : torch.Tensor of shape (r,)
        The first of the two projections that is clear of its rounding decides;
        where neither is, ``svd_flip``'s rule on ``C``.
    """
    signs = flip_signs(C)
    if jacobian_sums is None:
        return signs
    projections = C_pinv @ jacobian_sums
    clear = projections.abs() > (0.0 if noise is None else noise)
    for k in (1, 0):  # the first clear projection wins: apply the second first
        signs = torch.where(clear[:, k], torch.sign(projections[:, k]), signs)
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


def rounding_tolerance(largest, size, n_terms, dtype):
    """``eps * max(size, sqrt(n_terms)) * largest``: the "auto" floor of rounding noise.

    ``largest`` is the scale of the matrix's errors (e.g. its largest
    eigenvalue), ``size`` its order and ``n_terms`` the number of outer products
    summed into it (module docstring).
    """
    return float(largest) * max(size, n_terms**0.5) * torch.finfo(dtype).eps if size else 0.0


def gram_spectrum(gram, n_rows, constant_floor=None):
    """``(G, D, U, tau_D)``: the Gram matrix with constant features zeroed, its sorted
    eigendecomposition and the Gram route's tolerance of its numerical rank (``D > tau_D``).

    :class:`~sklearn_lib.degeneracy.DegeneracyReport` counts activation ranks of
    loaded bases (which keep only ``gram_``) with it; the basis itself resolves
    more, from the R factor (:func:`interaction_basis`).
    """
    if constant_floor is not None:
        # Features that vary by no more than the rounding of their mean are
        # constant: their rows of G are centring residue, not directions.
        varying = (gram.diagonal() > constant_floor).to(gram.dtype)
        gram = gram * torch.outer(varying, varying)
    D_all, U_all = sorted_eigh(gram)
    largest = float(D_all[0]) if len(D_all) else 0.0
    return gram, D_all, U_all, rounding_tolerance(largest, gram.shape[0], n_rows, gram.dtype)


def gram_eigenvalues(factors):
    """All d eigenvalues of the centred Gram matrix, descending, in the data's units.

    They are the squared singular values of the R factor over the weight, so
    they are accurate to ``eps^2`` (not ``eps``) of the largest. Constant
    features count as zero.
    """
    R = factors.factor * factors.varying[None, :]
    with lapack_threads(R):
        S = torch.linalg.svdvals(R)
    return scale_by_power_of_two(S.square() / factors.weight, 2 * factors.factor_exponent)


def _norm_bound(A):
    """An upper bound of the spectral norm of ``A`` without a decomposition (Frobenius)."""
    return float(torch.linalg.matrix_norm(A)) if A.numel() else 0.0


def interaction_basis(factors, *, threshold="auto", n_components=None, name=None):
    """Interaction basis from square-root statistics (:meth:`InteractionStatistics.factors`).

    Implements steps 2-7 of SPEC section 1 without forming ``G``: whitening from
    the SVD of the (equilibrated) R factor, ``M = B^T (Y^T Y) B / w^2`` in the
    Jacobians' frame, ``M = V Lambda V^T`` truncated and cut to ``n_components``,
    ``C = U D^-1/2 V Lambda^1/2`` and ``C_pinv = Lambda^-1/2 V^T D^1/2 U^T``,
    oriented by :func:`orientation_signs`. ``threshold="auto"`` uses the
    tolerances of the module docstring.

    Parameters
    ----------
    factors : Factors
        From :meth:`~sklearn_lib.basis._stats.InteractionStatistics.factors`.
    threshold : "auto" or float
        A float is SPEC's absolute threshold on ``D`` and ``Lambda`` (in the
        units of the data).
    n_components : int, float in (0, 1) or None
        Upper bound on the number of directions (the caller warns when it
        exceeds what survives), or the share of the summed interaction
        strengths of the surviving directions to keep (:func:`kept_count`).
    name : str or None
        What a warning calls the data (e.g. ``"layer 'fc1'"``).

    Returns
    -------
    BasisResult

    Warns
    -----
    UserWarning
        When "auto" drops a direction that the precision would resolve in
        well-conditioned coordinates (module docstring).

    Raises
    ------
    ValueError
        If no direction survives truncation, saying whether the activations are
        constant, the Jacobians vanish where they vary, or the precision ran out.
    """
    f = factors
    auto = threshold == "auto"
    R = f.factor * f.varying[None, :]
    d, w, n = R.shape[0], f.weight, f.n_samples
    dtype, eps = R.dtype, torch.finfo(R.dtype).eps
    e_R = f.factor_exponent
    c_x = max(d, math.sqrt(n))
    all_D = gram_eigenvalues(f)
    pca = f.jacobian_gram is None
    # A float threshold is on the eigenvalues of G itself; "auto" is scale-free
    # and resolves more on equilibrated columns (see equilibrate).
    if auto and not pca:
        scale, R_eq = equilibrate(R)
    else:
        scale, R_eq = torch.ones(d, device=R.device, dtype=dtype), R
    S, V = sorted_svd(R_eq)
    if auto:
        tau_S = eps * c_x * float(S[0])
    else:
        # D = S^2 / w * 4**e_R > threshold.
        tau_S = scale_by_power_of_two(math.sqrt(float(threshold) * w), -e_R)
    m = int((S > tau_S).sum())
    S_m, V_m = S[:m], V[:, :m]
    context = _Context(name, dtype, S, m, tau_S, w)
    if pca:
        Lambda = S_m.square() / w
        W = torch.eye(m, device=R.device, dtype=dtype)
        e_M = 0
        tau = 0.0 if auto else scale_by_power_of_two(float(threshold), -2 * e_R)
        keep = Lambda > tau if auto or tau == 0 else Lambda >= tau
        trace_bound = None
    else:
        e_M = f.jacobian_exponent
        N = f.jacobian_gram
        Finv = _frame_inverse(f.frame, N)
        E = Finv * scale  # F^-1 diag(c): equilibrated coordinates -> frame
        B = E @ (V_m * S_m)
        Lambda, W = sorted_eigh(B.T @ N @ B / (w * w))
        if auto:
            tau, floor, hidden = _tolerances(f, N, E, B, V, S, m, tau_S, c_x, Lambda)
            keep = Lambda > tau
            context.update(tau=tau, floor=floor, hidden=hidden)
        else:
            tau = scale_by_power_of_two(float(threshold), -2 * (e_R + e_M))
            keep = Lambda > tau if tau == 0 else Lambda >= tau
        trace_bound = (N, Finv)
    n_available = int(keep.sum())
    if n_available == 0:
        raise ValueError(_nothing_survives(threshold, f, context, Lambda, e_R + e_M))
    r = kept_count(Lambda[:n_available], n_components)
    if auto and not pca:
        _warn_precision(context, Lambda, n_available, r)
    Lambda_r, W_r = Lambda[:r], W[:, :r]
    sqrt_Lambda = Lambda_r.sqrt()
    # C = U D^-1/2 V Lambda^1/2 (U = V_m, D^1/2 = S_m / sqrt(w)) in equilibrated
    # coordinates, then back through the exact column scales. With the
    # statistics of X / 2**e_R and J / 2**e_M the basis is C / 2**e_M (X's scale
    # cancels), so one exact power of two restores the data's units.
    sqrt_w = math.sqrt(w)
    C = (V_m * (sqrt_w / S_m)) @ (W_r * sqrt_Lambda) / scale[:, None]
    C_pinv = ((W_r / sqrt_Lambda).T @ (V_m * (S_m / sqrt_w)).T) * scale
    if m < d and bool((scale != scale[0]).any()):
        # Equilibration moved C's columns off the span of the activations (the
        # range of G, where SPEC's C = U D^-1/2 ... lies) by a null-space part that
        # no training row sees; project it away. C_pinv's rows lie in that span.
        span = _qr_q(V_m * scale[:, None])
        C = span @ (span.T @ C)
    C = scale_by_power_of_two(C, e_M)
    C_pinv = scale_by_power_of_two(C_pinv, -e_M)
    if not bool(torch.isfinite(C).all() and torch.isfinite(C_pinv).all()):
        raise ValueError(
            "The basis overflows the float range: the Jacobians are too large or too "
            "small for their components to be represented. Rescale the Jacobians."
        )
    strengths = scale_by_power_of_two(Lambda_r, 2 * (e_R + e_M))
    if not bool(torch.isfinite(strengths).all() and (strengths > 0).all()):
        warnings.warn(
            "The basis is exact, but the interaction strengths (and gram_, "
            "gram_eigenvalues_) of data this large or small lie beyond the float "
            "range and are reported as inf or 0; rescale the data to read them.",
            RuntimeWarning,
            stacklevel=4,
        )
    sums, noise = None, None
    if trace_bound is not None and f.signed_sums is not None:
        sums, noise = _orientation_inputs(f, C_pinv, *trace_bound, c_x)
    signs = orientation_signs(C, C_pinv, sums, noise)
    return BasisResult(
        components=C * signs,
        inverse_components=C_pinv * signs[:, None],
        interaction_strengths=strengths,
        gram_eigenvalues=all_D,
        n_kept_gram=m,
        n_available=n_available,
    )


def _qr_q(A):
    """An orthonormal basis of the columns of ``A`` (reduced QR)."""
    with lapack_threads(A):
        return torch.linalg.qr(A)[0]


def _frame_inverse(frame, like):
    if frame is None:
        return torch.eye(like.shape[0], device=like.device, dtype=like.dtype)
    return frame.inverse().to(like.device)


class _Context:
    """What the messages about truncation need to know (units: those of M, scaled)."""

    def __init__(self, name, dtype, S, m, tau_S, weight):
        self.name, self.dtype, self.S, self.m, self.tau_S = name, dtype, S, m, tau_S
        self.weight = weight
        self.tau = self.floor = self.hidden = 0.0

    def update(self, **values):
        self.__dict__.update(values)

    @property
    def condition(self):
        """Condition number of the equilibrated activations on their resolved directions."""
        if self.m == 0:
            return math.inf
        return float(self.S[0]) / float(self.S[self.m - 1])

    @property
    def precision(self):
        eps = torch.finfo(self.dtype).eps
        return f"{str(self.dtype).removeprefix('torch.')} (eps = {eps:.1e})"


def _tolerances(f, N, E, B, V, S, m, tau_S, c_x, Lambda):
    """``(tau, floor, hidden)`` of the second truncation, in the (scaled) units of ``M``.

    ``tau`` is the rounding bound of the module docstring, ``floor`` the
    rounding of a perfectly whitened computation (``Lambda_0``) and ``hidden``
    the largest strength a direction dropped by the first truncation could
    carry.
    """
    w, d = f.weight, N.shape[0]
    eps = torch.finfo(N.dtype).eps
    c_M = max(m, math.sqrt(f.n_samples * (f.n_outputs or 1)))
    b = f.jacobian_bound.clamp(min=0).sqrt()
    columnwise = float(torch.linalg.vector_norm(B.abs().T @ b).square())
    # Frobenius norms bound spectral ones and cost no decomposition.
    normwise = float(b.square().sum()) * float(torch.linalg.matrix_norm(B)) ** 2
    tau_M = eps * c_M * min(columnwise, normwise) / (w * w)
    floor = eps * c_M * float(Lambda.sum())
    # M' in equilibrated coordinates, constant features left out: the rounding
    # of the inputs (eps per entry) reaches the whitened Jacobians amplified by
    # |G|^1/2 |M'|^1/2.
    E = E * f.varying[None, :]
    M_eq = E.T @ N @ E / w
    tau_in = (eps * c_x) ** 2 * float(S[0]) ** 2 / w * _norm_bound(M_eq)
    hidden = 0.0
    if m < d:
        null = V[:, m:] * f.varying[:, None]
        hidden = tau_S**2 / w * _norm_bound(null.T @ M_eq @ null)
    return max(tau_M, tau_in), floor, hidden


def _warn_precision(context, Lambda, n_available, r):
    """Warn when "auto" dropped what well-conditioned coordinates would have resolved.

    Only strengths above ``sqrt(eps)`` times the largest are worth a warning:
    below, a direction carries less than half the digits of the precision.
    """
    top = float(Lambda[0])
    floor = max(context.floor, math.sqrt(torch.finfo(context.dtype).eps) * top)
    lost = Lambda[n_available:]
    lost = lost[lost > floor] if r == n_available else lost[:0]
    hidden = context.hidden > floor and (
        r == n_available or context.hidden > float(Lambda[r - 1]))
    if not len(lost) and not hidden:
        return
    what = "the data" if context.name is None else context.name
    parts = []
    if len(lost):
        shares = ", ".join(f"{float(v) / top:.1e}" for v in lost[:5])
        parts.append(
            f"{len(lost)} direction(s) with interaction strengths of {shares} times the "
            f"largest, below the rounding of these coordinates ({context.tau / top:.1e} "
            "of the largest)"
        )
    if hidden:
        parts.append(
            f"{len(context.S) - context.m} direction(s) of the activations within their "
            "own rounding, in which the Jacobians are large enough to give strengths of "
            f"up to {context.hidden / top:.1e} times the largest"
        )
    fix = "Decorrelate the features (e.g. whiten them with PCA) before fitting"
    if context.dtype != torch.float64:
        fix = "Fit with dtype='float64', or decorrelate the features before fitting"
    warnings.warn(
        f"truncation_threshold='auto' dropped {' and '.join(parts)} from {what}: the "
        f"precision of {context.precision} resolves them in well-conditioned coordinates, "
        f"but these activations have condition number {context.condition:.1e} (after "
        f"scaling every feature to unit norm), which amplifies rounding beyond them. {fix}.",
        UserWarning,
        stacklevel=4,
    )


def _orientation_inputs(f, C_pinv, N, Finv, c_x):
    """``(sums, noise)`` for :func:`orientation_signs`, in the units of ``C_pinv`` (scaled)."""
    eps = torch.finfo(N.dtype).eps
    sums = f.signed_sums
    # Rounding of the sums: at most c eps sum_x |J_x^T u|, and by Cauchy-Schwarz
    # sum_x |J_x[:, k]^T u| <= sqrt(w) |u| sqrt(P_kk), P = sum_x w J_x^T J_x.
    P_diag = (N @ Finv * Finv).sum(0).clamp(min=0)
    width = float(f.n_outputs or 1)
    magnitude = scale_by_power_of_two(P_diag.sqrt() * math.sqrt(f.weight * width),
                                      f.jacobian_exponent - f.sums_exponent)
    noise = eps * c_x * (C_pinv.abs() @ (sums.abs() + magnitude[:, None]))
    return sums, noise


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


def _nothing_survives(threshold, f, context, Lambda, exponent):
    """The message when no direction survives: which of three causes it is."""
    head = "No direction survives truncation: "
    m = context.m
    if threshold != "auto":
        if m == 0:
            return head + (
                f"every Gram eigenvalue is at or below truncation_threshold={threshold:g}; "
                "the activations are constant or the threshold is too large for their "
                "scale. Lower truncation_threshold or use 'auto'."
            )
        largest = scale_by_power_of_two(float(Lambda[0]), 2 * exponent)
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
    P_diag = (f.jacobian_gram @ _frame_inverse(f.frame, f.jacobian_gram)
              * _frame_inverse(f.frame, f.jacobian_gram)).sum(0)
    if float((f.varying * (f.factor.square().sum(0) > 0) * (P_diag > 0)).max()) == 0.0:
        return head + (
            f"the Jacobians are zero on the {m} directions in which the activations "
            "vary (every feature that varies has a zero Jacobian column)."
        )
    # Strengths above what a perfectly whitened computation would resolve, lost
    # to rounding amplified by the coordinates: the precision ran out.
    if float(Lambda[0]) > context.floor or context.hidden > context.floor:
        return head + (
            f"the precision of {context.precision} ran out. The activations are not "
            "constant, but their coordinates are ill-conditioned (condition number "
            f"{context.condition:.1e} after scaling every feature to unit norm), which "
            "amplifies rounding errors of relative size eps above every interaction "
            "strength (unless the activations are linearly dependent and the Jacobians "
            "vanish on the directions in which they vary). Fit with dtype='float64', or "
            "decorrelate or rescale the features (e.g. whiten them with PCA) before "
            "fitting."
        )
    return head + (
        f"the Jacobians vanish, to the rounding of {context.precision}, on the {m} "
        "directions in which the activations vary. The activations are well-conditioned "
        f"there (condition number {context.condition:.1e}), so precision is not the cause."
    )
