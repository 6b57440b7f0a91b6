"""Closed forms of residual sections written in a user's own ``forward``, found from values.

A transformer written by hand adds its attention and MLP to the residual
stream in its own ``forward`` (``resid_mid = resid_pre + self.attn(resid_pre)``),
so neither module types nor declarations say that the section between two
recorded layers is a residual attention or MLP. :func:`infer_section` finds out
from one probe batch: a submodule whose parameters are exactly the maps of a
bias-free multi-head attention (four bias-free ``nn.Linear``) or of an MLP
(``nn.Linear``, an elementwise activation, ``nn.Linear``), that reads layer
``a``'s very value, and for which layer ``b`` is ``a`` plus the formula of
:class:`~._attention.CausalAttention` or :class:`~._residual.ResidualMLP` at
some reading of its maps (which map is the query, key, value and output, how
many heads, causal or not; names and attributes such as ``n_heads`` are tried
first).

Values alone prove nothing about derivatives (a ``pattern.detach()`` in the
user's attention leaves its output unchanged and its Jacobian not), so an
inferred section is checked on every batch twice: its output, like every
closed form (:func:`~sklearn_lib.sources._closed_forms.choose_closed_forms`),
and one vector-Jacobian product of the model's own section with a random
cotangent against the formula's (:func:`section_mismatch`). A random
cotangent misses a difference of the two Jacobians with probability zero. The
edges are computed at points off the data (the reconstruction, an integration
path), so their pass first checks output and product at those points too
(``ModelEdges.edges``).
"""

import math
import re
from itertools import permutations

import torch

from ._attention import CausalAttention
from ._elementwise import ELEMENTWISE, TRANSPARENT, formula_mismatch
from ._model import _base_spec, _Layer, _record_batch
from ._overrides import global_hooks, linear_type, override
from ._residual import ResidualMLP
from ._sections import _run_section

__all__ = ["infer_section", "section_mismatch"]

#: Attributes that may hold an attention module's number of heads, tried first.
_HEAD_ATTRIBUTES = ("n_heads", "num_heads", "n_head", "num_attention_heads", "nhead", "heads")
#: Name parts that say which role a map of an attention module plays.
_ROLE_WORDS = {
    "q": {"q", "wq", "query", "queries"},
    "k": {"k", "wk", "key", "keys"},
    "v": {"v", "wv", "value", "values"},
    "o": {"o", "wo", "out", "output", "proj", "dense"},
}


def _own_parameters(module, parts):
    """Whether ``module``'s parameters and buffers are exactly those of ``parts``."""
    owned = {id(t) for part in parts for t in [*part.parameters(), *part.buffers()]}
    return {id(t) for t in [*module.parameters(), *module.buffers()]} == owned


def _mlp_parts(module):
    """The readings ``(linear_in, activation, linear_out)`` of ``module`` when two
    ``nn.Linear`` of transposed widths and an elementwise activation are its only
    computing children, else None.

    Children may be registered in any order, so both orders of the two maps are
    readings (the values decide, :func:`_residual_mlp`).
    """
    children = [c for c in module.children() if not isinstance(c, TRANSPARENT)]
    linears = [c for c in children if linear_type(c)]
    acts = [c for c in children if type(c) in ELEMENTWISE]
    if len(children) != 3 or len(linears) != 2 or len(acts) != 1:
        return None
    first, second = linears
    if (second.in_features, second.out_features) != (first.out_features, first.in_features):
        return None
    if not _own_parameters(module, children):
        return None
    return [(first, acts[0], second), (second, acts[0], first)]


def _attention_maps(module):
    """``{name: nn.Linear}`` of the four bias-free maps that are all of ``module``'s
    parameters, with three ``d -> w`` and one ``w -> d``; else None."""
    maps = {name: c for name, c in module.named_children()
            if linear_type(c) and c.bias is None}
    if len(maps) != 4 or not _own_parameters(module, list(maps.values())):
        return None
    shapes = {(m.in_features, m.out_features) for m in maps.values()}
    if len(shapes) > 2:
        return None
    return maps


def _role_words(name):
    return set(re.split(r"[^a-z0-9]+", name.lower()))


def _readings(maps, d):
    """Assignments ``(q, k, v, o)`` of the maps consistent with their shapes, those whose
    names say their roles first."""
    names = list(maps)

    def named(name, role):
        return bool(_role_words(name) & _ROLE_WORDS[role])

    found = []
    for order in permutations(names):
        q, k, v, o = (maps[n] for n in order)
        if not all(m.in_features == d for m in (q, k, v)) or o.out_features != d:
            continue
        if not all(m.out_features == o.in_features for m in (q, k, v)):
            continue
        score = sum(named(n, role) for n, role in zip(order, "qkvo"))
        found.append((-score, order))
    found.sort()
    # Names that say every role leave one reading; otherwise all are tried.
    return [order for score, order in found if score == -4 or found[0][0] > -4]


