"""The basis of a wide final layer (a vocabulary's logits) in memory linear in its width.

The statistics of an ordinary layer hold ``d x d`` matrices (the centred Gram, its R
factor, the Jacobian scatter). For the final layer of a language model, ``d`` is the
vocabulary (50,257 for GPT-2): one such matrix is 20 GB. Above :data:`GRAM_LIMIT`
features the final layer is therefore fitted here, from passes over the data that keep
``O(d k)`` numbers:

* ``final_layer="identity"``: the per-feature mean and variance (one pass). The basis is
  :class:`WideIdentityBasis`, whose ``components_`` and ``inverse_components_`` are a
  sparse identity, and the section into the layer sees a sparse identity as its
  cotangents; only a linear readout in closed form
  (:class:`~sklearn_lib.models._readout.LinearReadout`) or random cotangents
  (``stochastic_sources``) can use them, anything else is refused.
* ``final_layer="pca"`` with an int ``n_components=k``: a randomized PCA of the centred
  rows (Halko, Martinsson and Tropp 2011, algorithm 4.4: a Gaussian sketch, subspace
  iterations, then the Rayleigh-Ritz step), streamed: each product ``G Q`` with the
  centred Gram is one pass, ``sum_x (x - mu)((x - mu)^T Q)``. The block has
  ``k + 10`` columns; the result equals the exact PCA to rounding when the rows' rank is
  at most that (the sketch then spans the whole row space), and otherwise converges with
  the ratio of the eigenvalues outside and inside the block, to the power of the passes.

What is not stored at this size: ``gram_``, ``jacobian_gram_`` and ``gram_eigenvalues_``
are None (the full spectrum needs the ``d x d`` Gram), and the basis keeps no
statistics, so ``partial_fit`` would start afresh.
"""

import warnings

import numpy as np
import scipy.sparse
import torch

from ..basis._basis import InteractionBasis
from ..basis._linalg import flip_signs, kept_count, rounding_tolerance
from ..models._readout import LinearReadout
from ..utils._backend import as_tensor
from ..utils._validation import check_finite

__all__ = ["GRAM_LIMIT", "WideIdentityBasis", "basis_tensors", "fit_wide_final", "is_wide"]

#: Final layers wider than this are fitted without a ``d x d`` matrix (32 MiB in float64;
#: beyond it the SVD of the Gram's factor alone takes minutes).
GRAM_LIMIT = 2048
#: Extra sketch columns beyond ``n_components`` and subspace iterations of the randomized PCA.
N_OVERSAMPLES, N_ITER = 10, 4


def is_wide(width):
    """Whether a final layer of ``width`` features is fitted here, without a Gram matrix."""
    return width > GRAM_LIMIT


class _Moments:
    """Rows' count, mean and per-feature centred sum of squares (Chan's merge), streamed."""

    def __init__(self, n_features, device, dtype):
        self.n_features, self.device, self.dtype = n_features, device, dtype
        self.n_samples, self.mean = 0, torch.zeros(n_features, device=device, dtype=dtype)
        self.m2 = torch.zeros_like(self.mean)

    def update(self, X):
        X = as_tensor(X, device=self.device, dtype=self.dtype)
        check_finite(X, "X")
        b = X.shape[0]
        if b == 0:
            return self
        mean_b = X.mean(0)
        m2_b = (X - mean_b).square_().sum(0)
        n = self.n_samples + b
        delta = mean_b - self.mean
        self.m2 += m2_b + delta.square() * (self.n_samples * b / n)
        self.mean += delta * (b / n)
        self.n_samples = n
        return self


class _GramProduct:
    """``sum_x (x - mu) ((x - mu)^T Q)``: the centred Gram times ``Q`` (d, l), streamed."""

    def __init__(self, mean, Q):
        self.mean, self.Q = mean, Q
        self.product = torch.zeros_like(Q)

    def update(self, X):
        Xc = as_tensor(X, device=self.Q.device, dtype=self.Q.dtype) - self.mean
        self.product.addmm_(Xc.T, Xc @ self.Q)
        return self


