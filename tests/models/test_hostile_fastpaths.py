"""Hostile battery (issue 20, classes 1 and 2): closed forms that the model does not follow,
models that couple the samples of a batch or are not deterministic.

Every case is a model, layers and data with one expectation:

* ``"match"``: the graph must equal a brute-force reference (activations recorded
  batch by batch, per-sample Jacobians from ``torch.autograd.functional.jacobian``
  of the model's own section, fitted with ``InteractionGraph.fit``), or, where
  noted, the generic path (``fast_path=False``), whatever path the library takes;
* ``"refuse"``: ``fit_model`` (or ``collect``) must raise a ValueError in our words
  (``match``), because SPEC's statistics assume independent samples and a
  deterministic model.

``classify`` gives each case a verdict: ``ok``, ``silent-wrong`` (accepted with a
wrong result), ``cryptic-error`` (an error that is not ours, or a valid model
refused) or ``crash`` (an exception other than ValueError/TypeError). Run this file
as a script to print the verdicts of the checkout on ``sys.path``::

    PYTHONPATH=/path/to/checkout python tests/models/test_hostile_fastpaths.py

(``HOSTILE_DEBUG=1`` also prints each error's first words.)
"""

import contextlib
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

from sklearn_lib import InteractionGraph, declare_attention, declare_residual_mlp
from sklearn_lib.collect import collect, record_activations, section_function
from sklearn_lib.utils._backend import eval_mode

N_SMALL, N_LATE = 120, 400
THRESHOLD = 1e-10
TOL = 1e-6


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


@dataclass
class Case:
    """A model, its layers and data, and what the library must do with them."""

    build: object
    expect: str  # "match" or "refuse"
    match: str = ""  # the refusal's words (a regex)
    sequence: bool = False
    params: dict = field(default_factory=dict)
    reference: str = "brute"  # "brute" or "generic"
    surface: str = "fit_model"  # or "collect"
    context: object = contextlib.nullcontext


# --------------------------------------------------------------------------- references
def _batches(data):
    return data if isinstance(data, list) else [data]


def _brute_force(model, layers, data, sequence):
    """Rows of every layer and per-sample Jacobian rows of adjacent layers, batch by batch.

    Batches of different sequence lengths are allowed for row-wise sections only:
    their rows then keep the diagonal block (output position = input position).
    """
    # Not a copy: the instance-level forwards of the cases close over the modules.
    acts, jacs = [[] for _ in layers], [[] for _ in layers[1:]]
    lengths = {tuple(x.shape[1:2]) for x in _batches(data)}
    rowwise = sequence and len(lengths) > 1
    for x in _batches(data):
        rec = record_activations(model, layers, x, batch_size=len(x), verbose=False)
        A = [torch.as_tensor(rec[layer]) for layer in layers]
        for l, a in enumerate(A):
            acts[l].append(a.reshape(-1, a.shape[-1]) if sequence else a.reshape(len(a), -1))
        for l in range(len(layers) - 1):
            f = section_function(model, layers[l], layers[l + 1], x)
            with eval_mode(model):
                J = torch.autograd.functional.jacobian(lambda t, f=f: f(t).sum(0), A[l],
                                                       vectorize=True)
            n = len(x)
            if not sequence:
                J = J.reshape(-1, n, A[l][0].numel()).permute(1, 0, 2)
            elif rowwise:
                # (P, d_out, n, P, d_in) -> the diagonal blocks, one per row.
                P = A[l].shape[1]
                J = torch.stack([J[t, :, :, t] for t in range(P)])  # (P, d_out, n, d_in)
                J = J.permute(2, 0, 1, 3).reshape(n * P, J.shape[1], -1)
            else:
                p_out, d_out, _, p_in, d_in = J.shape
                J = J.permute(2, 3, 0, 1, 4).reshape(n * p_in, p_out * d_out, d_in)
            jacs[l].append(J)
    acts = [torch.cat(a).numpy() for a in acts]
    jacs = [torch.cat(j).numpy() for j in jacs]
    return acts, jacs, sequence and not rowwise


def _params(case):
    return dict(edge_point="data", truncation_threshold=THRESHOLD, verbose=False, **case.params)


