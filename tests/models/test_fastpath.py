"""The residual-MLP closed form (``_fastpath.ResidualMLP``): brute force and the generic path."""

import warnings

import numpy as np
import pytest
import torch
from _reference import assert_same_graph_statistics
from torch import nn

from sklearn_lib import InteractionGraph, declare_residual_mlp
from sklearn_lib.collect import collect
from sklearn_lib.models._fastpath import ResidualMLP
from sklearn_lib.sources._edges import Workspace

ACTIVATIONS = [nn.ReLU, nn.GELU, nn.Tanh]


class Block(nn.Module):
    def __init__(self, d, d_mlp, act, scale=1.0):
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(d, d_mlp), act, nn.Linear(d_mlp, d)
        self.scale = scale

    def forward(self, x):
        return x + self.scale * self.fc_out(self.act(self.fc_in(x)))


class Net(nn.Module):
    def __init__(self, act=nn.ReLU, scale=1.0, d0=3, d=5, d_mlp=7, d_out=4):
        super().__init__()
        self.embed = nn.Linear(d0, d)
        self.block = Block(d, d_mlp, act(), scale)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


def _net(act=nn.ReLU, scale=1.0, declare=True, seed=0):
    torch.manual_seed(seed)
    net = Net(act, scale).double()
    if declare:
        declare_residual_mlp(net.block, "fc_in", "act", "fc_out")
    return net


def _data(sequence, n=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3, 3) if sequence else (n, 3)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _structure(block):
    return ResidualMLP(block.fc_in.weight.detach(), block.fc_in.bias.detach(), block.act,
                       block.fc_out.weight.detach(), block.fc_out.bias.detach())


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_closed_form_matches_brute_force_jacobians(act):
    block = _net(act).block
    st = _structure(block)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(50, 5, generator=g, dtype=torch.float64)
    V = torch.randn(5, 3, generator=g, dtype=torch.float64)
    right = torch.randn(5, 4, generator=g, dtype=torch.float64)
    J = torch.stack([torch.func.jacrev(block)(x) for x in X])  # (n, out, in)
    assert torch.allclose(st.forward(X), block(X), atol=1e-14)
    s = st.derivative(X)
    assert torch.allclose(st.jacobians(s), J, atol=1e-13)
    VJ = V.T @ J  # (n, k, d)
    scatter = torch.einsum("xki,xkj->ij", VJ, VJ)
    got = st.jacobian_scatter(s.T @ s, V, s_sum=s.sum(0), n=X.shape[0])
    assert torch.allclose(got, scatter, rtol=1e-12, atol=1e-12)
    edges = st.edge_jacobians(s, st.edge_factors(V, right), Workspace())
    assert torch.allclose(edges, VJ @ right, atol=1e-12)


