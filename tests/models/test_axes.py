"""Layers with declared feature axes against hand-written permute/reshape modules."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sklearn_lib import InteractionGraph, Layer
from sklearn_lib.collect import collect, record_activations
from sklearn_lib.models._axes import from_rows_view, to_rows_view

N = 12


# --------------------------------------------------------------------------- models
class ToRows(nn.Module):
    """(batch, ...) -> (batch, P, d) by moving ``features`` last: the brute force."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def forward(self, x):
        self.shape = x.shape
        positions = [a for a in range(1, x.ndim) if a not in self.features]
        moved = x.permute(0, *positions, *self.features)
        return moved.reshape(x.shape[0], -1, int(np.prod([x.shape[a] for a in self.features])))


class FromRows(nn.Module):
    def __init__(self, to_rows):
        super().__init__()
        self.to_rows = to_rows

    def forward(self, v):
        shape, features = self.to_rows.shape, self.to_rows.features
        positions = [a for a in range(1, len(shape)) if a not in features]
        order = [0, *positions, *features]
        moved = v.reshape(shape[0], *(shape[a] for a in order[1:]))
        return moved.permute(*np.argsort(order).tolist())


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1), nn.Tanh(),
        nn.Conv2d(5, 4, 3, padding=1, stride=2), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double()


class WrappedConv(nn.Module):
    """``conv_net`` with the two Tanh outputs passed through ToRows/FromRows pairs."""

    def __init__(self, net):
        super().__init__()
        self.net, self.r1, self.r2 = net, ToRows((1,)), ToRows((1,))
        self.b1, self.b2 = FromRows(self.r1), FromRows(self.r2)

    def forward(self, x):
        n = self.net
        h = self.b1(self.r1(n[1](n[0](x))))
        h = self.b2(self.r2(n[3](n[2](h))))
        return n[6](n[5](n[4](h)))


class Heads(nn.Module):
    """Per-position heads ``(batch, position, head, head_dim)``, mixed over earlier positions."""

    def __init__(self, wrap=False):
        super().__init__()
        torch.manual_seed(1)
        self.qkv = nn.Linear(3, 6)
        self.heads = nn.Identity()
        self.rows = ToRows((2, 3)) if wrap else nn.Identity()
        self.back = FromRows(self.rows) if wrap else nn.Identity()
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.qkv(x)).reshape(x.shape[0], x.shape[1], 2, 3)
        h = self.back(self.rows(self.heads(h)))
        # Every position reads the running mean of the earlier ones (a mixing section).
        mixed = torch.cumsum(h, 1) / torch.arange(1, x.shape[1] + 1, dtype=h.dtype)[:, None, None]
        return self.out(torch.sin(mixed).reshape(x.shape[0], x.shape[1], 6))


@pytest.fixture
def images():
    return torch.randn(N, 2, 6, 5, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)


def _assert_same_graph(g1, g2):
    np.testing.assert_array_equal(g1.n_components_, g2.n_components_)
    for b1, b2 in zip(g1.bases_, g2.bases_):
        scale = b1.interaction_strengths_.max()
        np.testing.assert_allclose(b1.interaction_strengths_, b2.interaction_strengths_,
                                   rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(b1.components_, b2.components_, rtol=0,
                                   atol=1e-10 * np.abs(b1.components_).max())
    for e1, e2 in zip(g1.edges_, g2.edges_):
        np.testing.assert_allclose(e1, e2, rtol=0, atol=1e-10 * e1.max())


# --------------------------------------------------------------------------- the view
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(lambda s: (2, *s))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=shapes, data=st.data())
def test_view_is_numpy_moveaxis_and_inverts_exactly(shape, data):
    axes = data.draw(st.lists(st.integers(1, len(shape) - 1), min_size=1, unique=True))
    negative = data.draw(st.booleans())
    given_axes = tuple(a - len(shape) if negative else a for a in axes)
    value = torch.arange(float(np.prod(shape))).reshape(shape)
    view = to_rows_view("x", given_axes, value)
    features = sorted(axes)
    expected = np.moveaxis(value.numpy(), features, range(len(shape) - len(features), len(shape)))
    d = int(np.prod([shape[a] for a in features]))
    np.testing.assert_array_equal(view.numpy(), expected.reshape(shape[0], -1, d))
    assert torch.equal(from_rows_view("x", given_axes, view, value.shape), value)


@pytest.mark.parametrize("axes", [(0,), (4,), (-5,), (1, 1), (1, -3)])
def test_impossible_axes_are_refused_naming_layer_and_shape(axes, images):
    net = conv_net()
    with pytest.raises(ValueError, match=r"layer '1' declares feature_axes.*\(2, 5, 6, 5\)"):
        record_activations(net, [Layer("1", feature_axes=axes)], images[:2], verbose=False)


@pytest.mark.parametrize("axes", [(), "1", 1.0, (1, 2.0)])
def test_feature_axes_must_be_ints(axes):
    with pytest.raises(TypeError, match="feature_axes must be an int"):
        Layer("1", feature_axes=axes)


def test_layer_names_must_be_strings():
    with pytest.raises(TypeError, match="name must be a string"):
        Layer(1, feature_axes=1)
    with pytest.raises(TypeError, match="names \\(strings\\) or Layer"):
        record_activations(conv_net(), [1], torch.zeros(2, 2, 3, 3), verbose=False)


def test_recorded_rows_are_pixels_of_channels(images):
    net = conv_net()
    rows = record_activations(net, [Layer("1", feature_axes=1)], images, verbose=False)["1"]
    assert rows.shape == (N, 30, 5)
    with torch.no_grad():
        native = net[1](net[0](images)).numpy()
    # Row p of a sample is pixel (p // W, p % W) with W = 5.
    np.testing.assert_array_equal(rows[:, 2 * 5 + 3], native[:, :, 2, 3])


