"""On-disk cache of activations and Jacobians, stored as a zarr (v3) group.

Collecting Jacobians is the expensive step of fitting an interaction graph, and
their size (n x d_out x d_in per section) often exceeds memory. The cache
streams batches to disk and hands back zarr arrays that read lazily, slice by
slice, so the estimators can consume them chunk by chunk.

Layout of a cache directory::

    <path>/zarr.json                  group metadata; attributes hold the JSON
                                      description under the key "sklearn_lib_cache"
    <path>/activations/<node>         one array per layer, (n_rows, *row_shape)
    <path>/jacobians/<node>           one array per section (a, b)

Writes are atomic at the level of the whole cache: everything is written into a
temporary sibling directory and moved to ``path`` only by
:meth:`ActivationCache.finalize` (see :mod:`sklearn_lib.utils._atomic`), which is also
the only place that sets the ``"complete": true`` marker. A crash therefore
never leaves a cache at ``path`` that opens, a complete cache is never replaced
by a half-written one, and a replacement interrupted between its two renames is
undone by the next :meth:`~ActivationCache.open` or
:meth:`~ActivationCache.create`.

A complete cache proves it is complete: finalize records every file with its
size and CRC-32 (the *inventory*, :mod:`sklearn_lib.cache._store`) and the
CRC-32 of the description itself (``n_samples``, layers, shapes, the inventory:
everything in the root ``zarr.json``); open checks that checksum, that every
file exists with its size and that every array holds ``n_samples`` samples,
and every read checks the file's checksum and that the cache at ``path`` is
still the one opened. A missing, truncated or corrupted chunk, or an edited
root metadata file, raises, naming the array, the chunk and the file, instead
of reading as zeros.

An append is all or nothing: the description's ``n_samples`` counts only
batches whose every array was written, and an append that fails (a full disk,
an interrupt) shrinks the arrays back to those samples before it re-raises, so
the cache is as it was before it; finalize cuts every array to ``n_samples``
again before it takes the inventory.

``overwrite=True`` replaces a cache only when every file in its folder is one
the cache lists; a file a user put inside is named and kept.
Everything on disk is JSON or raw array chunks; no Python objects are serialised.
"""

import errno
import json
import os
import shutil

import numpy as np

from ..utils._atomic import (
    make_temp_dir,
    replace_dir,
    tidy,
)
from ._description import (
    check_arrays,
    check_description,
    check_expectations,
    empty_group,
    new_description,
)
from ._format import (
    _ATTR_KEY,
    _CHECKSUM_KEY,
    _WHAT,
    _check_keys,
    _check_target,
    _description_checksum,
    _finite_rows,
    _import_zarr,
    _is_complete_cache,
    _labels,
    _open_verified,
    _read_description,
    _to_numpy,
)

__all__ = ["ActivationCache"]


