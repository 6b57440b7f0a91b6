"""A fitted graph as a NetworkX graph or a GraphML file, for tools outside Python.

An outer room: may import any inner layer, and nothing imports it.
"""

from ._networkx import to_networkx, write_graphml

__all__ = ["to_networkx", "write_graphml"]
