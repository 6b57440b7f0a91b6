"""Modules of a graph by modularity maximisation: :class:`ModularityClustering` and modularity.

May import the layers up to :mod:`sklearn_lib.graph`, never
:mod:`~sklearn_lib.evaluation`, :mod:`~sklearn_lib.degeneracy` or the outer rooms.
"""

from ._clustering import (
    ModularityClustering,
    modularity,
    normalize_edges,
    select_log_eps,
)

__all__ = ["ModularityClustering", "modularity", "normalize_edges", "select_log_eps"]
