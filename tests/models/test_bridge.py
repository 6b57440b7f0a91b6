"""TransformerLens bridges (``_bridge``): the wrapped transformers blocks' closed forms."""

import warnings

import pytest
import torch
from _hf_models import VOCAB, assert_same_graph, randomize, transformers

from sklearn_lib import InteractionGraph

builder = pytest.importorskip("transformer_lens.model_bridge.sources._bridge_builder")

# TransformerLens' names of the residual stream: before, inside and after each block.
LAYERS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
          "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]


def _bridge(family):
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, n_inner=12,
                                         vocab_size=VOCAB, n_positions=8,
                                         layer_norm_epsilon=0.1, bos_token_id=None,
                                         eos_token_id=None)
        name, cls = "GPT2LMHeadModel", transformers.GPT2LMHeadModel
    else:  # rotary: the bridge's wrapped model holds the rotary embedding
        config = transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=8,
                                            num_attention_heads=2, intermediate_size=12,
                                            vocab_size=VOCAB, use_parallel_residual=False,
                                            layer_norm_eps=0.1, bos_token_id=0, eos_token_id=0)
        name, cls = "GPTNeoXForCausalLM", transformers.GPTNeoXForCausalLM
    return builder.build_bridge_from_module(randomize(cls(config)), name, hf_config=config)


@pytest.fixture(params=["gpt2", "neox"])
def family(request):
    return request.param


@pytest.fixture
def bridge(family):
    return _bridge(family)


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (12, 6), generator=torch.Generator().manual_seed(1))


def _graphs(bridge, tokens, **params):
    auto = InteractionGraph(verbose=False, **params).fit_model(bridge, LAYERS, tokens,
                                                               sequence=True)
    generic = InteractionGraph(verbose=False, fast_path=False, **params).fit_model(
        bridge, LAYERS, tokens, sequence=True)
    return auto, generic


@pytest.mark.parametrize("params", [dict(), dict(stochastic_positions=2, random_state=0)])
def test_bridge_blocks_take_the_closed_forms_of_the_blocks_they_wrap(bridge, tokens, params):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto, generic = _graphs(bridge, tokens, **params)
    assert auto.fast_path_ == [True] * 4 and generic.fast_path_ == [False] * 4
    assert_same_graph(auto, generic)


@pytest.mark.parametrize("block, hook, message, fast", [
    # Other values: the output check sees it.
    (0, lambda module, args, out: out * 0.5, "bridge 'blocks.0'.*differs from that formula",
     [False, True, True, True]),
    # The same values, another Jacobian: only the vector-Jacobian check sees it.
    (1, lambda module, args, out: out.detach(), "vector-Jacobian product of the model differs",
     [True, True, False, True]),
])
def test_hooks_that_change_the_section_are_caught(bridge, tokens, block, hook, message, fast):
    handle = bridge.blocks[block].attn.hook_pattern.register_forward_hook(hook)
    try:
        with pytest.warns(UserWarning, match=message):
            auto, generic = _graphs(bridge, tokens)
    finally:
        handle.remove()
    assert auto.fast_path_ == fast
    assert_same_graph(auto, generic)
