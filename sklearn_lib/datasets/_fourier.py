"""Fourier labels of functions of one token, for directions of an embedding."""

import numpy as np

from ._data import _check_p


def dominant_frequency(values, p=None, *, pooled=False):
    """Dominant Fourier frequency of a function of a token ``a = 0, ..., p - 1``.

    The power of frequency ``k`` in ``1, ..., p // 2`` is that of the real
    sinusoids ``cos(2 pi k a / p + phase)``, computed from ``np.fft.rfft``
    along the token axis (bins ``k`` and ``p - k`` combined, so powers sum to
    the non-constant energy by Parseval).  The constant term (frequency 0)
    is excluded: the dominant frequency is the strongest of ``1, ..., p // 2``
    (the lowest on ties) and ``fraction`` is its share of the non-constant
    power.  Only a constant column (non-constant power at most ``1e-24``
    times its total power, or all zeros) gets frequency ``0`` and fraction
    ``1.0``.

    Typical use: label interaction-basis directions of the embedding layer.
    Along a direction ``u`` of the ``embed`` output ``[E[a], E[b]]`` the
    activation is ``f(a) + g(b)`` with ``f = E @ u[:d]`` and ``g = E @ u[d:]``;
    pass ``f``, ``g`` or ``np.column_stack([f, g])`` with ``pooled=True``.

    Parameters
    ----------
    values : array-like of shape (p,) or (p, k)
        Values indexed by the token along axis 0; each column is one function.
    p : int, optional
        The modulus, checked against ``values.shape[0]``; defaults to it.
    pooled : bool, default=False
        For 2-D ``values``, add the power spectra of all columns and return a
        single frequency (e.g. for the ``cos`` and ``sin`` pair of a 2-D
        subspace) instead of one per column.

    Returns
    -------
    frequency : int or ndarray of shape (k,), dtype int64
        The dominant frequency in ``0, ..., p // 2``; an int for 1-D ``values``
        or ``pooled=True``, else one per column.
    fraction : float or ndarray of shape (k,)
        The share of the non-constant power at that frequency, in ``(0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_lib.datasets import dominant_frequency
    >>> a = np.arange(113)
    >>> k, fraction = dominant_frequency(3 + np.cos(2 * np.pi * 14 * a / 113 + 0.5))
    >>> k, round(fraction, 6)
    (14, 1.0)
    >>> wave = lambda k: np.cos(2 * np.pi * k * a / 113)
    >>> k, fraction = dominant_frequency(np.column_stack([wave(5) + 0.5 * wave(40), wave(99)]))
    >>> k, fraction.round(3)
    (array([ 5, 14]), array([0.8, 1. ]))
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (1, 2):
        raise ValueError(f"values must be of shape (p,) or (p, k), got {values.shape}.")
    n = values.shape[0]
    if p is None:
        p = n
    elif _check_p(p) != n:
        raise ValueError(f"values has {n} rows, expected p={p}.")
    if n < 2:
        raise ValueError(f"values needs at least 2 rows (tokens), got {n}.")
    if not np.all(np.isfinite(values)):
        raise ValueError("values must be finite.")
    one_d = values.ndim == 1
    columns = values.reshape(n, -1)

    power = np.abs(np.fft.rfft(columns, axis=0)) ** 2
    weight = np.full(power.shape[0], 2.0)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0  # the Nyquist bin has no mirror image
    power *= weight[:, None]
    if pooled:
        power = power.sum(axis=1, keepdims=True)

    non_constant = power[1:].sum(axis=0)
    constant = non_constant <= 1e-24 * power.sum(axis=0)
    frequency = np.argmax(power[1:], axis=0) + 1
    fraction = np.divide(
        power[frequency, np.arange(power.shape[1])],
        non_constant,
        out=np.ones_like(non_constant),
        where=~constant,
    )
    frequency[constant] = 0
    frequency = frequency.astype(np.int64)
    if one_d or pooled:
        return int(frequency[0]), float(fraction[0])
    return frequency, fraction
