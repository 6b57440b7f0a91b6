"""One rank of the torch.distributed tests (tests/test_distributed.py starts 2 of these).

Usage: python _distributed_worker.py RANK WORLD_SIZE PORT OUT_DIR

Every rank runs the same scenarios in order on the gloo backend over loopback
and writes what it got to OUT_DIR/rank<R>.npz (arrays) and rank<R>.json
(exceptions: type and message). The test compares them with single-process fits.
"""

import json
import os
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sklearn_lib.graph import InteractionGraph

N_PER_RANK = (40, 60)


def model(width=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3)).double()


def shard(rank):
    """Rank ``rank``'s inputs; shifted per rank so that the shards' means differ."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(N_PER_RANK[rank], 4, generator=g, dtype=torch.float64) + rank


LAYERS = [":input", "1", "2"]
#: Scenarios whose graphs are compared with a single fit on all shards.
EXACT = {
    "generic": {"fast_path": False},
    "fast": {"fast_path": True},
    "global": {"variant": "global", "fast_path": False},
    "constant": {"constant_node": True, "n_components": [3, 2, None]},
}


def _run(name, fn, errors):
    try:
        fn()
        errors[name] = None
    except Exception as exc:  # recorded for the test to check
        errors[name] = [type(exc).__name__, str(exc)]


def main(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=15))
    arrays, errors = {}, {}
    x = shard(rank)
    for name, params in EXACT.items():
        def fit(name=name, params=params):
            g = InteractionGraph(**params).fit_model(model(), LAYERS, x, distributed=True)
            for l, E in enumerate(g.edges_):
                arrays[f"{name}_edges{l}"] = E
            for l, b in enumerate(g.bases_):
                arrays[f"{name}_gram{l}"] = b.gram_
                arrays[f"{name}_jgram{l}"] = b.jacobian_gram_
                arrays[f"{name}_mean{l}"] = b.mean_
            arrays[f"{name}_n"] = np.array([g.n_samples_seen_, *[b.n_samples_seen_
                                                                 for b in g.bases_]])
        _run(name, fit, errors)

    # Stochastic sources drawn differently on every rank (no seed): rank 0's are used.
    def stochastic():
        g = InteractionGraph(stochastic_sources=2).fit_model(model(), LAYERS, x,
                                                             distributed=True)
        arrays["stochastic_edges0"] = g.edges_[0]
    _run("stochastic", stochastic, errors)

    # A rank with another model width, another dtype, other layers: all ranks raise.
    _run("width", lambda: InteractionGraph().fit_model(
        model(6 if rank == 1 else 5), LAYERS, x, distributed=True), errors)
    _run("dtype", lambda: InteractionGraph(dtype="float32" if rank == 1 else "float64")
         .fit_model(model(), LAYERS, x, distributed=True), errors)
    _run("layers", lambda: InteractionGraph().fit_model(
        model(), [":input", "2"] if rank == 1 else LAYERS, x, distributed=True), errors)
    # A failure in the middle of a fit on one rank (NaN in its shard).
    bad = x.clone()
    if rank == 1:
        bad[3, 1] = float("nan")
    _run("nan", lambda: InteractionGraph().fit_model(model(), LAYERS, bad, distributed=True),
         errors)
    # collect: one cache per rank (fitted together with Dask by the test) ...
    from sklearn_lib.collect import collect

    _run("collect", lambda: collect(model(), LAYERS, x, verbose=False, distributed=True,
                                    cache=os.path.join(out, "shard-{rank}.zarr")), errors)
    # ... refused without "{rank}" in the path, and on shards that do not fit together.
    _run("collect_path", lambda: collect(model(), LAYERS, x, verbose=False, distributed=True,
                                         cache=os.path.join(out, "one.zarr")), errors)
    _run("collect_width", lambda: collect(
        model(6 if rank == 1 else 5), LAYERS, x, verbose=False, distributed=True,
        cache=os.path.join(out, "width-{rank}.zarr")), errors)
    np.savez(os.path.join(out, f"rank{rank}.npz"), **arrays)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(errors, f)

    # Last: the highest rank dies; the others must raise, not hang.
    if rank == world - 1:
        os._exit(0)
    died = {}
    _run("died", lambda: InteractionGraph().fit_model(model(), LAYERS, x, distributed=True),
         died)
    with open(os.path.join(out, f"rank{rank}-died.json"), "w") as f:
        json.dump(died, f)
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
