"""Mergeable sufficient statistics of one layer, kept as square roots.

An interaction basis depends on the data only through the total sample weight,
the mean activation, the centred scatter ``S = sum_x w_x (x - mu)(x - mu)^T`` and
the Jacobian scatter ``P = sum_x w_x J_x^T J_x``. Forming ``S`` squares the
condition number of the activations (a Gram matrix of cond 1e8 has lost every
digit in float64), so :class:`InteractionStatistics` never does:

* **Activations: an R factor (TSQR).** ``S = R^T R`` with ``R`` (d, d) upper
  triangular, from a Householder QR of the weighted, centred rows. Two parts
  merge exactly: the R factor of ``[R_a; R_b; sqrt(w_a w_b / (w_a + w_b)) (m_a - m_b)]``
  is that of the union (the last row is Chan's mean correction, written as a row
  of the square root), so chunks, Dask blocks and ranks merge as before. Rows
  are buffered until there are ``4 d`` of them, so that small chunks do not pay
  a (d, d) QR each.
* **Jacobians: a Gram matrix in a frame.** A QR of the Jacobian rows would cost
  four to six times the GEMM ``J^T J`` on a CPU (measured), so the rows are
  squared after a change of coordinates ``Y = J F`` that whitens them: ``F`` is
  built from the activations' R factor (``F = E V diag(s)`` from the SVD of the
  column-equilibrated ``R = P diag(s) V^T E^-1``), so ``Y`` are, up to a rotation,
  the Jacobians with respect to the whitened coordinates, whose second moment has
  the interaction strengths as eigenvalues. Rounding then loses ``eps`` relative
  to the largest strength instead of ``eps cond(X)^2``. Statistics in different
  frames merge exactly by changing frame, ``N -> T^T N T`` with ``T = F_a^-1 F_b``.
  Well-conditioned activations (:func:`~sklearn_lib.basis._factors.frame_condition`)
  need no frame and pay nothing for it. :meth:`update` (streaming) takes its
  frame from the activations seen so far and renews it whenever the weight has
  doubled; :meth:`update_jacobians` after all activations (``fit``) squares in
  the frame of the final R factor, which is exact whitening.
* **A bound on the rounding of the Jacobian Gram matrix**: ``|error_ij| <=
  c eps b_i b_j`` with ``b_i^2`` the squared norm of column ``i`` of ``Y``;
  ``b`` changes frame with ``|T|^T``. The "auto" truncation reads its tolerance
  from it (:mod:`sklearn_lib.basis._linalg`).
* **Signed Jacobian sums** ``sum_x w_x J_x^T U`` for two fixed output weightings
  ``U`` (:func:`~sklearn_lib.basis._factors.output_weights`), which orient each
  basis direction by a rule that does not change under reparameterisation.

Every matrix is stored divided by a power of two that keeps its largest entry
near 1: activations of 1e200 (whose squares overflow float64) or Jacobians of
1e-200 (whose squares underflow) accumulate as accurately as data near 1.
Multiplying by a power of two is exact, so the scaling loses nothing and merges
of differently scaled parts stay exact.
"""

import torch

from ..utils._backend import as_tensor
from ..utils._validation import check_finite
from ._factors import (
    _change_frame,
    _exponent,
    _largest,
    _normalised,
    _scaled_scatter,
    constant_feature_floor,
    merge_factors,
    output_weights,
    scale_by_power_of_two,
    varying_features,
    whitening_frame,
)
from ._jacobian_part import JacobianPart

__all__ = [
    "AUTO_CHUNK_NUMBERS",
    "Factors",
    "InteractionStatistics",
    "constant_feature_floor",
    "merge_statistics",
    "output_weights",
    "scale_by_power_of_two",
]

# A chunk of Jacobians holds about this many numbers when batch_size=None
# (64 MiB in float64): large enough for GEMM to run at full speed, small enough
# that fitting never holds a copy of a whole Jacobian cache.
AUTO_CHUNK_NUMBERS = 2**23

# Buffered activation rows are folded into the R factor once there are this
# many times d of them.
_BUFFER_FACTOR = 4


