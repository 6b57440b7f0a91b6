"""Machinery shared by the ablations of :mod:`sklearn_lib.evaluation`.

Validation of activations and schedules, bases as probed affine maps in float64
torch, the network run batch by batch, and scoring against the unablated
outputs; see :mod:`sklearn_lib.evaluation` for the conventions.
"""

from contextlib import ExitStack, contextmanager
from itertools import chain
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_array, check_is_fitted

from ..metrics._sparsity import _affine_map
from ..utils._backend import as_tensor, eval_mode, gen_batches, is_tensor, model_device
from ..utils._validation import check_finite, check_tensor

# Whether higher is better, per named score.
_SCORES = {"accuracy": True, "loss": False, "mse": False}
# With batch_size=None, a batch of the largest intermediate array holds about
# this many numbers (32 MiB in float64): big enough for fast matrix products,
# small enough that memory does not grow with the number of samples.
_AUTO_CHUNK_NUMBERS = 2**22
# Default schedules evaluate every count up to this many, and this many
# log-spaced counts beyond: ablation curves change fastest at small counts.
_MAX_SCHEDULE_POINTS = 64
# Rows used to check that a basis really is affine.
_N_PROBE_ROWS = 8



# --------------------------------------------------------------------------- inputs
def _check_X(X):
    """A 2-D or 3-D float array (validated by sklearn, NaN included) or floating tensor.

    3-D activations are (n_samples, n_positions, n_features) of a sequence
    layer. Tensors are checked for NaN batch by batch as they are used, so that
    a large tensor on the GPU is never scanned or copied up front.
    """
    if is_tensor(X):
        check_tensor(X, "X", ndim=3 if X.ndim == 3 else 2,
                     shape="(n_samples, n_features) or (n_samples, n_positions, n_features)")
        if X.shape[0] == 0:
            raise ValueError(
                f"X must hold at least one sample, got shape {tuple(X.shape)}."
            )
        return X
    X = check_array(X, dtype=[np.float64, np.float32], allow_nd=True, input_name="X")
    if X.ndim not in (2, 3):
        raise ValueError(
            "X must be 2-D (n_samples, n_features) or 3-D (n_samples, n_positions, "
            f"n_features), got shape {X.shape}."
        )
    return X


def _per_sample(X):
    """Numbers per sample of activations ``X`` (features times positions)."""
    return int(np.prod(X.shape[1:]))


def _first_rows(X, n):
    """The first ``n`` samples as a finite float64 array, to probe bases and sections with."""
    rows = X[:n]
    rows = np.asarray(rows.detach().cpu().numpy() if is_tensor(rows) else rows, dtype=np.float64)
    if not np.isfinite(rows).all():
        raise ValueError("X contains NaN or infinity.")
    return rows


def _default_schedule(high):
    if high <= _MAX_SCHEDULE_POINTS:
        return np.arange(1, high + 1)
    return np.unique(np.round(np.geomspace(1, high, _MAX_SCHEDULE_POINTS)).astype(int))


def _check_schedule(schedule, high, what):
    """Sorted unique counts in 1..high; ``what`` names the counted thing in errors."""
    if schedule is None:
        return _default_schedule(high)
    values = np.asarray(list(schedule))
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"schedule must be a non-empty iterable of {what} counts.")
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"schedule must hold integer {what} counts, got dtype {values.dtype}.")
    if values.min() < 1 or values.max() > high:
        raise ValueError(
            f"schedule must hold {what} counts in the valid range 1..{high}, got values "
            f"from {values.min()} to {values.max()}."
        )
    return np.unique(values)


def _threshold(tolerance, relative, reference):
    if not isinstance(tolerance, Real) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}.")
    if relative and reference == 0:
        raise ValueError(
            "relative=True needs a non-zero reference score (the 'mse' reference is 0); "
            "use an absolute tolerance."
        )
    threshold = float(tolerance) * (abs(reference) if relative else 1.0)
    # A degradation is a difference of two rounded scores: one sample off in 1000
    # (0.914 against 0.915) must pass a tolerance of 0.001, so allow a few ulps.
    return threshold + 4 * np.finfo(np.float64).eps * (abs(reference) + threshold)


def _fewest_passing(passes, high, bracket):
    """Doubling from 1, then bisection: a count ``k`` that passes while ``k - 1`` fails.

    ``passes(k)`` evaluates count ``k``; ``high`` must pass already. Every count
    evaluated below the result fails and every one above it passes, so on a
    monotone curve the result is the smallest passing count. Doubling first
    keeps the evaluations near small counts, where the answer usually lies and
    an ablation is cheapest; it takes ``ceil(log2(k))`` steps up to the answer and
    fewer than that to bisect back. ``bracket(low, high)`` is called before each
    further evaluation with the failing and passing counts that enclose it.
    """
    if high == 1 or passes(1):
        return 1
    low, step = 1, 2
    while step < high:  # invariant: low fails, high passes
        bracket(low, high)
        if passes(step):
            high = step
            break
        low, step = step, 2 * step
    while high - low > 1:
        bracket(low, high)
        mid = (low + high) // 2
        if passes(mid):
            high = mid
        else:
            low = mid
    return high


