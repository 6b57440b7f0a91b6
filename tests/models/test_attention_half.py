"""Closed-form products of the attention half (``NormAttention.products``) against autograd.

Every product is compared with the full Jacobian of ``NormAttention.forward``
(``torch.autograd.functional.jacobian`` over the whole batch, its diagonal
sample blocks) contracted with the cotangents, or with ``torch.func.vjp`` +
``vmap`` as :class:`~sklearn_lib.models._vjp.SectionProducts` computes them.
Weights are of order 1 so that every term of the formula counts.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_lib.models._attention_half import NormAttention, Rotary
from sklearn_lib.models._norms import Norm

DT = torch.float64
TOL = 1e-12


# Tiny tensors: threads only contend (a loaded machine makes them 20x slower).
pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def make_section(d=16, H=4, G=2, e=6, norm="layer", bias=True, rotary=None, causal=True,
                 residual=True, d_out=None, scale=0.4, seed=0):
    """A random section; ``rotary`` None, ``"full"`` or ``"partial"`` (scaling 1.3)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=DT) * std

    d_out = d if d_out is None else d_out
    if norm is None:
        norm_ = None
    elif norm == "layer":
        norm_ = Norm("layer", 1 + 0.5 * rnd(d), rnd(d), 1e-5)
    else:
        norm_ = Norm("rms", 1 + 0.5 * rnd(d), None, 1e-6)
    rot = None
    if rotary is not None:
        rot_dim = e if rotary == "full" else e - 2
        inv_freq = 1.0 / 10.0 ** (torch.arange(0, rot_dim, 2, dtype=DT) / rot_dim)
        rot = Rotary(inv_freq, rot_dim, scaling=1.3)
    b = (lambda n: rnd(n)) if bias else (lambda n: None)
    return NormAttention(
        norm_, rnd(H * e, d, std=0.5), b(H * e), rnd(G * e, d, std=0.5), b(G * e),
        rnd(G * e, d), b(G * e), rnd(d_out, H * e), b(d_out), H, G, scale, rot, causal,
        residual)


def _inputs(B=2, T=6, d=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, d, generator=g, dtype=DT) * 1.5 + 0.3


def _key_mask(padding, B=2, T=6):
    if padding is None:
        return None
    mask = torch.ones(B, T, dtype=torch.bool)
    if padding == "left":
        mask[0, :2] = False
    else:
        mask[0, -2:] = False
        mask[1, -1] = False
    return mask


def _signs(B, m, T, key_mask=None, seed=2):
    g = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (B, m, T), generator=g) * 2 - 1).to(DT) / math.sqrt(m)
    return signs if key_mask is None else signs * key_mask[:, None, :]


def _jacobians(section, X, key_mask):
    """(B, T, d_out, T, d): each sample's Jacobian blocks."""
    J = torch.autograd.functional.jacobian(lambda x: section.forward(x, key_mask), X,
                                         vectorize=True)
    return torch.stack([J[b, :, :, b] for b in range(X.shape[0])])


def reference(section, points, V, signs=None, key_mask=None, weights=None):
    """Products ``(n_vectors, B * T, d)`` from the brute-force Jacobians."""
    weights = [1.0] * len(points) if weights is None else weights
    total = 0
    for X, w in zip(points, weights):
        J = _jacobians(section, X, key_mask)
        B, T, _, _, d = J.shape
        if signs is None:
            P = torch.einsum("btisy,ic->tcbsy", J, V)
        else:
            P = torch.einsum("bmt,btisy,ic->mcbsy", signs, J, V)
        total = total + w * P.reshape(-1, B * T, d)
    return total


def closed_form(products, max_vectors):
    chunks = list(products.chunks(max_vectors))
    assert [s for s, _ in chunks] == list(range(0, products.n_vectors, max_vectors))
    return torch.cat([c for _, c in chunks])


