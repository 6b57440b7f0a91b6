"""Square roots of statistics: exact power-of-two scaling, TSQR merges, whitening frames.

The numerical building blocks of :mod:`sklearn_lib.basis._stats` (which
accumulates them) and :mod:`sklearn_lib.basis._linalg` (which reads them):

* :func:`scale_by_power_of_two` and the normalisation of matrices by powers of
  two, which are exact and keep data of any finite magnitude in range;
* :func:`merge_factors`, one TSQR step: the R factor of stacked R factors and
  Chan's mean-correction rows is that of the union of the parts;
* :func:`sorted_svd` and :func:`equilibrate`, which resolve an R factor's
  singular values to ``eps`` of the largest, column by column;
* :class:`Frame`, the coordinates ``Y = J F`` that whiten Jacobians before they
  are squared, and the change of a Gram matrix (with its rounding bound) from
  one frame to another.
"""

import math

import torch

from ..utils._threads import lapack_threads


def frame_condition(dtype):
    """The equilibrated condition number above which Jacobians are squared in a frame.

    ``eps**(-1/8)`` (90 in float64, 7.4 in float32): below it the Gram route
    loses at most ``eps * cond**2 = eps**(3/4)`` of the largest strength
    (2e-12 in float64, 7e-6 in float32), and the frame's extra GEMM, which
    costs as much as the Gram matrix itself (a fit takes 2.1 times as long,
    measured), is saved.
    """
    return torch.finfo(dtype).eps ** -0.125


# Centring leaves each value of a constant feature off by a few ulps of its mean.
_CENTRING_ULPS = 8


def scale_by_power_of_two(t, k):
    """``t * 2**k``, exactly, for any integer ``k``.

    The factor is applied in steps that the dtype represents (a float32 tensor
    turns ``2.0**200`` into infinity); the steps all go one way, so no
    intermediate result is smaller or larger than both the input and the output.
    """
    k = int(k)
    limit = 1000 if not torch.is_tensor(t) or torch.finfo(t.dtype).bits == 64 else 100
    while abs(k) > limit:
        step = limit if k > 0 else -limit
        t = t * 2.0**step
        k -= step
    return t * 2.0**k


def _exponent(value):
    """The integer ``e`` with ``value = m * 2**e``, ``0.5 <= m < 1`` (0 for 0)."""
    return math.frexp(float(value))[1]


def _largest(t):
    return float(t.abs().max()) if t.numel() else 0.0


def _normalised(P, exponent):
    """``(P', e)`` with ``P' * 4**e == P * 4**exponent`` and P's largest diagonal near 1.

    ``P`` is a scatter (PSD), so its largest diagonal entry bounds every entry.
    """
    top = float(P.diagonal().max()) if P.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return P, exponent
    k = _exponent(top) // 2
    return scale_by_power_of_two(P, -2 * k), exponent + k


def _gram_block(dtype):
    """Rows per block of a Gram matrix (:func:`_gram`).

    Blocks are squared separately and summed, so that rounding grows with the
    number of blocks, not of rows. Measured on one thread: float32, 16000 x 8
    rows, 3e-6 relative error in one product and 3e-7 in blocks of 1024 rows
    (65536 x 256 rows: 1e-6 and 1.4e-7, for 3.5% more time); float64 takes
    blocks of 4096 rows, which cost 1% over one product (blocks of 1024: 10%).
    """
    return 4096 if torch.finfo(dtype).bits >= 64 else 1024


def _gram(rows, F=None):
    """``Y^T Y`` for ``Y = rows @ F`` (``rows`` without ``F``), summed over blocks of rows.

    Blocks of :func:`_gram_block` rows are squared separately (see there); with a
    frame each block is transformed on its own, so that ``Y`` is never held
    whole (a fit in a frame needs no more memory than one without).
    """
    n, d = rows.shape
    size = _gram_block(rows.dtype)
    if F is None:
        blocks = n // size
        if blocks < 2:
            return rows.T @ rows
        head = rows[: blocks * size].reshape(blocks, size, d)
        P = torch.bmm(head.transpose(1, 2), head).sum(0)
        tail = rows[blocks * size:]
        return P if tail.shape[0] == 0 else P + tail.T @ tail
    P = rows.new_zeros(d, d)
    for start in range(0, n, size):
        Y = rows[start:start + size] @ F
        # Squared on its own, then added: addmm_ would accumulate every row into
        # P inside the GEMM, and the blocks would round like one long sum.
        P += Y.T @ Y
    return P


