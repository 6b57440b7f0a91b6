"""Benchmark: an interaction graph that ends at a vocabulary's logits (issue 22).

A randomly initialised GPT-2 (``transformers``, no download; ``--blocks`` blocks,
``--d-model``, float64) on ``--n`` random sequences of ``--positions`` tokens; the graph
over ``transformer.h.{last}`` (the last block's output), ``transformer.ln_f`` and
``lm_head`` (the logits, ``V`` features), ``sequence=True``, final layer unrotated
(``identity``) or, with ``--final pca``, a PCA keeping ``--n-components`` directions.
The section ``ln_f -> lm_head`` is a linear readout in closed form.

Each (code, V) build runs in a fresh process, so that the peak resident memory
(:mod:`_memory`, the build only, imports and model excluded) is its own. ``--before
PATH`` adds builds with the package at ``PATH`` (a checkout of the code before this
change, e.g. ``/work/main``) for the vocabularies in ``--before-vocab``: there the
readout's closed form holds ``V x V`` matrices and a ``rows x V x V`` buffer, and the
final layer's statistics a ``V x V`` Gram, so it is run only where that fits.

Usage::

    python benchmarks/bench_vocab.py                              # after only: 4,000 .. 50,257
    python benchmarks/bench_vocab.py --before /work/main --before-vocab 4000
    python benchmarks/bench_vocab.py --final pca --n-components 64 --vocab 50257
"""

import argparse
import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _child(args):
    """One build in this process with the package at ``args.code``; prints a JSON line."""
    sys.path[:0] = [args.code, _HERE]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from _memory import peak, reset_peak
    from transformers import GPT2Config, GPT2LMHeadModel

    import sklearn_lib
    from sklearn_lib import InteractionGraph

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = args.vocab[0]
    config = GPT2Config(n_layer=args.blocks, n_embd=args.d_model, n_head=args.heads,
                        vocab_size=vocab, n_positions=max(args.positions, 8),
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config).double().eval()
    tokens = torch.randint(0, vocab, (args.n, args.positions),
                           generator=torch.Generator().manual_seed(1))
    layers = [f"transformer.h.{args.blocks - 1}", "transformer.ln_f", "lm_head"]
    params = {"random_state": 0, "verbose": False, "edge_point": "data",
              "final_layer": args.final}
    if args.final == "pca":
        params["n_components"] = [None, None, args.n_components]
    base = reset_peak()
    start = time.perf_counter()
    graph = InteractionGraph(**params).fit_model(model, layers, tokens, sequence=True)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "code": os.path.dirname(os.path.abspath(sklearn_lib.__file__)),
        "vocab": vocab, "seconds": seconds, "peak_gib": (peak() - base) / 2**30,
        "ks": graph.n_components_.tolist(), "edges": [list(E.shape) for E in graph.edges_],
        "fast_path": list(graph.fast_path_),
    }))


def _run(args, code, vocab):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--code", code,
           "--vocab", str(vocab)]
    for name in ("blocks", "d_model", "heads", "n", "positions", "threads", "final",
                 "n_components"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"vocab": vocab, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[4000, 8000, 50257])
    parser.add_argument("--before", default=None, help="package root of the code before")
    parser.add_argument("--before-vocab", type=int, nargs="+", default=[4000])
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--final", choices=["identity", "pca"], default="identity")
    parser.add_argument("--n-components", type=int, default=64)
    parser.add_argument("--code", default=_ROOT)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        return _child(args)
    print(f"GPT-2 config, {args.blocks} block(s), d_model {args.d_model}, {args.n} x "
          f"{args.positions} tokens, float64, {args.threads} threads, final_layer="
          f"{args.final!r}" + (f", n_components {args.n_components}" if args.final == "pca"
                               else "") + "; layers h.last, ln_f, lm_head")
    runs = [("before", args.before, v) for v in (args.before_vocab if args.before else [])]
    runs += [("after", _ROOT, v) for v in args.vocab]
    results = {}
    print(f"{'code':>7s} {'V':>7s} {'build s':>9s} {'peak GiB':>9s}  kept directions")
    for label, code, vocab in runs:
        r = _run(args, code, vocab)
        results[label, vocab] = r
        if "error" in r:
            print(f"{label:>7s} {vocab:7d}  failed: {r['error']}")
        else:
            print(f"{label:>7s} {vocab:7d} {r['seconds']:9.1f} {r['peak_gib']:9.2f}  {r['ks']}",
                  flush=True)
    for vocab in args.vocab:
        before, after = results.get(("before", vocab)), results.get(("after", vocab))
        if before and after and "error" not in before and "error" not in after:
            print(f"V = {vocab}: after/before time {after['seconds'] / before['seconds']:.3f}, "
                  f"peak memory {after['peak_gib'] / before['peak_gib']:.3f}")


if __name__ == "__main__":
    main()
