"""LocalLearningCoefficient against closed forms.

For a model whose loss is exactly quadratic around ``w*`` (linear regression),
full-batch SGLD is a linear recursion and the expected estimate is known in
closed form: along an eigendirection of the Hessian with eigenvalue ``h``,
``a = n beta h + gamma``, ``c = 1 - eps a / 2``, the variance after ``t`` steps
from ``w*`` is ``eps (1 - c^(2t)) / (1 - c^2)`` and the draw ``t`` contributes
``n beta h var_t / 2``. As ``eps, gamma -> 0`` this is ``rank(H) / 2``: ``d / 2``
for a regular model, less for a degenerate one.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_lib.degeneracy import LocalLearningCoefficient

F64 = torch.float64


def _regression(n=1000, d=3, duplicate=False, seed=0):
    """A linear model at its least-squares minimum ``w*``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, dtype=F64, generator=g)
    if duplicate:
        X[:, -1] = X[:, 0]
    torch.manual_seed(seed)
    net = nn.Linear(d, 1).double()
    with torch.no_grad():
        y = X @ torch.arange(1.0, d + 1, dtype=F64)[:, None] + 0.1 * torch.randn(
            n, 1, dtype=F64, generator=g)
        design = torch.cat([X, torch.ones(n, 1, dtype=F64)], 1)
        w = torch.linalg.pinv(design) @ y
        net.weight.copy_(w[:d].T)
        net.bias.copy_(w[d])
    return net, X, y, design


def expected_estimate(design, n_beta, lr, localization, n_burnin, n_draws):
    """The closed-form expectation of the estimator for ``L = |y - design w|^2 / 2n``."""
    h = np.clip(np.linalg.eigvalsh((design.T @ design / design.shape[0]).numpy()), 0, None)
    a = n_beta * h + localization
    c2 = (1 - lr * a / 2) ** 2
    t = np.arange(n_burnin, n_burnin + n_draws)[:, None]
    var = lr * (1 - c2[None] ** t) / (1 - c2[None])
    return float((n_beta * h * var / 2).sum(1).mean())


PARAMS = dict(n_chains=8, n_draws=1500, n_burnin=300, lr=1e-3, localization=1.0)


@pytest.mark.parametrize("duplicate", [False, True])
def test_linear_regression_matches_the_closed_form(duplicate):
    net, X, y, design = _regression(duplicate=duplicate)
    llc = LocalLearningCoefficient(**PARAMS, random_state=0).fit_model(net, X, y)
    n_beta = 1000 / math.log(1000)
    assert llc.n_beta_ == pytest.approx(n_beta)
    expected = expected_estimate(design, n_beta, PARAMS["lr"], PARAMS["localization"],
                                 PARAMS["n_burnin"], PARAMS["n_draws"])
    rank = 3 if duplicate else 4  # the duplicated column leaves w_0 - w_2 unseen
    # The closed form is rank / 2 up to the step and the localization (a few %).
    assert abs(expected - rank / 2) < 0.05 * rank / 2
    assert llc.llc_sem_ > 0
    assert abs(llc.llc_ - expected) <= 3 * llc.llc_sem_, (llc.llc_, expected, llc.llc_sem_)
    assert llc.n_parameters_ == 4
    # The init loss is L_n(w*) on all samples (half the mean squared residual).
    residual = (y - design @ torch.linalg.pinv(design) @ y).square().mean() / 2
    assert llc.init_loss_ == pytest.approx(float(residual))


def test_degenerate_model_has_a_smaller_coefficient():
    regular = LocalLearningCoefficient(**PARAMS, random_state=1).fit_model(
        *_regression()[:3])
    degenerate = LocalLearningCoefficient(**PARAMS, random_state=1).fit_model(
        *_regression(duplicate=True)[:3])
    gap = regular.llc_ - degenerate.llc_
    assert gap > 3 * math.hypot(regular.llc_sem_, degenerate.llc_sem_)
    assert degenerate.llc_ < degenerate.n_parameters_ / 2 - 0.25


def _relu(n_dead):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        net[0].bias[:n_dead] = -100.0
    return net