def _scaled_scatter(rows, F=None):
    """``(P, e)`` with ``Y^T Y == P * 4**e`` for ``Y = rows @ F``, safe from over- and underflow.

    The product is formed directly when its diagonal is a normal float; rows
    whose squares overflow or underflow (or whose product with ``F`` does) are
    first divided by the power of two nearest their largest magnitude and
    squared again. The caller has checked ``rows`` for NaN and infinity, or
    does it here through the diagonal: ``None`` is returned when ``rows`` is not
    finite.
    """
    P = _gram(rows, F)
    top = float(P.diagonal().max()) if P.numel() else 0.0
    if math.isfinite(top) and (top >= 2.0**-900 or top == 0.0 and not bool(rows.any())):
        return _normalised(P, 0)
    largest = _largest(rows)
    if not math.isfinite(largest):
        return None
    e = _exponent(largest)
    rows = scale_by_power_of_two(rows, -e)
    return _normalised(_gram(rows, F), e)


def output_weights(n_outputs, *, device=None, dtype=torch.float64):
    """The fixed output weightings ``U`` (o, 2) of the orientation rule: ones and ``(-1)^i``.

    ``J_x^T U`` sums the rows of a Jacobian (and alternates their signs); the
    outputs are the downstream quantity's own coordinates, which a
    reparameterisation of the layer does not touch.
    """
    U = torch.ones(n_outputs, 2, device=device, dtype=dtype)
    U[1::2, 1] = -1.0
    return U


def constant_feature_floor(mean, exponent):
    """Per-feature variance, in the units of the scaled Gram, that centring can fake.

    A feature whose Gram diagonal is at or below ``(8 eps |mean_i|)**2`` varies
    by no more than the rounding of its mean: it is constant. ``exponent`` is the
    power of four the Gram matrix was divided by (see ``scaled_moments``).
    """
    eps = torch.finfo(mean.dtype).eps
    return scale_by_power_of_two(_CENTRING_ULPS * eps * mean.abs(), -exponent).square()


def _qr_r(rows, d):
    """The (d, d) R factor of ``rows`` (zero rows are added below when there are fewer)."""
    if rows.shape[0] < d:
        rows = torch.cat([rows, rows.new_zeros(d - rows.shape[0], d)])
    with lapack_threads(rows):
        return torch.linalg.qr(rows, mode="r")[1]


def merge_factors(parts, *, center, n_features, device, dtype):
    """Merge square-root scatters: the TSQR step shared by chunks, merges and ranks.

    Parameters
    ----------
    parts : list of (rows, exponent, mean, weight)
        ``rows * 2**exponent`` (k_i, d) is a square root of the part's scatter
        about its mean (``rows^T rows * 4**exponent = sum w (x - mean)(x - mean)^T``);
        ``mean`` is in the data's units.

    Returns
    -------
    (R, exponent, mean, weight)
        ``R`` (d, d) upper triangular with its largest entry near 1, such that
        ``R^T R * 4**exponent`` is the scatter of the union about ``mean``, the
        weighted mean of the parts. Parts of zero weight are left out.
    """
    parts = [p for p in parts if p[3] > 0]
    d = n_features
    if not parts:
        return None
    weight = sum(p[3] for p in parts)
    blocks = [(rows, e) for rows, e, _, _ in parts]
    mean = torch.zeros(d, device=device, dtype=dtype)
    if center:
        # Means are combined scaled by the power of two of the largest, so that
        # neither they nor their differences overflow; each part's deviation
        # from the union's mean adds a row sqrt(w_i) (m_i - m) to the square
        # root (the multi-way form of Chan's update; the cross terms vanish).
        e_mean = _exponent(max(_largest(p[2]) for p in parts))
        scaled = [scale_by_power_of_two(p[2].to(device), -e_mean) for p in parts]
        m = sum(s * (p[3] / weight) for s, p in zip(scaled, parts))
        mean = scale_by_power_of_two(m, e_mean)
        if len(parts) > 1:
            corrections = torch.stack([math.sqrt(p[3]) * (s - m) for s, p in zip(scaled, parts)])
            blocks.append((corrections, e_mean))
    nonzero = [(rows, e) for rows, e in blocks if rows.numel() and bool(rows.any())]
    if not nonzero:
        return torch.zeros(d, d, device=device, dtype=dtype), 0, mean, weight
    top = max(e for _, e in nonzero)
    stack = torch.cat([scale_by_power_of_two(rows.to(device), e - top) for rows, e in nonzero])
    R = _qr_r(stack, d)
    k = _exponent(_largest(R))
    return scale_by_power_of_two(R, -k), top + k, mean, weight


def sorted_svd(A):
    """Singular values of ``A`` descending and the right singular vectors (columns of V).

    Singular values are accurate to ``eps`` times the largest, whatever the
    condition number: this is what replaces an eigendecomposition of ``A^T A``,
    which would square it. Small CPU matrices run on one thread.
    """
    with lapack_threads(A):
        _, S, Vh = torch.linalg.svd(A)
    return S, Vh.T


