"""A small network trained on modular addition, shipped with the package.

The reference comparison of the interaction basis with PCA (SPEC section 5)
uses a network trained to compute ``(a + b) % p`` for ``p = 113``.  This module
provides everything needed to reproduce such a comparison offline:

* :func:`modular_addition_data` - all ``p * p`` ordered pairs, split
  deterministically into train and test sets;
* :class:`ModularAdditionMLP` - a one-hidden-layer ReLU MLP on a shared token
  embedding, with named submodules for forward hooks;
* :func:`load_modular_addition_model` - the trained network shipped as
  ``sklearn_lib/data/modular_addition_p113.npz`` (no pickle; about 150 KB),
  which generalises to the held-out pairs;
* :func:`train_modular_addition` - the training run that produced those
  weights (``examples/train_modular_addition.py`` reruns it), and
  :func:`save_modular_addition_model` to store a model in the same format;
* :func:`dominant_frequency` - the dominant Fourier frequency of a function of
  one token, used to label interaction-basis directions with frequencies.

Layer names
-----------
The model is ``embed`` followed by the ``nn.Sequential`` ``mlp``:

========= ====================== ================================================
name      module                 output
========= ====================== ================================================
``embed`` :class:`PairEmbedding` ``[E[a], E[b]]``, shape ``(n, 2 * d_embed)``
``mlp.0`` ``nn.Linear``          hidden pre-activations, ``(n, d_hidden)``
``mlp.1`` ``nn.ReLU``            hidden activations, ``(n, d_hidden)``
``mlp.2`` ``nn.Linear``          logits, ``(n, p)``
========= ====================== ================================================

so the layers to pass to :func:`sklearn_lib.collect.collect` are
``["embed", "mlp.1", "mlp.2"]`` (:data:`LAYERS`): the section ``embed -> mlp.1``
is exactly ``Linear`` then ``ReLU`` and ``mlp.1 -> mlp.2`` exactly ``Linear``.
"""

import json
import time
from importlib import resources

import numpy as np
import torch
from sklearn.utils import check_random_state
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "LAYERS",
    "ModularAdditionMLP",
    "PairEmbedding",
    "dominant_frequency",
    "load_modular_addition_model",
    "modular_addition_data",
    "save_modular_addition_model",
    "train_modular_addition",
]

#: Layer names (``model.named_modules()`` paths) of :class:`ModularAdditionMLP`
#: whose outputs are the embedding, the hidden activations and the logits.
LAYERS = ("embed", "mlp.1", "mlp.2")

_DATA_FILE = "modular_addition_p113.npz"
_FORMAT_VERSION = 1

# Hyper-parameters of the shipped model (and defaults of the training run).
_D_EMBED = 32
_D_HIDDEN = 256
_EPOCHS = 3000
_LR = 3e-3
_WEIGHT_DECAY = 1.0
_BETAS = (0.9, 0.98)
_TRAIN_FRACTION = 0.3


# --------------------------------------------------------------------------- data
def modular_addition_data(p=113, *, train_fraction=0.3, random_state=0):
    """All ordered pairs ``(a, b)`` of residues mod ``p``, labelled ``(a + b) % p``.

    The ``p * p`` pairs are shuffled with ``random_state`` and the first
    ``round(train_fraction * p * p)`` become the training set.

    Parameters
    ----------
    p : int, default=113
        The modulus; tokens are ``0, ..., p - 1``.
    train_fraction : float, default=0.3
        Fraction of the pairs used for training, in ``(0, 1)``; both sets must
        end up non-empty.
    random_state : int, RandomState instance or None, default=0
        Seed of the shuffle; an int gives the same split every time.

    Returns
    -------
    X_train : ndarray of shape (n_train, 2), dtype int64
        Training pairs ``(a, b)``; pass them to a model as they are
        (``torch.from_numpy(X_train)``, or directly to :mod:`sklearn_lib.collect`).
    X_test : ndarray of shape (n_test, 2), dtype int64
        Held-out pairs.
    y_train : ndarray of shape (n_train,), dtype int64
        ``(a + b) % p`` for the training pairs.
    y_test : ndarray of shape (n_test,), dtype int64
        ``(a + b) % p`` for the held-out pairs.

    Examples
    --------
    >>> from sklearn_lib.datasets import modular_addition_data
    >>> X_train, X_test, y_train, y_test = modular_addition_data(p=7, train_fraction=0.5)
    >>> X_train.shape, X_test.shape, X_train.dtype
    ((24, 2), (25, 2), dtype('int64'))
    >>> bool(((X_train.sum(axis=1) % 7) == y_train).all())
    True
    """
    p = _check_p(p)
    train_fraction = float(train_fraction)
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}.")
    n_pairs = p * p
    n_train = int(round(train_fraction * n_pairs))
    if not 0 < n_train < n_pairs:
        raise ValueError(
            f"train_fraction={train_fraction} leaves an empty train or test set for p={p}."
        )
    a, b = np.divmod(np.arange(n_pairs, dtype=np.int64), p)
    X = np.stack([a, b], axis=1)
    y = (a + b) % p
    order = check_random_state(random_state).permutation(n_pairs)
    train, test = order[:n_train], order[n_train:]
    return X[train], X[test], y[train], y[test]


