"""Residual MLP blocks ``x + act(x W_in + b_in) W_out + b_out``, declared or inferred.

A residual block is not recognised from its code: :mod:`._inferred` finds it
from the values of the model's own ``forward``, or the user declares it with
:func:`declare_residual_mlp`, on the block (the section ``"M:input" ->
"M:output"``) or, when the residual add lives in a parent's ``forward``
(``resid_mid + self.mlp(resid_mid)``), on the parent, between two of its
submodules' outputs (``input=``, ``output=``). :class:`ResidualMLP` is its
closed form; like every closed form it is checked against the model's output
on every batch before it is used.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ._elementwise import ELEMENTWISE, LinearElementwise, formula_mismatch
from ._overrides import is_linear, linear_type, override

__all__ = [
    "RESIDUAL_ATTRIBUTE",
    "RESIDUAL_SECTIONS_ATTRIBUTE",
    "ResidualMLP",
    "declare_residual_mlp",
    "declared_entry",
    "residual_section",
]


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

    #: What the declaration says the section computes (for messages).
    claim = ("was declared a residual MLP block (declare_residual_mlp), "
             "x + linear_out(activation(linear_in(x)))")

    def mismatch(self, X, Y):
        """None if the output rows ``Y`` are the formula at the input rows ``X``, else
        ``(error, allowed)`` (:func:`formula_mismatch`)."""
        if X.shape[-1] != self.w_in.shape[1]:
            return (float("inf"), 0.0)
        return formula_mismatch(self.forward, X, Y)

    def verify(self, X, Y):
        """Whether the recorded output rows ``Y`` are the formula at the input rows ``X``."""
        return self.mismatch(X, Y) is None

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
    must be exactly ``nn.Linear`` (or a parametrized one), an elementwise
    activation and ``nn.Linear`` of matching widths, none with hooks or an
    instance-level ``forward``, and the recorded output of every batch must
    equal the formula to rounding; otherwise the generic path is used, with a
    warning where the formula fails.

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
        if type(sub) not in kinds and not (kinds == (nn.Linear,) and linear_type(sub)):
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


def declared_entry(model, a, b):
    """``(parent, names of linear_in, activation, linear_out)`` declaring ``a -> b``, or None.

    ``a`` and ``b`` must be the outputs, with the same positions, of the
    submodules a parent named as ``input`` and ``output``.
    """
    if a.kind != "output" or b.kind != "output" or a.positions != b.positions:
        return None
    for path, parent in model.named_modules():
        prefix = f"{path}." if path else ""
        for entry in getattr(parent, RESIDUAL_SECTIONS_ATTRIBUTE, ()):
            if (prefix + entry[0], prefix + entry[1]) == (a.name, b.name):
                return parent, entry[2:]
    return None


def _declared_in_parent(model, a, b):
    """:func:`_declared_entry`, unless ``a`` or ``b`` may compute something else than their
    class (an instance-level forward or hooks could change the values the formula sees)."""
    declared = declared_entry(model, a, b)
    if declared is None or override(a.module) or override(b.module):
        return None
    return declared


def residual_section(model, a, b):
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
        if names is None or any(override(m) for m in owner.modules()):
            return None
    try:
        lin_in, act, lin_out = (owner.get_submodule(name) for name in names)
    except AttributeError:
        return None
    if any(override(m) for part in (lin_in, act, lin_out) for m in part.modules()):
        return None
    if not is_linear(lin_in) or not is_linear(lin_out) or type(act) not in ELEMENTWISE:
        return None
    return ResidualMLP(lin_in.weight.detach(), _detached(lin_in.bias), act,
                       lin_out.weight.detach(), _detached(lin_out.bias))


def _detached(t):
    return None if t is None else t.detach()
