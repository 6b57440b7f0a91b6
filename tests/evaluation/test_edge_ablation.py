"""Tests for sklearn_lib.evaluation._edge_ablation: the row-wise edge ablation against the straightforward
computation (one section run per output direction and mask), its reuse of work, and the
fewest-edges search on monotone and non-monotone curves."""

import math

import numpy as np
import pytest
import torch
from _attention import TinyAttention
from hypothesis import given
from hypothesis import strategies as st
from sklearn.decomposition import PCA
from torch import nn

from sklearn_lib.evaluation import (
    directions_to_keep,
    edge_ablated_outputs,
    edge_ablation_curve,
    min_edges_to_keep,
)
from sklearn_lib.evaluation._ablation import _fewest_passing
from sklearn_lib.evaluation._edge_ablation import _EdgeAblation

N, D_IN, D_OUT = 40, 4, 5


class Counting(nn.Module):
    """A section that counts the samples it is run on."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.samples = inner, 0

    def forward(self, x):
        self.samples += x.shape[0]
        return self.inner(x)


@pytest.fixture(params=["rows", "sequence"])
def pair(request):
    """A layer pair of row activations (tanh MLP) or of sequences across attention."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    if request.param == "rows":
        X = torch.randn(N, D_IN, generator=g, dtype=torch.float64) + 0.3
        section = nn.Sequential(nn.Linear(D_IN, D_OUT), nn.Tanh()).double()
        forward = nn.Linear(D_OUT, 3).double()
    else:
        model = TinyAttention().double().eval()
        X = model.embed(torch.randn(N, 3, 3, generator=g, dtype=torch.float64)).detach()
        section = model.mix
        forward = lambda h: model.head(torch.tanh(h[:, -1]))  # noqa: E731
    with torch.no_grad():
        H = section(X)
    # Truncated PCA bases, so projections matter and the bases are not square.
    flat = lambda a: a.reshape(-1, a.shape[-1]).numpy()  # noqa: E731
    basis_in = PCA(X.shape[-1] - 1).fit(flat(X))
    basis_out = PCA(H.shape[-1] - 1).fit(flat(H))
    return dict(basis_in=basis_in, basis_out=basis_out, X=X, section=Counting(section),
                forward=forward)


def straightforward(basis_in, basis_out, X, mask, section, forward):
    """One section run per output direction on its masked input, then the forward."""
    C_in, P_in, mu_in = (torch.as_tensor(a) for a in (
        basis_in.components_.T, basis_in.components_, basis_in.mean_))
    C_out, P_out, mu_out = (torch.as_tensor(a) for a in (
        basis_out.components_.T, basis_out.components_, basis_out.mean_))
    z_in = (X - mu_in) @ C_in
    with torch.no_grad():
        columns = [((section((z_in * torch.as_tensor(row)) @ P_in + mu_in) - mu_out) @ C_out)[..., i]
                   for i, row in enumerate(mask)]
        return forward(torch.stack(columns, -1) @ P_out + mu_out)


def masks(shape, seed):
    """Random 0/1 masks, one with repeated and empty rows, all and none."""
    rng = np.random.default_rng(seed)
    random = (rng.random(shape) < 0.5).astype(float)
    repeated = np.tile(random[:1], (shape[0], 1))
    repeated[::2] = 0
    scaled = rng.random(shape)  # other values scale an edge
    return [random, repeated, scaled, np.ones(shape), np.zeros(shape)]


@pytest.mark.parametrize("batch_size", [None, 7])
def test_outputs_match_the_straightforward_computation(pair, batch_size):
    ablation = _EdgeAblation(pair["basis_in"], pair["basis_out"], pair["X"],
                             section=pair["section"], forward=pair["forward"],
                             batch_size=batch_size)
    for mask in masks(ablation.shape, 0) * 2:  # the second round reads stored columns only
        expected = straightforward(pair["basis_in"], pair["basis_out"], pair["X"], mask,
                                   pair["section"].inner, pair["forward"])
        torch.testing.assert_close(ablation.outputs(mask), expected, rtol=1e-10, atol=1e-10)
    # The public function gives the same, one call per mask.
    got = edge_ablated_outputs(pair["basis_in"], pair["basis_out"], pair["X"].numpy(),
                               masks(ablation.shape, 0)[0], section=pair["section"],
                               forward=lambda h: pair["forward"](torch.as_tensor(h)))
    np.testing.assert_allclose(got, straightforward(
        pair["basis_in"], pair["basis_out"], pair["X"], masks(ablation.shape, 0)[0],
        pair["section"].inner, pair["forward"]).numpy(), rtol=1e-10, atol=1e-10)


