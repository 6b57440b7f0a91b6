"""The main job: the local interaction basis of a trained network beside PCA, end to end.

``python -m sklearn_lib`` (or the ``sklearn-lib-demo`` console script) runs, by
default (``--network transformer``), the reference work's headline comparison
on the one-layer modular-addition transformer the package ships
(:mod:`sklearn_lib.demo._transformer`): LIB and PCA graphs over its residual
stream, the directions and edges needed to keep accuracy per layer and in
total, the Fourier frequencies of the embedding-layer directions and timings.

``--network mlp`` loads the modular-addition MLP the package ships
(:mod:`sklearn_lib.datasets`), caches its activations and Jacobians on disk
(:class:`~sklearn_lib.cache.ActivationCache`), builds the interaction graph
from the cache, builds the same graph with PCA bases, and compares the two:

* directions needed to keep accuracy (node ablation of each hidden layer),
* edges needed to keep accuracy (edge ablation of each layer pair, bisection),
* interaction sparsity (Gini coefficient of the edges),
* modularity of the Leiden modules of each graph,

printing a table and writing figures and the table to an output folder, and
the degeneracy of each layer (:class:`~sklearn_lib.DegeneracyReport` of the
LIB graph, ``degeneracy.csv``) with the network's local learning coefficient
(:class:`~sklearn_lib.degeneracy.LocalLearningCoefficient`, ``llc.json`` and the
chains' loss traces ``llc_chains.png``).

The output folder is written next to its path and moved into place at the end
(:mod:`sklearn_lib.utils._atomic`), and it carries a marker file: only a folder with
that marker is ever replaced (``--overwrite``), and a second run without
``--overwrite`` keeps the first run's folder and writes ``<output>-2`` (then
``-3``, ...). Arguments are checked before any work.

``python -m sklearn_lib --model module:factory --layers ... --data inputs.npy`` prints
the MLP comparison's table for a user's model (:mod:`sklearn_lib.demo._user_model`).
"""

import argparse
import json
import math
import os
import shutil
import time
from itertools import count
from pathlib import Path

import numpy as np
import torch

from ..cluster._clustering import ModularityClustering
from ..datasets import LAYERS, load_modular_addition_model, modular_addition_data
from ..degeneracy._llc import LocalLearningCoefficient
from ..degeneracy._report import DegeneracyReport
from ..evaluation._curves import (
    compare_node_ablation,
    directions_to_keep,
    min_edges_to_keep,
)
from ..graph._graph import InteractionGraph
from ..metrics._sparsity import gini
from ..models._collect import collect
from ..utils._atomic import check_target, make_temp_dir, replace_dir, tidy
from . import _transformer as _demo_transformer

METHODS = ("LIB", "PCA")
NETWORKS = ("transformer", "mlp")
# Training pairs fitted by default: all of them for the transformer (its full-size
# run takes well under a minute), 2000 for the MLP.
_DEFAULT_N_FIT = {"transformer": 3831, "mlp": 2000}

# Proves that a folder was written by the demo, so that --overwrite may replace it.
_MARKER = ".sklearn_lib_demo.json"
_MARKER_CONTENT = {"format": "sklearn_lib.demo", "format_version": 1}
_WHAT = "sklearn_lib demo output folder"


def _check_argument(name, value):
    """``value`` if it is valid for the argument ``name`` of :func:`run`, else ValueError."""
    if name == "network":
        if value not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, got {value!r}.")
        return value
    if name in ("n_fit", "n_eval"):
        X_train, X_test, _, _ = modular_addition_data()
        available = len(X_train if name == "n_fit" else X_test)
        pairs = "training" if name == "n_fit" else "held-out"
        if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                or not 1 <= value <= available):
            raise ValueError(
                f"{name} must be an integer from 1 to {available} (the {pairs} pairs of "
                f"the shipped data), got {value!r}."
            )
        return int(value)
    valid = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if name == "tolerance" and not (valid and 0 <= value < 1):
        raise ValueError(
            f"tolerance must be an accuracy drop in [0, 1) (e.g. 0.001), got {value!r}."
        )
    if name == "resolution" and not (valid and 0 < value < math.inf):
        raise ValueError(f"resolution must be a positive finite number, got {value!r}.")
    return float(value)


