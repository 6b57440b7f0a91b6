"""Tests for sklearn_lib.cache.ActivationCache: roundtrips, atomic writes, validation."""

import ast
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sklearn_lib.cache
import sklearn_lib.collect
from sklearn_lib.cache import ActivationCache

pytest.importorskip("zarr", minversion="3")

LAYERS = {"blocks.0.mlp": (3,), "blocks.1/attn:out": (2, 2)}
PAIR = ("blocks.0.mlp", "blocks.1/attn:out")


def make_batch(n, seed):
    rng = np.random.default_rng(seed)
    acts = {name: rng.normal(size=(n, *shape)) for name, shape in LAYERS.items()}
    return acts, {PAIR: rng.normal(size=(n, 4, 3))}


def write_cache(path, batch_sizes, **kwargs):
    cache = ActivationCache.create(path, LAYERS, jacobians=True, **kwargs)
    batches = [make_batch(n, seed) for seed, n in enumerate(batch_sizes)]
    for acts, jacs in batches:
        cache.append(acts, jacs)
    return cache, batches


def siblings(path):
    return sorted(p.name for p in Path(path).parent.iterdir() if p.name != Path(path).name)


@settings(max_examples=10, deadline=None)
@given(
    batch_sizes=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    chunk_size=st.integers(1, 8),
)
def test_roundtrip_over_batches(tmp_path_factory, batch_sizes, chunk_size):
    path = tmp_path_factory.mktemp("cache") / "acts.zarr"
    cache, batches = write_cache(
        path, batch_sizes, chunk_size=chunk_size, metadata={"model": "mlp", "seed": [1, 2]}
    )
    cache.finalize()
    opened = ActivationCache.open(path, expect_layers=list(LAYERS), expect_shapes=LAYERS)
    for reader in (cache, opened):
        assert reader.n_samples == sum(batch_sizes)
        assert reader.layers == list(LAYERS) and reader.shapes == LAYERS
        assert reader.jacobian_pairs == [PAIR] and reader.jacobian_shapes == {PAIR: (4, 3)}
        assert reader.metadata == {"model": "mlp", "seed": [1, 2]}
        assert reader.dtype == np.float64
        for name in LAYERS:
            expected = np.concatenate([acts[name] for acts, _ in batches])
            np.testing.assert_array_equal(np.asarray(reader.activations(name)), expected)
        expected = np.concatenate([jacs[PAIR] for _, jacs in batches])
        np.testing.assert_array_equal(np.asarray(reader.jacobians(*PAIR)), expected)
    assert siblings(path) == []  # no temporary directories left behind


def test_lazy_slicing_and_safe_node_names(tmp_path):
    path = tmp_path / "acts.zarr"
    cache, batches = write_cache(path, [5, 7], chunk_size=4)
    cache.finalize()
    array = ActivationCache.open(path).activations("blocks.0.mlp")
    expected = np.concatenate([acts["blocks.0.mlp"] for acts, _ in batches])
    np.testing.assert_array_equal(array[3:8], expected[3:8])
    nodes = os.listdir(path / "activations") + os.listdir(path / "jacobians")
    nodes = [node for node in nodes if node != "zarr.json"]
    assert len(nodes) == 3
    assert all("." not in node and "/" not in node and ":" not in node for node in nodes)


def test_context_manager_finalizes_or_discards(tmp_path):
    path = tmp_path / "acts.zarr"
    acts, jacs = make_batch(3, 0)
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationCache.create(path, LAYERS, jacobians=True) as cache:
            cache.append(acts, jacs)
            raise RuntimeError("boom")
    assert not path.exists() and siblings(path) == []
    with ActivationCache.create(path, LAYERS, jacobians=True) as cache:
        cache.append(acts, jacs)
    assert ActivationCache.open(path).n_samples == 3


def test_crash_mid_write_leaves_nothing_that_opens(tmp_path):
    path = tmp_path / "acts.zarr"
    cache, _ = write_cache(path, [4, 4])  # ... and the process dies before finalize()
    assert not path.exists()
    with pytest.raises(FileNotFoundError, match="Unfinished writes"):
        ActivationCache.open(path)
    # Even a half-written directory moved into place by hand is refused.
    (tmp_dir,) = siblings(path)
    shutil.copytree(tmp_path / tmp_dir, path)
    with pytest.raises(ValueError, match="incomplete"):
        ActivationCache.open(path)
    with pytest.raises(ValueError, match="still being written"):
        cache.activations("blocks.0.mlp")


