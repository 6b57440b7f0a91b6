"""Tests of the modular-addition transformer: forward pass, hooks, storage, training, shipped weights."""

import json
from importlib import resources

import numpy as np
import pytest
import torch

from sklearn_lib.datasets import (
    LAYERS,
    TRANSFORMER_LAYERS,
    ModularAdditionMLP,
    ModularAdditionTransformer,
    load_modular_addition_model,
    load_modular_addition_transformer,
    modular_addition_data,
    save_modular_addition_model,
    train_modular_addition_transformer,
)
from tests._reference import assert_same_up_to_rounding

P = 113
DATA_FILE = resources.files("sklearn_lib").joinpath("data", "modular_addition_transformer_p113.npz")
SMALL = {"p": 7, "d_model": 8, "n_heads": 2, "d_head": 4, "d_mlp": 16}


def _small(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return ModularAdditionTransformer(**SMALL).to(dtype).eval()


def _hooked(model, x, **kwargs):
    seen = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, out)
        )
        for name in (*TRANSFORMER_LAYERS, "attn.hook_pattern", "mlp.1")
    ]
    try:
        logits = model(x, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


def _naive_forward(model, tokens):
    """The transformer written out in numpy, position by position and head by head."""
    W = {name: p.detach().numpy() for name, p in model.named_parameters()}
    n, t = tokens.shape
    H, e = model.n_heads, model.d_head
    resid = W["embed.weight"][tokens] + W["pos_embed.weight"][None, :t]
    pre = resid.copy()
    attn = np.zeros_like(resid)
    for i in range(n):
        for h in range(H):
            cols = slice(h * e, (h + 1) * e)
            q = resid[i] @ W["attn.W_Q.weight"][cols].T
            k = resid[i] @ W["attn.W_K.weight"][cols].T
            v = resid[i] @ W["attn.W_V.weight"][cols].T
            for s in range(t):  # query position s sees keys 0..s
                scores = np.array([q[s] @ k[r] for r in range(s + 1)]) / np.sqrt(e)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                z = sum(w * v[r] for r, w in enumerate(weights))
                attn[i, s] += z @ W["attn.W_O.weight"][:, cols].T
    mid = pre + attn
    hidden = np.maximum(mid @ W["mlp.0.weight"].T + W["mlp.0.bias"], 0.0)
    post = mid + hidden @ W["mlp.2.weight"].T + W["mlp.2.bias"]
    return pre, mid, post, post[:, -1] @ W["unembed.weight"].T


# --------------------------------------------------------------------------- model
def test_forward_matches_a_naive_implementation():
    model = _small()
    pairs = torch.tensor([[0, 0], [1, 6], [5, 3], [6, 6]])
    logits, seen = _hooked(model, pairs)
    tokens = np.column_stack([pairs.numpy(), np.full(len(pairs), SMALL["p"])])
    pre, mid, post, expected = _naive_forward(model, tokens)
    for name, reference in zip(TRANSFORMER_LAYERS, (pre, mid, post, expected)):
        np.testing.assert_allclose(seen[name].detach().numpy(), reference, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_hook_shapes_at_the_residual_stream():
    model = _small()
    x = torch.tensor([[1, 2], [3, 4], [0, 6], [2, 2], [5, 1]])
    d, p = SMALL["d_model"], SMALL["p"]
    logits, seen = _hooked(model, x)
    assert logits.shape == (5, p)
    for name in TRANSFORMER_LAYERS[:3]:
        assert seen[name].shape == (5, 3, d), name
    assert seen["unembed"].shape == (5, p) and seen["mlp.1"].shape == (5, 3, SMALL["d_mlp"])
    assert seen["attn.hook_pattern"].shape == (5, SMALL["n_heads"], 3, 3)
    torch.testing.assert_close(seen["attn.hook_pattern"].sum(-1), torch.ones(5, 2, 3, dtype=torch.float64))
    # causal: no query attends to a later position
    assert bool((seen["attn.hook_pattern"].triu(1) == 0).all())
    assert TRANSFORMER_LAYERS == ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "unembed")


def test_last_only_gives_the_same_logits_and_last_position_layers():
    model = _small()
    x = torch.tensor([[1, 2], [3, 4], [0, 6]])
    full, seen_full = _hooked(model, x)
    last, seen_last = _hooked(model, x, last_only=True)
    assert_same_up_to_rounding(last, full)
    torch.testing.assert_close(seen_last["hook_resid_pre"], seen_full["hook_resid_pre"])
    for name in ("hook_resid_mid", "hook_resid_post"):
        assert seen_last[name].shape == (3, 1, SMALL["d_model"])
        assert_same_up_to_rounding(seen_last[name], seen_full[name][:, -1:])


def test_causal_mask_keeps_earlier_positions_independent_of_later_tokens():
    model = _small()
    _, first = _hooked(model, torch.tensor([[2, 0]]))
    _, second = _hooked(model, torch.tensor([[2, 5]]))
    torch.testing.assert_close(first["hook_resid_post"][:, 0], second["hook_resid_post"][:, 0])
    assert not torch.allclose(first["hook_resid_post"][:, 1], second["hook_resid_post"][:, 1])


def test_sequences_with_equals_token_and_bad_inputs():
    model = _small()
    pairs = torch.tensor([[1, 2], [3, 4]])
    sequences = torch.cat([pairs, torch.full((2, 1), SMALL["p"])], dim=1)
    torch.testing.assert_close(model(sequences), model(pairs))
    with pytest.raises(ValueError, match=r"'=' \(id 7\)"):
        model(torch.tensor([[1, 2, 3]]))
    for bad in (torch.tensor([1, 2]), torch.tensor([[1, 2, 7, 7]])):
        with pytest.raises(ValueError, match=r"\(n, 2\).*\(n, 3\)"):
            model(bad)


def test_parameter_names_and_count_of_the_reference_shape():
    model = ModularAdditionTransformer()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "embed.weight": (114, 128), "pos_embed.weight": (3, 128),
        "attn.W_Q.weight": (128, 128), "attn.W_K.weight": (128, 128),
        "attn.W_V.weight": (128, 128), "attn.W_O.weight": (128, 128),
        "mlp.0.weight": (512, 128), "mlp.0.bias": (512,),
        "mlp.2.weight": (128, 512), "mlp.2.bias": (128,), "unembed.weight": (113, 128),
    }
    assert sum(p.numel() for p in model.parameters()) == 226_688


