"""Benchmark: the graph of a small conv net, channels as features against flattened layers.

The net (two 3x3 convolutions with 8 and 16 channels, global average pooling, a
linear readout) is trained for a few seconds on scikit-learn's 8x8 digits (shipped
with scikit-learn, no download). Its graph is built on the training images two ways,
each in a fresh subprocess, interleaved over ``--repeat`` rounds:

1. ``channels``: ``Layer("1", feature_axes=1)``, ``Layer("3", feature_axes=1)``
   and the logits: 8 and 16 features, the 64 and 16 pixels as positions;
2. ``flat``: the same modules by name, ``C x H x W`` flattened into one feature
   vector per image (512 and 256 features).

Each row reports the build time (min over rounds), the peak RSS of the build above
the RSS before it (``VmHWM`` after ``clear_refs``), the directions kept by the
"auto" truncation and how many of them carry 99% of ``Lambda`` per layer. Times
are within one run on a shared machine; their ratio is what counts.

Usage::

    python benchmarks/bench_cnn.py --repeat 2 --threads 1
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from _memory import peak as peak_rss
from _memory import reset_peak

N_TRAIN = 1400


def trained_net(threads):
    """The conv net after 400 full-batch AdamW steps, and the train/test images (float32)."""
    from sklearn_lib.datasets import train_digits_conv_net

    torch.set_num_threads(threads)
    net, images, labels = train_digits_conv_net(N_TRAIN)
    with torch.no_grad():
        accuracy = (net(images[N_TRAIN:]).argmax(1) == labels[N_TRAIN:]).float().mean()
    return net, images[:N_TRAIN], float(accuracy)


def layers(method):
    from sklearn_lib import Layer

    if method == "channels":
        return [Layer("1", feature_axes=1), Layer("3", feature_axes=1), "6"]
    return ["1", "3", "6"]


def worker(args):
    import warnings

    from sklearn_lib import InteractionGraph

    net, images, accuracy = trained_net(args.threads)
    base = reset_peak()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = InteractionGraph(verbose=False).fit_model(net, layers(args.worker), images)
    elapsed = time.perf_counter() - start
    peak = peak_rss()
    kept = [int(r) for r in graph.n_components_]
    share99 = []
    for basis in graph.bases_:
        lam = basis.interaction_strengths_
        share99.append(int(np.searchsorted(np.cumsum(lam) / lam.sum(), 0.99)) + 1)
    print(json.dumps({
        "time": elapsed, "peak": peak - base, "kept": kept, "share99": share99,
        "features": [b.n_features_in_ for b in graph.bases_], "accuracy": accuracy,
        "rows": [b.n_samples_seen_ for b in graph.bases_],
        "warnings": [str(w.message)[:60] for w in caught],
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=["channels", "flat"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    results = {"channels": [], "flat": []}
    for round_ in range(args.repeat):
        for method in results:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method,
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode:
                raise SystemExit(f"{method} failed:\n{proc.stderr}")
            results[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {method}: {results[method][-1]}", file=sys.stderr)
    first = results["channels"][0]
    print(f"held-out accuracy {first['accuracy']:.3f}, {N_TRAIN} training images, "
          f"{args.threads} torch thread(s)")
    print(f"{'layers':<10} {'features':<14} {'rows':<22} {'auto kept':<14} "
          f"{'99% of Lambda':<14} {'time [s]':>9} {'peak [MiB]':>11}")
    best = {}
    for method, runs in results.items():
        r = runs[0]
        best[method] = min(run["time"] for run in runs)
        peak = min(run["peak"] for run in runs) / 2**20
        print(f"{method:<10} {str(r['features']):<14} {str(r['rows']):<22} "
              f"{str(r['kept']):<14} {str(r['share99']):<14} {best[method]:>9.2f} {peak:>11.0f}")
    print(f"time ratio flat / channels: {best['flat'] / best['channels']:.2f}")


if __name__ == "__main__":
    main()
