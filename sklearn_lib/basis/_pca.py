"""PCA that accepts routed Jacobians, so that it can stand beside InteractionBasis in a grid."""

from sklearn.decomposition import PCA as _SklearnPCA


class PCA(_SklearnPCA):
    """scikit-learn's :class:`~sklearn.decomposition.PCA`, accepting and ignoring ``jacobians``.

    With metadata routing, scikit-learn decides where ``jacobians`` go from the
    estimator a meta-estimator was built with, and a :class:`~sklearn.pipeline.Pipeline`
    refuses metadata that none of its steps requests. So in
    ``GridSearchCV(Pipeline([("basis", ...)]), {"basis": [PCA(), InteractionBasis()]})``
    one of two things goes wrong with scikit-learn's PCA: as the initial step,
    the interaction-basis candidates are silently fitted *without* Jacobians
    (and so become PCA themselves); as a candidate, ``Pipeline.fit`` raises.
    This subclass requests ``jacobians`` in ``fit`` and ``fit_transform`` and
    ignores them, which is exactly right for PCA, and changes nothing else.

    Parameters and attributes are those of :class:`sklearn.decomposition.PCA`.

    See Also
    --------
    sklearn.decomposition.PCA : The estimator this wraps.
    sklearn_lib.InteractionBasis : What PCA is compared with.

    Examples
    --------
    >>> import numpy as np
    >>> import sklearn
    >>> from sklearn.model_selection import GridSearchCV
    >>> from sklearn.pipeline import Pipeline
    >>> from sklearn_lib import InteractionBasis, PCA
    >>> from sklearn_lib.metrics import InteractionSparsityScorer
    >>> rng = np.random.default_rng(0)
    >>> X, J = rng.normal(size=(60, 4)), rng.normal(size=(60, 2, 4))
    >>> with sklearn.config_context(enable_metadata_routing=True):
    ...     grid = GridSearchCV(
    ...         Pipeline([("basis", InteractionBasis())]),
    ...         {"basis": [PCA(), InteractionBasis()], "basis__n_components": [2]},
    ...         scoring=InteractionSparsityScorer(), cv=3,
    ...     ).fit(X, jacobians=J)
    >>> len(grid.cv_results_["params"])
    2
    """

    __metadata_request__fit = {"jacobians": True}
    __metadata_request__fit_transform = {"jacobians": True}

    def fit(self, X, y=None, jacobians=None):
        """Fit PCA on ``X``; ``jacobians`` is accepted for routing and ignored."""
        return super().fit(X, y)

    def fit_transform(self, X, y=None, jacobians=None):
        """Fit PCA on ``X`` and transform it; ``jacobians`` is ignored."""
        return super().fit_transform(X, y)
