"""Checkpoints of a long fit: each pass's result on disk, reused only where it provably applies.

:func:`~sklearn_lib.graph._chain.build` makes one pass over the data per
layer's statistics and one per section's edges. With a checkpoint directory,
every completed pass is written there (:meth:`Checkpoint.run`) under a *key*
that names everything its result depends on: the kind of pass, the layer(s),
the settings that change its numbers (centring, dtype, sequence layout), and a
digest of every tensor it was handed - for a Jacobian pass the downstream
basis ``C_{l+1}`` and the seed of its random draws (stochastic sources), for
an edge pass both layers' bases. A rerun finds a pass's file by that key, so

* an interrupted fit resumes after the last completed pass, with the same
  numbers bit for bit (the statistics are stored exactly, float for float);
* a fit with other ``n_components`` or ``truncation_threshold`` reuses the
  final layer's statistics and every layer whose downstream basis did not
  change, and recomputes the rest: a changed ``C_{l+1}`` changes the key of
  layer ``l``'s Jacobian pass (its statistics ``sum_x J^T V V^T J``, ``V =
  C_{l+1}`` or its random projection, cannot be recovered for another ``V``).
  A stochastic pass keeps its error-bar groups with its statistics.

What the keys cannot see - the data and the model - is pinned by the manifest
(:data:`MANIFEST`): an exact, order-free digest of the samples and a digest of
the model's structure, parameters and buffers. A rerun with other data or
another model is refused. Files are written atomically
(:func:`~sklearn_lib.utils._atomic.write_file`); nothing in the directory is
ever deleted or replaced, and a directory that holds anything but a checkpoint
of ours is not written into.

Statistics are stored without pickle: their state is walked into arrays and
JSON, and read back only into the classes listed in :func:`_allowed_classes`.
"""

import hashlib
import json
import os
import re
from numbers import Integral

import numpy as np
import torch

from ..basis._factors import Frame
from ..basis._stats import InteractionStatistics, merge_statistics
from ..models import _adapters, _model
from ..utils._atomic import write_file

__all__ = ["Checkpoint", "NoCheckpoint", "check_checkpoint", "data_digest", "known_samples",
           "model_digest", "shard_bounds", "shard_sources", "tensor_digest"]

#: The manifest file that marks a directory as a checkpoint of ours.
MANIFEST = "sklearn_lib_checkpoint.json"
FORMAT = "sklearn_lib.checkpoint/1"
_KINDS = ("activations", "jacobians", "global", "edges")
_PASS_FILE = re.compile(r"(%s)-(\d+)-([0-9a-f]{32})\.npz" % "|".join(_KINDS))
_WHAT = "checkpoint pass"
# Key entries in words, for the log.
_DESCRIBED = {
    "C": "downstream basis (C_{l+1}: a changed basis of the next layer invalidates this "
         "layer's Jacobian statistics)",
    "stochastic": "draw of stochastic sources (directions and positions)",
    "bases": "basis of one of the two layers",
    "positions": "draw of stochastic positions",
    "names": "layer names",
}


# --------------------------------------------------------------------- digests
def _hasher():
    return hashlib.blake2b(digest_size=16)


def _add_tensor(h, t):
    if isinstance(t, torch.Tensor) and t.layout != torch.strided:
        # A sparse tensor (a vocabulary's identity basis): its indices and values.
        t = t.coalesce()
        h.update(f"sparse{tuple(t.shape)}".encode())
        _add_tensor(h, t.indices())
        t = t.values()
    array = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else \
        np.ascontiguousarray(t)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())


def tensor_digest(*tensors):
    """An exact digest of tensors (dtype, shape and every bit); None entries count too."""
    h = _hasher()
    for t in tensors:
        if t is None:
            h.update(b"none")
        else:
            _add_tensor(h, t)
    return h.hexdigest()