def _reference(case, model, layers, data):
    if case.reference == "generic":
        return InteractionGraph(fast_path=False, **_params(case)).fit_model(
            model, layers, data, sequence=case.sequence)
    acts, jacs, sequence = _brute_force(model, layers, data, case.sequence)
    return InteractionGraph(**_params(case)).fit(acts, jacobians=jacs, sequence=sequence)


def _same_graph(graph, ref):
    if list(graph.n_components_) != list(ref.n_components_):
        return False
    for b, b_ref in zip(graph.bases_, ref.bases_):
        lam, lam_ref = np.asarray(b.interaction_strengths_), np.asarray(b_ref.interaction_strengths_)
        if np.abs(lam - lam_ref).max() > TOL * lam_ref.max():
            return False
    for E, E_ref in zip(graph.edges_, ref.edges_):
        if np.abs(np.asarray(E) - E_ref).max() > TOL * max(E_ref.max(), 1e-300):
            return False
    return True


def _same_jacobians(model, layers, data, sequence):
    _, jacs = collect(model, layers, data, sequence=sequence, verbose=False, batch_size=100)
    _, ref_jacs, _ = _brute_force(model, layers, data, sequence)
    return all(np.allclose(J, R, rtol=0, atol=1e-10 * max(1.0, np.abs(R).max()))
               for J, R in zip(jacs, ref_jacs))


def classify(case):
    """The verdict of the library on ``case`` (module docstring)."""
    model, layers, data = case.build()
    try:
        with case.context(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if case.surface == "collect":
                got = _same_jacobians(model, layers, data, case.sequence)
            else:
                graph = InteractionGraph(**_params(case)).fit_model(
                    model, layers, data, sequence=case.sequence)
                got = _same_graph(graph, _reference(case, model, layers, data))
    except (ValueError, TypeError) as exc:
        if os.environ.get("HOSTILE_DEBUG"):
            print("   ", type(exc).__name__, str(exc)[:300].replace("\n", " "))
        if case.expect == "refuse" and re.search(case.match, str(exc), re.DOTALL):
            return "ok"
        return "cryptic-error"
    except Exception as exc:  # noqa: BLE001 - the verdict says what happened
        if os.environ.get("HOSTILE_DEBUG"):
            print("   ", type(exc).__name__, str(exc)[:300].replace("\n", " "))
        return "crash"
    if case.expect == "refuse":
        return "silent-wrong"
    return "ok" if got else "silent-wrong"


# --------------------------------------------------------------------------- class 1 models
def _mlp(seed=0, d_in=4, d=6, d_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, d), nn.Tanh(),
                         nn.Linear(d, d_out)).double()


SEQ_LAYERS = [":input", "1", "3", "4"]


def _sorted_by_first_unit(model, X):
    """``X`` ordered by the first unit of ``model[0]``: large values come last (after 256)."""
    with torch.no_grad():
        key = model[0](X)[:, 0]
    return X[torch.argsort(key)]


def _mask(shape, seed=5):
    return (torch.rand(*shape, generator=_gen(seed)) > 0.4).double()


def seq_linear_instance_forward():
    """Pruning by hand: ``lin.forward = lambda x: F.linear(x, W * mask, b)`` (the issue's)."""
    model = _mlp()
    lin = model[2]
    mask = _mask(lin.weight.shape)
    lin.forward = lambda x: F.linear(x, lin.weight * mask, lin.bias)
    return model, SEQ_LAYERS, _randn(N_SMALL, 4)


def seq_activation_instance_forward():
    model = _mlp()
    model[1].forward = lambda x: F.leaky_relu(x, 0.3)
    return model, SEQ_LAYERS, _randn(N_SMALL, 4)


def seq_dropout_instance_forward():
    """A transparent module (Dropout) that is not transparent."""
    model = _mlp()
    model.insert(3, nn.Dropout(0.1))
    scale = torch.linspace(0.5, 2, 6, dtype=torch.float64)
    model[3].forward = lambda x: x * scale
    return model, [":input", "1", "4", "5"], _randn(N_SMALL, 4)


def seq_identity_instance_forward():
    model = _mlp()
    model.insert(2, nn.Identity())
    mask = _mask((6,))
    model[2].forward = lambda x: x * mask
    return model, [":input", "1", "4", "5"], _randn(N_SMALL, 4)


