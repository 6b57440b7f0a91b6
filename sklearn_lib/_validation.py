"""Input checks shared by the estimators, phrased as "expected ..., got ...".

Large inputs (Jacobians are n x o x d) are never copied or scanned whole here:
shapes are checked up front and finiteness chunk by chunk, as the data are used.
"""

import numpy as np
import torch


def check_jacobians(jacobians, X_shape, *, n_outputs=None, name="jacobians"):
    """Check that ``jacobians`` is (n_samples, n_outputs, n_features) for ``X_shape``.

    Returns ``jacobians`` unchanged (lists are turned into arrays). A transposed
    array (n_samples, n_features, n_outputs) is reported as such: scikit-learn's
    metadata routing only checks the first axis and would pass it through.
    """
    if jacobians is None:
        return None
    if not isinstance(jacobians, (np.ndarray, torch.Tensor)):
        jacobians = np.asarray(jacobians)
    n_samples, n_features = X_shape
    shape = tuple(jacobians.shape)
    expected = f"({n_samples}, n_outputs, {n_features})"
    if len(shape) != 3:
        raise ValueError(
            f"{name} must be 3-D with shape (n_samples, n_outputs, n_features) = "
            f"{expected}, got an array of shape {shape}."
        )
    if shape[0] != n_samples:
        raise ValueError(
            f"{name} must have one Jacobian per sample of X: expected shape {expected}, "
            f"got {shape} (X has {n_samples} samples)."
        )
    if shape[2] != n_features:
        hint = (
            " It looks transposed: pass J with the derivative axis (features of X) "
            "last, e.g. np.swapaxes(J, 1, 2)."
            if shape[1] == n_features
            else ""
        )
        raise ValueError(
            f"{name} must differentiate with respect to the {n_features} features of X "
            f"on its last axis: expected shape {expected}, got {shape}.{hint}"
        )
    if n_outputs is not None and shape[1] != n_outputs:
        raise ValueError(
            f"{name} has {shape[1]} outputs but the estimator was fitted with "
            f"{n_outputs}: expected shape ({n_samples}, {n_outputs}, {n_features}), "
            f"got {shape}."
        )
    if not (jacobians.dtype.is_floating_point if isinstance(jacobians, torch.Tensor)
            else np.issubdtype(jacobians.dtype, np.number)):
        raise ValueError(f"{name} must be numeric, got dtype {jacobians.dtype}.")
    return jacobians


def check_finite(t, name):
    """Raise if the tensor ``t`` holds NaN or inf (one reduction; one sync on GPU)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinity.")
