"""Error bars of stochastic graphs: ``interaction_strengths_std_`` and ``edges_std_``.

The reported standard errors are checked against what they claim to be: the
spread of the estimates over independent draws of the random sources on the same
data. Over ``N_SEEDS`` seeds, the empirical standard deviation of each estimate
is compared with the root mean square of the reported ones (its variance is
estimated without bias, so that is the quantity to average). With 40 seeds the
empirical standard deviation is known to about ``1/sqrt(2 * 39) = 11%``, the
averaged report to a few percent: the ratio must lie in [0.6, 1.6] (about four
standard errors either way).
"""

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_lib import InteractionGraph
from sklearn_lib.basis._error_bars import (
    SourceGroups,
    group_shares,
    grouped_std,
    interaction_strength_std,
)

N_SEEDS = 40
LOW, HIGH = 0.6, 1.6
P, D_IN, D = 6, 3, 4


class Mixer(nn.Module):
    """A residual stream mixed densely across positions, then a Tanh (generic products)."""

    def __init__(self):
        super().__init__()
        self.embed, self.resid = nn.Linear(D_IN, D), nn.Identity()
        self.fc, self.mid = nn.Linear(D, D), nn.Identity()
        self.register_buffer("mix", torch.randn(P, P) / P**0.5)

    def forward(self, x):
        h = self.resid(self.embed(x))
        return self.mid(h + torch.tanh(self.fc(self.mix @ h)))


def _mixer():
    torch.manual_seed(0)
    return Mixer().double()


def _sequences(n=32, heavy=False):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, P, D_IN, generator=g, dtype=torch.float64)
    if heavy:
        # One sample, at one position, dominates the Jacobian scatter: the
        # estimate's spread over signs is then that of a few discrete patterns.
        X[0, 2] *= 30.0
    return X


def _ratio(values, stds):
    """Empirical std over seeds / root mean square of the reported std, per entry."""
    values, stds = np.asarray(values), np.asarray(stds)
    return values.std(0, ddof=1) / np.sqrt((stds**2).mean(0))


def _position_fits(heavy=False, **params):
    net, X = _mixer(), _sequences(heavy=heavy)
    return [InteractionGraph.from_model(net, ["resid", "mid"], X, sequence=True,
                                        fast_path=False, random_state=seed, **params)
            for seed in range(N_SEEDS)]


@pytest.mark.parametrize("heavy", [False, True])
def test_strength_error_bars_match_the_spread_over_position_draws(heavy):
    """Position combinations grouped within the pass (8 groups of one combination)."""
    graphs = _position_fits(heavy=heavy, stochastic_positions=8)
    exact = InteractionGraph.from_model(_mixer(), ["resid", "mid"], _sequences(heavy=heavy),
                                        sequence=True, fast_path=False)
    Lambda = np.array([g.bases_[0].interaction_strengths_ for g in graphs])
    std = np.array([g.bases_[0].interaction_strengths_std_ for g in graphs])
    assert Lambda.shape == std.shape == (N_SEEDS, 3)  # the embedding's rank
    relative = std.mean(0) / Lambda.mean(0)
    assert (relative > 1e-3).all()  # the draws do move the strengths
    ratio = _ratio(Lambda, std)
    assert ((LOW < ratio) & (ratio < HIGH)).all(), ratio
    # Unbiased: the mean over seeds is the exact strength within its error.
    exact_Lambda = exact.bases_[0].interaction_strengths_
    assert (np.abs(Lambda.mean(0) - exact_Lambda)
            < 4 * Lambda.std(0, ddof=1) / np.sqrt(N_SEEDS) + 1e-12 * exact_Lambda).all()
    assert exact.bases_[0].interaction_strengths_std_ is None and exact.edges_std_ is None


def test_edge_error_bars_match_the_spread_over_position_draws():
    """PCA bases do not depend on the draws: only the edges pass is random."""
    graphs = _position_fits(basis="pca", final_layer="pca", stochastic_positions=8,
                            constant_node=True)
    E = np.array([g.edges_[0] for g in graphs])
    std = np.array([g.edges_std_[0] for g in graphs])
    assert std.shape == E.shape and (std >= 0).all()
    # The constant carried to itself is exact.
    assert (std[:, -1, :] == 0).all()
    moving = E.std(0, ddof=1) > 1e-3 * E.mean(0)
    assert moving.sum() >= 10
    ratio = _ratio(E[:, moving], std[:, moving])
    # Per entry the same four-sigma band; their median much tighter.
    assert ((LOW < ratio) & (ratio < HIGH)).mean() > 0.9, ratio
    assert 0.85 < np.median(ratio) < 1.2, ratio


