"""Interaction edges and their sparsity: Gini, edges to reach a share, the cross-validation scorer.

May import :mod:`sklearn_lib.utils` only.
"""

from ._sparsity import (
    InteractionSparsityScorer,
    edges_to_reach,
    gini,
    interaction_edges,
)

__all__ = ["InteractionSparsityScorer", "edges_to_reach", "gini", "interaction_edges"]
