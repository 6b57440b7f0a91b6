"""The main job: the local interaction basis of a trained network beside PCA, end to end.

``python -m sklearn_lib`` (or the ``sklearn-lib-demo`` console script) loads the
modular-addition network the package ships (:mod:`sklearn_lib.datasets`),
caches its activations and Jacobians on disk
(:class:`~sklearn_lib.cache.ActivationCache`), builds the interaction graph
from the cache, builds the same graph with PCA bases, and compares the two:

* directions needed to keep accuracy (node ablation of each hidden layer),
* edges needed to keep accuracy (edge ablation of each layer pair, bisection),
* interaction sparsity (Gini coefficient of the edges),
* modularity of the Leiden modules of each graph,

printing a table and writing figures and the table to an output folder.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .cluster import ModularityClustering
from .collect import collect
from .datasets import LAYERS, load_modular_addition_model, modular_addition_data
from .evaluation import compare_node_ablation, directions_to_keep, min_edges_to_keep
from .graph import InteractionGraph
from .metrics import gini

METHODS = ("LIB", "PCA")


def _sections(model):
    """Per layer of LAYERS: the map to the next layer, and from it to the logits."""
    identity = torch.nn.Identity()
    section = [model.mlp[:2], model.mlp[2]]
    rest = [model.mlp, model.mlp[2], identity]
    return section, rest


def _log(verbose, *args):
    if verbose:
        print(*args, flush=True)


def run(output="sklearn_lib_demo", *, n_fit=2000, n_eval=1000, tolerance=0.001,
        resolution=1.0, overwrite=False, plots=True, verbose=True):
    """Run the demo and return the comparison as a dict of rows (one per method).

    Parameters
    ----------
    output : str or path, default="sklearn_lib_demo"
        Folder for the cache, the figures and ``comparison.json``. An existing
        folder is refused unless ``overwrite=True``.
    n_fit : int, default=2000
        Training pairs whose activations and Jacobians are cached and fitted.
    n_eval : int, default=1000
        Held-out pairs on which ablations are scored.
    tolerance : float, default=0.001
        Accuracy drop allowed by the ablations (the reference work's 0.1%).
    resolution : float, default=1.0
        Leiden resolution of the module search.
    overwrite : bool, default=False
        Replace an existing output folder.
    plots : bool, default=True
        Write figures (needs matplotlib).
    verbose : bool, default=True
        Print progress and the table.

    Returns
    -------
    dict of str to dict
        ``{"LIB": {...}, "PCA": {...}}`` with the figures of the table.
    """
    output = Path(output)
    if output.exists():
        if not overwrite:
            raise FileExistsError(
                f"{output} exists; pass --overwrite (overwrite=True) to replace it."
            )
        shutil.rmtree(output)
    output.mkdir(parents=True)
    start = time.perf_counter()

    model = load_modular_addition_model()
    X_train, X_test, _, y_test = modular_addition_data()
    rng = np.random.default_rng(0)
    X_fit = X_train[rng.permutation(len(X_train))[:n_fit]]
    eval_rows = rng.permutation(len(X_test))[:n_eval]
    X_eval, y_eval = X_test[eval_rows], y_test[eval_rows]
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(X_eval)).argmax(1).numpy() == y_eval).mean())
    _log(verbose, f"modular addition (p = {model.p}): held-out accuracy {accuracy:.4f}")

    _log(verbose, f"caching activations and Jacobians of {list(LAYERS)} "
                  f"for {len(X_fit)} pairs ...")
    activations, jacobians = collect(model, list(LAYERS), X_fit, cache=output / "cache.zarr",
                                     verbose=False)
    graphs = {
        "LIB": InteractionGraph().fit(activations, jacobians=jacobians),
        "PCA": InteractionGraph(basis="pca").fit(activations, jacobians=jacobians),
    }
    _log(verbose, "interaction graphs built in "
                  f"{time.perf_counter() - start:.1f} s; evaluating ...")

    eval_acts, _ = collect(model, list(LAYERS), X_eval, jacobians=False, verbose=False)
    section, rest = _sections(model)
    results, curves = {}, {}
    for name, graph in graphs.items():
        row = {"directions": [], "edges": []}
        for l in range(len(LAYERS) - 1):
            curve = compare_node_ablation({name: graph.bases_[l]}, eval_acts[l], y_eval,
                                          forward=rest[l])
            curves.setdefault(LAYERS[l], []).append(curve)
            row["directions"].append(directions_to_keep(curve, tolerance))
            kept = min_edges_to_keep(graph.bases_[l], graph.bases_[l + 1], eval_acts[l], y_eval,
                                     section=section[l], forward=rest[l + 1],
                                     edges=graph.edges_[l], tolerance=tolerance)
            row["edges"].append(kept.n_edges)
        row["gini"] = gini(np.concatenate([E.ravel() for E in graph.edges_]))
        modules = ModularityClustering(resolution=resolution, normalization="log",
                                       random_state=0).fit(graph)
        row["modularity"] = modules.modularity_
        row["n_modules"] = modules.n_clusters_
        row["n_directions_fitted"] = [b.n_components_ for b in graph.bases_]
        results[name] = row
        if plots:
            _plot_graph(graph, modules, name, output)

    if plots:
        _plot_curves(curves, graphs, output)
    (output / "comparison.json").write_text(json.dumps(results, indent=2))
    if verbose:
        print(format_table(results, tolerance))
        print(f"\nwrote {output}/ in {time.perf_counter() - start:.1f} s")
    return results


def format_table(results, tolerance):
    """The comparison as a fixed-width text table."""
    hidden = LAYERS[:-1]
    lines = [
        f"{'':<28}" + "".join(f"{m:>12}" for m in results),
        *(f"{'directions to keep ' + layer:<28}"
          + "".join(f"{str(r['directions'][i]):>12}" for r in results.values())
          for i, layer in enumerate(hidden)),
        *(f"{'edges to keep ' + a + '->' + b:<28}"
          + "".join(f"{r['edges'][i]:>12}" for r in results.values())
          for i, (a, b) in enumerate(zip(LAYERS[:-1], LAYERS[1:]))),
        f"{'edges to keep, total':<28}"
        + "".join(f"{sum(r['edges']):>12}" for r in results.values()),
        f"{'interaction sparsity (Gini)':<28}"
        + "".join(f"{r['gini']:>12.3f}" for r in results.values()),
        f"{'modularity Q (modules)':<28}"
        + "".join(f"{r['modularity']:>7.3f} ({r['n_modules']:>2})" for r in results.values()),
    ]
    return (f"\nwithin {tolerance:.1%} accuracy of the unablated network:\n"
            + "\n".join(lines))


def _plot_graph(graph, modules, name, output):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import plot_edges, plot_interaction_graph

    fig, ax = plt.subplots(figsize=(7, 5))
    plot_interaction_graph(graph.edges_, labels=modules.labels_, ax=ax)
    ax.set_title(f"{name} interaction graph, {modules.n_clusters_} modules")
    fig.savefig(output / f"graph_{name}.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(graph.edges_), figsize=(5 * len(graph.edges_), 4))
    for l, ax in enumerate(np.atleast_1d(axes)):
        plot_edges(graph.edges_[l], ax=ax)
        ax.set_title(f"{name} edges {LAYERS[l]} -> {LAYERS[l + 1]}")
    fig.tight_layout()
    fig.savefig(output / f"edges_{name}.png", dpi=120)
    plt.close(fig)


def _plot_curves(curves, graphs, output):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from .plotting import plot_ablation_curves, plot_spectrum

    fig, axes = plt.subplots(1, len(curves) + 1, figsize=(5 * (len(curves) + 1), 4))
    for ax, (layer, frames) in zip(axes, curves.items()):
        plot_ablation_curves(pd.concat(frames), ax=ax, logx=True, ylabel="accuracy")
        ax.set_title(f"node ablation of {layer}")
    l = len(LAYERS) - 2
    plot_spectrum({name: g.bases_[l] for name, g in graphs.items()}, ax=axes[-1])
    axes[-1].set_title(f"Lambda / variance spectrum of {LAYERS[l]}")
    fig.tight_layout()
    fig.savefig(output / "ablation.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    """Command-line entry point (``python -m sklearn_lib``)."""
    parser = argparse.ArgumentParser(
        prog="python -m sklearn_lib",
        description="Local interaction basis vs PCA on the shipped modular-addition network.",
    )
    parser.add_argument("--output", default="sklearn_lib_demo", help="output folder")
    parser.add_argument("--n-fit", type=int, default=2000, help="pairs to cache and fit")
    parser.add_argument("--n-eval", type=int, default=1000, help="held-out pairs to score")
    parser.add_argument("--tolerance", type=float, default=0.001,
                        help="allowed accuracy drop (default 0.001)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder")
    parser.add_argument("--no-plots", dest="plots", action="store_false")
    parser.add_argument("--quiet", dest="verbose", action="store_false")
    args = parser.parse_args(argv)
    run(args.output, n_fit=args.n_fit, n_eval=args.n_eval, tolerance=args.tolerance,
        overwrite=args.overwrite, plots=args.plots, verbose=args.verbose)
