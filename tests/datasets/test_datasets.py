"""Tests of sklearn_lib.datasets: modular-addition data, the shipped model, Fourier labels."""

import json
from importlib import resources

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_lib.datasets import (
    LAYERS,
    ModularAdditionMLP,
    dominant_frequency,
    load_modular_addition_model,
    modular_addition_data,
    save_modular_addition_model,
    train_modular_addition,
)

P = 113
DATA_FILE = resources.files("sklearn_lib").joinpath("data", "modular_addition_p113.npz")


@pytest.fixture(scope="module")
def shipped():
    return load_modular_addition_model()


# --------------------------------------------------------------------------- data
def test_split_sizes_labels_and_coverage():
    X_train, X_test, y_train, y_test = modular_addition_data()
    assert X_train.shape == (3831, 2) and X_test.shape == (P * P - 3831, 2)
    assert y_train.shape == (3831,) and y_test.shape == (P * P - 3831,)
    for a in (X_train, X_test, y_train, y_test):
        assert isinstance(a, np.ndarray) and a.dtype == np.int64
    np.testing.assert_array_equal(y_train, X_train.sum(axis=1) % P)
    np.testing.assert_array_equal(y_test, X_test.sum(axis=1) % P)
    codes = np.concatenate([X_train, X_test]) @ np.array([P, 1])
    np.testing.assert_array_equal(np.sort(codes), np.arange(P * P))  # disjoint, all pairs
    assert X_train.min() == 0 and X_train.max() == P - 1


def test_split_is_deterministic_and_seeded():
    first, again = modular_addition_data(random_state=0), modular_addition_data(random_state=0)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    other = modular_addition_data(random_state=1)
    assert not np.array_equal(first[0], other[0])


def test_split_fraction_and_small_p():
    X_train, X_test, y_train, _ = modular_addition_data(7, train_fraction=0.5)
    assert len(X_train) == 24 and len(X_test) == 25
    np.testing.assert_array_equal(y_train, (X_train[:, 0] + X_train[:, 1]) % 7)


@pytest.mark.parametrize("kwargs", [
    {"train_fraction": 0.0}, {"train_fraction": 1.0}, {"train_fraction": 1.5},
    {"p": 1}, {"p": 2.5}, {"p": 3, "train_fraction": 0.01},
])
def test_split_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        modular_addition_data(**kwargs)


# --------------------------------------------------------------------------- model
def test_layer_names_and_module_types():
    model = ModularAdditionMLP(p=11, d_embed=3, d_hidden=5)
    modules = dict(model.named_modules())
    assert set(LAYERS) <= set(modules)
    assert LAYERS == ("embed", "mlp.1", "mlp.2")
    assert isinstance(modules["mlp"], nn.Sequential) and len(modules["mlp"]) == 3
    assert isinstance(modules["mlp.0"], nn.Linear) and modules["mlp.0"].in_features == 6
    assert isinstance(modules["mlp.1"], nn.ReLU)
    assert isinstance(modules["mlp.2"], nn.Linear) and modules["mlp.2"].out_features == 11


def test_embed_output_is_concatenated_embeddings():
    torch.manual_seed(0)
    model = ModularAdditionMLP(p=11, d_embed=3, d_hidden=5)
    x = torch.tensor([[0, 1], [4, 4], [10, 2]])
    seen = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, out)
        )
        for name in LAYERS
    ]
    logits = model(x)
    for handle in handles:
        handle.remove()
    E = model.embed.embedding.weight
    torch.testing.assert_close(seen["embed"], torch.cat([E[x[:, 0]], E[x[:, 1]]], dim=1))
    assert seen["mlp.1"].shape == (3, 5) and bool((seen["mlp.1"] >= 0).all())
    torch.testing.assert_close(seen["mlp.2"], logits)
    assert logits.shape == (3, 11)


def test_model_rejects_wrong_input_shape():
    model = ModularAdditionMLP(p=5, d_embed=2, d_hidden=3)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        model(torch.tensor([[1, 2, 3]]))


# --------------------------------------------------------------------------- shipped model
def test_shipped_file_exists_and_loads_without_pickle():
    assert DATA_FILE.is_file()
    with resources.as_file(DATA_FILE) as path, np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}  # every entry loads
    metadata = json.loads(str(arrays.pop("metadata")))
    assert metadata["p"] == P and metadata["format_version"] == 1
    assert metadata["test_accuracy"] >= 0.99
    assert all(a.dtype == np.float32 for a in arrays.values())
    model = ModularAdditionMLP(P, d_embed=metadata["d_embed"], d_hidden=metadata["d_hidden"])
    assert sorted(arrays) == sorted(name for name, _ in model.named_parameters())
    assert DATA_FILE.read_bytes()[:2] == b"PK"  # a plain zip of .npy files
    assert len(DATA_FILE.read_bytes()) < 500_000


