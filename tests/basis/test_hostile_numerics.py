"""Hostile battery, issue 20 class 4 (numerics): the basis against a naive reference.

Every case fits a layer whose coordinates were made hostile (ill-conditioned
reparameterisations ``X @ A``, ``J @ inv(A).T``, tiny or huge scales, constant or
duplicated features, streamed or merged chunks) and compares the library with

* the exact interaction strengths, computed independently from the untransformed
  problem (Lambda does not change under ``X @ A``) with float128 sums and 40-digit
  mpmath eigendecompositions, and
* the naive reference of the issue in the same precision: centre, ``eigh`` of the
  Gram matrix, Jacobians in the whitened coordinates, ``eigvalsh`` of their second
  moment.

A case's verdict is one of ``ok``, ``silent-wrong`` (less accurate than the
naive reference, or another answer than the untransformed fit, without a word),
``data-loss`` (the same, but warned about or refused), ``cryptic-error`` (a
refusal that does not say what happened) and ``crash`` (any other exception).
The tests assert ``ok``; ``PYTHONPATH=. python tests/basis/test_hostile_numerics.py``
from the repository root prints the table of verdicts (used for the before/after
counts of issue 20: 15 ok, 17 silent-wrong, 3 data-loss on the code before it).
"""

import warnings

import mpmath
import numpy as np
import pytest
import torch

from sklearn_lib import InteractionBasis
from sklearn_lib.basis._stats import InteractionStatistics

# ----------------------------------------------------------------------------- problems
N, D, O = 2000, 8, 8


def orthogonal(gen, d):
    return np.linalg.qr(gen.normal(size=(d, d)))[0]


def layer(seed, n=N, d=D, o=O, rank=None):
    """Well-conditioned activations and Jacobians whose strengths span ~1e2.

    ``J_x = c_x W^T + noise`` with ``W`` (d, k) of singular values 1..3 and a positive
    factor per sample; ``rank=k`` drops the noise so that ``M'`` has rank exactly k.
    """
    gen = np.random.default_rng(seed)
    X = gen.normal(size=(n, d)) @ (orthogonal(gen, d) * np.linspace(1, 2, d)) + 3.0
    k = d if rank is None else rank
    W = orthogonal(gen, d)[:, :k] * np.linspace(1, 3, k)
    J = np.zeros((n, o, d))
    J[:, :k] = np.einsum("dk,n->nkd", W, 1 + 0.5 * gen.random(n))
    if rank is None:
        J += 0.1 * gen.normal(size=(n, o, d))
    return X, J


def reparameterisation(seed, d, cond, rotated=True):
    """``A = Q1 diag(s) Q2`` (or a permuted ``diag(s)``), ``s`` log-spaced in [1, cond]."""
    gen = np.random.default_rng(seed + 1)
    s = np.logspace(0, np.log10(cond), d)
    if not rotated:
        return np.diag(gen.permutation(s))
    return orthogonal(gen, d) @ np.diag(s) @ orthogonal(gen, d)


def reparameterise(X, J, A, dtype):
    return (X @ A).astype(dtype), (J @ np.linalg.inv(A).T).astype(dtype)


# ---------------------------------------------------------------------------- references
def exact_strengths(X, J, w=None):
    """Lambda of (X, J) from float128 moments and 40-digit mpmath eigendecompositions."""
    X, J = X.astype(np.longdouble), J.astype(np.longdouble)
    w = np.ones(len(X), dtype=np.longdouble) if w is None else w.astype(np.longdouble)
    W = w.sum()
    Xc = X - (w @ X) / W
    G = (Xc * w[:, None]).T @ Xc / W
    Mp = np.einsum("x,xoi,xoj->ij", w, J, J) / W
    def exact(v):  # a float128 as the sum of two doubles, exactly
        head = float(v)
        return mpmath.mpf(head) + mpmath.mpf(float(v - np.longdouble(head)))

    with mpmath.workdps(40):
        G = mpmath.matrix([[exact(v) for v in row] for row in G])
        Mp = mpmath.matrix([[exact(v) for v in row] for row in Mp])
        E, Q = mpmath.eigsy(G)
        K = Q * mpmath.diag([mpmath.sqrt(abs(e)) for e in E])
        L = mpmath.eigsy(K.T * Mp * K, eigvals_only=True)
        return np.sort(np.array([float(abs(v)) for v in L]))[::-1]


