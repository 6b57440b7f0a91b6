"""The main job's default comparison: LIB and PCA graphs of the shipped transformer.

The reference work's headline experiment (arXiv 2405.10928) on the one-layer
modular-addition transformer of :func:`~sklearn_lib.datasets.load_modular_addition_transformer`:
node layers on the residual stream before attention (all three positions),
before the MLP and before the unembedding (the last position, where the answer
is read out) and the logits, ``sequence=True``, with the attention and MLP
halves declared (:func:`~sklearn_lib.declare_attention`,
:func:`~sklearn_lib.declare_residual_mlp`) so their Jacobian products come from
their formulas. For each graph it counts, on held-out pairs, the directions of
each layer and the edges of each section needed to stay within the tolerance,
and the Fourier frequencies of the embedding-layer directions.
:func:`sklearn_lib.demo.run` writes the result; the gallery example
``plot_modular_addition_transformer.py`` walks through the same steps.
"""

import json
import time

import numpy as np
import torch

from ..datasets import dominant_frequency, load_modular_addition_transformer
from ..evaluation._curves import (
    compare_node_ablation,
    directions_to_keep,
    min_edges_to_keep,
)
from ..graph._graph import InteractionGraph
from ..models._attention import declare_attention
from ..models._collect import record_activations
from ..models._fastpath import declare_residual_mlp

LAYERS = ("hook_resid_pre", "hook_resid_mid[-1]", "hook_resid_post[-1]", "unembed")
NAMES = ("resid_pre", "resid_mid", "resid_post", "logits")
BASES = {"LIB": "interaction", "PCA": "pca"}
N_SHOW = 16  # embedding directions whose frequencies are reported
SINGLE = 0.8  # "single-frequency": one frequency carries this share of the power


def _declared_model():
    """The shipped transformer with both halves of its block declared."""
    model = load_modular_addition_transformer()
    declare_attention(model, "attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O",
                      input="hook_resid_pre", output="hook_resid_mid", n_heads=model.n_heads)
    declare_residual_mlp(model, "mlp.0", "mlp.1", "mlp.2",
                         input="hook_resid_mid", output="hook_resid_post")
    return model


def _sections(model):
    """The maps between adjacent layers, and from each layer to the logits.

    Attention is asked for the last position's queries only: ``resid_mid[-1]``
    needs no other, and its values equal ``(x + model.attn(x))[:, -1:]``.
    """
    steps = [
        lambda x: x[:, -1:] + model.attn(x, last_only=True),  # (n, 3, d) -> (n, 1, d)
        lambda h: h + model.mlp(h),  # (n, 1, d) -> (n, 1, d)
        lambda h: model.unembed(h[:, -1]),  # (n, 1, d) -> (n, p)
    ]

    def through(first):
        def forward(x):
            for step in steps[first:]:
                x = step(x)
            return x
        return forward

    return steps, [through(l) for l in range(len(steps) + 1)]


def _count_directions(graph, name, acts, y, rest, tolerance):
    """Directions to keep per hidden layer, and the node-ablation curves.

    Every count from 1 to the layer's directions is scored, so the count is the
    fewest that pass, not the fewest of a sampled curve.
    """
    counts, curves = [], []
    for l in range(len(NAMES) - 1):
        schedule = range(1, graph.n_components_[l] + 1)
        curve = compare_node_ablation({name: graph.bases_[l]}, acts[l], y,
                                      forward=rest[l], schedule=schedule)
        counts.append(directions_to_keep(curve, tolerance))
        curves.append(curve)
    return counts, curves


def _count_edges(graph, acts, y, steps, rest, tolerance):
    """Edges to keep per section (the search of :func:`min_edges_to_keep`)."""
    return [min_edges_to_keep(graph.bases_[l], graph.bases_[l + 1], acts[l], y,
                              section=steps[l], forward=rest[l + 1],
                              edges=graph.edges_[l], tolerance=tolerance).n_edges
            for l in range(len(steps))]


def _embedding_functions(model, graph):
    """Coordinate ``k`` of the embedding layer's basis as a function of the token, (p, N_SHOW)."""
    E = model.embed.weight.detach().cpu().numpy()[:model.p]
    return E @ graph.bases_[0].components_[:N_SHOW].T


