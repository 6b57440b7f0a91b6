"""Error bars of estimates made from random sources, from independent groups of them.

A stochastic fit estimates a sum of squares ``T`` (a Jacobian scatter, an edge
matrix) from random sources: ±1 combinations of output directions or of output
positions. Split the sources into ``G`` groups so that every group gives an
estimate ``T_g`` that is unbiased and independent of the others *given the
data*, from ``n_g`` of the ``N`` sources (share ``s_g = n_g / N``), and
``T = sum_g s_g T_g``. Each group's estimate is the mean of ``n_g`` independent,
identically distributed per-source terms, so ``Var(T_g) = sigma^2 / n_g`` and
``Var(T) = sigma^2 / N``; the between-group sum of squares estimates it without
bias::

    Var(T) ~ sum_g s_g (T_g - T)^2 / (G - 1)

(with equal groups, the variance of the mean of ``G`` independent estimates).
For a smooth function of ``T`` such as an interaction strength, the same applies
to its first-order (delta-method) expansion, which is what
:func:`interaction_strength_std` evaluates: this is the first-order jackknife
over groups. The error bar says how much the estimate would move if the random
sources were drawn again over the *same data*: it does not include the
sampling of the data.

:class:`SourceGroups` accumulates the groups of one pass in which every sample
takes ``m`` random combinations of its output positions (group ``g`` holds the
combinations ``j`` with ``j % G == g``), in memory ``G d^2`` (or ``G`` edge
matrices); combinations of directions drawn once for all samples are split by
the graph into separately run groups instead.
"""

import numpy as np
import torch

__all__ = [
    "DEFAULT_GROUPS",
    "SourceGroups",
    "group_shares",
    "grouped_std",
    "interaction_strength_std",
]

#: Groups per stochastic estimate: the variance estimate has G - 1 degrees of
#: freedom (a relative error of about 1 / sqrt(2 (G - 1)) = 27% per error bar),
#: while every group costs a pass (directions) or a GEMM per batch (positions).
DEFAULT_GROUPS = 8