def naive_strengths(X, J, w=None):
    """The issue's naive reference, in the precision of X."""
    w = np.ones(len(X), dtype=X.dtype) if w is None else w.astype(X.dtype)
    W = w.sum()
    Xc = X - (w @ X) / W
    G = (Xc * w[:, None]).T @ Xc / W
    D_, U = np.linalg.eigh(G)
    K = U * np.sqrt(np.abs(D_))
    Jw = J @ K
    M = np.einsum("x,xoi,xoj->ij", w, Jw, Jw) / W
    return np.sort(np.abs(np.linalg.eigvalsh(M)))[::-1]


def error(strengths, exact):
    """Largest error of the strengths relative to the largest exact one (missing = 0)."""
    got = np.zeros(len(exact))
    got[: min(len(strengths), len(exact))] = np.asarray(strengths, float)[: len(exact)]
    return float(np.abs(got - exact).max() / exact[0])


def resolved(strengths, exact, within=0.01):
    """How many of the exact strengths are matched to ``within`` (relative)."""
    got = np.zeros(len(exact))
    got[: min(len(strengths), len(exact))] = np.asarray(strengths, float)[: len(exact)]
    return int((np.abs(got - exact) <= within * exact).sum())


# ------------------------------------------------------------------------------ verdicts
def run(fit):
    """``(result, warned, verdict_if_raised)``: call ``fit`` and classify an exception."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fit()
        except ValueError as exc:
            message = str(exc)
            named = "precision" in message and "condition" in message
            return None, True, "data-loss" if named else "cryptic-error"
        except Exception:  # noqa: BLE001 - any other exception is the verdict
            return None, True, "crash"
    precision = [w for w in caught if issubclass(w.category, UserWarning)
                 and "precision" in str(w.message)]
    return result, bool(precision), None


def compare_with_naive(strengths, naive, exact, warned, dtype):
    """ok when never less accurate than the naive reference (a small multiple)."""
    floor = 50 * np.finfo(dtype).eps
    worse = (error(strengths, exact) > 3 * error(naive, exact) + floor
             or resolved(strengths, exact) < resolved(naive, exact))
    if not worse:
        return "ok"
    return "data-loss" if warned else "silent-wrong"


def fit_basis(X, J, dtype, **kwargs):
    return InteractionBasis(dtype=dtype, **kwargs).fit(X, jacobians=J)


# ------------------------------------------------------------------------------- cases
def case_conditioning(dtype, cond, rotated=True, seed=0):
    X, J = layer(seed)
    exact = exact_strengths(X, J)
    XA, JA = reparameterise(X, J, reparameterisation(seed, D, cond, rotated), dtype)
    basis, warned, verdict = run(lambda: fit_basis(XA, JA, dtype))
    naive = naive_strengths(XA, JA)
    if verdict is not None:
        return "ok" if verdict == "data-loss" and resolved(naive, exact) == 0 else verdict
    return compare_with_naive(basis.interaction_strengths_, naive, exact, warned, dtype)


def case_rank_k(dtype, cond, k=3, seed=1):
    """A rank-k map keeps exactly k directions, silently (they are exact zeros)."""
    X, J = layer(seed, rank=k)
    XA, JA = reparameterise(X, J, reparameterisation(seed, D, cond), dtype)
    basis, warned, verdict = run(lambda: fit_basis(XA, JA, dtype))
    if verdict is not None:
        return verdict
    exact = exact_strengths(X, J)[:k]
    if basis.n_components_ != k or resolved(basis.interaction_strengths_, exact) < k:
        return "silent-wrong" if not warned else "data-loss"
    return "ok" if not warned else "data-loss"


def case_signs(dtype, cond, seed=2):
    """transform is equal (not only up to signs) under X @ A."""
    X, J = layer(seed)
    A = reparameterisation(seed, D, cond)
    XA, JA = reparameterise(X, J, A, dtype)
    reference = fit_basis(X.astype(dtype), J.astype(dtype), dtype)
    basis, warned, verdict = run(lambda: fit_basis(XA, JA, dtype))
    if verdict is not None:
        return verdict
    Z, Z_A = reference.transform(X.astype(dtype)), basis.transform(XA)
    if Z.shape != Z_A.shape:
        return "silent-wrong"
    scale = np.sqrt(reference.interaction_strengths_)
    difference = np.abs(Z_A - Z).max(0) / scale
    flipped = np.abs(Z_A + Z).max(0) / scale < difference
    if flipped.any():
        return "silent-wrong"
    naive_level = error(naive_strengths(XA, JA), exact_strengths(X, J))
    return "ok" if difference.max() <= max(10 * np.sqrt(naive_level), 1e-3) else "silent-wrong"


def case_streaming(dtype, cond, chunk, seed=3):
    """partial_fit over chunks is as accurate as the naive reference on the whole data."""
    X, J = layer(seed)
    exact = exact_strengths(X, J)
    XA, JA = reparameterise(X, J, reparameterisation(seed, D, cond), dtype)

    def stream():
        basis = InteractionBasis(dtype=dtype)
        for start in range(0, N, chunk):
            basis.partial_fit(XA[start:start + chunk], jacobians=JA[start:start + chunk])
        return basis

    basis, warned, verdict = run(stream)
    if verdict is not None:
        return verdict
    return compare_with_naive(basis.interaction_strengths_, naive_strengths(XA, JA), exact,
                              warned, dtype)


def new_stats(dtype, n_outputs=O, center=True):
    return InteractionStatistics(D, n_outputs, center=center, device=torch.device("cpu"),
                                 dtype=getattr(torch, dtype))


def fitted_from(stats, dtype):
    return InteractionBasis(dtype=dtype)._fit_statistics(stats, name=None)


def case_merge(dtype, cond, n_blocks, offset=0.0, seed=4):
    """Blocks' statistics merged in a tree (as Dask does) equal the whole, accurately."""
    X, J = layer(seed)
    X = X + offset
    exact = exact_strengths(X, J)
    XA, JA = reparameterise(X, J, reparameterisation(seed, D, cond), dtype)

    def merged():
        bounds = np.linspace(0, N, n_blocks + 1).astype(int)
        parts = [new_stats(dtype).update(XA[a:b], JA[a:b]) for a, b in zip(bounds, bounds[1:])]
        while len(parts) > 1:  # pairwise, like a reduction tree
            parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i]
                     for i in range(0, len(parts), 2)]
        return fitted_from(parts[0], dtype)

    basis, warned, verdict = run(merged)
    if verdict is not None:
        return verdict
    return compare_with_naive(basis.interaction_strengths_, naive_strengths(XA, JA), exact,
                              warned, dtype)