def test_shipped_model_generalises(shipped):
    assert isinstance(shipped, ModularAdditionMLP) and not shipped.training
    assert shipped.mlp[0].weight.dtype == torch.float64
    X_train, X_test, y_train, y_test = modular_addition_data(P)
    with torch.no_grad():
        test_acc = (shipped(torch.from_numpy(X_test)).argmax(1).numpy() == y_test).mean()
        train_acc = (shipped(torch.from_numpy(X_train)).argmax(1).numpy() == y_train).mean()
    assert test_acc >= 0.99 and train_acc >= 0.99
    info = shipped.training_info_
    assert info["test_accuracy"] >= 0.99 and info["test_accuracy_unseen_swap"] >= 0.99
    assert info["train_fraction"] == 0.3 and info["random_state"] == 0


def test_shipped_model_dtype_and_layers():
    model32 = load_modular_addition_model(dtype="float32")
    assert all(p.dtype == torch.float32 for p in model32.parameters())
    assert set(LAYERS) <= {name for name, _ in model32.named_modules()}
    with pytest.raises(ValueError, match="dtype"):
        load_modular_addition_model(dtype=torch.int64)


def test_shipped_model_works_with_record_activations(shipped):
    from sklearn_lib.collect import record_activations

    X = modular_addition_data(P)[1][:50]
    acts = record_activations(shipped, list(LAYERS), X, verbose=False)
    E = shipped.embed.embedding.weight.detach().numpy()
    np.testing.assert_allclose(acts["embed"], np.hstack([E[X[:, 0]], E[X[:, 1]]]))
    assert acts["mlp.1"].shape == (50, shipped.d_hidden) and acts["mlp.2"].shape == (50, P)


