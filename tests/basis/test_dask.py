"""Fits from dask arrays (sklearn_lib.basis._dask, sklearn_lib.sources._dask_source) equal in-memory fits.

Most tests use Dask's synchronous scheduler (the same graph, no threads); one
module-scoped ``distributed.LocalCluster`` of 2 worker processes checks the
same reduction across processes, from a zarr cache, and with a worker killed
in the middle of it.
"""

import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sklearn_lib import InteractionBasis
from sklearn_lib.cache import ActivationCache
from sklearn_lib.collect import collect
from sklearn_lib.graph import InteractionGraph

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

RTOL = 1e-10


@pytest.fixture(autouse=True)
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def assert_rel(got, want, rtol=RTOL):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= rtol * np.abs(want).max()


def assert_same_basis(got, want):
    for name in ("gram_", "jacobian_gram_", "mean_", "interaction_strengths_"):
        assert_rel(getattr(got, name), getattr(want, name))
    # Columns are defined up to sign; C C^T is not.
    assert_rel(got.components_.T @ got.components_, want.components_.T @ want.components_)
    assert got.n_samples_seen_ == want.n_samples_seen_


def assert_same_graph(got, want):
    assert got.n_samples_seen_ == want.n_samples_seen_
    for b, b_ref in zip(got.bases_, want.bases_):
        assert_same_basis(b, b_ref)
    for E, E_ref in zip(got.edges_, want.edges_):
        assert_rel(E, E_ref)


# --------------------------------------------------------------------------- basis
@pytest.fixture
def layer(rng):
    X = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 3.0
    J = rng.normal(size=(300, 3, 5))
    w = rng.uniform(0.5, 2.0, size=300)
    return X, J, w


