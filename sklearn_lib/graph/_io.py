"""Saving and loading a fitted :class:`~sklearn_lib.InteractionGraph` (JSON + .npz, no pickle).

A saved graph is a directory: ``graph.json`` holds the parameters and per-layer
scalars, ``arrays.npz`` the basis matrices and the edges.
:meth:`InteractionGraph.save <sklearn_lib.InteractionGraph.save>` and
:meth:`InteractionGraph.load <sklearn_lib.InteractionGraph.load>` delegate here.

The directory is written next to its path and moved into place by
:mod:`sklearn_lib.utils._atomic`, so a path holds the old or the new graph at every
instant (a save killed between its two renames is undone by the next load or
save). Loading checks every parameter and the shape of every array against the
format before anything is constructed, and names the file at fault.
"""

import json
import os
import shutil
import zipfile
import zlib
from numbers import Integral

import numpy as np

from ..basis._basis import InteractionBasis
from ..utils._atomic import check_target, make_temp_dir, replace_dir, tidy

_FORMAT = "sklearn_lib.InteractionGraph"
_FORMAT_VERSION = 1
_WHAT = "saved InteractionGraph"
_BASIS_ARRAYS = (
    "components_",
    "inverse_components_",
    "mean_",
    "interaction_strengths_",
    "gram_eigenvalues_",
    "gram_",
    "jacobian_gram_",
)
_BASIS_SCALARS = ("n_components_", "n_samples_seen_", "n_outputs_", "n_features_in_")
_EDGE_POINTS = ("data", "reconstructed")


def save_graph(graph, path, *, overwrite=False):
    """Write the fitted ``graph`` to the directory ``path``; see ``InteractionGraph.save``."""
    path = os.path.abspath(os.fspath(path))
    tidy(path, _is_complete_graph, _WHAT)
    check_target(path, overwrite, _is_saved_graph, _WHAT)
    meta, arrays = _encode(graph)
    # Serialise before creating anything, so that a parameter JSON cannot hold
    # fails without leaving a directory behind.
    text = json.dumps(meta, indent=1, allow_nan=False)
    tmp = make_temp_dir(path, "InteractionGraph")
    try:
        with open(os.path.join(tmp, "graph.json"), "w", encoding="utf-8") as f:
            f.write(text)
        np.savez(os.path.join(tmp, "arrays.npz"), **arrays)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _encode(graph):
    """The JSON description and the arrays of a fitted graph."""
    params = {k: _plain(v) for k, v in graph.get_params().items()}
    params["device"] = str(params["device"])
    if not (params["random_state"] is None or isinstance(params["random_state"], Integral)):
        params["random_state"] = None
    arrays = {f"edges_{l}": E for l, E in enumerate(graph.edges_)}
    layers = []
    for l, basis in enumerate(graph.bases_):
        for name in _BASIS_ARRAYS:
            arrays[f"basis_{l}_{name}"] = getattr(basis, name)
        layers.append({
            "params": {k: (str(v) if k == "device" else _plain(v))
                       for k, v in basis.get_params().items()},
            "n_components_": int(basis.n_components_),
            "n_samples_seen_": int(basis.n_samples_seen_),
            "n_outputs_": None if basis.n_outputs_ is None else int(basis.n_outputs_),
            "n_features_in_": int(basis.n_features_in_),
        })
    meta = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "params": params,
        "layer_names_": list(graph.layer_names_),
        "n_samples_seen_": int(graph.n_samples_seen_),
        "edge_point_": graph.edge_point_,
        "fast_path_": [bool(f) for f in graph.fast_path_],
        "bases": layers,
    }
    return meta, arrays