class InteractionStatistics:
    """Running weight, mean and square-root statistics of one layer (module docstring).

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
    gram, jacobian_gram : torch.Tensor of shape (d, d)
        ``G`` and ``M'`` of SPEC section 1, formed on request; the basis is
        computed from :meth:`factors`, which never squares the activations.
    """

    def __init__(self, n_features, n_outputs, *, center, device, dtype):
        self.n_features = n_features
        self.n_outputs = n_outputs
        self.center = center
        self._weight = 0.0
        self.n_samples = 0
        self._mean = torch.zeros(n_features, device=torch.device(device), dtype=dtype)
        self._factor = torch.zeros(n_features, n_features, device=self.device, dtype=dtype)
        self._factor_exponent = 0
        self._pending = []
        self._pending_rows = 0
        self._jacobians = None if n_outputs is None else self._new_jacobian_part()

    # ------------------------------------------------------------------ basics
    @property
    def device(self):
        return self._mean.device

    @property
    def dtype(self):
        return self._mean.dtype

    @property
    def weight(self):
        """Sum of sample weights (buffered rows included)."""
        self._flush()
        return self._weight

    @property
    def mean(self):
        """Weighted mean (buffered rows included; zeros when ``center=False``)."""
        self._flush()
        return self._mean

    def _new_jacobian_part(self):
        return JacobianPart(self.n_features, self.device, self.dtype)

    def _empty_like(self):
        return InteractionStatistics(self.n_features, self.n_outputs, center=self.center,
                                     device=self.device, dtype=self.dtype)

    def copy(self):
        return self._copy(None)

    def to(self, device):
        """A copy on ``device`` (statistics cross processes and ranks on the CPU)."""
        return self._copy(torch.device(device))

    def _copy(self, device):
        self._flush()
        move = (lambda t: t.clone()) if device is None else (lambda t: t.to(device))
        new = InteractionStatistics(self.n_features, self.n_outputs, center=self.center,
                                    device=self.device if device is None else device,
                                    dtype=self.dtype)
        new._weight, new.n_samples = self._weight, self.n_samples
        new._mean, new._factor = move(self._mean), move(self._factor)
        new._factor_exponent = self._factor_exponent
        if self._jacobians is not None:
            new._jacobians = self._jacobians.copy(device)
        return new

    def __getstate__(self):
        self._flush()
        return self.__dict__.copy()

    # ---------------------------------------------------------------- updates
    def update(self, X, jacobians=None, sample_weight=None):
        """Fold one chunk of samples (activations and, if any, Jacobians) in; return ``self``.

        ``X`` is (b, d), ``jacobians`` (b, o, d) and ``sample_weight`` (b,); each
        may be an ndarray, a memmap or a tensor. Shapes are assumed validated;
        NaN or infinity raises before anything is merged. The Jacobians are
        squared in the whitening frame of the activations seen so far (this
        chunk's included), renewed whenever the weight has doubled.
        """
        X = as_tensor(X, device=self.device, dtype=self.dtype)
        check_finite(X, "X")
        w = self._weights(sample_weight)
        part = self._rows_part(X, w)
        if self._jacobians is None:
            self._commit_rows(X.shape[0], part)
            return self
        J = as_tensor(jacobians, device=self.device, dtype=self.dtype)
        jac = self._jacobians
        weight = self._weight + (0.0 if part is None else part[3])
        frame, merged = jac.frame, None
        if jac.empty or weight >= 2 * jac.frame_weight:
            # The frame of every activation so far, this chunk's included: the
            # buffered rows are folded in now rather than at the next flush.
            merged = self._merged_with(part)
            frame = whitening_frame(merged[0], merged[1], merged[2], merged[3],
                                    self.n_samples + X.shape[0])
        gram_part = self._jacobian_gram(J, w, frame)  # raises before anything changes
        if merged is None:
            self._commit_rows(X.shape[0], part)
        else:
            self.n_samples += X.shape[0]
            self._factor, self._factor_exponent, self._mean, self._weight = merged
            self._pending, self._pending_rows = [], 0
            jac.reframe(frame, self._weight)
        jac.add(*gram_part)
        return self

    def update_activations(self, X, sample_weight=None):
        """Fold a chunk of activations in (the first pass of a fit); return ``self``."""
        X = as_tensor(X, device=self.device, dtype=self.dtype)
        check_finite(X, "X")
        self._commit_rows(X.shape[0], self._rows_part(X, self._weights(sample_weight)))
        return self

    def update_jacobians(self, jacobians, sample_weight=None):
        """Fold Jacobians of samples whose activations are all in (second pass); return ``self``.

        The first call squares in the whitening frame of the R factor of every
        activation, which whitens exactly; later calls keep that frame.
        """
        J = as_tensor(jacobians, device=self.device, dtype=self.dtype)
        jac = self._jacobians
        if jac.empty:
            self._flush()
            jac.reframe(whitening_frame(self._factor, self._factor_exponent, self._mean,
                                        self._weight, self.n_samples), self._weight)
        jac.add(*self._jacobian_gram(J, self._weights(sample_weight), jac.frame))
        return self

    def _weights(self, sample_weight):
        if sample_weight is None:
            return None
        return as_tensor(sample_weight, device=self.device, dtype=self.dtype)

    def _rows_part(self, X, w):
        """The chunk's centred, weighted rows as a part of the TSQR merge (None if weightless)."""
        weight = float(X.shape[0]) if w is None else float(w.sum())
        if weight <= 0 or X.shape[0] == 0:
            return None
        # Divided by the power of two nearest its largest entry, X can be summed
        # and squared at any magnitude; the division is exact.
        e = _exponent(_largest(X))
        Xs = scale_by_power_of_two(X, -e)
        mean = torch.zeros(self.n_features, device=self.device, dtype=self.dtype)
        if self.center:
            mean = (Xs.sum(0) if w is None else w @ Xs) / weight
            Xs = Xs - mean
        rows = Xs if w is None else Xs * w.sqrt()[:, None]
        return rows, e, scale_by_power_of_two(mean, e), weight

    def _commit_rows(self, n_rows, part):
        self.n_samples += n_rows
        if part is None:
            return
        self._pending.append(part)
        self._pending_rows += part[0].shape[0]
        # Rows are folded in 4d at a time, so that small chunks do not pay a
        # (d, d) QR each.
        if self._pending_rows >= _BUFFER_FACTOR * self.n_features:
            self._flush()

    def _merged_with(self, part=None):
        """``merge_factors`` of the R factor, the buffered rows and ``part`` (nothing changes)."""
        parts = [(self._factor, self._factor_exponent, self._mean, self._weight), *self._pending]
        if part is not None:
            parts.append(part)
        merged = merge_factors(parts, center=self.center, n_features=self.n_features,
                               device=self.device, dtype=self.dtype)
        if merged is None:
            return self._factor, self._factor_exponent, self._mean, self._weight
        return merged

    def _flush(self):
        """Fold the buffered rows into the R factor."""
        if self._pending:
            self._factor, self._factor_exponent, self._mean, self._weight = self._merged_with()
            self._pending, self._pending_rows = [], 0

    def _jacobian_gram(self, J, w, frame):
        """``(Y^T Y, exponent, bound, signed sums)`` of a chunk, ``Y = J F``; nothing changes."""
        if w is not None:
            J = J * w.sqrt()[:, None, None]
        rows = J.reshape(-1, self.n_features)
        # One GEMM over all (sample, output) rows (two in a frame): the whole cost
        # of a fit. A NaN or infinity anywhere in column j of the rows reaches
        # diagonal entry j of the Gram matrix; checking d numbers instead of the
        # chunk halves the cost.
        part = _scaled_scatter(rows, None if frame is None else frame.matrix())
        if part is None:
            raise ValueError("jacobians contains NaN or infinity.")
        P, k = part
        return P, k, P.diagonal().clone(), self._signed_sums(J, w)

    def _signed_sums(self, J, w):
        """``(sum_x w_x J_x^T U, exponent)`` for the orientation rule.

        ``J`` holds the rows ``sqrt(w_x) J_x`` that are squared. The sum is
        ``(sum_x w_x J_x)^T U``: one matrix-vector product over the chunk (a
        reduction along the first axis is four times slower, measured).
        """
        U = output_weights(J.shape[1], device=self.device, dtype=self.dtype)
        v = torch.ones(J.shape[0], device=self.device, dtype=self.dtype) if w is None \
            else w.sqrt()
        flat = J.reshape(J.shape[0], -1)
        total = v @ flat
        e = 0
        if not bool(torch.isfinite(total).all()) or 0 < _largest(total) < 2.0**-900:
            e = _exponent(_largest(flat))
            total = v @ scale_by_power_of_two(flat, -e)
        return total.reshape(J.shape[1], J.shape[2]).T @ U, e

    def add_jacobian_scatter_(self, scatter, n_outputs, signed_sums=None):
        """Add a Jacobian scatter ``sum_x w_x J_x^T J_x`` computed elsewhere; return ``self``.

        For downstream maps with structure (e.g. ``J_x = diag(s_x) W^T``) the
        scatter has a closed form that is much cheaper than forming the
        per-sample Jacobians; the caller accumulates it over the *same* samples
        it passed to :meth:`update` (without ``jacobians``) and adds it here.
        Statistics created with ``n_outputs=None`` take ``n_outputs`` from this
        call; otherwise it must match. The scatter is already a square, so it is
        only as accurate as the Gram route.

        Parameters
        ----------
        scatter : array-like or tensor of shape (d, d)
        n_outputs : int
            Number of rows of each ``J_x`` (informational; used by merges).
        signed_sums : array-like or tensor of shape (d, 2), default=None
            ``sum_x w_x J_x^T U`` over the same samples, ``U`` from
            :func:`~sklearn_lib.basis._factors.output_weights` (outputs in the
            order of the scatter's rows);
            without them the basis is oriented by ``svd_flip``'s rule, which is not
            invariant under reparameterisation (see ``_linalg``).
        """
        scatter = as_tensor(scatter, device=self.device, dtype=self.dtype)
        d = self.n_features
        if tuple(scatter.shape) != (d, d):
            raise ValueError(
                f"the Jacobian scatter must be ({d}, {d}), got {tuple(scatter.shape)}."
            )
        check_finite(scatter, "jacobian scatter")
        if self._jacobians is None:
            self._jacobians = self._new_jacobian_part()
            self.n_outputs = int(n_outputs)
        elif self.n_outputs != n_outputs:
            raise ValueError(
                f"these statistics hold Jacobians with {self.n_outputs} outputs, "
                f"got a scatter for {n_outputs}."
            )
        jac = self._jacobians
        if jac.empty:
            self._flush()
            jac.reframe(whitening_frame(self._factor, self._factor_exponent, self._mean,
                                        self._weight, self.n_samples), self._weight)
        P, k = _normalised((scatter + scatter.T) / 2, 0)
        # Its own rounding is unknown: bound it by its diagonal, as if it had been
        # squared here without a frame.
        bound = P.diagonal().clamp(min=0)
        if jac.frame is not None:
            T = jac.frame.matrix()
            P, k, bound = _change_frame(P, k, bound, T)
        sums = None
        if signed_sums is not None:
            sums = as_tensor(signed_sums, device=self.device, dtype=self.dtype)
            if tuple(sums.shape) != (d, 2):
                raise ValueError(
                    f"the signed Jacobian sums must be ({d}, 2), got {tuple(sums.shape)}."
                )
            check_finite(sums, "signed Jacobian sums")
            sums = (sums, 0)
        jac.add(P, k, bound, sums)
        return self

    # -------------------------------------------------------------------- merges
    def mix_jacobians_(self, others, shares):
        """Make the Jacobian scatter ``sum_g s_g P_g`` of ``self`` and ``others``; return ``self``.

        For statistics of the *same* samples whose Jacobian scatters ``P_g`` are
        independent unbiased estimates of one scatter (groups of random sources,
        :mod:`~sklearn_lib.basis._error_bars`): the activations are ``self``'s,
        the Jacobian halves are mixed with ``shares`` (``self`` first) in
        ``self``'s frame, and ``n_outputs`` counts every group's outputs.
        """
        parts = [self, *others]
        for other in others:
            self._check_compatible_samples(other)
        jac, mixed = self._jacobians, self._new_jacobian_part()
        mixed.reframe(jac.frame, jac.frame_weight)
        for part, share in zip(parts, shares):
            other = part._jacobians.copy(self.device)
            other.reframe(jac.frame, jac.frame_weight)
            sums = None if other.sums is None else (other.sums * share, other.sums_exponent)
            mixed.add(other.gram * share, other.exponent, other.bound * share, sums)
        self._jacobians = mixed
        self.n_outputs = sum(part.n_outputs for part in parts)
        return self

    def _check_compatible_samples(self, other):
        mine = (self.n_features, self.n_samples, self.weight)
        theirs = (getattr(other, "n_features", None), getattr(other, "n_samples", None),
                  getattr(other, "weight", None))
        if mine != theirs or other._jacobians is None:
            raise ValueError(
                "Jacobian scatters can be mixed only between statistics of the same samples "
                f"with Jacobians: expected (n_features, n_samples, weight) = {mine}, got "
                f"{theirs}."
            )

    def merge_(self, other):
        """Merge ``other`` into ``self`` in place (exact: TSQR and a change of frame)."""
        merged = merge_statistics([self, other])
        self.__dict__.update(merged.__dict__)
        return self

    def __add__(self, other):
        return merge_statistics([self, other])

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

    # ----------------------------------------------------------------- read-outs
    def factors(self):
        """What the basis is computed from: a :class:`Factors` view (buffered rows folded in)."""
        self._flush()
        jac = self._jacobians
        return Factors(
            weight=self._weight, n_samples=self.n_samples, n_outputs=self.n_outputs,
            mean=self._mean, factor=self._factor, factor_exponent=self._factor_exponent,
            varying=varying_features(self._factor, self._factor_exponent, self._mean,
                                     self._weight),
            frame=None if jac is None else jac.frame,
            jacobian_gram=None if jac is None else jac.gram,
            jacobian_exponent=0 if jac is None else jac.exponent,
            jacobian_bound=None if jac is None else jac.bound,
            signed_sums=None if jac is None else jac.sums,
            sums_exponent=0 if jac is None else jac.sums_exponent,
        )

    def _scatter_scaled(self):
        self._flush()
        return _normalised(self._factor.T @ self._factor, self._factor_exponent)

    def _jacobian_scatter_scaled(self):
        """``(P', e)`` with ``sum_x w_x J_x^T J_x == P' * 4**e`` (the frame undone)."""
        jac = self._jacobians
        if jac.frame is None:
            return jac.gram, jac.exponent
        Finv = jac.frame.inverse()
        return _normalised(Finv.T @ jac.gram @ Finv, jac.exponent)

    def jacobian_rounding(self):
        """Bound ``rho`` on the rounding of ``M''`` (of :meth:`scaled_moments`), or None.

        ``M'`` formed from a Gram matrix squared in a whitening frame carries the
        rounding of that Gram matrix back through the frame: its spectral norm is
        at most ``c eps rho`` (``c`` the usual count factor), which can exceed
        ``c eps |M'|`` when the activations are ill-conditioned. None without a
        frame, where the Gram route's ``c eps |M'|`` holds.
        """
        jac = self._jacobians
        if jac is None or jac.frame is None:
            return None
        Finv = jac.frame.inverse()
        b = Finv.abs().T @ jac.bound.clamp(min=0).sqrt()
        _, e = self._jacobian_scatter_scaled()
        return float(scale_by_power_of_two(b.square().sum(), 2 * (jac.exponent - e))) \
            / self.weight

    @property
    def scatter(self):
        """``sum_x w_x (x - mean)(x - mean)^T / 4**scatter_exponent``, formed from R."""
        return self._scatter_scaled()[0]

    @property
    def scatter_exponent(self):
        return self._scatter_scaled()[1]

    @property
    def jacobian_scatter(self):
        """``sum_x w_x J_x^T J_x / 4**jacobian_exponent`` (None for the identity map)."""
        return None if self._jacobians is None else self._jacobian_scatter_scaled()[0]

    @property
    def jacobian_exponent(self):
        return 0 if self._jacobians is None else self._jacobian_scatter_scaled()[1]

    def scaled_moments(self):
        """``(G', M'', e_G, e_M)`` with ``G = G' * 4**e_G`` and ``M' = M'' * 4**e_M``.

        ``G'`` and ``M''`` have their largest diagonal entry near 1, whatever the
        magnitude of the data; ``M''`` is None for the identity downstream map
        (``M' = I``). Both are squares: the basis itself is computed from
        :meth:`factors`, which never forms them.
        """
        scatter, e_gram = self._scatter_scaled()
        gram = scatter / self._weight
        if self._jacobians is None:
            return gram, None, e_gram, 0
        jscatter, e_jac = self._jacobian_scatter_scaled()
        return gram, jscatter / self._weight, e_gram, e_jac

    @property
    def gram(self):
        """Weighted centred Gram matrix ``G`` (d, d) of SPEC section 1.

        Entries beyond the float range are infinite: use :meth:`scaled_moments`
        for computations.
        """
        scatter, e = self._scatter_scaled()
        return scale_by_power_of_two(scatter / self._weight, 2 * e)

    @property
    def jacobian_gram(self):
        """Jacobian second moment ``M'`` (d, d); the identity without Jacobians."""
        if self._jacobians is None:
            return torch.eye(self.n_features, device=self.device, dtype=self.dtype)
        jscatter, e = self._jacobian_scatter_scaled()
        return scale_by_power_of_two(jscatter / self._weight, 2 * e)