def seq_container_instance_forward():
    """The Sequential itself computes something else than its children in order."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    mask = _mask((6,))
    inner.forward = lambda x: inner[2](inner[1](inner[0](x)) * mask)
    return nn.Sequential(inner), ["0.0:input", "0.1", "0.2"], _randn(N_SMALL, 4)


def seq_forward_hook():
    model = _mlp()
    model[2].register_forward_hook(lambda m, args, out: out * 1.5)
    return model, SEQ_LAYERS, _randn(N_SMALL, 4)


def seq_forward_pre_hook():
    model = _mlp()
    model[2].register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    return model, SEQ_LAYERS, _randn(N_SMALL, 4)


def seq_forward_hook_with_kwargs():
    model = _mlp()
    model[3].register_forward_hook(lambda m, args, kwargs, out: out + 0.1, with_kwargs=True)
    return model, SEQ_LAYERS, _randn(N_SMALL, 4)


@contextlib.contextmanager
def _global_hook():
    def hook(module, args, out):
        return out * 2 if isinstance(module, nn.Tanh) else None

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def seq_global_hook():
    return _mlp(), SEQ_LAYERS, _randn(N_SMALL, 4)


@contextlib.contextmanager
def _patched_linear():
    original = nn.Linear.forward
    nn.Linear.forward = lambda self, x: F.linear(x, self.weight * 0.5, self.bias)
    try:
        yield
    finally:
        nn.Linear.forward = original


def seq_class_patched():
    return _mlp(), SEQ_LAYERS, _randn(N_SMALL, 4)


class _Mask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, W):
        return W * self.mask


def seq_parametrized():
    model = _mlp()
    parametrize.register_parametrization(model[2], "weight", _Mask(_mask((6, 6))))
    return model, SEQ_LAYERS, _randn(N_SMALL, 4)


def seq_pruned():
    model = _mlp()
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    return model, SEQ_LAYERS, _randn(N_SMALL, 4)


def seq_weight_norm_hook():
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(model[2])
    with torch.no_grad():
        model[2].weight_g.mul_(1.7)
    return model, SEQ_LAYERS, _randn(N_SMALL, 4)


def seq_weight_norm_parametrized():
    model = _mlp()
    torch.nn.utils.parametrizations.weight_norm(model[2])
    with torch.no_grad():
        model[2].parametrizations.weight.original0.mul_(1.7)
    return model, SEQ_LAYERS, _randn(N_SMALL, 4)


def seq_spectral_norm_parametrized():
    """In training mode reading the weight runs a power iteration; the fit runs in eval mode."""
    model = _mlp()
    torch.nn.utils.parametrizations.spectral_norm(model[2])
    model.train()
    return model, SEQ_LAYERS, _randn(N_SMALL, 4)


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def seq_subclass():
    model = _mlp()
    old = model[2]
    model[2] = _ScaledLinear(6, 6).double()
    model[2].load_state_dict(old.state_dict())
    return model, SEQ_LAYERS, _randn(N_SMALL, 4)


def seq_late_term():
    """A Linear whose override adds a term only for inputs that come after sample 256."""
    model = _mlp()
    lin = model[0]
    lin.forward = lambda x: F.linear(x, lin.weight, lin.bias) + 3 * torch.relu(
        F.linear(x, lin.weight[:1], lin.bias[:1]) - 1.5)
    X = _sorted_by_first_unit(model, _randn(N_LATE, 4))
    return model, SEQ_LAYERS, X


# -------------------------------------------------------------------- residual blocks
class Block(nn.Module):
    """``x + fc_out(act(fc_in(x)))``, plus ``extra(x)`` where the test wants a deviation."""

    def __init__(self, d=5, d_mlp=7, extra=None):
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(d, d_mlp), nn.GELU(), nn.Linear(d_mlp, d)
        self.extra = extra

    def forward(self, x):
        y = x + self.fc_out(self.act(self.fc_in(x)))
        return y if self.extra is None else y + self.extra(x)


class ResNet(nn.Module):
    def __init__(self, extra=None, d_in=3, d=5, d_out=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(d_in, d)
        self.block = Block(d, 7, extra)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        return self.head(self.block(self.embed(x)))


RES_LAYERS = ["block:input", "block:output", "head"]


def _late(x, threshold=1.0):
    """A term that is zero unless the first feature passes ``threshold``."""
    return 2.0 * torch.relu(x[..., :1] - threshold) * x


def _resnet(extra=None):
    model = ResNet(extra).double()
    declare_residual_mlp(model.block, "fc_in", "act", "fc_out")
    return model


def _sorted_by_embedding(model, X):
    with torch.no_grad():
        key = model.embed(X)[..., 0].reshape(len(X), -1).amax(1)
    return X[torch.argsort(key)]


def res_late_term():
    """The issue's: a term for inputs that first appear after sample 256."""
    model = _resnet(_late)
    return model, RES_LAYERS, _sorted_by_embedding(model, _randn(N_LATE, 3))