def _graphs(net, X, sequence, layers, **params):
    kwargs = dict(edge_point="data", sequence=sequence, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = InteractionGraph.from_model(net, layers, X, **kwargs)
    generic = InteractionGraph.from_model(net, layers, X, fast_path=False, **kwargs)
    return auto, generic


LAYERS = ["block:input", "block:output", "head"]


@pytest.mark.parametrize("sequence", [False, True])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_graph_matches_generic_path(act, sequence):
    net, X = _net(act), _data(sequence)
    auto, generic = _graphs(net, X, sequence, LAYERS)
    # The head reads the block's output in the parent's forward: a readout.
    assert auto.fast_path_ == [True, True] and generic.fast_path_ == [False, False]
    assert_same_graph_statistics(auto, generic)


@pytest.mark.parametrize("sequence", [False, True])
@pytest.mark.parametrize("params", [
    dict(integration="gauss-legendre", n_alphas=4),
    dict(integration="trapezoid", n_alphas=5, edge_point="reconstructed", n_components=3),
    dict(constant_node=True),
    dict(variant="global"),
])
def test_graph_variants_match_generic_path(params, sequence):
    net, X = _net(nn.GELU), _data(sequence)
    params = dict(params)
    edge_point = params.pop("edge_point", "data")
    layers = LAYERS[:2] if params.get("variant") == "global" else LAYERS
    kwargs = dict(sequence=sequence, edge_point=edge_point, **params)
    auto = InteractionGraph.from_model(net, layers, X, **kwargs)
    generic = InteractionGraph.from_model(net, layers, X, fast_path=False, **kwargs)
    assert auto.fast_path_[0] is True
    assert_same_graph_statistics(auto, generic)


@pytest.mark.parametrize("positions", ["", "[-1]"])
def test_graph_with_selected_positions(positions):
    net, X = _net(nn.Tanh), _data(True)
    layers = [f"block:input{positions}", f"block:output{positions}"]
    auto, generic = _graphs(net, X, True, layers)
    assert auto.fast_path_ == [True]
    assert_same_graph_statistics(auto, generic)


def test_collect_matches_generic_path():
    net, X = _net(nn.ReLU), _data(False)
    layers = LAYERS[:2]
    acts, jacs = collect(net, layers, X, verbose=False)
    acts_ref, jacs_ref = collect(net, layers, X, verbose=False, fast_path=False)
    assert np.allclose(jacs[0], jacs_ref[0], rtol=0, atol=1e-12)


def test_misdeclared_module_falls_back_with_a_warning():
    net, X = _net(nn.ReLU, scale=2.0), _data(False)
    with pytest.warns(UserWarning, match="declared a residual MLP block"):
        auto = InteractionGraph.from_model(net, LAYERS, X, edge_point="data")
    generic = InteractionGraph.from_model(net, LAYERS, X, edge_point="data", fast_path=False)
    assert auto.fast_path_ == [False, True]  # the head is a readout (test_model_source)
    assert_same_graph_statistics(auto, generic)
    with pytest.warns(UserWarning, match="declared a residual MLP block"):
        with pytest.raises(ValueError, match="fast_path=True needs"):
            InteractionGraph.from_model(net, LAYERS, X, fast_path=True)
    with pytest.warns(UserWarning, match="declared a residual MLP block"):
        _, jacs = collect(net, LAYERS[:2], X, verbose=False)
    _, jacs_ref = collect(net, LAYERS[:2], X, verbose=False, fast_path=False)
    assert np.allclose(jacs[0], jacs_ref[0], rtol=0, atol=1e-12)


def test_undeclared_block_is_inferred_and_other_sections_use_the_generic_path():
    net, X = _net(nn.ReLU, declare=False), _data(False)
    # Not declared, but its values show x + mlp(x) (models/_inferred).
    auto, generic = _graphs(net, X, False, LAYERS)
    assert auto.fast_path_ == [True, True]
    assert_same_graph_statistics(auto, generic)
    net = _net(nn.ReLU)
    # Not the block's own input -> output.
    graph = InteractionGraph.from_model(net, ["embed:input", "block:output"], X)
    assert graph.fast_path_ == [False]
    # A hook on a submodule may change the output: no closed form.
    handle = net.block.fc_in.register_forward_hook(lambda m, a, o: None)
    try:
        assert InteractionGraph.from_model(net, LAYERS, X).fast_path_ == [False, True]
    finally:
        handle.remove()


def test_declaration_is_checked():
    block = Block(4, 6, nn.ReLU())
    with pytest.raises(ValueError, match="no submodule 'fc'"):
        declare_residual_mlp(block, "fc", "act", "fc_out")
    with pytest.raises(ValueError, match="activation 'fc_in' must be exactly one of"):
        declare_residual_mlp(block, "fc_in", "fc_in", "fc_out")
    with pytest.raises(ValueError, match="d_mlp -> d"):
        declare_residual_mlp(block, "fc_in", "act", "fc_in")
    with pytest.raises(TypeError, match="name of a submodule"):
        declare_residual_mlp(block, block.fc_in, "act", "fc_out")
    assert declare_residual_mlp(block, "fc_in", "act", "fc_out") is block


# ------------------------------------------------------- residual add in a parent's forward
class Parent(nn.Module):
    """A transformer's MLP half: ``post = mid + mlp(mid)``, the add in this forward."""

    def __init__(self, act=nn.GELU, scale=1.0, d0=3, d=5, d_mlp=7, d_out=4):
        super().__init__()
        self.embed = nn.Linear(d0, d)
        self.mid, self.post = nn.Identity(), nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(d, d_mlp), act(), nn.Linear(d_mlp, d))
        self.head = nn.Linear(d, d_out)
        self.scale = scale

    def forward(self, x):
        mid = self.mid(self.embed(x))
        return self.head(self.post(mid + self.scale * self.mlp(mid)))


