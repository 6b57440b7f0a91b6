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
    """The sample count and order-free sums of the numbers seen by one pass over the data.

    The sums (of the numbers, of their projections on a fixed direction ``w``
    with ``|w_i| <= 1``, of the squares of both, and of the magnitudes) are
    accumulated in float64 on the device, with no host sync per batch. They do
    not depend on the order of samples or batches beyond rounding, so a
    shuffling DataLoader passes, and two passes over other samples differ.

    Parameters
    ----------
    what : str, default="inputs"
        What the numbers are, for messages.
    """

    _NAMES = ("{}", "projected {}", "squared {}", "squared projections of the {}",
              "magnitudes of the {}")

    def __init__(self, what="inputs"):
        self.what = what
        self.n_samples, self.n_numbers, self.sums, self.width = 0, 0, None, 0

    def add(self, x):
        """Add a batch (a tensor or a dict of tensors, samples on axis 0)."""
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            # A view, and reductions that accumulate in float64 without a copy: a
            # layer's values are fingerprinted in every pass.
            v = x.reshape(x.shape[0], -1)
        else:
            v = _adapters.flat_numbers(x)
        f64 = torch.float64
        w = torch.cos(torch.arange(v.shape[1], device=v.device, dtype=f64)).to(v.dtype)
        p = (v @ w).to(f64)
        norm = torch.linalg.vector_norm
        sums = torch.stack([v.sum(dtype=f64), p.sum(), norm(v, 2, dtype=f64).square(),
                            p.square().sum(), norm(v, 1, dtype=f64)])
        self.sums = sums if self.sums is None else self.sums.add_(sums)
        self.n_samples += int(v.shape[0])
        self.n_numbers += v.numel()
        # Batches of sequences of different lengths have different widths.
        self.width = max(self.width, int(v.shape[1]))

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

    def layer(self, name, values):
        """Add a batch of ``name``'s recorded values (samples on axis 0) to this pass."""
        if self.current is not None:
            self.current.setdefault(name, Fingerprint(f"values of layer {name!r}")).add(values)

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
            "per layer and needs the same samples every time (their order may change); "
            "random augmentation, sampling, or drop_last with shuffling give other samples "
            "on every pass. Pass a tensor, an array or a deterministic DataLoader."
        )
