"""Judging a graph by ablation: node and edge ablation curves and the smallest faithful sets.

Uses a fitted graph; may import the layers up to :mod:`sklearn_lib.graph`, never
:mod:`~sklearn_lib.cluster`, :mod:`~sklearn_lib.degeneracy` or the outer rooms.
"""

from ._curves import (
    MinEdgesResult,
    compare_node_ablation,
    directions_to_keep,
    edge_ablated_outputs,
    edge_ablation_curve,
    min_edges_to_keep,
    node_ablation_curve,
)

__all__ = [
    "MinEdgesResult",
    "compare_node_ablation",
    "directions_to_keep",
    "edge_ablated_outputs",
    "edge_ablation_curve",
    "min_edges_to_keep",
    "node_ablation_curve",
]