def _gauss_newton_design(net, X):
    """The stacked output Jacobian ``K`` (n o, p) by brute force, scaled so that the
    behavioural loss is ``|K dw|^2 / 2 rows`` to second order: a least-squares loss."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def outputs(*chosen):
        return torch.func.functional_call(net, dict(zip(params, chosen)), (X,)).reshape(-1)

    J = torch.autograd.functional.jacobian(outputs, tuple(params.values()), vectorize=True)
    K = torch.cat([j.reshape(j.shape[0], -1) for j in J], 1)
    return K * math.sqrt(K.shape[0] / X.shape[0])


X_RELU = torch.randn(200, 3, dtype=F64, generator=torch.Generator().manual_seed(2))


def test_relu_network_matches_its_quadratic_expectation():
    """Behavioural loss (no y) of a ReLU network, strongly localised so that the chains
    stay where the loss is quadratic: the closed form of its Gauss-Newton matrix."""
    params = dict(n_chains=4, n_draws=400, n_burnin=200, lr=1e-3, localization=100.0)
    net = _relu(0)
    llc = LocalLearningCoefficient(**params, random_state=0).fit_model(net, X_RELU)
    assert llc.init_loss_ == 0.0
    n_beta = 200 / math.log(200)
    expected = expected_estimate(_gauss_newton_design(net, X_RELU), n_beta, 1e-3, 100.0,
                                 200, 400)
    assert abs(llc.llc_ - expected) <= 3 * llc.llc_sem_ + 0.1 * expected, (
        llc.llc_, expected, llc.llc_sem_)


def test_dead_relus_lower_the_coefficient():
    """Three dead neurons of five free their 4 incoming and 2 outgoing weights."""
    params = dict(n_chains=4, n_draws=800, n_burnin=200, lr=2e-3, localization=10.0)
    healthy = LocalLearningCoefficient(**params, random_state=0).fit_model(_relu(0), X_RELU)
    dead = LocalLearningCoefficient(**params, random_state=0).fit_model(_relu(3), X_RELU)
    assert dead.llc_ + 3 * math.hypot(healthy.llc_sem_, dead.llc_sem_) < healthy.llc_
    # Below half the rank of the Gauss-Newton matrix, itself below d / 2: 32
    # parameters less 5 rescalings; with 3 dead, 18 more free and 3 rescalings fewer.
    assert healthy.n_parameters_ == 32
    for net, llc, rank in ((_relu(0), healthy, 27), (_relu(3), dead, 12)):
        values = torch.linalg.svdvals(_gauss_newton_design(net, X_RELU)) ** 2
        assert int((values > 1e-12 * values.max()).sum()) == rank
        assert llc.llc_ < rank / 2 < 32 / 2


def test_seeded_runs_are_identical_and_minibatches_work():
    net, X, y, _ = _regression(n=300)
    params = dict(n_chains=2, n_draws=50, n_burnin=10, lr=1e-3, batch_size=64)
    a = LocalLearningCoefficient(**params, random_state=5).fit_model(net, X, y)
    b = LocalLearningCoefficient(**params, random_state=5).fit_model(net, X, y)
    c = LocalLearningCoefficient(**params, random_state=6).fit_model(net, X, y)
    np.testing.assert_array_equal(a.loss_trace_, b.loss_trace_)
    assert a.llc_ == b.llc_ != c.llc_
    assert a.loss_trace_.shape == (2, 60)
    # The model is never modified.
    assert torch.equal(net.weight, _regression(n=300)[0].weight)


def test_classification_and_parameter_subsets():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(200, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    labels = net(X).argmax(1)
    llc = LocalLearningCoefficient(n_chains=2, n_draws=30, n_burnin=5, lr=1e-4,
                                   parameters=["2.weight", "2.bias"],
                                   random_state=0).fit_model(net, X, labels)
    assert llc.n_parameters_ == 15 and llc.parameter_names_ == ["2.weight", "2.bias"]
    ce = torch.nn.functional.cross_entropy(net(X), labels)
    assert llc.init_loss_ == pytest.approx(float(ce))
    with pytest.raises(ValueError, match="must name some of the model's parameters"):
        LocalLearningCoefficient(parameters=["nope"]).fit_model(net, X, labels)
    with pytest.raises(RuntimeError, match="diverged"):
        LocalLearningCoefficient(n_chains=1, n_draws=200, n_burnin=0, lr=10.0,
                                 random_state=0).fit_model(net, X, labels)


def test_plot_shows_every_chain():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    net, X, y, _ = _regression(n=200)
    llc = LocalLearningCoefficient(n_chains=3, n_draws=20, n_burnin=5, lr=1e-3,
                                   random_state=0).fit_model(net, X, y)
    ax = llc.plot()
    assert len(ax.lines) == 3 + 1  # the chains and L_n(w*)
    assert "LLC" in ax.get_title()


def test_devinterp_sampler_agrees():
    """devinterp's own chain loop and SGLD (optional extra) on the regular model."""
    pytest.importorskip("devinterp")
    net, X, y, design = _regression()
    params = dict(n_chains=6, n_draws=1000, n_burnin=300, lr=1e-3, localization=1.0,
                  batch_size=1000)
    ours = LocalLearningCoefficient(**params, random_state=0).fit_model(net, X, y)
    theirs = LocalLearningCoefficient(**params, sampler="devinterp",
                                      random_state=0).fit_model(net, X, y)
    assert abs(ours.llc_ - theirs.llc_) <= 3 * math.hypot(ours.llc_sem_, theirs.llc_sem_)
