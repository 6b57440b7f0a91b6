"""Vector-Jacobian products of a live model's sections (see :mod:`sklearn_lib.collect`).

A section ``(a, b)`` maps layer ``a``'s activations to layer ``b``'s with
everything else held at the batch's values (:mod:`._sections`);
:func:`section_vjp_products` computes ``V^T J_x`` for many
cotangents at once, and :class:`SectionProducts` is the batched core, which
streams them chunk by chunk to the interaction graph's model source. The row
layout and the independence of samples that the products rely on are described in
:mod:`sklearn_lib.collect`, which re-exports the public functions.
"""

import numbers

import numpy as np
import torch

from ..utils._backend import (
    as_tensor,
    eval_mode,
    model_device,
    resolve_device,
    resolve_dtype,
    resolve_model_dtype,
    to_output,
)
from ..utils._memory import LiveTensors
from ._adapters import copy_module, take, unwrap_model
from ._independence import check_independent
from ._model import (
    _as_rows,
    _cast,
    _check_forward,
    _input_tensor,
    _parse_layers,
    _positions,
    _record_batch,
)
from ._rowwise import replaced_positions_only
from ._sections import _check_differentiable, _math_attention, _run_section
from ._sequential import run_leaves

# Cotangent chunks are sized so that the cotangents plus the products of one chunk
# hold about this many elements (512 MiB in float64); the section's intermediate
# activations scale with the chunk too, so this is a heuristic, not a hard bound.
_VJP_ELEMENT_BUDGET = 2**26

# On the CPU a chunk is computed in vectorised backward passes whose cotangents and
# products hold about this many elements (2 MiB in float64), so that their
# intermediate gradients stay in the caches: one backward pass over a whole
# chunk of 2**26 elements runs from main memory, about 1.5x slower on a
# transformer's MLP (benchmarks/bench_transformer.py). GPUs take whole chunks.
_CPU_TILE_ELEMENTS = 2**18


def prepare_model(model, *, device=None, dtype="float64"):
    """Return ``model`` itself if it already has ``dtype`` and ``device``, else a converted copy.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is never modified. An nnsight wrapper (``NNsight``,
        ``LanguageModel``, any ``Envoy``) stands for the module it wraps.
    device : str or torch.device, optional
        Target device; None keeps the model's (that of its first parameter or
        buffer; the CPU for a model without any).
    dtype : {"float64", "float32", "bfloat16", "float16", "model"}, default="float64"
        Dtype of the floating parameters and buffers; ``"model"`` keeps the
        model's own (only the device may change).

    Returns
    -------
    model : torch.nn.Module
        ``model`` or a deep copy of it moved with ``torch.nn.Module.to``
        (never the model's own ``to``, which some libraries override).

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.collect import prepare_model
    >>> net = torch.nn.Linear(2, 2)
    >>> prepare_model(net) is net, prepare_model(net).weight.dtype, net.weight.dtype
    (False, torch.float64, torch.float32)
    >>> net64 = net.double()
    >>> prepare_model(net64) is net64
    True
    """
    model = unwrap_model(model)
    dtype = resolve_model_dtype(dtype, "float64")
    tensors = [*model.parameters(), *model.buffers()]
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    else:
        device = resolve_device(device)
    if all(
        t.device == device and (not t.is_floating_point() or dtype in (None, t.dtype))
        for t in tensors
    ):
        return model
    # torch's own Module.to: libraries override it with other signatures
    # (TransformerLens' HookedTransformer.to takes no dtype keyword).
    if dtype is None:
        return torch.nn.Module.to(copy_module(model), device=device)
    return torch.nn.Module.to(copy_module(model), device=device, dtype=dtype)


