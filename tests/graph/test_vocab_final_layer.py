"""A vocabulary-sized final layer in memory linear in its width (issue 22).

The wide paths (``sklearn_lib.graph._final``, ``LinearReadout``) are forced at a small
width by lowering ``GRAM_LIMIT`` and compared with the exact ``d x d`` route (the
same graph with the limit out of reach and generic vector-Jacobian products), with
scikit-learn's PCA, and with brute-force Jacobians; a dispatch mode records every
tensor torch allocates to check that nothing of ``V x V`` size is formed.
"""

import tracemalloc

import numpy as np
import pytest
import scipy.sparse
import torch
from sklearn.decomposition import PCA
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sklearn_lib import InteractionGraph
from sklearn_lib.graph import _final
from sklearn_lib.models._readout import LinearReadout
from sklearn_lib.sources._edges import accumulate_edges

# The exact route warns that 200 rows cannot span 300 features; that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:layer 'head' has 300 features")

V = 300
LAYERS = ["body.0", "body.1", "head"]


class LM(nn.Module):
    """A body and a linear readout onto ``V`` logits, applied in ``forward`` (an lm_head)."""

    def __init__(self, d_in=6, d=8, vocab=V):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, d), nn.Tanh())
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.body(x))


def _model(vocab=V, seed=0):
    torch.manual_seed(seed)
    return LM(vocab=vocab).double()


def _data(n=200, seed=1):
    return torch.randn(n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _fit(monkeypatch, limit, fast_path, model, X, **params):
    monkeypatch.setattr(_final, "GRAM_LIMIT", limit)
    graph = InteractionGraph(verbose=False, random_state=0, fast_path=fast_path, **params)
    return graph.fit_model(model, LAYERS, X)


def _dense(a):
    return a.toarray() if scipy.sparse.issparse(a) else np.asarray(a)


@pytest.mark.parametrize("params", [
    {"final_layer": "identity"},
    {"final_layer": "identity", "constant_node": True},
    {"final_layer": "pca", "n_components": 5},
    {"final_layer": "pca", "n_components": 5, "constant_node": True},
])
def test_wide_paths_equal_the_exact_route(monkeypatch, params):
    """Bases, Lambda and edges of the wide paths equal the d x d route to rounding."""
    model, X = _model(), _data()
    exact = _fit(monkeypatch, 10**9, False, model, X, **params)
    wide = _fit(monkeypatch, 100, "auto", model, X, **params)
    assert wide.fast_path_ == [True, True]
    np.testing.assert_array_equal(wide.n_components_, exact.n_components_)
    for a, b in zip(exact.bases_, wide.bases_):
        scale = np.abs(a.interaction_strengths_).max()
        np.testing.assert_allclose(b.interaction_strengths_, a.interaction_strengths_,
                                   rtol=1e-10, atol=1e-12 * scale)
        np.testing.assert_allclose(_dense(b.components_), a.components_, atol=1e-10)
        np.testing.assert_allclose(b.mean_, a.mean_, atol=1e-12)
    for a, b in zip(exact.edges_, wide.edges_):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * np.abs(a).max())
    final = wide.bases_[-1]
    assert final.gram_ is None and final.jacobian_gram_ is None
    assert final.gram_eigenvalues_ is None
    if params["final_layer"] == "identity":
        assert isinstance(final, _final.WideIdentityBasis)
        assert scipy.sparse.issparse(final.components_)
        logits = model(X).detach().numpy()
        np.testing.assert_array_equal(final.transform(logits), logits)
        np.testing.assert_array_equal(wide.transform(2, logits), logits)


def test_wide_identity_with_stochastic_sources(monkeypatch):
    """Random cotangents from the sparse identity are dense (V, k): the same as the d x d route."""
    model, X = _model(), _data()
    params = {"final_layer": "identity", "stochastic_sources": 4}
    exact = _fit(monkeypatch, 10**9, "auto", model, X, **params)
    wide = _fit(monkeypatch, 100, "auto", model, X, **params)
    for a, b in zip(exact.bases_[:-1], wide.bases_[:-1]):
        np.testing.assert_allclose(b.components_, a.components_, atol=1e-10)
    for a, b in zip(exact.edges_, wide.edges_):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * np.abs(a).max())


