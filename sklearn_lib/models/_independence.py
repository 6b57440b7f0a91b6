"""Independent samples and a deterministic model: the assumptions of every statistic, probed.

SPEC's statistics are averages over samples of per-sample quantities, and the
vector-Jacobian products of a whole batch give every sample's ``v^T J_x`` only
if no sample's activations depend on another's (``_vjp``). Every pass over the
data must also compute the same values. A model that couples the samples of a
batch (a mean or softmax over axis 0, BatchNorm with batch statistics, a
time-major ``nn.LSTM`` fed ``(batch, time, feature)``) or draws random numbers
in ``forward`` gives results that depend on the batch size or change from run
to run, without any error. :func:`check_independent` runs the model on the
first samples of the data a few more times, compares every recorded layer, and
refuses such a model with the reason and the fix:

1. the same ``2h`` samples twice: the values must be equal (determinism);
2. every layer holds ``k >= 1`` whole rows per sample on axis 0, sample-major
   (a ``(time, batch, feature)`` layer does not);
3. the first ``h`` samples twice, ``[S1, S1]``, against ``[S1, S2]``: a batch of
   the same size, so the same kernels run, in which the first half's values
   must not change (coupling through batch statistics, or along axis 0);
4. each half alone: the values must not change with the batch size.

Equal means equal to ``sqrt(eps)`` of the layer's largest magnitude (1e-2 for
float32 on CUDA in step 4, where TF32 kernels chosen by batch size round
differently); coupled samples differ by far more. The probe costs five forward
passes over at most :data:`PROBE_SAMPLES` samples.
"""

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._adapters import n_samples, take
from ._model import _record_batch

__all__ = ["PROBE_SAMPLES", "RANDOMNESS_FIX", "check_independent"]

#: Samples of the first batch the probe runs on.
PROBE_SAMPLES = 64

_COUPLING_FIX = (
    "Look for statistics over axis 0 in forward: x - x.mean(0), softmax(x, dim=0), "
    "F.batch_norm(..., training=True), a maximum or norm over the whole batch, or modules "
    "that read axis 0 as time."
)
RANDOMNESS_FIX = (
    "Every pass over the data must compute the same values, and the model runs in eval "
    "mode, so this randomness is the model's own: noise drawn in forward (torch.randn, "
    "torch.rand), F.dropout or F.alpha_dropout without training=self.training (they drop "
    "units in eval mode too; nn.Dropout follows eval mode), or state that changes when "
    "the model is called. Remove it, or draw it from a fixed seed on every call."
)


def check_independent(model, layers, x):
    """Refuse a model whose recorded layers couple the samples of a batch or vary by run.

    Parameters
    ----------
    model : torch.nn.Module
        The model, in the mode it is run in (eval).
    layers : list of parsed layers
        The recorded layers (``_model._parse_layers``), in forward order.
    x : tensor or dict of tensors
        A batch of model inputs; its first :data:`PROBE_SAMPLES` samples are used.

    Raises
    ------
    ValueError
        Naming the first layer that differs, by how much, and the fix.
    """
    n = min(n_samples(x), PROBE_SAMPLES)
    h = n // 2
    batch = take(x, slice(0, max(2 * h, n)))
    with torch.no_grad():
        first = _record(model, layers, batch)
        rows = _rows_per_sample(model, layers, first, max(2 * h, n))
        second = _record(model, layers, batch)
        _compare(model, layers, rows, [(first, second)], "runs", h=None)
        if h == 0:
            return
        index = torch.arange(h, device=_device(batch)).repeat(2)
        twice = _record(model, layers, take(batch, index))
        _compare(model, layers, rows, [(_part(first, rows, 0, h), _part(twice, rows, 0, h)),
                                       (_part(first, rows, 0, h), _part(twice, rows, h, 2 * h))],
                 "coupled", h=h)
        halves = []
        for part in (slice(0, h), slice(h, 2 * h)):
            try:
                halves.append(_record(model, layers, take(batch, part)))
            except Exception as exc:  # reported with the model's own words
                raise ValueError(
                    f"the model takes a batch of {2 * h} samples but fails on {h} of them "
                    f"alone ({type(exc).__name__}: {exc}): it depends on the size of its "
                    "batch, so its samples are not independent, which every statistic "
                    "assumes (samples are averaged, and batches have any size). "
                    + _hints(model, _COUPLING_FIX)
                ) from exc
        _compare(model, layers, rows, [(_part(first, rows, 0, h), halves[0]),
                                       (_part(first, rows, h, 2 * h), halves[1])],
                 "size", h=h)