@pytest.mark.parametrize("with_jacobians", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_basis_from_dask_equals_in_memory(layer, with_jacobians, weighted):
    X, J, w = layer
    J = J if with_jacobians else None
    w = w if weighted else None
    want = InteractionBasis().fit(X, jacobians=J, sample_weight=w)
    got = InteractionBasis().fit(
        da.from_array(X, chunks=(41, 5)),
        jacobians=None if J is None else da.from_array(J, chunks=(41, 3, 5)),
        sample_weight=None if w is None else da.from_array(w, chunks=50),
    )
    assert_same_basis(got, want)
    assert got.n_features_in_ == 5


@settings(max_examples=6, deadline=None)
@given(st.lists(st.integers(1, 120), min_size=1, max_size=8))
def test_basis_does_not_depend_on_the_row_blocks(sizes):
    """Any cut into blocks (in any tree of merges) gives the same basis."""
    rng = np.random.default_rng(1)
    n = sum(sizes) + 2
    X = rng.normal(size=(n, 4)) * 1e3
    J = rng.normal(size=(n, 2, 4))
    chunks = (tuple(sizes) + (2,), 4)
    with dask.config.set(scheduler="synchronous"):
        got = InteractionBasis().fit(da.from_array(X, chunks=chunks),
                                     jacobians=da.from_array(J, chunks=(chunks[0], 2, 4)))
    assert_same_basis(got, InteractionBasis().fit(X, jacobians=J))


def test_basis_rechunks_misaligned_jacobians(layer):
    X, J, _ = layer
    with pytest.warns(UserWarning, match="do not line up"):
        got = InteractionBasis().fit(da.from_array(X, chunks=(41, 5)),
                                     jacobians=da.from_array(J, chunks=(50, 3, 5)))
    assert_same_basis(got, InteractionBasis().fit(X, jacobians=J))


def test_basis_mixes_dask_and_numpy(layer):
    X, J, _ = layer
    got = InteractionBasis().fit(X, jacobians=da.from_array(J, chunks=(60, 3, 5)))
    assert_same_basis(got, InteractionBasis().fit(X, jacobians=J))


def test_unknown_chunk_sizes_are_refused(layer):
    X, J, _ = layer
    Xd = da.from_array(X, chunks=(41, 5))
    unknown = Xd[Xd[:, 0] > -np.inf]
    with pytest.raises(ValueError, match="unknown chunk sizes.*compute_chunk_sizes"):
        InteractionBasis().fit(unknown)
    with pytest.raises(ValueError, match="jacobians is a dask array with unknown chunk"):
        Jd = da.from_array(J, chunks=(41, 3, 5))
        InteractionBasis().fit(X, jacobians=Jd[Xd[:, 0] > -np.inf])


@pytest.mark.parametrize("shape, match", [((300,), "2-D"), ((1, 5), "at least 2 samples")])
def test_basis_refuses_bad_dask_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        InteractionBasis().fit(da.zeros(shape))


def test_nan_in_a_block_is_refused(layer):
    X, J, _ = layer
    X = X.copy()
    X[200, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        InteractionBasis().fit(da.from_array(X, chunks=(41, 5)))


def test_a_lost_block_is_refused(layer, monkeypatch):
    """The root's row count is checked: a reduction that drops a block raises."""
    import sklearn_lib.basis._dask as glue

    reduce = glue.tree_reduce
    monkeypatch.setattr(glue, "tree_reduce", lambda parts: reduce(parts[:-1]))
    with pytest.raises(RuntimeError, match="combined 287 rows, but the input holds 300"):
        InteractionBasis().fit(da.from_array(layer[0], chunks=(41, 5)))


def test_a_worker_lost_too_often_is_a_clear_error(layer, monkeypatch):
    distributed = pytest.importorskip("distributed")
    import sklearn_lib.basis._dask as glue

    def killed(parts):
        return dask.delayed(lambda: (_ for _ in ()).throw(
            distributed.scheduler.KilledWorker("block-3", SimpleNamespace(address="tcp://127.0.0.1:1"), 3)))()

    monkeypatch.setattr(glue, "tree_reduce", killed)
    with pytest.raises(RuntimeError, match="workers died.*nothing was fitted"):
        InteractionBasis().fit(da.from_array(layer[0], chunks=(41, 5)))


# --------------------------------------------------------------------------- graph
@pytest.fixture(scope="module")
def flat():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(200, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return collect(net, [":input", "1", "2"], X, verbose=False)


def _dask_lists(acts, jacs, rows):
    return ([da.from_array(a, chunks=(rows, -1)) for a in acts],
            [da.from_array(J, chunks=(rows, -1, -1)) for J in jacs])


@pytest.mark.parametrize("params", [
    {}, {"variant": "global"}, {"constant_node": True}, {"basis": "pca"},
    {"final_layer": "pca", "n_components": 2},
])
def test_graph_from_dask_equals_in_memory(flat, params):
    acts, jacs = flat
    want = InteractionGraph(**params).fit(acts, jacobians=jacs)
    X, J = _dask_lists(acts, jacs, 37)
    got = InteractionGraph(**params).fit(X, jacobians=J)
    assert_same_graph(got, want)


def test_graph_rechunks_misaligned_layers(flat):
    acts, jacs = flat
    X, J = _dask_lists(acts, jacs, 37)
    X[1] = X[1].rechunk((64, -1))
    with pytest.warns(UserWarning, match=r"X\[1\] do not line up"):
        got = InteractionGraph().fit(X, jacobians=J)
    assert_same_graph(got, InteractionGraph().fit(acts, jacobians=jacs))


def test_graph_refuses_unknown_chunks(flat):
    acts, jacs = flat
    X, J = _dask_lists(acts, jacs, 37)
    X[2] = X[2][X[2][:, 0] > -np.inf]
    with pytest.raises(ValueError, match=r"X\[2\] is a dask array with unknown chunk sizes"):
        InteractionGraph().fit(X, jacobians=J)


class Last(nn.Module):
    def forward(self, x):
        return x[:, -1]


def test_sequence_graph_blocks_hold_whole_samples():
    """Row blocks that cut samples apart are rechunked to whole samples."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Last(), nn.Linear(4, 2)).double()
    X = torch.randn(30, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    acts, jacs = collect(net, [":input", "1", "3"], X, sequence=True, verbose=False)
    want = InteractionGraph(constant_node=True).fit(acts, jacobians=jacs, sequence=True)
    # 7 rows do not hold whole samples of 5 positions.
    Xd, Jd = _dask_lists(acts, jacs, 7)
    with pytest.warns(UserWarning, match="do not line up"):
        got = InteractionGraph(constant_node=True).fit(Xd, jacobians=Jd, sequence=True)
    assert_same_graph(got, want)


# --------------------------------------------------------------------------- cache
@pytest.fixture(scope="module")
def cached(tmp_path_factory, flat):
    acts, jacs = flat
    path = tmp_path_factory.mktemp("dask") / "cache.zarr"
    layers = {"in": (4,), "hidden": (6,), "out": (3,)}
    with ActivationCache.create(path, layers, jacobians=True, chunk_size=48) as cache:
        for rows in (slice(0, 120), slice(120, 200)):
            cache.append(dict(zip(layers, (a[rows] for a in acts))),
                         dict(zip(cache.jacobian_pairs, (J[rows] for J in jacs))))
    return ActivationCache.open(path)


def _cache_lists(cache):
    X = [cache.activations(n, dask=True) for n in cache.layers]
    J = [cache.jacobians(a, b, dask=True) for a, b in cache.jacobian_pairs]
    return X, J


def test_cache_dask_arrays_are_aligned_and_lazy(cached):
    X, J = _cache_lists(cached)
    assert all(a.chunks[0] == X[0].chunks[0] for a in X + J)
    assert X[0].chunks[0][0] == 48
    np.testing.assert_array_equal(X[1][50:60].compute(), np.asarray(cached.activations("hidden")[50:60]))


def test_cache_blocks_are_read_in_the_task(cached):
    """A cache array's blocks reach the tasks as reads; a derived array's as Dask's blocks."""
    from sklearn_lib.basis._dask import CacheBlock, read_block, row_blocks

    X = cached.activations("hidden", dask=True)
    parts = row_blocks(X)
    assert all(isinstance(p, CacheBlock) for p in parts)
    # Exact: both are the stored values, copied.
    np.testing.assert_array_equal(np.concatenate([read_block(p) for p in parts]),
                                  np.asarray(cached.activations("hidden")))
    derived = row_blocks(X.rechunk((40, 6)))
    assert not any(isinstance(p, CacheBlock) for p in derived)
    assert len(derived) == 5


def test_cache_array_changed_in_place_is_not_read_from_the_cache(cached):
    """``X[mask] = v`` keeps the array object: the fit must see the change, not the cache."""
    X, J = _cache_lists(cached)
    X[1][X[1] > 0.5] = 0.5
    assert X[1].name != _cache_lists(cached)[0][1].name
    want = [np.asarray(cached.activations(n)) for n in cached.layers]
    want[1] = np.minimum(want[1], 0.5)
    assert_same_graph(InteractionGraph().fit(X, jacobians=J),
                      InteractionGraph().fit(want, jacobians=[np.asarray(j) for j in J]))


def test_graph_from_cache_dask_arrays(cached):
    X, J = _cache_lists(cached)
    assert_same_graph(InteractionGraph().fit(X, jacobians=J), InteractionGraph().fit(cached))


def test_cache_dask_array_refuses_a_replaced_cache(cached, tmp_path, flat):
    acts, jacs = flat
    path = tmp_path / "c.zarr"
    for overwrite in (False, True):
        with ActivationCache.create(path, {"a": (4,)}, overwrite=overwrite) as cache:
            cache.append({"a": acts[0][:10] + overwrite})
        if not overwrite:
            array = ActivationCache.open(path).activations("a", dask=True)
    with pytest.raises(ValueError, match="no longer the one|was replaced"):
        array.compute()


# --------------------------------------------------------------------------- cluster
@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        with distributed.Client(cluster) as c:
            yield c


def test_local_cluster_fit_from_a_cache(client, cached):
    X, J = _cache_lists(cached)
    with dask.config.set(scheduler=client):
        got = InteractionGraph().fit(X, jacobians=J)
    assert_same_graph(got, InteractionGraph().fit(cached))


def test_local_cluster_survives_a_killed_worker(client, layer):
    """A worker killed in the middle of the reduction: Dask reruns its blocks elsewhere."""
    X, J, _ = layer
    slow = da.from_array(X, chunks=(20, 5)).map_blocks(lambda b: (time.sleep(0.15), b)[1],
                                                       dtype=X.dtype)
    pids = client.run(os.getpid)
    victim = sorted(pids)[0]

    killed = []

    def kill():
        time.sleep(0.6)
        os.kill(pids[victim], signal.SIGKILL)
        killed.append(time.monotonic())

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        with dask.config.set(scheduler=client):
            got = InteractionBasis().fit(slow, jacobians=da.from_array(J, chunks=(20, 3, 5)))
        finished = time.monotonic()
    finally:
        killer.join()
    # The worker died while the reduction ran (15 blocks of 0.15 s on 2 workers).
    assert killed and killed[0] < finished
    assert pids[victim] not in client.run(os.getpid).values()
    assert got.n_samples_seen_ == 300
    assert_same_basis(got, InteractionBasis().fit(X, jacobians=J))
