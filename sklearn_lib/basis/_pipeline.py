"""A Pipeline that carries routed Jacobians through its affine steps.

scikit-learn's :class:`~sklearn.pipeline.Pipeline` routes metadata to every step
unchanged. Jacobians are not sample-aligned data like ``sample_weight``: they
are derivatives with respect to the pipeline's *input* features, and a step
``x -> x @ A + b`` (a scaler, a whitening) changes the features the next step
sees. By the chain rule (row vectors), the Jacobians with respect to the step's
output are ``J @ inv(A).T``. :class:`InteractionPipeline` applies that before
handing Jacobians to a step, so an :class:`~sklearn_lib.InteractionBasis` after a
scaler gets the basis it would get on the raw features (SPEC section 1, identity
(d)); it refuses steps for which the chain rule gives no Jacobians (a map that
is not affine, or not invertible).
"""

import inspect
from contextlib import contextmanager

import numpy as np
import sklearn
import torch
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import FeatureUnion, Pipeline, make_pipeline
from sklearn.utils import Bunch
from sklearn.utils.metadata_routing import process_routing
from sklearn.utils.validation import check_is_fitted

from ..metrics._affine import _affine_map
from ..metrics._sparsity import _IN_COLUMN_TRANSFORMER, _is_skipped
from ..utils._validation import check_jacobians

_NEED = (
    "InteractionPipeline carries Jacobians only through affine steps (scalers, PCA, "
    "whitening, InteractionBasis, column selections of them): put non-affine steps "
    "after the InteractionBasis, or fit the basis on their output with the Jacobians "
    "with respect to it."
)


