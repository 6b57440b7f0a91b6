"""Benchmark: the cost of ``fit_model(checkpoint=...)`` and what a resume or a refit saves.

Two models, each fitted four times in one process: without a checkpoint; with
one into a new directory (every pass written, plus the digest of the data and
the model); again with the complete checkpoint (every pass loaded, no products);
and with another ``n_components`` of the first layer (only the passes that
depend on it recomputed). Printed: the times, the checkpoint's overhead as a
ratio to the plain fit, and the checkpoint's own time (digests, saving, loading:
measured inside the fit, so it does not depend on the machine's load as the
ratio of two fits does), and the bytes written.

* ``mlp``: an MLP of ``--depth`` tanh layers of width ``--width`` on ``--n``
  samples, generic products (``fast_path=False``);
* ``gpt2``: a random GPT-2 block stack as ``bench_lm.py`` builds it
  (``--blocks``, ``--seqs`` x ``--positions`` tokens, ``stochastic_positions=1``,
  ``n_components=--k``), when ``transformers`` is installed.

Usage::

    python benchmarks/bench_checkpoint.py                   # about 1 minute on 2 cores
    python benchmarks/bench_checkpoint.py --skip-gpt2 --n 20000
"""

import argparse
import os
import sys
import tempfile
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

from sklearn_lib import InteractionGraph  # noqa: E402
from sklearn_lib.graph import _checkpoint  # noqa: E402


def _size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compare(name, fit, refit_params, folder):
    """Fit four times; print times and ratios."""
    digests = {"data": 0.0, "model": 0.0}
    originals = {k: getattr(_checkpoint, f"{k}_digest") for k in digests}

    def timed_digest(kind):
        def run(*args, **kwargs):
            out, t = _timed(lambda: originals[kind](*args, **kwargs))
            digests[kind] += t
            return out
        return run

    for kind in digests:
        setattr(_checkpoint, f"{kind}_digest", timed_digest(kind))
    # The checkpoint's own time in each pass: saving, loading and keys, not the pass.
    own = {"t": 0.0}
    run = _checkpoint.Checkpoint._run

    def timed_run(self, kind, layer, key, compute):
        inner = {"t": 0.0}

        def timed_compute():
            out, t = _timed(compute)
            inner["t"] += t
            return out

        out, t = _timed(lambda: run(self, kind, layer, key, timed_compute))
        own["t"] += t - inner["t"]
        return out

    _checkpoint.Checkpoint._run = timed_run
    # fit_model's preparation (graph/_model_fit.py) calls the digests by its own names.
    import sklearn_lib.graph._model_fit as fit_module
    saved = fit_module.data_digest, fit_module.model_digest
    fit_module.data_digest = _checkpoint.data_digest
    fit_module.model_digest = _checkpoint.model_digest
    try:
        path = os.path.join(folder, name)
        _, plain = _timed(lambda: fit({}, None))
        _, written = _timed(lambda: fit({}, path))
        digest_time, saving = sum(digests.values()), own["t"]
        own["t"] = 0.0
        _, resumed = _timed(lambda: fit({}, path))
        loading = own["t"]
        refit, refitted = _timed(lambda: fit(refit_params, path))
    finally:
        _checkpoint.Checkpoint._run = run
        for kind, original in originals.items():
            setattr(_checkpoint, f"{kind}_digest", original)
        fit_module.data_digest, fit_module.model_digest = saved
    computed = sum(e["status"] == "computed" for e in refit.checkpoint_log_)
    print(f"\n{name}: checkpoint of {_size(path) / 2**20:.2f} MiB")
    print(f"  plain fit                       {plain:8.2f} s")
    print(f"  with a new checkpoint           {written:8.2f} s   ratio {written / plain:.3f}"
          f"   (digests of data and model {digest_time:.3f} s, saving {saving:.3f} s:"
          f" {(digest_time + saving) / plain:.4f} of the plain fit)")
    print(f"  resumed, every pass saved       {resumed:8.2f} s   ratio {resumed / plain:.3f}"
          f"   (loading {loading:.3f} s; the rest: the source's probes and the bases)")
    print(f"  refit {refit_params}  {refitted:8.2f} s   ratio {refitted / plain:.3f}"
          f"   ({computed} of {len(refit.checkpoint_log_)} passes computed)")


def mlp(args, folder):
    torch.manual_seed(0)
    mods = []
    for _ in range(args.depth):
        mods += [torch.nn.Linear(args.width, args.width), torch.nn.Tanh()]
    net = torch.nn.Sequential(*mods).double()
    X = torch.randn(args.n, args.width, dtype=torch.float64)
    layers = [":input"] + [str(2 * i + 1) for i in range(args.depth)]

    def fit(params, checkpoint):
        return InteractionGraph(fast_path=False, **params).fit_model(
            net, layers, X, checkpoint=checkpoint)

    compare(f"mlp ({args.depth} x {args.width}, {args.n} samples)", fit,
            {"n_components": [8] + [None] * args.depth}, folder)


def gpt2(args, folder):
    from bench_lm import make_model

    model = make_model(args.blocks, args.positions, 1000, "cpu")
    tokens = torch.randint(0, 1000, (args.seqs, args.positions),
                           generator=torch.Generator().manual_seed(1))
    layers = ["transformer.h.0:input"] + [f"transformer.h.{i}" for i in range(args.blocks)]
    base = {"stochastic_positions": 1, "random_state": 0, "final_layer": "pca",
            "edge_point": "data"}

    def fit(params, checkpoint):
        params = {"n_components": args.k, **base, **params}
        return InteractionGraph(**params).fit_model(model, layers, tokens, sequence=True,
                                                    checkpoint=checkpoint)

    compare(f"gpt2 ({args.blocks} blocks, {args.seqs} x {args.positions} tokens, k {args.k})",
            fit, {"n_components": [args.k // 2] + [args.k] * args.blocks}, folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--seqs", type=int, default=2)
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--skip-gpt2", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        mlp(args, folder)
        if not args.skip_gpt2:
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("\ngpt2: skipped (transformers is not installed)")
            else:
                gpt2(args, folder)


if __name__ == "__main__":
    main()
