"""Activations and Jacobians from live torch models, addressed by module path.

Layers are named by their ``model.named_modules()`` path (``"encoder.layers.0"``;
the model itself is ``""``). By default a layer's activations are the module's
*output*; ``hook="input"`` records inputs instead, and a single layer can
override that with a suffix: ``"fc2:input"``, ``"fc2:output"``. The input of
the whole model is therefore ``":input"``. A final selection of positions in
brackets restricts a layer with ``(batch, position, ...)`` activations to those
positions: ``"blocks.0.attn_out[-1]"`` (the last position; the reference work
reads the residual stream after attention there only), ``"fc2:input[0, 2]"``,
``"out[1:]"`` (distinct integers, negative from the end, or one slice). The
selected positions keep their axis, so ``"out[-1]"`` is ``(batch, 1, d)``, and a
section replacing such a layer replaces those positions only.

When a module returns a tuple (e.g. ``nn.MultiheadAttention``), its first
element is the activation, and when a section replaces it, the other elements
are left as the module computed them.

A *section* ``(a, b)`` is the map from layer ``a``'s activations to layer
``b``'s: the model is run on the batch's inputs with ``a``'s activation replaced
by the argument and is stopped as soon as ``b`` has been computed. Everything
that does not flow through ``a`` (for example a residual stream branching off
before ``a``) is held at its value for the batch, so the section's Jacobian is
the derivative of ``b`` through ``a`` alone.

Batched Jacobians rest on one assumption: **samples are independent** - the
activations of sample ``x`` at ``b`` depend on no other sample's activations at
``a``. Then the gradient of ``sum_x <v, b[x]>`` with respect to ``a[x]`` is exactly
``v.T @ J_x``, so one backward pass per cotangent ``v`` serves a whole batch. The
functions here put the model in eval mode (restoring every module's previous
mode afterwards) so that BatchNorm uses its running statistics and dropout is
off; a model that mixes samples in eval mode gives wrong Jacobians.

Models are run in the requested dtype (float64 by default) on the requested
device (the model's by default). The user's model is never modified beyond the
temporary eval mode: when its parameters have another dtype or device, a deep
copy is converted (:func:`prepare_model`); call that once yourself to avoid a
copy per call of :func:`section_vjp_products`.

Row layout. Flat layers have activations ``(n, d)`` (other per-sample shapes are
flattened) and section Jacobians ``(n, d_out, d_in)``. With ``sequence=True``,
activations are ``(n, P, d)`` (or ``(n, d)``, treated as one position) and
positions count as samples: activations become rows ``(n * P_in, d_in)``, and
row ``(x, s)`` of the Jacobian is the block ``J_x[(t, i), (s, :)]`` over all output
positions and features ``(t, i)``, in ``t``-major order: ``(n * P_in, P_out * d_out,
d_in)``. Then ``(1 / (n P_in)) sum_rows R.T @ R`` is the SPEC's ``M'`` for sequence
models, and the rows feed :class:`~sklearn_lib.InteractionBasis` unchanged.
"""

import numbers
import os
from contextlib import nullcontext

import numpy as np
import torch
from tqdm.auto import tqdm

from ._adapters import check_unpadded, copy_module, n_samples, take, unwrap_model
from ._backend import (
    as_tensor,
    eval_mode,
    model_device,
    resolve_device,
    resolve_dtype,
    to_output,
)
from ._fastpath import check_declared, detect_section, fits_rows, run_leaves, section_leaves
from ._model import (
    _ArraySink,
    _as_rows,
    _cast,
    _check_forward,
    _hooks,
    _input_tensor,
    _iter_batches,
    _parse_layers,
    _positions,
    _record_batch,
    _run_until_stopped,
    _StopForward,
)

__all__ = [
    "collect",
    "prepare_model",
    "record_activations",
    "section_function",
    "section_vjp_products",
    "sequence_jacobians_to_rows",
]

# Cotangent chunks are sized so that the cotangents plus the products of one chunk
# hold about this many elements (512 MiB in float64); the section's intermediate
# activations scale with the chunk too, so this is a heuristic, not a hard bound.
_VJP_ELEMENT_BUDGET = 2**26