class InteractionPipeline(Pipeline):
    """A :class:`~sklearn.pipeline.Pipeline` that expresses routed Jacobians in each step's input.

    Before a step receives ``jacobians`` (in ``fit``, ``fit_transform`` or the
    final step's ``score``), the fitted steps before it are probed as one
    affine map ``x -> x @ A + b`` and the Jacobians, given with respect to the
    pipeline's input, become ``J @ inv(A).T``, the Jacobians with respect to the
    step's input. Steps before it must be affine and invertible (scalers,
    full-rank whitening); otherwise a ``ValueError`` names the first that is
    not. The probe checks the map on every training row and on points beside
    them, so a step that is affine on some rows only is refused too.

    Plain scikit-learn ``Pipeline`` objects nested in it (as steps, or in a
    ``FeatureUnion`` step, at any depth) are fitted and scored as
    ``InteractionPipeline`` objects, so a basis deep inside gets Jacobians with
    respect to its own input; an InteractionBasis inside a ``ColumnTransformer``
    is refused (its Jacobians would be those of all the columns). Everything
    else is scikit-learn's ``Pipeline``. Build one with
    :func:`make_interaction_pipeline`.

    With metadata routing enabled, the Jacobians are passed as ``jacobians=``;
    without it, as ``<step>__jacobians=`` to ``fit`` (as for any ``Pipeline``)
    and as ``jacobians=`` to ``score``. The steps' training input is held while
    ``fit`` runs (to check that the steps before are affine on it) and released
    afterwards.

    Parameters
    ----------
    steps, memory, verbose
        As for :class:`~sklearn.pipeline.Pipeline`.
    transform_input : list of str, default=None
        As for :class:`~sklearn.pipeline.Pipeline`, except that ``"jacobians"`` is
        refused: the pipeline carries them by the chain rule, not by ``transform``.

    See Also
    --------
    make_interaction_pipeline : Build one from estimators, naming the steps.
    sklearn_lib.metrics.InteractionSparsityScorer : Scores the pipeline as a whole,
        with the Jacobians with respect to its input.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.preprocessing import StandardScaler
    >>> from sklearn_lib import InteractionBasis, make_interaction_pipeline
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 3)) * [1.0, 10.0, 100.0]
    >>> J = np.broadcast_to(rng.normal(size=(2, 3)), (200, 2, 3))
    >>> pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis())
    >>> pipe = pipe.fit(X, interactionbasis__jacobians=J)
    >>> raw = InteractionBasis().fit(X, jacobians=J)
    >>> np.allclose(pipe[-1].interaction_strengths_, raw.interaction_strengths_)
    True
    """

    # Read by InteractionSparsityScorer: Jacobians reaching a step of this pipeline
    # (or of a plain Pipeline nested in it) are with respect to that step's input,
    # so it need not refuse such a step.
    _carries_jacobians = True

    def fit(self, X, y=None, **params):
        """Fit the steps in turn, each with Jacobians with respect to its own input.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input of the first step.
        y : None or array-like
            Passed to every step, as by ``Pipeline``.
        **params : dict
            Metadata, ``jacobians`` included (see the class description).

        Returns
        -------
        self : object
            The fitted pipeline.
        """
        self._check_fit_params(params)
        with self._carrying(X):
            return super().fit(X, y, **params)

    def fit_transform(self, X, y=None, **params):
        """Fit as :meth:`fit` does, then transform ``X`` with the fitted pipeline.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : None or array-like
        **params : dict

        Returns
        -------
        Xt : ndarray of shape (n_samples, n_transformed_features)
        """
        self._check_fit_params(params)
        with self._carrying(X):
            return super().fit_transform(X, y, **params)

    def score(self, X, y=None, sample_weight=None, **params):
        """Score with the final step, its Jacobians expressed in its input.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : None or array-like
        sample_weight : array-like, default=None
            Passed on only when given (scikit-learn's ``Pipeline.score`` fails with
            routing enabled when no step's ``score`` accepts it).
        **params : dict
            Metadata for ``score``: with metadata routing, whatever the steps
            request (``jacobians`` included); without it, ``jacobians`` only,
            for the final step.

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        with self._carrying(None):
            final_name, final = self.steps[-1]
            if sklearn.get_config()["enable_metadata_routing"]:
                if sample_weight is not None:
                    params["sample_weight"] = sample_weight
                routed = process_routing(self, "score", **params)
                score_params = dict(routed[final_name].score)
            else:
                score_params = self._score_params_without_routing(final_name, final, params)
                if sample_weight is not None:
                    score_params["sample_weight"] = sample_weight
                routed = None
            Xt = X
            for name, step in self.steps[:-1]:
                if not _is_skipped(step):
                    Xt = step.transform(Xt, **({} if routed is None else routed[name].transform))
            if score_params.get("jacobians") is not None:
                score_params["jacobians"] = self._jacobians_for_step(
                    len(self.steps) - 1, score_params["jacobians"], X
                )
            return final.score(Xt, y, **score_params)

    @staticmethod
    def _score_params_without_routing(final_name, final, params):
        """``jacobians`` for the final step's score; anything else needs routing."""
        others = sorted(set(params) - {"jacobians"})
        if others:
            raise TypeError(
                f"InteractionPipeline.score got {others}: without metadata routing it "
                "passes only sample_weight and jacobians to the final step's score. "
                "Enable routing with sklearn.set_config(enable_metadata_routing=True) "
                "to pass other metadata."
            )
        if params.get("jacobians") is not None and not _takes(final, "score", "jacobians"):
            raise TypeError(
                f"InteractionPipeline.score got jacobians, but the final step "
                f"{final_name!r} ({type(final).__name__}) takes none in its score; score "
                "it with sklearn_lib.metrics.InteractionSparsityScorer instead."
            )
        return dict(params)

    def _check_fit_params(self, params):
        """Refuse, in our words, the ways of passing Jacobians that scikit-learn would misread."""
        if self.transform_input is not None and "jacobians" in self.transform_input:
            raise ValueError(
                "transform_input=['jacobians'] would have scikit-learn pass the Jacobians "
                "through the steps' transform as if they were samples (they are "
                "derivatives, with an axis more, and transform adds the offset b). "
                "InteractionPipeline already carries them through its affine steps by the "
                "chain rule (J @ inv(A).T): remove 'jacobians' from transform_input."
            )
        if "jacobians" in params and not sklearn.get_config()["enable_metadata_routing"]:
            keys = " and ".join(f"{key}=J" for key in _jacobian_keys(self)) or (
                "<step>__jacobians=J"
            )
            raise ValueError(
                f"{type(self).__name__}.fit got jacobians=, but metadata routing is off, "
                "and then a Pipeline takes parameters of its steps only as "
                f"<step>__<parameter>: pass {keys}. Or enable routing with "
                "sklearn.set_config(enable_metadata_routing=True), which GridSearchCV "
                "and cross_validate need anyway to give the Jacobians to the scorer."
            )

    @contextmanager
    def _carrying(self, X):
        """Hold the training input ``X`` (None when scoring) and fit nested plain
        Pipelines as InteractionPipelines, while the block runs."""
        if X is not None:
            self._fit_input = X
        try:
            with _nested_pipelines_carry(self):
                yield
        finally:
            if X is not None:
                del self._fit_input

    def _get_metadata_for_step(self, *, step_idx, step_params, all_params):
        # The hook through which scikit-learn's Pipeline (1.6+) hands every step
        # its routed metadata, after the steps before it have been fitted.
        step_params = super()._get_metadata_for_step(
            step_idx=step_idx, step_params=step_params, all_params=all_params
        )
        name, step = self.steps[step_idx]
        adapted = Bunch()
        done = {}
        for method, method_params in step_params.items():
            adapted[method] = Bunch(**method_params)
            # With routing the key is "jacobians"; without it, a nested pipeline's
            # step gets "<its step>__jacobians", which is converted here for the
            # steps of this pipeline and by the nested one for its own.
            for key, J in method_params.items():
                if J is None or not (key == "jacobians" or key.endswith("__jacobians")):
                    continue
                if _holds_column_transformer(step):
                    raise ValueError(f"Step {name!r}: {_IN_COLUMN_TRANSFORMER}")
                if not hasattr(self, "_fit_input"):
                    raise ValueError(
                        "InteractionPipeline carries Jacobians through its steps in fit, "
                        "fit_transform and score only."
                    )
                if id(J) not in done:
                    done[id(J)] = self._jacobians_for_step(step_idx, J, self._fit_input)
                adapted[method][key] = done[id(J)]
        return adapted

    def _jacobians_for_step(self, step_idx, jacobians, X):
        """``J @ inv(A).T`` for the affine map ``x @ A + b`` of the steps before ``step_idx``."""
        before = [name for name, step in self.steps[:step_idx] if not _is_skipped(step)]
        if not before:
            return jacobians
        name = self.steps[step_idx][0]
        jacobians = check_jacobians(jacobians, tuple(np.shape(X)))
        A = _affine_map(self[:step_idx], X, name=f"the steps before {name!r}", need=_NEED,
                        inverse=False).A
        d_in, d_out = A.shape
        if d_in != d_out or np.linalg.cond(A) > 1 / np.finfo(np.float64).eps:
            raise ValueError(
                f"The steps before {name!r} ({before}) map {d_in} features to {d_out} "
                + ("" if d_in != d_out else "by a singular linear map ")
                + "and cannot be undone: the Jacobians routed to the pipeline (with "
                f"respect to its {d_in} input features) have no chain-rule counterpart "
                f"for the input of {name!r}. Put the InteractionBasis before such steps."
            )
        inverse_T = np.linalg.inv(A).T
        if isinstance(jacobians, torch.Tensor):
            return jacobians @ torch.as_tensor(
                inverse_T, dtype=jacobians.dtype, device=jacobians.device
            )
        # One (n * o, d) GEMM: numpy runs a 3-D @ 2-D product as n small ones,
        # 25x slower at d = 256.
        jacobians = np.asarray(jacobians)
        return (jacobians.reshape(-1, d_in) @ inverse_T).reshape(jacobians.shape)


