"""The backward chaining of SPEC section 2, written once for every source.

:func:`build` fits layer ``L``'s basis, then every earlier layer's from the
Jacobians of the next layer's basis coordinates (or the final layer's), and
finally the edges of every section, asking a *source* of
:mod:`sklearn_lib.sources._cached` or :mod:`sklearn_lib.sources._model_source` (cached arrays or a
live model) for statistics and edges. The functions take the :class:`~sklearn_lib.InteractionGraph` whose
parameters they follow; the estimator itself only validates, picks the source
and stores the result. Stochastic fits also get error bars from independent
groups of their random sources (:func:`grouped_stats`,
:mod:`sklearn_lib.basis._error_bars`).
"""

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils import check_random_state
from tqdm.auto import tqdm

from ..basis._basis import InteractionBasis
from ..basis._error_bars import (
    SourceGroups,
    group_shares,
    grouped_std,
    interaction_strength_std,
)
from ..basis._linalg import gram_eigenvalues
from ..basis._stats import InteractionStatistics
from ..models._position_sources import PositionSources
from ..sources._cached import CachedSource
from ..sources._model_source import ModelSource
from ._checkpoint import NoCheckpoint, tensor_digest
from ._final import basis_tensors, fit_wide_final, is_wide

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


def cotangents(graph, C, rng, k=None):
    """``C`` or, with stochastic sources, ``C R / sqrt(k)`` with ``R`` random ±1.

    ``k`` defaults to ``stochastic_sources`` (a group of them when given).
    """
    k = graph.stochastic_sources if k is None else k
    if k is None:
        return C
    R = rng.choice(np.array([-1.0, 1.0]), size=(C.shape[1], k))
    return C @ torch.as_tensor(R, device=C.device, dtype=C.dtype) / np.sqrt(k)


def position_sources(graph, rng, device):
    """Stochastic sources over output positions for one layer's statistics, or None."""
    m = graph.stochastic_positions
    return None if m is None else PositionSources(m, rng.randint(2**31 - 1), device)


def _moments(stats):
    """``M'`` of the statistics as a float64 array (d, d)."""
    return stats.jacobian_gram.cpu().numpy().astype(np.float64)


def grouped_stats(graph, source, C, rng, device, call, *, in_pass=True):
    """Statistics of one call ``call(V, position_sources, **groups)`` with error-bar groups.

    Returns ``(result, groups)``: ``result`` as ``call`` returns it (statistics,
    or a list of them for the global variant) and ``groups`` None for an
    exact fit, else a function of the statistics' position in the list giving
    ``(group estimates of M' (G, d, d), shares)``; a single group gives NaN
    error bars. ``k >= 2`` direction sources are split into groups run one
    after another, each with its own draws of directions and positions (the
    draws are shared by all samples, so only separate runs are independent);
    otherwise, position combinations are grouped within the one pass of a live
    model (:class:`~sklearn_lib.basis._error_bars.SourceGroups`; ``in_pass``
    says whether ``call`` takes ``error_groups``). Cached
    Jacobians hold every position: there positions add no error.
    """
    k, m = graph.stochastic_sources, graph.stochastic_positions
    if k is None and m is None:
        return call(cotangents(graph, C, rng), None), None
    as_list = lambda r: r if isinstance(r, list) else [r]  # noqa: E731
    if k is not None and k >= 2:
        sizes = group_shares(k)
        runs = [call(cotangents(graph, C, rng, size), position_sources(graph, rng, device))
                for size in sizes]
        one = not isinstance(runs[0], list)
        runs = [as_list(run) for run in runs]
        shares = [size / k for size in sizes]
        moments = [np.stack([_moments(run[i]) for run in runs]) for i in range(len(runs[0]))]
        merged = [runs[0][i].mix_jacobians_([run[i] for run in runs[1:]], shares)
                  for i in range(len(runs[0]))]
        return (merged[0] if one else merged), lambda i: (moments[i], shares)
    V, sources = cotangents(graph, C, rng), position_sources(graph, rng, device)
    if in_pass and isinstance(source, ModelSource) and k is None:
        groups = SourceGroups(m)
        stats = call(V, sources, error_groups=groups)
        groups.scale = 1.0 / stats.weight
        estimates = groups.estimates(stats.jacobian_gram).cpu().numpy()
        return stats, lambda i: (estimates, _shares(groups))
    result = call(V, sources)
    if isinstance(source, CachedSource) and k is None:
        # Cached Jacobians hold every position: the fit is exact.
        return result, lambda i: (_moments(as_list(result)[i])[None], [1.0])
    # One direction source, one position combination, or sources that do not
    # group (torch.distributed): no spread to measure.
    return result, lambda i: (_moments(as_list(result)[i])[None], None)


