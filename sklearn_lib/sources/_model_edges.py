"""The edges pass of a live model's sections (:class:`ModelEdges`).

Mixed into :class:`~sklearn_lib.sources._model_source.ModelSource`: the edges of
section l -> l+1 from the model's vector-Jacobian products (streamed by
:class:`~sklearn_lib.sources._products.StreamedProducts`), from a closed form's
edge Jacobians or combined attributions, or from declared attention's
attributions, with the constant node and the error-bar groups of random
position combinations.
"""

import torch

from ..models import _adapters, _collect, _model
from ..models._attention import CausalAttention
from ..models._attention_half import NormAttention
from ..models._attention_stats import combined_attributions
from ..models._fastpath import LinearReadout
from ._closed_forms import inferred_mismatch
from ._edges import (
    Workspace,
    accumulate_attributions,
    accumulate_edge_chunk,
    accumulate_edges,
    path_points,
)
from ._products import _mask_chunk

__all__ = ["ModelEdges"]


def _zero_padded(rows, keep):
    """``rows`` with the rows not marked real by ``keep`` set to 0 (in place)."""
    return rows if keep is None else rows.mul_(keep[:, None].to(rows.dtype))


class ModelEdges:
    """The edges pass, mixed into the model source.

    Uses the source's ``structure``, ``specs``, ``positions``, ``widths``,
    ``dtype``, ``device``, ``model`` and its methods ``_pass``, ``_activation``,
    ``_rows``, ``_real_rows``, ``_output_shape``, ``_signs``, ``_combined``,
    ``_footprint``, ``_attention_work``, ``_formula_memory``, ``_plan_batches``,
    ``_product_chunks``, ``_product_masks`` and ``_chunks``.
    """

    def _output_at(self, x, l, point, shape):
        """Layer l+1's activation (rows) with layer l's replaced by ``point`` (rows)."""
        with torch.no_grad():
            out = _collect._run_section(self.model, self.specs[l], self.specs[l + 1], x,
                                        point.reshape(shape).to(self.model_dtype))
        return self._rows(_model._cast(out, self.dtype), l + 1)

    def _check_points(self, st, l, x, act, points, seed, edge_point):
        """Refuse an inferred closed form whose output or product differs from the model's
        at the edges' points of batch ``x`` (:func:`~._closed_forms.inferred_mismatch`)."""
        for point in points:
            found = inferred_mismatch(self, st, (l, l + 1), x,
                                      point.reshape(act.shape).to(self.model_dtype), seed,
                                      values=True)
            if found is None:
                continue
            kind, err, allowed = found
            a, b = self.specs[l].spec, self.specs[l + 1].spec
            n = _adapters.n_samples(x)
            raise ValueError(
                f"the section {a!r} -> {b!r} {self.inferred[(l, l + 1)]}, and it matched "
                "that formula on every batch of the data, but at the points where the edges "
                f"are taken (edge_point={edge_point!r}, a point of the integration path) its "
                f"{'output' if kind == 'output' else 'vector-Jacobian product'} differs from "
                f"the formula's by up to {err:.3g} (rounding allows {allowed:.3g}) in a batch "
                f"of {n} samples: the model computes something else away from the data. Fit "
                "with fast_path=False (the model's own products) or edge_point='data' "
                "without integration."
            )

    def edges(self, l, V, mean, C, C_pinv, *, edge_point, alphas, weights, out_mean=None,
              position_sources=None, error_groups=None):
        """Edges (r_out, r_in); with ``out_mean``, the constant node's column appended.

        With ``position_sources``, the vector-Jacobian products combine the real
        output positions at random, as in :meth:`jacobian_stats`: the sum
        of squares over output positions is then estimated without bias
        (``E[(sum_t s_t a_t)^2] = sum_t a_t^2``), the constant node's too. A
        transformer block's MLP half in closed form combines its positions
        alike, with the same signs
        (:meth:`~sklearn_lib.models._blocks.NormMLP.combined_attributions`, per
        sample O(m d_s r (2 P + k)) instead of the exact O(P k d_s r)); the
        other closed forms and declared attention stay exact.
        ``error_groups`` keeps the squares of the random combinations by group as well.
        """
        st = self.structure(l, l + 1)
        # A closed form found by its values was checked at the data; the edges use it at
        # other points (the reconstruction, a path from the mean): check it there too.
        off_data = edge_point != "data" or any(alpha != 1.0 for alpha in alphas)
        inferred = st if (l, l + 1) in self.inferred and off_data else None
        E_all = torch.zeros(V.shape[1], C.shape[1] + (out_mean is not None), device=self.device,
                            dtype=self.dtype)
        E, constant = E_all[:, :C.shape[1]], (None if out_mean is None else E_all[:, -1])
        count, workspace = 0, Workspace()
        k, r = V.shape[1], C.shape[1]
        attention, combine, half = None, False, None
        if isinstance(st, CausalAttention):
            attention, st = st, None
        elif isinstance(st, NormAttention):
            # With combined positions, its attributions in closed form; else its products
            # come from _product_chunks, streamed like the model's.
            half = st if self._combined(position_sources, l + 1) else None
            st = None
        if attention is not None:
            # The d_head x r matrices of every head, their three terms, and the result.
            H_e = attention.w_q.shape[0]
            work = self.positions[l + 1] * (4 * H_e * r + 2 * k * r + 2 * self.positions[l] * H_e)
            per_sample = self._footprint(l, work)
        elif st is not None:
            factors = st.edge_factors(V, C_pinv.T)
            # A row-wise block combines its positions in closed form, like the products.
            combine = position_sources is not None and hasattr(st, "combined_attributions")
            # The two edge-GEMM buffers (with combinations: (r, d_s) and twice (r, k)
            # per combination, and twice its signed coordinates per row), plus the
            # activation's copies and derivatives (a block's hidden rows, one set per
            # path point, are wider than the layer).
            d_s = factors[0].shape[1]
            work = self.positions[l] * (8 * self.widths[l]
                                        + 4 * len(alphas) * getattr(st, "d_hidden", 0))
            if combine:
                m = position_sources.m
                work += m * r * (d_s + 2 * k + 2 * self.positions[l])
            else:
                work += self.positions[l] * k * (d_s + r)
            per_sample = self._footprint(l, work)
        size = None
        if half is not None:
            # The formula's forward quantities; its temporaries stay within _formula_memory.
            per_sample = self._footprint(l, self._attention_work(half, l))
        elif attention is None and st is None:
            # The products come in chunks (:meth:`_product_chunks`); the batch is planned
            # from their measured costs.
            per_sample = self._footprint(l + 1, 4 * self.positions[l] * self.widths[l])
            size = self._plan_batches(l, l + 1, V, len(alphas), r, position_sources)
        for i, x in enumerate(self._pass(f"edges {l}", per_sample, size)):
            act = self._activation(x, l, l + 1)
            X = self._rows(act, l)
            n_x = _adapters.n_samples(x)
            # Padded rows are attributed nothing: their coordinates count as 0.
            keep_in = self._real_rows(x, l, act.shape)
            Z = _zero_padded((X - mean) @ C, keep_in)
            points = path_points(X, mean, C, C_pinv, edge_point, alphas)
            if inferred is not None:
                points = list(points)
                self._check_points(inferred, l, x, act, points, i, edge_point)
            signs = None if attention is not None or (st is not None and not combine) else (
                self._signs(position_sources, x, l + 1))
            Z_out = None
            if constant is not None:
                end = next(path_points(X, mean, C, C_pinv, edge_point, [1.0]))
                out = self._output_at(x, l, end, act.shape)
                p_out = out.shape[0] // n_x
                out_shape = self._output_shape(l + 1, n_x, p_out)
                Z_out = _zero_padded((out - out_mean) @ V, self._real_rows(x, l + 1, out_shape))
                if signs is not None and p_out > 1:
                    # The output coordinates combined like the products' positions.
                    Z_out = (signs(p_out) @ Z_out.view(n_x, p_out, -1)).view(-1, Z_out.shape[1])
            if half is not None:
                # An attention half's combined attributions in closed form, never its products.
                n_pos = act.shape[1]
                Y = combined_attributions(half, [p.reshape(act.shape) for p in points], V,
                                          C_pinv.T, Z.view(n_x, n_pos, r), signs(n_pos),
                                          weights=weights, key_mask=_adapters.padding_mask(x),
                                          memory=self._formula_memory())
                accumulate_attributions(E, Y, constant=constant, Z_out=Z_out,
                                        groups=error_groups)
            elif attention is not None and _adapters.padding_mask(x) is None:
                Y, Z_seq = None, Z.view(n_x, -1, r)
                for w, p in zip(weights, points):
                    Y_w = attention.attributions(p.reshape(act.shape), V, C_pinv.T, Z_seq)
                    Y = Y_w.mul_(w) if Y is None else Y.add_(Y_w, alpha=w)
                accumulate_attributions(E, Y, constant=constant, Z_out=Z_out)
            elif st is not None:
                s_bar = None
                for w, p in zip(weights, points):
                    s = st.derivative(p)
                    s_bar = s.mul_(w) if s_bar is None else s_bar.add_(s, alpha=w)
                n_pos = X.shape[0] // n_x
                if signs is not None and n_pos > 1:
                    # Random combinations of the positions, their signs those of Z_out.
                    Y = st.combined_attributions(s_bar, factors, Z, signs(n_pos))
                    accumulate_attributions(E, Y, constant=constant, Z_out=Z_out,
                                            groups=error_groups)
                elif isinstance(st, LinearReadout):
                    # The same Jacobian at every row: no (rows, k, r) tensor.
                    st.accumulate_edges(E, s_bar, factors, Z, constant=constant, Z_out=Z_out)
                else:
                    accumulate_edges(E, st.edge_jacobians(s_bar, factors, workspace), Z,
                                     constant=constant, Z_out=Z_out)
            else:
                # Edges are sums over output directions (output position t, column i):
                # every chunk of them, its products averaged over the path, is reduced
                # into E (and the constant node) on its own.
                products, step = self._product_chunks(
                    l, l + 1, x, [p.reshape(act.shape) for p in points], V, check=i == 0,
                    signs=signs, weights=weights, r=r)
                keep_in, keep_out = self._product_masks(x, l, l + 1, act, products)
                groups = error_groups if products.signs is not None else None
                # The output coordinates of every direction, (n, directions), t major.
                Z_dir = None if Z_out is None else Z_out.reshape(n_x, -1)
                for start, P_bar in self._chunks(products, step, signs):
                    _mask_chunk(P_bar, start, k, keep_in, keep_out)
                    c, n, d = P_bar.shape
                    J_tilde = workspace.get("J_tilde", (c, n, r), P_bar)
                    torch.matmul(P_bar.view(c * n, d), C_pinv.T, out=J_tilde.view(c * n, r))
                    accumulate_edge_chunk(E, J_tilde, Z, start, n_x, constant=constant,
                                          Z_out=None if Z_dir is None
                                          else Z_dir[:, start : start + c], groups=groups)
            count += X.shape[0] if keep_in is None else int(keep_in.sum())
        if error_groups is not None:
            error_groups.scale = 1.0 / count
        return E_all / count
