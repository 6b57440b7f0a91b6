"""Declared attention sections (``_attention``): brute-force Jacobians and the generic path."""

import math
import warnings

import pytest
import torch
from _reference import assert_same_graph_statistics
from torch import nn

from sklearn_lib import InteractionGraph, Layer, declare_attention
from sklearn_lib.models import _model
from sklearn_lib.models._attention import detect_attention
from sklearn_lib.models._collect import _section_rows

D, HEADS, D_HEAD, T = 5, 2, 3, 4


class TinyAttention(nn.Module):
    """``mid = pre + attn(pre)`` written out, as a transformer layer does.

    The formula's forward is checked against this module (``verify``), its
    autograd Jacobian against the closed-form products.
    """

    def __init__(self, causal=True, scale=None):
        super().__init__()
        self.embed = nn.Linear(2, D)
        self.pre, self.mid = nn.Identity(), nn.Identity()
        self.q, self.k, self.v = (nn.Linear(D, HEADS * D_HEAD, bias=False) for _ in range(3))
        self.o = nn.Linear(HEADS * D_HEAD, D, bias=False)
        self.head = nn.Linear(D, 3)
        self.causal = causal
        self.scale = 1 / math.sqrt(D_HEAD) if scale is None else scale

    def forward(self, x, attention_mask=None):
        pre = self.pre(self.embed(x))
        n, t, _ = pre.shape

        def heads(y):
            return y.view(n, t, HEADS, D_HEAD).transpose(1, 2)

        q, k, v = heads(self.q(pre)), heads(self.k(pre)), heads(self.v(pre))
        scores = q @ k.transpose(-1, -2) * self.scale
        hidden = torch.zeros(t, t, dtype=torch.bool)
        if self.causal:
            hidden = torch.arange(t)[None, :] > torch.arange(t)[:, None]
        if attention_mask is not None:  # Hugging Face style: padded keys are not attended to
            hidden = hidden | (attention_mask[:, None, None, :] == 0)
        # -1e30 rather than -inf: a padded query that sees no key stays finite (and unread).
        z = scores.masked_fill(hidden, -1e30).softmax(-1) @ v
        z = z.transpose(1, 2).reshape(n, t, HEADS * D_HEAD)
        return self.head(self.mid(pre + self.o(z)))


def _net(causal=True, scale=None, declare=True, seed=0):
    torch.manual_seed(seed)
    net = TinyAttention(causal, scale).double()
    if declare:
        declare_attention(net, "q", "k", "v", "o", input="pre", output="mid", n_heads=HEADS,
                          causal=causal)
    return net