class Net(nn.Module):
    """A small MLP whose layer-1 basis is fitted through random directions of layer 2."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))

    def forward(self, x):
        return self.body(x)


def _mlp_fits(k, seeds=range(N_SEEDS)):
    torch.manual_seed(0)
    net = Net().double()
    X = torch.randn(64, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return [InteractionGraph.from_model(net, ["body.0:input", "body.1", "body.2"], X,
                                        stochastic_sources=k, random_state=seed)
            for seed in seeds]


def test_strength_error_bars_match_the_spread_over_direction_draws():
    """Direction sources split into 8 groups run separately (the last layer's basis)."""
    graphs = _mlp_fits(16)
    Lambda = np.array([g.bases_[1].interaction_strengths_ for g in graphs])
    std = np.array([g.bases_[1].interaction_strengths_std_ for g in graphs])
    ratio = _ratio(Lambda, std)
    assert ((LOW < ratio) & (ratio < HIGH)).all(), ratio
    assert all(g.bases_[1].n_outputs_ == 16 for g in graphs)
    assert all(g.edges_std_ is None for g in graphs)  # edges use the exact C_{l+1}


def test_error_bars_shrink_like_one_over_the_square_root_of_the_sources():
    def mean_relative(k):
        graphs = _mlp_fits(k, seeds=range(6))
        # The 4 strongest directions: with few sources a weak one may fall below the
        # truncation threshold in some draws.
        return np.mean([g.bases_[1].interaction_strengths_std_[:4]
                        / g.bases_[1].interaction_strengths_[:4] for g in graphs])

    # Four times the sources, half the error (8 groups both times).
    assert 1.5 < mean_relative(8) / mean_relative(32) < 2.7


def test_exact_and_ungroupable_fits():
    net, X = _mixer(), _sequences(16)
    layers = ["resid", "mid"]
    exact = InteractionGraph.from_model(net, layers, X, sequence=True)
    assert exact.edges_std_ is None
    assert all(b.interaction_strengths_std_ is None for b in exact.bases_)
    # One combination per sample: no spread to measure, and it says so with NaN.
    one = InteractionGraph.from_model(net, layers, X, sequence=True, fast_path=False,
                                      stochastic_positions=1, random_state=0)
    assert np.isnan(one.bases_[0].interaction_strengths_std_).all()
    assert np.isnan(one.edges_std_[0]).all()
    # The final (unrotated) layer uses no Jacobians.
    assert one.bases_[1].interaction_strengths_std_ is None


def test_cached_jacobians_are_exact_over_positions():
    from sklearn_lib.collect import collect

    net, X = _mixer(), _sequences(16)
    acts, jacs = collect(net, ["resid", "mid"], X, sequence=True, verbose=False)
    graph = InteractionGraph(stochastic_positions=4, random_state=0).fit(
        acts, jacobians=jacs, sequence=True)
    assert (graph.bases_[0].interaction_strengths_std_ == 0).all()
    assert (graph.edges_std_[0] == 0).all()


# ------------------------------------------------------------------ the estimator itself
def test_grouped_std_is_the_standard_error_of_the_weighted_mean():
    """Against a brute-force simulation of per-source terms."""
    rng = np.random.default_rng(0)
    sizes = group_shares(10, 4)
    assert sizes == [3, 3, 2, 2]
    shares = np.array(sizes) / 10
    totals, reported = [], []
    for _ in range(4000):
        terms = rng.exponential(size=10)  # skewed per-source terms, mean 1, variance 1
        groups = np.split(terms, np.cumsum(sizes)[:-1])
        T_g = np.array([g.mean() for g in groups])
        totals.append(shares @ T_g)
        reported.append(grouped_std(T_g, shares) ** 2)
    # Var(mean of 10) = 1/10; the estimate is unbiased.
    assert abs(np.var(totals) - 0.1) < 0.01
    assert abs(np.mean(reported) - 0.1) < 0.01


def test_strength_std_is_the_delta_method_of_the_eigenvalues():
    """Against eigenvalues of perturbed moments (brute force, small noise)."""
    rng = np.random.default_rng(1)
    d = 4
    A = rng.normal(size=(d, d))
    M = A @ A.T + np.diag([4.0, 3.0, 2.0, 1.0])
    Lambda, V = np.linalg.eigh(M)
    Lambda, V = Lambda[::-1], V[:, ::-1]
    noise = [rng.normal(size=(d, d)) * 1e-4 for _ in range(8)]
    moments = np.array([M + (e + e.T) for e in noise])
    shares = np.full(8, 1 / 8)
    # Eigenvalues of every group's estimate: their weighted standard error.
    brute = grouped_std(np.array([np.linalg.eigvalsh(m)[::-1] for m in moments]), shares)
    # inverse_components_ rows are any multiple of the eigenvectors (here with
    # the whitening identity); the ratio does not depend on their scale.
    reported = interaction_strength_std(Lambda, (V * [1.0, 2.0, 3.0, 4.0]).T, moments, shares)
    np.testing.assert_allclose(reported, brute, rtol=1e-3)


def test_source_groups_refuse_products_that_are_not_source_major():
    groups = SourceGroups(3)
    with pytest.raises(ValueError, match="combination-major; got direction 6"):
        groups.add_scatter(torch.zeros(4, 2, 2), 3, 2)
    with pytest.raises(ValueError, match="combination-major; got direction 7"):
        groups.add_rows(torch.zeros(3, 2), 5, 2)


def test_source_groups_of_chunks_equal_the_groups_of_whole_products():
    """Directions q = j k + i streamed in chunks of any size land in group j % G, row i."""
    gen = torch.Generator().manual_seed(0)
    m, k, rows, d = 5, 3, 4, 2
    products = torch.randn(m * k, rows, d, generator=gen, dtype=torch.float64)
    squares = torch.rand(m * k, 6, generator=gen, dtype=torch.float64)
    whole = SourceGroups(m, n_groups=2)
    for j in range(m):  # by hand: combination j's scatter and rows in group j % 2
        P = products[j * k : (j + 1) * k].reshape(-1, d)
        whole._group_sums((d, d), P)[j % 2] += P.T @ P
    expected_rows = torch.zeros(2, k, 6, dtype=torch.float64)
    for q in range(m * k):
        expected_rows[(q // k) % 2, q % k] += squares[q]
    for step in (1, 2, 4, 15):
        scatter, by_row = SourceGroups(m, n_groups=2), SourceGroups(m, n_groups=2)
        for start in range(0, m * k, step):
            scatter.add_scatter(products[start : start + step], start, k)
            by_row.add_rows(squares[start : start + step], start, k)
        torch.testing.assert_close(scatter.sums, whole.sums)
        torch.testing.assert_close(by_row.sums, expected_rows)
