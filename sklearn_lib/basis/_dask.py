"""Dask glue: statistics as tree reductions over the row blocks of dask arrays.

Nothing here imports dask at import time: :func:`is_dask_array` only looks for a
module the caller has already imported, so the package works without dask and
pays nothing for it.

Every reduction has the same shape. One task per block of rows computes the
block's :class:`~sklearn_lib.basis._stats.InteractionStatistics` (or edge sums) with
the in-memory code; the parts are merged ``SPLIT_EVERY`` at a time in a tree
(one TSQR step with Chan's mean correction and a change of the Jacobians'
frame, exact, so the shape of the tree changes nothing but rounding); the root is computed by whatever scheduler is active: threads on a
laptop, or the cluster of a ``dask.distributed`` ``Client``. Parts travel on
the CPU (a worker's GPU tensors would not unpickle elsewhere) and only the root
moves to the estimator's device. The root's row count is compared with the
input's before anything is returned: a block lost or counted twice raises
instead of fitting on other data than the user's.
"""

import itertools
import math
import sys
import warnings

import numpy as np
import torch

from ..utils._backend import gen_batches
from ._stats import AUTO_CHUNK_NUMBERS, InteractionStatistics, merge_statistics

#: Parts merged by one node of the reduction tree.
SPLIT_EVERY = 8


def is_dask_array(a):
    """Whether ``a`` is a ``dask.array.Array`` (never imports dask)."""
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(a, module.Array)


def import_dask():
    """``dask`` with ``dask.array`` and ``dask.delayed`` loaded, or an ImportError saying how."""
    try:
        import dask
        import dask.array  # noqa: F401
        import dask.delayed  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "fitting from dask arrays needs dask: pip install 'sklearn_lib[scale]' "
            f"({exc})."
        ) from exc
    return dask


def check_known_chunks(a, name):
    """Refuse a dask array whose chunk sizes are unknown (NaN), e.g. after boolean indexing."""
    if any(math.isnan(n) for n in a.shape):
        raise ValueError(
            f"{name} is a dask array with unknown chunk sizes (shape {a.shape}, as after "
            "boolean indexing): the statistics must know which rows every block holds to "
            f"check that none is lost. Call {name}.compute_chunk_sizes() first (or "
            "to_dask_array(lengths=True) for a dask DataFrame)."
        )


def as_row_blocks(a, row_chunks, name, misaligned):
    """``a`` as a dask array with row blocks ``row_chunks`` and every other axis whole.

    Arrays that are not dask arrays are wrapped lazily (a tensor through numpy,
    on the CPU). The name of a dask array whose row blocks had to change is
    appended to ``misaligned``, so that the caller can say so once.
    """
    import dask.array as da

    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    whole = tuple(int(n) for n in a.shape[1:])
    if not is_dask_array(a):
        return da.from_array(a, chunks=(tuple(row_chunks), *whole))
    if tuple(a.chunks[0]) != tuple(row_chunks):
        misaligned.append(name)
    return a.rechunk((tuple(row_chunks), *whole))


class CacheBlock:
    """Rows ``key`` of a cache array, read by the task that needs them (:func:`row_blocks`)."""

    def __init__(self, source, key):
        self.source, self.key = source, key

    def read(self):
        return self.source[self.key]


#: The attribute by which a dask array of a cache holds its name, chunks and source
#: (:func:`sklearn_lib.cache._dask.cache_array` sets it).
CACHE_SOURCE = "_sklearn_lib_cache_node"


def row_blocks(a):
    """One argument per row block of the dask array ``a`` for the reduction's tasks.

    The blocks of an array of a cache (:func:`cache_array`) are :class:`CacheBlock`
    that the task needing them reads itself (:func:`read_block`); those of any
    other array are its delayed blocks. Reading in the task keeps a worker from
    holding a block that waits for its task while it reads the next one (with
    separate read tasks, measured: two Jacobian blocks at a time, a third more
    memory per worker).
    """
    name, chunks, source = getattr(a, CACHE_SOURCE, (None, None, None))
    # Operations make new arrays without the attribute (a rechunk to the same
    # chunks returns the array itself), but ``a[mask] = v`` changes the array in
    # place, and its name with it: only the unchanged array reads the cache.
    if source is None or a.name != name or a.chunks != chunks:
        return list(a.to_delayed().ravel())
    starts = np.cumsum((0, *a.chunks[0])).tolist()
    whole = tuple(slice(0, int(n)) for n in a.shape[1:])
    return [CacheBlock(source, (slice(b, e), *whole)) for b, e in itertools.pairwise(starts)]


def read_block(part):
    """The array of a part from :func:`row_blocks` (a block computed by Dask is one already)."""
    return part.read() if isinstance(part, CacheBlock) else part


def warn_misaligned(misaligned, reference):
    if misaligned:
        warnings.warn(
            f"the row blocks of {', '.join(misaligned)} do not line up with those of "
            f"{reference}: every block of rows must hold the same samples in every array, so "
            f"{'it was' if len(misaligned) == 1 else 'they were'} rechunked, which makes "
            "workers read neighbouring blocks too. Chunk all arrays alike along the rows "
            "(ActivationCache.activations(..., dask=True) does) to avoid it.",
            UserWarning,
            stacklevel=4,
        )


