"""Sections of a live model: layer ``b`` as a function of layer ``a``'s value.

A section ``(a, b)`` maps layer ``a``'s activations to layer ``b``'s with
everything else held at the batch's values. :func:`_run_section` evaluates it
with ``a``'s value replaced wherever the forward pass uses it (the total
derivative, :class:`_Substitution`), :func:`section_function` returns it as a
function, and :func:`_check_differentiable` refuses sections autograd cannot
differentiate. Their vector-Jacobian products are in :mod:`._vjp`.
"""

import weakref
from contextlib import nullcontext

import torch
from torch._C import _functorch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from ._adapters import first_tensor, take, unwrap_model
from ._model import (
    _hooks,
    _parse_layers,
    _run_until_stopped,
    _StopForward,
)

__all__ = ["section_function"]


class _Substitution(TorchFunctionMode):
    """Make every later use of a replaced tensor see its replacement (see :func:`_run_section`).

    A hook replaces what one module reads or returns, but the forward pass may
    hold the same tensor elsewhere: a pre-norm block keeps ``residual = hidden``
    and adds it back after the MLP that reads ``ln_2(hidden)``. A section's
    Jacobian is the total derivative of ``b`` with respect to ``a``'s value, so
    once the hook has fired, every torch function given the original tensor gets
    the replacement instead. Uses that cannot be redirected are refused: the
    original consumed before the hook fired (that result is already computed),
    or, after it, another view of the original's storage.
    """

    def __init__(self, where):
        super().__init__()
        self.where = where
        self.original = self.replacement = self.storage = None
        self.before = {}  # id -> weak reference of the tensors consumed so far
        # While the replacing hook runs, its own reads of the value are no uses.
        self.paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.original is None:
            result = func(*args, **kwargs)
            if not self.paused:
                self._record_uses(func, (args, kwargs), result)
            return result
        args, kwargs = tree_map(self._substitute, (args, kwargs))
        return func(*args, **kwargs)

    def _record_uses(self, func, inputs, result):
        if func in _METADATA:
            return
        for value in tree_leaves(inputs):
            # An in-place method returns its argument: it changes the value the
            # module will read, but does not consume it.
            if isinstance(value, torch.Tensor) and value is not result:
                self.before[id(value)] = weakref.ref(value)

    def _substitute(self, value):
        if value is self.original:
            return self.replacement
        if (isinstance(value, torch.Tensor) and value is not self.replacement
                and _storage(value) == self.storage):
            raise ValueError(
                f"{self.where}: the forward pass uses another tensor on the memory of "
                f"{self.layer!r} (a view of it or of its base) after replacing it, so the "
                "replacement cannot reach that use and the section's Jacobian would miss "
                "its path. Record the tensor the model uses (the view's base, or a module "
                "reading the whole of it) instead."
            )
        return value

    def replaced(self, layer, original, replacement):
        """Called once the hook has swapped ``original`` for ``replacement``."""
        # Before the substitution starts (and while reads are no uses): this
        # reads the original through torch functions.
        storage = _storage(original)
        self.layer, self.paused = layer, False
        used = self.before.get(id(original))
        if used is not None and used() is original:
            raise ValueError(
                f"{self.where}: the forward pass uses the value of {layer!r} before "
                f"{layer!r} is reached, so replacing it there cannot change that use and "
                "the section's Jacobian would miss its path. Choose a layer at which the "
                "value is first used (e.g. the module that computes it, as an output)."
            )
        self.before.clear()
        if replacement is not original:
            self.original, self.replacement, self.storage = original, replacement, storage


def _storage(t):
    """The address of the memory under ``t`` (through ``torch.func``'s wrappers), or None."""
    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    try:
        return t.untyped_storage().data_ptr() or None if t.numel() else None
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, meta)
        return None


# Reading metadata is not a use of a tensor's value.
_METADATA = frozenset(
    getattr(torch.Tensor, name) for name in (
        "size", "dim", "numel", "stride", "is_contiguous", "is_floating_point",
        "is_complex", "element_size", "data_ptr", "storage_offset", "nelement",
        "ndimension", "get_device", "__len__", "__format__", "__repr__",
    )
) | frozenset(
    getattr(torch.Tensor, name).__get__ for name in (
        "shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad",
        "is_leaf", "grad_fn", "is_sparse", "is_quantized", "is_meta",
    )
)


