"""Closed forms inferred from a user's own ``forward`` (``_inferred``), against the generic path."""

import math
import warnings

import pytest
import torch
from _reference import assert_same_graph_statistics
from torch import nn

from sklearn_lib import InteractionGraph
from sklearn_lib.datasets import ModularAdditionTransformer
from sklearn_lib.models import _model
from sklearn_lib.models._attention import CausalAttention
from sklearn_lib.models._inferred import infer_section, section_mismatch
from sklearn_lib.models._residual import ResidualMLP
from sklearn_lib.models._sections import _run_section

D, HEADS, D_HEAD, T = 6, 2, 3, 4
LAYERS = ["pre", "mid[-1]", "post[-1]", "head"]


class UserAttention(nn.Module):
    """Multi-head attention written out, its maps under the given ``names`` (Q, K, V, O)."""

    def __init__(self, names=("W_Q", "W_K", "W_V", "W_O"), causal=True, heads_attribute=True,
                 detach=False, bias=False):
        super().__init__()
        self.names, self.causal, self.detach = names, causal, detach
        if heads_attribute:
            self.num_heads = HEADS
        for name in names[:3]:
            setattr(self, name, nn.Linear(D, HEADS * D_HEAD, bias=bias))
        setattr(self, names[3], nn.Linear(HEADS * D_HEAD, D, bias=False))
        self.hook_pattern = nn.Identity()

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v, o = (getattr(self, name) for name in self.names)

        def heads(y):
            return y.view(n, t, HEADS, D_HEAD).transpose(1, 2)

        scores = heads(q(x)) @ heads(k(x)).transpose(-1, -2) / math.sqrt(D_HEAD)
        if self.causal:
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
        pattern = self.hook_pattern(scores.softmax(-1))
        if self.detach:  # the values stay, the derivatives through the pattern go
            pattern = pattern.detach()
        return o((pattern @ heads(v(x))).transpose(1, 2).reshape(n, t, HEADS * D_HEAD))


class UserMLP(nn.Module):
    #: Rows within ``radius`` of ``center`` take an extra term (``near_mean``).
    center, radius = 0.0, 0.0

    def __init__(self, surprise=False, reversed_order=False, near_mean=False):
        super().__init__()
        if reversed_order:  # registered in another order than they run
            self.act, self.fc_out, self.fc_in = nn.GELU(), nn.Linear(16, D), nn.Linear(D, 16)
        else:
            self.fc_in, self.act, self.fc_out = nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D)
        self.surprise, self.near_mean = surprise, near_mean

    def forward(self, x):
        out = self.fc_out(self.act(self.fc_in(x)))
        if self.near_mean:  # a term only near the mean, where no data lie
            near = (x - self.center).norm(dim=-1, keepdim=True) < self.radius
            return out + near * x.sin()
        # A term that appears only for large inputs: absent from the first samples.
        return out + (x.abs() > 20) * x if self.surprise else out


class UserTransformer(nn.Module):
    """A one-layer transformer whose residual adds are in its own ``forward``."""

    def __init__(self, attention, mlp, norm=False):
        super().__init__()
        self.embed = nn.Linear(2, D)
        self.pre, self.mid, self.post = nn.Identity(), nn.Identity(), nn.Identity()
        self.attn, self.mlp = attention, mlp
        self.ln = nn.LayerNorm(D) if norm else nn.Identity()
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        pre = self.pre(self.embed(x))
        mid = self.mid(pre + self.attn(self.ln(pre)))
        post = self.post(mid + self.mlp(mid))
        return self.head(post[:, -1])


def _build(attention=(), mlp=(), norm=False, seed=0):
    """The transformer, its attention and MLP built from keyword arguments, seeded."""
    torch.manual_seed(seed)
    return UserTransformer(UserAttention(**dict(attention)), UserMLP(**dict(mlp)), norm).double()


