"""Tests for sklearn_lib.graph.InteractionGraph against brute-force SPEC section 2.

The brute force is written from the SPEC text: per-sample Jacobians from
``torch.autograd.functional.jacobian`` on the network's own modules (not the
hooks of ``sklearn_lib.collect``), explicit Python loops over samples, and
``_reference.reference_basis`` (numpy ``eigh``) for each layer's basis.
"""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _reference import assert_same_up_to_rounding, random_invertible, reference_basis
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch import nn
from torch.autograd.functional import jacobian
from torch.utils.data import DataLoader, TensorDataset

from sklearn_lib.cache import ActivationCache
from sklearn_lib.collect import collect
from sklearn_lib.graph import InteractionGraph

THRESHOLD = 1e-10
LAYERS = [":input", "1", "3", "4"]


# --------------------------------------------------------------------------- models
def _folded(linear, const_out):
    """``linear`` acting on ``[x, 1]`` with its bias folded into the weights.

    With ``const_out`` an extra output unit is the constant 1 (weights 0, bias
    1), which survives the following ReLU and carries the next layer's bias.
    """
    d_out, d_in = linear.weight.shape
    new = nn.Linear(d_in + 1, d_out + const_out).double()
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[:d_out, :d_in] = linear.weight
        new.weight[:d_out, d_in] = linear.bias
        if const_out:
            new.bias[d_out] = 1.0
    return new