def case_dask(cond, seed=5):
    """A fit from dask arrays (tree reduction of block statistics) at cond(A)."""
    da = pytest.importorskip("dask.array")
    import dask

    X, J = layer(seed)
    exact = exact_strengths(X, J)
    XA, JA = reparameterise(X, J, reparameterisation(seed, D, cond), "float64")

    def fit():
        with dask.config.set(scheduler="synchronous"):
            return InteractionBasis().fit(da.from_array(XA, chunks=(300, D)),
                                          jacobians=da.from_array(JA, chunks=(300, O, D)))

    basis, warned, verdict = run(fit)
    if verdict is not None:
        return verdict
    return compare_with_naive(basis.interaction_strengths_, naive_strengths(XA, JA), exact,
                              warned, "float64")


def case_weights(cond, seed=6):
    """Integer weights equal repetition, accurately, under an ill-conditioned A."""
    X, J = layer(seed, n=600)
    w = np.random.default_rng(seed).integers(0, 4, size=600).astype(float)
    exact = exact_strengths(X, J, w)
    XA, JA = reparameterise(X, J, reparameterisation(seed, D, cond), "float64")
    basis, warned, verdict = run(
        lambda: InteractionBasis().fit(XA, jacobians=JA, sample_weight=w))
    if verdict is not None:
        return verdict
    return compare_with_naive(basis.interaction_strengths_, naive_strengths(XA, JA, w), exact,
                              warned, "float64")