def res_late_term_sequence():
    model = _resnet(_late)
    return model, RES_LAYERS, _sorted_by_embedding(model, _randn(N_LATE, 3, 3))


def _late_positions(x):
    """A term at positions 3 and later only."""
    out = torch.zeros_like(x)
    out[:, 3:] = 0.8 * x[:, 3:] ** 2
    return out


def res_late_positions():
    """Only positions that the first batch lacks get the term."""
    model = _resnet(_late_positions)
    return model, RES_LAYERS, [_randn(150, 3, 3, seed=1), _randn(150, 6, 3, seed=2)]


def res_instance_forward():
    model = _resnet()
    fc = model.block.fc_in
    mask = _mask(fc.weight.shape)
    fc.forward = lambda x: F.linear(x, fc.weight * mask, fc.bias)
    return model, RES_LAYERS, _randn(N_SMALL, 3)


def res_instance_forward_late():
    """``fc_out`` adds a term for the hidden values of the last 5% of the samples only."""
    model = _resnet()
    X = _randn(N_LATE, 3)
    with torch.no_grad():
        hidden = model.block.act(model.block.fc_in(model.embed(X)))
    j = int((hidden.amax(0) - hidden.amin(0)).argmax())
    threshold = float(hidden[:, j].quantile(0.95))
    fc = model.block.fc_out
    fc.forward = lambda h: F.linear(h, fc.weight, fc.bias) + 3 * torch.relu(
        h[:, j : j + 1] - threshold)
    return model, RES_LAYERS, X[torch.argsort(hidden[:, j])]


def res_parametrized():
    model = _resnet()
    parametrize.register_parametrization(model.block.fc_in, "weight", _Mask(_mask((7, 5))))
    return model, RES_LAYERS, _randn(N_SMALL, 3)


class ResParent(nn.Module):
    """The residual add in the parent's forward (``post = mid + mlp(mid)``)."""

    def __init__(self, extra=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 5)
        self.mid, self.post = nn.Identity(), nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 5))
        self.head = nn.Linear(5, 4)
        self.extra = extra

    def forward(self, x):
        mid = self.mid(self.embed(x))
        post = mid + self.mlp(mid)
        if self.extra is not None:
            post = post + self.extra(mid)
        return self.head(self.post(post))


def res_parent_late_term():
    model = ResParent(_late).double()
    declare_residual_mlp(model, "mlp.0", "mlp.1", "mlp.2", input="mid", output="post")
    return model, ["mid", "post", "head"], _sorted_by_embedding(model, _randn(N_LATE, 3))


def res_parent_mid_instance_forward():
    """The declared input module computes something else than the identity."""
    model = ResParent().double()
    declare_residual_mlp(model, "mlp.0", "mlp.1", "mlp.2", input="mid", output="post")
    model.mid.forward = lambda x: x * 1.3
    return model, ["mid", "post", "head"], _randn(N_SMALL, 3)