# --------------------------------------------------------------------------- bases
class _AffineBasis:
    """A fitted basis as tensors: ``transform(x) = x @ A + b``, ``inverse(z) = z @ P + c``."""

    def __init__(self, basis, sample, device, name):
        for method in ("transform", "inverse_transform"):
            if not callable(getattr(basis, method, None)):
                raise TypeError(
                    f"{name} must have transform and inverse_transform; "
                    f"{type(basis).__name__} has no {method}."
                )
        check_is_fitted(basis)
        # The basis acts on the feature axis of every position alike.
        sample = sample.reshape(-1, sample.shape[-1])
        n_features = sample.shape[1]
        expected = getattr(basis, "n_features_in_", n_features)
        if expected != n_features:
            raise ValueError(
                f"{name} was fitted on {expected} features, but the activations it "
                f"is applied to have {n_features}."
            )
        affine = _affine_map(basis, np.asarray(sample, dtype=np.float64), name=name)
        self.A, self.b, self.P, self.c = (
            torch.as_tensor(a, dtype=torch.float64, device=device)
            for a in (affine.A, affine.b, affine.P, affine.c)
        )
        self.n_components = self.A.shape[1]
        self.name = name

    def transform(self, X, k=None):
        """The first ``k`` coordinates (all when None) of ``X``."""
        return X @ self.A[:, :k] + self.b[:k]

    def inverse(self, Z):
        """Map the first ``Z.shape[-1]`` coordinates back; the others are 0."""
        k = Z.shape[-1]
        return Z @ self.P[:k] + self.c


