"""Products computed in tiles of directions: the same products as one backward pass.

On the CPU :class:`~sklearn_lib.models._vjp.SectionProducts` computes every
chunk in vectorised backward passes of ``tile`` directions (cache-sized).
Tiles that divide neither the chunk nor the output positions, with several
points along a path and with random position signs, must give the products
of full Jacobians (``torch.func.jacrev`` of a plain forward), whatever the tile.
"""

import pytest
import torch

from sklearn_lib.models import _model, _vjp
from sklearn_lib.models._vjp import SectionProducts

B, T, D_IN, D_OUT = 4, 3, 5, 6


class Mixer(torch.nn.Module):
    """Positions mixed causally, then a nonlinearity: every position's Jacobian differs."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inner = torch.nn.Identity()
        self.W = torch.nn.Parameter(torch.randn(D_IN, D_OUT, generator=g, dtype=torch.float64))
        self.mix = torch.nn.Parameter(torch.randn(T, T, generator=g, dtype=torch.float64).tril())
        self.out = torch.nn.Identity()

    def forward(self, x):
        h = self.inner(x)
        return self.out(torch.tanh(self.mix @ (h @ self.W)))


def _plain(model, h):
    return torch.tanh(model.mix @ (h @ model.W))


@pytest.fixture
def setup():
    model = Mixer()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D_IN, generator=g, dtype=torch.float64)
    a, b = _model._parse_layers(model, ["inner", "out"], "output")
    V = torch.randn(D_OUT, 4, generator=g, dtype=torch.float64)
    return model, x, a, b, V


def _products(model, x, a, b, V, tile_elements, max_vectors, **kwargs):
    old = _vjp._CPU_TILE_ELEMENTS
    _vjp._CPU_TILE_ELEMENTS = tile_elements
    try:
        products = SectionProducts(model, a, b, x, kwargs.pop("points", [x]), V,
                                   sequence=True, check=True, **kwargs)
        chunks = [chunk for _, chunk in products.chunks(max_vectors)]
    finally:
        _vjp._CPU_TILE_ELEMENTS = old
    return products, torch.cat(chunks)


def _expected(model, point, V):
    """``V^T J_x`` by full Jacobians: (P_out * k, B * P_in, d_in), direction t * k + c."""
    J = torch.func.vmap(torch.func.jacrev(lambda h: _plain(model, h)))(point)
    # J: (B, T_out, D_OUT, T_in, D_IN) -> (T_out, k, B, T_in, D_IN)
    P = torch.einsum("btosi,ok->tkbsi", J, V)
    return P.reshape(T * V.shape[1], B * T, D_IN)


@pytest.mark.parametrize("tile_elements", [1, 2 * B * (T * D_OUT + T * D_IN), 2**30],
                         ids=["one-direction", "two-directions", "whole"])
@pytest.mark.parametrize("max_vectors", [5, 100], ids=["chunks-of-5", "one-chunk"])
def test_tiles_give_the_products_of_full_jacobians(setup, tile_elements, max_vectors):
    model, x, a, b, V = setup
    products, P = _products(model, x, a, b, V, tile_elements, max_vectors)
    expected_tile = {1: 1, 2 * B * (T * D_OUT + T * D_IN): 2, 2**30: products.n_vectors}
    assert products.tile == expected_tile[tile_elements]
    torch.testing.assert_close(P, _expected(model, x, V), rtol=1e-12, atol=1e-12)


def test_tiles_of_weighted_points_give_the_weighted_products(setup):
    model, x, a, b, V = setup
    points, weights = [0.5 * x, x], [0.25, 0.75]
    _, P = _products(model, x, a, b, V, 1, 5, points=points, weights=weights)
    expected = sum(w * _expected(model, p, V) for w, p in zip(weights, points))
    torch.testing.assert_close(P, expected, rtol=1e-12, atol=1e-12)
    _, recomputed = _products(model, x, a, b, V, 1, 5, points=points, weights=weights,
                              recompute=True)
    torch.testing.assert_close(recomputed, expected, rtol=1e-12, atol=1e-12)


def test_tiles_of_position_signs_match_one_pass(setup):
    model, x, a, b, V = setup
    signs = torch.randn(B, 2, T, generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64).sign()
    tiled = _products(model, x, a, b, V, 1, 3, position_signs=lambda p: signs)[1]
    whole = _products(model, x, a, b, V, 2**30, 100, position_signs=lambda p: signs)[1]
    assert tiled.shape == (2 * V.shape[1], B * T, D_IN)
    torch.testing.assert_close(tiled, whole, rtol=1e-12, atol=1e-12)
    # Direction j * k + c is source j's signs over positions: sum_t s_jt (V^T J)_t.
    full = _expected(model, x, V).reshape(T, V.shape[1], B, T * D_IN)
    expected = torch.einsum("bjt,tkbi->jkbi", signs, full).reshape(tiled.shape)
    torch.testing.assert_close(tiled, expected, rtol=1e-12, atol=1e-12)
