"""A fitted interaction graph for the tools people explore graphs in: networkx, GraphML.

networkx is an optional extra (``pip install sklearn_lib[export]``), imported
when a function here is called. Node ``k`` of the exported graph is node ``k``
of :meth:`~sklearn_lib.InteractionGraph.adjacency` and of
``ModularityClustering.labels_``; GraphML files open in Gephi, Cytoscape, yEd
and ``networkx.read_graphml(path, node_type=int)``.

:func:`write_graphml` follows :meth:`InteractionGraph.save
<sklearn_lib.InteractionGraph.save>`'s rule: an existing path is replaced only
with ``overwrite=True`` and only when it is a GraphML file this function
wrote (its graph attribute ``sklearn_lib_format`` says so); anything else, a
symbolic link included, is refused, and the file is written next to the path
and renamed over it, so an interrupted export leaves the previous file intact.
"""

import os
from xml.etree import ElementTree

import numpy as np

from ..graph._adjacency import layered_edges
from ..graph._view import graph_view, module_labels
from ..utils._atomic import write_file

__all__ = ["to_networkx", "write_graphml"]

# The graph attribute that marks a GraphML file as written by write_graphml.
_MARKER_KEY = "sklearn_lib_format"
_MARKER = "sklearn_lib.export.write_graphml"
_WHAT = "GraphML file written by sklearn_lib.export.write_graphml"
_GRAPHML_NS = "{http://graphml.graphdrawing.org/xmlns}"


def _networkx():
    try:
        import networkx as nx
    except ImportError as error:
        raise ImportError(
            "sklearn_lib.export needs networkx, an optional extra: "
            "pip install sklearn_lib[export]"
        ) from error
    return nx


def to_networkx(graph, modules=None, *, norm="identity", eps=None, directed=True,
                layer_names=None):
    """The graph's nodes, with their attributes, and its non-zero edges as a networkx graph.

    Parameters
    ----------
    graph : InteractionGraph or list of array-like
        A fitted graph, or its edge matrices (element ``l`` of shape
        ``(r_{l+1}, r_l)``; nodes then have no Lambda).
    modules : array-like of shape (n_nodes,) or ModularityClustering, default=None
        Module of every node, layer by layer (a fitted
        :class:`~sklearn_lib.ModularityClustering` or its ``labels_``).
    norm : {"identity", "sqrt", "log"}, default="identity"
        Normalisation of the ``weight`` attribute, as in
        :meth:`~sklearn_lib.InteractionGraph.adjacency`; ``strength`` is always
        the edge ``E_l[i, j]`` itself.
    eps : float, list of float or None, default=None
        Threshold of the log form, as in :meth:`~sklearn_lib.InteractionGraph.adjacency`.
    directed : bool, default=True
        A ``DiGraph`` with edges from layer ``l`` to layer ``l + 1`` (the
        direction of the computation), or an undirected ``Graph`` (the graph
        modules are found in).
    layer_names : list of str, default=None
        Replaces the graph's layer names.

    Returns
    -------
    G : networkx.DiGraph or networkx.Graph
        Nodes ``0 .. n_nodes - 1`` with attributes ``layer`` (name),
        ``layer_index``, ``index`` (direction within the layer), ``Lambda``
        (``interaction_strengths_``; NaN for constant nodes and bare edges),
        ``constant`` (the layer's constant node, ``constant_node=True``),
        ``label`` (``"layer[index]"``) and, if given, ``module``. An edge for
        every non-zero normalised weight, with attributes ``weight`` and
        ``strength``. The layer names, in order, are ``G.graph["layers"]``
        (joined by newlines, as GraphML stores strings only).

    See Also
    --------
    write_graphml : Write it to a GraphML file.
    sklearn_lib.InteractionGraph.adjacency : The same weights as a sparse matrix.

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib import InteractionGraph
    >>> from sklearn_lib.export import to_networkx
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    >>> graph = InteractionGraph.from_model(net, [":input", "1", "2"], torch.randn(200, 4))
    >>> G = to_networkx(graph)
    >>> G.number_of_nodes(), G.number_of_edges()
    (10, 21)
    >>> G.nodes[4]["layer"], G.nodes[4]["index"]
    ('1', 0)
    >>> bool(G.nodes[4]["Lambda"] == graph.bases_[1].interaction_strengths_[0])
    True
    """
    nx = _networkx()
    view = graph_view(graph, layer_names=layer_names)
    labels = module_labels(modules, view)
    if norm not in ("identity", "sqrt", "log"):
        raise ValueError(f"norm must be 'identity', 'sqrt' or 'log', got {norm!r}.")
    targets, sources, weights = layered_edges(view.edges, view.offsets, norm, eps)

    G = nx.DiGraph() if directed else nx.Graph()
    G.graph["layers"] = "\n".join(view.layer_names)
    for node, (l, index, strength, constant) in enumerate(
            zip(view.layer, view.index, view.strengths, view.constant)):
        attributes = {
            "layer": view.layer_names[l], "layer_index": int(l), "index": int(index),
            "Lambda": float(strength), "constant": bool(constant),
            "label": f"{view.layer_names[l]}[{'constant' if constant else index}]",
        }
        if labels is not None:
            attributes["module"] = labels[node].item()
        G.add_node(node, **attributes)
    pair = view.layer[sources]
    strength = np.empty(len(sources))
    for l, E in enumerate(view.edges):
        edge = pair == l
        strength[edge] = E[targets[edge] - view.offsets[l + 1], sources[edge] - view.offsets[l]]
    G.add_edges_from(
        (int(s), int(t), {"weight": float(w), "strength": float(e)})
        for s, t, w, e in zip(sources, targets, weights, strength)
    )
    return G


