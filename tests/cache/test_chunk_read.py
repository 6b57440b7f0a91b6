"""Tests for sklearn_lib.cache._chunk_read: whole cache chunks decoded in place equal zarr's reads.

The direct read copies stored bytes; nothing is computed, so its result is
compared with zarr's exactly (bit for bit), on every machine.
"""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_lib.cache import ActivationCache, _chunk_read
from sklearn_lib.cache._chunk_read import _frame_content_size, read_rows
from sklearn_lib.cache._store import VerifiedStore

zarr = pytest.importorskip("zarr", minversion="3")
numcodecs = pytest.importorskip("numcodecs")


def write(path, n_rows, *, chunk_size, dtype="float64", rows_per_sample=1, zero_rows=()):
    """A cache of layers 'a' (3,), 'b' (2,) and their Jacobians; rows ``zero_rows`` are 0."""
    rng = np.random.default_rng(n_rows)
    a = rng.normal(size=(n_rows * rows_per_sample, 3))
    b = rng.normal(size=(n_rows * rows_per_sample, 2))
    J = rng.normal(size=(n_rows * rows_per_sample, 2 * rows_per_sample, 3))
    for array in (a, b, J):
        array[list(zero_rows)] = 0.0
    with ActivationCache.create(path, {"a": (3,), "b": (2,)}, jacobians=True,
                                chunk_size=chunk_size, dtype=dtype,
                                rows_per_sample={"a": rows_per_sample, "b": rows_per_sample}
                                ) as cache:
        cache.append({"a": a, "b": b}, {("a", "b"): J})
    return ActivationCache.open(path)


def arrays(cache):
    """The zarr arrays of the cache (activations of 'a' and the Jacobians) and its store."""
    group = cache._group
    nodes = [cache._desc["layers"][0]["node"], cache._desc["jacobians"][0]["node"]]
    return [group[node] for node in nodes], group.store


def rows_key(array, start, stop):
    return (slice(start, stop), *(slice(0, n) for n in array.shape[1:]))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_rows", [12, 14])  # the last chunk of 4 rows full, or holding 2
def test_whole_chunks_equal_zarr_bit_for_bit(tmp_path, dtype, n_rows):
    cache = write(tmp_path / "c.zarr", n_rows, chunk_size=4, dtype=dtype)
    for array, (start, stop) in [(a, r) for a in arrays(cache)[0] for r in
                                 [(0, 4), (4, 12), (8, n_rows), (0, n_rows)]]:
        key = rows_key(array, start, stop)
        got = read_rows(array, arrays(cache)[1], key)
        assert got is not None, "whole chunks must take the direct path"
        want = array[key]
        assert got.dtype == want.dtype and got.shape == want.shape
        # Exact: both are the stored bytes; the comparison includes the bits of -0.0.
        assert got.tobytes() == want.tobytes()


@settings(max_examples=12, deadline=None)
@given(n_rows=st.integers(1, 17), chunk_size=st.integers(1, 6), rows_per_sample=st.integers(1, 2),
       dtype=st.sampled_from(["float64", "float32"]), data=st.data())
def test_any_whole_chunk_range_equals_zarr(tmp_path_factory, n_rows, chunk_size,
                                           rows_per_sample, dtype, data):
    path = tmp_path_factory.mktemp("h") / "c.zarr"
    cache = write(path, n_rows, chunk_size=chunk_size, dtype=dtype,
                  rows_per_sample=rows_per_sample)
    (acts, jacs), store = arrays(cache)
    for array in (acts, jacs):
        c, n = array.chunks[0], array.shape[0]
        bounds = sorted({*range(0, n, c), n})
        i = data.draw(st.integers(0, len(bounds) - 2))
        j = data.draw(st.integers(i + 1, len(bounds) - 1))
        key = rows_key(array, bounds[i], bounds[j])
        got = read_rows(array, store, key)
        assert got is not None
        assert got.tobytes() == array[key].tobytes()  # exact: stored bytes


