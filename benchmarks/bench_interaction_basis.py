"""Benchmark InteractionBasis.fit: achieved GFLOP/s against plain matmul, and memory.

Part 1 fits on cached float64 data (n=8,000, d=256, o=256 by default) and prints
the fit's achieved GFLOP/s next to that of a plain float64 matrix multiply
measured in the same run (target: the fit reaches at least half the matmul rate).

Part 2 fits two data sizes with the same ``batch_size``, each in a fresh
subprocess, and prints the peak memory the fit allocates beyond its inputs
(resident-set high-water mark during fit minus the resident set before it):
it must not grow with n_samples.

Run: ``python benchmarks/bench_interaction_basis.py [--n 8000 --d 256 --o 256]``.
"""

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch
from _memory import peak, reset_peak

from sklearn_lib import InteractionBasis


def fit_flops(n, d, o):
    """Floating-point operations of a fit: the J^T J GEMM, the Gram GEMM, two eigh."""
    return 2 * n * o * d * d + 2 * n * d * d + 2 * (9 * d**3)


def best_of(repeats, function):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(size=2048, repeats=5):
    a = torch.randn(size, size, dtype=torch.float64)
    b = torch.randn(size, size, dtype=torch.float64)
    seconds = best_of(repeats, lambda: a @ b)
    return 2 * size**3 / seconds / 1e9


def make_data(n, d, o, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    J = rng.standard_normal((n, o, d))
    return X, J


def throughput(n, d, o, batch_size):
    X, J = make_data(n, d, o)
    basis = InteractionBasis(batch_size=batch_size)
    basis.fit(X[:64], jacobians=J[:64])  # warm up torch's kernels
    seconds = best_of(3, lambda: basis.fit(X, jacobians=J))
    return fit_flops(n, d, o) / seconds / 1e9, seconds


def memory_child(n, d, o, batch_size):
    X, J = make_data(n, d, o)
    # Data generation's own temporaries must not hide what the fit allocates.
    baseline = reset_peak()
    InteractionBasis(batch_size=batch_size).fit(X, jacobians=J)
    extra = peak() - baseline
    print(json.dumps({"n": n, "input_bytes": X.nbytes + J.nbytes, "extra_bytes": extra}))


def memory_in_subprocess(n, d, o, batch_size):
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(n), "--d", str(d), "--o", str(o),
         "--batch-size", str(batch_size)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--o", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.d, args.o, args.batch_size)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    reference = matmul_gflops()
    achieved, seconds = throughput(args.n, args.d, args.o, args.batch_size)
    print(f"\nfit n={args.n} d={args.d} o={args.o} batch_size={args.batch_size}: "
          f"{seconds:.2f} s")
    print(f"  fit    {achieved:8.1f} GFLOP/s")
    print(f"  matmul {reference:8.1f} GFLOP/s (2048 x 2048 float64)")
    print(f"  ratio  {achieved / reference:8.2f}  (target >= 0.5)")

    print(f"\nmemory fit allocates beyond its inputs, batch_size={args.batch_size}:")
    for n in (args.n // 4, args.n):
        row = memory_in_subprocess(n, args.d, args.o, args.batch_size)
        print(f"  n={row['n']:>6}: inputs {row['input_bytes'] / 2**20:8.1f} MiB, "
              f"extra {row['extra_bytes'] / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
