"""Benchmark: the interaction graph of the shipped modular-addition transformer.

Times ``InteractionGraph.from_model`` on the reference work's layers of
:func:`sklearn_lib.datasets.load_modular_addition_transformer` (residual stream
before attention at all three positions, before the MLP and before the
unembedding at the last position (``"hook_resid_mid[-1]"``,
``"hook_resid_post[-1]"``), and the logits; ``sequence=True``, float64,
training pairs of the default split) with nothing declared, as a user wraps the
model (path ``undeclared``: the attention and MLP halves are inferred from the
values of the model's own ``forward``, ``sklearn_lib.models._inferred``). Each
section's time is split into the statistics pass (the basis of layer ``l``) and
the edges pass, by timing the source's ``jacobian_stats`` / ``activation_stats``
and ``edges`` calls; the minimum of ``--repeat`` rounds is reported for each. No
reference implementation is available here, so the run also measures this
machine's float64 GEMM rate and prints the build time in GEMM-seconds of the
issue's ~120 GFLOP estimate for one well-batched full Jacobian of the attention
section.

``--paths undeclared,declared,products`` also builds, in the same interleaved
rounds, the graph with the attention half declared a residual attention and the
MLP half a residual block on the model (:func:`declare_shipped`), and the graph
with ``fast_path=False`` (vector-Jacobian products of the model everywhere), and
prints the largest relative difference of their edges from the first path's.

The evaluation part times what the gallery example does on 1,000 held-out pairs
(``--n-eval``) with a LIB graph fitted on ``--n-fit`` training pairs: node ablation
curves of the three layers (40 log-spaced counts each) and the fewest edges within
0.1% accuracy of each of the three sections (:func:`~sklearn_lib.evaluation.min_edges_to_keep`).
Each run is a fresh process on the same saved graph; ``--before PATH`` runs an older
checkout (``git worktree add PATH <commit>``) in the same interleaved rounds and prints
the ratios, which are what count on a busy machine.

Usage::

    python benchmarks/bench_transformer.py               # all 3,831 training pairs, 3 rounds
    python benchmarks/bench_transformer.py --n 500 --repeat 1
    python benchmarks/bench_transformer.py --n 500 --paths undeclared,declared,products
    python benchmarks/bench_transformer.py --skip-build --before /tmp/orig --eval-repeat 2
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from sklearn_lib import InteractionGraph, declare_attention, declare_residual_mlp
from sklearn_lib.datasets import (
    load_modular_addition_transformer,
    modular_addition_data,
)
from sklearn_lib.sources._model_source import ModelSource

NAMES = ["resid_pre", "resid_mid", "resid_post", "logits"]
# The reference work's layers: the residual stream after attention and after the MLP at
# the last position only, where the answer is read out (the model runs its full forward).
LAYERS = ["hook_resid_pre", "hook_resid_mid[-1]", "hook_resid_post[-1]", "unembed"]
ATTENTION_FLOP = 120e9  # the issue's estimate for M' of the attention section at n = 3,830


def gemm_rate(size=2048, repeat=5):
    a = torch.randn(size, size, dtype=torch.float64)
    b = torch.randn(size, size, dtype=torch.float64)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * size**3 / best


def declare_shipped(model):
    """Declare the shipped transformer's attention and MLP halves (residual adds in forward)."""
    declare_attention(model, "attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O",
                      input="hook_resid_pre", output="hook_resid_mid", n_heads=model.n_heads)
    return declare_residual_mlp(model, "mlp.0", "mlp.1", "mlp.2", input="hook_resid_mid",
                                output="hook_resid_post")


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def instrumented(times):
    """Wrap the source's passes so each call's time lands in ``times[(stage, l)]``."""
    originals = {}
    for method, stage in (("activation_stats", "statistics"),
                          ("jacobian_stats", "statistics"), ("edges", "edges")):
        original = getattr(ModelSource, method)
        originals[method] = original

        def wrapped(self, l, *args, _original=original, _stage=stage, **kwargs):
            start = time.perf_counter()
            try:
                return _original(self, l, *args, **kwargs)
            finally:
                times[_stage, l] += time.perf_counter() - start

        setattr(ModelSource, method, wrapped)
    return originals


