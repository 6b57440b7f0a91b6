"""Benchmark: interaction graphs of a ReLU MLP, every path of the library against a naive one.

Rows (each in a fresh subprocess, interleaved over ``--repeat`` rounds):

1. ``naive``: a baseline written here that materialises every per-sample
   Jacobian with ``torch.func.vmap(torch.func.jacrev(...))`` and uses plain
   ``einsum`` and ``eigh`` (SPEC section 2 written out directly, the way the
   reference implementation computes);
2. ``fast``: ``InteractionGraph.from_model(...)`` with the closed form for
   ``Linear`` + ReLU sections (SPEC section 5);
3. ``generic``: ``from_model(..., fast_path=False)``, vectorised
   vector-Jacobian products ``C_{l+1}^T J_l`` batch by batch;
4. ``cached``: ``InteractionGraph().fit`` on the activations and Jacobians
   that ``collect`` returned (the collect itself is untimed);
5. ``collect``: making that cache in memory (``collect_zarr``: on disk).

All compute the same thing (edges at the data point, final layer unrotated);
the parent checks that they agree. After the model and data are built the RSS
high-water mark is reset (``echo 5 > /proc/self/clear_refs``), so the reported
peak (``VmHWM``) is the peak during the build. The fp64 GEMM rate is measured
in the same run, and each row's "GEMM share" is the GEMM flops of its
formulation (:func:`gemm_flops`) per second over that rate. ``--before PATH``
runs the library rows also from another checkout (``git archive`` of an older
commit), ``--busy`` also with a busy-loop process on the other core.

Usage::

    python benchmarks/bench_graph.py                  # n=2000, width 256, float64, CPU
    python benchmarks/bench_graph.py --threads 1 --repeat 3 --before /tmp/old-checkout
    python benchmarks/bench_graph.py --methods fast --busy --threads 2
    python benchmarks/bench_graph.py --methods fast --n 32000   # memory flat in n?
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
from _memory import peak as peak_rss
from _memory import reset_peak
from torch import nn

METHODS = ("naive", "fast", "generic", "cached", "collect")
ALL_METHODS = (*METHODS, "collect_zarr")
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
        truncation_threshold=THRESHOLD, verbose=False,
    )
    assert graph.fast_path_ == [fast_path] * (len(layers) - 1), graph.fast_path_
    return graph.edges_, [b.interaction_strengths_ for b in graph.bases_[:-1]]


def cached_setup(model, X, layers):
    """Untimed: the in-memory cache that ``cached`` fits on."""
    from sklearn_lib.collect import collect

    return collect(model, layers, X, verbose=False)


def cached_graph(acts, jacs):
    from sklearn_lib.graph import InteractionGraph

    graph = InteractionGraph(
        edge_point="data", truncation_threshold=THRESHOLD, verbose=False
    ).fit(acts, jacobians=jacs)
    return graph.edges_, [b.interaction_strengths_ for b in graph.bases_[:-1]]


def collect_arrays(model, X, layers, cache=None):
    """The cache itself; edges and strengths are then fitted untimed, for the check."""
    from sklearn_lib.collect import collect

    return collect(model, layers, X, verbose=False, cache=cache)


def gemm_rate(n, width, repeat=3):
    """fp64 GEMM GFLOP/s of a shape of the builds: (n * width / 4, width) @ (width, width).

    At most n = 2,000 rows of samples: the rate does not change beyond, the memory would.
    """
    rows = max(1, min(n, 2000) * width // 4)
    A = torch.randn(rows, width, dtype=torch.float64)
    B = torch.randn(width, width, dtype=torch.float64)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        A @ B
        best = min(best, time.perf_counter() - start)
    return 2 * rows * width * width / best / 1e9


# --------------------------------------------------------------------------- flop model
def gemm_flops(method, n, dims, ranks):
    """GEMM flops of each method's formulation (per section l: layer widths, kept ranks).

    ``k`` = directions kept in layer l+1 (its width if unrotated), ``r`` = in layer l.
    naive: d_{l+1} VJPs per sample, projection, scatter, edge Jacobians;
    generic: k VJPs twice (statistics and edges), scatter, edge projection;
    cached: the projection ``C^T J`` twice, scatter, edge projection;
    fast: ``S^T S`` and the edge GEMM ``A diag(s) B``.
    """
    total = 0
    for l in range(len(dims) - 1):
        d0, d1, r, k = dims[l], dims[l + 1], ranks[l], ranks[l + 1]
        if method == "naive":
            total += 2 * n * (d1 * d1 * d0 + d1 * k * d0 + k * d0 * d0 + k * d0 * r)
        elif method == "generic":
            total += 2 * n * (2 * k * d1 * d0 + k * d0 * d0 + k * d0 * r)
        elif method == "cached":
            total += 2 * n * (2 * k * d1 * d0 + k * d0 * d0 + k * d0 * r)
        elif method == "fast":
            total += 2 * n * (d1 * d1 + k * d1 * r)
        else:
            return None
    return total


# --------------------------------------------------------------------------- worker
def _fit_collected(acts, jacs):
    acts = [a[:] for a in acts]
    jacs = [j[:] for j in jacs]
    return cached_graph(acts, jacs)


def worker(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    model, X, layers = build_model_and_data(args.n, args.width, args.d_in, args.d_out)
    if args.worker == "gemm":
        print(json.dumps({"rate": gemm_rate(args.n, args.width)}))
        return
    state = {}
    if args.worker == "cached":
        state["acts"], state["jacs"] = cached_setup(model, X, layers)
    tmp = tempfile.mkdtemp()
    run = {
        "naive": lambda: naive_graph(model, X, layers),
        "generic": lambda: library_graph(model, X, layers, fast_path=False),
        "fast": lambda: library_graph(model, X, layers, fast_path=True),
        "cached": lambda: cached_graph(state.pop("acts"), state.pop("jacs")),
        "collect": lambda: collect_arrays(model, X, layers),
        "collect_zarr": lambda: collect_arrays(model, X, layers,
                                               os.path.join(tmp, "cache.zarr")),
    }[args.worker]
    if args.worker != "naive":
        import sklearn_lib.graph  # noqa: F401  (import time is not build time)
    busy = None
    if args.busy:
        # The other core busy: a process that spins for the whole build.
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        base = reset_peak()
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
        peak = peak_rss()
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if args.worker.startswith("collect"):
        # The check: the graph fitted (untimed) on what was collected.
        result = _fit_collected(*result)
    edges, strengths = result
    np.savez(args.out, *edges, *strengths)
    print(json.dumps({"time": elapsed, "peak": peak, "base": base}))


# --------------------------------------------------------------------------- parent
def _run_worker(args, method, variant, out):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method,
           "--out", out, "--n", str(args.n), "--width", str(args.width),
           "--d-in", str(args.d_in), "--d-out", str(args.d_out),
           "--threads", str(args.threads)]
    env = dict(os.environ)
    if variant == "before":
        env["PYTHONPATH"] = args.before
    elif variant != "busy-before":
        env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if variant.startswith("busy"):
        cmd.append("--busy")
        if variant == "busy-before":
            env["PYTHONPATH"] = args.before
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        print(proc.stdout, proc.stderr, sep="\n")
        raise SystemExit(f"{method} ({variant}) failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-out", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every worker (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds; each runs every method once in a fresh process")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--before", metavar="PATH",
                        help="also run the library methods from another checkout (e.g. "
                             "the last release) in the same rounds, for before/after ratios")
    parser.add_argument("--busy", action="store_true",
                        help="also run the library methods with the other core busy")
    parser.add_argument("--worker", choices=[*ALL_METHODS, "gemm"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    threads = args.threads or torch.get_num_threads()
    print(f"InteractionGraph build: ReLU MLP {args.d_in}-{args.width}x3-{args.d_out}, "
          f"n={args.n}, float64, CPU, torch threads={threads}, "
          f"best of {args.repeat} interleaved rounds")
    methods = args.methods.split(",")
    rows = [(m, "after") for m in methods]
    library = [m for m in methods if m != "naive"]
    if args.before:
        rows += [(m, "before") for m in library]
    if args.busy:
        rows += [(m, "busy") for m in library if m in ("fast", "generic")]
        if args.before:
            rows += [(m, "busy-before") for m in library if m in ("fast", "generic")]
    results, outputs, rates = {row: [] for row in rows}, {}, []
    # Rounds interleave the methods, one fresh process each, so that a change
    # in machine load affects all methods alike; the best time of the rounds
    # and the largest peak are reported.
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            rates.append(_run_worker(args, "gemm", "after", os.devnull)["rate"])
            for method, variant in rows:
                out = os.path.join(tmp, f"{method}-{variant}.npz")
                run = _run_worker(args, method, variant, out)
                results[(method, variant)].append(run)
                # Progress on stderr, so that a long run can be followed.
                print(f"  {method} ({variant}): {run['time']:.2f} s, peak "
                      f"{run['peak'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
                with np.load(out) as npz:
                    outputs[(method, variant)] = [npz[k] for k in npz.files]
    rate = max(rates)
    results = {
        row: {"time": min(r["time"] for r in runs), "times": [r["time"] for r in runs],
              "peak": max(r["peak"] for r in runs), "base": min(r["base"] for r in runs)}
        for row, runs in results.items()
    }
    ref = ("naive", "after") if ("naive", "after") in results else rows[0]
    shapes = {row: [a.shape for a in out] for row, out in outputs.items()}
    if any(s != shapes[ref] for s in shapes.values()):
        raise SystemExit(f"the methods kept different numbers of directions: {shapes}")
    n_sections = len(shapes[ref]) // 2
    ranks = [s[1] for s in shapes[ref][:n_sections]] + [args.d_out]
    dims = [args.d_in, args.width, args.width, args.width, args.d_out]
    print(f"fp64 GEMM rate measured in this run: {rate:.1f} GFLOP/s "
          f"(best of {len(rates)}: {', '.join(f'{r:.1f}' for r in rates)})")
    print(f"{'method':<14}{'code':<13}{'time [s]':>9}{'vs ' + ref[0]:>10}{'vs before':>11}"
          f"{'GEMM share':>11}{'peak [MiB]':>12}{'build only':>12}{'max rel diff':>14}"
          "   all times [s]")
    for (method, variant), r in results.items():
        diff = max(
            np.abs(a - b).max() / np.abs(b).max()
            for a, b in zip(outputs[(method, variant)], outputs[ref])
        )
        before = results.get((method, {"after": "before", "busy": "busy-before"}.get(variant)))
        vs_before = f"{before['time'] / r['time']:.2f}" if before else ""
        flops = gemm_flops(method, args.n, dims, ranks)
        share = f"{flops / r['time'] / 1e9 / rate:.2f}" if flops else "-"
        print(f"{method:<14}{variant:<13}{r['time']:>9.2f}"
              f"{results[ref]['time'] / r['time']:>10.2f}{vs_before:>11}{share:>11}"
              f"{r['peak'] / 2**20:>12.0f}{(r['peak'] - r['base']) / 2**20:>12.0f}"
              f"{diff:>14.1e}   " + ", ".join(f"{t:.1f}" for t in r["times"]))
    print(f"'vs {ref[0]}' and 'max rel diff' (edges and interaction strengths) are relative "
          f"to {ref[0]!r}; 'vs before' is the speed-up over the same method run from --before; "
          "'GEMM share' is the method's GEMM flops (gemm_flops) per second over the GEMM rate; "
          "'build only' is the peak RSS minus the RSS before the build (for 'cached', after "
          "the untimed collect it fits on). 'busy' rows run with a busy-loop process on the "
          "other core.")


if __name__ == "__main__":
    main()
