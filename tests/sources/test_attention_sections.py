"""Transformer attention halves take their closed form inside a graph fit, checked on every batch.

Random-init GPT-2, GPT-NeoX and Llama models (tiny configs, float64, weights of
order 1 so that every term counts, the softmax far from uniform) are fitted over
the block input, the residual stream after attention and after each block. The
attention halves (block input or the previous block's output ->
``<block>.<mlp norm>:input``) are recognised from the module types and give
their products in closed form; the graph must equal the generic
vector-Jacobian products (``fast_path=False``), which follow the model's own
autograd, for exact positions and for random combinations of positions (both
paths draw the same signs), on padded batches too.
"""

import os
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _hf_models import MODELS, TOL, VOCAB, assert_same_graph

from sklearn_lib import InteractionGraph
from sklearn_lib.models._attention_half import NormAttention
from sklearn_lib.sources._model_source import ModelSource

N, T = 6, 5
# The block input, then per block the stream after attention and after the block.
LAYERS = {
    "gpt2": ["h.0:input", "h.0.ln_2:input", "h.0", "h.1.ln_2:input", "h.1"],
    "neox": ["layers.0:input", "layers.0.post_attention_layernorm:input", "layers.0",
             "layers.1.post_attention_layernorm:input", "layers.1"],
    "llama": ["layers.0:input", "layers.0.post_attention_layernorm:input", "layers.0",
              "layers.1.post_attention_layernorm:input", "layers.1"],
}


def _ids(seed=1):
    return torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(seed))


def _padded(side):
    """A dict batch whose sequences have 5, 3, 4, 5, 2 and 4 real tokens."""
    lengths = [5, 3, 4, 5, 2, 4]
    mask = torch.zeros(N, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, T - n:] = 1
    return {"input_ids": _ids(), "attention_mask": mask}


def _fit(model, layers, fast_path, data=None, **params):
    params = {"n_components": 4, "batch_size": 4, "random_state": 0, **params}
    data = _ids() if data is None else data
    return InteractionGraph(fast_path=fast_path, **params).fit_model(model, layers, data,
                                                                     sequence=True)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("m", [None, 3])
def test_attention_halves_take_the_closed_form_and_match_the_generic_path(name, m):
    model, _ = MODELS[name]()
    layers = LAYERS[name]
    source = ModelSource(model, layers, _ids(), sequence=True, batch_size=4, device=None,
                         dtype="float64", fast_path="auto", verbose=False)
    for l in (0, 2):  # block input (or the previous block's output) -> after attention
        assert isinstance(source.structure(l, l + 1), NormAttention)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the formula holds on every batch
        auto = _fit(model, layers, "auto", stochastic_positions=m)
    generic = _fit(model, layers, False, stochastic_positions=m)
    assert auto.fast_path_ == [True] * 4
    assert_same_graph(auto, generic, TOL[name])
    if m is not None:
        for b, ref in zip(auto.bases_[:-1], generic.bases_[:-1]):
            np.testing.assert_allclose(b.interaction_strengths_std_,
                                       ref.interaction_strengths_std_, rtol=1e-6,
                                       atol=1e-9 * ref.interaction_strengths_.max())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_mask_the_keys_like_the_model(side):
    model, _ = MODELS["gpt2"]()
    layers = LAYERS["gpt2"]
    data = _padded(side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = _fit(model, layers, "auto", data=data, stochastic_positions=2)
    assert auto.fast_path_ == [True] * 4
    assert_same_graph(auto, _fit(model, layers, False, data=data, stochastic_positions=2))


def test_integrated_gradients_and_the_constant_node_match():
    model, _ = MODELS["llama"]()
    layers = LAYERS["llama"][:3]
    params = dict(integration="gauss-legendre", n_alphas=3, constant_node=True,
                  edge_point="data", stochastic_positions=2)
    auto = _fit(model, layers, "auto", **params)
    assert auto.fast_path_ == [True, True]
    assert_same_graph(auto, _fit(model, layers, False, **params), TOL["llama"])


def test_a_hook_on_the_attention_is_not_recognised():
    model, _ = MODELS["gpt2"]()
    layers = LAYERS["gpt2"]
    handle = model.h[1].attn.register_forward_hook(
        lambda module, args, out: (out[0] * 1.5, *out[1:]))
    try:
        source = ModelSource(model, layers, _ids(), sequence=True, batch_size=4, device=None,
                             dtype="float64", fast_path="auto", verbose=False)
        assert source.structure(2, 3) is None
        assert "hook" in source.reasons[(2, 3)]
        auto = _fit(model, layers, "auto")
        assert auto.fast_path_ == [True, True, False, True]
        assert_same_graph(auto, _fit(model, layers, False))
    finally:
        handle.remove()


def test_eager_attention_with_its_float32_softmax_takes_the_closed_form():
    # transformers' eager Llama attention computes the softmax in float32: the
    # formula does too, so the check on every batch passes and the graph equals the
    # generic products to that rounding.
    model, _ = MODELS["llama"]()
    eager = transformers.LlamaModel._from_config(model.config, attn_implementation="eager")
    eager = eager.double().eval()
    eager.load_state_dict(model.state_dict())
    layers = LAYERS["llama"][:3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = _fit(eager, layers, "auto", stochastic_positions=2)
    assert auto.fast_path_ == [True, True]
    assert_same_graph(auto, _fit(eager, layers, False, stochastic_positions=2), TOL["llama"])


def test_combined_positions_never_form_the_products(monkeypatch):
    # With stochastic positions the scatter and the edges of an attention half come
    # from its per-head factors (models._attention_stats); its products are for exact
    # positions only.
    from sklearn_lib.models import _attention_products

    def refuse(*args, **kwargs):
        raise AssertionError("the products of an attention half were formed")

    model, _ = MODELS["gpt2"]()
    layers = LAYERS["gpt2"][:2]
    monkeypatch.setattr(_attention_products.AttentionProducts, "chunks", refuse)
    graph = _fit(model, layers, "auto", stochastic_positions=2, constant_node=True)
    assert graph.fast_path_ == [True]
    with pytest.raises(AssertionError, match="products of an attention half"):
        _fit(model, layers, "auto")
