"""Products from a section's full Jacobian: the vector-Jacobian products, exactly.

:class:`~sklearn_lib.models._jacobian_products.JacobianProducts` forms the
per-sample Jacobian by forward-mode passes and contracts it with the
directions of :class:`~sklearn_lib.models._vjp.SectionProducts`. Every chunk
must equal the vector-Jacobian products' (and a brute-force contraction of
``torch.autograd.functional.jacobian``): expanding MLP sections with many
kept directions, flattened per-sample shapes, positions with random
position signs, integration paths of several points, the section's modules
alone (leaves), tiles and chunks that divide nothing. The model source
takes it where it is clearly cheaper; a graph fitted so must equal the one
of ``fast_path=False`` (vector-Jacobian products only), and a module without
a forward-mode derivative must fall back to vector-Jacobian products.
"""

import pytest
import torch
from _reference import assert_same_graph_statistics

from sklearn_lib import InteractionGraph
from sklearn_lib.models import _model
from sklearn_lib.models._jacobian_products import (
    ForwardModeUnsupported,
    JacobianProducts,
    estimated_speedup,
    prefer_jacobian,
    section_flops,
)
from sklearn_lib.models._sequential import run_leaves
from sklearn_lib.models._vjp import SectionProducts
from sklearn_lib.sources import _products

B, T = 4, 3


def _mlp(d_in, hidden, d_out, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(2, d_in), torch.nn.Tanh(), torch.nn.Linear(d_in, hidden),
        torch.nn.GELU(), torch.nn.Linear(hidden, d_out),
    ).double().eval()


class Mixer(torch.nn.Module):
    """Positions mixed causally, then a nonlinearity: every position's Jacobian differs."""

    def __init__(self, d_in, d_out):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inner = torch.nn.Identity()
        self.W = torch.nn.Parameter(torch.randn(d_in, d_out, generator=g, dtype=torch.float64))
        self.mix = torch.nn.Parameter(torch.randn(T, T, generator=g, dtype=torch.float64).tril())
        self.out = torch.nn.Identity()

    def plain(self, h):
        """The section from ``inner`` to ``out``, without hooks."""
        return torch.tanh(self.mix @ (h @ self.W))

    def forward(self, x):
        return self.out(self.plain(self.inner(x)))


def _chunks(kind, *args, max_vectors, **kwargs):
    products = kind(*args, **kwargs)
    return products, torch.cat([chunk for _, chunk in products.chunks(max_vectors)])


def _brute_force(f, point, V, signs=None):
    """``V^T J`` of ``f`` (per-sample shapes ``(P, d)``) as (directions, B * P_in, d_in).

    The Jacobian of the whole batch by ``torch.autograd.functional.jacobian``;
    its per-sample diagonal blocks (samples are independent) contracted with
    ``V`` (direction ``t * k + c``), or with the signs (direction ``j * k + c``).
    """
    full = torch.autograd.functional.jacobian(f, point)  # (B, P_out, d_out, B, P_in, d_in)
    n = point.shape[0]
    J = torch.stack([full[i, :, :, i] for i in range(n)])  # (B, P_out, d_out, P_in, d_in)
    P = torch.einsum("btosi,ok->btksi", J, V)
    if signs is not None:
        P = torch.einsum("bjt,btksi->bjksi", signs, P)
    return P.reshape(n, -1, J.shape[3] * J.shape[4]).transpose(0, 1).reshape(
        -1, n * J.shape[3], J.shape[4])


@pytest.mark.parametrize("tangents", [1, 3, None], ids=["tile-1", "tile-3", "whole"])
@pytest.mark.parametrize("max_vectors", [5, 1000], ids=["chunks-of-5", "one-chunk"])
def test_expanding_mlp_section_matches_vjps_and_brute_force(tangents, max_vectors):
    model = _mlp(3, 16, 24)
    a, b = _model._parse_layers(model, ["1", "4"], "output")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 2, generator=g, dtype=torch.float64)
    act = torch.tanh(model[0](x)).detach()
    V = torch.randn(24, 20, generator=g, dtype=torch.float64)
    args = (model, a, b, x, [act], V)
    vjp, P_vjp = _chunks(SectionProducts, *args, sequence=False, check=True,
                         max_vectors=max_vectors)
    jac, P_jac = _chunks(JacobianProducts, *args, sequence=False, check=True,
                         max_tangents=tangents, max_vectors=max_vectors)
    assert (jac.n_vectors, jac.k, jac.p_in, jac.d_in, jac.p_out, jac.d_out, jac.batch) == (
        vjp.n_vectors, vjp.k, vjp.p_in, vjp.d_in, vjp.p_out, vjp.d_out, vjp.batch)
    assert jac.tile == (3 if tangents is None else tangents)
    assert jac.signs is None and P_jac.shape == (20, B, 3)
    torch.testing.assert_close(P_jac, P_vjp, rtol=1e-12, atol=1e-12)
    def tail(h):  # (B, 1, d_in) -> (B, 1, d_out)
        return model[4](model[3](model[2](h[:, 0])))[:, None]

    expected = _brute_force(tail, act[:, None], V)
    torch.testing.assert_close(P_jac, expected, rtol=1e-12, atol=1e-12)


