"""
Quickstart: the interaction basis of a hidden layer beside PCA
==============================================================

Trains a small ReLU MLP on scikit-learn's bundled digits (a few seconds on a
CPU), caches the hidden activations and the per-sample Jacobians of the logits
with respect to them, fits :class:`~sklearn_lib.InteractionBasis` and
:class:`~sklearn.decomposition.PCA` on the training half and compares them on
the held-out half: how accurate the network stays when the hidden layer is
projected onto the top-k directions of each basis, and how sparse each basis's
interactions with the logits are.

Run with ``python examples/quickstart.py`` (``--quick``, or the environment variable
``SKLEARN_LIB_QUICK=1``, for a smoke test).
"""

import argparse
import os

import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split

from sklearn_lib import InteractionBasis
from sklearn_lib.metrics import InteractionSparsityScorer


def train_mlp(X, y, *, hidden=64, epochs=300, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(X.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    ).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    return model


def hidden_and_jacobians(model, X):
    """Hidden activations and d logits / d hidden for every sample."""
    encoder, head = model[:2], model[2:]
    with torch.no_grad():
        H = encoder(torch.from_numpy(X))
    J = torch.func.vmap(torch.func.jacrev(head))(H)
    return H.numpy(), J.detach().numpy()


def ablation_accuracy(model, basis, H, y, k):
    """Accuracy when the hidden layer keeps only the top-k directions of ``basis``."""
    Z = basis.transform(H)
    Z[:, k:] = 0
    with torch.no_grad():
        logits = model[2:](torch.from_numpy(basis.inverse_transform(Z)))
    return float((logits.argmax(1).numpy() == y).mean())


def main(quick=False):
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.5, random_state=0)
    model = train_mlp(X_train, y_train, epochs=60 if quick else 300)
    H_train, J_train = hidden_and_jacobians(model, X_train)
    H_test, J_test = hidden_and_jacobians(model, X_test)

    interaction = InteractionBasis().fit(H_train, jacobians=J_train)
    # The logits see at most 10 directions of the hidden layer; give PCA as many,
    # so that both sparsities are measured over edge matrices of one size.
    bases = {
        "InteractionBasis": interaction,
        "PCA": PCA(interaction.n_components_).fit(H_train),
    }
    scorer = InteractionSparsityScorer()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(X_test)).argmax(1).numpy() == y_test).mean()
    print(f"hidden width {H_train.shape[1]}, {interaction.n_components_} interaction "
          f"directions, test accuracy {accuracy:.3f}")
    print(f"{'basis':<18}{'sparsity (gini)':>16}" + "".join(f"{'acc@' + str(k):>9}" for k in (1, 2, 5, 10)))
    for name, basis in bases.items():
        accuracies = [ablation_accuracy(model, basis, H_test, y_test, k) for k in (1, 2, 5, 10)]
        sparsity = scorer(basis, H_test, jacobians=J_test)
        print(f"{name:<18}{sparsity:>16.3f}" + "".join(f"{a:>9.3f}" for a in accuracies))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Interaction basis beside PCA on digits.")
    parser.add_argument("--quick", action="store_true", help="fewer training epochs",
                        default=os.environ.get("SKLEARN_LIB_QUICK") == "1")
    main(**vars(parser.parse_args()))
