"""The measurements behind :class:`~sklearn_lib.degeneracy.DegeneracyReport`.

* Numerical ranks of a fitted layer's Gram matrix and Jacobian second moment
  ``M'``, from the statistics the interaction basis was fitted on, with the rule
  of the basis's "auto" truncation (:func:`sklearn_lib.basis._linalg.gram_spectrum`,
  :func:`sklearn_lib.basis._linalg.rounding_tolerance`).
* Firing patterns of elementwise activations: which rows have ``act'(z) ~ 0``,
  hashed per neuron batch by batch (:class:`FiringPatterns`), so neurons that
  fire on the same rows are found without holding the patterns.
* Recording those patterns from a live model: the input of every recorded
  elementwise activation module is hooked (:func:`record_patterns`).
"""

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..basis._linalg import (
    constant_feature_floor,
    gram_spectrum,
    rounding_tolerance,
    sorted_eigh,
)
from ..basis._stats import scale_by_power_of_two
from ..models import _model
from ..models._fastpath import ELEMENTWISE, LinearElementwise
from ..utils._backend import as_tensor, eval_mode, model_device
from ..utils._validation import check_finite

# Rows of pre-activations per batch when the caller gives no batch size.
_PATTERN_BATCH = 4096


# --------------------------------------------------------------------------- ranks
@dataclass
class LayerSpectra:
    """Spectra and numerical ranks of one layer's statistics, in the data's units.

    ``jacobian_eigenvalues`` is None when the layer has no Jacobians (the final
    layer, read whole by definition); ``jacobian_gram`` is ``M'`` scaled by a
    power of four and ``scaled_gradient_tolerance`` its rank tolerance in the
    same units (for ranks of its blocks).
    """

    gram_eigenvalues: np.ndarray
    activation_rank: int
    activation_tolerance: float
    jacobian_eigenvalues: np.ndarray | None
    gradient_rank: int
    gradient_tolerance: float
    jacobian_gram: torch.Tensor | None
    scaled_gradient_tolerance: float


def layer_spectra(basis):
    """:class:`LayerSpectra` of a fitted :class:`~sklearn_lib.InteractionBasis`.

    The statistics the basis was fitted on are used when it has them (they are
    scaled, so any magnitude fits); a loaded basis has only ``gram_`` and
    ``jacobian_gram_``. The activation rank is the first truncation of the
    "auto" rule (constant features dropped, ``D > eps max(d, sqrt(n)) D_max``);
    the gradient rank counts eigenvalues of ``M'`` above
    ``eps max(d, sqrt(n o)) |M'|_2``, the same rule for the other matrix.
    """
    stats = getattr(basis, "_statistics", None)
    if stats is not None:
        gram, jac, e_gram, e_jac = stats.scaled_moments()
        floor = constant_feature_floor(stats.mean, e_gram)
        n_rows, n_outputs = stats.n_samples, stats.n_outputs
    else:
        gram = torch.as_tensor(np.asarray(basis.gram_, dtype=np.float64))
        jac = None if basis.n_outputs_ is None else torch.as_tensor(
            np.asarray(basis.jacobian_gram_, dtype=np.float64))
        e_gram = e_jac = 0
        floor = constant_feature_floor(torch.as_tensor(np.asarray(basis.mean_)), 0)
        n_rows, n_outputs = basis.n_samples_seen_, basis.n_outputs_
    d = gram.shape[0]
    _, D, _, tau_D = gram_spectrum(gram, n_rows, floor.to(gram.dtype))
    activation_rank = int((D > tau_D).sum())
    n_terms = n_rows * (n_outputs or 1)
    if jac is None:
        jac_values, gradient_rank, tau_M = None, d, 0.0
    else:
        values, _ = sorted_eigh(jac)
        tau_M = rounding_tolerance(float(values[0]), d, n_terms, jac.dtype)
        # M' squared in a whitening frame bounds its own rounding (basis._stats).
        rho = None if stats is None else stats.jacobian_rounding()
        if rho is not None:
            tau_M = max(tau_M, rounding_tolerance(rho, d, n_terms, jac.dtype))
        gradient_rank = int((values > tau_M).sum())
        jac_values = scale_by_power_of_two(values, 2 * e_jac).cpu().numpy()
    return LayerSpectra(
        gram_eigenvalues=scale_by_power_of_two(D, 2 * e_gram).cpu().numpy(),
        activation_rank=activation_rank,
        activation_tolerance=scale_by_power_of_two(tau_D, 2 * e_gram),
        jacobian_eigenvalues=jac_values,
        gradient_rank=gradient_rank,
        gradient_tolerance=scale_by_power_of_two(tau_M, 2 * e_jac),
        jacobian_gram=jac,
        scaled_gradient_tolerance=tau_M,
    )