# -------------------------------------------------------------------------- attention
class AttnParent(nn.Module):
    """``mid = pre + attention(pre)`` (causal, 2 heads, no biases), then a head."""

    def __init__(self, extra=None, d=4, n_heads=2):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(3, d)
        self.pre, self.mid = nn.Identity(), nn.Identity()
        self.W_Q, self.W_K, self.W_V, self.W_O = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.head = nn.Linear(d, 2)
        self.n_heads, self.extra = n_heads, extra

    def attend(self, x):
        B, T, d = x.shape
        H, e = self.n_heads, d // self.n_heads
        q, k, v = (m(x).view(B, T, H, e).transpose(1, 2) for m in (self.W_Q, self.W_K, self.W_V))
        scores = q @ k.transpose(-1, -2) / e**0.5
        future = torch.ones(T, T, dtype=torch.bool).triu(1)
        z = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
        return self.W_O(z.transpose(1, 2).reshape(B, T, d))

    def forward(self, x):
        pre = self.pre(self.embed(x))
        mid = pre + self.attend(pre)
        if self.extra is not None:
            mid = mid + self.extra(pre)
        return self.head(self.mid(mid))


def _attn(extra=None):
    model = AttnParent(extra).double()
    return declare_attention(model, "W_Q", "W_K", "W_V", "W_O", input="pre", output="mid",
                             n_heads=2)


ATTN_LAYERS = ["pre", "mid", "head"]


def attn_late_term():
    model = _attn(_late)
    return model, ATTN_LAYERS, _sorted_by_embedding(model, _randn(N_LATE, 4, 3))


def attn_late_positions():
    model = _attn(_late_positions)
    return model, ATTN_LAYERS, [_randn(150, 3, 3, seed=1), _randn(150, 6, 3, seed=2)]


def attn_instance_forward_late():
    model = _attn()
    W_V = model.W_V
    W_V.forward = lambda x: F.linear(x, W_V.weight) + 2 * torch.relu(x[..., :1] - 1.0)
    return model, ATTN_LAYERS, _sorted_by_embedding(model, _randn(N_LATE, 4, 3))


# --------------------------------------------------------------------------- readouts
class Readout(nn.Module):
    """``logits = unembed(resid[:, -1])`` in the parent's forward: a readout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Linear(3, 5)
        self.resid = nn.Identity()
        self.unembed = nn.Linear(5, 4)

    def forward(self, x):
        return self.unembed(self.resid(torch.tanh(self.embed(x))))


def readout_instance_forward():
    model = Readout().double()
    un = model.unembed
    mask = _mask(un.weight.shape)
    un.forward = lambda x: F.linear(x, un.weight * mask, un.bias)
    return model, ["embed", "resid", "unembed"], _randn(N_SMALL, 3)


def readout_instance_forward_late():
    model = Readout().double()
    un = model.unembed
    un.forward = lambda x: F.linear(x, un.weight, un.bias) + 4 * torch.relu(x[:, :1] - 0.9)
    with torch.no_grad():
        key = torch.tanh(model.embed(_randn(N_LATE, 3)))[:, 0]
    return model, ["embed", "resid", "unembed"], _randn(N_LATE, 3)[torch.argsort(key)]


# ------------------------------------------------------------ data that change per pass
class Passes:
    """Batches of ``X``; from the second full pass on, the last sample is changed."""

    def __init__(self, X, batch_size=40):
        self.X, self.batch_size, self.full_passes = X, batch_size, 0

    def __iter__(self):
        X = self.X.clone()
        if self.full_passes >= 1:
            X[-1] += 0.5
        for i in range(0, len(X), self.batch_size):
            yield X[i : i + self.batch_size]
        self.full_passes += 1


def changing_sequential():
    return _mlp(), SEQ_LAYERS, Passes(_randn(N_SMALL, 4))


def changing_residual():
    return _resnet(), RES_LAYERS, Passes(_randn(N_SMALL, 3))


def changing_attention():
    return _attn(), ATTN_LAYERS, Passes(_randn(N_SMALL, 4, 3))


def changing_readout():
    return Readout().double(), ["resid", "unembed"], Passes(_randn(N_SMALL, 3))


# ------------------------------------------------------------------ class 2: coupling
class Wrap(nn.Module):
    """``embed -> inner -> act -> head`` with the layers ``embed``, ``inner``, ``head``."""

    def __init__(self, inner, d_in=4, d=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(d_in, d)
        self.inner = inner
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.relu(self.inner(self.embed(x))))


WRAP_LAYERS = ["embed", "inner", "head"]


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _wrap(fn_or_module, d_in=4):
    inner = fn_or_module if isinstance(fn_or_module, nn.Module) else Fn(fn_or_module)
    return Wrap(inner, d_in).double()


COUPLED = r"depends on the other samples of its batch|changes with the size of its batch"
NONDETERMINISTIC = r"not deterministic"


def batch_mean():
    """The issue's: a layer that subtracts the batch mean."""
    return _wrap(lambda x: x - x.mean(0, keepdim=True)), WRAP_LAYERS, _randn(200, 4)


