"""Closed-form Jacobians of ``Linear`` + elementwise-activation sections (SPEC section 5).

A section whose Jacobian is ``J_x = L diag(s_x) R`` with fixed matrices ``L``, ``R``
and a per-sample vector ``s_x`` (the derivative of an elementwise activation)
needs no per-sample Jacobians at all:

* ``V^T J_x = (V^T L) diag(s_x) R``, so with ``A = V^T L`` the Jacobian scatter is
  ``sum_x J_hat_x^T J_hat_x = R^T [ (A^T A) * (S^T S) ] R`` (``*`` elementwise,
  ``S`` the rows ``s_x``): O(n d^2 + d^3) instead of O(n d^3);
* the Jacobian between basis coordinates is ``A diag(s_x) (R C_pinv^T)``, one
  GEMM for a whole batch.

:class:`LinearElementwise` is such a section, ``act(x W + b)`` or ``act(x) W + b``;
:class:`~sklearn_lib.models._residual.ResidualMLP` and
:class:`~sklearn_lib.models._attention.CausalAttention` build on it. Every
closed form is a claim about what the model computes, found from module types
and declarations (:mod:`~sklearn_lib.models._fastpath`);
:func:`formula_mismatch` compares it with the model's recorded output, batch by
batch, and :func:`warn_formula` says so where it fails.
"""

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ELEMENTWISE", "TRANSPARENT", "LinearElementwise", "formula_mismatch", "warn_formula"]


#: Activation modules treated as elementwise maps ``y_i = f(x_i)``.
ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
)
TRANSPARENT = (nn.Identity, nn.Dropout)


@dataclass
class LinearElementwise:
    """A section ``act(x @ weight.T + bias)`` (``linear_first``) or ``act(x) @ weight.T + bias``.

    ``weight`` is None for a section without a Linear and ``activation`` None
    for one without an activation; the derivative of a missing activation is 1.
    Activations are rows ``(N, d_in)`` (positions of sequence models are rows,
    which is valid because both modules act on the last axis only).
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    activation: nn.Module | None
    linear_first: bool

    def derivative(self, X):
        """``s`` (N, d_s): the activation's derivative at the rows ``X`` of the input layer."""
        if self.linear_first and self.weight is not None:
            X = torch.nn.functional.linear(X, self.weight, self.bias)
        if self.activation is None:
            return torch.ones_like(X)
        # The derivative through autograd's own backward formula, so that it
        # equals what a vector-Jacobian product gives, kinks included (ReLU'(0)).
        # torch.autograd rather than torch.func: the first torch.func transform
        # of a process imports torch._dynamo (about a second), which the closed
        # forms need nowhere else. The clone shields X from in-place activations
        # (ReLU(inplace=True)).
        t = X.detach().requires_grad_(True)
        with torch.enable_grad():
            y = self.activation(t.clone())
            (s,) = torch.autograd.grad(y, t, torch.ones_like(y))
        return s

    def forward(self, X):
        """The section's formula at the rows ``X`` (what the model must compute)."""
        linear = None if self.weight is None else (
            lambda t: torch.nn.functional.linear(t, self.weight, self.bias))
        if linear is not None and self.linear_first:
            X = linear(X)
        if self.activation is not None:
            # A fresh tensor: an in-place activation (ReLU(inplace=True)) must not
            # overwrite the rows it is compared with.
            X = self.activation(X if linear is not None and self.linear_first else X.clone())
        if linear is not None and not self.linear_first:
            X = linear(X)
        return X

    @property
    def claim(self):
        """What the section's module types say it computes (for messages)."""
        act = "act" if self.activation is None else type(self.activation).__name__
        if self.weight is None:
            formula = "x" if self.activation is None else f"{act}(x)"
        elif self.activation is None:
            formula = "x W^T + b"
        else:
            formula = f"{act}(x W^T + b)" if self.linear_first else f"{act}(x) W^T + b"
        return (f"is {formula} by the types of its modules (an nn.Linear and/or an "
                "elementwise activation of an nn.Sequential, or a readout)")

    def mismatch(self, X, Y):
        """None if the rows ``Y`` are the formula at the rows ``X``, else ``(error, allowed)``."""
        return formula_mismatch(self.forward, X, Y)

    def verify(self, X, Y):
        """Whether the rows ``Y`` are the formula at the rows ``X`` (to rounding)."""
        return self.mismatch(X, Y) is None

    def factors(self, V):
        """``(A, R)`` with ``V^T J_x = A diag(s_x) R``; ``R`` None means the identity."""
        if self.weight is None:
            return V.T, None
        if self.linear_first:
            return V.T, self.weight
        return V.T @ self.weight, None

    def fits(self, d_in, d_out):
        """Whether the section maps rows of width ``d_in`` to rows of width ``d_out``."""
        if self.weight is None:
            return d_in == d_out
        return tuple(self.weight.shape) == (d_out, d_in)

    def jacobian_scatter(self, SS, V, s_sum=None, n=None):
        """``sum_x (V^T J_x)^T (V^T J_x)`` from ``SS = S^T S`` (d_s, d_s).

        ``s_sum`` and ``n`` (the sum of the rows ``s_x`` and their number) are
        not needed here; :class:`ResidualMLP` takes them too.
        """
        A, R = self.factors(V)
        inner = (A.T @ A) * SS
        return inner if R is None else R.T @ inner @ R

    def edge_factors(self, V, right):
        """``(A, B)`` with ``V^T J_x right = A diag(s_x) B``, computed once per layer."""
        A, R = self.factors(V)
        return A, (right if R is None else R @ right)

    def jacobians(self, s, out=None):
        """The full Jacobians ``J_x`` (N, d_out, d_in) from the derivatives ``s`` (N, d_s).

        ``diag(s_x) W`` (``linear_first``), ``W diag(s_x)`` or ``diag(s_x)``:
        one broadcast product per batch, no matrix product at all.
        """
        n, d_s = s.shape
        if self.weight is None:
            if out is None:
                out = s.new_zeros(n, d_s, d_s)
            else:
                out.zero_()
            out.diagonal(dim1=1, dim2=2).copy_(s)
            return out
        d_out, d_in = self.weight.shape
        if out is None:
            out = s.new_empty(n, d_out, d_in)
        if self.linear_first:
            return torch.mul(s[:, :, None], self.weight[None], out=out)
        return torch.mul(self.weight[None], s[:, None, :], out=out)

    def edge_jacobians(self, s, factors, workspace):
        """``A diag(s_x) B`` for each row ``s_x`` of ``s``: (N, k, r), in ``workspace``.

        One GEMM over all (sample, output) rows, ``(N k, d_s) @ (d_s, r)``, into
        buffers that are reused from batch to batch (fresh large allocations
        cost page faults that are comparable to the GEMM itself).
        """
        A, B = factors
        n, (k, d_s), r = s.shape[0], A.shape, B.shape[1]
        left = workspace.get("left", (n, k, d_s), A)
        torch.mul(A[None, :, :], s[:, None, :], out=left)
        out = workspace.get("out", (n, k, r), A)
        torch.matmul(left.view(n * k, d_s), B, out=out.view(n * k, r))
        return out


