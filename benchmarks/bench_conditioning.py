"""Benchmark the accuracy of InteractionBasis under ill-conditioned reparameterisations.

For every cond(A) (1e0..1e8 in float64, 1e0..1e4 in float32) a layer ``X`` (n, d)
with Jacobians ``J`` (n, o, d) is reparameterised as ``X @ A``, ``J @ inv(A).T``
with ``A = Q1 diag(s) Q2`` (``s`` log-spaced in [1, cond]) and rounded to the
precision, and the interaction strengths are computed by

* the library (``InteractionBasis(dtype=...)``, "auto" truncation), and
* the naive reference of issue 20 in the same precision: centre, ``eigh`` of the
  Gram matrix, Jacobians in the whitened coordinates, ``eigvalsh`` of their
  second moment (no truncation: every direction is reported).

Both are compared with the exact strengths, computed independently from the
untransformed problem (Lambda does not change under ``X @ A``) with float128
sums and 40-digit mpmath eigendecompositions. Printed per cond(A), worst over
the seeds: the largest error relative to the largest exact strength (of
``fit``, of the naive reference and of ``partial_fit`` in chunks of ``--chunk``
rows), the number of directions ``fit`` and the naive reference resolve to 1%,
the library's kept count, and whether it warned.

Run: ``python benchmarks/bench_conditioning.py [--n 2000 --d 8 --o 8 --seeds 3]``.
"""

import argparse
import time
import warnings

import mpmath
import numpy as np

from sklearn_lib import InteractionBasis


def orthogonal(gen, d):
    return np.linalg.qr(gen.normal(size=(d, d)))[0]


def layer(seed, n, d, o):
    """Well-conditioned activations; Jacobians with strengths spanning about 1e2."""
    gen = np.random.default_rng(seed)
    X = gen.normal(size=(n, d)) @ (orthogonal(gen, d) * np.linspace(1, 2, d)) + 3.0
    W = orthogonal(gen, d) * np.linspace(1, 3, d)
    J = np.einsum("od,n->nod", W.T[:o], 1 + 0.5 * gen.random(n))
    return X, J + 0.1 * gen.normal(size=(n, o, d))


def reparameterisation(seed, d, cond):
    gen = np.random.default_rng(seed + 1)
    return orthogonal(gen, d) @ np.diag(np.logspace(0, np.log10(cond), d)) @ orthogonal(gen, d)


def exact_strengths(X, J):
    """Lambda from float128 moments and 40-digit mpmath eigendecompositions."""
    X, J = X.astype(np.longdouble), J.astype(np.longdouble)
    Xc = X - X.mean(0)
    G = Xc.T @ Xc / len(X)
    Mp = np.einsum("xoi,xoj->ij", J, J) / len(X)

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


def naive_strengths(X, J):
    Xc = X - X.mean(0)
    D, U = np.linalg.eigh(Xc.T @ Xc / len(X))
    Jw = J @ (U * np.sqrt(np.abs(D)))
    M = np.einsum("xoi,xoj->ij", Jw, Jw) / len(X)
    return np.sort(np.abs(np.linalg.eigvalsh(M)))[::-1]


def padded(strengths, d):
    out = np.zeros(d)
    out[: min(len(strengths), d)] = np.asarray(strengths, dtype=float)[:d]
    return out


def error(strengths, exact):
    return float(np.abs(padded(strengths, len(exact)) - exact).max() / exact[0])


def resolved(strengths, exact):
    return int((np.abs(padded(strengths, len(exact)) - exact) <= 0.01 * exact).sum())


def library_strengths(X, J, dtype, chunk=None):
    """``(strengths, warned)``; a refusal counts as nothing kept, and as a warning.

    With ``chunk``, the data are streamed through ``partial_fit`` in chunks of
    that many rows.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            basis = InteractionBasis(dtype=dtype)
            if chunk is None:
                basis.fit(X, jacobians=J)
            for start in range(0, len(X) if chunk else 0, chunk or 1):
                basis.partial_fit(X[start:start + chunk], jacobians=J[start:start + chunk])
        except ValueError:
            return np.zeros(0), True
    warned = any(issubclass(w.category, UserWarning) and "precision" in str(w.message)
                 for w in caught)
    return basis.interaction_strengths_, warned


def run(dtype, conds, args, problems):
    print(f"\n{dtype}: max over {args.seeds} seeds of |Lambda - exact| / Lambda_max; "
          f"directions resolved to 1% (of {args.d}); kept; warned")
    stream = f"stream{args.chunk}"
    print(f"{'cond(A)':>8} {'library':>9} {'naive':>9} {'naive/lib':>10} {stream:>9} "
          f"{'lib 1%':>7} {'naive 1%':>9} {'kept':>5} {'warned':>7}")
    for cond in conds:
        worst = {"lib": 0.0, "naive": 0.0, "stream": 0.0, "lib_ok": args.d,
                 "naive_ok": args.d, "kept": args.d, "warned": False}
        for seed, (X, J, exact) in enumerate(problems):
            A = reparameterisation(seed, args.d, cond)
            XA, JA = (X @ A).astype(dtype), (J @ np.linalg.inv(A).T).astype(dtype)
            lib, warned = library_strengths(XA, JA, dtype)
            streamed, warned_streaming = library_strengths(XA, JA, dtype, args.chunk)
            naive = naive_strengths(XA, JA)
            worst["lib"] = max(worst["lib"], error(lib, exact))
            worst["stream"] = max(worst["stream"], error(streamed, exact))
            worst["naive"] = max(worst["naive"], error(naive, exact))
            worst["lib_ok"] = min(worst["lib_ok"], resolved(lib, exact))
            worst["naive_ok"] = min(worst["naive_ok"], resolved(naive, exact))
            worst["kept"] = min(worst["kept"], len(lib))
            worst["warned"] |= warned or warned_streaming
        ratio = worst["naive"] / worst["lib"] if worst["lib"] > 0 else float("inf")
        print(f"{cond:8.0e} {worst['lib']:9.1e} {worst['naive']:9.1e} {ratio:10.1e} "
              f"{worst['stream']:9.1e} {worst['lib_ok']:7d} {worst['naive_ok']:9d} "
              f"{worst['kept']:5d} {'yes' if worst['warned'] else 'no':>7}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--o", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=50,
                        help="rows per partial_fit call of the streamed column")
    args = parser.parse_args()
    start = time.perf_counter()
    problems = []
    for seed in range(args.seeds):
        X, J = layer(seed, args.n, args.d, args.o)
        problems.append((X, J, exact_strengths(X, J)))
    print(f"n={args.n} d={args.d} o={args.o}; A = Q1 diag(logspace(0, log10 cond, d)) Q2")
    run("float64", [10.0**k for k in range(9)], args, problems)
    run("float32", [10.0**k for k in range(5)], args, problems)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
