"""
A conv net with channels as features
====================================

A small conv net is trained on scikit-learn's 8x8 digits (no download). Its
convolution layers are read with :class:`~sklearn_lib.Layer` and
``feature_axes=1``: the channels are the features and the pixels are positions,
which count as samples. The graph has 8 and 16 features in its hidden layers
instead of the 512 and 256 of the flattened ``C x H x W`` vectors, and every
basis direction is a pattern of channels that the network reads at every pixel.

Rows of such a layer are (image, pixel) pairs: row ``x * H * W + p`` is pixel
``(p // W, p % W)`` of image ``x``, so a direction's coordinates map back onto
the images.
"""

import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from sklearn_lib import InteractionGraph, Layer
from sklearn_lib.collect import record_activations
from sklearn_lib.datasets import train_digits_conv_net
from sklearn_lib.plotting import plot_spectrum

QUICK = os.environ.get("SKLEARN_LIB_QUICK") == "1"

# %%
# Train the net
# -------------
n_train = 1400
n_graph = 150 if QUICK else n_train
net, images, labels = train_digits_conv_net(n_train, n_steps=100 if QUICK else 400)
with torch.no_grad():
    accuracy = (net(images[n_train:]).argmax(1) == labels[n_train:]).float().mean()
print(f"held-out accuracy: {accuracy:.3f}")

# %%
# The graph with channels as features
# -----------------------------------
# The two ReLU outputs are read as (image, pixel) rows of channels; the logits
# are an ordinary layer. Positions multiply the vector-Jacobian products (one
# per output pixel and direction), which is what the time below pays for.
layers = [Layer("1", feature_axes=1), Layer("3", feature_axes=1), "6"]
start = time.perf_counter()
graph = InteractionGraph(verbose=False).fit_model(net, layers, images[:n_graph])
print(f"graph of {n_graph} images: {time.perf_counter() - start:.1f} s")
for name, basis in zip(graph.layer_names_, graph.bases_):
    lam = basis.interaction_strengths_
    share = int(np.searchsorted(np.cumsum(lam) / lam.sum(), 0.99)) + 1
    print(f"layer {name!r}: {basis.n_features_in_} features, {basis.n_samples_seen_} rows, "
          f"{basis.n_components_} directions kept, {share} carry 99% of Lambda")

# %%
# Spectra of every layer
# ----------------------
plot_spectrum({f"layer {n}": b for n, b in zip(graph.layer_names_, graph.bases_)})
plt.title("Interaction strengths per layer")

# %%
# Where the strongest directions of the first layer are active
# ------------------------------------------------------------
# ``record_activations`` with the same ``Layer`` gives ``(images, pixels,
# channels)``; the graph transforms every pixel alike, and the pixel axis
# reshapes back to 8 x 8.
acts = record_activations(net, [layers[0]], images[:4], verbose=False, dtype="float64")["1"]
Z = graph.transform(0, acts)  # (4, 64, r)
fig, axes = plt.subplots(3, 4, figsize=(8, 6))
for x in range(4):
    axes[0, x].imshow(images[x, 0], cmap="gray_r")
    axes[0, x].set_title(f"digit {int(labels[x])}")
    for row, direction in enumerate((0, 1), start=1):
        axes[row, x].imshow(Z[x, :, direction].reshape(8, 8), cmap="RdBu_r")
        axes[row, x].set_title(f"direction {direction}")
for ax in axes.flat:
    ax.set_axis_off()
fig.tight_layout()
plt.show()