def _pass(source, L, make):
    """One pass of ``source`` over layer ``L``'s rows into the accumulator ``make()``."""
    return source.activation_stats(L, lambda l, n_outputs: make())


def sparse_identity(d, device, dtype):
    """The ``d x d`` identity as a sparse COO tensor (``d`` numbers, not ``d^2``)."""
    index = torch.arange(d, device=device).repeat(2, 1)
    return torch.sparse_coo_tensor(index, torch.ones(d, device=device, dtype=dtype), (d, d),
                                   is_coalesced=True, check_invariants=False)


class WideIdentityBasis(InteractionBasis):
    """The identity basis of a final layer too wide for dense ``d x d`` matrices.

    ``components_`` and ``inverse_components_`` are a ``scipy.sparse`` identity,
    ``mean_`` is 0, ``interaction_strengths_`` the features' second moments, as
    for the dense identity basis; ``transform`` and ``inverse_transform`` return
    their (validated) input. ``gram_``, ``jacobian_gram_`` and ``gram_eigenvalues_``
    are None: they would take ``d x d`` numbers.
    """

    def transform(self, X):
        """``X`` itself (validated, in the basis's dtype): the identity map."""
        return self._same(self._check_transform_input(X, self.n_features_in_, features=True))

    def inverse_transform(self, Z):
        """``Z`` itself (validated, in the basis's dtype): the identity map."""
        return self._same(self._check_transform_input(Z, self.n_components_, features=False))

    def _same(self, X):
        device, dtype = self._torch_config()
        if isinstance(X, torch.Tensor):
            return X.detach().to(dtype=dtype).clone()
        return np.array(X, dtype=str(dtype).removeprefix("torch."))


def _new_basis(graph, n_components, cls=InteractionBasis):
    return cls(n_components, center=graph.center, truncation_threshold=graph.truncation_threshold,
               batch_size=graph.batch_size, device=graph.device, dtype=graph.dtype)


def _set_common(basis, moments, mean, components, strengths):
    basis.components_ = components
    basis.inverse_components_ = components
    basis.mean_ = mean
    basis.interaction_strengths_ = strengths
    basis.gram_eigenvalues_ = None
    basis.gram_ = None
    basis.jacobian_gram_ = None
    basis.n_components_ = components.shape[0]
    basis.n_samples_seen_ = moments.n_samples
    basis.n_outputs_ = None
    basis.n_features_in_ = moments.n_features
    return basis


def basis_tensors(basis, device, dtype):
    """``(mean, C, C_pinv)`` of a fitted basis as tensors; sparse for :class:`WideIdentityBasis`."""
    mean = as_tensor(basis.mean_, device=device, dtype=dtype)
    if isinstance(basis, WideIdentityBasis):
        eye = sparse_identity(basis.n_features_in_, device, dtype)
        return mean, eye, eye
    t = lambda a: as_tensor(a, device=device, dtype=dtype)  # noqa: E731
    return mean, t(basis.components_.T), t(basis.inverse_components_)


def _check_identity_section(graph, source, L, name):
    """Refuse a wide identity final layer where the section into it would need ``d`` products."""
    structure = getattr(source, "structure", None)
    # The edges into the layer take the identity as they are, whatever the basis.
    readout = None if structure is None else structure(L - 1, L)
    fits = isinstance(readout, LinearReadout)
    if fits and graph.basis != "pca" and graph.variant == "global" and L > 1 and (
            graph.stochastic_sources is None):
        fits = False
    if not fits:
        d = source.widths[L]
        raise ValueError(
            f"final_layer='identity' on {name}, which has {d:,} features (more than "
            f"GRAM_LIMIT={GRAM_LIMIT:,}), keeps every one of them as an output direction, and "
            "the sections into it would need one product per feature: expected the section "
            "into it to be a linear readout (an exact nn.Linear applied to the previous "
            "recorded layer, found by fit_model / from_model with fast_path) and the local "
            "variant (or stochastic_sources), got "
            + ("cached arrays" if structure is None else
               "a section without that closed form" if not isinstance(readout, LinearReadout)
               else "the global variant without stochastic_sources")
            + ". Fit final_layer='pca' with an int n_components instead (a randomized PCA "
            "of the logits), or record the layer right before the readout."
        )


