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

A residual MLP block ``x + act(x W_in + b_in) W_out + b_out`` (:class:`ResidualMLP`)
is not recognised from its code: the user declares it with
:func:`declare_residual_mlp`, and the section ``"M:input" -> "M:output"`` of the
declared module ``M`` is then checked against the formula on the first recorded
batch (``ResidualMLP.verify``) before the closed form is used. When the residual add
lives in a parent's ``forward`` (``resid_mid + self.mlp(resid_mid)``), the parent
declares the section between two of its submodules' outputs (``input=``,
``output=``), checked the same way.
"""

import warnings
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ELEMENTWISE",
    "LinearElementwise",
    "ResidualMLP",
    "check_declared",
    "declare_residual_mlp",
    "detect_section",
    "fits_rows",
    "readout_section",
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
        # The derivative through autograd's own backward formula, so that it
        # equals what a vector-Jacobian product gives, kinks included (ReLU'(0)).
        # torch.autograd rather than torch.func: the first torch.func transform
        # of a process imports torch._dynamo (about a second), which the closed
        # forms need nowhere else. The clone shields X from in-place activations
        # (ReLU(inplace=True)).
        t = X.detach().requires_grad_(True)
        with torch.enable_grad():
            y = self.activation(t.clone())
            (s,) = torch.autograd.grad(y, t, torch.ones_like(y))
        return s

    def factors(self, V):
        """``(A, R)`` with ``V^T J_x = A diag(s_x) R``; ``R`` None means the identity."""
        if self.weight is None:
            return V.T, None
        if self.linear_first:
            return V.T, self.weight
        return V.T @ self.weight, None

    def fits(self, d_in, d_out):
        """Whether the section maps rows of width ``d_in`` to rows of width ``d_out``."""
        if self.weight is None:
            return d_in == d_out
        return tuple(self.weight.shape) == (d_out, d_in)

    def jacobian_scatter(self, SS, V, s_sum=None, n=None):
        """``sum_x (V^T J_x)^T (V^T J_x)`` from ``SS = S^T S`` (d_s, d_s).

        ``s_sum`` and ``n`` (the sum of the rows ``s_x`` and their number) are
        not needed here; :class:`ResidualMLP` takes them too.
        """
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


#: The attribute :func:`declare_residual_mlp` sets: submodule names (in, activation, out).
RESIDUAL_ATTRIBUTE = "__sklearn_lib_residual_mlp__"
#: The attribute of a parent declaring residual sections between two of its submodules'
#: outputs: a tuple of ``(input, output, linear_in, activation, linear_out)`` names.
RESIDUAL_SECTIONS_ATTRIBUTE = "__sklearn_lib_residual_sections__"


@dataclass
class ResidualMLP:
    """A residual MLP block ``x + act(x @ w_in.T + b_in) @ w_out.T + b_out``.

    Weights in ``nn.Linear``'s layout: ``w_in`` (d_mlp, d), ``w_out`` (d, d_mlp).
    With ``s_x = act'(x @ w_in.T + b_in)`` the Jacobian (rows: outputs) is
    ``J_x = I + w_out diag(s_x) w_in``, so that with ``A = V^T w_out`` (k, d_mlp)

    * ``V^T J_x = V^T + A diag(s_x) w_in`` and the Jacobian scatter over n rows is
      ``n V V^T + P diag(sum_x s_x) w_in + (same)^T + w_in^T [(A^T A) * (S^T S)] w_in``
      with ``P = V A``: from the Gram ``S^T S``, the sum of the rows ``s_x`` and n;
    * the Jacobian between basis coordinates is
      ``V^T J_x C_pinv^T = V^T C_pinv^T + A diag(s_x) (w_in C_pinv^T)``: a constant
      plus the structured term of :class:`LinearElementwise`.

    Rows are positions too (the block acts on the last axis only).
    """

    w_in: torch.Tensor
    b_in: torch.Tensor | None
    activation: nn.Module
    w_out: torch.Tensor
    b_out: torch.Tensor | None

    def __post_init__(self):
        self._hidden = LinearElementwise(self.w_in, self.b_in, self.activation, linear_first=True)

    def derivative(self, X):
        """``s`` (N, d_mlp): the activation's derivative at the rows ``X`` of the block's input."""
        return self._hidden.derivative(X)

    def forward(self, X):
        """The block's formula on rows ``X`` (what the declared module must compute)."""
        hidden = self.activation(torch.nn.functional.linear(X, self.w_in, self.b_in))
        return X + torch.nn.functional.linear(hidden, self.w_out, self.b_out)

    def verify(self, X, Y):
        """Whether the recorded output rows ``Y`` are the formula at the input rows ``X``.

        Equal to rounding: ``1e3 eps`` of the largest entry (at least 1).
        """
        if X.shape != Y.shape or X.shape[-1] != self.w_in.shape[1]:
            return False
        with torch.no_grad():
            pred = self.forward(X.to(self.w_in.dtype)).to(Y.dtype)
        eps = torch.finfo(Y.dtype).eps
        scale = max(float(Y.abs().max()), float(X.abs().max()), 1.0) if Y.numel() else 1.0
        return bool(torch.isfinite(pred).all()) and float((pred - Y).abs().max()) <= (
            1e3 * eps * scale
        )

    def fits(self, d_in, d_out):
        """Whether the block maps rows of width ``d_in`` to rows of width ``d_out``."""
        return d_in == d_out == self.w_in.shape[1] == self.w_out.shape[0]

    def jacobian_scatter(self, SS, V, s_sum, n):
        """``sum_x (V^T J_x)^T (V^T J_x)`` from ``SS = S^T S``, ``s_sum = sum_x s_x``, n rows."""
        A = V.T @ self.w_out
        cross = ((V @ A) * s_sum) @ self.w_in
        inner = self.w_in.T @ ((A.T @ A) * SS) @ self.w_in
        return (V @ V.T).mul_(n).add_(cross).add_(cross.T).add_(inner)

    def edge_factors(self, V, right):
        """``(A, B, A0)`` with ``V^T J_x right = A0 + A diag(s_x) B``, computed once per layer."""
        return V.T @ self.w_out, self.w_in @ right, V.T @ right

    def edge_jacobians(self, s, factors, workspace):
        """``A0 + A diag(s_x) B`` for each row ``s_x`` of ``s``: (N, k, r), in ``workspace``.

        ``s`` may be a path average of derivatives with weights summing to 1
        (``_edges.path_quadrature``): the constant term then enters once.
        """
        A, B, A0 = factors
        return self._hidden.edge_jacobians(s, (A, B), workspace).add_(A0)

    def jacobians(self, s, out=None):
        """The Jacobians ``J_x = I + w_out diag(s_x) w_in`` (N, d, d) from ``s`` (N, d_mlp)."""
        left = self.w_out[None] * s[:, None, :]
        out = torch.matmul(left, self.w_in, out=out)
        out.diagonal(dim1=1, dim2=2).add_(1)
        return out