def test_existing_cache_not_overwritten(tmp_path):
    path = tmp_path / "acts.zarr"
    old, old_batches = write_cache(path, [4])
    old.finalize()
    before = np.asarray(ActivationCache.open(path).activations("blocks.0.mlp"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ActivationCache.create(path, LAYERS, jacobians=True)
    new, _ = write_cache(path, [2, 3], overwrite=True)
    # The old cache stays intact and readable until the new one is complete.
    still_old = ActivationCache.open(path).activations("blocks.0.mlp")
    np.testing.assert_array_equal(np.asarray(still_old), before)
    new.discard()
    assert ActivationCache.open(path).n_samples == 4
    new, _ = write_cache(path, [2, 3], overwrite=True)
    new.finalize()
    assert ActivationCache.open(path).n_samples == 5
    assert siblings(path) == []


def test_non_cache_path_never_replaced(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError):
            ActivationCache.create(target, LAYERS, overwrite=overwrite)
    assert (target / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="not an activation cache"):
        ActivationCache.open(target)


def test_open_mismatch_lists_expected_and_found(tmp_path):
    path = tmp_path / "acts.zarr"
    write_cache(path, [2])[0].finalize()
    with pytest.raises(ValueError, match=r"expected \['a', 'b'\], found \['blocks.0.mlp'"):
        ActivationCache.open(path, expect_layers=["a", "b"])
    with pytest.raises(ValueError, match=r"expected \(4,\), found \(3,\)"):
        ActivationCache.open(path, expect_shapes={"blocks.0.mlp": (4,)})
    with pytest.raises(ValueError, match="found no such layer"):
        ActivationCache.open(path, expect_shapes={"fc9": (4,)})
    with pytest.raises(ValueError, match="dtype: expected float32, found float64"):
        ActivationCache.open(path, expect_dtype="float32")


def test_append_validation(tmp_path):
    cache = ActivationCache.create(tmp_path / "c", LAYERS, jacobians=True)
    acts, jacs = make_batch(3, 0)
    with pytest.raises(ValueError, match=r"missing \['blocks.0.mlp'\]"):
        cache.append({"blocks.1/attn:out": acts["blocks.1/attn:out"]}, jacs)
    with pytest.raises(ValueError, match="sections"):
        cache.append(acts)
    with pytest.raises(ValueError, match=r"expected an array of shape"):
        cache.append({**acts, "blocks.0.mlp": np.zeros((3, 4))}, jacs)
    with pytest.raises(ValueError, match="same samples"):
        cache.append({**acts, "blocks.0.mlp": np.zeros((2, 3))}, jacs)
    assert cache.n_samples == 0  # nothing was written by the failed appends
    cache.append({k: torch.as_tensor(v) for k, v in acts.items()}, jacs)  # tensors are fine
    cache.finalize()
    with pytest.raises(ValueError, match="read-only"):
        cache.append(acts, jacs)
    with pytest.raises(KeyError, match="layers"):
        cache.activations("nope")


def test_rows_per_sample_and_float32(tmp_path):
    path = tmp_path / "seq"
    with ActivationCache.create(
        path, {"embed": (4,), "head": (2,)}, jacobians=True, dtype="float32",
        rows_per_sample={"embed": 3},
    ) as cache:
        assert cache.jacobian_shapes == {("embed", "head"): (2, 4)}
        cache.append({"embed": np.ones((6, 4)), "head": np.ones((2, 2))},
                     {("embed", "head"): np.ones((6, 2, 4))})
        with pytest.raises(ValueError, match="multiple of rows_per_sample=3"):
            cache.append({"embed": np.ones((5, 4)), "head": np.ones((2, 2))},
                         {("embed", "head"): np.ones((5, 2, 4))})
    cache = ActivationCache.open(path)
    assert cache.n_samples == 2 and cache.rows_per_sample == {"embed": 3, "head": 1}
    assert cache.activations("embed").dtype == np.float32
    assert cache.activations("embed").shape == (6, 4)


def test_metadata_must_be_json(tmp_path):
    for bad in ({"f": lambda: 0}, {"x": float("nan")}, {"a": np.float32(1.0)}, [1, 2]):
        with pytest.raises(TypeError, match="metadata"):
            ActivationCache.create(tmp_path / "c", LAYERS, metadata=bad)
    assert siblings(tmp_path / "c") == []
    with ActivationCache.create(tmp_path / "c", LAYERS, metadata={"t": (1, 2)}) as cache:
        cache.append(make_batch(1, 0)[0])
    description = json.loads((tmp_path / "c" / "zarr.json").read_text())["attributes"]
    entry = description["sklearn_lib_cache"]
    assert entry["complete"] is True and entry["metadata"] == {"t": [1, 2]}
    assert {e["name"]: e["node"] for e in entry["layers"]}.keys() == LAYERS.keys()


def test_no_object_serialisation_in_sources():
    """The cache and collectors never serialise Python objects (no pickle, joblib, torch.save)."""
    banned = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    for module in (sklearn_lib.cache, sklearn_lib.collect):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & banned
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in banned
            elif isinstance(node, ast.Attribute):
                assert node.attr not in {"save", "load", "allow_pickle"} or not (
                    isinstance(node.value, ast.Name) and node.value.id in {"torch", "np", "numpy"}
                )
            elif isinstance(node, ast.keyword):
                assert node.arg != "allow_pickle"


# --------------------------------------------------------------------------- integrity
def chunk_files(path, node_dir):
    """The chunk files of one array, sorted by chunk index."""
    root = Path(path) / node_dir / "c"
    return sorted(p for p in root.rglob("*") if p.is_file())


def array_dir(path, kind, index=0):
    return next(p for p in sorted((Path(path) / kind).iterdir()) if p.name.startswith(f"{index:03d}_"))


@pytest.fixture
def finalized(tmp_path):
    path = tmp_path / "acts.zarr"
    cache, batches = write_cache(path, [5, 7], chunk_size=4)
    cache.finalize()
    return path, batches


@pytest.mark.parametrize("damage", ["delete", "truncate", "append"])
def test_missing_or_truncated_chunk_refused_at_open(finalized, damage):
    path, _ = finalized
    chunk = chunk_files(path, array_dir(path, "jacobians").relative_to(path))[1]
    if damage == "delete":
        chunk.unlink()
    else:
        data = chunk.read_bytes()
        chunk.write_bytes(data[: len(data) // 2] if damage == "truncate" else data + b"\0")
    with pytest.raises(ValueError) as info:
        ActivationCache.open(path)
    message = str(info.value)
    assert "Jacobians of section ('blocks.0.mlp', 'blocks.1/attn:out')" in message
    assert "chunk (1, 0, 0)" in message and str(chunk) in message
    assert ("is missing" if damage == "delete" else "bytes where the cache wrote") in message


def test_damaged_chunk_refused_when_read(finalized):
    """Damage after open (or a same-size corruption) is caught by the checksum of each read."""
    path, batches = finalized
    cache = ActivationCache.open(path)
    handle = cache.activations("blocks.0.mlp")
    expected = np.concatenate([acts["blocks.0.mlp"] for acts, _ in batches])
    np.testing.assert_array_equal(np.asarray(handle), expected)  # exact: stored bytes read back
    chunk = chunk_files(path, array_dir(path, "activations").relative_to(path))[2]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"layer 'blocks.0.mlp', chunk \(2, 0\) .*corrupted"):
        handle[8:]
    np.testing.assert_array_equal(handle[:8], expected[:8])  # exact: intact chunks still read back
    chunk.unlink()
    with pytest.raises(ValueError, match=r"chunk \(2, 0\) .* is missing"):
        handle[8:]


def test_graph_fit_on_cache_losing_a_chunk_raises(tmp_path):
    """Today's failure: the lost chunk read as zeros and the graph fitted with wrong edges."""
    from sklearn_lib.graph import InteractionGraph

    rng = np.random.default_rng(0)
    path = tmp_path / "flat.zarr"
    with ActivationCache.create(path, {"a": (3,), "b": (2,)}, jacobians=True,
                                chunk_size=8) as cache:
        cache.append({"a": rng.normal(size=(24, 3)), "b": rng.normal(size=(24, 2))},
                     {("a", "b"): rng.normal(size=(24, 2, 3))})
    cache = ActivationCache.open(path)
    chunk = chunk_files(path, array_dir(path, "jacobians").relative_to(path))[1]
    chunk.unlink()
    with pytest.raises(ValueError, match=r"\('a', 'b'\), chunk \(1, 0, 0\) .* is missing"):
        InteractionGraph().fit(cache)
    with pytest.raises(ValueError, match=r"chunk \(1, 0, 0\) .* is missing"):
        ActivationCache.open(path)


def test_chunk_not_in_inventory_refused(tmp_path):
    """zarr skips all-zero chunks; a file appearing in their place is not read as data."""
    path = tmp_path / "zeros.zarr"
    with ActivationCache.create(path, {"a": (2,)}, chunk_size=2) as cache:
        cache.append({"a": np.zeros((4, 2))})
    handle = ActivationCache.open(path).activations("a")
    np.testing.assert_array_equal(np.asarray(handle), np.zeros((4, 2)))
    other = tmp_path / "ones.zarr"
    with ActivationCache.create(other, {"a": (2,)}, chunk_size=2) as cache:
        cache.append({"a": np.ones((4, 2))})
    shutil.copytree(other / "activations" / "000_a" / "c", path / "activations" / "000_a" / "c")
    with pytest.raises(ValueError, match=r"chunk \([01], 0\) .* not in the inventory"):
        np.asarray(handle)


@pytest.mark.parametrize("change", ["overwrite", "move", "delete"])
def test_handles_refuse_once_the_cache_is_replaced(finalized, change):
    path, batches = finalized
    cache = ActivationCache.open(path)
    handles = [cache.activations("blocks.0.mlp"), cache.jacobians(*PAIR)]
    if change == "overwrite":
        write_cache(path, [3], overwrite=True)[0].finalize()
        reason = "was replaced"
    elif change == "move":
        path.rename(path.with_name("elsewhere"))
        reason = "was moved or deleted"
    else:
        shutil.rmtree(path)
        reason = "was moved or deleted"
    for handle in handles:
        with pytest.raises(ValueError, match=f"{reason} after this array was opened"):
            np.asarray(handle)
    with pytest.raises(ValueError, match=reason):
        cache.activations("blocks.1/attn:out")[:1]


def test_version_1_cache_refused(finalized):
    path, _ = finalized
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["sklearn_lib_cache"]["format_version"] = 1
    del meta["attributes"]["sklearn_lib_cache"]["inventory"]
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 1.*cannot prove"):
        ActivationCache.open(path)


def _edit_description(path, edit):
    meta = json.loads((path / "zarr.json").read_text())
    edit(meta["attributes"]["sklearn_lib_cache"])
    (path / "zarr.json").write_text(json.dumps(meta))


def _to_version_2(description):
    description["format_version"] = 2
    del description["checksum"]


def test_version_2_cache_opens_with_its_arrays_counted(finalized):
    """Caches finished before the root checksum still open; n_samples is checked by the arrays."""
    path, batches = finalized
    _edit_description(path, _to_version_2)
    cache = ActivationCache.open(path)
    assert cache.n_samples == 12
    np.testing.assert_array_equal(np.asarray(cache.jacobians(*PAIR)),
                                  np.concatenate([j[PAIR] for _, j in batches]))
    _edit_description(path, lambda d: d.update(n_samples=11))
    with pytest.raises(ValueError, match=r"Jacobians of section .* expected shape \(11, 4, 3\) "
                                         r".*found \(12, 4, 3\)"):
        ActivationCache.open(path)


def test_root_checksum_covers_the_description_not_the_json_layout(finalized):
    """Reformatting zarr.json (indentation, key order) is not an edit; a changed value is."""
    path, _ = finalized
    meta = json.loads((path / "zarr.json").read_text())
    (path / "zarr.json").write_text(json.dumps(meta, indent=4, sort_keys=True))
    assert ActivationCache.open(path).n_samples == 12
    _edit_description(path, lambda d: d["metadata"].update(note="edited"))
    with pytest.raises(ValueError, match="zarr.json.* does not match the checksum"):
        ActivationCache.open(path)


def test_overwrite_ignores_empty_folders_and_refuses_foreign_files(finalized):
    path, _ = finalized
    (path / "scratch").mkdir()  # nothing to lose in an empty folder
    write_cache(path, [2], overwrite=True)[0].finalize()
    assert ActivationCache.open(path).n_samples == 2
    (path / "jacobians" / "keep.npy").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"\['jacobians/keep.npy'\]"):
        write_cache(path, [1], overwrite=True)
    assert (path / "jacobians" / "keep.npy").read_bytes() == b"mine"
    assert siblings(path) == []  # the refusal came before anything was written


def test_overwrite_of_a_cache_without_inventory_checks_its_layout(finalized):
    """A cache of an old format lists no files; its zarr layout says which are its own."""
    from sklearn_lib.cache._format import _foreign_files

    path, _ = finalized

    def to_version_1(description):
        _to_version_2(description)
        description["format_version"] = 1
        del description["inventory"]

    _edit_description(path, to_version_1)
    assert _foreign_files(str(path)) == []
    (path / "activations" / "000_other").mkdir()
    (path / "activations" / "000_other" / "zarr.json").write_text("{}")
    (path / "notes.txt").write_text("mine")
    assert _foreign_files(str(path)) == ["activations/000_other/zarr.json", "notes.txt"]


def test_failed_append_then_appends_and_reads_like_a_clean_cache(tmp_path, monkeypatch):
    """After a failure the next batches land where the failed one would have."""
    import errno

    import zarr.storage._local as local

    path = tmp_path / "acts.zarr"
    cache = ActivationCache.create(path, LAYERS, jacobians=True, chunk_size=3)
    batches = [make_batch(2, 0)]
    cache.append(*batches[0])
    real_put, calls = local._put, []

    def put(file, value, exclusive=False):
        calls.append(file)
        if len(calls) == 4:  # the second array's first chunk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(file, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", put)
    with pytest.raises(OSError, match="No space left"):
        cache.append(*make_batch(5, 1))
    monkeypatch.undo()
    assert cache.n_samples == 2
    for seed, n in ((2, 4), (3, 1)):
        batches.append(make_batch(n, seed))
        cache.append(*batches[-1])
    cache.finalize()
    opened = ActivationCache.open(path)
    assert opened.n_samples == 7
    for name in LAYERS:
        np.testing.assert_array_equal(np.asarray(opened.activations(name)),
                                      np.concatenate([acts[name] for acts, _ in batches]))
    np.testing.assert_array_equal(np.asarray(opened.jacobians(*PAIR)),
                                  np.concatenate([jacs[PAIR] for _, jacs in batches]))


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    "layer, row, value, error, match",
    [
        ("blocks.0.mlp", 2, 1j, TypeError, r"layer 'blocks.0.mlp': .*complex128.*real part"),
        ("blocks.0.mlp", 2, np.nan, ValueError, r"layer 'blocks.0.mlp': row 2 .* NaN"),
        ("blocks.1/attn:out", 1, -np.inf, ValueError, r"'blocks.1/attn:out': row 1 .*infinite"),
        (PAIR, 3, np.nan, ValueError,
         r"Jacobians of section \('blocks.0.mlp', 'blocks.1/attn:out'\): row 3 .*NaN"),
        (PAIR, 0, 1e300, ValueError, r"row 0 .*beyond the float32 range \(1e\+300"),
        ("blocks.0.mlp", 1, 1e300, ValueError, r"row 1 .*beyond the float32 range"),
    ],
)
def test_append_refuses_values_it_cannot_store(tmp_path, layer, row, value, error, match):
    cache = ActivationCache.create(tmp_path / "c", LAYERS, jacobians=True, dtype="float32")
    acts, jacs = make_batch(4, 0)
    arrays = jacs if isinstance(layer, tuple) else acts
    bad = arrays[layer].astype(np.result_type(arrays[layer], value))
    bad.reshape(4, -1)[row, -1] = value
    arrays[layer] = bad
    with pytest.raises(error, match=match):
        cache.append(acts, jacs)
    assert cache.n_samples == 0  # nothing of the batch was written
    cache.append(*make_batch(4, 0))
    cache.finalize()
    assert np.isfinite(np.asarray(cache.jacobians(*PAIR))).all()


def test_append_names_sample_of_sequence_rows(tmp_path):
    cache = ActivationCache.create(tmp_path / "seq", {"embed": (2,), "head": (1,)},
                                   rows_per_sample={"embed": 3})
    embed = np.zeros((6, 2))
    embed[4, 0] = np.nan
    with pytest.raises(ValueError, match=r"row 4 of this batch \(sample 1\)"):
        cache.append({"embed": embed, "head": np.zeros((2, 1))})
    with pytest.raises(TypeError, match="expected real numbers.*<U1"):
        cache.append({"embed": np.full((6, 2), "x"), "head": np.zeros((2, 1))})


def test_float32_cache_keeps_values_in_range(tmp_path):
    """Values that fit the storage dtype are stored, the largest float32 included."""
    with ActivationCache.create(tmp_path / "c", {"a": (2,)}, dtype="float32") as cache:
        cache.append({"a": np.array([[np.finfo(np.float32).max, -1e-30], [1e30, 0.0]])})
    stored = np.asarray(ActivationCache.open(tmp_path / "c").activations("a"))
    np.testing.assert_allclose(stored, [[np.finfo(np.float32).max, -1e-30], [1e30, 0.0]],
                               rtol=1e-7)


# --------------------------------------------------------------------------- interruptions
class Killed(BaseException):
    """Stands for the process dying: nothing after it runs, not even rollbacks."""


def kill_after_renames(monkeypatch, n_allowed):
    """Let ``n_allowed`` renames of sklearn_lib.utils._atomic happen, then 'kill' the process."""
    import sklearn_lib.utils._atomic

    calls = []
    real_rename = os.rename

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) > n_allowed:
            raise Killed
        real_rename(src, dst)

    monkeypatch.setattr(sklearn_lib.utils._atomic.os, "rename", rename)