def write_graphml(graph, path, modules=None, *, overwrite=False, **kwargs):
    """Write the graph, with node attributes, to a GraphML file.

    Parameters
    ----------
    graph : InteractionGraph or list of array-like
        See :func:`to_networkx`.
    path : str or os.PathLike
        The file written (``.graphml``).
    modules : array-like of shape (n_nodes,) or ModularityClustering, default=None
        See :func:`to_networkx`.
    overwrite : bool, default=False
        Replace an existing GraphML file that this function wrote. Anything
        else at ``path`` (another file, a GraphML file from elsewhere, a
        directory, a symbolic link) is never replaced, as with
        :meth:`InteractionGraph.save <sklearn_lib.InteractionGraph.save>`.
    **kwargs
        ``norm``, ``eps``, ``directed``, ``layer_names`` of :func:`to_networkx`.

    Returns
    -------
    G : networkx.DiGraph or networkx.Graph
        The graph written; its graph attribute ``sklearn_lib_format`` marks
        the file as one of ours.

    Raises
    ------
    FileExistsError
        If ``path`` exists and may not be replaced (see ``overwrite``).

    See Also
    --------
    to_networkx : The graph written, with its attributes.

    Examples
    --------
    >>> import networkx as nx
    >>> import numpy as np
    >>> from sklearn_lib.export import write_graphml
    >>> path = getfixture("tmp_path") / "graph.graphml"
    >>> G = write_graphml([np.array([[1.0, 0.0], [0.5, 2.0]])], path, modules=[0, 1, 0, 1])
    >>> H = nx.read_graphml(path, node_type=int)
    >>> sorted(H.edges(data="strength"))
    [(0, 2, 1.0), (0, 3, 0.5), (1, 3, 2.0)]
    >>> H.nodes[3]["label"], H.nodes[3]["module"]
    ('layer 1[1]', 1)
    """
    nx = _networkx()
    G = to_networkx(graph, modules, **kwargs)
    G.graph[_MARKER_KEY] = _MARKER
    opener = _opener(path)

    def write(tmp):
        with opener(tmp, "wb") as f:
            nx.write_graphml(G, f)

    write_file(path, write, overwrite=overwrite, is_ours=_is_our_graphml, what=_WHAT)
    return G


def _opener(path):
    """``open``, or gzip's or bz2's for the suffixes networkx compresses."""
    name = os.fspath(path)
    if name.endswith(".gz"):
        import gzip

        return gzip.open
    if name.endswith(".bz2"):
        import bz2

        return bz2.open
    return open


def _is_our_graphml(path):
    """True if ``path`` is a GraphML file whose graph carries our marker.

    networkx writes a graph's attributes after its nodes and edges, so the
    whole file is parsed (element by element, in constant memory).
    """
    if not os.path.isfile(path):
        return False
    keys = set()  # ids of <key> elements declaring the marker attribute
    depth = 0
    try:
        with _opener(path)(path, "rb") as f:
            for event, element in ElementTree.iterparse(f, events=("start", "end")):
                tag = element.tag.removeprefix(_GRAPHML_NS)
                if event == "start":
                    depth += 1
                    continue
                depth -= 1
                if tag == "key" and element.get("attr.name") == _MARKER_KEY:
                    keys.add(element.get("id"))
                elif tag == "data" and depth == 2 and element.get("key") in keys:
                    # graphml > graph > data: an attribute of the graph itself
                    return (element.text or "") == _MARKER
                if tag in ("node", "edge"):
                    element.clear()
    except (ElementTree.ParseError, OSError, EOFError, UnicodeDecodeError):
        return False
    return False
