"""Interaction-sparsity metrics and the scorer that ranks bases by them.

An affine basis ``z = (x - mu) @ C`` with left inverse ``C_pinv`` turns the
downstream Jacobians ``J_x`` (o, d) into Jacobians with respect to the basis
coordinates, ``J_hat_x = J_x @ C_pinv.T`` (o, r). The edge between basis
direction ``j`` and output ``i`` is the squared gradient-times-activation
attribution ``E[i, j] = mean_x (J_hat_x[i, j] * z_x[j])^2``; a basis is better
the sparser that matrix is.
"""

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.utils.metadata_routing import MetadataRequest
from sklearn.utils.validation import check_is_fitted

from ..utils._backend import as_tensor, gen_batches, resolve_device
from ..utils._validation import (
    check_edge_values,
    check_finite,
    check_jacobians,
    check_not_jacobians,
    check_real_values,
)
from ._affine import _affine_map, _as_float_matrix

_METRICS = ("gini", "edges_for_90")


def gini(values):
    """Gini coefficient of non-negative values: 0 when all equal, ``1 - 1/N`` for one spike.

    Uses the sorted form ``sum_i (2i - N - 1) v_(i) / (N sum_i v_i)`` over the
    ascending values ``v_(1) <= ... <= v_(N)``.

    Parameters
    ----------
    values : array-like of non-negative floats (any shape; flattened)

    Returns
    -------
    float

    Examples
    --------
    >>> from sklearn_lib.metrics import gini
    >>> gini([1.0, 1.0, 1.0, 1.0])
    0.0
    >>> gini([0.0, 0.0, 0.0, 4.0])
    0.75
    """
    v = np.sort(_check_edge_values(values, "gini"))
    if v.size == 0:
        raise ValueError("gini needs at least one value, got an empty array.")
    total = v.sum()
    if total == 0:
        return 0.0
    n = v.size
    ranks = np.arange(1, n + 1)
    return float(((2 * ranks - n - 1) @ v) / (n * total))


def edges_to_reach(values, fraction=0.9):
    """Fewest edges whose sum reaches ``fraction`` of the total attribution.

    Parameters
    ----------
    values : array-like of non-negative floats (flattened)
    fraction : float in (0, 1]

    Returns
    -------
    int

    Examples
    --------
    >>> from sklearn_lib.metrics import edges_to_reach
    >>> edges_to_reach([5.0, 3.0, 1.0, 1.0], fraction=0.8)
    2
    """
    if not isinstance(fraction, Real) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}.")
    v = np.sort(_check_edge_values(values, "edges_to_reach"))[::-1]
    total = v.sum()
    if total == 0:
        return 0
    # The tolerance keeps fraction=1 from asking for edges beyond rounding.
    cumulative = np.cumsum(v) / total
    return int(np.searchsorted(cumulative, fraction - 1e-12) + 1)