def floating_dtype(model, default):
    """The dtype of a module's first floating parameter or buffer (``default`` without one)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return default


def set_points(products, model, a, b, x, points, weights, leaves, *, sequence, check):
    """Set what every kind of a section's products holds: the section, its ``points``
    with their ``weights`` (1 each by default), samples and input positions and width.

    With ``check``, refuse a section autograd cannot differentiate first.
    """
    products.model, products.a, products.b, products.x = model, a, b, x
    products.leaves, products.points = leaves, list(points)
    products.weights = [1.0] * len(products.points) if weights is None else list(weights)
    if check:
        _check_differentiable(model, a, b, x, products.points[0])
    products.batch = products.points[0].shape[0]
    products.p_in, products.d_in = _positions(products.points[0].shape[1:], sequence, a)


def set_directions(products, out, cotangents, *, sequence, position_signs):
    """Set a section's product directions on ``products`` from its output ``out`` ``(B, ...)``.

    Sets ``out_shape``, ``p_out``, ``d_out``, ``basis_t`` (``V.T``), ``k``,
    ``signs`` (``(B, m, P_out)`` or None) and ``n_vectors``, as described in
    :class:`SectionProducts`; ``products`` has ``a`` and ``b`` already.
    """
    a, b = products.a, products.b
    products.out_shape = tuple(out.shape[1:])
    products.p_out, products.d_out = _positions(products.out_shape, sequence, b)
    if cotangents is None:
        basis = torch.eye(products.d_out, device=out.device, dtype=out.dtype)
    else:
        basis = as_tensor(cotangents, device=out.device, dtype=out.dtype)
        if basis.ndim != 2 or basis.shape[0] != products.d_out:
            raise ValueError(
                f"cotangents must be (d_out, k) = ({products.d_out}, k) for section "
                f"{a.spec!r} -> {b.spec!r}, got shape {tuple(basis.shape)}."
            )
    products.basis_t, products.k = basis.T, basis.shape[1]
    products.signs = None
    if position_signs is not None and products.p_out > 1 and len(products.out_shape) == 2:
        products.signs = position_signs(products.p_out)  # (B, m, P_out)
    products.n_vectors = products.p_out * products.k if products.signs is None else (
        products.signs.shape[1] * products.k)


def section_callable(model, a, b, x, leaves):
    """The section a -> b on inputs ``x`` as a function of ``a``'s value (to differentiate).

    With ``leaves`` only the section's modules run; otherwise the model runs
    from ``x`` with ``a``'s activation replaced.
    """
    if leaves is None:
        def section(t):
            # Modules acting on each position compute a selected layer's
            # replaced positions alone: a backward pass over those only.
            with replaced_positions_only(model, a):
                return _run_section(model, a, b, x, t)
        return section
    # The clone shields the point from in-place modules (ReLU(inplace=True)).
    return lambda t: run_leaves(leaves, t.clone())


def _chunk_size(max_vectors, n_vectors, per_vector):
    if max_vectors is None:
        return max(1, min(n_vectors, _VJP_ELEMENT_BUDGET // max(1, per_vector)))
    if not isinstance(max_vectors, numbers.Integral) or max_vectors < 1:
        raise ValueError(f"max_vectors must be a positive integer or None, got {max_vectors!r}.")
    return min(int(max_vectors), n_vectors)


class SectionProducts:
    """The products ``V.T @ J`` of a section for one batch, streamed chunk by chunk.

    One ``torch.func.vjp`` per point; ``torch.func.vmap`` over chunks of
    cotangent directions, each broadcast to all samples (valid because samples
    are independent). With ``leaves`` (see
    :func:`~sklearn_lib.models._fastpath.section_leaves`) only the section's
    modules run, from the point; otherwise the model runs from its inputs
    ``x`` with ``a``'s activation replaced. A chunk of ``c`` directions holds
    ``c`` products of every sample, never all ``n_vectors`` of them, so memory
    is set by the chunk (see :func:`section_costs`).

    Direction ``q = t * k + c`` is output position ``t`` times column ``c`` of
    ``V``. With ``position_signs`` (a function of the number of output
    positions giving signs ``(B, m, P_out)``, see :meth:`~._position_sources.PositionSources.batch`)
    and more than one output position, there are ``m k`` directions instead:
    ``q = j * k + c`` is source ``j``'s signs over positions times column
    ``c``, with signs of every sample its own.

    With several ``points`` (act_in values, e.g. along an integration path) and
    their ``weights``, every chunk is the weighted sum of the points' products.
    The points' backward closures are kept (their saved activations: one
    forward pass each) unless ``recompute``, which reruns the forward passes
    for every chunk instead.

    On the CPU every chunk is computed in vectorised backward passes of
    ``tile`` directions (see ``_CPU_TILE_ELEMENTS``), so that their
    intermediate gradients stay in the caches; elsewhere in one.

    Attributes
    ----------
    n_vectors, k, p_in, d_in, p_out, d_out, batch : int
        Directions, columns of ``V``, input and output positions and widths,
        samples.
    tile : int
        Directions per vectorised backward pass.
    """

    def __init__(self, model, a, b, x, points, cotangents, *, sequence, check, leaves=None,
                 position_signs=None, weights=None, recompute=False):
        set_points(self, model, a, b, x, points, weights, leaves, sequence=sequence,
                   check=check)
        self.recompute = recompute
        self._vjps = [self._vjp(p) for p in self.points[: 1 if recompute else None]]
        out = self._vjps[0][0]
        set_directions(self, out, cotangents, sequence=sequence, position_signs=position_signs)
        self.tile = self.n_vectors
        if out.device.type == "cpu":
            per_vector = self.batch * (self.p_out * self.d_out + self.p_in * self.d_in)
            self.tile = max(1, min(self.n_vectors, _CPU_TILE_ELEMENTS // max(1, per_vector)))
        if recompute:
            self._vjps = []

    def _vjp(self, point):
        """``(out, vjp_fn)`` of the section at ``point``.

        The outer no_grad stops parameters from recording an autograd graph;
        torch.func.vjp differentiates with respect to its primal regardless.
        Fused attention kernels have no vmap batching rule for their backward
        (vmap falls back to a slow loop), so attention runs on the composite
        "math" kernel here.
        """
        section = section_callable(self.model, self.a, self.b, self.x, self.leaves)
        with torch.no_grad(), _math_attention():
            return torch.func.vjp(section, point)

    def cotangents(self, start, stop):
        """The cotangents of directions ``start:stop``, ``(stop - start, B, *out_shape)``."""
        index = torch.arange(start, stop, device=self.basis_t.device)
        k, n, shape = self.k, self.batch, self.out_shape
        if self.signs is None:
            # Direction q = t * k + c is one-hot in output position t times column c.
            cot = self.basis_t.new_zeros(len(index), self.p_out, self.d_out)
            cot[torch.arange(len(index), device=index.device), index // k] = (
                self.basis_t[index % k])
            # Materialised, not expanded: a batch axis of stride 0 makes the
            # backward produce its products in an order that vmap then copies.
            return cot.reshape(len(index), 1, *shape).expand(len(index), n, *shape).contiguous()
        # Direction q = j * k + c: source j's signs over positions times column c.
        return (self.signs[:, index // k].transpose(0, 1)[..., None]
                * self.basis_t[index % k][:, None, None, :]).reshape(len(index), n, *shape)

    def _products(self, vjp_fn, start, stop):
        """Directions ``start:stop`` of one point as ``(stop - start, B * P_in, d_in)``.

        One vectorised backward pass per ``tile`` directions, written into
        the chunk.
        """
        shape = (stop - start, self.batch * self.p_in, self.d_in)
        out = None
        for lo in range(start, stop, self.tile):
            hi = min(lo + self.tile, stop)
            grads = torch.func.vmap(lambda v: vjp_fn(v)[0])(self.cotangents(lo, hi))
            if hi - lo == shape[0]:
                return grads.reshape(shape).contiguous()
            if out is None:
                out = grads.new_empty(shape)
            out[lo - start : hi - start] = grads.reshape(hi - lo, *shape[1:])
        return out

    def chunks(self, max_vectors):
        """Yield ``(start, products)``: directions ``start:start + c`` as ``(c, B * P_in, d_in)``.

        ``max_vectors`` directions per chunk (at least 1). Each chunk is a new
        tensor the caller may modify.
        """
        step = max(1, int(max_vectors))
        with torch.no_grad():
            for start in range(0, self.n_vectors, step):
                stop = min(start + step, self.n_vectors)
                total = None
                for i, w in enumerate(self.weights):
                    _, vjp_fn = self._vjp(self.points[i]) if self.recompute else self._vjps[i]
                    grads = self._products(vjp_fn, start, stop)
                    if total is None:
                        total = grads if w == 1.0 else grads.mul_(w)
                    else:
                        total.add_(grads, alpha=w)
                yield start, total


def section_costs(model, a, b, x, act_in, cotangents, *, sequence, leaves=None):
    """Bytes per sample of section a -> b's products: ``(saved, backward, per_vector)``.

    Measured on the first sample of the batch with :class:`LiveTensors`:
    ``saved`` is what the forward pass keeps for the backward pass, ``per_vector``
    what one more product vector adds to a chunk's backward pass (its
    intermediate gradients and its product), ``backward`` the rest of the
    backward pass's peak. A batch of ``n`` samples with chunks of ``c`` vectors
    then holds about ``n * (saved + backward + c * per_vector)``, plus the
    cotangents.
    """
    one = take(x, slice(0, 1))
    live = LiveTensors()
    with live:
        products = SectionProducts(model, a, b, one, [act_in[:1]], cotangents,
                                   sequence=sequence, check=False, leaves=leaves)
        saved = live.live
        peaks = []
        for c in (1, 2):
            # Directions far apart (different output positions) as the chunks have.
            live.reset_peak()
            base = live.live
            cot = products.cotangents(0, min(c, products.n_vectors))
            fn = products._vjps[0][1]
            grads = torch.func.vmap(lambda v: fn(v)[0])(cot)
            peaks.append(live.peak - base)
            del cot, grads
    per_vector = max(peaks[1] - peaks[0], 1) if products.n_vectors > 1 else peaks[0]
    return saved, max(peaks[0] - per_vector, 0), per_vector


def _section_rows(model, a, b, x, act_in, cotangents, *, sequence, max_vectors, check,
                  leaves=None, vector_major=False, position_signs=None):
    """Products ``V.T @ J`` for every sample (or every position), in the row layout.

    The chunks of :class:`SectionProducts`, gathered: rows ``(B * P_in, P_out * k,
    d_in)``, or with ``vector_major`` the same products as ``(P_out * k, B * P_in,
    d_in)`` (with ``position_signs``, ``m k`` directions instead of ``P_out k``).
    Callers that only sum over rows stream the chunks instead.
    """
    products = SectionProducts(model, a, b, x, [act_in], cotangents, sequence=sequence,
                               check=check, leaves=leaves, position_signs=position_signs)
    n_vectors, n_rows, d_in = products.n_vectors, products.batch * products.p_in, products.d_in
    step = _chunk_size(max_vectors, n_vectors,
                       products.batch * (products.p_in * d_in + products.p_out * products.d_out))
    shape = (n_vectors, n_rows, d_in) if vector_major else (n_rows, n_vectors, d_in)
    rows = None if step >= n_vectors else act_in.new_empty(shape)
    for start, grads in products.chunks(step):
        if rows is None:
            rows = grads if vector_major else grads.transpose(0, 1).contiguous()
        elif vector_major:
            rows[start : start + len(grads)] = grads
        else:
            rows[:, start : start + len(grads)] = grads.transpose(0, 1)
    return rows


def section_vjp_products(
    model,
    in_layer,
    out_layer,
    inputs,
    cotangents=None,
    *,
    sequence=False,
    max_vectors=None,
    device=None,
    dtype="float64",
):
    """Activations of ``in_layer`` and products ``V.T @ J_x`` of the section's Jacobians.

    ``J_x = d act_out[x] / d act_in[x]`` is the per-sample Jacobian of the section
    from ``in_layer`` to ``out_layer`` (see :func:`~._sections.section_function`). It is never
    formed unless ``cotangents`` is None: one vector-Jacobian product per column of
    ``V`` (vectorised with ``torch.func.vmap``, in chunks of ``max_vectors``)
    covers the whole batch, assuming samples are independent (the model is run in
    eval mode, so BatchNorm uses running statistics).

    Parameters
    ----------
    model : torch.nn.Module
        The model; never modified (see :func:`prepare_model`).
    in_layer, out_layer : str
        Layer names, in forward order.
    inputs : torch.Tensor or numpy.ndarray
        One batch of model inputs.
    cotangents : array-like of shape (d_out, k), optional
        The matrix ``V``. None means the identity: full Jacobians.
    sequence : bool, default=False
        Treat activations as ``(batch, position, feature)`` (``(batch, feature)``
        counts as one position) and count positions as samples; ``V`` then acts
        on the features of every output position. Otherwise per-sample shapes
        are flattened to ``d``.
    max_vectors : int, optional
        Cotangent directions per vectorised backward pass; bounds memory.
        None picks a chunk of about 2**26 elements of cotangents and products.
    device : str or torch.device, optional
        Where to run; None means the model's device.
    dtype : {"float64", "float32"}, default="float64"
        Dtype the model is run in.

    Returns
    -------
    act_in : array or tensor of shape (n_rows, d_in)
        The activations of ``in_layer``, in the row layout of ``products``.
    products : array or tensor of shape (n_rows, P_out * k, d_in)
        Flat layers (``P_out = 1``, ``n_rows = B``): ``products[x] = V.T @ J_x``.
        With ``sequence=True`` (``n_rows = B * P_in``): row ``(x, s)`` holds
        ``products[(x, s), t * k + c, j] = sum_i V[i, c] J_x[(t, i), (s, j)]``; with
        ``V = I`` this is :func:`sequence_jacobians_to_rows` of the full Jacobians.
        Tensors on the compute device if ``inputs`` is a tensor, else numpy.

    Raises
    ------
    ValueError
        If the section is not differentiable (integer or detached activations),
        layers are unknown or out of order, or ``V`` has the wrong shape.

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.collect import section_vjp_products
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> h, J = section_vjp_products(net, "0", "2", torch.randn(5, 3))
    >>> h.shape, J.shape
    (torch.Size([5, 4]), torch.Size([5, 2, 4]))
    >>> W = net[2].weight.double()
    >>> torch.allclose(J, W * (1 - torch.tanh(h) ** 2)[:, None, :])
    True
    >>> V = torch.randn(2, 1, dtype=torch.float64)
    >>> _, P = section_vjp_products(net, "0", "2", torch.randn(5, 3), V)
    >>> P.shape
    torch.Size([5, 1, 4])
    """
    run_model = prepare_model(model, device=device, dtype=dtype)
    device, dtype = model_device(run_model), resolve_dtype(dtype)
    a, b = _parse_layers(run_model, [in_layer, out_layer], "output")
    x = _input_tensor(inputs, device, dtype)
    with eval_mode(run_model):
        _check_forward(run_model, x)
        with torch.no_grad():
            check_independent(run_model, [a, b], x)
            act_in = _cast(_record_batch(run_model, [a], x)[a.spec], dtype)
        products = _section_rows(
            run_model, a, b, x, act_in, cotangents,
            sequence=sequence, max_vectors=max_vectors, check=True,
        )
    act_rows = _as_rows(act_in, sequence, a)
    return to_output(act_rows, inputs), to_output(products, inputs)


def sequence_jacobians_to_rows(J):
    """Reshape full sequence Jacobians to rows with positions as samples.

    Parameters
    ----------
    J : array or tensor of shape (B, P_out, d_out, P_in, d_in)
        Per-sample Jacobians ``J[x, t, i, s, j] = d out[x, t, i] / d in[x, s, j]``.

    Returns
    -------
    rows : array or tensor of shape (B * P_in, P_out * d_out, d_in)
        Row ``(x, s)`` is the block ``J[x, :, :, s, :]`` with ``(t, i)`` flattened
        ``t``-major, so that ``sum_rows R.T @ R / (B * P_in)`` is the SPEC's ``M'``
        for sequence models.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_lib.collect import sequence_jacobians_to_rows
    >>> J = np.random.default_rng(0).normal(size=(2, 3, 4, 3, 5))
    >>> R = sequence_jacobians_to_rows(J)
    >>> R.shape
    (6, 12, 5)
    >>> bool((R[1 * 3 + 2] == J[1, :, :, 2, :].reshape(12, 5)).all())
    True
    """
    if J.ndim != 5:
        raise ValueError(
            f"J must be (batch, P_out, d_out, P_in, d_in), got shape {tuple(J.shape)}."
        )
    batch, p_out, d_out, p_in, d_in = J.shape
    if isinstance(J, torch.Tensor):
        moved = J.permute(0, 3, 1, 2, 4)
    else:
        moved = np.asarray(J).transpose(0, 3, 1, 2, 4)
    return moved.reshape(batch * p_in, p_out * d_out, d_in)
