"""The closed form of a linear readout, in memory linear in its number of outputs.

A readout ``logits = x @ W^T + b`` (an ``lm_head``, an unembedding; ``W`` of shape
``(V, d)``) has the same Jacobian ``W`` at every row. As a
:class:`~sklearn_lib.models._elementwise.LinearElementwise` without activation its
derivative would be ``V`` ones per row, so the Jacobian scatter would pass through
``S^T S`` and ``A^T A``, both ``V x V``, and the edges through a ``rows x k x V``
buffer: at a vocabulary of 50,257 that is 20 GB per matrix. Here the derivative is
one column of ones (the factor shared by every output), so with the cotangents
``C`` (``(V, k)``; the identity of an unrotated final layer may be a sparse tensor)

* the scatter is ``n (C^T W)^T (C^T W)``, a ``d x d`` product of a ``(k, d)`` matrix;
* the Jacobian between basis coordinates, ``J~ = C^T W C_pinv^T`` (``(k, r)``), is
  the same for every row, so the edges are ``J~^2 * sum_x s_x^2 z_x^2`` (one
  ``(k, r)`` matrix, no per-row copy), and the constant node's unexplained part
  needs ``(rows, k)`` numbers.
"""

from dataclasses import dataclass

import torch

from ._elementwise import LinearElementwise

__all__ = ["LinearReadout"]


def cotangent_product(V, M):
    """``V^T M`` for dense or sparse (the identity of a wide final layer) ``V``."""
    if V.layout == torch.strided:
        return V.T @ M
    return torch.sparse.mm(V.t().coalesce(), M)


@dataclass
class LinearReadout(LinearElementwise):
    """An ``nn.Linear`` readout ``x @ weight.T + bias``: one shared derivative column.

    Everything :class:`~sklearn_lib.models._elementwise.LinearElementwise` offers,
    with ``derivative`` of shape ``(N, 1)`` (the Jacobian ``s_x W`` with the scalar
    ``s_x = 1``; integrated gradients weigh it by the path weights) and edges
    accumulated by :meth:`accumulate_edges` without a per-row Jacobian.
    """

    activation: None = None
    linear_first: bool = True

    def derivative(self, X):
        """``(N, 1)`` ones: the factor every output's Jacobian row shares."""
        return X.new_ones(X.shape[0], 1)

    def jacobians(self, s, out=None):
        """``s_x W`` for each row (N, d_out, d_in): the full Jacobians (``collect``)."""
        d_out, d_in = self.weight.shape
        if out is None:
            out = s.new_empty(s.shape[0], d_out, d_in)
        return torch.mul(s[:, :1, None], self.weight[None], out=out)

    def jacobian_scatter(self, SS, V, s_sum=None, n=None):
        """``sum_x s_x^2 (V^T W)^T (V^T W)`` from ``SS = sum_x s_x^2`` (1, 1): ``(d, d)``."""
        A = cotangent_product(V, self.weight)
        return (A.T @ A).mul_(SS.reshape(()))

    def edge_factors(self, V, right):
        """``(J~,)`` with ``J~ = V^T W right`` (k, r), the Jacobian of every row."""
        return (cotangent_product(V, self.weight) @ right,)

    def edge_jacobians(self, s, factors, workspace=None):
        """``s_x J~`` per row (N, k, r): for small ``k`` only; the graph uses
        :meth:`accumulate_edges`."""
        (J,) = factors
        return s[:, :1, None] * J[None]

    def accumulate_edges(self, total, s, factors, Z, *, constant=None, Z_out=None):
        """Add ``sum_x (s_x J~[i, j] z_x[j])^2`` to ``total`` (k, r) in place.

        The same sums as :func:`~sklearn_lib.sources._edges.accumulate_edges` of
        :meth:`edge_jacobians`, without the ``(N, k, r)`` tensor; with ``constant``
        (k,), the squared part of ``Z_out`` (N, k) that the attributions leave
        unexplained, ``Z_out[x] - s_x J~ z_x``.
        """
        (J,) = factors
        s = s[:, 0]
        if constant is not None:
            residual = Z_out - s[:, None] * (Z @ J.T)
            constant += residual.square_().sum(0)
        total += J.square() * (s.square() @ Z.square())[None, :]
        return total
