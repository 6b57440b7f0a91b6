"""Whether a module computes its class's formula: the static half of the fast paths' checks.

A closed form (:mod:`sklearn_lib.models._fastpath`, :mod:`sklearn_lib.models._attention`)
is chosen from the *types* of a section's modules, but a module instance can
compute something else than its class says:

* an instance-level ``forward`` (``lin.forward = lambda x: ...``: Python finds it
  before the class's method; ``nn.Module.__call__`` calls ``self.forward``);
* forward hooks and forward pre-hooks, the module's own or global ones
  (``register_module_forward_hook``); :mod:`torch.nn.utils.prune` and the old
  ``torch.nn.utils.weight_norm`` / ``spectral_norm`` are pre-hooks that recompute
  the weight;
* a subclass, or a patched class (``nn.Linear.forward = ...``).

:func:`override` names the first two, which are then not taken for their
class's formula; exact type checks take care of subclasses. A parametrized
``nn.Linear`` (:mod:`torch.nn.utils.parametrize`: the new ``weight_norm``,
``spectral_norm``, custom masks) is accepted by :func:`is_linear`: its class only
turns ``weight`` into a property that evaluates the parametrization, which
``nn.Linear.forward`` reads like any weight, so the closed form reads the very
same weight. Whatever these checks cannot see (a patched class, a
data-dependent ``forward`` of a declared block) is caught by comparing the
formula with the model's output on every batch (``formula_mismatch``).
"""

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "first_override",
    "global_hooks",
    "is_linear",
    "is_plain_sequential",
    "linear_type",
    "override",
]


def override(module):
    """Why ``module`` may compute something else than its class's ``forward``; None if not.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    reason : str or None
        A few words for messages, e.g. ``"an instance-level forward"``.
    """
    if "forward" in vars(module):
        return "an instance-level forward"
    if module._forward_hooks or getattr(module, "_forward_hooks_with_kwargs", None):
        return "a forward hook"
    if module._forward_pre_hooks:
        return ("a forward pre-hook (torch.nn.utils.prune and the old weight_norm and "
                "spectral_norm are such hooks)")
    return None


def global_hooks():
    """Whether hooks registered for every module could change what a section computes."""
    module = torch.nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def linear_type(module):
    """Whether ``module``'s class is ``nn.Linear`` or its parametrized version.

    :mod:`torch.nn.utils.parametrize` derives a class from ``nn.Linear`` that adds
    properties only (no ``forward``).
    """
    cls = type(module)
    return cls is nn.Linear or (
        parametrize.is_parametrized(module) and cls.__bases__ == (nn.Linear,)
        and "forward" not in vars(cls)
    )


def is_linear(module):
    """Whether ``module`` computes ``x @ weight.T + bias``: a :func:`linear_type` without
    an :func:`override`."""
    return linear_type(module) and override(module) is None


def is_plain_sequential(module):
    """Whether ``module`` runs its children in order: an exact ``nn.Sequential`` as it is."""
    return type(module) is nn.Sequential and override(module) is None


def first_override(model, modules):
    """``"module 'name' (Type) has <reason>"`` for the first of ``modules`` with an override.

    None when none has one. With global hooks registered, says so instead.
    """
    if global_hooks():
        return ("hooks are registered for every module (register_module_forward_hook), "
                "which may change what any module computes")
    names = {id(m): name for name, m in model.named_modules()}
    for module in modules:
        reason = override(module)
        if reason is not None:
            return f"module {names.get(id(module), '?')!r} ({type(module).__name__}) has {reason}"
    return None
