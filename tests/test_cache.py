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
