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

from contextlib import contextmanager

import numpy as np
import sklearn
import torch
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.utils import Bunch
from sklearn.utils.metadata_routing import process_routing
from sklearn.utils.validation import check_is_fitted

from ..metrics._sparsity import _affine_map, _as_float_matrix
from ..utils._validation import check_jacobians


class InteractionPipeline(Pipeline):
    """A :class:`~sklearn.pipeline.Pipeline` that expresses routed Jacobians in each step's input.

    Before a step receives ``jacobians`` (in ``fit``, ``fit_transform`` or the
    final step's ``score``), the fitted steps before it are probed as one
    affine map ``x -> x @ A + b`` and the Jacobians, given with respect to the
    pipeline's input, become ``J @ inv(A).T``, the Jacobians with respect to the
    step's input. Steps before it must be affine and invertible (scalers,
    full-rank whitening); otherwise a ``ValueError`` names them. Everything else
    is scikit-learn's ``Pipeline``. Build one with :func:`make_interaction_pipeline`.

    With metadata routing enabled, the Jacobians are passed as ``jacobians=``;
    without it, as ``<step>__jacobians=`` to ``fit``, as for any ``Pipeline``.
    The steps' training input is held while ``fit`` runs (to check that the
    steps before are affine on it) and released afterwards.

    Parameters
    ----------
    steps, memory, verbose, transform_input
        As for :class:`~sklearn.pipeline.Pipeline`.

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
    # are with respect to that step's input, so it need not refuse such a step.
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
        with self._training_input(X):
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
        with self._training_input(X):
            return super().fit_transform(X, y, **params)

    def score(self, X, y=None, sample_weight=None, **params):
        """Score with the final step, its routed Jacobians expressed in its input.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : None or array-like
        sample_weight : array-like, default=None
            Passed on only when given (scikit-learn's ``Pipeline.score`` fails with
            routing enabled when no step's ``score`` accepts it).
        **params : dict
            Metadata for ``score``, ``jacobians`` included; needs metadata routing.

        Returns
        -------
        score : float
        """
        if not sklearn.get_config()["enable_metadata_routing"]:
            return super().score(X, y, sample_weight=sample_weight)
        check_is_fitted(self)
        if sample_weight is not None:
            params["sample_weight"] = sample_weight
        routed = process_routing(self, "score", **params)
        Xt = X
        for name, step in self.steps[:-1]:
            if step is not None and step != "passthrough":
                Xt = step.transform(Xt, **routed[name].transform)
        final_name, final = self.steps[-1]
        score_params = dict(routed[final_name].score)
        if score_params.get("jacobians") is not None:
            score_params["jacobians"] = self._jacobians_for_step(
                len(self.steps) - 1, score_params["jacobians"], X
            )
        return final.score(Xt, y, **score_params)

    @contextmanager
    def _training_input(self, X):
        self._fit_input = X
        try:
            yield
        finally:
            del self._fit_input

    def _get_metadata_for_step(self, *, step_idx, step_params, all_params):
        # The hook through which scikit-learn's Pipeline (1.6+) hands every step
        # its routed metadata, after the steps before it have been fitted.
        step_params = super()._get_metadata_for_step(
            step_idx=step_idx, step_params=step_params, all_params=all_params
        )
        adapted = Bunch()
        done = {}
        for method, method_params in step_params.items():
            adapted[method] = Bunch(**method_params)
            J = method_params.get("jacobians")
            if J is None:
                continue
            if not hasattr(self, "_fit_input"):
                raise ValueError(
                    "InteractionPipeline carries Jacobians through its steps in fit, "
                    "fit_transform and score only."
                )
            if id(J) not in done:
                done[id(J)] = self._jacobians_for_step(step_idx, J, self._fit_input)
            adapted[method]["jacobians"] = done[id(J)]
        return adapted

    def _jacobians_for_step(self, step_idx, jacobians, X):
        """``J @ inv(A).T`` for the affine map ``x @ A + b`` of the steps before ``step_idx``."""
        before = [
            name for name, step in self.steps[:step_idx]
            if step is not None and step != "passthrough"
        ]
        if not before:
            return jacobians
        name = self.steps[step_idx][0]
        X = _as_float_matrix(X)
        jacobians = check_jacobians(jacobians, X.shape)
        A = _affine_map(self[:step_idx], X, name=f"the steps before {name!r} ({before})").A
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
        return np.asarray(jacobians) @ inverse_T


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
