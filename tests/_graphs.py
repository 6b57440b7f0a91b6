"""Test graphs shared by test_cluster.py and test_modularity.py."""

import networkx as nx
import numpy as np


def sbm(n_blocks=4, block_size=30, p_in=0.5, p_out=0.01, seed=0):
    """Weighted stochastic block model: symmetric, zero diagonal, and its blocks."""
    rng = np.random.default_rng(seed)
    blocks = np.repeat(np.arange(n_blocks), block_size)
    n = blocks.size
    p = np.where(blocks[:, None] == blocks[None, :], p_in, p_out)
    upper = np.triu(rng.random((n, n)) < p, k=1) * rng.uniform(0.5, 2.0, (n, n))
    return upper + upper.T, blocks


def cliques(n_cliques, size, *, ring=False):
    """Disjoint cliques (unit weights), optionally joined in a ring by single edges."""
    A = np.kron(np.eye(n_cliques), np.ones((size, size)))
    np.fill_diagonal(A, 0)
    if ring:
        for c in range(n_cliques):
            i, j = c * size, ((c + 1) % n_cliques) * size + 1
            A[i, j] = A[j, i] = 1.0
    return A


def nx_modularity(A, labels, resolution=1.0):
    """networkx's modularity of the same weighted graph and partition."""
    G = nx.from_numpy_array(np.asarray(A))
    communities = [set(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    return nx.community.modularity(G, communities, weight="weight", resolution=resolution)
