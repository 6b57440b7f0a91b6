"""Tests for sklearn_lib.models._independence and ._overrides: what a model must be for SPEC.

The probe refuses models whose samples are coupled within a batch or whose values
change between runs (the hostile battery, ``test_hostile_fastpaths.py``, has one case
per way); here: what it accepts, what it costs, and the words it uses. The override
checks say which modules may compute something else than their class.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.utils.data import DataLoader, TensorDataset

from sklearn_lib import InteractionGraph
from sklearn_lib.collect import collect, section_vjp_products
from sklearn_lib.models import _independence, _model, _overrides
from sklearn_lib.utils._backend import eval_mode


def _x(n, *shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _net(inner=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), inner or nn.Identity(), nn.Tanh(),
                         nn.Linear(4, 2)).double()


LAYERS = [":input", "2", "3"]


class Counting(nn.Module):
    """Counts the samples each call sees (the probe's cost)."""

    def __init__(self):
        super().__init__()
        self.samples = []

    def forward(self, x):
        self.samples.append(x.shape[0])
        return x


# --------------------------------------------------------------------------- accepted
@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_small_and_odd_first_batches_are_accepted(batch_size):
    """One sample cannot be split (only the repeat runs), odd counts drop one sample."""
    X = _x(20, 3)
    loader = DataLoader(TensorDataset(X), batch_size=batch_size)
    graph = InteractionGraph(edge_point="data").fit_model(_net(), LAYERS, loader)
    ref = InteractionGraph(edge_point="data").fit_model(_net(), LAYERS, X)
    for E, E_ref in zip(graph.edges_, ref.edges_):
        np.testing.assert_allclose(E, E_ref, rtol=1e-10, atol=1e-12 * E_ref.max())


def test_probe_costs_five_forward_passes_over_at_most_64_samples():
    counting = Counting()
    model = _net(counting)
    x = _x(500, 3)
    specs = _model._parse_layers(model, LAYERS, "output")
    with eval_mode(model):
        _independence.check_independent(model, specs, x)
    assert counting.samples == [64, 64, 64, 32, 32]


def test_layers_with_several_rows_per_sample_are_accepted():
    """A layer flattening (batch, position) into rows keeps each sample's rows together."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(x.reshape(-1, 3))

    model = Flat().double()
    specs = _model._parse_layers(model, ["fc"], "output")
    _independence.check_independent(model, specs, _x(10, 5, 3))


def test_dict_batches_and_token_ids_are_probed():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Identity()

        def forward(self, input_ids, attention_mask):
            return self.out(self.emb(input_ids) * attention_mask[..., None])

    model = Embed().double()
    ids = torch.randint(0, 7, (12, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(12, 5, dtype=torch.long)
    specs = _model._parse_layers(model, ["emb:input", "out"], "output")
    _independence.check_independent(model, specs, {"input_ids": ids, "attention_mask": mask})

    class Mixing(Embed):
        def forward(self, input_ids, attention_mask):
            h = self.emb(input_ids)
            return self.out(h - h.mean(0))

    model = Mixing().double()
    specs = _model._parse_layers(model, ["emb:input", "out"], "output")
    with pytest.raises(ValueError, match="layer 'out' of a sample depends on the other"):
        _independence.check_independent(model, specs, {"input_ids": ids,
                                                       "attention_mask": mask})


# --------------------------------------------------------------------------- refused
def test_messages_name_the_module_and_the_fix():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.GRU(3, 4), nn.Identity()

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    with pytest.raises(ValueError, match=r"layer 'out' of a sample depends on the other "
                                         r"samples.*module 'rnn' \(GRU\) has batch_first=False"
                                         r".*batch_first=True"):
        InteractionGraph().fit_model(Recurrent().double(), [":input", "out"], _x(30, 6, 3),
                                     sequence=True)
    model = _net(nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\) normalises with the "
                                         r"statistics of each batch.*track_running_stats=True"):
        InteractionGraph().fit_model(model, LAYERS, _x(30, 3))
    model = _net(Lambda(lambda h: h + 0.01 * torch.rand_like(h)))
    with pytest.raises(ValueError, match=r"not deterministic: layer '2' differs between two "
                                         r"runs.*training=self.training"):
        InteractionGraph().fit_model(model, LAYERS, _x(30, 3))


def test_section_vjp_products_and_collect_probe_their_batch():
    model = _net(Lambda(lambda h: h - h.mean(0)))
    with pytest.raises(ValueError, match="depends on the other samples of its batch"):
        section_vjp_products(model, "0", "3", _x(8, 3))
    with pytest.raises(ValueError, match="depends on the other samples of its batch"):
        collect(model, LAYERS, _x(8, 3), verbose=False)


def test_a_section_that_fails_on_one_sample_is_explained(monkeypatch):
    """The single-sample differentiability probe wraps the model's own error."""
    monkeypatch.setattr(_independence, "check_independent", lambda *args: None)
    from sklearn_lib.models import _vjp

    monkeypatch.setattr(_vjp, "check_independent", lambda *args: None)
    model = _net(nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"fails on a batch of one sample \(ValueError: "
                                         r"Expected more than 1 value.*independent samples"):
        section_vjp_products(model, "0", "3", _x(8, 3))


class Drifting(nn.Module):
    """Deterministic for its first calls (the probe), then not."""

    def __init__(self, after):
        super().__init__()
        self.calls, self.after = 0, after

    def forward(self, x):
        self.calls += 1
        return x * (1.5 if self.calls > self.after else 1.0)


def test_values_that_change_between_passes_are_refused():
    """Every pass compares each recorded layer with its first pass.

    Calls of the module: 1 (the inputs check), 5 (the probe), 1 (the shapes), then 4 per
    pass that records layer '2': the change comes in the middle of the first such pass
    (its statistics), which the edges' pass then disagrees with.
    """
    model = _net(Drifting(after=13))
    with pytest.raises(ValueError, match=r"not deterministic: pass \d+ over the data .* saw "
                                         r"as many samples .* but other values: the sum of "
                                         r"the values of layer '2'"):
        InteractionGraph(batch_size=10, fast_path=False).fit_model(model, LAYERS, _x(40, 3))


# --------------------------------------------------------------------------- overrides
def test_overrides_are_named():
    lin = nn.Linear(3, 3)
    assert _overrides.override(lin) is None and _overrides.is_linear(lin)
    lin.forward = lambda x: x
    assert _overrides.override(lin) == "an instance-level forward"
    hooked = nn.Linear(3, 3)
    hooked.register_forward_hook(lambda *args: None)
    assert _overrides.override(hooked) == "a forward hook"
    pruned = nn.Linear(3, 3)
    prune.random_unstructured(pruned, "weight", 0.5)
    assert _overrides.override(pruned).startswith("a forward pre-hook")
    assert not _overrides.is_linear(pruned)


def test_a_parametrized_linear_computes_its_class_formula():
    lin = nn.Linear(3, 3)
    torch.nn.utils.parametrizations.weight_norm(lin)
    assert _overrides.is_linear(lin)

    class Masked(nn.Module):
        def forward(self, W):
            return W.tril()

    other = nn.Linear(3, 3)
    parametrize.register_parametrization(other, "weight", Masked())
    assert _overrides.is_linear(other)
    other.forward = lambda x: x
    assert not _overrides.is_linear(other)


def test_a_sequential_with_its_own_forward_is_not_plain():
    seq = nn.Sequential(nn.Linear(3, 3))
    assert _overrides.is_plain_sequential(seq)
    seq.forward = lambda x: 2 * x
    assert not _overrides.is_plain_sequential(seq)