# --------------------------------------------------------------------------- storage
def test_save_load_round_trip(tmp_path):
    model = _small(dtype=torch.float32)
    model.training_info_ = {"epochs": 12, "test_accuracy": 0.5}
    path = tmp_path / "tfm.npz"
    save_modular_addition_model(model, path)
    loaded = load_modular_addition_transformer(path, dtype="float32")
    assert isinstance(loaded, ModularAdditionTransformer) and not loaded.training
    assert loaded.config() == model.config()
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name  # float32 stored as float32: exact
    assert loaded.training_info_["epochs"] == 12
    assert loaded.training_info_["model"] == "ModularAdditionTransformer"
    assert load_modular_addition_transformer(path).embed.weight.dtype == torch.float64


def test_loaders_refuse_the_other_kind_of_network(tmp_path):
    torch.manual_seed(0)
    mlp_path, tfm_path = tmp_path / "mlp.npz", tmp_path / "tfm.npz"
    save_modular_addition_model(ModularAdditionMLP(p=5, d_embed=2, d_hidden=3), mlp_path)
    save_modular_addition_model(_small(), tfm_path)
    with pytest.raises(ValueError, match="holds a ModularAdditionMLP.*load_modular_addition_model"):
        load_modular_addition_transformer(mlp_path)
    with pytest.raises(ValueError, match="holds a ModularAdditionTransformer.*_transformer"):
        load_modular_addition_model(tfm_path)
    with pytest.raises(TypeError, match="ModularAdditionTransformer"):
        save_modular_addition_model(torch.nn.Linear(2, 2), tmp_path / "x.npz")


