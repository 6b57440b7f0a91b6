"""Benchmark: the edges of a GPT-2 MLP half in closed form, exact vs combined positions.

The section ``y = x + W_o gelu(W_i LayerNorm(x) + b_i) + b_o`` at GPT-2 small's
widths (d = 768, d_mlp = 3072; random weights) on one sample of ``T`` positions,
with ``k`` output and ``r`` input directions. Timed, in one process, minimum of
``--repeat`` rounds, derivative included in both:

* exact: ``NormMLP.edge_jacobians`` (a (k, r) matrix per position, k d_mlp r
  multiply-adds each) and ``accumulate_edges``, what a fit without
  ``stochastic_positions`` does; rows in chunks of ``--chunk`` (one sample's
  (T, k, d_mlp) buffer alone is 19 GB in float64 at T = 1024). With
  ``--exact-rows`` only that many rows are timed and the time is scaled to ``T``
  (the work is linear in the rows).
* combined: ``NormMLP.combined_attributions`` with ``m`` random combinations of
  the positions and ``accumulate_attributions``, what ``stochastic_positions=m``
  does.

Usage::

    python benchmarks/bench_block_edges.py                      # T = 256, 1024; m = 1
    python benchmarks/bench_block_edges.py --lengths 256 --exact-rows 64 --threads 2
"""

import argparse
import time

import torch
from torch import nn

from sklearn_lib.models._blocks import BlockState, NormMLP
from sklearn_lib.models._norms import Norm
from sklearn_lib.models._position_sources import PositionSources
from sklearn_lib.sources._edges import (
    Workspace,
    accumulate_attributions,
    accumulate_edges,
)


def section(d, d_mlp, dtype):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    norm = Norm("layer", 1.0 + randn(d, scale=0.1), randn(d, scale=0.1), 1e-5)
    return NormMLP(norm, randn(d_mlp, d, scale=d**-0.5), randn(d_mlp, scale=0.1),
                   nn.GELU(approximate="tanh"), randn(d, d_mlp, scale=d_mlp**-0.5),
                   randn(d, scale=0.1), residual=True)


def _rows(state, start, stop):
    return BlockState(state.t[start:stop], [(w[start:stop], e[start:stop])
                                            for w, e in state.rank_one])


def exact(block, factors, X, Z, rows, chunk):
    E = torch.zeros(factors[0].shape[0], Z.shape[1], dtype=X.dtype)
    workspace = Workspace()
    state = block.derivative(X[:rows])
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        accumulate_edges(E, block.edge_jacobians(_rows(state, start, stop), factors, workspace),
                         Z[start:stop])
    return E


def combined(block, factors, X, Z, m, seed=0):
    E = torch.zeros(factors[0].shape[0], Z.shape[1], dtype=X.dtype)
    signs = PositionSources(m, seed, torch.device("cpu")).batch(1, X.dtype)(X.shape[0])
    accumulate_attributions(E, block.combined_attributions(block.derivative(X), factors, Z,
                                                           signs))
    return E


def timed(f, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,1024", help="positions T, comma-separated")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--d-mlp", type=int, default=3072)
    parser.add_argument("--k", type=int, default=768, help="output directions")
    parser.add_argument("--r", type=int, default=768, help="input directions")
    parser.add_argument("--m", type=int, default=1, help="position combinations")
    parser.add_argument("--chunk", type=int, default=32, help="rows per exact GEMM")
    parser.add_argument("--exact-rows", type=int, default=None,
                        help="time the exact path on this many rows, scaled to T")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    block = section(args.d, args.d_mlp, dtype)
    g = torch.Generator().manual_seed(1)
    V = torch.linalg.qr(torch.randn(args.d, args.k, generator=g, dtype=dtype))[0]
    C = torch.linalg.qr(torch.randn(args.d, args.r, generator=g, dtype=dtype))[0]
    factors = block.edge_factors(V, torch.linalg.pinv(C).T)
    print(f"d={args.d} d_mlp={args.d_mlp} k={args.k} r={args.r} m={args.m} {args.dtype} "
          f"threads={torch.get_num_threads()}; one sample, min of {args.repeat}")
    for T in (int(t) for t in args.lengths.split(",")):
        X = torch.randn(T, args.d, generator=g, dtype=dtype)
        Z = X @ C
        rows = T if args.exact_rows is None else min(T, args.exact_rows)
        t_exact, E = timed(lambda: exact(block, factors, X, Z, rows, args.chunk), args.repeat)
        t_exact *= T / rows
        t_comb, E_m = timed(lambda: combined(block, factors, X, Z, args.m), args.repeat)
        note = "" if rows == T else f" (measured on {rows} rows, scaled)"
        line = (f"T={T:5d}: exact {t_exact:9.3f} s{note}, combined {t_comb:7.3f} s, "
                f"ratio {t_exact / t_comb:7.1f}x")
        if rows == T:
            # One draw of m combinations: the same size as the exact edges, not equal.
            line += f"; total edge weight combined/exact {float(E_m.sum() / E.sum()):.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
