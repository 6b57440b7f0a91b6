"""torch.distributed glue: every rank works on its shard, statistics merge exactly.

A graph fitted with ``fit_model(..., distributed=True)`` runs the same backward
chaining (:func:`sklearn_lib.graph._chain.build`) on every rank, over a
:class:`DistributedSource` that wraps the rank's own source. After each local
pass the ranks combine what they accumulated with collectives, so that every
rank holds the statistics and edges of all shards together and computes the
same bases:

* statistics by the multi-way form of Chan's update, with all-reduces only:
  ``W = sum_r w_r``, ``mean = sum_r w_r m_r / W``,
  ``S = sum_r (S_r + w_r (m_r - mean)(m_r - mean)^T)``, every sum of matrices
  at the largest power-of-four exponent of any rank (exact rescaling), never
  uncentred second moments;
* edges as sums over rows (each rank's mean edge times its rows);
* the cotangents of stochastic sources from rank 0, so that every rank
  projects on the same directions.

A local step that fails on some ranks must not leave the others waiting in the
next collective: every step ends with an exchange of error messages, and every
rank raises if any rank failed (:func:`agree`). A rank that dies is detected by
the process group's timeout (``init_process_group(timeout=...)``).
"""

import torch

from ..basis._stats import _exponent, _normalised, _sum_of_scaled, scale_by_power_of_two

#: Exponent standing for "a zero matrix" in the max-reduction of exponents.
_ZERO = -(2**40)


def _call(fn, *args, **kwargs):
    """A collective; a rank that died or timed out is reported in our words."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        # gloo and nccl raise RuntimeError (DistBackendError) when a peer's
        # connection closes or the process group's timeout passes.
        raise RuntimeError(
            "a collective of fit_model(distributed=True) failed: another rank died, was "
            "stopped, or did not reach this point within the process group's timeout "
            "(init_process_group(timeout=...)). Nothing was fitted on this rank. "
            f"torch.distributed said: {exc}"
        ) from exc


def resolve_group(distributed):
    """The process group for ``distributed=True`` or a group; raises if none is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True combines the shards of all ranks with torch.distributed, "
            "which is not initialised in this process: call "
            "torch.distributed.init_process_group(backend, ..., timeout=...) on every rank "
            "first (gloo for CPU tensors, nccl for CUDA)."
        )
    return None if distributed is True else distributed


def agree(group, error, what):
    """Exchange whether each rank failed ``what``; raise on every rank if any did."""
    import torch.distributed as dist

    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = [None] * dist.get_world_size(group)
    _call(dist.all_gather_object, messages, message, group=group)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if error is not None:
        raise error
    ranks = ", ".join(str(r) for r, _ in failed)
    detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
    raise RuntimeError(
        f"{what} failed on rank(s) {ranks}, so every rank stops: {detail}"
    ) from error


def collective(group, what, fn):
    """``fn()`` on this rank; every rank raises if it failed on any."""
    try:
        result, error = fn(), None
    except Exception as exc:  # every rank must learn of it, whatever it is
        result, error = None, exc
    agree(group, error, what)
    return result


def check_same(group, description, what):
    """Raise on every rank unless ``description`` (a dict) is the same on all ranks."""
    import torch.distributed as dist

    descriptions = [None] * dist.get_world_size(group)
    _call(dist.all_gather_object, descriptions, description, group=group)
    differ = [
        f"{key}: " + ", ".join(f"rank {r} {d.get(key)!r}" for r, d in enumerate(descriptions))
        for key in description
        if any(d.get(key) != description[key] for d in descriptions)
    ]
    if differ:
        raise ValueError(
            f"{what}: the ranks disagree on {'; '.join(differ)}. Every rank must run the "
            "same model, layers and dtype on its shard of the data."
        )


def _all_reduce(t, group, op="SUM"):
    import torch.distributed as dist

    _call(dist.all_reduce, t, op=getattr(dist.ReduceOp, op), group=group)
    return t


def _sum_over_ranks(P, exponent, group):
    """``sum_r P_r * 4**e_r`` over ranks as ``(P, e)``, normalised; exact rescaling."""
    zero = not bool(P.diagonal().any())
    e = torch.tensor([_ZERO if zero else exponent], dtype=torch.int64, device=P.device)
    top = int(_all_reduce(e, group, "MAX"))
    if top == _ZERO:
        return torch.zeros_like(P), 0
    P = torch.zeros_like(P) if zero else scale_by_power_of_two(P, 2 * (exponent - top))
    return _normalised(_all_reduce(P.contiguous(), group), top)


