"""Mergeable sufficient statistics of one layer: weight, mean, centred Gram and M'.

An interaction basis depends on the data only through four numbers per layer:
the total sample weight, the mean activation, the centred scatter matrix of the
activations and the scatter of the downstream Jacobians. :class:`InteractionStatistics`
accumulates them chunk by chunk and merges two partial results with the
pairwise update of Chan, Golub and LeVeque, so that ``a + b`` on two halves of
a data set (accumulated on different machines, say) equals the statistics of
the whole, to rounding, without ever forming uncentred second moments whose
cancellation would lose digits.

Both scatters are stored divided by a power of four, ``4**exponent``, that keeps
their largest diagonal entry near 1: activations of 1e200 (whose squares
overflow float64) or Jacobians of 1e-200 (whose squares underflow) accumulate
as accurately as data near 1. Multiplying by a power of two is exact, so the
scaling loses nothing and merges of differently scaled parts stay exact.
"""

import math

import torch

from ..utils._backend import as_tensor
from ..utils._validation import check_finite

# A chunk of Jacobians holds about this many numbers when batch_size=None
# (64 MiB in float64): large enough for GEMM to run at full speed, small enough
# that fitting never holds a copy of a whole Jacobian cache.
AUTO_CHUNK_NUMBERS = 2**23


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


def _normalised(P, exponent):
    """``(P', e)`` with ``P' * 4**e == P * 4**exponent`` and P's largest diagonal near 1.

    ``P`` is a scatter (PSD), so its largest diagonal entry bounds every entry.
    """
    top = float(P.diagonal().max()) if P.numel() else 0.0
    if top == 0.0 or not math.isfinite(top):
        return P, exponent
    k = _exponent(top) // 2
    return scale_by_power_of_two(P, -2 * k), exponent + k


def _sum_of_scaled(parts):
    """Sum ``P_i * 4**e_i`` over ``parts = [(P_i, e_i), ...]``; returns ``(P, e)`` normalised.

    Every nonzero part is brought to the largest exponent (an exact division by
    a power of four; only parts below ``2**-1000`` of the total can underflow).
    """
    # A part that is zero (a fresh accumulator) must not set the exponent: it
    # would push the others into underflow. Every part is PSD, so a zero
    # diagonal means a zero matrix.
    nonzero = [(P, e) for P, e in parts if P is not None and bool(P.diagonal().any())]
    if not nonzero:
        return parts[0]
    parts = nonzero
    top = max(e for _, e in parts)
    total = sum(scale_by_power_of_two(P, 2 * (e - top)) for P, e in parts)
    return _normalised(total, top)


def _scaled_scatter(rows):
    """``(rows^T rows, e)`` with ``rows^T rows == P * 4**e``, safe from over- and underflow.

    The product is formed directly (one GEMM) when its diagonal is a normal
    float; rows whose squares overflow or underflow are first divided by the
    power of two nearest their largest magnitude and multiplied again. The
    caller has checked ``rows`` for NaN and infinity, or does it here through
    the diagonal: ``None`` is returned when ``rows`` is not finite.
    """
    P = rows.T @ rows
    top = float(P.diagonal().max()) if P.numel() else 0.0
    if math.isfinite(top) and (top >= 2.0**-900 or top == 0.0 and not bool(rows.any())):
        return _normalised(P, 0)
    largest = float(rows.abs().max())
    if not math.isfinite(largest):
        return None
    e = _exponent(largest)
    rows = scale_by_power_of_two(rows, -e)
    return _normalised(rows.T @ rows, e)


