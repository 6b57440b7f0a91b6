"""The parameter blocks of a section, read off a model or cached arrays.

:func:`~._parameter_null.section_null_space` counts the null space of blocks
of parameters; this module says what those blocks are for a section of the
graph: a recognised closed form of a live model (a ``Linear`` and its
activation, a residual MLP) or cached activations read as ``act(x W + b)``,
with the downstream Jacobian of the graph's output coordinates on the same rows.
"""

import numpy as np
import torch
from torch import nn

from ._parameter_null import (
    _MATERIALISE_NUMBERS,
    ParameterBlock,
    _chunks,
    section_null_space,
)

__all__ = ["UnsupportedSection", "blocks_for_structure", "dense_sections", "derivative_of",
           "downstream_from_arrays", "null_spaces", "verified_dense_section"]


class UnsupportedSection(ValueError):
    """The section's parameters cannot be read off what was given (the reason is the message)."""


def _tensor(a, device, dtype):
    if isinstance(a, torch.Tensor):
        return a.detach().to(device=device, dtype=dtype)
    array = np.asarray(a)
    return torch.as_tensor(np.array(array, dtype=np.dtype(str(dtype).removeprefix("torch."))),
                           device=device)


def _row_jacobian(J, positions, n_rows):
    """Cached Jacobian rows ``(rows, P_out d_out, d_in)`` of a row-wise section as ``(rows, d_out, d_in)``.

    With positions (rows are (sample, position) pairs) the block of the row's own
    output position is kept; the others must be exactly zero (a section that
    mixes positions is refused).
    """
    P_in, P_out = positions
    if P_out == 1 and P_in == 1:
        return J
    if P_in != P_out:
        raise UnsupportedSection("the positions change along the downstream sections.")
    rows, width, d_in = J.shape
    d_out = width // P_out
    J = J.reshape(rows, P_out, d_out, d_in)
    own = torch.arange(rows, device=J.device) % P_in
    mask = torch.zeros(rows, P_out, dtype=torch.bool, device=J.device)
    mask[torch.arange(rows), own] = True
    if J[~mask].abs().max().item() if (~mask).any() else 0.0:
        raise UnsupportedSection(
            "a downstream section mixes positions (the output at one position depends on "
            "another's activations); the per-row parameter Jacobian does not apply.")
    return J[mask].reshape(rows, d_out, d_in)


def downstream_from_arrays(jacobians, layer, components, *, n_rows, positions, device, dtype):
    """``A_x = C_L^T J_{L-1}(x) ... J_layer(x)`` for every row, from cached adjacent Jacobians.

    ``components`` is the final layer's ``C_L^T`` (o, d_L). Returns one matrix
    ``(o, d_layer)`` when every row's chain is the same (affine downstream),
    else a callable ``(start, stop) -> (c, o, d_layer)``, kept in memory when
    it holds at most ``2**26`` numbers and recomputed chunk by chunk otherwise.
    """
    C = _tensor(components, device, dtype)
    L = len(jacobians)
    if layer == L:
        return C

    def chain(start, stop):
        A = None
        for l in range(L - 1, layer - 1, -1):
            J = _row_jacobian(_tensor(jacobians[l][start:stop], device, dtype),
                              (positions[l], positions[l + 1]), stop - start)
            A = (C @ J) if A is None else torch.bmm(A, J)
        return A

    o, d = C.shape[0], _shape(jacobians[layer])[2]
    first = chain(0, 1)[0]
    constant, parts = True, []
    keep = n_rows * o * d <= _MATERIALISE_NUMBERS
    for start, stop in _chunks(n_rows, o * d + sum(
            _shape(jacobians[l])[1] * _shape(jacobians[l])[2] for l in range(layer, L))):
        A = chain(start, stop)
        constant = constant and bool((A == first).all())
        if keep:
            parts.append(A)
        elif not constant:
            break
    if constant:
        return first
    if keep:
        stored = torch.cat(parts)
        return lambda start, stop: stored[start:stop]
    return chain


def _shape(a):
    return tuple(int(s) for s in a.shape)


# --------------------------------------------------------------------------- sections
def derivative_of(activation, z):
    """``act'(z)`` elementwise through autograd (``ReLU'(0) = 0``, as backward gives it)."""
    from ..models._fastpath import LinearElementwise

    return LinearElementwise(None, None, activation, False).derivative(z)


