"""Closed forms of transformer MLP halves (``models._blocks``) against the real modules.

Every Jacobian is compared with ``torch.func.jacrev`` of the transformers module
itself, built from a tiny random-init config in float64. A block's MLP section
starts at the residual stream after attention, which the block computes
internally; the attention is replaced by a stub whose output makes that value
the variable, so that the norm, the MLP and the residual add run the block's
own ``forward``.
"""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from _hf_models import add_hook, randomize

from sklearn_lib.models._block_detect import detect_block
from sklearn_lib.models._blocks import BlockState, accumulator
from sklearn_lib.models._norms import Norm
from sklearn_lib.sources._edges import Workspace

D = 12
TOL = 1e-12


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _rows(n=6, seed=1, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5 + 0.3


def gpt2_block(activation="gelu_new"):
    config = transformers.GPT2Config(n_layer=1, n_embd=D, n_head=2, n_inner=20, vocab_size=30,
                                     n_positions=8, layer_norm_epsilon=0.1,
                                     activation_function=activation)
    return randomize(transformers.GPT2Model(config).double().eval(), std=0.5).h[0]


def neox_layer(parallel=False):
    config = transformers.GPTNeoXConfig(num_hidden_layers=1, hidden_size=D,
                                        num_attention_heads=2, intermediate_size=20,
                                        vocab_size=30, use_parallel_residual=parallel,
                                        layer_norm_eps=0.1)
    return randomize(transformers.GPTNeoXModel(config).double().eval(), std=0.5).layers[0]


def llama_layer(mlp_bias=False, act="silu"):
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=D, num_attention_heads=2,
                                      intermediate_size=16, vocab_size=30, rms_norm_eps=0.1,
                                      mlp_bias=mlp_bias, hidden_act=act)
    return randomize(transformers.LlamaModel(config).double().eval(), std=0.5).layers[0]


def llama_layer_exact_norm():
    """A Llama layer whose post-attention norm is torch's RMSNorm (float64 throughout)."""
    layer = llama_layer()
    norm = nn.RMSNorm(D, eps=0.1).double()
    with torch.no_grad():
        norm.weight.copy_(layer.post_attention_layernorm.weight)
    layer.post_attention_layernorm = norm
    return layer


class _Stub(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, *args, **kwargs):
        return self.out, None


ATTENTION = {"GPT2Block": "attn", "GPTNeoXLayer": "attention", "LlamaDecoderLayer": "self_attn"}


def real_section(block):
    """``mid -> block output`` rows (N, d) -> (N, d), run by the block's own forward."""
    block = copy.deepcopy(block)
    name = ATTENTION[type(block).__name__]
    x = _rows(seed=7)  # the block's input: only the residual add before the MLP reads it

    def f(mid):
        # attention output + residual == mid (to rounding; exactly in the derivative).
        setattr(block, name, _Stub((mid - x[: len(mid)])[None]))
        kwargs = {"position_embeddings": None} if name == "self_attn" else {}
        return block(x[None, : len(mid)], **kwargs)[0]

    return f


def jacrev_rows(f, X):
    """Per-row Jacobians (N, d_out, d_in) of a row-wise function, by ``torch.func.jacrev``."""
    J = torch.func.jacrev(f)(X).detach()
    return torch.stack([J[i, :, i, :] for i in range(X.shape[0])])