def combine(*parts):
    """Merge the parts of a reduction: statistics (TSQR), lists of them, or edge sums."""
    first = parts[0]
    if isinstance(first, InteractionStatistics):
        # One TSQR step and one change of frame for all parts of the node.
        return merge_statistics(list(parts))
    if isinstance(first, list):
        return [combine(*column) for column in zip(*parts)]
    # Edge sums: (sum over rows of the squared attributions, number of rows).
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def tree_reduce(parts):
    """A ``dask.delayed`` tree that merges ``parts`` ``SPLIT_EVERY`` at a time."""
    from dask import delayed

    while len(parts) > 1:
        parts = [
            delayed(combine, pure=False)(*parts[i : i + SPLIT_EVERY])
            for i in range(0, len(parts), SPLIT_EVERY)
        ]
    return parts[0]


def compute(root, what):
    """Compute ``root``; a worker lost more often than Dask retries becomes a clear error."""
    import dask

    try:
        (result,) = dask.compute(root)
    except Exception as exc:
        # distributed.KilledWorker, without importing distributed: the scheduler
        # retried a task on other workers and gave up.
        if type(exc).__name__ != "KilledWorker":
            raise
        raise RuntimeError(
            f"{what}: Dask workers died while computing a block of statistics, more often "
            "than the scheduler retries a task (distributed.scheduler.allowed-failures), "
            "so the reduction was abandoned and nothing was fitted. A worker dying "
            "repeatedly on the same block usually ran out of memory: use smaller row "
            f"blocks or give workers more memory. ({exc})"
        ) from exc
    return result


def check_rows(seen, expected, what):
    """Raise unless the reduction counted exactly the input's rows."""
    if seen != expected:
        raise RuntimeError(
            f"{what}: the Dask reduction combined {seen} rows, but the input holds "
            f"{expected}. A block was lost or counted twice; no result is returned."
        )


# --------------------------------------------------------------------------- basis
def _basis_block(X, jacobians, sample_weight, config):
    """The statistics of one block of rows (arrays or :func:`row_blocks` parts), on the CPU."""
    n_features, n_outputs, center, device, dtype, chunk = config
    X = read_block(X)
    jacobians = read_block(jacobians)
    stats = InteractionStatistics(n_features, n_outputs, center=center, device=device,
                                  dtype=dtype)
    chunks = list(gen_batches(X.shape[0], chunk))

    def weights(rows):
        return None if sample_weight is None else sample_weight[rows]

    # The block is in memory: all its activations first, then its Jacobians in
    # the whitening frame of the block's R factor (see _stats).
    for rows in chunks:
        stats.update_activations(X[rows], weights(rows))
    if jacobians is not None:
        for rows in chunks:
            stats.update_jacobians(jacobians[rows], weights(rows))
    return stats.to("cpu")


def basis_statistics(basis, X, jacobians, sample_weight):
    """Statistics of ``InteractionBasis.fit`` from dask arrays, reduced with Dask.

    ``X`` or ``jacobians`` is a dask array; the other may be any array. Shapes
    are validated as for in-memory input; rows are blocked as ``X`` is (the
    Jacobians are rechunked to match, with a warning, when they are not).
    """
    from ..utils._validation import check_jacobians, check_real_values

    dask = import_dask()
    for name, a in (("X", X), ("jacobians", jacobians)):
        if is_dask_array(a):
            check_known_chunks(a, name)
    if not is_dask_array(X):
        # Blocked as the Jacobians are (only they can be a dask array here).
        X = np.asarray(check_real_values(X, "X"))
        X = dask.array.from_array(X, chunks=(jacobians.chunks[0], *X.shape[1:]))
    check_real_values(X, "X")
    if X.ndim != 2:
        raise ValueError(
            f"X must be 2-D (n_samples, n_features), got a dask array of shape {X.shape}."
        )
    n, d = (int(s) for s in X.shape)
    if d == 0 or n < 2:
        raise ValueError(
            f"X has shape {X.shape}: at least 2 samples and 1 feature are needed."
        )
    jacobians = check_jacobians(jacobians, (n, d))
    if sample_weight is not None:
        if is_dask_array(sample_weight):
            # n numbers: validated like any others, then sliced per block.
            sample_weight = sample_weight.compute()
        sample_weight = basis._check_sample_weight(sample_weight, n, reset=True)
    row_chunks = X.chunks[0]
    misaligned = []
    X = as_row_blocks(X, row_chunks, "X", [])
    if jacobians is not None:
        jacobians = as_row_blocks(jacobians, row_chunks, "jacobians", misaligned)
    warn_misaligned(misaligned, "X")

    n_outputs = None if jacobians is None else int(jacobians.shape[1])
    device, dtype = basis._torch_config()
    chunk = basis.batch_size or _auto_chunk(d, n_outputs)
    config = (d, n_outputs, basis.center, device, dtype, chunk)
    X_blocks = row_blocks(X)
    J_blocks = [None] * len(X_blocks) if jacobians is None else row_blocks(jacobians)
    starts = np.concatenate([[0], np.cumsum(row_chunks)]).astype(int)
    parts = [
        dask.delayed(_basis_block, pure=False)(
            x, j, None if sample_weight is None else sample_weight[a:b], config
        )
        for x, j, a, b in zip(X_blocks, J_blocks, starts[:-1], starts[1:])
    ]
    stats = compute(tree_reduce(parts), "InteractionBasis.fit")
    check_rows(stats.n_samples, n, "InteractionBasis.fit")
    return stats.to(device)


def _auto_chunk(n_features, n_outputs):
    return max(1, AUTO_CHUNK_NUMBERS // ((n_outputs or 1) * n_features))
