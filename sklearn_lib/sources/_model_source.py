"""Statistics and edges from a live torch model (:class:`ModelSource`).

The source runs the model once per pass over the data and computes
``C_{l+1}^T J_l`` with vectorised vector-Jacobian products, never forming full
Jacobians, or in closed form for the sections :mod:`sklearn_lib.models._fastpath`,
:mod:`sklearn_lib.models._attention`, :mod:`sklearn_lib.models._block_detect` and
:mod:`sklearn_lib.models._attention_detect` (the MLP and attention halves of GPT-2,
GPT-NeoX and Llama blocks) recognise; its edges pass is
:class:`~sklearn_lib.sources._model_edges.ModelEdges`. It exposes the operations of
:class:`~sklearn_lib.sources._cached.CachedSource`, so the backward chaining of
:class:`~sklearn_lib.InteractionGraph` is written once.
"""

import numpy as np
import torch
from tqdm.auto import tqdm

from ..basis._stats import AUTO_CHUNK_NUMBERS, output_weights
from ..models import _adapters, _collect, _model
from ..models._attention import CausalAttention
from ..models._attention_half import NormAttention
from ..models._attention_stats import combined_scatter
from ..models._blocks import accumulator
from ..models._fastpath import (
    LinearElementwise,
    ResidualMLP,
)
from ..models._independence import PROBE_SAMPLES, check_independent
from ..models._vjp import (
    floating_dtype,
)
from ..utils._backend import eval_mode, model_device, resolve_dtype, resolve_model_dtype
from ..utils._memory import format_bytes, parse_memory_limit
from ._cached import _shape
from ._closed_forms import same_values
from ._model_edges import ModelEdges
from ._passes import Fingerprint, PassLog
from ._products import StreamedProducts, _mask_chunk
from ._section_forms import SectionForms

# Samples of the first batch on which a closed form is inferred from values: the
# candidates' readings are tried on them, and every batch is checked later anyway.
_INFERENCE_SAMPLES = 8


def _keep(rows, keep):
    """The rows marked real by ``keep`` (all rows when it is None)."""
    return rows if keep is None else rows[keep]


def _describe(data):
    """``data`` in a few words for error messages: its type, and its shape if it has one."""
    shape = getattr(data, "shape", None)
    return type(data).__name__ + ("" if shape is None else f" of shape {_shape(data)}")


def _layer_rtol(dtype, device):
    """What rounding allows between two passes' values of a layer, relative to their scale.

    ``sqrt(eps)``: batches of other sizes may run other kernels, which round
    differently; 1e-2 for float32 on CUDA, where TF32 kernels may be chosen.
    Values that change from pass to pass (noise) differ by far more.
    """
    if torch.device(device).type == "cuda" and dtype == torch.float32:
        return 1e-2
    return float(torch.finfo(dtype).eps) ** 0.5