CASES = {
    "gpt2": dict(norm="layer", bias=True, G=4),
    "gpt2-nonresidual": dict(norm="layer", bias=True, G=4, residual=False, d_out=10),
    "neox-partial-rotary": dict(norm="layer", bias=True, G=4, rotary="partial"),
    "llama-gqa": dict(norm="rms", bias=False, G=2, rotary="full"),
    "mqa-no-norm": dict(norm=None, bias=True, G=1, rotary="partial"),
    "rms-bidirectional": dict(norm="rms", bias=True, G=2, causal=False),
    "layer-bidirectional-rotary": dict(norm="layer", bias=False, G=1, rotary="full",
                                       causal=False),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def section(request):
    return make_section(**CASES[request.param])


# Chunks that split the columns of a position or combination unevenly. With 3 columns
# and a small memory: narrow chunks (E^h Z^h first), chunks of input positions, no kept
# factors; with 10 columns and the default memory: segments of 10 columns (E Y) and of 3,
# factors kept across chunks.
SPLITS = {"narrow": (3, 5, 20_000), "wide": (10, 13, 2**28)}


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("m", [None, 3], ids=["exact", "signs"])
def test_products_match_jacobian(section, padding, m, split):
    k, step, memory = SPLITS[split]
    X = _inputs()
    B, T, _ = X.shape
    key_mask = _key_mask(padding)
    V = torch.randn(section.d_out, k, generator=torch.Generator().manual_seed(3), dtype=DT)
    signs = None if m is None else _signs(B, m, T, key_mask)
    expected = reference(section, [X], V, signs, key_mask)
    products = section.products([X], V, signs=signs, key_mask=key_mask, memory=memory)
    assert products.n_vectors == (T if m is None else m) * k
    assert (products.k, products.p_in, products.p_out, products.batch) == (k, T, T, B)
    assert (products.d_in, products.d_out, products.out_shape) == (
        16, section.d_out, (T, section.d_out))
    assert products.signs is signs or torch.equal(products.signs, signs)
    got = closed_form(products, step)
    assert got.shape == expected.shape
    assert _rel(got, expected) < TOL
    if m is not None and key_mask is not None:
        # Signs are 0 at padded positions: nothing reaches a padded input row.
        padded = ~key_mask.reshape(-1)
        assert got[:, padded].abs().max() == 0


def test_matches_vmapped_vjp():
    """The products are those of ``torch.func.vjp`` + ``vmap``, as SectionProducts streams."""
    section = make_section(norm="rms", G=2, rotary="partial")
    X = _inputs()
    B, T, d = X.shape
    V = torch.randn(d, 4, generator=torch.Generator().manual_seed(4), dtype=DT)
    signs = _signs(B, 2, T)
    _, vjp_fn = torch.func.vjp(section.forward, X)
    # Direction q = j * k + c: combination j's signs over positions times column c.
    cot = (signs.transpose(0, 1)[:, None, :, :, None] * V.T[None, :, None, None, :])
    cot = cot.reshape(-1, B, T, d)
    expected = torch.func.vmap(lambda v: vjp_fn(v)[0])(cot).reshape(-1, B * T, d)
    got = closed_form(section.products([X], V, signs=signs), 3)
    assert _rel(got, expected) < TOL


@pytest.mark.parametrize("m", [None, 2], ids=["exact", "signs"])
def test_layout_of_directions(m):
    """Direction ``q = i k + c`` is position or combination ``i`` times column ``c`` of V."""
    section = make_section(rotary="full")
    X = _inputs()
    B, T, d = X.shape
    V = torch.randn(d, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    signs = None if m is None else _signs(B, m, T)
    got = closed_form(section.products([X], V, signs=signs), 4)
    for i in range(T if m is None else m):
        for c in range(3):
            if m is None:
                one = closed_form(section.products([X], V[:, c : c + 1]), 1)[i]
            else:
                one = closed_form(section.products([X], V[:, c : c + 1],
                                                   signs=signs[:, i : i + 1]), 1)[0]
            assert torch.allclose(got[i * 3 + c], one, rtol=0, atol=1e-13)


@pytest.mark.parametrize("m", [None, 3], ids=["exact", "signs"])
def test_weighted_points(m):
    """Several points: the weighted sum of each point's products."""
    section = make_section(norm="layer", G=2, rotary="partial")
    X = _inputs()
    B, T, d = X.shape
    points, weights = [0.3 * X, 0.9 * X + 0.1], [0.25, 0.75]
    key_mask = _key_mask("right")
    V = torch.randn(d, 2, generator=torch.Generator().manual_seed(6), dtype=DT)
    signs = None if m is None else _signs(B, m, T, key_mask)
    expected = reference(section, points, V, signs, key_mask, weights)
    products = section.products(points, V, weights=weights, signs=signs, key_mask=key_mask)
    assert _rel(closed_form(products, 7), expected) < TOL


@pytest.mark.parametrize("m", [None, 2], ids=["exact", "signs"])
def test_chunking_does_not_change_products(m):
    section = make_section(norm="rms", G=2, rotary="full", causal=False)
    X = _inputs(B=3, T=7)
    V = torch.randn(16, 5, generator=torch.Generator().manual_seed(7), dtype=DT)
    signs = None if m is None else _signs(3, m, 7)
    whole = closed_form(section.products([X], V, signs=signs), 10**6)
    for memory, max_vectors in [(1, 1), (5_000, 3), (50_000, 7)]:
        got = closed_form(section.products([X], V, signs=signs, memory=memory), max_vectors)
        assert torch.allclose(got, whole, rtol=0, atol=1e-13 * whole.abs().max())


def test_chunks_are_fresh_tensors():
    section = make_section()
    X = _inputs()
    products = section.products([X], torch.eye(16, dtype=DT)[:, :2])
    first = [c.clone() for _, c in products.chunks(4)]
    for _, c in products.chunks(4):
        c.zero_()
    again = [c for _, c in products.chunks(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_large_scores():
    """Nearly one-hot attention (scores of order 50): still exact to rounding."""
    section = make_section(norm="layer", G=2, rotary="partial", scale=6.0)
    X = _inputs()
    a = section.attend(X)["a"]
    assert a.max() > 0.999
    B, T, d = X.shape
    V = torch.randn(d, 3, generator=torch.Generator().manual_seed(8), dtype=DT)
    for signs in (None, _signs(B, 3, T)):
        expected = reference(section, [X], V, signs)
        assert _rel(closed_form(section.products([X], V, signs=signs), 4), expected) < 1e-11


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 5), G=st.sampled_from([1, 2, 4]), k=st.integers(1, 4),
       m=st.sampled_from([None, 1, 2]), rotary=st.sampled_from([None, "full", "partial"]),
       causal=st.booleans(), step=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_random_configurations(T, G, k, m, rotary, causal, step, seed):
    section = make_section(G=G, rotary=rotary, causal=causal, norm="rms", seed=seed)
    X = _inputs(B=1, T=T, seed=seed + 1)
    V = torch.randn(16, k, generator=torch.Generator().manual_seed(seed), dtype=DT)
    signs = None if m is None else _signs(1, m, T, seed=seed)
    expected = reference(section, [X], V, signs)
    got = closed_form(section.products([X], V, signs=signs, memory=3_000), step)
    assert _rel(got, expected) < TOL


def test_costs():
    section = make_section(G=2)
    X = _inputs()
    products = section.products([X], torch.eye(16, dtype=DT), memory=10_000)
    saved, backward, per_vector = products.costs()
    T, d, H, e = 6, 16, 4, 6
    assert saved == 8 * (H * T * T + 5 * H * T * e + T * d + T)
    assert 0 < backward <= 10_000
    assert per_vector >= 8 * T * d


@pytest.mark.parametrize("kwargs, message", [
    (dict(V=torch.zeros(15, 2, dtype=DT)), r"V must be \(d_out, k\) = \(16, k\)"),
    (dict(signs=torch.zeros(2, 3, 5, dtype=DT)), r"signs must be \(B, m, T\) = \(2, m, 6\)"),
    (dict(key_mask=torch.ones(2, 5, dtype=torch.bool)), r"key_mask must be \(B, T\)"),
    (dict(weights=[1.0, 2.0]), "one number per point"),
    (dict(points=[torch.zeros(2, 6, 15, dtype=DT)]), r"points must be \(B, T, 16\)"),
    (dict(points=[]), "at least one"),
])
def test_refusals(kwargs, message):
    section = make_section()
    args = dict(points=[_inputs()], V=torch.zeros(16, 2, dtype=DT))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        section.products(args.pop("points"), args.pop("V"), **args)


def test_refuses_bad_max_vectors():
    products = make_section().products([_inputs()], torch.zeros(16, 2, dtype=DT))
    with pytest.raises(ValueError, match="max_vectors must be a positive integer"):
        next(products.chunks(0))
