"""Where an interaction graph's statistics and edges come from: cached arrays.

:class:`CachedSource` reads cached activations and adjacent-layer Jacobians
(arrays, memmaps, tensors, zarr arrays of an ActivationCache) chunk by chunk;
:class:`~sklearn_lib.sources._model_source.ModelSource` computes the same from a live
torch model. Both expose the same operations (statistics of a layer's activations,
statistics with projected Jacobians, the same for the global variant, edges),
so that the backward chaining of :class:`~sklearn_lib.InteractionGraph` is
written once.
"""

import warnings
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from ..basis._stats import AUTO_CHUNK_NUMBERS
from ..utils._backend import as_tensor
from ._edges import accumulate_edges


def _shape(a):
    return tuple(int(s) for s in a.shape)


def _as_arraylike(a, name):
    """Keep anything sliceable with a shape (ndarray, memmap, tensor, zarr array) as it is.

    Its dtype must be real numbers: a string or complex array would fail (or
    lose its imaginary part) chunk by chunk, deep inside the statistics.
    """
    if hasattr(a, "shape") and hasattr(a, "__getitem__"):
        dtype = getattr(a, "dtype", None)
        if isinstance(dtype, torch.dtype):
            real = not (dtype.is_complex or dtype == torch.bool)
        else:
            real = dtype is not None and np.dtype(dtype).kind in "fiu"
        if not real:
            raise ValueError(f"{name} must hold real numbers, got dtype {dtype}.")
        return a
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an array-like of numbers: {exc}") from None


def _row_major(a):
    """Whether chunks of rows of ``a`` can be used without a copy into row-major order."""
    if isinstance(a, torch.Tensor):
        return a.is_contiguous()
    flags = getattr(a, "flags", None)
    if flags is not None:
        return bool(flags.c_contiguous)
    # zarr arrays are read in the memory order they were written in.
    order = getattr(getattr(a, "metadata", None), "order", None) or getattr(a, "order", "C")
    return order == "C"


def _warn_if_copied(acts, jacs):
    """Say once per fit which arrays are copied chunk by chunk because of their layout."""
    named = [(f"X[{l}]", a) for l, a in enumerate(acts)]
    named += [(f"jacobians[{l}]", J) for l, J in enumerate(jacs)]
    copied = [name for name, a in named if not _row_major(a)]
    if copied:
        warnings.warn(
            f"{', '.join(copied)} {'is' if len(copied) == 1 else 'are'} not row-major "
            "(C-contiguous): every chunk is copied into row-major order before use, "
            "which can take as long as the products themselves. Pass "
            "np.ascontiguousarray(...) (or write the cache row-major) to avoid it.",
            UserWarning,
            stacklevel=4,
        )


