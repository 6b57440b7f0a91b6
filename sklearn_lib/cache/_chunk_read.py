"""Whole chunks of a cache array, decoded straight into the array the reader gets.

zarr reads a chunk through three buffers of its size: the compressed bytes, the
decoded chunk and the copy of it into the result. A Dask worker reading 32 MiB
Jacobian chunks thus held about three chunks before it computed anything.
:func:`read_rows` reads rows that are whole chunks of an array laid out as an
:class:`~sklearn_lib.cache.ActivationCache` writes it (zarr v3, regular chunks
of whole rows, no sharding, the ``bytes`` codec in this machine's byte order
followed by ``zstd``) with two: each chunk file's bytes, verified by
:meth:`~sklearn_lib.cache._store.VerifiedStore.verified_bytes` exactly as zarr's
reads are, and the result, into which zstd decompresses every chunk in place.

Anything else (another layout or codec, rows that cut a chunk, a zstd frame
that does not say it holds exactly one chunk) returns None and the caller reads
through zarr: this path exists for memory, never to read differently.
:class:`CacheArray`, the array type a finished cache hands out, reads so.
"""

import struct
import sys

import numpy as np
import zarr
from numcodecs import Zstd

__all__ = ["CacheArray", "read_rows"]

_ZSTD_MAGIC = 0xFD2FB528


def _chunk_rows(array):
    """Rows per chunk if ``array`` is laid out as this module can read it, else None."""
    meta = array.metadata.to_dict()
    codecs = [dict(c) for c in meta.get("codecs", ())]
    chunk_shape = tuple(meta["chunk_grid"].get("configuration", {}).get("chunk_shape", ()))
    dtype = array.dtype
    if (
        meta.get("zarr_format") != 3
        or array.shards is not None
        or tuple(meta.get("storage_transformers", ())) != ()
        or meta["chunk_grid"].get("name") != "regular"
        or meta.get("chunk_key_encoding")
        != {"name": "default", "configuration": {"separator": "/"}}
        or len(codecs) != 2
        or codecs[0] != {"name": "bytes", "configuration": {"endian": sys.byteorder}}
        or codecs[1].get("name") != "zstd"
        or not isinstance(dtype, np.dtype)
        or dtype.kind not in "biuf"
        or not dtype.isnative
        or len(chunk_shape) != array.ndim
        or chunk_shape[1:] != tuple(array.shape[1:])
        or 0 in chunk_shape
    ):
        return None
    return chunk_shape[0]


def _frame_content_size(data):
    """The decompressed size a zstd frame's header declares (RFC 8878, 3.1.1.1), or None."""
    if data.size < 6 or struct.unpack_from("<I", data)[0] != _ZSTD_MAGIC:
        return None
    descriptor = int(data[4])
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    start = 5 + (not single_segment) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if width == 0 or data.size < start + width:
        return None  # the size is not declared
    size = int.from_bytes(data[start : start + width].tobytes(), "little")
    return size + 256 if width == 2 else size


def _slices(key, ndim):
    """``key`` as one slice per axis, or None if it is not made of slices (and one ``...``)."""
    key = key if isinstance(key, tuple) else (key,)
    if key.count(Ellipsis) == 1:
        at = key.index(Ellipsis)
        key = key[:at] + (slice(None),) * (ndim - len(key) + 1) + key[at + 1 :]
    key += (slice(None),) * (ndim - len(key))
    if len(key) != ndim or not all(isinstance(k, slice) for k in key):
        return None
    return key


def _whole_chunks(key, shape, chunk_rows):
    """``(first chunk, number of chunks, rows)`` if ``key`` selects whole chunks, else None.

    The array's last chunk may be partial (zarr stores it at full size).
    """
    key = _slices(key, len(shape))
    if key is None:
        return None
    if any(k.indices(n) != (0, n, 1) for k, n in zip(key[1:], shape[1:])):
        return None
    start, stop, step = key[0].indices(shape[0])
    if step != 1 or stop <= start or start % chunk_rows:
        return None
    if stop % chunk_rows and stop != shape[0]:
        return None
    return start // chunk_rows, -(-(stop - start) // chunk_rows), stop - start


def read_rows(array, store, key):
    """``array[key]`` with whole chunks decoded in place, or None to read through zarr.

    Parameters
    ----------
    array : zarr.Array
        An array of the cache, opened on ``store``.
    store : VerifiedStore
        The cache's store: it verifies the bytes and raises on a damaged,
        missing or foreign chunk file with the cache's own message.
    key : slice, tuple of slices or Ellipsis
        The selection; any other (integers, lists, masks) returns None.
    """
    chunk_rows = _chunk_rows(array)
    if chunk_rows is None:
        return None
    plan = _whole_chunks(key, array.shape, chunk_rows)
    if plan is None:
        return None
    first, n_chunks, rows = plan
    zstd = Zstd()  # decoding reads level and checksum from each frame
    # Room for whole chunks: a partial last chunk decodes at full size and
    # only its rows are returned (a view, no copy).
    out = np.empty((n_chunks * chunk_rows, *array.shape[1:]), dtype=array.dtype)
    zeros = "/0" * (array.ndim - 1)
    for i in range(n_chunks):
        part = out[i * chunk_rows : (i + 1) * chunk_rows]
        data = store.verified_bytes(f"{array.path}/c/{first + i}{zeros}")
        if data is None:  # never written (zarr skips chunks of fill values)
            part[...] = array.metadata.fill_value
        elif _frame_content_size(data) == part.nbytes:
            # numcodecs decodes into a larger buffer without a word and leaves
            # the rest as it was, hence the check of the declared size above.
            zstd.decode(data, out=part.reshape(-1).view(np.uint8))
        else:
            return None
        del data
    return out[:rows]


class CacheArray(zarr.Array):
    """A zarr array of a finished cache whose reads of whole chunks go through :func:`read_rows`.

    It is the zarr array (metadata, store, every other selection); only
    selections of whole chunks are decoded in place, with the same checks.
    """

    def __getitem__(self, selection):
        rows = read_rows(self, self.store, selection)
        return super().__getitem__(selection) if rows is None else rows
