"""The backward chaining of SPEC section 2, written once for every source.

:func:`build` fits layer ``L``'s basis, then every earlier layer's from the
Jacobians of the next layer's basis coordinates (or the final layer's), and
finally the edges of every section, asking a *source* of
:mod:`sklearn_lib.sources._cached` or :mod:`sklearn_lib.sources._model_source` (cached arrays or a
live model) for statistics and edges. The functions take the :class:`~sklearn_lib.InteractionGraph` whose
parameters they follow; the estimator itself only validates, picks the source
and stores the result.
"""

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils import check_random_state
from tqdm.auto import tqdm

from ..basis._basis import InteractionBasis
from ..basis._linalg import gram_eigenvalues
from ..basis._stats import InteractionStatistics
from ..models._vjp import PositionSources
from ..utils._backend import as_tensor
from ._checkpoint import NoCheckpoint, tensor_digest

__all__ = ["build"]


def layer_n_components(graph, n_layers):
    """The ``n_components`` of every layer, checked against the number of layers."""
    nc = graph.n_components
    identity = graph.final_layer == "identity"
    if nc is None or isinstance(nc, Real):
        per_layer = [nc] * n_layers
        if identity:
            per_layer[-1] = None
        return per_layer
    per_layer = list(nc)
    if len(per_layer) != n_layers:
        raise ValueError(
            f"n_components must have one entry per layer: expected {n_layers}, got "
            f"{len(per_layer)} ({per_layer})."
        )
    for entry in per_layer:
        if entry is not None and not (isinstance(entry, Integral) and entry >= 1 or (
                isinstance(entry, Real) and 0 < entry < 1)):
            raise ValueError(
                f"n_components entries must be positive ints, shares in (0, 1) or None, "
                f"got {per_layer}."
            )
    if identity and per_layer[-1] is not None:
        raise ValueError(
            "final_layer='identity' keeps every direction of the final layer; "
            f"n_components[-1] must be None, got {per_layer[-1]}."
        )
    return per_layer


def new_basis(graph, n_components):
    """An unfitted InteractionBasis with the graph's per-layer settings."""
    return InteractionBasis(
        n_components,
        center=graph.center,
        truncation_threshold=graph.truncation_threshold,
        batch_size=graph.batch_size,
        device=graph.device,
        dtype=graph.dtype,
    )


def identity_basis(graph, stats):
    """An InteractionBasis fitted to the identity map (C = C_pinv = I, mean 0)."""
    basis = new_basis(graph, None)
    d = stats.n_features
    gram = stats.gram
    second_moment = torch.diagonal(gram) + stats.mean.square()
    eye = np.eye(d, dtype=np.dtype(graph.dtype))
    basis._statistics = stats
    basis.components_ = eye.copy()
    basis.inverse_components_ = eye.copy()
    basis.mean_ = np.zeros(d, dtype=eye.dtype)
    basis.interaction_strengths_ = second_moment.cpu().numpy()
    # From the R factor, as for every other layer: accurate to eps^2 of the
    # largest, and finite for activations beyond 1e154, whose Gram matrix is not.
    basis.gram_eigenvalues_ = gram_eigenvalues(stats.factors()).cpu().numpy()
    basis.gram_ = gram.cpu().numpy()
    basis.jacobian_gram_ = eye.copy()
    basis.n_components_ = d
    basis.n_samples_seen_ = stats.n_samples
    basis.n_outputs_ = None
    basis.n_features_in_ = d
    return basis


def cotangents(graph, C, rng):
    """``C`` or, with stochastic sources, ``C R / sqrt(k)`` with ``R`` random ±1."""
    k = graph.stochastic_sources
    if k is None:
        return C
    R = rng.choice(np.array([-1.0, 1.0]), size=(C.shape[1], k))
    return C @ torch.as_tensor(R, device=C.device, dtype=C.dtype) / np.sqrt(k)


