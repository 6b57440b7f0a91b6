"""Models of other libraries: nnsight wrappers, TransformerLens hook names, HF dict batches."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sklearn_lib import InteractionGraph
from sklearn_lib.collect import collect, prepare_model, record_activations
from sklearn_lib.models._adapters import padding_mask, unwrap_model
from sklearn_lib.models._model import _Layer, _parse_layers, _row_mask

LAYERS = ["transformer.h.0:input", "transformer.h.0", "lm_head"]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50,
                                     n_positions=16, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (20, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def padded(tokens):
    """The last 10 sequences are 4 tokens long, right-padded to 6 with a junk token."""
    mask = torch.ones_like(tokens)
    mask[10:, 4:] = 0
    return {"input_ids": torch.where(mask == 1, tokens, 7), "attention_mask": mask}


@pytest.fixture(scope="module")
def bridge():
    pytest.importorskip("transformers")
    builder = pytest.importorskip("transformer_lens.model_bridge.sources._bridge_builder")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20, n_positions=8,
                        bos_token_id=None, eos_token_id=None)
    return builder.build_bridge_from_module(GPT2LMHeadModel(config).eval(), "GPT2LMHeadModel",
                                            hf_config=config)


def _assert_same_graph(g1, g2, atol=1e-10):
    np.testing.assert_array_equal(g1.n_components_, g2.n_components_)
    for E1, E2 in zip(g1.edges_, g2.edges_):
        np.testing.assert_allclose(E1, E2, rtol=0, atol=atol * max(1.0, np.abs(E2).max()))
    for b1, b2 in zip(g1.bases_, g2.bases_):
        np.testing.assert_allclose(b1.mean_, b2.mean_, rtol=0, atol=atol)
        # Directions are defined up to sign.
        np.testing.assert_allclose(np.abs(b1.components_), np.abs(b2.components_),
                                   rtol=0, atol=1e-8)


# --------------------------------------------------------------------------- nnsight
def test_nnsight_wrapper_is_unwrapped_to_its_module():
    nnsight = pytest.importorskip("nnsight")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    wrapped = nnsight.NNsight(net)
    assert not isinstance(wrapped, nn.Module)
    assert unwrap_model(wrapped) is net
    X = torch.randn(40, 4, generator=torch.Generator().manual_seed(2))
    layers = [":input", "1", "2"]
    plain = InteractionGraph(verbose=False).fit_model(net, layers, X)
    _assert_same_graph(InteractionGraph(verbose=False).fit_model(wrapped, layers, X), plain,
                       atol=1e-13)
    acts, _ = collect(wrapped, layers, X, verbose=False)
    np.testing.assert_allclose(acts[1], torch.tanh(net[0](X)).double().detach().numpy(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model", [object(), "gpt2", np.eye(2)])
def test_anything_but_a_module_is_refused(model):
    with pytest.raises(TypeError, match="must be a torch.nn.Module .*got"):
        prepare_model(model)


# --------------------------------------------------------------------------- TransformerLens
def test_bridge_hook_aliases_resolve_through_the_registry(bridge, tokens):
    modules = dict(bridge.named_modules())
    alias = "blocks.0.hook_resid_pre"
    assert alias not in modules  # an alias, not a module path
    (layer,) = _parse_layers(bridge, [alias], "output")
    assert layer.spec == alias and layer.module is bridge.hook_dict[alias]
    assert modules[layer.name] is layer.module
    # What we record at the alias is what TransformerLens caches under that name.
    x = tokens[:4] % 20
    names = [alias, "blocks.0.hook_resid_mid", "blocks.1.hook_resid_post"]
    _, cache = bridge.run_with_cache(x)
    recorded = record_activations(bridge, names, x, verbose=False, dtype="float32")
    for name in names:
        np.testing.assert_allclose(recorded[name], cache[name].detach().numpy(),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hook registry"):
        _parse_layers(bridge, ["blocks.0.hook_nothing"], "output")


def test_bridge_graph_from_the_model_equals_the_graph_from_collect(bridge, tokens):
    x = tokens % 20
    layers = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_post"]
    weight = next(bridge.parameters())
    graph = InteractionGraph(verbose=False).fit_model(bridge, layers, x, sequence=True)
    # Converted to float64 in a copy with torch's own Module.to: the model is untouched.
    assert next(bridge.parameters()) is weight and weight.dtype == torch.float32
    acts, jacs = collect(bridge, layers, x, sequence=True, verbose=False)
    cached = InteractionGraph(verbose=False).fit(acts, jacobians=jacs, sequence=True)
    _assert_same_graph(graph, cached)
    assert graph.layer_names_ == layers


# --------------------------------------------------------------------------- Hugging Face
def test_padded_batch_gives_the_graph_of_the_unpadded_sequences(gpt2, tokens, padded):
    """Padding enters neither statistics nor edges: the graph of the sequences pooled."""
    pooled = [{"input_ids": tokens[:10]}, {"input_ids": tokens[10:, :4]}]
    # The constant node's edges cover the output rows too.
    graph = InteractionGraph(verbose=False, constant_node=True).fit_model(
        gpt2, LAYERS, padded, sequence=True)
    reference = InteractionGraph(verbose=False, constant_node=True).fit_model(
        gpt2, LAYERS, pooled, sequence=True)
    _assert_same_graph(graph, reference)
    # The means are those of the real positions alone (brute force).
    real = np.concatenate([
        record_activations(gpt2, LAYERS[:1], batch["input_ids"], verbose=False)[LAYERS[0]]
        .reshape(-1, 32) for batch in pooled
    ])
    np.testing.assert_allclose(graph.bases_[0].mean_, real.mean(0), rtol=0, atol=1e-12)
    # Without the mask the padding would count: the comparison above can fail.
    unmasked = {"input_ids": padded["input_ids"], "attention_mask": torch.ones_like(tokens)}
    other = InteractionGraph(verbose=False).fit_model(gpt2, LAYERS[:2], unmasked, sequence=True)
    assert np.abs(other.bases_[0].mean_ - real.mean(0)).max() > 1e-3


@settings(max_examples=3, deadline=None, derandomize=True)
@given(junk=st.integers(0, 49), length=st.integers(2, 5))
def test_padded_tokens_do_not_matter(gpt2, tokens, junk, length):
    mask = torch.ones_like(tokens[:6])
    mask[3:, length:] = 0
    graphs = [
        InteractionGraph(verbose=False).fit_model(
            gpt2, LAYERS[:2], {"input_ids": torch.where(mask == 1, tokens[:6], pad),
                               "attention_mask": mask}, sequence=True)
        for pad in (0, junk)
    ]
    _assert_same_graph(*graphs)


def test_model_output_dicts_give_their_first_value(gpt2, tokens):
    acts, jacs = collect(gpt2, ["transformer.h.0", ""], tokens[:3], sequence=True,
                         verbose=False, dtype="float32")
    with torch.no_grad():
        logits = gpt2(tokens[:3]).logits
    np.testing.assert_allclose(acts[1], logits.reshape(-1, 50).numpy(), rtol=1e-5, atol=1e-5)
    assert jacs[0].shape == (18, 6 * 50, 32)


def test_padding_is_refused_where_it_cannot_be_left_out(gpt2, padded):
    with pytest.raises(ValueError, match="collect keeps every position"):
        collect(gpt2, LAYERS, padded, sequence=True, verbose=False)
    with pytest.raises(ValueError, match="only sequence=True"):
        InteractionGraph(verbose=False).fit_model(gpt2, LAYERS, padded)
    bad = dict(padded, attention_mask=2 * padded["attention_mask"])
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        InteractionGraph(verbose=False).fit_model(gpt2, LAYERS, bad, sequence=True)
    ragged = dict(padded, attention_mask=padded["attention_mask"][:5])
    with pytest.raises(ValueError, match="same samples .axis 0."):
        InteractionGraph(verbose=False).fit_model(gpt2, LAYERS, ragged, sequence=True)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(mask=st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=1, max_size=4),
       positions=st.sampled_from([None, (-1,), (0, 2), slice(1, None)]))
def test_row_mask_follows_the_selected_positions(mask, positions):
    mask = torch.tensor(mask)
    layer = _Layer("h", "h", "output", None, positions)
    n = mask.shape[0]
    index = list(range(5)) if positions is None else (
        list(range(5))[positions] if isinstance(positions, slice) else
        [p % 5 for p in positions])
    shape = (n, len(index), 3)
    given = None if bool(mask.all()) else mask
    if positions is not None and bool((mask.any(1) & ~mask[:, index].any(1)).any()):
        # A sequence whose selected positions are all padding would drop out: refused.
        with pytest.raises(ValueError, match="selects positions that are padding"):
            _row_mask(layer, given, shape, True)
        return
    rows = _row_mask(layer, given, shape, True)
    expected = mask[:, index].reshape(-1)
    assert (expected.all() and rows is None) or torch.equal(rows, expected)


def test_padding_mask_is_none_without_padding():
    assert padding_mask({"input_ids": torch.zeros(2, 3)}) is None
    assert padding_mask({"attention_mask": torch.ones(2, 3)}) is None
    assert padding_mask(torch.zeros(2, 3)) is None
