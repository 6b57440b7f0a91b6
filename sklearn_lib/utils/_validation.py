"""Input checks shared by the estimators, phrased as "expected ..., got ...".

Large inputs (Jacobians are n x o x d) are never copied or scanned whole here:
shapes and dtypes are checked up front and finiteness chunk by chunk, as the
data are used. Arrays that are read slice by slice (``np.memmap``, zarr) stay
lazy; only nested sequences and object arrays are converted.
"""

import numpy as np
import torch
from scipy import sparse


def check_tensor(t, name, *, ndim, shape):
    """Refuse a tensor that is sparse, complex, not floating or not ``ndim``-D.

    ``shape`` describes the expected shape in words for the message, e.g.
    ``"(n_samples, n_features)"``.
    """
    if t.layout != torch.strided:
        raise ValueError(
            f"{name} is a sparse tensor (layout {t.layout}); expected a dense tensor "
            f"of shape {shape}: pass {name}.to_dense()."
        )
    if t.dtype.is_complex:
        raise ValueError(
            f"Complex data not supported: {name} must hold real numbers, got a tensor "
            f"of dtype {t.dtype}."
        )
    if not t.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a floating-point tensor (e.g. torch.float64) of shape "
            f"{shape}, got dtype {t.dtype}."
        )
    if t.ndim != ndim:
        raise ValueError(
            f"{name} must be a {ndim}-D tensor of shape {shape}, got shape "
            f"{tuple(t.shape)}."
        )
    return t


def check_real_values(a, name):
    """Return ``a`` with a real (bool, integer or float) dtype, or raise saying why not.

    For anything but tensors (see :func:`check_tensor`). DataFrames are returned
    unchanged: scikit-learn validates them and keeps their column names. Nested
    sequences are converted with :func:`numpy.asarray` (a ragged one is
    refused), object arrays are converted to float64 (an element that is not a
    number is refused), and arrays with a dtype (ndarray, memmap, zarr) are
    returned unchanged after a look at the dtype, so nothing large is read.
    """
    if sparse.issparse(a):
        raise TypeError(
            f"{name} is a scipy sparse {type(a).__name__}; expected a dense array "
            f"(use {name}.toarray())."
        )
    if not hasattr(a, "dtype") and hasattr(a, "columns"):
        return a
    if not hasattr(a, "dtype"):
        try:
            a = np.asarray(a)
        except ValueError:
            raise ValueError(
                f"{name} must be a rectangular array; got a nested sequence whose "
                "rows have different lengths (a ragged list)."
            ) from None
    kind = np.dtype(a.dtype).kind
    if kind in "USa":
        raise ValueError(f"{name} must hold real numbers, got strings (dtype {a.dtype}).")
    if kind == "c":
        raise ValueError(
            f"Complex data not supported: {name} must hold real numbers, got dtype "
            f"{a.dtype}."
        )
    if kind == "O":
        try:
            return np.asarray(a, dtype=np.float64)
        except (TypeError, ValueError) as error:
            # The type is kept: scikit-learn's own checks expect a TypeError for
            # objects that are neither numbers nor strings.
            raise type(error)(
                f"{name} must hold real numbers; one of its elements is not one ({error})."
            ) from None
    if kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}.")
    return a


def check_jacobians(jacobians, X_shape, *, n_outputs=None, name="jacobians"):
    """Check that ``jacobians`` is (n_samples, n_outputs, n_features) for ``X_shape``.

    Returns ``jacobians`` unchanged (lists and object arrays are turned into
    arrays). A transposed array (n_samples, n_features, n_outputs) is reported
    as such: scikit-learn's metadata routing only checks the first axis and
    would pass it through. ``n_outputs``, when given, is the number of outputs
    the estimator was fitted with.
    """
    if jacobians is None:
        return None
    n_samples, n_features = X_shape
    expected = f"({n_samples}, n_outputs, {n_features})"
    if isinstance(jacobians, torch.Tensor):
        check_tensor(jacobians, name, ndim=3, shape=expected)
    else:
        jacobians = check_real_values(jacobians, name)
    shape = tuple(jacobians.shape)
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
    if shape[1] == 0:
        raise ValueError(
            f"{name} has 0 outputs (shape {shape}): a Jacobian needs at least one "
            "downstream output; pass jacobians=None for the identity map."
        )
    if n_outputs is not None and shape[1] != n_outputs:
        raise ValueError(
            f"{name} has {shape[1]} outputs but the estimator was fitted with "
            f"{n_outputs}: expected shape ({n_samples}, {n_outputs}, {n_features}), "
            f"got {shape}."
        )
    return jacobians


def check_not_jacobians(y, method, usage=None):
    """Refuse a ``y`` that can only be Jacobians passed positionally.

    ``fit(X, J)`` binds ``J`` to ``y``, which these estimators ignore: the fit
    would silently be PCA's. No target of a scikit-learn estimator is 3-D, so a
    3-D ``y`` is refused; 1-D and 2-D targets are left alone, since a
    :class:`~sklearn.pipeline.Pipeline` passes its own ``y`` to every step.
    ``usage`` is the call to suggest instead (default ``method(X, jacobians=J)``).
    """
    ndim = getattr(y, "ndim", None)
    if ndim is None and isinstance(y, (list, tuple)):
        try:
            ndim = np.ndim(y)
        except ValueError:  # ragged: not an array, so not Jacobians either
            ndim = None
    if ndim is not None and ndim >= 3:
        raise ValueError(
            f"{method} got a {ndim}-D array as y, its second positional argument; "
            "Jacobians must be passed by keyword: "
            f"{usage or method + '(X, jacobians=J)'}. (y is ignored, so the Jacobians "
            "would have been ignored too.)"
        )


def check_edge_values(values, name):
    """Refuse NaN, infinite or negative entries of a float array of edge values.

    Edges (and the graph weights made from them) are squared attributions: a
    NaN, an infinity or a negative value means something upstream went wrong,
    and sorting or clustering them would hide it.
    """
    expected = f"{name} must hold finite non-negative values (edges are squared attributions)"
    if not values.size:
        return values
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ValueError(f"{expected}; got {bad} NaN or infinite value(s) among {values.size}.")
    if values.min() < 0:
        raise ValueError(
            f"{expected}; got {int(np.count_nonzero(values < 0))} negative value(s), "
            f"the smallest {float(values.min())!r}."
        )
    return values


def check_finite(t, name):
    """Raise if the tensor ``t`` holds NaN or inf (one reduction; one sync on GPU)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinity.")
