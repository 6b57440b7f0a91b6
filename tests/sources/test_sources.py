"""Tests for sklearn_lib.sources._cached: what InteractionGraph.fit_model accepts as data.

fit_model passes over the data once per statistic (twice per layer, plus the
final layer), so every pass must see the same samples; these tests feed it data
that change, run dry or are empty, and models that reject the data.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sklearn_lib import InteractionGraph

N, D = 40, 3
LAYERS = [":input", "1", "2"]
# fit_model on LAYERS passes over the data 5 times: statistics of layers 2, 1, 0,
# then edges 0 and 1.
N_PASSES = 5


@pytest.fixture
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 2)).double()


@pytest.fixture
def X():
    return torch.as_tensor(np.random.default_rng(0).normal(size=(N, D)))


def fit(net, data, **params):
    return InteractionGraph(verbose=False, **params).fit_model(net, LAYERS, data)


class Passes:
    """Re-iterable batches of ``X``, changed by ``change(X)`` from the ``start``-th full pass.

    Calls of ``__iter__`` that fit_model makes before its passes (its checks and
    its shape probe) are not counted as passes: they read the first batch only.
    """

    def __init__(self, X, change=None, start=None, batch_size=10):
        self.X, self.change, self.start, self.batch_size = X, change, start, batch_size
        self.full_passes = 0

    def __iter__(self):
        X = self.X
        if self.change is not None and self.full_passes + 1 >= self.start:
            X = self.change(X)
        for i in range(0, len(X), self.batch_size):
            yield X[i : i + self.batch_size]
        self.full_passes += 1


class ExhaustedAfterOnePass:
    """An iterable whose ``__iter__`` hands out one and the same iterator."""

    def __init__(self, X):
        self.batches = iter(X.split(10))

    def __iter__(self):
        return self.batches


CHANGES = {
    "fewer samples": lambda X: X[:-5],
    "more samples": lambda X: torch.cat([X, X[:3]]),
    "one value changed": lambda X: torch.cat([X[:1] + 1e-6, X[1:]]),
    "features swapped": lambda X: X[:, [1, 0, 2]],
    "other samples": lambda X: X + 1,
}


@pytest.mark.parametrize("start", [2, N_PASSES])
@pytest.mark.parametrize("change", list(CHANGES.values()), ids=list(CHANGES))
def test_data_that_change_between_passes_are_refused(net, X, change, start):
    data = Passes(X, change, start)
    with pytest.raises(ValueError, match=rf"changed between passes: pass {start} over the data"):
        fit(net, data)


def test_data_that_run_dry_after_one_pass_are_refused(net, X):
    with pytest.raises(ValueError, match="pass 2 over the data .* saw 0 samples.*only once"):
        fit(net, ExhaustedAfterOnePass(X))


def test_data_that_run_dry_before_the_first_pass_are_refused(net, X):
    # The shape probe reads the only batch; the first pass then sees nothing.
    with pytest.raises(ValueError, match="pass 1 .* yielded no samples.*exhausted"):
        fit(net, ExhaustedAfterOnePass(X[:10]))


# The fixtures are only read, so sharing them between examples is safe.
@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), batch_size=st.integers(1, N))
def test_reshuffled_and_rebatched_passes_fit_the_same_graph(net, X, seed, batch_size):
    """Order and batching are free: the statistics are sums over samples."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = Passes(X, lambda X: X[torch.randperm(N, generator=generator)], start=1,
                      batch_size=batch_size)
    expected = fit(net, X)
    graph = fit(net, shuffled)
    assert graph.n_samples_seen_ == N
    for E, E_ref in zip(graph.edges_, expected.edges_):
        np.testing.assert_allclose(E, E_ref, rtol=1e-9, atol=1e-12 * E_ref.max())


def test_a_shuffling_dataloader_is_accepted_and_drop_last_refused(net, X):
    loader = DataLoader(TensorDataset(X), batch_size=8, shuffle=True)
    assert fit(net, loader).n_samples_seen_ == N
    dropping = DataLoader(TensorDataset(X), batch_size=16, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="changed between passes.*drop_last"):
        fit(net, dropping)


@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("as_loader", [False, True])
def test_fewer_than_two_samples_are_refused(net, X, n, as_loader):
    data = DataLoader(TensorDataset(X[:n]), batch_size=4) if as_loader else X[:n]
    with pytest.raises(ValueError, match=f"fit_model needs at least 2 samples, got {n}"):
        fit(net, data)