def _takes(estimator, method, parameter):
    """Whether ``estimator.<method>`` has a parameter of that name, or ``**kwargs``."""
    parameters = inspect.signature(getattr(estimator, method)).parameters
    return parameter in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _jacobian_keys(pipeline, prefix=""):
    """The ``<step>__jacobians`` keys by which ``fit`` without routing reaches every basis."""
    keys = []
    for name, step in pipeline.steps:
        if isinstance(step, Pipeline):
            keys += _jacobian_keys(step, f"{prefix}{name}__")
        elif not _is_skipped(step) and "jacobians" in inspect.signature(step.fit).parameters:
            keys.append(f"{prefix}{name}__jacobians")
    return keys


def _holds_column_transformer(step):
    """Whether Jacobians handed to ``step`` reach a ColumnTransformer (through feature unions)."""
    if isinstance(step, ColumnTransformer):
        return True
    return isinstance(step, FeatureUnion) and any(
        _holds_column_transformer(part) for _, part in step.transformer_list
    )


def _nested_plain_pipelines(parent, path=()):
    """Paths ``((attribute, index), ...)`` to the plain Pipelines among the parts of ``parent``.

    The parts are its steps, and the transformers of feature unions among them
    (every transformer of a union sees the union's input). Pipelines deeper
    down are the business of the nested pipeline once it is carrying.
    """
    attribute = "steps" if isinstance(parent, Pipeline) else "transformer_list"
    for index, (_, part) in enumerate(getattr(parent, attribute)):
        here = (*path, (attribute, index))
        if type(part) is Pipeline:
            yield here
        elif isinstance(part, FeatureUnion):
            yield from _nested_plain_pipelines(part, here)


