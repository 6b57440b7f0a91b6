"""Peak memory and time of the generic products of a GPT-2 block, before and after streaming.

A GPT-2-shaped block (random init, d_model 768, 12 heads, float64, one
thread per core here) as the section ``transformer.h.0:input ->
transformer.h.0``, taken generically (``fast_path=False``), with one stochastic
source over positions (``stochastic_positions=1``: ``k`` product vectors per
sample, the issue's configuration). For every ``(P, k)``, one statistics pass
(``jacobian_stats``) and one edges pass over ``--samples`` sequences of ``P``
tokens run each in a fresh process, which reports its peak resident memory
(``benchmarks/_memory.py``) and time:

- ``before``: the library at ``--before`` (default: the commit this work
  started from), which holds all ``k`` products of a batch (``k x P x d`` per
  sample), unpacked with ``git archive`` into a temporary folder;
- ``after``: this checkout, products streamed in chunks sized to the default
  budget, or to ``--memory-limit``.

``before`` runs only where its estimated peak fits ``--max-before-gb`` (the
machine is shared). The last lines project GPT-2 small's target
(13 residual-stream layers, P = 1,024, k = 768) from the largest ``after``
point: the peak of a pass does not grow with the number of layers or samples.

Run: ``python benchmarks/bench_memory.py`` (about 10 minutes on 2 cores).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(args):
    """One measurement in this process: print a JSON line."""
    sys.path.insert(0, HERE)
    import torch
    import transformers
    from _memory import peak, reset_peak

    from sklearn_lib.basis._stats import InteractionStatistics
    from sklearn_lib.models._position_sources import PositionSources
    from sklearn_lib.sources._model_source import ModelSource

    torch.manual_seed(0)
    P, k, n, d = args.positions, args.k, args.samples, 768
    config = transformers.GPT2Config(n_layer=1, n_embd=d, n_head=12, vocab_size=1000,
                                     n_positions=P, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2Model(config).double().eval()
    tokens = torch.randint(0, 1000, (n, P), generator=torch.Generator().manual_seed(1))
    layers = ["h.0:input", "h.0"]
    kwargs = dict(sequence=True, batch_size=None, device=None, dtype="float64",
                  fast_path=False, verbose=False)
    if args.memory_limit is not None:
        kwargs["memory_limit"] = args.memory_limit
    source = ModelSource(model, layers, tokens, **kwargs)
    g = torch.Generator().manual_seed(2)
    V = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
    r = 64
    C = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    mean = torch.zeros(d, dtype=torch.float64)

    def new_stats(l, n_outputs):
        return InteractionStatistics(d, n_outputs, center=True, device=torch.device("cpu"),
                                     dtype=torch.float64)

    sources = PositionSources(1, 0, torch.device("cpu"))
    result = {"P": P, "k": k, "code": args.code}
    seen, calls = [], []  # chunks run; directions of every batch
    if args.max_chunks is not None:
        # Streamed products reach their peak in the first chunk: stop after a few and
        # scale the time by the chunks left out.
        from sklearn_lib.models._vjp import SectionProducts

        chunks = SectionProducts.chunks

        def first_chunks(self, max_vectors):
            stream = chunks(self, max_vectors)
            calls.append(self.n_vectors)
            for i in range(args.max_chunks):
                start = time.perf_counter()
                item = next(stream, None)
                if item is None:
                    return
                seen.append((len(item[1]), self.n_vectors, time.perf_counter() - start))
                yield item

        SectionProducts.chunks = first_chunks
    for name, run in [
        ("stats", lambda: source.jacobian_stats(0, V, new_stats, position_sources=sources)),
        ("edges", lambda: source.edges(0, V, mean, C, C.T, edge_point="data", alphas=[1.0],
                                       weights=[1.0], position_sources=sources)),
    ]:
        base = reset_peak()
        seen.clear()
        calls.clear()
        start = time.perf_counter()
        run()
        result[f"{name}_s"] = time.perf_counter() - start
        if seen:
            # The chunks left out, at the mean time of those run (the first includes
            # the forward pass: an overestimate).
            done, total = sum(c for c, _, _ in seen), sum(calls)
            result[f"{name}_s"] += sum(t for _, _, t in seen) * (total / done - 1)
            result["chunk"] = seen[0][0]
        result[f"{name}_peak_gb"] = peak() / 1e9
        result[f"{name}_growth_gb"] = (peak() - base) / 1e9
    print(json.dumps(result), flush=True)


def run_one(P, k, code, path, args):
    env = dict(os.environ, PYTHONPATH=path)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--positions", str(P),
           "--k", str(k), "--samples", str(args.samples), "--code", code]
    if code == "after" and args.memory_limit is not None:
        cmd += ["--memory-limit", args.memory_limit]
    if code == "after" and args.max_chunks is not None:
        cmd += ["--max-chunks", str(args.max_chunks)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"P": P, "k": k, "code": code, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def before_estimate_gb(P, k):
    """The old code's peak, from the issue's measurement (9.1 GB at P = 1,024, k = 15).

    It holds ``k`` products of ``P x 768`` numbers and the backward pass of a
    vmap chunk of ``min(k, 2**26 / (2 * 768 P))`` vectors, each about 600 MB
    at P = 1,024 and growing as ``P**2`` (attention).
    """
    chunk = min(k, 2**26 // (2 * 768 * P))
    return (k * P * 768 * 8 + chunk * 0.6e9 * (P / 1024) ** 2) / 1e9 + 0.5


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", default="after", help=argparse.SUPPRESS)
    parser.add_argument("--positions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--k", type=int, nargs="+", default=[64, 768])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--memory-limit", default=None)
    parser.add_argument("--max-chunks", type=int, default=None,
                        help="after: stop each pass after this many chunks and project "
                        "its time (the peak comes with the first chunk)")
    parser.add_argument("--before", default="36c2e64",
                        help="the library revision to compare with")
    parser.add_argument("--max-before-gb", type=float, default=8.0)
    args = parser.parse_args()
    if args.child:
        args.positions, args.k = args.positions[0], args.k[0]
        return child(args)
    rows = []
    with tempfile.TemporaryDirectory() as old:
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.before, "sklearn_lib"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
        print(f"GPT-2 block, d 768, 12 heads, float64, stochastic_positions=1, "
              f"{args.samples} samples, threads={os.cpu_count()}, "
              f"memory_limit={args.memory_limit}")
        header = (f"{'P':>5} {'k':>4} {'code':>6} {'stats s':>8} {'stats GB':>8} "
                  f"{'edges s':>8} {'edges GB':>8}")
        print(header)
        for P in args.positions:
            for k in args.k:
                for code, path in (("before", old), ("after", ROOT)):
                    if code == "before" and before_estimate_gb(P, k) > args.max_before_gb:
                        print(f"{P:>5} {k:>4} {code:>6}   skipped: about "
                              f"{before_estimate_gb(P, k):.0f} GB estimated")
                        continue
                    row = run_one(P, k, code, path, args)
                    rows.append(row)
                    if "error" in row:
                        print(f"{P:>5} {k:>4} {code:>6}   failed: {row['error']}")
                        continue
                    note = "" if "chunk" not in row else (
                        f"  chunks of {row['chunk']}, times projected")
                    print(f"{P:>5} {k:>4} {code:>6} {row['stats_s']:8.2f} "
                          f"{row['stats_peak_gb']:8.2f} {row['edges_s']:8.2f} "
                          f"{row['edges_peak_gb']:8.2f}{note}", flush=True)
    done = {(r["P"], r["k"], r["code"]): r for r in rows if "error" not in r}
    for P in args.positions:
        for k in args.k:
            b, a = done.get((P, k, "before")), done.get((P, k, "after"))
            if a and b:
                print(f"P={P} k={k}: after/before time stats {a['stats_s'] / b['stats_s']:.2f} "
                      f"edges {a['edges_s'] / b['edges_s']:.2f}; peak stats "
                      f"{a['stats_peak_gb'] / b['stats_peak_gb']:.2f} edges "
                      f"{a['edges_peak_gb'] / b['edges_peak_gb']:.2f}")
    largest = max((r for r in rows if r["code"] == "after" and "error" not in r),
                  key=lambda r: (r["P"], r["k"]), default=None)
    if largest is not None:
        scale = 1024 / largest["P"]
        print(f"GPT-2 small, 13 layers, P=1024, k=768: peak of a pass about "
              f"{max(largest['stats_peak_gb'], largest['edges_peak_gb']):.2f} GB measured at "
              f"P={largest['P']}, k={largest['k']} (chunks fill the same budget at any k; "
              f"GPT-2 small's 124M float64 weights add about 1.0 GB); before: "
              f"about {before_estimate_gb(1024, 768):.0f} GB estimated; time per sample "
              f"and section scales as k and about P**{1.3:.1f}: "
              f"{largest['stats_s'] / args.samples * (768 / largest['k']) * scale ** 1.3:.1f} s "
              "per statistics pass.")


if __name__ == "__main__":
    main()