@pytest.mark.parametrize("key", [slice(0, 8), slice(8, None), (slice(4, 12), ...), ...])
def test_short_selections_of_whole_chunks_equal_zarr(tmp_path, key):
    cache = write(tmp_path / "c.zarr", 14, chunk_size=4)
    (_, jacs), store = arrays(cache)
    got = read_rows(jacs, store, key)
    assert got is not None
    assert got.tobytes() == jacs[key].tobytes()  # exact: stored bytes


@pytest.fixture
def direct(monkeypatch):
    """Whether each chunk read took the direct path (True) or fell back to zarr (False)."""
    taken = []

    def counted(array, store, key):
        rows = read_rows(array, store, key)
        taken.append(rows is not None)
        return rows

    monkeypatch.setattr(_chunk_read, "read_rows", counted)
    return taken


def test_cache_arrays_read_whole_chunks_in_place(tmp_path, direct):
    """What activations()/jacobians() return is zarr's array; whole chunks take the direct path."""
    cache = write(tmp_path / "c.zarr", 14, chunk_size=4)
    handle = cache.jacobians("a", "b")
    assert isinstance(handle, zarr.Array)
    plain = cache._group[cache._desc["jacobians"][0]["node"]]  # zarr's own reads
    assert np.asarray(handle).tobytes() == np.asarray(plain).tobytes()  # exact: stored bytes
    assert handle[4:8].tobytes() == plain[4:8].tobytes()
    assert handle[2:6].tobytes() == plain[2:6].tobytes()  # cuts chunks: zarr reads it
    assert direct == [True, True, False]


def test_unwritten_chunk_reads_as_zeros(tmp_path):
    """zarr writes no file for a chunk of fill values; both paths read zeros."""
    cache = write(tmp_path / "c.zarr", 12, chunk_size=4, zero_rows=range(4, 8))
    (_, jacs), store = arrays(cache)
    assert not Path(cache.path, jacs.path, "c", "1").exists()
    key = rows_key(jacs, 0, 12)
    got = read_rows(jacs, store, key)
    assert got is not None and got.tobytes() == jacs[key].tobytes()  # exact: stored bytes
    assert not got[4:8].any() and got[:4].all()


@pytest.mark.parametrize("key", [
    lambda n: (slice(2, 8), slice(0, 2), slice(0, 3)),      # cuts a chunk
    lambda n: (slice(0, 6), slice(0, 2), slice(0, 3)),      # ends inside a chunk
    lambda n: (slice(0, 8, 2), slice(0, 2), slice(0, 3)),   # a step
    lambda n: (slice(0, 8), slice(0, 1), slice(0, 3)),      # part of a row
    lambda n: (slice(0, 8), slice(0, 2), slice(0, 3), 0),   # too many axes
    lambda n: (..., slice(0, 2), ...),                      # two ellipses
    lambda n: [0, 1, 2, 3],                                 # a list
    lambda n: (0, slice(0, 2), slice(0, 3)),                # an integer
    lambda n: (slice(4, 4), slice(0, 2), slice(0, 3)),      # no rows
])
def test_other_selections_are_left_to_zarr(tmp_path, key):
    cache = write(tmp_path / "c.zarr", 14, chunk_size=4)
    (_, jacs), store = arrays(cache)
    assert read_rows(jacs, store, key(jacs.shape[0])) is None


@pytest.mark.parametrize("options", [
    {"compressors": None},
    {"compressors": zarr.codecs.BloscCodec()},
    {"serializer": zarr.codecs.BytesCodec(endian="big")},
    {"shards": (8, 2, 3)},
    {"filters": [zarr.codecs.TransposeCodec(order=(0, 2, 1))]},
])
def test_other_layouts_are_left_to_zarr(tmp_path, options):
    """Only the layout ActivationCache writes is decoded here; anything else reads through zarr."""
    array = zarr.create_array(tmp_path / "z.zarr", shape=(16, 2, 3), chunks=(4, 2, 3),
                              dtype="float64", **options)
    assert read_rows(array, None, rows_key(array, 0, 8)) is None


def test_a_frame_of_another_size_is_not_decoded(tmp_path, monkeypatch):
    """numcodecs decodes a short frame into a larger buffer silently: such frames go to zarr."""
    cache = write(tmp_path / "c.zarr", 12, chunk_size=4)
    (_, jacs), store = arrays(cache)
    short = np.frombuffer(numcodecs.Zstd().encode(np.ones(4 * 6 - 1)), dtype=np.uint8)
    monkeypatch.setattr(VerifiedStore, "verified_bytes", lambda self, key: short)
    assert read_rows(jacs, store, rows_key(jacs, 0, 4)) is None