# One evaluation run, in a fresh process whose sklearn_lib is the checkout on its path.
EVALUATION = r"""
import json, sys, time
import numpy as np, torch
import sklearn_lib
from sklearn_lib import InteractionGraph
from sklearn_lib.collect import record_activations
from sklearn_lib.datasets import load_modular_addition_transformer, modular_addition_data
from sklearn_lib.evaluation import compare_node_ablation, directions_to_keep, min_edges_to_keep

path, n_eval, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
names = ["resid_pre", "resid_mid", "resid_post", "logits"]
layers = ["hook_resid_pre", "hook_resid_mid[-1]", "hook_resid_post[-1]", "unembed"]
model = load_modular_addition_transformer()
_, X_test, _, y_test = modular_addition_data(model.p)
held_out = np.random.default_rng(0).permutation(len(X_test))[:n_eval]
X, y = torch.from_numpy(X_test[held_out]), y_test[held_out]
acts = {n: torch.from_numpy(a) for n, a in
        zip(names, record_activations(model, layers, X, verbose=False).values())}
graph = InteractionGraph.load(path)
sections = [lambda x: x[:, -1:] + model.attn(x, last_only=True),
            lambda h: h + model.mlp(h), lambda h: model.unembed(h[:, -1])]
rest = [lambda x: sections[2](sections[1](sections[0](x))),
        lambda h: sections[2](sections[1](h)), sections[2], lambda z: z]
out = {}
for l in range(3):
    r = graph.n_components_[l]
    ks = np.unique(np.geomspace(1, r, 40).round().astype(int))
    start = time.perf_counter()
    curve = compare_node_ablation({"LIB": graph.bases_[l]}, acts[names[l]], y,
                                  forward=rest[l], schedule=ks)
    out[f"nodes {names[l]}"] = [time.perf_counter() - start,
                                directions_to_keep(curve, 0.001)]
for l in range(3):
    start = time.perf_counter()
    result = min_edges_to_keep(graph.bases_[l], graph.bases_[l + 1], acts[names[l]], y,
                               section=sections[l], forward=rest[l + 1],
                               edges=graph.edges_[l], tolerance=0.001)
    out[f"edges {names[l]}->{names[l + 1]}"] = [time.perf_counter() - start, result.n_edges,
                                                len(result.evaluations)]
out["checkout"] = sklearn_lib.__file__
print(json.dumps(out))
"""