# --------------------------------------------------------------------------- network
class _Network:
    """Runs ``forward`` (and ``section``) batch by batch, the way the data ask for."""

    def __init__(self, X, forward, section=None, batch_size=None):
        pieces = {"forward": forward, "section": section}
        for name, fn in pieces.items():
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable or a torch.nn.Module, got {fn!r}.")
        if batch_size is not None and (
            not isinstance(batch_size, Integral) or isinstance(batch_size, bool) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
        self.pieces = {name: fn for name, fn in pieces.items() if fn is not None}
        modules = [fn for fn in self.pieces.values() if isinstance(fn, torch.nn.Module)]
        if is_tensor(X):
            self.device = X.device
        elif modules:
            self.device = model_device(modules[0])
        else:
            self.device = torch.device("cpu")
        self.X = X
        self.numpy_io = not is_tensor(X)
        self.batch_size = batch_size
        self._modules = modules

    @contextmanager
    def running(self):
        """No gradients, and every module piece in eval mode (each module's own mode restored)."""
        with torch.no_grad(), ExitStack() as stack:
            for module in self._modules:
                stack.enter_context(eval_mode(module))
            yield

    def call(self, name, acts):
        """Apply ``forward`` or ``section`` to float64 activations on the compute device."""
        fn = self.pieces[name]
        if isinstance(fn, torch.nn.Module):
            tensors = chain(fn.parameters(), fn.buffers())
            like = next((t for t in tensors if t.is_floating_point()), acts)
            out = fn(acts.to(device=like.device, dtype=like.dtype))
        elif self.numpy_io:
            out = fn(acts.cpu().numpy())
        else:
            out = fn(acts)
        if is_tensor(out):
            out = out.detach().to(device=self.device, dtype=torch.float64)
        else:
            out = torch.as_tensor(np.asarray(out, dtype=np.float64), device=self.device)
        if out.ndim == 0 or out.shape[0] != acts.shape[0]:
            raise ValueError(
                f"{name} returned an output of shape {tuple(out.shape)} for {acts.shape[0]} "
                f"samples of activations; its first axis must match the samples (one output "
                "per sample, computed sample by sample)."
            )
        return out

    def batch_size_for(self, width):
        """Samples per batch when each sample holds ``width`` numbers at once."""
        return self.batch_size or max(1, _AUTO_CHUNK_NUMBERS // max(1, width))

    def batches(self, batch_size):
        """``(rows, batch)`` over X: float64 batches on the device, checked for NaN.

        Call inside :meth:`running`.
        """
        for rows in gen_batches(self.X.shape[0], batch_size):
            batch = as_tensor(self.X[rows], device=self.device, dtype=torch.float64)
            check_finite(batch, "X")
            yield rows, batch

    def outputs(self, prepare, width):
        """``forward(prepare(batch))`` over all batches of X, concatenated.

        ``width`` is the largest number of numbers per sample that ``prepare``
        holds at once; it sets the automatic batch size.
        """
        with self.running():
            return torch.cat([self.call("forward", prepare(batch))
                              for _, batch in self.batches(self.batch_size_for(width))])

    def forward_rows(self, acts, prepare, width):
        """``forward(prepare(acts[rows]))`` batch by batch, for activations computed already."""
        with self.running():
            return torch.cat([self.call("forward", prepare(acts[rows])) for rows in
                              gen_batches(acts.shape[0], self.batch_size_for(width))])


# --------------------------------------------------------------------------- scores
def _check_outputs(outputs, what):
    """Refuse NaN or infinite network outputs, saying how many and after which ablation."""
    bad = int((~torch.isfinite(outputs)).sum())
    if bad:
        raise ValueError(
            f"forward returned NaN or infinity {what}: {bad} of {outputs.numel()} output "
            "values are not finite, and they cannot be scored (the argmax of NaN is 0). "
            "Check forward, and the bases or the ablation that lead to such activations."
        )


class _Scorer:
    """Scores network outputs against labels and the unablated reference outputs.

    Created before the network runs, so that a bad ``score`` or ``y`` fails fast;
    :meth:`set_reference` then checks the unablated outputs against the labels.
    """

    def __init__(self, score, y, greater_is_better, n_samples):
        if callable(score):
            self.greater_is_better = True if greater_is_better is None else bool(greater_is_better)
        elif isinstance(score, str) and score in _SCORES:
            if greater_is_better is not None and greater_is_better != _SCORES[score]:
                raise ValueError(
                    f"score={score!r} is {'higher' if _SCORES[score] else 'lower'} is better; "
                    "greater_is_better applies to callable scores only."
                )
            self.greater_is_better = _SCORES[score]
        else:
            raise ValueError(
                f"score must be one of {sorted(_SCORES)} or a callable "
                f"score(outputs, y, reference_outputs), got {score!r}."
            )
        if score in ("accuracy", "loss") and y is None:
            raise ValueError(f"score={score!r} needs integer class labels y.")
        if y is not None and len(y) != n_samples:
            raise ValueError(f"y has {len(y)} labels but X has {n_samples} samples.")
        self.score = score
        self.y = None if y is None else (
            y.detach().cpu().numpy() if is_tensor(y) else np.asarray(y)
        )

    def set_reference(self, outputs):
        """Check the unablated outputs against the labels and score them."""
        if self.score in ("accuracy", "loss"):
            self.labels = self._check_labels(outputs)
        self.reference_outputs = outputs
        self.reference = self(outputs, "for the unablated activations")

    def _check_labels(self, outputs):
        if outputs.ndim != 2:
            raise ValueError(
                f"score={self.score!r} needs forward to return logits of shape "
                f"(n_samples, n_classes), got shape {tuple(outputs.shape)}. Use score='mse' "
                "or a callable score for other outputs."
            )
        labels = self.y
        if labels.ndim != 1 or not (
            np.issubdtype(labels.dtype, np.integer)
            or (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)))
        ):
            raise ValueError(
                f"y must be 1-D integer class labels, got shape {labels.shape} and dtype "
                f"{labels.dtype}."
            )
        n_classes = outputs.shape[1]
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(
                f"labels in y must lie in 0..{n_classes - 1} (forward returns {n_classes} "
                f"logits per sample), got values from {labels.min()} to {labels.max()}."
            )
        return torch.as_tensor(labels.astype(np.int64), device=outputs.device)

    def __call__(self, outputs, what):
        """Score ``outputs``; ``what`` names the ablation that produced them, for errors.

        Non-finite outputs are refused rather than scored: the argmax of NaN is
        0, so they would get an accuracy, and a NaN score would silently fail
        (or pass) every tolerance.
        """
        _check_outputs(outputs, what)
        if callable(self.score):
            value = self.score(
                outputs.cpu().numpy(), self.y, self.reference_outputs.cpu().numpy()
            )
            if not isinstance(value, Real) and np.ndim(value) != 0:
                raise TypeError(
                    "a callable score must return one number, got "
                    f"{type(value).__name__} of shape {np.shape(value)} {what}."
                )
            value = float(value)
        elif self.score == "mse":
            value = float((outputs - self.reference_outputs).square().mean())
        elif self.score == "accuracy":
            value = float((outputs.argmax(1) == self.labels).double().mean())
        else:
            value = float(F.cross_entropy(outputs, self.labels))
        if not np.isfinite(value):
            name = "the callable score" if callable(self.score) else f"score={self.score!r}"
            hint = " (the outputs overflow float64 when squared; rescale them)" if (
                self.score == "mse") else ""
            raise ValueError(
                f"{name} is {value} {what}, for finite outputs: a non-finite score cannot "
                f"be compared with a tolerance{hint}."
            )
        return value

    def degradation(self, score):
        return self.reference - score if self.greater_is_better else score - self.reference


def _result(count_name, counts, scores, scorer):
    scores = np.asarray(scores, dtype=np.float64)
    return {
        count_name: np.asarray(counts, dtype=np.int64),
        "score": scores,
        "reference": np.full(len(scores), scorer.reference),
        "degradation": np.array([scorer.degradation(s) for s in scores]),
    }


def _as_frame(data, as_frame):
    """A DataFrame of ``data`` when asked for and pandas is importable (an optional extra)."""
    if not as_frame:
        return data
    try:
        import pandas as pd
    except ImportError:
        return data
    return pd.DataFrame(data)