BLOCKS = {
    "gpt2-gelu_new": lambda: gpt2_block("gelu_new"),
    "gpt2-relu": lambda: gpt2_block("relu"),
    "gpt2-gelu": lambda: gpt2_block("gelu"),
    "neox": neox_layer,
    "llama-exact-norm": llama_layer_exact_norm,
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_jacobian_matches_jacrev_of_the_real_block(name):
    block = BLOCKS[name]()
    match = detect_block(block)
    assert match, match.reason
    assert match.output == ":output" and match.input.endswith(":input")
    X = _rows()
    J = jacrev_rows(real_section(block), X)
    assert _rel(match.section.jacobians(X), J) < TOL


def test_llama_rmsnorm_float32_arithmetic():
    """LlamaRMSNorm normalises in float32: its autograd Jacobian is float32-accurate.

    The closed form is the exact derivative of the formula; it equals the real
    layer's Jacobian to float32 rounding, and the layer with a float64 norm
    (same weights) to 1e-12 (the test above). The recorded output still passes
    the check against the formula (computed in the norm's own arithmetic).
    """
    block = llama_layer()
    section = detect_block(block).section
    assert section.norm.compute_dtype == torch.float32
    X = _rows()
    real = real_section(block)
    err = _rel(section.jacobians(X), jacrev_rows(real, X))
    assert 1e-12 < err < 1e-5
    assert section.verify(X, real(X).detach())


MLPS = {
    "GPT2MLP": lambda: gpt2_block().mlp,
    "GPTNeoXMLP": lambda: neox_layer().mlp,
    "LlamaMLP": lambda: llama_layer().mlp,
    "LlamaMLP-bias-gelu": lambda: llama_layer(mlp_bias=True, act="gelu_new").mlp,
}


@pytest.mark.parametrize("name", list(MLPS))
def test_mlp_jacobian_matches_jacrev_of_the_real_mlp(name):
    mlp = MLPS[name]()
    match = detect_block(mlp)
    assert match, match.reason
    assert (match.input, match.output) == (":input", ":output")
    assert not match.section.residual and match.section.norm is None
    X = _rows()
    assert _rel(match.section.jacobians(X), jacrev_rows(mlp, X)) < TOL
    assert match.section.verify(X, mlp(X).detach())


NORMS = {
    "layernorm": lambda: nn.LayerNorm(D, eps=0.1),
    "layernorm-default-eps": lambda: nn.LayerNorm(D),
    "layernorm-no-affine": lambda: nn.LayerNorm(D, eps=0.3, elementwise_affine=False),
    "layernorm-no-bias": lambda: nn.LayerNorm(D, eps=0.1, bias=False),
    "rmsnorm": lambda: nn.RMSNorm(D, eps=0.1),
    "rmsnorm-eps-none": lambda: nn.RMSNorm(D),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_norm_jacobian_matches_jacrev(name):
    from sklearn_lib.models._block_detect import _norm

    module = randomize(NORMS[name]().double(), std=0.5, seed=3)
    norm = _norm(module)
    X = _rows(n=5) * 0.2  # small rows, so that eps matters
    assert _rel(norm.jacobians(X), jacrev_rows(module, X)) < TOL
    assert _rel(norm.forward(X), module(X).detach()) < TOL


def test_norm_eps_and_gain_matter():
    """The Jacobian changes with eps and gamma: the comparisons above can fail."""
    X = _rows(n=3) * 0.2
    gamma = torch.linspace(0.5, 2.0, D, dtype=torch.float64)
    base = Norm("layer", gamma, None, 0.1).jacobians(X)
    assert _rel(Norm("layer", gamma, None, 0.0).jacobians(X), base) > 1e-3
    assert _rel(Norm("layer", None, None, 0.1).jacobians(X), base) > 1e-3
    assert _rel(Norm("rms", gamma, None, 0.1).jacobians(X), base) > 1e-3


def test_llama_rmsnorm_alone():
    from sklearn_lib.models._block_detect import _norm

    module = llama_layer().post_attention_layernorm
    norm = _norm(module)
    X = _rows(n=5)
    assert _rel(norm.jacobians(X), jacrev_rows(module, X)) < 1e-5
    assert _rel(norm.forward(X), module(X).detach()) < TOL


SECTIONS = {**{f"block-{k}": v for k, v in BLOCKS.items()},
            **{f"mlp-{k}": v for k, v in MLPS.items()}}


def _section(name):
    return detect_block(SECTIONS[name]()).section


@pytest.mark.parametrize("name", list(SECTIONS))
def test_scatter_matches_explicit_jacobians(name):
    section = _section(name)
    X = _rows(n=9)
    V = torch.randn(section.d_out, 4, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    VJ = V.T @ jacrev_rows(section.forward, X)
    brute = torch.einsum("nki,nkj->ij", VJ, VJ)
    acc = accumulator(section, V)
    for rows in (X[:4], X[4:5], X[5:]):  # batches of different sizes add up
        acc.update(rows)
    assert _rel(acc.result(), brute) < TOL


@pytest.mark.parametrize("name", list(SECTIONS))
def test_edge_jacobians_match_explicit_jacobians(name):
    """``V^T J_x R`` at one point and averaged over two path points with weights."""
    section = _section(name)
    g = torch.Generator().manual_seed(4)
    X, X2 = _rows(n=5), _rows(n=5, seed=9)
    V = torch.randn(section.d_out, 3, generator=g, dtype=torch.float64)
    R = torch.randn(section.d_in, 5, generator=g, dtype=torch.float64)
    factors = section.edge_factors(V, R)
    J, J2 = (jacrev_rows(section.forward, rows) for rows in (X, X2))
    out = section.edge_jacobians(section.derivative(X), factors, Workspace())
    assert _rel(out, V.T @ J @ R) < TOL
    # The edge pass averages derivatives: s_bar = s1.mul_(w1); s_bar.add_(s2, alpha=w2).
    state = section.derivative(X).mul_(0.25).add_(section.derivative(X2), alpha=0.75)
    out = section.edge_jacobians(state, factors, Workspace())
    assert _rel(out, V.T @ (0.25 * J + 0.75 * J2) @ R) < TOL


def test_scatter_refuses_a_path_average():
    section = _section("block-gpt2-gelu_new")
    X = _rows()
    state = section.derivative(X).mul_(0.5).add_(section.derivative(X), alpha=0.5)
    assert isinstance(state, BlockState)
    acc = section.scatter_accumulator(torch.eye(D, dtype=torch.float64))
    with pytest.raises(ValueError, match="single rows"):
        acc.update_state(state)


def test_accumulator_wraps_fastpath_closed_forms():
    from sklearn_lib.models._fastpath import ResidualMLP

    g = torch.Generator().manual_seed(0)
    w_in = torch.randn(7, 5, generator=g, dtype=torch.float64)
    w_out = torch.randn(5, 7, generator=g, dtype=torch.float64)
    st = ResidualMLP(w_in, None, nn.Tanh(), w_out, None)
    X = torch.randn(8, 5, generator=g, dtype=torch.float64)
    V = torch.randn(5, 3, generator=g, dtype=torch.float64)
    VJ = V.T @ st.jacobians(st.derivative(X))
    acc = accumulator(st, V).update(X[:3]).update(X[3:])
    assert _rel(acc.result(), torch.einsum("nki,nkj->ij", VJ, VJ)) < TOL


@pytest.mark.parametrize("name", ["gpt2-gelu_new", "neox", "llama-exact-norm"])
def test_verify_accepts_the_block_and_rejects_a_change(name):
    block = BLOCKS[name]()
    section = detect_block(block).section
    X = _rows()
    Y = real_section(block)(X).detach()
    assert section.verify(X, Y)
    Y[2, 3] += 1e-6
    assert not section.verify(X, Y)


# ------------------------------------------------------------------ refusals
def _instance_forward(module):
    module.forward = lambda *a, **k: type(module).forward(module, *a, **k)
    return module


def _hook(path, kind="forward"):
    def make():
        block = gpt2_block()
        add_hook(block, path, kind)
        return block
    return make


def _parametrized():
    block = gpt2_block()
    torch.nn.utils.parametrize.register_parametrization(block.mlp.c_fc, "weight",
                                                        _Identity())
    return block


class _Identity(nn.Module):
    def forward(self, w):
        return w


def _subclass():
    class MyBlock(transformers.models.gpt2.modeling_gpt2.GPT2Block):
        def forward(self, hidden_states, **kwargs):
            return 2 * super().forward(hidden_states, **kwargs)

    block = gpt2_block()
    block.__class__ = MyBlock
    return block


def _training():
    config = transformers.GPT2Config(n_layer=1, n_embd=D, n_head=2, vocab_size=30,
                                     n_positions=8, resid_pdrop=0.1)
    return transformers.GPT2Model(config).double().train().h[0]


def _norm_replaced():
    block = gpt2_block()
    block.ln_2 = nn.Identity()
    return block


def _act_replaced():
    block = gpt2_block()
    block.mlp.act = nn.Softmax(-1)
    return block


REFUSED = {
    "block forward hook": (_hook(""), "hook"),
    "ln_2 pre-hook": (_hook("ln_2", "pre"), "hook"),
    "c_fc hook with kwargs": (_hook("mlp.c_fc", "kwargs"), "hook"),
    "instance forward on block": (lambda: _instance_forward(gpt2_block()), "instance"),
    "instance forward on mlp": (lambda: (b := gpt2_block(), _instance_forward(b.mlp))[0],
                                "instance"),
    "instance forward on ln_2": (lambda: (b := gpt2_block(), _instance_forward(b.ln_2))[0],
                                 "instance"),
    "parametrized c_fc": (_parametrized, "parametrized"),
    "subclass": (_subclass, "not a recognised"),
    "dropout in training": (_training, "training"),
    "neox parallel residual": (lambda: neox_layer(parallel=True), "parallel"),
    "norm replaced": (_norm_replaced, "not an nn.LayerNorm"),
    "softmax activation": (_act_replaced, "elementwise"),
    "plain linear": (lambda: nn.Linear(3, 3), "not a recognised"),
    "not a module": (lambda: "GPT2Block", "torch.nn.Module"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_a_reason(name):
    make, words = REFUSED[name]
    match = detect_block(make())
    assert not match and match.section is None
    assert words in match.reason


def test_global_hook_refused():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        match = detect_block(gpt2_block())
    finally:
        handle.remove()
    assert not match and "global" in match.reason
    assert detect_block(gpt2_block())


def _gpt2_model():
    config = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=2, vocab_size=30,
                                     n_positions=8)
    return transformers.GPT2LMHeadModel(config).double().eval()


@pytest.mark.parametrize("layers, found", [
    (["transformer.h.1.ln_2:input", "transformer.h.1"], True),
    (["transformer.h.1.ln_2:input[-1]", "transformer.h.1[-1]"], True),
    (["transformer.h.0.mlp:input", "transformer.h.0.mlp"], True),
    (["transformer.h.1:input", "transformer.h.1"], False),  # attention in between
    (["transformer.h.0.ln_2:input", "transformer.h.1"], False),  # another block's output
    (["transformer.h.1.ln_2:input[-1]", "transformer.h.1"], False),  # other positions
    (["transformer.h.1.ln_2", "transformer.h.1"], False),  # the norm's output
])
def test_block_section_from_layer_names(layers, found):
    from sklearn_lib.models._block_detect import block_section
    from sklearn_lib.models._model import _parse_layers

    model = _gpt2_model()
    a, b = _parse_layers(model, layers, "output")
    assert (block_section(model, a, b) is not None) is found
