"""InteractionBasis: the degeneracy-invariant basis of one layer (SPEC section 1)."""

import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils._param_validation import Interval, RealNotInt, StrOptions
from sklearn.utils.validation import (
    _check_sample_weight,
    check_array,
    check_is_fitted,
    validate_data,
)

from ..metrics._sparsity import _sparsity, interaction_edges
from ..utils._backend import (
    as_tensor,
    gen_batches,
    is_tensor,
    resolve_device,
    resolve_dtype,
    to_output,
)
from ..utils._validation import (
    check_finite,
    check_jacobians,
    check_not_jacobians,
    check_real_values,
    check_tensor,
)
from ._dask import is_dask_array
from ._linalg import interaction_basis
from ._stats import AUTO_CHUNK_NUMBERS, InteractionStatistics


class InteractionBasis(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Interaction basis of one layer from its activations and downstream Jacobians.

    The basis removes the directions of the layer's activations that are
    linearly dependent (null directions of the Gram matrix), whitens the rest,
    rotates them into the eigenbasis of the second moment of the Jacobians of
    the downstream computation, and scales each direction by the square root
    of its interaction strength ``Lambda``. The result does not depend on how
    the layer happens to be parameterised: fitting on ``X @ A`` with Jacobians
    ``J @ inv(A).T`` gives the same transformed data for any invertible ``A``
    (equal values: each direction's sign is fixed by a rule that is itself
    invariant). Without Jacobians (an identity downstream map) the basis is PCA's.

    Lambda is accurate to about ``eps cond(A)`` of the largest strength, not
    ``eps cond(A)**2``: the Gram matrix is never formed (see the user guide).

    Read more in SPEC section 1 and the user guide.

    Parameters
    ----------
    n_components : int or float, default=None
        Largest number of directions to keep after both truncations. None keeps
        all that survive. If larger than what survives, a warning is issued and
        the surviving count is used. A float in (0, 1) keeps the fewest leading
        directions whose interaction strengths sum to at least that share of
        the sum over all surviving directions (``0.99``: the directions that
        carry 99% of ``Lambda``).
    center : bool, default=True
        Subtract the (weighted) mean before computing the Gram matrix. With
        ``center=False`` and a constant-1 column in ``X`` this is the reference
        implementation's "uncentered" basis.
    truncation_threshold : "auto" or float, default="auto"
        Eigenvalue threshold of both truncations. A float is absolute
        (``tau_D = tau_Lambda = truncation_threshold``; the reference default is
        1e-5); "auto" drops exactly the directions that are rounding noise
        (see the user guide), warns when it drops a direction that only the
        conditioning of these coordinates hides and, when nothing survives, says
        whether the activations are constant, the Jacobians vanish, or the
        precision ran out.
    batch_size : int, default=None
        Samples per chunk when accumulating statistics and transforming. None
        picks a size whose Jacobian chunk holds about 2**23 numbers, so memory
        does not grow with the number of samples.
    device : {"cpu", "cuda", "auto"}, "cuda:<index>" or torch.device, default="cpu"
        Where the math runs. Inputs are moved there chunk by chunk. Other device
        types (e.g. "meta", "mps") are refused, as is CUDA without a GPU.
    dtype : {"float64", "float32"}, default="float64"
        Precision of the statistics, eigendecompositions and outputs.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features_in)
        ``C.T``: ``transform(X) = (X - mean_) @ components_.T``.
    inverse_components_ : ndarray of shape (n_components, n_features_in)
        ``C_pinv``, the left inverse: ``inverse_transform(Z) = Z @ inverse_components_ + mean_``.
    mean_ : ndarray of shape (n_features_in,)
        Weighted mean of the training data (zeros when ``center=False``).
    interaction_strengths_ : ndarray of shape (n_components,)
        ``Lambda``, descending; also the variance of each transformed feature.
    gram_eigenvalues_ : ndarray of shape (n_features_in,)
        All eigenvalues ``D`` of the Gram matrix, descending.
    gram_ : ndarray of shape (n_features_in, n_features_in)
        The (weighted, centred) Gram matrix ``G``.
    jacobian_gram_ : ndarray of shape (n_features_in, n_features_in)
        The Jacobian second moment ``M'`` (the identity when fitted without Jacobians).
    n_components_ : int
        Number of directions kept.
    n_samples_seen_ : int
        Number of samples seen by ``fit`` or all ``partial_fit`` calls.
    n_outputs_ : int or None
        Number of downstream outputs ``o`` of the Jacobians; None without Jacobians.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in,)
        Names of features seen during fit, when ``X`` has string column names.

    See Also
    --------
    sklearn.decomposition.PCA : What this estimator reduces to without Jacobians.
    sklearn_lib.InteractionGraph : Interaction bases of every layer of a network.
    sklearn_lib.metrics.InteractionSparsityScorer : Rank bases by held-out sparsity.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_lib import InteractionBasis
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 5))
    >>> W = rng.normal(size=(5, 3))
    >>> J = np.broadcast_to(W.T, (200, 3, 5))  # Jacobians of the linear map X @ W
    >>> basis = InteractionBasis().fit(X, jacobians=J)
    >>> basis.n_components_  # the map sees only 3 directions of X
    3
    >>> Z = basis.transform(X)
    >>> np.allclose(Z.T @ Z / len(X), np.diag(basis.interaction_strengths_))
    True
    """

    __metadata_request__fit = {"jacobians": True}
    __metadata_request__partial_fit = {"jacobians": True}
    __metadata_request__score = {"jacobians": True}

    _parameter_constraints: dict = {
        "n_components": [
            Interval(Integral, 1, None, closed="left"),
            Interval(RealNotInt, 0, 1, closed="neither"),
            None,
        ],
        "center": ["boolean"],
        "truncation_threshold": [
            StrOptions({"auto"}),
            Interval(Real, 0, None, closed="left"),
        ],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "device": [StrOptions({"cpu", "cuda", "auto"}), str, torch.device],
        "dtype": [StrOptions({"float64", "float32"})],
    }

    def __init__(
        self,
        n_components=None,
        *,
        center=True,
        truncation_threshold="auto",
        batch_size=None,
        device="cpu",
        dtype="float64",
    ):
        self.n_components = n_components
        self.center = center
        self.truncation_threshold = truncation_threshold
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, *, jacobians=None, sample_weight=None):
        """Fit the basis from activations and the Jacobians of the downstream map.

        Parameters
        ----------
        X : array-like, memmap, tensor or dask array of shape (n_samples, n_features)
            Activations of the layer. With a dask array (``X`` or ``jacobians``)
            the statistics of every block of rows are computed and merged by
            Dask, on its threads or the cluster of a ``dask.distributed`` client,
            so nothing larger than a block is ever in memory at once.
        y : None
            Ignored. A 3-D ``y`` (Jacobians passed positionally) is refused.
        jacobians : array-like, memmap, tensor or dask array of shape (n_samples, n_outputs, n_features), default=None
            Per-sample Jacobian of the downstream quantity with respect to ``X``.
            None means the identity map, which makes the basis PCA's. Dask
            Jacobians blocked differently from ``X`` are rechunked to ``X``'s
            row blocks (with a warning).
        sample_weight : array-like or tensor of shape (n_samples,), default=None
            Non-negative finite weights, at least two of them positive; weight 2
            is the same as repeating a sample.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        check_not_jacobians(y, "fit")
        if is_dask_array(X) or is_dask_array(jacobians):
            from ._dask import basis_statistics

            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
            return self._fit_statistics(basis_statistics(self, X, jacobians, sample_weight),
                                        name="X")
        X, jacobians, sample_weight = self._check_fit_input(
            X, jacobians, sample_weight, reset=True
        )
        stats = self._new_statistics(X, jacobians)
        self._accumulate(stats, X, jacobians, sample_weight)
        return self._fit_statistics(stats, name="X")

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, *, jacobians=None, sample_weight=None):
        """Add a chunk of samples to the statistics and refit the basis.

        Statistics are merged exactly (TSQR with Chan et al.'s mean correction,
        Jacobians squared in the whitening frame of what came before), so a
        stream of chunks gives the same basis as ``fit`` on their concatenation.
        The first call needs at least two samples; later chunks must have the
        same number of features and outputs. A chunk with NaN or infinity is
        rejected before anything is merged.

        Parameters
        ----------
        X : array-like, memmap or tensor of shape (n_samples, n_features)
        y : None
            Ignored.
        jacobians : array-like, memmap or tensor of shape (n_samples, n_outputs, n_features), default=None
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        self : object
            Fitted estimator.
        """
        check_not_jacobians(y, "partial_fit")
        first_call = not hasattr(self, "_statistics")
        X, jacobians, sample_weight = self._check_fit_input(
            X, jacobians, sample_weight, reset=first_call
        )
        if first_call:
            stats = self._new_statistics(X, jacobians)
        else:
            stats = self._statistics
            if (jacobians is None) != (stats.n_outputs is None):
                raise ValueError(
                    "partial_fit was first called "
                    + ("without" if stats.n_outputs is None else "with")
                    + " jacobians; every chunk must be the same."
                )
            check_jacobians(jacobians, X.shape, n_outputs=stats.n_outputs)
            # A copy, so that a chunk that is refused (NaN, nothing survives)
            # leaves the statistics as they were.
            stats = stats.copy()
        self._accumulate(stats, X, jacobians, sample_weight, streaming=not first_call)
        # No warning about few samples: early chunks have few by design.
        return self._fit_statistics(stats, name=None)

    def _check_fit_input(self, X, jacobians, sample_weight, *, reset):
        """Validate X (numpy via sklearn, tensors by hand) and the metadata's shapes."""
        if is_tensor(X):
            check_tensor(X, "X", ndim=2, shape="(n_samples, n_features)")
            if X.shape[1] == 0:
                raise ValueError(
                    f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while a "
                    f"minimum of 1 is required by {type(self).__name__}."
                )
            if reset:
                self.n_features_in_ = X.shape[1]
                if hasattr(self, "feature_names_in_"):
                    del self.feature_names_in_
            elif X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is "
                    f"expecting {self.n_features_in_} features as input."
                )
            if reset and X.shape[0] < 2:
                raise ValueError(
                    f"Found array with {X.shape[0]} sample(s) (shape={tuple(X.shape)}) "
                    "while a minimum of 2 is required."
                )
        else:
            X = validate_data(
                self,
                check_real_values(X, "X"),
                reset=reset,
                dtype=[np.float64, np.float32],
                ensure_min_samples=2 if reset else 1,
            )
        jacobians = check_jacobians(jacobians, tuple(X.shape))
        if sample_weight is not None:
            sample_weight = self._check_sample_weight(sample_weight, X.shape[0], reset=reset)
        return X, jacobians, sample_weight

    @staticmethod
    def _check_sample_weight(sample_weight, n_samples, *, reset):
        """Non-negative finite weights as float64 numpy (they are only n numbers)."""
        if is_tensor(sample_weight):
            check_tensor(sample_weight, "sample_weight", ndim=1, shape=f"({n_samples},)")
            sample_weight = sample_weight.detach().cpu().numpy()
        sample_weight = _check_sample_weight(
            check_real_values(sample_weight, "sample_weight"),
            np.empty(n_samples),
            dtype=np.float64,
            ensure_non_negative=True,
        )
        n_positive = int(np.count_nonzero(sample_weight))
        if reset and n_positive < 2:
            # One weighted sample has a zero Gram matrix: refuse it here rather
            # than report "constant activations" after the fit.
            raise ValueError(
                f"sample_weight gives positive weight to {n_positive} of {n_samples} "
                "samples; at least 2 are needed to estimate the Gram matrix."
            )
        return sample_weight

    def _torch_config(self):
        return resolve_device(self.device), resolve_dtype(self.dtype)

    def _new_statistics(self, X, jacobians):
        device, dtype = self._torch_config()
        return InteractionStatistics(
            X.shape[1],
            None if jacobians is None else jacobians.shape[1],
            center=self.center,
            device=device,
            dtype=dtype,
        )

    def _chunk_size(self, n_outputs):
        if self.batch_size is not None:
            return self.batch_size
        width = (n_outputs or 1) * self.n_features_in_
        return max(1, AUTO_CHUNK_NUMBERS // width)

    def _accumulate(self, stats, X, jacobians, sample_weight, *, streaming=False):
        """Fold ``X`` and its Jacobians into ``stats`` chunk by chunk.

        All activations first, then all Jacobians, squared in the whitening frame
        of the final R factor (the most accurate order, see ``_stats``); with
        ``streaming``, chunk by chunk in the frame of what came before.
        """
        chunks = list(gen_batches(X.shape[0], self._chunk_size(stats.n_outputs)))
        w = [None if sample_weight is None else sample_weight[rows] for rows in chunks]
        for rows, w_rows in zip(chunks, w):
            if streaming:
                stats.update(X[rows], None if jacobians is None else jacobians[rows], w_rows)
            else:
                stats.update_activations(X[rows], w_rows)
        if jacobians is not None and not streaming:
            for rows, w_rows in zip(chunks, w):
                stats.update_jacobians(jacobians[rows], w_rows)

    def _fit_statistics(self, stats, *, name):
        """Compute the basis from accumulated statistics and set fitted attributes.

        This is the one entry point from statistics to a fitted basis; it is
        also what :class:`~sklearn_lib.InteractionGraph` calls with statistics
        it accumulated itself. ``name`` (e.g. ``"layer 'conv1'"``) is what a
        warning about too few samples calls the data; None warns not.
        """
        if stats.weight <= 0:
            raise ValueError("The total sample weight must be positive.")
        if name is not None:
            _warn_few_samples(stats, self.center, name)
        # The statistics are square roots scaled by powers of two, so that data of
        # any magnitude and conditioning fit; interaction_basis returns the basis
        # in the data's units and raises, naming the cause, when no direction
        # survives.
        result = interaction_basis(
            stats.factors(),
            threshold=self.truncation_threshold,
            n_components=self.n_components,
            name=name,
        )
        if isinstance(self.n_components, Integral) and self.n_components > result.n_available:
            warnings.warn(
                f"n_components={self.n_components} is larger than the {result.n_available} "
                "directions that survive truncation; keeping "
                f"{result.n_available}.",
                UserWarning,
                stacklevel=3,
            )
        self._statistics = stats
        self.components_ = to_output(result.components.T, None)
        self.inverse_components_ = to_output(result.inverse_components, None)
        self.interaction_strengths_ = to_output(result.interaction_strengths, None)
        self.gram_eigenvalues_ = to_output(result.gram_eigenvalues, None)
        self.mean_ = to_output(stats.mean, None)
        self.gram_ = to_output(stats.gram, None)
        self.jacobian_gram_ = to_output(stats.jacobian_gram, None)
        self.n_components_ = self.components_.shape[0]
        self.n_samples_seen_ = stats.n_samples
        self.n_outputs_ = stats.n_outputs
        self.n_features_in_ = stats.n_features
        return self

    def _check_transform_input(self, X, n_columns, *, features):
        """Validate input of transform-like methods; ``features`` says it is X, not Z."""
        name = "X" if features else "Z"
        if is_tensor(X):
            shape = f"(n_samples, {n_columns})"
            check_tensor(X, name, ndim=2, shape=shape)
            if X.shape[1] != n_columns:
                raise ValueError(
                    f"Expected {name} as a tensor of shape {shape}, got {tuple(X.shape)}."
                )
            return X
        X = check_real_values(X, name)
        if features:
            return validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        X = check_array(X, dtype=[np.float64, np.float32], input_name=name)
        if X.shape[1] != n_columns:
            raise ValueError(
                f"Expected {name} as an array of shape (n_samples, {n_columns}), got "
                f"{X.shape}."
            )
        return X

    def _affine(self, X, offset_in, matrix, offset_out):
        """``(X - offset_in) @ matrix + offset_out`` chunk-wise on the device.

        Numpy in gives numpy out, a tensor gives a tensor on its own device.
        """
        device, dtype = self._torch_config()
        A = as_tensor(matrix, device=device, dtype=dtype)
        a = as_tensor(offset_in, device=device, dtype=dtype)
        b = as_tensor(offset_out, device=device, dtype=dtype)
        n = X.shape[0]
        if is_tensor(X):
            out = torch.empty(n, A.shape[1], device=X.device, dtype=dtype)
        else:
            out = np.empty((n, A.shape[1]), dtype=str(dtype).removeprefix("torch."))
        width = max(A.shape)
        for rows in gen_batches(n, self.batch_size or max(1, AUTO_CHUNK_NUMBERS // width)):
            chunk = as_tensor(X[rows], device=device, dtype=dtype)
            check_finite(chunk, "X")
            chunk = (chunk - a) @ A + b
            out[rows] = to_output(chunk, X)
        return out

    def transform(self, X):
        """Project ``X`` onto the basis: ``(X - mean_) @ components_.T``.

        Parameters
        ----------
        X : array-like, memmap or tensor of shape (n_samples, n_features)

        Returns
        -------
        Z : ndarray or tensor of shape (n_samples, n_components)
            A tensor on ``X``'s device for tensor input, numpy otherwise.
        """
        check_is_fitted(self)
        X = self._check_transform_input(X, self.n_features_in_, features=True)
        zeros = np.zeros(self.n_components_)
        return self._affine(X, self.mean_, self.components_.T, zeros)

    def inverse_transform(self, Z):
        """Map basis coordinates back: ``Z @ inverse_components_ + mean_``.

        Exact on the span of the kept directions: ``inverse_transform(transform(X))``
        is the projection of ``X`` onto them along the truncated directions.

        Parameters
        ----------
        Z : array-like or tensor of shape (n_samples, n_components)

        Returns
        -------
        X_original : ndarray or tensor of shape (n_samples, n_features_in)
        """
        check_is_fitted(self)
        Z = self._check_transform_input(Z, self.n_components_, features=False)
        zeros = np.zeros(self.n_components_)
        return self._affine(Z, zeros, self.inverse_components_, self.mean_)

    def score(self, X, y=None, *, jacobians=None):
        """Held-out interaction sparsity: Gini coefficient of the edge matrix (higher = sparser).

        ``E[i, j] = mean_x (J_hat_x[i, j] * Z[x, j])^2`` between downstream output
        ``i`` and basis direction ``j``, with ``J_hat_x = J_x @ inverse_components_.T``
        and ``Z = transform(X)``.

        The Jacobians must be those of the downstream map the basis was fitted
        to: a basis fitted with Jacobians refuses to be scored without them (the
        identity map) or with a different number of outputs, and a basis fitted
        without them (PCA) refuses Jacobians. See the user guide on grid search.

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, n_features)
        y : None
            Ignored. A 3-D ``y`` (Jacobians passed positionally) is refused.
        jacobians : array-like or tensor of shape (n_samples, n_outputs, n_features), default=None
            None means the identity downstream map.

        Returns
        -------
        score : float
        """
        check_not_jacobians(y, "score")
        return _sparsity(self.edges(X, jacobians=jacobians), "gini")

    def edges(self, X, *, jacobians=None):
        """Edge matrix ``E`` of shape (n_outputs, n_components) on ``X`` (see :meth:`score`).

        Parameters
        ----------
        X : array-like or tensor of shape (n_samples, n_features)
        jacobians : array-like or tensor of shape (n_samples, n_outputs, n_features), default=None

        Returns
        -------
        E : ndarray of shape (n_outputs, n_components)
        """
        check_is_fitted(self)
        X = self._check_transform_input(X, self.n_features_in_, features=True)
        jacobians = check_jacobians(jacobians, tuple(X.shape), n_outputs=self.n_outputs_)
        self._check_downstream(None if jacobians is None else jacobians.shape[1])
        device, dtype = self._torch_config()
        E = interaction_edges(
            X,
            jacobians,
            *(
                as_tensor(a, device=device, dtype=dtype)
                for a in (self.mean_, self.components_.T, self.inverse_components_)
            ),
            batch_size=self.batch_size,
            device=device,
            dtype=dtype,
        )
        return E.cpu().numpy()

    def _check_downstream(self, n_outputs):
        """Refuse edges against another downstream map than the one fitted to.

        ``n_outputs`` is the number of outputs of the Jacobians given for
        scoring, None without. :class:`~sklearn_lib.metrics.InteractionSparsityScorer`
        calls this too, for every InteractionBasis step of what it scores.
        """
        if self.n_outputs_ is not None and n_outputs is None:
            raise ValueError(
                f"This InteractionBasis was fitted with Jacobians ({self.n_outputs_} "
                "downstream outputs) but is scored without them, which would measure "
                "its interactions with the identity map instead. Pass jacobians= for "
                "the scoring data. In GridSearchCV or cross_validate, enable metadata "
                "routing (sklearn.set_config(enable_metadata_routing=True)) and pass "
                "jacobians=J to fit: routed Jacobians reach the fits and the scorer alike."
            )
        if self.n_outputs_ is None and n_outputs is not None:
            raise ValueError(
                "This InteractionBasis was fitted without Jacobians (so it is PCA) but is "
                "scored with Jacobians. In a grid search or cross-validation this means "
                "the Jacobians reached the scorer but not the fit: the estimator the "
                "search was built with does not request them for fit (scikit-learn's PCA "
                "does not). Build the search with InteractionBasis or sklearn_lib.PCA as "
                "the initial step. To score a PCA baseline, use sklearn_lib.PCA (or "
                "scikit-learn's PCA) rather than an InteractionBasis fitted without "
                "Jacobians."
            )
        if n_outputs != self.n_outputs_:
            raise ValueError(
                f"The scoring Jacobians have {n_outputs} outputs but this InteractionBasis "
                f"was fitted with Jacobians of {self.n_outputs_}: score it with the "
                "Jacobians of the same downstream map."
            )

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = [self.dtype]
        return tags



def _warn_few_samples(stats, center, name):
    """Warn when the samples, not the data, cap the number of directions (rank <= n - 1)."""
    n, d = stats.n_samples, stats.n_features
    rank = n - 1 if center else n
    if rank < d:
        warnings.warn(
            f"{name} has {d} features but only {n} samples (rows; positions count as "
            f"samples): its basis can have at most {rank} directions "
            f"({'n - 1 after centring' if center else 'n'}), so the other directions are "
            "missing, not unimportant. Fit on more samples, or, for a layer with channels, "
            "heads or positions, declare them with sklearn_lib.Layer(feature_axes=...).",
            UserWarning,
            # Past _fit_statistics, fit and scikit-learn's _fit_context: the caller.
            stacklevel=5,
        )