def _run_section(model, a, b, x, act_in):
    """Evaluate ``b``'s activation with ``a``'s replaced by ``act_in`` on inputs ``x``.

    The replacement reaches every later use of the tensor ``a`` names, not only
    the module that reads or returns it (see :class:`_Substitution`): the
    section is ``b`` as a function of ``a``'s value, and its Jacobian is the
    total derivative, e.g. ``I + d mlp(ln_2(h)) / dh`` for ``a = "ln_2:input"``
    in a pre-norm block that adds ``h`` back.
    """
    state = {"replaced": False, "out": None}
    where = f"section {a.spec!r} -> {b.spec!r}"
    substitution = _Substitution(where)

    def replace(value):
        if state["replaced"]:
            raise RuntimeError(
                f"module {a.name!r} ran more than once in one forward pass, so section "
                f"{a.spec!r} -> {b.spec!r} is ambiguous."
            )
        if value.shape != act_in.shape:
            raise ValueError(
                f"section {a.spec!r} -> {b.spec!r}: the replacement activation has shape "
                f"{tuple(act_in.shape)} but {a.spec!r} is {tuple(value.shape)} for these inputs."
            )
        state["replaced"] = True
        # A differentiable copy protects the caller's tensor (and autograd's leaf)
        # from in-place operations in the following modules.
        return act_in.clone()

    def capture(value):
        if not state["replaced"]:
            raise ValueError(
                f"section {a.spec!r} -> {b.spec!r}: {b.spec!r} runs before {a.spec!r}; "
                "give layers in the order the forward pass computes them."
            )
        state["out"] = value
        raise _StopForward

    # Raw hooks around the replacing one see the whole tensor the module reads or
    # returns, before and after (the replacing hook sees a view of its positions).
    seen = {}
    if a.kind == "input":
        def before(module, args):
            seen["original"] = args[0] if args else None
            substitution.paused = True

        def after(module, args):
            substitution.replaced(a.spec, seen["original"], args[0])

        register = a.module.register_forward_pre_hook
    else:
        def before(module, args, output):
            seen["original"] = first_tensor(output)[0]
            substitution.paused = True

        def after(module, args, output):
            substitution.replaced(a.spec, seen["original"], first_tensor(output)[0])

        register = a.module.register_forward_hook
    first = register(before, prepend=True)
    try:
        with _hooks([(a, replace), (b, capture)]):
            last = register(after)
            try:
                with substitution:
                    _run_until_stopped(model, x)
            finally:
                last.remove()
    finally:
        first.remove()
    if state["out"] is None:
        raise ValueError(
            f"section {a.spec!r} -> {b.spec!r}: {b.spec!r} was not reached in the forward pass."
        )
    return state["out"]


def section_function(model, in_layer, out_layer, inputs):
    """Return the section ``f(act_in) -> act_out`` between two layers for a batch of inputs.

    The model is run on ``inputs`` with the activation of ``in_layer`` replaced by
    the argument, and stopped as soon as ``out_layer`` is computed (later modules
    never run). ``f`` is differentiable in its argument, also under ``torch.func``.
    The model is used as it is: put it in eval mode and give ``act_in`` the
    model's dtype and device (see :func:`prepare_model`).

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    in_layer, out_layer : str
        Layer names (module paths with optional ``":input"``/``":output"``
        suffix; output by default). ``out_layer`` must be computed after
        ``in_layer``.
    inputs : torch.Tensor
        The batch of model inputs that fixes everything outside the section.

    Returns
    -------
    f : callable
        ``f(act_in)`` with ``act_in`` shaped like ``in_layer``'s activations for
        ``inputs``; returns ``out_layer``'s activation (a tensor).

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.collect import section_function
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> f = section_function(net, "0", "1", torch.randn(5, 3))
    >>> h = torch.randn(5, 4)
    >>> torch.equal(f(h), torch.tanh(h))
    True
    """
    model = unwrap_model(model)
    a, b = _parse_layers(model, [in_layer, out_layer], "output")
    return lambda act_in: _run_section(model, a, b, inputs, act_in)


def _check_differentiable(model, a, b, x, act_in):
    """Fail clearly when ``b`` does not depend differentiably on ``a`` (one-sample probe).

    ``torch.func.vjp`` silently returns zeros for outputs that are detached from
    its primal, so connectivity is checked with ordinary autograd first.
    """
    where = f"section {a.spec!r} -> {b.spec!r} is not differentiable"
    if not act_in.is_floating_point():
        raise ValueError(f"{where}: the activations of {a.spec!r} have dtype {act_in.dtype}.")
    probe = act_in[:1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        try:
            out = _run_section(model, a, b, take(x, slice(0, 1)), probe)
        except (ValueError, RuntimeError) as exc:
            if "ran more than once" in str(exc) or str(exc).startswith("section "):
                raise  # ours
            # A model that cannot run one sample alone depends on its batch
            # (BatchNorm with batch statistics raises here).
            raise ValueError(
                f"section {a.spec!r} -> {b.spec!r} fails on a batch of one sample "
                f"({type(exc).__name__}: {exc}), although the model takes the whole batch: "
                "it depends on the other samples of its batch (BatchNorm with batch "
                "statistics needs more than one), so per-sample Jacobians cannot be "
                "computed. Every statistic assumes independent samples: use running "
                "statistics (model.eval() with track_running_stats=True) or compute "
                "statistics per sample."
            ) from exc
        if not out.is_floating_point():
            raise ValueError(f"{where}: {b.spec!r} has dtype {out.dtype}.")
        grad = (
            torch.autograd.grad(out, probe, torch.ones_like(out), allow_unused=True)[0]
            if out.requires_grad
            else None
        )
    if grad is None:
        raise ValueError(
            f"{where}: {b.spec!r} does not depend on {a.spec!r} through differentiable "
            "operations (it is detached, integer-valued, or computed from other values)."
        )


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3 has no backend selection
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
