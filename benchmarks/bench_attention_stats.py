"""Benchmark: the attention half's combined statistics without the products, against the products.

The section is ``x -> x + attn(ln_1(x))`` of a transformers ``GPT2Block``
(GPT-2 small's shape: d = 768, 12 heads, random init, float64, one sample of
``--T`` positions), ``k = r = --k`` random cotangent columns and basis
columns, ``--m`` random combinations of the output positions. Computed two ways
in the same run:

* fused (:mod:`sklearn_lib.models._attention_stats`): ``combined_scatter``
  (the per-combination scatter ``S_j = sum_s G_s^T G_s``; for GPT-2 small at this
  ``k`` through the head structure, and, for comparison, with ``G_s`` formed) and
  ``combined_attributions`` (``g = sum_s G_s right diag(z_s)``), each with
  ``--memory`` bytes of temporaries;
* the current route: the products of
  :meth:`~sklearn_lib.models._attention_half.NormAttention.products` in chunks
  (sized from its ``costs()`` as the graph sizes them, half of the memory for
  the products, half for the temporaries), each chunk's ``P^T P`` summed and
  its projection ``sum_s (P_s right) z_s`` taken, once with ``--memory`` and once
  with ``--memory-large``. One pass serves both statistics; its time is split
  into products, scatter and projection, so that the route's time for the
  scatter is products + scatter and for the attributions products + projection.

Reported: each time (the fastest of ``--repeat`` interleaved rounds, as the
machine may be shared), peak resident memory above the start, the largest
relative differences between the two, this machine's float64 GEMM rate in the
same run and each method's share of it, both counted with the fused method's
flops: for the scatter (through the heads) per row ``e d T + 4 e d^2`` once (the
query factors, causal, and the query blocks) and ``e d T + 6 e d^2`` per combination
(the key factors and the key blocks); for the attributions (no rotary: GEMMs over
positions) ``2 H T^2 (r + 2 e)`` per sample and combination, plus ``2 k d r``. The
route's own flops are higher (``4 k d^2`` a row for the products and their scatter), so
its share is a lower bound of its GEMMs' efficiency and a measure of how far it is from
the fused method's useful work.

Usage::

    python benchmarks/bench_attention_stats.py                    # T = 256, 2 threads
    python benchmarks/bench_attention_stats.py --T 1024 --repeat 2
    python benchmarks/bench_attention_stats.py --T 1024 --skip-route   # fused only
    python benchmarks/bench_attention_stats.py --device cuda --T 1024
"""

import argparse
import ctypes
import ctypes.util
import gc
import time
from pathlib import Path

import torch

from sklearn_lib.models._attention_stats import (
    _products,
    _scatter_direct,
    combined_attributions,
    combined_scatter,
)

try:
    from _memory import peak, reset_peak
    from bench_attention_half import _sync, formula_of, gemm_rate, gpt2_block
except ImportError:  # run from elsewhere than benchmarks/
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _memory import peak, reset_peak
    from bench_attention_half import _sync, formula_of, gemm_rate, gpt2_block

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None