def _head_counts(module, width):
    """Numbers of heads to try: the module's own attribute, else every divisor of ``width``."""
    stated = [getattr(module, a) for a in _HEAD_ATTRIBUTES
              if isinstance(getattr(module, a, None), int)]
    stated = [h for h in stated if h > 0 and width % h == 0]
    return stated[:1] or [h for h in range(1, width + 1) if width % h == 0]


def _record_modules(model, layers, x, modules):
    """Record ``layers`` on batch ``x`` and each of ``modules``' first input and output.

    Returns ``(recorded, seen)``: ``seen[name] = (input, output)`` for a module
    called exactly once before the forward pass stopped (others are left out).
    """
    calls = {}

    def hook(name):
        def fn(module, args, output):
            if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                calls.setdefault(name, []).append((args[0].detach().clone(),
                                                   output.detach().clone()))
            else:
                calls.setdefault(name, []).append(None)
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        recorded = _record_batch(model, layers, x, stop=True)
    finally:
        for handle in handles:
            handle.remove()
    seen = {name: c[0] for name, c in calls.items() if len(c) == 1 and c[0] is not None}
    return recorded, seen


def _attention(module, maps, X, Y):
    """The :class:`CausalAttention` reading of ``module``'s maps with ``Y == X + attn(X)``.

    Readings are searched on the first sample (there may be a few hundred of
    them, see :func:`_readings` and :func:`_head_counts`) and the one found is
    checked on all.
    """
    for order in _readings(maps, X.shape[-1]):
        q, k, v, o = (maps[n].weight.detach() for n in order)
        for n_heads in _head_counts(module, q.shape[0]):
            for causal in (True, False):
                st = CausalAttention(q, k, v, o, n_heads=n_heads, causal=causal)
                if st.mismatch(X[:1], Y[:1]) is None:
                    return (st, order) if st.mismatch(X, Y) is None else (None, None)
    return None, None


def infer_section(model, a, b, x):
    """The closed form of section ``a -> b`` (parsed layers) inferred on batch ``x``, or None.

    Returns ``(structure, claim)``: a :class:`~._attention.CausalAttention` (its
    ``positions`` those of ``b``) or :class:`~._residual.ResidualMLP`, and the
    words saying what was inferred, for messages. Sections between two modules'
    outputs are considered, and ``"M:input" -> "M:output"`` of a module ``M``
    whose three children make an MLP, all without declared axes; an attention
    section needs all positions of ``a``, an MLP the same selection on both
    layers. The caller checks the output and a random vector-Jacobian product on
    every batch.
    """
    # Hooks or an instance-level forward may compute something else than the values seen
    # (as for declared sections, _overrides).
    if (a.axes is not None or b.axes is not None or global_hooks()
            or override(a.module) or override(b.module)):
        return None
    if (a.kind, b.kind) == ("input", "output") and a.name == b.name:
        return _block(model, a, b, x)
    if a.kind != "output" or b.kind != "output":
        return None
    if a.positions is not None and a.positions != b.positions:
        return None
    named = dict(model.named_modules())
    # The layers' own modules and the modules containing them compute more than a part.
    excluded = {id(a.module), id(b.module)}
    for layer in (a, b):
        parts = layer.name.split(".") if layer.name else []
        excluded.update(id(named[".".join(parts[:i])]) for i in range(len(parts)))
    mlps, attentions = {}, {}
    for name, module in named.items():
        if id(module) in excluded or not name or any(override(m) for m in module.modules()):
            continue
        parts = _mlp_parts(module)
        if parts is not None and a.positions == b.positions:
            mlps[name] = parts
        elif a.positions is None:
            maps = _attention_maps(module)
            if maps is not None:
                attentions[name] = maps
    if not mlps and not attentions:
        return None
    base = _base_layers(a, b)
    with torch.no_grad():
        recorded, seen = _record_modules(model, base, x,
                                         {n: named[n] for n in [*mlps, *attentions]})
        X, Y = (recorded[layer.spec] for layer in base)
        if X.shape != Y.shape or X.dim() not in (2, 3):
            return None
        for name, (inp, out) in seen.items():
            # The module reads the layer's very value and the next layer adds its output:
            # cheap to check before any reading of its maps is tried.
            if (inp.shape != X.shape or not torch.equal(inp, X) or out.shape != X.shape
                    or formula_mismatch(lambda t, out=out: t + out, X, Y) is not None):
                continue
            if name in mlps:
                st = _residual_mlp(mlps[name], X, Y)
                if st is not None:
                    return st, (f"was found to be x + {name}(x), {name} an MLP (inferred from "
                                "its values)")
                continue
            if X.dim() != 3:
                continue
            st, order = _attention(named[name], attentions[name], X, Y)
            if st is not None:
                st.positions = b.positions
                return st, (
                    f"was found to be x + {name}(x), {name} a {'causal ' * st.causal}attention "
                    f"of {st.n_heads} heads with maps Q, K, V, O = {', '.join(order)} "
                    "(inferred from its values)")
    return None


