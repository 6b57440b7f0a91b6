"""Edges of sections that mix positions (SPEC section 2), against brute force.

The reference definition attributes feature ``j`` of the input layer through all
source positions before squaring::

    E[i, j] = 1/(n P_in) sum_x sum_t ( sum_s J_tilde_x[(t, i), (s, j)] Z_x[s, j] )^2

Every test below computes full per-sample Jacobians of a tiny attention model
with ``torch.autograd.functional.jacobian`` on hand-written section functions
(not the library's hooks) and evaluates that formula directly in numpy.
"""

import numpy as np
import pytest
import torch
from _attention import D_IN, D, N, P, TinyAttention
from torch import nn
from torch.autograd.functional import jacobian

from sklearn_lib import InteractionGraph
from sklearn_lib.collect import collect
from sklearn_lib.sources._edges import path_quadrature

LAYERS = ["embed", "out", "pool", "head"]


def _sections(model):
    """Hand-written sections between adjacent layers, on one sample (no batch axis)."""
    return [
        lambda h: model.mix(h[None])[0],
        lambda y: torch.tanh(y[-1]),
        lambda p: model.head(p),
    ]


@pytest.fixture(scope="module")
def model():
    return TinyAttention().double().eval()


@pytest.fixture(scope="module")
def data():
    return torch.randn(N, P, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def _activations(model, x):
    with torch.no_grad():
        h = model.embed(x)
        y = model.mix(h)
        p = torch.tanh(y[:, -1])
        return [h, y, p, model.head(p)]


def _as_positions(a):
    """(n, P, d) view of a layer: flat layers have one position."""
    return a[:, None, :] if a.ndim == 2 else a


def brute_force_edges(section, X, basis_in, basis_out, *, edge_point="data", alphas=(1.0,),
                      weights=(1.0,), per_position=False, constant=False):
    """SPEC section 2 written out: full Jacobians per sample, the sums in numpy.

    ``constant=True`` appends the constant node's column: the squared part of
    the output coordinates at the edge point that the attributions leave over.
    """
    shape = X.shape[1:]
    X = _as_positions(X)
    n, p_in, _ = X.shape
    C, C_pinv, mu = basis_in.components_.T, basis_in.inverse_components_, basis_in.mean_
    C_out = basis_out.components_.T
    Z = (X.numpy() - mu) @ C  # (n, P_in, r_in)
    end = Z @ C_pinv + mu if edge_point == "reconstructed" else X.numpy()
    mu_out = basis_out.mean_
    E, E_constant = 0.0, 0.0
    for x in range(n):
        J_bar = 0.0
        for alpha, w in zip(alphas, weights):
            point = torch.as_tensor(mu + alpha * (end[x] - mu)).reshape(shape)
            J = jacobian(section, point).numpy()
            J_bar = J_bar + w * J.reshape(-1, C_out.shape[0], p_in, C.shape[0])
        # J_tilde[t, i, s, j] = C_out^T J[(t, .), (s, .)] C_pinv^T
        J_tilde = np.einsum("oi,tosd,rd->tisr", C_out, J_bar, C_pinv)
        attributed = J_tilde * Z[x][None, None, :, :]  # (t, i, s, j)
        if per_position:
            E = E + np.square(attributed).sum(axis=(0, 2))
        else:
            E = E + np.square(attributed.sum(axis=2)).sum(axis=0)
        with torch.no_grad():
            y = section(torch.as_tensor(end[x]).reshape(shape)).numpy()
        z_out = (y.reshape(-1, C_out.shape[0]) - mu_out) @ C_out  # (t, i)
        E_constant = E_constant + np.square(z_out - attributed.sum(axis=(2, 3))).sum(axis=0)
    if constant:
        return np.column_stack([E, E_constant]) / (n * p_in)
    return E / (n * p_in)


def _check_against_brute_force(graph, model, data, **kwargs):
    acts = _activations(model, data)
    for l, section in enumerate(_sections(model)):
        expected = brute_force_edges(section, acts[l], graph.bases_[l], graph.bases_[l + 1], **kwargs)
        np.testing.assert_allclose(graph.edges_[l], expected, rtol=1e-9,
                                   atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("edge_point", ["data", "reconstructed"])
def test_model_edges_follow_the_reference_definition(model, data, edge_point):
    # Truncated bases make the reconstructed point differ from the data.
    graph = InteractionGraph([2, 3, 2, None], edge_point=edge_point).fit_model(
        model, LAYERS, data, sequence=True)
    assert graph.n_components_.tolist() == [2, 3, 2, 2]
    _check_against_brute_force(graph, model, data, edge_point=edge_point)


@pytest.mark.parametrize("integration", ["trapezoid", "gauss-legendre"])
def test_integrated_gradient_edges_sum_over_positions_before_squaring(model, data, integration):
    graph = InteractionGraph([2, 3, 2, None], integration=integration, n_alphas=3).fit_model(
        model, LAYERS, data, sequence=True)
    alphas, weights = path_quadrature(integration, 3)
    _check_against_brute_force(graph, model, data, edge_point="reconstructed",
                               alphas=alphas, weights=weights)


@pytest.mark.parametrize("batch_size", [None, 1, P + 1, 2 * P - 1])
def test_cached_edges_follow_the_reference_definition(model, data, batch_size):
    # Chunks of any size hold whole samples, so no sample's positions are split.
    acts, jacs = collect(model, LAYERS, data, sequence=True, verbose=False)
    graph = InteractionGraph(batch_size=batch_size).fit(acts, jacobians=jacs, sequence=True)
    _check_against_brute_force(graph, model, data)
    from_model = InteractionGraph(edge_point="data").fit_model(model, LAYERS, data,
                                                                sequence=True)
    for E, E_model in zip(graph.edges_, from_model.edges_):
        np.testing.assert_allclose(E, E_model, rtol=1e-9, atol=1e-14)


def test_the_reference_form_is_not_the_per_position_form(model, data):
    # The check above could not fail if both forms agreed on this model.
    graph = InteractionGraph(edge_point="data").fit_model(model, LAYERS, data, sequence=True)
    acts = _activations(model, data)
    # Attention mixes positions; the readout depends on the last position only.
    for l, differ in ((0, True), (1, False)):
        args = (_sections(model)[l], acts[l], graph.bases_[l], graph.bases_[l + 1])
        reference = brute_force_edges(*args)
        per_position = brute_force_edges(*args, per_position=True)
        assert (np.max(np.abs(reference - per_position) / reference) > 0.2) == differ


def test_row_wise_sections_have_one_form():
    # A per-position MLP: only s = t contributes, so summing over source
    # positions before squaring changes nothing, and the closed form (which
    # squares each row) agrees with the generic products.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    x = torch.randn(7, P, 3, dtype=torch.float64)
    layers = [":input", "1", "2"]
    fast = InteractionGraph(edge_point="data").fit_model(net, layers, x, sequence=True)
    generic = InteractionGraph(edge_point="data", fast_path=False).fit_model(
        net, layers, x, sequence=True)
    assert fast.fast_path_ == [True, True] and generic.fast_path_ == [False, False]
    net = net.double()
    with torch.no_grad():
        acts = [x, net[1](net[0](x))]
    sections = [lambda h: net[1](net[0](h)), net[2]]
    for l in range(2):
        args = (sections[l], acts[l], fast.bases_[l], fast.bases_[l + 1])
        reference = brute_force_edges(*args)
        np.testing.assert_allclose(brute_force_edges(*args, per_position=True), reference,
                                   rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(fast.edges_[l], reference, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(generic.edges_[l], reference, rtol=1e-9, atol=1e-14)


# --------------------------------------------------------------------------- chosen positions
class LastPositionWrapper(TinyAttention):
    """The hand-written way to read ``out`` at the last position: an extra module."""

    def __init__(self):
        super().__init__()
        self.last = nn.Identity()

    def forward(self, x):
        y = self.mix(self.embed(x))
        return self.head(self.pool(torch.tanh(self.last(y[:, -1:])[:, -1])))


@pytest.mark.parametrize("edge_point", ["data", "reconstructed"])
def test_restricted_layer_equals_the_wrapper_module(model, data, edge_point):
    wrapper = LastPositionWrapper().double().eval()
    params = dict(n_components=[2, 3, 2, None], edge_point=edge_point)
    restricted = InteractionGraph(**params).fit_model(model, ["embed", "out[-1]", "pool", "head"],
                                                      data, sequence=True)
    wrapped = InteractionGraph(**params).fit_model(wrapper, ["embed", "last", "pool", "head"],
                                                   data, sequence=True)
    assert restricted.layer_names_[1] == "out[-1]"
    for b, b_ref in zip(restricted.bases_, wrapped.bases_):
        np.testing.assert_allclose(b.components_, b_ref.components_, rtol=1e-10, atol=1e-12)
    for E, E_ref in zip(restricted.edges_, wrapped.edges_):
        np.testing.assert_allclose(E, E_ref, rtol=1e-10, atol=1e-14 * E_ref.max())
    # The attention section now ends at one position: E = 1/(n P_in) sum_x (sum_s ...)^2.
    h, y = _activations(model, data)[:2]
    expected = brute_force_edges(lambda t: model.mix(t[None])[0][-1:], h,
                                 restricted.bases_[0], restricted.bases_[1],
                                 edge_point=edge_point)
    np.testing.assert_allclose(restricted.edges_[0], expected, rtol=1e-9)
    # Activations from the cache path are the chosen positions too.
    acts, jacs = collect(model, ["embed", "out[0, 2]"], data, sequence=True, verbose=False)
    np.testing.assert_allclose(acts[1], y[:, [0, 2]].reshape(-1, D).numpy(), rtol=1e-12)
    assert jacs[0].shape == (N * P, 2 * D, D)


# --------------------------------------------------------------------------- constant node
@pytest.mark.parametrize("source", ["model", "cache"])
def test_constant_node_across_positions(model, data, source):
    # The constant node is what the attributions of the directions leave over,
    # with the attributions summed over source positions as above.
    params = dict(constant_node=True, edge_point="data")
    if source == "model":
        graph = InteractionGraph(**params).fit_model(model, LAYERS, data, sequence=True)
    else:
        acts, jacs = collect(model, LAYERS, data, sequence=True, verbose=False)
        graph = InteractionGraph(**params, batch_size=P + 1).fit(acts, jacobians=jacs,
                                                                  sequence=True)
    acts = _activations(model, data)
    positions = [P, P, 1, 1]
    for l, section in enumerate(_sections(model)):
        r_out = graph.n_components_[l + 1]
        expected = brute_force_edges(section, acts[l], graph.bases_[l], graph.bases_[l + 1],
                                     constant=True)
        E = graph.edges_[l]
        np.testing.assert_allclose(E[:r_out], expected, rtol=1e-9,
                                   atol=1e-12 * np.abs(expected).max())
        if l < 2:  # one constant per position, carried to the same position
            expected_row = np.zeros(E.shape[1])
            expected_row[-1] = positions[l + 1] / positions[l]
            np.testing.assert_allclose(E[r_out], expected_row, rtol=1e-15)
    assert graph.layer_offsets_.tolist() == np.cumsum(
        [0, *(graph.n_components_[:3] + 1), graph.n_components_[3]]).tolist()
