"""Recognition of transformers attention halves (``models._attention_detect``).

Each recognised section is checked against the transformers model itself: tiny
random-init configs in float64, the section's input and output recorded by
forward hooks on a real forward (the block's input or the previous block's
output, and the input of the block's second norm), and the detected
:class:`NormAttention` run on the recorded input. Tolerance: relative ``1e-12``,
except under eager attention for GPT-NeoX and the Llama family, whose softmax
transformers computes in float32 (relative ``1e-6``; the formula computes it in
float32 too, and the rounding check of a fit passes). Rotary angles and
LlamaRMSNorm are float32 in both the model and the formula.
"""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from _hf_models import add_hook, randomize

from sklearn_lib.models._attention_detect import (
    attention_half_section,
    detect_attention_half,
    why_not_attention_half,
)
from sklearn_lib.models._model import _parse_layers

D, HEADS, VOCAB, T = 32, 4, 30, 7
TOL = 1e-12
# Eager attention of GPT-NeoX / Llama: softmax(..., dtype=float32) in a float64 model.
TOL_FLOAT32_SOFTMAX = 1e-6


def _build(cls, config, impl):
    model = cls._from_config(config, attn_implementation=impl)
    return randomize(model.double().eval(), std=0.3)


def gpt2(impl, **kwargs):
    config = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=HEADS, vocab_size=VOCAB,
                                     n_positions=16, layer_norm_epsilon=0.1,
                                     bos_token_id=0, eos_token_id=0, **kwargs)
    return _build(transformers.GPT2Model, config, impl), "h", "ln_2"


def neox(impl, **kwargs):
    kwargs.setdefault("use_parallel_residual", False)
    config = transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=2 * D,
                                        num_attention_heads=HEADS, intermediate_size=40,
                                        vocab_size=VOCAB, layer_norm_eps=0.1, **kwargs)
    return (_build(transformers.GPTNeoXModel, config, impl), "layers",
            "post_attention_layernorm")


def llama(impl, **kwargs):
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=D,
                                      num_attention_heads=HEADS, intermediate_size=40,
                                      vocab_size=VOCAB, rms_norm_eps=0.1, **kwargs)
    # The causal LM, so that layer names carry the prefix "model.".
    return (_build(transformers.LlamaForCausalLM, config, impl), "model.layers",
            "post_attention_layernorm")


def _llama_like(cls_config, cls_model):
    def make(impl, **kwargs):
        config = cls_config(num_hidden_layers=2, hidden_size=D, num_attention_heads=HEADS,
                            num_key_value_heads=2, intermediate_size=40, vocab_size=VOCAB,
                            rms_norm_eps=0.1, **kwargs)
        return _build(cls_model, config, impl), "layers", "post_attention_layernorm"
    return make


def mistral(impl):
    return _llama_like(transformers.MistralConfig, transformers.MistralModel)(
        impl, sliding_window=None)


def qwen2(impl):
    return _llama_like(transformers.Qwen2Config, transformers.Qwen2Model)(impl)


CASES = {
    "gpt2": (gpt2, {}),
    "gpt2 inverse layer idx": (gpt2, {"scale_attn_by_inverse_layer_idx": True}),
    "gpt2 unscaled": (gpt2, {"scale_attn_weights": False}),
    "gpt2 reorder_and_upcast (sdpa ignores it)": (gpt2, {"reorder_and_upcast_attn": True}),
    "neox rotary_pct 0.25": (neox, {"rotary_pct": 0.25}),
    "neox rotary_pct 1.0": (neox, {"rotary_pct": 1.0}),
    "neox no attention bias": (neox, {"attention_bias": False}),
    "llama gqa": (llama, {"num_key_value_heads": 2}),
    "llama gqa attention_bias": (llama, {"num_key_value_heads": 1, "attention_bias": True}),
    "llama head_dim": (llama, {"head_dim": 4, "attention_bias": True}),
    "llama yarn": (llama, {"rope_parameters": {"rope_type": "yarn", "factor": 2.0,
                                               "rope_theta": 100.0}}),
    "mistral": (mistral, None),
    "qwen2": (qwen2, None),
}


def _make(name, impl):
    builder, kwargs = CASES[name]
    if kwargs is None:
        return builder(impl)
    return builder(impl, **kwargs)


def _tolerance(name, impl):
    return TOL if impl == "sdpa" or name.startswith("gpt2") else TOL_FLOAT32_SOFTMAX


