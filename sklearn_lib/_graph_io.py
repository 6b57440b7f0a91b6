"""Saving and loading a fitted :class:`~sklearn_lib.InteractionGraph` (JSON + .npz, no pickle).

A saved graph is a directory: ``graph.json`` holds the parameters and per-layer
scalars, ``arrays.npz`` the basis matrices and the edges.
:meth:`InteractionGraph.save <sklearn_lib.InteractionGraph.save>` and
:meth:`InteractionGraph.load <sklearn_lib.InteractionGraph.load>` delegate here.
"""

import json
import os
import shutil
import uuid
from numbers import Integral

import numpy as np

from .basis import InteractionBasis

_FORMAT = "sklearn_lib.InteractionGraph"
_FORMAT_VERSION = 1
_BASIS_ARRAYS = (
    "components_",
    "inverse_components_",
    "mean_",
    "interaction_strengths_",
    "gram_eigenvalues_",
    "gram_",
    "jacobian_gram_",
)


def save_graph(graph, path, *, overwrite=False):
    """Write the fitted ``graph`` to the directory ``path``; see ``InteractionGraph.save``."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(
                f"{path!r} already exists; pass overwrite=True to replace a saved graph."
            )
        if not _is_saved_graph(path):
            raise FileExistsError(
                f"{path!r} exists and is not a saved InteractionGraph; refusing to "
                "replace it even with overwrite=True."
            )
    params = graph.get_params()
    params["device"] = str(params["device"])
    if not (params["random_state"] is None or isinstance(params["random_state"], Integral)):
        params["random_state"] = None
    if isinstance(params["n_components"], tuple):
        params["n_components"] = list(params["n_components"])
    arrays = {f"edges_{l}": E for l, E in enumerate(graph.edges_)}
    layers = []
    for l, basis in enumerate(graph.bases_):
        for name in _BASIS_ARRAYS:
            arrays[f"basis_{l}_{name}"] = getattr(basis, name)
        layers.append({
            "params": {k: (str(v) if k == "device" else v)
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
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, "graph.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, allow_nan=False)
        np.savez(os.path.join(tmp, "arrays.npz"), **arrays)
        if os.path.lexists(path):
            old = f"{path}.old-{uuid.uuid4().hex}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_graph(cls, path):
    """Read a graph written by :func:`save_graph` as a fitted ``cls``."""
    path = os.fspath(path)
    if not _is_saved_graph(path):
        raise ValueError(f"{path!r} is not a graph saved by InteractionGraph.save.")
    with open(os.path.join(path, "graph.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has format version {meta.get('format_version')}, this library "
            f"reads version {_FORMAT_VERSION}."
        )
    with np.load(os.path.join(path, "arrays.npz"), allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    graph = cls(**meta["params"])
    bases = []
    for l, layer in enumerate(meta["bases"]):
        basis = InteractionBasis(**layer["params"])
        for name in _BASIS_ARRAYS:
            setattr(basis, name, arrays[f"basis_{l}_{name}"])
        for name in ("n_components_", "n_samples_seen_", "n_outputs_", "n_features_in_"):
            setattr(basis, name, layer[name])
        bases.append(basis)
    n_layers = len(bases)
    r = np.array([b.n_components_ for b in bases], dtype=np.int64)
    return graph._set_fitted({
        "bases_": bases,
        "edges_": [arrays[f"edges_{l}"] for l in range(n_layers - 1)],
        "n_components_": r,
        "layer_offsets_": np.concatenate([[0], np.cumsum(r)]).astype(np.int64),
        "n_layers_": n_layers,
        "layer_names_": meta["layer_names_"],
        "n_samples_seen_": meta["n_samples_seen_"],
        "edge_point_": meta["edge_point_"],
        "fast_path_": meta["fast_path_"],
    })


def _is_saved_graph(path):
    try:
        with open(os.path.join(path, "graph.json"), encoding="utf-8") as f:
            return json.load(f).get("format") == _FORMAT
    except (OSError, ValueError, AttributeError):
        return False