@contextmanager
def _chunk_of(what, rows):
    """Say which array and rows a chunk came from when the statistics refuse it (NaN, inf)."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{what}, rows {rows.start}..{rows.stop - 1}: {exc}") from exc


def _progress(iterable, *, total, desc, verbose):
    return tqdm(iterable, total=total, desc=desc, disable=not verbose, leave=False)


# --------------------------------------------------------------------------- cached source
class CachedSource:
    """Activations ``X_l`` (rows, d_l) and Jacobians ``J_l`` (rows_l, P_{l+1} d_{l+1}, d_l).

    Flat layers have one row per sample. Sequence layers (``sequence=True``)
    have ``P_l`` rows per sample (positions count as samples), in the row
    layout of :mod:`sklearn_lib.collect`; ``P_{l+1}`` is read off the Jacobians.
    Everything is sliced lazily, a chunk of whole samples at a time.
    """

    def __init__(self, activations, jacobians, *, sequence, batch_size, device, dtype, verbose):
        if not isinstance(activations, (list, tuple)) or len(activations) < 2:
            raise ValueError(
                "X must be a list of the activations of at least 2 layers [X_0, ..., X_L], "
                f"got {type(activations).__name__}"
                + (f" of length {len(activations)}" if isinstance(activations, (list, tuple))
                   else "")
                + "."
            )
        if jacobians is None:
            raise ValueError(
                "fit needs the Jacobians between adjacent layers (jacobians=[J_0, ..., "
                "J_{L-1}]); to compute them from a torch model use fit_model / from_model."
            )
        if not isinstance(jacobians, (list, tuple)) or len(jacobians) != len(activations) - 1:
            given = len(jacobians) if isinstance(jacobians, (list, tuple)) else type(jacobians)
            raise ValueError(
                f"jacobians must be a list of len(X) - 1 = {len(activations) - 1} arrays, one "
                f"per pair of adjacent layers; got {given!r} for {len(activations)} layers."
            )
        acts = [_as_arraylike(a, f"X[{l}]") for l, a in enumerate(activations)]
        jacs = [_as_arraylike(j, f"jacobians[{l}]") for l, j in enumerate(jacobians)]
        for l, a in enumerate(acts):
            if len(a.shape) != 2:
                raise ValueError(
                    f"X[{l}] must be 2-D (n_rows, n_features), got shape {_shape(a)}."
                )
        rows = [_shape(a)[0] for a in acts]
        widths = [_shape(a)[1] for a in acts]
        for l, d in enumerate(widths):
            if d == 0:
                raise ValueError(
                    f"X[{l}] has shape {_shape(acts[l])}: a layer needs at least one feature."
                )
        positions = [1] * len(acts)
        for l, J in enumerate(jacs):
            expected = (rows[l], widths[l + 1], widths[l])
            what = (
                f"jacobians[{l}] must be (n_rows_{l}, d_{l + 1}, d_{l}) = {expected} "
                "(the Jacobian of layer l+1 with respect to layer l for each row of X[l])"
            )
            if sequence:
                what += " or, with sequence=True, (n_rows_l, P_{l+1} * d_{l+1}, d_l)"
            shape = _shape(J)
            hint = (" It looks transposed: the derivative axis (features of X[l]) goes last."
                    if shape == (rows[l], widths[l], widths[l + 1]) else "")
            if len(shape) != 3 or shape[0] != rows[l] or shape[2] != widths[l]:
                raise ValueError(f"{what}; got {shape}.{hint}")
            if sequence:
                if shape[1] % widths[l + 1]:
                    raise ValueError(f"{what}; got {shape}, and {shape[1]} is not a multiple "
                                     f"of d_{l + 1} = {widths[l + 1]}.")
                positions[l + 1] = shape[1] // widths[l + 1]
            elif shape[1] != widths[l + 1]:
                raise ValueError(f"{what}; got {shape}.{hint}")
        if not sequence:
            for l, n in enumerate(rows):
                if n != rows[0]:
                    raise ValueError(
                        f"all layers need the same samples: X[{l}] has {n} rows but X[0] has "
                        f"{rows[0]} (rows per layer: {rows})."
                    )
            n_samples = rows[0]
        else:
            counts = [rows[l] / positions[l] for l in range(1, len(rows))]
            n_samples = counts[-1]
            if any(c != n_samples for c in counts) or n_samples != int(n_samples):
                raise ValueError(
                    "all layers need the same samples: rows / positions per layer are "
                    f"{counts} (rows {rows[1:]}, positions {positions[1:]} read off the "
                    "Jacobians); they must be equal integers."
                )
            n_samples = int(n_samples)
            if n_samples == 0 or rows[0] % n_samples:
                raise ValueError(
                    f"X[0] has {rows[0]} rows, which is not a whole number of positions for "
                    f"the {n_samples} samples of the other layers."
                )
            positions[0] = rows[0] // n_samples
        if n_samples < 2:
            raise ValueError(f"need at least 2 samples, got {n_samples}.")
        self.acts, self.jacs = acts, jacs
        _warn_if_copied(acts, jacs)
        self.widths, self.positions, self.n_samples = widths, positions, n_samples
        self.batch_size, self.device, self.dtype, self.verbose = (
            batch_size, device, dtype, verbose,
        )

    @property
    def n_layers(self):
        return len(self.acts)

    def _tensor(self, a):
        return as_tensor(a, device=self.device, dtype=self.dtype)

    def _chunks(self, per_sample, desc):
        """Slices of samples; each chunk holds about 2**23 numbers (or batch_size rows)."""
        if self.batch_size is not None:
            step = max(1, self.batch_size // max(self.positions))
        else:
            step = max(1, AUTO_CHUNK_NUMBERS // max(1, per_sample))
        starts = range(0, self.n_samples, step)
        for start in _progress(starts, total=len(starts), desc=desc, verbose=self.verbose):
            yield start, min(start + step, self.n_samples)

    def _rows(self, l, chunk):
        P = self.positions[l]
        return slice(chunk[0] * P, chunk[1] * P)

    def _jac_size(self, l):
        return self.positions[l] * _shape(self.jacs[l])[1] * self.widths[l]

    def _project(self, J, V, l):
        """``V^T`` applied to the features of every output position: (N, P_{l+1} k, d_l)."""
        n, P = J.shape[0], self.positions[l + 1]
        J = J.reshape(n * P, self.widths[l + 1], self.widths[l])
        return (V.T @ J).reshape(n, P * V.shape[1], self.widths[l])

    def activation_stats(self, l, new_stats):
        stats = new_stats(l, None)
        # The chunk and the scaled and centred copies the statistics make.
        per_sample = 4 * self.positions[l] * self.widths[l]
        for chunk in self._chunks(per_sample, f"layer {l}"):
            rows = self._rows(l, chunk)
            with _chunk_of(f"X[{l}]", rows):
                stats.update(self.acts[l][rows])
        return stats

    def jacobian_stats(self, l, V, new_stats, position_sources=None):
        # Stochastic sources over positions save vector-Jacobian products; the
        # cached Jacobians hold every position already, so they are not used.
        stats = new_stats(l, self.positions[l + 1] * V.shape[1])
        projected = self.positions[l] * self.positions[l + 1] * V.shape[1] * self.widths[l]
        for chunk in self._chunks(self._jac_size(l) + projected, f"layer {l}"):
            rows = self._rows(l, chunk)
            J_hat = self._project(self._tensor(self.jacs[l][rows]), V, l)
            with _chunk_of(f"X[{l}] or jacobians[{l}]", rows):
                stats.update(self.acts[l][rows], J_hat)
        return stats

    def global_stats(self, V, new_stats, position_sources=None):
        """Statistics of every layer with ``V^T J_{L-1} ... J_l``, chained per chunk of samples."""
        L = self.n_layers - 1
        k = V.shape[1] * self.positions[L]
        stats = [new_stats(l, k) for l in range(L)]
        per_sample = max(
            max(self._jac_size(l), self.positions[l] * k * self.widths[l]) for l in range(L)
        )
        for chunk in self._chunks(per_sample, "global"):
            b = chunk[1] - chunk[0]
            rows = self._rows(L - 1, chunk)
            G = self._project(self._tensor(self.jacs[L - 1][rows]), V, L - 1)
            with _chunk_of(f"X[{L - 1}] or jacobians[{L - 1}]", rows):
                stats[L - 1].update(self.acts[L - 1][rows], G)
            for l in range(L - 2, -1, -1):
                rows = self._rows(l, chunk)
                P0, P1 = self.positions[l], self.positions[l + 1]
                d0, d1 = self.widths[l], self.widths[l + 1]
                J = self._tensor(self.jacs[l][rows]).reshape(b, P0, P1, d1, d0)
                G = torch.einsum("btod,bstdi->bsoi", G.reshape(b, P1, k, d1), J)
                G = G.reshape(b * P0, k, d0)
                with _chunk_of(f"X[{l}] or jacobians[{l}:{L}]", rows):
                    stats[l].update(self.acts[l][rows], G)
        return stats

    def edges(self, l, V, mean, C, C_pinv, *, out_mean=None, **_):
        """Edges (r_out, r_in); with ``out_mean``, the constant node's column appended."""
        E = torch.zeros(V.shape[1], C.shape[1] + (out_mean is not None), device=self.device,
                        dtype=self.dtype)
        constant, Z_out = (None, None) if out_mean is None else (E[:, -1], None)
        # The chunk of Jacobians, their projection and J_tilde.
        k, r = self.positions[l] * self.positions[l + 1] * V.shape[1], C.shape[1]
        per_sample = self._jac_size(l) + k * (self.widths[l] + r)
        for chunk in self._chunks(per_sample, f"edges {l}"):
            rows = self._rows(l, chunk)
            Z = (self._tensor(self.acts[l][rows]) - mean) @ C
            J_tilde = self._project(self._tensor(self.jacs[l][rows]), V, l) @ C_pinv.T
            if constant is not None:
                Z_out = (self._tensor(self.acts[l + 1][self._rows(l + 1, chunk)]) - out_mean) @ V
            accumulate_edges(E[:, :C.shape[1]], J_tilde, Z, self.positions[l + 1],
                             self.positions[l], constant=constant, Z_out=Z_out)
        return E / (self.n_samples * self.positions[l])
