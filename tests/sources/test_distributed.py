"""InteractionGraph.fit_model(distributed=True) across 2 gloo processes on loopback.

The ranks (tests/_distributed_worker.py) run every scenario in one process group,
so the processes start once; here their results are compared with single-process
fits on the concatenated shards, and their errors with what each rank must say.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import _distributed_worker as worker
import numpy as np
import pytest
import torch
import torch.distributed as dist

from sklearn_lib.basis._stats import InteractionStatistics
from sklearn_lib.graph import InteractionGraph
from sklearn_lib.sources._distributed import all_reduce_statistics
from sklearn_lib.utils._distributed import resolve_group

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
WORLD = len(worker.N_PER_RANK)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the ranks once; return (arrays, errors, died) per rank."""
    out = tmp_path_factory.mktemp("ranks")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1"}
    script = str(Path(__file__).parent / "_distributed_worker.py")
    procs = [subprocess.Popen([sys.executable, script, str(r), str(WORLD), str(port), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = _Ranks()
    results.out = out
    for r in range(WORLD):
        if not (out / f"rank{r}.json").exists():
            pytest.fail(f"rank {r} wrote no results:\n" + "\n".join(logs))
        arrays = dict(np.load(out / f"rank{r}.npz"))
        errors = json.loads((out / f"rank{r}.json").read_text())
        died = out / f"rank{r}-died.json"
        results.append((arrays, errors, json.loads(died.read_text()) if died.exists() else None))
    return results


class _Ranks(list):
    """Per-rank results, and ``out``: where the ranks wrote."""


def _single_fit(params):
    X = torch.cat([worker.shard(r) for r in range(WORLD)])
    return InteractionGraph(**params).fit_model(worker.model(), worker.LAYERS, X)


@pytest.mark.parametrize("name", list(worker.EXACT))
def test_shards_fit_the_graph_of_their_concatenation(ranks, name):
    reference = _single_fit(worker.EXACT[name])
    n = sum(worker.N_PER_RANK)
    for arrays, errors, _ in ranks:
        assert errors[name] is None, errors[name]
        np.testing.assert_array_equal(arrays[f"{name}_n"], [n] * (1 + len(reference.bases_)))
        for l, basis in enumerate(reference.bases_):
            for key, want in (("gram", basis.gram_), ("jgram", basis.jacobian_gram_),
                              ("mean", basis.mean_)):
                got = arrays[f"{name}_{key}{l}"]
                assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max(), (key, l)
        for l, E in enumerate(reference.edges_):
            got = arrays[f"{name}_edges{l}"]
            assert np.abs(got - E).max() <= 1e-10 * np.abs(E).max(), l


def test_stochastic_sources_are_rank_zeros(ranks):
    edges = [arrays["stochastic_edges0"] for arrays, _, _ in ranks]
    for E in edges[1:]:
        np.testing.assert_allclose(E, edges[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name, words", [
    ("width", ["disagree", "widths"]),
    ("dtype", ["disagree", "dtype"]),
])
def test_disagreeing_ranks_raise_everywhere(ranks, name, words):
    for arrays, errors, _ in ranks:
        kind, message = errors[name]
        assert kind == "ValueError"
        assert all(w in message for w in words), message


def test_bad_layers_on_one_rank_raise_everywhere(ranks):
    for rank, (_, errors, _) in enumerate(ranks):
        kind, message = errors["layers"]
        # Two layers instead of three: the shapes differ, which every rank sees.
        assert kind == "ValueError" and "disagree" in message, message


def test_failure_on_one_rank_raises_on_all(ranks):
    for rank, (_, errors, _) in enumerate(ranks):
        kind, message = errors["nan"]
        if rank == 1:
            assert kind == "ValueError" and "NaN" in message
        else:
            assert kind == "RuntimeError" and "rank(s) 1" in message and "NaN" in message


def test_a_dead_rank_raises_instead_of_hanging(ranks):
    survivors = [died for _, _, died in ranks[:-1]]
    for died in survivors:
        kind, message = died["died"]
        assert kind == "RuntimeError" and "another rank died" in message, message


def test_shard_caches_fit_together_with_dask(ranks):
    da = pytest.importorskip("dask.array")
    from sklearn_lib.cache import ActivationCache

    assert all(errors["collect"] is None for _, errors, _ in ranks)
    caches = [ActivationCache.open(ranks.out / f"shard-{r}.zarr") for r in range(WORLD)]
    assert [c.n_samples for c in caches] == list(worker.N_PER_RANK)
    X = [da.concatenate([c.activations(n, dask=True) for c in caches])
         for n in caches[0].layers]
    J = [da.concatenate([c.jacobians(a, b, dask=True) for c in caches])
         for a, b in caches[0].jacobian_pairs]
    got = InteractionGraph(edge_point="data").fit(X, jacobians=J)
    want = _single_fit({"edge_point": "data"})
    for E, E_ref in zip(got.edges_, want.edges_):
        assert np.abs(E - E_ref).max() <= 1e-10 * np.abs(E_ref).max()


def test_collect_refuses_a_shared_path_and_mismatched_shards(ranks):
    for _, errors, _ in ranks:
        kind, message = errors["collect_path"]
        assert kind == "ValueError" and "'{rank}'" in message
        kind, message = errors["collect_width"]
        assert kind == "ValueError" and "disagree" in message
    assert not list(ranks.out.glob("width-*")) and not list(ranks.out.glob("one.zarr"))


def test_all_reduce_statistics_without_a_group_is_refused():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        resolve_group(True)


def test_single_rank_all_reduce_is_the_identity(tmp_path, rng):
    """With one rank the exact merge returns the statistics unchanged (and exactly)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        X = rng.normal(size=(30, 4)) * 1e200
        stats = InteractionStatistics(4, None, center=True, device="cpu",
                                      dtype=torch.float64).update(X)
        total = all_reduce_statistics(stats, None)
        assert total.n_samples == 30 and total.weight == stats.weight
        torch.testing.assert_close(total.mean, stats.mean, rtol=1e-15, atol=0)
        torch.testing.assert_close(total.scaled_moments()[0], stats.scaled_moments()[0],
                                   rtol=1e-14, atol=0)
        assert total.scatter_exponent == stats.scatter_exponent
    finally:
        dist.destroy_process_group()
