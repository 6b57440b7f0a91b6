"""
Modular addition transformer: the local interaction basis beside PCA
====================================================================

The reference work's headline experiment (arXiv 2405.10928): a one-layer
transformer trained to compute ``(a + b) % 113`` from the input ``a b =``
(:func:`sklearn_lib.datasets.load_modular_addition_transformer`; ``d_model``
128, 4 attention heads, a ReLU MLP of 512, no LayerNorm, trained on 30% of the
pairs and 100% accurate on the other 70%). Its node layers are the residual
stream before attention (``hook_resid_pre``, all three positions), before the
MLP (``hook_resid_mid``) and before the unembedding (``hook_resid_post``), the
last two at the last position only, where the answer is read out, and the
logits.

We build the local interaction basis (LIB) graph and the PCA graph over those
layers and ask, on held-out pairs, as the reference work does:

1. how many directions of each layer must be kept to stay within 0.1% of the
   network's accuracy,
2. how many edges between adjacent layers must be kept (the reference work
   reports LIB needing about 8% fewer edges than PCA in total, and the same
   number of directions), and
3. which Fourier frequencies the embedding-layer directions carry.

The main job, ``python -m sklearn_lib``, runs the same comparison and writes
its table, figures and timings to a folder (:func:`sklearn_lib.demo.run`).
"""

import os
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from sklearn_lib import InteractionGraph, declare_attention, declare_residual_mlp
from sklearn_lib.collect import record_activations
from sklearn_lib.datasets import (
    dominant_frequency,
    load_modular_addition_transformer,
    modular_addition_data,
)
from sklearn_lib.evaluation import (
    compare_node_ablation,
    directions_to_keep,
    min_edges_to_keep,
)
from sklearn_lib.plotting import plot_ablation_curves, plot_spectrum

QUICK = os.environ.get("SKLEARN_LIB_QUICK") == "1"
N_FIT = 100 if QUICK else None  # training pairs the bases are fitted on; None: all 3,831
N_EVAL = 100 if QUICK else 1000  # held-out pairs the ablations are scored on
TOLERANCE = 0.001  # the reference work's 0.1% accuracy
timings = {}
start = last = time.perf_counter()


def lap(stage):
    global last
    now = time.perf_counter()
    timings[stage] = now - last
    last = now


# %%
# The network, the data and the node layers
# -----------------------------------------
# The layers are the model's hook modules, named as ``named_modules()`` does.
# A selection of positions in brackets restricts a layer to them: ``[-1]``
# reads ``hook_resid_mid`` and ``hook_resid_post`` at the last position only,
# ``(n, 1, 128)``, while ``hook_resid_pre`` keeps all three, ``(n, 3, 128)``.
# The model runs its ordinary forward (attention and MLP at every position);
# the graph's sections start at the selected positions only, so positions 0
# and 1 after attention, which never reach the logits, are no nodes.
model = load_modular_addition_transformer()  # float64, eval mode
p = model.p
LAYERS = ["hook_resid_pre", "hook_resid_mid[-1]", "hook_resid_post[-1]", "unembed"]
NAMES = ["resid_pre", "resid_mid", "resid_post", "logits"]

X_train, X_test, y_train, y_test = modular_addition_data(p)
rng = np.random.default_rng(0)
X_fit = X_train[rng.permutation(len(X_train))[:N_FIT]]
held_out = rng.permutation(len(X_test))[:N_EVAL]
X_eval, y_eval = torch.from_numpy(X_test[held_out]), y_test[held_out]
with torch.no_grad():
    accuracy = (model(X_eval).argmax(1).numpy() == y_eval).mean()
print(f"p = {p}: fitting on {len(X_fit)} training pairs, scoring on {len(X_eval)} "
      f"held-out pairs (accuracy {accuracy:.3f})")
lap("load")

# %%
# Local interaction graph and PCA graph
# -------------------------------------
# ``sequence=True``: positions count as samples, so ``resid_pre``'s basis is
# one basis of the 128-dimensional residual stream shared by the three
# positions. The section from ``resid_pre`` to ``resid_mid`` mixes positions
# (attention): its edge from direction ``j`` to direction ``i`` attributes
# ``j`` summed over the three source positions, then squares, as the
# reference work does.
#
# The two halves of the block add their result to the residual stream in the
# model's ``forward``. Declaring them lets the graph compute their statistics and
# edges from their formulas instead of vector-Jacobian products through the
# model (ten times faster, equal to rounding): attention without biases with a
# causal mask, and a ReLU MLP. Each declaration is checked on the first batch
# (a model computing something else falls back to the generic path, with a
# warning). The unembedding needs no declaration: a ``Linear`` reading
# ``resid_post[:, -1]``, which is the layer ``hook_resid_post[-1]``, is
# recognised from the values it reads and taken in closed form.
declare_attention(model, "attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O",
                  input="hook_resid_pre", output="hook_resid_mid", n_heads=model.n_heads)