def group_shares(n_sources, n_groups=DEFAULT_GROUPS):
    """Sizes of the groups ``n_sources`` random sources are split into (as even as possible).

    ``min(n_groups, n_sources)`` groups; a single source gives one group, from
    which no error bar can be estimated.

    Examples
    --------
    >>> from sklearn_lib.basis._error_bars import group_shares
    >>> group_shares(10, 4)
    [3, 3, 2, 2]
    """
    G = max(1, min(int(n_groups), int(n_sources)))
    return [n_sources // G + (g < n_sources % G) for g in range(G)]


def grouped_std(estimates, shares):
    """Standard error of ``sum_g s_g T_g`` from the group estimates ``T_g`` (module docstring).

    ``estimates`` is (G, ...), ``shares`` (G,) sums to 1. A single share
    (``[1.0]``) means nothing was random: the error is zero.
    """
    T = np.asarray(estimates, dtype=np.float64)
    s = np.asarray(shares, dtype=np.float64).reshape((-1,) + (1,) * (T.ndim - 1))
    if s.shape[0] == 1:
        return np.zeros(T.shape[1:])
    mean = (s * T).sum(0)
    return np.sqrt((s * (T - mean) ** 2).sum(0) / (T.shape[0] - 1))


def interaction_strength_std(strengths, inverse_components, group_moments, shares):
    """Error bars of the interaction strengths from group estimates of ``M'``.

    To first order, ``Lambda_i = w_i^T M' w_i`` with ``w_i = sqrt(Lambda_i) p_i``
    and ``p_i`` row ``i`` of ``inverse_components`` (``p_i^T M' p_i = 1``, SPEC
    identity (c)); the noise of ``M'`` moves it by ``w_i^T dM' w_i``, so the
    relative error of ``Lambda_i`` is that of ``p_i^T M' p_i``, whose group
    estimates are ``p_i^T M'_g p_i``. Degenerate strengths (ties) mix their
    directions: there the error bar is that of the fixed direction ``p_i``.

    Parameters
    ----------
    strengths : ndarray of shape (r,)
    inverse_components : ndarray of shape (r, d)
    group_moments : ndarray of shape (G, d, d)
        Unbiased, independent estimates of ``M'`` (up to one common factor).
    shares : sequence of G floats summing to 1

    Returns
    -------
    ndarray of shape (r,)
    """
    P = np.asarray(inverse_components, dtype=np.float64)
    # Unit rows: the ratio below does not depend on their scale, and the
    # products stay near 1 whatever the units of the data.
    P = P / np.linalg.norm(P, axis=1, keepdims=True)
    q = np.einsum("id,gde,ie->gi", P, np.asarray(group_moments, dtype=np.float64), P)
    s = np.asarray(shares, dtype=np.float64)
    total = s @ q
    return np.asarray(strengths, dtype=np.float64) * grouped_std(q, s) / total


class SourceGroups:
    """Sums of squares of random combinations of output positions, by group.

    Filled by a source's vector-Jacobian-product pass over the data: a batch's
    products with ``m`` position combinations come source-major, ``(m k, rows,
    d)``; combination ``j`` belongs to group ``j % G``. Batches without random
    combinations (closed forms, padding) add to the total only: they carry no
    error. :meth:`estimates` turns the sums into the groups' unbiased estimates
    of the whole.

    Parameters
    ----------
    n_sources : int
        Position combinations per sample ``m``.
    n_groups : int, default=DEFAULT_GROUPS
    """

    def __init__(self, n_sources, n_groups=DEFAULT_GROUPS):
        self.n_sources = int(n_sources)
        sizes = group_shares(self.n_sources, n_groups)
        self.shares = [n / self.n_sources for n in sizes]
        self.sums = None
        self.scale = 1.0

    @property
    def n_groups(self):
        return len(self.shares)

    def _group_sums(self, shape, like):
        if self.sums is None:
            self.sums = torch.zeros(self.n_groups, *shape, device=like.device, dtype=like.dtype)
        return self.sums

    def add_scatter(self, chunk, start, k):
        """Add ``P_q^T P_q`` of product directions ``start:start + c`` to their groups.

        ``chunk`` ``(c, rows, d)`` holds directions ``q = j k + i`` (combination
        ``j``, column ``i`` of ``k``), as streamed products come
        (:class:`~sklearn_lib.models._vjp.SectionProducts`). One GEMM per
        combination within the chunk, accumulated in place: the same work as
        one GEMM over all of them, and no copy of the products.
        """
        c, d = chunk.shape[0], chunk.shape[-1]
        self._check(start + c, k)
        sums = self._group_sums((d, d), chunk)
        q = start
        while q < start + c:
            j = q // k
            stop = min((j + 1) * k, start + c)
            P = chunk[q - start : stop - start].reshape(-1, d)
            sums[j % self.n_groups].addmm_(P.T, P)
            q = stop

    def add_combinations(self, scatters):
        """Add the scatters ``(m, d, d)`` of combinations ``0 .. m - 1``: combination ``j`` to group ``j % G``.

        The scatters of one batch, each summed over its samples, as a closed form
        computes them without products.
        """
        m, d = scatters.shape[0], scatters.shape[-1]
        self._check(m, 1)
        sums = self._group_sums((d, d), scatters)
        for j in range(m):
            sums[j % self.n_groups].add_(scatters[j])

    def add_rows(self, squares, start, k):
        """Add squares ``(c, width)`` of directions ``start:start + c`` to row ``q % k`` of their group.

        Direction ``q = j k + i`` belongs to combination ``j`` and adds to row
        ``i`` of group ``j % G``'s sums ``(k, width)``; the edges' squares of a
        chunk of output directions, summed over samples.
        """
        c = squares.shape[0]
        self._check(start + c, k)
        sums = self._group_sums((k, squares.shape[1]), squares)
        q = torch.arange(start, start + c, device=squares.device)
        sums.index_put_(((q // k) % self.n_groups, q % k), squares, accumulate=True)

    def _check(self, stop, k):
        # Directions beyond m k are not combination-major: they would be grouped wrongly.
        if stop > self.n_sources * k:
            raise ValueError(
                f"products of {self.n_sources} random position combinations of {k} directions "
                f"each must come combination-major; got direction {stop - 1}."
            )

    def added_to(self, total):
        """``total`` (None: nothing) plus everything the groups hold, in place."""
        if self.sums is None:
            return total
        random = self.sums.sum(0)
        return random if total is None else total.add_(random)

    def estimates(self, total):
        """The groups' estimates ``(G, ...)`` of ``total`` (the sum over every source).

        ``total`` holds the random part (the groups' sum, scaled by
        :attr:`scale`) and an exact part; group ``g``'s estimate keeps the exact
        part and replaces the random one by its own, ``sum_g / s_g``.
        """
        total = torch.as_tensor(total)
        if self.sums is None:
            return total[None].expand(self.n_groups, *total.shape).clone()
        sums = self.sums.to(total.device, total.dtype) * self.scale
        shares = torch.tensor(self.shares, device=total.device, dtype=total.dtype)
        shares = shares.reshape((-1,) + (1,) * total.ndim)
        return total - sums.sum(0) + sums / shares