# --------------------------------------------------------------------------- graphs
@pytest.mark.parametrize("select", ["", "[-1]", "[0, 7]"])
def test_conv_graph_equals_the_permute_reshape_wrapper(images, select):
    net = conv_net()
    layers = [Layer("1" + select, feature_axes=1), Layer("3", feature_axes=-3), "6"]
    g1 = InteractionGraph(verbose=False).fit_model(net, layers, images)
    g2 = InteractionGraph(verbose=False).fit_model(
        WrappedConv(net), ["r1" + select, "r2", "net.6"], images, sequence=True)
    assert g1.layer_names_ == ["1" + select, "3", "6"]
    _assert_same_graph(g1, g2)


def test_integrated_gradient_edges_equal_the_wrapper(images):
    net = conv_net()
    params = dict(verbose=False, integration="gauss-legendre", n_alphas=3, constant_node=True)
    g1 = InteractionGraph(**params).fit_model(
        net, [Layer("1", feature_axes=1), Layer("3", feature_axes=1)], images)
    g2 = InteractionGraph(**params).fit_model(WrappedConv(net), ["r1", "r2"], images,
                                              sequence=True)
    _assert_same_graph(g1, g2)


def test_heads_as_features_equal_the_wrapper():
    x = torch.randn(N, 4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layers = [Layer("heads", feature_axes=(2, 3)), Layer("out", feature_axes=-1)]
    g1 = InteractionGraph(verbose=False).fit_model(Heads().double(), layers, x)
    g2 = InteractionGraph(verbose=False).fit_model(
        Heads(wrap=True).double(), ["rows", "out"], x, sequence=True)
    assert g1.bases_[0].n_features_in_ == 6
    _assert_same_graph(g1, g2)


def test_a_linear_over_other_axes_never_takes_the_closed_form():
    # The Linear acts on the last axis; the declared features are axis 1 of the same
    # size, so only the shapes of the closed form would fit.
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).double()
    x = torch.randn(N, 4, 4, dtype=torch.float64)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.r0, self.r1 = net, ToRows((1,)), ToRows((1,))
            self.b0 = FromRows(self.r0)

        def forward(self, x):
            return self.r1(self.net(self.b0(self.r0(x))))

    layers = [Layer("0:input", feature_axes=1), Layer("1", feature_axes=1)]
    # sequence=True, under which a closed form could take (position, feature) rows.
    g1 = InteractionGraph(verbose=False).fit_model(net, layers, x, sequence=True)
    g2 = InteractionGraph(verbose=False).fit_model(Wrapped(), ["r0", "r1"], x, sequence=True)
    assert g1.fast_path_ == [False]
    _assert_same_graph(g1, g2)


def test_collected_cache_gives_the_model_graph(images, tmp_path):
    net = conv_net()
    layers = [Layer("1", feature_axes=1), Layer("3", feature_axes=1), "6"]
    acts, jacs = collect(net, layers, images, verbose=False, batch_size=5,
                         cache=tmp_path / "c.zarr")
    assert [a.shape for a in acts] == [(N * 30, 5), (N * 9, 4), (N, 3)]
    assert [j.shape for j in jacs] == [(N * 30, 9 * 4, 5), (N * 9, 3, 4)]
    from sklearn_lib.cache import ActivationCache

    cached = InteractionGraph(verbose=False).fit(ActivationCache.open(tmp_path / "c.zarr"))
    live = InteractionGraph(verbose=False, edge_point="data").fit_model(net, layers, images)
    _assert_same_graph(cached, live)


def test_resnet18_channels_as_features():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = models.resnet18(num_classes=10)
    x = torch.randn(16, 3, 16, 16)
    layers = [Layer("layer1", feature_axes=1), Layer("layer2", feature_axes=1), "fc"]
    # 16 images of 2 x 2 pixels give 64 rows for layer2's 128 channels.
    with pytest.warns(UserWarning, match="layer 'layer2' has 128 features but only 64"):
        graph = InteractionGraph(verbose=False, n_components=0.99).fit_model(net, layers, x)
    assert [b.n_features_in_ for b in graph.bases_] == [64, 128, 10]
    assert graph.n_components_[1] <= 63
    assert all(np.isfinite(e).all() for e in graph.edges_)


@pytest.mark.parametrize("selector, positions", [
    ("[::-1]", [4, 3, 2, 1, 0]), ("[::2]", [0, 2, 4]), ("[-2:]", [3, 4]), ("[1, 3]", [1, 3]),
])
def test_position_selections_with_any_nonzero_step_read_those_positions(selector, positions):
    """Refusing step 0 must not refuse other slices: the view is the positions selected."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    X = torch.randn(6, 5, 3, dtype=torch.float64)
    acts = record_activations(net.double(), ["1" + selector], X, verbose=False)
    np.testing.assert_array_equal(acts["1" + selector], net(X)[:, positions].detach().numpy())


def test_same_module_at_different_positions_is_named_with_the_fix():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'1\[0\]' and '1\[1\]' both read the same activation "
                                         r"\(the output of module '1'\).*'1\[0, 1\]'"):
        InteractionGraph().fit_model(net, ["1[0]", "1[1]", "2"], torch.randn(4, 5, 3),
                                     sequence=True)
    with pytest.raises(ValueError, match=r"'1' and '1:output' both name the same activation"):
        InteractionGraph().fit_model(net, ["1", "1:output", "2"], torch.randn(4, 3))