def declare_residual_mlp(module, linear_in, activation, linear_out, *, input=None,
                         output=None):
    """Declare that ``module(x) == x + linear_out(activation(linear_in(x)))``.

    Between the layers ``"<module>:input"`` and ``"<module>:output"`` the
    interaction graph then computes the block's statistics and edges in closed
    form (no per-sample Jacobians). The declaration is checked: the submodules
    must be exactly ``nn.Linear``, an elementwise activation and ``nn.Linear``
    of matching widths, and the recorded output of the first batch must equal
    the formula to rounding; otherwise the generic path is used, with a warning.

    When the residual add is written in a parent's ``forward`` (a transformer's
    ``resid_post = hook_resid_post(resid_mid + self.mlp(resid_mid))``), declare
    it on the parent with ``input`` and ``output``: the outputs of those two
    submodules are ``x`` and ``x + linear_out(activation(linear_in(x)))``, and
    the section between the layers ``"<input>"`` and ``"<output>"`` (outputs,
    with the same selection of positions, e.g. ``"[-1]"`` on both) is computed
    in closed form, checked in the same way. A parent may declare several
    such sections.

    Parameters
    ----------
    module : torch.nn.Module
        The block, or with ``input`` and ``output`` the module whose
        ``forward`` adds the residual.
    linear_in, activation, linear_out : str
        Names of the block's submodules (as in ``module.get_submodule``).
    input, output : str or None, default=None
        Both None: ``module`` is the block. Both set: names of ``module``'s
        submodules whose outputs are the block's input and output.

    Returns
    -------
    module : torch.nn.Module
        The same module, marked.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from sklearn_lib import InteractionGraph, declare_residual_mlp
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc_in, self.act, self.fc_out = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)
    ...     def forward(self, x):
    ...         return x + self.fc_out(self.act(self.fc_in(x)))
    >>> block = declare_residual_mlp(Block(), "fc_in", "act", "fc_out")
    >>> model = nn.Sequential(nn.Linear(3, 4), block)
    >>> X = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    >>> graph = InteractionGraph(fast_path=True, verbose=False)  # closed form or an error
    >>> graph = graph.fit_model(model, ["1:input", "1:output"], X)
    >>> graph.edges_[0].shape  # 3 directions of the block's input reach its 4 outputs
    (4, 3)

    The residual add in the parent's ``forward``:

    >>> class Parent(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mid, self.post = nn.Identity(), nn.Identity()
    ...         self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    ...     def forward(self, x):
    ...         mid = self.mid(x)
    ...         return self.post(mid + self.mlp(mid))
    >>> parent = declare_residual_mlp(Parent(), "mlp.0", "mlp.1", "mlp.2",
    ...                               input="mid", output="post")
    >>> X = torch.randn(50, 6, 4, generator=torch.Generator().manual_seed(0))
    >>> graph = InteractionGraph(fast_path=True, verbose=False).fit_model(
    ...     parent, ["mid[-1]", "post[-1]"], X, sequence=True)
    >>> graph.fast_path_
    [True]
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    parts = []
    for role, name, kinds in (("linear_in", linear_in, (nn.Linear,)),
                              ("activation", activation, ELEMENTWISE),
                              ("linear_out", linear_out, (nn.Linear,))):
        if not isinstance(name, str):
            raise TypeError(f"{role} must be the name of a submodule (a str), got {name!r}.")
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{role}: the module has no submodule {name!r}.") from None
        if type(sub) not in kinds:
            raise ValueError(
                f"{role} {name!r} must be exactly one of "
                f"{', '.join(k.__name__ for k in kinds)}, got {type(sub).__name__}."
            )
        parts.append(sub)
    lin_in, _, lin_out = parts
    if lin_out.in_features != lin_in.out_features or lin_out.out_features != lin_in.in_features:
        raise ValueError(
            f"a residual block needs linear_in (d -> d_mlp) and linear_out (d_mlp -> d); got "
            f"{lin_in.in_features} -> {lin_in.out_features} and "
            f"{lin_out.in_features} -> {lin_out.out_features}."
        )
    if input is None and output is None:
        setattr(module, RESIDUAL_ATTRIBUTE, (linear_in, activation, linear_out))
        return module
    for role, name in (("input", input), ("output", output)):
        if not isinstance(name, str):
            raise TypeError(
                "input and output must both be None (module is the block) or both name "
                f"submodules of module; got {role}={name!r}."
            )
        try:
            module.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{role}: the module has no submodule {name!r}.") from None
    if input == output:
        raise ValueError(f"input and output must be different submodules, got {input!r} twice.")
    declared = getattr(module, RESIDUAL_SECTIONS_ATTRIBUTE, ())
    entry = (input, output, linear_in, activation, linear_out)
    declared = tuple(d for d in declared if d[:2] != entry[:2]) + (entry,)
    setattr(module, RESIDUAL_SECTIONS_ATTRIBUTE, declared)
    return module


def check_declared(structure, X, Y, spec_in, spec_out):
    """``structure.verify(X, Y)``, with a warning when the declared formula does not hold."""
    if structure.verify(X, Y):
        return True
    warnings.warn(
        f"the section {spec_in!r} -> {spec_out!r} was declared a residual MLP block "
        "(declare_residual_mlp), but the module's output is not "
        "x + linear_out(activation(linear_in(x))) on the first batch; using generic "
        "vector-Jacobian products instead.",
        UserWarning,
        stacklevel=3,
    )
    return False


def _declared_in_parent(model, a, b):
    """``(parent, names of linear_in, activation, linear_out)`` declaring ``a -> b``, or None.

    ``a`` and ``b`` must be the outputs, with the same positions, of the
    submodules a parent named as ``input`` and ``output``; nothing in
    between may carry hooks (they could change the values the formula sees).
    """
    if a.kind != "output" or b.kind != "output" or a.positions != b.positions:
        return None
    for path, parent in model.named_modules():
        prefix = f"{path}." if path else ""
        for entry in getattr(parent, RESIDUAL_SECTIONS_ATTRIBUTE, ()):
            if (prefix + entry[0], prefix + entry[1]) != (a.name, b.name):
                continue
            if _hooked(a.module) or _hooked(b.module):
                return None
            return parent, entry[2:]
    return None


def _residual_section(model, a, b):
    """The :class:`ResidualMLP` of a declared block or parent section, or None."""
    if a.axes is not None or b.axes is not None:
        return None
    declared = _declared_in_parent(model, a, b)
    if declared is not None:
        owner, names = declared
    else:
        if (a.name != b.name or a.kind != "input" or b.kind != "output"
                or a.positions != b.positions):
            return None
        owner, names = a.module, getattr(a.module, RESIDUAL_ATTRIBUTE, None)
        if names is None or any(_hooked(m) for m in owner.modules()):
            return None
    try:
        lin_in, act, lin_out = (owner.get_submodule(name) for name in names)
    except AttributeError:
        return None
    if any(_hooked(m) for part in (lin_in, act, lin_out) for m in part.modules()):
        return None
    if type(lin_in) is not nn.Linear or type(lin_out) is not nn.Linear or (
        type(act) not in ELEMENTWISE
    ):
        return None
    return ResidualMLP(lin_in.weight.detach(), _detached(lin_in.bias), act,
                       lin_out.weight.detach(), _detached(lin_out.bias))


def _detached(t):
    return None if t is None else t.detach()


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


def _hooked(module):
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(module, "_forward_hooks_with_kwargs", None)
    )


def _global_hooks():
    """Whether hooks registered for every module could change what a section computes."""
    return bool(torch.nn.modules.module._global_forward_hooks
                or torch.nn.modules.module._global_forward_pre_hooks)


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
    if _global_hooks():
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
    positions, which the section still reads. Nor for layers with declared axes:
    their recorded (batch, P, d) view is not what the section's modules take.
    """
    if a.positions is not None or b.positions is not None:
        return None
    if a.axes is not None or b.axes is not None:
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

    Returns a :class:`ResidualMLP` for ``"M:input" -> "M:output"`` of a module
    marked by :func:`declare_residual_mlp`, or between the two submodules a parent
    declared with ``input``/``output`` (the caller checks the formula on
    recorded rows with ``verify`` before using it), a :class:`LinearElementwise`
    when the rule of the module docstring applies, None otherwise (the caller
    then uses generic vector-Jacobian products). Shapes are not checked here;
    the caller compares the Linear's widths with the recorded activations.
    """
    if _global_hooks():
        return None
    residual = _residual_section(model, a, b)
    if residual is not None:
        return residual
    for leaves in _candidate_leaves(model, a, b):
        structure = _classify(leaves)
        if structure is not None:
            return structure
    return None


def readout_section(module):
    """The closed form of a module applied to a recorded layer, or None.

    A readout (``logits = unembed(resid[:, -1])`` in a parent's ``forward``) is
    recognised by the source from the values it reads (``ModelSource.readout``);
    here only its type counts: an exact ``nn.Linear`` or elementwise activation
    without hooks.
    """
    if _global_hooks() or _hooked(module) or type(module) not in (nn.Linear, *ELEMENTWISE):
        return None
    return _classify([module])


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
