"""Saving and loading a fitted :class:`~sklearn_lib.InteractionGraph` (JSON + .npz, no pickle).

A saved graph is a directory: ``graph.json`` holds the parameters, per-layer
scalars and the dtype, shape and CRC-32 of every array; ``arrays.npz`` the
basis matrices and the edges.
:meth:`InteractionGraph.save <sklearn_lib.InteractionGraph.save>` and
:meth:`InteractionGraph.load <sklearn_lib.InteractionGraph.load>` delegate here.

The directory is written next to its path and moved into place by
:mod:`sklearn_lib.utils._atomic`, so a path holds the old or the new graph at every
instant (a save killed between its two renames is undone by the next load or
save). ``overwrite=True`` replaces only a folder that holds a saved graph and
nothing else: a file a user put inside is named and kept.

Loading checks, before anything is constructed, and names the file at fault:

* every parameter and the shape of every array against the format;
* that every array is the one ``save`` wrote (its CRC-32 in ``graph.json``;
  ``graph.json`` itself stays editable, e.g. its ``device``);
* the invariants every fitted graph satisfies, to a tolerance scaled by the
  dtype's eps and the conditioning: arrays in the graph's dtype (float32 or
  float64); unique layer names; ``interaction_strengths_`` non-negative and,
  for rotated layers, sorted descending; ``inverse_components_`` a left
  inverse of ``components_``; ``gram_`` and ``jacobian_gram_`` symmetric
  positive semi-definite; ``gram_eigenvalues_`` non-negative and descending;
  SPEC identity (b), ``C^T G C = diag(Lambda)``, for rotated layers; edges
  non-negative. An edge matrix transposed by hand is caught by its shape, or,
  when square, by its checksum: a square one transposed *and* re-saved (e.g.
  through ``edges_``) satisfies every invariant edges have, since the edges of
  a non-linear section obey no identity that fixes their orientation.

Graphs of format version 1 (no checksums) still load, with the invariants checked.
"""

import json
import os
import shutil
import warnings
import zipfile
import zlib
from numbers import Integral

import numpy as np

from ..basis._basis import InteractionBasis
from ..utils._atomic import (
    check_target,
    foreign_files,
    make_temp_dir,
    replace_dir,
    tidy,
)
from ..utils._backend import resolve_device

_FORMAT = "sklearn_lib.InteractionGraph"
# Version 2 added the checksum of every array.
_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_WHAT = "saved InteractionGraph"
_FILES = ("graph.json", "arrays.npz")
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
_DTYPES = ("float32", "float64")
# Rounding slack of the invariant checks, in units of ``size * eps * scale``:
# a backward-stable fit stays far inside, a hand-made or edited array does not.
_SLACK = 64


def save_graph(graph, path, *, overwrite=False):
    """Write the fitted ``graph`` to the directory ``path``; see ``InteractionGraph.save``."""
    path = os.path.abspath(os.fspath(path))
    wide = [l for l, basis in enumerate(graph.bases_) if basis.gram_ is None]
    if wide:
        # Fitted without d x d statistics (graph._final): the format stores them.
        raise ValueError(
            f"cannot save this graph: layer {wide[0]} has {graph.bases_[wide[0]].n_features_in_:,} "
            "features and was fitted without its d x d statistics (gram_ is None), which the "
            "saved format holds; expected a final layer of at most "
            "sklearn_lib.graph._final.GRAM_LIMIT features. Keep the fitted object (pickle "
            "it) or save its edges_ and bases_ yourself.")
    tidy(path, _is_complete_graph, _WHAT)
    check_target(path, overwrite, _is_saved_graph, _WHAT, foreign=_foreign_files)
    meta, arrays = _encode(graph)
    # Serialise before creating anything, so that a parameter JSON cannot hold
    # fails without leaving a directory behind.
    text = json.dumps(meta, indent=1, allow_nan=False)
    tmp = make_temp_dir(path, "InteractionGraph")
    try:
        with open(os.path.join(tmp, "graph.json"), "w", encoding="utf-8") as f:
            f.write(text)
        np.savez(os.path.join(tmp, "arrays.npz"), **arrays)
        # Another writer may have finished at the path since the first check.
        check_target(path, overwrite, _is_saved_graph, _WHAT, foreign=_foreign_files)
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
    arrays = {f"edges_{l}": np.ascontiguousarray(E) for l, E in enumerate(graph.edges_)}
    layers = []
    for l, basis in enumerate(graph.bases_):
        for name in _BASIS_ARRAYS:
            arrays[f"basis_{l}_{name}"] = np.ascontiguousarray(getattr(basis, name))
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
        "arrays": {key: _fingerprint(array) for key, array in arrays.items()},
    }
    return meta, arrays


