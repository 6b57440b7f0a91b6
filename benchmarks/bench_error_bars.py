"""Benchmark: error bars of stochastic fits of a small GPT-2 (issue 22).

A randomly initialised GPT-2 (``transformers``, no download) of ``--blocks``
blocks, ``--d-model`` wide, on random token sequences; the graph over the
residual stream (the input of block 0 and the output of every block),
``sequence=True``, final layer unrotated. For each stochastic setting
(``stochastic_positions`` m, ``stochastic_sources`` k) it prints, per layer
fitted with Jacobians, the relative error bars ``interaction_strengths_std_ /
interaction_strengths_`` of the top 50 directions (median and largest, and
whether all are below the issue's 5%), the largest relative error bar of the
edges above 1% of the largest edge, and the fit time relative to the exact fit
(every position and direction) measured in the same process.

Usage::

    python benchmarks/bench_error_bars.py                  # about 4 minutes on 2 CPU cores
    python benchmarks/bench_error_bars.py --settings 0:8,16:0 --n 16 --positions 32
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This checkout's package, not whichever is installed.
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from sklearn_lib import InteractionGraph  # noqa: E402
from sklearn_lib.sources._model_source import ModelSource  # noqa: E402

TOP = 50


def make_model(blocks, d_model, heads, positions, vocab, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=blocks, n_embd=d_model, n_head=heads, vocab_size=vocab,
                        n_positions=max(positions, 8), resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).double().eval()


def fit(model, layers, tokens, m, k):
    """The graph, its fit time and the time of its statistics and edges passes."""
    params = {"sequence": True, "random_state": 0, "edge_point": "data",
              "stochastic_positions": m or None, "stochastic_sources": k or None}
    times = {"statistics": 0.0, "edges": 0.0}
    originals = {name: getattr(ModelSource, name) for name in ("jacobian_stats", "edges")}

    def timed(name, stage):
        def wrapped(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return originals[name](self, *args, **kwargs)
            finally:
                times[stage] += time.perf_counter() - start
        return wrapped

    ModelSource.jacobian_stats = timed("jacobian_stats", "statistics")
    ModelSource.edges = timed("edges", "edges")
    try:
        start = time.perf_counter()
        graph = InteractionGraph.from_model(model, layers, tokens, **params)
        total = time.perf_counter() - start
    finally:
        for name, original in originals.items():
            setattr(ModelSource, name, original)
    return graph, total, times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--n", type=int, default=8, help="sequences")
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default="2:0,8:0,32:0,0:16,0:64,8:16",
                        help="comma-separated m:k (0: exact) for positions and directions")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = make_model(args.blocks, args.d_model, args.heads, args.positions, args.vocab)
    tokens = torch.randint(0, args.vocab, (args.n, args.positions),
                           generator=torch.Generator().manual_seed(1))
    layers = ["transformer.h.0:input"] + [f"transformer.h.{i}" for i in range(args.blocks)]
    print(f"GPT-2 random init: {args.blocks} blocks, d_model {args.d_model}, {args.heads} "
          f"heads, {args.n} x {args.positions} tokens, float64, {args.threads} thread(s); "
          f"layers {layers}")
    # A first fit pays one-time costs (vmap's and the model's first calls): untimed.
    fit(model, layers, tokens, 8, 0)
    exact, t_exact, s_exact = fit(model, layers, tokens, 0, 0)
    print(f"exact fit: {t_exact:.1f} s (Jacobian statistics {s_exact['statistics']:.1f} s, "
          f"edges {s_exact['edges']:.1f} s), kept directions {exact.n_components_.tolist()}")
    print(f"{'m':>4} {'k':>4} {'fit':>5} {'stats':>5} {'edges':>5}  (times / exact)  layer: "
          f"median / max relative error bar of the top {TOP} strengths [all < 5%]; "
          "largest relative edge error bar (edges above 1% of the largest)")
    for setting in args.settings.split(","):
        m, k = (int(v) for v in setting.split(":"))
        graph, t, stages = fit(model, layers, tokens, m, k)
        parts = []
        for l, basis in enumerate(graph.bases_[:-1]):
            rel = (basis.interaction_strengths_std_ / basis.interaction_strengths_)[:TOP]
            parts.append(f"{l}: {np.median(rel):.3f} / {rel.max():.3f} "
                         f"[{'yes' if (rel < 0.05).all() else 'no'}]")
        if graph.edges_std_ is None:
            edge = "edges exact"
        else:
            worst = []
            for E, S in zip(graph.edges_, graph.edges_std_):
                big = E > 0.01 * E.max()
                worst.append(float((S[big] / E[big]).max()))
            edge = "edges " + " ".join(f"{w:.3f}" for w in worst)
        ratios = [t / t_exact, *(stages[s] / s_exact[s] for s in ("statistics", "edges"))]
        print(f"{m:>4} {k:>4} " + " ".join(f"{r:>5.2f}" for r in ratios) + "  "
              + "; ".join(parts) + f"; {edge}")
    # The same exact fit again: how much the machine's load moves the times.
    _, again, s_again = fit(model, layers, tokens, 0, 0)
    print(f"exact fit again: {again / t_exact:.2f} of the first (statistics "
          f"{s_again['statistics'] / s_exact['statistics']:.2f}, edges "
          f"{s_again['edges'] / s_exact['edges']:.2f})")


if __name__ == "__main__":
    main()
