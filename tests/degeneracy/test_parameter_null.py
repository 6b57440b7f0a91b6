"""Degenerate parameter directions of each section against brute force.

The brute force is the definition: stack, over the samples, the Jacobian of the
graph's output coordinates (the final layer's activations read through its basis
``C_L``: all of them for ``final_layer="identity"``) with respect to the
section's own parameters, as ``torch.autograd.functional.jacobian`` gives it
(``n o`` rows, ``p`` columns); the degenerate directions are ``p - rank``, the
rank counting eigenvalues of ``K^T K`` (squared singular values of ``K``) above
``eps max(p, sqrt(n o)) lambda_max``, the rule of the rest of the library. Every
planted network has a clean gap around that tolerance (checked), so the rule's
constant does not decide the count, and the counts must be equal integers.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_lib import declare_residual_mlp
from sklearn_lib.degeneracy._parameter_null import (
    ParameterBlock,
    section_null_space,
)
from sklearn_lib.degeneracy import DegeneracyReport

F64 = torch.float64


def brute_force_null(net, X, names, read=None):
    """``(p - rank K, eigenvalues of K^T K, tolerance)`` for the parameters ``names``."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def outputs(*chosen):
        y = torch.func.functional_call(net, {**params, **dict(zip(names, chosen))}, (X,))
        return (y if read is None else read(y)).reshape(-1)

    J = torch.autograd.functional.jacobian(outputs, tuple(params[k] for k in names),
                                           vectorize=True)
    K = torch.cat([j.reshape(j.shape[0], -1) for j in J], 1)
    values = torch.linalg.svdvals(K) ** 2
    tau = torch.finfo(K.dtype).eps * max(K.shape[1], math.sqrt(K.shape[0])) * values.max()
    return K.shape[1] - int((values > tau).sum()), values, float(tau)


def assert_clean_gap(values, tau, factor=1e4):
    """No eigenvalue within ``factor`` of the tolerance on either side."""
    near = ((values > tau / factor) & (values < tau * factor)).sum()
    assert int(near) == 0, "the brute-force spectrum has no clear gap at the tolerance"


def check_sections(net, layers, X, sections, **report_params):
    """Fit a report on the model and compare every section with brute force."""
    report = DegeneracyReport(**report_params).fit_model(net, layers, X)
    for l, names in sections.items():
        expected, values, tau = brute_force_null(net, X, names)
        assert_clean_gap(values, tau)
        assert report.degenerate_parameters_method_[l] == "exact"
        assert report.section_parameters_[l] == sum(
            dict(net.named_parameters())[k].numel() for k in names)
        assert report.degenerate_parameters_[l] == expected, (l, names)
    return report


