"""Closed forms of the MLP halves of standard transformer blocks (GPT-2, GPT-NeoX, Llama).

A section ``y = rho x + mlp(norm(x))`` (``rho`` 1 with the residual add, 0 for
the MLP alone) with ``mlp(u) = W_o a(W_i u + b_i) + b_o`` has, per row (token),
the Jacobian (rows: outputs)

    ``J_x = rho I + W_o diag(s_x) W_i N_x``,

``s_x`` the derivative of the hidden activation and ``N_x`` the norm's Jacobian
(:mod:`~sklearn_lib.models._norms`). A gated MLP (Llama's SwiGLU,
``W_d (act(W_g u) * (W_u u))``) has the same form with ``W_i = [W_g; W_u]``,
``W_o = [W_d, W_d]`` and ``s = [act'(g) * v, act(g)]``. With the gain folded into
``W_i' = W_i diag(gamma)``, the centring into ``W_c = W_i' (I - 1 1^T / d)``
(LayerNorm; ``W_c = W_i'`` for RMSNorm), ``u_x = W_i' xhat_x``, ``t_x = s_x / sigma_x``,
``w_x = t_x * u_x`` and ``e_x = xhat_x / d``:

    ``J_x = rho I + W_o diag(t_x) W_c - (W_o w_x) e_x^T``,

a Hadamard term plus one rank-one term. With ``A = V^T W_o`` (k, d_s) and
``K = A^T A``, the Jacobian scatter over rows is

    ``sum_x (V^T J_x)^T (V^T J_x) = rho^2 n V V^T + rho (P diag(sum t) W_c + T)
    - rho (P sum_x w_x e_x^T + T) + W_c^T [K * sum_x t_x t_x^T] W_c
    - (W_c^T F + T) + sum_x (w_x^T K w_x) e_x e_x^T``

(``P = V A``, ``F = sum_x (t_x * K w_x) e_x^T``, ``+ T`` the transpose of the
term before): per row O(d_s^2 + d d_s), independent of the number k of
directions, where vector-Jacobian products cost O(k d d_s). The sums that
involve ``K`` need ``V`` while the rows are read (:class:`ScatterAccumulator`).
The Jacobian between basis coordinates is ``V^T J_x R = rho V^T R + A diag(t_x)
(W_c R) - (A w_x)(e_x^T R)``: one GEMM per batch plus a rank-one update.
Random ±1 combinations of a sample's positions (``stochastic_positions``) need
no such matrix per row: the section is row-wise, so their attributions are sums
over the rows of ``(d_s, r)`` matrices (:meth:`NormMLP.combined_attributions`).

:func:`~sklearn_lib.models._block_detect.detect_block` recognises the
transformers modules whose code computes such a section, with the layers it
lies between.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ._norms import Norm

__all__ = [
    "BlockState",
    "NormMLP",
    "ScatterAccumulator",
    "accumulator",
]


@dataclass
class BlockState:
    """Per-row quantities of :class:`NormMLP` at the rows of a batch.

    ``t`` (N, d_s) enters linearly; ``rank_one`` holds pairs ``(w, e)`` ((N, d_s),
    (N, d)) whose terms ``-(W_o w_x) e_x^T`` add up. A weighted sum of states
    (the path average of integrated gradients) is again a state:
    :meth:`mul_` and :meth:`add_` mirror the tensor methods the edge pass uses on
    derivatives, ``s.mul_(w)`` and ``s_bar.add_(s, alpha=w)``.
    """

    t: torch.Tensor
    rank_one: list = field(default_factory=list)

    def mul_(self, alpha):
        self.t.mul_(alpha)
        self.rank_one = [(w * alpha, e) for w, e in self.rank_one]
        return self

    def add_(self, other, alpha=1.0):
        self.t.add_(other.t, alpha=alpha)
        self.rank_one = self.rank_one + [(w * alpha, e) for w, e in other.rank_one]
        return self


@dataclass
class NormMLP:
    """The section ``y = rho x + W_o a(W_i norm(x) + b_i) + b_o`` (module docstring).

    Parameters
    ----------
    norm : Norm or None
        The norm in front of the MLP (None: the MLP reads ``x`` itself).
    w_in : torch.Tensor
        (d_mlp, d) in ``nn.Linear``'s layout; for a gated MLP (2 d_mlp, d), the
        gate's rows first, then the up projection's.
    b_in : torch.Tensor or None
        (d_mlp,) or, gated, (2 d_mlp,).
    activation : torch.nn.Module
        Elementwise; of the gate for a gated MLP.
    w_out : torch.Tensor
        (d_out, d_mlp), ``nn.Linear``'s layout.
    b_out : torch.Tensor or None
    gated : bool
        ``W_o (a(g) * v)`` with ``[g; v] = W_i u + b_i``.
    residual : bool
        Whether the section adds its input (``rho = 1``).
    """

    norm: Norm | None
    w_in: torch.Tensor
    b_in: torch.Tensor | None
    activation: nn.Module
    w_out: torch.Tensor
    b_out: torch.Tensor | None
    gated: bool = False
    residual: bool = True

    def __post_init__(self):
        d = self.w_in.shape[1]
        w = self.w_in
        if self.norm is not None and self.norm.weight is not None:
            w = w * self.norm.weight[None, :]
        # u_x = W_i' xhat_x and the shift of the hidden pre-activation h = u + h0.
        self._w_gain = w
        h0 = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        if self.norm is not None and self.norm.bias is not None:
            h0 = h0 + self.w_in @ self.norm.bias
        self._h0 = h0 if self.b_in is None else h0 + self.b_in
        if self.norm is not None and self.norm.kind == "layer":
            w = w - w.sum(1, keepdim=True) / d
        self._w_c = w
        self._w_o = torch.cat([self.w_out, self.w_out], 1) if self.gated else self.w_out

    @property
    def d_in(self):
        return self.w_in.shape[1]

    @property
    def d_out(self):
        return self.w_out.shape[0]

    @property
    def d_hidden(self):
        """Width ``d_s`` of the hidden derivative ``t_x`` (twice ``d_mlp`` when gated)."""
        return self._w_o.shape[1]

    def _hidden(self, X):
        """``(h, xhat, 1/sigma)``: the hidden pre-activation (N, d_s) and the norm's parts."""
        if self.norm is None:
            return torch.nn.functional.linear(X, self.w_in, self.b_in), None, None
        xhat, inv = self.norm.normalize(X)
        return xhat @ self._w_gain.T + self._h0, xhat, inv

    def _act(self, h):
        """``(a(h), a'(h))`` through autograd's own backward formula (kinks as in VJPs)."""
        t = h.detach().requires_grad_(True)
        with torch.enable_grad():
            y = self.activation(t.clone())
            (ds,) = torch.autograd.grad(y, t, torch.ones_like(y))
        return y.detach(), ds

    def derivative(self, X):
        """The :class:`BlockState` of the rows ``X`` (N, d) of the section's input."""
        h, xhat, inv = self._hidden(X)
        if self.gated:
            g, v = h.chunk(2, dim=-1)
            a, da = self._act(g)
            s = torch.cat([da * v, a], -1)
        else:
            s = self._act(h)[1]
        if self.norm is None:
            return BlockState(s)
        t = s.mul_(inv[:, None])
        # u = W_i' xhat = h - h0 exactly as the Jacobian needs it (not recomputed).
        u = h - self._h0
        return BlockState(t, [(t * u, xhat / X.shape[-1])])

    def forward(self, X):
        """The section's formula on rows ``X``, the norm in its module's arithmetic."""
        u = X if self.norm is None else self.norm.forward(X)
        h = torch.nn.functional.linear(u, self.w_in, self.b_in)
        if self.gated:
            g, v = h.chunk(2, dim=-1)
            hidden = self.activation(g) * v
        else:
            hidden = self.activation(h)
        out = torch.nn.functional.linear(hidden, self.w_out, self.b_out)
        return X + out if self.residual else out

    @property
    def claim(self):
        """What the module types say the section computes (for messages)."""
        formula = "mlp(norm(x))" if self.norm is not None else "mlp(x)"
        if self.residual:
            formula = "x + " + formula
        return (f"is {formula} by the class of its transformers block or MLP "
                "(a recognised pre-norm MLP half)")

    def mismatch(self, X, Y):
        """None if the recorded output rows ``Y`` are the formula at the input rows ``X``.

        Else ``(error, allowed)``. Equal to rounding: ``1e3 eps`` of the largest
        entry (at least 1), ``eps`` of the coarser of ``Y``'s dtype and the
        norm's ``compute_dtype``.
        """
        if X.shape[:-1] != Y.shape[:-1] or not self.fits(X.shape[-1], Y.shape[-1]):
            return (float("inf"), 0.0)
        with torch.no_grad():
            pred = self.forward(X.to(self.w_in.dtype)).to(Y.dtype)
        eps = torch.finfo(Y.dtype).eps
        if self.norm is not None and self.norm.compute_dtype is not None:
            eps = max(eps, torch.finfo(self.norm.compute_dtype).eps)
        scale = max(float(Y.abs().max()), float(X.abs().max()), 1.0) if Y.numel() else 1.0
        allowed = 1e3 * eps * scale
        err = float((pred - Y).abs().max()) if Y.numel() else 0.0
        if bool(torch.isfinite(pred).all()) and err <= allowed:  # False for NaN
            return None
        return (err if math.isfinite(err) else float("inf"), allowed)

    def verify(self, X, Y):
        """Whether the recorded output rows ``Y`` are the formula at the input rows ``X``."""
        return self.mismatch(X, Y) is None

    def fits(self, d_in, d_out):
        """Whether the section maps rows of width ``d_in`` to rows of width ``d_out``."""
        if self.residual and self.d_in != self.d_out:
            return False
        return (d_in, d_out) == (self.d_in, self.d_out)

    def jacobians(self, X):
        """The full Jacobians ``J_x`` (N, d_out, d) at the rows ``X`` (for checks, small d)."""
        state = self.derivative(X)
        J = torch.matmul(self._w_o[None] * state.t[:, None, :], self._w_c)
        for w, e in state.rank_one:
            J.sub_(torch.einsum("no,nj->noj", w @ self._w_o.T, e))
        if self.residual:
            J.diagonal(dim1=1, dim2=2).add_(1)
        return J

    def scatter_accumulator(self, V):
        """A :class:`ScatterAccumulator` of ``sum_x (V^T J_x)^T (V^T J_x)``; ``V`` (d_out, k)."""
        return ScatterAccumulator(self, V)

    def edge_factors(self, V, right):
        """``(A, B, A0, right)`` with ``V^T J_x right = A0 + A diag(t_x) B - rank one``.

        Computed once per layer; ``A0`` is None without the residual.
        """
        A = V.T @ self._w_o
        return A, self._w_c @ right, (V.T @ right if self.residual else None), right

    def edge_jacobians(self, state, factors, workspace):
        """``V^T J_x right`` for each row of ``state``: (N, k, r), in ``workspace``.

        ``state`` may be a weighted sum of states with weights summing to 1 (the
        path average of integrated gradients): the constant term then enters
        once, and each path point's rank-one term with its weight.
        """
        A, B, A0, right = factors
        t = state.t
        n, (k, d_s), r = t.shape[0], A.shape, B.shape[1]
        left = workspace.get("left", (n, k, d_s), A)
        torch.mul(A[None, :, :], t[:, None, :], out=left)
        out = workspace.get("out", (n, k, r), A)
        torch.matmul(left.view(n * k, d_s), B, out=out.view(n * k, r))
        if A0 is not None:
            out.add_(A0)
        for w, e in state.rank_one:
            out.baddbmm_((w @ A.T)[:, :, None], (e @ right)[:, None, :], alpha=-1)
        return out

    def combined_attributions(self, state, factors, Z, signs):
        """Attributions of random combinations of output positions: (B, m, k, r).

        ``g_j = sum_t s_jt (V^T J_t right) diag(z_t)`` for each sample's
        combination ``j`` of its ``T`` positions (signs ``s`` (B, m, T), rows of
        ``state`` and ``Z`` (B T, r) sample-major), the part of output
        coordinate ``i`` of the combined positions that input direction ``l``
        accounts for. The section is row-wise (``J_tu = 0`` for ``t != u``),
        so with ``V^T J_t right = A0 + A diag(t_t) B - (A w_t)(e_t^T right)``
        (:meth:`edge_factors`)

            ``g_j = A0 diag(sum_t s_jt z_t) + A (Q_j * B - W_j)``,

        ``Q_j = sum_t s_jt t_t z_t^T`` and ``W_j = sum_t s_jt w_t ((e_t^T
        right) * z_t)^T`` (d_s, r): per sample O(m d_s r (2 T + k)) instead of
        the O(T k d_s r) of :meth:`edge_jacobians`. Both are linear in the
        state, so a weighted sum of states (a path average) enters as it is,
        each of its rank-one terms with its weight.
        """
        A, B, A0, right = factors
        n, m, T = signs.shape
        d_s, r = B.shape
        if state.t.shape[0] != n * T or Z.shape != (n * T, r):
            raise ValueError(
                f"combined attributions need the rows of {n} samples of {T} positions each "
                f"(signs {tuple(signs.shape)}) and coordinates of width {r}: got "
                f"{state.t.shape[0]} rows of the state and coordinates {tuple(Z.shape)}.")
        # Everything is formed transposed, (r, d_s) per combination, so that the
        # product with A is one GEMM over all samples and combinations.
        # Signed coordinates (B, T, m r): a sample's positions sum out in one
        # batched GEMM whose right factor holds its m combinations side by side.
        s = signs.transpose(1, 2).contiguous()[..., None]
        Z_rows = Z.reshape(n, T, 1, r)
        M = torch.bmm((s * Z_rows).view(n, T, m * r).transpose(1, 2),
                      state.t.reshape(n, T, d_s))
        M.view(n, m, r, d_s).mul_(B.T)
        for w, e in state.rank_one:
            ez = (e @ right).view(n, T, 1, r) * Z_rows
            M.baddbmm_((s * ez).view(n, T, m * r).transpose(1, 2), w.reshape(n, T, d_s),
                       alpha=-1)
        out = (M.view(n * m * r, d_s) @ A.T).view(n, m, r, -1)
        if A0 is not None:
            out.add_(A0.T * torch.bmm(signs, Z.reshape(n, T, r))[..., None])
        return out.transpose(2, 3)