def equilibrate(R):
    """``(c, R / c)``: the columns of ``R`` divided by the powers of two ``c`` nearest their norms.

    Whitening does not depend on the scale of the features, but a singular value
    decomposition resolves directions relative to the largest: dividing each
    column by (a power of two of) its norm, which is exact, lets features whose
    scales differ by many orders of magnitude be resolved as well as equal ones
    (Householder QR is accurate column by column). Zero columns keep ``c = 1``.
    """
    norms = torch.linalg.vector_norm(R, dim=0)
    exponents = torch.frexp(norms)[1].to(R.dtype)
    c = torch.where(norms > 0, torch.exp2(exponents), torch.ones_like(norms))
    return c, R / c


class Frame:
    """Coordinates in which Jacobian rows are squared: ``Y = J F``, ``F = diag(c) V diag(s)``.

    ``c`` are powers of two (the equilibration of the activations' columns), ``V``
    orthogonal and ``s`` positive, so ``F^-1 = diag(1/s) V^T diag(1/c)`` needs no
    solve. Frames are immutable and shared between copies of statistics.
    """

    def __init__(self, column_scale, rotation, stretch):
        self.column_scale, self.rotation, self.stretch = column_scale, rotation, stretch

    @classmethod
    def from_factor(cls, R, floor):
        """The whitening frame of the R factor ``R`` (columns of constant features zeroed).

        Returns None (no frame) when the equilibrated R is well-conditioned on its
        resolved directions. Directions at or below ``floor`` (relative to the
        largest singular value) are not resolved: they keep unit scale, so that
        data arriving later in them is squared as without a frame, never worse.
        """
        scale, R_eq = equilibrate(R)
        S, V = sorted_svd(R_eq)
        top = float(S[0]) if len(S) else 0.0
        if top == 0.0:
            return None
        resolved = S > floor * top
        if float(S[resolved][-1]) * frame_condition(R.dtype) >= top:
            return None
        stretch = torch.where(resolved, S / top, torch.ones_like(S))
        return cls(scale, V, stretch)

    def matrix(self):
        return self.column_scale[:, None] * self.rotation * self.stretch

    def inverse(self):
        return (self.rotation.T / self.column_scale) / self.stretch[:, None]

    def to(self, device):
        return Frame(*(t.to(device) for t in (self.column_scale, self.rotation, self.stretch)))


def _frame_change(old, new, like):
    """``T`` with ``Y_new = Y_old T`` (``F_old^-1 F_new``; None means no frame)."""
    d = like.shape[0]
    eye = torch.eye(d, device=like.device, dtype=like.dtype)
    inverse = eye if old is None else old.inverse().to(like.device)
    forward = eye if new is None else new.matrix().to(like.device)
    return inverse @ forward


def whitening_frame(factor, factor_exponent, mean, weight, n_samples):
    """The frame (or None) that whitens activations with R factor ``factor * 2**factor_exponent``.

    Constant features (see :func:`constant_feature_floor`) are left out, and
    singular values below the first truncation's rounding floor are not resolved.
    """
    if weight <= 0:
        return None
    R = factor * varying_features(factor, factor_exponent, mean, weight)[None, :]
    d = factor.shape[0]
    floor = torch.finfo(factor.dtype).eps * max(d, math.sqrt(max(n_samples, 1)))
    return Frame.from_factor(R, floor)


def varying_features(factor, factor_exponent, mean, weight):
    """1 for features that vary by more than the rounding of their mean, else 0."""
    floor = constant_feature_floor(mean, factor_exponent) * weight
    return (factor.square().sum(0) > floor).to(factor.dtype)


def _change_frame(gram, exponent, bound, T):
    """A Jacobian Gram matrix ``gram * 4**exponent`` of ``Y`` as that of ``Y T``, with its bound.

    ``bound`` holds squared column scales ``b_i^2`` (same units as ``gram``) with
    ``|rounding_ij| <= c eps b_i b_j``; after the change they are ``(|T|^T b)^2``.
    """
    new_gram, new_exponent = _normalised(T.T @ gram @ T, exponent)
    b = T.abs().T @ bound.sqrt()
    return new_gram, new_exponent, scale_by_power_of_two(b, exponent - new_exponent).square()


def _add_scaled(a, ea, b, eb):
    """``(c, ec)`` with ``c 2**ec = a 2**ea + b 2**eb``, at the larger exponent (exact shifts)."""
    top = max(ea, eb)
    return scale_by_power_of_two(a, ea - top) + scale_by_power_of_two(b, eb - top), top