def case_scale(x_scale, cond, seed=7):
    """c X with J / c under an ill-conditioned A: the strengths do not change."""
    X, J = layer(seed)
    exact = exact_strengths(X, J)
    XA, JA = reparameterise(X, J, reparameterisation(seed, D, cond), "float64")
    XA, JA = XA * x_scale, JA / x_scale
    basis, warned, verdict = run(lambda: fit_basis(XA, JA, "float64"))
    if verdict is not None:
        return verdict
    naive = naive_strengths(XA / x_scale, JA * x_scale)  # the naive one cannot scale
    return compare_with_naive(basis.interaction_strengths_, naive, exact, warned, "float64")


def case_near_constant(dtype, spread, seed=8):
    """A feature varying by ``spread`` around 1e3 (above its rounding) is a direction."""
    X, J = layer(seed)
    X[:, 0] = 1e3 + spread * X[:, 0]
    J[:, :, 0] /= spread
    exact = exact_strengths(X, J)
    X, J = X.astype(dtype), J.astype(dtype)
    basis, warned, verdict = run(lambda: fit_basis(X, J, dtype))
    if verdict is not None:
        return verdict
    return compare_with_naive(basis.interaction_strengths_, naive_strengths(X, J), exact,
                              warned, dtype)


def case_duplicated_feature(cond, seed=9):
    """A duplicated column under an ill-conditioned A is dropped silently; the rest is exact."""
    X, J = layer(seed)
    XA, JA = reparameterise(X, J, reparameterisation(seed, D, cond), "float64")
    X2 = np.c_[XA, XA[:, :1]]
    J2 = np.concatenate([JA, np.random.default_rng(seed).normal(size=(N, O, 1))], axis=2)
    J2[:, :, 0] -= J2[:, :, -1]  # the chain rule of the duplicated input: same total
    basis, warned, verdict = run(lambda: fit_basis(X2, J2, "float64"))
    if verdict is not None:
        return verdict
    exact = exact_strengths(X, J)
    verdict = compare_with_naive(basis.interaction_strengths_, naive_strengths(XA, JA), exact,
                                 warned, "float64")
    if verdict == "ok" and warned:
        return "data-loss"  # an exact null direction is no reason to warn
    return verdict


def case_unresolvable(dtype, cond, seed=10):
    """Beyond the precision: a warning or an error that names it, never silence."""
    X, J = layer(seed)
    exact = exact_strengths(X, J)
    XA, JA = reparameterise(X, J, reparameterisation(seed, D, cond), dtype)
    basis, warned, verdict = run(lambda: fit_basis(XA, JA, dtype))
    if verdict is not None:
        return "ok" if verdict == "data-loss" else verdict
    if resolved(basis.interaction_strengths_, exact) == len(exact) or warned:
        return "ok"
    return "silent-wrong"


def case_uncentered(cond, seed=11):
    """center=False with a constant-1 column (folded biases) under an ill-conditioned A."""
    X, J = layer(seed)
    X1 = np.c_[X, np.ones(N)]
    J1 = np.concatenate([J, np.zeros((N, O, 1))], axis=2)
    A = np.eye(D + 1)
    A[:D, :D] = reparameterisation(seed, D, cond)
    XA, JA = reparameterise(X1, J1, A, "float64")
    basis, warned, verdict = run(lambda: fit_basis(XA, JA, "float64", center=False))
    if verdict is not None:
        return verdict
    exact_basis = fit_basis(X1, J1, "float64", center=False)
    got = basis.interaction_strengths_
    want = exact_basis.interaction_strengths_
    naive = InteractionBasis(center=False, truncation_threshold=1e-300).fit(XA, jacobians=JA)
    worse = (error(got, want) > 3 * error(naive.interaction_strengths_, want) + 1e-13
             or resolved(got, want) < resolved(naive.interaction_strengths_, want))
    return "ok" if not worse else ("data-loss" if warned else "silent-wrong")