def make_mlp(folded=False, seed=0):
    """ReLU MLP 6-8-8-4 (float64); ``folded``: biases folded into constant-1 units."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
    ).double()
    if folded:
        net = nn.Sequential(
            _folded(net[0], 1), nn.ReLU(), _folded(net[2], 1), nn.ReLU(), _folded(net[4], 0)
        )
    return net


def make_data(folded=False, n=120, seed=1):
    X = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if folded:
        X = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    return X


def mlp_sections(net):
    """The sections between LAYERS as plain functions (slices of the Sequential)."""
    return [net[0:2], net[2:4], net[4:5]]


class SingleHeadAttention(nn.Module):
    """Hand-written single-head self-attention on (batch, position, feature)."""

    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / self.q.in_features ** 0.5
        return self.o(torch.softmax(scores, dim=-1) @ self.v(x))


class LastPosition(nn.Module):
    def forward(self, x):
        return x[:, -1]


# --------------------------------------------------------------------------- brute force
def per_sample_jacobians(fn, X):
    """Jacobian of ``fn`` (batched) on each sample separately, as numpy."""
    with torch.no_grad():
        J = [jacobian(lambda t: fn(t[None])[0], x) for x in torch.as_tensor(X)]
    return torch.stack(J).numpy()


def forward_activations(sections, X):
    acts = [np.asarray(X)]
    with torch.no_grad():
        for f in sections:
            acts.append(f(torch.as_tensor(acts[-1])).numpy())
    return acts


def seq_rows(J):
    """(n, P_out, o, P_in, d) full sequence Jacobians -> rows (n P_in, P_out o, d)."""
    n, p_out, o, p_in, d = J.shape
    return J.transpose(0, 3, 1, 2, 4).reshape(n * p_in, p_out * o, d)


def brute_force_bases(acts, jacs, *, center=True, final="identity", variant="local",
                      n_components=None, positions=None):
    """Bases (C, C_pinv, mu) of SPEC section 2 by explicit loops and numpy eigh.

    ``jacs[l]`` are full per-sample Jacobians (n, d_{l+1}, d_l) or, for
    sequence models (``positions`` given), (n, P_{l+1}, d_{l+1}, P_l, d_l);
    ``acts[l]`` are rows.
    """
    L = len(acts) - 1
    bases = [None] * (L + 1)
    if final == "identity":
        d = acts[L].shape[1]
        bases[L] = (np.eye(d), np.eye(d), np.zeros(d))
    else:
        C, Cp, _, mu = reference_basis(acts[L], None, center=center, threshold=THRESHOLD)
        bases[L] = (C, Cp, mu)
    for l in range(L - 1, -1, -1):
        if variant == "local":
            C_next, J = bases[l + 1][0], jacs[l]
        else:
            C_next, J = bases[L][0], jacs[l]
            for m in range(l + 1, L):  # chain J_{L-1} ... J_l sample by sample
                J = np.stack([jacs[m][x] @ J[x] for x in range(len(J))])
        if positions is None:
            J_hat = np.stack([C_next.T @ J[x] for x in range(len(J))])
        else:
            J_hat = seq_rows(np.einsum("ntosd,or->ntrsd", J, C_next))
        nc = None if n_components is None else n_components[l]
        C, Cp, _, mu = reference_basis(acts[l], J_hat, center=center, threshold=THRESHOLD,
                                       n_components=nc)
        bases[l] = (C, Cp, mu)
    return bases


def brute_force_edges(acts, edge_jacs, bases, positions=None):
    """``E_l[i, j] = mean_rows (J_tilde[i, j] z[j])^2``, one sample at a time.

    With positions: ``sum_t (sum_s J_tilde[(t, i), (s, j)] z[s, j])^2`` per sample,
    divided by the number of rows ``n P_in``.
    """
    edges = []
    for l in range(len(bases) - 1):
        C_next = bases[l + 1][0]
        C, Cp, mu = bases[l]
        Z = (acts[l] - mu) @ C
        E = np.zeros((C_next.shape[1], C.shape[1]))
        for x, J in enumerate(edge_jacs[l]):
            if positions is None:
                E += (C_next.T @ J @ Cp.T * Z[x]) ** 2
            else:  # J (P_out, o, P_in, d): rows (x, s); SPEC 2, summed over s, then squared
                P_in = J.shape[2]
                for t in range(J.shape[0]):
                    E += sum(C_next.T @ J[t, :, s, :] @ Cp.T * Z[x * P_in + s]
                             for s in range(P_in)) ** 2
        edges.append(E / len(acts[l]))
    return edges


def assert_close(actual, desired, rtol=1e-10):
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * np.abs(desired).max())


def assert_graph_matches(graph, bases, edges, rtol=1e-10):
    assert graph.n_layers_ == len(bases)
    for basis, (C, Cp, mu) in zip(graph.bases_, bases):
        assert_close(basis.components_.T, C, rtol)
        assert_close(basis.inverse_components_, Cp, rtol)
        np.testing.assert_allclose(basis.mean_, mu, atol=rtol * max(1, np.abs(mu).max()))
    for E, E_ref in zip(graph.edges_, edges):
        assert_close(E, E_ref, rtol)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=["folded", "centred"])
def mlp_case(request):
    """Model, data, cached activations/Jacobians and the brute-force graph."""
    folded = request.param == "folded"
    net, X = make_mlp(folded), make_data(folded)
    sections = mlp_sections(net)
    acts = forward_activations(sections, X)
    jacs = [per_sample_jacobians(f, a) for f, a in zip(sections, acts)]
    center = not folded
    bases = brute_force_bases(acts, jacs, center=center)
    edges = brute_force_edges(acts, jacs, bases)
    return dict(net=net, X=X, acts=acts, jacs=jacs, center=center, bases=bases,
                edges=edges, sections=sections, folded=folded)


def graph_params(case, **extra):
    return dict(center=case["center"], truncation_threshold=THRESHOLD, **extra)


# --------------------------------------------------------------------------- agreement
def test_cached_jacobians_match_brute_force(mlp_case):
    case = mlp_case
    acts, jacs = collect(case["net"], LAYERS, case["X"], verbose=False, batch_size=50)
    graph = InteractionGraph(**graph_params(case)).fit(acts, jacobians=jacs)
    assert_graph_matches(graph, case["bases"], case["edges"])
    assert graph.edge_point_ == "data" and graph.fast_path_ == [False] * 3
    assert graph.layer_names_ == ["0", "1", "2", "3"]
    assert graph.n_samples_seen_ == len(case["X"])
    if case["folded"]:  # the constant unit survives: d_l = 7, 9, 9 (minus dead units)
        assert graph.bases_[0].n_features_in_ == 7


@pytest.mark.parametrize("fast_path", [False, True])
def test_model_paths_match_brute_force(mlp_case, fast_path):
    case = mlp_case
    graph = InteractionGraph.from_model(
        case["net"], LAYERS, case["X"], **graph_params(case, fast_path=fast_path,
                                                       edge_point="data", batch_size=50),
    )
    assert graph.fast_path_ == [fast_path] * 3
    assert_graph_matches(graph, case["bases"], case["edges"])
    assert graph.layer_names_ == LAYERS
    # Jacobian second moments are the same, whichever way they were computed.
    for basis, (C, Cp, mu), J, C_next in zip(
        graph.bases_, case["bases"], case["jacs"], [b[0] for b in case["bases"][1:]]
    ):
        J_hat = np.einsum("xoi,or->xri", J, C_next)
        assert_close(basis.jacobian_gram_, np.einsum("xri,xrj->ij", J_hat, J_hat) / len(J))


@pytest.mark.parametrize("fast_path", [False, True])
def test_reconstructed_edge_point_with_truncation(mlp_case, fast_path):
    """Edges at inverse_transform(transform(X)) (the reference default) when truncated."""
    case = mlp_case
    n_components = [3, 4, 3, None]
    graph = InteractionGraph.from_model(
        case["net"], LAYERS, case["X"],
        **graph_params(case, n_components=n_components, fast_path=fast_path),
    )
    assert graph.edge_point_ == "reconstructed"
    assert list(graph.n_components_) == [3, 4, 3, 4]
    bases = brute_force_bases(case["acts"], case["jacs"], center=case["center"],
                              n_components=n_components)
    recon = [(a - mu) @ C @ Cp + mu for a, (C, Cp, mu) in zip(case["acts"], bases)]
    edge_jacs = [per_sample_jacobians(f, r) for f, r in zip(case["sections"], recon)]
    assert_graph_matches(graph, bases, brute_force_edges(case["acts"], edge_jacs, bases))
    at_data = InteractionGraph.from_model(
        case["net"], LAYERS, case["X"],
        **graph_params(case, n_components=n_components, edge_point="data"),
    )
    assert not np.allclose(at_data.edges_[0], graph.edges_[0])


def test_final_layer_pca(mlp_case):
    case = mlp_case
    graph = InteractionGraph(**graph_params(case, final_layer="pca")).fit(
        case["acts"], jacobians=case["jacs"]
    )
    bases = brute_force_bases(case["acts"], case["jacs"], center=case["center"], final="pca")
    assert_graph_matches(graph, bases, brute_force_edges(case["acts"], case["jacs"], bases))


def test_pca_bases(mlp_case):
    """basis="pca": every hidden layer is PCA; only the edges use Jacobians."""
    case = mlp_case
    cached = InteractionGraph(**graph_params(case, basis="pca")).fit(
        case["acts"], jacobians=case["jacs"]
    )
    live = InteractionGraph.from_model(case["net"], LAYERS, case["X"], edge_point="data",
                                       **graph_params(case, basis="pca"))
    bases = [reference_basis(a, None, center=case["center"], threshold=THRESHOLD)
             for a in case["acts"][:-1]]
    bases = [(C, Cp, mu) for C, Cp, _, mu in bases] + [case["bases"][-1]]
    edges = brute_force_edges(case["acts"], case["jacs"], bases)
    for graph in (cached, live):
        assert_graph_matches(graph, bases, edges)
        assert all(b.n_outputs_ is None for b in graph.bases_)


def test_identity_final_basis_is_consistent(mlp_case):
    case = mlp_case
    graph = InteractionGraph(**graph_params(case)).fit(case["acts"], jacobians=case["jacs"])
    final, X_L = graph.bases_[-1], case["acts"][-1]
    # Exact: multiplying by an identity matrix adds only exact zeros to each entry.
    np.testing.assert_array_equal(graph.transform(-1, X_L), X_L)
    np.testing.assert_array_equal(graph.inverse_transform(-1, X_L), X_L)
    np.testing.assert_allclose(final.interaction_strengths_, (X_L ** 2).mean(0), rtol=1e-12)
    np.testing.assert_array_equal(final.jacobian_gram_, np.eye(4))
    assert final.n_outputs_ is None and final.n_components_ == 4


def test_identity_final_layer_beyond_1e154_fits(mlp_case):
    # The final layer's Gram matrix is infinite in data units (entries ~1e361);
    # its eigendecomposition runs at a scale where it is not, and what lies beyond
    # the float range is reported as inf, as InteractionBasis does.
    case, scale = mlp_case, 2.0**600
    params = dict(center=case["center"], truncation_threshold="auto")  # scale-free
    graph = InteractionGraph(**params).fit(case["acts"], jacobians=case["jacs"])
    acts = case["acts"][:-1] + [case["acts"][-1] * scale]
    jacs = case["jacs"][:-1] + [case["jacs"][-1] * scale]
    with pytest.warns(RuntimeWarning, match="beyond the float range"):
        big = InteractionGraph(**params).fit(acts, jacobians=jacs)
    assert np.isinf(big.bases_[-1].gram_eigenvalues_[0])
    # The final layer's scale cancels in every other layer (SPEC 1(d) with A = c I).
    for l, X in enumerate(case["acts"][:-1]):
        Z = graph.transform(l, X)
        np.testing.assert_allclose(np.ldexp(big.transform(l, X), -600), Z,
                                   atol=1e-9 * np.abs(Z).max())



@pytest.mark.parametrize("variant_source", ["cached", "model", "model-fast"])
def test_global_variant_matches_brute_force(mlp_case, variant_source):
    case = mlp_case
    params = graph_params(case, variant="global", edge_point="data")
    if variant_source == "cached":
        graph = InteractionGraph(**params).fit(case["acts"], jacobians=case["jacs"])
    else:
        graph = InteractionGraph.from_model(
            case["net"], LAYERS, case["X"], fast_path=variant_source == "model-fast", **params
        )
    bases = brute_force_bases(case["acts"], case["jacs"], center=case["center"],
                              variant="global")
    assert_graph_matches(graph, bases, brute_force_edges(case["acts"], case["jacs"], bases))
    local = InteractionGraph(**graph_params(case)).fit(case["acts"], jacobians=case["jacs"])
    # The last hidden layer sees the final layer directly: the variants agree there.
    assert_close(graph.bases_[2].components_, local.bases_[2].components_)
    assert not np.allclose(graph.bases_[0].interaction_strengths_,
                           local.bases_[0].interaction_strengths_)


def test_inputs_as_tensors_zarr_and_small_chunks(mlp_case, tmp_path):
    case = mlp_case
    reference = InteractionGraph(**graph_params(case)).fit(case["acts"], jacobians=case["jacs"])
    tensors = InteractionGraph(**graph_params(case), batch_size=7).fit(
        [torch.as_tensor(a) for a in case["acts"]],
        jacobians=[torch.as_tensor(j) for j in case["jacs"]],
    )
    acts_z, jacs_z = collect(case["net"], LAYERS, case["X"], verbose=False,
                             cache=tmp_path / "cache.zarr")
    zarr_graph = InteractionGraph(**graph_params(case), batch_size=13).fit(
        acts_z, jacobians=jacs_z
    )
    cache_graph = InteractionGraph(**graph_params(case)).fit(
        ActivationCache.open(tmp_path / "cache.zarr")
    )
    assert cache_graph.layer_names_ == LAYERS
    memmaps = []
    for name, array in [*(("a", a) for a in case["acts"]), *(("j", j) for j in case["jacs"])]:
        path = tmp_path / f"{name}{len(memmaps)}.npy"
        np.save(path, array)
        memmaps.append(np.load(path, mmap_mode="r"))
    memmap_graph = InteractionGraph(**graph_params(case), batch_size=50).fit(
        memmaps[:4], jacobians=memmaps[4:]
    )
    for graph in (tensors, zarr_graph, cache_graph, memmap_graph):
        for E, E_ref in zip(graph.edges_, reference.edges_):
            assert_close(E, E_ref, 1e-11)
        for b, b_ref in zip(graph.bases_, reference.bases_):
            assert_close(b.components_, b_ref.components_, 1e-11)


def test_model_data_as_dataloader_and_numpy(mlp_case):
    case = mlp_case
    reference = InteractionGraph.from_model(case["net"], LAYERS, case["X"], **graph_params(case))
    loader = DataLoader(TensorDataset(case["X"], torch.zeros(len(case["X"]))), batch_size=32,
                        shuffle=True)
    for data in (loader, case["X"].numpy()):
        graph = InteractionGraph.from_model(case["net"], LAYERS, data, **graph_params(case))
        for E, E_ref in zip(graph.edges_, reference.edges_):
            assert_close(E, E_ref, 1e-11)


# --------------------------------------------------------------------------- integrated gradients
def tanh_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def exact_integrated_edges(net, X, graph):
    """Edges with the exact path average of the Jacobian, in closed form.

    Along ``p(alpha) = mu + alpha (x - mu)`` the pre-activation is
    ``a + alpha b``, and the average of ``tanh'`` is
    ``(tanh(a + b) - tanh(a)) / b``; the second section is linear.
    """
    W0, b0 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    W1 = net[2].weight.detach().numpy()
    acts = forward_activations([net[0:2], net[2:3]], X)
    bases = [(b.components_.T, b.inverse_components_, b.mean_) for b in graph.bases_]
    edges = []
    for l, avg_jac in enumerate([
        lambda x, mu: W0 * _avg_sech2(mu @ W0.T + b0, x @ W0.T + b0)[:, None],
        lambda x, mu: W1,
    ]):
        C_next = bases[l + 1][0]
        C, Cp, mu = bases[l]
        E = np.zeros((C_next.shape[1], C.shape[1]))
        for x in acts[l]:
            z = (x - mu) @ C
            E += (C_next.T @ avg_jac(x, mu) @ Cp.T * z) ** 2
        edges.append(E / len(acts[l]))
    return edges


def _avg_sech2(a, b_end):
    b = b_end - a
    small = np.abs(b) < 1e-8
    safe = np.where(small, 1.0, b)
    return np.where(small, 1 - np.tanh(a) ** 2, (np.tanh(a + b) - np.tanh(a)) / safe)


def _edge_error(edges, exact):
    return max(np.abs(E - F).max() / np.abs(F).max() for E, F in zip(edges, exact))


@pytest.mark.parametrize("fast_path", [False, True])
def test_integrated_gradients_converge_to_exact_path_integral(fast_path):
    net = tanh_net()
    X = torch.randn(40, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layers = [":input", "1", "2"]

    def fit(integration, n_alphas):
        return InteractionGraph.from_model(
            net, layers, X, integration=integration, n_alphas=n_alphas, edge_point="data",
            fast_path=fast_path,
        )

    exact = exact_integrated_edges(net, X, fit(None, 1))
    errors = {}
    for integration, n_alphas in [("trapezoid", 4), ("gauss-legendre", 4),
                                  ("trapezoid", 17), ("trapezoid", 33), ("gauss-legendre", 12)]:
        graph = fit(integration, n_alphas)
        assert graph.fast_path_ == [fast_path] * 2
        errors[integration, n_alphas] = _edge_error(graph.edges_, exact)
    # Trapezoid: O(h^2), halving h divides the error by 4; Gauss-Legendre: exponential.
    assert 3 < errors["trapezoid", 17] / errors["trapezoid", 33] < 5
    assert errors["trapezoid", 33] < 2e-4
    assert errors["gauss-legendre", 12] < 1e-12
    assert errors["gauss-legendre", 4] < errors["trapezoid", 4] / 10
    # Without integration the edges are not the path average.
    assert _edge_error(fit(None, 1).edges_, exact) > 1e-3


def test_integration_and_reconstruction_need_a_model(mlp_case):
    case = mlp_case
    for params, match in [({"integration": "trapezoid"}, "needs a model"),
                          ({"edge_point": "reconstructed"}, "reconstructed")]:
        with pytest.raises(ValueError, match=match):
            InteractionGraph(**params).fit(case["acts"], jacobians=case["jacs"])
    with pytest.raises(ValueError, match="n_alphas >= 2"):
        InteractionGraph.from_model(case["net"], LAYERS, case["X"], integration="trapezoid",
                                    n_alphas=1)


# --------------------------------------------------------------------------- sequence models
def attention_model(readout):
    torch.manual_seed(5)
    if readout:  # the last layer has one position: P = 5, 5, 1
        return nn.Sequential(SingleHeadAttention(4), LastPosition(), nn.Linear(4, 3)).double()
    return nn.Sequential(SingleHeadAttention(4), nn.Linear(4, 3), nn.Tanh()).double()


@pytest.mark.parametrize("readout", [False, True])
def test_sequence_model_matches_brute_force(readout, tmp_path):
    model = attention_model(readout)
    X = torch.randn(12, 5, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    layers = ["0:input", "0", "2"]
    sections = [model[0], model[1:3]]
    seq_acts = forward_activations(sections, X)
    full_jacs = []
    for f, a in zip(sections, seq_acts):
        J = per_sample_jacobians(f, a)
        if J.ndim == 4:  # flat output (o, P_in, d): one output position
            J = J[:, None]
        full_jacs.append(J)  # (n, P_out, o, P_in, d)
    rows = [a.reshape(-1, a.shape[-1]) for a in seq_acts]
    bases = brute_force_bases(rows, full_jacs, positions=True)
    edges = brute_force_edges(rows, full_jacs, bases, positions=True)

    acts, jacs = collect(model, layers, X, sequence=True, verbose=False, batch_size=5)
    graphs = [InteractionGraph(truncation_threshold=THRESHOLD).fit(acts, jacobians=jacs,
                                                                   sequence=True)]
    for fast_path in ["auto", False]:
        graphs.append(InteractionGraph.from_model(
            model, layers, X, sequence=True, truncation_threshold=THRESHOLD,
            edge_point="data", fast_path=fast_path, batch_size=5,
        ))
    assert graphs[1].fast_path_ == [False, not readout]
    for graph in graphs:
        assert_graph_matches(graph, bases, edges)
        assert graph.n_samples_seen_ == 12
    # Global variant: cached per-sample chains across positions == section VJPs.
    cached = InteractionGraph(truncation_threshold=THRESHOLD, variant="global").fit(
        acts, jacobians=jacs, sequence=True)
    live = InteractionGraph.from_model(model, layers, X, sequence=True, variant="global",
                                       truncation_threshold=THRESHOLD, edge_point="data")
    for b, b_ref in zip(live.bases_, cached.bases_):
        assert_close(b.components_, b_ref.components_)
    for E, E_ref in zip(live.edges_, cached.edges_):
        assert_close(E, E_ref)


# --------------------------------------------------------------------------- stochastic sources
def test_stochastic_sources_converge_to_exact_second_moment(mlp_case):
    case = mlp_case
    exact = InteractionGraph(**graph_params(case)).fit(case["acts"], jacobians=case["jacs"])
    M_exact = exact.bases_[2].jacobian_gram_  # C_3 = I for every run: same M'
    errors = []
    for k in [8, 200, 5000]:
        graph = InteractionGraph(**graph_params(case, stochastic_sources=k, random_state=0)).fit(
            case["acts"], jacobians=case["jacs"]
        )
        M = graph.bases_[2].jacobian_gram_
        errors.append(np.linalg.norm(M - M_exact) / np.linalg.norm(M_exact))
        assert graph.bases_[2].n_outputs_ == k
    assert errors[2] < 0.05 and errors[2] < errors[1] < errors[0]


def test_stochastic_sources_same_draws_on_every_path(mlp_case):
    """Same seed, same R: cached, generic and closed-form paths agree exactly."""
    case = mlp_case
    params = graph_params(case, stochastic_sources=5, random_state=7, edge_point="data")
    cached = InteractionGraph(**params).fit(case["acts"], jacobians=case["jacs"])
    for fast_path in (False, True):
        graph = InteractionGraph.from_model(case["net"], LAYERS, case["X"], fast_path=fast_path,
                                            **params)
        for b, b_ref in zip(graph.bases_, cached.bases_):
            assert_close(b.jacobian_gram_, b_ref.jacobian_gram_)
        for E, E_ref in zip(graph.edges_, cached.edges_):
            assert_close(E, E_ref)


# --------------------------------------------------------------------------- fast-path detection
class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * 2


@pytest.mark.parametrize("model_fn, layers, expected", [
    # activation then Linear, with Dropout and Identity in between, nested Sequential
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.GELU(), nn.Dropout(0.3),
                                                          nn.Identity(), nn.Linear(4, 5))),
     [":input", "0", "1"], [True, True]),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.1), nn.Linear(4, 4), nn.Sigmoid()),
     ["0:input", "1", "2", "3"], [True, True, True]),
    (lambda: nn.Sequential(nn.Linear(3, 4), Custom(), nn.Linear(4, 2)),
     [":input", "0", "1", "2"], [True, False, True]),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 2)),
     [":input", "0", "2", "3"], [True, False, True]),
])
def test_fast_path_detection(model_fn, layers, expected):
    model = model_fn().double()
    X = torch.randn(40, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    auto = InteractionGraph.from_model(model, layers, X, edge_point="data")
    generic = InteractionGraph.from_model(model, layers, X, edge_point="data", fast_path=False)
    assert auto.fast_path_ == expected
    for E, E_ref in zip(auto.edges_, generic.edges_):
        assert_close(E, E_ref)
    for b, b_ref in zip(auto.bases_, generic.bases_):
        assert_close(b.jacobian_gram_, b_ref.jacobian_gram_)
    if not all(expected):
        with pytest.raises(ValueError, match="fast_path=True needs"):
            InteractionGraph.from_model(model, layers, X, fast_path=True)


# --------------------------------------------------------------------------- invariance


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), log_cond=st.floats(0, 3))
def test_edges_invariant_under_hidden_reparameterisation(seed, log_cond):
    """x1' = x1 @ A with chain-rule Jacobians leaves bases' outputs and edges unchanged."""
    rng = np.random.default_rng(seed)
    n, d = 80, [4, 5, 3]
    acts = [rng.normal(size=(n, k)) for k in d]
    jacs = [rng.normal(size=(n, d[l + 1], d[l])) + rng.normal(size=(d[l + 1], d[l]))
            for l in range(2)]
    A = random_invertible(seed, d[1], log_cond)
    acts_A = [acts[0], acts[1] @ A, acts[2]]
    jacs_A = [np.einsum("ji,xjk->xik", A, jacs[0]), jacs[1] @ np.linalg.inv(A).T]
    graph = InteractionGraph().fit(acts, jacobians=jacs)
    graph_A = InteractionGraph().fit(acts_A, jacobians=jacs_A)
    for E, E_A in zip(graph.edges_, graph_A.edges_):
        np.testing.assert_allclose(E_A, E, rtol=1e-6, atol=1e-9 * np.abs(E).max())
    Z, Z_A = graph.transform(1, acts[1]), graph_A.transform(1, acts_A[1])
    np.testing.assert_allclose(np.abs(Z_A), np.abs(Z), atol=1e-7 * np.abs(Z).max())


# --------------------------------------------------------------------------- adjacency
@pytest.fixture(scope="module")
def fitted(mlp_case):
    return InteractionGraph(**graph_params(mlp_case)).fit(
        mlp_case["acts"], jacobians=mlp_case["jacs"]
    )


def test_adjacency_blocks_offsets_and_norms(fitted):
    r = fitted.n_components_
    np.testing.assert_array_equal(fitted.layer_offsets_, np.concatenate([[0], np.cumsum(r)]))
    assert fitted.layer_offsets_.dtype == np.int64
    eps = [float(np.median(E)) for E in fitted.edges_]
    cases = {
        ("identity", None): lambda E, e: E,
        ("sqrt", None): lambda E, e: np.sqrt(E),
        ("log", tuple(eps)): lambda E, e: np.maximum(0, np.log10(E / e)),
        ("log", 1e-3): lambda E, e: np.maximum(0, np.log10(E / 1e-3)),
        ("log", None): lambda E, e: np.maximum(0, np.log10(E / (E[E > 0].min() / 10))),
    }
    off = fitted.layer_offsets_
    for (norm, eps_arg), fn in cases.items():
        A = fitted.adjacency(norm=norm, eps=list(eps_arg) if isinstance(eps_arg, tuple)
                             else eps_arg)
        assert sp.issparse(A) and A.format == "csr" and A.shape == (off[-1], off[-1])
        dense = A.toarray()
        np.testing.assert_array_equal(dense, dense.T)
        expected = np.zeros_like(dense)
        for l, E in enumerate(fitted.edges_):
            e = eps[l] if isinstance(eps_arg, tuple) else eps_arg
            expected[off[l + 1]:off[l + 2], off[l]:off[l + 1]] = fn(E, e)
        expected += expected.T
        np.testing.assert_allclose(dense, expected, rtol=1e-12, atol=0)
        assert (A.data != 0).all()
    with pytest.raises(ValueError, match="expected 3, got 2"):
        fitted.adjacency(norm="log", eps=[1.0, 1.0])


def test_adjacency_feeds_modularity_clustering(fitted):
    pytest.importorskip("networkit")
    from sklearn_lib.cluster import ModularityClustering

    clustering = ModularityClustering(random_state=0, normalization="log").fit(fitted)
    assert clustering.labels_.shape == (fitted.layer_offsets_[-1],)


# --------------------------------------------------------------------------- bad input
def _bad_inputs(acts, jacs):
    n = len(acts[0])
    return [
        ("len\\(X\\) - 1 = 3", acts, jacs[:2]),
        ("at least 2 layers", acts[:1], []),
        ("same samples", [acts[0], acts[1][:-1], acts[2], acts[3]],
         [jacs[0], jacs[1][:-1], jacs[2]]),
        ("must be \\(n_rows_1, d_2, d_1\\)", acts, [jacs[0], jacs[1][:, :-1], jacs[2]]),
        ("transposed", acts, [jacs[0], jacs[1], np.swapaxes(jacs[2], 1, 2)]
         if jacs[2].shape[1] != jacs[2].shape[2] else None),
        ("must be \\(n_rows_0", acts, [jacs[0][: n - 1], jacs[1], jacs[2]]),
        ("must be 2-D", [acts[0][:, None], *acts[1:]], jacs),
        ("needs the Jacobians", acts, None),
    ]


def test_bad_cached_input_raises_and_touches_nothing(fitted, mlp_case):
    acts, jacs = mlp_case["acts"], mlp_case["jacs"]
    edges = [E.copy() for E in fitted.edges_]
    bases = list(fitted.bases_)
    for match, bad_acts, bad_jacs in _bad_inputs(acts, jacs):
        if bad_jacs is None and match == "transposed":
            continue
        with pytest.raises(ValueError, match=match):
            fitted.fit(bad_acts, jacobians=bad_jacs)
    assert fitted.bases_ == bases
    for E, E_ref in zip(fitted.edges_, edges):
        np.testing.assert_array_equal(E, E_ref)
    with pytest.raises(ValueError, match="n_components must have one entry per layer"):
        InteractionGraph(n_components=[2, 2]).fit(acts, jacobians=jacs)
    with pytest.raises(ValueError, match="n_components\\[-1\\] must be None"):
        InteractionGraph(n_components=[2, 2, 2, 2]).fit(acts, jacobians=jacs)
    with pytest.raises(ValueError, match="final_layer"):
        InteractionGraph(final_layer="softmax").fit(acts, jacobians=jacs)
    with pytest.raises(ValueError, match="contains NaN"):
        InteractionGraph().fit([acts[0], acts[1] * np.nan, *acts[2:]], jacobians=jacs)


class NotDifferentiable(nn.Module):
    def forward(self, x):
        return x.detach() * 2


def test_bad_model_input_raises(mlp_case):
    net, X = mlp_case["net"], mlp_case["X"]
    with pytest.raises(ValueError, match="unknown layer.*Valid names"):
        InteractionGraph.from_model(net, [":input", "1", "fc9"], X)
    with pytest.raises(ValueError, match="at least 2 layer names"):
        InteractionGraph.from_model(net, ["1"], X)
    with pytest.raises(ValueError, match="re-iterable"):
        InteractionGraph.from_model(net, LAYERS, iter([X]))
    model = nn.Sequential(nn.Linear(6, 4), NotDifferentiable(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="not differentiable"):
        InteractionGraph.from_model(model, ["0", "1", "2"], make_data())
    with pytest.raises(ValueError, match="runs before"):
        InteractionGraph.from_model(net, ["3", "1"], X, fast_path=False)
    # sqrt' is infinite at the exact zeros of a ReLU: the products are not finite.
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), Sqrt(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="contain NaN or infinity"):
        InteractionGraph.from_model(model, ["1", "2", "3"], make_data())


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


# --------------------------------------------------------------------------- estimator API
def test_estimator_api(mlp_case, capsys):
    graph = InteractionGraph(n_components=3, verbose=False)
    assert clone(graph).get_params() == graph.get_params()
    with pytest.raises(NotFittedError):
        graph.adjacency()
    graph.fit(mlp_case["acts"], jacobians=mlp_case["jacs"])
    assert list(graph.n_components_) == [3, 3, 3, 4]
    assert capsys.readouterr().err == ""
    assert graph.transform("1", mlp_case["acts"][1]).shape == (len(mlp_case["X"]), 3)
    with pytest.raises(ValueError, match="unknown layer"):
        graph.transform("fc1", mlp_case["acts"][1])
    with pytest.raises(ValueError, match="layer must be"):
        graph.transform(4, mlp_case["acts"][1])
    InteractionGraph(verbose=True).fit(mlp_case["acts"], jacobians=mlp_case["jacs"])
    assert "InteractionGraph" in capsys.readouterr().err


# --------------------------------------------------------------------------- sequence layouts
def test_transform_keeps_the_sequence_layout():
    model = attention_model(False)
    X = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    graph = InteractionGraph(n_components=[3, 2, None]).fit_model(
        model, ["0:input", "0", "2"], X, sequence=True)
    rows = X.reshape(30, 4)
    Z_rows = graph.transform(0, rows)
    Z = graph.transform(0, X)
    assert Z.shape == (6, 5, 3) and isinstance(Z, torch.Tensor)
    assert_same_up_to_rounding(Z.reshape(30, 3), Z_rows)
    Z_np = graph.transform("0:input", X.numpy())
    assert isinstance(Z_np, np.ndarray) and Z_np.shape == (6, 5, 3)
    np.testing.assert_allclose(Z_np.reshape(30, 3), Z_rows.numpy(), rtol=1e-12, atol=1e-12)
    back = graph.inverse_transform(0, Z)
    assert back.shape == (6, 5, 4)
    assert_same_up_to_rounding(back.reshape(30, 4), graph.inverse_transform(0, Z_rows))
    assert graph.inverse_transform(0, Z_np.tolist()).shape == (6, 5, 4)


# --------------------------------------------------------------------------- constant node
def _folded_edges(graph, sections, acts, l):
    """Edges of layer l with the constant node, from the bias-folded network (SPEC 1, step 1).

    ``sections[l](u)`` is section l with its bias multiplied by a constant-1 input
    coordinate ``u[-1]``. In the affine coordinates ``(z, 1)`` of layer l the input
    is ``u = (z C_pinv + c mu, c)``, and layer l+1's coordinates are
    ``(y - c mu_out) C_out``; the constant node's Jacobian column is their
    derivative in ``c``, by autograd, at the reconstructed point.
    """
    b_in, b_out = graph.bases_[l], graph.bases_[l + 1]
    C_pinv, mu = torch.as_tensor(b_in.inverse_components_), torch.as_tensor(b_in.mean_)
    C_out, mu_out = torch.as_tensor(b_out.components_.T), torch.as_tensor(b_out.mean_)
    Z = (torch.as_tensor(acts[l]) - mu) @ torch.as_tensor(b_in.components_.T)

    def coordinates(zc):
        z, c = zc[:-1], zc[-1]
        y = sections[l](torch.cat([z @ C_pinv + c * mu, c[None]]))
        return (y - c * mu_out) @ C_out

    E = 0
    for z in Z:
        zc = torch.cat([z, torch.ones(1, dtype=z.dtype)])
        E = E + (jacobian(coordinates, zc) * zc) ** 2
    return (E / len(Z)).numpy()


@pytest.mark.parametrize("fast_path", ["auto", False])
def test_constant_node_is_the_folded_bias_coordinate(fast_path, tmp_path):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
                        nn.Linear(5, 2)).double()
    X = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # Positively homogeneous sections of (activation, constant): ReLU and affine maps.
    W = [(net[i].weight.detach(), net[i].bias.detach()) for i in (0, 2, 4)]
    sections = [
        lambda u, w=w, act=act: act(u[:-1] @ w[0].T + u[-1] * w[1])
        for w, act in zip(W, [torch.relu, torch.relu, lambda t: t])
    ]
    graph = InteractionGraph([2, 3, 2, None], constant_node=True, fast_path=fast_path).fit_model(
        net, [":input", "1", "3", "4"], X)
    assert graph.edge_point_ == "reconstructed" and graph.n_components_.tolist() == [2, 3, 2, 2]
    # Each rotated layer gets one node more, the last; the unrotated logits do not.
    assert graph.layer_offsets_.tolist() == [0, 3, 7, 10, 12]
    with torch.no_grad():
        acts = [X, net[1](net[0](X)), net[3](net[2](net[1](net[0](X))))]
    for l in range(3):
        expected = _folded_edges(graph, sections, acts, l)
        E = graph.edges_[l]
        r_out = graph.n_components_[l + 1]
        # Rows of layer l+1's directions: the folded Jacobian, constant column included.
        assert_close(E[:r_out], expected, rtol=1e-9)
        if l < 2:  # the constant is carried to the next constant node, and only there
            # Exact: set, not computed (constant to constant, weight P_{l+1} / P_l = 1).
            np.testing.assert_array_equal(E[r_out], np.eye(E.shape[1])[-1])
        else:
            assert E.shape[0] == r_out
    A = graph.adjacency()
    assert A.shape == (12, 12)
    # A saved graph keeps its constant nodes.
    graph.save(tmp_path / "graph")
    loaded = InteractionGraph.load(tmp_path / "graph")
    assert loaded.layer_offsets_.tolist() == graph.layer_offsets_.tolist()
    for E, E_ref in zip(loaded.edges_, graph.edges_):
        np.testing.assert_array_equal(E, E_ref)


def test_constant_node_with_integrated_gradients_is_the_output_at_the_mean():
    # Completeness: the path attributions from the mean add up to z_out(x) - z_out(mean),
    # so what they leave over is the next layer's coordinates at the input mean.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh()).double()
    X = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    graph = InteractionGraph(constant_node=True, integration="gauss-legendre", n_alphas=24,
                             final_layer="pca").fit_model(net, [":input", "1", "3"], X)
    sections = [lambda h: net[1](net[0](h)), lambda h: net[3](net[2](h))]
    for l, section in enumerate(sections):
        b_in, b_out = graph.bases_[l], graph.bases_[l + 1]
        with torch.no_grad():
            y_mean = section(torch.as_tensor(b_in.mean_)).numpy()
        expected = ((y_mean - b_out.mean_) @ b_out.components_.T) ** 2
        r_out = b_out.n_components_
        np.testing.assert_allclose(graph.edges_[l][:r_out, -1], expected, rtol=1e-8,
                                   atol=1e-12 * expected.max())


# --------------------------------------------------------------------------- shares of Lambda
@pytest.mark.parametrize("share", [0.5, 0.999])
def test_fractional_n_components_per_layer(share):
    net, X = make_mlp(), make_data()
    full = InteractionGraph(verbose=False).fit_model(net, LAYERS, X)
    # Only the first layer truncated: its Jacobians, hence its Lambda, are the full graph's.
    lam = full.bases_[0].interaction_strengths_
    k = int(np.searchsorted(np.cumsum(lam) / lam.sum(), share)) + 1
    first = InteractionGraph(verbose=False, n_components=[share, None, None, None]).fit_model(
        net, LAYERS, X)
    counted = InteractionGraph(verbose=False, n_components=[k, None, None, None]).fit_model(
        net, LAYERS, X)
    assert first.n_components_[0] == k <= full.n_components_[0]
    assert_close(first.edges_[0], counted.edges_[0])
    # A share for every layer: the graph of the counts it implies.
    every = InteractionGraph(verbose=False, n_components=share).fit_model(net, LAYERS, X)
    implied = [*map(int, every.n_components_[:-1]), None]
    again = InteractionGraph(verbose=False, n_components=implied).fit_model(net, LAYERS, X)
    for e1, e2 in zip(every.edges_, again.edges_):
        assert_close(e1, e2)


@pytest.mark.parametrize("entry", [0.0, 1.0, -1, "0.5"])
def test_bad_per_layer_n_components_are_refused(entry):
    with pytest.raises(ValueError, match=r"positive ints, shares in \(0, 1\) or None"):
        InteractionGraph(verbose=False, n_components=[entry, None, None, None]).fit_model(
            make_mlp(), LAYERS, make_data())


def test_few_samples_warn_naming_the_layer():
    net, X = make_mlp(), make_data(n=8)
    with pytest.warns(UserWarning) as record:
        InteractionGraph(verbose=False).fit_model(net, LAYERS, X)
    few = sorted(str(w.message).split(" has ")[0] for w in record if "samples" in str(w.message))
    # 8 samples of the 8-unit hidden layers; the identity final layer (4 units) is never cut.
    assert few == ["layer '1'", "layer '3'"]
