"""Tests for sklearn_lib.sources._model_source: sections the live-model source recognises itself.

A readout (a Linear or elementwise module applied to a recorded layer in a
parent's ``forward``, like an unembedding) is recognised by the values it reads;
its graphs are compared with ``collect`` (generic vector-Jacobian products of the
whole model) followed by ``fit``.
"""

import numpy as np
import pytest
import torch
from _mixers import mixer
from torch import nn

from sklearn_lib import InteractionGraph
from sklearn_lib.collect import collect
from sklearn_lib.models._fastpath import run_leaves as _fastpath_run_leaves

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


def _reference(net, layers, X, sequence=True, **params):
    acts, jacs = collect(net, layers, X, sequence=sequence, fast_path=False, verbose=False)
    return InteractionGraph(edge_point="data", **params).fit(acts, jacobians=jacs,
                                                            sequence=sequence)


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


@pytest.mark.parametrize("read, layers", [("all", ["resid", "head"]),
                                         ("last", ["resid[-1]", "head"])])
def test_readout_without_closed_form_runs_alone(read, layers, monkeypatch):
    """A readout without its closed form runs alone, from the recorded activation.

    Flat rows of several positions are no rows of the head (``"all"``: no closed
    form); for ``"last"`` the closed form is switched off here, and the recorded
    ``resid[-1]``, (n, 1, d), is what the head, which reads (n, d), runs on.
    """
    from sklearn_lib.models import _vjp
    from sklearn_lib.sources import _model_source

    net, X = _net(read=read), _data()
    if read == "last":
        monkeypatch.setattr(_model_source.ModelSource, "structure", lambda self, l, m: None)
    ran = []

    def run_leaves(leaves, t):
        ran.append(leaves)
        return _fastpath_run_leaves(leaves, t)

    monkeypatch.setattr(_vjp, "run_leaves", run_leaves)
    graph = InteractionGraph.from_model(net, layers, X, edge_point="data")
    monkeypatch.undo()
    assert graph.fast_path_ == [False]
    assert ran and all(leaves == [net.head] for leaves in ran)
    _assert_graphs_equal(graph, _reference(net, layers, X, sequence=False))


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


def test_readout_that_reads_another_value_later_runs_the_whole_model():
    """Every batch is checked before the readout is used: a later batch where the module
    reads another value sends the section to the whole model, with a warning."""
    net, X = _net(read="doubled later"), _data()
    X[-1, -1, 0] = 5.0  # only the last batch doubles its readout's input
    layers = ["resid[-1]", "head"]
    with pytest.warns(UserWarning, match=r"module 'head' applied to layer 'resid\[-1\]'.*"
                                         r"in the batch of samples \d+ to \d+"):
        graph = InteractionGraph.from_model(net, layers, X, sequence=True, batch_size=8,
                                            edge_point="data")
    assert graph.fast_path_ == [False]
    _assert_graphs_equal(graph, _reference(net, layers, X))


def test_readout_without_closed_form_is_checked_on_every_pass(monkeypatch):
    """A readout run alone without its closed form checks its input in every pass."""
    from sklearn_lib.sources import _model_source

    net, X = _net(read="doubled later"), _data()
    X[-1, -1, 0] = 5.0
    monkeypatch.setattr(_model_source.ModelSource, "candidate", lambda self, l, m: None)
    with pytest.raises(ValueError, match=r"module 'head' applied to layer 'resid\[-1\]'.*"
                                         r"fast_path=False"):
        InteractionGraph.from_model(net, ["resid[-1]", "head"], X, sequence=True,
                                    batch_size=8)
    # Without recognised sections the whole model runs and nothing is refused.
    graph = InteractionGraph.from_model(net, ["resid[-1]", "head"], X, sequence=True,
                                        batch_size=8, fast_path=False, edge_point="data")
    _assert_graphs_equal(graph, _reference(net, ["resid[-1]", "head"], X))


# --------------------------------------------------------------------------- positions
def _mixer():
    return mixer(D_IN, D)


def _scatter(stats):
    """The Jacobian scatter the statistics hold (stored divided by a power of four)."""
    return stats.jacobian_scatter * 4.0 ** stats.jacobian_exponent