def _parse(name, convert):
    """An argparse ``type`` that converts the text and checks it with :func:`_check_argument`."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            kind = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}.") from None
        try:
            return _check_argument(name, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{name} ")) from None

    return parse


def _is_demo_output(path):
    try:
        with open(os.path.join(path, _MARKER), encoding="utf-8") as f:
            return json.load(f).get("format") == _MARKER_CONTENT["format"]
    except (OSError, ValueError, AttributeError):
        return False


def _output_folder(output, overwrite):
    """The folder this run writes: ``output``, or its next free ``output-<k>``.

    ``output`` is replaced only with ``overwrite`` and only when the demo wrote
    it; without ``overwrite`` a folder of an earlier run is kept and the next
    free ``output-2``, ``output-3``, ... is used. Anything else is refused.
    """
    output = os.path.abspath(os.fspath(output))
    tidy(output, _is_demo_output, _WHAT)
    if overwrite or os.path.islink(output) or not _is_demo_output(output):
        check_target(output, overwrite, _is_demo_output, _WHAT)
        return Path(output)
    for k in count(2):
        candidate = f"{output}-{k}"
        if not os.path.lexists(candidate):
            return Path(candidate)


def _sections(model):
    """Per layer of LAYERS: the map to the next layer, and from it to the logits."""
    identity = torch.nn.Identity()
    section = [model.mlp[:2], model.mlp[2]]
    rest = [model.mlp, model.mlp[2], identity]
    return section, rest


def _log(verbose, *args):
    if verbose:
        print(*args, flush=True)


def run(output="sklearn_lib_demo", *, network="transformer", n_fit=None, n_eval=1000,
        tolerance=0.001, resolution=1.0, overwrite=False, plots=True, verbose=True):
    """Run the demo and return the comparison as a dict of rows (one per method).

    Parameters
    ----------
    output : str or path, default="sklearn_lib_demo"
        Folder for the cache, the figures and ``comparison.json``. If it holds
        the output of an earlier run, that is kept and ``<output>-2`` (or the
        next free ``-<k>``) is written instead, unless ``overwrite=True``. A
        folder the demo did not write is never replaced.
    network : {"transformer", "mlp"}, default="transformer"
        The shipped network compared: the one-layer transformer (directions
        and edges to keep, embedding frequencies, timings) or the MLP
        (directions and edges to keep, Gini, modularity, degeneracy).
    n_fit : int, default=None
        Training pairs whose activations and Jacobians are fitted (and, for
        the MLP, cached on disk), from 1 to the 3831 training pairs; None:
        all 3831 for the transformer, 2000 for the MLP.
    n_eval : int, default=1000
        Held-out pairs on which ablations are scored, from 1 to 8938.
    tolerance : float, default=0.001
        Accuracy drop allowed by the ablations (the reference work's 0.1%), in
        [0, 1).
    resolution : float, default=1.0
        Leiden resolution of the module search (MLP only), positive.
    overwrite : bool, default=False
        Replace ``output`` if an earlier run of the demo wrote it. The new
        folder replaces it only once complete.
    plots : bool, default=True
        Write figures (needs matplotlib).
    verbose : bool, default=True
        Print progress and the table.

    Returns
    -------
    dict of str to dict
        ``{"LIB": {...}, "PCA": {...}}`` with the figures of the table.

    Raises
    ------
    ValueError
        If an argument is out of range (before any work).
    FileExistsError
        If ``output`` exists and was not written by the demo, or is a symbolic
        link (before any work).
    """
    network = _check_argument("network", network)
    if n_fit is None:
        n_fit = _DEFAULT_N_FIT[network]
    n_fit, n_eval = _check_argument("n_fit", n_fit), _check_argument("n_eval", n_eval)
    tolerance = _check_argument("tolerance", tolerance)
    resolution = _check_argument("resolution", resolution)
    target = _output_folder(output, overwrite)
    start = time.perf_counter()
    tmp = Path(make_temp_dir(str(target), "sklearn_lib demo"))
    try:
        (tmp / _MARKER).write_text(json.dumps(_MARKER_CONTENT))
        results = _compare(tmp, network=network, n_fit=n_fit, n_eval=n_eval, tolerance=tolerance,
                           resolution=resolution, plots=plots, verbose=verbose)
        # Another run may have taken the folder meanwhile.
        check_target(str(target), overwrite, _is_demo_output, _WHAT)
        replace_dir(str(tmp), str(target))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        table = _demo_transformer.format_table if network == "transformer" else format_table
        print(table(results, tolerance))
        print(f"\nwrote {target}{os.sep} in {time.perf_counter() - start:.1f} s")
    return results


def _compare(output, *, network, n_fit, n_eval, tolerance, resolution, plots, verbose):
    """The work of :func:`run`, writing into the folder ``output``."""
    X_train, X_test, _, y_test = modular_addition_data()
    rng = np.random.default_rng(0)
    X_fit = X_train[rng.permutation(len(X_train))[:n_fit]]
    eval_rows = rng.permutation(len(X_test))[:n_eval]
    X_eval, y_eval = X_test[eval_rows], y_test[eval_rows]
    if network == "transformer":
        return _demo_transformer.compare(output, X_fit=X_fit, X_eval=X_eval, y_eval=y_eval,
                                         tolerance=tolerance, plots=plots, verbose=verbose)
    return _compare_mlp(output, X_fit=X_fit, X_eval=X_eval, y_eval=y_eval,
                        tolerance=tolerance, resolution=resolution, plots=plots,
                        verbose=verbose)


def _compare_mlp(output, *, X_fit, X_eval, y_eval, tolerance, resolution, plots, verbose):
    """The MLP comparison (with its degeneracy table), writing into ``output``."""
    start = time.perf_counter()
    model = load_modular_addition_model()
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
    _degeneracy(graphs["LIB"], model, X_fit, activations, jacobians, output, plots, verbose)

    eval_acts, _ = collect(model, list(LAYERS), X_eval, jacobians=False, verbose=False)
    section, rest = _sections(model)
    results, curves = {}, {}
    for name, graph in graphs.items():
        results[name], graph_curves, modules = _score_graph(
            name, graph, eval_acts, y_eval, section, rest, tolerance=tolerance,
            resolution=resolution)
        for layer, curve in zip(LAYERS, graph_curves):
            curves.setdefault(layer, []).append(curve)
        if plots:
            _plot_graph(graph, modules, name, output)

    if plots:
        _plot_curves(curves, graphs, output)
    (output / "comparison.json").write_text(json.dumps(results, indent=2))
    return results


def _score_graph(name, graph, acts, y, section, rest, *, tolerance, resolution,
                 batch_size=None):
    """One column of the table: what ``graph`` needs to stay within ``tolerance``.

    ``acts[l]`` are layer l's evaluation activations, ``section[l]`` maps layer l
    to l + 1 and ``rest[l]`` layer l to the output. Returns the row (directions
    and edges to keep per layer, Gini, modularity and modules, directions
    fitted), the node-ablation curve of every layer but the last, and the modules.
    """
    row, curves = {"directions": [], "edges": []}, []
    for l in range(len(graph.bases_) - 1):
        curve = compare_node_ablation({name: graph.bases_[l]}, acts[l], y, forward=rest[l],
                                      batch_size=batch_size)
        curves.append(curve)
        row["directions"].append(directions_to_keep(curve, tolerance))
        kept = min_edges_to_keep(graph.bases_[l], graph.bases_[l + 1], acts[l], y,
                                 section=section[l], forward=rest[l + 1],
                                 edges=graph.edges_[l], tolerance=tolerance,
                                 batch_size=batch_size)
        row["edges"].append(kept.n_edges)
    row["gini"] = gini(np.concatenate([E.ravel() for E in graph.edges_]))
    modules = ModularityClustering(resolution=resolution, normalization="log",
                                   random_state=0).fit(graph)
    row["modularity"] = modules.modularity_
    row["n_modules"] = modules.n_clusters_
    row["n_directions_fitted"] = [int(b.n_components_) for b in graph.bases_]
    return row, curves, modules


#: SGLD settings of the MLP's local learning coefficient: the loss traces level off
#: within the burn-in at this step (at 1e-5 and 3e-5 they still climb after 600
#: steps; 1e-3 gives about 12% more, the step's bias). See examples/plot_degeneracy.py.
LLC_SETTINGS = {"n_chains": 4, "n_draws": 600, "n_burnin": 200, "lr": 3e-4,
                "localization": 100.0, "batch_size": 512}


def _degeneracy(graph, model, X_fit, activations, jacobians, output, plots, verbose):
    """The per-layer degeneracy table of ``graph`` and the network's local learning
    coefficient: ``degeneracy.csv`` (needs pandas) and ``llc.json``."""
    start = time.perf_counter()
    with torch.no_grad():  # the pre-activations of the ReLU layer mlp.1
        z = model.mlp[0](model.embed(torch.from_numpy(X_fit)))
    report = DegeneracyReport().fit_graph(graph, preactivations={LAYERS.index("mlp.1"): z},
                                          X=activations, jacobians=jacobians)
    seconds = time.perf_counter() - start
    try:
        frame = report.to_frame().rename(index=dict(zip(report.layer_names_, LAYERS)))
    except ImportError as error:
        _log(verbose, f"degeneracy table skipped: {error}")
    else:
        frame.to_csv(output / "degeneracy.csv")
        _log(verbose, f"degeneracy per layer (DegeneracyReport, {seconds:.0f} s):\n"
                      + frame.T.to_string())
    start = time.perf_counter()
    X_train, _, y_train, _ = modular_addition_data(model.p)
    llc = LocalLearningCoefficient(**LLC_SETTINGS, random_state=0).fit_model(
        model, X_train, y_train)
    seconds = time.perf_counter() - start
    (output / "llc.json").write_text(json.dumps({
        "llc": llc.llc_, "llc_sem": llc.llc_sem_, "llc_std": llc.llc_std_,
        "llc_per_chain": llc.llc_per_chain_.tolist(), "n_parameters": llc.n_parameters_,
        "n_samples": llc.n_samples_, "n_beta": llc.n_beta_, "init_loss": llc.init_loss_,
        "settings": LLC_SETTINGS, "seconds": seconds}, indent=2))
    _log(verbose, f"local learning coefficient {llc.llc_:.3g} ± {llc.llc_sem_:.2g} "
                  f"(SGLD, {LLC_SETTINGS['n_chains']} chains, {seconds:.0f} s; d/2 = "
                  f"{llc.n_parameters_ / 2:g})")
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        llc.plot(ax=ax)
        fig.tight_layout()
        fig.savefig(output / "llc_chains.png", dpi=120)
        plt.close(fig)


def format_table(results, tolerance, layers=LAYERS):
    """The comparison as a fixed-width text table (``layers``: those of the graphs)."""
    hidden = layers[:-1]
    # Wide enough for the longest row label (a user's layer names can be long).
    w = max(28, *(len(f"edges to keep {a}->{b}") + 2 for a, b in zip(layers[:-1], layers[1:])))
    lines = [
        f"{'':<{w}}" + "".join(f"{m:>12}" for m in results),
        *(f"{'directions to keep ' + layer:<{w}}"
          + "".join(f"{str(r['directions'][i]):>12}" for r in results.values())
          for i, layer in enumerate(hidden)),
        *(f"{'edges to keep ' + a + '->' + b:<{w}}"
          + "".join(f"{r['edges'][i]:>12}" for r in results.values())
          for i, (a, b) in enumerate(zip(layers[:-1], layers[1:]))),
        f"{'edges to keep, total':<{w}}"
        + "".join(f"{sum(r['edges']):>12}" for r in results.values()),
        f"{'interaction sparsity (Gini)':<{w}}"
        + "".join(f"{r['gini']:>12.3f}" for r in results.values()),
        f"{'modularity Q (modules)':<{w}}"
        + "".join(f"{r['modularity']:>7.3f} ({r['n_modules']:>2})" for r in results.values()),
    ]
    return (f"\nwithin {tolerance:.1%} accuracy of the unablated network:\n"
            + "\n".join(lines))


def _plot_graph(graph, modules, name, output):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting._plots import plot_edges, plot_interaction_graph

    fig, ax = plt.subplots(figsize=(7, 5))
    plot_interaction_graph(graph, labels=modules.labels_, ax=ax, layer_names=LAYERS)
    ax.set_title(f"{name} interaction graph, {modules.n_clusters_} modules")
    fig.savefig(output / f"graph_{name}.png", dpi=120, bbox_inches="tight")  # the legend sits outside
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

    from ..plotting._plots import plot_ablation_curves, plot_spectrum

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
