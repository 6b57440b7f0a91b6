"""Saving and loading InteractionGraph (sklearn_lib.graph._io): roundtrips, atomic replace."""

import json
import os
import re

import numpy as np
import pytest
import torch
from _cases import MLP_LAYERS, relu_mlp_case
from _reference import assert_same_up_to_rounding
from sklearn.base import clone
from torch import nn

from sklearn_lib.graph import InteractionGraph

LAYERS = MLP_LAYERS


@pytest.fixture(scope="module")
def case():
    """Activations and Jacobians of a small float64 ReLU MLP 6-8-8-4."""
    return relu_mlp_case(120)


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
    # The arrays come back bit for bit (exact below); transform runs GEMMs again.
    for l, X in enumerate(case["acts"]):
        assert_same_up_to_rounding(loaded.transform(l, X), fitted.transform(l, X))
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


# --------------------------------------------------------------------------- interruptions
class Killed(BaseException):
    """Stands for the process dying: nothing after it runs, not even rollbacks."""


def test_kill_between_the_two_renames_recovers_old_graph(fitted, case, tmp_path, monkeypatch):
    import sklearn_lib.utils._atomic

    path = tmp_path / "graph"
    fitted.save(path)
    other = clone(fitted).set_params(final_layer="pca").fit(case["acts"], jacobians=case["jacs"])
    real_rename, calls = os.rename, []

    def rename(src, dst):  # the first rename happens, then the process "dies"
        calls.append(src)
        if len(calls) > 1:
            raise Killed
        real_rename(src, dst)

    monkeypatch.setattr(sklearn_lib.utils._atomic.os, "rename", rename)
    with pytest.raises(Killed):
        other.save(path, overwrite=True)
    monkeypatch.undo()
    assert not path.exists()  # the state a kill leaves
    with pytest.warns(UserWarning, match="restored the saved InteractionGraph"):
        loaded = InteractionGraph.load(path)
    assert loaded.final_layer == "identity"
    np.testing.assert_allclose(loaded.edges_[0], fitted.edges_[0], rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph"]


def test_kill_after_the_second_rename_keeps_new_graph_and_tidies(fitted, case, tmp_path,
                                                                monkeypatch):
    import sklearn_lib.utils._atomic

    path = tmp_path / "graph"
    fitted.save(path)
    other = clone(fitted).set_params(final_layer="pca").fit(case["acts"], jacobians=case["jacs"])

    def killed(path):
        raise Killed

    monkeypatch.setattr(sklearn_lib.utils._atomic, "_remove_tree", killed)
    with pytest.raises(Killed):
        other.save(path, overwrite=True)
    monkeypatch.undo()
    assert len(list(tmp_path.glob("graph.old-*"))) == 1
    assert InteractionGraph.load(path).final_layer == "pca"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph"]


@pytest.mark.skipif(os.name != "posix", reason="symbolic links and process probes are POSIX")
def test_save_refuses_symlink_before_writing(fitted, tmp_path):
    target = tmp_path / "graph"
    fitted.save(target)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="symbolic link"):
            fitted.save(link, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph", "link"]
    assert link.is_symlink() and InteractionGraph.load(link).n_layers_ == fitted.n_layers_


# --------------------------------------------------------------------------- damaged saves
def test_load_missing_path_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "graph"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        InteractionGraph.load(missing)


def _edit_meta(path, edit):
    meta = json.loads((path / "graph.json").read_text())
    edit(meta)
    (path / "graph.json").write_text(json.dumps(meta))


def _edit_arrays(path, edit):
    with np.load(path / "arrays.npz") as npz:
        arrays = dict(npz)
    edit(arrays)
    np.savez(path / "arrays.npz", **arrays)


DAMAGES = {
    "wrong shape": (lambda p: _edit_arrays(p, lambda a: a.update(edges_1=a["edges_1"][:, :-1])),
                    r"arrays.npz\['edges_1'\]: expected shape \(\d+, \d+\), got"),
    "missing array": (lambda p: _edit_arrays(p, lambda a: a.pop("basis_2_mean_")),
                      r"missing arrays \['basis_2_mean_'\]"),
    "NaN array": (lambda p: _edit_arrays(p, lambda a: a["basis_0_components_"].fill(np.nan)),
                  r"basis_0_components_'\]: holds NaN"),
    "integer array": (lambda p: _edit_arrays(p, lambda a: a.update(edges_0=a["edges_0"] > 0)),
                      r"edges_0'\]: expected floats, got dtype bool"),
    "missing key": (lambda p: _edit_meta(p, lambda m: m.pop("edge_point_")),
                    r"lacks the keys \['edge_point_'\]"),
    "bad parameter": (lambda p: _edit_meta(p, lambda m: m["params"].update(n_alphas="ten")),
                      r"params: .*'n_alphas' parameter"),
    "unknown parameter": (lambda p: _edit_meta(p, lambda m: m["params"].update(colour=1)),
                          r"params: .*colour"),
    "bad basis parameter": (
        lambda p: _edit_meta(p, lambda m: m["bases"][1]["params"].update(center="yes")),
        r"bases\[1\].params: .*'center' parameter"),
    "bad scalar": (lambda p: _edit_meta(p, lambda m: m["bases"][0].update(n_components_=99)),
                   r"bases\[0\]: expected 1 <= n_components_ <= n_features_in_"),
    "short names": (lambda p: _edit_meta(p, lambda m: m["layer_names_"].pop()),
                    r"layer_names_: expected 4 strings"),
    "bad edge point": (lambda p: _edit_meta(p, lambda m: m.update(edge_point_="middle")),
                       r"edge_point_: expected one of"),
    "invalid JSON": (lambda p: (p / "graph.json").write_text("{\"format\": "),
                     r"graph.json' is damaged: it is not valid JSON"),
    "truncated npz": (lambda p: (p / "arrays.npz").write_bytes((p / "arrays.npz").read_bytes()
                                                              [:-200]),
                      r"arrays.npz' is damaged \(truncated or corrupted\)"),
    "corrupted npz": (lambda p: _flip_byte(p / "arrays.npz", 200),
                      r"arrays.npz' is damaged"),
    "missing npz": (lambda p: (p / "arrays.npz").unlink(), r"arrays.npz' does not exist"),
}


def _flip_byte(file, offset):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_load_validates_before_constructing(fitted, tmp_path, damage, monkeypatch):
    path = tmp_path / "graph"
    fitted.save(path)
    spoil, match = DAMAGES[damage]
    spoil(path)
    constructed = []
    real_set_fitted = InteractionGraph._set_fitted
    monkeypatch.setattr(InteractionGraph, "_set_fitted",
                        lambda self, result: constructed.append(1) or real_set_fitted(self, result))
    with pytest.raises(ValueError, match=match) as info:
        InteractionGraph.load(path)
    assert not constructed
    assert str(path) in str(info.value)


def test_numpy_scalar_parameters_roundtrip(case, tmp_path):
    graph = InteractionGraph(n_components=np.int64(3), n_alphas=np.int32(4),
                             truncation_threshold=np.float64(1e-10))
    graph.fit(case["acts"], jacobians=case["jacs"])
    graph.save(tmp_path / "graph")
    loaded = InteractionGraph.load(tmp_path / "graph")
    assert loaded.get_params() == graph.get_params()
    np.testing.assert_array_equal(loaded.n_components_, graph.n_components_)


# --------------------------------------------------------------------------- invariants
def _reparameterised(case, cond, dtype=np.float64):
    """The case's input layer under ``X @ A`` (Jacobians ``J @ inv(A).T``), ``cond(A) = cond``."""
    rng = np.random.default_rng(3)
    d = case["acts"][0].shape[1]
    Q1, _ = np.linalg.qr(rng.normal(size=(d, d)))
    Q2, _ = np.linalg.qr(rng.normal(size=(d, d)))
    A = Q1 @ np.diag(np.logspace(0, -np.log10(cond), d)) @ Q2
    acts = [case["acts"][0] @ A, *case["acts"][1:]]
    jacs = [case["jacs"][0] @ np.linalg.inv(A).T, *case["jacs"][1:]]
    return [a.astype(dtype) for a in acts], [j.astype(dtype) for j in jacs]


def _sequence_graph(**params):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    return InteractionGraph(**params).fit_model(net, [":input", "1", "2"],
                                                torch.randn(40, 6, 3), sequence=True)


def _model_graph(**params):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.GELU(), nn.Linear(6, 3))
    return InteractionGraph(**params).fit_model(net, [":input", "1", "3", "4"],
                                                torch.randn(300, 5))


