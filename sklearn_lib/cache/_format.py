"""The on-disk format of an activation cache: its description, checksums and checks.

:class:`~sklearn_lib.cache.ActivationCache` writes and reads the arrays; this
module holds what defines a cache on disk apart from them: the JSON description
in the root ``zarr.json`` and its checksum, which files a cache consists of (so
that a file a user put in its folder is never deleted), and the checks of what
is appended (shapes, keys, finite values).
"""

import json
import os
import re
import zlib
from math import prod
from numbers import Integral

import numpy as np
import torch

from ..utils._atomic import (
    check_target,
    foreign_files,
    tidy,
)

_ATTR_KEY = "sklearn_lib_cache"
# Version 2 added the inventory of files and the generation id, version 3 the
# checksum of the description (the root metadata). Version 2 caches still open,
# with their arrays checked against n_samples.
_FORMAT_VERSION = 3
_READABLE_VERSIONS = (2, 3)
_CHECKSUM_KEY = "checksum"
_WHAT = "activation cache"
# Target size of one chunk: large enough for efficient sequential reads, small
# enough that reading a single row of a large Jacobian does not pull in gigabytes.
_CHUNK_BYTES = 64 * 2**20

def _import_zarr():
    try:
        import zarr
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ActivationCache needs zarr>=3; install it with `pip install 'sklearn_lib[cache]'`."
        ) from exc
    if int(zarr.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise ImportError(f"ActivationCache needs zarr>=3, found zarr {zarr.__version__}.")
    return zarr


def _description_checksum(description):
    """CRC-32 of the description's canonical JSON, without its own checksum."""
    body = {key: value for key, value in description.items() if key != _CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return zlib.crc32(text.encode("utf-8"))


def _check_count(value, name, where="ActivationCache.create"):
    """``value`` as an int >= 1, refused (not truncated) if it is anything else."""
    if isinstance(value, Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise (ValueError if isinstance(value, Integral) and not isinstance(value, bool)
           else TypeError)(
        f"The {name} parameter of {where} must be an int in the range [1, inf). "
        f"Got {value!r} instead."
    )


def _safe_node_name(index, name):
    # zarr node names may not contain "/" and names starting with "__" are
    # reserved; the index prefix keeps names unique after sanitising.
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _as_shape(shape, what):
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(
            f"the row shape of {what} must be a tuple of ints, got {shape!r}."
        ) from None
    if any(s < 0 for s in shape):
        raise ValueError(f"the row shape of {what} must be non-negative, got {shape}.")
    return shape


def _json_roundtrip(metadata):
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
    try:
        encoded = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"metadata must be JSON-serialisable (dicts, lists, str, int, finite float, "
            f"bool, None): {exc}"
        ) from None
    return json.loads(encoded)


def _read_description(path):
    """The description of the cache at ``path``, or None if it holds no ActivationCache."""
    try:
        with open(os.path.join(path, "zarr.json"), encoding="utf-8") as f:
            attrs = json.load(f).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    description = attrs.get(_ATTR_KEY) if isinstance(attrs, dict) else None
    return description if isinstance(description, dict) else None


def _is_cache_dir(path):
    """True if ``path`` holds a zarr group written by ActivationCache (complete or not)."""
    return _read_description(path) is not None


def _is_complete_cache(path):
    description = _read_description(path)
    return description is not None and description.get("complete") is True


def _labels(description):
    """Node path -> name of the array in messages."""
    labels = {e["node"]: f"activations of layer {e['name']!r}" for e in description["layers"]}
    labels.update({
        e["node"]: f"Jacobians of section ({e['in']!r}, {e['out']!r})"
        for e in description["jacobians"]
    })
    return labels


def _open_verified(path, description):
    """The cache's zarr group, read through the store that enforces its inventory."""
    zarr = _import_zarr()
    from ._store import VerifiedStore

    store = VerifiedStore(path, description, _labels(description))
    return zarr.open_group(store=store, mode="r", zarr_format=3)


def _to_numpy(a):
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _check_target(path, overwrite):
    """Raise unless a cache may be written to the absolute ``path``."""
    tidy(path, _is_complete_cache, _WHAT)
    check_target(path, overwrite, _is_cache_dir, _WHAT, foreign=_foreign_files)


# Files a cache without an inventory consists of: zarr metadata and chunks of its nodes.
_LAYOUT = re.compile(r"(?:(activations|jacobians)/(?:([^/]+)/)?)?zarr\.json"
                     r"|(activations|jacobians)/([^/]+)/c(?:/\d+)+")


def _foreign_files(path):
    """Files in the cache at ``path`` that it does not list (its inventory, else its layout)."""
    description = _read_description(path) or {}
    inventory = description.get("inventory")
    if isinstance(inventory, dict):
        return foreign_files(path, lambda key: key == "zarr.json" or key in inventory)
    nodes = {e.get("node") for e in [*description.get("layers", []),
                                     *description.get("jacobians", [])]
             if isinstance(e, dict)}

    def listed(key):
        match = _LAYOUT.fullmatch(key)
        if match is None:
            return False
        kind, name = (match.group(1), match.group(2)) if match.group(3) is None else (
            match.group(3), match.group(4))
        return name is None or f"{kind}/{name}" in nodes

    return foreign_files(path, listed)


def _finite_rows(array, dtype, what, rows_per_sample):
    """``array`` cast to the storage ``dtype``; raises naming the first row that is not finite."""
    # Values beyond the dtype's range become inf in the cast; that is checked below.
    with np.errstate(over="ignore", invalid="ignore"):
        stored = array.astype(dtype, copy=False)
    finite = np.isfinite(stored).reshape(len(stored), prod(stored.shape[1:])).all(axis=1)
    if finite.all():
        return stored
    row = int(np.flatnonzero(~finite)[0])
    values = array[row]
    if np.isnan(values).any():
        problem = "NaN"
    elif not np.isfinite(values).all():
        problem = "an infinite value"
    else:
        problem = (
            f"a value beyond the {dtype.name} range ({float(np.abs(values).max()):.3g}; the "
            f"largest {dtype.name} is {float(np.finfo(dtype).max):.3g})"
        )
    sample = f" (sample {row // rows_per_sample})" if rows_per_sample > 1 else ""
    raise ValueError(
        f"{what}: row {row} of this batch{sample} holds {problem}; the cache stores only "
        "finite values. Nothing of this batch was written."
    )


def _check_keys(given, expected, what, kind):
    given_keys = list(given)
    missing = [k for k in expected if k not in given]
    extra = [k for k in given_keys if k not in expected]
    if missing or extra:
        raise ValueError(
            f"{what} must hold exactly the cache's {kind} {expected}; "
            f"missing {missing}, unexpected {extra}."
        )


def _jacobian_shapes(jacobians, names, shapes, rows):
    if jacobians is False or jacobians is None:
        return {}
    if jacobians is True:
        pairs = {(a, b): None for a, b in zip(names[:-1], names[1:])}
    elif isinstance(jacobians, dict):
        pairs = {tuple(pair): shape for pair, shape in jacobians.items()}
    else:
        pairs = {tuple(pair): None for pair in jacobians}
    result = {}
    for pair, shape in pairs.items():
        if len(pair) != 2 or any(name not in shapes for name in pair):
            raise ValueError(
                f"Jacobian section {pair!r} must be a pair of layer names from {names}."
            )
        a, b = pair
        if shape is None:
            shape = (rows[b] * prod(shapes[b]), prod(shapes[a]))
        result[(a, b)] = _as_shape(shape, f"Jacobian {pair!r}")
    return result