def fit_wide_final(graph, source, L, n_components, rng, name):
    """The fitted basis of a final layer wider than :data:`GRAM_LIMIT`, without a Gram matrix.

    Parameters
    ----------
    graph : InteractionGraph
        Its ``final_layer``, ``truncation_threshold``, ``dtype`` and friends apply.
    source : CachedSource or ModelSource
        Where layer ``L``'s rows come from; each pass is ``source.activation_stats``.
    L : int
        The final layer's index.
    n_components : int or None
        The final layer's ``n_components`` (an int for ``final_layer="pca"``).
    rng : numpy.random.RandomState
        Draws the Gaussian sketch.
    name : str
        The layer in messages.

    Returns
    -------
    basis : InteractionBasis
        Fitted; see the module docstring for what it does not store.
    """
    device, dtype, d = source.device, source.dtype, source.widths[L]
    if graph.final_layer == "identity":
        _check_identity_section(graph, source, L, name)
    elif not isinstance(n_components, (int, np.integer)) or isinstance(n_components, bool):
        raise ValueError(
            f"final_layer='pca' on {name}, which has {d:,} features (more than "
            f"GRAM_LIMIT={GRAM_LIMIT:,}), is fitted by a randomized PCA that keeps "
            "n_components directions and never a d x d matrix: expected n_components to be "
            f"an int for the final layer, got {n_components!r}. Pass e.g. n_components=768 "
            "(or a list with an int last)."
        )
    moments = _pass(source, L, lambda: _Moments(d, device, dtype))
    n = moments.n_samples
    if n == 0:
        raise ValueError(f"{name} has no rows to fit its basis on.")
    mean = moments.mean if graph.center else torch.zeros_like(moments.mean)
    to_numpy = lambda t: t.detach().cpu().numpy()  # noqa: E731
    if graph.final_layer == "identity":
        # The second moments: what the dense identity basis calls Lambda.
        strengths = moments.m2 / n + moments.mean.square()
        eye = scipy.sparse.eye_array(d, format="csr", dtype=np.dtype(graph.dtype))
        basis = _new_basis(graph, None, WideIdentityBasis)
        return _set_common(basis, moments, np.zeros(d, dtype=eye.dtype), eye,
                           to_numpy(strengths))
    block = min(int(n_components) + N_OVERSAMPLES, d, n)
    gram = lambda Q: _pass(source, L, lambda: _GramProduct(mean, Q)).product  # noqa: E731
    Y = gram(torch.as_tensor(rng.standard_normal((d, block)), device=device, dtype=dtype))
    for _ in range(N_ITER):
        Y = gram(torch.linalg.qr(Y).Q)
    Q = torch.linalg.qr(Y).Q
    GQ = gram(Q)
    B = Q.T @ GQ / n
    Lambda, W = torch.linalg.eigh((B + B.T) / 2)
    order = torch.argsort(Lambda.abs(), descending=True)
    Lambda, U = Lambda[order].abs(), Q @ W[:, order]
    threshold = graph.truncation_threshold
    if threshold == "auto":
        threshold = rounding_tolerance(Lambda[0], d, n, dtype)
    survive = int((Lambda > threshold).sum())
    if survive == 0:
        raise ValueError(
            f"no direction of {name} has a variance above the truncation threshold "
            f"{threshold:.3g}: its rows are constant."
        )
    if n_components > survive:
        warnings.warn(
            f"n_components={n_components} is larger than the {survive} directions of {name} "
            f"that survive truncation; keeping {survive}.", UserWarning, stacklevel=4)
    r = kept_count(Lambda[:survive], int(n_components))
    U = U[:, :r]
    U = U * flip_signs(U)
    basis = _new_basis(graph, int(n_components))
    return _set_common(basis, moments, to_numpy(mean), to_numpy(U.T.contiguous()),
                       to_numpy(Lambda[:r]))
