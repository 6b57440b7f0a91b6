"""Edges between the interaction bases of adjacent layers (SPEC section 2).

``E_l[i, j] = (1/n) sum_x (J_tilde_x[i, j] * Z_l[x, j])^2`` (for sequence
layers ``(1/(n P_in)) sum_x sum_t (sum_s J_tilde_x[(t, i), (s, j)] Z_x[s, j])^2``) with
``J_tilde_x = C_{l+1}^T J_l(x) C_pinv_l^T`` the Jacobian between the two layers'
basis coordinates and ``Z_l = transform_l(X_l)``. With integrated gradients,
``J_tilde_x`` is replaced by its average over the straight path from the mean
(basis coordinates 0) to the edge point (coordinates ``z``), approximated by a
quadrature rule. These helpers are shared by every way the graph gets its
Jacobians (cached arrays, generic vector-Jacobian products, closed forms).
"""

import numpy as np
import torch

__all__ = [
    "Workspace",
    "accumulate_attributions",
    "accumulate_edge_chunk",
    "accumulate_edges",
    "path_points",
    "path_quadrature",
]


class Workspace:
    """Named scratch buffers reused across batches (grown, never shrunk).

    ``get(name, shape, like)`` returns a contiguous tensor of ``shape`` with
    ``like``'s dtype and device, a view of a buffer that is reallocated only
    when a larger one is needed; its contents are undefined.
    """

    def __init__(self):
        self._buffers = {}

    def get(self, name, shape, like):
        size = 1
        for s in shape:
            size *= int(s)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < size or buf.dtype != like.dtype or (
            buf.device != like.device
        ):
            buf = torch.empty(size, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:size].view(*shape)


def path_quadrature(integration, n_alphas):
    """Nodes ``alpha`` in [0, 1] and weights summing to 1 for the path average.

    ``None``: the single node 1 (the Jacobian at the edge point).
    ``"trapezoid"``: ``n_alphas >= 2`` equispaced nodes including both ends,
    error O(n^-2) for smooth integrands. ``"gauss-legendre"``: ``n_alphas``
    Gauss-Legendre nodes mapped to (0, 1), exact for polynomials of degree
    ``2 n_alphas - 1`` and exponentially convergent for analytic integrands.

    Examples
    --------
    >>> from sklearn_lib.sources._edges import path_quadrature
    >>> path_quadrature("trapezoid", 3)
    ([0.0, 0.5, 1.0], [0.25, 0.5, 0.25])
    >>> alphas, weights = path_quadrature("gauss-legendre", 2)
    >>> [round(a, 4) for a in alphas], weights
    ([0.2113, 0.7887], [0.5, 0.5])
    """
    if integration is None:
        return [1.0], [1.0]
    if integration == "trapezoid":
        if n_alphas < 2:
            raise ValueError(
                f"integration='trapezoid' needs n_alphas >= 2 (both ends of the path), "
                f"got n_alphas={n_alphas}."
            )
        alphas = np.linspace(0.0, 1.0, n_alphas)
        weights = np.full(n_alphas, 1.0 / (n_alphas - 1))
        weights[[0, -1]] /= 2
    elif integration == "gauss-legendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_alphas)
        alphas, weights = (nodes + 1) / 2, weights / 2
    else:
        raise ValueError(
            f"integration must be None, 'trapezoid' or 'gauss-legendre', got {integration!r}."
        )
    return [float(a) for a in alphas], [float(w) for w in weights]


def path_points(X, mean, components, inverse_components, edge_point, alphas):
    """Yield the points ``mean + alpha * (p - mean)`` of the integration path.

    ``p`` is ``X`` for ``edge_point="data"`` and the reconstruction
    ``inverse_transform(transform(X))`` for ``"reconstructed"``; in basis
    coordinates the path is ``alpha * z``. ``X`` holds rows (N, d).
    """
    if edge_point == "reconstructed":
        end = ((X - mean) @ components) @ inverse_components + mean
    else:
        end = X
    for alpha in alphas:
        yield end if alpha == 1.0 else torch.lerp(mean.expand_as(end), end, alpha)