def model_digest(model):
    """A digest of the model: its module structure and every parameter and buffer, bit for bit.

    The structure is the ``repr`` of the modules (types and their settings); a
    change of a parameter, a buffer or a module changes the digest. Code in a
    ``forward`` is not seen (the passes that run again compare layer values
    between passes, see :mod:`~sklearn_lib.sources._passes`).
    """
    h = _hasher()
    h.update(repr(model).encode())
    for name, value in model.state_dict(keep_vars=False).items():
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            _add_tensor(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def _sample_parts(x):
    """The tensors of a batch (a tensor or a dict of them) for per-sample digests, by name.

    Padded positions (``attention_mask`` 0) are left out of every tensor laid
    out like the mask, so a sequence's digest does not depend on how its batch
    was padded.
    """
    items = sorted(x.items()) if _adapters.is_dict_batch(x) else [("", x)]
    return items, _adapters.padding_mask(x)


def data_digest(data, batch_size, dtype):
    """An exact, order-free digest of the samples of ``data`` and their number.

    Each sample's numbers (as the model receives them, in ``dtype`` for
    floating inputs) are hashed; the hashes are summed modulo ``2**128``, so a
    shuffling DataLoader gives the same digest on every pass and any change of
    any number of any sample gives another one.

    Returns
    -------
    digest : str
    n_samples : int
    """
    batches, _ = _model._iter_batches(data, batch_size)
    total, n = 0, 0
    for batch in batches:
        x = _model._input_tensor(batch, "cpu", dtype)
        items, mask = _sample_parts(x)
        arrays = [(name, value.detach().contiguous().numpy()) for name, value in items]
        real = None if mask is None else mask.numpy()
        for i in range(_adapters.n_samples(x)):
            h = _hasher()
            for name, a in arrays:
                row = a[i]
                if real is not None and a.ndim >= 2 and a.shape[:2] == real.shape:
                    row = row[real[i]]
                h.update(f"{name}:{row.dtype.str}{row.shape}".encode())
                h.update(np.ascontiguousarray(row).tobytes())
            total = (total + int.from_bytes(h.digest(), "little")) % 2**128
            n += 1
    return f"{total:032x}", n


def _key_digest(key):
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(),
                           digest_size=16).hexdigest()


# ------------------------------------------------------- statistics as arrays
def _allowed_classes():
    """The classes a checkpoint may rebuild, by ``module.qualname`` (nothing else is read)."""
    probe = InteractionStatistics(1, 1, center=True, device="cpu", dtype=torch.float64)
    classes = [InteractionStatistics, Frame, type(probe._jacobians)]
    return {f"{c.__module__}.{c.__qualname__}": c for c in classes}