def batchnorm_batch_statistics():
    return _wrap(nn.BatchNorm1d(6, track_running_stats=False)), WRAP_LAYERS, _randn(200, 4)


def batchnorm_functional_training():
    return (_wrap(lambda x: F.batch_norm(x, None, None, training=True)), WRAP_LAYERS,
            _randn(200, 4))


def layernorm_over_batch():
    return (_wrap(lambda x: F.layer_norm(x.T, (x.shape[0],)).T), WRAP_LAYERS, _randn(200, 4))


def softmax_over_batch():
    return _wrap(lambda x: torch.softmax(x, dim=0)), WRAP_LAYERS, _randn(200, 4)


def global_max_scaling():
    return _wrap(lambda x: x / x.abs().amax()), WRAP_LAYERS, _randn(200, 4)


def batch_size_scaling():
    return _wrap(lambda x: x * (x.shape[0] / 50)), WRAP_LAYERS, _randn(200, 4)


class Recurrent(nn.Module):
    """``embed -> rnn -> head`` on (batch, position, feature) inputs."""

    def __init__(self, kind, batch_first, transpose=False):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Linear(3, 4)
        self.rnn = kind(4, 5, batch_first=batch_first)
        self.out = nn.Identity()
        self.head = nn.Linear(5, 2)
        self.transpose = transpose

    def forward(self, x):
        h = self.embed(x)
        if self.transpose:
            y = self.rnn(h.transpose(0, 1))[0].transpose(0, 1)
        else:
            y = self.rnn(h)[0]
        return self.head(self.out(y))


def lstm_time_major():
    """The issue's: a default (time-major) LSTM fed (batch, time, feature)."""
    return (Recurrent(nn.LSTM, False).double(), ["embed", "out", "head"], _randn(60, 5, 3))


def gru_time_major():
    return (Recurrent(nn.GRU, False).double(), ["embed", "out", "head"], _randn(60, 5, 3))


def rnn_time_major_layer_recorded():
    """Time-major on purpose, but the recorded layer is (time, batch, feature)."""
    return (Recurrent(nn.LSTM, False, transpose=True).double(), ["embed", "rnn", "head"],
            _randn(60, 5, 3))


class MHA(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.out = nn.Identity()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.out(h + self.attn(h, h, h, need_weights=False)[0]))


def mha_time_major():
    return MHA(False).double(), ["embed", "out", "head"], _randn(60, 5, 3)


class Encoder(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Linear(3, 4)
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)))


def encoder_time_major():
    return Encoder(False).double(), ["embed", "layer", "head"], _randn(60, 5, 3)


# ------------------------------------------------------------- class 2: nondeterminism
def noise_in_forward():
    """The issue's: noise sampled in forward."""
    return _wrap(lambda x: x + 0.1 * torch.randn_like(x)), WRAP_LAYERS, _randn(200, 4)


def functional_dropout_always_on():
    """``F.dropout`` without ``training=self.training`` drops units in eval mode too."""
    return _wrap(lambda x: F.dropout(x, 0.2)), WRAP_LAYERS, _randn(200, 4)


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + 0.01 * self.calls


def stateful_module():
    return _wrap(Counter()), WRAP_LAYERS, _randn(200, 4)


# --------------------------------------------------------------- valid models: accepted
def dropout_in_training_mode():
    """nn.Dropout in a model left in training mode: the fit runs in eval mode."""
    model = _mlp()
    model.insert(2, nn.Dropout(0.5))
    model.train()
    return model, [":input", "1", "4", "5"], _randn(N_SMALL, 4)


def layernorm_per_sample():
    return _wrap(nn.LayerNorm(6)), WRAP_LAYERS, _randn(N_SMALL, 4)


