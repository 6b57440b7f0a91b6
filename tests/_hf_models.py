"""Tiny random-init transformers models (GPT-2, GPT-NeoX, Llama) and graph comparisons.

Float64, two blocks, weights of order 1 so that every term of a block counts
and the attention weights are far from uniform; shared by the tests of the
closed forms of the blocks' MLP and attention halves.
"""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

D, VOCAB = 8, 20


def randomize(model, std=0.4, seed=0):
    """Random weights of order ``std`` (not the configs' small init), so every term counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=2, n_inner=12,
                                     vocab_size=VOCAB, n_positions=8, layer_norm_epsilon=0.1,
                                     bos_token_id=0, eos_token_id=0)
    model = randomize(transformers.GPT2Model(config).double())
    return model, ["h.0.ln_2:input", "h.0", "h.1.ln_2:input", "h.1"]


def neox(parallel=False):
    config = transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=D,
                                        num_attention_heads=2, intermediate_size=12,
                                        vocab_size=VOCAB, use_parallel_residual=parallel,
                                        layer_norm_eps=0.1, bos_token_id=0, eos_token_id=0)
    model = randomize(transformers.GPTNeoXModel(config).double())
    return model, ["layers.0.post_attention_layernorm:input", "layers.0",
                   "layers.1.post_attention_layernorm:input", "layers.1"]


def llama():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=D, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=12,
                                      vocab_size=VOCAB, rms_norm_eps=0.1, bos_token_id=0,
                                      eos_token_id=0)
    model = randomize(transformers.LlamaModel(config).double())
    return model, ["layers.0.post_attention_layernorm:input", "layers.0",
                   "layers.1.post_attention_layernorm:input", "layers.1"]


MODELS = {"gpt2": gpt2, "neox": neox, "llama": llama}
# LlamaRMSNorm normalises in float32 even in a float64 model: the generic products
# differentiate that rounding, the closed form the exact norm (within float32's eps).
TOL = {"gpt2": 1e-9, "neox": 1e-9, "llama": 1e-5}


def assert_same_graph(auto, generic, tol=1e-9):
    """Same spectra, components up to sign, and edges (squared attributions: sign-free)."""
    for b, ref in zip(auto.bases_, generic.bases_):
        np.testing.assert_allclose(b.jacobian_gram_, ref.jacobian_gram_, rtol=tol,
                                   atol=tol * np.abs(ref.jacobian_gram_).max())
        np.testing.assert_allclose(b.interaction_strengths_, ref.interaction_strengths_,
                                   rtol=tol, atol=tol * ref.interaction_strengths_.max())
        s = np.sign(np.sum(b.components_ * ref.components_, axis=1))
        # Components move by the Gram's error over the eigenvalue gaps.
        np.testing.assert_allclose(b.components_, s[:, None] * ref.components_, rtol=0,
                                   atol=max(1e-7, 10 * tol))
    for E, ref in zip(auto.edges_, generic.edges_):
        np.testing.assert_allclose(E, ref, rtol=0, atol=tol * np.abs(ref).max())


def add_hook(module, path, kind="forward"):
    """Register a hook that changes nothing on ``module.get_submodule(path)``.

    ``kind``: ``"forward"``, ``"pre"`` (a forward pre-hook) or ``"kwargs"`` (a
    forward hook with keyword arguments). Recognition must refuse the module all the
    same: a hook may change the values.
    """
    target = module.get_submodule(path)
    if kind == "forward":
        target.register_forward_hook(lambda m, i, o: o)
    elif kind == "pre":
        target.register_forward_pre_hook(lambda m, i: i)
    else:
        target.register_forward_hook(lambda m, a, k, o: o, with_kwargs=True)