GRAPHS = {
    "center=False": lambda c: InteractionGraph(center=False).fit(c["acts"], jacobians=c["jacs"]),
    "pca": lambda c: InteractionGraph(basis="pca").fit(c["acts"], jacobians=c["jacs"]),
    "final pca, constant nodes": lambda c: InteractionGraph(
        final_layer="pca", constant_node=True).fit(c["acts"], jacobians=c["jacs"]),
    "global, 2 components": lambda c: InteractionGraph(
        variant="global", n_components=2).fit(c["acts"], jacobians=c["jacs"]),
    "threshold 1e-15": lambda c: InteractionGraph(truncation_threshold=1e-15).fit(
        c["acts"], jacobians=c["jacs"]),
    "cond 1e6": lambda c: _fit(InteractionGraph(), *_reparameterised(c, 1e6)),
    "cond 1e7": lambda c: _fit(InteractionGraph(), *_reparameterised(c, 1e7)),
    "float32 cond 1e3": lambda c: _fit(InteractionGraph(dtype="float32"),
                                       *_reparameterised(c, 1e3, np.float32)),
    "model, float32": lambda c: _model_graph(dtype="float32"),
    "model, stochastic sources": lambda c: _model_graph(stochastic_sources=2, random_state=0),
    "model, integrated gradients": lambda c: _model_graph(integration="trapezoid", n_alphas=4),
    "sequence model": lambda c: _sequence_graph(constant_node=True),
}


