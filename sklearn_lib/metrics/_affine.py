"""A fitted transformer read as an affine map ``x -> x @ A + b``, and checked to be one.

The scorer, :class:`~sklearn_lib.InteractionPipeline` (which carries Jacobians
through the steps before a basis as ``J @ inv(A).T``) and the ablation curves
all need the linear map of a fitted transformer. It is read off ``transform``
at the data's mean and a step along each axis, then verified, because a map that
is affine where it was looked at but not elsewhere would be silently
misrepresented, and with it every Jacobian carried through it: a clip that only
a few rows reach, a step that is the identity on the data's subspace but not
across it. The verification points are every row of the data and points beside
it: rows pushed outwards and reflected through the mean, midpoints of pairs, and
random points in every direction of the input space. Affine means equal to
``x @ A + b`` up to a relative ``sqrt(eps)`` of the output's dtype: many orders
above the rounding of any affine step, and a bound on the error any accepted
step makes in the Jacobians.
"""

from typing import NamedTuple

import numpy as np
import scipy.sparse
import torch
from sklearn.pipeline import Pipeline

from ..utils._threads import lapack_threads
from ..utils._validation import check_real_values, check_tensor

# Float64 numbers per chunk of data rows checked at once (16 MiB).
_CHUNK_NUMBERS = 2**21
# Points of each kind beside the data (pushed out, reflected, midpoints, random).
_N_BESIDE = 16
# Random directions of the output along which departures are measured.
_N_DIRECTIONS = 4

_NEED = ("A linear basis is needed here: an affine transformer such as InteractionBasis, "
         "PCA or StandardScaler, or a Pipeline of them.")


class AffineMap(NamedTuple):
    """A fitted affine basis read off by probing: ``z = x @ A + b = (x - mean) @ A``,
    ``x = z @ P + c``."""

    mean: np.ndarray
    A: np.ndarray
    b: np.ndarray
    P: np.ndarray
    c: np.ndarray


def _as_float_matrix(X):
    """Data as a 2-D float64 numpy array (DataFrames and tensors included)."""
    if isinstance(X, torch.Tensor):
        X = check_tensor(X, "X", ndim=2, shape="(n_samples, n_features)").detach().cpu()
        X = X.numpy()
    elif hasattr(X, "columns"):
        X = X.to_numpy()
    X = np.asarray(check_real_values(X, "X"), dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}.")
    return X


def _like(sample, points):
    """``points`` in ``sample``'s container: a DataFrame with its columns, else numpy.

    A step fitted on a DataFrame warns when given an array (scikit-learn's
    feature-name check), and a pipeline with ``set_output(transform="pandas")``
    hands its later steps DataFrames: probes go in as the data did.
    """
    columns = getattr(sample, "columns", None)
    if columns is None or isinstance(sample, torch.Tensor):
        return points
    library = type(sample).__module__.partition(".")[0]
    if library == "pandas":
        import pandas as pd

        return pd.DataFrame(points, columns=columns)
    if library == "polars":
        import polars as pl

        return pl.DataFrame(points, schema=list(columns), orient="row")
    return points


def _transform(estimator, sample, points, n_outputs=None, method="transform"):
    """``estimator.<method>`` at ``points`` as float64 numpy, and the eps of its output's dtype."""
    # Points beside the data may leave a step's domain (a log, a square root):
    # numpy's warnings about it would be ours, not the user's, and the
    # non-finite values they produce are refused below.
    with np.errstate(all="ignore"):
        out = getattr(estimator, method)(_like(sample, points))
    if scipy.sparse.issparse(out):
        out = out.toarray()
    elif isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    out = np.asarray(out)
    dtype = out.dtype if np.issubdtype(out.dtype, np.floating) else np.dtype(np.float64)
    out = out.astype(np.float64)
    if out.ndim != 2 or len(out) != len(points) or n_outputs not in (None, out.shape[1]):
        raise ValueError(
            f"{method} of {type(estimator).__name__} returned shape {out.shape} for "
            f"{len(points)} rows; an affine map gives (n_rows, n_outputs)"
            + ("." if n_outputs is None else f" with n_outputs = {n_outputs}.")
        )
    return out, np.finfo(dtype).eps


