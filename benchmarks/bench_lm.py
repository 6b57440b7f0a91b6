"""Benchmark: LIB of a GPT-2-small-shaped language model (issue 22).

A randomly initialised GPT-2 (``transformers``, no download: d_model 768, 12 heads,
``--blocks`` blocks, ``--vocab`` tokens, float64) on random token sequences; the
graph over all residual-stream points (the input of block 0 and the output of
every block, no logits), ``sequence=True``, ``stochastic_positions=--m`` (0: exact
positions), final layer unrotated (with ``--n-components k``: PCA, so that every
layer keeps at most k directions). On a CUDA device when one is present
(``--device``), else on the CPU.

Printed, from one run: each section's statistics and edges passes in tokens per
second, the peak memory of the build (resident set on the CPU,
:mod:`_memory`; ``max_memory_allocated`` on CUDA), the float64 GEMM rate of the
same device measured in the same run, and each pass's share of it: the
useful floating-point work of ``m k`` vector-Jacobian products per sequence
(``m = P`` for exact positions), counted as one forward pass of a block
(``24 d^2 + 4 P d`` flops per token; a product with respect to the input costs
about as much), over the pass's time and the GEMM rate. Then the projection to
1,000,000 tokens of GPT-2 small (12 blocks, every layer keeping all 768
directions, ``--project-positions`` per sequence) by the issue's cost law
``T = 2 L n P m k c(P)``, ``c(P) = a + b P`` per token and product: on this
machine with ``a, b`` fitted to this run's sections, and on a GPU of
``--gpu-rate`` float64 FLOP/s at this run's GEMM share.

``--fit "L:n:P:k,..."`` builds several sizes in the same process and fits ``a``
and ``b`` to all their sections (least squares in relative terms, with the rms
relative error). ``--closed-form`` times the closed form of the GPT-2 MLP half
(``sklearn_lib.models._blocks``) outside the graph against the generic path on
the section from the residual stream after attention to the block's output,
both passes, in the same run, and checks that both give the same ``M'`` and
edges. ``--graph-blocks`` fits the graph over the block input, mid-block and
block-output points of ``--blocks`` blocks with ``fast_path="auto"`` (attention
and MLP halves in closed form), prints each pass's time, the top-50 error bars
of every layer and the projection to GPT-2 small (12 blocks) on 4 sequences
and on 1,000,000 tokens of ``--positions``; ``--generic`` builds it with
``fast_path=False`` too (products everywhere) in the same run and prints the
ratios.

Usage::

    python benchmarks/bench_lm.py --quick                 # < 1 minute on 2 CPU cores
    python benchmarks/bench_lm.py --blocks 1 --n 2 --positions 64 --n-components 64
    python benchmarks/bench_lm.py --fit 1:2:32:64,1:1:128:64,1:1:256:32 --threads 1
    python benchmarks/bench_lm.py --closed-form --n 2 --positions 16 --skip-graph
    python benchmarks/bench_lm.py --graph-blocks --blocks 1 --n 2 --positions 16 \\
        --n-components 64 --skip-graph --generic
    python benchmarks/bench_lm.py --graph-blocks --blocks 1 --n 1 --positions 1024 --skip-graph
"""

import argparse
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This checkout's package (not whichever is installed), and _memory beside this file.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

from _memory import peak as peak_rss
from _memory import reset_peak

from sklearn_lib import InteractionGraph
from sklearn_lib.collect import record_activations
from sklearn_lib.models._block_detect import detect_block
from sklearn_lib.models._blocks import accumulator
from sklearn_lib.sources._edges import Workspace, accumulate_edges
from sklearn_lib.sources._model_source import ModelSource

D_MODEL, N_HEADS = 768, 12
TOKENS = 1_000_000
#: Directions whose error bars are reported.
TOP = 50
#: An H100 SXM's float64 tensor-core peak (NVIDIA's data sheet), FLOP/s.
H100_FP64 = 67e12


def gemm_rate(device, size=2048, repeat=10):
    a, b = (torch.randn(size, size, dtype=torch.float64, device=device) for _ in range(2))
    a @ b
    best = min(_timed(lambda: a @ b, device) for _ in range(repeat))
    return 2 * size**3 / best


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def block_flops(P, d=D_MODEL):
    """Forward flops per token of a GPT-2 block: projections 24 d^2, attention 4 P d."""
    return 24 * d * d + 4 * P * d


def make_model(blocks, positions, vocab, device, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=blocks, n_embd=D_MODEL, n_head=N_HEADS, vocab_size=vocab,
                        n_positions=max(positions, 8), resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).double().eval().to(device)


