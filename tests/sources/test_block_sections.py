"""Transformer MLP halves take their closed form inside a graph fit, checked on every batch.

Random-init GPT-2, GPT-NeoX and Llama models (tiny configs, float64, weights of
order 1 so that every term counts) are fitted over alternating residual points:
after attention (``<block>.<mlp norm>:input``) and after the block. The MLP
halves are recognised (:func:`~sklearn_lib.models._block_detect.block_section`)
and must give the same bases and edges as the generic vector-Jacobian products
(``fast_path=False``), which follow the model's own autograd.
"""

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _hf_models import MODELS, TOL, VOCAB, assert_same_graph, gpt2, llama, neox

from sklearn_lib import InteractionGraph
from sklearn_lib.models._attention_half import NormAttention
from sklearn_lib.models._blocks import NormMLP
from sklearn_lib.sources._model_source import ModelSource

N, T = 6, 5


def _ids(seed=1):
    return torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(seed))


def _fit(model, layers, fast_path, **params):
    params = {"n_components": 4, "batch_size": 4, **params}
    return InteractionGraph(fast_path=fast_path, **params).fit_model(model, layers, _ids(),
                                                                     sequence=True)


def _source(model, layers):
    return ModelSource(model, layers, _ids(), sequence=True, batch_size=4, device=None,
                       dtype="float64", fast_path="auto", verbose=False)


@pytest.mark.parametrize("name", list(MODELS))
def test_block_halves_take_the_closed_form_and_match_the_generic_path(name):
    model, layers = MODELS[name]()
    source = _source(model, layers)
    for l in (0, 2):  # the MLP halves: mid-block -> block output
        assert isinstance(source.structure(l, l + 1), NormMLP)
    # The attention half between them (block output -> after the next attention).
    assert isinstance(source.structure(1, 2), NormAttention)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the formula holds on every batch
        auto = _fit(model, layers, "auto")
    generic = _fit(model, layers, False)
    assert auto.fast_path_ == [True, True, True]
    assert generic.fast_path_ == [False] * 3
    assert_same_graph(auto, generic, TOL[name])


def test_global_variant_and_gauss_legendre_edges_match():
    model, layers = gpt2()
    params = dict(integration="gauss-legendre", n_alphas=3, constant_node=True,
                  edge_point="data")
    assert_same_graph(_fit(model, layers, "auto", **params),
                      _fit(model, layers, False, **params))
    model, layers = llama()
    layers = layers[:2]
    auto = _fit(model, layers, "auto", variant="global")
    assert auto.fast_path_ == [True]
    assert_same_graph(auto, _fit(model, layers, False, variant="global"), TOL["llama"])


def test_mlp_alone_takes_the_closed_form():
    model, _ = llama()
    layers = ["layers.0.mlp:input", "layers.0.mlp", "layers.1.mlp:input", "layers.1.mlp"]
    auto = _fit(model, layers, "auto")
    assert auto.fast_path_ == [True, False, True]
    assert_same_graph(auto, _fit(model, layers, False), TOL["llama"])


def test_a_hook_on_the_mlp_is_not_recognised():
    model, layers = gpt2()
    handle = model.h[0].mlp.c_proj.register_forward_hook(lambda m, a, out: out * 1.5)
    try:
        source = _source(model, layers)
        assert source.structure(0, 1) is None
        assert "forward hooks" in source.reasons[(0, 1)]
        assert isinstance(source.structure(2, 3), NormMLP)
        auto = _fit(model, layers, "auto")
        assert auto.fast_path_ == [False, True, True]
        assert_same_graph(auto, _fit(model, layers, False))
    finally:
        handle.remove()


def test_verification_refuses_a_changed_mlp(monkeypatch):
    # Conv1D computes with torch.addmm; changing it for the MLP's output projection
    # changes the model but no module type: only the values can show it.
    model, layers = gpt2()
    addmm = torch.addmm

    def changed(bias, x, weight, *args, **kwargs):
        out = addmm(bias, x, weight, *args, **kwargs)
        return out + 0.25 * torch.tanh(out) if x.shape[-1] == 12 else out

    monkeypatch.setattr(torch, "addmm", changed)
    with pytest.warns(UserWarning, match="differs from that formula"):
        auto = _fit(model, layers, "auto")
    assert auto.fast_path_ == [False, True, False]
    assert_same_graph(auto, _fit(model, layers, False))


def test_parallel_residual_is_not_recognised():
    model, layers = neox(parallel=True)
    source = _source(model, layers[:2] + ["layers.1"])
    assert source.structure(0, 1) is None
    assert "parallel residual" in source.reasons[(0, 1)]
    # The mid-block point is the block's input, read by the attention's norm before
    # the MLP's: no section can replace it for both, so the fit refuses.
    with pytest.raises(ValueError, match="uses the value of .* before"):
        _fit(model, layers, "auto")
    # The MLP alone is still one.
    layers = ["layers.0.mlp:input", "layers.0.mlp", "layers.1"]
    auto = _fit(model, layers, "auto")
    assert auto.fast_path_ == [True, False]
    assert_same_graph(auto, _fit(model, layers, False))