def _data(n=24, seed=1):
    return torch.randn(n, T, 2, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("causal, positions", [
    (True, ""), (True, "[-1]"), (False, "[0, 2]"), (False, "[1:]"),
])
def test_scatter_and_attributions_match_brute_force_jacobians(causal, positions):
    net, x = _net(causal), _data(6)
    a, b = _model._parse_layers(net, ["pre", "mid" + positions], "output")
    st = detect_attention(net, a, b)
    rec = _model._record_batch(net, [a, b], x)
    X, Y = rec["pre"], rec["mid" + positions]
    assert st.fits(tuple(X.shape[1:]), tuple(Y.shape[1:])) and st.verify(X, Y)
    g = torch.Generator().manual_seed(2)
    V = torch.randn(D, 4, generator=g, dtype=torch.float64)

    def section(x_one):  # one sample (T, D) -> the selected outputs (P, D)
        return st.forward(x_one[None])[0]

    J = torch.stack([torch.func.jacrev(section)(xi) for xi in X])  # (B, P, D, T, D)
    products = torch.einsum("bpotd,ok->pkbtd", J, V).reshape(-1, D)
    torch.testing.assert_close(st.jacobian_scatter(X, V), products.T @ products,
                               rtol=1e-12, atol=1e-12)
    # The generic vector-Jacobian products through the model agree as well.
    generic = _section_rows(net, a, b, x, X, V, sequence=True, max_vectors=None, check=True,
                            vector_major=True).reshape(-1, D)
    torch.testing.assert_close(st.jacobian_scatter(X, V), generic.T @ generic,
                               rtol=1e-12, atol=1e-12)
    # The edges' attributions, summed over source positions without forming products.
    right = torch.randn(D, 3, generator=g, dtype=torch.float64)
    Z = torch.randn(len(X), T, 3, generator=g, dtype=torch.float64)
    expected = torch.einsum("bpotd,ok,dr,btr->bpkr", J, V, right, Z)
    torch.testing.assert_close(st.attributions(X, V, right, Z), expected, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("params", [
    dict(),
    dict(edge_point="data", constant_node=True),
    dict(integration="gauss-legendre", n_alphas=3, n_components=2),
    dict(variant="global"),
    dict(causal=False, positions="[0, 2]", constant_node=True),
    dict(causal=False, positions="", integration="trapezoid", n_alphas=2),
])
def test_graph_matches_generic_path(params):
    params = dict(params)
    causal, positions = params.pop("causal", True), params.pop("positions", "[-1]")
    net, X = _net(causal), _data()
    layers = ["pre", "mid" + positions, "head"] if params.get("variant") != "global" else [
        "pre", "mid" + positions]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = InteractionGraph.from_model(net, layers, X, sequence=True, **params)
    generic = InteractionGraph.from_model(net, layers, X, sequence=True, fast_path=False,
                                          **params)
    assert auto.fast_path_[0] is True and generic.fast_path_[0] is False
    assert_same_graph_statistics(auto, generic)


def test_misdeclared_attention_falls_back_with_a_warning():
    # Declared causal, computed without the mask: the first batch shows it.
    net = _net(causal=False, declare=False)
    declare_attention(net, "q", "k", "v", "o", input="pre", output="mid", n_heads=HEADS)
    X = _data()
    with pytest.warns(UserWarning, match="declared a residual attention"):
        auto = InteractionGraph.from_model(net, ["pre", "mid"], X, sequence=True)
    generic = InteractionGraph.from_model(net, ["pre", "mid"], X, sequence=True,
                                          fast_path=False)
    assert auto.fast_path_ == [False]
    assert_same_graph_statistics(auto, generic)


def test_declaration_applies_to_its_section_only():
    net, X = _net(), _data()
    for layers in (["pre[-1]", "mid[-1]"], ["embed", "mid"], ["pre", "head"]):
        graph = InteractionGraph.from_model(net, layers, X, sequence=True)
        assert graph.fast_path_ == [False]
    handle = net.q.register_forward_hook(lambda m, a, o: None)
    try:
        assert InteractionGraph.from_model(net, ["pre", "mid"], X, sequence=True).fast_path_ == [
            False]
    finally:
        handle.remove()
    assert InteractionGraph.from_model(net, ["pre", "mid"], X, sequence=True,
                                       fast_path=False).fast_path_ == [False]


@pytest.mark.parametrize("feature_axes", [2, 1])
def test_declared_axes_never_use_the_formula(feature_axes):
    # Layers read through a declared view of their axes go through the products,
    # which see the view; the formula would read positions and features as the
    # module computes them.
    net, X = _net(), _data()
    layers = [Layer("pre", feature_axes=feature_axes), Layer("mid", feature_axes=feature_axes)]
    declared = InteractionGraph.from_model(net, layers, X, sequence=True)
    assert declared.fast_path_ == [False]
    undeclared = InteractionGraph.from_model(_net(declare=False), layers, X, sequence=True)
    assert_same_graph_statistics(declared, undeclared)


def test_declaration_is_checked():
    net = TinyAttention()
    kwargs = dict(input="pre", output="mid", n_heads=HEADS)
    with pytest.raises(ValueError, match="no submodule 'qq'"):
        declare_attention(net, "qq", "k", "v", "o", **kwargs)
    with pytest.raises(ValueError, match="W_O 'head' must be exactly an nn.Linear without bias"):
        declare_attention(net, "q", "k", "v", "head", **kwargs)
    with pytest.raises(ValueError, match="n_heads must be a positive int dividing"):
        declare_attention(net, "q", "k", "v", "o", input="pre", output="mid", n_heads=4)
    with pytest.raises(ValueError, match="different submodules"):
        declare_attention(net, "q", "k", "v", "o", input="pre", output="pre", n_heads=HEADS)
    with pytest.raises(TypeError, match="name of a submodule"):
        declare_attention(net, net.q, "k", "v", "o", **kwargs)
    assert declare_attention(net, "q", "k", "v", "o", **kwargs) is net


def test_padded_batches_take_the_models_own_products():
    # The formula attends to every earlier position; with left padding the model
    # does not attend to the padded ones, so a declared section must not use the
    # formula on a padded batch (the first batch, which the declaration is
    # checked on, has no padding).
    X = _data(n=40)
    mask = torch.ones(40, T, dtype=torch.int64)
    mask[20:, :2] = 0  # left padding in the second batch
    batches = [{"x": X[:20], "attention_mask": mask[:20]},
               {"x": X[20:], "attention_mask": mask[20:]}]
    declared = InteractionGraph.from_model(_net(), ["pre", "mid[-1]"], batches,
                                           sequence=True)
    generic = InteractionGraph.from_model(_net(declare=False), ["pre", "mid[-1]"], batches,
                                          sequence=True)
    assert declared.fast_path_ == [True]
    assert_same_graph_statistics(declared, generic)
