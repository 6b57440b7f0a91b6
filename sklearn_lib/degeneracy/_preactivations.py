"""Pre-activations given for a report: checked to be those of their layers.

Dead, always-on and synchronised neurons are counted from ``act'(z)``; a ``z``
of another layer or another activation would count neurons that do not exist,
so every array is checked against the layer it is given for before its
activation patterns are read.
"""

import math

import numpy as np
import torch

from ..utils._backend import as_tensor
from ._counts import patterns_from_arrays

__all__ = ["array_patterns", "check_pattern_inputs", "check_preactivations"]


def check_pattern_inputs(preactivations, activation):
    """Refuse the wrong kinds of ``preactivations`` and ``activation`` before any fit."""
    if preactivations is not None and not isinstance(preactivations, dict):
        raise TypeError(
            "preactivations must be a dict mapping layer indices or names to arrays of "
            f"shape (n_rows, d_layer), got {type(preactivations).__name__}."
        )
    if activation is not None and not callable(activation):
        raise TypeError(f"activation must be callable, got {activation!r}.")


def array_patterns(graph, preactivations, activation, X, *, tol, batch_size, dtype, device):
    """Activation patterns of the layers given with ``preactivations``, checked against them."""
    check_pattern_inputs(preactivations, activation)
    if preactivations is None:
        return {}
    activation = torch.relu if activation is None else activation
    patterns = {}
    for key, z in preactivations.items():
        l = graph._layer_index(key)
        expected = (graph.bases_[l].n_samples_seen_, graph.bases_[l].n_features_in_)
        shape = tuple(int(s) for s in getattr(z, "shape", np.shape(z)))
        if shape != expected:
            raise ValueError(
                f"preactivations[{key!r}] must have the shape of layer "
                f"{graph.layer_names_[l]!r}'s rows, {expected}; got {shape}."
            )
        if not hasattr(z, "__getitem__") or not hasattr(z, "shape"):
            z = np.asarray(z, dtype=np.float64)
        check_preactivations(graph, key, l, z, activation, X, batch_size=batch_size,
                             dtype=dtype, device=device)
        patterns[l] = patterns_from_arrays(z, activation, tol=tol, batch_size=batch_size,
                                           dtype=dtype, device=device)
    return patterns


def check_preactivations(graph, key, l, z, activation, X, *, batch_size, dtype, device):
    """Refuse pre-activations that are not those of layer ``l``: ``X_l = act(z)``.

    Wrong ``z`` (another layer's, or a different activation) would give dead and
    synchronised counts of neurons that do not exist. With the layer's activations
    at hand every row is compared to rounding; with a fitted graph alone, the mean
    of ``act(z)`` is compared with the layer's fitted mean.
    """
    name = graph.layer_names_[l]
    if l == 0:
        raise ValueError(
            f"preactivations[{key!r}] is given for layer {name!r}, the first layer: it "
            "is the network's input, no activation's output, so it has no dead, "
            "always-on or synchronised neurons. Give pre-activations only for layers "
            "that are an elementwise activation's output."
        )
    from ..cache import ActivationCache

    if isinstance(X, ActivationCache):
        X_l = X.activations(name)
    elif X is not None:
        X_l = X[l]
    else:
        X_l = None
    size = batch_size or 4096
    n = int(z.shape[0])
    worst, scale, total = 0.0, 0.0, None
    with torch.no_grad():
        for start in range(0, n, size):
            a = activation(as_tensor(z[start:start + size], device=device, dtype=dtype))
            if X_l is not None:
                x = as_tensor(X_l[start:start + size], device=device, dtype=dtype)
                worst = max(worst, float((a - x).abs().max()))
                scale = max(scale, float(x.abs().max()))
            else:
                part = a.sum(0)
                total = part if total is None else total + part
    if X_l is not None:
        # Rounding of the model's own activation in the arrays' precision, with
        # room for a different kernel: far below any real mismatch.
        stored = getattr(X_l, "dtype", np.float64)
        if isinstance(stored, torch.dtype):
            eps = torch.finfo(stored).eps if stored.is_floating_point else 2.0**-52
        else:
            eps = np.finfo(stored).eps if np.dtype(stored).kind == "f" else 2.0**-52
        if worst > 64 * eps * max(1.0, scale):
            raise ValueError(
                f"preactivations[{key!r}] are not the pre-activations of layer {name!r}: "
                f"activation(preactivations) differs from the layer's activations by up "
                f"to {worst:.3g} (the activations reach {scale:.3g}). Pass the inputs "
                "of the elementwise activation whose output this layer records, and "
                "that activation as `activation`."
            )
        return
    basis = graph.bases_[l]
    if not graph.center or total is None:
        return
    mean = total / n
    fitted = torch.as_tensor(np.asarray(basis.mean_), dtype=dtype, device=device)
    gap = float((mean - fitted).abs().max())
    spread = float(fitted.abs().max()) + math.sqrt(
        max(float(np.max(np.diag(np.asarray(basis.gram_)))), 0.0))
    if gap > 1e-6 * max(spread, np.finfo(np.float64).tiny):
        raise ValueError(
            f"preactivations[{key!r}] are not the pre-activations of layer {name!r}: "
            f"the mean of activation(preactivations) differs from the layer's fitted "
            f"mean by up to {gap:.3g} (its scale is {spread:.3g}). Pass the inputs of "
            "the elementwise activation whose output this layer records, and that "
            "activation as `activation`."
        )
