"""Which sections of a live model have a closed form: found from types and declarations.

:func:`detect_section` recognises :class:`~._elementwise.LinearElementwise`
sections on ``nn.Sequential`` sub-sequences between two recorded layers
(:mod:`~sklearn_lib.models._sequential` finds the modules between them) and
drops ``nn.Identity`` and ``nn.Dropout`` (the identity in eval mode, which is
how the collectors run models). What is left must be at most one ``nn.Linear``
and at most one elementwise activation from :data:`~._elementwise.ELEMENTWISE`,
in either order (``act(x W + b)``: ``J = diag(s) W^T``; ``act(x) W + b``: ``J =
W^T diag(s)``), or nothing at all (``J = I``). Exact types are required (a
subclass may override ``forward``; a parametrized ``nn.Linear`` is one, see
:mod:`~sklearn_lib.models._overrides`) and no module of the section may compute
something else than its class (an instance-level ``forward``, hooks). It also
returns the :class:`~._residual.ResidualMLP` of a section the user declared a
residual MLP block (:func:`~._residual.declare_residual_mlp`).

Types and declarations only say what a section *should* compute. Every closed
form is therefore compared with what the model computes, on every batch the
statistics and edges use (:func:`~._elementwise.formula_mismatch`; the callers
run the check), and a section whose model output differs from its formula
anywhere takes the generic path, with a warning
(:func:`~._elementwise.warn_formula`). :func:`why_generic` says why a section
whose types have a closed form does not take it.
"""

import torch
from torch import nn

from ._elementwise import (
    ELEMENTWISE,
    TRANSPARENT,
    LinearElementwise,
    formula_mismatch,
    warn_formula,
)
from ._overrides import first_override, global_hooks, is_linear, override
from ._readout import LinearReadout
from ._residual import (
    RESIDUAL_ATTRIBUTE,
    ResidualMLP,
    declare_residual_mlp,
    declared_entry,
    residual_section,
)
from ._sequential import candidate_leaves, run_leaves, section_leaves

# Re-exported: the closed forms and the Sequential walk, found here by callers.
__all__ = [
    "ELEMENTWISE",
    "LinearElementwise",
    "LinearReadout",
    "ResidualMLP",
    "declare_residual_mlp",
    "detect_section",
    "fits_rows",
    "formula_mismatch",
    "readout_section",
    "run_leaves",
    "section_leaves",
    "warn_formula",
    "why_generic",
]


def fits_rows(structure, layer_in, layer_out, shape_in, shape_out, sequence):
    """Whether a closed form acts on the recorded rows of per-sample shapes ``shape_in/out``.

    Both layers need the same positions (the same selection, see
    ``_model._parse_layers``, and as many of them); flat layers must be vectors,
    sequence layers (position, feature) or vectors; the Linear's weight must be
    ``(d_out, d_in)`` (without a Linear, ``d_in == d_out``).
    """
    if layer_in.positions != layer_out.positions:
        return False
    # Declared axes need not be the axis a Linear acts on (channels of a conv).
    if layer_in.axes is not None or layer_out.axes is not None:
        return False
    allowed = (1, 2) if sequence else (1,)
    if len(shape_in) not in allowed or len(shape_out) not in allowed:
        return False
    # (positions, features); empty layers are refused by name where rows are made.
    (p_in, d_in), (p_out, d_out) = (
        tuple(shape) if len(shape) == 2 else (1, shape[0]) for shape in (shape_in, shape_out)
    )
    if p_in != p_out:
        return False
    return structure.fits(d_in, d_out)


def detect_section(model, a, b):
    """The closed form of section ``a -> b`` (parsed layers of ``collect``), or None.

    Returns a :class:`ResidualMLP` for ``"M:input" -> "M:output"`` of a module
    marked by :func:`declare_residual_mlp`, or between the two submodules a parent
    declared with ``input``/``output`` (the caller checks the formula on
    recorded rows with ``verify`` before using it), a :class:`LinearElementwise`
    when the rule of the module docstring applies, None otherwise (the caller
    then uses generic vector-Jacobian products). Shapes are not checked here;
    the caller compares the Linear's widths with the recorded activations.
    """
    if global_hooks():
        return None
    # A parametrized weight is evaluated once here, not recorded by autograd.
    with torch.no_grad():
        residual = residual_section(model, a, b)
        if residual is not None:
            return residual
        for leaves in candidate_leaves(model, a, b):
            structure = _classify(leaves)
            if structure is not None:
                return structure
    return None


def why_generic(model, a, b):
    """Why section ``a -> b`` is not taken in closed form although its types have one.

    The first module involved (a module of its ``nn.Sequential`` run, an
    ``nn.Sequential`` containing the layers, a declared block's modules) that
    computes something else than its class (:func:`~._overrides.override`);
    None when there is none.
    """
    modules = [m for leaves in candidate_leaves(model, a, b) for m in leaves]
    named = dict(model.named_modules())
    for layer in (a, b):
        parts = layer.name.split(".") if layer.name else []
        containers = [named[".".join(parts[:i])] for i in range(len(parts))]
        modules += [c for c in containers if type(c) is nn.Sequential]
    declared = declared_entry(model, a, b)
    if declared is not None:
        parent, names = declared
        modules += [a.module, b.module, *_submodules(parent, names)]
    names = getattr(a.module, RESIDUAL_ATTRIBUTE, None)
    if names is not None and a.name == b.name:
        modules += list(a.module.modules())
    return first_override(model, modules)


def _submodules(module, names):
    found = []
    for name in names:
        try:
            found.extend(module.get_submodule(name).modules())
        except AttributeError:
            pass
    return found


def readout_section(module):
    """The closed form of a module applied to a recorded layer, or None.

    A readout (``logits = unembed(resid[:, -1])`` in a parent's ``forward``) is
    recognised by the source from the values it reads (``ModelSource.readout``);
    here only its type counts: an exact ``nn.Linear`` or elementwise activation
    without hooks. A Linear is a :class:`~._readout.LinearReadout`, whose
    statistics and edges take memory linear in its outputs (a vocabulary).
    """
    if global_hooks() or not (is_linear(module) or type(module) in ELEMENTWISE):
        return None
    with torch.no_grad():
        if is_linear(module):
            bias = module.bias
            return LinearReadout(module.weight.detach(),
                                 None if bias is None else bias.detach())
        return _classify([module])


def _classify(leaves):
    linear, activation, order = None, None, []
    for module in leaves:
        if override(module):
            return None
        if type(module) in TRANSPARENT:
            continue
        if is_linear(module) and linear is None:
            linear = module
            order.append("linear")
        elif type(module) in ELEMENTWISE and activation is None:
            activation = module
            order.append("activation")
        else:
            return None
    if activation is None and linear is not None:
        # A Linear alone: its closed form in memory linear in its outputs.
        return LinearReadout(linear.weight.detach(),
                             None if linear.bias is None else linear.bias.detach())
    return LinearElementwise(
        weight=None if linear is None else linear.weight.detach(),
        bias=None if linear is None or linear.bias is None else linear.bias.detach(),
        activation=activation,
        linear_first=order[:1] == ["linear"],
    )