def dead_pid():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_kill_between_the_two_renames_recovers_old_cache(finalized, monkeypatch):
    path, batches = finalized
    new, _ = write_cache(path, [3], overwrite=True)
    kill_after_renames(monkeypatch, 1)
    with pytest.raises(Killed):
        new.finalize()
    monkeypatch.undo()
    assert not path.exists()  # the state a kill leaves
    with pytest.warns(UserWarning, match="restored the activation cache"):
        cache = ActivationCache.open(path)
    expected = np.concatenate([acts["blocks.0.mlp"] for acts, _ in batches])
    np.testing.assert_array_equal(np.asarray(cache.activations("blocks.0.mlp")), expected)
    # Only the killed writer's temporary directory is left; its process (this one) still runs.
    assert [name.split(".zarr.")[1][:4] for name in siblings(path)] == ["tmp-"]


def test_kill_after_the_second_rename_keeps_new_cache_and_tidies(finalized, monkeypatch):
    import sklearn_lib.utils._atomic

    path, _ = finalized
    new, _ = write_cache(path, [3], overwrite=True)

    def killed(path):
        raise Killed

    monkeypatch.setattr(sklearn_lib.utils._atomic, "_remove_tree", killed)
    with pytest.raises(Killed):
        new.finalize()
    monkeypatch.undo()
    assert [name.split(".zarr.")[1][:4] for name in siblings(path)] == ["old-"]
    assert ActivationCache.open(path).n_samples == 3
    assert siblings(path) == []  # the superseded copy was removed


