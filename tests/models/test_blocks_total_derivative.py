"""A section's Jacobian is the total derivative of its output layer w.r.t. its input layer.

A layer ``"<module>:input"`` is the value the module reads; a pre-norm block
also keeps that value for its residual add (``h + mlp(ln_2(h))``). Replacing
it only where the module reads it would drop the identity path; every
Jacobian here is compared with ``torch.func.jacrev`` of the true map.
"""

import os

import pytest
import torch
from torch import nn

from sklearn_lib.collect import (
    collect,
    section_function,
    section_vjp_products,
    sequence_jacobians_to_rows,
)
from sklearn_lib.models._model import _parse_layers
from sklearn_lib.models._vjp import _section_rows

TOL = dict(rtol=1e-12, atol=1e-12)


class TwoUses(nn.Module):
    """``fc1``'s input is used again after ``fc1``: ``y = fc2(tanh(fc1(h))) + h * h``."""

    def __init__(self, d=4):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(3, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.fc0(x)
        return self.fc2(torch.tanh(self.fc1(h))) + h * h


def _two_uses():
    torch.manual_seed(0)
    return TwoUses().double().eval()


def test_input_layer_used_twice_gives_the_total_derivative():
    net, x = _two_uses(), torch.randn(5, 3, dtype=torch.float64)
    h = net.fc0(x).detach()
    true = torch.func.vmap(torch.func.jacrev(
        lambda t: net.fc2(torch.tanh(net.fc1(t))) + t * t))(h)
    _, J = section_vjp_products(net, "fc1:input", "", x)
    torch.testing.assert_close(J, true, **TOL)
    # The section as a function, and the full Jacobians that collect writes.
    f = section_function(net, "fc1:input", "", x)
    torch.testing.assert_close(f(h), net(x), **TOL)
    acts, jacs = collect(net, ["fc1:input", ""], x, jacobians=True)
    torch.testing.assert_close(torch.as_tensor(jacs[0]), true, **TOL)
    torch.testing.assert_close(torch.as_tensor(acts[0]), h, **TOL)


def test_use_before_the_module_is_refused():
    class Before(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.fc1 = nn.Linear(3, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc0(x)
            skip = h * 2  # computed before fc1 reads h: no replacement can reach it
            return self.fc1(h) + skip

    net, x = Before().double(), torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="uses the value of 'fc1:input' before"):
        section_vjp_products(net, "fc1:input", "", x)
    # Metadata reads are no uses: the output layer of the producing module works.
    _, J = section_vjp_products(net, "fc0", "", x)
    torch.testing.assert_close(J, (net.fc1.weight + 2 * torch.eye(4)).expand(5, 4, 4), **TOL)


def test_other_view_of_the_storage_is_refused():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc0, self.fc1 = nn.Linear(3, 4), nn.Linear(2, 2)

        def forward(self, x):
            h = self.fc0(x)
            a, b = h[:, :2], h[:, 2:]
            return self.fc1(a) + b * a.sum(1, keepdim=True)  # ``b`` shares ``h``'s memory

    net, x = Split().double(), torch.randn(5, 3, dtype=torch.float64)
    # ``a`` itself is substituted after fc1 reads it, but the view ``b`` of the same
    # memory is not ``a``: the replacement cannot reach it.
    with pytest.raises(ValueError, match="another tensor on the memory of 'fc1:input'"):
        section_vjp_products(net, "fc1:input", "", x)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, n_inner=12, vocab_size=20,
                                     n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).double().eval()


def test_gpt2_mid_block_section_keeps_the_residual_path():
    # The regression: "h.0.ln_2:input" -> "h.0" is h + mlp(ln_2(h)), not mlp(ln_2(h)).
    model = _gpt2()
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    acts, J = section_vjp_products(model, "h.0.ln_2:input", "h.0", ids, sequence=True)
    block = model.h[0]
    X = acts.reshape(2, 5, 8)
    true = torch.func.vmap(torch.func.jacrev(lambda t: t + block.mlp(block.ln_2(t))))(X)
    torch.testing.assert_close(J, sequence_jacobians_to_rows(true), **TOL)
    # The batched core under torch.func.vjp + vmap, with stochastic sources off and
    # a V of a few directions.
    V = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a, b = _parse_layers(model, ["h.0.ln_2:input", "h.0"], "output")
    rows = _section_rows(model, a, b, ids, X, V, sequence=True, max_vectors=2, check=True)
    # Row (x, s), direction t * k + c: sum_i V[i, c] J[x, t, i, s, :].
    expected = torch.einsum("xtisj,ic->xstcj", true, V).reshape(10, 5 * 3, 8)
    torch.testing.assert_close(rows, expected, **TOL)


def test_gpt2_block_output_to_next_mid_block():
    # From a block's output (an output layer) to the next block's residual point.
    model = _gpt2()
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    acts, J = section_vjp_products(model, "h.0", "h.1.ln_2:input", ids, sequence=True)
    block = model.h[1]
    X = acts.reshape(2, 5, 8)

    def true_map(t):
        return t + block.attn(block.ln_1(t[None]))[0][0]

    true = torch.stack([torch.func.jacrev(true_map)(X[i]) for i in range(2)])
    torch.testing.assert_close(J, sequence_jacobians_to_rows(true), **TOL)