class ActivationCache:
    """Activations and Jacobians of a network on disk, appended batch by batch.

    Create a cache with :meth:`create` (write mode) or open a finished one with
    :meth:`open` (read mode); do not call the constructor directly.

    Every array grows along axis 0. A *row* is one sample, or one (sample,
    position) pair for sequence layers written with ``rows_per_sample=P``; so
    ``activations(name).shape == (n_samples * rows_per_sample[name], *shapes[name])``.
    The Jacobian of a section ``(a, b)`` has one row per row of ``a``.

    Attributes
    ----------
    path : str
        Final location of the cache.
    layers : list of str
        Layer names, in the order given at creation.
    shapes : dict of str to tuple
        Per-row shape of each layer's activations.
    jacobian_pairs : list of tuple of str
        The sections ``(a, b)`` whose Jacobians are stored.
    jacobian_shapes : dict of tuple to tuple
        Per-row shape of each stored Jacobian.
    rows_per_sample : dict of str to int
        Rows per sample of each layer (1 unless positions count as samples).
    dtype : numpy.dtype
        Floating dtype of all arrays.
    n_samples : int
        Number of samples appended so far.
    metadata : dict
        The user metadata (its JSON round trip: tuples come back as lists).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_lib.cache import ActivationCache
    >>> path = getfixture("tmp_path") / "acts.zarr"
    >>> with ActivationCache.create(path, {"fc1": (3,), "fc2": (2,)}, jacobians=True) as cache:
    ...     for _ in range(2):
    ...         cache.append({"fc1": np.ones((4, 3)), "fc2": np.zeros((4, 2))},
    ...                      {("fc1", "fc2"): np.ones((4, 2, 3))})
    >>> cache = ActivationCache.open(path, expect_layers=["fc1", "fc2"])
    >>> cache.n_samples, cache.activations("fc1").shape, cache.jacobians("fc1", "fc2").shape
    (8, (8, 3), (8, 2, 3))
    >>> np.asarray(cache.activations("fc1")[:2])
    array([[1., 1., 1.],
           [1., 1., 1.]])
    """

    def __init__(self, path, group, description, *, writing, tmp_path=None, overwrite=False):
        self.path = str(path)
        self._group = group
        self._desc = description
        self._writing = writing
        self._tmp_path = tmp_path
        self._overwrite = overwrite
        self._n_samples = int(description["n_samples"])
        # The error that kept a failed append's rows from being removed, if any.
        self._unrestored = None

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path,
        layers,
        *,
        jacobians=False,
        dtype="float64",
        chunk_size=1024,
        metadata=None,
        overwrite=False,
        rows_per_sample=None,
    ):
        """Start writing a new cache; it appears at ``path`` only after :meth:`finalize`.

        Parameters
        ----------
        path : str or os.PathLike
            Where the finished cache will live (a directory).
        layers : dict of str to tuple of int
            Layer name -> per-row shape of its activations, in network order.
            Names may contain any characters (e.g. ``"blocks.0.mlp"``); they are
            mapped to safe zarr node names and the mapping is stored.
        jacobians : bool, list of (str, str) or dict of (str, str) to tuple, default=False
            Which section Jacobians to store. ``True`` means every pair of adjacent
            layers. A list names the pairs; a dict also gives each pair's per-row
            shape. The default per-row shape of ``(a, b)`` is
            ``(rows_per_sample[b] * prod(shapes[b]), prod(shapes[a]))``: for flat
            layers the ``(d_b, d_a)`` Jacobian of a sample, for sequence layers the
            row layout of :func:`sklearn_lib.collect.sequence_jacobians_to_rows`.
        dtype : {"float64", "float32"}, default="float64"
            Storage dtype; appended arrays are cast to it.
        chunk_size : int, default=1024
            Maximum rows per zarr chunk (fewer for rows so large that a chunk
            would exceed 64 MiB).
        metadata : dict, optional
            JSON-serialisable user metadata, stored in the group attributes.
        overwrite : bool, default=False
            Allow replacing an existing cache at ``path``. The old cache is replaced
            only when the new one is finalized, so it survives a failed write. Paths
            that are not caches written by this class, and symbolic links, are never
            replaced.
        rows_per_sample : dict of str to int, optional
            Rows each sample contributes to a layer (the number of positions for
            sequence layers whose positions count as samples). Default 1.

        Returns
        -------
        cache : ActivationCache
            A cache in write mode. Use it as a context manager to finalize on
            success and discard the temporary files on error.
        """
        zarr = _import_zarr()
        path = os.path.abspath(os.fspath(path))
        description, chunk_size = new_description(
            path, layers, jacobians=jacobians, dtype=dtype, chunk_size=chunk_size,
            metadata=metadata, overwrite=overwrite, rows_per_sample=rows_per_sample)
        tmp_path = make_temp_dir(path, "ActivationCache")
        try:
            group = empty_group(zarr, tmp_path, description, chunk_size)
        except BaseException:
            shutil.rmtree(tmp_path, ignore_errors=True)
            raise
        return cls(path, group, description, writing=True, tmp_path=tmp_path, overwrite=overwrite)

    @classmethod
    def open(cls, path, *, expect_layers=None, expect_shapes=None, expect_dtype=None):
        """Open a finished cache for reading.

        Parameters
        ----------
        path : str or os.PathLike
            Location of the cache.
        expect_layers : list of str, optional
            Required layer names, in order.
        expect_shapes : dict of str to tuple, optional
            Required per-row shapes of (some of) the layers.
        expect_dtype : str or dtype, optional
            Required storage dtype.

        Returns
        -------
        cache : ActivationCache
            A read-only cache.

        Raises
        ------
        FileNotFoundError
            If nothing is at ``path`` (the message mentions unfinished writes).
        ValueError
            If ``path`` is not a cache, the cache is incomplete or damaged (a file
            of its inventory is missing or has the wrong size), or it does not
            match the expectations (the message lists expected and found values).

        Notes
        -----
        If a replacement of the cache was interrupted between its two renames,
        the intact previous cache is moved back to ``path`` first (with a
        warning); copies superseded by the cache at ``path`` and unfinished
        writes of processes that have ended are deleted.
        """
        _import_zarr()
        from ._store import check_inventory

        path = os.path.abspath(os.fspath(path))
        pending = tidy(path, _is_complete_cache, _WHAT)
        if not os.path.exists(path):
            hint = (
                f" Unfinished writes exist next to it ({', '.join(pending)}): a cache "
                "is only moved to its path by finalize()."
                if pending
                else ""
            )
            raise FileNotFoundError(f"no activation cache at {path!r}.{hint}")
        description = _read_description(path)
        check_description(path, description)
        check_inventory(path, description["inventory"], _labels(description))
        cache = cls(path, _open_verified(path, description), description, writing=False)
        check_arrays(cache)
        check_expectations(cache, expect_layers, expect_shapes, expect_dtype)
        return cache

    def _nodes(self):
        """``(node, label, row shape, rows per sample)`` of every array of the cache."""
        rows = self.rows_per_sample
        nodes = [(e["node"], f"activations of layer {e['name']!r}", tuple(e["shape"]),
                  rows[e["name"]]) for e in self._desc["layers"]]
        nodes += [(e["node"], f"Jacobians of section ({e['in']!r}, {e['out']!r})",
                   tuple(e["shape"]), rows[e["in"]]) for e in self._desc["jacobians"]]
        return nodes

    # ------------------------------------------------------------------ writing
    def append(self, batch, jacobian_batch=None):
        """Append one batch of activations (and Jacobians) along axis 0.

        Parameters
        ----------
        batch : dict of str to array-like
            Every layer's activations for the batch, ``(B * rows_per_sample, *shape)``.
            Numpy arrays and tensors (any device) are accepted.
        jacobian_batch : dict of (str, str) to array-like, optional
            Every stored section's Jacobians for the batch; required exactly when
            the cache stores Jacobians.

        Raises
        ------
        TypeError
            If an array is complex or not numeric: the cache stores real floats
            and would keep only the real part.
        ValueError
            If an array has the wrong shape, or a value is NaN, infinite or beyond
            the range of the storage dtype (e.g. 1e300 in a float32 cache). The
            message names the layer or section and the row; nothing of the batch
            is written.
        OSError
            If writing fails (e.g. the disk is full). The arrays are cut back to
            the samples of the earlier batches, so the cache is as it was before
            this call; append again or finalize once there is space.
        """
        if not self._writing:
            raise ValueError("this activation cache is read-only (opened or already finalized).")
        layer_entries = self._desc["layers"]
        jac_entries = self._desc["jacobians"]
        _check_keys(batch, [e["name"] for e in layer_entries], "batch", "layers")
        _check_keys(jacobian_batch or {}, [(e["in"], e["out"]) for e in jac_entries],
                    "jacobian_batch", "sections")
        rows = self.rows_per_sample
        work = []
        n_batch = None
        for key, entry, array, per in (
            [(e["name"], e, batch[e["name"]], rows[e["name"]]) for e in layer_entries]
            + [((e["in"], e["out"]), e, jacobian_batch[(e["in"], e["out"])], rows[e["in"]])
               for e in jac_entries]
        ):
            what = (f"layer {key!r}" if isinstance(key, str)
                    else f"the Jacobians of section {key!r}")
            array = _to_numpy(array)
            if array.dtype.kind not in "biuf":
                raise TypeError(
                    f"{what}: expected real numbers, got an array of dtype {array.dtype}"
                    + (" (the cache would keep only the real part)"
                       if array.dtype.kind == "c" else "") + "."
                )
            shape = tuple(entry["shape"])
            if array.shape[1:] != shape or array.shape[0] % per:
                raise ValueError(
                    f"{what}: expected an array of shape (n_rows, *{shape}) with n_rows a "
                    f"multiple of rows_per_sample={per}, got {array.shape}."
                )
            array = _finite_rows(array, self.dtype, what, per)
            n = array.shape[0] // per
            if n_batch is None:
                n_batch = n
            elif n != n_batch:
                raise ValueError(
                    f"{key!r} holds {n} samples but the other arrays of this batch hold "
                    f"{n_batch}: all arrays of a batch must describe the same samples."
                )
            work.append((entry["node"], array, per))
        self._restore()
        try:
            for node, array, per in work:
                target = self._group[node]
                start = self._n_samples * per
                target.resize((start + array.shape[0], *target.shape[1:]))
                target[start:] = array
        except BaseException:
            # All or nothing: the arrays go back to the samples counted so far.
            self._restore(after_failure=True)
            raise
        self._n_samples += n_batch

    def finalize(self):
        """Mark the cache complete and move it atomically to its final path.

        An existing cache at ``path`` is replaced only if the cache was created
        with ``overwrite=True``. Every file is recorded with its size and CRC-32
        (one read of the cache) so that readers can verify it. Afterwards the
        cache is read-only.
        """
        if not self._writing:
            raise ValueError("this activation cache is already finalized or was opened read-only.")
        from ._store import take_inventory

        # Another writer may have finished at the same path since create().
        _check_target(self.path, self._overwrite)
        # Rows of a failed append are never part of the cache.
        self._restore(cut=True)
        description = dict(self._desc)
        description["complete"] = True
        description["n_samples"] = self._n_samples
        description["inventory"] = take_inventory(self._tmp_path)
        description[_CHECKSUM_KEY] = _description_checksum(description)
        self._group.attrs[_ATTR_KEY] = description
        replace_dir(self._tmp_path, self.path)
        self._desc = description
        self._writing = False
        self._tmp_path = None
        self._group = _open_verified(self.path, description)

    def _restore(self, *, after_failure=False, cut=False):
        """Cut every array back to ``n_samples`` samples (the rows of a failed append).

        Runs after a failed append (``after_failure``: an error here is kept for
        later, the append's own error is the one raised), before the next
        append if that one could not, and in finalize (``cut``: always).
        """
        if not (after_failure or cut or self._unrestored is not None):
            return
        try:
            # A fresh view: the failed write may have left zarr's objects behind the disk.
            group = _import_zarr().open_group(self._tmp_path, mode="r+", zarr_format=3)
            for node, _, _, per in self._nodes():
                array = group[node]
                rows = self._n_samples * per
                if array.shape[0] != rows:
                    array.resize((rows, *array.shape[1:]))
            self._group = group
            self._unrestored = None
        except Exception as exc:
            self._unrestored = exc
            if after_failure:
                return
            raise OSError(
                getattr(exc, "errno", None) or errno.EIO,
                f"the activation cache being written for {self.path!r} still holds rows of an "
                f"append that failed, and they could not be removed ({exc}). Free space and "
                "call finalize() or append() again, or discard() the cache; nothing was "
                "written to its path",
            ) from exc

    def discard(self):
        """Abandon an unfinished cache and delete its temporary files."""
        if self._writing:
            shutil.rmtree(self._tmp_path, ignore_errors=True)
            self._writing = False
            self._group = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._writing:
            if exc_type is None:
                self.finalize()
            else:
                self.discard()
        return False

    # ------------------------------------------------------------------ reading
    @property
    def layers(self):
        return [e["name"] for e in self._desc["layers"]]

    @property
    def shapes(self):
        return {e["name"]: tuple(e["shape"]) for e in self._desc["layers"]}

    @property
    def rows_per_sample(self):
        return {e["name"]: int(e["rows_per_sample"]) for e in self._desc["layers"]}

    @property
    def jacobian_pairs(self):
        return [(e["in"], e["out"]) for e in self._desc["jacobians"]]

    @property
    def jacobian_shapes(self):
        return {(e["in"], e["out"]): tuple(e["shape"]) for e in self._desc["jacobians"]}

    @property
    def dtype(self):
        return np.dtype(self._desc["dtype"])

    @property
    def n_samples(self):
        return self._n_samples

    @property
    def metadata(self):
        return json.loads(json.dumps(self._desc["metadata"]))

    def _readable_node(self, node):
        if self._writing:
            raise ValueError(
                "this activation cache is still being written; call finalize() before reading."
            )
        if self._group is None:
            raise ValueError("this activation cache was discarded.")
        from ._chunk_read import CacheArray

        # zarr's array, but whole chunks are decoded into the result in place.
        return CacheArray(self._group[node]._async_array)

    def activations(self, name, *, dask=False):
        """Lazily readable array of layer ``name``: ``(n_rows, *shapes[name])``.

        Slicing reads only the chunks needed; ``np.asarray`` reads everything.
        The array is a ``zarr.Array`` whose reads of whole chunks decode each
        chunk straight into the result (no intermediate copies).
        Every read checks the chunks against the cache's inventory, and raises
        once the cache at :attr:`path` is no longer the one this cache was opened
        on (it was overwritten, moved or deleted): an array never mixes two caches.

        With ``dask=True`` the result is a lazy ``dask.array.Array`` instead,
        for fits that run on Dask (see the page "Larger than memory and
        multi-GPU"): its blocks hold whole samples, the same samples in every
        array of this cache (as many as the smallest zarr chunk of the cache
        holds), so that activations and Jacobians line up without rechunking.
        Only the path travels to workers; each process opens the cache itself
        and verifies every read as above.
        """
        for e in self._desc["layers"]:
            if e["name"] == name:
                return self._node(e["node"], self.rows_per_sample[name], dask)
        raise KeyError(f"no layer {name!r} in the cache; layers: {self.layers}.")

    def jacobians(self, a, b, *, dask=False):
        """Lazily readable Jacobians of section ``(a, b)``.

        Shape ``(n_rows_a, *jacobian_shapes[(a, b)])``, one row per row of ``a``.
        Reads are checked as for :meth:`activations`; ``dask=True`` gives a
        dask array in the blocks of :meth:`activations`.
        """
        for e in self._desc["jacobians"]:
            if (e["in"], e["out"]) == (a, b):
                return self._node(e["node"], self.rows_per_sample[a], dask)
        raise KeyError(f"no Jacobians for section ({a!r}, {b!r}); stored: {self.jacobian_pairs}.")

    def _node(self, node, rows_per_sample, dask):
        array = self._readable_node(node)
        if not dask:
            return array
        from ._dask import cache_array

        return cache_array(self, node, array.shape, rows_per_sample, self._samples_per_block())

    def _samples_per_block(self):
        """Whole samples in the smallest zarr chunk of any array of the cache (at least 1)."""
        rows = self.rows_per_sample
        entries = [(e["node"], rows[e["name"]]) for e in self._desc["layers"]]
        entries += [(e["node"], rows[e["in"]]) for e in self._desc["jacobians"]]
        return max(1, min(self._group[node].chunks[0] // r for node, r in entries))

    def __repr__(self):
        state = "writing" if self._writing else "complete"
        return (
            f"ActivationCache({self.path!r}, {state}, n_samples={self.n_samples}, "
            f"layers={self.layers})"
        )
