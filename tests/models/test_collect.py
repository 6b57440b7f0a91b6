"""Tests for sklearn_lib.collect: hooks, sections and Jacobians of live torch models."""

import numpy as np
import pytest
import torch
from _reference import assert_same_up_to_rounding
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd.functional import jacobian
from torch.utils.data import DataLoader, TensorDataset

from sklearn_lib import InteractionGraph
from sklearn_lib.collect import (
    collect,
    prepare_model,
    record_activations,
    section_function,
    section_vjp_products,
    sequence_jacobians_to_rows,
)


# --------------------------------------------------------------------------- models
def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)
    )


class Nested(nn.Module):
    """A model whose layers live at dotted paths such as "encoder.layers.0"."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([nn.Linear(3, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.encoder.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


class AttentionBlock(nn.Module):
    """One attention layer with a residual stream and a readout of the last position."""

    def __init__(self, d_in=3, d=4, n_classes=2):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Linear(d_in, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.out = nn.Linear(d, d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):
        h = self.embed(x)
        y = self.out(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(torch.tanh(y[:, -1]))


def per_sample_jacobians(fn, X):
    """Brute force: the Jacobian of ``fn`` on each sample separately, float64."""
    return torch.stack([jacobian(lambda t: fn(t[None])[0], x) for x in X])


@pytest.fixture
def X():
    return torch.randn(13, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


# --------------------------------------------------------------------------- activations
def test_activations_equal_manual_forward(X):
    model = make_mlp()  # float32, in training mode: dropout must be switched off
    model.train()
    model[3].training = False  # a deliberately mixed mode must survive
    acts = record_activations(model, ["0", "1", "3", "5"], X, batch_size=5, verbose=False)
    ref = prepare_model(model, dtype="float64").eval()
    with torch.no_grad():
        h0 = ref[0](X)
        h3 = ref[3](ref[1](h0))
        expected = {"0": h0, "1": torch.relu(h0), "3": h3, "5": ref[5](torch.tanh(h3))}
    for name, value in expected.items():
        assert acts[name].dtype == np.float64
        np.testing.assert_allclose(acts[name], value.numpy(), rtol=0, atol=1e-14)
    assert model[0].weight.dtype == torch.float32
    assert [m.training for m in model] == [True, True, True, False, True, True]


def test_input_hooks_and_suffixes(X):
    model = make_mlp()
    acts = record_activations(model, ["1", "3:input", ":input"], X, verbose=False)
    # Exact: both hooks see one tensor of one forward pass (dropout is off in eval mode),
    # and the input hook copies the input.
    np.testing.assert_array_equal(acts["1"], acts["3:input"])
    np.testing.assert_array_equal(acts[":input"], X.numpy())
    by_rule = record_activations(model, ["3", "5:output"], X, hook="input", verbose=False)
    assert_same_up_to_rounding(by_rule["3"], acts["1"])  # a second forward pass
    assert by_rule["5:output"].shape == (13, 3)


def test_data_sources_agree(X):
    model = make_mlp()
    from_tensor = record_activations(model, ["3"], X, batch_size=4, verbose=False)["3"]
    from_numpy = record_activations(model, ["3"], X.numpy(), verbose=False)["3"]
    loader = DataLoader(TensorDataset(X, torch.zeros(len(X))), batch_size=6)
    from_loader = record_activations(model, ["3"], loader, verbose=False)["3"]
    plain_loader = DataLoader(X, batch_size=5)
    from_plain = record_activations(model, ["3"], plain_loader, verbose=False)["3"]
    for other in (from_numpy, from_loader, from_plain):
        np.testing.assert_allclose(other, from_tensor, rtol=0, atol=1e-14)


def test_nested_module_paths():
    model = Nested()
    X = torch.randn(6, 3, dtype=torch.float64)
    acts = record_activations(model, ["encoder.layers.0", "encoder.layers.1"], X, verbose=False)
    ref = prepare_model(model)
    with torch.no_grad():
        expected = ref.encoder.layers[0](X)
    np.testing.assert_allclose(acts["encoder.layers.0"], expected.numpy(), atol=1e-15)


def test_unknown_layer_lists_valid_names():
    with pytest.raises(ValueError, match="unknown layer") as info:
        record_activations(Nested(), ["encoder.layer.0"], torch.randn(2, 3), verbose=False)
    message = str(info.value)
    for name in ("'encoder.layers.0'", "'encoder.layers.1'", "'head'"):
        assert name in message


def test_module_called_twice_is_ambiguous():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.lin(self.act(self.lin(self.act(x))))

    with pytest.raises(RuntimeError, match="more than once"):
        record_activations(Reuse(), ["act", "lin"], torch.randn(2, 3), verbose=False)


# --------------------------------------------------------------------------- sections
def test_section_function_stops_early_and_is_differentiable(X):
    model = prepare_model(make_mlp()).eval()
    calls = {"later": 0, "inside": 0}
    model[5].register_forward_hook(lambda *args: calls.__setitem__("later", calls["later"] + 1))
    model[1].register_forward_hook(lambda *args: calls.__setitem__("inside", calls["inside"] + 1))
    f = section_function(model, "0", "3", X)
    h = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    out = f(h)
    assert calls == {"later": 0, "inside": 1}
    assert_same_up_to_rounding(out, model[3](torch.relu(h)))
    assert torch.autograd.gradcheck(f, (h,))


def test_full_jacobians_equal_brute_force(X):
    model = make_mlp()
    ref = prepare_model(model).eval()
    h, J = section_vjp_products(model, "0", "5", X)
    expected = per_sample_jacobians(lambda t: ref[5](torch.tanh(ref[3](torch.relu(t)))), h)
    assert J.shape == (13, 3, 5)
    torch.testing.assert_close(J, expected, rtol=0, atol=1e-12)
    # numpy in, numpy out
    h_np, J_np = section_vjp_products(model, "0", "5", X.numpy())
    np.testing.assert_allclose(J_np, expected.numpy(), rtol=0, atol=1e-12)
    assert_same_up_to_rounding(h_np, h)


@settings(max_examples=15, deadline=None)
@given(
    k=st.integers(1, 7),
    max_vectors=st.one_of(st.none(), st.integers(1, 4)),
    seed=st.integers(0, 2**16),
)
def test_vjp_products_equal_VT_J(k, max_vectors, seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    V = torch.randn(6, k, generator=gen, dtype=torch.float64)
    model = make_mlp()
    _, J = section_vjp_products(model, "1", "3", X)
    _, P = section_vjp_products(model, "1", "3", X, V, max_vectors=max_vectors)
    torch.testing.assert_close(P, V.T @ J, rtol=0, atol=1e-12)


def test_jacobians_of_nested_model():
    model = Nested()
    X = torch.randn(5, 3, dtype=torch.float64)
    ref = prepare_model(model)
    h, J = section_vjp_products(model, "encoder.layers.0", "head", X)
    section = lambda t: ref.head(torch.tanh(ref.encoder.layers[1](torch.tanh(t))))  # noqa: E731
    expected = per_sample_jacobians(section, h)
    torch.testing.assert_close(J, expected, rtol=0, atol=1e-12)


def test_non_differentiable_sections_raise():
    class ArgMax(nn.Module):
        def forward(self, x):
            return x.argmax(-1, keepdim=True)

    class Detach(nn.Module):
        def forward(self, x):
            return x.detach()

    X = torch.randn(4, 3)
    argmax_model = nn.Sequential(nn.Linear(3, 3), ArgMax())
    with pytest.raises(ValueError, match=r"section '0' -> '1' is not differentiable.*int64"):
        section_vjp_products(argmax_model, "0", "1", X)
    detach_model = nn.Sequential(nn.Linear(3, 3), Detach(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"section '0' -> '2' is not differentiable"):
        collect(detach_model, ["0", "2"], X, verbose=False)
    tokens = torch.randint(0, 5, (4, 2))
    embed_model = nn.Sequential(nn.Embedding(5, 3), nn.Tanh())
    with pytest.raises(ValueError, match=r"section ':input' -> '1' is not differentiable"):
        section_vjp_products(embed_model, ":input", "1", tokens)
    # Integer inputs are fine when the section starts after the embedding.
    _, J = section_vjp_products(embed_model, "0", "1", tokens, sequence=True)
    assert J.shape == (8, 6, 3)


def test_layers_out_of_order_raise(X):
    with pytest.raises(ValueError, match="runs before"):
        section_vjp_products(make_mlp(), "3", "0", X)


def test_models_overriding_to_are_converted_with_torchs_own():
    class OwnTo(nn.Linear):  # like TransformerLens' HookedTransformer.to(device_or_dtype)
        def to(self, device_or_dtype):
            raise AssertionError("the model's own .to must not be called")

    model = OwnTo(3, 2)
    prepared = prepare_model(model, dtype="float64")
    assert prepared is not model and prepared.weight.dtype == torch.float64
    assert model.weight.dtype == torch.float32
    x = torch.randn(4, 3, dtype=torch.float64)
    assert_same_up_to_rounding(prepared(x), x @ model.weight.double().T + model.bias.double())


@pytest.mark.parametrize("not_a_module", [lambda x: x, object(), "model"])
def test_only_torch_modules_are_accepted(not_a_module, X):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        prepare_model(not_a_module)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        collect(not_a_module, ["0", "1"], X, verbose=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        InteractionGraph(verbose=False).fit_model(not_a_module, ["0", "1"], X)


def test_user_model_untouched(X):
    model = make_mlp()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    collect(model, ["0", "3", "5"], X, verbose=False)
    assert model.training and all(m.training for m in model)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # exact: never written
    model64 = model.double()
    assert prepare_model(model64) is model64


# --------------------------------------------------------------------------- collect
def test_collect_matches_sections_and_is_batch_invariant(X):
    model = make_mlp()
    layers = [":input", "1", "3", "5"]
    acts, jacs = collect(model, layers, X, batch_size=4, verbose=False)
    acts_big, jacs_big = collect(model, layers, X, batch_size=100, verbose=False)
    assert [a.shape for a in acts] == [(13, 4), (13, 5), (13, 6), (13, 3)]
    assert [j.shape for j in jacs] == [(13, 5, 4), (13, 6, 5), (13, 3, 6)]
    for a, b in zip(acts + jacs, acts_big + jacs_big):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)
    for (a, b), J in zip(zip(layers[:-1], layers[1:]), jacs):
        h, expected = section_vjp_products(model, a, b, X.numpy())
        np.testing.assert_allclose(J, expected, rtol=0, atol=1e-13)
    only_acts, no_jacs = collect(model, layers, X, jacobians=False, verbose=False)
    assert no_jacs == []
    # Another batch size sums in another order: MKL's AVX-512 path moves the last bit.
    assert_same_up_to_rounding(only_acts[2], acts[2])


def test_collect_to_cache_equals_in_memory(tmp_path, X):
    pytest.importorskip("zarr", minversion="3")
    from sklearn_lib.cache import ActivationCache

    model = make_mlp()
    layers = ["0", "3", "5"]
    acts, jacs = collect(model, layers, X, batch_size=5, verbose=False)
    path = tmp_path / "acts.zarr"
    acts_c, jacs_c = collect(model, layers, X, batch_size=5, verbose=False, cache=path)
    for a, b in zip(acts + jacs, acts_c + jacs_c):
        assert_same_up_to_rounding(np.asarray(b), a)  # two collect runs
    cache = ActivationCache.open(path, expect_layers=layers)
    assert cache.n_samples == 13 and cache.metadata["collect"]["layers"] == layers
    with pytest.raises(FileExistsError):
        collect(model, layers, X, verbose=False, cache=path)


# --------------------------------------------------------------------------- sequences
def brute_force_sequence_jacobians(model, X):
    """Per-sample (P, d_out, P, d_in) Jacobians of the block embed -> out."""
    ref = prepare_model(model).eval()
    with torch.no_grad():
        H = ref.embed(X)

    def block(h):
        return ref.out(h + ref.attn(h, h, h, need_weights=False)[0])

    return H, per_sample_jacobians(block, H)


def test_sequence_rows_and_jacobian_second_moment():
    model = AttentionBlock()
    n, P, d = 3, 5, 4
    X = torch.randn(n, P, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    H, J = brute_force_sequence_jacobians(model, X)  # (n, P, d, P, d)
    h_rows, R = section_vjp_products(model, "embed", "out", X, sequence=True)
    assert h_rows.shape == (n * P, d) and R.shape == (n * P, P * d, d)
    assert_same_up_to_rounding(h_rows, H.reshape(n * P, d))
    torch.testing.assert_close(R, sequence_jacobians_to_rows(J), rtol=0, atol=1e-12)
    # SPEC 2: M'[j, j'] = 1/(nP) sum_x sum_{t,i} sum_s J[(t,i),(s,j)] J[(t,i),(s,j')]
    M_spec = torch.zeros(d, d, dtype=torch.float64)
    for x in range(n):
        for t in range(P):
            for i in range(d):
                for s in range(P):
                    M_spec += torch.outer(J[x, t, i, s], J[x, t, i, s])
    M_spec /= n * P
    M_rows = torch.einsum("roj,rok->jk", R, R) / (n * P)
    torch.testing.assert_close(M_rows, M_spec, rtol=0, atol=1e-12)


def test_sequence_cotangents_act_per_position():
    model = AttentionBlock()
    n, P, d, k = 2, 3, 4, 2
    X = torch.randn(n, P, 3, dtype=torch.float64)
    _, J = brute_force_sequence_jacobians(model, X)
    V = torch.randn(d, k, dtype=torch.float64)
    _, R = section_vjp_products(model, "embed", "out", X, V, sequence=True, max_vectors=4)
    assert R.shape == (n * P, P * k, d)
    expected = torch.einsum("ic,xtisj->xstcj", V, J).reshape(n * P, P * k, d)
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-12)


def test_sequence_collect_mixes_positions_and_pooled_layers(tmp_path):
    pytest.importorskip("zarr", minversion="3")
    model = AttentionBlock()
    n, P = 4, 3
    X = torch.randn(n, P, 3, dtype=torch.float64)
    layers = ["embed", "out", "head"]
    acts, jacs = collect(model, layers, X, batch_size=3, sequence=True, verbose=False)
    assert [a.shape for a in acts] == [(n * P, 4), (n * P, 4), (n, 2)]
    # The head reads only the last position: its Jacobian rows have one output position.
    assert [j.shape for j in jacs] == [(n * P, P * 4, 4), (n * P, 2, 4)]
    last = np.arange(n) * P + P - 1
    assert np.abs(np.delete(jacs[1], last, axis=0)).max() == 0
    assert np.abs(jacs[1][last]).max() > 0
    acts_c, jacs_c = collect(model, layers, X, sequence=True, verbose=False, cache=tmp_path / "c")
    for a, b in zip(acts + jacs, acts_c + jacs_c):
        np.testing.assert_allclose(np.asarray(b), a, rtol=0, atol=1e-13)


def test_sequence_shape_errors():
    with pytest.raises(ValueError, match="J must be"):
        sequence_jacobians_to_rows(np.zeros((2, 3, 4)))
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh())
    with pytest.raises(ValueError, match="sequence=True"):
        section_vjp_products(model, "0", "1", torch.randn(2, 1, 5, 5), sequence=True)
    _, J = section_vjp_products(model, "0", "1", torch.randn(2, 1, 5, 5))
    assert J.shape == (2, 18, 18)  # other shapes are flattened per sample


def test_collect_into_open_writer_and_bad_batches(tmp_path, X):
    pytest.importorskip("zarr", minversion="3")
    from sklearn_lib.cache import ActivationCache

    model = make_mlp()
    acts, jacs = collect(model, ["1", "5"], X, verbose=False)
    writer = ActivationCache.create(tmp_path / "w", {"1": (5,), "5": (3,)}, jacobians=True)
    acts_c, jacs_c = collect(model, ["1", "5"], X, batch_size=6, verbose=False, cache=writer)
    assert writer.n_samples == 13
    np.testing.assert_allclose(np.asarray(jacs_c[0]), jacs[0], rtol=0, atol=1e-13)
    reopened = ActivationCache.open(tmp_path / "w").activations("1")
    np.testing.assert_allclose(np.asarray(reopened), acts[0], rtol=0, atol=1e-13)
    # A dict batch is passed as keyword inputs, which a Sequential does not take.
    with pytest.raises(ValueError, match="rejected its inputs.*a dict batch"):
        record_activations(model, ["1"], [{"x": X}], verbose=False)
    with pytest.raises(ValueError, match="no samples"):
        collect(model, ["1", "5"], [], verbose=False, cache=tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_in_place_modules_do_not_corrupt_results(X):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 2)).double()
    acts, jacs = collect(model, ["0", "1", "2"], X, verbose=False)
    assert (acts[0] < 0).any()  # recorded before the in-place ReLU overwrote it
    # Exact: ReLU of one recorded tensor, and its VJPs only multiply by 0 or 1.
    np.testing.assert_array_equal(acts[1], np.maximum(acts[0], 0))
    mask = (acts[0] > 0).astype(float)
    np.testing.assert_array_equal(jacs[0], mask[:, :, None] * np.eye(5))
    h, J = section_vjp_products(model, "0", "2", X)
    expected = model[2].weight.detach() * (h > 0)[:, None, :]
    torch.testing.assert_close(J, expected, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh, nn.GELU])
def test_closed_form_jacobians_equal_brute_force(X, activation):
    """collect's closed-form Jacobians (act(xW+b), act(x)W+b, act, identity) equal autograd's."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 5), activation(), nn.Linear(5, 6), activation(),
                        nn.Identity(), nn.Linear(6, 3)).double()
    layers = [":input", "1", "2", "3", "4", "5"]
    acts, jacs = collect(net, layers, X, batch_size=7, verbose=False)
    _, generic = collect(net, layers, X, batch_size=7, verbose=False, fast_path=False)
    sections = [net[0:2], net[2:3], net[3:4], net[4:5], net[5:6]]
    for l, (f, J) in enumerate(zip(sections, jacs)):
        x = torch.as_tensor(acts[l])
        brute = torch.stack([jacobian(f, row) for row in x]).numpy()
        assert_same_up_to_rounding(J, brute)
        assert_same_up_to_rounding(J, generic[l])