def evaluation(args):
    """Interleaved rounds of the evaluation runs of this checkout and ``--before``."""
    here = str(Path(__file__).resolve().parents[1])
    checkouts = {"after": here}
    if args.before:
        checkouts = {"before": str(Path(args.before).resolve()), **checkouts}
    net = load_modular_addition_transformer()
    X_train = modular_addition_data(net.p)[0]
    X_fit = X_train[np.random.default_rng(0).permutation(len(X_train))[: args.n_fit]]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "graph")
        InteractionGraph.from_model(net, LAYERS, X_fit, sequence=True).save(path)
        runs = defaultdict(list)
        for r in range(args.eval_repeat):
            for name, checkout in checkouts.items():
                print(f"evaluation round {r + 1}: {name}", file=sys.stderr, flush=True)
                env = {**os.environ, "PYTHONPATH": checkout}
                if args.threads:  # numpy's BLAS too: its idle threads spin on a busy machine
                    env.update({v: str(args.threads) for v in (
                        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
                # Run in the checkout: ``python -c`` puts the working directory first on
                # the path, before PYTHONPATH.
                done = subprocess.run(
                    [sys.executable, "-c", EVALUATION, path, str(args.n_eval),
                     str(args.threads or 0)],
                    env=env, cwd=checkout, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\nevaluation: LIB graph fitted on {len(X_fit)} training pairs, scored on "
          f"{args.n_eval} held-out pairs, min of {args.eval_repeat} interleaved rounds")
    for name, rs in runs.items():
        print(f"{name}: {rs[0].pop('checkout')}")
        for run in rs[1:]:
            run.pop("checkout")
    stages = list(runs["after"][0])
    best = {name: {stage: min(run[stage][0] for run in rs) for stage in stages}
            for name, rs in runs.items()}
    header = f"{'stage':30s} " + " ".join(f"{name + ' [s]':>11s}" for name in checkouts)
    print(header + ("   ratio  count (before, after)" if args.before else "  count"))
    for stage in stages + ["nodes total", "edges total"]:
        if stage.endswith("total"):
            kind = stage.split()[0]
            times = {name: sum(v for s, v in b.items() if s.startswith(kind))
                     for name, b in best.items()}
            counts = ""
        else:
            times = {name: b[stage] for name, b in best.items()}
            counts = ", ".join(str(rs[0][stage][1]) for rs in runs.values())
        line = f"{stage:30s} " + " ".join(f"{times[name]:11.2f}" for name in checkouts)
        if args.before:
            line += f"  {times['before'] / times['after']:6.1f}x"
        print(f"{line}  {counts}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="training pairs (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the minimum is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--paths", default="undeclared",
                        help="comma-separated: undeclared (the model as it comes), declared "
                             "(attention and MLP halves declared), products (fast_path=False)")
    parser.add_argument("--skip-build", action="store_true", help="time the evaluation only")
    parser.add_argument("--skip-evaluation", action="store_true", help="time the build only")
    parser.add_argument("--n-fit", type=int, default=500,
                        help="training pairs of the evaluated graph (default: 500)")
    parser.add_argument("--n-eval", type=int, default=1000, help="held-out pairs (default: 1000)")
    parser.add_argument("--eval-repeat", type=int, default=1,
                        help="evaluation rounds; the minimum is reported")
    parser.add_argument("--before", default=None,
                        help="an older checkout to run in the same evaluation rounds")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_build:
        build(args)
    if not args.skip_evaluation:
        evaluation(args)


def build(args):
    """Time the graph build of every path in ``--paths``, section by section."""
    X = modular_addition_data()[0][: args.n]
    # The first backward pass of a torch.func.vjp imports torch._dynamo (a second or
    # two, once per process): not part of any build.
    torch.func.vjp(torch.sin, torch.zeros(1))[1](torch.ones(1))
    rate = gemm_rate()
    print(f"{len(X)} pairs, float64, {torch.get_num_threads()} threads; "
          f"float64 GEMM rate {rate / 1e9:.1f} GFLOP/s")

    paths = args.paths.split(",")
    rounds = {path: [] for path in paths}
    graphs = {}
    for _ in range(args.repeat):
        # Interleaved: every round builds every path, so load changes hit all alike.
        for path in paths:
            model = load_modular_addition_transformer()
            if path == "declared":
                declare_shipped(model)
            times = defaultdict(float)
            originals = instrumented(times)
            try:
                start = time.perf_counter()
                graphs[path] = InteractionGraph.from_model(
                    model, LAYERS, X, sequence=True,
                    fast_path=False if path == "products" else "auto")
                times["total", -1] = time.perf_counter() - start
            finally:
                for method, original in originals.items():
                    setattr(ModelSource, method, original)
            rounds[path].append(times)
    for path in paths:
        report(path, rounds[path], graphs[path], len(X), rate, args.repeat)
    if len(paths) > 1:
        ref = graphs[paths[0]]
        for path in paths[1:]:
            diff = max(np.abs(E - E_ref).max() / np.abs(E_ref).max()
                       for E, E_ref in zip(graphs[path].edges_, ref.edges_))
            total = {p: min(r["total", -1] for r in rounds[p]) for p in (paths[0], path)}
            print(f"\n{path} vs {paths[0]}: {total[paths[0]] / total[path]:.2f}x faster, "
                  f"edges equal to {diff:.1e} (largest relative difference)")


def report(path, rounds, graph, n, rate, repeat):
    best = {key: min(r[key] for r in rounds) for key in rounds[0]}
    total = best["total", -1]
    print(f"\n[{path}] directions per layer: "
          f"{dict(zip(NAMES, graph.n_components_.tolist()))}, closed form per section: "
          f"{graph.fast_path_}")
    print(f"graph build, min of {repeat}: {total:.2f} s")
    print(f"{'section':26s} {'statistics':>11s} {'edges':>8s} {'share':>6s}")
    for l in range(len(NAMES) - 1):
        stats, edges = best["statistics", l], best["edges", l]
        print(f"{NAMES[l] + ' -> ' + NAMES[l + 1]:26s} {stats:10.2f}s {edges:7.2f}s "
              f"{(stats + edges) / total:6.0%}")
    final = best.get(("statistics", len(NAMES) - 1), 0.0)
    print(f"{'logits (final layer)':26s} {final:10.2f}s")
    passes = sum(value for (stage, _), value in best.items() if stage != "total")
    print(f"{'other (bases, setup)':26s} {total - passes:10.2f}s  (sum of per-call minima vs "
          "the minimal total)")
    attention = best["statistics", 0] + best["edges", 0]
    scale = n / 3830
    print(f"attention section: {attention:.2f} s = "
          f"{attention / (ATTENTION_FLOP * scale / rate):.1f}x the GEMM time of the "
          f"~{ATTENTION_FLOP * scale / 1e9:.0f} GFLOP full-Jacobian estimate "
          f"({ATTENTION_FLOP * scale / rate:.2f} s at {rate / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