def formula_mismatch(formula, X, Y, eps=None):
    """None if ``Y == formula(X)`` to rounding, else ``(largest difference, allowed)``.

    Rounding allows ``1e3 eps`` of the largest entry of ``X`` or ``Y`` (at least
    1): the formula and the model compute the same operations, possibly in
    another order or with other kernels; ``eps`` is ``Y``'s machine epsilon
    unless given (a model that computes a part in a coarser dtype).
    Non-finite differences never pass.
    One host synchronisation per call.
    """
    with torch.no_grad():
        pred = formula(X)
        if pred.shape != Y.shape:
            return (float("inf"), 0.0)
        if Y.numel() == 0:
            return None
        pred = pred.to(Y.dtype)
        err, scale = torch.stack([
            (pred - Y).abs().max(), torch.maximum(Y.abs().max(), X.abs().max().to(Y.dtype))
        ]).tolist()
    allowed = 1e3 * (torch.finfo(Y.dtype).eps if eps is None else eps) * max(scale, 1.0)
    if err <= allowed:  # False for NaN
        return None
    return (err if not math.isnan(err) else float("inf"), allowed)


def warn_formula(structure, spec_in, spec_out, where, mismatch, *, stacklevel=3):
    """Warn that ``structure``'s formula does not hold for section ``spec_in -> spec_out``.

    ``where`` says which inputs (``"the batch of samples 256 to 511"``), ``mismatch``
    is ``(error, allowed)`` from :func:`formula_mismatch`.
    """
    err, allowed = mismatch
    warnings.warn(
        f"the section {spec_in!r} -> {spec_out!r} {structure.claim}, but in {where} the "
        f"model's output differs from that formula by up to {err:.3g} (rounding allows "
        f"{allowed:.3g}): a module computes something else there (code that depends on "
        "the inputs, a patched class, modules that change). Using generic "
        "vector-Jacobian products for this section instead.",
        UserWarning,
        stacklevel=stacklevel,
    )