def _x(n, d, seed=1):
    return torch.randn(n, d, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _rank_3_of_4(W, seed=0):
    U = torch.linalg.qr(torch.randn(W.shape[1], W.shape[1], dtype=F64,
                                    generator=torch.Generator().manual_seed(seed)))[0]
    return W @ U[:, :3] @ U[:, :3].T


# --------------------------------------------------------------------------- planted networks
def test_issue_network_constant_dead_duplicated_bottleneck():
    """A constant input feature, a dead ReLU, a duplicated pair, and a linear bottleneck
    of 4 directions the output reads 3 of."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4), nn.Linear(4, 5)).double()
    with torch.no_grad():
        net[0].bias[0] = -100.0
        net[0].weight[2] = net[0].weight[1]
        net[0].bias[2] = net[0].bias[1]
        net[3].weight.copy_(_rank_3_of_4(net[3].weight))
    X = _x(300, 4)
    X[:, 3] = 1.5
    report = check_sections(net, [":input", "1", "2", "3"], X, {
        1: ["0.weight", "0.bias"], 2: ["2.weight", "2.bias"], 3: ["3.weight", "3.bias"]})
    # By mechanism: the dead neuron's 4 + 1, the constant feature's column for the
    # 5 others; 2 inputs x 4 outputs + 7 x 1 unread - 2 x 1; nothing in the last.
    assert report.degenerate_parameters_[1:].tolist() == [10, 13, 0]


def test_relu_layer_read_in_3_of_4_directions():
    """The old count called ``u v~^T`` free for the unread ``u``; the ReLU patterns
    vary, so the output sees it: nothing of the first section is degenerate."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5)).double()
    with torch.no_grad():
        net[2].weight.copy_(_rank_3_of_4(net[2].weight))
    X = _x(400, 3)
    report = check_sections(net, [":input", "1", "2"], X, {
        1: ["0.weight", "0.bias"], 2: ["2.weight", "2.bias"]})
    assert report.gradient_rank_[1] == 3
    assert report.degenerate_parameters_[1] == 0
    # The map into the output: 5 inputs (4 + bias) x the 1 unread output direction... of
    # none: the output is the last layer, read whole; its inputs span 4 + 1.
    assert report.degenerate_parameters_[2] == 0


def test_gelu_with_a_dead_neuron_and_an_unread_direction():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 4)).double()
    with torch.no_grad():
        net[0].bias[3] = -40.0  # GELU'(z) underflows to 0 far below zero
        net[2].weight.copy_(_rank_3_of_4(net[2].weight.T).T)  # one hidden direction unread
    X = _x(300, 3)
    report = check_sections(net, [":input", "1", "2"], X, {
        1: ["0.weight", "0.bias"], 2: ["2.weight", "2.bias"]})
    # The dead neuron's 4 incoming parameters at least.
    assert report.degenerate_parameters_[1] >= 4


class _Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)

    def forward(self, x):
        return x + self.fc_out(self.act(self.fc_in(x)))


def test_residual_block():
    """Both Linears of a declared residual MLP block are the section's parameters."""
    torch.manual_seed(3)
    block = declare_residual_mlp(_Block(4, 8), "fc_in", "act", "fc_out")
    net = nn.Sequential(nn.Linear(3, 4), block, nn.Linear(4, 2)).double()
    with torch.no_grad():
        block.fc_in.bias[5] = -100.0  # a dead hidden neuron
    X = _x(300, 3)
    report = check_sections(net, [":input", "1:input", "1:output", "2"], X, {
        1: ["0.weight", "0.bias"],
        2: ["1.fc_in.weight", "1.fc_in.bias", "1.fc_out.weight", "1.fc_out.bias"],
        3: ["2.weight", "2.bias"]})
    # The dead neuron: 4 + 1 incoming and 4 outgoing weights at least.
    assert report.degenerate_parameters_[2] >= 9


def test_activation_before_the_linear():
    """The section ``ReLU then Linear``: its Linear reads ``relu(x)``."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    with torch.no_grad():
        net[0].bias[1] = -100.0
    X = _x(300, 3)
    check_sections(net, [":input", "0", "2"], X, {
        1: ["0.weight", "0.bias"], 2: ["2.weight", "2.bias"]})


def test_shipped_network_on_a_few_pairs():
    """The shipped MLP on 6 pairs (678 output rows: the dual matrix is exact)."""
    from sklearn_lib.datasets import LAYERS, load_modular_addition_model, modular_addition_data

    model = load_modular_addition_model()
    X_train, _, _, _ = modular_addition_data(model.p)
    X = torch.as_tensor(X_train[:6])
    report = DegeneracyReport().fit_model(model, list(LAYERS), X)
    for l, names in {1: ["mlp.0.weight", "mlp.0.bias"],
                     2: ["mlp.2.weight", "mlp.2.bias"]}.items():
        expected, values, tau = brute_force_null(model, X, names)
        assert_clean_gap(values, tau, factor=100)
        assert report.degenerate_parameters_[l] == expected
    # The hidden layer's section went the dual route (678 rows < 64 x 256 reduced).
    result = report.parameter_null_spaces_[1]
    assert result.n_rows == 6 * 113 < result.reduced_size


# --------------------------------------------------------------------------- definition
def test_final_layer_basis_decides_what_is_read():
    """With a constant output feature, ``final_layer="pca"`` does not read it: the
    weights into it become degenerate; the identity reads it."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    with torch.no_grad():
        net[2].weight[3] = 0.0  # logit 3 is its bias, a constant on the data
    X = _x(300, 3)
    layers = [":input", "1", "2"]
    ident = DegeneracyReport().fit_model(net, layers, X)
    pca = DegeneracyReport(final_layer="pca").fit_model(net, layers, X)
    C = torch.as_tensor(pca.graph_.bases_[-1].components_)
    assert C.shape == (3, 4)
    for l, names in {1: ["0.weight", "0.bias"], 2: ["2.weight", "2.bias"]}.items():
        assert ident.degenerate_parameters_[l] == brute_force_null(net, X, names)[0]
        read = brute_force_null(net, X, names, read=lambda y: y @ C.T)[0]
        assert pca.degenerate_parameters_[l] == read
    # The constant logit's row (5 weights and its bias) is read only by the identity.
    assert pca.degenerate_parameters_[2] - ident.degenerate_parameters_[2] == 6