def position_sources(graph, rng, device):
    """Stochastic sources over output positions for one layer's statistics, or None."""
    m = graph.stochastic_positions
    return None if m is None else PositionSources(m, rng.randint(2**31 - 1), device)


def pass_plan(graph, n_layers):
    """The passes over the data a build makes, in order: ``(kind, layer)`` pairs.

    One for the final layer's activations, one per earlier layer's statistics
    (``"activations"`` for PCA, ``"jacobians"`` otherwise; the global variant's
    ``"global"`` passes are made together) and one per section's edges.
    """
    L = n_layers - 1
    kind = ("activations" if graph.basis == "pca" else
            "jacobians" if graph.variant == "local" else "global")
    return ([("activations", L)] + [(kind, l) for l in range(L - 1, -1, -1)]
            + [("edges", l) for l in range(L)])


class _Progress:
    """One bar over every sample of every pass still to compute, for the ETA of the whole fit.

    ``n_samples`` known: the bar counts samples (``passes * n_samples``), advanced
    batch by batch through ``source.progress`` where the source offers it, and
    set to the pass boundary when a pass ends. Unknown: it counts passes. A
    pass loaded from a checkpoint leaves the total instead of advancing it, so
    the rate (and the ETA) is that of the passes computed.
    """

    def __init__(self, graph, source, n_passes, n_samples):
        self.unit = n_samples or 1
        self.done = 0
        self.bar = tqdm(total=n_passes * self.unit, desc="InteractionGraph",
                        unit="sample" if n_samples else "pass", disable=not graph.verbose,
                        smoothing=0.05)
        self.source = source
        if n_samples and hasattr(source, "progress"):
            source.progress = self.bar.update

    def finished(self, passes=1):
        if not passes:
            return
        n = getattr(self.source, "n_samples", None)
        if self.unit > 1 and n and n != self.unit:
            # The count given up front was a DataLoader's dataset, not what it yields.
            self.bar.total = self.bar.total // self.unit * n
            self.done, self.unit = self.done // self.unit * n, n
        self.done += round(passes * self.unit)
        self.bar.update(self.done - self.bar.n)

    def loaded(self, passes=1):
        if not passes:
            return
        self.bar.total -= round(passes * self.unit)
        self.bar.refresh()

    def close(self):
        if getattr(self.source, "progress", None) is not None:
            self.source.progress = None
        self.bar.close()