def test_position_sources_are_unbiased_with_the_documented_error():
    """Averaged over draws, m random combinations of positions give the exact scatter.

    The mean squared error of one draw is compared with the closed form of the
    docstring, ``(1/m) sum_x sum_{t<u} ||S_tu + S_tu^T||_F^2`` with ``S_tu =
    sum_s A_ts^T A_us`` over the input positions ``s`` of sample ``x``, computed
    from the exact products of every output position.
    """
    from sklearn_lib.basis._stats import InteractionStatistics
    from sklearn_lib.models._position_sources import PositionSources
    from sklearn_lib.models._vjp import _section_rows
    from sklearn_lib.sources._model_source import ModelSource

    net, X, m = _mixer(), _data(12), 2
    source = ModelSource(net, ["resid", "mid"], X, sequence=True, batch_size=None,
                         device=None, dtype="float64", fast_path="auto", verbose=False)
    V = torch.randn(D, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def new_stats(l, n_outputs):
        return InteractionStatistics(D, n_outputs, center=True, device=torch.device("cpu"),
                                     dtype=torch.float64)

    exact = _scatter(source.jacobian_stats(0, V, new_stats))
    draws = torch.stack([
        _scatter(source.jacobian_stats(0, V, new_stats, position_sources=PositionSources(
            m, seed, torch.device("cpu"))))
        for seed in range(400)
    ])
    spec_in, spec_out = source.specs
    products = _section_rows(net, spec_in, spec_out, X, source._activation(X, 0), V,
                             sequence=True, max_vectors=None, check=False, vector_major=True)
    # (output position t, column, sample, input position s, feature)
    A = products.view(T, 3, len(X), T, D)
    expected = 0.0
    for t in range(T):
        for u in range(t + 1, T):
            S_tu = torch.einsum("kxsi,kxsj->xij", A[t], A[u])  # a sample's signs are shared
            expected += float((S_tu + S_tu.transpose(1, 2)).square().sum()) / m
    # The mean of 400 squared errors has a relative standard deviation of about
    # 0.07 here (measured over 2,000 draws); the draws are seeded, so the test
    # is deterministic.
    errors = (draws - exact).square().sum((1, 2))
    assert 0.75 < float(errors.mean()) / expected < 1.25
    # The mean of 400 draws: its squared error is that of one draw over 400.
    assert float((draws.mean(0) - exact).square().sum()) < 3 * expected / 400


def test_position_sources_change_nothing_where_they_do_not_apply():
    net, X = _mixer(), _data(16)
    # One output position: nothing to combine.
    exact = InteractionGraph.from_model(net, ["resid", "mid[-1]"], X, sequence=True)
    assert exact.fast_path_ == [False]
    _assert_graphs_equal(
        InteractionGraph.from_model(net, ["resid", "mid[-1]"], X, sequence=True,
                                    stochastic_positions=2, random_state=0), exact)
    # Padded batches combine their real positions at random too:
    # tests/sources/test_padding_and_order.py checks them against brute force.


def test_position_sources_repeat_with_their_random_state():
    net, X = _mixer(), _data(16)
    layers = ["resid", "mid", "head"]

    def fitted(seed):
        return InteractionGraph.from_model(net, layers, X, sequence=True,
                                           stochastic_positions=2, random_state=seed)

    first, again, other = fitted(0), fitted(0), fitted(1)
    _assert_graphs_equal(again, first, tol=1e-13)
    exact = InteractionGraph.from_model(net, layers, X, sequence=True)
    G, G_exact = first.bases_[0].jacobian_gram_, exact.bases_[0].jacobian_gram_
    assert np.abs(G - G_exact).max() > 1e-6 * np.abs(G_exact).max()
    assert np.abs(other.bases_[0].jacobian_gram_ - G).max() > 1e-6 * np.abs(G).max()


def test_position_sources_of_each_rank_draw_their_own_signs():
    """``offset`` (one per rank of a distributed fit) gives another stream of signs."""
    from sklearn_lib.models._position_sources import PositionSources

    cpu = torch.device("cpu")
    base = PositionSources(3, 11, cpu)
    signs = [s.draw(50, 4, torch.float64) for s in (base, base.offset(1), base.offset(2))]
    assert all(torch.allclose(s.abs(), torch.full_like(s, 3 ** -0.5)) for s in signs)
    assert not torch.equal(signs[0], signs[1]) and not torch.equal(signs[1], signs[2])
    again = PositionSources(3, 11, cpu).offset(1).draw(50, 4, torch.float64)
    assert torch.equal(again, signs[1])  # exact: the same seed draws the same bits


@pytest.mark.parametrize("integration, constant", [(None, False), ("trapezoid", True)])
def test_position_sources_estimate_the_edges_without_bias(integration, constant):
    """Averaged over draws, edges from combined positions are the exact edges.

    With integrated gradients every path point must combine positions with the
    same signs (the cross terms of two points would be lost otherwise), and the
    constant node's output coordinates with them: both would show as a bias.
    """
    from sklearn_lib.models._position_sources import PositionSources
    from sklearn_lib.sources._edges import path_quadrature
    from sklearn_lib.sources._model_source import ModelSource

    net, X = _mixer(), _data(12)
    graph = InteractionGraph.from_model(net, ["resid", "mid"], X, sequence=True)
    source = ModelSource(net, ["resid", "mid"], X, sequence=True, batch_size=None,
                         device=None, dtype="float64", fast_path="auto", verbose=False)
    tensor = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    first, last = graph.bases_
    alphas, weights = path_quadrature(integration, 2) if integration else ([1.0], [1.0])
    kwargs = dict(edge_point="data", alphas=list(alphas), weights=list(weights),
                  out_mean=tensor(last.mean_) if constant else None)
    args = (0, tensor(last.components_.T), tensor(first.mean_), tensor(first.components_.T),
            tensor(first.inverse_components_))
    exact = source.edges(*args, **kwargs)
    draws = torch.stack([
        source.edges(*args, **kwargs,
                     position_sources=PositionSources(2, seed, torch.device("cpu")))
        for seed in range(300)
    ])
    errors = (draws - exact).square().sum((1, 2))
    assert float(errors.min()) > 1e-6 * float(exact.square().sum())  # the draws vary
    # Every edge of the mean of 300 unbiased draws lies within 4 standard errors
    # (the seeds are fixed: deterministic). Fresh signs at every path point and
    # for the constant's output coordinates put the trapezoid case's mean 60
    # standard errors off (measured when this test was written).
    bound = 4 * draws.std(0) / 300 ** 0.5 + 1e-12 * exact.abs().max()
    assert bool(((draws.mean(0) - exact).abs() <= bound).all())
