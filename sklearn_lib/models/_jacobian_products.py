"""A section's products ``V^T J`` from its full Jacobian, formed by forward-mode passes.

:class:`~._vjp.SectionProducts` computes one vector-Jacobian product per
direction: ``P_out k`` (or ``m k`` with random position signs) backward
passes. When that is clearly more than the section's ``P_in d_in`` input
coordinates (an expanding section with many kept directions), forming the
per-sample Jacobian with one Jacobian-vector product per input coordinate and
contracting it with the directions is cheaper. :class:`JacobianProducts` does
that, with the interface of ``SectionProducts``, so that the model source
streams either (``sources/_products.py`` chooses, and falls back to the
vector-Jacobian products where an operation has no forward-mode derivative).
"""

from math import prod

import torch
from torch.utils.flop_counter import FlopCounterMode

from ._adapters import take
from ._sections import _math_attention
from ._vjp import section_callable, set_directions, set_points

# The full Jacobian is taken when its estimated cost is at most 1 / this of the
# vector-Jacobian products' (:func:`estimated_speedup`). Measured on one CPU thread
# (benchmarks/bench_jacobian_products.py), the forward-mode passes and the
# contraction ran 0.8-0.9x as fast per counted operation as vectorised backward
# passes: a predicted 2.2x gained 1.9x, a predicted 1.2x about 1.1x (a tie).
_FORWARD_MARGIN = 2


# On the CPU a vectorised forward-mode pass holds tangents and outputs of about
# this many elements (8 MiB in float64). Unlike a backward pass, every pass also
# recomputes the primal forward: on the benchmark's sections (d_in 32 and 128 ->
# 512 through 512, 64 samples) passes of 25-32 tangents took 0.05 and 0.18 s,
# passes of 6-7 (``_CPU_TILE_ELEMENTS``, the backward passes' size) 0.07 and 0.22 s.
_CPU_TANGENT_ELEMENTS = 2**20


class ForwardModeUnsupported(RuntimeError):
    """A section's forward-mode passes failed: take its vector-Jacobian products instead."""


def jacobian_bytes(batch, n_out, n_in, itemsize):
    """Bytes of the Jacobians ``(n_out, batch, n_in)`` that :class:`JacobianProducts` holds."""
    return batch * n_out * n_in * itemsize


def section_flops(model, a, b, x, act, leaves=None):
    """``(forward, backward)``: operations of section a -> b's passes on the first sample.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
    convolutions and attention; elementwise operations count nothing).
    ``forward`` is the pass as the products run it (from the inputs ``x``
    unless ``leaves``), which every vectorised forward-mode pass repeats for
    its primal values; ``backward`` is one vector-Jacobian product, back to
    ``a`` only, and about what one tangent costs (tangents go through the
    same matrix products as cotangents, in the other order).
    """
    section = section_callable(model, a, b, take(x, slice(0, 1)), leaves)
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with torch.no_grad(), _math_attention():
        with forward:
            out, vjp_fn = torch.func.vjp(section, act[:1])
        cotangent = torch.zeros_like(out)
        cotangent.view(-1)[0] = 1
        with backward:
            vjp_fn(cotangent)
    return forward.get_total_flops(), backward.get_total_flops()


