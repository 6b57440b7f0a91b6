"""Models and inputs of other libraries: wrappers, hook aliases, dict batches and outputs.

Everything that knows about the conventions of Hugging Face ``transformers``,
TransformerLens and nnsight lives here, without importing them:

* **nnsight** wraps a module in an ``Envoy`` (``NNsight``, ``LanguageModel``)
  that is not a :class:`torch.nn.Module`; :func:`unwrap_model` returns the
  module it holds.
* **TransformerLens** names its hook points ``blocks.0.hook_resid_pre``. On a
  ``HookedTransformer`` these are module paths; on a ``TransformerBridge``
  (TransformerLens 4) many are aliases of other hook points, listed in the
  model's ``hook_dict`` registry, which :func:`resolve_alias` consults.
* **Hugging Face** models take keyword inputs: a batch may be a dict of
  tensors (``input_ids``, ``attention_mask``), passed as ``model(**batch)``,
  and positions where ``attention_mask`` is 0 are padding
  (:func:`padding_mask`). Their outputs are ``ModelOutput`` dicts; like a
  tuple's first element, a dict's first value is the activation
  (:func:`first_tensor`), ``logits`` for a language model without labels.
"""

import copy
from collections.abc import Mapping

import torch

#: The key of a dict batch that marks real positions (1) and padding (0).
MASK_KEY = "attention_mask"


# --------------------------------------------------------------------------- models
def _is_nnsight(obj):
    return any(cls.__module__.split(".")[0] == "nnsight" for cls in type(obj).__mro__)


def unwrap_model(model):
    """The :class:`torch.nn.Module` behind an nnsight wrapper, else ``model`` unchanged.

    Anything that is neither a module nor a wrapper of one is refused.
    """
    if isinstance(model, torch.nn.Module):
        return model
    inner = getattr(model, "_module", None) if _is_nnsight(model) else None
    if isinstance(inner, torch.nn.Module):
        return inner
    raise TypeError(
        f"model must be a torch.nn.Module (or an nnsight wrapper of one), got "
        f"{type(model).__module__}.{type(model).__qualname__}."
    )


def copy_module(model):
    """A deep copy of ``model`` that shares the tensors it keeps besides parameters and buffers.

    Libraries keep the last activations as attributes (TransformerLens after
    ``run_with_cache``); such tensors are results of autograd or of
    ``torch.func`` transforms, which ``copy.deepcopy`` refuses to copy. They
    are state of a past run, never read by the copy's conversion, so the copy
    shares them (containers up to three levels deep are searched).
    """
    memo = {}

    def share(obj, depth):
        if isinstance(obj, torch.Tensor):
            memo[id(obj)] = obj
        elif depth and isinstance(obj, (dict, list, tuple, set)):
            for value in obj.values() if isinstance(obj, dict) else obj:
                share(value, depth - 1)

    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                share(value, 3)
    return copy.deepcopy(model, memo)


def resolve_alias(model, name, modules):
    """``(path, module)`` of the hook point that the registry name ``name`` stands for.

    ``model.hook_dict`` is TransformerLens' registry of hook points by name,
    aliases included (``blocks.0.hook_resid_pre`` on a ``TransformerBridge`` is
    the hook point ``blocks.0.hook_in``). None when the model has no registry,
    the name is not in it, or its hook point is not one of ``modules``
    (``model.named_modules()`` as a dict).
    """
    try:
        registry = model.hook_dict
    except AttributeError:
        return None
    hook = registry.get(name) if isinstance(registry, Mapping) else None
    if not isinstance(hook, torch.nn.Module):
        return None
    return next(((path, m) for path, m in modules.items() if m is hook), None)


def first_tensor(output):
    """The activation of a module's output: itself, a tuple's first element, a dict's first value.

    Returns ``(value, rebuild)``: ``rebuild(new)`` is the output with the
    activation replaced by ``new`` and everything else as it was.
    """
    if isinstance(output, (tuple, list)) and output:
        return output[0], lambda new: type(output)([new, *output[1:]])
    if isinstance(output, Mapping) and output:
        key = next(iter(output))

        def rebuild(new):
            replaced = dict(output)
            replaced[key] = new
            try:
                return type(output)(**replaced)
            except TypeError:
                return replaced

        return output[key], rebuild
    return output, lambda new: new


# --------------------------------------------------------------------------- batches
def is_dict_batch(x):
    return isinstance(x, Mapping)


def check_dict_data(data):
    """Validate a dict of arrays (one per keyword input) and return its number of samples."""
    if not data:
        raise ValueError("dict data must hold at least one input array, got an empty dict.")
    lengths = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise TypeError(f"dict data must have string keys (keyword inputs), got {key!r}.")
        shape = getattr(value, "shape", None)
        if shape is None or len(shape) == 0 or not hasattr(value, "__getitem__"):
            raise TypeError(
                f"dict data must map keyword inputs to arrays or tensors with a sample axis; "
                f"{key!r} is a {type(value).__name__}."
            )
        lengths[key] = int(shape[0])
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"every input of dict data must hold the same samples (axis 0), got lengths "
            f"{lengths}."
        )
    return next(iter(lengths.values()))


def n_samples(x):
    """Samples in a batch of model inputs (a tensor or a dict of tensors)."""
    if is_dict_batch(x):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def take(x, rows):
    """The samples ``rows`` (a slice) of a batch."""
    if is_dict_batch(x):
        return {key: value[rows] for key, value in x.items()}
    return x[rows]


def call(model, x):
    """``model(**x)`` for a dict batch (keyword inputs), else ``model(x)``."""
    return model(**x) if is_dict_batch(x) else model(x)


def describe(x):
    """A batch in a few words for error messages."""
    if is_dict_batch(x):
        parts = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in x.items())
        return f"a dict batch {{{parts}}}"
    return f"a batch of shape {tuple(x.shape)} and dtype {x.dtype}"


def flat_numbers(x):
    """All numbers of a batch as float64, one row per sample (for fingerprints)."""
    values = x.values() if is_dict_batch(x) else [x]
    return torch.cat([v.reshape(v.shape[0], -1).to(torch.float64) for v in values], dim=1)


def padding_mask(x):
    """Real positions of a dict batch, a (batch, position) bool tensor; None if none padded.

    ``attention_mask`` must hold only 0 and 1 (Hugging Face's convention): other
    values (additive float masks) are refused rather than misread.
    """
    if not is_dict_batch(x) or MASK_KEY not in x:
        return None
    mask = x[MASK_KEY]
    if mask.ndim != 2 or mask.shape[0] != n_samples(x):
        raise ValueError(
            f"{MASK_KEY!r} must be (batch, position) with 1 for real positions and 0 for "
            f"padding, got shape {tuple(mask.shape)}."
        )
    real = mask == 1
    if not bool((real | (mask == 0)).all()):
        raise ValueError(
            f"{MASK_KEY!r} must hold only 0 (padding) and 1 (real positions); got other "
            "values."
        )
    return None if bool(real.all()) else real


def check_unpadded(x):
    """Refuse a batch with padded positions where every position is kept (collect)."""
    if padding_mask(x) is not None:
        raise ValueError(
            "collect keeps every position of every sample (the row layout has P rows per "
            "sample), so padded positions (attention_mask 0) would enter the statistics; "
            "fit the graph with InteractionGraph.fit_model, which leaves them out, or pass "
            "sequences of one length per batch without padding."
        )