def test_inputs_of_the_wrong_width_are_reported_with_their_shape(net):
    wrong = torch.zeros(N, D + 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"model rejected its inputs.*shape \(2, 5\)") as info:
        fit(net, wrong)
    assert isinstance(info.value.__cause__, RuntimeError)


class Empty(nn.Module):
    def forward(self, x):
        return x[:, :0]


def test_a_zero_width_layer_is_refused_by_name(X):
    net = nn.Sequential(nn.Linear(D, 4), Empty(), nn.Linear(0, 2)).double()
    with pytest.raises(ValueError, match=r"layer '1' has per-sample shape \(0,\)"):
        fit(net, X)


def test_nan_in_the_data_is_refused_as_such(net, X):
    X = X.clone()
    X[7, 1] = float("nan")
    with pytest.raises(ValueError, match="the data contain NaN or infinity"):
        fit(net, X)


class Reciprocal(nn.Module):
    def forward(self, x):
        return 1 / x


def test_a_layer_that_overflows_is_named(X):
    X = X.clone()
    X[3, 0] = 0.0
    net = nn.Sequential(Reciprocal(), nn.Linear(D, 2)).double()
    with pytest.raises(ValueError, match="layer '0' is NaN or infinite for finite inputs"):
        InteractionGraph(verbose=False).fit_model(net, [":input", "0"], X)


# --------------------------------------------------------------------------- cached source
@pytest.fixture
def cached(rng):
    n = 30
    X = [rng.normal(size=(n, 3)), rng.normal(size=(n, 4)), rng.normal(size=(n, 2))]
    J = [rng.normal(size=(n, 4, 3)), rng.normal(size=(n, 2, 4))]
    return X, J


@pytest.mark.parametrize("array, layer, value, match",
                         [("X", 1, np.nan, r"X\[1\] or jacobians\[1\], rows 0\.\.9: X contains"),
                          ("X", 0, np.inf, r"X\[0\] or jacobians\[0\], rows 0\.\.9: X contains"),
                          ("J", 0, np.nan, r"X\[0\] or jacobians\[0\], rows 0\.\.9: jacobians")])
def test_non_finite_cached_values_are_located(cached, array, layer, value, match):
    X, J = ([a.copy() for a in arrays] for arrays in cached)
    (X if array == "X" else J)[layer][7, 1] = value
    with pytest.raises(ValueError, match=match):
        InteractionGraph(verbose=False, batch_size=10).fit(X, jacobians=J)


def test_cached_layers_without_features_or_numbers_are_refused(cached):
    X, J = cached
    empty = [X[0], X[1][:, :0], X[2]]
    with pytest.raises(ValueError, match=r"X\[1\] has shape \(30, 0\): .*at least one feature"):
        InteractionGraph(verbose=False).fit(empty, jacobians=[J[0][:, :0], J[1][:, :, :0]])
    words = [X[0], np.full((30, 4), "a"), X[2]]
    with pytest.raises(ValueError, match=r"X\[1\] must hold real numbers, got dtype <U1"):
        InteractionGraph(verbose=False).fit(words, jacobians=J)
    complex_J = [J[0] * 1j, J[1]]
    with pytest.raises(ValueError, match=r"jacobians\[0\] must hold real numbers"):
        InteractionGraph(verbose=False).fit(X, jacobians=complex_J)


# ----------------------------------------------------------------- sections run alone
def _generic_graph(net, X, layers, **params):
    return InteractionGraph(verbose=False, fast_path=False, truncation_threshold=1e-12,
                            **params).fit_model(net, layers, X)