def blocks_for_structure(structure, inputs, downstream):
    """The parameter blocks of a recognised model section (``_fastpath`` closed forms).

    ``act(x W^T + b)``: one block on the rows ``x`` read through ``A diag(s)``;
    ``act(x) W^T + b``: one block on ``act(x)`` read through ``A``; a residual
    MLP block ``x + act(x W_in^T + b_in) W_out^T + b_out``: ``W_in`` on ``x``
    through ``A W_out diag(s)`` and ``W_out`` on the hidden activations through
    ``A``. A section without a Linear has no parameters. Anything else
    (attention, unrecognised modules) raises :class:`UnsupportedSection`.
    """
    from ..models._fastpath import LinearElementwise, LinearReadout, ResidualMLP

    if isinstance(structure, ResidualMLP):
        s = structure.derivative(inputs)
        with torch.no_grad():
            hidden = structure.activation(
                torch.nn.functional.linear(inputs, structure.w_in, structure.b_in).clone())
        return [
            ParameterBlock(inputs, structure.b_in is not None, downstream,
                           structure.w_out, s, "w_in"),
            ParameterBlock(hidden, structure.b_out is not None, downstream, None, None,
                           "w_out"),
        ]
    if type(structure) in (LinearElementwise, LinearReadout):
        if structure.weight is None:
            return []
        bias = structure.bias is not None
        if structure.linear_first:
            s = None if structure.activation is None else structure.derivative(inputs)
            return [ParameterBlock(inputs, bias, downstream, None, s, "linear")]
        with torch.no_grad():
            x = structure.activation(inputs.clone())
        return [ParameterBlock(x, bias, downstream, None, None, "linear")]
    raise UnsupportedSection(
        "the section is not a Linear with an elementwise activation or a declared residual "
        "MLP block, so its parameters are not known.")


def verified_dense_section(model, spec, X_prev, X_next):
    """``act(x W^T + b)`` for a layer that is an elementwise activation's output whose
    input is an ``nn.Linear``'s output, when the two reproduce the recorded rows.

    The closed forms of :mod:`sklearn_lib.models._fastpath` need both layers inside one
    ``nn.Sequential``; the shipped MLP's ``embed -> mlp.1`` starts outside it. Here
    the Linear is the child before the activation in its ``nn.Sequential``, and it
    is accepted only if ``act(linear(X_{l-1}))`` equals ``X_l`` on every row (to
    ``1e3 eps`` of the largest entry): then the section computes exactly that on the
    data, and the Linear's weight and bias are its parameters. Returns the
    :class:`~sklearn_lib._fastpath.LinearElementwise` or None.
    """
    from ..models._fastpath import ELEMENTWISE, LinearElementwise

    if (spec.kind != "output" or type(spec.module) not in ELEMENTWISE or not spec.name
            or spec.positions is not None or spec.axes is not None):
        return None
    parent_name, _, key = spec.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if type(parent) is not nn.Sequential:
        return None
    names = list(parent._modules)
    index = names.index(key)
    linear = parent._modules[names[index - 1]] if index > 0 else None
    if type(linear) is not nn.Linear or (X_prev.shape[1], X_next.shape[1]) != (
            linear.in_features, linear.out_features):
        return None
    W = linear.weight.detach().to(X_prev.dtype)
    b = None if linear.bias is None else linear.bias.detach().to(X_prev.dtype)
    with torch.no_grad():
        predicted = spec.module(torch.nn.functional.linear(X_prev, W, b).clone())
    scale = max(float(X_next.abs().max()), float(X_prev.abs().max()), 1.0)
    if float((predicted - X_next).abs().max()) > 1e3 * torch.finfo(X_next.dtype).eps * scale:
        return None
    return LinearElementwise(W, b, spec.module, linear_first=True)


def _aligned(positions, layer):
    if len(set(positions[layer - 1:])) != 1:
        raise UnsupportedSection(
            "the layers after it have different numbers of positions; the parameter count "
            "needs rows that are the same (sample, position) pairs in every layer.")


def null_spaces(acts, jacs, positions, components, section_blocks, *, device, dtype,
                options):
    """Per layer, the :class:`SectionNullSpace` of the section into it, or the reason why not.

    ``section_blocks(l, inputs, downstream)`` gives the blocks of the section
    into layer ``l`` from the rows of layer ``l - 1`` and the downstream
    Jacobians of layer ``l``. Layer 0 has no section (None).
    """
    results = [None]
    for l in range(1, len(acts)):
        try:
            _aligned(positions, l)
            n_rows = _shape(acts[l])[0]
            downstream = downstream_from_arrays(jacs, l, components, n_rows=n_rows,
                                                positions=positions, device=device,
                                                dtype=dtype)
            inputs = _tensor(acts[l - 1], device, dtype)
            blocks = section_blocks(l, inputs, downstream)
            results.append(section_null_space(blocks, n_outputs=_shape(components)[0],
                                              dtype=dtype, **options))
        except UnsupportedSection as reason:
            results.append(str(reason))
    return results


def dense_sections(center, derivatives):
    """``section_blocks`` reading every section as ``act(x W + b)`` (cached arrays).

    ``derivatives[l]`` (n, d_l) is ``act'(z)`` of the layers given with
    pre-activations; the others are affine maps. The bias exists when the graph
    centres (``center=False`` folds it into the activations).
    """

    def blocks(l, inputs, downstream):
        return [ParameterBlock(inputs, center, downstream, None, derivatives.get(l), "dense")]

    return blocks