def _data(n=24, seed=1, scale=1.0):
    x = torch.randn(n, T, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x * scale


def _graphs(net, X, layers=LAYERS, **params):
    auto = InteractionGraph.from_model(net, layers, X, sequence=True, **params)
    generic = InteractionGraph.from_model(net, layers, X, sequence=True, fast_path=False,
                                          **params)
    return auto, generic


@pytest.mark.parametrize("attention", [
    dict(),
    dict(names=("q_proj", "k_proj", "v_proj", "out_proj"), heads_attribute=False),
    # Names that say nothing: every reading consistent with the shapes is tried.
    dict(names=("a", "b", "c", "d"), heads_attribute=False),
    dict(causal=False),
])
def test_user_transformer_takes_closed_forms_with_nothing_declared(attention):
    net = _build(attention)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto, generic = _graphs(net, _data(), edge_point="data", constant_node=True)
    assert auto.fast_path_ == [True, True, True] and generic.fast_path_ == [False] * 3
    assert_same_graph_statistics(auto, generic)


def test_mlp_children_registered_in_another_order():
    net = _build(mlp=dict(reversed_order=True))
    auto, generic = _graphs(net, _data())
    assert auto.fast_path_ == [True, True, True]
    assert_same_graph_statistics(auto, generic)


@pytest.mark.parametrize("positions", ["", "[0, 2]", "[1:]"])
def test_selected_positions(positions):
    net = _build(dict(causal=False))
    layers = ["pre", f"mid{positions}", f"post{positions}"]
    auto, generic = _graphs(net, _data(), layers=layers)
    assert auto.fast_path_ == [True, True]
    assert_same_graph_statistics(auto, generic)


def test_shipped_transformer_with_nothing_declared():
    torch.manual_seed(0)
    net = ModularAdditionTransformer(p=7, d_model=8, n_heads=2, d_head=4, d_mlp=16).double()
    X = torch.tensor([[a, b] for a in range(7) for b in range(7)])
    layers = ["hook_resid_pre", "hook_resid_mid[-1]", "hook_resid_post[-1]", "unembed"]
    auto, generic = _graphs(net, X, layers=layers)
    assert auto.fast_path_ == [True, True, True]
    assert_same_graph_statistics(auto, generic)


def test_inferred_structures_and_what_they_say():
    net, x = _build(dict(names=("a", "b", "c", "d"))), _data(4)
    a, b, c = _model._parse_layers(net, ["pre", "mid[-1]", "post[-1]"], "output")
    attention, claim = infer_section(net, a, b, x)
    assert isinstance(attention, CausalAttention) and attention.causal
    assert attention.n_heads == HEADS and attention.positions == (-1,)
    assert "Q, K, V, O = a, b, c, d" in claim and "attn" in claim
    for mine, theirs in zip((attention.w_q, attention.w_k, attention.w_v, attention.w_o),
                            (net.attn.a, net.attn.b, net.attn.c, net.attn.d)):
        assert mine is not None and torch.equal(mine, theirs.weight)
    mlp, claim = infer_section(net, b, c, x)
    assert isinstance(mlp, ResidualMLP) and "mlp" in claim


@pytest.mark.parametrize("kwargs", [
    dict(attention=dict(bias=True)),  # biases: not this closed form
    dict(norm=True),  # attention reads ln(pre), not the layer's value
])
def test_what_is_not_a_residual_attention_is_not_inferred(kwargs):
    net, x = _build(**kwargs), _data(4)
    a, b = _model._parse_layers(net, ["pre", "mid[-1]"], "output")
    assert infer_section(net, a, b, x) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = InteractionGraph.from_model(net, LAYERS, _data(), sequence=True)
    assert graph.fast_path_[0] is False and graph.fast_path_[1] is True


def test_detached_pattern_is_caught_by_the_jacobian_check():
    # Values equal the formula's, derivatives do not: only a Jacobian check sees it.
    net = _build(dict(detach=True))
    with pytest.warns(UserWarning, match="vector-Jacobian product of the model differs"):
        auto, generic = _graphs(net, _data())
    assert auto.fast_path_[0] is False and auto.fast_path_[1] is True
    assert_same_graph_statistics(auto, generic)


def test_a_term_absent_from_the_first_samples_is_caught_on_its_batch():
    net = _build(mlp=dict(surprise=True))
    X = _data(32)
    X[20:] *= 100  # the MLP's extra term appears from sample 20 on
    with pytest.warns(UserWarning, match="samples 16 to 23"):
        auto = InteractionGraph.from_model(net, LAYERS, X, sequence=True, batch_size=8)
    assert auto.fast_path_ == [True, False, True]


@pytest.mark.parametrize("params, refused", [
    (dict(), False),  # the reconstruction: all directions kept, the data themselves
    (dict(edge_point="data", integration="trapezoid", n_alphas=2), True),  # from the mean
])
def test_edges_check_the_formula_away_from_the_data(params, refused):
    net, X = _build(mlp=dict(near_mean=True)), _data()
    mid = _model._record_batch(net, _model._parse_layers(net, ["mid"], "output"), X)["mid"]
    # Around the mean of layer "mid[-1]" (the start of the path), nearer than any sample.
    net.mlp.center = mid[:, -1].mean(0)
    net.mlp.radius = float((mid - net.mlp.center).norm(dim=-1).min()) / 2
    if refused:
        with pytest.raises(ValueError, match="at the points where the edges are taken"):
            InteractionGraph.from_model(net, LAYERS, X, sequence=True, **params)
    else:
        auto, generic = _graphs(net, X, **params)
        assert auto.fast_path_ == [True, True, True]
        assert_same_graph_statistics(auto, generic)


@pytest.mark.parametrize("detach", [False, True])
def test_jacobian_check_against_brute_force(detach):
    net, x = _build(dict(detach=detach)), _data(3)
    a, b = _model._parse_layers(net, ["pre", "mid[-1]"], "output")
    plain = _build()  # the same weights, without the detach
    st, _ = infer_section(plain, *_model._parse_layers(plain, ["pre", "mid[-1]"], "output"), x)
    act = _model._record_batch(net, [a], x)["pre"]
    # Brute force: the model's full section Jacobian against the formula's.
    J_model = torch.autograd.functional.jacobian(lambda h: _run_section(net, a, b, x, h), act)
    J_formula = torch.autograd.functional.jacobian(st.forward, act)
    differs = not torch.allclose(J_model, J_formula, rtol=1e-12, atol=1e-12)
    assert differs == detach
    assert (section_mismatch(net, a, b, x, act, st.forward) is not None) == detach



class Block(nn.Module):
    """A residual MLP block with its residual add in its own ``forward``."""

    def __init__(self, detach=False):
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, D)
        self.detach = detach

    def forward(self, x):
        hidden = self.act(self.fc_in(x))
        return x + self.fc_out(hidden.detach() if self.detach else hidden)


@pytest.mark.parametrize("detach", [False, True])
def test_residual_block_module(detach):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, D), Block(detach), nn.Linear(D, 2)).double()
    X = torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layers = ["1:input", "1:output", "2"]
    if detach:
        with pytest.warns(UserWarning, match="vector-Jacobian product"):
            auto = InteractionGraph.from_model(net, layers, X)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            auto = InteractionGraph.from_model(net, layers, X)
    generic = InteractionGraph.from_model(net, layers, X, fast_path=False)
    assert auto.fast_path_ == [not detach, True]
    assert_same_graph_statistics(auto, generic)