def compare(output, *, X_fit, X_eval, y_eval, tolerance, plots, verbose):
    """Build both graphs, count what they need and write ``comparison.json`` into ``output``."""
    model = _declared_model()
    X_eval = torch.from_numpy(X_eval)
    with torch.no_grad():
        accuracy = float((model(X_eval).argmax(1).numpy() == y_eval).mean())
    if verbose:
        print(f"modular addition transformer (p = {model.p}): held-out accuracy "
              f"{accuracy:.4f}; graphs on {len(X_fit)} training pairs, layers {list(LAYERS)}",
              flush=True)
    acts = [torch.from_numpy(a) for a in
            record_activations(model, list(LAYERS), X_eval, verbose=False).values()]
    steps, rest = _sections(model)
    results, curves, graphs = {}, {}, {}
    for name, basis in BASES.items():
        seconds = {}
        start = time.perf_counter()
        graph = InteractionGraph.from_model(model, list(LAYERS), X_fit, sequence=True,
                                            basis=basis)
        seconds["graph"] = time.perf_counter() - start
        directions, curves[name] = _count_directions(graph, name, acts, y_eval, rest,
                                                     tolerance)
        seconds["node ablation"] = time.perf_counter() - start - seconds["graph"]
        edges = _count_edges(graph, acts, y_eval, steps, rest, tolerance)
        seconds["edge search"] = time.perf_counter() - start - sum(seconds.values())
        frequency, share = dominant_frequency(_embedding_functions(model, graph))
        results[name] = {
            "directions": directions, "edges": edges,
            "n_directions_fitted": graph.n_components_.tolist(),
            "frequencies": frequency.tolist(), "frequency_shares": share.tolist(),
            "single_frequency": int((share >= SINGLE).sum()),
            "seconds": seconds,
        }
        graphs[name] = graph
        if verbose:
            print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
                  flush=True)
    if plots:
        _plot(model, graphs, curves, output)
    (output / "comparison.json").write_text(json.dumps(
        {"accuracy": accuracy, "layers": list(LAYERS), **results}, indent=2))
    return results


def _total(counts):
    return None if any(k is None for k in counts) else sum(counts)


def format_table(results, tolerance):
    """The transformer comparison as a fixed-width text table."""
    methods = [m for m in BASES if m in results]
    pairs = [f"{a}->{b}" for a, b in zip(NAMES[:-1], NAMES[1:])]
    rows = [(f"directions to keep {n}", [results[m]["directions"][i] for m in methods])
            for i, n in enumerate(NAMES[:-1])]
    rows.append(("directions to keep, total",
                 [_total(results[m]["directions"]) for m in methods]))
    rows += [(f"edges to keep {pair}", [results[m]["edges"][i] for m in methods])
             for i, pair in enumerate(pairs)]
    rows.append(("edges to keep, total", [_total(results[m]["edges"]) for m in methods]))
    w = 36
    lines = [f"{'':<{w}}" + "".join(f"{m:>8}" for m in methods) + f"{'LIB vs PCA':>12}"]
    for label, values in rows:
        lib, pca = values[0], values[-1]
        change = f"{lib / pca - 1:+.0%}" if lib is not None and pca else "-"
        lines.append(f"{label:<{w}}" + "".join(f"{'-' if v is None else v:>8}" for v in values)
                     + f"{change:>12}")
    lines.append(f"{f'single-frequency of top {N_SHOW} embedding':<{w}}"
                 + "".join(f"{results[m]['single_frequency']:>8}" for m in methods))
    for m in methods:
        frequencies = sorted(set(results[m]["frequencies"][:N_SHOW]))
        lines.append(f"{m} embedding frequencies (top {N_SHOW} directions): {frequencies}")
        lines.append(f"{m} time: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in results[m]["seconds"].items()))
    return (f"\nwithin {tolerance:.1%} accuracy of the unablated transformer "
            f"(held-out pairs):\n" + "\n".join(lines))


def _plot(model, graphs, curves, output):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from ..plotting._plots import plot_ablation_curves, plot_spectrum

    fig, axes = plt.subplots(1, len(NAMES), figsize=(5 * len(NAMES), 4))
    for l, ax in enumerate(axes[:-1]):
        plot_ablation_curves(pd.concat(c[l] for c in curves.values()), ax=ax, logx=True,
                             ylabel="accuracy")
        ax.set_title(f"node ablation of {NAMES[l]}")
    plot_spectrum({name: g.bases_[0] for name, g in graphs.items()}, ax=axes[-1])
    axes[-1].set_title(f"strength of each direction of {NAMES[0]}")
    fig.tight_layout()
    fig.savefig(output / "ablation.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(graphs), figsize=(6 * len(graphs), 5), squeeze=False)
    for ax, (name, graph) in zip(axes[0], graphs.items()):
        power = np.abs(np.fft.rfft(_embedding_functions(model, graph), axis=0)[1:]) ** 2
        ax.imshow((power / power.sum(0)).T, aspect="auto", cmap="magma", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xlabel("frequency - 1")
        ax.set_ylabel("embedding direction")
        ax.set_title(f"{name}: share of each direction's power")
    fig.tight_layout()
    fig.savefig(output / "fourier.png", dpi=120)
    plt.close(fig)
