"""Hostile battery of issue 20, classes 5 and 7: persistence, the cache and the ``--model`` CLI.

Every case is an input a careless or hostile user could give. The library must
either do the right thing or refuse in its own words (naming what was expected,
what was found and the fix) *before* doing work or damage. A case fails with

* :class:`SilentWrong` when the input was accepted and gave a wrong result,
* :class:`DataLoss` when a file the library did not write was destroyed,
* :class:`CrypticError` when it failed with a foreign message (a raw torch,
  numpy or Python error, or after the work it should have prevented),

so that the verdict of every case can be read off its failure.
"""

import copy
import errno
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _cases import MLP_LAYERS, relu_mlp_case
from torch import nn

from sklearn_lib.cache import ActivationCache
from sklearn_lib.graph import InteractionGraph

pytest.importorskip("zarr", minversion="3")


class SilentWrong(AssertionError):
    """The hostile input was accepted and gave a wrong result."""


class DataLoss(AssertionError):
    """A file the library did not write was destroyed."""


class CrypticError(AssertionError):
    """The input was refused, but with a foreign message or only after the work."""


def refused(call, error, match, harm=SilentWrong):
    """Run ``call``; it must raise ``error`` whose message matches ``match``."""
    try:
        result = call()
    except error as exc:
        if re.search(match, str(exc), flags=re.S):
            return exc
        raise CrypticError(f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise CrypticError(f"{type(exc).__name__}: {exc}") from exc
    raise harm(f"accepted, giving {result!r}")


# --------------------------------------------------------------------------- graph fixtures
LAYERS = MLP_LAYERS


@pytest.fixture(scope="module")
def case():
    """Activations and Jacobians of a float64 ReLU MLP 6-8-8-4 (edges_2 is square)."""
    return relu_mlp_case(150)


@pytest.fixture(scope="module")
def fitted(case):
    graph = InteractionGraph().fit(case["acts"], jacobians=case["jacs"])
    assert graph.edges_[2].shape[0] == graph.edges_[2].shape[1]
    return graph


def _edit_arrays(path, edit):
    with np.load(path / "arrays.npz") as npz:
        arrays = dict(npz)
    edit(arrays)
    np.savez(path / "arrays.npz", **arrays)


def _edit_json(file, edit):
    meta = json.loads(Path(file).read_text())
    edit(meta)
    Path(file).write_text(json.dumps(meta))


def _scale_row(a, key, row, factor):
    a[key][row] *= factor


def _negate(basis):
    basis.interaction_strengths_[-1] *= -1


def _swap_first(values):
    values[[0, 1]] = values[[1, 0]]


def _not_psd(basis):
    w, U = np.linalg.eigh(basis.gram_)
    basis.gram_ = basis.gram_ - 2 * w[-1] * np.outer(U[:, -1], U[:, -1])


def _asym(matrix):
    matrix[0, 1] += 0.1 * np.abs(matrix).max()


def _rescale_basis(basis):
    # Still inverse to each other, still sorted and positive: only SPEC identity (b) is broken.
    basis.components_ = basis.components_ * 2
    basis.inverse_components_ = basis.inverse_components_ / 2


def _mixed_dtype(graph):
    graph.bases_[0].mean_ = graph.bases_[0].mean_.astype(np.float32)


# Corruptions of a fitted graph made in memory and written by save(): a graph
# that is consistent as a file but violates an invariant every fitted graph has.
SAVED_CORRUPTIONS = {
    "negative Lambda": (lambda g: _negate(g.bases_[1]),
                        r"interaction_strengths_.*negative"),
    "unsorted Lambda": (lambda g: _swap_first(g.bases_[1].interaction_strengths_),
                        r"interaction_strengths_.*(descending|sorted)"),
    "inverse no longer inverts": (
        lambda g: setattr(g.bases_[0], "inverse_components_",
                          g.bases_[0].inverse_components_ * np.r_[1.01, np.ones(
                              g.bases_[0].n_components_ - 1)][:, None]),
        r"inverse_components_.*(invert|inverse)"),
    "inverse swapped for components": (
        lambda g: setattr(g.bases_[1], "inverse_components_", g.bases_[1].components_.copy()),
        r"inverse_components_.*(invert|inverse)"),
    "float16 array": (
        lambda g: setattr(g.bases_[0], "components_", g.bases_[0].components_.astype(np.float16)),
        r"components_.*float16.*(float32|float64)"),
    "float32 array in a float64 graph": (_mixed_dtype, r"mean_.*float32.*float64"),
    "repeated layer names": (lambda g: setattr(g, "layer_names_", ["a", "b", "a", "c"]),
                             r"layer_names_.*(repeat|unique|distinct).*'a'"),
    "non-symmetric Gram matrix": (lambda g: _asym(g.bases_[2].gram_),
                                  r"gram_.*symmetric"),
    "Gram matrix not positive semi-definite": (lambda g: _not_psd(g.bases_[1]),
                                               r"gram_.*positive semi-definite"),
    "non-symmetric Jacobian Gram matrix": (lambda g: _asym(g.bases_[0].jacobian_gram_),
                                           r"jacobian_gram_.*symmetric"),
    "negative edge": (lambda g: g.edges_[0].__setitem__((0, 0), -1.0),
                      r"edges_0.*negative"),
    "negative Gram eigenvalue": (
        lambda g: g.bases_[1].gram_eigenvalues_.__setitem__(-1, -1.0),
        r"gram_eigenvalues_.*negative"),
    "basis rescaled (identity b broken)": (lambda g: _rescale_basis(g.bases_[1]),
                                           r"interaction_strengths_.*components_.*gram_"),
    "Lambda doubled (identity b broken)": (
        lambda g: setattr(g.bases_[0], "interaction_strengths_",
                          g.bases_[0].interaction_strengths_ * 2),
        r"interaction_strengths_.*components_.*gram_"),
}


@pytest.mark.parametrize("corruption", list(SAVED_CORRUPTIONS))
def test_load_refuses_graph_violating_an_invariant(fitted, tmp_path, corruption):
    spoil, match = SAVED_CORRUPTIONS[corruption]
    graph = copy.deepcopy(fitted)
    spoil(graph)
    path = tmp_path / "graph"
    graph.save(path)
    exc = refused(lambda: InteractionGraph.load(path), ValueError, match)
    assert str(path) in str(exc)


# Edits of the saved files themselves (arrays.npz changed behind graph.json's back).
FILE_EDITS = {
    "square edge matrix transposed on disk": (
        lambda p: _edit_arrays(p, lambda a: a.update(edges_2=a["edges_2"].T.copy())),
        r"arrays.npz.*edges_2.*(checksum|changed)"),
    "mean_ edited on disk": (
        lambda p: _edit_arrays(p, lambda a: _scale_row(a, "basis_2_mean_", 0, 3.0)),
        r"arrays.npz.*basis_2_mean_.*(checksum|changed)"),
    "non-square edge matrix transposed on disk": (
        lambda p: _edit_arrays(p, lambda a: a.update(edges_0=a["edges_0"].T.copy())),
        r"edges_0.*shape"),
}


@pytest.mark.parametrize("edit", list(FILE_EDITS))
def test_load_refuses_arrays_edited_on_disk(fitted, tmp_path, edit):
    spoil, match = FILE_EDITS[edit]
    path = tmp_path / "graph"
    fitted.save(path)
    spoil(path)
    refused(lambda: InteractionGraph.load(path), ValueError, match)


# --------------------------------------------------------------------------- devices
def _saved_on_cuda(graph, path):
    """A graph as a CUDA machine saves it: every device parameter says "cuda"."""
    graph.save(path)

    def edit(meta):
        meta["params"]["device"] = "cuda"
        for layer in meta["bases"]:
            layer["params"]["device"] = "cuda"

    _edit_json(path / "graph.json", edit)


def _check_transform(loaded, fitted, case):
    for l, X in enumerate(case["acts"]):
        np.testing.assert_allclose(loaded.transform(l, X), fitted.transform(l, X),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CPU-only machine")
def test_graph_saved_on_cuda_loads_on_cpu_with_device(fitted, case, tmp_path):
    _saved_on_cuda(fitted, tmp_path / "graph")
    try:
        loaded = InteractionGraph.load(tmp_path / "graph", device="cpu")
        _check_transform(loaded, fitted, case)
    except Exception as exc:
        raise CrypticError(f"{type(exc).__name__}: {exc}") from exc
    assert loaded.device == "cpu" and all(b.device == "cpu" for b in loaded.bases_)


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CPU-only machine")
def test_graph_saved_on_cuda_loads_on_cpu_by_default_with_a_warning(fitted, case, tmp_path):
    _saved_on_cuda(fitted, tmp_path / "graph")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = InteractionGraph.load(tmp_path / "graph")
        _check_transform(loaded, fitted, case)
    except Exception as exc:
        raise CrypticError(f"{type(exc).__name__}: {exc}") from exc
    assert any("cuda" in str(w.message) and "cpu" in str(w.message) for w in caught)


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CPU-only machine")
def test_load_on_unavailable_cuda_is_refused_clearly(fitted, tmp_path):
    fitted.save(tmp_path / "graph")
    refused(lambda: InteractionGraph.load(tmp_path / "graph", device="cuda"), ValueError,
            r"CUDA is not available.*device='cpu'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CPU-only machine")
def test_set_params_device_reaches_the_bases(fitted, case):
    graph = copy.deepcopy(fitted)
    for basis in graph.bases_:  # a graph fitted on a GPU, used on a machine without one
        basis.device = "cuda"
    graph.set_params(device="cpu")
    try:
        _check_transform(graph, fitted, case)
    except Exception as exc:
        raise CrypticError(f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- cache
CACHE_LAYERS = {"a": (3,), "b": (2,)}
PAIR = ("a", "b")


def _batch(n, seed):
    rng = np.random.default_rng(seed)
    return ({name: rng.normal(size=(n, *shape)) for name, shape in CACHE_LAYERS.items()},
            {PAIR: rng.normal(size=(n, 2, 3))})


def _finished_cache(path, sizes=(2, 3), **kwargs):
    cache = ActivationCache.create(path, CACHE_LAYERS, jacobians=True, **kwargs)
    for seed, n in enumerate(sizes):
        cache.append(*_batch(n, seed))
    cache.finalize()
    return path


def _edit_description(path, edit):
    def change(meta):
        edit(meta["attributes"]["sklearn_lib_cache"])

    _edit_json(Path(path) / "zarr.json", change)


def _drop_chunk_from_inventory(description):
    key = next(k for k in sorted(description["inventory"]) if "/c/" in k)
    del description["inventory"][key]
    return key


DESCRIPTION_EDITS = {
    "n_samples lowered": lambda d: d.update(n_samples=d["n_samples"] - 1),
    "n_samples raised": lambda d: d.update(n_samples=d["n_samples"] + 1),
    "layer names swapped": lambda d: [d["layers"][0].update(name="b"),
                                      d["layers"][1].update(name="a")],
    "rows_per_sample edited": lambda d: d["layers"][1].update(rows_per_sample=5),
    "user metadata edited": lambda d: d.update(metadata={"collect": {"sequence": True}}),
    "dtype edited": lambda d: d.update(dtype="float32"),
}


@pytest.mark.parametrize("edit", list(DESCRIPTION_EDITS))
def test_cache_root_metadata_is_checked(tmp_path, edit):
    path = _finished_cache(tmp_path / "acts.zarr")
    _edit_description(path, DESCRIPTION_EDITS[edit])
    refused(lambda: ActivationCache.open(path), ValueError,
            r"zarr.json.*(checksum|changed|edited)")


def test_chunk_removed_from_inventory_and_disk_is_refused(tmp_path):
    path = _finished_cache(tmp_path / "acts.zarr", chunk_size=2)
    removed = []

    def edit(description):
        removed.append(_drop_chunk_from_inventory(description))

    _edit_description(path, edit)
    (path / removed[0]).unlink()
    refused(lambda: np.asarray(ActivationCache.open(path).activations("a")), ValueError,
            r"zarr.json.*(checksum|changed|edited)")


@pytest.mark.parametrize("name, value", [
    ("rows_per_sample", 1.7), ("rows_per_sample", True), ("rows_per_sample", "abc"),
    ("rows_per_sample", 2.5),
    ("chunk_size", 1.9), ("chunk_size", "abc"), ("chunk_size", True), ("chunk_size", None),
])
def test_cache_integer_parameters_are_not_truncated(tmp_path, name, value):
    kwargs = {"rows_per_sample": {"b": value}} if name == "rows_per_sample" else {name: value}

    def create():
        cache = ActivationCache.create(tmp_path / "acts.zarr", CACHE_LAYERS, **kwargs)
        cache.discard()
        return kwargs

    refused(create, (TypeError, ValueError),
            rf"{name}.*(int|integer).*{re.escape(repr(value))}")


@pytest.mark.parametrize("layers", [{1: (3,), "1": (2,)}, {"1": (3,), 1: (2,)}])
def test_cache_layer_names_that_collide_are_refused(tmp_path, layers):
    def create():
        cache = ActivationCache.create(tmp_path / "acts.zarr", layers)
        cache.discard()
        return cache.layers

    refused(create, (TypeError, ValueError), r"layer names.*str")


def _fail_write(monkeypatch, at, persistent=False):
    """Make the ``at``-th file write of zarr's local store (from now) fail as a full disk."""
    import zarr.storage._local as local

    real_put, calls = local._put, []

    def put(path, value, exclusive=False):
        calls.append(path)
        if len(calls) == at or (persistent and len(calls) > at):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", put)
    return calls


def _expected_rows(batches):
    return {name: np.concatenate([acts[name] for acts, _ in batches]) for name in CACHE_LAYERS}


def _check_cache_holds(path, batches):
    cache = ActivationCache.open(path)
    expected = _expected_rows(batches)
    n = sum(len(acts["a"]) for acts, _ in batches)
    if cache.n_samples != n:
        raise SilentWrong(f"n_samples {cache.n_samples}, expected {n}")
    for name, rows in expected.items():
        found = np.asarray(cache.activations(name))
        if found.shape != rows.shape or not np.array_equal(found, rows):
            raise SilentWrong(f"layer {name!r}: {found.shape} rows differ from the appended "
                              f"{rows.shape}")
    jac = np.concatenate([jacs[PAIR] for _, jacs in batches])
    if not np.array_equal(np.asarray(cache.jacobians(*PAIR)), jac):
        raise SilentWrong("Jacobians differ from the appended ones")


# Writes of one append of a 3-array cache: a resize (metadata) and a chunk per array;
# after the failure, the cache is finalized at once or after one more batch.
@pytest.mark.parametrize("then", ["finalize", "append"])
@pytest.mark.parametrize("at", range(1, 7))
def test_failed_append_leaves_cache_as_before(tmp_path, monkeypatch, at, then):
    path = tmp_path / "acts.zarr"
    cache = ActivationCache.create(path, CACHE_LAYERS, jacobians=True, chunk_size=4)
    batches = [_batch(1, 0)]
    cache.append(*batches[0])
    _fail_write(monkeypatch, at)
    with pytest.raises(OSError):
        cache.append(*_batch(1, 1))
    monkeypatch.undo()
    if then == "append":
        batches.append(_batch(2, 2))
        cache.append(*batches[-1])
    try:
        cache.finalize()
    except Exception as exc:
        raise CrypticError(f"{type(exc).__name__}: {exc}") from exc
    _check_cache_holds(path, batches)


def test_interrupted_append_leaves_cache_as_before(tmp_path, monkeypatch):
    import zarr

    path = tmp_path / "acts.zarr"
    cache = ActivationCache.create(path, CACHE_LAYERS, jacobians=True)
    first = _batch(2, 0)
    cache.append(*first)
    # Ctrl-C arrives in the main thread, here once the first array of the batch is written.
    real_setitem, calls = zarr.Array.__setitem__, []

    def setitem(self, key, value):
        calls.append(key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)
    with pytest.raises(KeyboardInterrupt):
        cache.append(*_batch(3, 1))
    monkeypatch.undo()
    try:
        cache.finalize()
    except Exception as exc:
        raise CrypticError(f"{type(exc).__name__}: {exc}") from exc
    _check_cache_holds(path, [first])


def test_append_on_a_disk_that_stays_full_never_finalizes_a_wrong_cache(tmp_path,
                                                                         monkeypatch):
    path = tmp_path / "acts.zarr"
    cache = ActivationCache.create(path, CACHE_LAYERS, jacobians=True)
    first = _batch(1, 0)
    cache.append(*first)
    _fail_write(monkeypatch, 3, persistent=True)
    with pytest.raises(OSError):
        cache.append(*_batch(1, 1))
    try:
        cache.finalize()
    except OSError:
        pass  # the disk is still full: nothing may appear at the path
    except Exception as exc:
        raise CrypticError(f"{type(exc).__name__}: {exc}") from exc
    monkeypatch.undo()
    if os.path.exists(path):
        _check_cache_holds(path, [first])
    else:
        cache.finalize()  # space again: the cache is the one before the failed append
        _check_cache_holds(path, [first])


# --------------------------------------------------------------------------- overwrite
def _user_file(folder, relative="notes.txt"):
    file = Path(folder) / relative
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("the user's own notes")
    return file


def _still_there(file):
    if not Path(file).exists():
        raise DataLoss(f"{file} was deleted")


@pytest.mark.parametrize("relative", ["notes.txt", "activations/mine/data.csv"])
def test_cache_overwrite_refuses_folder_holding_user_files(tmp_path, relative):
    path = _finished_cache(tmp_path / "acts.zarr")
    mine = _user_file(path, relative)

    def replace():
        _finished_cache(path, overwrite=True)
        return "replaced"

    try:
        refused(replace, FileExistsError, re.escape(relative), harm=DataLoss)
    finally:
        _still_there(mine)


def test_graph_overwrite_refuses_folder_holding_user_files(fitted, tmp_path):
    path = tmp_path / "graph"
    fitted.save(path)
    mine = _user_file(path, "plots/figure.png")
    try:
        refused(lambda: fitted.save(path, overwrite=True), FileExistsError,
                r"plots/figure.png", harm=DataLoss)
    finally:
        _still_there(mine)


def test_write_graphml_refuses_existing_file(fitted, tmp_path):
    from sklearn_lib.export import write_graphml

    target = tmp_path / "graph.graphml"
    target.write_text("the user's own file")
    try:
        refused(lambda: write_graphml(fitted, target), FileExistsError, r"overwrite",
                harm=DataLoss)
    finally:
        if target.read_text() != "the user's own file":
            raise DataLoss(f"{target} was replaced")


def test_write_graphml_replaces_only_its_own_file(fitted, tmp_path):
    pytest.importorskip("networkx")
    from sklearn_lib.export import write_graphml

    target = tmp_path / "graph.graphml"
    target.write_text("<?xml version='1.0'?><graphml><graph/></graphml>")  # not ours
    try:
        refused(lambda: write_graphml(fitted, target, overwrite=True), FileExistsError,
                r"not a GraphML file written by", harm=DataLoss)
    finally:
        if "graph/" not in target.read_text():
            raise DataLoss(f"{target} was replaced")


def test_write_graphml_refuses_its_own_file_without_overwrite(fitted, tmp_path):
    pytest.importorskip("networkx")
    from sklearn_lib.export import write_graphml

    target = tmp_path / "graph.graphml"
    write_graphml(fitted, target, norm="sqrt")
    before = target.read_bytes()
    try:
        refused(lambda: write_graphml(fitted, target), FileExistsError, r"overwrite=True",
                harm=DataLoss)
    finally:
        if target.read_bytes() != before:
            raise DataLoss(f"{target} was replaced")


@pytest.mark.skipif(os.name != "posix", reason="symbolic links are POSIX")
def test_write_graphml_refuses_a_symbolic_link(fitted, tmp_path):
    pytest.importorskip("networkx")
    from sklearn_lib.export import write_graphml

    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("the user's own file")
    link = tmp_path / "graph.graphml"
    link.symlink_to(elsewhere)
    try:
        refused(lambda: write_graphml(fitted, link), FileExistsError, r"symbolic link",
                harm=DataLoss)
    finally:
        if elsewhere.read_text() != "the user's own file":
            raise DataLoss(f"{elsewhere} was replaced through the link")


# --------------------------------------------------------------------------- the --model CLI
FACTORY = '''
import torch

def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
'''


class WorkStarted(Exception):
    """The graphs were being fitted: the input should have been refused before."""


def _nan_at(row, n=60):
    X = np.random.default_rng(0).normal(size=(n, 4))
    X[row, 1] = np.nan
    return X


_X = np.random.default_rng(0).normal(size=(60, 4))
CLI_CASES = {
    "data of the wrong width": (np.ones((60, 5)), None, r"--data.*(shape|width|features)"),
    "integer data for a float model": ((_X * 3).astype(np.int64), None, r"--data.*int"),
    "string data": (_X.astype(str), None, r"--data.*(str|<U|numbers)"),
    "npz data with an extra key": ({"input": _X, "junk": _X}, None, r"--data.*junk"),
    "NaN in the evaluation half": (_nan_at(45), None, r"--data.*NaN.*45"),
    "NaN in the fitting half": (_nan_at(5), None, r"--data.*NaN.*5"),
    "infinity in the data": (np.where(np.arange(60)[:, None] == 7, np.inf, _X), None,
                             r"--data.*infinit"),
    "missing labels file": (_X, "MISSING", r"--labels.*(no such|not found|does not exist)"),
    "npz labels with two arrays": (_X, {"y": np.arange(60) % 3, "z": np.arange(60)},
                                   r"--labels.*\.npz.*\['y', 'z'\]"),
    "fractional labels": (_X, np.arange(60) * 0.5, r"--labels.*integer"),
    "NaN labels": (_X, np.where(np.arange(60) == 40, np.nan, np.arange(60) % 3),
                   r"--labels.*(integer|NaN)"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_refuses_bad_inputs_before_any_work(tmp_path, monkeypatch, capsys, name):
    from sklearn_lib.demo import _user_model, main

    data, labels, match = CLI_CASES[name]
    (tmp_path / "nets.py").write_text(FACTORY)
    if isinstance(data, dict):
        data_file = tmp_path / "x.npz"
        np.savez(data_file, **data)
    else:
        data_file = tmp_path / "x.npy"
        np.save(data_file, data)
    argv = ["--model", f"{tmp_path / 'nets.py'}:make", "--layers", "0", "1", "2",
            "--data", str(data_file), "--output", str(tmp_path / "out"), "--quiet"]
    if isinstance(labels, str):
        argv += ["--labels", str(tmp_path / "no_labels.npy")]
    elif isinstance(labels, dict):
        np.savez(tmp_path / "y.npz", **labels)
        argv += ["--labels", str(tmp_path / "y.npz")]
    elif labels is not None:
        np.save(tmp_path / "y.npy", labels)
        argv += ["--labels", str(tmp_path / "y.npy")]

    def work(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(_user_model, "_compare", work)
    try:
        main(argv)
    except SystemExit as exc:
        message = capsys.readouterr().err
        if exc.code != 2 or not re.search(match, message, flags=re.S):
            raise CrypticError(message) from None
        return
    except WorkStarted:
        raise CrypticError("the graphs were fitted before the input was refused") from None
    except Exception as exc:
        raise CrypticError(f"{type(exc).__name__}: {exc}") from exc
    raise SilentWrong("the CLI ran on it")


# --------------------------------------------------------------------------- layers and data
def _seq_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))


@pytest.mark.parametrize("layers, match", [
    (["0[::0]", "2"], r"'0\[::0\]'.*step"),
    (["0[0]", "0[1]", "2"], r"'0\[0\]'.*'0\[1\]'.*same.*'0\[0, 1\]'"),
    (["0[0:2:0]", "2"], r"'0\[0:2:0\]'.*step"),
])
def test_layer_specs_are_refused_in_our_words(layers, match):
    X = torch.randn(10, 5, 4)
    refused(lambda: InteractionGraph().fit_model(_seq_model(), layers, X, sequence=True),
            ValueError, match)


def test_cache_rows_per_sample_not_a_dict_is_refused(tmp_path):
    refused(lambda: ActivationCache.create(tmp_path / "c.zarr", CACHE_LAYERS, rows_per_sample=2),
            TypeError, r"rows_per_sample must be a dict.*2")


def test_fit_model_takes_a_dataframe_as_its_array(case):
    pd = pytest.importorskip("pandas")
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    X = np.random.default_rng(0).normal(size=(100, 4))
    try:
        from_frame = InteractionGraph().fit_model(net, [":input", "1", "2"],
                                                  pd.DataFrame(X, columns=list("abcd")))
    except Exception as exc:
        raise CrypticError(f"{type(exc).__name__}: {exc}") from exc
    from_array = InteractionGraph().fit_model(net, [":input", "1", "2"], X)
    for E, E_ref in zip(from_frame.edges_, from_array.edges_):
        np.testing.assert_allclose(E, E_ref, rtol=1e-12, atol=1e-15)


def test_fit_model_refuses_a_dataframe_with_text_columns():
    pd = pytest.importorskip("pandas")
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    frame = pd.DataFrame(np.zeros((20, 4)), columns=list("abcd")).assign(d=["x"] * 20)
    refused(lambda: InteractionGraph().fit_model(net, [":input", "1", "2"], frame),
            (TypeError, ValueError), r"DataFrame.*'d'")