def _encode(value, arrays):
    """``value`` as JSON, its tensors stored in ``arrays`` (a dict of name -> ndarray)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return {"float": repr(float(value))}  # repr round-trips exactly, inf and nan too
    if isinstance(value, torch.Tensor):
        name = f"a{len(arrays)}"
        arrays[name] = value.detach().cpu().contiguous().numpy()
        return {"tensor": name, "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = np.ascontiguousarray(value)
        return {"ndarray": name}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(v, arrays) for v in value], "tuple": isinstance(value, tuple)}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, arrays) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"torch_dtype": str(value).removeprefix("torch.")}
    cls = type(value)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if name not in _allowed_classes():
        raise TypeError(f"a checkpoint cannot store a {name} (found in a pass's result).")
    return {"object": name, "state": _encode(dict(value.__getstate__()), arrays)}


def _decode(value, arrays, device):
    if not isinstance(value, dict):
        return value
    if "float" in value:
        return float(value["float"])
    if "tensor" in value:
        dtype = getattr(torch, value["dtype"])
        return torch.from_numpy(np.array(arrays[value["tensor"]])).to(device=device,
                                                                        dtype=dtype)
    if "ndarray" in value:
        return np.array(arrays[value["ndarray"]])
    if "list" in value:
        items = [_decode(v, arrays, device) for v in value["list"]]
        return tuple(items) if value["tuple"] else items
    if "dict" in value:
        return {k: _decode(v, arrays, device) for k, v in value["dict"].items()}
    if "torch_dtype" in value:
        return getattr(torch, value["torch_dtype"])
    cls = _allowed_classes().get(value.get("object"))
    if cls is None:
        raise ValueError(f"unknown object {value.get('object')!r}")
    obj = cls.__new__(cls)
    obj.__dict__.update(_decode(value["state"], arrays, device))
    return obj


# ------------------------------------------------------------------ checkpoint
def check_checkpoint(checkpoint, checkpoint_every, data, distributed):
    """Refuse what ``fit_model`` cannot checkpoint, before anything runs."""
    if checkpoint_every is not None and (checkpoint is None or not (
            isinstance(checkpoint_every, Integral) and checkpoint_every >= 1)):
        raise ValueError(
            "checkpoint_every must be a positive int of samples, with a checkpoint "
            f"directory; got checkpoint_every={checkpoint_every!r} and "
            f"checkpoint={checkpoint!r}."
        )
    dict_data = _adapters.is_dict_batch(data)
    if checkpoint_every is not None and (not (_model._is_array(data) or dict_data) or (
            dict_data and _adapters.MASK_KEY in data)):
        raise ValueError(
            "checkpoint_every needs array data without padding (a tensor, an array or a "
            f"dict of arrays without 'attention_mask'), got {type(data).__name__}: "
            "shards are slices of the samples. Pass checkpoint_every=None (a checkpoint "
            "per pass) or the data as arrays."
        )
    if checkpoint is not None and distributed is not False:
        raise ValueError(
            "checkpoint cannot be used with distributed fits yet: every rank would write "
            "its own shard's passes. Pass checkpoint=None, or fit on one process."
        )


def known_samples(data):
    """The number of samples of model data, when known before iterating it (else None)."""
    return _model._iter_batches(data, 1)[1]


def shard_sources(source, shards, model_source):
    """``shard_source(i)``: a source over shard ``i`` of ``source``'s data, made once."""
    made = {}

    def shard_source(i):
        if i not in made:
            a, b = shards[i]
            # The prepared model itself: no copy per shard.
            shard = _adapters.take(source.data, slice(a, b))
            made[i] = model_source(model=source.model, data=shard)
            # Closed forms are chosen (a pass of their own) before the progress bar counts.
            for l in range(made[i].n_layers - 1):
                made[i].structure(l, l + 1)
        made[i].progress = source.progress
        return made[i]

    return shard_source


