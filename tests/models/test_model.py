"""Tests for sklearn_lib.models._model: models that reject their inputs, layers without features.

The checks live in _model.py and serve every function that runs a live model;
these tests go through the public entry points of sklearn_lib.collect.
"""

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_lib.collect import collect, record_activations, section_vjp_products
from sklearn_lib.models import _model

N, D = 12, 3


@pytest.fixture
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 2))


RUNNERS = {
    "record_activations": lambda net, X: record_activations(net, ["1"], X, verbose=False),
    "collect": lambda net, X: collect(net, [":input", "1", "2"], X, verbose=False),
    "section_vjp_products": lambda net, X: section_vjp_products(net, "0", "2", X),
}


@pytest.mark.parametrize("run", list(RUNNERS.values()), ids=list(RUNNERS))
@pytest.mark.parametrize("width", [D - 1, D + 2])
def test_inputs_of_the_wrong_width_are_reported_with_their_shape(net, run, width):
    X = np.zeros((N, width))
    with pytest.raises(ValueError, match=rf"model rejected its inputs.*\(2, {width}\)") as info:
        run(net, X)
    # The model's own error stays attached for whoever needs the details.
    assert isinstance(info.value.__cause__, RuntimeError)


def test_our_own_errors_are_not_blamed_on_the_inputs(net):
    """A module used twice is our refusal, raised from a hook: it keeps its message."""
    shared = nn.Tanh()
    twice = nn.Sequential(nn.Linear(D, 4), shared, nn.Linear(4, 4), shared)
    with pytest.raises(RuntimeError, match="ran more than once"):
        record_activations(twice, ["1"], np.zeros((N, D)), verbose=False)


class Empty(nn.Module):
    def forward(self, x):
        return x[..., :0]


@pytest.mark.parametrize("sequence", [False, True])
def test_a_zero_width_layer_is_refused_by_name(sequence):
    net = nn.Sequential(nn.Linear(D, 4), Empty(), nn.Linear(0, 2))
    X = np.zeros((N, 5, D) if sequence else (N, D))
    with pytest.raises(ValueError, match=r"layer '1' has per-sample shape \((5, 0|0,)\)"):
        collect(net, [":input", "1", "2"], X, verbose=False, sequence=sequence)


# --------------------------------------------------------------------------- chosen positions
def test_layer_names_select_positions():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
    parsed = [_model._parse_layers(net, [spec], "output")[0]
              for spec in ["0[-1]", "1:input[0, 2]", "1[1:]", "1:output[::2]"]]
    assert [(p.name, p.kind) for p in parsed] == [
        ("0", "output"), ("1", "input"), ("1", "output"), ("1", "output")]
    assert parsed[0].positions == (-1,) and parsed[1].positions == (0, 2)
    assert parsed[2].positions == slice(1, None) and parsed[3].positions == slice(None, None, 2)
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        acts = _model._record_batch(net, [parsed[0], parsed[1]], x)
        h = net[0](x)
    torch.testing.assert_close(acts["0[-1]"], h[:, -1:])
    torch.testing.assert_close(acts["1:input[0, 2]"], h[:, [0, 2]])


@pytest.mark.parametrize("spec, match", [
    ("0[a]", "distinct integers"), ("0[1, 1]", "distinct integers"), ("0[1:2:3:4]", "slice"),
    ("nope[-1]", "unknown layer"),
])
def test_bad_position_selections_are_refused(spec, match):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match=match):
        _model._parse_layers(net, [spec], "output")


@pytest.mark.parametrize("spec, shape", [("0[5]", (2, 5, 3)), ("0[-1]", (2, 3)),
                                         ("0[3:3]", (2, 5, 3)), ("0[0, -5]", (2, 5, 3))])
def test_selections_outside_the_activation_are_refused(spec, shape):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4))
    layer = _model._parse_layers(net, [spec], "output")
    with pytest.raises(ValueError, match=r"select"), torch.no_grad():
        _model._record_batch(net, layer, torch.randn(*shape))
