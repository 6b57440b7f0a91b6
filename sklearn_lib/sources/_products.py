"""Vector-Jacobian products of a live model's sections, streamed within a memory budget.

:class:`StreamedProducts` is the part of
:class:`~sklearn_lib.sources._model_source.ModelSource` that sizes and streams
a batch's products: how many directions a chunk may hold (from the costs of a
section's products measured on one sample, within ``memory_limit``), how many
samples a batch, the chunks in the statistics' precision, and the masks of
padded rows and output positions applied chunk by chunk.
"""

import torch

from ..models import _adapters, _model
from ..models._attention_half import NormAttention
from ..models._jacobian_products import (
    _FORWARD_MARGIN,
    ForwardModeUnsupported,
    JacobianProducts,
    jacobian_bytes,
    prefer_jacobian,
    section_flops,
    tangent_tile,
)
from ..models._vjp import _VJP_ELEMENT_BUDGET, SectionProducts, section_costs
from ..utils._backend import eval_mode
from ..utils._memory import chunk_vectors, format_bytes, plan_batch

__all__ = ["StreamedProducts"]


class StreamedProducts:
    """Streaming of a section's products, mixed into the model source.

    Uses the source's ``model``, ``specs``, ``sequence``, ``dtype``,
    ``model_dtype``, ``vjp_only``, ``memory_limit``, ``positions``, ``widths``, ``data``,
    ``batch_size`` and its methods ``leaves``, ``_footprint``, ``_batches``,
    ``_real_rows`` and ``_output_shape``; keeps the measured costs in ``_costs``,
    with the sections' counted operations and those whose forward-mode passes failed.
    """

    def _product_chunks(self, l, m, x, points, V, *, check, signs=None, weights=None,
                        r=None):
        """``V^T J`` of section l -> m at ``points``, and the directions per chunk to stream.

        Returns a :class:`~sklearn_lib.models._vjp.SectionProducts` (weighted
        over ``points``), or the same products from the section's full
        Jacobian where that is clearly cheaper and fits (:meth:`_jacobian_plan`),
        and the chunk size that fits the budget (see :meth:`_costs_of`); ``r``
        is the input basis's width for the edges' ``J_tilde`` of every chunk.
        With ``signs`` (:meth:`_signs`), ``m k`` directions: random
        combinations of the output positions. A model in a lower precision
        computes the products from ``points`` rounded to its own (exactly its
        recorded values at the data) and with signs as exact units
        (``1/sqrt(m)`` rounded to bfloat16 would bias every estimate alike);
        :meth:`_chunks` casts and scales them before any sum.
        """
        n_points, act = len(points), points[0]
        st = self.structure(l, m) if self.fast_path is not False else None
        if isinstance(st, NormAttention):
            return self._formula_products(st, l, m, x, points, V, signs, weights, r)
        per_sample, per_vector, held = self._costs_of(l, m, x, act, V, n_points, r)
        budget = self._products_budget()
        n = _adapters.n_samples(x)
        n_vectors = self.positions[m] * V.shape[1]  # an upper bound: ``m k`` with signs
        step = chunk_vectors(budget, n, per_sample, per_vector, n_vectors)
        if step == 0 and n_points > 1 and held > 1:
            # Keep one point's saved activations at a time, rerunning the forward
            # passes for every chunk.
            per_sample, per_vector, held = self._costs_of(l, m, x, act, V, 1, r)
            step = chunk_vectors(budget, n, per_sample, per_vector, n_vectors)
        if step == 0:
            if self.memory_limit is not None:
                self._refuse(l, m, n, per_sample, per_vector)
            step = 1
        low = self.model_dtype != self.dtype
        common = {
            "sequence": self.sequence, "check": check, "leaves": self.leaves(l, m),
            "position_signs": (signs.units(self.model_dtype) if low and signs is not None
                               else signs),
            "weights": weights,
        }
        a, b, points = self.specs[l], self.specs[m], [p.to(self.model_dtype) for p in points]
        plan = self._jacobian_plan(l, m, x, act, V, n_points, r, signs)
        if plan is not None:
            try:
                return JacobianProducts(self.model, a, b, x, points, V, max_tangents=plan[1],
                                        **common), plan[0]
            except ForwardModeUnsupported:
                # Some operation has no forward-mode derivative: this section
                # takes vector-Jacobian products from now on.
                self._costs[("no forward mode", l, m)] = True
        products = SectionProducts(self.model, a, b, x, points, V, recompute=held < n_points,
                                   **common)
        return products, step

    def _jacobian_plan(self, l, m, x, act, V, n_points, r, signs):
        """``(step, tangents)`` to take section l -> m's products from its full Jacobian, or None.

        The Jacobian (:class:`~sklearn_lib.models._jacobian_products.JacobianProducts`)
        when :func:`~sklearn_lib.models._jacobian_products.prefer_jacobian`
        finds it clearly cheaper than the vector-Jacobian products, by the
        section's operations counted once per section and shape
        (:func:`~sklearn_lib.models._jacobian_products.section_flops`), and it
        fits the budget with at least one direction per chunk: per sample, the
        Jacobians in the model's dtype (and one combination of their rows
        with combined positions) on top of one point's costs (the points'
        Jacobians are summed as they come); per direction of a chunk
        and per tangent of a forward-mode pass, the measured cost of a
        direction of a backward pass, whose intermediate gradients have the
        shapes of the intermediate tangents. Never for a section whose
        forward-mode passes failed, nor with the user's ``fast_path=False``
        (``vjp_only``: the model's own vector-Jacobian products everywhere).
        """
        if self.vjp_only or ("no forward mode", l, m) in self._costs:
            return None
        p_l, d_l = _model._positions(act.shape[1:], self.sequence, self.specs[l])
        p_m = self.positions[m] if self.positions[m] == 1 else max(self.positions[m], p_l)
        n_in, d_m, k = p_l * d_l, self.widths[m], V.shape[1]
        combined = signs is not None and p_m > 1
        n_vectors = signs.sources.m * k if combined else p_m * k
        if n_vectors < _FORWARD_MARGIN * n_in:
            return None  # the tangents alone cost n_in / n_vectors of the VJPs
        per_sample, _, _ = self._costs_of(l, m, x, act, V, 1, r)
        _, per_vector, _ = self._costs_of(l, m, x, act, V, n_points, r)
        # The Jacobians, and with combined positions one combination of their rows.
        held = jacobian_bytes(1, p_m * d_m, n_in, self.model_dtype.itemsize)
        per_sample += held + (held // p_m if combined else 0)
        budget, n = self._products_budget(), _adapters.n_samples(x)
        step = chunk_vectors(budget, n, per_sample, per_vector, n_vectors)
        if step == 0:
            return None
        tangents = chunk_vectors(budget, n, per_sample, per_vector, n_in)
        key = ("flops", l, m, tuple(act.shape[1:]))
        if key not in self._costs:
            try:
                with eval_mode(self.model):
                    self._costs[key] = section_flops(
                        self.model, self.specs[l], self.specs[m], x, act.to(self.model_dtype),
                        self.leaves(l, m))
            except (RuntimeError, NotImplementedError, TypeError):
                # Operations the counting mode cannot dispatch: no estimate, and
                # the products the model source always had.
                self._costs[key] = None
        if self._costs[key] is None:
            return None
        tile = tangent_tile(n_in, p_m * d_m, n, tangents, cpu=self.device.type == "cpu")
        if not prefer_jacobian(self._costs[key], n_in, tile, n_vectors, d_m, p_m,
                               signs.sources.m if combined else None):
            return None
        return step, tangents

    def _formula_products(self, st, l, m, x, points, V, signs, weights, r):
        """The products of an attention half in closed form, and the directions per chunk."""
        n, T = _adapters.n_samples(x), points[0].shape[1]
        per_sample, per_vector, _ = self._formula_costs(st, l, m, points[0], V, len(points), r)
        step = chunk_vectors(self._products_budget(), n, per_sample, per_vector,
                             self.positions[m] * V.shape[1])
        if step == 0:
            if self.memory_limit is not None:
                self._refuse(l, m, n, per_sample, per_vector)
            step = 1
        products = st.products(points, V, weights=weights,
                               signs=signs(T) if signs is not None and T > 1 else None,
                               key_mask=_adapters.padding_mask(x),
                               memory=self._formula_memory())
        return products, step

    def _formula_memory(self):
        """Bytes an attention half's closed form may hold for its temporaries and factors."""
        return self._products_budget() // 2

    def _formula_costs(self, st, l, m, act, V, n_points, r):
        """``(per_sample, per_vector, n_points)`` of an attention half's closed-form products.

        The formula's own temporaries (bounded by :meth:`_formula_memory`) and
        forward quantities of every point replace the measured costs of the
        model's backward pass; they are computed on one sample, with random
        combinations of positions (their factors are the larger case).
        """
        T = act.shape[1]
        key = ("formula", l, m, T)
        if key not in self._costs:
            probe = st.products([act[:1]], V, signs=act.new_zeros(1, 1, T),
                                memory=self._formula_memory())
            self._costs[key] = probe.costs()
        saved, backward, per_vector = self._costs[key]
        size = self.dtype.itemsize
        per_sample = size * self._footprint(m, 4 * T * self.widths[l]) + backward
        per_sample += n_points * saved
        if r is not None:
            per_vector += size * T * (r + (self.widths[l] if n_points > 1 else 0))
        return per_sample, per_vector, n_points

    def _chunks(self, products, step, signs):
        """``products.chunks(step)`` in ``dtype``: cast from the model's precision before any sum.

        With random signs given as units (:meth:`_product_chunks`), their
        ``1/sqrt(m)`` is applied here, in ``dtype``.
        """
        low = self.model_dtype != self.dtype
        for start, chunk in products.chunks(step):
            if low:
                chunk = chunk.to(self.dtype)
                if products.signs is not None:
                    chunk.mul_(signs.scale)
            yield start, chunk

    def _products_budget(self):
        """Bytes a batch of products may hold: ``memory_limit``, or 2**26 numbers."""
        if self.memory_limit is not None:
            return self.memory_limit
        return _VJP_ELEMENT_BUDGET * self.dtype.itemsize

    def _costs_of(self, l, m, x, act, V, n_points=1, r=None):
        """Bytes per sample and per product vector of section l -> m's products on batch ``x``.

        Measured once per section and shape (:func:`section_costs`): per
        sample, the model's forward pass up to layer m (:meth:`_footprint`),
        the activation's copies, the section's saved activations (of every
        point of an integration path, ``held`` of them) and the backward
        pass's own; per vector, its backward pass and product, its cotangent,
        and for the edges (``r``) its ``J_tilde`` and, with several points,
        the weighted sum of their products. Returns ``(per_sample,
        per_vector, held)``.
        """
        st = self.structure(l, m) if self.fast_path is not False else None
        if isinstance(st, NormAttention):
            return self._formula_costs(st, l, m, act, V, n_points, r)
        key = (l, m, tuple(act.shape[1:]))
        if key not in self._costs:
            with eval_mode(self.model):
                self._costs[key] = section_costs(
                    self.model, self.specs[l], self.specs[m], x, act.to(self.model_dtype), V,
                    sequence=self.sequence, leaves=self.leaves(l, m))
        saved, backward, per_vector = self._costs[key]
        size = self.dtype.itemsize
        # Batches of sequences may be longer than the first one.
        p_l, _ = _model._positions(act.shape[1:], self.sequence, self.specs[l])
        p_m = self.positions[m] if self.positions[m] == 1 else max(self.positions[m], p_l)
        per_sample = size * self._footprint(m, 4 * p_l * self.widths[l]) + backward
        per_sample += n_points * saved
        per_vector += size * p_m * self.widths[m]  # its cotangent
        if r is not None:
            per_vector += size * p_l * (r + (self.widths[l] if n_points > 1 else 0))
        return per_sample, per_vector, n_points

    def _plan_batches(self, l, m, V, n_points=1, r=None, position_sources=None):
        """Samples per batch for a pass of section l -> m's products (None: the pass decides).

        From the costs measured on the first sample (:meth:`_costs_of`):
        as many whole samples as fit the budget, or one sample whose
        products are streamed in chunks.
        """
        if self.batch_size is not None or not (_model._is_array(self.data)
                                               or _adapters.is_dict_batch(self.data)):
            return None
        x = next(iter(self._batches(1)), None)
        if x is None:
            return None
        with eval_mode(self.model), torch.no_grad():
            act = _model._cast(_model._record_batch(self.model, [self.specs[l]], x)[
                self.specs[l].spec], self.dtype)
        per_sample, per_vector, _ = self._costs_of(l, m, x, act, V, n_points, r)
        k = V.shape[1]
        n_vectors = (position_sources.m * k if position_sources is not None
                     and self.positions[m] > 1 else self.positions[m] * k)
        n, _ = plan_batch(self._products_budget(), per_sample, per_vector, n_vectors)
        if n == 0:
            # One point at a time along the path; refused by the pass if even that fails.
            per_sample, per_vector, _ = self._costs_of(l, m, x, act, V, 1, r)
            n, _ = plan_batch(self._products_budget(), per_sample, per_vector, n_vectors)
        return max(1, n)

    def _refuse(self, l, m, n, per_sample, per_vector):
        one = per_sample + per_vector
        raise ValueError(
            f"memory_limit={format_bytes(self.memory_limit)} is too small for the products of "
            f"section {self.specs[l].spec!r} -> {self.specs[m].spec!r} on a batch of {n} "
            f"sample(s): one sample with one product vector needs about {format_bytes(one)} "
            f"({format_bytes(per_sample)} for the sample's forward pass and the section's "
            f"saved activations, {format_bytes(per_vector)} per product vector), a batch of "
            f"{n} about {format_bytes(n * one)}. Raise memory_limit to at least "
            f"{format_bytes(n * one, up=True)}" + (", or use smaller batches." if n > 1 else
                                          ", or use shorter sequences.")
        )

    def _product_masks(self, x, l, m, act, products):
        """The real rows of layer l and output positions of layer m (None where none are padded).

        Rows ``(B * P_l,)``; output positions ``(B, P_m)``, only for products of
        one output position each: random combinations of positions have sign 0
        at padded positions already (see :meth:`_signs`).
        """
        n = _adapters.n_samples(x)
        keep_in = self._real_rows(x, l, act.shape)
        if products.signs is not None:
            return keep_in, None
        keep_out = self._real_rows(x, m, self._output_shape(m, n, products.p_out))
        return keep_in, None if keep_out is None else keep_out.view(n, products.p_out)


def _mask_chunk(chunk, start, k, keep_in, keep_out):
    """Zero the products of padded input rows and padded output positions, in place.

    ``chunk`` holds directions ``start:start + c`` (``(c, B * P_l, d_l)``,
    direction ``q = t * k + i`` of output position ``t``); ``keep_in`` marks
    the real rows, ``keep_out`` ``(B, P_m)`` the real output positions (None:
    nothing padded).
    """
    if keep_out is not None:
        c, n = chunk.shape[0], keep_out.shape[0]
        t = torch.arange(start, start + c, device=chunk.device) // k
        chunk.view(c, n, -1, chunk.shape[-1]).mul_(
            keep_out.T[t].to(chunk.dtype)[:, :, None, None])
    if keep_in is not None:
        chunk.mul_(keep_in.to(chunk.dtype)[None, :, None])
    return chunk