def test_flattened_per_sample_shapes():
    """Without positions, (C, L) activations are flattened: J is (C_out L_out, B, C_in L_in)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Conv1d(2, 5, 3, padding=1),
                                torch.nn.Tanh()).double().eval()
    a, b = _model._parse_layers(model, ["0", "2"], "output")
    x = torch.randn(B, 2, 4, dtype=torch.float64)
    V = torch.randn(20, 20, dtype=torch.float64)
    _, P_vjp = _chunks(SectionProducts, model, a, b, x, [x], V, sequence=False, check=True,
                       max_vectors=7)
    jac, P_jac = _chunks(JacobianProducts, model, a, b, x, [x], V, sequence=False, check=True,
                         max_tangents=3, max_vectors=7)
    assert jac.jacobian.shape == (20, B, 8)
    torch.testing.assert_close(P_jac, P_vjp, rtol=1e-12, atol=1e-12)
    def flat(h):  # (B, 1, 8) -> (B, 1, 20)
        return model[2](model[1](h.reshape(B, 2, 4))).reshape(B, 1, 20)

    expected = _brute_force(flat, x.reshape(B, 1, 8), V)
    torch.testing.assert_close(P_jac, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("max_vectors", [2, 5, 100])
def test_positions_with_random_signs(max_vectors):
    model = Mixer(2, 6)
    a, b = _model._parse_layers(model, ["inner", "out"], "output")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, 2, generator=g, dtype=torch.float64)
    V = torch.randn(6, 4, generator=g, dtype=torch.float64)
    signs = torch.randn(B, 2, T, generator=g, dtype=torch.float64).sign()
    kwargs = {"sequence": True, "check": True, "position_signs": lambda p: signs,
              "max_vectors": max_vectors}
    vjp, P_vjp = _chunks(SectionProducts, model, a, b, x, [x], V, **kwargs)
    jac, P_jac = _chunks(JacobianProducts, model, a, b, x, [x], V, max_tangents=4, **kwargs)
    assert jac.signs is vjp.signs and jac.n_vectors == 2 * 4
    assert P_jac.shape == (8, B * T, 2)
    torch.testing.assert_close(P_jac, P_vjp, rtol=1e-12, atol=1e-12)
    plain = model.plain
    torch.testing.assert_close(P_jac, _brute_force(plain, x, V, signs), rtol=1e-12, atol=1e-12)
    # Without signs: direction t * k + c of output position t.
    _, P_pos = _chunks(JacobianProducts, model, a, b, x, [x], V, sequence=True, check=True,
                       max_vectors=max_vectors)
    torch.testing.assert_close(P_pos, _brute_force(plain, x, V), rtol=1e-12, atol=1e-12)


def test_integration_path_of_several_points():
    model = Mixer(2, 6)
    a, b = _model._parse_layers(model, ["inner", "out"], "output")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, 2, generator=g, dtype=torch.float64)
    V = torch.randn(6, 5, generator=g, dtype=torch.float64)
    points, weights = [0.0 * x, 0.5 * x, x], [0.25, 0.5, 0.25]
    args = (model, a, b, x, points, V)
    _, P_vjp = _chunks(SectionProducts, *args, sequence=True, check=True, weights=weights,
                       max_vectors=4)
    _, P_jac = _chunks(JacobianProducts, *args, sequence=True, check=True, weights=weights,
                       max_tangents=2, max_vectors=4)
    torch.testing.assert_close(P_jac, P_vjp, rtol=1e-12, atol=1e-12)
    plain = model.plain
    expected = sum(w * _brute_force(plain, p, V) for w, p in zip(weights, points))
    torch.testing.assert_close(P_jac, expected, rtol=1e-12, atol=1e-12)


def test_leaves_run_the_section_alone():
    model = _mlp(3, 16, 24)
    a, b = _model._parse_layers(model, ["1", "4"], "output")
    x = torch.randn(B, 2, dtype=torch.float64)
    act = torch.tanh(model[0](x)).detach()
    V = torch.randn(24, 24, dtype=torch.float64)
    leaves = [model[2], model[3], model[4]]
    _, P_vjp = _chunks(SectionProducts, model, a, b, x, [act], V, sequence=False, check=True,
                       leaves=leaves, max_vectors=10)
    _, P_jac = _chunks(JacobianProducts, model, a, b, x, [act], V, sequence=False, check=True,
                       leaves=leaves, max_vectors=10)
    torch.testing.assert_close(P_jac, P_vjp, rtol=1e-12, atol=1e-12)
    expected = _brute_force(lambda h: run_leaves(leaves, h[:, 0])[:, None], act[:, None], V)
    torch.testing.assert_close(P_jac, expected, rtol=1e-12, atol=1e-12)


def test_detached_section_is_refused_as_for_vjps():
    class Detached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.out = torch.nn.Identity(), torch.nn.Identity()

        def forward(self, x):
            return self.out(self.inner(x).detach() * 2)

    model = Detached()
    a, b = _model._parse_layers(model, ["inner", "out"], "output")
    x = torch.randn(B, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="not differentiable"):
        JacobianProducts(model, a, b, x, [x], None, sequence=False, check=True)


class SinNoJvp(torch.autograd.Function):
    """``sin`` with a backward and a vmap rule but no forward-mode derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x.cos()