def _at(owner, path):
    for attribute, index in path:
        owner = getattr(owner, attribute)[index][1]
    return owner


def _put(owner, path, value):
    """Replace the part at ``path`` by ``value`` in a new list; return the old list and the new.

    The user's list is left alone, and put back afterwards if nothing (a fit)
    replaced the new one meanwhile.
    """
    parent = _at(owner, path[:-1])
    attribute, index = path[-1]
    old = getattr(parent, attribute)
    parts = list(old)
    parts[index] = (parts[index][0], value)
    setattr(parent, attribute, parts)
    return old, parts


@contextmanager
def _nested_pipelines_carry(owner):
    """Let the plain Pipelines nested in ``owner`` act as InteractionPipelines for a while.

    scikit-learn's ``Pipeline`` hands metadata to every step unchanged, so a basis
    after other steps of a plain pipeline nested in an InteractionPipeline would
    get Jacobians with respect to the nested pipeline's input. Each one is
    replaced, for the block, by an InteractionPipeline sharing its state; its
    state after the block (fitted steps) goes back into the user's object, which
    is put back in place.
    """
    swapped = []
    try:
        for path in list(_nested_plain_pipelines(owner)):
            original = _at(owner, path)
            carrying = InteractionPipeline.__new__(InteractionPipeline)
            carrying.__dict__.update(original.__dict__)
            swapped.append((path, original, *_put(owner, path, carrying)))
        yield
    finally:
        for path, original, old, new in reversed(swapped):
            # The part at the path is the stand-in, or its fitted clone (with memory).
            original.__dict__.update(_at(owner, path).__dict__)
            parent = _at(owner, path[:-1])
            attribute = path[-1][0]
            if getattr(parent, attribute) is new:
                setattr(parent, attribute, old)
            else:
                _put(owner, path, original)


def make_interaction_pipeline(*steps, memory=None, verbose=False, transform_input=None):
    """Build an :class:`InteractionPipeline`, naming steps as :func:`~sklearn.pipeline.make_pipeline` does.

    Parameters
    ----------
    *steps : list of estimators
    memory, verbose, transform_input
        As for :func:`~sklearn.pipeline.make_pipeline`.

    Returns
    -------
    InteractionPipeline

    Examples
    --------
    >>> from sklearn.preprocessing import StandardScaler
    >>> from sklearn_lib import InteractionBasis, make_interaction_pipeline
    >>> make_interaction_pipeline(StandardScaler(), InteractionBasis()).steps[1][0]
    'interactionbasis'
    """
    pipe = make_pipeline(*steps, memory=memory, verbose=verbose,
                         transform_input=transform_input)
    return InteractionPipeline(pipe.steps, memory=memory, verbose=verbose,
                               transform_input=transform_input)