declare_residual_mlp(model, "mlp.0", "mlp.1", "mlp.2",
                     input="hook_resid_mid", output="hook_resid_post")
graphs = {}
for name, basis in (("LIB", "interaction"), ("PCA", "pca")):
    graphs[name] = InteractionGraph.from_model(model, LAYERS, X_fit, sequence=True, basis=basis)
    lap(f"graph {name}")
for name, graph in graphs.items():
    print(f"{name}: directions per layer {dict(zip(NAMES, graph.n_components_.tolist()))}")

# %%
# Activations, and the network between layers
# -------------------------------------------
# The ablation tools take the layers as they are, ``(n, positions, features)``:
# a basis acts on the features at every position, and a section may mix
# positions. ``record_activations`` reads the same layer names, selections
# included. The sections are the model's own modules; attention is asked for
# the last position's queries only (``last_only=True``), the only position
# ``resid_mid[-1]`` needs: the same values as ``(x + model.attn(x))[:, -1:]``
# at a third of the queries.
acts = {name: torch.from_numpy(values) for name, values in
        zip(NAMES, record_activations(model, LAYERS, X_eval, verbose=False).values())}


def attention(x):  # resid_pre (n, 3, 128) -> resid_mid at the last position (n, 1, 128)
    return x[:, -1:] + model.attn(x, last_only=True)


def mlp(h):  # resid_mid -> resid_post, (n, 1, 128)
    return h + model.mlp(h)


def readout(h):  # resid_post (n, 1, 128) -> logits (n, p)
    return model.unembed(h[:, -1])


sections = {"resid_pre": attention, "resid_mid": mlp, "resid_post": readout}
rest = {"resid_pre": lambda x: readout(mlp(attention(x))),
        "resid_mid": lambda h: readout(mlp(h)),
        "resid_post": readout, "logits": lambda z: z}

# %%
# Node ablation
# -------------
# Keep the top ``k`` directions of a layer, set the others to zero (the mean),
# map back and run the rest of the network.
n_directions, node_curves = {}, {}
for l, name in enumerate(NAMES[:-1]):
    r_max = max(graph.n_components_[l] for graph in graphs.values())
    ks = np.unique(np.geomspace(1, r_max, 8 if QUICK else 40).round().astype(int))
    curves = {}
    for g, graph in graphs.items():
        schedule = [k for k in ks if k <= graph.n_components_[l]]
        curves[g] = compare_node_ablation({g: graph.bases_[l]}, acts[name], y_eval,
                                          forward=rest[name], schedule=schedule)
        n_directions[g, name] = directions_to_keep(curves[g], TOLERANCE)
    node_curves[name] = pd.concat(curves.values())
lap("node ablation")

fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
for ax, (name, curves) in zip(axes, node_curves.items()):
    plot_ablation_curves(curves, ax=ax, logx=True, ylabel="held-out accuracy")
    ax.set_title(f"node ablation of {name}")
plot_spectrum({g: graph.bases_[0] for g, graph in graphs.items()}, ax=axes[3])
axes[3].set_title("strength of each direction of resid_pre")
fig.tight_layout()

# %%
# Edge ablation
# -------------
# Between adjacent layers keep only the ``k`` strongest edges of the graph
# (``edges_[l]``) and score the network; ``min_edges_to_keep`` searches for the
# fewest within tolerance. Across attention, removing the edge from direction
# ``j`` of ``resid_pre`` to direction ``i`` of ``resid_mid`` removes ``j`` at
# all three positions, the ablation that matches the graph's edge. The search
# doubles the count from 1 until one passes, then bisects; it reports a count
# ``k`` that passes while ``k - 1`` fails, with every count it tried below
# ``k`` failing and every one above passing. That is the fewest edges when
# keeping more of the strongest edges never hurts; when the curve is not
# monotone, a smaller count may pass in isolation (scoring every count up to
# ``k`` with ``edge_ablation_curve`` finds it, cheaply: the section runs only on
# the rows of the mask that change from one count to the next).
pairs = [f"{a}->{b}" for a, b in zip(NAMES[:-1], NAMES[1:])]
n_edges, searches = {}, {}
for g, graph in graphs.items():
    for l, (name, pair) in enumerate(zip(NAMES[:-1], pairs)):
        result = min_edges_to_keep(
            graph.bases_[l], graph.bases_[l + 1], acts[name], y_eval,
            section=sections[name], forward=rest[NAMES[l + 1]],
            edges=graph.edges_[l], tolerance=TOLERANCE,
        )
        n_edges[g, pair] = result.n_edges
        searches[g, pair] = result
        lap(f"edges {g} {pair}")

rows = {f"directions to keep, {name}": [n_directions[g, name] for g in graphs]
        for name in NAMES[:-1]}
rows["directions to keep, total"] = [sum(n_directions[g, name] for name in NAMES[:-1])
                                     for g in graphs]