def shard_bounds(n_samples, every, batch_size):
    """``(start, stop)`` of the shards of ``n_samples`` samples, ``every`` samples or fewer each.

    A shard is a whole number of batches of ``batch_size`` (when set), so that
    a sharded pass runs the batches an unsharded one would.
    """
    if batch_size:
        every = max(batch_size, every // batch_size * batch_size)
    return [(a, min(a + every, n_samples)) for a in range(0, n_samples, every)]


def _merge(kind, parts, sizes):
    """The result of a pass from those of its shards (``sizes``: their samples).

    A stochastic pass's result comes with its error-bar groups, ``(result,
    groups)``: every shard draws its own random sources, so group ``g`` of the
    whole is group ``g`` of every shard, weighted like the shards' results.
    """
    if isinstance(parts[0], tuple):
        merged = _merge(kind, [part[0] for part in parts], sizes)
        if kind == "edges":
            return merged, _merge_groups([part[1] for part in parts], sizes)
        return merged, [_merge_groups(list(layer), sizes)
                        for layer in zip(*(part[1] for part in parts))]
    if kind == "edges":
        # Each shard's edges are averages over its rows, which are proportional
        # to its samples (sharding is for data without padding).
        total = sum(sizes)
        return sum(E * (n / total) for E, n in zip(parts, sizes))
    if kind == "global":
        return [merge_statistics(list(layer)) for layer in zip(*parts)]
    return merge_statistics(parts)


def _merge_groups(groups, sizes):
    """``(estimates, shares)`` of the whole from those of its shards (averages, like the results)."""
    total = sum(sizes)
    estimates = sum(np.asarray(e) * (n / total) for (e, _), n in zip(groups, sizes))
    shares = [s for _, s in groups]
    return estimates, None if any(s is None for s in shares) else shares[0]


class NoCheckpoint:
    """The chain's checkpoint when none was asked for: every pass is computed."""

    log = None

    def run(self, kind, layer, key, compute):
        return compute(), 0.0


class Checkpoint:
    """A directory of completed passes of fits of one model on one data set.

    Parameters
    ----------
    path : str or os.PathLike
        The directory. Created if missing; an existing one must be empty or a
        checkpoint of ours (it holds :data:`MANIFEST`) of the same data and model.
    identity : dict
        What every pass depends on but no key names: the data's digest and
        sample count, the model's digest (:func:`data_digest`,
        :func:`model_digest`).
    common : dict
        Settings added to every pass's key (dtype, sequence layout, ...).
    device : torch.device
        Where loaded statistics are placed.
    shards : list of (int, int) or None, default=None
        Passes made shard by shard, each shard's result saved (so that a fit
        killed within a pass resumes from its last completed shard), and merged:
        statistics exactly (:func:`~sklearn_lib.basis._stats.merge_statistics`),
        edges as averages weighted by the shards' samples.
    shard_source : callable or None
        ``shard_source(i)``: the source over shard ``i``'s samples.

    Attributes
    ----------
    log : list of dict
        One entry per pass of the fit: ``pass`` (kind), ``layer``, ``status``
        (``"loaded"`` or ``"computed"``; ``"resumed"`` for a sharded pass partly
        loaded, with each shard's status in ``shards``) and, for a computed pass
        whose layer has saved passes under other keys, ``reason`` (which inputs
        differ).
    """

    def __init__(self, path, identity, common, device, shards=None, shard_source=None):
        self.path = os.path.abspath(os.fspath(path))
        self.identity, self.common, self.device = dict(identity), dict(common), device
        self.shards, self.shard_source = shards, shard_source
        self.log = []
        self._open()

    @property
    def n_samples(self):
        return self.identity["n_samples"]

    def _open(self):
        path, manifest = self.path, os.path.join(self.path, MANIFEST)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise NotADirectoryError(
                f"checkpoint {path!r} exists and is not a directory; pass a directory "
                "(it is created if missing)."
            )
        if os.path.isdir(path) and os.path.exists(manifest):
            try:
                with open(manifest, encoding="utf-8") as f:
                    saved = json.load(f)
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"the checkpoint manifest {manifest!r} cannot be read ({exc}); it was not "
                    "written by sklearn_lib or was damaged. Pass another checkpoint directory."
                ) from None
            self._check_identity(saved)
            return
        if os.path.isdir(path) and os.listdir(path):
            raise FileExistsError(
                f"checkpoint directory {path!r} is not empty and holds no {MANIFEST}: it is "
                "not a checkpoint of sklearn_lib, and nothing is written into a folder that "
                "holds files of others. Pass a new or empty directory."
            )
        os.makedirs(path, exist_ok=True)
        text = json.dumps({"format": FORMAT, **self.identity}, indent=1)

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        write_file(manifest, write, overwrite=False, is_ours=lambda p: False,
                   what="checkpoint manifest")

    def _check_identity(self, saved):
        if saved.get("format") != FORMAT:
            raise ValueError(
                f"checkpoint {self.path!r} has format {saved.get('format')!r}, expected "
                f"{FORMAT!r}. Pass another checkpoint directory."
            )
        fix = ("Its passes are not reused for other data or another model: pass another "
               "checkpoint directory, or delete this one to start over.")
        if (saved.get("n_samples"), saved.get("data")) != (self.identity["n_samples"],
                                                           self.identity["data"]):
            raise ValueError(
                f"checkpoint {self.path!r} holds passes over other data: "
                f"{saved.get('n_samples')} samples with digest {saved.get('data')}, but "
                f"these data are {self.identity['n_samples']} samples with digest "
                f"{self.identity['data']}. {fix}"
            )
        if saved.get("model") != self.identity["model"]:
            raise ValueError(
                f"checkpoint {self.path!r} holds passes of another model (its structure, "
                f"parameters or buffers differ: digest {saved.get('model')}, this model's "
                f"{self.identity['model']}). {fix}"
            )

    def run(self, kind, layer, key, compute):
        """The result of pass ``kind`` of ``layer`` with ``key``, and the share of it loaded.

        ``compute()`` returns the pass's result (statistics, a list of them, or
        an edge tensor); with shards, ``compute(source, i)`` that of shard
        ``i`` from its source. A computed result is written before it is
        returned.
        """
        if self.shards is None:
            result, loaded = self._run(kind, layer, key, compute)
            return result, float(loaded)
        parts, loaded, entries = [], 0, []
        for i, (a, b) in enumerate(self.shards):
            part, was_loaded = self._run(
                kind, layer, {**key, "shard": [a, b]},
                lambda i=i: compute(self.shard_source(i), i))
            parts.append(part)
            loaded += (b - a) * was_loaded
            entries.append(self.log.pop())
        sizes = [b - a for a, b in self.shards]
        statuses = {e["status"] for e in entries}
        entry = {**entries[0], "status": statuses.pop() if len(statuses) == 1 else "resumed",
                 "shards": [e["status"] for e in entries]}
        self.log.append(entry)
        return _merge(kind, parts, sizes), loaded / sum(sizes)

    def _run(self, kind, layer, key, compute):
        full = {"format": FORMAT, "pass": kind, "layer": int(layer), **self.common, **key}
        name = f"{kind}-{int(layer)}-{_key_digest(full)}.npz"
        file = os.path.join(self.path, name)
        if os.path.exists(file):
            result = self._load(file, full)
            self.log.append({"pass": kind, "layer": int(layer), "status": "loaded"})
            return result, True
        entry = {"pass": kind, "layer": int(layer), "status": "computed"}
        reason = self._why_not_saved(kind, layer, full)
        if reason:
            entry["reason"] = reason
        result = compute()
        arrays = {}
        meta = json.dumps({"key": full, "result": _encode(result, arrays)}, sort_keys=True)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, meta=np.array(meta), **arrays)

        if not os.path.exists(file):  # else another process saved the same pass meanwhile
            write_file(file, write, overwrite=False, is_ours=lambda p: False, what=_WHAT)
        self.log.append(entry)
        return result, False

    def _load(self, file, key):
        try:
            with np.load(file, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            meta = json.loads(str(arrays.pop("meta")))
            if meta["key"] != key:
                raise ValueError("its key is not the one its name says")
            return _decode(meta["result"], arrays, self.device)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"checkpoint file {file!r} cannot be read as the pass it names ({exc}): it "
                "was damaged or not written by sklearn_lib. It is left as it is: move or "
                "delete it to have the pass computed again."
            ) from None

    def _why_not_saved(self, kind, layer, key):
        """Which inputs differ from those of this layer's saved passes of this kind (or None)."""
        differ = set()
        for name in sorted(os.listdir(self.path)):
            match = _PASS_FILE.fullmatch(name)
            if not match or match.group(1) != kind or int(match.group(2)) != layer:
                continue
            try:
                with np.load(os.path.join(self.path, name), allow_pickle=False) as f:
                    saved = json.loads(str(f["meta"]))["key"]
            except (OSError, ValueError, KeyError):
                continue
            differ.update(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
        if not differ:
            return None
        return ("the saved passes of this layer were made with another "
                + ", ".join(_DESCRIBED.get(k, k) for k in sorted(differ)))