def test_each_distinct_row_runs_the_section_once(pair):
    """The section runs on all samples once per new (direction, row); an empty row runs on
    one sample; rows shared by several directions run once; retain forgets the rest."""
    section = pair["section"]
    ablation = _EdgeAblation(pair["basis_in"], pair["basis_out"], pair["X"], section=section,
                             forward=pair["forward"], batch_size=None)
    r_out, r_in = ablation.shape

    def samples_run(mask):
        before = section.samples
        ablation.outputs(mask)
        return section.samples - before

    assert samples_run(np.zeros((r_out, r_in))) == 1
    assert samples_run(np.ones((r_out, r_in))) == N  # r_out outputs, one distinct row
    mask = np.eye(r_out, r_in)
    mask[r_in:] = 0  # empty rows, if any, are stored already
    assert samples_run(mask) == N * min(r_out, r_in)
    assert samples_run(mask) == 0
    changed = mask.copy()
    changed[0, -1] = 1
    assert samples_run(changed) == N
    ablation.retain([changed])
    assert samples_run(changed) == 0
    assert samples_run(mask) == N  # row 0 of mask was forgotten, the others kept


def test_top_k_curve_and_search_reuse_rows(pair):
    """A curve over consecutive counts runs one new row per count."""
    section = pair["section"]
    r_out, r_in = pair["basis_out"].n_components_, pair["basis_in"].n_components_
    E = np.random.default_rng(1).random((r_out, r_in))
    kwargs = dict(section=section, forward=pair["forward"], edges=E, score="mse")
    edge_ablation_curve(pair["basis_in"], pair["basis_out"], pair["X"], schedule=[1], **kwargs)
    # Probe, reference, the empty rows (one sample) and the one row of count 1.
    first, section.samples = section.samples, 0
    counts = range(1, r_out * r_in + 1)
    curve = edge_ablation_curve(pair["basis_in"], pair["basis_out"], pair["X"],
                                schedule=counts, **kwargs)
    # Every later count changes one row, which runs on all samples.
    assert section.samples == first + N * (len(counts) - 1)
    expected = []
    for k in counts:
        mask = np.zeros(E.size)
        mask[np.argsort(-E.ravel(), kind="stable")[:k]] = 1
        outputs = straightforward(pair["basis_in"], pair["basis_out"], pair["X"],
                                  mask.reshape(E.shape), section.inner, pair["forward"])
        with torch.no_grad():
            reference = pair["forward"](section.inner(pair["X"]))
        expected.append(float(((outputs - reference) ** 2).mean()))
    np.testing.assert_allclose(curve.score, expected, rtol=1e-9, atol=1e-20)


def reference_search(passes, high):
    """The documented rule, written out: doubling from 1, then bisection."""
    if passes(1):
        return 1
    low = 1
    while 2 * low < high and not passes(2 * low):
        low *= 2
    high = min(2 * low, high)
    while high - low > 1:
        mid = (low + high) // 2
        high, low = (mid, low) if passes(mid) else (high, mid)
    return high


@pytest.mark.parametrize("share", [0.01, 0.1, 0.3, 0.7])
def test_search_counts_match_a_brute_force_scan(pair, share):
    """On a small case: the straightforward scores of every count, the smallest passing
    count on that scan and the documented search on those scores agree with the library."""
    section, X = pair["section"], pair["X"]
    r_out, r_in = pair["basis_out"].n_components_, pair["basis_in"].n_components_
    E = np.random.default_rng(2).random((r_out, r_in)) ** 4
    order = np.argsort(-E.ravel(), kind="stable")
    with torch.no_grad():
        reference = pair["forward"](section.inner(X))
    scores = {}
    for k in range(1, E.size + 1):
        mask = np.zeros(E.size)
        mask[order[:k]] = 1
        outputs = straightforward(pair["basis_in"], pair["basis_out"], X,
                                  mask.reshape(E.shape), section.inner, pair["forward"])
        scores[k] = float(((outputs - reference) ** 2).mean())
    # The bases are truncated: tolerate all edges and a share of the loss of the others.
    tolerance = scores[E.size] + share * (scores[1] - scores[E.size])
    result = min_edges_to_keep(pair["basis_in"], pair["basis_out"], X, section=section,
                               forward=pair["forward"], edges=E, score="mse",
                               tolerance=tolerance)
    assert result.n_edges == reference_search(lambda k: scores[k] <= tolerance, E.size)
    for k, score in result.evaluations.items():
        assert score == pytest.approx(scores[k], rel=1e-9, abs=1e-20)
    passing = [k for k in scores if scores[k] <= tolerance]
    if all(k in passing for k in range(min(passing), E.size + 1)):  # monotone here
        assert result.n_edges == min(passing)