# --------------------------------------------------------------------------- patterns
@dataclass
class FiringPatterns:
    """Binary firing patterns of ``n_features`` neurons, hashed row batch by row batch.

    A neuron is *off* on a row where ``|act'(z)| <= tol``, else *on*. Each
    neuron's pattern (one bit per row, in row order) is fed to its own BLAKE2b
    hash (128 bits: a collision among a few thousand neurons has probability
    below 1e-30), and the rows on which it is on are counted, so that neurons
    that are always off or always on are told apart from the others.
    ``piecewise_linear`` stays True while every row satisfies
    ``act(z) = act'(z) z`` (ReLU does; smooth activations do not), the
    condition under which synchronised neurons can be mixed freely.
    """

    n_features: int
    tol: float
    n_rows: int = 0
    piecewise_linear: bool = True
    n_on: np.ndarray = field(default=None)
    _hashes: list = field(default=None, repr=False)

    def __post_init__(self):
        self.n_on = np.zeros(self.n_features, dtype=np.int64)
        self._hashes = [hashlib.blake2b(digest_size=16) for _ in range(self.n_features)]

    def update(self, z, activation):
        """Fold a batch of pre-activation rows ``z`` (b, n_features) of ``activation``."""
        if z.ndim != 2 or z.shape[1] != self.n_features:
            raise ValueError(
                f"expected pre-activations of shape (n_rows, {self.n_features}), got "
                f"{tuple(z.shape)}."
            )
        check_finite(z, "preactivations")
        s = derivative(activation, z)
        if self.piecewise_linear:
            value = activation(z.clone())
            eps = torch.finfo(z.dtype).eps
            slack = 8 * eps * (value.abs() + (s * z).abs())
            self.piecewise_linear = bool(((value - s * z).abs() <= slack).all())
        on = (s.abs() > self.tol).cpu().numpy()
        self.n_rows += on.shape[0]
        self.n_on += on.sum(axis=0)
        # One row of bytes per neuron; batches end on the same rows for every
        # neuron, so equal patterns give equal byte streams.
        packed = np.packbits(on.T, axis=1)
        for h, row in zip(self._hashes, packed):
            h.update(row.tobytes())
        return self

    def groups(self):
        """``(dead, always_on, groups)``: neuron indices always off, always on, and
        every set of at least two neurons that are not dead and share a pattern
        (largest first, then by first index)."""
        dead = np.flatnonzero(self.n_on == 0)
        always_on = np.flatnonzero(self.n_on == self.n_rows)
        classes = {}
        for i, h in enumerate(self._hashes):
            if self.n_on[i] > 0:
                classes.setdefault(h.digest(), []).append(i)
        groups = [np.array(g) for g in classes.values() if len(g) > 1]
        groups.sort(key=lambda g: (-len(g), g[0]))
        return dead, always_on, groups


def synchronised_directions(groups, always_on):
    """``sum_g k_g (k_g - 1) + k_on``: free directions of synchronised neurons.

    A group of ``k`` neurons with one firing pattern can be mixed by any
    invertible ``k x k`` matrix near the identity (incoming weights and biases
    times ``A``, outgoing weights times ``A^-1``): ``k^2`` directions, of which
    the ``k`` rescalings exist for every ReLU and are not counted. Each of the
    ``k_on`` neurons that never switch off is affine on the data, so its bias
    passes into the next layer's bias: one more direction each.
    """
    return sum(len(g) * (len(g) - 1) for g in groups) + len(always_on)


def derivative(activation, z):
    """``act'(z)`` elementwise, through autograd (``ReLU'(0) = 0``, as backward gives it)."""
    return LinearElementwise(None, None, activation, False).derivative(z)


def patterns_from_arrays(preactivations, activation, *, tol, batch_size, dtype, device):
    """:class:`FiringPatterns` of pre-activations ``(n_rows, d)`` given as an array."""
    n, d = (int(s) for s in preactivations.shape)
    patterns = FiringPatterns(d, tol)
    size = batch_size or _PATTERN_BATCH
    for start in range(0, n, size):
        z = as_tensor(preactivations[start:start + size], device=device, dtype=dtype)
        patterns.update(z, activation)
    return patterns


def record_patterns(model, layers, data, *, sequence, tol, batch_size, device, dtype):
    """Patterns of every recorded layer that is an elementwise activation's output.

    Returns ``{layer index: FiringPatterns}``. The input of each such module (its
    pre-activations, at the layer's selected positions) is hooked, batch by
    batch, in rows as the graph counts them (positions are rows with
    ``sequence=True``).
    """
    from ..models._collect import prepare_model

    model = prepare_model(model, device=device, dtype=dtype)
    specs = _model._parse_layers(model, list(layers), "output")
    watched = {
        l: spec._replace(kind="input") for l, spec in enumerate(specs)
        if spec.kind == "output" and type(spec.module) in ELEMENTWISE
    }
    if not watched:
        return {}
    patterns = {}
    batches, _ = _model._iter_batches(data, batch_size or _PATTERN_BATCH)
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            x = _model._input_tensor(batch, model_device(model), dtype)
            seen = {}

            def recorder(l):
                def fn(z):
                    seen[l] = z.detach().clone()

                return fn

            with _model._hooks([(spec, recorder(l)) for l, spec in watched.items()]):
                model(x)
            for l, spec in watched.items():
                if l not in seen:
                    raise ValueError(f"layer {spec.spec!r} was not called in the forward pass.")
                z = _model._as_rows(seen[l], sequence, specs[l])
                if l not in patterns:
                    patterns[l] = FiringPatterns(z.shape[1], tol)
                patterns[l].update(z, spec.module)
    return patterns
