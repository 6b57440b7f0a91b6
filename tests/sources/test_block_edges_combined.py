"""Edges of transformer MLP halves under ``stochastic_positions``, in closed form.

A row-wise section's Jacobian between positions ``t != u`` is zero, so the
attribution of a random combination of output positions is a sum over the
sample's rows that :meth:`~sklearn_lib.models._blocks.NormMLP.combined_attributions`
forms without any per-row (k, r) matrix. It is checked against per-row
Jacobians of the formula by ``torch.func.jacrev``, contracted by hand with the
same signs; and inside a fit of a tiny GPT-2 against the generic
vector-Jacobian products, which draw the same signs in the same order (one
draw per batch and number of positions, :meth:`PositionSources.batch`), so the
two paths agree to rounding, error bars included.
"""

import os

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_lib import InteractionGraph
from sklearn_lib.basis._error_bars import SourceGroups, grouped_std
from sklearn_lib.models._blocks import NormMLP
from sklearn_lib.models._norms import Norm
from sklearn_lib.models._position_sources import PositionSources
from sklearn_lib.sources._edges import accumulate_attributions
from sklearn_lib.sources._model_source import ModelSource

D, D_MLP, N, T = 6, 5, 3, 4
TOL = 1e-12
CPU = torch.device("cpu")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _mlp(norm, gated, residual, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    hidden = 2 * D_MLP if gated else D_MLP
    if norm is not None:
        norm = Norm(norm, randn(D) + 1.0, randn(D) if norm == "layer" else None, 0.1)
    return NormMLP(norm, randn(hidden, D), randn(hidden), nn.SiLU() if gated else nn.GELU(),
                   randn(D, D_MLP), randn(D), gated=gated, residual=residual)


def _row_jacobians(section, X):
    """Per-row Jacobians (N, d, d) of the formula by ``torch.func.jacrev`` (row-wise)."""
    J = torch.func.jacrev(section.forward)(X)
    return torch.stack([J[i, :, i, :] for i in range(X.shape[0])])


def _signs(m, seed, padded=()):
    signs = PositionSources(m, seed, CPU).draw(N, T, torch.float64)
    for b, t in padded:
        signs[b, :, t] = 0.0
    return signs


def _brute_force(J, V, R, Z, signs):
    """``g_j = sum_t s_jt (V^T J_t R) diag(z_t)`` per sample, (N, m, k, r)."""
    per_row = (V.T @ J @ R) * Z[:, None, :]
    return torch.einsum("bmt,btkr->bmkr", signs, per_row.view(N, T, *per_row.shape[1:]))


SECTIONS = [(norm, gated, residual) for norm in ("layer", "rms", None)
            for gated in (False, True) for residual in (True, False)]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("norm, gated, residual", SECTIONS)
def test_combined_attributions_match_contracted_jacobians(norm, gated, residual, m):
    section = _mlp(norm, gated, residual)
    g = torch.Generator().manual_seed(5)
    X, X2 = (torch.randn(N * T, D, generator=g, dtype=torch.float64) * 1.5 + 0.3
             for _ in range(2))
    V = torch.randn(D, 3, generator=g, dtype=torch.float64)
    R = torch.randn(D, 4, generator=g, dtype=torch.float64)
    Z = torch.randn(N * T, 4, generator=g, dtype=torch.float64)
    # Padded positions: sign 0 at the output, coordinates 0 at the input.
    padded = [(0, 3), (2, 2), (2, 3)]
    signs = _signs(m, 7, padded)
    for b, t in padded:
        Z[b * T + t] = 0.0
    factors = section.edge_factors(V, R)
    J, J2 = _row_jacobians(section, X), _row_jacobians(section, X2)
    out = section.combined_attributions(section.derivative(X), factors, Z, signs)
    assert out.shape == (N, m, 3, 4)
    assert _rel(out, _brute_force(J, V, R, Z, signs)) < TOL
    # A path average (integrated gradients): a weighted sum of states.
    state = section.derivative(X).mul_(0.25).add_(section.derivative(X2), alpha=0.75)
    out = section.combined_attributions(state, factors, Z, signs)
    assert _rel(out, _brute_force(0.25 * J + 0.75 * J2, V, R, Z, signs)) < TOL


def test_combined_attributions_refuse_mismatched_rows():
    section = _mlp("layer", False, True)
    X = torch.randn(N * T, D, dtype=torch.float64)
    factors = section.edge_factors(torch.eye(D, dtype=torch.float64), torch.eye(D)[:, :2].double())
    with pytest.raises(ValueError, match="rows of 3 samples of 5 positions"):
        section.combined_attributions(section.derivative(X), factors,
                                      torch.zeros(N * T, 2, dtype=torch.float64),
                                      torch.ones(N, 1, T + 1, dtype=torch.float64))


def test_grouped_attributions_add_each_combination_to_its_group():
    g = torch.Generator().manual_seed(0)
    m, k, r = 5, 3, 4
    Y = torch.randn(N, m, k, r, generator=g, dtype=torch.float64)
    Z_out = torch.randn(N * m, k, generator=g, dtype=torch.float64)
    groups = SourceGroups(m, n_groups=2)
    total, constant = torch.zeros(k, r, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    accumulate_attributions(total, Y.clone(), constant=constant, Z_out=Z_out, groups=groups)
    ref, ref_constant = torch.zeros_like(total), torch.zeros_like(constant)
    accumulate_attributions(ref, Y.clone(), constant=ref_constant, Z_out=Z_out)
    assert _rel(total, ref) < TOL and _rel(constant, ref_constant) < TOL
    residual = (Z_out.view(N, m, k) - Y.sum(-1)).square().sum(0)
    squares = torch.cat([Y.square().sum(0), residual[..., None]], -1)
    for group in range(2):
        assert _rel(groups.sums[group], squares[group::2].sum(0)) < TOL
    assert _rel(groups.added_to(None)[:, :r], total) < TOL


# --------------------------------------------------------------------- inside a GPT-2 fit
VOCAB, WIDTH, SEQ = 40, 32, 7
LAYERS = ["transformer.h.0.ln_2:input", "transformer.h.0"]


@pytest.fixture(scope="module")
def gpt2():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=WIDTH, n_head=2, vocab_size=VOCAB,
                                     n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    # Weights larger than the init's, so that the MLP's terms count next to the residual.
    with torch.no_grad():
        for p in model.transformer.h[0].mlp.parameters():
            p.mul_(8.0)
    return model


def _ids(n=6, seed=1):
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def _padded():
    ids = _ids()
    mask = torch.ones_like(ids)
    for i, length in enumerate([7, 3, 5, 7, 2, 6]):
        mask[i, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _source(model, data, fast_path, layers=LAYERS):
    return ModelSource(model, layers, data, sequence=True, batch_size=4, device=None,
                       dtype="float64", fast_path=fast_path, verbose=False)


def _bases(seed=3, r=5):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(WIDTH, r, generator=g, dtype=torch.float64)
    V = torch.randn(WIDTH, 4, generator=g, dtype=torch.float64)
    mean = torch.randn(WIDTH, generator=g, dtype=torch.float64) * 0.1
    out_mean = torch.randn(WIDTH, generator=g, dtype=torch.float64) * 0.1
    return V, mean, C, torch.linalg.pinv(C), out_mean


def _edges(source, m, seed, integration=((1.0,), (1.0,))):
    V, mean, C, C_pinv, out_mean = _bases()
    groups = None if m is None else SourceGroups(m)
    sources = None if m is None else PositionSources(m, seed, CPU)
    alphas, weights = integration
    E = source.edges(0, V, mean, C, C_pinv, edge_point="data", alphas=list(alphas),
                     weights=list(weights), out_mean=out_mean, position_sources=sources,
                     error_groups=groups)
    return E, groups


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("integration", [((1.0,), (1.0,)), ((0.25, 1.0), (0.4, 0.6))])
def test_closed_form_draws_the_products_signs(gpt2, padding, integration):
    data = _padded() if padding else _ids()
    auto, generic = _source(gpt2, data, "auto"), _source(gpt2, data, False)
    assert isinstance(auto.structure(0, 1), NormMLP) and generic.structure(0, 1) is None
    for m in (1, 3):
        E, groups = _edges(auto, m, 11, integration)
        E_ref, groups_ref = _edges(generic, m, 11, integration)
        assert _rel(E, E_ref) < 1e-10
        assert _rel(groups.sums, groups_ref.sums) < 1e-10
        assert groups.scale == groups_ref.scale
    # Exact positions: unchanged.
    assert _rel(_edges(auto, None, 0, integration)[0],
                _edges(generic, None, 0, integration)[0]) < 1e-10


def test_one_output_position_stays_exact(gpt2):
    source = _source(gpt2, _ids(), "auto", [layer + "[-1]" for layer in LAYERS])
    assert isinstance(source.structure(0, 1), NormMLP) and source.positions == [1, 1]
    E, groups = _edges(source, 3, 11)
    assert torch.equal(E, _edges(source, None, 0)[0]) and groups.sums is None


def test_combined_edges_are_unbiased_within_their_error_bars(gpt2):
    source = _source(gpt2, _ids(), "auto")
    exact, _ = _edges(source, None, 0)
    E, groups = _edges(source, 400, 2)
    std = grouped_std(groups.estimates(E).numpy(), groups.shares)
    E, exact = E.numpy(), exact.numpy()
    assert (std > 0).all() and (std < 0.2 * exact).all()
    assert (np.abs(E - exact) < 5 * std).all()


def test_graph_fit_matches_the_generic_path_with_error_bars(gpt2):
    params = dict(n_components=[4, None], stochastic_positions=3, random_state=0, batch_size=4,
                  constant_node=True, verbose=False)
    auto = InteractionGraph(fast_path="auto", **params).fit_model(
        gpt2, LAYERS, _ids(), sequence=True)
    generic = InteractionGraph(fast_path=False, **params).fit_model(
        gpt2, LAYERS, _ids(), sequence=True)
    assert auto.fast_path_ == [True] and generic.fast_path_ == [False]
    # The statistics of a row-wise section are exact under combinations: same bases.
    np.testing.assert_allclose(auto.bases_[0].components_, generic.bases_[0].components_,
                               rtol=0, atol=1e-8)
    E, E_ref = auto.edges_[0], generic.edges_[0]
    np.testing.assert_allclose(E, E_ref, rtol=0, atol=1e-9 * np.abs(E_ref).max())
    std, std_ref = auto.edges_std_[0], generic.edges_std_[0]
    assert np.isfinite(std).all() and (std[:, :-1] > 0).all()
    np.testing.assert_allclose(std, std_ref, rtol=0, atol=1e-9 * np.abs(std_ref).max())
    exact = InteractionGraph(fast_path="auto", **{**params, "stochastic_positions": None}
                             ).fit_model(gpt2, LAYERS, _ids(), sequence=True)
    # Noisy (3 combinations of 7 positions), but of the exact edges' size.
    assert np.abs(E - exact.edges_[0]).max() < 5 * std.max() + 1e-12
    assert 0.5 < E.sum() / exact.edges_[0].sum() < 2.0