@pytest.mark.skipif(os.name != "posix", reason="symbolic links and process probes are POSIX")
def test_unfinished_writes_of_ended_processes_are_removed(tmp_path):
    path = tmp_path / "acts.zarr"
    crashed, _ = write_cache(path, [2])
    alive, _ = write_cache(path, [2])
    writer = Path(crashed._tmp_path) / ".sklearn_lib_writer.json"
    record = json.loads(writer.read_text())
    writer.write_text(json.dumps({**record, "pid": dead_pid()}))
    foreign = tmp_path / ("acts.zarr.tmp-" + "0" * 32)
    foreign.mkdir()  # our name pattern, but no proof inside: left alone and named
    with pytest.raises(FileNotFoundError) as info:
        ActivationCache.open(path)
    assert not Path(crashed._tmp_path).exists()
    assert Path(alive._tmp_path).exists() and foreign.exists()
    assert Path(alive._tmp_path).name in str(info.value) and foreign.name in str(info.value)
    alive.finalize()
    assert ActivationCache.open(path).n_samples == 2


@pytest.mark.skipif(os.name != "posix", reason="symbolic links and process probes are POSIX")
@pytest.mark.parametrize("overwrite", [False, True])
def test_symlink_target_refused_before_writing(finalized, overwrite):
    path, _ = finalized
    link = path.with_name("link.zarr")
    link.symlink_to(path, target_is_directory=True)
    before = sorted(p.name for p in path.parent.iterdir())
    with pytest.raises(FileExistsError, match="symbolic link"):
        ActivationCache.create(link, LAYERS, jacobians=True, overwrite=overwrite)
    assert sorted(p.name for p in path.parent.iterdir()) == before
    assert link.is_symlink() and ActivationCache.open(link).n_samples == 12


def test_create_on_a_file_or_under_a_file_refused(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="not an activation cache"):
        ActivationCache.create(target, LAYERS, overwrite=True)
    with pytest.raises(NotADirectoryError, match="parent .* is not a directory"):
        ActivationCache.create(target / "cache.zarr", LAYERS)
    assert target.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["notes.txt"]