def _base_layers(a, b):
    """Layers ``a`` and ``b`` at all positions: the formulas are checked on whole tensors."""
    return [_Layer(_base_spec(layer) if layer.positions is not None else layer.spec,
                   layer.name, layer.kind, layer.module) for layer in (a, b)]


def _residual_mlp(readings, X, Y):
    """The :class:`~._residual.ResidualMLP` of the first of ``readings`` (see
    :func:`_mlp_parts`) with ``Y == X + mlp(X)``, else None."""
    if X.shape != Y.shape:
        return None
    rows = [t.reshape(-1, t.shape[-1]) for t in (X, Y)]
    for lin_in, act, lin_out in readings:
        if lin_in.in_features != X.shape[-1]:
            continue
        st = ResidualMLP(lin_in.weight.detach(), _detached(lin_in.bias), act,
                         lin_out.weight.detach(), _detached(lin_out.bias))
        if st.mismatch(*rows) is None:
            return st
    return None


def _block(model, a, b, x):
    """Section ``"M:input" -> "M:output"`` of a module ``M`` whose ``forward`` is ``x +
    mlp(x)`` with its three children (:func:`infer_section`), or None."""
    parts = _mlp_parts(a.module)
    if parts is None or a.positions != b.positions or any(override(m) for m in parts[0]):
        return None
    base = _base_layers(a, b)
    with torch.no_grad():
        recorded = _record_batch(model, base, x, stop=True)
        st = _residual_mlp(parts, *(recorded[layer.spec] for layer in base))
    if st is None:
        return None
    return st, (f"was found to be x + mlp(x) with the children of {a.name!r} (inferred from "
                "its values)")


def _detached(t):
    return None if t is None else t.detach()


def section_mismatch(model, a, b, x, act_in, formula, seed=0, rows=None, values=False):
    """None if the section's vector-Jacobian product at ``act_in`` equals the formula's,
    else ``(kind, error, allowed)``, ``kind`` ``"jacobian"`` (or ``"output"``).

    One random cotangent ``u`` (Gaussian, from ``seed``) of layer ``b``'s shape;
    the model's product runs the section from layer ``a``'s value ``act_in`` on
    inputs ``x`` (:func:`~._sections._run_section`), the formula's is autograd
    through ``formula(act_in)``. ``rows``, a boolean mask of ``b``'s leading
    axes (padding), leaves the other rows out (cotangent 0, not compared). With
    ``values`` the outputs are compared first
    (:func:`~._elementwise.formula_mismatch`): ``act_in`` need not be data the
    output check of every batch saw (points of the edges' path). Rounding allows
    ``1e3 eps`` of the largest entry of either product times ``sqrt`` of the
    number of terms summed (at least 1). A section the model cannot run from
    ``a`` fails.
    """
    failed = ("jacobian", float("inf"), 0.0)
    with torch.enable_grad():
        leaf = act_in.detach().clone().requires_grad_(True)
        try:
            out = _run_section(model, a, b, x, leaf)
        except (RuntimeError, ValueError):
            return failed
        if not out.requires_grad:
            return failed
        leaf_f = act_in.detach().clone().requires_grad_(True)
        out_f = formula(leaf_f)
        if values:
            keep = (slice(None),) if rows is None else rows
            mismatch = formula_mismatch(lambda _: out_f.detach()[keep], act_in,
                                        out.detach()[keep])
            if mismatch is not None:
                return ("output", *mismatch)
        generator = torch.Generator().manual_seed(seed)
        u = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
        if rows is not None:
            u = u * rows.reshape(*rows.shape, *(1,) * (u.dim() - rows.dim())).to(u.dtype)
        (model_vjp,) = torch.autograd.grad(out, leaf, u, allow_unused=True)
        if model_vjp is None:
            return failed
        (formula_vjp,) = torch.autograd.grad(out_f, leaf_f, u)
    # A product sums over the output's entries of one sample: rounding grows with their
    # number (the square root, for errors of random sign).
    terms = max(math.prod(out.shape[1:]), 1)
    err, scale = torch.stack([(formula_vjp - model_vjp).abs().max(),
                              torch.maximum(model_vjp.abs().max(), formula_vjp.abs().max())]
                             ).tolist()
    allowed = 1e3 * torch.finfo(model_vjp.dtype).eps * math.sqrt(terms) * max(scale, 1.0)
    if err <= allowed:
        return None
    return ("jacobian", err if not math.isnan(err) else float("inf"), allowed)