def _check_p(p):
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer)) or p < 2:
        raise ValueError(f"p must be an integer >= 2, got {p!r}.")
    return int(p)


# --------------------------------------------------------------------------- model
class PairEmbedding(nn.Module):
    """Embed a pair of tokens with one shared table and concatenate: ``[E[a], E[b]]``.

    Parameters
    ----------
    p : int
        Number of tokens.
    d_embed : int
        Embedding width; the output has ``2 * d_embed`` features.

    Attributes
    ----------
    embedding : torch.nn.Embedding
        The shared table ``E`` of shape ``(p, d_embed)``.
    """

    def __init__(self, p, d_embed):
        super().__init__()
        self.embedding = nn.Embedding(p, d_embed)

    def forward(self, x):
        """Map int64 pairs of shape ``(n, 2)`` to ``(n, 2 * d_embed)``."""
        if x.ndim != 2 or x.shape[-1] != 2:
            raise ValueError(f"expected token pairs of shape (n, 2), got {tuple(x.shape)}.")
        return self.embedding(x).flatten(1)


class ModularAdditionMLP(nn.Module):
    """One-hidden-layer ReLU MLP on a shared token embedding, for ``(a + b) % p``.

    ``logits = W_U relu(W_H [E[a], E[b]] + b_H) + b_U``, built as the module
    ``embed`` (:class:`PairEmbedding`) followed by ``mlp = nn.Sequential(Linear,
    ReLU, Linear)``.  Hook the layers :data:`LAYERS` ``= ("embed", "mlp.1",
    "mlp.2")``: embedding, hidden activations and logits.

    Parameters
    ----------
    p : int, default=113
        The modulus: number of tokens and of output classes.
    d_embed : int, default=32
        Width of the token embedding.
    d_hidden : int, default=256
        Width of the hidden ReLU layer.

    Attributes
    ----------
    embed : PairEmbedding
        Output ``[E[a], E[b]]`` of shape ``(n, 2 * d_embed)``.
    mlp : torch.nn.Sequential
        ``mlp.0`` ``nn.Linear(2 * d_embed, d_hidden)``, ``mlp.1`` ``nn.ReLU()``,
        ``mlp.2`` ``nn.Linear(d_hidden, p)``.

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.datasets import ModularAdditionMLP
    >>> _ = torch.manual_seed(0)
    >>> model = ModularAdditionMLP(p=7, d_embed=4, d_hidden=8)
    >>> model(torch.tensor([[1, 2], [3, 6]])).shape
    torch.Size([2, 7])
    >>> [name for name, _ in model.named_modules()]
    ['', 'embed', 'embed.embedding', 'mlp', 'mlp.0', 'mlp.1', 'mlp.2']
    """

    def __init__(self, p=113, d_embed=_D_EMBED, d_hidden=_D_HIDDEN):
        super().__init__()
        self.p, self.d_embed, self.d_hidden = _check_p(p), int(d_embed), int(d_hidden)
        self.embed = PairEmbedding(self.p, self.d_embed)
        self.mlp = nn.Sequential(
            nn.Linear(2 * self.d_embed, self.d_hidden),
            nn.ReLU(),
            nn.Linear(self.d_hidden, self.p),
        )

    def forward(self, x):
        """Logits of shape ``(n, p)`` for int64 token pairs ``x`` of shape ``(n, 2)``."""
        return self.mlp(self.embed(x))

    def extra_repr(self):
        return f"p={self.p}, d_embed={self.d_embed}, d_hidden={self.d_hidden}"


