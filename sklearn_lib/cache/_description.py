"""The description of an activation cache: made by ``create``, checked by ``open``.

:meth:`~sklearn_lib.cache.ActivationCache.create` turns its arguments into the JSON
description of an empty cache (every argument is checked before anything is
written) and creates the empty arrays it lists;
:meth:`~sklearn_lib.cache.ActivationCache.open` checks a finished cache's
description (complete, readable version, checksum), that its arrays hold the
samples it counts, and what the reader expects.
"""

import os
import uuid
from math import prod

import numpy as np

from ..utils._backend import resolve_dtype
from ._format import (
    _ATTR_KEY,
    _CHECKSUM_KEY,
    _CHUNK_BYTES,
    _FORMAT_VERSION,
    _READABLE_VERSIONS,
    _as_shape,
    _check_count,
    _check_target,
    _description_checksum,
    _jacobian_shapes,
    _json_roundtrip,
    _safe_node_name,
)

__all__ = [
    "check_arrays",
    "check_description",
    "check_expectations",
    "empty_group",
    "new_description",
]


def new_description(path, layers, *, jacobians, dtype, chunk_size, metadata, overwrite,
                    rows_per_sample):
    """The description of an empty cache at ``path`` and the checked ``chunk_size``.

    The arguments are those of ``ActivationCache.create``; every one is checked
    before the target, so that nothing is written.
    """
    chunk_size = _check_count(chunk_size, "'chunk_size'")
    if not isinstance(layers, dict) or not layers:
        raise TypeError("layers must be a non-empty dict mapping layer name -> row shape.")
    not_str = [name for name in layers if not isinstance(name, str)]
    if not_str:
        raise TypeError(
            f"layer names must be str, got {not_str} "
            f"({', '.join(type(n).__name__ for n in not_str)}): names are stored as text, "
            "where 1 and '1' would be one layer. Name them as strings, e.g. "
            f"{[str(n) for n in not_str]}."
        )
    names = list(layers)
    shapes = {name: _as_shape(shape, f"layer {name!r}") for name, shape in layers.items()}
    rows = {name: 1 for name in names}
    if rows_per_sample is not None and not isinstance(rows_per_sample, dict):
        raise TypeError(
            f"rows_per_sample must be a dict of layer name -> int, got {rows_per_sample!r}."
        )
    for name, r in (rows_per_sample or {}).items():
        if name not in rows:
            raise ValueError(f"rows_per_sample names unknown layer {name!r}; layers: {names}.")
        rows[name] = _check_count(r, f"'rows_per_sample[{name!r}]'")
    jac_shapes = _jacobian_shapes(jacobians, names, shapes, rows)
    np_dtype = np.dtype(str(resolve_dtype(dtype)).removeprefix("torch."))
    _check_target(path, overwrite)

    description = {
        "format_version": _FORMAT_VERSION,
        "complete": False,
        # Tells a reader whether the cache at the path is still the one it opened.
        "generation": uuid.uuid4().hex,
        "n_samples": 0,
        "dtype": np_dtype.name,
        "layers": [
            {
                "name": name,
                "node": "activations/" + _safe_node_name(i, name),
                "shape": list(shapes[name]),
                "rows_per_sample": rows[name],
            }
            for i, name in enumerate(names)
        ],
        "jacobians": [
            {
                "in": a,
                "out": b,
                "node": "jacobians/" + _safe_node_name(k, f"{a}__to__{b}"),
                "shape": list(shape),
            }
            for k, ((a, b), shape) in enumerate(jac_shapes.items())
        ],
        "metadata": _json_roundtrip(metadata),
    }
    return description, chunk_size


def empty_group(zarr, tmp_path, description, chunk_size):
    """The zarr group at ``tmp_path`` with the empty arrays ``description`` lists."""
    np_dtype = np.dtype(description["dtype"])
    group = zarr.open_group(tmp_path, mode="a", zarr_format=3)
    group.create_group("activations")
    group.create_group("jacobians")
    entries = [(e["node"], e["shape"]) for e in description["layers"]]
    entries += [(e["node"], e["shape"]) for e in description["jacobians"]]
    for node, shape in entries:
        row_bytes = max(1, prod(shape) * np_dtype.itemsize)
        chunk_rows = max(1, min(chunk_size, _CHUNK_BYTES // row_bytes))
        group.create_array(
            node, shape=(0, *shape), chunks=(chunk_rows, *shape), dtype=np_dtype
        )
    group.attrs[_ATTR_KEY] = description
    return group


def check_description(path, description):
    """Refuse what is not a complete cache of a readable version with an intact description."""
    if description is None:
        raise ValueError(f"{path!r} is not an activation cache written by ActivationCache.")
    if description.get("complete") is not True:
        raise ValueError(
            f"the activation cache at {path!r} is incomplete: it was never finalized "
            "(the write was interrupted). Recreate it."
        )
    version = description.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"the activation cache at {path!r} has format version {version}, this "
            f"library reads versions {list(_READABLE_VERSIONS)} (version 1 caches carry no "
            "inventory, so they cannot prove they are complete). Recreate it."
        )
    if version >= 3 and description.get(_CHECKSUM_KEY) != _description_checksum(description):
        raise ValueError(
            f"the activation cache at {path!r} is damaged: its root metadata "
            f"{os.path.join(path, 'zarr.json')!r} does not match the checksum finalize() "
            "wrote into it (it was edited or corrupted after the cache was finished: "
            "n_samples, layers, shapes, the inventory and the user metadata are all "
            "covered). Recreate the cache (or restore it from an intact copy)."
        )


def check_arrays(cache):
    """Every array holds ``n_samples`` samples of its row shape in the cache's dtype."""
    problems = []
    for node, label, shape, per in cache._nodes():
        array = cache._group[node]
        expected = (cache.n_samples * per, *shape)
        if tuple(array.shape) != expected or array.dtype != cache.dtype:
            problems.append(
                f"{label} ({os.path.join(cache.path, *node.split('/'))}): expected shape "
                f"{expected} and dtype {cache.dtype.name} (n_samples={cache.n_samples}, "
                f"rows_per_sample={per}), found {tuple(array.shape)} and {array.dtype}"
            )
    if problems:
        raise ValueError(
            f"the activation cache at {cache.path!r} is damaged: its arrays do not hold "
            "the samples its root metadata (zarr.json) counts:\n  " + "\n  ".join(problems)
            + "\nRecreate the cache (or restore it from an intact copy)."
        )


def check_expectations(cache, expect_layers, expect_shapes, expect_dtype):
    """Refuse a cache whose layers, shapes or dtype are not the ones expected."""
    problems = []
    if expect_layers is not None and list(expect_layers) != cache.layers:
        problems.append(f"layers: expected {list(expect_layers)}, found {cache.layers}")
    for name, shape in (expect_shapes or {}).items():
        found = cache.shapes.get(name)
        if found is None:
            problems.append(f"shape of {name!r}: expected {tuple(shape)}, found no such layer")
        elif tuple(shape) != found:
            problems.append(f"shape of {name!r}: expected {tuple(shape)}, found {found}")
    if expect_dtype is not None:
        expected = np.dtype(str(resolve_dtype(expect_dtype)).removeprefix("torch."))
        if expected != cache.dtype:
            problems.append(f"dtype: expected {expected.name}, found {cache.dtype.name}")
    if problems:
        raise ValueError(
            f"the activation cache at {cache.path!r} does not match what was expected:\n  "
            + "\n  ".join(problems)
        )
