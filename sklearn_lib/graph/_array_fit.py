"""Fitting an interaction graph from cached activations and Jacobians (``InteractionGraph.fit``).

The estimator validates its parameters; this module reads an
:class:`~sklearn_lib.cache.ActivationCache` into its layers and Jacobians, refuses
the settings that need a model, picks the source (in memory or Dask) and runs the
backward chaining of :func:`~._chain.build` over it.
"""

from ..basis._dask import is_dask_array
from ..sources._cached import CachedSource
from ..utils._backend import resolve_device, resolve_dtype
from ._chain import build

__all__ = ["fit_from_arrays"]


def _listed(arrays):
    return arrays if isinstance(arrays, (list, tuple)) else []


def _cache_arrays(cache, jacobians, sequence):
    """The layer names, activations, adjacent Jacobians and ``sequence`` of a cache."""
    if jacobians is not None:
        raise ValueError("pass either an ActivationCache or jacobians, not both.")
    names = cache.layers
    missing = [p for p in zip(names[:-1], names[1:]) if p not in cache.jacobian_pairs]
    if missing:
        raise ValueError(
            f"the cache has no Jacobians for the adjacent sections {missing}; "
            f"stored: {cache.jacobian_pairs}."
        )
    jacobians = [cache.jacobians(a, b) for a, b in zip(names[:-1], names[1:])]
    sequence = sequence or any(r > 1 for r in cache.rows_per_sample.values()) or bool(
        cache.metadata.get("collect", {}).get("sequence", False)
    )
    return names, [cache.activations(name) for name in names], jacobians, sequence


def fit_from_arrays(graph, X, jacobians, *, sequence):
    """The fitted attributes of ``graph`` from cached arrays or a cache (see ``fit``)."""
    names = None
    # Imported on use: ``import sklearn_lib`` does not load the cache module.
    from ..cache._cache import ActivationCache

    if isinstance(X, ActivationCache):
        names, X, jacobians, sequence = _cache_arrays(X, jacobians, sequence)
    if graph.edge_point == "reconstructed":
        raise ValueError(
            "edge_point='reconstructed' needs Jacobians at reconstructed points, which "
            "a cache does not have; use edge_point='data' (or 'auto') with fit, or "
            "fit_model with a model."
        )
    if graph.integration is not None:
        raise ValueError(
            f"integration={graph.integration!r} evaluates Jacobians along a path, which "
            "needs a model; use fit_model, or integration=None with cached Jacobians."
        )
    device, dtype = resolve_device(graph.device), resolve_dtype(graph.dtype)
    source_class = CachedSource
    if any(is_dask_array(a) for a in [*_listed(X), *_listed(jacobians)]):
        from ..sources._dask_source import DaskSource as source_class
    source = source_class(
        X, jacobians, sequence=sequence, batch_size=graph.batch_size,
        device=device, dtype=dtype, verbose=graph.verbose,
    )
    if names is None:
        names = [str(l) for l in range(source.n_layers)]
    result = build(graph, source, names, edge_point="data")
    result.update(layer_names_=list(names), n_samples_seen_=source.n_samples,
                  fast_path_=[False] * (source.n_layers - 1))
    return result
