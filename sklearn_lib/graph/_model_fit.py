"""Fitting an interaction graph from a live torch model (``InteractionGraph.fit_model``).

The estimator validates its parameters; this module prepares the model source
(on one process, or on every rank of a process group), the checkpoint of the
fit's passes, and runs the backward chaining of :func:`~._chain.build` over it.
"""

import numpy as np

from ..sources._distributed import DistributedSource
from ..sources._edges import path_quadrature
from ..sources._model_source import ModelSource
from ..utils._backend import eval_mode, resolve_device
from ..utils._distributed import collective, resolve_group
from ._chain import build
from ._checkpoint import (
    Checkpoint,
    check_checkpoint,
    data_digest,
    known_samples,
    model_digest,
    shard_bounds,
    shard_sources,
)

__all__ = ["fit_from_model"]


def frame_as_array(data):
    """A pandas DataFrame of model inputs as its ndarray (one row per sample); else ``data``.

    Iterating a DataFrame yields its column names, which would reach the model
    as a batch of strings.
    """
    if not type(data).__module__.startswith("pandas") or getattr(data, "ndim", None) != 2:
        return data
    from pandas.api.types import is_bool_dtype, is_complex_dtype, is_numeric_dtype

    text = [name for name, dtype in data.dtypes.items()
            if not (is_numeric_dtype(dtype) or is_bool_dtype(dtype)) or is_complex_dtype(dtype)]
    if text:
        raise TypeError(
            f"data is a DataFrame with columns that are not real numbers: {text} (dtypes "
            f"{[str(data.dtypes[name]) for name in text]}). A model takes numbers: encode or "
            "drop them, e.g. data.drop(columns=...) or pandas.get_dummies."
        )
    array = data.to_numpy()
    if array.dtype == object:  # nullable extension dtypes; their missing values become NaN
        array = data.to_numpy(dtype=np.float64, na_value=np.nan)
    return array


def fit_from_model(graph, model, layers, data, *, sequence, distributed, checkpoint,
                   checkpoint_every):
    """The fitted attributes of ``graph`` from ``model`` on ``data`` (see ``fit_model``)."""
    data = frame_as_array(data)
    alphas, weights = path_quadrature(graph.integration, graph.n_alphas)
    edge_point = "reconstructed" if graph.edge_point == "auto" else graph.edge_point

    def model_source(model=model, data=data):
        return ModelSource(
            model, layers, data, sequence=sequence, batch_size=graph.batch_size,
            device=resolve_device(graph.device), dtype=graph.dtype,
            fast_path=graph.fast_path, memory_limit=graph.memory_limit,
            verbose=graph.verbose, model_dtype=graph.model_dtype,
        )

    def prepare():
        source = model_source()
        fast = [source.structure(l, l + 1) is not None for l in range(source.n_layers - 1)]
        if graph.fast_path is True and not all(fast):
            slow = [
                f"{source.specs[l].spec!r} -> {source.specs[l + 1].spec!r}"
                + (f" ({source.reasons[l, l + 1]})" if (l, l + 1) in source.reasons else "")
                for l, ok in enumerate(fast) if not ok
            ]
            raise ValueError(
                "fast_path=True needs every pair of adjacent layers to be one nn.Linear "
                "and/or one elementwise activation of an nn.Sequential, or the input and "
                "output of a block declared with declare_residual_mlp, a section "
                "declared with declare_attention, the MLP half of a GPT-2, GPT-NeoX or "
                "Llama block (its ln_2/post_attention_layernorm input to the block's "
                "output) or its attention half, a TransformerLens bridge of such a block, "
                "a residual MLP or attention of the model's own forward found by its values, "
                "or a Linear read alone; these sections "
                f"are not: {', '.join(slow)}. Use fast_path='auto'."
            )
        return source, fast

    check_checkpoint(checkpoint, checkpoint_every, data, distributed)
    if distributed is False:
        source, fast = prepare()
    else:
        # A rank that fails to start must not leave the others waiting.
        group = resolve_group(distributed)
        source, fast = collective(group, "fit_model", prepare)
        source = DistributedSource(source, group, {"layers": [s.spec for s in source.specs],
                                                   "fast_path": fast})
    names = [s.spec for s in source.specs]
    store, n_samples = None, known_samples(data)
    if checkpoint is not None:
        digest, n_samples = data_digest(source.data, graph.batch_size or 1024, source.dtype)
        shards, shard_source = None, None
        if checkpoint_every is not None:
            shards = shard_bounds(n_samples, checkpoint_every, graph.batch_size)
            shard_source = shard_sources(source, shards, model_source)
        store = Checkpoint(
            checkpoint,
            {"data": digest, "n_samples": n_samples, "model": model_digest(source.model)},
            # fast_path changes how a pass orients its basis (closed forms may lack
            # the signed sums), so a pass is reused only under the same setting.
            {"sequence": bool(sequence), "dtype": str(source.dtype), "center": graph.center,
             "fast_path": str(graph.fast_path)},
            source.device, shards=shards, shard_source=shard_source)
    with eval_mode(source.model):
        result = build(graph, source, names, edge_point=edge_point, alphas=alphas,
                       weights=weights, checkpoint=store, n_samples=n_samples)
    result.update(layer_names_=names, fast_path_=fast,
                  n_samples_seen_=source.n_samples or n_samples)
    if store is not None:
        result["checkpoint_log_"] = store.log
    return result
