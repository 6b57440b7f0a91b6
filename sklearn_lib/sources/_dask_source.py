"""An interaction graph's source for dask arrays: one Dask reduction per layer.

:class:`DaskSource` validates like :class:`~sklearn_lib.sources._cached.CachedSource`
(it is one) and then cuts every array into blocks of the same whole samples.
Each operation of the backward chaining (a layer's statistics, the global
variant's statistics, a section's edges) becomes one tree reduction
(:mod:`sklearn_lib.basis._dask`) whose tasks run the in-memory ``CachedSource`` code on
one block of numpy arrays: the math exists once, and a block is all a worker
ever holds.
"""

import uuid

import numpy as np

from ..basis._dask import (
    as_row_blocks,
    check_known_chunks,
    check_rows,
    compute,
    import_dask,
    is_dask_array,
    read_block,
    row_blocks,
    tree_reduce,
    warn_misaligned,
)
from ..basis._stats import InteractionStatistics
from ._cached import CachedSource


class _FreshStatistics:
    """A picklable ``new_stats(l, n_outputs)`` for the tasks (the graph's is a closure)."""

    def __init__(self, widths, center, device, dtype):
        self.widths, self.center, self.device, self.dtype = widths, center, device, dtype

    def __call__(self, l, n_outputs):
        return InteractionStatistics(self.widths[l], n_outputs, center=self.center,
                                     device=self.device, dtype=self.dtype)


def _to_cpu(result, rows):
    if isinstance(result, InteractionStatistics):
        return result.to("cpu")
    if isinstance(result, list):
        return [r.to("cpu") for r in result]
    # CachedSource.edges divides by the block's rows; the parts are sums.
    return (result * rows).cpu(), rows


def _block(state, method, slots, samples, call, *arrays):
    """Run ``CachedSource.<method>(*args, **kwargs)`` on one block of samples (numpy arrays)."""
    args, kwargs = call
    source = CachedSource.__new__(CachedSource)
    source.__dict__.update(state)
    source.acts = [None] * len(state["widths"])
    source.jacs = [None] * (len(state["widths"]) - 1)
    for (kind, l), array in zip(slots, arrays):
        getattr(source, kind)[l] = read_block(array)
    source.n_samples = samples[1] - samples[0]
    try:
        result = getattr(source, method)(*args, **kwargs)
    except ValueError as exc:
        raise ValueError(f"samples {samples[0]}..{samples[1] - 1}: {exc}") from exc
    rows = source.n_samples * state["positions"][args[0]] if method == "edges" else None
    return _to_cpu(result, rows)


def _sample_blocks(a, positions):
    """Samples per row block of ``a`` (fractions where a block cuts a sample apart)."""
    return tuple(rows / positions for rows in a.chunks[0])


class DaskSource(CachedSource):
    """Cached activations and Jacobians given as dask arrays (any other array is wrapped)."""

    def __init__(self, activations, jacobians, *, sequence, batch_size, device, dtype, verbose):
        import_dask()
        named = [(f"X[{l}]", a) for l, a in enumerate(activations)]
        named += [(f"jacobians[{l}]", J) for l, J in enumerate(jacobians or [])]
        for name, a in named:
            if is_dask_array(a):
                check_known_chunks(a, name)
        super().__init__(activations, jacobians, sequence=sequence, batch_size=batch_size,
                         device=device, dtype=dtype, verbose=verbose)
        # Every array is cut into the same blocks of whole samples: those of the
        # dask arrays if they agree, else those of the array whose blocks hold
        # the fewest samples (no block is larger than one given), made of whole
        # samples if its own are not.
        P = self.positions
        arrays = [(name, a, P[i if i < len(P) else i - len(P)]) for i, (name, a) in
                  enumerate(named)]
        given = {name: _sample_blocks(a, p) for name, a, p in arrays if is_dask_array(a)}
        reference = min(given, key=lambda name: max(given[name]))
        samples = given[reference]
        if any(not float(b).is_integer() for b in samples):
            S = max(1, int(max(samples)))
            samples = [min(S, self.n_samples - s) for s in range(0, self.n_samples, S)]
        samples = [int(b) for b in samples]
        self._starts = np.concatenate([[0], np.cumsum(samples)]).astype(int).tolist()
        misaligned = []

        def blocks(name, a, P):
            return as_row_blocks(a, tuple(P * s for s in samples), name, misaligned)

        self.acts = [blocks(name, a, P) for name, a, P in arrays[: self.n_layers]]
        self.jacs = [blocks(name, a, P) for name, a, P in arrays[self.n_layers :]]
        warn_misaligned(misaligned, reference)

    def _reduce(self, method, slots, args, what, **kwargs):
        """One tree reduction of ``CachedSource.<method>`` over the blocks of samples."""
        dask = import_dask()
        state = {"widths": self.widths, "positions": self.positions,
                 "batch_size": self.batch_size, "device": self.device, "dtype": self.dtype,
                 "verbose": False}
        # The arguments (cotangents, bases) are one node of the graph, not a copy per task.
        shared = dask.delayed((args, kwargs), name=f"sklearn_lib-args-{uuid.uuid4().hex}",
                              traverse=False)
        columns = [row_blocks(getattr(self, kind)[l]) for kind, l in slots]
        parts = [
            dask.delayed(_block, pure=False)(state, method, slots,
                                             (a, b), shared, *(c[i] for c in columns))
            for i, (a, b) in enumerate(zip(self._starts[:-1], self._starts[1:]))
        ]
        return compute(tree_reduce(parts), what)

    def _stats_args(self, new_stats):
        center = new_stats(0, None).center
        return _FreshStatistics(self.widths, center, self.device, self.dtype)

    def _checked(self, stats, l, what):
        check_rows(stats.n_samples, self.n_samples * self.positions[l], what)
        return stats.to(self.device)

    def activation_stats(self, l, new_stats):
        what = f"statistics of layer {l}"
        stats = self._reduce("activation_stats", [("acts", l)],
                             (l, self._stats_args(new_stats)), what)
        return self._checked(stats, l, what)

    def jacobian_stats(self, l, V, new_stats, position_sources=None):
        # Cached Jacobians hold every position: stochastic sources over positions
        # would save nothing (as in CachedSource).
        what = f"statistics of layer {l}"
        stats = self._reduce("jacobian_stats", [("acts", l), ("jacs", l)],
                             (l, V, self._stats_args(new_stats)), what)
        return self._checked(stats, l, what)

    def global_stats(self, V, new_stats, position_sources=None):
        L = self.n_layers - 1
        slots = [("acts", l) for l in range(L)] + [("jacs", l) for l in range(L)]
        what = "statistics of the global variant"
        stats = self._reduce("global_stats", slots, (V, self._stats_args(new_stats)), what)
        return [self._checked(s, l, what) for l, s in enumerate(stats)]

    def edges(self, l, V, mean, C, C_pinv, *, out_mean=None, **_):
        slots = [("acts", l), ("jacs", l)] + ([("acts", l + 1)] if out_mean is not None else [])
        what = f"edges of section {l}"
        E, rows = self._reduce("edges", slots, (l, V, mean, C, C_pinv), what,
                               out_mean=out_mean)
        check_rows(rows, self.n_samples * self.positions[l], what)
        return E.to(self.device) / rows