def batchnorm_running_statistics():
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5, generator=_gen(3))
        bn.running_var.uniform_(0.5, 2.0, generator=_gen(4))
    model = _wrap(bn)
    model.train()
    return model, WRAP_LAYERS, _randn(N_SMALL, 4)


def softmax_over_features():
    return _wrap(lambda x: torch.softmax(x, dim=-1)), WRAP_LAYERS, _randn(N_SMALL, 4)


def relu_inplace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    return model, [":input", "1", "2"], _randn(N_SMALL, 4)


def lstm_batch_first():
    return (Recurrent(nn.LSTM, True).double(), ["embed", "out", "head"], _randn(60, 5, 3))


def gru_batch_first():
    return (Recurrent(nn.GRU, True).double(), ["embed", "out", "head"], _randn(60, 5, 3))


def lstm_time_major_transposed():
    """A time-major LSTM used as such: the model transposes around it."""
    return (Recurrent(nn.LSTM, False, transpose=True).double(), ["embed", "out", "head"],
            _randn(60, 5, 3))


def mha_batch_first():
    return MHA(True).double(), ["embed", "out", "head"], _randn(60, 5, 3)


def encoder_batch_first():
    return Encoder(True).double(), ["embed", "layer", "head"], _randn(60, 5, 3)


def plain_sequential():
    return _mlp(), SEQ_LAYERS, _randn(N_LATE, 4)


def plain_residual_late_batches():
    return _resnet(), RES_LAYERS, _randn(N_LATE, 3)


def plain_attention():
    return _attn(), ATTN_LAYERS, _randn(N_LATE, 4, 3)


