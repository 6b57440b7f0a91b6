"""Benchmark: build an interaction graph (bases and edges) of a ReLU MLP three ways.

1. ``naive``: a baseline written here that materialises every per-sample
   Jacobian with ``torch.func.vmap(torch.func.jacrev(...))`` and uses plain
   ``einsum`` and ``eigh`` (SPEC section 2 written out directly);
2. ``generic``: ``InteractionGraph.from_model(..., fast_path=False)``, vectorised
   vector-Jacobian products ``C_{l+1}^T J_l`` batch by batch;
3. ``fast``: ``InteractionGraph.from_model(...)`` with the closed form for
   ``Linear`` + ReLU sections (SPEC section 5).

All three compute the same thing (edges at the data point, ``edge_point="data"``,
final layer unrotated) and the parent checks that they agree. Each method runs
in a fresh subprocess; after the model and data are built the RSS high-water
mark is reset (``echo 5 > /proc/self/clear_refs``), so the reported peak
(``VmHWM``) is the peak during the build.

Usage::

    python benchmarks/bench_graph.py                  # n=2000, width 256, float64, CPU
    python benchmarks/bench_graph.py --n 500 --repeat 3
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

METHODS = ("naive", "generic", "fast")
# An absolute truncation threshold for all three methods. The relative "auto"
# tolerance (max * size * eps) sits right at the rounding noise of the rank-10
# Jacobian moment of the last hidden layer (true rank 10, noise ~1e-16 absolute
# that depends on the summation order), so the methods could keep different
# numbers of noise directions; the real eigenvalues here are all above 1e-11.
THRESHOLD = 1e-14


def build_model_and_data(n, width, d_in, d_out, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(d_in, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, d_out),
    ).double().eval()
    X = torch.randn(n, d_in, dtype=torch.float64)
    layers = [":input", "1", "3", "5", "6"]
    return model, X, layers


# --------------------------------------------------------------------------- naive baseline
def _naive_basis(X, J_hat):
    """SPEC section 1 with plain torch ops (centred, absolute truncation threshold)."""
    n, d = X.shape
    mu = X.mean(0)
    Xc = X - mu
    G = Xc.T @ Xc / n
    D, U = torch.linalg.eigh(G)
    D, order = D.abs().sort(descending=True)
    U = U[:, order]
    keep = D > THRESHOLD
    D, U = D[keep], U[:, keep]
    Mp = torch.einsum("xri,xrj->ij", J_hat, J_hat) / n
    M = D.sqrt()[:, None] * (U.T @ Mp @ U) * D.sqrt()[None, :]
    Lam, V = torch.linalg.eigh(M)
    Lam, order = Lam.abs().sort(descending=True)
    V = V[:, order]
    keep = Lam >= THRESHOLD
    Lam, V = Lam[keep], V[:, keep]
    C = (U / D.sqrt()) @ (V * Lam.sqrt())
    C_pinv = (V / Lam.sqrt()).T @ (U * D.sqrt()).T
    return mu, C, C_pinv, Lam


@torch.no_grad()
def naive_graph(model, X, layers):
    sections = [model[0:2], model[2:4], model[4:6], model[6:7]]
    with torch.no_grad():
        acts = [X]
        for f in sections:
            acts.append(f(acts[-1]))
    # Every per-sample Jacobian, materialised: (n, d_{l+1}, d_l) per section.
    jacs = [torch.func.vmap(torch.func.jacrev(f))(a) for f, a in zip(sections, acts)]
    L = len(acts) - 1
    C = [None] * (L + 1)
    C[L] = torch.eye(acts[L].shape[1], dtype=X.dtype)
    bases = [None] * L
    J_hats = [None] * L
    for l in range(L - 1, -1, -1):
        J_hats[l] = torch.einsum("xoi,or->xri", jacs[l], C[l + 1])
        bases[l] = _naive_basis(acts[l], J_hats[l])
        C[l] = bases[l][1]
    edges = []
    for l in range(L):
        mu, C_l, C_pinv, _ = bases[l]
        Z = (acts[l] - mu) @ C_l
        J_tilde = torch.einsum("xri,si->xrs", J_hats[l], C_pinv)
        edges.append(((J_tilde * Z[:, None, :]) ** 2).mean(0).numpy())
    return edges, [b[3].numpy() for b in bases]


def library_graph(model, X, layers, fast_path):
    from sklearn_lib.graph import InteractionGraph

    graph = InteractionGraph.from_model(
        model, layers, X, fast_path=fast_path, edge_point="data",
        truncation_threshold=THRESHOLD,
    )
    assert graph.fast_path_ == [fast_path] * (len(layers) - 1), graph.fast_path_
    return graph.edges_, [b.interaction_strengths_ for b in graph.bases_[:-1]]


# --------------------------------------------------------------------------- worker
def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args):
    model, X, layers = build_model_and_data(args.n, args.width, args.d_in, args.d_out)
    run = {
        "naive": lambda: naive_graph(model, X, layers),
        "generic": lambda: library_graph(model, X, layers, fast_path=False),
        "fast": lambda: library_graph(model, X, layers, fast_path=True),
    }[args.worker]
    if args.worker != "naive":
        import sklearn_lib.graph  # noqa: F401  (import time is not build time)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    start = time.perf_counter()
    edges, strengths = run()
    elapsed = time.perf_counter() - start
    peak = _status("VmHWM")
    np.savez(args.out, *edges, *strengths)
    print(json.dumps({"time": elapsed, "peak": peak, "base": base}))


# --------------------------------------------------------------------------- parent
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-out", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds; each runs every method once in a fresh process")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    print(f"InteractionGraph build: ReLU MLP {args.d_in}-{args.width}x3-{args.d_out}, "
          f"n={args.n}, float64, CPU, torch threads={torch.get_num_threads()}, "
          f"best of {args.repeat} interleaved rounds")
    methods = args.methods.split(",")
    results, outputs = {m: [] for m in methods}, {}
    # Rounds interleave the methods, one fresh process each, so that a change
    # in machine load affects all methods alike; the best time of the rounds
    # and the largest peak are reported.
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for method in methods:
                out = os.path.join(tmp, f"{method}.npz")
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", method,
                       "--out", out, "--n", str(args.n), "--width", str(args.width),
                       "--d-in", str(args.d_in), "--d-out", str(args.d_out)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode:
                    print(proc.stdout, proc.stderr, sep="\n")
                    raise SystemExit(f"{method} failed")
                results[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                with np.load(out) as npz:
                    outputs[method] = [npz[k] for k in npz.files]
    results = {
        m: {"time": min(r["time"] for r in runs), "times": [r["time"] for r in runs],
            "peak": max(r["peak"] for r in runs), "base": min(r["base"] for r in runs)}
        for m, runs in results.items()
    }

    ref = "naive" if "naive" in results else next(iter(results))
    shapes = {m: [a.shape for a in out] for m, out in outputs.items()}
    if any(s != shapes[ref] for s in shapes.values()):
        raise SystemExit(f"the methods kept different numbers of directions: {shapes}")
    print(f"{'method':<10}{'time [s]':>10}{'speed-up':>10}{'peak RSS [MiB]':>16}"
          f"{'(build only)':>14}{'max rel diff':>14}   all times [s]")
    for method, r in results.items():
        diff = max(
            np.abs(a - b).max() / np.abs(b).max()
            for a, b in zip(outputs[method], outputs[ref])
        )
        print(f"{method:<10}{r['time']:>10.2f}{results[ref]['time'] / r['time']:>10.2f}"
              f"{r['peak'] / 2**20:>16.0f}{(r['peak'] - r['base']) / 2**20:>14.0f}"
              f"{diff:>14.1e}   " + ", ".join(f"{t:.1f}" for t in r["times"]))
    print("speed-up and max rel diff (edges and interaction strengths) are relative to "
          f"{ref!r}; 'build only' is the peak minus the RSS after model and data were built.")


if __name__ == "__main__":
    main()
