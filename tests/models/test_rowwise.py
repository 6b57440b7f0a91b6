"""Row-wise modules run on a selected layer's replaced positions only, with the same products.

A section from ``"resid[-1]"`` through a residual MLP applied in the parent's
``forward`` takes products whose backward pass covers the replaced position
only (:mod:`sklearn_lib.models._rowwise`). The products must be those of full
Jacobians of a plain forward (``torch.func.jacrev``), for selections of one or
several positions, in-place activations, modules called twice, and modules
that mix positions or compute something else than their class (left alone).
"""

import pytest
import torch
from torch import nn

from sklearn_lib.collect import section_vjp_products
from sklearn_lib.models import _model, _rowwise

B, T, D, H = 5, 4, 6, 8


class Residual(nn.Module):
    """``mid = pre + mix(pre)`` (causal), ``post = mid + mlp(mid)`` (``twice``: mlp twice)."""

    def __init__(self, mlp, twice=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mix = nn.Parameter(torch.randn(T, T, generator=g, dtype=torch.float64).tril() / T)
        self.hook_pre, self.hook_mid, self.hook_post = nn.Identity(), nn.Identity(), nn.Identity()
        self.mlp, self.twice = mlp, twice
        for p in self.mlp.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x):
        pre = self.hook_pre(x)
        mid = self.hook_mid(pre + torch.tanh(self.mix @ pre))
        out = self.mlp(mid)
        if self.twice:
            out = out + 0.5 * self.mlp(mid)
        return self.hook_post(mid + out)

    def plain(self, mid):
        out = self.mlp(mid)
        if self.twice:
            out = out + 0.5 * self.mlp(mid)
        return mid + out


class PositionMixer(nn.Module):
    """Acts on positions (axis 1): not row-wise."""

    def forward(self, h):
        return h + h.mean(1, keepdim=True) ** 2


def _mlp(inplace=False):
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(inplace=inplace), nn.Linear(H, D),
                         nn.Tanh()).double()


def _data():
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _expected(model, x, positions):
    """Full Jacobians of post[positions] by mid[positions], in the products' row layout."""
    with torch.no_grad():
        mid = x + torch.tanh(model.mix @ x)

    def f(selected, mid_x):
        full = mid_x.index_copy(0, torch.tensor(positions), selected)
        return model.plain(full[None])[0][positions]

    J = torch.func.vmap(torch.func.jacrev(f))(mid[:, positions], mid)  # (B, S, D, S, D)
    n_s = len(positions)
    return J.permute(0, 3, 1, 2, 4).reshape(B * n_s, n_s * D, D)


@pytest.mark.parametrize("positions,spec", [([3], "[-1]"), ([0, 2], "[0, 2]"), ([1, 2, 3], "[1:]")],
                         ids=["last", "two", "slice"])
@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "inplace-relu"])
@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_products_of_restricted_modules_are_full_jacobians(positions, spec, inplace, twice):
    model = Residual(_mlp(inplace), twice=twice)
    x = _data()
    _, P = section_vjp_products(model, f"hook_mid{spec}", f"hook_post{spec}", x, sequence=True)
    torch.testing.assert_close(P, _expected(model, x, positions), rtol=1e-12, atol=1e-12)


def test_the_backward_pass_covers_the_replaced_positions_only(monkeypatch):
    model = Residual(_mlp())
    a, _ = _model._parse_layers(model, ["hook_mid[-1]", "hook_post[-1]"], "output")
    assert model.mlp in _rowwise.rowwise_modules(model)
    with _rowwise.replaced_positions_only(model, a):
        replaced = _model.REPLACED.get()
        assert replaced == []
    assert _model.REPLACED.get() is None
    # The restriction's own forward of the replaced positions: (B, 1, D).
    seen = []
    original = nn.Sequential.forward

    def spy(self, h):
        seen.append(tuple(h.shape))
        return original(self, h)

    monkeypatch.setattr(nn.Sequential, "forward", spy)
    section_vjp_products(model, "hook_mid[-1]", "hook_post[-1]", _data(), sequence=True)
    assert (B, 1, D) in seen


@pytest.mark.parametrize("mlp", [
    lambda: nn.Sequential(nn.Linear(D, D), PositionMixer()).double(),
    lambda: _hooked(_mlp()),
], ids=["position-mixer", "hooked-linear"])
def test_modules_that_are_not_rowwise_run_whole(mlp):
    model = Residual(mlp())
    assert model.mlp not in _rowwise.rowwise_modules(model)
    x = _data()
    _, P = section_vjp_products(model, "hook_mid[-1]", "hook_post[-1]", x, sequence=True)
    torch.testing.assert_close(P, _expected(model, x, [3]), rtol=1e-12, atol=1e-12)


def _hooked(mlp):
    mlp[0].register_forward_hook(lambda m, args, out: out * 1.5)
    return mlp


def test_layers_without_positions_are_left_alone():
    model = Residual(_mlp())
    a, _ = _model._parse_layers(model, ["hook_mid", "hook_post"], "output")
    with _rowwise.replaced_positions_only(model, a):
        assert _model.REPLACED.get() is None
