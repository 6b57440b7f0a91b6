"""What every pass of a live model over the data must see again: the same samples and values.

:class:`~sklearn_lib.sources._model_source.ModelSource` computes each layer's
statistics and edges in a separate pass over the data, so a pass over other
samples, or a model that computes other values in another pass, would mix
results silently. :class:`PassLog` keeps the first pass's :class:`Fingerprint`
of the inputs and of every recorded layer, and compares every later pass with
them.
"""

import numpy as np
import torch

from ..models import _adapters
from ..models._independence import RANDOMNESS_FIX

__all__ = ["Fingerprint", "PassLog"]


class Fingerprint:
    """The sample count and order-free sums of the real numbers seen by one pass over the data.

    Each sample's numbers are laid out as positions of ``F`` numbers each
    (a token's id, a position's activation), and only real positions count:
    where a dict batch's ``attention_mask`` marks padding, those positions are
    left out, and a real position is numbered by its rank among the sample's
    real positions, not by its column in the padded batch. A sample then has
    the same fingerprint whatever width its batch was padded to and on which
    side. The sums (of the numbers, of each sample's projection ``p_x`` on
    fixed weights ``cos(r F + f + phase)`` for the ``f``-th number of real
    position ``r``, of the squares of both, and of the magnitudes) are
    accumulated in float64 on the device, with no host sync per batch. They
    do not depend on the order of samples or batches beyond rounding (a sum
    over samples of per-sample terms), so a shuffling DataLoader that pads
    each batch to its own longest sequence passes; passes over other samples
    (another sample, a changed token, a dropped sample) differ: the sum of
    ``p_x^2`` sees which sample holds which tokens in which order.

    Parameters
    ----------
    what : str, default="inputs"
        What the numbers are, for messages.
    exact : bool, default=True
        Project float64 copies of the numbers, so that the projections of
        the same numbers in other batches agree to float64 rounding (the
        bound :meth:`difference` allows without ``rtol``). False projects
        them in their own dtype: a layer's values, compared with an ``rtol``
        anyway, are not copied.
    """

    _NAMES = ("{}", "projected {}", "squared {}", "squared projections of the {}",
              "magnitudes of the {}")

    def __init__(self, what="inputs", exact=True):
        self.what, self.exact = what, exact
        self.n_samples, self.n_numbers, self.sums, self.width = 0, 0, None, 0

    def add(self, x, mask=None):
        """Add a batch (a tensor or a dict of tensors, samples on axis 0).

        Parameters
        ----------
        x : torch.Tensor or dict of torch.Tensor
            The batch. A dict batch's padding is read from its own
            ``attention_mask`` (:func:`~sklearn_lib.models._adapters.padding_mask`).
        mask : torch.Tensor of shape (batch, P), optional
            For a tensor ``x`` of ``P`` positions per sample: True at real
            positions. None: every number of a sample is real.
        """
        if _adapters.is_dict_batch(x):
            pad = _adapters.padding_mask(x)
            parts = []
            for value in x.values():
                positional = (pad is not None and value.ndim >= 2
                              and tuple(value.shape[:2]) == tuple(pad.shape))
                parts.append((value.to(torch.float64), pad if positional else None))
        else:
            cast = self.exact or not x.is_floating_point()
            parts = [(x.to(torch.float64) if cast else x, mask)]
        n = _adapters.n_samples(x)
        sums, numbers, width = None, 0, 0
        for phase, (value, real) in enumerate(parts):
            part, count = _sums(value, real, phase * np.sqrt(2.0))
            sums = part if sums is None else sums.add_(part)
            numbers += count
            width += value[0].numel() if n else 0
        self.sums = sums if self.sums is None else self.sums.add_(sums)
        self.n_samples += n
        self.n_numbers += numbers
        # Batches of sequences of different lengths have different widths.
        self.width = max(self.width, width)

    def difference(self, other, first, this, rtol=0.0):
        """How pass ``this`` (``other``) differs from pass ``first`` (self); None if not at all.

        Sums of the same numbers in another order differ by rounding only:
        at most ``n_numbers * eps`` times the sum of the magnitudes of the
        terms (the bound of any summation order), for each of the two passes.
        ``rtol`` allows more, relative to the same scales: numbers computed in
        batches of other sizes may round differently themselves.
        """
        if other.n_samples != self.n_samples:
            return f"{this} saw {other.n_samples} samples, but {first} saw {self.n_samples}"
        a, b = self.sums.tolist(), other.sums.tolist()
        s1, s2 = max(a[4], b[4]), max(a[2], b[2])
        # |p| <= ||v||_1 and p^2 <= d ||v||^2 bound the projected terms.
        scales = (s1, s1, s2, self.width * s2, s1)
        bound = 2 * max(self.n_numbers, other.n_numbers) * np.finfo(np.float64).eps
        bound = max(bound, rtol)
        for name, x, y, scale in zip(self._NAMES, a, b, scales):
            if not abs(x - y) <= bound * scale:
                return (
                    f"{this} saw as many samples as {first} ({self.n_samples}) but other "
                    f"values: the sum of the {name.format(self.what)} is {y:.17g}, not "
                    f"{x:.17g}"
                )
        return None


