"""
Degeneracy of the modular-addition network, layer by layer
==========================================================

The interaction basis is built to be invariant to the ways a network's
parameters are degenerate (arXiv 2405.10927): linear dependence of a layer's
activations, linear dependence of the gradients passed back to it, and
nonlinearities that fire on the same data points. This example measures all
three on the network the package ships
(:func:`sklearn_lib.datasets.load_modular_addition_model`: ``embed`` ->
256 ReLUs ``mlp.1`` -> 113 logits ``mlp.2``) with
:class:`~sklearn_lib.degeneracy.DegeneracyReport`, and checks where the
gradients' null space of the embedding comes from.
"""

import os
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sklearn_lib.datasets import (
    LAYERS,
    load_modular_addition_model,
    modular_addition_data,
)
from sklearn_lib.degeneracy import DegeneracyReport

QUICK = os.environ.get("SKLEARN_LIB_QUICK") == "1"
N_FIT = 500 if QUICK else 2000  # training pairs measured
start = time.perf_counter()

# %%
# The report
# ----------
# ``fit_model`` fits an :class:`~sklearn_lib.InteractionGraph` on the pairs
# and, in one more pass, hooks the input of the ``nn.ReLU`` (``mlp.1``) for
# its firing patterns.
model = load_modular_addition_model()
X_train, _, _, _ = modular_addition_data(model.p)
X_fit = X_train[np.random.default_rng(0).permutation(len(X_train))[:N_FIT]]
report = DegeneracyReport().fit_model(model, list(LAYERS), X_fit)
frame = report.to_frame()
with pd.option_context("display.width", 200, "display.max_columns", 20):
    print(frame.drop(columns=["activation_rank", "gradient_rank", "sync_group_sizes"]))

# %%
# Reading the table:
#
# * No layer's activations are linearly dependent, and no ReLU is dead,
#   always on or synchronised with another.
# * ``mlp.1`` passes 113 logits' worth of gradients back: 143 of its 256
#   directions are not read, and the interaction basis keeps 113.
# * Half of ``embed`` (32 of 64 directions) is not read either. The network
#   was trained with the two halves of its hidden weight tied, so ``mlp.0``
#   sees only ``E[a] + E[b]``: the unread directions should be ``(u, -u)``.
#   The eigenvectors of ``M'`` below the tolerance say so.
basis = report.graph_.bases_[0]
values, vectors = np.linalg.eigh(basis.jacobian_gram_)
unread = vectors[:, values <= report.gradient_tolerance_[0]]
d = model.d_embed
antisymmetry = np.linalg.norm(unread[:d] + unread[d:]) / np.linalg.norm(unread)
print(f"\n{unread.shape[1]} unread directions of embed; "
      f"|u_a + u_b| / |u| over them = {antisymmetry:.1e}")

# %%
# The degenerate parameter directions of each map follow from the ranks:
# ``(d_{l-1} + 1) d_l - (rank G_{l-1} + 1) rank M'_l`` (plus synchronised
# groups, none here). For ``embed -> mlp.1`` that is ``65 * 256 - 65 * 113``:
# every unread direction of ``mlp.1`` frees one direction of the Linear per
# input. The map into the logits has none.
for l in (1, 2):
    print(f"{LAYERS[l - 1]} -> {LAYERS[l]}: {report.degenerate_parameters_[l]:.0f} of "
          f"{frame['section_parameters'].iloc[l]} parameter directions are degenerate")

# %%
# The spectra the ranks come from, with their tolerances, and the counts.
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for l, name in enumerate(LAYERS):
    axes[0].semilogy(report.gram_eigenvalues_[l], label=name)
    if report.jacobian_eigenvalues_[l] is not None:
        axes[1].semilogy(np.maximum(report.jacobian_eigenvalues_[l], 1e-20), label=name)
        axes[1].axhline(report.gradient_tolerance_[l], ls=":", color=f"C{l}")
axes[0].set_title("Gram eigenvalues (activations)")
axes[1].set_title("M' eigenvalues (gradients), tolerance dotted")
for ax in axes[:2]:
    ax.set_xlabel("index")
    ax.legend()
report.plot(ax=axes[2])
fig.tight_layout()
print(f"\ndone in {time.perf_counter() - start:.1f} s")