def _cached(n=400, d=V, rank=12, noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    X0 = rng.normal(size=(n, 4))
    scales = 2.0 ** -np.arange(rank)
    X1 = (rng.normal(size=(n, rank)) * scales) @ rng.normal(size=(rank, d)) + 3.0
    X1 += noise * rng.normal(size=(n, d))
    J = np.broadcast_to(rng.normal(size=(1, d, 4)), (n, d, 4)).copy()
    return X0, X1, J


@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_randomized_final_pca_equals_sklearn_pca(monkeypatch, noise):
    """The streamed randomized PCA of the final layer is sklearn's PCA (up to signs)."""
    monkeypatch.setattr(_final, "GRAM_LIMIT", 100)
    X0, X1, J = _cached(noise=noise)
    k = 5
    graph = InteractionGraph(final_layer="pca", n_components=[None, k], verbose=False,
                             random_state=0).fit([X0, X1], jacobians=[J])
    basis = graph.bases_[1]
    pca = PCA(k, svd_solver="full").fit(X1)
    n = X1.shape[0]
    np.testing.assert_allclose(basis.interaction_strengths_,
                               pca.explained_variance_ * (n - 1) / n, rtol=1e-10)
    overlap = np.abs(basis.components_ @ pca.components_.T)
    np.testing.assert_allclose(overlap, np.eye(k), atol=1e-8)
    np.testing.assert_allclose(basis.mean_, pca.mean_, atol=1e-12)
    # The sign rule of every other basis: the largest-magnitude entry is positive.
    rows = np.arange(k)
    assert (basis.components_[rows, np.abs(basis.components_).argmax(1)] > 0).all()
    Z = basis.transform(X1)
    np.testing.assert_allclose(Z.T @ Z / n, np.diag(basis.interaction_strengths_),
                               atol=1e-10 * basis.interaction_strengths_[0])


def test_linear_readout_against_autograd():
    """Scatter and edges of the readout closed form against brute-force Jacobians."""
    torch.manual_seed(0)
    n, d, vocab, k, r = 7, 5, 40, 6, 3
    W, b = torch.randn(vocab, d, dtype=torch.float64), torch.randn(vocab, dtype=torch.float64)
    X = torch.randn(n, d, dtype=torch.float64)
    Vc = torch.randn(vocab, k, dtype=torch.float64)
    right = torch.randn(d, r, dtype=torch.float64)
    Z = torch.randn(n, r, dtype=torch.float64)
    Z_out = torch.randn(n, k, dtype=torch.float64)
    st = LinearReadout(W, b)
    J = torch.stack([torch.autograd.functional.jacobian(lambda x: x @ W.T + b, x) for x in X])
    s = st.derivative(X)
    expected = sum((Vc.T @ Jx).T @ (Vc.T @ Jx) for Jx in J)
    torch.testing.assert_close(st.jacobian_scatter(s.T @ s, Vc), expected, rtol=1e-12,
                               atol=1e-12)
    weights = torch.rand(n, 1, dtype=torch.float64)
    J_tilde = torch.stack([w * (Vc.T @ Jx @ right) for w, Jx in zip(weights, J)])
    E_ref, c_ref = torch.zeros(k, r, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    accumulate_edges(E_ref, J_tilde, Z, constant=c_ref, Z_out=Z_out)
    E, c = torch.zeros(k, r, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    st.accumulate_edges(E, s * weights, st.edge_factors(Vc, right), Z, constant=c, Z_out=Z_out)
    torch.testing.assert_close(E, E_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-12)
    # The sparse identity as cotangents gives the dense identity's numbers.
    eye = _final.sparse_identity(vocab, "cpu", torch.float64)
    torch.testing.assert_close(st.jacobian_scatter(s.T @ s, eye), n * W.T @ W)


class _LargestTensor(TorchDispatchMode):
    """The largest storage (bytes) of any tensor an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if t.layout == torch.strided:
                    size = t.untyped_storage().nbytes()
                else:  # sparse: the stored values and indices only
                    size = t._values().numel() * t.element_size() + (
                        t._indices().numel() * t._indices().element_size())
                self.largest = max(self.largest, size)
        return out


@pytest.mark.parametrize("final_layer", ["identity", "pca"])
def test_no_vocabulary_squared_allocation(final_layer):
    """At V = 20,000 no tensor or numpy buffer of the build comes near V x V numbers."""
    vocab = 20_000
    model, X = _model(vocab=vocab), _data(n=64)
    graph = InteractionGraph(verbose=False, random_state=0, final_layer=final_layer,
                             n_components=[None, None, 8] if final_layer == "pca" else None)
    tracemalloc.start()
    try:
        with _LargestTensor() as mode:
            graph.fit_model(model, LAYERS, X)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Linear in V: at most 128 columns of V (64 rows of logits, the V x 8 weight),
    # against V x V float64 numbers (3.2 GB) for one Gram of the logits.
    bound = 8 * vocab * 128
    assert bound < vocab * vocab * 8 / 150
    assert mode.largest < bound
    # Python-side (numpy) memory, lazy imports of the first fit included: far below one
    # V x V buffer.
    assert numpy_peak < vocab * vocab * 8 / 10
    assert graph.edges_[-1].shape == ((vocab, 8) if final_layer == "identity" else (8, 8))


def test_refusals(monkeypatch, tmp_path):
    monkeypatch.setattr(_final, "GRAM_LIMIT", 100)
    model, X = _model(), _data()
    with pytest.raises(ValueError, match="expected n_components to be an int"):
        InteractionGraph(final_layer="pca", verbose=False).fit_model(model, LAYERS, X)
    with pytest.raises(ValueError, match="expected n_components to be an int"):
        InteractionGraph(final_layer="pca", n_components=0.9, verbose=False).fit_model(
            model, LAYERS, X)
    with pytest.raises(ValueError, match="got a section without that closed form"):
        InteractionGraph(final_layer="identity", fast_path=False, verbose=False).fit_model(
            model, LAYERS, X)
    graph = InteractionGraph(final_layer="pca", n_components=[None, None, 5], verbose=False,
                             random_state=0).fit_model(model, LAYERS, X)
    with pytest.raises(ValueError, match="cannot save this graph: layer 2 has 300 features"):
        graph.save(tmp_path / "graph")
    assert not (tmp_path / "graph").exists()
    with pytest.raises(ValueError, match="got a section without that closed form"):
        InteractionGraph(final_layer="identity", basis="pca", fast_path=False,
                         verbose=False).fit_model(model, LAYERS, X)
    with pytest.warns(UserWarning, match="n_components=250 is larger than the 8 directions"):
        InteractionGraph(final_layer="pca", n_components=[None, None, 250], verbose=False,
                         random_state=0).fit_model(model, LAYERS, X)
    X0, X1, J = _cached()
    with pytest.raises(ValueError, match="got cached arrays.*final_layer='pca'"):
        InteractionGraph(final_layer="identity", verbose=False).fit([X0, X1], jacobians=[J])
