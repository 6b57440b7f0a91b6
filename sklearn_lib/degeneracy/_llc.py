"""The local learning coefficient of a trained network, estimated with SGLD.

Singular learning theory's "effective number of parameters" of a network at a
local minimum ``w*`` of the empirical loss ``L_n`` is the local learning
coefficient (LLC) ``lambda(w*)``: ``d / 2`` for a regular model with ``d``
parameters, less where the loss landscape is degenerate. Lau et al. (2023,
"Quantifying degeneracy in singular models via the learning coefficient",
arXiv 2308.12108) estimate it from the localised tempered posterior
``p(w) ~ exp(-n beta L_n(w) - gamma/2 |w - w*|^2)`` at ``beta = 1 / log n``:

``lambda_hat = n beta (E_w[L_n(w)] - L_n(w*))``,

the expectation over draws of stochastic gradient Langevin dynamics (SGLD),

``w <- w - eps/2 (n beta grad L_B(w) + gamma (w - w*)) + N(0, eps)``

with ``L_B`` the loss of a minibatch. This is what the field's library devinterp
computes (``estimate_learning_coeff_with_summary`` / ``LLCEstimator`` before its
2.0 release, ``devinterp.slt.llc`` since): several independent chains, each
started at ``w*``, a burn-in whose draws are discarded, the LLC of every chain
from its draws, their mean as the estimate and their spread as its error.

The loss is the per-sample negative log-likelihood averaged over the batch:
cross-entropy for class labels, half the squared error summed over outputs
(a Gaussian of unit variance) for real targets, and without targets the
*behavioural* loss of arXiv 2405.10927, half the squared distance of the outputs
from those of ``w*`` (the loss whose Hessian is the Gauss-Newton matrix that
:class:`~sklearn_lib.degeneracy.DegeneracyReport` takes the null spaces of).
"""

import math
from contextlib import contextmanager
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ..utils._backend import as_tensor, eval_mode, resolve_device, resolve_dtype

__all__ = ["LocalLearningCoefficient"]


