"""The ``.npz`` format of the shipped networks (no pickle) and the packaged file."""

import json
from importlib import resources

import numpy as np
import torch

from ._mlp import ModularAdditionMLP

_DATA_FILE = "modular_addition_p113.npz"
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- storage
def _param_names(model):
    return [name for name, _ in model.named_parameters()]


def save_modular_addition_model(model, path, *, dtype=np.float32):
    """Write a :class:`ModularAdditionMLP` to an ``.npz`` file without pickle.

    The archive holds one array per parameter, keyed by its
    ``model.named_parameters()`` name (``"embed.embedding.weight"``,
    ``"mlp.0.weight"``, ...), and ``"metadata"``: a 0-d unicode array with a
    JSON object of the hyper-parameters ``p``, ``d_embed`` and ``d_hidden``, a
    ``format_version`` and, if present, ``model.training_info_`` (training
    hyper-parameters and accuracies).  Everything loads with
    ``np.load(path, allow_pickle=False)``.

    Parameters
    ----------
    model : ModularAdditionMLP
        The model to save.
    path : str or path-like
        Destination file; ``".npz"`` is appended by numpy if missing.
    dtype : numpy dtype, default=np.float32
        Dtype the parameters are stored in.

    See Also
    --------
    load_modular_addition_model : Read such a file back.

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
    if not isinstance(model, ModularAdditionMLP):
        raise TypeError(f"expected a ModularAdditionMLP, got {type(model).__name__}.")
    metadata = {
        "format_version": _FORMAT_VERSION,
        **getattr(model, "training_info_", {}),
        "p": model.p,
        "d_embed": model.d_embed,
        "d_hidden": model.d_hidden,
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


def _load_npz(path, dtype):
    with np.load(path, allow_pickle=False) as npz:
        if "metadata" not in npz.files:
            raise ValueError(f"{path} is not a saved ModularAdditionMLP: no 'metadata' entry.")
        metadata = json.loads(str(npz["metadata"]))
        if metadata.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version {metadata.get('format_version')!r}; "
                f"this version of sklearn_lib reads {_FORMAT_VERSION}."
            )
        arrays = {name: npz[name] for name in npz.files if name != "metadata"}
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten below
        model = ModularAdditionMLP(
            metadata["p"], d_embed=metadata["d_embed"], d_hidden=metadata["d_hidden"]
        )
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
    dtype = _resolve_torch_dtype(dtype)
    if path is not None:
        return _load_npz(path, dtype)
    resource = resources.files("sklearn_lib").joinpath("data", _DATA_FILE)
    if not resource.is_file():
        raise FileNotFoundError(
            f"the shipped weights sklearn_lib/data/{_DATA_FILE} are missing from this "
            "installation; run examples/train_modular_addition.py to recreate them."
        )
    with resources.as_file(resource) as file:
        return _load_npz(file, dtype)