def _fingerprint(array):
    """What ``graph.json`` records of an array: dtype, shape and the CRC-32 of its bytes."""
    data = np.ascontiguousarray(array)
    return {"dtype": data.dtype.str, "shape": list(data.shape),
            "crc32": zlib.crc32(memoryview(data).cast("B"))}


def _plain(value):
    """``value`` with numpy scalars and tuples turned into what JSON holds."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_graph(cls, path, device=None):
    """Read a graph written by :func:`save_graph` as a fitted ``cls`` on ``device``.

    ``device=None`` keeps the device the graph was saved with where this
    machine has it, and maps it to the CPU with a warning where it does not
    (a graph fitted on a GPU, loaded on a machine without one).
    """
    if device is not None:
        device = _check_device(device)
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
    if meta.get("format_version") not in _READABLE_VERSIONS:
        raise ValueError(
            f"{path!r} has format version {meta.get('format_version')}, this library "
            f"reads versions {list(_READABLE_VERSIONS)}."
        )
    problems = []
    graph, bases = _decode_meta(cls, meta, problems)
    arrays = _read_arrays(os.path.join(path, "arrays.npz"))
    if not problems:
        _check_arrays(meta, arrays, problems, graph)
    if not problems:
        _check_checksums(meta, arrays, problems)
    if not problems:
        _check_invariants(meta, arrays, problems, graph)
    if problems:
        raise ValueError(
            f"the graph saved at {path!r} does not match its format or is not a graph a fit "
            "can produce (graph.json, arrays.npz):\n  " + "\n  ".join(problems)
        )
    device = _loaded_device(meta["params"].get("device", "cpu"), device, path)
    graph.set_params(device=device)
    for l, basis in enumerate(bases):
        basis.set_params(device=device)
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


def _check_device(device):
    """``device`` if torch has it on this machine, else the ValueError of resolve_device."""
    if device == "auto":
        return device
    resolve_device(device)
    return device


def _loaded_device(saved, requested, path):
    """The device the loaded graph computes on: the requested, else the saved one if present."""
    if requested is not None:
        return requested
    try:
        return _check_device(saved)
    except (TypeError, ValueError) as exc:
        warnings.warn(
            f"the graph at {path!r} was saved with device={saved!r}, which this machine "
            f"does not have ({exc}); it is loaded with device='cpu'. Pass "
            "InteractionGraph.load(path, device=...) to choose.",
            UserWarning,
            stacklevel=4,
        )
        return "cpu"


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
    else:
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            problems.append(f"layer_names_: expected unique names (a fit gives every layer its "
                            f"own), found {repeated} repeated in {names!r}")
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


def _check_checksums(meta, arrays, problems):
    """Every array is the one save() recorded in graph.json (format version 2)."""
    if meta["format_version"] < 2:
        return
    recorded = meta.get("arrays")
    if not isinstance(recorded, dict) or set(recorded) != set(arrays):
        problems.append("graph.json: 'arrays' must record every array of arrays.npz, got "
                        f"{sorted(recorded) if isinstance(recorded, dict) else recorded!r}")
        return
    for key, array in arrays.items():
        if recorded[key] != _fingerprint(array):
            problems.append(
                f"arrays.npz[{key!r}] does not match the dtype, shape and checksum save() "
                f"recorded in graph.json: it was changed after the graph was saved "
                f"(recorded {recorded[key]}, found {_fingerprint(array)}). Save the graph "
                "again, or restore the folder from an intact copy"
            )


def _check_invariants(meta, arrays, problems, graph):
    """The properties every fitted graph has, to rounding; each violation names its array."""
    dtype = np.dtype(str(meta["params"].get("dtype", "float64")))
    for key, array in arrays.items():
        if array.dtype != dtype:
            problems.append(
                f"arrays.npz[{key!r}]: dtype {array.dtype}, but the graph's dtype is "
                f"{dtype.name}: a fitted graph holds every array in its dtype "
                f"({' or '.join(_DTYPES)})"
            )
    if problems:
        return
    if dtype.name not in _DTYPES:  # pragma: no cover - the parameter check refuses it first
        problems.append(f"params.dtype: expected one of {list(_DTYPES)}, got {dtype.name}")
        return
    eps = float(np.finfo(dtype).eps)
    n_layers = len(meta["bases"])
    for l in range(n_layers):
        # A final layer left unrotated holds the identity and the features' mean squares.
        rotated = not (l == n_layers - 1 and graph.final_layer == "identity")
        basis = {name: arrays[f"basis_{l}_{name}"].astype(np.float64)
                 for name in _BASIS_ARRAYS}
        for problem in _basis_problems(basis, rotated, eps):
            problems.append(f"arrays.npz['basis_{l}_{problem}")
    for l in range(n_layers - 1):
        E = arrays[f"edges_{l}"]
        if (E < 0).any():
            i, j = np.unravel_index(np.argmin(E), E.shape)
            problems.append(f"arrays.npz['edges_{l}']: holds negative values ({E[i, j]:.3g} at "
                            f"[{i}, {j}]); edges are means of squares")


def _basis_problems(basis, rotated, eps):
    """What in one layer's arrays (as float64) no fit produces; ``"<name>']: ..."`` strings.

    Tolerances are per entry: the rounding error of ``a_i . b_j`` in a
    backward-stable fit or product is a small multiple of ``size * eps *
    |a_i| |b_j|``, so each entry is held to what its own vectors allow (a
    strong direction cannot hide an edit of a weak one). ``|G|_inf``, an
    upper bound of ``|G|_2`` for symmetric ``G``, keeps this O(d^2 r).
    """
    C, C_pinv = basis["components_"].T, basis["inverse_components_"]
    Lambda, D = basis["interaction_strengths_"], basis["gram_eigenvalues_"]
    G, M = basis["gram_"], basis["jacobian_gram_"]
    d, r = C.shape
    size = max(d, r)
    if (Lambda < 0).any():
        yield (f"interaction_strengths_']: holds negative values ({Lambda.min():.3g}); "
               "interaction strengths are eigenvalues of a second moment")
    elif rotated and (np.diff(Lambda) > _SLACK * eps * Lambda.max()).any():
        yield (f"interaction_strengths_']: not sorted descending ({Lambda.tolist()}); a fit "
               "sorts the directions by strength")
    c_norms = np.linalg.norm(C, axis=0)
    error = np.abs(C_pinv @ C - np.eye(r))
    allowed = _SLACK * size * eps * np.maximum(
        np.outer(np.linalg.norm(C_pinv, axis=1), c_norms), 1.0)
    if not (error <= allowed).all():
        i, j = np.unravel_index(np.argmax(error / allowed), error.shape)
        yield (f"inverse_components_']: does not invert components_: entry [{i}, {j}] of "
               f"inverse_components_ @ components_.T is {error[i, j] + (i == j):.6g} where "
               f"the identity has {int(i == j)} (rounding allows {allowed[i, j]:.3g})")
    for name, S in (("gram_", G), ("jacobian_gram_", M)):
        yield from _psd_problems(name, S, eps)
    top = np.abs(D).max(initial=0.0)
    if (D < -_SLACK * d * eps * top).any():
        yield (f"gram_eigenvalues_']: holds negative values ({D.min():.3g}); eigenvalues of a "
               "Gram matrix are non-negative")
    elif (np.diff(D) > _SLACK * d * eps * top).any():
        yield "gram_eigenvalues_']: not sorted descending"
    if rotated and np.isfinite(G).all():
        # SPEC identity (b): the coordinates' second moment is diag(Lambda).
        error = np.abs(C.T @ (G @ C) - np.diag(Lambda))
        allowed = _SLACK * size * eps * np.abs(G).sum(axis=1).max() * np.outer(c_norms, c_norms)
        allowed = np.maximum(allowed, np.finfo(np.float64).tiny)
        if not (error <= allowed).all():
            i, j = np.unravel_index(np.argmax(error / allowed), error.shape)
            yield (f"interaction_strengths_']: does not match components_ and gram_: SPEC "
                   f"identity (b) C^T G C = diag(Lambda) is off by {error[i, j]:.3g} at "
                   f"[{i}, {j}] (rounding allows {allowed[i, j]:.3g}; Lambda there "
                   f"{Lambda[i] if i == j else 0.0:.6g})")


def _psd_problems(name, S, eps):
    """Symmetric positive semi-definite to rounding; a Cholesky factor of ``S + slack I``."""
    if not np.isfinite(S).all():
        return
    n = len(S)
    top = np.abs(S).max(initial=0.0)
    asymmetry = np.abs(S - S.T).max(initial=0.0)
    if asymmetry > _SLACK * eps * top:
        yield (f"{name}']: not symmetric (max |S - S.T| = {asymmetry:.3g}, largest entry "
               f"{top:.3g})")
        return
    shift = _SLACK * n * eps * max(np.linalg.norm(S, "fro"), np.finfo(np.float64).tiny)
    try:
        np.linalg.cholesky(S + shift * np.eye(n))
    except np.linalg.LinAlgError:
        lowest = np.linalg.eigvalsh(S)[0]
        yield (f"{name}']: not positive semi-definite (smallest eigenvalue {lowest:.3g}, "
               f"rounding allows {-shift:.3g}); a second moment is")


def _foreign_files(path):
    """Files in a saved graph's folder that save() does not write."""
    return foreign_files(path, lambda key: key in _FILES)


def _is_saved_graph(path):
    """True if ``path/graph.json`` declares the format (the graph may be damaged)."""
    try:
        with open(os.path.join(path, "graph.json"), encoding="utf-8") as f:
            return json.load(f).get("format") == _FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _is_complete_graph(path):
    return _is_saved_graph(path) and os.path.isfile(os.path.join(path, "arrays.npz"))