class PassLog:
    """The passes of one source over its data: their number and the first one's fingerprints.

    Parameters
    ----------
    describe_data : str
        The data in a few words, for messages.
    probe_samples : int
        Samples the data yielded when first probed (before any pass).
    layer_rtol : float
        What rounding allows between two passes' values of a layer, relative to
        their scale (:meth:`Fingerprint.difference`).
    """

    def __init__(self, describe_data, probe_samples, layer_rtol):
        self.describe_data, self.probe_samples = describe_data, probe_samples
        self.layer_rtol = layer_rtol
        self.n_samples, self.n_passes = None, 0
        self._first = None  # (description, Fingerprint) of the first complete pass
        self._layers = {}  # layer name -> (pass description, Fingerprint) of its first pass
        self.current = None  # layer name -> Fingerprint of the pass under way

    def start(self):
        """Begin a pass: the fingerprints of the layers it records start empty."""
        self.current = {}

    def layer(self, name, values, mask=None):
        """Add a batch of ``name``'s recorded values (samples on axis 0) to this pass.

        ``mask`` (batch, P) marks the real positions of values with ``P``
        positions per sample (None: all are real): padded positions hold
        whatever the model computes there, which may depend on the padded width.
        """
        if self.current is not None:
            self.current.setdefault(
                name, Fingerprint(f"values of layer {name!r}", exact=False)).add(values, mask)

    def finish(self, desc, fingerprint):
        """End a complete pass: refuse other samples, or other values of a layer.

        Every layer's statistics and edges come from a separate pass over the
        data, so a pass over other samples would mix sample sets silently, and
        a pass in which the model computes other values for the same samples
        would mix results of different models.
        """
        self.n_passes += 1
        this = f"pass {self.n_passes} over the data ({desc})"
        layers, self.current = self.current or {}, None
        if self._first is None:
            n = fingerprint.n_samples
            if n == 0 and self.probe_samples:
                raise ValueError(
                    f"{this} yielded no samples, although the data yielded "
                    f"{self.probe_samples} when first probed: data must yield the same "
                    f"samples every time it is iterated ({self.describe_data} returns an "
                    "exhausted iterator). Pass a tensor, an array or a DataLoader."
                )
            if n < 2:
                raise ValueError(
                    f"fit_model needs at least 2 samples, got {n} ({self.describe_data})."
                )
            self.n_samples, self._first = n, (desc, fingerprint)
        else:
            self._check_data(this, fingerprint)
        for name, values in layers.items():
            if name not in self._layers:
                self._layers[name] = (this, values)
                continue
            first_desc, first = self._layers[name]
            changed = first.difference(values, first_desc, this, rtol=self.layer_rtol)
            if changed is not None:
                raise ValueError(
                    f"the model is not deterministic: {changed}, over the same samples. "
                    + RANDOMNESS_FIX
                )

    def _check_data(self, this, fingerprint):
        first_desc, first = self._first
        changed = first.difference(fingerprint, f"pass 1 ({first_desc})", this)
        if changed is None:
            return
        if fingerprint.n_samples == 0:
            changed += (" (an iterable whose __iter__ returns the same iterator every time "
                        "can be iterated only once)")
        raise ValueError(
            f"the data changed between passes: {changed}. fit_model iterates the data twice "
            "per layer and needs the same samples every time (their order, batching and "
            "padding may change); "
            "random augmentation, sampling, or drop_last with shuffling give other samples "
            "on every pass. Pass a tensor, an array or a deterministic DataLoader."
        )


def _sums(value, real, phase):
    """The five sums of :class:`Fingerprint` of one tensor, and how many numbers it holds.

    ``value`` holds ``P`` positions per sample when ``real`` (batch, P) marks
    the real ones, else one position of all its numbers: the weights
    ``cos(r F + f + phase)`` are then ``cos(column + phase)`` either way, so a
    batch without padding has the fingerprint it would have with an
    all-ones mask.
    """
    f64 = torch.float64
    n = value.shape[0]
    v = value.reshape(n, 1 if real is None else real.shape[1], -1)
    n_features = v.shape[2]
    f = torch.arange(n_features, device=v.device, dtype=f64)
    # cos(A + f) = cos(A) cos(f) - sin(A) sin(f): two products with the features
    # instead of a weight per number (a copy of the activation).
    c, s = (v @ torch.cos(f).to(v.dtype)).to(f64), (v @ torch.sin(f).to(v.dtype)).to(f64)
    if real is None:
        rank = torch.zeros(n, 1, device=v.device, dtype=f64)
    else:
        rank = real.to(f64).cumsum(1) - 1
    angle = rank * n_features + phase
    norm = torch.linalg.vector_norm
    per_position = [v.sum(-1, dtype=f64), torch.cos(angle) * c - torch.sin(angle) * s,
                    norm(v, 2, dim=-1, dtype=f64).square(), norm(v, 1, dim=-1, dtype=f64)]
    if real is not None:
        # where, not a product: padded positions may hold anything, even infinity.
        per_position = [torch.where(real, t, 0.0) for t in per_position]
    total, p, squares, magnitudes = (t.sum(1) for t in per_position)
    return torch.stack([total.sum(), p.sum(), squares.sum(), p.square().sum(),
                        magnitudes.sum()]), v.numel()