@pytest.mark.parametrize("integration", [None, "gauss-legendre"])
@pytest.mark.parametrize("vectors_per_chunk", [None, 3])
def test_sections_run_from_the_recorded_activation_give_the_same_graph(
    X, monkeypatch, integration, vectors_per_chunk
):
    """Products of a section's modules alone equal those of the model run from its input.

    Either way the products come vector-major, in one chunk or in several.
    """
    from sklearn_lib.models import _vjp
    from sklearn_lib.sources import _model_source, _section_forms

    if vectors_per_chunk:
        monkeypatch.setattr(_vjp, "_VJP_ELEMENT_BUDGET", vectors_per_chunk * N * 10)

    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Linear(D, 5), nn.LayerNorm(5), nn.ReLU(inplace=True),
        nn.Sequential(nn.Linear(5, 4), nn.Tanh()), nn.Linear(4, 2),
    ).double()
    layers = [":input", "2", "3", "4"]
    params = {"integration": integration}
    if integration:
        params["n_alphas"] = 3
    source = _model_source.ModelSource(net, layers, X, sequence=False, batch_size=None,
                                  device=None, dtype="float64", fast_path=False,
                                  verbose=False)
    assert [len(source.leaves(l, l + 1)) for l in range(3)] == [3, 2, 1]
    fast = _generic_graph(net, X, layers, **params)
    monkeypatch.setattr(_section_forms, "section_leaves", lambda *args: None)
    slow = _generic_graph(net, X, layers, **params)
    for a, b in zip([*fast.edges_, *[b.components_ for b in fast.bases_]],
                    [*slow.edges_, *[b.components_ for b in slow.bases_]]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * np.abs(b).max())


def test_hooked_or_unstructured_sections_run_the_whole_model(net):
    """A hook inside the section, or a section outside a Sequential, is not run alone."""
    from sklearn_lib.models import _fastpath, _model

    a, b = _model._parse_layers(net, [":input", "2"], "output")
    assert len(_fastpath.section_leaves(net, a, b)) == 3
    handle = net[1].register_forward_hook(lambda *args: None)
    try:
        assert _fastpath.section_leaves(net, a, b) is None
    finally:
        handle.remove()

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(D, D)

        def forward(self, x):
            return x + self.f(x)

    model = Residual()
    a, b = _model._parse_layers(model, ["f:input", ""], "output")
    assert _fastpath.section_leaves(model, a, b) is None


class _MixPositions(nn.Module):
    """Adds the mean over positions: a section through it reads every position."""

    def forward(self, x):
        return x + x.mean(1, keepdim=True)


def test_sections_between_chosen_positions_run_the_whole_model():
    """A layer restricted to chosen positions records only those: its section cannot
    start from the recording, since the section reads the other positions too."""
    from sklearn_lib.models import _fastpath, _model

    torch.manual_seed(2)
    modules = [nn.Linear(3, 4), _MixPositions(), nn.Tanh(), nn.Linear(4, 4)]
    net = nn.Sequential(*modules).double()

    class Unrolled(nn.Module):  # the same network, never run section by section
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(modules)

        def forward(self, x):
            for module in self.layers:
                x = module(x)
            return x

    layers = ["0[-1]", "2[-1]", "3[-1]"]
    a, b = _model._parse_layers(net, layers[:2], "output")
    assert _fastpath.section_leaves(net, a, b) is None
    X = torch.randn(12, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = dict(verbose=False, fast_path=False, truncation_threshold=1e-12)
    seq = InteractionGraph(**params).fit_model(net, layers, X, sequence=True)
    unrolled = InteractionGraph(**params).fit_model(
        Unrolled().double(), [f"layers.{name}" for name in layers], X, sequence=True
    )
    for E, E_ref in zip(seq.edges_, unrolled.edges_):
        np.testing.assert_allclose(E, E_ref, rtol=1e-10, atol=1e-12 * np.abs(E_ref).max())


def test_arrays_copied_for_their_layout_are_named_once(net, X):
    """A non-row-major cache warns once, naming the arrays, and fits the same graph."""
    import warnings

    from sklearn_lib.collect import collect

    acts, jacs = collect(net, LAYERS, X, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = InteractionGraph(verbose=False, batch_size=7).fit(acts, jacobians=jacs)
    jacs_f = [np.asfortranarray(J) for J in jacs]
    acts_t = [torch.as_tensor(a).T.contiguous().T for a in acts]
    with pytest.warns(UserWarning) as record:
        graph = InteractionGraph(verbose=False, batch_size=7).fit(acts_t, jacobians=jacs_f)
    messages = [str(w.message) for w in record if "row-major" in str(w.message)]
    assert len(messages) == 1
    assert "X[0], X[1], X[2], jacobians[0], jacobians[1] are not row-major" in messages[0]
    for a, b in zip(graph.edges_, ref.edges_):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14 * np.abs(b).max())