def test_arrays_equal_the_model():
    """``fit`` reads each section as act(x W + b): on an MLP that is the model."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    with torch.no_grad():
        net[0].bias[2] = -100.0
        net[2].weight.copy_(_rank_3_of_4(net[2].weight.T, 1).T[:4])
    X = _x(200, 3)
    from sklearn_lib.collect import collect

    acts, jacs = collect(net, [":input", "1", "2"], X, verbose=False)
    with torch.no_grad():
        z = net[0](X)
    from_arrays = DegeneracyReport().fit(acts, jacobians=jacs, preactivations={1: z})
    from_model = DegeneracyReport().fit_model(net, [":input", "1", "2"], X)
    assert from_arrays.degenerate_parameters_[1:].tolist() == (
        from_model.degenerate_parameters_[1:].tolist())
    # fit_graph with the same arrays; without them the count is missing.
    graph = from_arrays.graph_
    given = DegeneracyReport().fit_graph(graph, preactivations={1: z}, X=acts, jacobians=jacs)
    assert given.degenerate_parameters_[1:].tolist() == (
        from_model.degenerate_parameters_[1:].tolist())
    assert np.isnan(DegeneracyReport().fit_graph(graph).degenerate_parameters_[1:]).all()
    with pytest.raises(ValueError, match="pass the arrays the graph was fitted on"):
        DegeneracyReport().fit_graph(graph, X=[a[:50] for a in acts],
                                     jacobians=[j[:50] for j in jacs])


def test_positions_as_rows():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    with torch.no_grad():
        net[0].bias[4] = -100.0
    X = torch.randn(40, 5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    layers = [":input", "1", "2"]
    seq = DegeneracyReport().fit_model(net, layers, X, sequence=True)
    flat = DegeneracyReport().fit_model(net, layers, X.reshape(200, 3))
    assert seq.degenerate_parameters_[1:].tolist() == flat.degenerate_parameters_[1:].tolist()
    assert flat.degenerate_parameters_[1] == brute_force_null(
        net, X.reshape(200, 3), ["0.weight", "0.bias"])[0]


# --------------------------------------------------------------------------- estimate
def _wide_relu(seed=8):
    """Two clusters of inputs: on A, ``x_0 > 0`` and ``x_3 = x_4 = x_5 = 0``; on B,
    ``x_0 < 0`` and all six vary. Neurons 0-5 fire on A only, so their weights
    along ``e_3, e_4, e_5`` are free (18 directions that neither the inputs nor
    the output's reading alone reveal, inside the reduced matrix); 5 dead neurons
    add 35 that the reductions remove."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(150, 6, dtype=F64, generator=g)
    X[:75, 0] = 1 + torch.rand(75, dtype=F64, generator=g)
    X[:75, 3:] = 0.0
    X[75:, 0] = -1 - torch.rand(75, dtype=F64, generator=g)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 7)).double()
    with torch.no_grad():
        net[0].weight[:6] = 0.1 * net[0].weight[:6]
        net[0].weight[:6, 0] = 10.0
        net[0].bias[:6] = 0.0
        net[0].bias[6:11] = -100.0
    return net, X