class LocalLearningCoefficient(BaseEstimator):
    """SGLD estimate of the local learning coefficient of a trained torch model.

    ``lambda_hat = n beta (E_w[L_n(w)] - L_n(w*))`` with ``beta = 1 / log n`` by
    default, the expectation over the draws of ``n_chains`` SGLD chains localised
    at the trained weights ``w*`` (Lau et al. 2023; see the module docstring
    :mod:`sklearn_lib.degeneracy._llc` for the update). For a regular model with ``d``
    parameters and small enough ``lr`` and ``localization`` the estimate tends to
    ``d / 2``; directions the loss does not see (a dead neuron's weights, a
    duplicated feature's difference) add nothing, so degenerate networks have a
    smaller LLC.

    Parameters
    ----------
    n_chains : int, default=4
        Independent chains, each started at ``w*``; their spread is the error.
    n_draws : int, default=200
        Steps per chain after the burn-in whose losses are averaged.
    n_burnin : int, default=100
        Steps per chain before the draws (recorded in ``loss_trace_`` but not
        averaged).
    lr : float, default=1e-4
        The SGLD step size ``eps`` (devinterp's ``lr``). Too large a step
        inflates the estimate (and can diverge: an error says so); too small
        a step does not move the chain away from ``w*`` within ``n_draws``.
        The loss traces (:meth:`plot`) show which: they should rise from
        ``L_n(w*)`` and level off during the burn-in.
    localization : float, default=100.0
        ``gamma``, the pull towards ``w*`` (devinterp's default).
    n_beta : float or None, default=None
        The inverse temperature times ``n``; None is ``n / log n`` (Lau et al.'s
        ``beta* = 1 / log n``, ``n`` the number of samples). (devinterp's helper
        ``default_nbeta`` uses the batch size for ``n`` instead.)
    batch_size : int or None, default=None
        Samples per SGLD step, drawn without replacement epoch by epoch; None
        uses every sample on every step (full-batch Langevin dynamics).
    loss : {"auto", "cross_entropy", "mse", "behavioural"} or callable, default="auto"
        The per-sample negative log-likelihood, averaged over a batch:
        ``"cross_entropy"`` of logits and integer labels, ``"mse"`` is half the
        squared error summed over outputs, ``"behavioural"`` the same with the
        outputs of ``w*`` as targets (no ``y``). ``"auto"``: behavioural without
        ``y``, cross-entropy for integer ``y``, else mse. A callable
        ``loss(outputs, y) -> scalar`` (mean over the batch) is used as it is.
    parameters : list of str or None, default=None
        Names (as in ``model.named_parameters()``) of the parameters sampled;
        the others stay at ``w*``. None samples all of them.
    sampler : {"sklearn_lib", "devinterp"}, default="sklearn_lib"
        ``"sklearn_lib"``: this module's SGLD (float64, reproducible with
        ``random_state``). ``"devinterp"``: devinterp's own chain loop and SGLD
        optimizer (``devinterp.slt.sampler.sample_single_chain``, the optional
        extra ``sklearn_lib[llc]``), for cross-checks; it runs in float32
        losses, draws its noise from torch's global generator (seeded by
        ``random_state``) and needs ``batch_size`` (its loader drops the last
        incomplete batch).
    random_state : int, RandomState instance or None, default=None
        Seeds the chains (minibatches and noise); an int gives identical
        results on every run.
    device : {"cpu", "cuda", "auto"} or torch.device, default="cpu"
    dtype : {"float64", "float32"}, default="float64"
    verbose : bool, default=False
        Print one line per chain.

    Attributes
    ----------
    llc_ : float
        The estimate: the mean over chains.
    llc_std_ : float
        The standard deviation of the chains' estimates (devinterp's
        ``llc/std``).
    llc_sem_ : float
        Its standard error, ``llc_std_ / sqrt(n_chains)``: the error bar of
        ``llc_``.
    llc_per_chain_ : ndarray of shape (n_chains,)
    loss_trace_ : ndarray of shape (n_chains, n_burnin + n_draws)
        The batch loss at every step, before the step's update.
    init_loss_ : float
        ``L_n(w*)`` on all samples.
    n_beta_ : float
    n_samples_ : int
    n_parameters_ : int
        ``d``: the number of sampled parameters (``d / 2`` is the regular value).
    parameter_names_ : list of str

    See Also
    --------
    sklearn_lib.degeneracy.DegeneracyReport : The degenerate directions of each
        section's parameters, layer by layer.

    Examples
    --------
    A linear regression is regular: its LLC is half its number of parameters.

    >>> import torch
    >>> from sklearn_lib.degeneracy import LocalLearningCoefficient
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(1000, 3, dtype=torch.float64, generator=g)
    >>> net = torch.nn.Linear(3, 1).double()
    >>> with torch.no_grad():
    ...     y = net(X) + 0.1 * torch.randn(1000, 1, dtype=torch.float64, generator=g)
    ...     design = torch.cat([X, torch.ones(1000, 1, dtype=torch.float64)], 1)
    ...     w = torch.linalg.lstsq(design, y).solution          # the minimum w*
    ...     _ = net.weight.copy_(w[:3].T), net.bias.copy_(w[3])
    >>> llc = LocalLearningCoefficient(n_chains=4, n_draws=1000, n_burnin=200, lr=1e-3,
    ...                                localization=1.0, random_state=0).fit_model(net, X, y)
    >>> llc.n_parameters_, abs(llc.llc_ - 2) < 3 * llc.llc_sem_ + 0.1
    (4, True)
    """

    _parameter_constraints: dict = {
        "n_chains": [Interval(Integral, 1, None, closed="left")],
        "n_draws": [Interval(Integral, 1, None, closed="left")],
        "n_burnin": [Interval(Integral, 0, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "localization": [Interval(Real, 0, None, closed="left")],
        "n_beta": [Interval(Real, 0, None, closed="neither"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "loss": [StrOptions({"auto", "cross_entropy", "mse", "behavioural"}), callable],
        "parameters": [list, None],
        "sampler": [StrOptions({"sklearn_lib", "devinterp"})],
        "random_state": ["random_state"],
        "device": [str, torch.device],
        "dtype": [StrOptions({"float64", "float32"})],
        "verbose": ["boolean"],
    }

    def __init__(self, *, n_chains=4, n_draws=200, n_burnin=100, lr=1e-4, localization=100.0,
                 n_beta=None, batch_size=None, loss="auto", parameters=None,
                 sampler="sklearn_lib", random_state=None, device="cpu", dtype="float64",
                 verbose=False):
        self.n_chains = n_chains
        self.n_draws = n_draws
        self.n_burnin = n_burnin
        self.lr = lr
        self.localization = localization
        self.n_beta = n_beta
        self.batch_size = batch_size
        self.loss = loss
        self.parameters = parameters
        self.sampler = sampler
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    def fit(self, X, y=None, *, model):
        """scikit-learn's signature for :meth:`fit_model`: ``fit(X, y, model=model)``.

        Parameters
        ----------
        X : tensor or ndarray
        y : tensor, ndarray or None, default=None
        model : torch.nn.Module

        Returns
        -------
        self : LocalLearningCoefficient
        """
        return self.fit_model(model, X, y)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_model(self, model, X, y=None):
        """Sample the chains around the model's weights and estimate its LLC.

        Parameters
        ----------
        model : torch.nn.Module
            The trained network at ``w*`` (never modified; it runs in eval mode).
        X : tensor or ndarray
            Its inputs, one sample per row of the first axis (the training data
            the loss ``L_n`` is taken on).
        y : tensor, ndarray or None, default=None
            Targets: class labels (integers) or real outputs; None for the
            behavioural loss.

        Returns
        -------
        self : LocalLearningCoefficient
        """
        from ..models._collect import prepare_model

        device, dtype = resolve_device(self.device), resolve_dtype(self.dtype)
        model = prepare_model(model, device=device, dtype=self.dtype)
        X = _inputs(X, device, dtype)
        n = int(X.shape[0])
        if n < 2:
            raise ValueError(f"the LLC needs at least 2 samples, got {n}.")
        names = [name for name, _ in model.named_parameters()]
        chosen = names if self.parameters is None else list(self.parameters)
        unknown = [name for name in chosen if name not in names]
        if unknown or not chosen:
            raise ValueError(
                f"parameters must name some of the model's parameters {names}; got "
                f"{self.parameters!r}."
            )
        start = {name: p.detach().clone() for name, p in model.named_parameters()}
        with eval_mode(model):
            loss_fn, targets = self._loss_function(model, start, X, y, device, dtype)
            n_beta = n / math.log(n) if self.n_beta is None else float(self.n_beta)
            init_loss = _full_loss(model, start, X, targets, loss_fn, self.batch_size or n)
            seeds = np.random.SeedSequence(_entropy(self.random_state)).spawn(self.n_chains)
            # Small steps on two shared cores: one thread (OpenMP barriers of tiny
            # products collapse under load, 15x slower in a test here).
            work = (self.batch_size or n) * sum(p.numel() for p in start.values())
            threads = _single_thread if work <= _SINGLE_THREAD_WORK else _unchanged
            with threads():
                traces = self._chains(model, start, chosen, X, targets, loss_fn, n_beta, seeds)
        trace = np.array(traces, dtype=np.float64)
        per_chain = n_beta * (trace[:, self.n_burnin:].mean(axis=1) - init_loss)
        if self.verbose:
            for c, value in enumerate(per_chain):
                print(f"chain {c}: LLC {value:.4g}")
        self.llc_per_chain_ = per_chain
        self.llc_ = float(per_chain.mean())
        self.llc_std_ = float(per_chain.std(ddof=1)) if self.n_chains > 1 else float("nan")
        self.llc_sem_ = self.llc_std_ / math.sqrt(self.n_chains)
        self.loss_trace_ = trace
        self.init_loss_ = float(init_loss)
        self.n_beta_ = float(n_beta)
        self.n_samples_ = n
        self.parameter_names_ = chosen
        self.n_parameters_ = int(sum(start[name].numel() for name in chosen))
        return self

    def _chains(self, model, start, chosen, X, targets, loss_fn, n_beta, seeds):
        if self.sampler == "devinterp":
            return self._devinterp_chains(model, start, chosen, X, targets, loss_fn, n_beta,
                                          seeds)
        return [
            _chain(model, start, chosen, X, targets, loss_fn, n_beta=n_beta, lr=self.lr,
                   localization=self.localization, n_steps=self.n_burnin + self.n_draws,
                   batch_size=self.batch_size or X.shape[0], seed=seed)
            for seed in seeds
        ]

    def _loss_function(self, model, start, X, y, device, dtype):
        """``(loss(outputs, targets) -> per-sample losses, targets)``."""
        kind = self.loss
        if callable(kind):
            return _UserLoss(kind), (None if y is None else _targets(y, device, dtype))
        if y is None:
            if kind not in ("auto", "behavioural"):
                raise ValueError(f"loss={kind!r} needs targets y.")
            with torch.no_grad():
                outputs = torch.cat([
                    torch.func.functional_call(model, start, (X[i:i + 4096],))
                    for i in range(0, X.shape[0], 4096)
                ])
            return _squared, outputs
        if kind == "behavioural":
            raise ValueError("loss='behavioural' uses the model's own outputs: pass y=None.")
        y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
        if kind == "cross_entropy" or (kind == "auto" and not y.is_floating_point()):
            return _cross_entropy, y.to(device=device, dtype=torch.int64)
        return _squared, _targets(y, device, dtype)

    def _devinterp_chains(self, model, start, chosen, X, targets, loss_fn, n_beta, seeds):
        """The chains with devinterp's loop and SGLD optimizer (optional extra)."""
        try:
            from devinterp.optim import SGLD
            from devinterp.slt.sampler import sample_single_chain
        except ImportError as error:
            raise ImportError(
                "sampler='devinterp' needs devinterp, an optional extra: "
                "pip install sklearn_lib[llc]"
            ) from error
        import warnings

        if self.batch_size is None:
            raise ValueError("sampler='devinterp' needs a batch_size (its loader drops the "
                             "last incomplete batch; use batch_size=n for full batches).")
        dataset = _Rows(X, targets)
        traces = []
        for c, seed in enumerate(seeds):
            losses = []

            def evaluate(net, batch):
                out = net(batch["input_ids"])
                return loss_fn(out, batch.get("target")), {}

            def record(*, loss, **_):
                losses.append(float(loss.double().mean()))

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sample_single_chain(
                    model, dataset, evaluate, {name: None for name in chosen},
                    num_draws=self.n_draws, num_burnin_steps=self.n_burnin,
                    sampling_method=SGLD,
                    sampling_method_kwargs={"lr": self.lr, "localization": self.localization,
                                            "nbeta": n_beta},
                    chain=c, seed=int(seed.generate_state(1)[0]),
                    dataloader_seed=int(seed.generate_state(2)[1]),
                    device=str(X.device), micro_callback=record,
                    batch_size=self.batch_size)
            if len(losses) != self.n_burnin + self.n_draws:
                raise RuntimeError(f"devinterp's chain {c} stopped after {len(losses)} steps "
                                   "(a non-finite loss): lower lr.")
            traces.append(losses)
        return traces

    def plot(self, ax=None):
        """The chain diagnostics: every chain's batch loss per step.

        The burn-in is shaded and ``L_n(w*)`` dashed. Healthy chains rise from
        ``L_n(w*)`` during the burn-in and then fluctuate about one level, the
        same for every chain; a trace still climbing (step too small or burn-in
        too short) or chains at different levels make the error bar
        meaningless.

        Parameters
        ----------
        ax : matplotlib Axes, default=None

        Returns
        -------
        ax : matplotlib Axes
        """
        check_is_fitted(self)
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(
                "LocalLearningCoefficient.plot needs matplotlib, an optional extra: "
                "pip install sklearn_lib[plot]"
            ) from error
        if ax is None:
            _, ax = plt.subplots()
        steps = np.arange(self.loss_trace_.shape[1])
        for c, trace in enumerate(self.loss_trace_):
            ax.plot(steps, trace, lw=0.8, label=f"chain {c}: {self.llc_per_chain_[c]:.3g}")
        if self.n_burnin:
            ax.axvspan(0, self.n_burnin, color="0.9", label="burn-in")
        ax.axhline(self.init_loss_, ls="--", color="k", lw=1, label="$L_n(w^*)$")
        ax.set_xlabel("SGLD step")
        ax.set_ylabel("batch loss")
        ax.set_title(f"LLC {self.llc_:.4g} ± {self.llc_sem_:.2g} (d/2 = "
                     f"{self.n_parameters_ / 2:g})")
        ax.legend(fontsize="small")
        return ax


# --------------------------------------------------------------------------- helpers
# Chains whose step touches at most this many numbers (batch x parameters) run on
# one thread.
_SINGLE_THREAD_WORK = 2**26


@contextmanager
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _unchanged():
    yield


class _UserLoss:
    """A user's ``loss(outputs, y) -> mean``, per batch (used as the batch mean)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, outputs, targets):
        return self.fn(outputs, targets)


def _cross_entropy(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def _squared(outputs, targets):
    diff = (outputs - targets).reshape(outputs.shape[0], -1)
    return 0.5 * diff.square().sum(1)


def _mean(loss):
    return loss if loss.ndim == 0 else loss.mean()


def _inputs(X, device, dtype):
    if isinstance(X, torch.Tensor):
        t = X.detach().to(device)
    else:
        t = torch.as_tensor(np.asarray(X), device=device)
    return t.to(dtype) if t.is_floating_point() else t


def _targets(y, device, dtype):
    t = as_tensor(y, device=device, dtype=dtype) if not isinstance(y, torch.Tensor) or (
        y.is_floating_point()) else y.to(device)
    return t if t.ndim > 1 or not t.is_floating_point() else t[:, None]


def _entropy(random_state):
    if random_state is None:
        return None
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**63 - 1))
    return int(random_state)


def _full_loss(model, params, X, targets, loss_fn, batch_size):
    """``L_n`` on all samples, in batches."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, X.shape[0], batch_size):
            out = torch.func.functional_call(model, params, (X[i:i + batch_size],))
            t = None if targets is None else targets[i:i + batch_size]
            loss = loss_fn(out, t)
            total += float(loss.sum()) if loss.ndim else float(loss) * out.shape[0]
    return total / X.shape[0]


def _chain(model, start, chosen, X, targets, loss_fn, *, n_beta, lr, localization, n_steps,
           batch_size, seed):
    """One SGLD chain from ``w*``; returns the batch loss before every step."""
    generator = torch.Generator(device=X.device).manual_seed(int(seed.generate_state(1)[0]))
    params = {name: p.clone() for name, p in start.items()}
    sampled = {name: params[name].requires_grad_(True) for name in chosen}
    n = X.shape[0]
    order, position = torch.randperm(n, generator=generator, device=X.device), 0
    trace = []
    noise_scale = math.sqrt(lr)
    for _ in range(n_steps):
        if batch_size >= n:
            index = None
        else:
            if position + batch_size > n:
                order = torch.randperm(n, generator=generator, device=X.device)
                position = 0
            index = order[position:position + batch_size]
            position += batch_size
        xb = X if index is None else X[index]
        tb = None if targets is None else (targets if index is None else targets[index])
        loss = _mean(loss_fn(torch.func.functional_call(model, params, (xb,)), tb))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(
                f"an SGLD chain diverged (loss {value}) after {len(trace)} steps: lower lr "
                f"(now {lr:g}) or raise localization."
            )
        trace.append(value)
        grads = torch.autograd.grad(loss, list(sampled.values()))
        with torch.no_grad():
            for (name, p), g in zip(sampled.items(), grads):
                drift = g.mul(n_beta).add_(p - start[name], alpha=localization)
                p.add_(drift, alpha=-0.5 * lr)
                p.add_(torch.randn(p.shape, generator=generator, device=p.device,
                                   dtype=p.dtype), alpha=noise_scale)
    return trace


class _Rows(torch.utils.data.Dataset):
    """Rows of ``X`` (and targets) as devinterp's sampler reads them (dicts)."""

    def __init__(self, X, targets):
        self.X, self.targets = X, targets

    def __len__(self):
        return self.X.shape[0]

    def __getitem__(self, i):
        item = {"input_ids": self.X[i]}
        if self.targets is not None:
            item["target"] = self.targets[i]
        return item
