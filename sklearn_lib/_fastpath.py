"""Closed-form Jacobians of ``Linear`` + elementwise-activation sections (SPEC section 5).

A section whose Jacobian is ``J_x = L diag(s_x) R`` with fixed matrices ``L``, ``R``
and a per-sample vector ``s_x`` (the derivative of an elementwise activation)
needs no per-sample Jacobians at all:

* ``V^T J_x = (V^T L) diag(s_x) R``, so with ``A = V^T L`` the Jacobian scatter is
  ``sum_x J_hat_x^T J_hat_x = R^T [ (A^T A) * (S^T S) ] R`` (``*`` elementwise,
  ``S`` the rows ``s_x``): O(n d^2 + d^3) instead of O(n d^3);
* the Jacobian between basis coordinates is ``A diag(s_x) (R C_pinv^T)``, one
  GEMM for a whole batch.

:func:`detect_section` recognises such sections on ``nn.Sequential``
sub-sequences between two recorded layers. The rule: map each layer to its
positions "between two children" of (possibly nested) plain ``nn.Sequential``
containers; if both layers have a position in the same container, flatten the
children between them (expanding nested plain Sequentials) and drop
``nn.Identity`` and ``nn.Dropout`` (the identity in eval mode, which is how the
collectors run models). What is left must be at most one ``nn.Linear`` and at
most one elementwise activation from :data:`ELEMENTWISE`, in either order
(``act(x W + b)``: ``J = diag(s) W^T``; ``act(x) W + b``: ``J = W^T diag(s)``), or
nothing at all (``J = I``). Exact types are required (a subclass may override
``forward``) and no module in the section may carry forward hooks.
"""

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ELEMENTWISE",
    "LinearElementwise",
    "detect_section",
    "fits_rows",
    "run_leaves",
    "section_leaves",
]

#: Activation modules treated as elementwise maps ``y_i = f(x_i)``.
ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.Mish,
    nn.Hardtanh,
)
_TRANSPARENT = (nn.Identity, nn.Dropout)


@dataclass
class LinearElementwise:
    """A section ``act(x @ weight.T + bias)`` (``linear_first``) or ``act(x) @ weight.T + bias``.

    ``weight`` is None for a section without a Linear and ``activation`` None
    for one without an activation; the derivative of a missing activation is 1.
    Activations are rows ``(N, d_in)`` (positions of sequence models are rows,
    which is valid because both modules act on the last axis only).
    """

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    activation: nn.Module | None
    linear_first: bool

    def derivative(self, X):
        """``s`` (N, d_s): the activation's derivative at the rows ``X`` of the input layer."""
        if self.linear_first and self.weight is not None:
            X = torch.nn.functional.linear(X, self.weight, self.bias)
        if self.activation is None:
            return torch.ones_like(X)
        act = self.activation
        # The derivative through autograd's own backward formula, so that it
        # equals what a vector-Jacobian product gives, kinks included (ReLU'(0)).
        # The clone shields X from in-place activations (ReLU(inplace=True)).
        _, vjp_fn = torch.func.vjp(lambda t: act(t.clone()), X)
        return vjp_fn(torch.ones_like(X))[0]

    def factors(self, V):
        """``(A, R)`` with ``V^T J_x = A diag(s_x) R``; ``R`` None means the identity."""
        if self.weight is None:
            return V.T, None
        if self.linear_first:
            return V.T, self.weight
        return V.T @ self.weight, None

    def jacobian_scatter(self, SS, V):
        """``sum_x (V^T J_x)^T (V^T J_x)`` from ``SS = S^T S`` (d_s, d_s)."""
        A, R = self.factors(V)
        inner = (A.T @ A) * SS
        return inner if R is None else R.T @ inner @ R

    def edge_factors(self, V, right):
        """``(A, B)`` with ``V^T J_x right = A diag(s_x) B``, computed once per layer."""
        A, R = self.factors(V)
        return A, (right if R is None else R @ right)

    def jacobians(self, s, out=None):
        """The full Jacobians ``J_x`` (N, d_out, d_in) from the derivatives ``s`` (N, d_s).

        ``diag(s_x) W`` (``linear_first``), ``W diag(s_x)`` or ``diag(s_x)``:
        one broadcast product per batch, no matrix product at all.
        """
        n, d_s = s.shape
        if self.weight is None:
            if out is None:
                out = s.new_zeros(n, d_s, d_s)
            else:
                out.zero_()
            out.diagonal(dim1=1, dim2=2).copy_(s)
            return out
        d_out, d_in = self.weight.shape
        if out is None:
            out = s.new_empty(n, d_out, d_in)
        if self.linear_first:
            return torch.mul(s[:, :, None], self.weight[None], out=out)
        return torch.mul(self.weight[None], s[:, None, :], out=out)

    def edge_jacobians(self, s, factors, workspace):
        """``A diag(s_x) B`` for each row ``s_x`` of ``s``: (N, k, r), in ``workspace``.

        One GEMM over all (sample, output) rows, ``(N k, d_s) @ (d_s, r)``, into
        buffers that are reused from batch to batch (fresh large allocations
        cost page faults that are comparable to the GEMM itself).
        """
        A, B = factors
        n, (k, d_s), r = s.shape[0], A.shape, B.shape[1]
        left = workspace.get("left", (n, k, d_s), A)
        torch.mul(A[None, :, :], s[:, None, :], out=left)
        out = workspace.get("out", (n, k, r), A)
        torch.matmul(left.view(n * k, d_s), B, out=out.view(n * k, r))
        return out