def _check_edge_values(values, caller):
    """The values as a flat float64 array, refused unless finite and non-negative."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    v = np.asarray(check_real_values(values, f"the values passed to {caller}"),
                   dtype=np.float64).ravel()
    return check_edge_values(v, f"the values passed to {caller}")


def _sparsity(E, metric):
    if metric == "gini":
        return gini(E)
    # Fewer edges is sparser; negate so that higher stays better for scorers.
    return -float(edges_to_reach(E, 0.9))


def interaction_edges(
    X, jacobians, mean, components, inverse_components, *, batch_size=None,
    device="cpu", dtype=torch.float64,
):
    """Edge matrix ``E`` (o, r) between basis directions and downstream outputs.

    Parameters
    ----------
    X : array-like or tensor of shape (n_samples, n_features)
    jacobians : array-like or tensor of shape (n_samples, n_outputs, n_features), or None
        None means the identity downstream map (``o = d``).
    mean : tensor (d,); components : tensor (d, r) (``C``); inverse_components : tensor (r, d)
    batch_size : int or None
        Samples per chunk; memory is bounded by ``batch_size * o * max(d, r)``.

    Returns
    -------
    torch.Tensor of shape (n_outputs, n_components)
    """
    device = resolve_device(device)
    n = X.shape[0]
    r = components.shape[1]
    o = components.shape[0] if jacobians is None else jacobians.shape[1]
    total = torch.zeros(o, r, device=device, dtype=dtype)
    for rows in gen_batches(n, batch_size):
        chunk = as_tensor(X[rows], device=device, dtype=dtype)
        check_finite(chunk, "X")
        Z = (chunk - mean) @ components
        if jacobians is None:
            # J_x = I: J_hat_x = C_pinv.T for every sample.
            total += inverse_components.T.square() * Z.square().sum(0)
        else:
            J = as_tensor(jacobians[rows], device=device, dtype=dtype)
            check_finite(J, "jacobians")
            J_hat = J @ inverse_components.T
            total += (J_hat * Z[:, None, :]).square().sum(0)
    return total / n


def _is_skipped(step):
    """A step that is no estimator: None, ``"passthrough"`` or ``"drop"``."""
    return step is None or isinstance(step, str)


def _parts(estimator):
    """``(name, part)`` of the meta-estimators whose parts see (some of) their input.

    Pipeline steps, FeatureUnion and ColumnTransformer transformers (the fitted
    ones once fitted); nothing for any other estimator.
    """
    if isinstance(estimator, Pipeline):
        parts = estimator.steps
    elif isinstance(estimator, FeatureUnion):
        parts = estimator.transformer_list
    elif isinstance(estimator, ColumnTransformer):
        parts = [part[:2] for part in getattr(estimator, "transformers_", estimator.transformers)]
    else:
        return []
    return [(name, part) for name, part in parts if not _is_skipped(part)]


def _bases(estimator):
    """The interaction bases (estimators that check their downstream) in ``estimator`` or its parts."""
    if callable(getattr(estimator, "_check_downstream", None)):
        return [estimator]
    return [basis for _, part in _parts(estimator) for basis in _bases(part)]


def _fitted_with_jacobians(bases):
    return any(getattr(basis, "n_outputs_", None) is not None for basis in bases)


def _check_fitted_downstream(estimator, X, jacobians):
    """Refuse scoring an interaction basis against a map it was not fitted to.

    Every :class:`~sklearn_lib.InteractionBasis` among the estimator (or among
    the parts of pipelines, feature unions and column transformers in it, at any
    depth) checks the scoring Jacobians against those it was fitted with
    (``_check_downstream``; a PCA has no such check, it is legitimately scored
    against any map). An interaction basis fitted with Jacobians after other
    steps of a scikit-learn ``Pipeline`` got Jacobians with respect to the
    pipeline's input, not its own, unless the pipeline carries them through the
    steps (``_carries_jacobians``, set by
    :class:`~sklearn_lib.InteractionPipeline`, which also fits the plain
    pipelines nested in it so) or those steps leave the linear part unchanged (a
    shift leaves Jacobians unchanged). One in a ``ColumnTransformer`` got them
    with respect to all of its input columns, not its own.
    """
    n_outputs = None if jacobians is None else jacobians.shape[1]
    _check_part(estimator, X, n_outputs, carried=False)


def _check_part(estimator, X, n_outputs, *, carried):
    check = getattr(estimator, "_check_downstream", None)
    if callable(check):
        check(n_outputs)
        return
    if isinstance(estimator, ColumnTransformer):
        bases = _bases(estimator)
        for basis in bases:
            basis._check_downstream(n_outputs)
        if n_outputs is not None and _fitted_with_jacobians(bases):
            raise ValueError(_IN_COLUMN_TRANSFORMER)
        return
    if isinstance(estimator, FeatureUnion):
        # Every transformer of a union sees the union's input.
        for _, part in _parts(estimator):
            _check_part(part, X, n_outputs, carried=carried)
        return
    if not isinstance(estimator, Pipeline):
        return
    carried = carried or getattr(estimator, "_carries_jacobians", False)
    steps = estimator.steps
    for k, (name, step) in enumerate(steps):
        bases = [] if _is_skipped(step) else _bases(step)
        if not bases:
            continue
        Xk = X
        if any(not _is_skipped(s) for _, s in steps[:k]):
            before = estimator[:k]
            if not carried and n_outputs is not None and _fitted_with_jacobians(bases):
                linear = _affine_map(before, X, name=f"the steps before {name!r}",
                                     inverse=False).A
                d = X.shape[1]
                if linear.shape != (d, d) or not np.allclose(linear, np.eye(d), rtol=0,
                                                             atol=1e-8):
                    raise ValueError(
                        f"Step {name!r} of the Pipeline holds an InteractionBasis fitted on "
                        f"the output of the steps before it "
                        f"({', '.join(n for n, _ in steps[:k])}), but the Jacobians routed "
                        "to it are with respect to the Pipeline's input: scikit-learn's "
                        "Pipeline passes metadata to every step unchanged, so its basis "
                        "and this score are wrong. Build the pipeline with "
                        "sklearn_lib.make_interaction_pipeline, which carries the Jacobians "
                        "through the preceding affine steps (J @ inv(A).T), or make the "
                        "InteractionBasis the first step."
                    )
            if _parts(step):
                Xk = before.transform(X)
        _check_part(step, Xk, n_outputs, carried=carried)


_IN_COLUMN_TRANSFORMER = (
    "An InteractionBasis inside a ColumnTransformer was given the Jacobians routed to "
    "the ColumnTransformer, which differentiate with respect to all of its input "
    "columns, in their order, not the columns the basis is fitted on: its basis would "
    "be wrong. Fit the basis on its columns on its own, with the Jacobians of those "
    "columns (J[:, :, columns]), or put it after the ColumnTransformer in a "
    "make_interaction_pipeline, which carries the Jacobians through affine steps."
)


class InteractionSparsityScorer:
    """Score any fitted affine transformer by the held-out sparsity of its interactions.

    Called as ``scorer(estimator, X, y=None, *, jacobians=None)``. The linear map
    of the estimator (an :class:`~sklearn_lib.InteractionBasis`, a
    :class:`~sklearn.decomposition.PCA`, a :class:`~sklearn.pipeline.Pipeline` of
    affine steps) is found by probing ``transform`` (and ``inverse_transform``
    for the left inverse), then the edge matrix between its directions and the
    downstream outputs is computed on ``X`` with ``jacobians`` and summarised.
    Higher is sparser, so ``GridSearchCV(scoring=InteractionSparsityScorer())``
    ranks PCA and interaction bases on one scale.

    The scorer requests ``jacobians`` through metadata routing by default.

    Parameters
    ----------
    metric : {"gini", "edges_for_90"}, default="gini"
        ``"gini"``: Gini coefficient of the edge matrix. ``"edges_for_90"``:
        minus the number of edges carrying 90% of the total attribution.
    batch_size : int or None, default=None
        Samples per chunk when computing edges.

    See Also
    --------
    sklearn_lib.InteractionBasis.score : The same score for an interaction basis.
    gini : The Gini coefficient.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.decomposition import PCA
    >>> from sklearn_lib.metrics import InteractionSparsityScorer
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(50, 4))
    >>> J = np.broadcast_to(rng.normal(size=(3, 4)), (50, 3, 4))
    >>> scorer = InteractionSparsityScorer()
    >>> 0 <= scorer(PCA(2).fit(X), X, jacobians=J) <= 1
    True
    """

    def __init__(self, metric="gini", batch_size=None):
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}.")
        if batch_size is not None and (
            not isinstance(batch_size, Integral) or isinstance(batch_size, bool)
            or batch_size < 1
        ):
            raise ValueError(
                f"batch_size must be a positive integer or None, got {batch_size!r}."
            )
        self.metric = metric
        self.batch_size = batch_size

    def __repr__(self):
        return f"InteractionSparsityScorer(metric={self.metric!r})"

    def __call__(self, estimator, X, y=None, *, jacobians=None):
        check_not_jacobians(y, "InteractionSparsityScorer",
                            usage="scorer(estimator, X, jacobians=J)")
        if not callable(getattr(estimator, "transform", None)):
            raise TypeError(
                "InteractionSparsityScorer scores fitted affine transformers (with a "
                f"transform method); got {type(estimator).__name__}, which has none."
            )
        check_is_fitted(estimator)
        # The estimator is probed with X as given (a DataFrame keeps its columns).
        values = _as_float_matrix(X)
        jacobians = check_jacobians(jacobians, values.shape)
        _check_fitted_downstream(estimator, X, jacobians)
        affine = _affine_map(estimator, X)
        E = interaction_edges(
            values,
            jacobians,
            *(torch.as_tensor(a, dtype=torch.float64) for a in (affine.mean, affine.A, affine.P)),
            batch_size=self.batch_size,
        )
        return _sparsity(E.numpy(), self.metric)

    def get_metadata_routing(self):
        """Request ``jacobians`` for ``score`` (the method routers call on scorers)."""
        request = MetadataRequest(owner=self)
        request.score.add_request(param="jacobians", alias=True)
        return request
