"""Cached activations and Jacobians of a small network, shared by graph and persistence tests."""

import numpy as np
import torch
from torch import nn

from sklearn_lib.collect import collect

#: The node layers of :func:`relu_mlp_case`: the input and the outputs of modules 1, 3 and 4.
MLP_LAYERS = [":input", "1", "3", "4"]


def relu_mlp_case(n_samples):
    """Activations and Jacobians of a float64 ReLU MLP 6-8-8-4 on ``n_samples`` inputs."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
    ).double()
    X = torch.randn(n_samples, 6, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    acts, jacs = collect(net, MLP_LAYERS, X, verbose=False)
    return dict(acts=[np.asarray(a) for a in acts], jacs=[np.asarray(j) for j in jacs])
