"""The local interaction graph: :class:`InteractionGraph`, its backward chain, edges, views, save/load.

May import every layer before it: utils, metrics, basis, cache, models, sources.
"""

from ._graph import InteractionGraph

__all__ = ["InteractionGraph"]
