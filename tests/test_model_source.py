"""Tests for sklearn_lib._model_source: sections the live-model source recognises itself.

A readout (a Linear or elementwise module applied to a recorded layer in a
parent's ``forward``, like an unembedding) is recognised by the values it reads;
its graphs are compared with ``collect`` (generic vector-Jacobian products of the
whole model) followed by ``fit``.
"""

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_lib import InteractionGraph
from sklearn_lib.collect import collect

T, D_IN, D = 3, 2, 4


class Readout(nn.Module):
    """``logits = head(g(resid)[:, -1])`` in the parent's forward, as an unembedding is."""

    def __init__(self, read="last", activation=None):
        super().__init__()
        self.embed, self.act, self.resid = nn.Linear(D_IN, D), nn.Tanh(), nn.Identity()
        self.head = activation if activation is not None else nn.Linear(D, 3)
        self.read = read

    def forward(self, x):
        resid = self.resid(self.act(self.embed(x)))
        if self.read == "all":
            return self.head(resid)
        last = resid[:, -1]
        if self.read == "relu":  # reads another value than the layer's
            last = torch.relu(last)
        elif self.read == "doubled later":  # the layer's value unless an input is large
            last = torch.where(x[:, -1, :1].abs() > 3, 2 * last, last)
        return self.head(last)


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, D_IN, generator=g, dtype=torch.float64)


def _net(**kwargs):
    torch.manual_seed(0)
    return Readout(**kwargs).double()


def _assert_graphs_equal(a, b, tol=1e-10):
    for E, E_ref in zip(a.edges_, b.edges_):
        np.testing.assert_allclose(E, E_ref, rtol=0, atol=tol * np.abs(E_ref).max())
    for basis, ref in zip(a.bases_, b.bases_):
        G, G_ref = basis.jacobian_gram_, ref.jacobian_gram_
        np.testing.assert_allclose(G, G_ref, rtol=0, atol=tol * np.abs(G_ref).max())


def _reference(net, layers, X, **params):
    acts, jacs = collect(net, layers, X, sequence=True, fast_path=False, verbose=False)
    return InteractionGraph(edge_point="data", **params).fit(acts, jacobians=jacs,
                                                            sequence=True)


@pytest.mark.parametrize("read, layers", [
    ("last", ["resid[-1]", "head"]),
    ("last", ["embed:input", "resid[-1]", "head"]),
    ("all", ["resid", "head"]),
])
@pytest.mark.parametrize("params", [dict(), dict(constant_node=True)])
def test_readout_takes_the_closed_form_and_equals_the_whole_model(read, layers, params):
    net, X = _net(read=read), _data()
    graph = InteractionGraph.from_model(net, layers, X, sequence=True, edge_point="data",
                                        **params)
    assert graph.fast_path_[-1] is True
    _assert_graphs_equal(graph, _reference(net, layers, X, **params))


def test_elementwise_readout_takes_the_closed_form():
    net, X = _net(read="last", activation=nn.Sigmoid()), _data()
    layers = ["embed:input", "resid[-1]", "head"]
    graph = InteractionGraph.from_model(net, layers, X, sequence=True, edge_point="data")
    assert graph.fast_path_[-1] is True
    _assert_graphs_equal(graph, _reference(net, layers, X))


def test_module_reading_another_value_is_no_readout():
    net, X = _net(read="relu"), _data()
    layers = ["resid[-1]", "head"]
    graph = InteractionGraph.from_model(net, layers, X, sequence=True, edge_point="data")
    assert graph.fast_path_ == [False]
    _assert_graphs_equal(graph, _reference(net, layers, X))


def test_hooked_readout_is_no_readout():
    net, X = _net(read="last"), _data()
    layers = ["resid[-1]", "head"]
    handle = net.head.register_forward_hook(lambda module, args, out: out * 2)
    try:
        graph = InteractionGraph.from_model(net, layers, X, sequence=True, edge_point="data")
        assert graph.fast_path_ == [False]
        _assert_graphs_equal(graph, _reference(net, layers, X))
    finally:
        handle.remove()


def test_readout_that_reads_another_value_later_is_refused():
    net, X = _net(read="doubled later"), _data()
    X[-1, -1, 0] = 5.0  # only the last batch doubles its readout's input
    layers = ["resid[-1]", "head"]
    with pytest.raises(ValueError, match=r"module 'head' applied to layer 'resid\[-1\]'.*"
                                         r"fast_path=False"):
        InteractionGraph.from_model(net, layers, X, sequence=True, batch_size=8)
    # Without recognised sections the whole model runs and nothing is refused.
    graph = InteractionGraph.from_model(net, layers, X, sequence=True, batch_size=8,
                                        fast_path=False, edge_point="data")
    _assert_graphs_equal(graph, _reference(net, layers, X))