def all_reduce_statistics(stats, group):
    """The statistics of all ranks' shards together, the same on every rank."""
    device, dtype = stats.device, stats.dtype
    counts = torch.tensor([stats.weight, stats.n_samples], dtype=torch.float64, device=device)
    weight, n_samples = _all_reduce(counts, group).tolist()
    total = stats._empty_like()
    total.weight, total.n_samples = weight, int(n_samples)
    parts = [(stats.scatter, stats.scatter_exponent)]
    if stats.center and weight > 0:
        # Means are summed scaled by the power of two of the largest on any rank,
        # so that w_r m_r cannot overflow; the deviations from the global mean
        # add the between-rank scatter of Chan's update.
        largest = float(stats.mean.abs().max()) if stats.mean.numel() else 0.0
        e = torch.tensor([_exponent(largest)], dtype=torch.int64, device=device)
        e = int(_all_reduce(e, group, "MAX"))
        m = scale_by_power_of_two(stats.mean, -e)
        mean = _all_reduce((m * stats.weight).to(dtype).contiguous(), group) / weight
        delta = m - mean
        parts.append((stats.weight * torch.outer(delta, delta), e))
        total.mean = scale_by_power_of_two(mean, e)
    total.scatter, total.scatter_exponent = _sum_over_ranks(*_sum_of_scaled(parts), group)
    if stats.jacobian_scatter is not None:
        total.n_outputs = stats.n_outputs
        total.jacobian_scatter, total.jacobian_exponent = _sum_over_ranks(
            stats.jacobian_scatter, stats.jacobian_exponent, group
        )
    return total


class DistributedSource:
    """A rank's source whose statistics and edges are those of all ranks' shards."""

    def __init__(self, source, group, description):
        self._source, self._group = source, group
        check_same(group, {**description, "widths": list(source.widths),
                           "positions": list(source.positions), "dtype": str(source.dtype)},
                   "fit_model(distributed=True)")
        self._n_samples = None

    def __getattr__(self, name):
        return getattr(self._source, name)

    @property
    def n_samples(self):
        if self._n_samples is None:
            n = torch.tensor([self._source.n_samples], dtype=torch.int64,
                             device=self._source.device)
            self._n_samples = int(_all_reduce(n, self._group))
        return self._n_samples

    def _local(self, what, fn):
        return collective(self._group, what, fn)

    def _shared(self, V):
        """Rank 0's cotangents (stochastic sources are drawn on each rank)."""
        import torch.distributed as dist

        V = V.contiguous().clone()
        _call(dist.broadcast, V, src=dist.get_global_rank(self._group, 0) if self._group else 0,
              group=self._group)
        return V

    def activation_stats(self, l, new_stats):
        stats = self._local(f"the statistics of layer {l}",
                            lambda: self._source.activation_stats(l, new_stats))
        return all_reduce_statistics(stats, self._group)

    def _rank_sources(self, position_sources):
        """Each rank's own signs: the same seed on every rank would correlate them."""
        import torch.distributed as dist

        if position_sources is None:
            return None
        return position_sources.offset(dist.get_rank(self._group))

    def jacobian_stats(self, l, V, new_stats, position_sources=None):
        V, sources = self._shared(V), self._rank_sources(position_sources)
        stats = self._local(f"the statistics of layer {l}",
                            lambda: self._source.jacobian_stats(l, V, new_stats,
                                                                position_sources=sources))
        return all_reduce_statistics(stats, self._group)

    def global_stats(self, V, new_stats, position_sources=None):
        V, sources = self._shared(V), self._rank_sources(position_sources)
        stats = self._local("the statistics of the global variant",
                            lambda: self._source.global_stats(V, new_stats,
                                                              position_sources=sources))
        return [all_reduce_statistics(s, self._group) for s in stats]

    def edges(self, l, V, mean, C, C_pinv, **kwargs):
        if kwargs.get("position_sources") is not None:
            kwargs["position_sources"] = self._rank_sources(kwargs["position_sources"])
        E = self._local(f"the edges of section {l}",
                        lambda: self._source.edges(l, V, mean, C, C_pinv, **kwargs))
        rows = self._source.n_samples * self._source.positions[l]
        total = self.n_samples * self._source.positions[l]
        # Each rank's mean edge times its rows is its sum over rows.
        return _all_reduce((E * rows).contiguous(), self._group) / total


def collect_shard(distributed, collect_shard_to, cache, layers):
    """``collect`` on this rank's shard; ranks agree on what they recorded or all raise.

    ``collect_shard_to(cache)`` runs the local collect. A ``cache`` path must
    name every rank's cache with ``"{rank}"``.
    """
    import os
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