def accumulate_edges(total, J_tilde, Z, n_positions=1, n_source_positions=1, *,
                     constant=None, Z_out=None):
    """Add ``sum_x sum_t (sum_s J_tilde_x[(t, i), (s, j)] z_x[s, j])^2`` to ``total`` in place.

    ``J_tilde`` is (N, n_positions * r_out, r_in) with one row per (sample,
    source position) pair, source positions ``s`` of a sample consecutive and
    output positions ``t`` major in the second axis (the row layout of
    :mod:`sklearn_lib.collect`); ``Z`` is (N, r_in) and ``total`` (r_out, r_in).
    Feature ``j`` is attributed through all ``n_source_positions`` source
    positions of a sample before squaring, as the reference work defines the
    edges of a section that mixes positions (SPEC section 2); the squares are
    summed over output positions. With ``n_source_positions=1`` every row is
    squared on its own: right for flat layers, and for row-wise sections whose
    rows hold only the diagonal blocks ``s = t`` (the closed forms), where the
    other source positions contribute nothing. ``J_tilde`` is consumed.

    With ``constant`` (r_out,), the constant node's edges are accumulated too
    (see :func:`accumulate_attributions`).
    """
    n, rows, r_in = J_tilde.shape
    attribution = J_tilde.mul_(Z[:, None, :])
    if n_source_positions > 1:
        attribution = attribution.view(
            n // n_source_positions, n_source_positions, rows, r_in
        ).sum(1)
    return accumulate_attributions(
        total, attribution.view(-1, n_positions, rows // n_positions, r_in),
        constant=constant, Z_out=Z_out,
    )


def accumulate_attributions(total, attribution, *, constant=None, Z_out=None, groups=None):
    """Add the squared ``attribution`` (N, P_out, r_out, r_in) to ``total`` (r_out, r_in).

    ``attribution[x, t, i, j] = sum_s J_tilde_x[(t, i), (s, j)] z_x[s, j]``, the
    part of output coordinate ``i`` at position ``t`` that input direction
    ``j`` accounts for; it may be any strided view and is consumed.

    With ``constant`` (r_out,), the constant node's edges are accumulated too:
    the squared part of the output coordinates ``Z_out`` (the next layer's basis
    coordinates at the edge point, one row per (sample, output position) pair,
    (N P_out, r_out)) that the input directions' attributions leave unexplained.

    With ``groups`` (a :class:`~sklearn_lib.basis._error_bars.SourceGroups`),
    the second axis holds random combinations of output positions instead
    (``P_out = m``, combination ``j``, with ``Z_out`` combined alike): their
    squares are added by group too, as :func:`accumulate_edge_chunk` adds them.
    """
    residual = None
    if constant is not None:
        residual = (Z_out.reshape(attribution.shape[:3]) - attribution.sum(-1)).square_()
    if groups is None:
        if residual is not None:
            constant += residual.sum((0, 1))
        total += attribution.square_().sum((0, 1))
        return total
    # Summed over samples only: one row per direction q = j r_out + i.
    r_out, r_in = attribution.shape[2:]
    squares = attribution.square_().sum(0).reshape(-1, r_in)
    if residual is not None:
        residual = residual.sum(0).reshape(-1)
        constant += residual.view(-1, r_out).sum(0)
    _add_to_groups(groups, squares, residual, 0, r_out)
    total += squares.view(-1, r_out, r_in).sum(0)
    return total


def _add_to_groups(groups, squares, residual, start, r_out):
    """Add the squares ``(c, r_in)`` of directions ``start:start + c`` to their groups.

    The constant node's squares ``residual`` (c,) (None without it) go in a last column.
    """
    if residual is not None:
        squares = torch.cat([squares, residual[:, None]], 1)
    groups.add_rows(squares, start, r_out)


def accumulate_edge_chunk(total, J_tilde, Z, start, n_samples, *, constant=None, Z_out=None,
                          groups=None):
    """Add the edges of output directions ``start:start + c`` to ``total`` in place.

    The same sums as :func:`accumulate_edges`, for a chunk of the output
    directions ``q = t * r_out + i`` (output position ``t``, coordinate ``i``)
    in the vector-major layout of streamed products: ``J_tilde`` is ``(c, N,
    r_in)``, one column per row (sample, source position; a sample's source
    positions consecutive), ``Z`` ``(N, r_in)``, ``total`` ``(r_out, r_in)``.
    Direction ``q`` adds to row ``q % r_out``: edges are sums over output
    directions, so chunks add up to the whole. ``Z_out`` ``(n_samples, c)``
    holds the chunk's output coordinates for the constant node. ``J_tilde`` is
    consumed. With ``groups`` (a :class:`~sklearn_lib.basis._error_bars.SourceGroups`),
    the directions are random combinations of output positions (``q = j r_out +
    i``, combination ``j``): their squares, the constant node's as a last
    column, are added by group too.
    """
    c, n_rows, r_in = J_tilde.shape
    attribution = J_tilde.mul_(Z).view(c, n_samples, n_rows // n_samples, r_in)
    attribution = attribution[:, :, 0] if attribution.shape[2] == 1 else attribution.sum(2)
    rows = torch.arange(start, start + c, device=total.device) % total.shape[0]
    residual = None
    if constant is not None:
        residual = (Z_out.T - attribution.sum(-1)).square_().sum(1)
        constant.index_add_(0, rows, residual)
    squares = attribution.square_().sum(1)
    if groups is not None:
        _add_to_groups(groups, squares, residual, start, total.shape[0])
    total.index_add_(0, rows, squares)
    return total
