"""The ``.npz`` format of the shipped networks (no pickle) and the packaged file."""

import json
from importlib import resources

import numpy as np
import torch

from ._mlp import ModularAdditionMLP
from ._transformer import ModularAdditionTransformer

_DATA_FILE = "modular_addition_p113.npz"
_TRANSFORMER_FILE = "modular_addition_transformer_p113.npz"
_FORMAT_VERSION = 1
# The constructor arguments stored for each kind of network; files written before the
# transformer existed have no "model" entry and hold an MLP.
_CONFIG_KEYS = {
    ModularAdditionMLP: ("p", "d_embed", "d_hidden"),
    ModularAdditionTransformer: ("p", "d_model", "n_heads", "d_head", "d_mlp"),
}


# --------------------------------------------------------------------------- storage
def _param_names(model):
    return [name for name, _ in model.named_parameters()]


def save_modular_addition_model(model, path, *, dtype=np.float32):
    """Write a :class:`ModularAdditionMLP` or :class:`ModularAdditionTransformer` to ``.npz``.

    The archive holds one array per parameter, keyed by its
    ``model.named_parameters()`` name (``"embed.embedding.weight"``,
    ``"mlp.0.weight"``, ...), and ``"metadata"``: a 0-d unicode array with a
    JSON object of the constructor arguments (``p``, ``d_embed`` and
    ``d_hidden`` of an MLP; ``p``, ``d_model``, ``n_heads``, ``d_head`` and
    ``d_mlp`` of a transformer), the class name ``model``, a
    ``format_version`` and, if present, ``model.training_info_`` (training
    hyper-parameters and accuracies).  Everything loads with
    ``np.load(path, allow_pickle=False)``, no pickle.

    Parameters
    ----------
    model : ModularAdditionMLP or ModularAdditionTransformer
        The model to save.
    path : str or path-like
        Destination file; ``".npz"`` is appended by numpy if missing.
    dtype : numpy dtype, default=np.float32
        Dtype the parameters are stored in.

    See Also
    --------
    load_modular_addition_model : Read an MLP back.
    load_modular_addition_transformer : Read a transformer back.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from sklearn_lib.datasets import (
    ...     ModularAdditionMLP, load_modular_addition_model, save_modular_addition_model)
    >>> model = ModularAdditionMLP(p=5, d_embed=2, d_hidden=3)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "model.npz")
    ...     save_modular_addition_model(model, path)
    ...     loaded = load_modular_addition_model(path, dtype=torch.float32)
    >>> torch.equal(loaded.mlp[0].weight, model.mlp[0].weight)
    True
    """
    if type(model) not in _CONFIG_KEYS:
        raise TypeError(
            "expected a ModularAdditionMLP or a ModularAdditionTransformer, "
            f"got {type(model).__name__}."
        )
    metadata = {
        "format_version": _FORMAT_VERSION,
        **getattr(model, "training_info_", {}),
        "model": type(model).__name__,
        **{key: getattr(model, key) for key in _CONFIG_KEYS[type(model)]},
    }
    arrays = {
        name: param.detach().cpu().numpy().astype(dtype)
        for name, param in model.named_parameters()
    }
    np.savez_compressed(path, metadata=np.array(json.dumps(metadata, sort_keys=True)), **arrays)


def _resolve_torch_dtype(dtype):
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype such as torch.float64, got {dtype!r}."
        )
    return dtype


def _load_npz(path, dtype, cls):
    with np.load(path, allow_pickle=False) as npz:
        if "metadata" not in npz.files:
            raise ValueError(f"{path} is not a saved {cls.__name__}: no 'metadata' entry.")
        metadata = json.loads(str(npz["metadata"]))
        if metadata.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version {metadata.get('format_version')!r}; "
                f"this version of sklearn_lib reads {_FORMAT_VERSION}."
            )
        arrays = {name: npz[name] for name in npz.files if name != "metadata"}
    kind = metadata.get("model", ModularAdditionMLP.__name__)
    if kind != cls.__name__:
        loader = {ModularAdditionMLP: "load_modular_addition_model",
                  ModularAdditionTransformer: "load_modular_addition_transformer"}
        other = next((c for c in loader if c.__name__ == kind), None)
        hint = f"; read it with {loader[other]}" if other is not None else ""
        raise ValueError(f"{path} holds a {kind}, expected a {cls.__name__}{hint}.")
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten below
        model = cls(**{key: metadata[key] for key in _CONFIG_KEYS[cls]})
    expected = _param_names(model)
    if sorted(arrays) != sorted(expected):
        raise ValueError(f"{path} holds parameters {sorted(arrays)}, expected {sorted(expected)}.")
    state = {
        name: torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        for name, array in arrays.items()
    }
    model.load_state_dict(state)  # checks the shapes
    model.to(dtype).eval()
    model.training_info_ = metadata
    return model