def instrumented(times, device):
    """Wrap the source's passes so each call's time lands in ``times[(stage, l)]``."""
    originals = {}
    for method, stage in (("activation_stats", "statistics"),
                          ("jacobian_stats", "statistics"), ("edges", "edges")):
        original = getattr(ModelSource, method)
        originals[method] = original

        def wrapped(self, l, *args, _original=original, _stage=stage, **kwargs):
            _sync(device)
            start = time.perf_counter()
            try:
                return _original(self, l, *args, **kwargs)
            finally:
                _sync(device)
                times[_stage, l] += time.perf_counter() - start

        setattr(ModelSource, method, wrapped)
    return originals


def _reset_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return reset_peak()


def _peak_memory(device, base):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss() - base


def build(blocks, n, positions, vocab, m, k, device, layers=None, fast_path="auto"):
    """One graph build; per-pass times, kept directions, peak memory and the graph."""
    model = make_model(blocks, positions, vocab, device)
    tokens = torch.randint(0, vocab, (n, positions), generator=torch.Generator().manual_seed(1))
    layers = layers or ["transformer.h.0:input"] + [f"transformer.h.{i}" for i in range(blocks)]
    params = {"sequence": True, "stochastic_positions": m or None, "random_state": 0,
              "n_components": k, "final_layer": "identity" if k is None else "pca",
              "device": device, "fast_path": fast_path, "edge_point": "data"}
    times = defaultdict(float)
    base = _reset_memory(device)
    originals = instrumented(times, device)
    try:
        start = time.perf_counter()
        graph = InteractionGraph.from_model(model, layers, tokens, **params)
        _sync(device)
        total = time.perf_counter() - start
    finally:
        for method, original in originals.items():
            setattr(ModelSource, method, original)
    return {"times": dict(times), "total": total, "ks": graph.n_components_.tolist(),
            "peak": _peak_memory(device, base), "graph": graph, "model": model,
            "tokens": tokens, "n": n, "P": positions, "m": m or positions, "L": blocks}


def sections(run):
    """``(l, stats s, edges s, k of the section's output)`` for every block section."""
    return [(l, run["times"]["statistics", l], run["times"]["edges", l], run["ks"][l + 1])
            for l in range(run["L"])]


def report(run, rate):
    n, P, m = run["n"], run["P"], run["m"]
    tokens = n * P
    print(f"\n{run['L']} blocks, {n} x {P} tokens, stochastic_positions="
          f"{m if m != P else 'exact'}, directions per layer {run['ks']}")
    print(f"build {run['total']:.1f} s, peak memory {run['peak'] / 2**30:.2f} GiB")
    print(f"{'section':>12s} {'k':>5s} {'stats tok/s':>12s} {'edges tok/s':>12s} "
          f"{'GEMM share':>11s}")
    for l, ts, te, k in sections(run):
        useful = n * m * k * P * block_flops(P)
        print(f"{f'h.{l - 1} -> h.{l}' if l else 'in -> h.0':>12s} {k:5d} {tokens / ts:12.2f} "
              f"{tokens / te:12.2f} {2 * useful / (ts + te) / rate:11.1%}")
    final = run["times"].get(("statistics", run["L"]), 0.0)
    print(f"{'final layer':>12s} {'':5s} {tokens / max(final, 1e-9):12.0f}")


def per_product(runs):
    """Rows ``(P, seconds per token and product)`` of every section of ``runs``."""
    rows = []
    for run in runs:
        for _, ts, te, k in sections(run):
            rows.append((run["P"], (ts + te) / (2 * run["n"] * run["P"] * run["m"] * k)))
    return np.array(rows)


def fit_law(runs):
    """``(a, b, rms relative error)`` of ``c(P) = a + b P`` over all sections of ``runs``."""
    rows = per_product(runs)
    P, c = rows[:, 0], rows[:, 1]
    if len(np.unique(P)) < 2:
        a, b = float(c.mean()), 0.0
    else:
        # Relative least squares: each row divided by its own c.
        design = np.stack([np.ones_like(P), P], 1) / c[:, None]
        a, b = np.linalg.lstsq(design, np.ones_like(c), rcond=None)[0]
    rel = (a + b * P) / c - 1
    return float(a), float(b), float(np.sqrt(np.mean(rel**2))), rows


def project(a, b, share, gpu_rate, P, blocks=12, k=D_MODEL, m=1, tokens=TOKENS):
    n = tokens / P
    here = 2 * blocks * n * P * m * k * (a + b * P)
    flops = 2 * blocks * n * m * k * P * block_flops(P)
    return here, flops, flops / (gpu_rate * share)


