"""The one-layer modular-addition transformer of the reference work, and its training run."""

import math

import torch
from torch import nn

from ._data import _check_p, modular_addition_data
from ._training import _train_full_batch, _training_info

#: Layer names (``model.named_modules()`` paths) of :class:`ModularAdditionTransformer`
#: on the residual stream (before attention, before the MLP, before the unembedding)
#: and the logits: the node layers of the reference work.
TRANSFORMER_LAYERS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "unembed")

# Hyper-parameters of the reference work's transformer (and the training run's defaults).
_D_MODEL = 128
_N_HEADS = 4
_D_HEAD = 32
_D_MLP = 512
_N_CTX = 3  # the positions "a b ="
_EPOCHS = 20000
_LR = 3e-3
_WEIGHT_DECAY = 1.0
_TRAIN_FRACTION = 0.3
_EVAL_EVERY = 100


class Attention(nn.Module):
    """Causal multi-head self-attention without biases, written out.

    ``W_Q``, ``W_K``, ``W_V`` (``d_model -> n_heads * d_head``) and ``W_O``
    (back to ``d_model``) are bias-free ``nn.Linear`` maps; head ``h`` uses
    features ``h * d_head : (h + 1) * d_head``. Each query attends to its own
    and earlier positions with scores ``q . k / sqrt(d_head)``.

    Parameters
    ----------
    d_model : int
        Width of the residual stream.
    n_heads : int
        Number of heads.
    d_head : int
        Width of each head.

    Attributes
    ----------
    hook_pattern : torch.nn.Identity
        Outputs the attention pattern, shape ``(n, n_heads, n_queries, n_positions)``.
    """

    def __init__(self, d_model, n_heads, d_head):
        super().__init__()
        self.n_heads, self.d_head = int(n_heads), int(d_head)
        width = self.n_heads * self.d_head
        self.W_Q = nn.Linear(d_model, width, bias=False)
        self.W_K = nn.Linear(d_model, width, bias=False)
        self.W_V = nn.Linear(d_model, width, bias=False)
        self.W_O = nn.Linear(width, d_model, bias=False)
        self.hook_pattern = nn.Identity()

    def forward(self, x, last_only=False):
        """Attention output for ``x`` of shape ``(n, t, d_model)``.

        With ``last_only`` only the last position queries: the output is
        ``(n, 1, d_model)`` instead of ``(n, t, d_model)``.
        """
        n, t, _ = x.shape
        queries = x[:, -1:] if last_only else x
        t_q = queries.shape[1]

        def heads(y, length):
            return y.view(n, length, self.n_heads, self.d_head).transpose(1, 2)

        q = heads(self.W_Q(queries), t_q)
        k = heads(self.W_K(x), t)
        v = heads(self.W_V(x), t)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
        query_position = torch.arange(t - t_q, t, device=x.device)
        future = torch.arange(t, device=x.device) > query_position[:, None]
        pattern = self.hook_pattern(scores.masked_fill(future, float("-inf")).softmax(dim=-1))
        z = (pattern @ v).transpose(1, 2).reshape(n, t_q, self.n_heads * self.d_head)
        return self.W_O(z)


