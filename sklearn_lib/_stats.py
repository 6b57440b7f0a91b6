"""Mergeable sufficient statistics of one layer: weight, mean, centred Gram and M'.

An interaction basis depends on the data only through four numbers per layer:
the total sample weight, the mean activation, the centred scatter matrix of the
activations and the scatter of the downstream Jacobians. :class:`InteractionStatistics`
accumulates them chunk by chunk and merges two partial results with the
pairwise update of Chan, Golub and LeVeque, so that ``a + b`` on two halves of
a data set (accumulated on different machines, say) equals the statistics of
the whole, to rounding, without ever forming uncentred second moments whose
cancellation would lose digits.
"""

import torch

from ._backend import as_tensor
from ._validation import check_finite


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
        ``sum_x w_x (x - mean)(x - mean)^T``.
    jacobian_scatter : torch.Tensor of shape (d, d) or None
        ``sum_x w_x J_x^T J_x``; None for the identity downstream map.
    """

    def __init__(self, n_features, n_outputs, *, center, device, dtype):
        self.n_features = n_features
        self.n_outputs = n_outputs
        self.center = center
        self.weight = 0.0
        self.n_samples = 0
        self.mean = torch.zeros(n_features, device=device, dtype=dtype)
        self.scatter = torch.zeros(n_features, n_features, device=device, dtype=dtype)
        self.jacobian_scatter = (
            None
            if n_outputs is None
            else torch.zeros(n_features, n_features, device=device, dtype=dtype)
        )

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
        NaN or infinity raises before anything is merged.
        """
        X = as_tensor(X, device=self.device, dtype=self.dtype)
        check_finite(X, "X")
        w = (
            None
            if sample_weight is None
            else as_tensor(sample_weight, device=self.device, dtype=self.dtype)
        )
        jacobian_scatter = None
        if self.jacobian_scatter is not None:
            J = as_tensor(jacobians, device=self.device, dtype=self.dtype)
            if w is not None:
                J = J * w.sqrt()[:, None, None]
            J = J.reshape(-1, self.n_features)
            # One GEMM over all (sample, output) rows: the whole cost of a fit.
            # addmm runs it faster than J.T @ J followed by a sum, and out of place
            # it leaves the statistics untouched until the chunk is validated.
            jacobian_scatter = torch.addmm(self.jacobian_scatter, J.T, J)
            # A NaN or infinity anywhere in column j of J reaches diagonal entry j
            # of J^T J; checking d numbers instead of the chunk halves the cost.
            if not bool(torch.isfinite(jacobian_scatter.diagonal()).all()):
                raise ValueError(
                    "jacobians contains NaN or infinity (or values whose squares "
                    "overflow float64)."
                )
        # Everything is validated: from here on the statistics change.
        chunk = self._empty_like()
        chunk.n_samples = X.shape[0]
        chunk.weight = float(X.shape[0]) if w is None else float(w.sum())
        if chunk.weight > 0 and self.center:
            chunk.mean = (X.sum(0) if w is None else w @ X) / chunk.weight
            X = X - chunk.mean
        if chunk.weight > 0:
            Xw = X if w is None else X * w.sqrt()[:, None]
            chunk.scatter = Xw.T @ Xw
        self.merge_(chunk)
        if jacobian_scatter is not None:
            self.jacobian_scatter = jacobian_scatter
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
            self.n_outputs = int(n_outputs)
        elif self.n_outputs != n_outputs:
            raise ValueError(
                f"these statistics hold Jacobians with {self.n_outputs} outputs, "
                f"got a scatter for {n_outputs}."
            )
        self.jacobian_scatter += scatter
        return self

    def merge_(self, other):
        """Merge ``other`` into ``self`` in place (Chan et al.'s pairwise update)."""
        self._check_compatible(other)
        total = self.weight + other.weight
        self.n_samples += other.n_samples
        if total == 0:
            return self
        if self.center:
            delta = other.mean.to(self.device) - self.mean
            factor = self.weight * other.weight / total
            self.scatter += other.scatter.to(self.device) + factor * torch.outer(delta, delta)
            self.mean += delta * (other.weight / total)
        else:
            self.scatter += other.scatter.to(self.device)
        if self.jacobian_scatter is not None:
            self.jacobian_scatter += other.jacobian_scatter.to(self.device)
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
        if self.jacobian_scatter is not None:
            new.jacobian_scatter = self.jacobian_scatter.clone()
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

    @property
    def gram(self):
        """Weighted centred Gram matrix ``G`` (d, d) of SPEC section 1."""
        return self.scatter / self.weight

    @property
    def jacobian_gram(self):
        """Jacobian second moment ``M'`` (d, d); the identity without Jacobians."""
        if self.jacobian_scatter is None:
            return torch.eye(self.n_features, device=self.device, dtype=self.dtype)
        return self.jacobian_scatter / self.weight
