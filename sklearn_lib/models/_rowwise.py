"""Row-wise modules of a section run on the replaced positions only.

A section from a layer restricted to some positions (``"resid_mid[-1]"``)
replaces those positions and runs the model on: a module that reads the whole
replaced tensor (an MLP on ``(batch, position, d)``) computes every position,
and its backward pass then goes through every position too, although only the
replaced ones depend on the section's input. For modules that act on each
position alone, known from their types (exact ``nn.Linear``, the elementwise
activations of :data:`~._elementwise.ELEMENTWISE`, ``nn.Identity`` and
``nn.Dropout`` (the identity in eval mode), and plain ``nn.Sequential`` runs of
them, none computing something else than its class, see
:func:`~._overrides.override`), :func:`replaced_positions_only` makes the
forward pass compute the other positions from their values as constants and
the replaced ones from the replacement: the same values (to rounding), and a
backward pass over the replaced positions only. This is the total derivative
still: the module's other positions do not depend on the replacement.
"""

from contextlib import contextmanager

import torch

from . import _model
from ._elementwise import ELEMENTWISE, TRANSPARENT
from ._overrides import global_hooks, is_linear, is_plain_sequential, override

__all__ = ["replaced_positions_only", "rowwise_modules"]


def _rowwise(module):
    if override(module):
        return False
    if is_plain_sequential(module):
        children = list(module.children())
        return bool(children) and all(_rowwise(child) for child in children)
    return is_linear(module) or type(module) in ELEMENTWISE or type(module) in TRANSPARENT


def rowwise_modules(model):
    """The largest modules of ``model`` that act on each position alone (module docstring)."""
    found = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in found) or not _rowwise(module):
            continue
        found.append(name)
    modules = dict(model.named_modules())
    return [modules[name] for name in found]


@contextmanager
def replaced_positions_only(model, layer):
    """Run row-wise modules on the positions of ``layer`` that a section replaces only.

    Within the context, a row-wise module (:func:`rowwise_modules`) called
    with the tensor that replaces the selected positions of ``layer`` (a
    parsed layer with positions, without declared axes) as its one argument,
    with positions on axis 1 of at least three, returns the module of the
    original values at the other positions and of the replacement at the
    replaced ones. Nothing changes for other layers or when hooks are
    registered on every module.
    """
    if layer.positions is None or layer.axes is not None or global_hooks():
        yield
        return
    modules = rowwise_modules(model)
    if not modules:
        yield
        return
    replaced = []

    def hook(module, args, kwargs, output):
        if kwargs or len(args) != 1 or not isinstance(output, torch.Tensor):
            return None
        found = next((r for r in replaced if args[0] is r.full), None)
        if (found is None or found.full.ndim < 3
                or tuple(output.shape[:2]) != tuple(found.full.shape[:2])):
            return None
        # Copies: a module may work in place (ReLU(inplace=True)), or run twice.
        others = module.forward(found.original.clone())
        return others.index_copy(1, found.index, module.forward(found.new.clone()))

    token = _model.REPLACED.set(replaced)
    handles = [module.register_forward_hook(hook, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _model.REPLACED.reset(token)