# --------------------------------------------------------------------------- training
TRAIN = dict(SMALL, p=11, eval_every=4, verbose=False)


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first = train_modular_addition_transformer(epochs=10, target_accuracy=None, **TRAIN)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = train_modular_addition_transformer(epochs=10, target_accuracy=None, **TRAIN)
    for (name, a), (_, b) in zip(first.named_parameters(), again.named_parameters()):
        assert_same_up_to_rounding(a, b)
    other = train_modular_addition_transformer(epochs=10, target_accuracy=None,
                                               random_state=1, **TRAIN)
    assert not torch.allclose(first.embed.weight, other.embed.weight)
    info = first.training_info_
    assert info["epochs"] == 10 and info["n_train"] + info["n_test"] == 121
    assert info["lr"] == 3e-3 and info["weight_decay"] == 1.0 and info["random_state"] == 0
    assert first.embed.weight.dtype == torch.float32 and not first.training
    # the recorded accuracies are those of the returned model
    X_train, X_test, y_train, y_test = map(torch.from_numpy, modular_addition_data(11))
    with torch.no_grad():
        assert info["test_accuracy"] == pytest.approx(
            float((first(X_test).argmax(1) == y_test).double().mean()))


def test_stopping_at_the_target_equals_training_that_many_epochs():
    # target 0: stops at the first check (epoch 4); measuring never moves the optimiser
    stopped = train_modular_addition_transformer(epochs=50, target_accuracy=0.0, **TRAIN)
    assert stopped.training_info_["epochs"] == 4
    plain = train_modular_addition_transformer(epochs=4, target_accuracy=None, **TRAIN)
    for (name, a), (_, b) in zip(stopped.named_parameters(), plain.named_parameters()):
        assert_same_up_to_rounding(a, b)


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"eval_every": 0}])
def test_training_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=">= 1"):
        train_modular_addition_transformer(**{**TRAIN, **kwargs})


# --------------------------------------------------------------------------- shipped model
@pytest.fixture(scope="module")
def shipped():
    return load_modular_addition_transformer()


def test_shipped_file_is_small_float32_and_pickle_free():
    assert DATA_FILE.is_file()
    raw = DATA_FILE.read_bytes()
    assert raw[:2] == b"PK" and len(raw) < 2_000_000
    with resources.as_file(DATA_FILE) as path, np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    metadata = json.loads(str(arrays.pop("metadata")))
    assert metadata["model"] == "ModularAdditionTransformer" and metadata["format_version"] == 1
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert sum(a.size for a in arrays.values()) == 226_688
    assert metadata["test_accuracy"] == 1.0 and metadata["train_accuracy"] == 1.0
    assert metadata["random_state"] == 0 and metadata["train_fraction"] == 0.3
    assert metadata["epochs"] >= 1 and metadata["weight_decay"] == 1.0


def test_shipped_model_generalises(shipped):
    assert isinstance(shipped, ModularAdditionTransformer) and not shipped.training
    assert shipped.embed.weight.dtype == torch.float64
    X_train, X_test, y_train, y_test = modular_addition_data(P)
    rng = np.random.default_rng(0)
    sample = rng.choice(len(X_test), 3000, replace=False)
    with torch.no_grad():
        predicted = shipped(torch.from_numpy(X_test[sample])).argmax(1).numpy()
        train_predicted = shipped(torch.from_numpy(X_train[:1000])).argmax(1).numpy()
    np.testing.assert_array_equal(predicted, y_test[sample])
    np.testing.assert_array_equal(train_predicted, y_train[:1000])


def test_shipped_model_with_record_activations(shipped):
    from sklearn_lib.collect import record_activations

    X = modular_addition_data(P)[1][:40]
    acts = record_activations(shipped, list(TRANSFORMER_LAYERS), X, verbose=False)
    assert [acts[name].shape for name in TRANSFORMER_LAYERS] == [
        (40, 3, 128), (40, 3, 128), (40, 3, 128), (40, P)]
    E, pos = shipped.embed.weight.detach().numpy(), shipped.pos_embed.weight.detach().numpy()
    np.testing.assert_allclose(acts["hook_resid_pre"][:, 0], E[X[:, 0]] + pos[0])
    np.testing.assert_allclose(acts["hook_resid_pre"][:, 2], E[np.full(40, P)] + pos[2])
    assert LAYERS != TRANSFORMER_LAYERS