def closed_form(args, device, rate):
    """Generic path against the GPT-2 MLP closed form on ``ln_2:input -> h.0``."""
    layers = ["transformer.h.0.ln_2:input", "transformer.h.0"]
    run = build(1, args.n, args.positions, args.vocab, args.m, None, device, layers=layers)
    graph, model, tokens = run["graph"], run["model"], run["tokens"]
    ts, te = run["times"]["statistics", 0], run["times"]["edges", 0]
    match = detect_block(model.transformer.h[0])
    assert match.input == "ln_2:input", match
    # The generic section from ln_2:input is the total derivative, x + mlp(ln_2(x)),
    # residual identity included, like the closed form.
    section = match.section

    def rows():
        acts = record_activations(model, [layers[0]], tokens, verbose=False)
        X = next(iter(acts.values()))
        return torch.as_tensor(np.asarray(X), device=device).reshape(-1, D_MODEL)

    V = torch.eye(D_MODEL, dtype=torch.float64, device=device)  # the unrotated final layer
    result = {}

    def stats():
        X = rows()
        acc = accumulator(section, V)
        for chunk in X.split(256):
            acc.update(chunk)
        result["scatter"], result["n"] = acc.result(), X.shape[0]

    basis = graph.bases_[0]
    mean, C, C_pinv = (torch.as_tensor(a, device=device) for a in (
        basis.mean_, basis.components_.T, basis.inverse_components_))

    def edges():
        X = rows()
        factors = section.edge_factors(V, C_pinv.T)
        E, ws = torch.zeros(D_MODEL, C.shape[1], dtype=torch.float64, device=device), Workspace()
        for chunk in X.split(8):
            J = section.edge_jacobians(section.derivative(chunk), factors, ws)
            accumulate_edges(E, J, (chunk - mean) @ C)
        result["edges"] = E / X.shape[0]

    t_stats = min(_timed(stats, device) for _ in range(args.repeat))
    t_edges = min(_timed(edges, device) for _ in range(args.repeat))
    M = torch.as_tensor(basis.jacobian_gram_, device=device)
    err_m = float((result["scatter"] / result["n"] - M).norm() / M.norm())
    E_ref = torch.as_tensor(graph.edges_[0], device=device)
    if args.m:
        # Random combinations of output positions make the generic edges an unbiased
        # estimate (exact for M' of a row-wise section): compare the totals.
        err_e = float(abs(result["edges"].sum() - E_ref.sum()) / E_ref.sum())
        edges_note = "total edge weight relative difference (generic: a stochastic estimate)"
    else:
        err_e = float((result["edges"] - E_ref).abs().max() / E_ref.abs().max())
        edges_note = "edges largest relative difference"
    tokens_n = args.n * args.positions
    k = D_MODEL
    print(f"\nGPT-2 MLP half (ln_2:input -> h.0), d = {D_MODEL}, d_mlp = {4 * D_MODEL}, "
          f"k = {k}, {args.n} x {args.positions} tokens, generic stochastic_positions="
          f"{args.m or 'exact'}")
    print(f"{'pass':>11s} {'generic [s]':>12s} {'closed [s]':>11s} {'speed-up':>9s} "
          f"{'closed tok/s':>13s} {'closed GEMM share':>18s}")
    d, d_s = D_MODEL, 4 * D_MODEL
    # Per token: the hidden layer, S^T S, w K and the d x d_s sums; edges: one GEMM
    # (k, d_s) x (d_s, r) with r the input layer's directions.
    flops = {"statistics": tokens_n * (2 * d * d_s + 4 * d_s * d_s + 6 * d * d_s),
             "edges": tokens_n * 2 * k * d_s * C.shape[1]}
    for name, gen, closed in (("statistics", ts, t_stats), ("edges", te, t_edges)):
        print(f"{name:>11s} {gen:12.2f} {closed:11.3f} {gen / closed:8.1f}x "
              f"{tokens_n / closed:13.1f} {flops[name] / closed / rate:18.1%}")
    print(f"closed form vs generic: M' relative Frobenius difference {err_m:.1e}, "
          f"{edges_note} {err_e:.1e}")