class ScatterAccumulator:
    """``sum_x (V^T J_x)^T (V^T J_x)`` of a :class:`NormMLP`, batch by batch.

    :meth:`update` takes the rows of a batch (or their :class:`BlockState`) and
    adds O(d_s^2 + d d_s + d^2) work per row to sums of fixed size, whatever the
    number of rows or of columns of ``V``; :meth:`result` assembles the (d, d)
    scatter (module docstring). Rows left out (padding) are simply not passed.
    """

    def __init__(self, block, V):
        self.block, self.V = block, V
        self.A = V.T @ block._w_o
        self.K = self.A.T @ self.A
        self.n, self.TT, self.t_sum = 0, None, None
        self.WE, self.F, self.EqE = None, None, None

    def update(self, X):
        """Add the rows ``X`` (N, d) of the section's input."""
        return self.update_state(self.block.derivative(X))

    def update_state(self, state):
        """Add the rows whose :meth:`NormMLP.derivative` is ``state``."""
        t = state.t
        if len(state.rank_one) > 1:
            raise ValueError(
                "the Jacobian scatter needs the state of single rows, got a weighted sum of "
                f"{len(state.rank_one)} states (a path average, meant for the edges).")
        self.n += t.shape[0]
        self.TT = _addmm(self.TT, t.T, t)
        self.t_sum = t.sum(0) if self.t_sum is None else self.t_sum.add_(t.sum(0))
        for w, e in state.rank_one:
            Y = w @ self.K
            q = (w * Y).sum(1)
            self.WE = _addmm(self.WE, w.T, e)
            self.F = _addmm(self.F, Y.mul_(t).T, e)
            self.EqE = _addmm(self.EqE, e.T, e * q[:, None])
        return self

    def result(self):
        """The scatter (d, d)."""
        block, V, A = self.block, self.V, self.A
        W_c = block._w_c
        if self.TT is None:
            return V.new_zeros(block.d_in, block.d_in)
        S = W_c.T @ ((self.K * self.TT) @ W_c)
        if block.residual:
            P = V @ A
            cross = (P * self.t_sum) @ W_c
            if self.WE is not None:
                cross.sub_(P @ self.WE)
            S.add_(V @ V.T, alpha=self.n).add_(cross).add_(cross.T)
        if self.F is not None:
            cross = W_c.T @ self.F
            S.sub_(cross).sub_(cross.T).add_(self.EqE)
        return S


def _addmm(total, a, b):
    return a @ b if total is None else total.addmm_(a, b)


class _TensorScatter:
    """The same accumulator interface for the closed forms of ``_fastpath``."""

    def __init__(self, structure, V):
        self.structure, self.V = structure, V
        self.n, self.SS, self.s_sum = 0, None, None

    def update(self, X):
        s = self.structure.derivative(X)
        self.n += s.shape[0]
        self.SS = _addmm(self.SS, s.T, s)
        self.s_sum = s.sum(0) if self.s_sum is None else self.s_sum.add_(s.sum(0))
        return self

    def result(self):
        return self.structure.jacobian_scatter(self.SS, self.V, s_sum=self.s_sum, n=self.n)


def accumulator(structure, V):
    """The scatter accumulator (``update(X)``, ``result()``) of any row-wise closed form.

    :class:`NormMLP` has its own (its sums depend on ``V``); ``_fastpath``'s
    ``LinearElementwise`` and ``ResidualMLP`` accumulate ``S^T S``, the sum of
    the rows ``s_x`` and their number, and call their ``jacobian_scatter``.
    """
    if hasattr(structure, "scatter_accumulator"):
        return structure.scatter_accumulator(V)
    return _TensorScatter(structure, V)
