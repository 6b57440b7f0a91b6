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
by the argument and is stopped as soon as ``b`` has been computed. The
replacement reaches every later use of the tensor ``a`` names, not only the
module that reads it: for ``a = "h.0.ln_2:input"`` in a pre-norm block that adds
that value back after its MLP, the section is ``h + mlp(ln_2(h))``, the total
derivative. A value also used before ``a``'s module runs, or read later through
another view of its memory, cannot be replaced everywhere and is refused.
Everything that does not flow from ``a``'s value (for example a residual stream
branching off before ``a``) is held at its value for the batch.

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

import os

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils._backend import eval_mode, model_device, resolve_dtype
from ..utils._distributed import check_same, collective, resolve_group
from ._adapters import check_unpadded, n_samples
from ._block_detect import block_section
from ._blocks import NormMLP
from ._fastpath import detect_section, fits_rows, section_leaves, warn_formula
from ._independence import check_independent
from ._model import (
    _ArraySink,
    _as_rows,
    _cast,
    _check_forward,
    _input_tensor,
    _iter_batches,
    _parse_layers,
    _positions,
    _record_batch,
)
from ._sections import _run_section, section_function  # noqa: F401 (the model source)
from ._vjp import (  # noqa: F401 (_section_rows: the graph's model source)
    _section_rows,
    prepare_model,
    section_vjp_products,
    sequence_jacobians_to_rows,
)

__all__ = [
    "collect",
    "prepare_model",
    "record_activations",
    "section_function",
    "section_vjp_products",
    "sequence_jacobians_to_rows",
]

# --------------------------------------------------------------------------- model
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
    distributed=False,
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
    distributed : bool or torch.distributed.ProcessGroup, default=False
        ``True`` (the default group) or a process group: every rank calls
        ``collect`` with its own shard of ``data`` and gets the arrays of its
        shard; a ``cache`` path must contain ``"{rank}"``, which is replaced by
        the rank, so that every rank writes its own cache (fit them together
        with Dask, see the page "Larger than memory and multi-GPU"). The ranks
        check that they recorded the same layers, shapes and dtype; a mismatch
        or a failure on any rank raises on every rank, and caches created by
        this call are then removed.

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
    >>> import zarr
    >>> np.allclose(acts_c[1][:], acts[1]), isinstance(acts_c[1], zarr.Array)
    (True, True)
    """
    if distributed is not False:

        def shard(cache):
            return collect(model, layers, data, jacobians=jacobians, batch_size=batch_size,
                           device=device, dtype=dtype, verbose=verbose, cache=cache,
                           sequence=sequence, max_vectors=max_vectors, fast_path=fast_path)

        return _collect_shard(distributed, shard, cache, layers)
    run_model = prepare_model(model, device=device, dtype=dtype)
    device, dtype = model_device(run_model), resolve_dtype(dtype)
    specs = _parse_layers(run_model, layers, "output")
    if jacobians and len(specs) < 2:
        raise ValueError("jacobians=True needs at least two layers.")
    sections = list(zip(specs[:-1], specs[1:])) if jacobians else []
    batches, total = _iter_batches(data, batch_size)
    if cache is not None:
        from ..cache._cache import ActivationCache
        from ..cache._format import _check_target

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
                    with torch.no_grad():
                        check_independent(run_model, specs, x)
                check_unpadded(x)
                with torch.no_grad():
                    recorded = _record_batch(run_model, specs, x)
                acts = {s: _cast(t, dtype) for s, t in recorded.items()}
                if structures is None:
                    structures = {
                        (a.spec, b.spec): [
                            _closed_form(run_model, a, b, acts, sequence) if fast_path else None,
                            section_leaves(run_model, a, b),
                        ]
                        for a, b in sections
                    }
                # Types and declarations only say what a section should compute:
                # a batch where the model computes something else, and every later
                # one, takes vector-Jacobian products (the earlier ones' closed-form
                # Jacobians were those of the model).
                for a, b in sections:
                    _check_closed_form(structures[(a.spec, b.spec)], a, b, acts, sequence,
                                       f"the batch of samples {seen} to {seen + n_samples(x) - 1}")
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
    structure = detect_section(model, a, b) or block_section(model, a, b)
    shape_in, shape_out = tuple(acts[a.spec].shape[1:]), tuple(acts[b.spec].shape[1:])
    if structure is None or not fits_rows(structure, a, b, shape_in, shape_out, sequence):
        return None
    if len(shape_in) == 2 and shape_in[0] != 1:
        return None
    return structure


def _check_closed_form(entry, a, b, acts, sequence, where):
    """Drop the closed form of ``entry`` (``[structure, leaves]``) if this batch breaks it."""
    structure = entry[0]
    if structure is None:
        return
    mismatch = structure.mismatch(_as_rows(acts[a.spec], sequence, a),
                                  _as_rows(acts[b.spec], sequence, b))
    if mismatch is not None:
        warn_formula(structure, a.spec, b.spec, where, mismatch, stacklevel=4)
        entry[0] = None


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
        if isinstance(structure, NormMLP):  # its Jacobians are not affine in one derivative
            return structure.jacobians(rows)
        return structure.jacobians(structure.derivative(rows))


def _writer_for(cache, model, acts, jac_np, specs, sequence, dtype):
    """The cache to stream into, created from the first batch's shapes when given a path."""
    from ..cache._cache import ActivationCache

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


def _collect_shard(distributed, collect_shard_to, cache, layers):
    """``collect`` on this rank's shard; ranks agree on what they recorded or all raise.

    ``collect_shard_to(cache)`` runs the local collect. A ``cache`` path must
    name every rank's cache with ``"{rank}"``.
    """
    import shutil

    import torch.distributed as dist

    group = resolve_group(distributed)
    rank = dist.get_rank(group)
    path = None
    if cache is not None and isinstance(cache, (str, os.PathLike)):
        path = os.fspath(cache)

    def local():
        if path is not None and "{rank}" not in path:
            raise ValueError(
                f"collect(distributed=True) writes one cache per rank: the cache path must "
                f"contain '{{rank}}' (e.g. 'acts-{{rank}}.zarr'), got {path!r}."
            )
        return collect_shard_to(cache if path is None else path.format(rank=rank))

    acts, jacs = collective(group, "collect", local)
    try:
        check_same(group, {
            "layers": [str(layer) for layer in layers],
            "activation shapes": [tuple(a.shape[1:]) for a in acts],
            "jacobian shapes": [tuple(J.shape[1:]) for J in jacs],
            "dtype": str(acts[0].dtype),
        }, "collect(distributed=True)")
    except ValueError:
        if path is not None:
            # Complete caches of shards that do not fit together are no result.
            shutil.rmtree(path.format(rank=rank), ignore_errors=True)
        raise
    return acts, jacs
