"""Saving and loading InteractionGraph (sklearn_lib._graph_io): roundtrips, atomic replace."""

import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch import nn

from sklearn_lib.collect import collect
from sklearn_lib.graph import InteractionGraph

LAYERS = [":input", "1", "3", "4"]


@pytest.fixture(scope="module")
def case():
    """Activations and Jacobians of a small float64 ReLU MLP 6-8-8-4."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)
    ).double()
    X = torch.randn(120, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    acts, jacs = collect(net, LAYERS, X, verbose=False)
    return dict(acts=[np.asarray(a) for a in acts], jacs=[np.asarray(j) for j in jacs])


@pytest.fixture(scope="module")
def fitted(case):
    return InteractionGraph().fit(case["acts"], jacobians=case["jacs"])


def test_save_load_roundtrip(fitted, case, tmp_path):
    path = tmp_path / "graph"
    fitted.save(path)
    meta = json.loads((path / "graph.json").read_text())
    assert meta["format"] == "sklearn_lib.InteractionGraph"
    loaded = InteractionGraph.load(path)
    assert loaded.get_params() == fitted.get_params()
    # The arrays come back bit for bit and transform runs the same code on them.
    for l, X in enumerate(case["acts"]):
        np.testing.assert_array_equal(loaded.transform(l, X), fitted.transform(l, X))
    for E, E_ref in zip(loaded.edges_, fitted.edges_):
        np.testing.assert_array_equal(E, E_ref)
    assert (loaded.adjacency("sqrt") != fitted.adjacency("sqrt")).nnz == 0
    for name in ("layer_offsets_", "n_components_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fitted, name))
    assert loaded.layer_names_ == fitted.layer_names_
    assert loaded.bases_[1].n_outputs_ == fitted.bases_[1].n_outputs_

    with pytest.raises(FileExistsError, match="overwrite=True"):
        fitted.save(path)
    other = clone(fitted).set_params(final_layer="pca").fit(case["acts"], jacobians=case["jacs"])
    other.save(path, overwrite=True)
    assert InteractionGraph.load(path).final_layer == "pca"
    (tmp_path / "precious").mkdir()
    with pytest.raises(FileExistsError, match="not a saved InteractionGraph"):
        fitted.save(tmp_path / "precious", overwrite=True)
    with pytest.raises(ValueError, match="not a graph saved"):
        InteractionGraph.load(tmp_path / "precious")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph", "precious"]