class NoJvp(torch.nn.Module):
    def forward(self, x):
        return SinNoJvp.apply(x)


def test_module_without_forward_mode_raises_its_own_error():
    model = torch.nn.Sequential(torch.nn.Identity(), NoJvp()).double()
    a, b = _model._parse_layers(model, ["0", "1"], "output")
    x = torch.randn(B, 3, dtype=torch.float64)
    with pytest.raises(ForwardModeUnsupported, match="forward-mode") as info:
        JacobianProducts(model, a, b, x, [x], None, sequence=False, check=True)
    assert isinstance(info.value.__cause__, NotImplementedError)


def test_cost_rule():
    # 32 -> 512 -> 512: 32 tangents and a contraction beat 512 backward passes.
    mlp = 2 * (32 * 512 + 512 * 512)
    assert prefer_jacobian((mlp, mlp), 32, 32, 512, 512, 1)
    assert estimated_speedup((mlp, mlp), 32, 32, 512, 512, 1) == pytest.approx(
        (mlp + 512 * mlp) / (32 * mlp + mlp + 2 * 512 * 512 * 32))
    # ... unless every tangent reruns a long forward pass (one tangent per pass).
    assert not prefer_jacobian((mlp * 100, mlp), 32, 1, 512, 512, 1)
    # Contracting, or as many directions as inputs: vector-Jacobian products.
    contracting = 2 * (512 * 512 + 512 * 32)
    assert not prefer_jacobian((contracting, contracting), 512, 512, 32, 32, 1)
    assert not prefer_jacobian((mlp, mlp), 512, 512, 512, 512, 1)
    # A section without matrix products (elementwise) is never worth its Jacobian.
    assert not prefer_jacobian((0, 0), 1, 1, 10**6, 1, 1)
    # Combining many positions at random costs the combined rows of J.
    assert not prefer_jacobian((mlp, mlp), 32, 32, 512, 512, 64, m=64)


def test_section_flops_count_the_section_and_its_forward_pass():
    model = _mlp(3, 16, 24)
    a, b = _model._parse_layers(model, ["1", "4"], "output")
    x = torch.randn(B, 2, dtype=torch.float64)
    act = torch.tanh(model[0](x)).detach()
    section = 2 * (3 * 16 + 16 * 24)  # twice the multiply-adds of its matrix products
    forward, backward = section_flops(model, a, b, x, act)
    # The pass runs from the inputs (Linear(2, 3) first); biases may count or not.
    assert 2 * 2 * 3 + section <= forward <= 2 * 2 * 3 + section + 3 + 16 + 24
    assert backward == section  # back to layer 1 only
    forward, backward = section_flops(model, a, b, x, act, [model[2], model[3], model[4]])
    assert section <= forward <= section + 16 + 24 and backward == section


class Wave(torch.nn.Module):
    """An elementwise module of its own: no closed form, the model's products."""

    def forward(self, x):
        return torch.sin(x) + x