def load_modular_addition_model(path=None, *, dtype=torch.float64):
    """The shipped :class:`ModularAdditionMLP` trained on addition mod 113, in eval mode.

    Reads ``sklearn_lib/data/modular_addition_p113.npz`` (about 150 KB, float32
    weights, no pickle) through :mod:`importlib.resources`; nothing is
    downloaded or trained.  The model was produced by
    :func:`train_modular_addition` with its defaults
    (``examples/train_modular_addition.py`` reproduces it) and generalises:
    it is 100% accurate on the held-out pairs of
    ``modular_addition_data(113)`` (default split).  Its hidden weight was
    trained tied, ``mlp.0.weight = [V, V]``, so it is symmetric in ``(a, b)``
    and the antisymmetric directions ``(x, -x)`` of the ``embed`` output do
    not affect it.

    Parameters
    ----------
    path : str or path-like, optional
        Load this file (written by :func:`save_modular_addition_model`)
        instead of the shipped one.
    dtype : torch.dtype or str, default=torch.float64
        Floating dtype of the returned model's parameters; float64 suits the
        Gram and Jacobian statistics of the interaction basis.

    Returns
    -------
    model : ModularAdditionMLP
        The model, with ``requires_grad`` parameters, in eval mode.  Its
        ``training_info_`` dict holds the training hyper-parameters and the
        recorded ``train_accuracy``, ``test_accuracy`` and
        ``test_accuracy_unseen_swap``.  Hook :data:`LAYERS`
        ``= ("embed", "mlp.1", "mlp.2")``.

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.datasets import load_modular_addition_model, modular_addition_data
    >>> model = load_modular_addition_model()
    >>> model
    ModularAdditionMLP(
      p=113, d_embed=32, d_hidden=256
      (embed): PairEmbedding(
        (embedding): Embedding(113, 32)
      )
      (mlp): Sequential(
        (0): Linear(in_features=64, out_features=256, bias=True)
        (1): ReLU()
        (2): Linear(in_features=256, out_features=113, bias=True)
      )
    )
    >>> X_train, X_test, y_train, y_test = modular_addition_data()
    >>> with torch.no_grad():
    ...     predicted = model(torch.from_numpy(X_test)).argmax(dim=1).numpy()
    >>> float((predicted == y_test).mean()) >= 0.99
    True
    """
    return _load(path, dtype, ModularAdditionMLP, _DATA_FILE, "train_modular_addition.py")


def _load(path, dtype, cls, shipped_file, script):
    dtype = _resolve_torch_dtype(dtype)
    if path is not None:
        return _load_npz(path, dtype, cls)
    resource = resources.files("sklearn_lib").joinpath("data", shipped_file)
    if not resource.is_file():
        raise FileNotFoundError(
            f"the shipped weights sklearn_lib/data/{shipped_file} are missing from this "
            f"installation; run examples/{script} to recreate them."
        )
    with resources.as_file(resource) as file:
        return _load_npz(file, dtype, cls)


def load_modular_addition_transformer(path=None, *, dtype=torch.float64):
    """The shipped :class:`ModularAdditionTransformer` trained on addition mod 113, in eval mode.

    Reads ``sklearn_lib/data/modular_addition_transformer_p113.npz`` (float32
    weights, no pickle, under 1 MB) through :mod:`importlib.resources`;
    nothing is downloaded or trained. The model is the reference work's
    one-layer transformer (``d_model`` 128, 4 heads of 32, ``d_mlp`` 512, ReLU,
    no LayerNorm), produced by :func:`train_modular_addition_transformer` with
    its defaults (``examples/train_modular_addition_transformer.py`` reproduces
    it). It generalises: 100% accurate on the held-out pairs of
    ``modular_addition_data(113)`` (default split; trained on the other 30%).

    Parameters
    ----------
    path : str or path-like, optional
        Load this file (written by :func:`save_modular_addition_model`)
        instead of the shipped one.
    dtype : torch.dtype or str, default=torch.float64
        Floating dtype of the returned model's parameters.

    Returns
    -------
    model : ModularAdditionTransformer
        The model, with ``requires_grad`` parameters, in eval mode. Its
        ``training_info_`` dict holds the training hyper-parameters, the number
        of ``epochs`` run and the recorded ``train_accuracy`` and
        ``test_accuracy``. Hook :data:`TRANSFORMER_LAYERS`.

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.datasets import (
    ...     load_modular_addition_transformer, modular_addition_data)
    >>> model = load_modular_addition_transformer()
    >>> model.config()
    {'p': 113, 'd_model': 128, 'n_heads': 4, 'd_head': 32, 'd_mlp': 512}
    >>> X_train, X_test, y_train, y_test = modular_addition_data()
    >>> with torch.no_grad():
    ...     predicted = model(torch.from_numpy(X_test[:2000])).argmax(dim=1).numpy()
    >>> float((predicted == y_test[:2000]).mean())
    1.0
    """
    return _load(path, dtype, ModularAdditionTransformer, _TRANSFORMER_FILE,
                 "train_modular_addition_transformer.py")
