"""torch.distributed glue: every rank works on its shard, statistics merge exactly.

A graph fitted with ``fit_model(..., distributed=True)`` runs the same backward
chaining (:func:`sklearn_lib.graph._chain.build`) on every rank, over a
:class:`DistributedSource` that wraps the rank's own source. After each local
pass the ranks combine what they accumulated with collectives, so that every
rank holds the statistics and edges of all shards together and computes the
same bases:

* statistics by one TSQR step (:func:`sklearn_lib.basis._stats.merge_factors`):
  every rank's R factor, mean and weight are gathered, rank 0 merges them and
  makes the whitening frame of the result, and every rank receives both; each
  rank then brings its Jacobian Gram matrix into that frame and the matrices
  are summed, at the largest power-of-two exponent of any rank (exact
  rescaling). Nothing is squared that the statistics keep as a square root;
* edges as sums over rows (each rank's mean edge times its rows);
* the cotangents of stochastic sources from rank 0, so that every rank
  projects on the same directions.

Gathers and broadcasts are all-reduces of zero-padded tensors (a sum with
zeros is exact), so only ``all_reduce`` is needed, and what rank 0 computes is
bitwise the same on every rank.

A local step that fails on some ranks must not leave the others waiting in the
next collective: every step ends with an exchange of error messages, and every
rank raises if any rank failed (:func:`agree`). A rank that dies is detected by
the process group's timeout (``init_process_group(timeout=...)``).
"""

import torch

from ..basis._factors import (
    Frame,
    _normalised,
    merge_factors,
    scale_by_power_of_two,
    whitening_frame,
)
from ..utils._distributed import all_reduce, call, check_same, collective

#: Exponent standing for "a zero matrix" in the max-reduction of exponents.
_ZERO = -(2**40)


def _gather(t, group):
    """Every rank's ``t`` stacked along a new first axis (all-reduce of zero padding)."""
    import torch.distributed as dist

    out = t.new_zeros((dist.get_world_size(group), *t.shape))
    out[dist.get_rank(group)] = t
    return all_reduce(out, group)


def _from_rank_0(t, group):
    """Rank 0's ``t`` on every rank (all-reduce with zeros from the others)."""
    import torch.distributed as dist

    t = t.contiguous().clone() if dist.get_rank(group) == 0 else torch.zeros_like(t)
    return all_reduce(t, group)


def _sum_at_common_exponent(P, exponent, empty, group, power):
    """``sum_r P_r * 2**(power e_r)`` over ranks as ``(P, e)`` at the largest exponent."""
    e = torch.tensor([_ZERO if empty else exponent], dtype=torch.int64, device=P.device)
    top = int(all_reduce(e, group, "MAX"))
    if top == _ZERO:
        return torch.zeros_like(P), 0
    P = torch.zeros_like(P) if empty else scale_by_power_of_two(P, power * (exponent - top))
    return all_reduce(P.contiguous(), group), top


def all_reduce_statistics(stats, group):
    """The statistics of all ranks' shards together, the same on every rank."""
    import torch.distributed as dist

    if dist.get_world_size(group) == 1:
        return stats.copy()
    device, dtype, d = stats.device, stats.dtype, stats.n_features
    stats._flush()
    counts = _gather(torch.tensor([stats.weight, stats.n_samples, stats._factor_exponent],
                                  dtype=torch.float64, device=device), group).tolist()
    factors = _gather(stats._factor.contiguous(), group)
    means = _gather(stats.mean.contiguous(), group)
    total = stats._empty_like()
    total.n_samples = int(sum(c[1] for c in counts))
    total._weight = float(sum(c[0] for c in counts))
    # Rank 0 merges the R factors and makes the frame; every rank receives both.
    R, e_R, mean, frame = total._factor, 0, total.mean, None
    if dist.get_rank(group) == 0:
        merged = merge_factors(
            [(factors[r], int(c[2]), means[r], c[0]) for r, c in enumerate(counts)],
            center=stats.center, n_features=d, device=device, dtype=dtype)
        if merged is not None:
            R, e_R, mean, _ = merged
        if stats._jacobians is not None:
            frame = whitening_frame(R, e_R, mean, total.weight, total.n_samples)
    R, mean = _from_rank_0(R, group), _from_rank_0(mean, group)
    e_R = int(_from_rank_0(torch.tensor([e_R], dtype=torch.int64, device=device), group))
    total._factor, total._factor_exponent, total._mean = R, e_R, mean
    if stats._jacobians is None:
        return total
    flag = torch.tensor([0.0 if frame is None else 1.0], dtype=dtype, device=device)
    if float(_from_rank_0(flag, group)) > 0:
        parts = (frame.column_scale, frame.rotation, frame.stretch) if frame is not None \
            else (torch.ones(d, dtype=dtype, device=device),
                  torch.eye(d, dtype=dtype, device=device),
                  torch.ones(d, dtype=dtype, device=device))
        frame = Frame(*(_from_rank_0(t, group) for t in parts))
    else:
        frame = None
    mine = stats._jacobians.copy()
    mine.reframe(frame, total.weight)
    jac = total._jacobians
    gram, top = _sum_at_common_exponent(mine.gram, mine.exponent, mine.empty, group, 2)
    bound, _ = _sum_at_common_exponent(mine.bound, mine.exponent, mine.empty, group, 2)
    complete = torch.tensor([0.0 if mine.sums is None else 1.0], dtype=dtype, device=device)
    complete = float(all_reduce(complete, group, "MIN")) > 0
    sums = mine.sums if mine.sums is not None else torch.zeros(d, 2, dtype=dtype, device=device)
    sums, sums_exponent = _sum_at_common_exponent(sums, mine.sums_exponent, mine.empty, group, 1)
    filled = bool(all_reduce(torch.tensor([0.0 if mine.empty else 1.0], dtype=dtype,
                                          device=device), group, "MAX"))
    if filled:
        jac.gram, jac.exponent = _normalised(gram, top)
        jac.bound = scale_by_power_of_two(bound, 2 * (top - jac.exponent))
        jac.sums, jac.sums_exponent = (sums, sums_exponent) if complete else (None, 0)
        jac.empty = False
    jac.frame, jac.frame_weight = frame, total.weight
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