def graph_blocks(args, device, rate):
    """The graph over mid-block and block-output points: every section in closed form.

    Layers are the block input ``h.0:input``, then per block the residual stream
    after attention (``h.i.ln_2:input``) and after the block (``h.i``): the
    attention halves and the MLP halves of GPT-2 both take closed forms with
    ``fast_path="auto"``. With ``--generic`` the same graph is built with
    ``fast_path=False`` (vector-Jacobian products everywhere) in interleaved
    rounds, on the same model and tokens, and the ratios are printed. The
    projection scales the measured time per block linearly in blocks and
    sequences (sections cost the same per sequence of a given length; the
    attention's ``P^2`` terms make it valid only at the measured length).
    """
    layers = ["transformer.h.0:input"] + [f"transformer.h.{i}{end}" for i in range(args.blocks)
                                          for end in (".ln_2:input", "")]
    paths = (False, "auto") if args.generic else ("auto",)
    runs = {}
    # Interleaved rounds, each pass's minimum kept: a shared machine's load moves.
    for _ in range(args.repeat):
        for fast_path in paths:
            run = build(args.blocks, args.n, args.positions, args.vocab, args.m,
                        args.n_components, device, layers=layers, fast_path=fast_path)
            best = runs.setdefault(fast_path, run)
            best["times"] = {key: min(t, best["times"][key]) for key, t in run["times"].items()}
            best["total"] = min(best["total"], run["total"])
    auto = runs["auto"]
    # Every section takes a closed form: the attention halves (block input -> ln_2:input)
    # and the MLP halves (ln_2:input -> block output).
    assert all(auto["graph"].fast_path_), auto["graph"].fast_path_
    tokens = args.n * args.positions
    print(f"\nGraph over {len(layers)} points of {args.blocks} GPT-2 block(s) (block input, "
          f"mid-block, block output), {args.n} x {args.positions} tokens, "
          f"stochastic_positions={args.m or 'exact'}, directions per layer {auto['ks']}")
    generic = runs.get(False)
    print(f"{'section':>26s} {'pass':>11s} {'auto [s]':>9s} {'tok/s':>8s}"
          + (f" {'generic [s]':>12s} {'generic/auto':>13s}" if generic else ""))
    for l in range(len(layers)):
        name = (f"{layers[l].split('.', 1)[1]} -> {layers[l + 1].split('.', 1)[1]}"
                if l + 1 < len(layers) else "final layer")
        for stage in ("statistics", "edges"):
            ta = auto["times"].get((stage, l))
            if ta is None:
                continue
            line = f"{name:>26s} {stage:>11s} {ta:9.2f} {tokens / ta:8.1f}"
            tg = generic["times"].get((stage, l)) if generic else None
            if tg is not None:
                line += f" {tg:12.2f} {tg / ta:12.1f}x"
            print(line)
    print(f"{'whole build':>26s} {'':>11s} {auto['total']:9.2f} {tokens / auto['total']:8.1f}"
          + (f" {generic['total']:12.2f} {generic['total'] / auto['total']:12.1f}x"
             if generic else ""))
    print(f"peak memory: auto {auto['peak'] / 2**30:.2f} GiB"
          + (f", generic {generic['peak'] / 2**30:.2f} GiB" if generic else ""))
    _error_bars(auto["graph"], layers)
    if generic:
        gram = max(float(np.abs(a.jacobian_gram_ - b.jacobian_gram_).max()
                         / np.abs(b.jacobian_gram_).max())
                   for a, b in zip(auto["graph"].bases_, generic["graph"].bases_))
        edges = max(float(np.abs(a - b).max() / np.abs(b).max())
                    for a, b in zip(auto["graph"].edges_, generic["graph"].edges_))
        note = " (both stochastic estimates, with the same signs)" if args.m else ""
        print(f"auto vs generic: M' largest relative difference {gram:.1e}, edges {edges:.1e}"
              f"{note}")
    block = sum(t for (stage, l), t in auto["times"].items() if l < len(layers) - 1)
    block /= args.blocks
    n_target = {"4 sequences": 4, "1,000,000 tokens": TOKENS / args.positions}
    for label, n_seq in n_target.items():
        here = block * 12 * n_seq / args.n
        print(f"projected, GPT-2 small (12 blocks, 25 points), {label} of {args.positions}: "
              f"{here / 3600:.2f} h on this machine ({block / args.n:.1f} s per block and "
              f"sequence, GEMM rate {rate / 1e9:.0f} GFLOP/s); at {args.gpu_rate / 1e12:.0f} "
              f"TFLOP/s and this machine's share of its GEMM rate: "
              f"{here * rate / args.gpu_rate / 3600:.3f} h")