def _shares(groups):
    """The groups' shares; ``[1.0]`` when nothing was random (exact), None for one group."""
    if groups.sums is None:
        return [1.0]
    return groups.shares if groups.n_groups >= 2 else None


def strengths_std(basis, groups):
    """``interaction_strengths_std_`` of a basis fitted from grouped statistics."""
    moments, shares = groups
    r = basis.n_components_
    if shares is None:
        return np.full(r, np.nan)
    if len(shares) == 1:
        return np.zeros(r)
    return interaction_strength_std(basis.interaction_strengths_, basis.inverse_components_,
                                    moments, shares)


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
    every pass it holds under the same key and saves every pass computed, with
    the error-bar groups of a stochastic pass; ``n_samples``, when known before
    the first pass, lets the progress bar count samples.
    """
    n_layers = source.n_layers
    L = n_layers - 1
    n_components = layer_n_components(graph, n_layers)
    rng = check_random_state(graph.random_state)
    device, dtype = source.device, source.dtype
    what = lambda l: f"layer {names[l]!r}"  # noqa: E731
    k, m = graph.stochastic_sources, graph.stochastic_positions
    stochastic = k is not None or m is not None

    def new_stats(l, n_outputs):
        return InteractionStatistics(
            source.widths[l], n_outputs, center=graph.center, device=device, dtype=dtype
        )

    def tensors(basis):
        return basis_tensors(basis, device, dtype)

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

    def stats_key(names_, C_next):
        # The statistics depend on the downstream basis only through C_{l+1} and the
        # random draws, which come from their own generator seeded here (error-bar
        # groups may draw several times): a key fixes both.
        seed = None if not stochastic else int(rng.randint(2**31 - 1))
        return seed, {"names": names_, "C": tensor_digest(C_next),
                      "stochastic": None if not stochastic else
                      [k, m, seed, torch.device(device).type]}

    def grouped(src, C_next, seed, call, in_pass=True):
        # ``(statistics, groups)`` of one pass; the groups materialised, so a
        # checkpoint keeps them (see grouped_stats).
        draws = None if seed is None else np.random.RandomState(seed)
        result, groups = grouped_stats(graph, src, C_next, draws, device, call, in_pass=in_pass)
        if groups is None:
            return result
        n = len(result) if isinstance(result, list) else 1
        return result, [groups(i) for i in range(n)]

    try:
        bases = [None] * n_layers
        if is_wide(source.widths[L]):
            # A vocabulary: no d x d statistics (see _final); its streamed passes
            # are not checkpointed.
            bases[L] = fit_wide_final(graph, source, L, n_components[L], rng, what(L))
            steps.finished()
        else:
            stats_L = run("activations", L, {"names": [names[L]]},
                          lambda src=source, i=None: src.activation_stats(L, new_stats))
            if graph.final_layer == "identity":
                bases[L] = identity_basis(graph, stats_L)
            else:
                bases[L] = new_basis(graph, n_components[L])._fit_statistics(stats_L,
                                                                             name=what(L))
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
                seed, key = stats_key([names[l], names[l + 1]], C[l + 1])
                result = run("jacobians", l, key, lambda src=source, i=None, l=l, seed=seed: (
                    grouped(src, C[l + 1], seed, lambda V, sources, **kw: src.jacobian_stats(
                        l, V, new_stats, position_sources=shard(sources, i), **kw))))
                stats, groups = result if isinstance(result, tuple) else (result, None)
                bases[l] = new_basis(graph, n_components[l])._fit_statistics(stats, name=what(l))
                if groups is not None:
                    bases[l].interaction_strengths_std_ = strengths_std(bases[l], groups[0])
                C[l] = tensors(bases[l])[1]
        else:
            seed, key = stats_key(list(names), C[L])
            result = run("global", L, key, lambda src=source, i=None: grouped(
                src, C[L], seed, lambda V, sources: src.global_stats(
                    V, new_stats, position_sources=shard(sources, i)), in_pass=False),
                passes=L)
            all_stats, groups = result if isinstance(result, tuple) else (result, None)
            for l in range(L):
                bases[l] = new_basis(graph, n_components[l])._fit_statistics(
                    all_stats[l], name=what(l))
                if groups is not None:
                    bases[l].interaction_strengths_std_ = strengths_std(bases[l], groups[l])
                C[l] = tensors(bases[l])[1]
        edges, edges_std = [], []
        for l in range(L):
            mean, C_l, C_pinv = tensors(bases[l])
            out_mean = tensors(bases[l + 1])[0] if graph.constant_node else None
            ps = position_sources(graph, rng, device)
            key = {"names": [names[l], names[l + 1]], "edge_point": edge_point,
                   "alphas": [repr(float(a)) for a in alphas],
                   "weights": [repr(float(w)) for w in weights],
                   "bases": tensor_digest(C[l + 1], mean, C_l, C_pinv, out_mean),
                   "positions": seeds(ps)}
            result = run("edges", l, key, lambda src=source, i=None, l=l, ps=ps: grouped_edges(
                graph, src, l, C[l + 1], mean, C_l, C_pinv, edge_point=edge_point,
                alphas=list(alphas), weights=list(weights), out_mean=out_mean,
                position_sources=shard(ps, i)))
            E, groups = result if isinstance(result, tuple) else (result, None)
            E = E.cpu().numpy()
            std = None if groups is None else edge_errors(E, *groups)
            if graph.constant_node and graph._has_constant_node(l + 1, n_layers):
                # The constant is carried from every position to itself.
                row = np.zeros((1, E.shape[1]), dtype=E.dtype)
                row[0, -1] = source.positions[l + 1] / source.positions[l]
                E = np.concatenate([E, row])
                std = None if std is None else np.concatenate([std, np.zeros_like(row)])
            edges.append(E)
            edges_std.append(std)
    finally:
        steps.close()
    for basis in bases:
        # Exact fits (and unrotated or PCA layers, which use no Jacobians) carry no error.
        if not hasattr(basis, "interaction_strengths_std_"):
            basis.interaction_strengths_std_ = None
    r = np.array([b.n_components_ for b in bases], dtype=np.int64)
    return {
        "bases_": bases,
        "edges_": edges,
        "edges_std_": None if m is None else edges_std,
        "n_components_": r,
        "layer_offsets_": graph._layer_offsets(r),
        "n_layers_": n_layers,
        "edge_point_": edge_point,
    }


def grouped_edges(graph, source, l, V, mean, C, C_pinv, *, position_sources, **options):
    """Edges of section l (a tensor), or ``(edges, (estimates, shares))`` when positions are random.

    Edges use the exact ``C_{l+1}``: only position combinations make them
    random. A live model groups them within the pass
    (:class:`~sklearn_lib.basis._error_bars.SourceGroups`): ``estimates`` are
    the groups' estimates of the edges ``(G, r_out, r_in)``. Cached Jacobians
    hold every position (exact: one group, share 1); sources that do not group
    (torch.distributed) show no spread (shares None).
    """
    m = graph.stochastic_positions
    if m is None:
        return source.edges(l, V, mean, C, C_pinv, position_sources=position_sources, **options)
    if not isinstance(source, ModelSource):
        E = source.edges(l, V, mean, C, C_pinv, position_sources=position_sources, **options)
        exact = isinstance(source, CachedSource)
        return E, (E.cpu().numpy()[None], [1.0] if exact else None)
    groups = SourceGroups(m)
    E = source.edges(l, V, mean, C, C_pinv, position_sources=position_sources,
                     error_groups=groups, **options)
    return E, (groups.estimates(E).cpu().numpy(), _shares(groups))


def edge_errors(E, estimates, shares):
    """Standard errors of edges ``E`` from the groups' estimates (NaN without groups)."""
    if shares is None:
        return np.full(E.shape, np.nan)
    return grouped_std(estimates, shares)
