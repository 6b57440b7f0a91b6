"""Fitting a zarr cache larger than a worker's memory: Dask LocalCluster vs one process.

Writes an ActivationCache of ``--gb`` gigabytes (activations of two layers of
width ``--width`` and the Jacobians between them, random), then fits an
InteractionBasis of the first layer with those Jacobians

* in one process, the chunked fit reading the zarr arrays block by block, and
* with a ``distributed.LocalCluster`` of ``--workers`` processes of one thread,
  reducing per-block statistics (``ActivationCache.activations(..., dask=True)``),

in interleaved rounds (the minimum of ``--repeat`` rounds counts), and prints
samples/s of both, their ratio, and the peak memory each worker (and the single
process) added during the fit, next to the size of one chunk. Peak memory is the
kernel's high-water mark (VmHWM) reset before each fit through
``/proc/<pid>/clear_refs``, minus the resident size before the fit (the imported
libraries). The cache is deleted at the end unless ``--keep``.

Usage::

    python benchmarks/bench_scale.py                 # 4.3 GB, 2 workers
    python benchmarks/bench_scale.py --gb 0.2        # a quick check
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import _memory
import cloudpickle
import numpy as np
from _memory import peak, reset_peak

# The workers measure themselves with these functions; they travel by value, since
# the workers' path need not hold this folder.
cloudpickle.register_pickle_by_value(_memory)


def write_cache(path, n_rows, width, batch):
    from sklearn_lib.cache import ActivationCache

    rng = np.random.default_rng(0)
    A = rng.normal(size=(width, width)) / np.sqrt(width)
    layers = {"x": (width,), "y": (width,)}
    with ActivationCache.create(path, layers, jacobians=True) as cache:
        for start in range(0, n_rows, batch):
            b = min(batch, n_rows - start)
            x = rng.normal(size=(b, width)) @ A
            # Jacobians of a tanh layer with weights A: diag(1 - tanh^2) A^T, per row.
            s = 1.0 - np.tanh(x @ A) ** 2
            J = s[:, :, None] * A.T[None]
            cache.append({"x": x, "y": np.tanh(x @ A)}, {("x", "y"): J})
            print(f"\rwriting {start + b:,}/{n_rows:,} rows", end="", file=sys.stderr)
    print(file=sys.stderr)
    return ActivationCache.open(path)


def fit_local(cache):
    from sklearn_lib import InteractionBasis

    before = reset_peak()
    t = time.perf_counter()
    basis = InteractionBasis().fit(cache.activations("x"), jacobians=cache.jacobians("x", "y"))
    return time.perf_counter() - t, peak() - before, basis


def fit_dask(client, cache):
    import dask

    from sklearn_lib import InteractionBasis

    before = client.run(reset_peak)
    X = cache.activations("x", dask=True)
    J = cache.jacobians("x", "y", dask=True)
    t = time.perf_counter()
    with dask.config.set(scheduler=client):
        basis = InteractionBasis().fit(X, jacobians=J)
    elapsed = time.perf_counter() - t
    after = client.run(peak)
    return elapsed, {w: after[w] - before[w] for w in after}, basis, J.chunks[0][0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.3,
                        help="size of the cache in GB (10**9 bytes)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    import torch
    from distributed import Client, LocalCluster

    torch.set_num_threads(1)  # one thread per process on both sides
    root = tempfile.mkdtemp(prefix="bench_scale-", dir=args.dir)
    row_bytes = 8 * (2 * args.width + args.width**2)
    n_rows = int(args.gb * 1e9 / row_bytes)
    try:
        cache = write_cache(os.path.join(root, "cache.zarr"), n_rows, args.width, 4096)
        size = sum(os.path.getsize(os.path.join(d, f))
                   for d, _, fs in os.walk(root) for f in fs)
        print(f"cache: {n_rows:,} rows, {size / 1e9:.2f} GB on disk, width {args.width}")
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          host="127.0.0.1", dashboard_address=None) as cluster, \
                Client(cluster) as client:
            client.run(torch.set_num_threads, 1)
            client.run(lambda: __import__("sklearn_lib.graph"))
            times = {"local": [], "dask": []}
            for r in range(args.repeat):
                t, mem_local, ref = fit_local(cache)
                times["local"].append(t)
                print(f"round {r}: one process {t:.1f} s", file=sys.stderr)
                t, mem_workers, got, block_rows = fit_dask(client, cache)
                times["dask"].append(t)
                print(f"round {r}: dask {t:.1f} s", file=sys.stderr)
        error = np.abs(got.jacobian_gram_ - ref.jacobian_gram_).max() / np.abs(
            ref.jacobian_gram_).max()
        chunk = block_rows * row_bytes
        local, dask_t = min(times["local"]), min(times["dask"])
        print(f"one process (chunked zarr fit): {n_rows / local:,.0f} samples/s ({local:.1f} s)")
        print(f"dask, {args.workers} workers x 1 thread: {n_rows / dask_t:,.0f} samples/s "
              f"({dask_t:.1f} s)")
        print(f"time ratio dask / one process: {dask_t / local:.2f} (target <= 1.5)")
        print(f"one block: {block_rows:,} rows = {chunk / 2**20:.1f} MiB")
        print(f"peak memory added, one process: {mem_local / 2**20:.1f} MiB "
              f"({mem_local / chunk:.2f} blocks)")
        for worker, m in mem_workers.items():
            print(f"peak memory added, worker {worker}: {m / 2**20:.1f} MiB "
                  f"({m / chunk:.2f} blocks; target < 4)")
        print(f"relative difference of M' between the fits: {error:.2e}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
