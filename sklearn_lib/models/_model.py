"""Running live torch models: layers by name, hooks, batches of inputs, recording.

The private machinery under :mod:`sklearn_lib.collect` and the model source of
:class:`~sklearn_lib.InteractionGraph`: layer names are parsed against
``model.named_modules()`` (see :mod:`sklearn_lib.collect` for the conventions),
forward hooks read or replace a layer's activation, data are cut into batches
of model inputs, activations are laid out as rows (positions count as
samples with ``sequence=True``), and recorded batches are written into result
arrays allocated once.
"""

from collections import namedtuple
from contextlib import contextmanager
from contextvars import ContextVar
from math import prod

import numpy as np
import torch

from ..utils._backend import as_tensor, gen_batches
from . import _adapters
from ._axes import Layer, view_axes

_HOOK_KINDS = ("input", "output")
_MAX_NAMES_IN_ERROR = 200
# Samples of the first batch run through the model to check that it takes them.
_PROBE_SAMPLES = 2

# ``positions`` selects positions of a (batch, position, ...) activation: None (all),
# a tuple of ints, or a slice, from a layer name suffixed "[-1]", "[0, 2]" or "[1:]".
# ``axes`` are the feature axes a ``Layer`` declares (None: the default layout).
_Layer = namedtuple("_Layer", ["spec", "name", "kind", "module", "positions", "axes"],
                    defaults=[None, None])


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once everything needed was captured."""


# --------------------------------------------------------------------------- layers
def _parse_layers(model, layers, hook):
    if hook not in _HOOK_KINDS:
        raise ValueError(f"hook must be 'input' or 'output', got {hook!r}.")
    if isinstance(layers, (str, Layer)):
        layers = [layers]
    modules = dict(model.named_modules())
    parsed, unknown = [], []
    for entry in layers:
        spec, axes = (entry.name, entry.feature_axes) if isinstance(entry, Layer) else (entry, None)
        if not isinstance(spec, str):
            raise TypeError(f"layers must be names (strings) or Layer objects, got {entry!r}.")
        name, kind, positions = spec, hook, None
        if spec.endswith("]") and "[" in spec and spec not in modules:
            name, _, selector = spec[:-1].rpartition("[")
            positions = _parse_positions(selector, spec)
        head, sep, tail = name.rpartition(":")
        if sep and tail in _HOOK_KINDS:
            name, kind = head, tail
        if name not in modules:
            # A TransformerLens hook alias names the hook point it stands for.
            name, _ = _adapters.resolve_alias(model, name, modules) or (name, None)
        if name not in modules:
            unknown.append(spec)
        else:
            parsed.append(_Layer(spec, name, kind, modules[name], positions, axes))
    if unknown:
        names = list(modules)
        shown = ", ".join(repr(n) for n in names[:_MAX_NAMES_IN_ERROR])
        hidden = len(names) - _MAX_NAMES_IN_ERROR
        more = f", ... ({hidden} more)" if hidden > 0 else ""
        raise ValueError(
            f"unknown layer(s) {unknown}. Valid names are the model.named_modules() paths "
            f"('' is the model itself) or the names of its hook registry (TransformerLens' "
            f"model.hook_dict), optionally suffixed ':input' or ':output' and "
            f"then a selection of positions such as '[-1]', '[0, 2]' or '[1:]': "
            f"{shown}{more}."
        )
    _check_distinct(parsed)
    return parsed


def _check_distinct(parsed):
    """Refuse two specs that read one activation (one hook per activation), naming them."""
    seen = {}
    for layer in parsed:
        first = seen.setdefault((layer.name, layer.kind), layer)
        if first is not layer:
            where = f"the same activation (the {layer.kind} of module {layer.name!r})"
            if first.positions != layer.positions:
                raise ValueError(
                    f"layers {first.spec!r} and {layer.spec!r} both read {where} at different "
                    "positions; a graph's layers must be different activations. Select "
                    "several positions of one activation in one name, e.g. "
                    f"'{_base_spec(first if first.positions is not None else layer)}[0, 1]'."
                )
            raise ValueError(
                f"layers {first.spec!r} and {layer.spec!r} both name {where}; a graph's layers "
                "must be different activations."
            )


def _base_spec(layer):
    """The spec of a layer without its selection of positions: ``"b[0]"`` -> ``"b"``."""
    return layer.spec.rpartition("[")[0]


def _parse_positions(selector, spec):
    """``"-1"`` -> (-1,), ``"0, 2"`` -> (0, 2), ``"1:"`` -> slice(1, None); else ValueError."""
    parts = [p.strip() for p in selector.split(":")]
    positions = None
    try:
        if len(parts) == 1:
            positions = tuple(int(p) for p in selector.split(","))
            if len(set(positions)) == len(positions):
                return positions
        elif len(parts) <= 3:
            positions = slice(*(int(p) if p else None for p in parts))
    except ValueError:
        pass
    if isinstance(positions, slice):
        if positions.step != 0:
            return positions
        raise ValueError(
            f"layer {spec!r}: the slice [{selector}] has step 0, which selects nothing; "
            "use a step of at least 1 (e.g. '[::2]'), or a negative one to go backwards."
        )
    raise ValueError(
        f"layer {spec!r}: the positions in brackets must be distinct integers ('[-1]', "
        f"'[0, 2]') or one slice ('[1:]', '[::2]'), got [{selector}]."
    )


def _position_index(layer, value):
    """The positions ``layer`` selects from ``value`` (batch, position, ...) as a LongTensor."""
    if value.ndim < 3:
        raise ValueError(
            f"layer {layer.spec!r} selects positions, but its activation has shape "
            f"{tuple(value.shape)}: a selection needs (batch, position, feature) activations."
        )
    return torch.tensor(_selected(layer, int(value.shape[1]), tuple(value.shape)),
                        device=value.device)


def _selected(layer, n_positions, shape):
    """The indices among ``n_positions`` that ``layer`` selects (a list of distinct ints)."""
    if isinstance(layer.positions, slice):
        index = list(range(n_positions))[layer.positions]
    elif all(-n_positions <= i < n_positions for i in layer.positions):
        index = [i % n_positions for i in layer.positions]
    else:
        index = []
    if not index or len(set(index)) != len(index):
        raise ValueError(
            f"layer {layer.spec!r} must select distinct positions among the {n_positions} "
            f"of its activation of shape {shape}."
        )
    return index


#: A replacement of the positions a layer selects (:func:`_select`): the ``full``
#: tensor the forward pass goes on with, a copy of the ``original`` one, the
#: ``index`` of the replaced positions on axis 1 and their ``new`` values.
Replacement = namedtuple("Replacement", "full original index new")

#: While set to a list, :func:`_select` appends every :class:`Replacement` it makes.
REPLACED = ContextVar("REPLACED", default=None)


def _select(layer, fn):
    """``fn`` applied to the positions ``layer`` selects; a result replaces only those."""
    if layer.positions is None:
        return fn

    def selected(value):
        index = _position_index(layer, value)
        new = fn(value.index_select(1, index))
        if new is None:
            return None
        # Out of place, so that gradients flow from the replacement alone.
        full = value.index_copy(1, index, new)
        replaced = REPLACED.get()
        if replaced is not None:
            # A copy of the other positions' values, made before any later use
            # of ``value`` is redirected to ``full`` (see ``_rowwise``).
            replaced.append(Replacement(full, value.clone(), index, new))
        return full

    return selected


def _hook(layer, fn):
    """Call ``fn(activation)`` when ``layer`` fires; a non-None result replaces the activation.

    ``fn`` sees the activation through the layer's declared axes (``_axes``), then
    its selection of positions.
    """
    fn = view_axes(layer.spec, layer.axes, _select(layer, fn))
    if layer.kind == "output":

        def forward_hook(module, args, output):
            value, rebuild = _adapters.first_tensor(output)
            _check_tensor(layer, value)
            new = fn(value)
            return None if new is None else rebuild(new)

        return layer.module.register_forward_hook(forward_hook)

    def forward_pre_hook(module, args):
        if not args:
            raise ValueError(
                f"layer {layer.spec!r}: the module was called without positional arguments, "
                "so its input cannot be hooked."
            )
        _check_tensor(layer, args[0])
        new = fn(args[0])
        return None if new is None else (new, *args[1:])

    return layer.module.register_forward_pre_hook(forward_pre_hook)


def _check_tensor(layer, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"layer {layer.spec!r} is a {type(value).__name__}, not a tensor; "
            "record a submodule whose input/output is a tensor."
        )


@contextmanager
def _hooks(pairs):
    handles = []
    try:
        for layer, fn in pairs:
            handles.append(_hook(layer, fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_until_stopped(model, x):
    try:
        _adapters.call(model, x)
    except _StopForward:
        pass


def _input_tensor(batch, device, dtype):
    """Move a batch of model inputs to ``device``; floating inputs are cast, token ids are not.

    A dict batch (keyword inputs) becomes a dict of such tensors.
    """
    if _adapters.is_dict_batch(batch):
        return {key: _input_tensor(value, device, dtype) for key, value in batch.items()}
    if isinstance(batch, torch.Tensor):
        batch = batch.detach()
        if batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    array = np.asarray(batch)
    if array.dtype == object:
        raise TypeError(
            f"model inputs must be tensors, numeric arrays or dicts of them (keyword "
            f"inputs), got {type(batch).__name__}."
        )
    if np.issubdtype(array.dtype, np.floating):
        return as_tensor(array, device=device, dtype=dtype)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def _is_array(data):
    return isinstance(data, torch.Tensor) or (
        hasattr(data, "shape") and hasattr(data, "__getitem__") and hasattr(data, "dtype")
    )


def _iter_batches(data, batch_size):
    """Yield batches of model inputs, and say how many samples to expect (None if unknown)."""
    if _is_array(data):
        n = int(data.shape[0])
        return (data[s] for s in gen_batches(n, batch_size)), n
    if _adapters.is_dict_batch(data):
        n = _adapters.check_dict_data(data)
        return (_adapters.take(data, s) for s in gen_batches(n, batch_size)), n
    if isinstance(data, (str, bytes)):
        raise TypeError(
            "data must be a tensor, an array, a dict of arrays (keyword inputs) or a "
            f"DataLoader, got {type(data).__name__}."
        )
    try:
        total = len(data.dataset)
    except (AttributeError, TypeError):
        total = None

    def batches():
        for item in data:
            # DataLoaders over labelled datasets yield (x, y): the model input is first.
            yield item[0] if isinstance(item, (tuple, list)) else item

    return batches(), total


# --------------------------------------------------------------------------- recording
def _record_batch(model, layers, x, *, stop=False):
    """Run ``model(x)`` with hooks and return {spec: detached activation}.

    With ``stop``, the forward pass ends once every layer was recorded.
    """
    captured = {}

    def recorder(layer):
        def fn(value):
            if layer.spec in captured:
                raise RuntimeError(
                    f"module {layer.name!r} ran more than once in one forward pass, so layer "
                    f"{layer.spec!r} is ambiguous; give each use its own module."
                )
            # A copy, because a following in-place op (ReLU(inplace=True)) would
            # otherwise overwrite the recorded activation.
            captured[layer.spec] = value.detach().clone()
            if stop and len(captured) == len(layers):
                raise _StopForward

        return fn

    # Without ``stop`` the whole forward runs, so that a module reused after the
    # last recorded layer is still reported as ambiguous.
    with _hooks([(layer, recorder(layer)) for layer in layers]):
        _run_until_stopped(model, x) if stop else _adapters.call(model, x)
    missing = [layer.spec for layer in layers if layer.spec not in captured]
    if missing:
        raise ValueError(f"layer(s) {missing} were not called in the model's forward pass.")
    return captured


def _check_forward(model, x):
    """Run ``model(x[:2])`` without hooks, so that any failure is the model's own.

    A model given inputs it cannot take (the wrong width or dtype) fails deep
    inside torch ("mat1 and mat2 shapes cannot be multiplied"); this says which
    inputs we passed. Hooks are left out so that our own errors are not
    mistaken for the model's.
    """
    probe = _adapters.take(x, slice(0, _PROBE_SAMPLES))
    try:
        with torch.no_grad():
            _adapters.call(model, probe)
    except Exception as exc:
        raise ValueError(
            f"the model rejected its inputs: we passed the first {_adapters.n_samples(probe)} "
            f"sample(s) of data as {_adapters.describe(probe)}, and its forward raised "
            f"{type(exc).__name__}: {exc}. Check that data holds inputs of the shape and "
            "dtype the model expects (one sample per row of axis 0; a dict of arrays is "
            "passed as keyword inputs)."
        ) from exc


def _cast(t, dtype):
    return t.to(dtype) if t.is_floating_point() else t


def _positions(shape, sequence, layer):
    """(P, d) of ``layer``'s per-sample activation shape under the row-layout convention.

    A layer with declared axes is (position, feature) whatever ``sequence`` says.
    A layer without features (or positions) has no basis: it is refused here,
    where every recorded shape passes.
    """
    what = repr(layer.spec)
    if not (sequence or layer.axes is not None):
        n_pos, d = 1, prod(shape)
    elif len(shape) == 1:
        n_pos, d = 1, shape[0]
    elif len(shape) == 2:
        n_pos, d = shape
    else:
        raise ValueError(
            f"with sequence=True, {what} must be (batch, position, feature) or (batch, "
            f"feature); got per-sample shape {tuple(shape)}."
        )
    if n_pos == 0 or d == 0:
        raise ValueError(
            f"layer {what} has per-sample shape {tuple(shape)}: {n_pos} position(s) of {d} "
            "feature(s). A layer needs at least one feature (and position); choose a layer "
            "whose activations are not empty."
        )
    return n_pos, d


def _row_mask(layer, mask, shape, sequence):
    """Which rows of ``layer``'s activation (of ``shape``) are real positions (bool), or None.

    ``mask`` is the batch's (batch, position) padding mask (None: no padding).
    A layer with as many positions as the mask has its rows masked (after the
    layer's own selection of positions); a layer of one position per sample
    (pooled, or flat) has only real rows. Without ``sequence`` positions are
    features, and padding cannot be left out of them.
    """
    if mask is None:
        return None
    spec = repr(layer.spec)
    if not sequence:
        raise ValueError(
            f"the batch has padded positions (attention_mask 0), which only sequence=True "
            f"can leave out (positions as samples); without it layer {spec} flattens "
            "positions into features. Pass sequence=True, or inputs without padding."
        )
    n_pos, _ = _positions(tuple(shape[1:]), sequence, layer)
    width = int(mask.shape[1])
    if layer.positions is not None and len(shape) >= 3:
        real = mask.any(1)
        mask = mask[:, _selected(layer, width, (shape[0], width))]
        # A sequence with tokens but none at the selected positions would drop out of
        # this layer without a word (right padding and "[-1]").
        lost = real & ~mask.any(1)
        if bool(lost.any()):
            raise ValueError(
                f"layer {spec} selects positions that are padding in {int(lost.sum())} of the "
                f"{int(real.sum())} sequences of this batch (sequence {int(lost.nonzero()[0])} "
                "first), which would leave them out of this layer. With right padding, "
                "'[-1]' is padding for every shorter sequence: pad on the left "
                "(tokenizer.padding_side = 'left'), or select positions every sequence has."
            )
    elif n_pos == 1:
        return None
    if n_pos != mask.shape[1]:
        raise ValueError(
            f"layer {spec} has {n_pos} positions per sample, but the batch's attention_mask "
            f"has {width}: padded positions of this layer cannot be told apart. Choose "
            "layers with one position per token, or a selection of positions."
        )
    return mask.reshape(-1)


def _as_rows(act, sequence, layer):
    n_pos, d = _positions(act.shape[1:], sequence, layer)
    return act.reshape(act.shape[0] * n_pos, d)


# --------------------------------------------------------------------------- results
class _ArraySink:
    """Arrays filled batch by batch: preallocated for ``total`` samples when it is known.

    Keeping per-batch parts and concatenating them at the end would hold every
    array twice. Here each batch is written into its place; an iterable of
    unknown length grows its arrays geometrically (amortised one copy per row),
    and arrays larger than the rows seen are shrunk in place at the end.
    """

    def __init__(self, total):
        self.total, self.arrays, self.rows = total, {}, {}

    def append(self, n_samples, act_np, jac_np):
        for key, part in (*act_np.items(), *jac_np.items()):
            self._write(key, part, n_samples)

    def _write(self, key, part, n_samples):
        start = self.rows.get(key, 0)
        stop = start + part.shape[0]
        array = self.arrays.get(key)
        if array is None:
            capacity = stop
            if self.total is not None:
                # The first batch fixes the rows per sample (positions count as rows).
                capacity = max(stop, stop * self.total // max(1, n_samples))
            array = np.empty((capacity, *part.shape[1:]), dtype=part.dtype)
        elif stop > array.shape[0]:
            grown = np.empty((max(stop, 2 * array.shape[0]), *part.shape[1:]), dtype=part.dtype)
            grown[:start] = array[:start]
            array = grown
        array[start:stop] = part
        self.arrays[key], self.rows[key] = array, stop

    def result(self):
        act, jac = {}, {}
        for key, array in self.arrays.items():
            rows = self.rows[key]
            if rows < array.shape[0]:
                array.resize((rows, *array.shape[1:]), refcheck=False)
            (jac if isinstance(key, tuple) else act)[key] = array
        return act, jac