@pytest.mark.parametrize("size", [1, 255, 256, 257, 65791, 65792, 1 << 20])
def test_frame_content_size_reads_the_header(size):
    frame = numcodecs.Zstd().encode(np.arange(size, dtype=np.uint8) % 7)
    assert _frame_content_size(np.frombuffer(frame, dtype=np.uint8)) == size


def test_frame_without_declared_size_or_not_zstd():
    zstandard = pytest.importorskip("zstandard")
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(100))
    assert _frame_content_size(np.frombuffer(frame, dtype=np.uint8)) is None
    assert _frame_content_size(np.frombuffer(b"\0" * 16, dtype=np.uint8)) is None
    assert _frame_content_size(np.frombuffer(b"", dtype=np.uint8)) is None


# --------------------------------------------------------------------------- damage
@pytest.fixture
def jacobian_block(tmp_path):
    """The Jacobians of a cache as a dask array, and the file of its chunk 1."""
    pytest.importorskip("dask")
    cache = write(tmp_path / "c.zarr", 12, chunk_size=4)
    J = cache.jacobians("a", "b", dask=True)
    assert J.chunks[0] == (4, 4, 4)
    return J, Path(cache.path, cache._desc["jacobians"][0]["node"], "c", "1", "0", "0")


def test_damaged_chunk_raises_our_error(jacobian_block):
    J, chunk = jacobian_block
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"section \('a', 'b'\), chunk \(1, 0, 0\) \(.*"
                       + str(chunk) + r"\) does not match the checksum .*corrupted"):
        J.blocks[1].compute(scheduler="synchronous")
    J.blocks[0].compute(scheduler="synchronous")  # intact chunks still read


@pytest.mark.parametrize("damage, match", [
    ("delete", "is missing"),
    ("truncate", "has 5 bytes where the cache wrote"),
])
def test_missing_or_truncated_chunk_raises_our_error(jacobian_block, damage, match):
    J, chunk = jacobian_block
    if damage == "delete":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:5])
    with pytest.raises(ValueError, match=r"chunk \(1, 0, 0\) \(.*\) " + match):
        J.compute(scheduler="synchronous")


def test_chunk_not_in_inventory_raises(tmp_path):
    """A file where the cache wrote none (a chunk of zeros) is refused, not decoded."""
    cache = write(tmp_path / "c.zarr", 12, chunk_size=4, zero_rows=range(4, 8))
    other = write(tmp_path / "o.zarr", 12, chunk_size=4)
    node = cache._desc["jacobians"][0]["node"]
    chunk = Path(other.path, node, "c", "1", "0", "0")
    Path(cache.path, node, "c", "1", "0").mkdir(parents=True)
    Path(cache.path, node, "c", "1", "0", "0").write_bytes(chunk.read_bytes())
    (_, jacs), store = arrays(cache)
    with pytest.raises(ValueError, match=r"chunk \(1, 0, 0\) .* not in the inventory"):
        read_rows(jacs, store, rows_key(jacs, 0, 12))


def test_dask_fit_through_the_direct_read_equals_in_memory(tmp_path, direct):
    pytest.importorskip("dask")
    import dask

    from sklearn_lib import InteractionBasis

    cache = write(tmp_path / "c.zarr", 30, chunk_size=8)  # a partial last chunk of 6 rows
    X, J = cache.activations("a", dask=True), cache.jacobians("a", "b", dask=True)
    with dask.config.set(scheduler="synchronous"):
        got = InteractionBasis().fit(X, jacobians=J)
    assert direct and all(direct)
    want = InteractionBasis().fit(np.asarray(cache.activations("a")),
                                  jacobians=np.asarray(cache.jacobians("a", "b")))
    for name in ("gram_", "jacobian_gram_", "mean_"):
        g, w = getattr(got, name), getattr(want, name)
        assert np.abs(g - w).max() <= 1e-10 * np.abs(w).max()
    assert got.n_samples_seen_ == 30