def _record(model, a, b, ids, mask=None):
    """The activations at layers ``a`` and ``b`` in one forward of ``model``."""
    seen = {}

    def keep(key):
        def hook(module, args, *output):
            # Returns None: a hook's result would replace the module's arguments.
            seen[key] = output[0] if output else args[0]
        return hook

    handles = []
    for key, layer in (("a", a), ("b", b)):
        if layer.kind == "input":
            handles.append(layer.module.register_forward_pre_hook(keep(key)))
        else:
            handles.append(layer.module.register_forward_hook(keep(key)))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return seen["a"], seen["b"]


def _ids(seed=3):
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("start", ["input", "previous"])
@pytest.mark.parametrize("name", list(CASES))
def test_section_matches_the_model(name, impl, start):
    if name.startswith("gpt2 reorder") and impl == "eager":
        pytest.skip("refused under eager attention (test_refused_with_a_reason)")
    model, blocks, norm2 = _make(name, impl)
    first = f"{blocks}.1:input" if start == "input" else f"{blocks}.0"
    a, b = _parse_layers(model, [first, f"{blocks}.1.{norm2}:input"], "output")
    section = attention_half_section(model, a, b)
    assert section is not None, why_not_attention_half(model, a, b)
    X, Y = _record(model, a, b, _ids())
    assert section.fits(tuple(X.shape[1:]), tuple(Y.shape[1:]))
    assert _rel(section.forward(X), Y) < _tolerance(name, impl)
    # The verification a fit runs on every batch passes too (the float32 softmax of
    # eager GPT-NeoX / Llama is modelled: softmax_dtype).
    assert section.mismatch(X, Y) is None
    assert section.softmax_dtype == (torch.float32 if impl == "eager"
                                     and not name.startswith("gpt2") else None)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["gpt2", "neox rotary_pct 0.25", "llama gqa attention_bias",
                                  "qwen2"])
def test_float32_model_passes_the_rounding_check(name, impl):
    # In float32 the eager float32 softmax is the model's own dtype: the recorded rows are
    # the formula to rounding (NormAttention.mismatch, 1e3 eps), as verification requires.
    model, blocks, norm2 = _make(name, impl)
    model = model.float()
    a, b = _parse_layers(model, [f"{blocks}.0", f"{blocks}.1.{norm2}:input"], "output")
    section = attention_half_section(model, a, b)
    X, Y = _record(model, a, b, _ids())
    assert X.dtype == torch.float32
    assert section.mismatch(X, Y) is None


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["gpt2", "neox rotary_pct 0.25", "llama gqa attention_bias",
                                  "qwen2"])
def test_padded_batch_matches_on_real_positions(name, side, impl):
    # Block 0: in float64, transformers' eager float32 softmax turns the fully masked rows
    # of left padding into NaN, which the next block's values carry to every position.
    model, blocks, norm2 = _make(name, impl)
    a, b = _parse_layers(model, [f"{blocks}.0:input", f"{blocks}.0.{norm2}:input"], "output")
    section = attention_half_section(model, a, b)
    mask = torch.ones(2, T, dtype=torch.long)
    if side == "left":
        mask[0, :3] = 0
    else:
        mask[1, -2:] = 0
    X, Y = _record(model, a, b, _ids(), mask)
    keep = mask.bool()
    assert _rel(section.forward(X, mask)[keep], Y[keep]) < _tolerance(name, impl)
    if _tolerance(name, impl) == TOL:
        assert section.mismatch(X, Y, mask) is None
    # Without the mask the real positions would attend to the left padding before them
    # (right padding comes after them: the causal mask already hides it).
    if side == "left":
        assert _rel(section.forward(X)[keep], Y[keep]) > 1e-3


def test_scale_follows_the_gpt2_flags():
    d_head = D // HEADS
    for kwargs, scale in (({}, d_head ** -0.5), ({"scale_attn_weights": False}, 1.0),
                          ({"scale_attn_by_inverse_layer_idx": True}, d_head ** -0.5 / 2)):
        model, _, _ = gpt2("sdpa", **kwargs)
        assert detect_attention_half(model.h[1]).section.scale == pytest.approx(scale)


def test_rotary_width_follows_rotary_pct():
    for pct, rot_dim in ((0.25, 4), (1.0, 16)):
        model, _, _ = neox("sdpa", rotary_pct=pct)
        assert detect_attention_half(model.layers[0], model).section.rotary.rot_dim == rot_dim


