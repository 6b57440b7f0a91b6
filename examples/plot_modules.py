"""
Finding modules: a network made of two independent halves
===========================================================

Two small ReLU networks are placed side by side in one ``nn.Sequential`` with
block-diagonal weights, so the network really is two modules that never talk to
each other. The pipeline sees only the combined network: it builds the local
interaction graph of the model with :class:`~sklearn_lib.InteractionGraph` (from the
activations and Jacobians of its layers), and splits it with
:class:`~sklearn_lib.ModularityClustering`. It should recover the two halves.

The catch it has to get right: the inputs of the two halves are independent but their
*sample* covariance is not exactly block-diagonal, so the bases mix the halves a little
and cross-module edges are small rather than zero.
"""

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import networkx as nx
import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from sklearn_lib import InteractionGraph, ModularityClustering
from sklearn_lib.export import to_networkx, write_graphml
from sklearn_lib.plotting import plot_interaction_graph, plot_layer_spectra

QUICK = os.environ.get("SKLEARN_LIB_QUICK") == "1"


def two_halves(widths=(4, 8, 3), seed=0, scale=3.0):
    """An MLP whose every weight matrix is block-diagonal with two blocks.

    The second half's weights are ``scale`` times larger, so the two halves'
    interaction strengths do not interleave: near-equal strengths in different
    halves would let sampling noise rotate directions across the halves.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        linear = torch.nn.Linear(2 * d_in, 2 * d_out).double()
        with torch.no_grad():
            linear.weight.zero_()
            for half in range(2):
                rows = slice(half * d_out, (half + 1) * d_out)
                cols = slice(half * d_in, (half + 1) * d_in)
                linear.weight[rows, cols] = (scale if half else 1.0) * torch.randn(
                    d_out, d_in, generator=gen, dtype=torch.float64)
            linear.bias.copy_(0.1 * torch.randn(2 * d_out, generator=gen, dtype=torch.float64))
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


# %%
# The network and its interaction graph
# -------------------------------------
model = two_halves()
X = np.random.default_rng(0).normal(size=(500 if QUICK else 2000, 8))
layers = [":input", "1", "2"]   # the input, the hidden ReLU, the output
graph = InteractionGraph().fit_model(model, layers, X)

# %%
# Modules
# -------
# A resolution below 1 favours fewer, larger modules: at gamma = 1 the larger half
# is itself split in two (also a fair reading of this graph).
modules = ModularityClustering(resolution=0.5, normalization="sqrt", random_state=0).fit(graph)
print(f"{modules.n_clusters_} modules, modularity Q = {modules.modularity_:.3f}")

# %%
# Which half does each basis direction belong to? A direction lives in the half that
# holds most of its weight in ``components_`` (the final layer is unrotated).
truth = []
for basis, width in zip(graph.bases_, [4, 8, 3]):
    C = np.abs(basis.components_)
    truth.extend((C[:, width:] ** 2).sum(1) > (C[:, :width] ** 2).sum(1))
ari = adjusted_rand_score(truth, modules.labels_)
print(f"adjusted Rand index against the two halves: {ari:.3f}")

# %%
# The graph, coloured by module
# -----------------------------
# Columns are the layers, named and with their number of directions; a node's
# area is its interaction strength Lambda relative to the layer's strongest.
# Edges are log-normalised per layer pair, ``log10(E / eps)``, and an edge inside
# a module takes the module's colour. By default ``eps`` is a thousandth of the
# pair's strongest edge; here the weaker half's edges lie three to four decades
# below the stronger half's, so a lower ``eps`` shows both: two coloured bands
# joined by faint grey cross-module edges.
fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
plot_interaction_graph(graph, modules, ax=ax, node_order="module", eps=0.1)
ax.set_title(f"{modules.n_clusters_} modules found (ARI {ari:.2f})")
assert ari == 1.0, "the two independent halves should be recovered"

# %%
# The spectrum of every layer
# ---------------------------
plot_layer_spectra(graph)

# %%
# Exploring the graph elsewhere
# -----------------------------
# :func:`~sklearn_lib.export.to_networkx` gives every node its layer, index,
# Lambda and module; :func:`~sklearn_lib.export.write_graphml` writes the same
# for Gephi, Cytoscape or yEd. Node ``k`` is row ``k`` of ``graph.adjacency()``.
G = to_networkx(graph, modules)
print(f"networkx: {G.number_of_nodes()} nodes, {G.number_of_edges()} edges; "
      f"node 0: {G.nodes[0]}")
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "modules.graphml"
    write_graphml(graph, path, modules)
    H = nx.read_graphml(path, node_type=int)
    print(f"GraphML round trip: {H.number_of_nodes()} nodes, {H.number_of_edges()} edges")
    assert H.number_of_edges() == G.number_of_edges()