def _parent(act=nn.GELU, scale=1.0, seed=0):
    torch.manual_seed(seed)
    net = Parent(act, scale).double()
    return declare_residual_mlp(net, "mlp.0", "mlp.1", "mlp.2", input="mid", output="post")


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU])
@pytest.mark.parametrize("positions", ["", "[-1]", "[0, 2]"])
def test_parent_declared_section_matches_generic_path(act, positions):
    net, X = _parent(act), _data(True)
    layers = [f"mid{positions}", f"post{positions}", "head"]
    auto, generic = _graphs(net, X, True, layers)
    # The head reads the whole "post" layer: a readout unless positions are selected.
    assert auto.fast_path_ == [True, not positions] and generic.fast_path_ == [False, False]
    assert_same_graph_statistics(auto, generic)


@pytest.mark.parametrize("params", [
    dict(integration="gauss-legendre", n_alphas=3, edge_point="reconstructed", n_components=3),
    dict(constant_node=True),
])
def test_parent_declared_section_variants_match_generic_path(params):
    net, X = _parent(), _data(False)
    layers = ["mid", "post", "head"]
    auto = InteractionGraph.from_model(net, layers, X, **params)
    generic = InteractionGraph.from_model(net, layers, X, fast_path=False, **params)
    assert auto.fast_path_[0] is True
    assert_same_graph_statistics(auto, generic)


def test_parent_declared_section_is_checked_on_the_first_batch():
    net, X = _parent(scale=2.0), _data(True)
    layers = ["mid[-1]", "post[-1]"]
    with pytest.warns(UserWarning, match="declared a residual MLP block"):
        auto = InteractionGraph.from_model(net, layers, X, sequence=True, edge_point="data")
    generic = InteractionGraph.from_model(net, layers, X, sequence=True, edge_point="data",
                                          fast_path=False)
    assert auto.fast_path_ == [False]
    assert_same_graph_statistics(auto, generic)


def test_parent_declaration_applies_to_its_section_only():
    net, X = _parent(), _data(True)
    kwargs = dict(sequence=True, edge_point="data")
    # Other selections at the two ends, other layers, hooks: the generic path.
    for layers in (["mid[-1]", "post"], ["mid:input", "post"]):
        assert InteractionGraph.from_model(net, layers, X, **kwargs).fast_path_ == [False]
    # ``mid`` is an identity, so from embed's output the section is x + mlp(x) as well:
    # not declared, but inferred from the values (models/_inferred).
    assert InteractionGraph.from_model(net, ["embed", "post"], X, **kwargs).fast_path_ == [True]
    handle = net.mlp[1].register_forward_hook(lambda m, a, o: None)
    try:
        assert InteractionGraph.from_model(net, ["mid", "post"], X, **kwargs).fast_path_ == [
            False]
    finally:
        handle.remove()
    # Declared on a submodule, the names are relative to it.
    outer = nn.Sequential(net)
    graph = InteractionGraph.from_model(outer, ["0.mid", "0.post"], X, **kwargs)
    assert graph.fast_path_ == [True]


def test_parent_declaration_is_checked():
    net = Parent()
    with pytest.raises(TypeError, match="both be None"):
        declare_residual_mlp(net, "mlp.0", "mlp.1", "mlp.2", input="mid")
    with pytest.raises(ValueError, match="output: the module has no submodule 'postt'"):
        declare_residual_mlp(net, "mlp.0", "mlp.1", "mlp.2", input="mid", output="postt")
    with pytest.raises(ValueError, match="different submodules"):
        declare_residual_mlp(net, "mlp.0", "mlp.1", "mlp.2", input="mid", output="mid")
    # Declaring the same section again replaces it; another section is added.
    for _ in range(2):
        declare_residual_mlp(net, "mlp.0", "mlp.1", "mlp.2", input="mid", output="post")
    declare_residual_mlp(net, "mlp.0", "mlp.1", "mlp.2", input="embed", output="post")
    assert len(getattr(net, "__sklearn_lib_residual_sections__")) == 2