def _error_bars(graph, layers):
    """Relative error bars of the top-50 interaction strengths of every layer fitted with Jacobians."""
    print(f"{'layer':>26s} {'top-50 std/Lambda: median':>26s} {'max':>7s}")
    for name, basis in zip(layers, graph.bases_):
        std = getattr(basis, "interaction_strengths_std_", None)
        if std is None:
            continue
        lam = basis.interaction_strengths_[:TOP]
        rel = np.asarray(std[:TOP]) / lam
        if np.isnan(rel).all():
            print(f"{name.split('.', 1)[1]:>26s} {'n/a (one combination: no spread)':>34s}")
            continue
        print(f"{name.split('.', 1)[1]:>26s} {np.median(rel):26.2%} {np.max(rel):7.2%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--n", type=int, default=4, help="sequences")
    parser.add_argument("--positions", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--m", type=int, default=1, help="stochastic_positions (0: exact)")
    parser.add_argument("--n-components", type=int, default=None,
                        help="directions kept per layer (default: all, final unrotated)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--gpu-rate", type=float, default=H100_FP64,
                        help="float64 FLOP/s of the GPU projected to (default: H100 SXM)")
    parser.add_argument("--project-positions", type=int, default=1024)
    parser.add_argument("--fit", default=None, help="sizes L:n:P:k,... fitted together")
    parser.add_argument("--closed-form", action="store_true",
                        help="also time the GPT-2 MLP closed form against the generic path")
    parser.add_argument("--graph-blocks", action="store_true",
                        help="fit the graph over the block input, mid-block and block-output "
                             "points, every section in closed form, and project its time")
    parser.add_argument("--generic", action="store_true",
                        help="with --graph-blocks: also build it with fast_path=False")
    parser.add_argument("--skip-graph", action="store_true", help="no graph build of the size")
    parser.add_argument("--repeat", type=int, default=1,
                        help="closed-form and --graph-blocks rounds (minimum)")
    parser.add_argument("--quick", action="store_true",
                        help="1 block, 2 x 16 tokens, k = 32; closed form on 2 x 2 tokens, exact positions")
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.n, args.positions, args.n_components = 1, 2, 16, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # The first torch.func call imports torch._dynamo (seconds): not part of any build.
    torch.func.vjp(torch.sin, torch.zeros(1, device=device))
    rate = gemm_rate(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, float64, {torch.get_num_threads()} threads; GEMM rate "
          f"{rate / 1e9:.1f} GFLOP/s")
    runs = []
    if args.fit:
        for size in args.fit.split(","):
            L, n, P, k = (int(v) for v in size.split(":"))
            runs.append(build(L, n, P, args.vocab, args.m, k, device))
            report(runs[-1], rate)
    if not args.skip_graph:
        runs.append(build(args.blocks, args.n, args.positions, args.vocab, args.m,
                          args.n_components, device))
        report(runs[-1], rate)
    if runs:
        a, b, err, rows = fit_law(runs)
        useful = sum(2 * r["n"] * r["m"] * k * r["P"] * block_flops(r["P"])
                     for r in runs for _, _, _, k in sections(r))
        spent = sum(ts + te for r in runs for _, ts, te, _ in sections(r))
        share = useful / spent / rate
        print(f"\ncost law c(P) = a + b P per token and product, fitted to {len(rows)} "
              f"sections: a = {a * 1e3:.3f} ms, b = {b * 1e6:.3f} us, rms relative error "
              f"{err:.0%}; GEMM share {share:.1%}")
        if len(np.unique(rows[:, 0])) < 2:
            print("(one length only: c(P) taken constant, and at small k the per-pass "
                  "overheads dominate it; --fit with several lengths gives the law)")
        P = args.project_positions
        for label, n_tok in (("4 sequences", 4 * P), ("1,000,000 tokens", TOKENS)):
            here, flops, gpu = project(a, b, share, args.gpu_rate, P, tokens=n_tok)
            print(f"GPT-2 small (12 blocks, k = 768, m = 1), {label} of {P}: "
                  f"{here / 3600:.1f} h here ({here / 86400:.1f} days), "
                  f"{flops / 1e15:.1f} PFLOP useful, {gpu / 3600:.2f} h at "
                  f"{args.gpu_rate / 1e12:.0f} TFLOP/s and a {share:.1%} share")
    if args.graph_blocks:
        graph_blocks(args, device, rate)
    if args.closed_form:
        if args.quick:
            args.n, args.positions, args.m = 2, 2, 0
        closed_form(args, device, rate)
    # The machine may be shared: a rate that moved says the shares above are rough.
    print(f"\nGEMM rate at the end {gemm_rate(device) / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
