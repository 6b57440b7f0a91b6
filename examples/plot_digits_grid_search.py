"""
Grid-searching bases like any scikit-learn transformer
=======================================================

A small MLP is trained on scikit-learn's bundled digits. Its hidden activations and
the Jacobians of the logits with respect to them are collected with
:func:`sklearn_lib.collect.collect`. Then one :class:`~sklearn.model_selection.GridSearchCV`
compares :class:`~sklearn_lib.PCA` and :class:`~sklearn_lib.InteractionBasis` over
``n_components`` and ``center``, ranking every candidate by the cross-validated
interaction sparsity of :class:`~sklearn_lib.metrics.InteractionSparsityScorer`:
``jacobians`` is sample-aligned metadata that scikit-learn's metadata routing splits
per fold and hands to ``fit`` and to the scorer.
"""

import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline

from sklearn_lib import PCA, InteractionBasis
from sklearn_lib.collect import collect
from sklearn_lib.metrics import InteractionSparsityScorer

QUICK = os.environ.get("SKLEARN_LIB_QUICK") == "1"

# %%
# Train a small network
# ---------------------
X, y = load_digits(return_X_y=True)
X = X / 16.0
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
).double()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
inputs, labels = torch.from_numpy(X), torch.from_numpy(y)
for _ in range(50 if QUICK else 300):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(inputs), labels).backward()
    optimizer.step()
accuracy = (model(inputs).argmax(1) == labels).double().mean().item()
print(f"training accuracy {accuracy:.3f}")

# %%
# Collect hidden activations and Jacobians of the logits
# ------------------------------------------------------
# Layer names are ``model.named_modules()`` paths: "1" is the ReLU, "2" the logits.
(H, _), (J,) = collect(model, ["1", "2"], X, verbose=False)
print("activations", H.shape, "jacobians", J.shape)

# %%
# One grid over PCA and InteractionBasis
# --------------------------------------
# ``sklearn_lib.PCA`` is scikit-learn's PCA that accepts (and ignores) the routed
# Jacobians, so both kinds of basis can be candidates of one step.
sklearn.set_config(enable_metadata_routing=True)
n_components = [3, 6] if QUICK else [3, 6, 10]
grid = GridSearchCV(
    Pipeline([("basis", InteractionBasis())]),
    [
        {"basis": [PCA()], "basis__n_components": n_components},
        {"basis": [InteractionBasis()], "basis__n_components": n_components,
         "basis__center": [True, False]},
    ],
    scoring=InteractionSparsityScorer(),
    cv=KFold(3, shuffle=True, random_state=0),
).fit(H, jacobians=J)
sklearn.set_config(enable_metadata_routing=False)

results = pd.DataFrame(grid.cv_results_["params"])
results["basis"] = [
    f"{type(p['basis']).__name__}" + ("" if "basis__center" not in p
                                      else f" center={p['basis__center']}")
    for p in grid.cv_results_["params"]
]
results["sparsity"] = grid.cv_results_["mean_test_score"]
results["std"] = grid.cv_results_["std_test_score"]
table = results.pivot(index="basis__n_components", columns="basis", values="sparsity")
print(table.round(3).to_string())
print("best:", grid.best_params_)

# %%
# Plot the cross-validated sparsity
# ---------------------------------
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, group in results.groupby("basis"):
    ax.errorbar(group["basis__n_components"], group["sparsity"], yerr=group["std"],
                marker="o", capsize=3, label=name)
ax.set_xlabel("n_components")
ax.set_ylabel("held-out interaction sparsity (Gini)")
ax.legend()
fig.tight_layout()
assert np.isfinite(results["sparsity"]).all()
