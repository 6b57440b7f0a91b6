"""Statistics of the combined attention products (``_attention_stats``) against the products.

The reference is :class:`~sklearn_lib.models._attention_products.AttentionProducts`
(itself tested against autograd in ``test_attention_half.py``): its products
``P`` (m k, B T, d) give ``S_j = sum P^T P`` over the directions of combination
``j`` and ``g[b, j] = sum_s (P_s right) * z_s`` per direction.
"""

import pytest
import torch
from test_attention_half import _inputs, _key_mask, _rel, _signs, make_section

from sklearn_lib.models._attention_stats import (
    _attributions_factors,
    _attributions_plain,
    _scatter_direct,
    _scatter_heads,
    combined_attributions,
    combined_scatter,
)
from sklearn_lib.models._attention_stats import _products as stats_products

DT = torch.float64
TOL = 1e-12

CASES = {
    "gpt2": dict(norm="layer", bias=True, G=4),
    "gpt2-nonresidual": dict(norm="layer", bias=True, G=4, residual=False, d_out=10),
    "neox-partial-rotary": dict(norm="layer", bias=True, G=4, rotary="partial"),
    "llama-gqa": dict(norm="rms", bias=False, G=2, rotary="full",
                      softmax_dtype=torch.float32),
    "no-norm": dict(norm=None, bias=True, G=1, rotary="partial"),
    # Without rotary the attributions take the GEMMs over positions (_attributions_plain).
    "rms-gqa-plain": dict(norm="rms", bias=False, G=2),
    "no-norm-plain": dict(norm=None, bias=True, G=1),
    "bidirectional-gqa": dict(norm="layer", bias=True, G=2, causal=False),
}


# Tiny tensors: threads only contend (a loaded machine makes them 20x slower).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=list(CASES), ids=list(CASES))
def section(request):
    kwargs = dict(CASES[request.param])
    softmax_dtype = kwargs.pop("softmax_dtype", None)
    sec = make_section(**kwargs)
    sec.softmax_dtype = softmax_dtype
    return sec


def _products(section, points, V, signs, key_mask, weights=None):
    prod = section.products(points, V, weights=weights, signs=signs, key_mask=key_mask)
    return torch.cat([c for _, c in prod.chunks(prod.n_vectors)])  # (m k, B T, d)