# --------------------------------------------------------------------------- model
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
    dtype : {"float64", "float32"}, default="float64"
        Dtype of the floating parameters and buffers.

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
    dtype = resolve_dtype(dtype)
    tensors = [*model.parameters(), *model.buffers()]
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    else:
        device = resolve_device(device)
    if all(
        t.device == device and (not t.is_floating_point() or t.dtype == dtype) for t in tensors
    ):
        return model
    # torch's own Module.to: libraries override it with other signatures
    # (TransformerLens' HookedTransformer.to takes no dtype keyword).
    return torch.nn.Module.to(copy_module(model), device=device, dtype=dtype)



def record_activations(
    model,
    layers,
    data,
    *,
    batch_size=256,
    device=None,
    dtype="float64",
    verbose=True,
    hook="output",
):
    """Record the activations of named modules over a data set.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is run in eval mode, under ``torch.no_grad``, and left
        unchanged (its modules' train/eval flags are restored).
    layers : str, Layer or list of them
        ``model.named_modules()`` paths, optionally suffixed ``":input"`` or
        ``":output"`` to override ``hook`` for that layer; a ``Layer`` is (batch, P, d).
    data : torch.Tensor, numpy.ndarray or iterable of batches
        Model inputs. Arrays and tensors are split into batches of ``batch_size``
        along axis 0; an iterable (e.g. a ``DataLoader``) is used with its own
        batches, taking the first element of ``(x, y)`` tuples. Floating inputs
        are cast to ``dtype``, integer inputs (token ids) are kept.
    batch_size : int, default=256
        Batch size for array and tensor ``data``.
    device : str or torch.device, optional
        Where to run; None means the model's device.
    dtype : {"float64", "float32"}, default="float64"
        Dtype the model is run in and floating activations are returned in.
    verbose : bool, default=True
        Show a tqdm progress bar.
    hook : {"output", "input"}, default="output"
        Record module outputs or inputs (first positional argument).

    Returns
    -------
    activations : dict of str to numpy.ndarray
        For each entry of ``layers`` (as given), the ``(n, ...)`` activations.

    Raises
    ------
    ValueError
        For unknown layer names (the message lists the valid ones) or layers that
        are not reached in the forward pass.

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.collect import record_activations
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> acts = record_activations(net, ["0", "1", "2:input"], torch.randn(10, 3), verbose=False)
    >>> {name: a.shape for name, a in acts.items()}
    {'0': (10, 4), '1': (10, 4), '2:input': (10, 4)}
    >>> bool((acts["1"] == acts["2:input"]).all())
    True
    """
    run_model = prepare_model(model, device=device, dtype=dtype)
    device, dtype = model_device(run_model), resolve_dtype(dtype)
    specs = _parse_layers(run_model, layers, hook)
    batches, total = _iter_batches(data, batch_size)
    parts = {layer.spec: [] for layer in specs}
    with eval_mode(run_model), torch.no_grad(), tqdm(
        total=total, disable=not verbose, unit="sample", desc="activations"
    ) as bar:
        for i, batch in enumerate(batches):
            x = _input_tensor(batch, device, dtype)
            if i == 0:
                _check_forward(run_model, x)
            acts = _record_batch(run_model, specs, x)
            for spec, act in acts.items():
                parts[spec].append(_cast(act, dtype).cpu().numpy())
            bar.update(n_samples(x))
    if not next(iter(parts.values())):
        raise ValueError("data yielded no samples.")
    return {spec: np.concatenate(chunks) for spec, chunks in parts.items()}


# --------------------------------------------------------------------------- sections
def _run_section(model, a, b, x, act_in):
    """Evaluate ``b``'s activation with ``a``'s replaced by ``act_in`` on inputs ``x``."""
    state = {"replaced": False, "out": None}

    def replace(value):
        if state["replaced"]:
            raise RuntimeError(
                f"module {a.name!r} ran more than once in one forward pass, so section "
                f"{a.spec!r} -> {b.spec!r} is ambiguous."
            )
        if value.shape != act_in.shape:
            raise ValueError(
                f"section {a.spec!r} -> {b.spec!r}: the replacement activation has shape "
                f"{tuple(act_in.shape)} but {a.spec!r} is {tuple(value.shape)} for these inputs."
            )
        state["replaced"] = True
        # A differentiable copy protects the caller's tensor (and autograd's leaf)
        # from in-place operations in the following modules.
        return act_in.clone()

    def capture(value):
        if not state["replaced"]:
            raise ValueError(
                f"section {a.spec!r} -> {b.spec!r}: {b.spec!r} runs before {a.spec!r}; "
                "give layers in the order the forward pass computes them."
            )
        state["out"] = value
        raise _StopForward

    with _hooks([(a, replace), (b, capture)]):
        _run_until_stopped(model, x)
    if state["out"] is None:
        raise ValueError(
            f"section {a.spec!r} -> {b.spec!r}: {b.spec!r} was not reached in the forward pass."
        )
    return state["out"]