def _record(model, layers, batch):
    return _record_batch(model, layers, batch, stop=True)


def _device(batch):
    value = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return value.device


def _part(recorded, rows, start, stop):
    """The rows of samples ``start:stop`` of every layer."""
    return {spec: value[start * rows[spec]: stop * rows[spec]]
            for spec, value in recorded.items()}


def _rows_per_sample(model, layers, recorded, n):
    """Rows per sample on axis 0 of every layer; ValueError unless whole and sample-major."""
    rows = {}
    for layer in layers:
        length = int(recorded[layer.spec].shape[0]) if recorded[layer.spec].ndim else 0
        if length == 0 or length % n:
            raise ValueError(
                f"layer {layer.spec!r} has {length} entries on axis 0 for a batch of {n} "
                f"samples (shape {tuple(recorded[layer.spec].shape)}): axis 0 of every "
                "recorded layer must be the samples (a sample's rows may follow each other). "
                + _hints(model, "Record a layer that keeps the batch first; a time-major "
                                "layer (time, batch, feature) does not.")
            )
        rows[layer.spec] = length // n
    return rows


def _tolerance(value, loose):
    """What rounding allows between two computations of ``value``: ``sqrt(eps)`` of its scale."""
    rtol = torch.finfo(value.dtype).eps ** 0.5
    if loose and value.is_cuda and value.dtype == torch.float32:
        rtol = 1e-2
    finite = value[torch.isfinite(value)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    return rtol * max(scale, torch.finfo(value.dtype).tiny)


def _difference(a, b):
    """The largest difference of two recordings (NaN or infinity equal to themselves)."""
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    diff = torch.where(a == b, torch.zeros_like(a), (a - b).abs())
    diff = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(a), diff)
    return float(diff.nan_to_num(nan=float("inf")).max()) if diff.numel() else 0.0


def _compare(model, layers, rows, pairs, kind, h):
    for layer in layers:
        spec = layer.spec
        for a, b in pairs:
            if a[spec].shape != b[spec].shape:
                err, allowed = float("inf"), 0.0
            else:
                err = _difference(a[spec], b[spec])
                allowed = _tolerance(a[spec], loose=kind == "size") if (
                    a[spec].is_floating_point()) else 0.0
            if err > allowed:
                raise ValueError(_message(model, spec, kind, h, err, allowed))


def _message(model, spec, kind, h, err, allowed):
    by = f"by up to {err:.3g} (rounding allows {allowed:.3g})"
    if kind == "runs":
        return (f"the model is not deterministic: layer {spec!r} differs between two runs "
                f"of the same batch {by}. " + RANDOMNESS_FIX)
    if kind == "coupled":
        what = (f"layer {spec!r} of a sample depends on the other samples of its batch: "
                f"with the second half of a batch of {2 * h} samples replaced by a copy of "
                f"the first half, the first half's values change {by}.")
    else:
        what = (f"layer {spec!r} of a sample changes with the size of its batch: run on "
                f"the two halves of a batch of {2 * h} samples separately, its values "
                f"change {by}.")
    return (what + " Every statistic assumes independent samples (averages over samples, "
            "and one vector-Jacobian product for a whole batch). "
            + _hints(model, _COUPLING_FIX))


def _hints(model, fallback):
    """What in ``model`` is known to couple samples, with the fix; else ``fallback``."""
    hints = []
    for name, module in model.named_modules():
        what = f"module {name!r} ({type(module).__name__})"
        if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)) and not module.batch_first:
            hints.append(
                f"{what} has batch_first=False: it reads axis 0 as time steps (or sequence "
                "positions) and mixes the samples along it; build it with batch_first=True, "
                "or transpose its input and output."
            )
        elif isinstance(module, _BatchNorm) and module.running_mean is None:
            hints.append(
                f"{what} normalises with the statistics of each batch "
                "(track_running_stats=False), also in eval mode; build it with "
                "track_running_stats=True, train its running statistics, and the fit "
                "uses them (it runs the model in eval mode)."
            )
    if not hints:
        return fallback
    return " ".join(hints[:3]) + (f" ({len(hints) - 3} more such modules.)"
                                  if len(hints) > 3 else "")