def test_shipped_transformer_mlp_section_matches_generic_path():
    from sklearn_lib.datasets import (
        load_modular_addition_transformer,
        modular_addition_data,
    )

    net = load_modular_addition_transformer()
    declare_residual_mlp(net, "mlp.0", "mlp.1", "mlp.2", input="hook_resid_mid",
                         output="hook_resid_post")
    X = modular_addition_data()[0][:160]  # more rows than the 128 features: no capped basis
    layers = ["hook_resid_mid[-1]", "hook_resid_post[-1]"]
    auto, generic = _graphs(net, X, True, layers)
    assert auto.fast_path_ == [True]
    assert_same_graph_statistics(auto, generic)


# ------------------------------------------------------- what the model computes, checked
def test_every_batch_is_checked_against_the_declared_formula():
    """A term that appears only after sample 256 sends the block to the generic path."""

    class Late(Block):
        def forward(self, x):
            return super().forward(x) + 2.0 * torch.relu(x[:, :1] - 1.0) * x

    torch.manual_seed(0)
    net = Net(nn.GELU).double()
    net.block = Late(5, 7, nn.GELU()).double()
    declare_residual_mlp(net.block, "fc_in", "act", "fc_out")
    X = _data(False, n=400)
    with torch.no_grad():
        X = X[torch.argsort(net.embed(X)[:, 0])]
    assert int((net.embed(X)[:256, 0] > 1.0).sum()) == 0 < int((net.embed(X)[:, 0] > 1.0).sum())
    with pytest.warns(UserWarning, match=r"declared a residual MLP block.*in the batch of "
                                         r"samples \d+ to \d+ the model's output differs"):
        auto = InteractionGraph.from_model(net, LAYERS, X, edge_point="data")
    generic = InteractionGraph.from_model(net, LAYERS, X, edge_point="data", fast_path=False)
    assert auto.fast_path_ == [False, True]
    assert_same_graph_statistics(auto, generic)
    with pytest.warns(UserWarning, match="declared a residual MLP block"):
        with pytest.raises(ValueError, match=r"'block:input' -> 'block:output' \(the model's "
                                             r"output differs from the closed form in the "
                                             r"batch of samples"):
            InteractionGraph.from_model(net, LAYERS, X, fast_path=True)


def test_parametrized_linear_keeps_the_closed_form():
    """weight_norm and masks as parametrizations: the weight is the parametrization's."""
    net, X = _net(nn.GELU), _data(False)
    torch.nn.utils.parametrizations.weight_norm(net.block.fc_in)
    torch.nn.utils.parametrize.register_parametrization(net.block.fc_out, "weight",
                                                        _Tril())
    auto, generic = _graphs(net, X, False, LAYERS)
    assert auto.fast_path_ == [True, True]
    assert_same_graph_statistics(auto, generic)


class _Tril(nn.Module):
    def forward(self, W):
        return W.tril()


def test_instance_forward_takes_the_generic_path_and_says_why():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    lin = net[2]
    mask = (torch.arange(10).reshape(2, 5) % 3 != 0).double()
    lin.forward = lambda x: torch.nn.functional.linear(x, lin.weight * mask, lin.bias)
    X = _data(False)
    auto, generic = _graphs(net, X, False, [":input", "1", "2"])
    assert auto.fast_path_ == [True, False]
    assert_same_graph_statistics(auto, generic)
    with pytest.raises(ValueError, match=r"'1' -> '2' \(module '2' \(Linear\) has an "
                                         r"instance-level forward\)"):
        InteractionGraph.from_model(net, [":input", "1", "2"], X, fast_path=True)


def test_reading_a_parametrized_weight_leaves_the_model_as_it_was():
    """spectral_norm's power iteration runs when its weight is read in training mode."""
    net, X = _net(nn.Tanh), _data(False)
    torch.nn.utils.parametrizations.spectral_norm(net.block.fc_in)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    graph = InteractionGraph.from_model(net, LAYERS, X, edge_point="data")
    assert graph.fast_path_ == [True, True]
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
