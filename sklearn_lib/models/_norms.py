"""LayerNorm and RMSNorm over the last axis, and their exact Jacobians.

With ``xhat`` the normalised row and ``sigma`` its scale, both norms are
``y = gamma * xhat + beta`` and their Jacobian (rows: outputs) is

* LayerNorm, ``sigma = sqrt(var(x) + eps)``, ``xhat = (x - mean(x)) / sigma``:
  ``J = diag(gamma) / sigma * (I - 1 1^T / d - xhat xhat^T / d)``;
* RMSNorm, ``sigma = sqrt(mean(x^2) + eps)``, ``xhat = x / sigma``:
  ``J = diag(gamma) / sigma * (I - xhat xhat^T / d)``;

a diagonal times a projector-type correction of rank 2 (LayerNorm) or 1
(RMSNorm). ``eps`` enters through ``sigma`` only, so ``|xhat|^2 = d var / (var + eps)``
is below ``d``, and the bracket is not exactly a projector when ``eps > 0``; the
formulas above hold for every ``eps`` (derivation: ``d sigma / d x_j =
(x_j - mean) / (d sigma)``, resp. ``x_j / (d sigma)``).
"""

from dataclasses import dataclass

import torch

__all__ = ["Norm"]


@dataclass
class Norm:
    """A LayerNorm (``kind="layer"``) or RMSNorm (``kind="rms"``) over the last axis.

    Parameters
    ----------
    kind : {"layer", "rms"}
    weight, bias : torch.Tensor or None
        The gain ``gamma`` and shift ``beta`` (d,); None means 1 and 0.
    eps : float or None
        Added to the variance (mean square); None means the machine epsilon of
        the input's dtype (``torch.nn.RMSNorm``'s default).
    compute_dtype : torch.dtype or None
        The dtype the module normalises in when it differs from its input's
        (transformers' ``LlamaRMSNorm`` normalises in float32, then casts back).
        :meth:`forward` reproduces that arithmetic, so that a recorded output can
        be checked against it; the Jacobian is the exact one of the formula, in
        the input's dtype (the model's own autograd Jacobian then differs from it
        by the rounding of ``compute_dtype``).
    """

    kind: str
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float | None
    compute_dtype: torch.dtype | None = None

    def _eps(self, dtype):
        return torch.finfo(dtype).eps if self.eps is None else self.eps

    def normalize(self, X):
        """``(xhat, 1 / sigma)``: the normalised rows (N, d) and inverse scales (N,)."""
        if self.kind == "layer":
            centred = X - X.mean(-1, keepdim=True)
            var = centred.square().mean(-1)
        else:
            centred = X
            var = X.square().mean(-1)
        inv = torch.rsqrt(var + self._eps(X.dtype))
        return centred * inv[..., None], inv

    def forward(self, X):
        """The norm of the rows ``X``, in the module's own arithmetic (``compute_dtype``)."""
        dtype = X.dtype
        if self.compute_dtype is not None and self.compute_dtype != dtype:
            # LlamaRMSNorm: x.to(float32) * rsqrt(mean(x^2) + eps), cast back, times gamma.
            xhat = self._plain(X.to(self.compute_dtype)).to(dtype)
        else:
            xhat = self._plain(X)
        y = xhat if self.weight is None else self.weight * xhat
        return y if self.bias is None else y + self.bias

    def _plain(self, X):
        if self.kind == "layer":
            centred = X - X.mean(-1, keepdim=True)
            return centred * torch.rsqrt(centred.square().mean(-1, keepdim=True)
                                         + self._eps(X.dtype))
        return X * torch.rsqrt(X.square().mean(-1, keepdim=True) + self._eps(X.dtype))

    def jacobians(self, X):
        """The Jacobians ``dy/dx`` (N, d, d) at the rows ``X`` (module docstring)."""
        xhat, inv = self.normalize(X)
        d = X.shape[-1]
        J = torch.einsum("ni,nj->nij", xhat, xhat).div_(-d)
        J.diagonal(dim1=1, dim2=2).add_(1)
        if self.kind == "layer":
            J.sub_(1.0 / d)
        J.mul_(inv[:, None, None])
        return J if self.weight is None else J.mul_(self.weight[None, :, None])