rows.update({f"edges to keep, {pair}": [n_edges[g, pair] for g in graphs] for pair in pairs})
rows["edges to keep, total"] = [sum(n_edges[g, pair] for pair in pairs) for g in graphs]
table = pd.DataFrame(rows, index=list(graphs)).T
table["LIB vs PCA"] = [f"{a / b - 1:+.0%}" for a, b in zip(table["LIB"], table["PCA"])]
print(f"\nwithin {TOLERANCE:.1%} of the held-out accuracy "
      f"(at most {int(TOLERANCE * len(y_eval) + 1e-9)} of {len(y_eval)} pairs wrong):")
print(table.to_string())
lib_total, pca_total = table.loc["edges to keep, total", ["LIB", "PCA"]]
print(f"in total LIB keeps {lib_total} edges and PCA {pca_total}: LIB needs "
      f"{abs(lib_total / pca_total - 1):.0%} {'fewer' if lib_total < pca_total else 'more'} "
      "(reference work: about 8% fewer, the same number of directions)")

# %%
# Fourier modes in the embedding layer
# ------------------------------------
# At positions 0 and 1, ``resid_pre = E[token] + pos``, so coordinate ``k``
# of the embedding layer's basis is a function of the token,
# ``f_k(a) = E[a] @ components_[k]`` plus a constant: is it a single Fourier
# mode?
N_SHOW = 16
SINGLE = 0.8  # "single-frequency": one frequency carries 80% of the power
E = model.embed.weight.detach().numpy()[:p]
labels = {}
for g, graph in graphs.items():
    functions = E @ graph.bases_[0].components_[:N_SHOW].T  # (p, N_SHOW)
    frequency, share = dominant_frequency(functions)
    labels[g] = list(zip(frequency.tolist(), share.tolist()))
    single = int((share >= SINGLE).sum())
    print(f"\n{g}: {single} of the top {N_SHOW} embedding directions are single-frequency "
          f"(>= {SINGLE:.0%} of the power); frequencies {sorted(set(frequency.tolist()))}")
    print("direction  frequency  share")
    for k, (freq, s) in enumerate(labels[g]):
        print(f"{k:9d}  {freq:9d}  {s:5.2f}")
lap("fourier")

fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharex=True, layout="constrained")
for ax, (g, graph) in zip(axes, graphs.items()):
    functions = E @ graph.bases_[0].components_[:N_SHOW].T
    power = np.abs(np.fft.rfft(functions, axis=0)[1:]) ** 2
    image = ax.imshow((power / power.sum(0)).T, aspect="auto", cmap="magma", vmin=0, vmax=1,
                      extent=(0.5, p // 2 + 0.5, N_SHOW - 0.5, -0.5), interpolation="nearest")
    ax.set_yticks(range(N_SHOW), [f"{k}: f={f} ({s:.2f})" for k, (f, s) in enumerate(labels[g])])
    ax.set_xlabel("frequency")
    ax.set_title(f"{g}: embedding directions")
fig.colorbar(image, ax=axes, label="share of the direction's power")

print("\ntime per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
print(f"done in {time.perf_counter() - start:.0f} s")

# %%
# What we find
# ------------
# At full size (bases fitted on all 3,831 training pairs, ablations scored on
# 1,000 held-out pairs, so 0.1% allows one wrong answer) one run gave:
#
# ================================  ====  ====  ==========
# within 0.1% of the accuracy        LIB   PCA  LIB vs PCA
# ================================  ====  ====  ==========
# directions, resid_pre               10    14        -29%
# directions, resid_mid               12    12         +0%
# directions, resid_post               8     9        -11%
# directions, total                   30    35        -14%
# edges, resid_pre -> resid_mid       72   230        -69%
# edges, resid_mid -> resid_post      65   107        -39%
# edges, resid_post -> logits        647   664         -3%
# edges, total                       784  1001        -22%
# ================================  ====  ====  ==========
#
# LIB needs fewer edges than PCA, more so than the reference work's 8%
# (nearly all of the gap is across attention and the MLP), and as many or
# fewer directions, where the reference work found the same number. The
# embedding layer's LIB directions 1 to 8 are the cosine and sine of four
# frequencies (11, 39, 8, 37), each 97-99% pure; direction 0 is no Fourier
# mode of the tokens (its strongest frequency has 20% of the power), and from
# direction 9 on the directions mix frequencies. PCA's top directions mix the
# same frequencies (2 of its top 16 are 80% one frequency, against 8 of
# LIB's). The counts of directions come from the sampled node-ablation curves
# (40 log-spaced counts), the counts of edges from the search of
# :func:`~sklearn_lib.evaluation.min_edges_to_keep` (see above for what it
# reports on a non-monotone curve). On a 2-core machine the whole run took
# 13 s: the LIB graph 3.9 s and the PCA graph 3.0 s (attention and MLP
# declared; about ten times as long through vector-Jacobian products), the
# node ablations 1.5 s and the six edge searches 4.6 s
# (``benchmarks/bench_transformer.py`` measures both; see the developer notes,
# Performance).
assert accuracy == 1.0
