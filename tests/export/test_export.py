"""Tests for sklearn_lib.export: networkx graphs and GraphML files of a fitted graph."""

import builtins

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

nx = pytest.importorskip("networkx")

from sklearn_lib import InteractionGraph, ModularityClustering  # noqa: E402
from sklearn_lib.export import to_networkx, write_graphml  # noqa: E402


@pytest.fixture(scope="module")
def fitted():
    """Constant nodes on layers 0 and 1, an unrotated final layer, and its modules."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    graph = InteractionGraph(constant_node=True).fit_model(
        net, [":input", "1", "2"], torch.randn(300, 4))
    return graph, ModularityClustering(random_state=0).fit(graph)


def test_graphml_round_trip(fitted, tmp_path):
    graph, modules = fitted
    path = tmp_path / "graph.graphml"
    write_graphml(graph, path, modules)
    G = nx.read_graphml(path, node_type=int)
    offsets = graph.layer_offsets_
    assert G.is_directed()
    assert G.number_of_nodes() == offsets[-1]
    assert G.graph["layers"].split("\n") == graph.layer_names_
    # Every non-zero edge comes back, from layer l to layer l + 1, with its strength.
    expected = {}
    for l, E in enumerate(graph.edges_):
        for i, j in zip(*np.nonzero(E)):
            expected[(offsets[l] + j, offsets[l + 1] + i)] = E[i, j]
    assert set(G.edges) == set(expected)
    for (s, t), value in expected.items():
        assert G.edges[s, t]["strength"] == pytest.approx(value, rel=1e-12)
        assert G.edges[s, t]["weight"] == pytest.approx(value, rel=1e-12)
    for node in range(offsets[-1]):
        attributes = G.nodes[node]
        l = int(np.searchsorted(offsets, node, side="right")) - 1
        index = node - offsets[l]
        r = graph.n_components_[l]
        assert attributes["layer"] == graph.layer_names_[l]
        assert attributes["layer_index"] == l and attributes["index"] == index
        assert attributes["module"] == modules.labels_[node]
        assert attributes["constant"] == (index == r)
        if index < r:
            assert attributes["Lambda"] == pytest.approx(
                graph.bases_[l].interaction_strengths_[index], rel=1e-12)
            assert attributes["label"] == f"{graph.layer_names_[l]}[{index}]"
        else:
            assert np.isnan(attributes["Lambda"])
            assert attributes["label"] == f"{graph.layer_names_[l]}[constant]"


@pytest.mark.parametrize("norm, eps", [("identity", None), ("sqrt", None), ("log", None),
                                       ("log", [1e-4, 1e-3])])
def test_undirected_weights_are_the_adjacency(fitted, norm, eps):
    graph, _ = fitted
    G = to_networkx(graph, norm=norm, eps=eps, directed=False)
    A = nx.to_scipy_sparse_array(G, nodelist=range(G.number_of_nodes()), weight="weight")
    expected = graph.adjacency(norm=norm, eps=eps)
    np.testing.assert_allclose(A.toarray(), expected.toarray(), rtol=1e-12, atol=0)
    assert G.number_of_edges() == expected.nnz // 2


@settings(max_examples=20, deadline=None)
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
       seed=st.integers(0, 2**16), density=st.floats(0.0, 1.0))
def test_bare_edges_one_edge_per_nonzero_entry(shape, seed, density):
    rng = np.random.default_rng(seed)
    edges = [rng.random((shape[1], shape[0])) * (rng.random((shape[1], shape[0])) < density),
             rng.random((shape[2], shape[1])) * (rng.random((shape[2], shape[1])) < density)]
    G = to_networkx(edges)
    assert G.number_of_nodes() == sum(shape)
    assert G.number_of_edges() == sum(int((E > 0).sum()) for E in edges)
    assert sum(w for *_, w in G.edges(data="strength")) == pytest.approx(
        sum(E.sum() for E in edges))
    assert all(np.isnan(value) for _, value in G.nodes(data="Lambda"))
    assert [G.nodes[n]["layer"] for n in (0, shape[0], sum(shape) - 1)] == [
        "layer 0", "layer 1", "layer 2"]


def test_layer_names_override(fitted):
    graph, _ = fitted
    G = to_networkx(graph, layer_names=["x", "h", "logits"])
    assert G.nodes[0]["label"] == "x[0]" and G.graph["layers"] == "x\nh\nlogits"


def test_errors(fitted):
    graph, modules = fitted
    with pytest.raises(ValueError, match="one module per node"):
        to_networkx(graph, modules.labels_[:-1])
    with pytest.raises(ValueError, match="norm must be"):
        to_networkx(graph, norm="log2")
    with pytest.raises(ValueError, match="must chain"):
        to_networkx([np.ones((2, 3)), np.ones((2, 3))])


def test_missing_networkx_names_the_extra(fitted, monkeypatch):
    real_import = builtins.__import__

    def no_networkx(name, *args, **kwargs):
        if name.startswith("networkx"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_networkx)
    with pytest.raises(ImportError, match=r"pip install sklearn_lib\[export\]"):
        to_networkx(fitted[0])


# --------------------------------------------------------------------------- overwrite rule
@pytest.mark.parametrize("suffix", [".graphml", ".graphml.gz"])
def test_write_graphml_overwrites_only_its_own_file(fitted, tmp_path, suffix):
    graph, modules = fitted
    path = tmp_path / f"graph{suffix}"
    first = write_graphml(graph, path, modules)
    assert first.graph["sklearn_lib_format"] == "sklearn_lib.export.write_graphml"
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        write_graphml(graph, path, modules, norm="sqrt")
    write_graphml(graph, path, modules, norm="sqrt", overwrite=True)
    H = nx.read_graphml(path, node_type=int)
    assert H.graph["sklearn_lib_format"] == "sklearn_lib.export.write_graphml"
    u, v, w = next(iter(H.edges(data="weight")))
    assert w == pytest.approx(np.sqrt(H.edges[u, v]["strength"]))
    # A GraphML file from elsewhere (networkx's own) is not ours to replace.
    nx.write_graphml(nx.path_graph(3), path)
    with pytest.raises(FileExistsError, match="not a GraphML file written by"):
        write_graphml(graph, path, modules, overwrite=True)
    assert nx.read_graphml(path).number_of_nodes() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left


def test_write_graphml_refuses_a_directory_and_keeps_the_file_on_error(fitted, tmp_path,
                                                                       monkeypatch):
    graph, _ = fitted
    (tmp_path / "folder.graphml").mkdir()
    with pytest.raises(IsADirectoryError):
        write_graphml(graph, tmp_path / "folder.graphml", overwrite=True)
    path = tmp_path / "graph.graphml"
    write_graphml(graph, path)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nx, "write_graphml", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_graphml(graph, path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.graphml", "graph.graphml"]