class InteractionStatistics:
    """Running weight, mean, centred scatter and Jacobian scatter of one layer.

    Parameters
    ----------
    n_features : int
        Width ``d`` of the layer.
    n_outputs : int or None
        Number ``o`` of downstream outputs of the Jacobians, or None when the
        downstream map is the identity (no Jacobians are accumulated).
    center : bool
        Whether the mean is estimated (True) or fixed at zero (False).
    device, dtype : torch.device, torch.dtype
        Where and in which precision the statistics live.

    Attributes
    ----------
    weight : float
        Sum of sample weights (the number of samples when unweighted).
    n_samples : int
        Number of rows seen, regardless of weights.
    mean : torch.Tensor of shape (d,)
        Weighted mean (zeros when ``center=False``).
    scatter : torch.Tensor of shape (d, d)
        ``sum_x w_x (x - mean)(x - mean)^T / 4**scatter_exponent``.
    scatter_exponent : int
        Power of four the stored ``scatter`` is divided by.
    jacobian_scatter : torch.Tensor of shape (d, d) or None
        ``sum_x w_x J_x^T J_x / 4**jacobian_exponent``; None for the identity
        downstream map.
    jacobian_exponent : int
        Power of four the stored ``jacobian_scatter`` is divided by.
    """

    def __init__(self, n_features, n_outputs, *, center, device, dtype):
        self.n_features = n_features
        self.n_outputs = n_outputs
        self.center = center
        self.weight = 0.0
        self.n_samples = 0
        self.mean = torch.zeros(n_features, device=device, dtype=dtype)
        self.scatter = torch.zeros(n_features, n_features, device=device, dtype=dtype)
        self.scatter_exponent = 0
        self.jacobian_scatter = (
            None
            if n_outputs is None
            else torch.zeros(n_features, n_features, device=device, dtype=dtype)
        )
        self.jacobian_exponent = 0

    @property
    def device(self):
        return self.mean.device

    @property
    def dtype(self):
        return self.mean.dtype

    def _empty_like(self):
        return InteractionStatistics(
            self.n_features,
            self.n_outputs,
            center=self.center,
            device=self.device,
            dtype=self.dtype,
        )

    def update(self, X, jacobians=None, sample_weight=None):
        """Fold one chunk into the statistics and return ``self``.

        ``X`` is (b, d), ``jacobians`` (b, o, d) and ``sample_weight`` (b,); each
        may be an ndarray, a memmap or a tensor. Shapes are assumed validated;
        NaN or infinity raises before anything is merged. Values of any finite
        magnitude are fine: see the module docstring.
        """
        X = as_tensor(X, device=self.device, dtype=self.dtype)
        check_finite(X, "X")
        w = (
            None
            if sample_weight is None
            else as_tensor(sample_weight, device=self.device, dtype=self.dtype)
        )
        jacobian_part = None
        if self.jacobian_scatter is not None:
            J = as_tensor(jacobians, device=self.device, dtype=self.dtype)
            if w is not None:
                J = J * w.sqrt()[:, None, None]
            # One GEMM over all (sample, output) rows: the whole cost of a fit. A
            # NaN or infinity anywhere in column j of J reaches diagonal entry j of
            # J^T J; checking d numbers instead of the chunk halves the cost.
            jacobian_part = _scaled_scatter(J.reshape(-1, self.n_features))
            if jacobian_part is None:
                raise ValueError("jacobians contains NaN or infinity.")
        # Everything is validated: from here on the statistics change.
        chunk = self._empty_like()
        chunk.n_samples = X.shape[0]
        chunk.weight = float(X.shape[0]) if w is None else float(w.sum())
        if chunk.weight > 0:
            # Divided by the power of two nearest its largest entry, X can be
            # summed and squared at any magnitude; the division is exact.
            e = _exponent(X.abs().max()) if X.numel() else 0
            X = scale_by_power_of_two(X, -e)
            if self.center:
                mean = (X.sum(0) if w is None else w @ X) / chunk.weight
                X = X - mean
                chunk.mean = scale_by_power_of_two(mean, e)
            scatter, k = _scaled_scatter(X if w is None else X * w.sqrt()[:, None])
            chunk.scatter, chunk.scatter_exponent = scatter, k + e
        self.merge_(chunk)
        if jacobian_part is not None:
            self.jacobian_scatter, self.jacobian_exponent = _sum_of_scaled(
                [(self.jacobian_scatter, self.jacobian_exponent), jacobian_part]
            )
        return self

    def add_jacobian_scatter_(self, scatter, n_outputs):
        """Add a Jacobian scatter ``sum_x w_x J_x^T J_x`` computed elsewhere; return ``self``.

        For downstream maps with structure (e.g. ``J_x = diag(s_x) W^T``) the
        scatter has a closed form that is much cheaper than forming the
        per-sample Jacobians; the caller accumulates it over the *same* samples
        it passed to :meth:`update` (without ``jacobians``) and adds it here.
        Statistics created with ``n_outputs=None`` take ``n_outputs`` from this
        call; otherwise it must match.

        Parameters
        ----------
        scatter : array-like or tensor of shape (d, d)
        n_outputs : int
            Number of rows of each ``J_x`` (informational; used by merges).
        """
        scatter = as_tensor(scatter, device=self.device, dtype=self.dtype)
        d = self.n_features
        if tuple(scatter.shape) != (d, d):
            raise ValueError(
                f"the Jacobian scatter must be ({d}, {d}), got {tuple(scatter.shape)}."
            )
        check_finite(scatter, "jacobian scatter")
        if self.jacobian_scatter is None:
            self.jacobian_scatter = torch.zeros_like(scatter)
            self.jacobian_exponent = 0
            self.n_outputs = int(n_outputs)
        elif self.n_outputs != n_outputs:
            raise ValueError(
                f"these statistics hold Jacobians with {self.n_outputs} outputs, "
                f"got a scatter for {n_outputs}."
            )
        self.jacobian_scatter, self.jacobian_exponent = _sum_of_scaled(
            [(self.jacobian_scatter, self.jacobian_exponent), _normalised(scatter, 0)]
        )
        return self

    def merge_(self, other):
        """Merge ``other`` into ``self`` in place (Chan et al.'s pairwise update)."""
        self._check_compatible(other)
        total = self.weight + other.weight
        self.n_samples += other.n_samples
        if total == 0:
            return self
        parts = [
            (self.scatter, self.scatter_exponent),
            (other.scatter.to(self.device), other.scatter_exponent),
        ]
        if self.center:
            # delta, scaled by the power of two of the larger mean, cannot overflow
            # even for means of opposite sign near the end of the float range.
            other_mean = other.mean.to(self.device)
            largest = float(torch.maximum(self.mean.abs(), other_mean.abs()).max())
            e = _exponent(largest)
            delta = scale_by_power_of_two(other_mean, -e) - scale_by_power_of_two(self.mean, -e)
            factor = self.weight * other.weight / total
            cross = math.sqrt(factor) * delta
            parts.append((torch.outer(cross, cross), e))
            self.mean = self.mean + scale_by_power_of_two(delta * (other.weight / total), e)
        self.scatter, self.scatter_exponent = _sum_of_scaled(parts)
        if self.jacobian_scatter is not None:
            self.jacobian_scatter, self.jacobian_exponent = _sum_of_scaled(
                [
                    (self.jacobian_scatter, self.jacobian_exponent),
                    (other.jacobian_scatter.to(self.device), other.jacobian_exponent),
                ]
            )
        self.weight = total
        return self

    def __add__(self, other):
        return self.copy().merge_(other)

    def copy(self):
        new = self._empty_like()
        new.weight = self.weight
        new.n_samples = self.n_samples
        new.mean = self.mean.clone()
        new.scatter = self.scatter.clone()
        new.scatter_exponent = self.scatter_exponent
        if self.jacobian_scatter is not None:
            new.jacobian_scatter = self.jacobian_scatter.clone()
        new.jacobian_exponent = self.jacobian_exponent
        return new

    def to(self, device):
        """A copy on ``device`` (statistics cross processes and ranks on the CPU)."""
        new = InteractionStatistics(
            self.n_features, self.n_outputs, center=self.center, device=device, dtype=self.dtype
        )
        new.weight, new.n_samples = self.weight, self.n_samples
        new.mean = self.mean.to(device)
        new.scatter, new.scatter_exponent = self.scatter.to(device), self.scatter_exponent
        if self.jacobian_scatter is not None:
            new.jacobian_scatter = self.jacobian_scatter.to(device)
        new.jacobian_exponent = self.jacobian_exponent
        return new

    def _check_compatible(self, other):
        if not isinstance(other, InteractionStatistics):
            raise TypeError(
                f"Can only merge InteractionStatistics, got {type(other).__name__}."
            )
        mine = (self.n_features, self.n_outputs, self.center)
        theirs = (other.n_features, other.n_outputs, other.center)
        if mine != theirs:
            raise ValueError(
                "Cannot merge statistics of different layers: (n_features, n_outputs, "
                f"center) = {mine} vs {theirs}."
            )

    def scaled_moments(self):
        """``(G', M'', e_G, e_M)`` with ``G = G' * 4**e_G`` and ``M' = M'' * 4**e_M``.

        ``G'`` and ``M''`` have their largest diagonal entry near 1, whatever the
        magnitude of the data; ``M''`` is None for the identity downstream map
        (``M' = I``). This is what the basis is computed from.
        """
        gram = self.scatter / self.weight
        if self.jacobian_scatter is None:
            return gram, None, self.scatter_exponent, 0
        return (
            gram,
            self.jacobian_scatter / self.weight,
            self.scatter_exponent,
            self.jacobian_exponent,
        )

    @property
    def gram(self):
        """Weighted centred Gram matrix ``G`` (d, d) of SPEC section 1.

        Entries beyond the float range are infinite: use :meth:`scaled_moments`
        for computations.
        """
        return scale_by_power_of_two(self.scatter / self.weight, 2 * self.scatter_exponent)

    @property
    def jacobian_gram(self):
        """Jacobian second moment ``M'`` (d, d); the identity without Jacobians."""
        if self.jacobian_scatter is None:
            return torch.eye(self.n_features, device=self.device, dtype=self.dtype)
        return scale_by_power_of_two(
            self.jacobian_scatter / self.weight, 2 * self.jacobian_exponent
        )