def test_save_load_roundtrip(tmp_path):
    model = train_modular_addition(p=7, d_embed=2, d_hidden=4, epochs=2, verbose=False)
    path = tmp_path / "m.npz"
    save_modular_addition_model(model, path)
    loaded = load_modular_addition_model(path)
    assert loaded.training_info_["epochs"] == 2
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert b.dtype == torch.float64
        torch.testing.assert_close(b.float(), a, msg=name)
    np.savez(tmp_path / "bad.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="metadata"):
        load_modular_addition_model(tmp_path / "bad.npz")
    with pytest.raises(TypeError):
        save_modular_addition_model(nn.Linear(2, 2), tmp_path / "x.npz")


# --------------------------------------------------------------------------- training
def test_short_training_run_shapes_and_determinism(capsys):
    state = torch.get_rng_state()
    kwargs = dict(p=13, d_embed=4, d_hidden=16, epochs=5, random_state=3)
    model = train_modular_addition(**kwargs, verbose=True)
    assert "epoch" in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert isinstance(model, ModularAdditionMLP) and not model.training
    assert model.embed.embedding.weight.shape == (13, 4)
    assert model.mlp[0].weight.shape == (16, 8) and model.mlp[2].weight.shape == (13, 16)
    assert type(model.mlp[0]) is nn.Linear  # training-time weight tying removed
    assert [n for n, _ in model.named_parameters()] == [
        "embed.embedding.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    W = model.mlp[0].weight
    # Exact: the untied weight is one tensor copied into both halves.
    torch.testing.assert_close(W[:, :4], W[:, 4:], rtol=0, atol=0)
    assert model(torch.tensor([[1, 2]])).shape == (1, 13)
    info = model.training_info_
    assert info["epochs"] == 5 and info["n_train"] + info["n_test"] == 169
    assert 0 <= info["test_accuracy"] <= 1
    again = train_modular_addition(**kwargs, verbose=False)
    # Reproducible to rounding, not bit for bit: the same seed draws the same
    # initialisation and batches, but GEMM kernels (MKL's AVX-512 path, thread
    # count) may round differently between runs and machines.
    for a, b in zip(model.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_untied_training():
    model = train_modular_addition(
        p=7, d_embed=2, d_hidden=4, epochs=3, tie_hidden=False, verbose=False
    )
    W = model.mlp[0].weight
    assert not torch.equal(W[:, :2], W[:, 2:])
    with pytest.raises(ValueError, match="epochs"):
        train_modular_addition(p=7, epochs=0, verbose=False)


# --------------------------------------------------------------------------- Fourier labels
@pytest.mark.parametrize("p", [113, 12])
def test_dominant_frequency_pure_cosines(p):
    a = np.arange(p)
    rng = np.random.default_rng(0)
    for k in range(1, p // 2 + 1):
        phase = rng.uniform(0, 2 * np.pi) if 2 * k != p else 0.0  # Nyquist: no sine
        values = 2.5 * np.cos(2 * np.pi * k * a / p + phase) - 4.0
        freq, fraction = dominant_frequency(values)
        assert freq == k and isinstance(freq, int)
        assert fraction == pytest.approx(1.0, abs=1e-10)
        # frequency p - k is the same real wave
        assert dominant_frequency(np.cos(2 * np.pi * (p - k) * a / p + phase))[0] == k


def test_dominant_frequency_mixture_and_columns():
    a = np.arange(P)
    wave = lambda k, phase=0.0: np.cos(2 * np.pi * k * a / P + phase)  # noqa: E731
    mix = 1.0 * wave(7, 0.3) + 0.6 * wave(30, 1.1) + 0.3 * wave(55)
    freq, fraction = dominant_frequency(mix)
    assert freq == 7
    assert fraction == pytest.approx(1 / (1 + 0.36 + 0.09))
    cols = np.column_stack([mix, 0.2 * wave(7) + wave(42, 2.0), np.sin(2 * np.pi * 3 * a / P)])
    freqs, fractions = dominant_frequency(cols, p=P)
    assert freqs.dtype == np.int64 and freqs.tolist() == [7, 42, 3]
    assert fractions.shape == (3,)
    np.testing.assert_allclose(fractions, [1 / 1.45, 1 / 1.04, 1.0])
    # pooled: the summed spectrum of the columns
    k, frac = dominant_frequency(np.column_stack([wave(9), 0.5 * wave(9, 1.0), wave(20)]),
                                 pooled=True)
    assert k == 9 and frac == pytest.approx(1.25 / 2.25)


def test_dominant_frequency_constant_and_noise():
    assert dominant_frequency(np.full(P, 3.0)) == (0, 1.0)
    assert dominant_frequency(np.zeros(P)) == (0, 1.0)
    freqs, fractions = dominant_frequency(np.column_stack([np.ones(P), np.arange(P) == 0]))
    assert freqs.tolist() == [0, 1]  # an impulse has a flat spectrum: ties -> lowest
    np.testing.assert_allclose(fractions, [1.0, 2 / (P - 1)])
    noise = np.random.default_rng(0).normal(size=(P, 4))
    freqs, fractions = dominant_frequency(noise)
    assert ((freqs >= 1) & (freqs <= P // 2)).all() and (fractions < 0.5).all()


def test_dominant_frequency_validates():
    with pytest.raises(ValueError, match="p=7"):
        dominant_frequency(np.ones(5), p=7)
    with pytest.raises(ValueError, match="shape"):
        dominant_frequency(np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="finite"):
        dominant_frequency(np.array([1.0, np.nan, 2.0]))


def test_shipped_embedding_is_fourier_sparse(shipped):
    # The generalising solution embeds tokens with a few key frequencies: the top
    # principal directions of the embedding table are nearly pure waves.
    E = shipped.embed.embedding.weight.detach().numpy()
    U, S, _ = np.linalg.svd(E - E.mean(axis=0), full_matrices=False)
    freqs, fractions = dominant_frequency(U[:, :2] * S[:2])
    assert freqs[0] == freqs[1] and (fractions > 0.9).all()


def test_digits_conv_net_learns_and_exposes_its_channel_layers():
    from sklearn_lib.datasets import train_digits_conv_net

    net, images, labels = train_digits_conv_net(n_train=1000, n_steps=60)
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    with torch.no_grad():
        held_out = (net(images[1000:]).argmax(1) == labels[1000:]).float().mean()
        # The module names the docstring promises: ReLUs of 8 and 16 channels.
        assert net[:2](images[:3]).shape == (3, 8, 8, 8)
        assert net[:4](images[:3]).shape == (3, 16, 4, 4)
    assert held_out > 0.5  # ten classes: chance is 0.1
    again, _, _ = train_digits_conv_net(n_train=1000, n_steps=60)
    for p, q in zip(net.parameters(), again.parameters()):
        torch.testing.assert_close(p, q)  # the seed fixes the run