def route(section, X, V, signs, right, Z, memory):
    """The products in chunks, each chunk's scatter and projection: (S, g, times)."""
    B, T, d = X.shape
    m, k = signs.shape[1], V.shape[1]
    products = section.products([X], V, signs=signs, memory=memory // 2)
    _, _, per_vector = products.costs()
    step = max(1, min(products.n_vectors, memory // 2 // per_vector))
    S = X.new_zeros(m, d, d)
    g = X.new_zeros(B, m, k, right.shape[1])
    times = {"products": 0.0, "scatter": 0.0, "projection": 0.0}
    it = iter(products.chunks(step))
    while True:
        _sync(X.device)
        t0 = time.perf_counter()
        try:
            start, P = next(it)
        except StopIteration:
            break
        _sync(X.device)
        t1 = time.perf_counter()
        # Directions start:stop; a chunk may straddle combinations (j k : (j + 1) k).
        stop = start + P.shape[0]
        for j in range(start // k, (stop - 1) // k + 1):
            flat = P[max(start, j * k) - start : min(stop, (j + 1) * k) - start].reshape(-1, d)
            S[j].addmm_(flat.T, flat)
        _sync(X.device)
        t2 = time.perf_counter()
        proj = torch.einsum("cbsd,dr,bsr->bcr", P.view(-1, B, T, d), right, Z)
        g.view(B, m * k, -1)[:, start:stop] = proj
        _sync(X.device)
        t3 = time.perf_counter()
        times["products"] += t1 - t0
        times["scatter"] += t2 - t1
        times["projection"] += t3 - t2
    return S, g, times, step


def measure(fn, device):
    """(result, seconds, peak bytes above the start)."""
    cuda = torch.device(device).type == "cuda"
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)  # freed memory leaves the resident set: the peak is this run's
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    used = (torch.cuda.max_memory_allocated() if cuda else peak()) - base
    return out, seconds, used


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=256)
    parser.add_argument("--k", type=int, default=768, help="columns of V and of right")
    parser.add_argument("--m", type=int, default=1, help="combinations of positions")
    parser.add_argument("--memory", type=int, default=2**29, help="bytes (default 512 MiB)")
    parser.add_argument("--memory-large", type=int, default=2**32,
                        help="bytes of the route's second run (default 4 GiB)")
    parser.add_argument("--skip-route", action="store_true",
                        help="time the fused functions only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1,
                        help="interleaved rounds; the fastest of each is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, T, k, m, dt = args.device, args.T, args.k, args.m, torch.float64
    cuda = torch.device(device).type == "cuda"

    section = formula_of(gpt2_block(device))
    d, e = section.d_in, section.d_head
    X = torch.randn(1, T, d, dtype=dt, device=device)
    V = torch.randn(d, k, dtype=dt, device=device)
    right = torch.randn(d, k, dtype=dt, device=device)
    Z = torch.randn(1, T, k, dtype=dt, device=device)
    signs = (torch.randint(0, 2, (1, m, T), device=device) * 2 - 1).to(dt) / m**0.5
    rate = gemm_rate(device)
    print(f"device {device}, threads {torch.get_num_threads()}, T={T}, d={d}, heads=12, "
          f"k=r={k}, m={m}, one sample, float64")
    print(f"float64 GEMM rate (2048^3): {rate / 1e9:.1f} GFLOP/s")

    runs = {
        "fused scatter": lambda: combined_scatter(section, X, V, signs, memory=args.memory),
        "fused scatter, G formed": lambda: _scatter_direct(
            _products(section, [X], V, None, signs, None, args.memory), args.memory),
        "fused attributions": lambda: combined_attributions(
            section, [X], V, right, Z, signs, memory=args.memory),
        f"route {args.memory / 2**20:.0f} MiB": lambda: route(
            section, X, V, signs, right, Z, args.memory),
        f"route {args.memory_large / 2**20:.0f} MiB": lambda: route(
            section, X, V, signs, right, Z, args.memory_large),
    }
    if args.skip_route:
        runs = dict(list(runs.items())[:3])
    results = {}
    # Interleaved rounds, the fastest of each kept: the machine may be shared.
    for _ in range(args.repeat):
        for name, fn in runs.items():
            out, seconds, used = measure(fn, device)
            if name in results:
                seconds = min(seconds, results[name][1])
                used = max(used, results[name][2])
            results[name] = (out, seconds, used)

    # Per row: the factors' GEMMs (~e d T each under the causal mask), the query blocks once
    # (4 e d^2) and the key blocks per combination (~6 e d^2); the attributions' GEMMs over
    # positions (2 H T^2 (r + 2e)) and E B (2 k d r), per sample and combination.
    H = d // e
    flops_scatter = T * (e * d * T + 4 * e * d * d) + m * T * (e * d * T + 6 * e * d * d)
    flops_attr = m * (2 * H * T * T * (k + 2 * e) + 2 * k * d * k)
    mem = "CUDA allocated" if cuda else "RSS"

    def share(flops, seconds):
        return f"{flops / seconds / 1e9:6.1f} GFLOP/s, {flops / seconds / rate:.2f} of GEMM rate"

    S, t, used = results["fused scatter"]
    print(f"fused scatter       {t:8.2f} s, peak {used / 2**20:6.0f} MiB ({mem}); "
          f"{share(flops_scatter, t)} ({flops_scatter / 1e9:.0f} GFLOP)")
    S_g, t, used = results["fused scatter, G formed"]
    flops_g = m * T * (2 * e * d * T + 4 * e * d * d + 4 * k * d * d)
    print(f"fused scatter, G formed {t:8.2f} s, peak {used / 2**20:6.0f} MiB ({mem}); "
          f"{share(flops_g, t)} of its own {flops_g / 1e9:.0f} GFLOP; max rel diff to the "
          f"head route {float((S_g - S).abs().max() / S.abs().max()):.1e}")
    g, t, used = results["fused attributions"]
    print(f"fused attributions  {t:8.2f} s, peak {used / 2**20:6.0f} MiB ({mem}); "
          f"{share(flops_attr, t)} ({flops_attr / 1e9:.0f} GFLOP)")
    for name in list(runs)[3:]:
        (S_r, g_r, times, step), t, used = results[name]
        t_s = times["products"] + times["scatter"]
        t_a = times["products"] + times["projection"]
        print(f"{name:18s}  {t:8.2f} s in all ({step} directions a chunk), peak "
              f"{used / 2**20:6.0f} MiB ({mem}): products {times['products']:.2f} s, "
              f"scatter {times['scatter']:.2f} s, projection {times['projection']:.2f} s")
        print(f"    scatter route {t_s:8.2f} s: {share(flops_scatter, t_s)}; fused "
              f"{t_s / results['fused scatter'][1]:.1f}x faster")
        print(f"    attributions route {t_a:8.2f} s: {share(flops_attr, t_a)}; fused "
              f"{t_a / results['fused attributions'][1]:.1f}x faster")
        print(f"    max rel diff: scatter {float((S - S_r).abs().max() / S_r.abs().max()):.1e}, "
              f"attributions {float((g - g_r).abs().max() / g_r.abs().max()):.1e}")


if __name__ == "__main__":
    main()
