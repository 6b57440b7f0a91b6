"""Device and dtype resolution, array <-> tensor conversion and chunking.

Every estimator accepts numpy arrays, ``np.memmap`` and torch tensors (on any
device) and does its heavy math in torch. This module is the only place that
knows how to move data between those worlds, so that the rule "numpy in, numpy
out; tensor in, tensor on the same device out" is implemented once.
"""

import numbers
from contextlib import contextmanager

import numpy as np
import torch

_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
}


# The statistics and eigendecompositions need float64 torch.linalg; of torch's
# device types only these two provide it (MPS has no float64, "meta" no values).
_DEVICE_TYPES = ("cpu", "cuda")
_SUPPORTED_DEVICES = (
    "'cpu', 'cuda', 'cuda:<index>', 'auto' or a torch.device of type 'cpu' or 'cuda'"
)


def resolve_device(device):
    """Return a :class:`torch.device` for ``"cpu"``, ``"cuda"``, ``"auto"`` or a device.

    ``"auto"`` picks CUDA when it is available and the CPU otherwise. Strings and
    :class:`torch.device` instances are checked alike: a device type other than
    CPU and CUDA, CUDA without a GPU, or a GPU index beyond the visible ones is
    refused with a ``ValueError`` that says what is supported.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"device must be {_SUPPORTED_DEVICES}; got {type(device).__name__} {device!r}."
        )
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device={device!r} is not a device torch knows; expected {_SUPPORTED_DEVICES}."
        ) from None
    if resolved.type not in _DEVICE_TYPES:
        raise ValueError(
            f"device={str(resolved)!r} is not supported: sklearn_lib computes on CPU "
            f"and CUDA devices only; expected {_SUPPORTED_DEVICES}."
        )
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={str(resolved)!r} was requested but CUDA is not available; "
                "use device='cpu' or device='auto'."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(resolved)!r} was requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) are visible "
                f"(indices 0..{torch.cuda.device_count() - 1})."
            )
    return resolved


def resolve_dtype(dtype):
    """Return the torch floating dtype named by ``dtype`` ("float64" or "float32")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    return _DTYPES[name]


#: Precisions a model may run in (``model_dtype``); its statistics stay in ``dtype``.
_MODEL_DTYPES = {**_DTYPES, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dtype(model_dtype, dtype):
    """The floating dtype a model runs in, or None to keep the model's own.

    Parameters
    ----------
    model_dtype : None, "model", str or torch.dtype
        None: the model runs in ``dtype`` (it is converted when it has
        another). ``"model"``: in the precision it has (returns None).
        ``"float64"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a
        torch dtype: converted to that one.
    dtype : str or torch.dtype
        The precision of the statistics (:func:`resolve_dtype`).

    Returns
    -------
    torch.dtype or None
    """
    if model_dtype is None:
        return resolve_dtype(dtype)
    if isinstance(model_dtype, str) and model_dtype == "model":
        return None
    if isinstance(model_dtype, torch.dtype) and model_dtype in _MODEL_DTYPES.values():
        return model_dtype
    if isinstance(model_dtype, str) and model_dtype in _MODEL_DTYPES:
        return _MODEL_DTYPES[model_dtype]
    raise ValueError(
        f"model_dtype must be None (the model runs in dtype), 'model' (in its own "
        f"precision) or one of {sorted(_MODEL_DTYPES)}, got {model_dtype!r}."
    )


def is_tensor(a):
    return isinstance(a, torch.Tensor)


def as_tensor(a, *, device, dtype):
    """Convert ``a`` (ndarray, memmap, tensor) to a tensor on ``device`` with ``dtype``.

    Numpy input is wrapped without a copy when dtype and device allow it; tensor
    input is moved only when its device or dtype differ.
    """
    if isinstance(a, torch.Tensor):
        return a.detach().to(device=device, dtype=dtype)
    array = np.asarray(a)
    if array.dtype != np.dtype(str(dtype).removeprefix("torch.")):
        array = array.astype(str(dtype).removeprefix("torch."))
    if not array.flags.writeable:
        # torch.from_numpy warns on read-only buffers (memmaps opened 'r'); a copy
        # of one chunk is the price of never writing to a user's cache.
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def to_output(t, like):
    """Return ``t`` as numpy if ``like`` is not a tensor, else as a tensor on ``like``'s device."""
    if isinstance(like, torch.Tensor):
        return t.to(like.device)
    return t.detach().cpu().numpy()


def n_rows(a):
    return int(a.shape[0])


def gen_batches(n, batch_size):
    """Yield slices covering ``range(n)`` in chunks of ``batch_size`` (all at once if None)."""
    if batch_size is None or batch_size >= n:
        yield slice(0, n)
        return
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def model_device(model):
    """Device of a module's first parameter or buffer (the CPU for a stateless module)."""
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode for the block, then restore every module's own flag."""
    # Restore each module's own flag: model.train(previous) would overwrite
    # submodules that were deliberately in a different mode.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