class ModularAdditionTransformer(nn.Module):
    """The reference work's one-layer transformer for ``(a + b) % p``.

    Input ``a b =`` (token ``=`` is id ``p``), a learned token and positional
    embedding, one causal attention layer (no biases) and one ReLU MLP, both
    added to the residual stream, no LayerNorm, and the logits read out at the
    last position through an unembedding without bias::

        resid_pre  = embed[tokens] + pos_embed              (n, 3, d_model)
        resid_mid  = resid_pre + attn(resid_pre)            (n, 3, d_model)
        resid_post = resid_mid + mlp(resid_mid)             (n, 3, d_model)
        logits     = unembed(resid_post[:, -1])             (n, p)

    The identity modules ``hook_resid_pre``, ``hook_resid_mid`` and
    ``hook_resid_post`` output the residual stream at those three points, so
    hooks (and :func:`sklearn_lib.collect.collect`) read it by name:
    :data:`TRANSFORMER_LAYERS` lists them and the logits ``unembed``.

    Parameters
    ----------
    p : int, default=113
        The modulus: tokens ``0, ..., p - 1``, the ``=`` token ``p`` and ``p``
        output classes.
    d_model : int, default=128
        Width of the residual stream.
    n_heads : int, default=4
        Attention heads.
    d_head : int, default=32
        Width of each head.
    d_mlp : int, default=512
        Hidden width of the MLP.

    Attributes
    ----------
    embed : torch.nn.Embedding
        Token embedding, ``p + 1`` rows.
    pos_embed : torch.nn.Embedding
        Positional embedding, 3 rows (its ``weight`` is added; it is not indexed).
    attn : Attention
        The attention layer; ``attn.hook_pattern`` outputs the attention pattern.
    mlp : torch.nn.Sequential
        ``Linear(d_model, d_mlp)``, ``ReLU`` (``mlp.1``: the hidden activations),
        ``Linear(d_mlp, d_model)``.
    unembed : torch.nn.Linear
        ``d_model -> p`` without bias; its output is the logits.

    Notes
    -----
    Parameters are initialised as in the reference work: normal with standard
    deviation ``1 / sqrt(fan_in)`` (``1 / sqrt(p)`` for the unembedding), biases zero.
    The logits depend on positions 0 and 1 only through the keys and values of
    attention, so ``forward(x, last_only=True)`` computes attention and MLP at
    the last position only: the same logits (to rounding) at about half the
    cost, and ``hook_resid_mid`` / ``hook_resid_post`` output
    ``(n, 1, d_model)``: the reference work's node layers, which read those
    points at the last position.

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.datasets import ModularAdditionTransformer
    >>> _ = torch.manual_seed(0)
    >>> model = ModularAdditionTransformer(p=7, d_model=8, n_heads=2, d_head=4, d_mlp=16)
    >>> model(torch.tensor([[1, 2], [3, 6]])).shape
    torch.Size([2, 7])
    >>> seen = {}
    >>> hook = model.hook_resid_mid.register_forward_hook(
    ...     lambda module, args, out: seen.update(mid=out.shape))
    >>> _ = model(torch.tensor([[1, 2]])); seen["mid"]
    torch.Size([1, 3, 8])
    >>> _ = model(torch.tensor([[1, 2]]), last_only=True); seen["mid"]
    torch.Size([1, 1, 8])
    """

    def __init__(self, p=113, d_model=_D_MODEL, n_heads=_N_HEADS, d_head=_D_HEAD, d_mlp=_D_MLP):
        super().__init__()
        self.p = _check_p(p)
        self.d_model, self.n_heads, self.d_head, self.d_mlp = (
            int(d_model), int(n_heads), int(d_head), int(d_mlp)
        )
        self.embed = nn.Embedding(self.p + 1, self.d_model)
        self.pos_embed = nn.Embedding(_N_CTX, self.d_model)
        self.hook_resid_pre = nn.Identity()
        self.attn = Attention(self.d_model, self.n_heads, self.d_head)
        self.hook_resid_mid = nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(self.d_model, self.d_mlp), nn.ReLU(), nn.Linear(self.d_mlp, self.d_model)
        )
        self.hook_resid_post = nn.Identity()
        self.unembed = nn.Linear(self.d_model, self.p, bias=False)
        self._reset_parameters()

    def _reset_parameters(self):
        fan_in = self.d_model ** -0.5
        with torch.no_grad():
            for weight, std in [
                (self.embed.weight, fan_in),
                (self.pos_embed.weight, fan_in),
                (self.attn.W_Q.weight, fan_in),
                (self.attn.W_K.weight, fan_in),
                (self.attn.W_V.weight, fan_in),
                (self.attn.W_O.weight, fan_in),
                (self.mlp[0].weight, fan_in),
                (self.mlp[2].weight, self.d_mlp ** -0.5),
                (self.unembed.weight, self.p ** -0.5),
            ]:
                weight.normal_(0.0, std)
            self.mlp[0].bias.zero_()
            self.mlp[2].bias.zero_()

    def config(self):
        """The constructor arguments, a dict: ``p``, ``d_model``, ``n_heads``, ``d_head``, ``d_mlp``."""
        return {"p": self.p, "d_model": self.d_model, "n_heads": self.n_heads,
                "d_head": self.d_head, "d_mlp": self.d_mlp}

    def _tokens(self, x):
        if x.ndim != 2 or x.shape[1] not in (_N_CTX - 1, _N_CTX):
            raise ValueError(
                f"expected token pairs (n, 2) or sequences 'a b =' (n, 3), got {tuple(x.shape)}."
            )
        if x.shape[1] == _N_CTX - 1:
            return torch.cat([x, torch.full_like(x[:, :1], self.p)], dim=1)
        if bool((x[:, -1] != self.p).any()):
            raise ValueError(f"the last token of a sequence must be '=' (id {self.p}).")
        return x

    def forward(self, x, *, last_only=False):
        """Logits ``(n, p)`` for int64 pairs ``(n, 2)`` or sequences ``(n, 3)`` ending in ``p``.

        ``last_only=True`` computes attention and MLP at the last position only
        (see Notes).
        """
        tokens = self._tokens(x)
        resid_pre = self.hook_resid_pre(self.embed(tokens) + self.pos_embed.weight)
        attended = resid_pre[:, -1:] if last_only else resid_pre
        resid_mid = self.hook_resid_mid(attended + self.attn(resid_pre, last_only))
        resid_post = self.hook_resid_post(resid_mid + self.mlp(resid_mid))
        return self.unembed(resid_post[:, -1])

    def extra_repr(self):
        return ", ".join(f"{key}={value}" for key, value in self.config().items())