class _Stream:
    """An iterable of batches without a length: collect cannot preallocate for it."""

    def __init__(self, X, size):
        self.X, self.size = X, size

    def __iter__(self):
        return (self.X[i:i + self.size] for i in range(0, len(self.X), self.size))


@pytest.mark.parametrize("kind", ["array", "stream", "drop_last"])
def test_collect_fills_arrays_in_place_for_any_data(X, kind):
    """Preallocated (arrays, DataLoader), grown (unknown length) or shrunk (drop_last) alike."""
    net = make_mlp().double()
    layers = [":input", "1", "4", "5"]
    ref_acts, ref_jacs = collect(net, layers, X, batch_size=len(X), verbose=False)
    data = {
        "array": X,
        "stream": _Stream(X, 3),
        "drop_last": DataLoader(TensorDataset(torch.as_tensor(X)), batch_size=4,
                                drop_last=True),
    }[kind]
    n = len(X) // 4 * 4 if kind == "drop_last" else len(X)
    acts, jacs = collect(net, layers, data, batch_size=5, verbose=False)
    for got, want in zip([*acts, *jacs], [*ref_acts, *ref_jacs]):
        assert got.shape == (n, *want.shape[1:])
        assert got.flags.c_contiguous and got.flags.owndata
        assert_same_up_to_rounding(got, want[:n])


def test_closed_forms_are_checked_on_every_batch(monkeypatch):
    """nn.Linear patched to add a term for the last batch's inputs only (no check of the
    types can see it): that batch and later ones take products, earlier ones keep the
    closed form."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    X = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    X = X[torch.argsort(X[:, 0])]
    threshold = float(X[-5, 0])
    linear = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: linear(self, x) + 3 * torch.relu(
        x[:, :1] - threshold))
    with pytest.warns(UserWarning, match=r"in the batch of samples 30 to 39 the model's "
                                         r"output differs"):
        _, jacs = collect(net, [":input", "1"], X, batch_size=10, verbose=False)
    _, ref = collect(net, [":input", "1"], X, batch_size=10, verbose=False, fast_path=False)
    np.testing.assert_allclose(jacs[0], ref[0], rtol=0, atol=1e-12)