def section_function(model, in_layer, out_layer, inputs):
    """Return the section ``f(act_in) -> act_out`` between two layers for a batch of inputs.

    The model is run on ``inputs`` with the activation of ``in_layer`` replaced by
    the argument, and stopped as soon as ``out_layer`` is computed (later modules
    never run). ``f`` is differentiable in its argument, also under ``torch.func``.
    The model is used as it is: put it in eval mode and give ``act_in`` the
    model's dtype and device (see :func:`prepare_model`).

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    in_layer, out_layer : str
        Layer names (module paths with optional ``":input"``/``":output"``
        suffix; output by default). ``out_layer`` must be computed after
        ``in_layer``.
    inputs : torch.Tensor
        The batch of model inputs that fixes everything outside the section.

    Returns
    -------
    f : callable
        ``f(act_in)`` with ``act_in`` shaped like ``in_layer``'s activations for
        ``inputs``; returns ``out_layer``'s activation (a tensor).

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.collect import section_function
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> f = section_function(net, "0", "1", torch.randn(5, 3))
    >>> h = torch.randn(5, 4)
    >>> torch.equal(f(h), torch.tanh(h))
    True
    """
    model = unwrap_model(model)
    a, b = _parse_layers(model, [in_layer, out_layer], "output")
    return lambda act_in: _run_section(model, a, b, inputs, act_in)


