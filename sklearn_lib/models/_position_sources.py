"""Stochastic sources over a section's output positions (``stochastic_positions``)."""

import math

import torch

__all__ = ["PositionSources"]


class PositionSources:
    """``m`` random combinations of a section's output positions per sample.

    Stochastic sources over positions: with signs ``s_j`` uniform in
    ``{-1, 1}^P`` (independent for every sample and source),
    ``E[s_j s_j^T] = I``, so ``(1/m) sum_j (sum_t s_jt A_t)^T (sum_t s_jt A_t)``
    estimates ``sum_t A_t^T A_t`` (``A_t = V^T J_t``, the products of output
    position ``t``, with a sample's input positions as rows) without bias, from
    ``m k`` vector-Jacobian products instead of ``P k``. Its squared Frobenius
    error has expectation ``(1/m) sum_{t<u} ||A_t^T A_u + A_u^T A_t||_F^2`` per
    sample (``tests/test_model_source.py`` checks it against brute force).

    Parameters
    ----------
    m : int
        Sources per sample.
    seed : int
        Seed of the generator the signs are drawn from, on ``device``.
    device : torch.device
    """

    def __init__(self, m, seed, device):
        self.m, self.seed, self.device = int(m), int(seed), device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)

    def offset(self, k):
        """Sources like these with an independent stream of signs (``k``: a rank)."""
        return PositionSources(self.m, self.seed + int(k) * 7919 + 1, self.device)

    def draw(self, n, n_positions, dtype):
        """Signs ``(n, m, n_positions)`` divided by ``sqrt(m)``, as ``dtype``."""
        bits = torch.randint(0, 2, (n, self.m, n_positions), generator=self.generator,
                             device=self.device)
        return (2 * bits - 1).to(dtype) / math.sqrt(self.m)

    def batch(self, n, dtype, real=None):
        """The signs of one batch of ``n`` samples: a function of its number of positions.

        Every call with the same number returns the same signs, so that the
        products at several points of an integration path, and the output
        coordinates the constant node compares with, combine positions alike.

        ``real``, a function of the number of output positions giving a
        (n, P) bool tensor of the real ones (or None), sets the signs of
        padded output positions to 0. With ``s_t`` = 0 at padded positions
        and independent ``±1/sqrt(m)`` at real ones, ``sum_j s_jt s_ju`` has
        expectation 1 for ``t = u`` real and 0 otherwise, so ``sum_j (sum_t
        s_jt A_t)^T (sum_t s_jt A_u)`` estimates ``sum_{t real} A_t^T A_t``,
        the exact sum over real positions, without bias; and a padded
        position, whose products may hold anything, enters no combination.

        The signs are drawn batch after batch from one generator, so with a
        shuffling DataLoader a sample gets other signs in every pass: that
        biases nothing, as the signs are independent of the data and of the
        order they come in (every sample's signs are independent and uniform
        whichever draw they come from), and every pass is an estimate of its
        own anyway (the statistics and the edges of a layer take independent
        sources).
        """
        return _BatchSigns(self, n, dtype, real)


class _BatchSigns:
    """The signs of one batch (:meth:`PositionSources.batch`), drawn once per number of positions.

    ``combined`` says whether positions were combined at all: a section with
    one output position takes no signs, and its products stay one per position.
    """

    def __init__(self, sources, n, dtype, real):
        self.sources, self.n, self.dtype, self.real = sources, n, dtype, real
        self.drawn, self.combined = {}, False

    @property
    def scale(self):
        """``1/sqrt(m)``, the size of every nonzero sign."""
        return 1.0 / math.sqrt(self.sources.m)

    def units(self, dtype):
        """The same signs in units (-1, 0, 1, exact in any dtype) as ``dtype``, a function too."""
        def signs(n_positions):
            return (self(n_positions) * math.sqrt(self.sources.m)).round_().to(dtype)

        return signs

    def __call__(self, n_positions):
        if n_positions not in self.drawn:
            signs = self.sources.draw(self.n, n_positions, self.dtype)
            real = None if self.real is None else self.real(n_positions)
            if real is not None:
                signs.mul_(real.view(self.n, 1, n_positions).to(signs.dtype))
            self.drawn[n_positions] = signs
        self.combined = self.combined or n_positions > 1
        return self.drawn[n_positions]