def _sliding_qwen2():
    """A Qwen2 model whose layer 0 attends to all keys and layer 1 through a window."""
    config = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=D,
                                      num_attention_heads=HEADS, num_key_value_heads=2,
                                      intermediate_size=40, vocab_size=VOCAB,
                                      use_sliding_window=True, sliding_window=4,
                                      max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    return transformers.Qwen2Model(config).double().eval()


def test_full_attention_layer_of_a_sliding_qwen2_is_recognised():
    model = _sliding_qwen2()
    assert detect_attention_half(model.layers[0], model)
    assert "sliding" in detect_attention_half(model.layers[1], model).reason


# ------------------------------------------------------------------ refusals
def _gpt2_block():
    model, _, _ = gpt2("sdpa")
    return model.h[1], model


def _hooked(path, kind="forward"):
    def make():
        block, model = _gpt2_block()
        add_hook(block, path, kind)
        return block, model
    return make


def _instance_forward(path):
    def make():
        block, model = _gpt2_block()
        module = block.get_submodule(path)
        module.forward = lambda *a, **k: type(module).forward(module, *a, **k)
        return block, model
    return make


def _subclass():
    class MyAttention(transformers.models.gpt2.modeling_gpt2.GPT2Attention):
        def forward(self, *args, **kwargs):
            out, weights = super().forward(*args, **kwargs)
            return 2 * out, weights

    block, model = _gpt2_block()
    block.attn.__class__ = MyAttention
    return block, model


def _training():
    config = transformers.GPT2Config(n_layer=1, n_embd=D, n_head=HEADS, vocab_size=VOCAB,
                                     attn_pdrop=0.1, resid_pdrop=0.0)
    model = transformers.GPT2Model(config).double().eval()
    model.h[0].attn.train()
    return model.h[0], model


def _llama_model(impl="sdpa", **kwargs):
    model, _, _ = llama(impl, **kwargs)
    return model.model.layers[0], model


def _rotary_hooked():
    block, model = _llama_model()
    model.model.rotary_emb.register_forward_hook(lambda m, i, o: o)
    return block, model


def _flex():
    block, model = _llama_model()
    model.set_attn_implementation("flex_attention")
    return block, model


def _qwen2_sliding():
    model = _sliding_qwen2()
    return model.layers[1], model


def _mistral_sliding():
    config = transformers.MistralConfig(num_hidden_layers=1, hidden_size=D,
                                        num_attention_heads=HEADS, num_key_value_heads=2,
                                        intermediate_size=40, vocab_size=VOCAB, sliding_window=4)
    model = transformers.MistralModel(config).double().eval()
    return model.layers[0], model


def _gpt2_config_block(**kwargs):
    def make():
        config = transformers.GPT2Config(n_layer=1, n_embd=D, n_head=HEADS, vocab_size=VOCAB,
                                         **kwargs)
        model = transformers.GPT2Model._from_config(config, attn_implementation="eager")
        model = model.double().eval()
        return model.h[0], model
    return make


def _neox_parallel():
    model, _, _ = neox("sdpa", use_parallel_residual=True)
    return model.layers[0], model


def _llama_attention_training():
    block, model = _llama_model(attention_dropout=0.1)
    block.self_attn.train()
    return block, model


def _kernelized():
    block, model = _llama_model()
    model._use_kernels = True
    return block, model


def _masks_for_another_implementation():
    block, model = _llama_model()
    block.self_attn.config = copy.deepcopy(model.config)
    block.self_attn.config._attn_implementation = "eager"
    return block, model