def build(graph, source, names, *, edge_point, alphas=(1.0,), weights=(1.0,),
          checkpoint=None, n_samples=None):
    """Backward chaining of SPEC section 2 over any source; returns the fitted state.

    ``checkpoint`` (a :class:`~sklearn_lib.graph._checkpoint.Checkpoint`) loads
    every pass it holds under the same key and saves every pass computed;
    ``n_samples``, when known before the first pass, lets the progress bar
    count samples.
    """
    n_layers = source.n_layers
    L = n_layers - 1
    n_components = layer_n_components(graph, n_layers)
    rng = check_random_state(graph.random_state)
    device, dtype = source.device, source.dtype
    what = lambda l: f"layer {names[l]!r}"  # noqa: E731

    def new_stats(l, n_outputs):
        return InteractionStatistics(
            source.widths[l], n_outputs, center=graph.center, device=device, dtype=dtype
        )

    def tensors(basis):
        t = lambda a: as_tensor(a, device=device, dtype=dtype)  # noqa: E731
        return t(basis.mean_), t(basis.components_.T), t(basis.inverse_components_)

    checkpoint = NoCheckpoint() if checkpoint is None else checkpoint
    n_samples = n_samples or source.n_samples
    plan = pass_plan(graph, n_layers)
    steps = _Progress(graph, source, len(plan), n_samples)

    def run(kind, l, key, compute, passes=1):
        # ``compute(src, i)``: the pass over ``src``, shard ``i`` of the data (None: all).
        result, loaded = checkpoint.run(kind, l, key, compute)
        steps.loaded(passes * loaded)
        steps.finished(passes * (1 - loaded))
        return result

    def seeds(ps):
        # A generator draws other signs from the same seed on another device type.
        return None if ps is None else [ps.m, ps.seed, torch.device(ps.device).type]

    def shard(ps, i):
        # Every shard draws its own stream of signs, the same whichever shards are loaded.
        return ps if ps is None or i is None else ps.offset(i + 1)

    try:
        bases = [None] * n_layers
        stats_L = run("activations", L, {"names": [names[L]]},
                      lambda src=source, i=None: src.activation_stats(L, new_stats))
        if graph.final_layer == "identity":
            bases[L] = identity_basis(graph, stats_L)
        else:
            bases[L] = new_basis(graph, n_components[L])._fit_statistics(stats_L, name=what(L))
        C = [None] * n_layers
        C[L] = tensors(bases[L])[1]
        if graph.basis == "pca":
            for l in range(L - 1, -1, -1):
                stats = run("activations", l, {"names": [names[l]]},
                            lambda src=source, i=None, l=l: src.activation_stats(l, new_stats))
                bases[l] = new_basis(graph, n_components[l])._fit_statistics(stats, name=what(l))
                C[l] = tensors(bases[l])[1]
        elif graph.variant == "local":
            for l in range(L - 1, -1, -1):
                V = cotangents(graph, C[l + 1], rng)
                ps = position_sources(graph, rng, device)
                # The statistics depend on the downstream basis only through V.
                key = {"names": [names[l], names[l + 1]], "V": tensor_digest(V),
                       "positions": seeds(ps)}
                stats = run("jacobians", l, key,
                            lambda src=source, i=None, l=l, V=V, ps=ps: src.jacobian_stats(
                                l, V, new_stats, position_sources=shard(ps, i)))
                bases[l] = new_basis(graph, n_components[l])._fit_statistics(stats, name=what(l))
                C[l] = tensors(bases[l])[1]
        else:
            V = cotangents(graph, C[L], rng)
            ps = position_sources(graph, rng, device)
            key = {"names": list(names), "V": tensor_digest(V), "positions": seeds(ps)}
            all_stats = run("global", L, key, lambda src=source, i=None: src.global_stats(
                V, new_stats, position_sources=shard(ps, i)), passes=L)
            for l in range(L):
                bases[l] = new_basis(graph, n_components[l])._fit_statistics(
                    all_stats[l], name=what(l))
                C[l] = tensors(bases[l])[1]
        edges = []
        for l in range(L):
            mean, C_l, C_pinv = tensors(bases[l])
            out_mean = tensors(bases[l + 1])[0] if graph.constant_node else None
            ps = position_sources(graph, rng, device)
            key = {"names": [names[l], names[l + 1]], "edge_point": edge_point,
                   "alphas": [repr(float(a)) for a in alphas],
                   "weights": [repr(float(w)) for w in weights],
                   "bases": tensor_digest(C[l + 1], mean, C_l, C_pinv, out_mean),
                   "positions": seeds(ps)}
            E = run("edges", l, key, lambda src=source, i=None: src.edges(
                l, C[l + 1], mean, C_l, C_pinv, edge_point=edge_point, alphas=list(alphas),
                weights=list(weights), out_mean=out_mean, position_sources=shard(ps, i))
            ).cpu().numpy()
            if graph.constant_node and graph._has_constant_node(l + 1, n_layers):
                # The constant is carried from every position to itself.
                row = np.zeros((1, E.shape[1]), dtype=E.dtype)
                row[0, -1] = source.positions[l + 1] / source.positions[l]
                E = np.concatenate([E, row])
            edges.append(E)
    finally:
        steps.close()
    r = np.array([b.n_components_ for b in bases], dtype=np.int64)
    return {
        "bases_": bases,
        "edges_": edges,
        "n_components_": r,
        "layer_offsets_": graph._layer_offsets(r),
        "n_layers_": n_layers,
        "edge_point_": edge_point,
    }
