"""Benchmark: a section's products ``V^T J`` by vector-Jacobian products or from its full Jacobian.

A section ``Linear(d_in, h) -> tanh -> Linear(h, d_out)`` of an MLP (float64,
``--batch`` samples, ``k = d_out`` kept directions unless ``--k``) streamed
as the model source consumes it: every chunk's scatter ``P^T P`` summed.
:class:`~sklearn_lib.models._vjp.SectionProducts` takes ``k`` vectorised
backward passes; :class:`~sklearn_lib.models._jacobian_products.JacobianProducts`
``d_in`` forward-mode passes and a contraction. Printed per case, from one
process in interleaved rounds (minimum of each): both times, their ratio (VJP
time / forward-mode time: above 1 the Jacobian wins), the directions per input
coordinate (``n_vectors / (P_in d_in)``), the ratio the model source's cost
rule predicts from the counted operations
(:func:`~sklearn_lib.models._jacobian_products.prefer_jacobian`: it takes the
Jacobian from 2 on), its choice, and the largest relative difference of the
scatters.

Usage::

    python benchmarks/bench_jacobian_products.py --threads 1
    python benchmarks/bench_jacobian_products.py --cases 32x512,512x32,256x512
"""

import argparse
import time

import torch

from sklearn_lib.models import _model
from sklearn_lib.models._jacobian_products import (
    JacobianProducts,
    estimated_speedup,
    prefer_jacobian,
    section_flops,
)
from sklearn_lib.models._vjp import SectionProducts


def section(d_in, d_out, hidden):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Identity(), torch.nn.Linear(d_in, hidden), torch.nn.Tanh(),
        torch.nn.Linear(hidden, d_out),
    ).double().eval()


def scatter(kind, model, a, b, x, V, step):
    products = kind(model, a, b, x, [x], V, sequence=False, check=False)
    total = None
    for _, chunk in products.chunks(step):
        P = chunk.reshape(-1, chunk.shape[-1])
        total = P.T @ P if total is None else total.addmm_(P.T, P)
    return total, products


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="32x512,512x32",
                        help="d_in x d_out sections, comma-separated")
    parser.add_argument("--hidden", type=int, default=512, help="the section's hidden width")
    parser.add_argument("--k", type=int, default=None, help="kept directions (default d_out)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--step", type=int, default=4096, help="directions per chunk")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} batch={args.batch} hidden={args.hidden}")
    for case in args.cases.split(","):
        d_in, d_out = (int(v) for v in case.split("x"))
        model = section(d_in, d_out, args.hidden)
        a, b = _model._parse_layers(model, ["0", "3"], "output")
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, d_in, generator=g, dtype=torch.float64)
        V = torch.linalg.qr(torch.randn(d_out, args.k or d_out, generator=g,
                                        dtype=torch.float64))[0]
        times = {SectionProducts: [], JacobianProducts: []}
        results = {}
        for _ in range(args.repeat):
            for kind, spent in times.items():
                start = time.perf_counter()
                results[kind], products = scatter(kind, model, a, b, x, V, args.step)
                spent.append(time.perf_counter() - start)
                if kind is JacobianProducts:
                    n_vectors, tile = products.n_vectors, products.tile
        vjp, fwd = min(times[SectionProducts]), min(times[JacobianProducts])
        diff = ((results[SectionProducts] - results[JacobianProducts]).abs().max()
                / results[SectionProducts].abs().max()).item()
        flops = section_flops(model, a, b, x, x)
        predicted = estimated_speedup(flops, d_in, tile, n_vectors, d_out, 1)
        choice = "jacobian" if prefer_jacobian(flops, d_in, tile, n_vectors, d_out, 1) else "vjp"
        print(f"d_in={d_in:4d} d_out={d_out:4d} k={V.shape[1]:4d}  directions/input="
              f"{n_vectors / d_in:7.3f}  VJP {vjp:7.3f} s  forward {fwd:7.3f} s  "
              f"VJP/forward {vjp / fwd:6.2f}  predicted {predicted:6.2f} ({choice})  "
              f"max rel diff {diff:.1e}")


if __name__ == "__main__":
    main()