REFUSED = {
    "block forward hook": (_hooked(""), "hook"),
    "ln_1 pre-hook": (_hooked("ln_1", "pre"), "hook"),
    "c_attn hook with kwargs": (_hooked("attn.c_attn", "kwargs"), "hook"),
    "rotary_emb hook": (_rotary_hooked, "hook"),
    "instance forward on block": (_instance_forward(""), "instance"),
    "instance forward on attn": (_instance_forward("attn"), "instance"),
    "attention subclass": (_subclass, "not the GPT2Attention"),
    "attention dropout in training": (_training, "training"),
    "llama attention dropout in training": (_llama_attention_training, "training"),
    "kernelized model": (_kernelized, "kernelized"),
    "masks for another implementation": (_masks_for_another_implementation, "masks"),
    "neox parallel residual": (_neox_parallel, "parallel"),
    "dynamic rope": (lambda: _llama_model(rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0}), "'dynamic'"),
    "flex attention": (_flex, "'flex_attention'"),
    "rotary block without its model": (lambda: (_llama_model()[0], None), "pass the model"),
    "qwen2 sliding layer": (_qwen2_sliding, "sliding"),
    "mistral sliding window": (_mistral_sliding, "sliding window"),
    "gpt2 reorder_and_upcast under eager": (
        _gpt2_config_block(reorder_and_upcast_attn=True), "float32"),
    "gpt2 cross-attention": (_gpt2_config_block(add_cross_attention=True), "cross-attention"),
    "plain linear": (lambda: (nn.Linear(3, 3), None), "not a recognised"),
    "not a module": (lambda: ("GPT2Block", None), "torch.nn.Module"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_a_reason(name):
    make, words = REFUSED[name]
    block, model = make()
    match = detect_attention_half(block, model)
    assert not match and match.section is None
    assert words in match.reason


def test_global_hook_refused():
    block, model = _gpt2_block()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        match = detect_attention_half(block, model)
    finally:
        handle.remove()
    assert not match and "global" in match.reason
    assert detect_attention_half(block, model)


# ------------------------------------------------------------------ layer names
def _lm():
    config = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=HEADS, vocab_size=VOCAB,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double().eval()


@pytest.mark.parametrize("layers, found", [
    (["transformer.h.1:input", "transformer.h.1.ln_2:input"], True),
    (["transformer.h.0", "transformer.h.1.ln_2:input"], True),
    (["transformer.h.0:input", "transformer.h.0.ln_2:input"], True),
    (["transformer.h.0:input", "transformer.h.1.ln_2:input"], False),  # two blocks
    (["transformer.drop", "transformer.h.0.ln_2:input"], False),  # not a block
    (["transformer.h.1:input", "transformer.h.1.ln_2"], False),  # the norm's output
    (["transformer.h.1:input", "transformer.h.1.mlp:input"], False),  # after ln_2
    (["transformer.h.1.ln_1", "transformer.h.1.ln_2:input"], False),  # after ln_1
])
def test_section_from_layer_names(layers, found):
    model = _lm()
    a, b = _parse_layers(model, layers, "output")
    assert (attention_half_section(model, a, b) is not None) is found
    assert why_not_attention_half(model, a, b) is None


def test_why_not_names_the_obstacle():
    model = _lm()
    layers = ["transformer.h.1:input[-1]", "transformer.h.1.ln_2:input[-1]"]
    a, b = _parse_layers(model, layers, "output")
    assert attention_half_section(model, a, b) is None
    assert "all positions" in why_not_attention_half(model, a, b)

    a, b = _parse_layers(model, ["transformer.h.0", "transformer.h.1.ln_2:input"], "output")
    handle = model.transformer.h[1].attn.register_forward_hook(lambda m, i, o: o)
    assert attention_half_section(model, a, b) is None
    assert "hook" in why_not_attention_half(model, a, b)
    handle.remove()
    handle = model.transformer.h[1].ln_2.register_forward_pre_hook(lambda m, i: i)
    assert "hook" in why_not_attention_half(model, a, b)
    handle.remove()
    model.transformer.h[0].register_forward_hook(lambda m, i, o: 2 * o)
    assert attention_half_section(model, a, b) is None
    assert "hook" in why_not_attention_half(model, a, b)


class _Blocks(nn.Module):
    """GPT-2 blocks in a ModuleList of a module of our own: its forward is unknown."""

    def __init__(self):
        super().__init__()
        config = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=HEADS)
        self.blocks = nn.ModuleList(
            transformers.models.gpt2.modeling_gpt2.GPT2Block(config, layer_idx=i)
            for i in range(2))


def test_previous_block_needs_a_recognised_model():
    model = _Blocks().double().eval()
    a, b = _parse_layers(model, ["blocks.0", "blocks.1.ln_2:input"], "output")
    assert attention_half_section(model, a, b) is None
    assert "GPT2Model" in why_not_attention_half(model, a, b)
    a, b = _parse_layers(model, ["blocks.1:input", "blocks.1.ln_2:input"], "output")
    assert attention_half_section(model, a, b) is not None