def tangent_tile(n_in, n_out, batch, max_tangents=None, *, cpu):
    """Tangents per vectorised forward-mode pass (see :class:`JacobianProducts`)."""
    tile = n_in if max_tangents is None else max(1, min(n_in, int(max_tangents)))
    if cpu:
        tile = max(1, min(tile, _CPU_TANGENT_ELEMENTS // max(1, batch * (n_in + n_out))))
    # Tiles of equal size: every pass also recomputes the primal forward.
    return -(-n_in // -(-n_in // tile))


def estimated_speedup(flops, n_in, tile, n_vectors, d_out, p_out, m=None):
    """The cost of ``n_vectors`` vector-Jacobian products over that of the full Jacobian.

    With ``flops = (forward, backward)`` (:func:`section_flops`), the
    vector-Jacobian products cost a forward pass and ``n_vectors`` backward
    ones; the Jacobian ``n_in`` tangents (a backward pass each) and a forward
    pass per ``tile`` of them, plus its contraction, ``2 d_out n_in`` per
    direction and, with ``m`` random combinations of the ``p_out`` output
    positions, ``2 m p_out d_out n_in`` for the combined rows.
    """
    forward, backward = flops
    contraction = 2 * n_vectors * d_out * n_in
    if m is not None:
        contraction += 2 * m * p_out * d_out * n_in
    jacobian = n_in * backward + -(-n_in // tile) * forward + contraction
    return (forward + n_vectors * backward) / jacobian


def prefer_jacobian(*args, **kwargs):
    """Whether :func:`estimated_speedup` reaches ``_FORWARD_MARGIN``: the Jacobian clearly wins."""
    return estimated_speedup(*args, **kwargs) >= _FORWARD_MARGIN


class JacobianProducts:
    """The products ``V.T @ J`` of a section for one batch, from its full Jacobian.

    The per-sample Jacobians ``J`` are formed once by ``torch.func.jvp``,
    ``torch.func.vmap``-ped over tiles of one-hot tangents, each input
    coordinate's tangent broadcast to all samples (valid because samples are
    independent, as for the vector-Jacobian products). They are held
    output-major, ``(P_out * d_out, B, P_in * d_in)``, so that a chunk's
    directions of one output position are one matrix product. With several ``points`` and their
    ``weights`` it is the weighted sum of the points' Jacobians (the products
    are linear in ``J``), so one is held whatever the number of points.
    :meth:`chunks` then contracts it with the directions of
    :class:`~._vjp.SectionProducts`, chunk by chunk and in the same order:
    direction ``q = t * k + c`` is ``V[:, c]^T J[t]`` (output position
    ``t``), or with ``position_signs`` ``q = j * k + c`` is ``V[:, c]^T
    sum_t s_jt J[t]`` with the signs of every sample its own.

    Parameters
    ----------
    model, a, b, x, points, cotangents, sequence, check, leaves, position_signs, weights
        As for :class:`~._vjp.SectionProducts`.
    max_tangents : int, optional
        Tangents per vectorised forward pass (memory: their intermediate
        tangents); None takes all at once. On the CPU a pass holds at most
        ``_CPU_TANGENT_ELEMENTS`` numbers of tangents and outputs.

    Attributes
    ----------
    n_vectors, k, p_in, d_in, p_out, d_out, batch : int
        Directions, columns of ``V``, input and output positions and widths,
        samples.
    tile : int
        Tangents per vectorised forward pass.
    jacobian : torch.Tensor of shape (P_out * d_out, B, P_in * d_in)
        The (weighted) Jacobians, in the model's dtype: ``jacobian[(t, i), x,
        (s, j)] = d out[x, t, i] / d in[x, s, j]``.

    Raises
    ------
    ForwardModeUnsupported
        If the forward-mode passes fail (an operation or ``autograd.Function``
        without a forward-mode derivative or batching rule); the error it
        wraps is its ``__cause__``.
    """

    def __init__(self, model, a, b, x, points, cotangents, *, sequence, check, leaves=None,
                 position_signs=None, weights=None, max_tangents=None):
        set_points(self, model, a, b, x, points, weights, leaves, sequence=sequence,
                   check=check)
        self.in_shape = tuple(self.points[0].shape[1:])
        self._section = section_callable(model, a, b, x, leaves)
        with torch.no_grad(), _math_attention():
            out = self._section(self.points[0])
        set_directions(self, out, cotangents, sequence=sequence, position_signs=position_signs)
        n_in, n_out = self.p_in * self.d_in, prod(self.out_shape)
        self.tile = tangent_tile(n_in, n_out, self.batch, max_tangents,
                                 cpu=out.device.type == "cpu")
        del out
        self.jacobian = self._jacobian(n_in, n_out)
        self._group = (None, None)

    def _jacobian(self, n_in, n_out):
        """The weighted Jacobians ``(n_out, B, n_in)``: columns ``tile`` at a time."""
        first = self.points[0]
        J = first.new_zeros(n_out, self.batch, n_in)
        shape = (self.batch, *self.in_shape)

        def column(point):
            return lambda v: torch.func.jvp(self._section, (point,), (v,))[1]

        try:
            with torch.no_grad(), _math_attention():
                for w, point in zip(self.weights, self.points):
                    derivative = torch.func.vmap(column(point))
                    for lo in range(0, n_in, self.tile):
                        hi = min(lo + self.tile, n_in)
                        tangents = first.new_zeros(hi - lo, n_in)
                        rows = torch.arange(hi - lo, device=first.device)
                        tangents[rows, rows + lo] = 1
                        # Materialised over the batch like the cotangents: no
                        # operation sees a batch axis of stride 0, for no more
                        # memory than the pass's outputs.
                        tangents = tangents.view(hi - lo, 1, *self.in_shape).expand(
                            hi - lo, *shape).contiguous()
                        cols = derivative(tangents).reshape(hi - lo, self.batch, n_out)
                        J[:, :, lo:hi].add_(cols.permute(2, 1, 0), alpha=w)
        except (RuntimeError, NotImplementedError) as exc:
            raise ForwardModeUnsupported(
                f"section {self.a.spec!r} -> {self.b.spec!r} has no forward-mode derivative "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return J

    def _combined(self, g):
        """Output position ``g``'s rows of ``J`` (or combination ``g``'s), ``(d_out, B * n_in)``.

        The last combination is kept: consecutive chunks share it.
        """
        n, n_in = self.batch, self.p_in * self.d_in
        J = self.jacobian.view(self.p_out, self.d_out, n, n_in)
        if self.signs is None:
            return J[g].view(self.d_out, n * n_in)
        if self._group[0] != g:
            # sum_t s_jt J[t], the signs of sample x on its rows: one pass over J.
            s = self.signs[:, g].to(J.dtype).T[:, None, :, None]  # (P_out, 1, B, 1)
            combined = J[0] * s[0]
            for t in range(1, self.p_out):
                combined.addcmul_(J[t], s[t])
            self._group = (g, combined.view(self.d_out, n * n_in))
        return self._group[1]

    def chunks(self, max_vectors):
        """Yield ``(start, products)``: directions ``start:start + c`` as ``(c, B * P_in, d_in)``.

        ``max_vectors`` directions per chunk (at least 1). Each chunk is a new
        tensor the caller may modify.
        """
        step, k = max(1, int(max_vectors)), self.k
        rows = self.batch * self.p_in
        with torch.no_grad():
            for start in range(0, self.n_vectors, step):
                stop = min(start + step, self.n_vectors)
                out = self.jacobian.new_empty(stop - start, rows * self.d_in)
                for g in range(start // k, (stop - 1) // k + 1):
                    lo, hi = max(start, g * k), min(stop, (g + 1) * k)
                    torch.matmul(self.basis_t[lo - g * k : hi - g * k], self._combined(g),
                                 out=out[lo - start : hi - start])
                yield start, out.view(stop - start, rows, self.d_in)
            self._group = (None, None)