# --------------------------------------------------------------------------- training
class _TiedHalves(nn.Module):
    """Parametrise a ``(h, 2 d)`` weight as ``[V, V]``: the same map for both tokens."""

    def forward(self, V):
        return torch.cat([V, V], dim=1)

    def right_inverse(self, W):
        return W[:, : W.shape[1] // 2]


def _accuracy(model, X, y):
    with torch.no_grad():
        return float((model(X).argmax(dim=1) == y).double().mean())


def _unseen_swap_mask(X_train, X_test, p):
    """Held-out pairs ``(a, b)`` whose swap ``(b, a)`` is not a training pair either."""
    seen = np.zeros(p * p, dtype=bool)
    seen[X_train[:, 0] * p + X_train[:, 1]] = True
    return ~seen[X_test[:, 1] * p + X_test[:, 0]]


def train_modular_addition(
    p=113,
    *,
    d_embed=_D_EMBED,
    d_hidden=_D_HIDDEN,
    epochs=_EPOCHS,
    lr=_LR,
    weight_decay=_WEIGHT_DECAY,
    train_fraction=_TRAIN_FRACTION,
    tie_hidden=True,
    random_state=0,
    verbose=True,
):
    """Train a :class:`ModularAdditionMLP` on modular addition until it generalises.

    Full-batch AdamW (``betas=(0.9, 0.98)``) with strong weight decay on the
    cross-entropy of the training split of :func:`modular_addition_data`
    (same ``train_fraction`` and ``random_state``), in float32, as in the
    grokking literature.  With the defaults (about two minutes on two CPU
    cores) the held-out accuracy reaches 100%; the shipped model is this run.

    With ``tie_hidden=True`` the hidden layer's weight is trained as
    ``W_H = [V, V]``, the same map applied to both tokens, so the network is
    symmetric in ``(a, b)``: a commutativity prior, after which it generalises
    from 30% of the pairs within ~2,000 epochs (untied, at ``lr=1e-3``, it was
    still a memorising lookup table after 12,000 epochs at this fraction).  The returned
    model is a plain :class:`ModularAdditionMLP` whose ``mlp.0.weight`` has two
    equal halves.  Its ``training_info_`` reports the held-out accuracy both
    on all held-out pairs and on those whose swap was not trained on either.

    The run is seeded (split and initialisation) and uses deterministic CPU
    kernels, so it repeats exactly with the same torch build, machine and
    number of threads; the global torch RNG state is left untouched.

    Parameters
    ----------
    p : int, default=113
        The modulus.
    d_embed : int, default=32
        Embedding width, see :class:`ModularAdditionMLP`.
    d_hidden : int, default=256
        Hidden width, see :class:`ModularAdditionMLP`.
    epochs : int, default=3000
        Number of full-batch optimisation steps.
    lr : float, default=3e-3
        AdamW learning rate.
    weight_decay : float, default=1.0
        AdamW (decoupled) weight decay, on all parameters.
    train_fraction : float, default=0.3
        Fraction of the ``p * p`` pairs trained on.
    tie_hidden : bool, default=True
        Train ``mlp.0.weight`` as ``[V, V]`` (see above).
    random_state : int, default=0
        Seed of the split and of the initialisation.
    verbose : bool, default=True
        Print the loss and accuracies every ``max(1, epochs // 10)`` epochs.

    Returns
    -------
    model : ModularAdditionMLP
        The trained float32 model, in eval mode.  ``model.training_info_`` is a
        dict with the hyper-parameters, ``train_accuracy``, ``test_accuracy``,
        ``test_accuracy_unseen_swap``, ``final_loss`` and ``train_seconds``.

    See Also
    --------
    save_modular_addition_model : Write the model in the shipped format.
    load_modular_addition_model : Load the shipped model.

    Examples
    --------
    >>> from sklearn_lib.datasets import train_modular_addition
    >>> model = train_modular_addition(p=11, d_embed=4, d_hidden=16, epochs=3, verbose=False)
    >>> model.training_info_["epochs"], model.mlp[2].out_features
    (3, 11)
    """
    p = _check_p(p)
    seed = int(random_state)
    epochs = int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    X_train, X_test, y_train, y_test = modular_addition_data(
        p, train_fraction=train_fraction, random_state=seed
    )
    unseen_swap = torch.from_numpy(_unseen_swap_mask(X_train, X_test, p))
    X_train, X_test, y_train, y_test = map(torch.from_numpy, (X_train, X_test, y_train, y_test))

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModularAdditionMLP(p, d_embed=d_embed, d_hidden=d_hidden)
    if tie_hidden:
        parametrize.register_parametrization(model.mlp[0], "weight", _TiedHalves())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=weight_decay, betas=_BETAS
    )
    report_every = max(1, epochs // 10)
    model.train()
    for epoch in range(1, epochs + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(X_train), y_train)
        loss.backward()
        optimizer.step()
        if verbose and (epoch % report_every == 0 or epoch == epochs):
            model.eval()
            print(
                f"epoch {epoch:6d}  loss {loss.item():.3e}  "
                f"train acc {_accuracy(model, X_train, y_train):.4f}  "
                f"test acc {_accuracy(model, X_test, y_test):.4f}",
                flush=True,
            )
            model.train()
    if tie_hidden:
        parametrize.remove_parametrizations(model.mlp[0], "weight", leave_parametrized=True)
        # A fresh module restores the canonical parameter order (weight before bias).
        trained = model.state_dict()
        with torch.random.fork_rng(devices=[]):
            model = ModularAdditionMLP(p, d_embed=d_embed, d_hidden=d_hidden)
        model.load_state_dict(trained)
    model.eval()
    train_seconds = time.perf_counter() - start
    model.training_info_ = {
        "p": p,
        "d_embed": model.d_embed,
        "d_hidden": model.d_hidden,
        "epochs": epochs,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "betas": list(_BETAS),
        "optimizer": "AdamW, full batch, float32",
        "train_fraction": float(train_fraction),
        "tie_hidden": bool(tie_hidden),
        "random_state": seed,
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "final_loss": float(loss.item()),
        "train_accuracy": _accuracy(model, X_train, y_train),
        "test_accuracy": _accuracy(model, X_test, y_test),
        "test_accuracy_unseen_swap": _accuracy(
            model, X_test[unseen_swap], y_test[unseen_swap]
        ),
        "train_seconds": train_seconds,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
    }
    return model


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


# --------------------------------------------------------------------------- analysis
def dominant_frequency(values, p=None, *, pooled=False):
    """Dominant Fourier frequency of a function of a token ``a = 0, ..., p - 1``.

    The power of frequency ``k`` in ``1, ..., p // 2`` is that of the real
    sinusoids ``cos(2 pi k a / p + phase)``, computed from ``np.fft.rfft``
    along the token axis (bins ``k`` and ``p - k`` combined, so powers sum to
    the non-constant energy by Parseval).  The constant term (frequency 0)
    is excluded: the dominant frequency is the strongest of ``1, ..., p // 2``
    (the lowest on ties) and ``fraction`` is its share of the non-constant
    power.  Only a constant column (non-constant power at most ``1e-24``
    times its total power, or all zeros) gets frequency ``0`` and fraction
    ``1.0``.

    Typical use: label interaction-basis directions of the embedding layer.
    Along a direction ``u`` of the ``embed`` output ``[E[a], E[b]]`` the
    activation is ``f(a) + g(b)`` with ``f = E @ u[:d]`` and ``g = E @ u[d:]``;
    pass ``f``, ``g`` or ``np.column_stack([f, g])`` with ``pooled=True``.

    Parameters
    ----------
    values : array-like of shape (p,) or (p, k)
        Values indexed by the token along axis 0; each column is one function.
    p : int, optional
        The modulus, checked against ``values.shape[0]``; defaults to it.
    pooled : bool, default=False
        For 2-D ``values``, add the power spectra of all columns and return a
        single frequency (e.g. for the ``cos`` and ``sin`` pair of a 2-D
        subspace) instead of one per column.

    Returns
    -------
    frequency : int or ndarray of shape (k,), dtype int64
        The dominant frequency in ``0, ..., p // 2``; an int for 1-D ``values``
        or ``pooled=True``, else one per column.
    fraction : float or ndarray of shape (k,)
        The share of the non-constant power at that frequency, in ``(0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_lib.datasets import dominant_frequency
    >>> a = np.arange(113)
    >>> k, fraction = dominant_frequency(3 + np.cos(2 * np.pi * 14 * a / 113 + 0.5))
    >>> k, round(fraction, 6)
    (14, 1.0)
    >>> wave = lambda k: np.cos(2 * np.pi * k * a / 113)
    >>> k, fraction = dominant_frequency(np.column_stack([wave(5) + 0.5 * wave(40), wave(99)]))
    >>> k, fraction.round(3)
    (array([ 5, 14]), array([0.8, 1. ]))
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (1, 2):
        raise ValueError(f"values must be of shape (p,) or (p, k), got {values.shape}.")
    n = values.shape[0]
    if p is None:
        p = n
    elif _check_p(p) != n:
        raise ValueError(f"values has {n} rows, expected p={p}.")
    if n < 2:
        raise ValueError(f"values needs at least 2 rows (tokens), got {n}.")
    if not np.all(np.isfinite(values)):
        raise ValueError("values must be finite.")
    one_d = values.ndim == 1
    columns = values.reshape(n, -1)

    power = np.abs(np.fft.rfft(columns, axis=0)) ** 2
    weight = np.full(power.shape[0], 2.0)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0  # the Nyquist bin has no mirror image
    power *= weight[:, None]
    if pooled:
        power = power.sum(axis=1, keepdims=True)

    non_constant = power[1:].sum(axis=0)
    constant = non_constant <= 1e-24 * power.sum(axis=0)
    frequency = np.argmax(power[1:], axis=0) + 1
    fraction = np.divide(
        power[frequency, np.arange(power.shape[1])],
        non_constant,
        out=np.ones_like(non_constant),
        where=~constant,
    )
    frequency[constant] = 0
    frequency = frequency.astype(np.int64)
    if one_d or pooled:
        return int(frequency[0]), float(fraction[0])
    return frequency, fraction
