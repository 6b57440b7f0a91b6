"""The one-hidden-layer modular-addition MLP and the training run of its shipped weights."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._data import _check_p, _unseen_swap_mask, modular_addition_data
from ._training import _accuracy, _train_full_batch, _training_info

#: Layer names (``model.named_modules()`` paths) of :class:`ModularAdditionMLP`
#: whose outputs are the embedding, the hidden activations and the logits.
LAYERS = ("embed", "mlp.1", "mlp.2")

# Hyper-parameters of the shipped model (and defaults of the training run).
_D_EMBED = 32
_D_HIDDEN = 256
_EPOCHS = 3000
_LR = 3e-3
_WEIGHT_DECAY = 1.0
_TRAIN_FRACTION = 0.3


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

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModularAdditionMLP(p, d_embed=d_embed, d_hidden=d_hidden)
    if tie_hidden:
        parametrize.register_parametrization(model.mlp[0], "weight", _TiedHalves())
    data = (X_train, X_test, y_train, y_test)
    loss, epochs, seconds = _train_full_batch(
        model, model, data, epochs=epochs, lr=lr, weight_decay=weight_decay,
        report_every=max(1, epochs // 10), target_accuracy=None, verbose=verbose,
    )
    if tie_hidden:
        parametrize.remove_parametrizations(model.mlp[0], "weight", leave_parametrized=True)
        # A fresh module restores the canonical parameter order (weight before bias).
        trained = model.state_dict()
        with torch.random.fork_rng(devices=[]):
            model = ModularAdditionMLP(p, d_embed=d_embed, d_hidden=d_hidden)
        model.load_state_dict(trained)
    model.eval()
    model.training_info_ = _training_info(
        model, data, loss=loss, epochs=epochs, seconds=seconds,
        p=p, d_embed=model.d_embed, d_hidden=model.d_hidden, lr=float(lr),
        weight_decay=float(weight_decay), train_fraction=float(train_fraction),
        tie_hidden=bool(tie_hidden), random_state=seed,
        test_accuracy_unseen_swap=_accuracy(model, X_test[unseen_swap], y_test[unseen_swap]),
    )
    return model
