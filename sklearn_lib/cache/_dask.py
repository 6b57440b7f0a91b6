"""Lazy dask arrays of a finished :class:`~sklearn_lib.cache.ActivationCache`.

Workers receive only the cache's path, generation and node name, open the
cache themselves once per process, and read verified blocks inside the
statistics tasks (:func:`sklearn_lib.basis._dask.row_blocks`).
"""

import os
import threading

import numpy as np

from ..basis._dask import CACHE_SOURCE, import_dask

_OPEN_CACHES = {}
_OPEN_LOCK = threading.Lock()


def _open_cache(cache_class, path, generation):
    """The cache at ``path``, opened once per process, refused if it is another cache now."""
    key = (path, generation, os.getpid())
    with _OPEN_LOCK:
        cache = _OPEN_CACHES.get(key)
        if cache is None:
            cache = cache_class.open(path)
            if cache._desc["generation"] != generation:
                raise ValueError(
                    f"the activation cache at {path!r} is no longer the one this dask "
                    "array was made from (it was overwritten or replaced); an array never "
                    "mixes two caches. Open the cache again."
                )
            _OPEN_CACHES[key] = cache
    return cache


class CacheNode:
    """A picklable stand-in for one array of a finished cache, for ``dask.array.from_array``.

    Only the path, the cache's generation and the node name travel to workers;
    each process opens the cache itself (once) and every read is verified as
    :meth:`ActivationCache.activations` verifies it (blocks of whole zarr chunks
    decoded in place, :mod:`sklearn_lib.cache._chunk_read`).
    """

    def __init__(self, cache_class, path, generation, node, shape, dtype):
        # The class travels by name, so that this module need not import the cache.
        self.cache_class = cache_class
        self.path, self.generation, self.node = path, generation, node
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, key):
        return _open_cache(self.cache_class, self.path, self.generation)._readable_node(self.node)[key]


def cache_array(cache, node, shape, rows_per_sample, samples_per_block):
    """A lazy dask array of one node of ``cache``, in blocks of whole samples."""
    dask = import_dask()
    rows = shape[0]
    step = samples_per_block * rows_per_sample
    chunks = (tuple(min(step, rows - s) for s in range(0, rows, step)) or (0,),
              *shape[1:])
    source = CacheNode(type(cache), cache.path, cache._desc["generation"], node, shape, cache.dtype)
    array = dask.array.from_array(source, chunks=chunks, name=f"sklearn_lib-{node}-"
                                  f"{cache._desc['generation']}", lock=False,
                                  inline_array=True, asarray=True,
                                  meta=np.empty((0,) * len(shape), dtype=cache.dtype))
    # Our reductions read its blocks inside their tasks (row_blocks); for
    # anything else it is an ordinary dask array.
    setattr(array, CACHE_SOURCE, (array.name, array.chunks, source))
    return array
