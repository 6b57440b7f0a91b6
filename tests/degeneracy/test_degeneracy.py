"""DegeneracyReport against networks built to have known answers, and brute force."""

import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ortho_group

from sklearn_lib import InteractionGraph
from sklearn_lib.degeneracy import DegeneracyReport
from sklearn_lib.degeneracy._counts import FiringPatterns

LAYERS = [":input", "1", "2"]


def _linear_chain(rng, X0, weights):
    """Activations and exact Jacobians of ``X_{l+1} = X_l W_l + b_l``."""
    acts, jacs = [X0], []
    for W in weights:
        acts.append(acts[-1] @ W + rng.normal(size=W.shape[1]))
        jacs.append(np.broadcast_to(W.T, (len(X0), *W.T.shape)).copy())
    return acts, jacs


def _mlp(d0, h, o, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(d0, h), torch.nn.ReLU(), torch.nn.Linear(h, o))
    return net.double()


def _parameter_null_space(net, X, names=None):
    """Brute force: directions of the parameters (all, or ``names``) that leave every
    output on the data unchanged to first order, ``n_params - rank(d outputs / d params)``."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    names = list(params) if names is None else names

    def outputs(chosen):
        return torch.func.functional_call(net, {**params, **chosen}, (X,)).reshape(-1)

    J = torch.func.jacrev(outputs)({k: params[k] for k in names})
    M = torch.cat([J[k].reshape(J[k].shape[0], -1) for k in names], 1)
    return M.shape[1] - int(torch.linalg.matrix_rank(M))


# --------------------------------------------------------------------------- arrays
@pytest.mark.parametrize("case", ["duplicated", "constant", "random"])
def test_activation_null_space_known_answers(rng, case):
    X0 = rng.normal(size=(400, 4))
    if case == "duplicated":
        X0 = np.column_stack([X0, X0[:, 1]])
    elif case == "constant":
        X0 = np.column_stack([X0, np.full(len(X0), 3.0)])
    acts, jacs = _linear_chain(rng, X0, [rng.normal(size=(X0.shape[1], 7))])
    report = DegeneracyReport().fit(acts, jacobians=jacs)
    expected = 0 if case == "random" else 1
    frame = report.to_frame()
    assert frame["activation_null"].tolist() == [expected, 7 - 4]
    assert frame["gradient_null"].tolist() == [0, 0]
    assert frame["joint_null"].iloc[0] == expected
    # The dependent direction is one of the spectrum's zeros, below the tolerance.
    D = report.gram_eigenvalues_[0]
    assert (D <= report.activation_tolerance_[0]).sum() == expected


def test_layer_ignoring_half_its_inputs(rng):
    X0 = rng.normal(size=(300, 3))
    W0 = rng.normal(size=(3, 6))
    W1 = rng.normal(size=(6, 5))
    W1[3:] = 0  # layer 2 reads features 0-2 of layer 1 only
    acts, jacs = _linear_chain(rng, X0, [W0, W1])
    report = DegeneracyReport().fit(acts, jacobians=jacs)
    assert report.gradient_rank_.tolist() == [3, 3, 5]
    assert report.activation_rank_.tolist() == [3, 3, 3]
    # The basis keeps at most what is both varied and read.
    assert report.n_components_.tolist() == [3, 3, 5]


@pytest.mark.parametrize("center", [True, False])
def test_parameter_count_of_linear_chain_matches_brute_force(rng, center):
    """Affine sections: the count is the null space of d outputs / d parameters.

    With ``center=False`` the maps have no bias of their own (it is folded into a
    constant-1 input feature, the reference implementation's convention).
    """
    d0, d1, d2 = 4, 6, 5
    net = torch.nn.Sequential(torch.nn.Linear(d0, d1, bias=center),
                              torch.nn.Linear(d1, d2, bias=center)).double()
    with torch.no_grad():
        net[1].weight[:, 4:] = 0  # features 4, 5 of layer 1 unread
    X = rng.normal(size=(200, 2)) @ rng.normal(size=(2, d0))  # rank 2 input
    if not center:
        X[:, 0] = 1.0
    X = torch.as_tensor(X)
    report = DegeneracyReport(center=center).fit_model(net, [":input", "0", "1"], X)
    assert report.gradient_rank_.tolist()[1] == 4
    for l in (1, 2):
        names = [name for name, _ in net[l - 1].named_parameters()]
        assert report.degenerate_parameters_[l] == _parameter_null_space(
            net, X, [f"{l - 1}.{name}" for name in names])
        assert report.section_parameters_[l] == sum(
            p.numel() for p in net[l - 1].parameters())
    assert np.isnan(report.degenerate_parameters_[0])


# --------------------------------------------------------------------------- ReLU networks
def test_random_network_has_no_degeneracy():
    net = _mlp(3, 6, 8)
    X = torch.randn(300, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    report = DegeneracyReport().fit_model(net, LAYERS, X)
    frame = report.to_frame()
    assert frame.loc["1", ["activation_null", "gradient_null", "joint_null", "dead",
                           "always_on", "sync_groups", "sync_directions"]].tolist() == [0] * 7
    assert report.degenerate_parameters_[1:].tolist() == [0, 0]
    # Brute force: only the rescaling of each ReLU is free.
    assert _parameter_null_space(net, X) == 6


def test_dead_relu():
    net = _mlp(3, 6, 8)
    with torch.no_grad():
        net[0].bias[4] = -100.0
    X = torch.randn(300, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    report = DegeneracyReport().fit_model(net, LAYERS, X)
    assert report.dead_neurons_[1].tolist() == [4]
    assert report.activation_rank_[1] == 5  # its activation is constant
    # Its incoming weights and bias (4) and outgoing weights (8) are free.
    assert report.degenerate_parameters_[1:].tolist() == [4, 8]
    live_rescalings = 5
    assert _parameter_null_space(net, X) == 12 + live_rescalings


@pytest.mark.parametrize("duplicate", [True, False])
def test_synchronised_relus(duplicate):
    """Identical weights, or different weights that fire on the same rows."""
    net = _mlp(3, 6, 8)
    X = torch.randn(300, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if duplicate:
            net[0].weight[2] = net[0].weight[1]
            net[0].bias[2] = net[0].bias[1]
        else:  # neuron 2 fires exactly where neuron 1 does: z_2 = 2 z_1 > 0 iff z_1 > 0
            net[0].weight[2] = 2 * net[0].weight[1]
            net[0].bias[2] = 2 * net[0].bias[1]
            net[0].weight[3] = 3 * net[0].weight[5]
            net[0].bias[3] = 3 * net[0].bias[5] + 0.0
    report = DegeneracyReport().fit_model(net, LAYERS, X)
    groups = [g.tolist() for g in report.synchronised_groups_[1]]
    assert groups == ([[1, 2]] if duplicate else [[1, 2], [3, 5]])
    assert report.synchronised_directions_[1] == 2 * len(groups)
    # Both kinds are also a linear dependence of the activations (h_2 = c h_1).
    assert report.activation_rank_[1] == 6 - len(groups)


def test_always_on_group_matches_brute_force():
    """A dead neuron, two always-on neurons with different weights, three generic ones."""
    net = _mlp(3, 6, 8)
    with torch.no_grad():
        net[0].bias[0] = -100.0
        net[0].bias[1] = net[0].bias[2] = 50.0
    X = torch.randn(300, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    report = DegeneracyReport().fit_model(net, LAYERS, X)
    assert report.always_on_neurons_[1].tolist() == [1, 2]
    assert [g.tolist() for g in report.synchronised_groups_[1]] == [[1, 2]]
    # GL(2) less 2 rescalings, plus 2 biases passed on to the next layer.
    assert report.synchronised_directions_[1] == 4
    # The network's null space: each section's own (degenerate_parameters), the
    # directions that need both sections (sync_directions) and the rescalings.
    live_rescalings = 5
    assert report.degenerate_parameters_[1:].tolist() == [4, 8]
    assert np.nansum(report.degenerate_parameters_) + report.synchronised_directions_[1] + (
        live_rescalings) == _parameter_null_space(net, X)


def test_smooth_activation_needs_a_tolerance():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 5))
    with torch.no_grad():
        net[0].bias[3] = -40.0  # GELU'(z) < 1e-300 far below zero
    X = torch.randn(200, 3, generator=torch.Generator().manual_seed(1))
    report = DegeneracyReport(pattern_tol=1e-3).fit_model(net, LAYERS, X)
    assert report.dead_neurons_[1].tolist() == [3]
    # GELU is not act(z) = act'(z) z: the synchronisation count does not apply.
    assert np.isnan(report.synchronised_directions_[1])
    assert report.to_frame()["sync_directions"].isna().tolist() == [True, True, True]


def test_patterns_from_arrays_match_the_model():
    net = _mlp(3, 6, 8)
    with torch.no_grad():
        net[0].weight[2] = net[0].weight[1]
        net[0].bias[2] = net[0].bias[1]
        net[0].bias[0] = -100.0
    X = torch.randn(300, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    from_model = DegeneracyReport().fit_model(net, LAYERS, X)
    with torch.no_grad():
        z = net[0](X)
        acts = [X, torch.relu(z), net(X)]
    jacs = [
        (torch.relu(z) > 0).double()[:, :, None] * net[0].weight[None],
        net[2].weight.detach().expand(len(X), -1, -1).contiguous(),
    ]
    from_arrays = DegeneracyReport(batch_size=64).fit(
        acts, jacobians=jacs, preactivations={"1": z}, activation=torch.nn.ReLU())
    cols = ["activation_rank", "gradient_rank", "dead", "sync_directions",
            "degenerate_parameters"]
    assert from_arrays.to_frame()[cols].equals(
        from_model.to_frame()[cols].set_axis(["0", "1", "2"]).rename_axis("layer"))


def test_sequence_model_counts_positions_as_rows():
    net = _mlp(3, 6, 8)
    with torch.no_grad():
        net[0].bias[4] = -100.0
    X = torch.randn(50, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    report = DegeneracyReport().fit_model(net, LAYERS, X, sequence=True)
    assert report.graph_.bases_[1].n_samples_seen_ == 200
    assert report.dead_neurons_[1].tolist() == [4]
    flat = DegeneracyReport().fit_model(net, LAYERS, X.reshape(200, 3))
    assert report.to_frame().equals(flat.to_frame())


# --------------------------------------------------------------------------- hashing
@pytest.mark.parametrize("batch", [7, 64, 1000])
def test_hashed_groups_equal_brute_force_grouping(rng, batch):
    n, d = 300, 40
    base = rng.normal(size=(n, 12))
    z = base[:, rng.integers(0, 12, size=d)] * rng.uniform(0.5, 2, size=d)  # planted groups
    z[:, 0] = -1.0
    z[:, 1] = 1.0 + rng.uniform(size=n)
    patterns = FiringPatterns(d, 0.0)
    for start in range(0, n, batch):
        patterns.update(torch.as_tensor(z[start:start + batch]), torch.relu)
    dead, on, groups = patterns.groups()
    assert dead.tolist() == [0] and on.tolist() == [1]
    firing = z > 0
    expected = {}
    for i in range(d):
        if firing[:, i].any():
            expected.setdefault(firing[:, i].tobytes(), []).append(i)
    assert sorted(g.tolist() for g in groups) == sorted(
        g for g in expected.values() if len(g) > 1)


# --------------------------------------------------------------------------- invariance
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), log_cond=st.floats(0, 3),
       kind=st.sampled_from(["duplicated", "unread", "random"]))
def test_counts_invariant_under_reparameterisation(seed, log_cond, kind):
    """X_1 -> X_1 A with the chain rule: the ranks and r_l do not move (SPEC 1(d))."""
    rng = np.random.default_rng(seed)
    X0 = rng.normal(size=(200, 3))
    W0, W1 = rng.normal(size=(3, 5)), rng.normal(size=(5, 4))
    if kind == "duplicated":
        W0[:, 4] = W0[:, 0]
    elif kind == "unread":
        W1[3:] = 0
    acts, jacs = _linear_chain(rng, X0, [W0, W1])
    A = ortho_group.rvs(5, random_state=seed) @ np.diag(np.logspace(0, log_cond, 5)) @ (
        ortho_group.rvs(5, random_state=seed + 1))
    moved = [acts[0], acts[1] @ A, acts[2]]
    moved_jacs = [A.T @ jacs[0], jacs[1] @ np.linalg.inv(A).T]
    before = DegeneracyReport().fit(acts, jacobians=jacs)
    after = DegeneracyReport().fit(moved, jacobians=moved_jacs)
    for name in ("activation_rank_", "gradient_rank_", "n_components_"):
        assert getattr(after, name).tolist() == getattr(before, name).tolist()
    np.testing.assert_array_equal(after.degenerate_parameters_, before.degenerate_parameters_)


# --------------------------------------------------------------------------- graphs
def test_fit_graph_and_a_loaded_graph_agree(tmp_path):
    net = _mlp(3, 6, 8)
    with torch.no_grad():
        net[0].bias[4] = -100.0
    X = torch.randn(300, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    graph = InteractionGraph().fit_model(net, LAYERS, X)
    fitted = DegeneracyReport().fit_graph(graph)
    graph.save(tmp_path / "graph")
    # A loaded graph has no running statistics: the ranks come from gram_ and jacobian_gram_.
    loaded = DegeneracyReport().fit_graph(InteractionGraph.load(tmp_path / "graph"))
    assert loaded.to_frame().equals(fitted.to_frame())
    assert fitted.dead_neurons_ == [None, None, None]  # no pre-activations given
    with torch.no_grad():
        z = net[0](X)
    with_patterns = DegeneracyReport().fit_graph(graph, preactivations={1: z})
    assert with_patterns.dead_neurons_[1].tolist() == [4]


def test_refusals(rng):
    X0 = rng.normal(size=(50, 3))
    acts, jacs = _linear_chain(rng, X0, [rng.normal(size=(3, 4))])
    pca = InteractionGraph(basis="pca").fit(acts, jacobians=jacs)
    with pytest.raises(ValueError, match="basis='pca'"):
        DegeneracyReport().fit_graph(pca)
    with pytest.raises(TypeError, match="fitted InteractionGraph"):
        DegeneracyReport().fit_graph(object())
    with pytest.raises(ValueError, match=r"must have the shape of layer '1''s rows, \(50, 4\)"):
        DegeneracyReport().fit(acts, jacobians=jacs, preactivations={1: np.zeros((49, 4))})
    with pytest.raises(TypeError, match="preactivations must be a dict"):
        DegeneracyReport().fit(acts, jacobians=jacs, preactivations=[None, acts[1]])
    with pytest.raises(TypeError, match="activation must be callable"):
        DegeneracyReport().fit(acts, jacobians=jacs, preactivations={1: acts[1]},
                               activation="relu")
    with pytest.raises(ValueError, match="NaN or infinity"):
        DegeneracyReport().fit(acts, jacobians=jacs,
                               preactivations={1: np.full((50, 4), np.nan)})
    with pytest.raises(ValueError, match="unknown layer"):
        DegeneracyReport().fit(acts, jacobians=jacs, preactivations={"x": acts[1]})


def test_frame_and_plot_need_their_extras(rng, monkeypatch):
    X0 = rng.normal(size=(50, 3))
    acts, jacs = _linear_chain(rng, X0, [rng.normal(size=(3, 4))])
    report = DegeneracyReport().fit(acts, jacobians=jacs)
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    ax = report.plot()
    assert len(ax.patches) == 4 * 2
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install sklearn_lib\[all\]"):
        report.to_frame()
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"sklearn_lib\[plot\]"):
        report.plot()


# --------------------------------------------------------------- pre-activations (issue 20)
def _relu_net_arrays():
    net = _mlp(3, 6, 8)
    X = torch.randn(200, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = net[0](X)
        acts = [X, torch.relu(z), net(X)]
    jacs = [
        (z > 0).double()[:, :, None] * net[0].weight.detach()[None],
        net[2].weight.detach().expand(len(X), -1, -1).contiguous(),
    ]
    return net, X, z, acts, jacs


@pytest.mark.parametrize("wrong", ["other_layer", "shifted", "wrong_activation"])
@pytest.mark.parametrize("how", ["fit", "fit_graph_with_X", "fit_graph_alone"])
def test_preactivations_that_do_not_map_to_the_layer_are_refused(wrong, how):
    net, X, z, acts, jacs = _relu_net_arrays()
    activation = torch.relu
    if wrong == "other_layer":
        z_bad = torch.randn_like(z)
    elif wrong == "shifted":
        z_bad = z + 0.5
    else:
        z_bad, activation = z, torch.nn.GELU()
    with pytest.raises(ValueError, match="are not the pre-activations of layer '1'"):
        if how == "fit":
            DegeneracyReport().fit(acts, jacobians=jacs, preactivations={1: z_bad},
                                   activation=activation)
        else:
            graph = InteractionGraph().fit(acts, jacobians=jacs)
            extra = {"X": acts, "jacobians": jacs} if how == "fit_graph_with_X" else {}
            DegeneracyReport().fit_graph(graph, preactivations={1: z_bad},
                                         activation=activation, **extra)


@pytest.mark.parametrize("how", ["fit", "fit_graph_alone"])
def test_true_preactivations_are_accepted(how):
    net, X, z, acts, jacs = _relu_net_arrays()
    with torch.no_grad():
        net_dead = (z <= 0).all(0).nonzero().ravel().tolist()
    if how == "fit":
        report = DegeneracyReport().fit(acts, jacobians=jacs, preactivations={1: z})
    else:
        graph = InteractionGraph().fit(acts, jacobians=jacs)
        report = DegeneracyReport().fit_graph(graph, preactivations={1: z})
    assert report.dead_neurons_[1].tolist() == net_dead


def test_the_input_layer_has_no_preactivations():
    net, X, z, acts, jacs = _relu_net_arrays()
    with pytest.raises(ValueError, match="the first layer: it is the network's input"):
        DegeneracyReport().fit(acts, jacobians=jacs, preactivations={0: X})