def test_wide_network_matches_brute_force():
    net, X = _wide_relu()
    report = check_sections(net, [":input", "1", "2"], X, {
        1: ["0.weight", "0.bias"], 2: ["2.weight", "2.bias"]})
    assert report.degenerate_parameters_[1] >= 35 + 18
    assert report.parameter_null_spaces_[1].n_parameters - report.parameter_null_spaces_[
        1].reduced_size == 35


def test_estimate_agrees_with_the_exact_count():
    net, X = _wide_relu()
    layers = [":input", "1", "2"]
    exact = DegeneracyReport().fit_model(net, layers, X)
    est = DegeneracyReport(exact_size_limit=0, n_probes=12, n_lanczos_steps=60,
                           random_state=0).fit_model(net, layers, X)
    # The map into the output is read the same way on every sample: exact in closed form.
    assert exact.degenerate_parameters_method_[1:] == ["exact", "exact"]
    assert est.degenerate_parameters_method_[1:] == ["estimate", "exact"]
    for l in (1,):
        truth, value, error = (exact.degenerate_parameters_[l], est.degenerate_parameters_[l],
                               est.degenerate_parameters_error_[l])
        assert error >= 0
        assert abs(value - truth) <= 3 * error + 0.5, (l, truth, value, error)
    frame = est.to_frame()
    assert frame["degenerate_parameters_method"].tolist()[1:] == ["estimate", "exact"]
    assert exact.to_frame()["degenerate_parameters_error"].tolist()[1:] == [0.0, 0.0]
    # Deterministic with a seed.
    again = DegeneracyReport(exact_size_limit=0, n_probes=12, n_lanczos_steps=60,
                             random_state=0).fit_model(net, layers, X)
    np.testing.assert_array_equal(again.degenerate_parameters_, est.degenerate_parameters_)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_estimate_error_is_honest(seed):
    """Different probes, default steps: the exact count within three stated errors, and
    with enough steps the error is the probes' spread alone (Hutchinson's variance
    ``2 (null - sum P_ii^2) / n_probes`` is at most ``2 null / n_probes``)."""
    net, X = _wide_relu()
    layers = [":input", "1", "2"]
    truth = DegeneracyReport().fit_model(net, layers, X).degenerate_parameters_[1]
    for steps in (120, 300):
        est = DegeneracyReport(exact_size_limit=0, n_lanczos_steps=steps,
                               random_state=seed).fit_model(net, layers, X)
        value, error = est.degenerate_parameters_[1], est.degenerate_parameters_error_[1]
        assert abs(value - truth) <= 3 * error + 1e-9, (steps, truth, value, error)
    assert error <= 3 * math.sqrt(2 * (truth - 35) / 8)


def test_blocks_by_hand_match_a_kronecker_rank():
    """An affine section read by a fixed matrix: ``rank = rank(G~) rank(A)`` exactly."""
    rng = np.random.default_rng(0)
    U = torch.as_tensor(rng.normal(size=(100, 2)) @ rng.normal(size=(2, 5)))  # rank 2 of 5
    A = torch.as_tensor(rng.normal(size=(6, 3)) @ rng.normal(size=(3, 7)))  # rank 3 of 7
    result = section_null_space([ParameterBlock(U, True, A)], n_outputs=6, dtype=F64)
    assert (result.n_parameters, result.degenerate) == (6 * 7, 6 * 7 - 3 * 3)
    assert result.method == "exact"