def _wide(middle=None):
    """Section 1 -> 4 expands 3 -> 48 features through 32: its Jacobian is cheaper."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 32), middle or Wave(),
        torch.nn.Linear(32, 48), torch.nn.Tanh(), torch.nn.Linear(48, 8),
    ).double().eval()


def _graph(model, **params):
    X = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = {"n_components": None, "random_state": 0, **params}
    return InteractionGraph(**params).fit_model(model, ["1", "4", "6"], X)


class _Used(list):
    """The kinds of products streamed, in order; ``signed``: the kinds with position signs."""

    def __init__(self):
        super().__init__()
        self.signed = []

    def clear(self):
        super().clear()
        self.signed.clear()


@pytest.fixture
def used(monkeypatch):
    """The kinds of products the model source streams (a :class:`_Used`)."""
    kinds = _Used()
    for kind in (SectionProducts, JacobianProducts):
        original = kind.chunks

        def spy(self, max_vectors, original=original, kind=kind):
            kinds.append(kind)
            if self.signs is not None:
                kinds.signed.append(kind)
            yield from original(self, max_vectors)

        monkeypatch.setattr(kind, "chunks", spy)
    return kinds


@pytest.mark.parametrize("params", [{}, {"integration": "gauss-legendre", "n_alphas": 3}],
                         ids=["edge-point", "integrated"])
def test_graph_with_jacobians_equals_vjps_only(used, params):
    fast = _graph(_wide(), **params)
    assert JacobianProducts in used
    used.clear()
    slow = _graph(_wide(), fast_path=False, **params)
    assert JacobianProducts not in used and SectionProducts in used
    assert_same_graph_statistics(fast, slow)


def test_graph_in_float32_with_jacobians(used, monkeypatch):
    fast = _graph(_wide(), model_dtype="float32")
    # Section 4 -> 6 contracts 48 -> 8 features: vector-Jacobian products.
    assert JacobianProducts in used and SectionProducts in used
    used.clear()
    monkeypatch.setattr(_products, "prefer_jacobian", lambda *args: False)
    slow = _graph(_wide(), model_dtype="float32")
    assert JacobianProducts not in used
    assert_same_graph_statistics(fast, slow, tol=1e-5)


def test_graph_falls_back_where_the_jacobian_does_not_fit(used, monkeypatch):
    monkeypatch.setattr(_products, "jacobian_bytes", lambda *args: 2**60)
    _graph(_wide())
    assert JacobianProducts not in used and SectionProducts in used


def test_graph_falls_back_without_forward_mode(used, monkeypatch):
    """A module without a forward-mode derivative: vector-Jacobian products, the same graph."""
    built = []
    monkeypatch.setattr(_products, "JacobianProducts",
                        lambda *args, **kwargs: built.append(1) or JacobianProducts(
                            *args, **kwargs))
    graph = _graph(_wide(NoJvp()))
    # Tried once (on the first batch), then remembered.
    assert built == [1]
    assert JacobianProducts not in used and SectionProducts in used
    used.clear()
    reference = _graph(_wide(NoJvp()), fast_path=False)
    assert_same_graph_statistics(graph, reference, tol=1e-12)


class WideMixer(torch.nn.Module):
    """A sequence model whose section ``resid -> mid`` expands 2 -> 24 features and mixes positions.

    With an ``attention_mask`` the padded positions are left out of the causal
    average. The head (24 features at every position) keeps 24 directions of ``mid``.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.resid = torch.nn.Linear(2, 2), torch.nn.Identity()
        self.up, self.down = torch.nn.Linear(2, 32), torch.nn.Linear(32, 24)
        self.mid, self.head = torch.nn.Identity(), torch.nn.Linear(24, 24)

    def forward(self, x, attention_mask=None):
        h = self.resid(self.embed(x))
        weights = torch.ones(h.shape[1], h.shape[1], dtype=h.dtype).tril()[None]
        if attention_mask is not None:
            weights = weights * attention_mask[:, None, :].to(h.dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1)
        return self.head(torch.tanh(self.mid(self.down(torch.tanh(weights @ self.up(h))))))


@pytest.mark.parametrize("params", [
    {},
    {"stochastic_positions": 2, "integration": "gauss-legendre", "n_alphas": 2},
], ids=["exact", "stochastic-positions-integrated"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_sequence_graph_with_jacobians_equals_vjps_only(used, params, padded):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 5, 2, generator=g, dtype=torch.float64)
    data = X
    if padded:
        mask = torch.ones(24, 5, dtype=torch.int64)
        mask[::2, 3:] = 0
        data = [{"x": X[:12], "attention_mask": mask[:12]},
                {"x": X[12:], "attention_mask": mask[12:]}]
    model = WideMixer().double().eval()

    def fit(**extra):
        return InteractionGraph(n_components=None, random_state=0, edge_point="data",
                                **params, **extra).fit_model(
            model, ["resid", "mid", "head"], data, sequence=True)

    fast = fit()
    assert JacobianProducts in used
    assert (JacobianProducts in used.signed) == ("stochastic_positions" in params)
    used.clear()
    slow = fit(fast_path=False)
    assert JacobianProducts not in used
    assert_same_graph_statistics(fast, slow)


def test_selected_input_positions(used):
    """A section from two selected positions (``resid[-2:]``): the Jacobian of those only."""
    X = torch.randn(24, 5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = WideMixer().double().eval()

    def fit(**extra):
        return InteractionGraph(n_components=None, random_state=0, **extra).fit_model(
            model, ["resid[-2:]", "mid", "head"], X, sequence=True)

    fast = fit()
    assert JacobianProducts in used
    used.clear()
    slow = fit(fast_path=False)
    assert JacobianProducts not in used
    assert_same_graph_statistics(fast, slow)