def case_many_chunks(cond, batch_size, seed=12):
    """fit with tiny chunks (many merges) at cond(A)."""
    X, J = layer(seed)
    exact = exact_strengths(X, J)
    XA, JA = reparameterise(X, J, reparameterisation(seed, D, cond), "float64")
    basis, warned, verdict = run(
        lambda: InteractionBasis(batch_size=batch_size).fit(XA, jacobians=JA))
    if verdict is not None:
        return verdict
    return compare_with_naive(basis.interaction_strengths_, naive_strengths(XA, JA), exact,
                              warned, "float64")


CASES = {
    **{f"cond-float64-{c:.0e}": (case_conditioning, ("float64", c))
       for c in (1e0, 1e2, 1e4, 1e5, 1e6, 1e7)},
    **{f"cond-float32-{c:.0e}": (case_conditioning, ("float32", c))
       for c in (1e0, 1e1, 1e2, 1e3)},
    "diagonal-float64-1e8": (case_conditioning, ("float64", 1e8, False)),
    "diagonal-float32-1e4": (case_conditioning, ("float32", 1e4, False)),
    "rank3-float64-1e6": (case_rank_k, ("float64", 1e6)),
    "rank3-float32-1e3": (case_rank_k, ("float32", 1e3)),
    **{f"signs-float64-{c:.0e}": (case_signs, ("float64", c)) for c in (1e0, 1e3, 1e6)},
    "signs-float32-1e2": (case_signs, ("float32", 1e2)),
    "stream-float64-1e6-chunk50": (case_streaming, ("float64", 1e6, 50)),
    "stream-float64-1e6-chunk5": (case_streaming, ("float64", 1e6, 5)),
    "stream-float32-1e2-chunk100": (case_streaming, ("float32", 1e2, 100)),
    "merge-tree-float64-1e6": (case_merge, ("float64", 1e6, 8)),
    "merge-far-mean-float64-1e5": (case_merge, ("float64", 1e5, 5, 1e6)),
    "merge-tree-float32-1e2": (case_merge, ("float32", 1e2, 6)),
    "dask-float64-1e6": (case_dask, (1e6,)),
    "weights-float64-1e5": (case_weights, (1e5,)),
    "tiny-scale-1e-150-cond1e4": (case_scale, (1e-150, 1e4)),
    "huge-scale-1e150-cond1e4": (case_scale, (1e150, 1e4)),
    "near-constant-float64-1e-9": (case_near_constant, ("float64", 1e-9)),
    "near-constant-float32-1e-2": (case_near_constant, ("float32", 1e-2)),
    "duplicated-feature-1e4": (case_duplicated_feature, (1e4,)),
    "unresolvable-float32-1e6": (case_unresolvable, ("float32", 1e6)),
    "unresolvable-float64-1e12": (case_unresolvable, ("float64", 1e12)),
    "uncentered-bias-column-1e5": (case_uncentered, (1e5,)),
    "many-chunks-batch3-1e6": (case_many_chunks, (1e6, 3)),
}


@pytest.mark.filterwarnings("ignore:The basis is exact:RuntimeWarning")
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_numerics(name):
    case, args = CASES[name]
    assert case(*args) == "ok"


if __name__ == "__main__":
    from collections import Counter

    verdicts = {}
    for name, (case, args) in CASES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verdicts[name] = case(*args)
        print(f"{name:32s} {verdicts[name]}")
    print(dict(Counter(verdicts.values())), f"({len(verdicts)} cases)")
