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
from ..utils._distributed import all_reduce, call, check_same, collective

#: Exponent standing for "a zero matrix" in the max-reduction of exponents.
_ZERO = -(2**40)


def _sum_over_ranks(P, exponent, group):
    """``sum_r P_r * 4**e_r`` over ranks as ``(P, e)``, normalised; exact rescaling."""
    zero = not bool(P.diagonal().any())
    e = torch.tensor([_ZERO if zero else exponent], dtype=torch.int64, device=P.device)
    top = int(all_reduce(e, group, "MAX"))
    if top == _ZERO:
        return torch.zeros_like(P), 0
    P = torch.zeros_like(P) if zero else scale_by_power_of_two(P, 2 * (exponent - top))
    return _normalised(all_reduce(P.contiguous(), group), top)


def all_reduce_statistics(stats, group):
    """The statistics of all ranks' shards together, the same on every rank."""
    device, dtype = stats.device, stats.dtype
    counts = torch.tensor([stats.weight, stats.n_samples], dtype=torch.float64, device=device)
    weight, n_samples = all_reduce(counts, group).tolist()
    total = stats._empty_like()
    total.weight, total.n_samples = weight, int(n_samples)
    parts = [(stats.scatter, stats.scatter_exponent)]
    if stats.center and weight > 0:
        # Means are summed scaled by the power of two of the largest on any rank,
        # so that w_r m_r cannot overflow; the deviations from the global mean
        # add the between-rank scatter of Chan's update.
        largest = float(stats.mean.abs().max()) if stats.mean.numel() else 0.0
        e = torch.tensor([_exponent(largest)], dtype=torch.int64, device=device)
        e = int(all_reduce(e, group, "MAX"))
        m = scale_by_power_of_two(stats.mean, -e)
        mean = all_reduce((m * stats.weight).to(dtype).contiguous(), group) / weight
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
            self._n_samples = int(all_reduce(n, self._group))
        return self._n_samples

    def _local(self, what, fn):
        return collective(self._group, what, fn)

    def _shared(self, V):
        """Rank 0's cotangents (stochastic sources are drawn on each rank)."""
        import torch.distributed as dist

        V = V.contiguous().clone()
        call(dist.broadcast, V, src=dist.get_global_rank(self._group, 0) if self._group else 0,
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
        return all_reduce((E * rows).contiguous(), self._group) / total