def _check_differentiable(model, a, b, x, act_in):
    """Fail clearly when ``b`` does not depend differentiably on ``a`` (one-sample probe).

    ``torch.func.vjp`` silently returns zeros for outputs that are detached from
    its primal, so connectivity is checked with ordinary autograd first.
    """
    where = f"section {a.spec!r} -> {b.spec!r} is not differentiable"
    if not act_in.is_floating_point():
        raise ValueError(f"{where}: the activations of {a.spec!r} have dtype {act_in.dtype}.")
    probe = act_in[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = _run_section(model, a, b, take(x, slice(0, 1)), probe)
        if not out.is_floating_point():
            raise ValueError(f"{where}: {b.spec!r} has dtype {out.dtype}.")
        grad = (
            torch.autograd.grad(out, probe, torch.ones_like(out), allow_unused=True)[0]
            if out.requires_grad
            else None
        )
    if grad is None:
        raise ValueError(
            f"{where}: {b.spec!r} does not depend on {a.spec!r} through differentiable "
            "operations (it is detached, integer-valued, or computed from other values)."
        )


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3 has no backend selection
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _chunk_size(max_vectors, n_vectors, per_vector):
    if max_vectors is None:
        return max(1, min(n_vectors, _VJP_ELEMENT_BUDGET // max(1, per_vector)))
    if not isinstance(max_vectors, numbers.Integral) or max_vectors < 1:
        raise ValueError(f"max_vectors must be a positive integer or None, got {max_vectors!r}.")
    return min(int(max_vectors), n_vectors)


def _section_rows(model, a, b, x, act_in, cotangents, *, sequence, max_vectors, check,
                  leaves=None, vector_major=False):
    """Products ``V.T @ J`` for every sample (or every position), in the row layout.

    One ``torch.func.vjp`` per batch; ``torch.func.vmap`` over chunks of cotangent
    directions, each broadcast to all samples (valid because samples are
    independent). With ``leaves`` (see :func:`~sklearn_lib._fastpath.section_leaves`)
    only the section's modules run, from ``act_in``; otherwise the model runs
    from its inputs ``x`` with ``a``'s activation replaced. Returns rows
    ``(B * P_in, P_out * k, d_in)``, or with ``vector_major`` the same products
    as ``(P_out * k, B * P_in, d_in)``: the layout the vectorised products come
    in, for callers that only sum over rows (scatters, edges), which saves a
    transposing copy as large as the products.
    """
    if check:
        _check_differentiable(model, a, b, x, act_in)
    batch = act_in.shape[0]
    p_in, d_in = _positions(act_in.shape[1:], sequence, a)
    # The outer no_grad stops parameters from recording an autograd graph;
    # torch.func.vjp differentiates with respect to its primal regardless.
    # Fused attention kernels have no vmap batching rule for their backward
    # (vmap falls back to a slow loop), so attention runs on the composite
    # "math" kernel here.
    with torch.no_grad():
        with _math_attention():
            if leaves is None:
                section = lambda t: _run_section(model, a, b, x, t)  # noqa: E731
            else:
                # The clone shields act_in from in-place modules (ReLU(inplace=True)).
                section = lambda t: run_leaves(leaves, t.clone())  # noqa: E731
            out, vjp_fn = torch.func.vjp(section, act_in)
        out_shape = tuple(out.shape[1:])
        p_out, d_out = _positions(out_shape, sequence, b)
        if cotangents is None:
            basis = torch.eye(d_out, device=out.device, dtype=out.dtype)
        else:
            basis = as_tensor(cotangents, device=out.device, dtype=out.dtype)
            if basis.ndim != 2 or basis.shape[0] != d_out:
                raise ValueError(
                    f"cotangents must be (d_out, k) = ({d_out}, k) for section "
                    f"{a.spec!r} -> {b.spec!r}, got shape {tuple(basis.shape)}."
                )
        k = basis.shape[1]
        n_vectors = p_out * k
        step = _chunk_size(max_vectors, n_vectors, batch * (p_in * d_in + p_out * d_out))
        shape = (n_vectors, batch, p_in, d_in) if vector_major else (batch, p_in, n_vectors, d_in)
        rows = None if step >= n_vectors else act_in.new_empty(shape)
        batched_vjp = torch.func.vmap(lambda v: vjp_fn(v)[0])
        for start in range(0, n_vectors, step):
            index = torch.arange(start, min(start + step, n_vectors), device=act_in.device)
            # Direction q = t * k + c is one-hot in output position t times column c of V.
            cot = torch.zeros(len(index), p_out, d_out, device=out.device, dtype=out.dtype)
            cot[torch.arange(len(index), device=act_in.device), index // k] = basis.T[index % k]
            # Materialised, not expanded: a batch axis of stride 0 makes the
            # backward produce its products in an order that vmap then copies.
            cot = cot.reshape(len(index), 1, *out_shape).expand(len(index), batch, *out_shape)
            grads = batched_vjp(cot.contiguous()).reshape(len(index), batch, p_in, d_in)
            if rows is None and vector_major:
                rows = grads.contiguous()
            elif rows is None:
                rows = grads.permute(1, 2, 0, 3).contiguous()
            elif vector_major:
                rows[start : start + len(index)] = grads
            else:
                rows[:, :, start : start + len(index)] = grads.permute(1, 2, 0, 3)
    if vector_major:
        return rows.reshape(n_vectors, batch * p_in, d_in)
    return rows.reshape(batch * p_in, n_vectors, d_in)


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
    from ``in_layer`` to ``out_layer`` (see :func:`section_function`). It is never
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


# --------------------------------------------------------------------------- collect
def collect(
    model,
    layers,
    data,
    *,
    jacobians=True,
    batch_size=256,
    device=None,
    dtype="float64",
    verbose=True,
    cache=None,
    sequence=False,
    max_vectors=None,
    fast_path=True,
):
    """Activations of several layers and the Jacobians between adjacent ones, in row layout.

    This is what :class:`~sklearn_lib.InteractionGraph` consumes: ``activations[l]``
    is ``(n_rows_l, d_l)`` and ``jacobians[l]`` is ``(n_rows_l, n_out_l, d_l)`` for the
    section from ``layers[l]`` to ``layers[l + 1]`` (``n_out_l = d_{l+1}`` for flat
    layers, ``P_{l+1} * d_{l+1}`` with ``sequence=True``; see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
        The model; never modified (see :func:`prepare_model`).
    layers : list of str or Layer
        Layer names in forward order (module paths, optional ``":input"`` /
        ``":output"`` suffix; outputs by default), or :class:`~sklearn_lib.Layer`.
    data : torch.Tensor, numpy.ndarray or iterable of batches
        Model inputs, as in :func:`record_activations`.
    jacobians : bool, default=True
        Also compute the full Jacobians of each section ``(layers[l], layers[l+1])``.
    batch_size : int, default=256
        Batch size for array and tensor ``data``.
    device : str or torch.device, optional
        Where to run; None means the model's device.
    dtype : {"float64", "float32"}, default="float64"
        Dtype of the computation and of the results.
    verbose : bool, default=True
        Show a tqdm progress bar.
    cache : str, os.PathLike or ActivationCache, optional
        Stream each batch to disk instead of keeping it in memory. A path creates
        a new :class:`~sklearn_lib.cache.ActivationCache` there (an existing path
        raises ``FileExistsError``); a cache in write mode is appended to. Either
        way the cache is finalized at the end, and on an error a cache created
        here is discarded.
    sequence : bool, default=False
        Treat activations as ``(batch, position, feature)`` and count positions
        as samples (see :func:`section_vjp_products`).
    max_vectors : int, optional
        Chunk size of the vectorised backward passes (memory bound).
    fast_path : bool, default=True
        Write the Jacobians of ``Linear`` + elementwise-activation sections in
        closed form (``diag(s_x) W`` and the like, see
        :class:`~sklearn_lib.InteractionGraph`'s ``fast_path``) instead of one
        vector-Jacobian product per output; False always uses the products.

    Memory: without ``cache`` the result arrays are allocated once (for array
    data and DataLoaders with a ``dataset``) and filled batch by batch; with a
    ``cache`` each batch goes to disk, so the memory held is a few batches.

    Returns
    -------
    activations : list of arrays
        One ``(n_rows_l, d_l)`` array per layer; zarr arrays (lazily read) when
        ``cache`` is given, else numpy.
    jacobians : list of arrays
        One per adjacent pair of layers (empty if ``jacobians=False``).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from sklearn_lib.collect import collect
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> X = np.random.default_rng(0).normal(size=(50, 3))
    >>> acts, jacs = collect(net, [":input", "1", "2"], X, batch_size=16, verbose=False)
    >>> [a.shape for a in acts], [j.shape for j in jacs]
    ([(50, 3), (50, 4), (50, 2)], [(50, 4, 3), (50, 2, 4)])
    >>> np.allclose(jacs[1], net[2].weight.detach().double().numpy())
    True
    >>> path = getfixture("tmp_path") / "cache.zarr"
    >>> acts_c, jacs_c = collect(net, [":input", "1", "2"], X, verbose=False, cache=path)
    >>> np.allclose(acts_c[1][:], acts[1]), type(acts_c[1]).__name__
    (True, 'Array')
    """
    run_model = prepare_model(model, device=device, dtype=dtype)
    device, dtype = model_device(run_model), resolve_dtype(dtype)
    specs = _parse_layers(run_model, layers, "output")
    if jacobians and len(specs) < 2:
        raise ValueError("jacobians=True needs at least two layers.")
    sections = list(zip(specs[:-1], specs[1:])) if jacobians else []
    batches, total = _iter_batches(data, batch_size)
    if cache is not None:
        from .cache import ActivationCache, _check_target

        if not isinstance(cache, ActivationCache):
            # The cache is created from the first batch's shapes; fail before any work.
            _check_target(os.path.abspath(os.fspath(cache)), overwrite=False)

    writer, created_here, seen = None, False, 0
    sink = None if cache is not None else _ArraySink(total)
    structures = None
    try:
        with eval_mode(run_model), tqdm(
            total=total, disable=not verbose, unit="sample", desc="collect"
        ) as bar:
            for i, batch in enumerate(batches):
                x = _input_tensor(batch, device, dtype)
                if i == 0:
                    _check_forward(run_model, x)
                check_unpadded(x)
                with torch.no_grad():
                    recorded = _record_batch(run_model, specs, x)
                acts = {s: _cast(t, dtype) for s, t in recorded.items()}
                if structures is None:
                    structures = {
                        (a.spec, b.spec): (
                            _closed_form(run_model, a, b, acts, sequence) if fast_path else None,
                            section_leaves(run_model, a, b),
                        )
                        for a, b in sections
                    }
                jac_rows = {
                    (a.spec, b.spec): _jacobian_rows(
                        run_model, a, b, x, acts, *structures[(a.spec, b.spec)],
                        sequence=sequence, max_vectors=max_vectors, check=i == 0,
                    )
                    for a, b in sections
                }
                # The only host copies: one per array per batch.
                act_np = {a.spec: _as_rows(acts[a.spec], sequence, a).cpu().numpy() for a in specs}
                jac_np = {pair: t.cpu().numpy() for pair, t in jac_rows.items()}
                if cache is None:
                    sink.append(n_samples(x), act_np, jac_np)
                else:
                    if writer is None:
                        writer, created_here = _writer_for(
                            cache, model, acts, jac_np, specs, sequence, dtype
                        )
                    writer.append(act_np, jac_np)
                # Nothing of this batch outlives it: the next one reuses the memory.
                del recorded, acts, jac_rows, act_np, jac_np
                seen += n_samples(x)
                bar.update(n_samples(x))
        if not seen:
            raise ValueError("data yielded no samples.")
        if writer is not None:
            writer.finalize()
    except BaseException:
        if created_here:
            writer.discard()
        raise

    if writer is not None:
        return (
            [writer.activations(layer.spec) for layer in specs],
            [writer.jacobians(a.spec, b.spec) for a, b in sections],
        )
    act_arrays, jac_arrays = sink.result()
    return (
        [act_arrays[layer.spec] for layer in specs],
        [jac_arrays[(a.spec, b.spec)] for a, b in sections],
    )


def _closed_form(model, a, b, acts, sequence):
    """The closed form of section ``a -> b`` when it gives the Jacobian rows, else None.

    Only one position per row: with several, a row's Jacobian also holds the
    (zero) blocks of the other output positions, which the VJPs give directly.
    """
    structure = detect_section(model, a, b)
    shape_in, shape_out = tuple(acts[a.spec].shape[1:]), tuple(acts[b.spec].shape[1:])
    if structure is None or not fits_rows(structure, a, b, shape_in, shape_out, sequence):
        return None
    if len(shape_in) == 2 and shape_in[0] != 1:
        return None
    if hasattr(structure, "verify") and not check_declared(
        structure, _as_rows(acts[a.spec], sequence, a),
        _as_rows(acts[b.spec], sequence, b), a.spec, b.spec,
    ):
        return None
    return structure


def _jacobian_rows(model, a, b, x, acts, structure, leaves, *, sequence, max_vectors, check):
    """Full Jacobian rows of section ``a -> b``: in closed form, or one VJP per output."""
    act_in = acts[a.spec]
    if structure is None:
        return _section_rows(
            model, a, b, x, act_in, None,
            sequence=sequence, max_vectors=max_vectors, check=check, leaves=leaves,
        )
    rows = _as_rows(act_in, sequence, a)
    with torch.no_grad():
        return structure.jacobians(structure.derivative(rows))


def _writer_for(cache, model, acts, jac_np, specs, sequence, dtype):
    """The cache to stream into, created from the first batch's shapes when given a path."""
    from .cache import ActivationCache

    if isinstance(cache, ActivationCache):
        return cache, False
    row_shapes, rows_per_sample = {}, {}
    for layer in specs:
        n_pos, d = _positions(acts[layer.spec].shape[1:], sequence, layer)
        row_shapes[layer.spec] = (d,)
        rows_per_sample[layer.spec] = n_pos
    writer = ActivationCache.create(
        cache,
        row_shapes,
        jacobians={pair: array.shape[1:] for pair, array in jac_np.items()},
        dtype=str(dtype).removeprefix("torch."),
        rows_per_sample=rows_per_sample,
        metadata={
            "collect": {
                "layers": [layer.spec for layer in specs],
                "sequence": bool(sequence) or any(s.axes is not None for s in specs),
                "jacobians": bool(jac_np),
                "model": type(model).__name__,
            }
        },
    )
    return writer, True
