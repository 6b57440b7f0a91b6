"""The modular-addition data set: all pairs of residues, split into train and test."""

import numpy as np
from sklearn.utils import check_random_state


def modular_addition_data(p=113, *, train_fraction=0.3, random_state=0):
    """All ordered pairs ``(a, b)`` of residues mod ``p``, labelled ``(a + b) % p``.

    The ``p * p`` pairs are shuffled with ``random_state`` and the first
    ``round(train_fraction * p * p)`` become the training set.

    Parameters
    ----------
    p : int, default=113
        The modulus; tokens are ``0, ..., p - 1``.
    train_fraction : float, default=0.3
        Fraction of the pairs used for training, in ``(0, 1)``; both sets must
        end up non-empty.
    random_state : int, RandomState instance or None, default=0
        Seed of the shuffle; an int gives the same split every time.

    Returns
    -------
    X_train : ndarray of shape (n_train, 2), dtype int64
        Training pairs ``(a, b)``; pass them to a model as they are
        (``torch.from_numpy(X_train)``, or directly to :mod:`sklearn_lib.collect`).
    X_test : ndarray of shape (n_test, 2), dtype int64
        Held-out pairs.
    y_train : ndarray of shape (n_train,), dtype int64
        ``(a + b) % p`` for the training pairs.
    y_test : ndarray of shape (n_test,), dtype int64
        ``(a + b) % p`` for the held-out pairs.

    Examples
    --------
    >>> from sklearn_lib.datasets import modular_addition_data
    >>> X_train, X_test, y_train, y_test = modular_addition_data(p=7, train_fraction=0.5)
    >>> X_train.shape, X_test.shape, X_train.dtype
    ((24, 2), (25, 2), dtype('int64'))
    >>> bool(((X_train.sum(axis=1) % 7) == y_train).all())
    True
    """
    p = _check_p(p)
    train_fraction = float(train_fraction)
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}.")
    n_pairs = p * p
    n_train = int(round(train_fraction * n_pairs))
    if not 0 < n_train < n_pairs:
        raise ValueError(
            f"train_fraction={train_fraction} leaves an empty train or test set for p={p}."
        )
    a, b = np.divmod(np.arange(n_pairs, dtype=np.int64), p)
    X = np.stack([a, b], axis=1)
    y = (a + b) % p
    order = check_random_state(random_state).permutation(n_pairs)
    train, test = order[:n_train], order[n_train:]
    return X[train], X[test], y[train], y[test]


def _check_p(p):
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer)) or p < 2:
        raise ValueError(f"p must be an integer >= 2, got {p!r}.")
    return int(p)


def _unseen_swap_mask(X_train, X_test, p):
    """Held-out pairs ``(a, b)`` whose swap ``(b, a)`` is not a training pair either."""
    seen = np.zeros(p * p, dtype=bool)
    seen[X_train[:, 0] * p + X_train[:, 1]] = True
    return ~seen[X_test[:, 1] * p + X_test[:, 0]]