# ------------------------------------------------------------------------ the cases
CASES = {
    # Class 1: a module that differs from its class's formula.
    "seq-linear-instance-forward": Case(seq_linear_instance_forward, "match"),
    "seq-activation-instance-forward": Case(seq_activation_instance_forward, "match"),
    "seq-dropout-instance-forward": Case(seq_dropout_instance_forward, "match"),
    "seq-identity-instance-forward": Case(seq_identity_instance_forward, "match"),
    "seq-container-instance-forward": Case(seq_container_instance_forward, "match"),
    "seq-forward-hook": Case(seq_forward_hook, "match"),
    "seq-forward-pre-hook": Case(seq_forward_pre_hook, "match"),
    "seq-forward-hook-with-kwargs": Case(seq_forward_hook_with_kwargs, "match"),
    "seq-global-hook": Case(seq_global_hook, "match", context=_global_hook),
    "seq-class-patched": Case(seq_class_patched, "match", context=_patched_linear),
    "seq-parametrized": Case(seq_parametrized, "match"),
    "seq-pruned": Case(seq_pruned, "match"),
    "seq-weight-norm-hook": Case(seq_weight_norm_hook, "match"),
    "seq-weight-norm-parametrized": Case(seq_weight_norm_parametrized, "match"),
    "seq-spectral-norm-parametrized": Case(seq_spectral_norm_parametrized, "match"),
    "seq-subclass": Case(seq_subclass, "match"),
    "seq-late-term": Case(seq_late_term, "match"),
    "res-late-term": Case(res_late_term, "match"),
    "res-late-term-sequence": Case(res_late_term_sequence, "match", sequence=True),
    "res-late-positions": Case(res_late_positions, "match", sequence=True),
    "res-instance-forward": Case(res_instance_forward, "match"),
    "res-instance-forward-late": Case(res_instance_forward_late, "match"),
    "res-parametrized": Case(res_parametrized, "match"),
    "res-parent-late-term": Case(res_parent_late_term, "match"),
    "res-parent-mid-instance-forward": Case(res_parent_mid_instance_forward, "match"),
    "attn-late-term": Case(attn_late_term, "match", sequence=True),
    "attn-late-positions": Case(attn_late_positions, "match", sequence=True,
                                reference="generic"),
    "attn-instance-forward-late": Case(attn_instance_forward_late, "match", sequence=True),
    "readout-instance-forward": Case(readout_instance_forward, "match"),
    "readout-instance-forward-late": Case(readout_instance_forward_late, "match"),
    "collect-seq-instance-forward": Case(seq_linear_instance_forward, "match",
                                         surface="collect"),
    "collect-res-late-term": Case(res_late_term, "match", surface="collect"),
    "collect-container-instance-forward": Case(seq_container_instance_forward, "match",
                                               surface="collect"),
    # Class 1: data that change between passes, on every closed-form path.
    "changing-sequential": Case(changing_sequential, "refuse", "changed between passes"),
    "changing-residual": Case(changing_residual, "refuse", "changed between passes"),
    "changing-attention": Case(changing_attention, "refuse", "changed between passes",
                               sequence=True),
    "changing-readout": Case(changing_readout, "refuse", "changed between passes"),
    # Class 2: samples coupled within a batch.
    "batch-mean": Case(batch_mean, "refuse", COUPLED, params={"batch_size": 20}),
    "batchnorm-batch-statistics": Case(batchnorm_batch_statistics, "refuse",
                                       COUPLED + ".*track_running_stats"),
    "batchnorm-functional-training": Case(batchnorm_functional_training, "refuse", COUPLED),
    "layernorm-over-batch": Case(layernorm_over_batch, "refuse", COUPLED),
    "softmax-over-batch": Case(softmax_over_batch, "refuse", COUPLED),
    "global-max-scaling": Case(global_max_scaling, "refuse", COUPLED),
    "batch-size-scaling": Case(batch_size_scaling, "refuse", COUPLED),
    "lstm-time-major": Case(lstm_time_major, "refuse", COUPLED + ".*batch_first=True",
                            sequence=True),
    "gru-time-major": Case(gru_time_major, "refuse", COUPLED + ".*batch_first=True",
                           sequence=True),
    "rnn-time-major-layer-recorded": Case(rnn_time_major_layer_recorded, "refuse",
                                          r"axis 0", sequence=True),
    "mha-time-major": Case(mha_time_major, "refuse", COUPLED + ".*batch_first=True",
                           sequence=True),
    "encoder-time-major": Case(encoder_time_major, "refuse", COUPLED + ".*batch_first=True",
                               sequence=True),
    "collect-batch-mean": Case(batch_mean, "refuse", COUPLED, surface="collect"),
    "collect-lstm-time-major": Case(lstm_time_major, "refuse", COUPLED, sequence=True,
                                    surface="collect"),
    # Class 2: models that are not deterministic.
    "noise-in-forward": Case(noise_in_forward, "refuse", NONDETERMINISTIC),
    "functional-dropout-always-on": Case(functional_dropout_always_on, "refuse",
                                         NONDETERMINISTIC + ".*training=self.training"),
    "stateful-module": Case(stateful_module, "refuse", NONDETERMINISTIC),
    "collect-noise-in-forward": Case(noise_in_forward, "refuse", NONDETERMINISTIC,
                                     surface="collect"),
    # Valid models that must still be accepted (and right).
    "valid-dropout-in-training-mode": Case(dropout_in_training_mode, "match"),
    "valid-layernorm-per-sample": Case(layernorm_per_sample, "match"),
    "valid-batchnorm-running-statistics": Case(batchnorm_running_statistics, "match"),
    "valid-softmax-over-features": Case(softmax_over_features, "match"),
    "valid-relu-inplace": Case(relu_inplace, "match"),
    "valid-lstm-batch-first": Case(lstm_batch_first, "match", sequence=True),
    "valid-gru-batch-first": Case(gru_batch_first, "match", sequence=True),
    "valid-lstm-time-major-transposed": Case(lstm_time_major_transposed, "match",
                                             sequence=True),
    "valid-mha-batch-first": Case(mha_batch_first, "match", sequence=True),
    "valid-encoder-batch-first": Case(encoder_batch_first, "match", sequence=True),
    "valid-plain-sequential": Case(plain_sequential, "match"),
    "valid-plain-residual": Case(plain_residual_late_batches, "match"),
    "valid-plain-attention": Case(plain_attention, "match", sequence=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case(name):
    assert classify(CASES[name]) == "ok"


if __name__ == "__main__":
    from collections import Counter as Tally

    verdicts = {}
    for name, case in CASES.items():
        verdicts[name] = classify(case)
        print(f"{name:40s} {verdicts[name]}", flush=True)
    print(dict(Tally(verdicts.values())), len(verdicts))