def _beside(values, mean, spread):
    """Points beside the data, deterministic: rows pushed out and reflected, midpoints, random."""
    rng = np.random.default_rng(0)
    n, d = values.shape
    outlying = np.argsort(-np.abs((values - mean) / spread).max(1))[: _N_BESIDE // 2]
    rows = values[np.r_[outlying, rng.integers(n, size=_N_BESIDE - len(outlying))]]
    pairs = rng.integers(n, size=(_N_BESIDE, 2))
    return np.vstack([
        mean + 3 * (rows - mean),
        mean - 2 * (rows - mean),
        (values[pairs[:, 0]] + values[pairs[:, 1]]) / 2,
        mean + 3 * spread * rng.standard_normal((_N_BESIDE, d)),
    ])


def _excess(actual, points, center, at_center, A, b, steps, eps, directions):
    """Per point, the departure from the affine map in units of what rounding allows, and relative.

    The map is predicted from the data's centre, ``T(center) + (x - center) @ A``,
    whose terms have the size of the output. Allowed: ``sqrt(eps)`` of that size,
    plus many times the rounding of ``x @ A + b`` computed from raw coordinates
    (a step that does not centre first rounds at the size of ``|center| @ |A| + |b|``,
    and then ``A``, read off over ``steps``, is off by that much over the steps).
    Departures are compared along a few fixed random ``directions`` of the
    output, not entry by entry: a product with ``A @ directions`` (d, k) per row
    instead of with ``A`` (d, r) keeps the check at about the cost of one
    ``transform``, and a departure (or NaN) is missed by all of them with
    probability zero. Sizes are bounded with ``|A| @ |directions|``, and
    ``|x|`` by ``|x - center| + |center|``.
    """
    abs_A, abs_dirs = np.abs(A), np.abs(directions)
    shifted = points - center
    spread_size = np.abs(shifted) @ (abs_A @ abs_dirs)
    out_size = spread_size + np.abs(at_center) @ abs_dirs
    raw_size = spread_size + (np.abs(center) @ abs_A + np.abs(b)) @ abs_dirs * (
        1 + 2 * (np.abs(shifted) / steps).sum(1)
    )[:, None]
    allowed = np.sqrt(eps) * out_size + 64 * (16 + A.shape[0]) * eps * raw_size
    departure = np.abs(actual @ directions - (at_center @ directions + shifted @ (A @ directions)))
    tiny = np.finfo(np.float64).tiny
    with np.errstate(all="ignore"):
        excess = departure / np.maximum(allowed, tiny)
        relative = departure / np.maximum(out_size, tiny)
    # NaN (a non-finite transform) counts as an infinite departure.
    excess = np.where(np.isnan(excess), np.inf, excess).max(1, initial=0.0)
    return excess, np.where(np.isnan(relative), np.inf, relative).max(1, initial=0.0)


def _affine_map(estimator, sample, *, name="estimator", need=_NEED, inverse=True):
    """Read a fitted transformer as ``x @ A + b`` and refuse it unless it is affine around ``sample``.

    ``A`` and ``b`` are read off ``transform`` at the data's mean and one
    standard deviation beyond it along each axis (inside the region the map is
    used on, and, for maps that centre first as scalers, PCA and bases do,
    without losing digits to the data's offset); the left inverse ``P`` (and
    offset ``c``) comes from ``inverse_transform`` when the estimator has one (so that PCA and
    InteractionBasis are used with their own reconstructions), else it is the
    pseudo-inverse. Then the map is checked on every row of ``sample`` and on
    points beside it (see the module description). Probes are passed in the
    container ``sample`` is (a DataFrame with its columns, or an array).

    Parameters
    ----------
    estimator : fitted transformer
    sample : array-like, DataFrame or tensor of shape (n_samples, n_features)
        The data the map is used on.
    name : str
        How messages name the estimator.
    need : str
        What messages say is needed instead of a non-affine map.
    inverse : bool, default=True
        Whether to read (and check) the left inverse; when False, ``P`` and ``c``
        are None.

    Returns
    -------
    AffineMap
    """
    values = _as_float_matrix(sample)
    n_features = values.shape[1]
    center = values.mean(0)
    spread = values.std(0)
    # A constant feature is stepped along as far as the data reach.
    spread[~(spread > 0)] = max(1.0, np.abs(values).max(initial=0.0))
    # Steps of at least 1e3 ulps of the centre, and their size as represented.
    ahead = center + np.maximum(spread, 1e3 * np.finfo(np.float64).eps * np.abs(center))
    steps = ahead - center
    probe, eps = _transform(estimator, sample,
                            np.vstack([center, center + np.diag(steps)]))

    def refuse(reason):
        if isinstance(estimator, Pipeline):
            _refuse_first_non_affine_step(estimator, sample, name, need)
        raise ValueError(f"{name} ({type(estimator).__name__}) is not affine: {reason} {need}")

    if not np.isfinite(probe).all():
        refuse("its transform is not finite at the data's mean or a step beside it.")
    at_center, A = probe[0], (probe[1:] - probe[0]) / steps[:, None]
    b = at_center - center @ A
    chunk = max(1, _CHUNK_NUMBERS // max(n_features, A.shape[1]))
    checks = [(start, values[start:start + chunk]) for start in range(0, len(values), chunk)]
    checks.append((None, _beside(values, center, spread)))
    directions = np.random.default_rng(0).standard_normal((A.shape[1], _N_DIRECTIONS))
    for start, points in checks:
        actual, _ = _transform(estimator, sample, points, n_outputs=A.shape[1])
        excess, relative = _excess(actual, points, center, at_center, A, b, steps, eps,
                                   directions)
        worst = int(np.argmax(excess))
        if excess[worst] > 1:
            where = "beside the data" if start is None else f"at X[{start + worst}]"
            refuse(f"{where}, its transform departs from the affine map x @ A + b read off "
                   f"it by {relative[worst]:.1e} of the values' size, more than rounding "
                   "can.")
    if not inverse:
        c = P = None
    elif hasattr(estimator, "inverse_transform"):
        r = A.shape[1]
        c, P, inverse_eps = _read_inverse(estimator, np.ones(r), n_features)
        # Differences over unit steps lose the digits of a large offset c (data
        # far from the origin): read P again over steps that reach as far as c.
        size = np.abs(P).max(1)
        far = np.maximum(1.0, np.abs(c).max(initial=0.0) / np.where(size > 0, size, 1.0))
        if np.isfinite(far).all() and np.any(far > 1):
            c, P, inverse_eps = _read_inverse(estimator, far, n_features)
        # The scorer's J @ P.T and the ablation's reconstructions need a left
        # inverse, transform(inverse_transform(z)) = z: P @ A = I, c @ A + b = 0.
        # A FunctionTransformer without inverse_func says the identity is one.
        # Sizes bound the rounding of each side; b = T(center) - center @ A
        # carries that of its two terms, however small b itself.
        tolerance = np.sqrt(max(eps, inverse_eps))
        product = np.vstack([P, c]) @ A + np.vstack([-np.eye(r), b])
        size = np.vstack([np.abs(P) @ np.abs(A) + 1,
                          (np.abs(c) + np.abs(center)) @ np.abs(A) + np.abs(at_center)])
        if not np.all(np.abs(product) <= tolerance * size):
            raise ValueError(
                f"{name} ({type(estimator).__name__}) has an inverse_transform that does not "
                "undo its transform (transform(inverse_transform(z)) != z), so its "
                "directions cannot be read back; a FunctionTransformer needs an "
                "inverse_func for that. Give it its true inverse, or drop "
                "inverse_transform (the pseudo-inverse of the transform is used then)."
            )
    else:
        # Small dense LAPACK calls on one thread: see utils._threads.lapack_threads.
        with lapack_threads(A):
            c, P = np.zeros(n_features), np.linalg.pinv(A)
    # x @ A + b = (x - mean) @ A with mean solving mean @ A = -b; any such mean
    # gives the same Z, and least squares finds one.
    with lapack_threads(A):
        mean = -np.linalg.lstsq(A.T, b, rcond=None)[0]
    return AffineMap(mean, A, b, P, c)


def _read_inverse(estimator, steps, n_features):
    """Offset ``c`` and matrix ``P`` of ``inverse_transform``, by differences over ``steps``."""
    r = len(steps)
    back, eps = _transform(estimator, None, np.vstack([np.zeros(r), np.diag(steps)]),
                           n_outputs=n_features, method="inverse_transform")
    return back[0], (back[1:] - back[0]) / steps[:, None], eps


def _refuse_first_non_affine_step(pipeline, sample, name, need):
    """Raise the refusal of the first step of ``pipeline`` that is not affine on its input."""
    Xt = sample
    for step_name, step in pipeline.steps:
        if step is None or (isinstance(step, str) and step == "passthrough"):
            continue
        _affine_map(step, Xt, name=f"step {step_name!r} of {name}", need=need, inverse=False)
        Xt = step.transform(Xt)