# --------------------------------------------------------------------------- non-monotone
D = 8
# Score per number of top directions kept: passes (1) at 3, fails at 4 and 5, passes from 6
# on, the shape of "passes at 77, fails at 78-79, passes at 80".
TABLE = np.array([0, 0, 0, 1, 0, 0, 1, 1, 1], dtype=float)


@pytest.fixture
def non_monotone():
    """Identity section and forward on a PCA basis with diagonal edges: keeping the top k
    edges (k <= D) keeps directions 0..k-1, and the score reads how many are kept."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, D)) * np.linspace(2, 1, D)
    pca = PCA().fit(X)
    edges = np.diag(np.linspace(2, 1, D))  # off-diagonal edges rank last and change nothing

    def score(outputs, y, reference):
        kept = int((np.abs(pca.transform(outputs)).max(0) > 1e-9).sum())
        return TABLE[kept]

    return dict(basis_in=pca, basis_out=pca, X=X, section=nn.Identity(),
                forward=nn.Identity(), edges=edges, score=score)


def test_non_monotone_curve_reports_the_documented_boundary(non_monotone):
    curve = edge_ablation_curve(**non_monotone, schedule=range(1, D * D + 1))
    assert curve.score.tolist()[:D] == TABLE[1:].tolist()
    assert directions_to_keep(curve, 0.5) == 3  # the smallest passing count
    result = min_edges_to_keep(**non_monotone, tolerance=0.5)
    # All 64 pass; 1, 2 and 4 fail; 8 passes; bisection: 6 passes, 5 fails.
    assert list(result.evaluations) == [64, 1, 2, 4, 8, 6, 5]
    assert result.n_edges == 6 == reference_search(
        lambda k: curve.score.iloc[k - 1] >= 0.5, D * D)
    assert result.score == 1.0
    # As documented: counts evaluated below fail, above pass, and the scan up to the
    # reported count finds the smallest passing one.
    scan = edge_ablation_curve(**non_monotone, schedule=range(1, result.n_edges + 1))
    assert directions_to_keep(scan, 0.5) == 3


@pytest.mark.parametrize("n_edges", [1, 2, 5, 64, 1000, 4097])
def test_search_stays_within_the_documented_number_of_evaluations(n_edges):
    for answer in {1, min(2, n_edges), n_edges // 3 + 1, max(1, n_edges - 1), n_edges}:
        evaluated = []
        k = _fewest_passing(lambda k: evaluated.append(k) or k >= answer, n_edges,
                            lambda low, high: None)
        assert k == answer
        assert len(evaluated) + 1 <= 1 + 2 * math.ceil(math.log2(max(n_edges, 2)))


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_search_reports_a_boundary_consistent_with_every_evaluation(outcomes):
    """Any pass/fail curve whose last count passes: the result passes, the count below it
    fails, every evaluated count below fails and every one above passes; on a monotone
    curve it is the smallest passing count."""
    outcomes[-1] = True
    high = len(outcomes)
    evaluated = {}

    def passes(k):
        assert 1 <= k <= high and k not in evaluated
        evaluated[k] = outcomes[k - 1]
        return evaluated[k]

    k = _fewest_passing(passes, high, lambda low, up: None)
    assert outcomes[k - 1] and (k == 1 or not outcomes[k - 2])
    assert all(passed == (count >= k) for count, passed in evaluated.items())
    assert len(evaluated) <= 2 * math.ceil(math.log2(max(high, 2)))
    monotone = sorted(outcomes) == outcomes
    if monotone:
        assert k == outcomes.index(True) + 1