def _fit(graph, acts, jacs):
    return graph.fit(acts, jacobians=jacs)


@pytest.mark.parametrize("kind", list(GRAPHS))
def test_every_fitted_graph_satisfies_the_invariants_load_checks(case, tmp_path, kind):
    """No false refusal: graphs of every configuration, ill-conditioned ones included, load."""
    graph = GRAPHS[kind](case)
    graph.save(tmp_path / "graph")
    loaded = InteractionGraph.load(tmp_path / "graph")
    for l, basis in enumerate(graph.bases_):
        Z = np.eye(basis.n_components_, dtype=basis.components_.dtype)
        np.testing.assert_array_equal(loaded.inverse_transform(l, Z), graph.inverse_transform(l, Z))
    for E, E_ref in zip(loaded.edges_, graph.edges_):
        np.testing.assert_array_equal(E, E_ref)


def test_invariant_tolerances_are_tight_enough_to_catch_small_edits(fitted, tmp_path):
    """A 1e-6 relative change of one Lambda breaks identity (b) far beyond rounding."""
    import copy

    graph = copy.deepcopy(fitted)
    graph.bases_[1].interaction_strengths_[0] *= 1 + 1e-6
    graph.save(tmp_path / "graph")
    with pytest.raises(ValueError, match=r"basis_1_interaction_strengths_.*identity \(b\)"):
        InteractionGraph.load(tmp_path / "graph")


def test_version_1_graphs_load_with_invariants_checked(fitted, case, tmp_path):
    """Graphs saved before the checksums load; their invariants are still checked."""
    path = tmp_path / "graph"
    fitted.save(path)

    def to_version_1(meta):
        meta["format_version"] = 1
        del meta["arrays"]

    _edit_meta(path, to_version_1)
    loaded = InteractionGraph.load(path)
    assert_same_up_to_rounding(loaded.transform(0, case["acts"][0]),
                               fitted.transform(0, case["acts"][0]))
    _edit_arrays(path, lambda a: a["basis_1_interaction_strengths_"].__setitem__(0, -1.0))
    with pytest.raises(ValueError, match="negative"):
        InteractionGraph.load(path)


def test_graph_json_stays_editable_but_arrays_are_checksummed(fitted, tmp_path):
    path = tmp_path / "graph"
    fitted.save(path)
    _edit_meta(path, lambda m: m["params"].update(verbose=True))  # a hand edit of a parameter
    assert InteractionGraph.load(path).verbose is True
    _edit_arrays(path, lambda a: a["basis_0_mean_"].__setitem__(0, 1.0))
    with pytest.raises(ValueError, match=r"basis_0_mean_'\] does not match the dtype, shape and "
                                         r"checksum save\(\) recorded"):
        InteractionGraph.load(path)


# --------------------------------------------------------------------------- devices
def test_load_maps_to_the_requested_device(fitted, tmp_path):
    fitted.save(tmp_path / "graph")
    loaded = InteractionGraph.load(tmp_path / "graph", device="auto")
    assert loaded.device == "auto" and {b.device for b in loaded.bases_} == {"auto"}
    with pytest.raises(ValueError, match="not a device torch knows"):
        InteractionGraph.load(tmp_path / "graph", device="gpu0")


def test_set_params_device_moves_the_fitted_bases(fitted):
    import copy

    graph = copy.deepcopy(fitted).set_params(device="auto")
    assert {b.device for b in graph.bases_} == {"auto"}
    assert {b.device for b in fitted.bases_} == {"cpu"}  # a copy, the original untouched


# --------------------------------------------------------------------------- overwrite
def test_overwrite_keeps_a_folder_with_foreign_files_and_names_them(fitted, tmp_path):
    path = tmp_path / "graph"
    fitted.save(path)
    (path / "README.txt").write_text("mine")
    (path / "empty").mkdir()  # an empty folder holds nothing to lose: not named
    with pytest.raises(FileExistsError, match=r"\['README.txt'\].*move them out"):
        fitted.save(path, overwrite=True)
    assert (path / "README.txt").read_text() == "mine"
    (path / "README.txt").unlink()
    fitted.save(path, overwrite=True)  # only ours left: replaced
    assert sorted(p.name for p in path.iterdir()) == ["arrays.npz", "graph.json"]