def train_modular_addition_transformer(
    p=113,
    *,
    d_model=_D_MODEL,
    n_heads=_N_HEADS,
    d_head=_D_HEAD,
    d_mlp=_D_MLP,
    epochs=_EPOCHS,
    lr=_LR,
    weight_decay=_WEIGHT_DECAY,
    train_fraction=_TRAIN_FRACTION,
    target_accuracy=1.0,
    eval_every=_EVAL_EVERY,
    random_state=0,
    verbose=True,
):
    """Train a :class:`ModularAdditionTransformer` until it generalises (groks).

    Full-batch AdamW (``betas=(0.9, 0.98)``, weight decay on all parameters)
    on the cross-entropy of the training split of :func:`modular_addition_data`
    (same ``train_fraction`` and ``random_state``), in float32, as in the
    reference work, computing attention and MLP at the last position only
    (``last_only=True``: the same logits). Every ``eval_every`` epochs the
    held-out accuracy is measured; the run stops as soon as it reaches
    ``target_accuracy``, so it repeats exactly when rerun with the same
    arguments (same torch build, machine and number of threads). The global
    torch RNG state is left untouched.

    Parameters
    ----------
    p : int, default=113
        The modulus.
    d_model, n_heads, d_head, d_mlp : int, default=128, 4, 32, 512
        Shape of the model, see :class:`ModularAdditionTransformer`.
    epochs : int, default=20000
        Most full-batch steps.
    lr : float, default=3e-3
        AdamW learning rate. The reference work uses ``1e-3`` and groks after
        roughly 10,000 epochs; at ``3e-3`` the shipped run grokked at epoch 2,200
        (13 minutes on one CPU thread).
    weight_decay : float, default=1.0
        AdamW (decoupled) weight decay.
    train_fraction : float, default=0.3
        Fraction of the ``p * p`` pairs trained on.
    target_accuracy : float or None, default=1.0
        Stop once the held-out accuracy reaches it; ``None`` runs all ``epochs``.
    eval_every : int, default=100
        Epochs between held-out measurements (and progress lines).
    random_state : int, default=0
        Seed of the split and of the initialisation.
    verbose : bool, default=True
        Print the loss and accuracies at each measurement.

    Returns
    -------
    model : ModularAdditionTransformer
        The trained float32 model, in eval mode. ``model.training_info_`` is a
        dict with the hyper-parameters, ``epochs`` (those run),
        ``train_accuracy``, ``test_accuracy``, ``final_loss`` and ``train_seconds``.

    See Also
    --------
    load_modular_addition_transformer : The shipped result of this run.

    Examples
    --------
    >>> from sklearn_lib.datasets import train_modular_addition_transformer
    >>> model = train_modular_addition_transformer(
    ...     p=11, d_model=8, n_heads=2, d_head=4, d_mlp=16, epochs=3, verbose=False)
    >>> model.training_info_["epochs"], model.unembed.out_features
    (3, 11)
    """
    p = _check_p(p)
    seed = int(random_state)
    epochs, eval_every = int(epochs), int(eval_every)
    if epochs < 1 or eval_every < 1:
        raise ValueError(f"epochs and eval_every must be >= 1, got {epochs} and {eval_every}.")
    data = tuple(map(torch.from_numpy, modular_addition_data(
        p, train_fraction=train_fraction, random_state=seed
    )))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModularAdditionTransformer(p, d_model, n_heads, d_head, d_mlp)

    def last_position(X):
        return model(X, last_only=True)

    loss, epochs_run, seconds = _train_full_batch(
        model, last_position, data, epochs=epochs, lr=lr, weight_decay=weight_decay,
        report_every=eval_every, target_accuracy=target_accuracy, verbose=verbose,
    )
    model.training_info_ = _training_info(
        last_position, data, loss=loss, epochs=epochs_run, seconds=seconds,
        **model.config(), lr=float(lr), weight_decay=float(weight_decay),
        train_fraction=float(train_fraction), random_state=seed,
        target_accuracy=target_accuracy, eval_every=eval_every,
    )
    return model