class ModelSource(ModelEdges, StreamedProducts, SectionForms):
    """Activations from a live model; ``V^T J`` by vector-Jacobian products or closed forms."""

    def __init__(self, model, layers, data, *, sequence, batch_size, device, dtype,
                 fast_path, verbose, model_dtype=None, memory_limit=None):
        if isinstance(layers, str) or not hasattr(layers, "__len__") or len(layers) < 2:
            raise ValueError(
                f"layers must be a list of at least 2 layer names in forward order, got "
                f"{layers!r}."
            )
        if iter(data) is data:
            raise ValueError(
                "data must be re-iterable (a tensor, an array or a DataLoader): the graph "
                "iterates it twice per layer; got a one-shot iterator "
                f"({type(data).__name__})."
            )
        self.dtype = resolve_dtype(dtype)
        run_dtype = resolve_model_dtype(model_dtype, dtype)
        self.model = _collect.prepare_model(model, device=device,
                                            dtype="model" if run_dtype is None else run_dtype)
        self.device = model_device(self.model)
        # The model may run in a lower precision (float32, bfloat16) than the
        # statistics: activations and products are cast to ``dtype`` before
        # anything is summed, so sums over many samples round in ``dtype`` and
        # only the model's own values carry its rounding.
        self.model_dtype = floating_dtype(self.model, self.dtype)
        # The user's fast_path=False asks for the model's own vector-Jacobian products
        # everywhere (no full Jacobians either); a lower precision only turns off the
        # closed forms.
        self.vjp_only = fast_path is False
        if self.model_dtype != self.dtype:
            if fast_path is True:
                raise ValueError(
                    f"fast_path=True needs the model in the statistics' dtype ({self.dtype}), "
                    f"but it runs in {self.model_dtype} (model_dtype={model_dtype!r}): the "
                    "closed forms read its parameters in that dtype. Use fast_path='auto' "
                    "or model_dtype=None."
                )
            # The closed forms compute from the parameters in the statistics' dtype;
            # with a model in another one every section takes the model's own products.
            fast_path = False
        self.specs = _model._parse_layers(self.model, list(layers), "output")
        self.data, self.sequence, self.verbose = data, sequence, verbose
        self.batch_size = batch_size
        # Bytes a pass's batch may hold (None: the automatic budgets).
        self.memory_limit = parse_memory_limit(memory_limit)
        # Measured costs of sections' products (section_costs), by section and shape.
        self._costs = {}
        # Called with the samples of every batch a pass completes (the fit's progress bar).
        self.progress = None

        # A probe on two samples gives every layer's shape (and fails early).
        first = next(iter(self._batches(self.batch_size or _model._PROBE_SAMPLES)), None)
        probe_samples = 0 if first is None else _adapters.n_samples(first)
        if probe_samples == 0:
            raise ValueError(f"fit_model needs at least 2 samples, got 0 ({_describe(data)}).")
        # What every pass over the data must see again (set by the first pass).
        self._passes = PassLog(_describe(data), probe_samples,
                               _layer_rtol(self.model_dtype, self.device))
        with eval_mode(self.model), torch.no_grad():
            _model._check_forward(self.model, first)
            probe = _model._record_batch(
                self.model, self.specs, _adapters.take(first, slice(0, _model._PROBE_SAMPLES))
            )
        shapes = [tuple(probe[s.spec].shape[1:]) for s in self.specs]
        pw = [_model._positions(sh, sequence, s) for sh, s in zip(shapes, self.specs)]
        self.positions = [p for p, _ in pw]
        self.widths = [d for _, d in pw]
        self._shapes = shapes
        self._structures, self._leaves, self._readouts = {}, {}, {}
        # Why a section found in closed form takes the generic path (for messages).
        self.reasons = {}
        # Sections whose closed form was inferred from values (models/_inferred): what was
        # found, and the samples it was found on.
        self.inferred = {}
        self._inference_batch = _adapters.take(first, slice(0, _INFERENCE_SAMPLES))
        self.fast_path = fast_path
        # Numbers per sample of the recorded layers up to each layer (see _footprint).
        self._forward = np.cumsum([p * d for p, d in zip(self.positions, self.widths)]).tolist()

        # Samples must be independent and the model deterministic: probed on up to 64
        # samples, no more than a pass's batch holds (a DataLoader's first batch).
        batch = first
        if self.batch_size is None and (_model._is_array(data) or _adapters.is_dict_batch(data)):
            size = AUTO_CHUNK_NUMBERS // max(1, self._footprint(self.n_layers - 1, 0))
            size = min(PROBE_SAMPLES, max(_model._PROBE_SAMPLES, size))
            batch = next(iter(self._batches(size)), None)
            batch = first if batch is None else batch
        with eval_mode(self.model), torch.no_grad():
            check_independent(self.model, self.specs, batch)

    @property
    def n_layers(self):
        return len(self.specs)

    @property
    def n_samples(self):
        """Samples of the data, once a pass has counted them (None before)."""
        return self._passes.n_samples

    def _batches(self, batch_size):
        batches, _ = _model._iter_batches(self.data, batch_size)
        for batch in batches:
            yield _model._input_tensor(batch, self.device, self.model_dtype)

    def _footprint(self, m, work):
        """Numbers per sample a pass holds: the forward pass up to layer m plus ``work``.

        The forward pass holds at least every recorded layer up to m, and
        between two recorded layers usually one more tensor as wide (a
        Linear's output before its activation): twice their sum. ``work``
        counts the pass's own tensors (copies of the activation, derivatives,
        products, cotangents, scatter inputs).
        """
        return 2 * self._forward[m] + work

    def _pass(self, desc, per_sample, size=None):
        """Iterate over the data once; ``per_sample`` numbers of memory per sample.

        With ``batch_size=None``, array data are cut into batches of ``size``
        samples, or that hold about 2**23 numbers in all (``memory_limit``
        bytes with one; ``per_sample`` comes from :meth:`_footprint`), so that
        memory stays flat in the number of samples on every pass. A
        DataLoader keeps its own batches.
        """
        if size is None and self.memory_limit is not None:
            budget = self.memory_limit // self.dtype.itemsize
            if per_sample > budget:
                raise ValueError(
                    f"memory_limit={format_bytes(self.memory_limit)} is too small for the "
                    f"{desc!r} pass: one sample needs about "
                    f"{format_bytes(per_sample * self.dtype.itemsize, up=True)}; raise memory_limit."
                )
            size = budget // per_sample
        size = self.batch_size or size or max(1, AUTO_CHUNK_NUMBERS // max(1, per_sample))
        batches, total = _model._iter_batches(self.data, size)
        bar = tqdm(total=total, desc=desc, disable=not self.verbose, leave=False, unit="sample")
        fingerprint = Fingerprint()
        self._passes.start()
        with bar:
            for batch in batches:
                x = _model._input_tensor(batch, self.device, self.model_dtype)
                yield x
                fingerprint.add(x)
                bar.update(_adapters.n_samples(x))
                if self.progress is not None:
                    self.progress(_adapters.n_samples(x))
        self._passes.finish(desc, fingerprint)

    def _activation(self, x, l, m=None):
        """Layer l's activation for inputs ``x``; the forward pass stops right there.

        When section l -> m is a readout (:meth:`readout`), the pass runs on to
        the readout module and checks that it still reads exactly this value.
        """
        spec, captured = self.specs[l], []
        readout = None if m is None else self.readout(l, m)
        check = readout is not None and readout.spec != spec.spec

        def grab(value):
            # A copy: a following in-place op must not change the recorded value.
            captured.append(value.detach().clone())
            if not check:
                raise _model._StopForward

        def compare(value):
            if captured and not same_values(captured[0], value):
                raise ValueError(
                    f"section {spec.spec!r} -> {self.specs[m].spec!r} was taken for module "
                    f"{readout.name!r} applied to layer {spec.spec!r}, as it was on the first "
                    f"batch, but in {_adapters.describe(x)} the module's input is not that "
                    "layer's value; pass fast_path=False if the model computes it otherwise "
                    "for some inputs."
                )
            raise _model._StopForward

        hooks = [(spec, grab)] + ([(readout, compare)] if check else [])
        with torch.no_grad(), _model._hooks(hooks):
            _model._run_until_stopped(self.model, x)
        if not captured:
            raise ValueError(f"layer {spec.spec!r} was not called in the forward pass.")
        return self.recorded(captured[0], l, x)

    def recorded(self, value, l, x):
        """Layer l's recorded ``value`` for inputs ``x``, cast, checked and noted for the pass.

        Checked here, where the layer and the inputs are known (the statistics
        would only say "X"); one reduction per batch, as the statistics do.
        """
        act = _model._cast(value, self.dtype)
        # Only real positions: padded ones depend on the width a batch was padded to.
        real = self._real_rows(x, l, act.shape)
        self._passes.layer(self.specs[l].spec, act,
                           None if real is None else real.view(act.shape[0], -1))
        if act.is_floating_point() and not bool(torch.isfinite(act).all()):
            if not bool(torch.isfinite(_adapters.flat_numbers(x)).all()):
                raise ValueError(
                    f"the data contain NaN or infinity (in {_adapters.describe(x)})."
                )
            raise ValueError(
                f"layer {self.specs[l].spec!r} is NaN or infinite for finite inputs (in "
                f"{_adapters.describe(x)}): the model overflows or divides by zero there."
            )
        return act

    def _real_rows(self, x, l, shape):
        """Rows of layer l (activation ``shape``) that are real positions (bool), or None.

        Positions where a dict batch's ``attention_mask`` is 0 are padding: they
        enter neither the statistics nor the edges.
        """
        return _model._row_mask(self.specs[l], _adapters.padding_mask(x), shape, self.sequence)

    def _output_shape(self, l, n, n_positions):
        """Layer l's activation shape for ``n`` samples of ``n_positions`` positions."""
        shape = self._shapes[l]
        return (n, n_positions, *shape[1:]) if len(shape) >= 2 else (n, *shape)

    def _rows(self, act, l):
        return _model._as_rows(act, self.sequence, self.specs[l])

    def _signs(self, position_sources, x, m):
        """The position signs of batch ``x`` for a section into layer m, or None.

        See :meth:`PositionSources.batch`: padded output positions of layer m
        take sign 0, so the random combinations are over the real positions
        only and estimate the exact (masked) sums without bias.
        """
        if position_sources is None:
            return None
        n = _adapters.n_samples(x)
        real = None
        if _adapters.padding_mask(x) is not None:
            def real(n_positions):
                return self._real_rows(x, m, self._output_shape(m, n, n_positions))
        return position_sources.batch(n, self.dtype, real)

    def activation_stats(self, l, new_stats):
        stats = new_stats(l, None)
        # The activation, its recorded copy, and the scaled and centred copies
        # the statistics make.
        work = 4 * self.positions[l] * self.widths[l]
        for x in self._pass(f"layer {l}", self._footprint(l, work)):
            act = self._activation(x, l)
            stats.update(_keep(self._rows(act, l), self._real_rows(x, l, act.shape)))
        return stats

    def jacobian_stats(self, l, V, new_stats, target=None, position_sources=None,
                       error_groups=None):
        """Statistics of layer l with ``V^T J`` of section l -> target (default l + 1).

        The Jacobian scatter is accumulated here (in closed form or from the
        products) and added to Jacobian-free statistics at the end. With
        ``position_sources``, the vector-Jacobian products combine the real
        output positions at random (an unbiased estimate of the scatter, see
        :meth:`_signs`); closed forms and declared attention stay exact.
        ``error_groups`` (a :class:`~sklearn_lib.basis._error_bars.SourceGroups`)
        keeps the scatter of the random combinations by group as well.
        """
        m = l + 1 if target is None else target
        stats = new_stats(l, None)
        st = self.structure(l, m)
        a, b = self.specs[l], self.specs[m]
        k = V.shape[1]
        if st is not None and not isinstance(st, (CausalAttention, NormAttention)):
            # The scatter's sums, accumulated row by row (for a NormMLP they depend on V).
            scatter = accumulator(st, V)
            # The activation's copies and the derivative with its autograd
            # temporaries (a block's hidden rows are wider than the layer).
            work = self.positions[l] * (8 * max(self.widths[l], self.widths[m])
                                        + 6 * getattr(st, "d_hidden", 0))
            for x in self._pass(f"layer {l}", self._footprint(l, work)):
                act = self._activation(x, l, m)
                # The closed form acts row by row: padded rows are simply left out.
                X = _keep(self._rows(act, l), self._real_rows(x, l, act.shape))
                stats.update(X)
                scatter.update(X)
            n_out = self.positions[m] * V.shape[1]
            return stats.add_jacobian_scatter_(scatter.result(), n_outputs=n_out,
                                               signed_sums=_closed_form_sums(
                                                   st, V, getattr(scatter, "s_sum", None),
                                                   scatter.n, n_out))
        if isinstance(st, NormAttention) and self._combined(position_sources, m):
            return self._attention_stats(l, m, st, V, stats, position_sources, error_groups)
        width = max(self.widths[l], self.widths[m])
        # A declared attention section, or None; an attention half (NormAttention)
        # gives its products in closed form, streamed like the model's own.
        attention = st if isinstance(st, CausalAttention) else None
        if attention is not None:
            # The product at s = t, U K_t and the attention's per-head temporaries.
            H_e = attention.w_q.shape[0]
            work = self.positions[m] * (3 * k * width + 4 * self.positions[l] * H_e)
            size = None
        else:
            # The products come in chunks (:meth:`_product_chunks`); the batch is planned
            # from their measured costs.
            work = 4 * self.positions[l] * width
            size = self._plan_batches(l, m, V, position_sources=position_sources)
        scatter = None
        sums = torch.zeros(self.widths[l], 2, device=self.device, dtype=self.dtype)
        U = output_weights(self.positions[m] * k, device=self.device, dtype=self.dtype)
        for i, x in enumerate(self._pass(f"layer {l}", self._footprint(m, work), size)):
            act = self._activation(x, l, m)
            # A declared attention formula attends to every (earlier) position; the
            # model leaves padded positions out of its attention, so a padded batch
            # takes the model's own products.
            if attention is not None and _adapters.padding_mask(x) is None:
                stats.update(self._rows(act, l))
                part = attention.jacobian_scatter(act, V)
                scatter = part if scatter is None else scatter.add_(part)
                sums = None  # the closed form has no signed sums (see add_jacobian_scatter_)
                continue
            signs = self._signs(position_sources, x, m)
            products, step = self._product_chunks(l, m, x, [act], V, check=i == 0, signs=signs)
            keep_in, keep_out = self._product_masks(x, l, m, act, products)
            stats.update(_keep(self._rows(act, l), keep_in))
            if products.n_vectors != U.shape[0]:
                sums = None  # random combinations of positions: no sums of outputs
            # Random combinations of positions are kept by group for the error bars.
            grouped = error_groups is not None and products.signs is not None
            # The scatter is a sum over product vectors: one GEMM per chunk of
            # (row, output) pairs, accumulated in place; the finished scatter is
            # checked for NaN/inf once instead of every batch.
            for start, chunk in self._chunks(products, step, signs):
                _mask_chunk(chunk, start, k, keep_in, keep_out)
                if grouped:
                    error_groups.add_scatter(chunk, start, k)
                else:
                    P = chunk.view(-1, self.widths[l])
                    scatter = P.T @ P if scatter is None else scatter.addmm_(P.T, P)
                if sums is not None:
                    # Signed sums that orient the basis (output position t major).
                    sums.addmm_(chunk.sum(1).T, U[start : start + len(chunk)])
        if error_groups is not None:
            scatter = error_groups.added_to(scatter)
        if not bool(torch.isfinite(scatter).all()):
            raise ValueError(
                f"the Jacobian products of section {a.spec!r} -> {b.spec!r} contain NaN or "
                "infinity."
            )
        return stats.add_jacobian_scatter_(scatter, n_outputs=self.positions[m] * k,
                                           signed_sums=sums)

    def _combined(self, position_sources, m):
        """Whether a section into layer m combines its output positions at random."""
        return position_sources is not None and self.positions[m] > 1

    def _attention_work(self, section, l):
        """Numbers per sample an attention half's forward quantities hold (weights and heads)."""
        T = self.positions[l]
        return 2 * section.n_heads * T * (T + 4 * section.d_head) + 8 * T * self.widths[l]

    def _attention_stats(self, l, m, section, V, stats, position_sources, error_groups):
        """Statistics of layer l with the scatter of an attention half, positions combined.

        Every combination's scatter comes in closed form
        (:func:`~sklearn_lib.models._attention_stats.combined_scatter`), by
        chunks of input rows within :meth:`_formula_memory`: the products
        themselves (``k`` per row) are never formed.
        """
        scatter = None
        for x in self._pass(f"layer {l}", self._footprint(l, self._attention_work(section, l))):
            act = self._activation(x, l, m)
            stats.update(_keep(self._rows(act, l), self._real_rows(x, l, act.shape)))
            signs = self._signs(position_sources, x, m)(act.shape[1])
            S = combined_scatter(section, act, V, signs, key_mask=_adapters.padding_mask(x),
                                 memory=self._formula_memory())
            if error_groups is not None:
                error_groups.add_combinations(S)
            else:
                total = S.sum(0)
                scatter = total if scatter is None else scatter.add_(total)
        if error_groups is not None:
            scatter = error_groups.added_to(scatter)
        if not bool(torch.isfinite(scatter).all()):
            raise ValueError(
                f"the Jacobian scatter of section {self.specs[l].spec!r} -> "
                f"{self.specs[m].spec!r} contains NaN or infinity."
            )
        # Random combinations of positions: no signed sums of outputs.
        return stats.add_jacobian_scatter_(scatter, n_outputs=self.positions[m] * V.shape[1],
                                           signed_sums=None)

    def global_stats(self, V, new_stats, position_sources=None):
        L = self.n_layers - 1
        return [self.jacobian_stats(l, V, new_stats, target=L, position_sources=position_sources)
                for l in range(L)]


def _closed_form_sums(structure, V, s_sum, n_rows, n_outputs):
    """``sum_x (V^T J_x)^T U`` of a closed form (None without rows).

    For :class:`LinearElementwise` and :class:`ResidualMLP`, ``J_x`` is affine in
    the derivative ``s_x`` (their ``jacobians``), so the sum over n rows is
    ``J(s_sum) + (n - 1) J(0)``; other closed forms give None. A row
    of a sequence model has outputs only at its own position, so the sum of
    the outputs (``U``'s first column) is the same; their alternating sum depends
    on the positions, which are not recorded, and is left at zero (undecided:
    the orientation rule then falls back to ``svd_flip``'s).
    """
    k = V.shape[1]
    # Only these structures' Jacobians are affine in s_x, with jacobians(s).
    if s_sum is None or n_rows == 0 or not isinstance(structure, (LinearElementwise,
                                                                  ResidualMLP)):
        return None
    total = structure.jacobians(s_sum[None])[0]
    total = total + (n_rows - 1) * structure.jacobians(torch.zeros_like(s_sum)[None])[0]
    sums = (V.T @ total).T @ output_weights(k, device=V.device, dtype=V.dtype)
    if n_outputs != k:
        sums[:, 1] = 0.0
    return sums
