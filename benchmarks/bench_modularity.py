"""Benchmark ModularityClustering (networkit Leiden) against networkx Louvain.

A random weighted graph with planted communities (``--n-blocks`` blocks, a
fraction ``--p-inside`` of the edges inside a block, exponential weights) is
clustered by

* ``ModularityClustering(random_state=0)``: seeded, hence one thread;
* ``ModularityClustering(random_state=None)``: unseeded, all threads;
* ``networkx.community.louvain_communities(seed=0)`` (skip with ``--no-networkx``).

Each row reports the wall and CPU time, the number of modules, the modularity Q at
gamma = 1 (all computed by ``sklearn_lib.cluster.modularity``, so they are
comparable) and the adjusted Rand index against the planted blocks. The
networkx time excludes building its graph, which is reported separately.

Usage::

    python benchmarks/bench_modularity.py                      # 100k nodes, 2M edges
    python benchmarks/bench_modularity.py --n-nodes 20000 --n-edges 400000
"""

import argparse
import time

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from sklearn_lib.cluster import ModularityClustering, modularity


def planted_graph(n_nodes, n_edges, n_blocks, p_inside, seed):
    """Symmetric CSR adjacency (no self-loops) and the planted block of each node."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, n_blocks, n_nodes)
    members = np.argsort(blocks, kind="stable")
    starts = np.searchsorted(blocks[members], np.arange(n_blocks))
    sizes = np.bincount(blocks, minlength=n_blocks)
    pairs = np.empty(0, dtype=np.int64)
    while pairs.size < n_edges:
        # Self-loops and repeated pairs are dropped, so draw until enough are left.
        n_draw = int((n_edges - pairs.size) * 1.1) + 10
        row = rng.integers(0, n_nodes, n_draw)
        inside = rng.random(n_draw) < p_inside
        offset = (rng.random(n_draw) * sizes[blocks[row]]).astype(np.int64)
        partner = members[starts[blocks[row]] + offset]
        col = np.where(inside, partner, rng.integers(0, n_nodes, n_draw))
        keep = row != col
        low, high = np.minimum(row, col)[keep], np.maximum(row, col)[keep]
        pairs = np.union1d(pairs, low * n_nodes + high)
    pairs = rng.permutation(pairs)[:n_edges]
    row, col = pairs // n_nodes, pairs % n_nodes
    weight = rng.exponential(1.0, row.size)
    upper = sp.csr_array((weight, (row, col)), shape=(n_nodes, n_nodes))
    return (upper + upper.T).tocsr(), blocks


def time_modularity_clustering(A, blocks, random_state):
    start, cpu = time.perf_counter(), time.process_time()
    mc = ModularityClustering(random_state=random_state).fit(A)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return elapsed, cpu, mc.n_clusters_, mc.modularity_, adjusted_rand_score(blocks, mc.labels_)


def time_networkx_louvain(A, blocks):
    import networkx as nx

    start = time.perf_counter()
    G = nx.from_scipy_sparse_array(A)
    build = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    communities = nx.community.louvain_communities(G, weight="weight", resolution=1.0, seed=0)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    labels = np.empty(A.shape[0], dtype=np.int64)
    for c, nodes in enumerate(communities):
        labels[list(nodes)] = c
    Q = modularity(A, labels)
    return build, (elapsed, cpu, len(communities), Q, adjusted_rand_score(blocks, labels))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-nodes", type=int, default=100_000)
    parser.add_argument("--n-edges", type=int, default=2_000_000)
    parser.add_argument("--n-blocks", type=int, default=100)
    parser.add_argument("--p-inside", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-networkx", action="store_true", help="skip networkx Louvain")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    A, blocks = planted_graph(args.n_nodes, args.n_edges, args.n_blocks, args.p_inside, args.seed)
    print(
        f"graph: {A.shape[0]:,} nodes, {A.nnz // 2:,} edges, {args.n_blocks} planted blocks, "
        f"{args.p_inside:.0%} of edges inside ({time.perf_counter() - start:.1f} s to generate)"
    )
    # Import networkit (several seconds, mostly its own dependencies) outside the timing.
    ModularityClustering(random_state=0).fit(sp.csr_array(np.ones((2, 2))))

    rows = [
        ("ModularityClustering, seeded (1 thread)", time_modularity_clustering(A, blocks, 0)),
        (
            "ModularityClustering, unseeded (all threads)",
            time_modularity_clustering(A, blocks, None),
        ),
    ]
    if not args.no_networkx:
        build, result = time_networkx_louvain(A, blocks)
        print(f"networkx graph construction: {build:.1f} s (not included below)")
        rows.append(("networkx louvain_communities", result))

    reference = rows[0][1][0]
    header = (
        f"{'method':<46} {'wall (s)':>9} {'CPU (s)':>8} {'vs ours':>8} {'modules':>8} "
        f"{'Q':>8} {'ARI':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, (elapsed, cpu, n_modules, Q, ari) in rows:
        print(
            f"{name:<46} {elapsed:>9.2f} {cpu:>8.2f} {elapsed / reference:>7.1f}x "
            f"{n_modules:>8d} {Q:>8.4f} {ari:>6.3f}"
        )
    print(
        "wall: elapsed time; CPU: summed over threads (the fair cost when other "
        "processes share the cores); vs ours: wall time / wall time of the first row."
    )


if __name__ == "__main__":
    main()