def _plain(value):
    """``value`` with numpy scalars and tuples turned into what JSON holds."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_graph(cls, path):
    """Read a graph written by :func:`save_graph` as a fitted ``cls``."""
    path = os.path.abspath(os.fspath(path))
    pending = tidy(path, _is_complete_graph, _WHAT)
    if not os.path.lexists(path):
        hint = (f" Unfinished saves exist next to it ({', '.join(pending)})." if pending else "")
        raise FileNotFoundError(f"no saved InteractionGraph at {path!r}.{hint}")
    meta_file = os.path.join(path, "graph.json")
    try:
        with open(meta_file, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        raise ValueError(
            f"{path!r} is not a graph saved by InteractionGraph.save (no readable graph.json)."
        ) from None
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{meta_file!r} is damaged: it is not valid JSON ({exc}).") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{path!r} is not a graph saved by InteractionGraph.save.")
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has format version {meta.get('format_version')}, this library "
            f"reads version {_FORMAT_VERSION}."
        )
    problems = []
    graph, bases = _decode_meta(cls, meta, problems)
    arrays = _read_arrays(os.path.join(path, "arrays.npz"))
    if not problems:
        _check_arrays(meta, arrays, problems, graph)
    if problems:
        raise ValueError(
            f"the graph saved at {path!r} does not match its format (graph.json, "
            "arrays.npz):\n  " + "\n  ".join(problems)
        )
    for l, basis in enumerate(bases):
        for name in _BASIS_ARRAYS:
            setattr(basis, name, arrays[f"basis_{l}_{name}"])
    n_layers = len(bases)
    r = np.array([b.n_components_ for b in bases], dtype=np.int64)
    return graph._set_fitted({
        "bases_": bases,
        "edges_": [arrays[f"edges_{l}"] for l in range(n_layers - 1)],
        "n_components_": r,
        "layer_offsets_": graph._layer_offsets(r),
        "n_layers_": n_layers,
        "layer_names_": meta["layer_names_"],
        "n_samples_seen_": meta["n_samples_seen_"],
        "edge_point_": meta["edge_point_"],
        "fast_path_": meta["fast_path_"],
    })


def _construct(cls, params, where, problems):
    """``cls(**params)`` with its parameters validated, or None with the problem recorded."""
    if not isinstance(params, dict):
        problems.append(f"{where}: expected a dict of parameters, got {params!r}")
        return None
    try:
        estimator = cls(**params)
        estimator._validate_params()
    except (TypeError, ValueError) as exc:  # InvalidParameterError is both
        problems.append(f"{where}: {exc}")
        return None
    return estimator


def _is_count(value, minimum=1):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _decode_meta(cls, meta, problems):
    """The graph and its bases (without arrays) from ``graph.json``; problems are collected."""
    missing = [key for key in ("params", "layer_names_", "n_samples_seen_", "edge_point_",
                               "fast_path_", "bases") if key not in meta]
    if missing:
        problems.append(f"graph.json lacks the keys {missing}")
        return None, []
    graph = _construct(cls, meta["params"], "params", problems)
    layers = meta["bases"]
    if not isinstance(layers, list) or len(layers) < 2:
        problems.append(f"bases: expected a list of at least 2 layers, got {layers!r}")
        return graph, []
    n_layers = len(layers)
    names = meta["layer_names_"]
    if not (isinstance(names, list) and len(names) == n_layers
            and all(isinstance(n, str) for n in names)):
        problems.append(f"layer_names_: expected {n_layers} strings, got {names!r}")
    if not _is_count(meta["n_samples_seen_"]):
        problems.append(f"n_samples_seen_: expected a positive int, got "
                        f"{meta['n_samples_seen_']!r}")
    if meta["edge_point_"] not in _EDGE_POINTS:
        problems.append(f"edge_point_: expected one of {list(_EDGE_POINTS)}, got "
                        f"{meta['edge_point_']!r}")
    fast = meta["fast_path_"]
    if not (isinstance(fast, list) and len(fast) == n_layers - 1
            and all(isinstance(f, bool) for f in fast)):
        problems.append(f"fast_path_: expected {n_layers - 1} booleans, got {fast!r}")
    bases = []
    for l, layer in enumerate(layers):
        where = f"bases[{l}]"
        if not isinstance(layer, dict) or not {"params", *_BASIS_SCALARS} <= set(layer):
            problems.append(f"{where}: expected a dict with the keys "
                            f"{['params', *_BASIS_SCALARS]}, got {layer!r}")
            continue
        basis = _construct(InteractionBasis, layer["params"], f"{where}.params", problems)
        d, r = layer["n_features_in_"], layer["n_components_"]
        if not (_is_count(d) and _is_count(r) and r <= d):
            problems.append(f"{where}: expected 1 <= n_components_ <= n_features_in_, got "
                            f"n_components_={r!r}, n_features_in_={d!r}")
        if not _is_count(layer["n_samples_seen_"]):
            problems.append(f"{where}.n_samples_seen_: expected a positive int, got "
                            f"{layer['n_samples_seen_']!r}")
        if not (layer["n_outputs_"] is None or _is_count(layer["n_outputs_"])):
            problems.append(f"{where}.n_outputs_: expected None or a positive int, got "
                            f"{layer['n_outputs_']!r}")
        if basis is not None:
            for name in _BASIS_SCALARS:
                setattr(basis, name, layer[name])
        bases.append(basis)
    return graph, bases


def _read_arrays(file):
    """Every array of ``arrays.npz``; a damaged file raises naming it."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise ValueError(f"the saved graph lacks its arrays: {file!r} does not exist.") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(
            f"{file!r} is damaged (truncated or corrupted) and cannot be read: {exc}"
        ) from None


def _check_arrays(meta, arrays, problems, graph):
    """Every array present, of the shape the scalars imply, real and finite; none extra."""
    layers = meta["bases"]
    r = [layer["n_components_"] for layer in layers]
    nodes = np.diff(graph._layer_offsets(r)).tolist()  # constant nodes included
    expected = {f"edges_{l}": (nodes[l + 1], nodes[l]) for l in range(len(layers) - 1)}
    for l, layer in enumerate(layers):
        d, k = layer["n_features_in_"], layer["n_components_"]
        expected.update({
            f"basis_{l}_components_": (k, d),
            f"basis_{l}_inverse_components_": (k, d),
            f"basis_{l}_mean_": (d,),
            f"basis_{l}_interaction_strengths_": (k,),
            f"basis_{l}_gram_eigenvalues_": (d,),
            f"basis_{l}_gram_": (d, d),
            f"basis_{l}_jacobian_gram_": (d, d),
        })
    missing = [key for key in expected if key not in arrays]
    extra = [key for key in arrays if key not in expected]
    if missing or extra:
        problems.append(f"arrays.npz: missing arrays {missing}, unexpected arrays {extra}")
    for key, shape in expected.items():
        array = arrays.get(key)
        if array is None:
            continue
        if array.dtype.kind != "f":
            problems.append(f"arrays.npz[{key!r}]: expected floats, got dtype {array.dtype}")
        elif array.shape != shape:
            problems.append(f"arrays.npz[{key!r}]: expected shape {shape}, got {array.shape}")
        elif not np.isfinite(array).all():
            problems.append(f"arrays.npz[{key!r}]: holds NaN or infinite values")


def _is_saved_graph(path):
    """True if ``path/graph.json`` declares the format (the graph may be damaged)."""
    try:
        with open(os.path.join(path, "graph.json"), encoding="utf-8") as f:
            return json.load(f).get("format") == _FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_complete_graph(path):
    return _is_saved_graph(path) and os.path.isfile(os.path.join(path, "arrays.npz"))