def fits_rows(structure, layer_in, layer_out, shape_in, shape_out, sequence):
    """Whether a closed form acts on the recorded rows of per-sample shapes ``shape_in/out``.

    Both layers need the same positions (the same selection, see
    ``_model._parse_layers``, and as many of them); flat layers must be vectors,
    sequence layers (position, feature) or vectors; the Linear's weight must be
    ``(d_out, d_in)`` (without a Linear, ``d_in == d_out``).
    """
    if layer_in.positions != layer_out.positions:
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
    if structure.weight is None:
        return d_in == d_out
    return tuple(structure.weight.shape) == (d_out, d_in)


def _hooked(module):
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(module, "_forward_hooks_with_kwargs", None)
    )


def _is_plain_sequential(module):
    return type(module) is nn.Sequential


def _positions(modules, name, kind):
    """All ``(container, index)`` naming the value between children ``index-1`` and ``index``.

    ``name``/``kind`` is a recorded layer (module path, "input" or "output").
    Equivalent positions are followed up (the start or end of a nested
    Sequential is a position in its parent) and down (a position next to a
    Sequential child is also that child's start or end).
    """
    found = set()
    todo = []
    module = modules[name]
    if _is_plain_sequential(module):
        todo.append((name, 0 if kind == "input" else len(module)))
    if name:
        parent_name, _, key = name.rpartition(".")
        parent = modules[parent_name]
        if _is_plain_sequential(parent):
            index = list(parent._modules).index(key)
            todo.append((parent_name, index if kind == "input" else index + 1))
    while todo:
        container, pos = todo.pop()
        if (container, pos) in found:
            continue
        found.add((container, pos))
        seq = modules[container]
        children = list(seq._modules.items())
        prefix = f"{container}." if container else ""
        # Down: the start of the next child / the end of the previous one.
        if pos < len(children) and _is_plain_sequential(children[pos][1]):
            todo.append((prefix + children[pos][0], 0))
        if pos > 0 and _is_plain_sequential(children[pos - 1][1]):
            child = children[pos - 1][1]
            todo.append((prefix + children[pos - 1][0], len(child)))
        # Up: the boundary of this container is a position in its parent.
        if container and pos in (0, len(children)):
            parent_name, _, key = container.rpartition(".")
            parent = modules[parent_name]
            if _is_plain_sequential(parent):
                index = list(parent._modules).index(key)
                todo.append((parent_name, index + (pos == len(children))))
    return found


def _flatten(modules):
    for module in modules:
        if _is_plain_sequential(module) and not _hooked(module):
            yield from _flatten(module.children())
        else:
            yield module


def _candidate_leaves(model, a, b):
    """Yield the flattened module lists that compute section ``a -> b`` (module docstring)."""
    if torch.nn.modules.module._global_forward_hooks or (
        torch.nn.modules.module._global_forward_pre_hooks
    ):
        return
    modules = dict(model.named_modules())
    starts = _positions(modules, a.name, a.kind)
    ends = _positions(modules, b.name, b.kind)
    for container, pa in sorted(starts):
        for other, pb in sorted(ends):
            if other != container or pb < pa:
                continue
            seq = modules[container]
            if _hooked(seq):
                return
            yield list(_flatten(list(seq.children())[pa:pb]))


def section_leaves(model, a, b):
    """The modules that, run in order on ``a``'s activation, give ``b``'s; or None.

    The same rule as :func:`detect_section` without the restriction to Linear
    and elementwise modules: any section inside one plain ``nn.Sequential``
    whose modules carry no hooks. Running only these modules, from a recorded
    activation, replaces running the whole model from its input. Not for layers
    restricted to chosen positions: their recorded activation lacks the other
    positions, which the section still reads.
    """
    if a.positions is not None or b.positions is not None:
        return None
    for leaves in _candidate_leaves(model, a, b):
        if not any(_hooked(module) for module in leaves):
            return leaves
        return None
    return None


def run_leaves(leaves, t):
    """Apply ``leaves`` in order (the forward of the ``nn.Sequential`` they came from)."""
    for module in leaves:
        t = module(t)
    return t


def detect_section(model, a, b):
    """The closed form of section ``a -> b`` (parsed layers of ``collect``), or None.

    Returns a :class:`LinearElementwise` when the rule of the module docstring
    applies, None otherwise (the caller then uses generic vector-Jacobian
    products). Shapes are not checked here; the caller compares the Linear's
    widths with the recorded activations.
    """
    for leaves in _candidate_leaves(model, a, b):
        structure = _classify(leaves)
        if structure is not None:
            return structure
    return None


def _classify(leaves):
    linear, activation, order = None, None, []
    for module in leaves:
        if _hooked(module):
            return None
        if type(module) in _TRANSPARENT:
            continue
        if type(module) is nn.Linear and linear is None:
            linear = module
            order.append("linear")
        elif type(module) in ELEMENTWISE and activation is None:
            activation = module
            order.append("activation")
        else:
            return None
    return LinearElementwise(
        weight=None if linear is None else linear.weight.detach(),
        bias=None if linear is None or linear.bias is None else linear.bias.detach(),
        activation=activation,
        linear_first=order[:1] == ["linear"],
    )
