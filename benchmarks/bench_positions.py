"""Benchmark: stochastic sources over positions on a Hugging Face GPT-2 block.

A randomly initialised GPT-2 (``transformers``, no download; 2 blocks, d = 64,
4 heads) on random token sequences of ``--length`` positions; the graph from the
residual stream after block 0 to the one after block 1, both at every position,
goes through vector-Jacobian products (``P k`` per sample: every output position
times every column of the next basis). With ``stochastic_positions=m`` it takes
``m k``, for the statistics and for the edges. Printed, from one process in
interleaved rounds (minimum of each): the build time exactly and with each ``m``,
the relative Frobenius error of the Jacobian second moment ``M'`` of the first
layer and the relative error of the total edge weight against the exact build.

Usage::

    python benchmarks/bench_positions.py                 # 8 sequences of 16 tokens
    python benchmarks/bench_positions.py --length 64 --m 2,8 --threads 1
"""

import argparse
import time

import numpy as np
import torch

from sklearn_lib import InteractionGraph


def build(model, tokens, m):
    return InteractionGraph.from_model(
        model, ["transformer.h.0", "transformer.h.1"], tokens, sequence=True,
        stochastic_positions=m, random_state=0, n_components=None,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="sequences")
    parser.add_argument("--length", type=int, default=16, help="positions per sequence")
    parser.add_argument("--m", default="2,4", help="sources per sample, comma-separated")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=args.length,
                        vocab_size=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 256, (args.n, args.length))
    variants = [None] + [int(m) for m in args.m.split(",")]
    times = {m: [] for m in variants}
    graphs = {}
    for _ in range(args.repeat):
        for m in variants:
            start = time.perf_counter()
            graphs[m] = build(model, tokens, m)
            times[m].append(time.perf_counter() - start)
    exact = graphs[None].bases_[0].jacobian_gram_
    exact_edges = graphs[None].edges_[0]
    print(f"GPT-2 (2 blocks, d = 64), {args.n} sequences x {args.length} positions, float64, "
          f"{torch.get_num_threads()} threads, min of {args.repeat} interleaved rounds")
    print(f"{'stochastic_positions':>22}{'build [s]':>11}{'speed-up':>10}"
          f"{'M_prime rel. err':>18}{'edge total rel. err':>21}")
    for m in variants:
        G, E = graphs[m].bases_[0].jacobian_gram_, graphs[m].edges_[0]
        err = np.linalg.norm(G - exact) / np.linalg.norm(exact)
        # The bases differ with M' (directions rotate), so edges cannot be compared
        # entry by entry: the total edge weight is.
        err_e = abs(E.sum() - exact_edges.sum()) / exact_edges.sum()
        print(f"{str(m):>22}{min(times[m]):>11.2f}{min(times[None]) / min(times[m]):>10.2f}"
              f"{err:>18.3f}{err_e:>21.3f}")


if __name__ == "__main__":
    main()