class Factors:
    """The square-root statistics :func:`~sklearn_lib.basis._linalg.interaction_basis` reads.

    ``factor * 2**factor_exponent`` is the R factor of the weighted, centred
    activations; ``jacobian_gram * 4**jacobian_exponent`` is ``Y^T Y`` for
    ``Y = J F`` (``F`` the ``frame``, None for the identity);
    ``jacobian_bound * 4**jacobian_exponent`` holds the squared column scales of
    its rounding bound; ``signed_sums * 2**sums_exponent`` is
    ``sum_x w_x J_x^T U`` (None when a closed-form scatter was added);
    ``varying`` marks the features that are not constant.
    """

    def __init__(self, **fields):
        self.__dict__.update(fields)


def merge_statistics(parts):
    """The statistics of the union of ``parts`` (a list of InteractionStatistics).

    One TSQR step merges every R factor
    (:func:`~sklearn_lib.basis._factors.merge_factors`); Jacobian Gram
    matrices in one common frame are added, otherwise each is first brought into
    the whitening frame of the merged R factor.
    """
    first = parts[0]
    for part in parts[1:]:
        first._check_compatible(part)
    for part in parts:
        part._flush()
    total = first._empty_like()
    total.n_samples = sum(p.n_samples for p in parts)
    merged = merge_factors(
        [(p._factor, p._factor_exponent, p._mean, p._weight) for p in parts],
        center=first.center, n_features=first.n_features, device=total.device,
        dtype=total.dtype)
    if merged is not None:
        total._factor, total._factor_exponent, total._mean, total._weight = merged
    if first._jacobians is None:
        return total
    filled = [p._jacobians for p in parts if not p._jacobians.empty]
    frames = {id(j.frame) for j in filled}
    if len(frames) <= 1:
        frame = filled[0].frame if filled else None
    else:
        frame = whitening_frame(total._factor, total._factor_exponent, total._mean,
                                total._weight, total.n_samples)
    jac = total._jacobians
    for other in filled:
        other = other.copy(total.device)
        other.reframe(frame, total._weight)
        sums = None if other.sums is None else (other.sums, other.sums_exponent)
        jac.add(other.gram, other.exponent, other.bound, sums)
    jac.frame, jac.frame_weight = frame, total._weight
    return total