# k = 3 < H d_head = 24: G_s formed with E; k = 30 > 24: E replaced by its QR factor.
@pytest.mark.parametrize("k", [3, 30])
@pytest.mark.parametrize("memory", [1, 2**28], ids=["one-row", "all-rows"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("m", [1, 3])
def test_scatter_matches_products(section, k, memory, padding, m):
    X = _inputs()
    B, T, d = X.shape
    key_mask = _key_mask(padding)
    V = torch.randn(section.d_out, k, generator=torch.Generator().manual_seed(3), dtype=DT)
    signs = _signs(B, m, T, key_mask)
    P = _products(section, [X], V, signs, key_mask).view(m, k * B * T, d)
    expected = P.transpose(1, 2) @ P
    got = combined_scatter(section, X, V, signs, key_mask=key_mask, memory=memory)
    assert got.shape == (m, d, d)
    assert _rel(got, expected) < TOL


@pytest.mark.parametrize("memory", [1, 2**28], ids=["one-row", "all-rows"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n_points", [1, 2])
def test_attributions_match_products(section, memory, padding, m, n_points):
    g = torch.Generator().manual_seed(7)
    X = _inputs()
    B, T, d = X.shape
    k, n_r = 5, 4
    key_mask = _key_mask(padding)
    points = [X, 0.5 * X + 0.2 * _inputs(seed=9)][:n_points]
    weights = [0.7, -0.4][:n_points]
    V = torch.randn(section.d_out, k, generator=g, dtype=DT)
    right = torch.randn(d, n_r, generator=g, dtype=DT)
    Z = torch.randn(B, T, n_r, generator=g, dtype=DT)
    if key_mask is not None:
        Z = Z * key_mask[..., None]
    signs = _signs(B, m, T, key_mask)
    P = _products(section, points, V, signs, key_mask, weights).view(m, k, B, T, d)
    expected = torch.einsum("jcbsd,dr,bsr->bjcr", P, right, Z)
    got = combined_attributions(section, points, V, right, Z, signs, weights=weights,
                                key_mask=key_mask, memory=memory)
    assert got.shape == (B, m, k, n_r)
    assert _rel(got, expected) < TOL


def test_refuses_bad_arguments():
    section = make_section()
    X = _inputs()
    B, T, d = X.shape
    V = torch.randn(d, 3, dtype=DT)
    signs = _signs(B, 2, T)
    with pytest.raises(ValueError, match="signs"):
        combined_scatter(section, X, V, None)
    with pytest.raises(ValueError, match="right must be"):
        combined_attributions(section, [X], V, torch.zeros(d + 1, 2, dtype=DT),
                              torch.zeros(B, T, 2, dtype=DT), signs)
    with pytest.raises(ValueError, match="Z must be"):
        combined_attributions(section, [X], V, torch.zeros(d, 2, dtype=DT),
                              torch.zeros(B, T, 3, dtype=DT), signs)


@pytest.mark.parametrize("k", [3, 30])
def test_scatter_routes_agree(k):
    """G formed and the head structure give the same scatter, whichever combined_scatter picks."""
    section = make_section(norm="layer", G=2, rotary="partial")
    X = _inputs()
    B, T, d = X.shape
    V = torch.randn(d, k, generator=torch.Generator().manual_seed(3), dtype=DT)
    prod = section.products([X], V, signs=_signs(B, 2, T))
    direct, heads = _scatter_direct(prod, 2**12), _scatter_heads(prod, 2**12)
    assert _rel(heads, direct) < TOL


@pytest.mark.parametrize("memory", [1, 2**28], ids=["one-combination", "all-combinations"])
@pytest.mark.parametrize("padding", [None, "left"])
@pytest.mark.parametrize("case", ["gpt2", "rms-gqa-plain", "bidirectional-gqa"])
def test_attribution_routes_agree(case, memory, padding):
    """Without rotary, the GEMMs over positions give what the per-row factors give."""
    section = make_section(**CASES[case])
    g = torch.Generator().manual_seed(11)
    X = _inputs()
    B, T, d = X.shape
    key_mask = _key_mask(padding)
    points = [X, 0.3 * X - 0.1 * _inputs(seed=5)]
    V = torch.randn(d, 4, generator=g, dtype=DT)
    right = torch.randn(d, 3, generator=g, dtype=DT)
    Z = torch.randn(B, T, 3, generator=g, dtype=DT)
    prod = stats_products(section, points, V, [0.6, 0.5], _signs(B, 4, T, key_mask), key_mask,
                     memory)
    assert _rel(_attributions_plain(prod, right, Z), _attributions_factors(prod, right, Z)) < TOL


# 140288 bytes: the sums of two combinations (of 4384 numbers each) in half of memory, so
# combinations 0, 1 and 2 come in two groups.
@pytest.mark.parametrize("memory", [1, 140288, 2**28],
                         ids=["one-combination", "two-groups", "all-combinations"])
def test_scatter_heads_any_signs(memory):
    """Signs whose squares differ between combinations (several query-query patterns)."""
    section = make_section(norm="layer", G=2, rotary="partial")
    X = _inputs()
    B, T, d = X.shape
    g = torch.Generator().manual_seed(4)
    signs = torch.randn(B, 3, T, generator=g, dtype=DT)
    signs[:, 1] = signs[:, 0].abs()  # the same squares as combination 0
    signs[:, 2, 1] = 0.0
    V = torch.randn(d, 30, generator=g, dtype=DT)
    P = _products(section, [X], V, signs, None).view(3, -1, d)
    prod = section.products([X], V, signs=signs)
    assert _rel(_scatter_heads(prod, memory), P.transpose(1, 2) @ P) < TOL


@pytest.mark.parametrize("padding", [None, "left"])
@pytest.mark.parametrize("rows", [(0, None), (2, 5)], ids=["all-rows", "chunk"])
def test_combined_key_factors_match_one_at_a_time(section, padding, rows):
    """The key factors of several combinations at once are each combination's."""
    X = _inputs()
    B, T, d = X.shape
    key_mask = _key_mask(padding)
    signs = _signs(B, 3, T, key_mask)
    prod = section.products([X], torch.eye(section.d_out, 2, dtype=DT), signs=signs,
                            key_mask=key_mask)
    s0, s1 = rows[0], rows[1] or T
    st = prod.states[0]
    for b in range(B):
        got = prod.combined_key_factors(st, b, signs[b], s0, s1)
        for j in range(3):
            assert _rel(got[j], prod.key_factors(st, b, signs[b, j], s0, s1)) < TOL
