"""Memory limits: parsing them, tracking tensors' memory, and sizing batches and chunks.

The interaction graph streams vector-Jacobian products chunk by chunk (see
:class:`~sklearn_lib.models._vjp.SectionProducts`): a pass holds a batch of
``n`` samples, each with a fixed cost (its forward pass, the section's saved
activations) and, per product vector of the current chunk, a cost of its own
(the vector's backward pass, its cotangent, its product). :func:`plan_batch`
and :func:`chunk_vectors` choose ``n`` and the chunk so that both fit a budget
in bytes; :class:`LiveTensors` measures the two costs of a section on one sample.
"""

import math
import re
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensors", "chunk_vectors", "format_bytes", "parse_memory_limit", "plan_batch"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_memory_limit(value):
    """Bytes of a memory limit: an int or float of bytes, or a string such as ``"4GB"``.

    Units (case-insensitive, optional space): B, KB/MB/GB/TB (powers of 1000;
    K, M, G, T alike) and KiB/MiB/GiB/TiB (powers of 1024). None stays None.

    Examples
    --------
    >>> from sklearn_lib.utils._memory import parse_memory_limit
    >>> parse_memory_limit("4GB"), parse_memory_limit("1.5 GiB"), parse_memory_limit(2**20)
    (4000000000, 1610612736, 1048576)
    """
    if value is None:
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        unit = None if match is None else _UNITS.get(match.group(2).lower())
        if unit is None:
            raise ValueError(
                f"memory_limit must be a number of bytes or a string such as '4GB' or "
                f"'512MiB' (units {', '.join(u for u in _UNITS if u)}), got {value!r}."
            )
        value = float(match.group(1)) * unit
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"memory_limit must be a positive number of bytes, got {value!r}.")
    return int(value)


def format_bytes(n, up=False):
    """``n`` bytes in 3 digits ("1.5 GB"), powers of 1000 as :func:`parse_memory_limit`.

    ``up`` rounds up, for a size that must be enough.

    Examples
    --------
    >>> from sklearn_lib.utils._memory import format_bytes
    >>> format_bytes(1_234_567), format_bytes(1_234_567, up=True), format_bytes(999)
    ('1.23 MB', '1.24 MB', '999 B')
    """
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            value = n / size
            if up:
                scale = 10 ** (2 - math.floor(math.log10(value)))
                value = math.ceil(value * scale) / scale
            return f"{value:.3g} {unit}"
    return f"{int(n)} B"


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensors that operations create while the mode is active, live and at peak.

    Every storage an operation returns is counted once, from its creation
    until the last tensor on it is freed (a tensor kept by autograd stays
    alive). Tensors created before the mode are not counted. This measures on
    every device (CUDA's allocator statistics do not exist on the CPU).

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.utils._memory import LiveTensors
    >>> x = torch.ones(1000, dtype=torch.float64)
    >>> with LiveTensors() as live:
    ...     y = (x + 1) * 2  # x + 1 lives until the product is made
    >>> live.peak, live.live
    (16000, 8000)
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs = {}  # storage address -> [bytes, tensors on it]

    def reset_peak(self):
        """Start a new peak from the bytes live now."""
        self.peak = self.live

    def _free(self, key):
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0:
                continue
            entry = self._refs.get(key)
            if entry is None:
                self._refs[key] = entry = [size, 0]
                self.live += size
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._free, key)
        return out


def plan_batch(budget, per_sample, per_vector, n_vectors):
    """Samples per batch and product vectors per chunk that fit ``budget`` bytes.

    A batch of ``n`` samples with chunks of ``c`` vectors holds about
    ``n * (per_sample + c * per_vector)`` bytes. Whole samples (``c =
    n_vectors``) in as many as fit come first; otherwise one sample, with as
    many vectors per chunk as fit. Returns ``(n, c)``, or ``(0, 0)`` when
    even one sample with one vector exceeds the budget.

    Examples
    --------
    >>> from sklearn_lib.utils._memory import plan_batch
    >>> plan_batch(1000, 10, 1, 40)   # whole samples: 50 bytes each
    (20, 40)
    >>> plan_batch(1000, 100, 10, 400)  # one sample, 90 vectors at a time
    (1, 90)
    >>> plan_batch(100, 95, 10, 4)
    (0, 0)
    """
    if per_sample + per_vector > budget:
        return 0, 0
    whole = per_sample + n_vectors * per_vector
    if whole <= budget:
        return int(budget // whole), int(n_vectors)
    return 1, int((budget - per_sample) // per_vector)


def chunk_vectors(budget, n_samples, per_sample, per_vector, n_vectors):
    """Product vectors per chunk for a batch of ``n_samples`` within ``budget`` bytes (0: none fit).

    Examples
    --------
    >>> from sklearn_lib.utils._memory import chunk_vectors
    >>> chunk_vectors(1000, 2, 100, 10, 400), chunk_vectors(1000, 2, 100, 10, 20)
    (40, 20)
    >>> chunk_vectors(1000, 10, 100, 10, 4)
    0
    """
    room = budget // n_samples - per_sample
    return int(max(0, min(n_vectors, room // per_vector)))
