"""Attention sections in closed form: statistics and edges of a declared residual attention.

A section ``y = x + attn(x)[selected positions]`` whose ``attn`` is multi-head
softmax attention without biases (``q = x W_Q``, ``k = x W_K``, ``v = x W_V``
per head, scores ``q_t . k_s * scale``, optionally causal, output ``z W_O``)
mixes positions, so its Jacobian is not row-wise and the closed forms of
:mod:`sklearn_lib.models._fastpath` do not apply. Its Jacobian still has a short
formula. With row vectors, head ``h``, attention weights ``a_ts``, ``z_t =
sum_s a_ts v_s`` and ``W_OV = W_O^h V`` (V the cotangents, ``d x k``), the
product of output position ``t`` with source position ``s`` is

``(V^T J_ts)^T = delta_ts V + sum_h [ a_ts W_V^h W_OV
+ delta_ts W_Q^h K_t W_OV + (W_K^h q_t^T) (a_ts (v_s - z_t) W_OV) scale ]``

with ``K_t = scale sum_u a_tu k_u^T (v_u - z_t)`` (``d_head x d_head``): the
value path, the query path (only at ``s = t``) and the key path (rank one per
head). Vector-Jacobian products run the whole model backwards ``k`` times over
every position; the formula needs a few GEMMs of ``d x d_head x k`` per sample
and output position, and the statistics and edges need less than the products
themselves: :meth:`CausalAttention.jacobian_scatter` forms the
product only at ``s = t`` and gets the other source positions from per-head
Grams, and :meth:`CausalAttention.attributions` sums the edges' attributions
over source positions before projecting.

Like residual MLP blocks, the section is declared (:func:`declare_attention`) or
inferred from the values of the model's own ``forward`` (:mod:`._inferred`, which
also checks a vector-Jacobian product on every batch), never read from code, and
checked against the recorded output of every batch before it is used
(:func:`~sklearn_lib.models._fastpath.formula_mismatch`).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from ._elementwise import formula_mismatch
from ._overrides import first_override, is_linear, linear_type, override

__all__ = [
    "ATTENTION_ATTRIBUTE",
    "CausalAttention",
    "declare_attention",
    "detect_attention",
    "why_not_attention",
]

#: The attribute of a parent declaring attention sections: tuples of submodule names
#: ``(input, output, W_Q, W_K, W_V, W_O)``, the number of heads and whether causal.
ATTENTION_ATTRIBUTE = "__sklearn_lib_attention_sections__"


def declare_attention(module, W_Q, W_K, W_V, W_O, *, input, output, n_heads, causal=True):
    """Declare that ``output == input + attention(input)``, multi-head attention without biases.

    ``module`` is the parent whose ``forward`` adds the residual: the outputs
    of its submodules ``input`` (all positions, ``(batch, position, d)``) and
    ``output`` are ``x`` and ``x + attn(x)``, with ``attn`` the softmax
    attention of ``n_heads`` heads of width ``d_head = W_Q.out_features /
    n_heads``, scores ``(x W_Q)_t . (x W_K)_s / sqrt(d_head)`` (masked to
    ``s <= t`` when ``causal``) and output ``concat_h(z_h) W_O``. The section
    between the layers ``"<input>"`` and ``"<output>"`` (the output layer may
    select positions, e.g. ``"<output>[-1]"``) is then computed from this
    formula instead of vector-Jacobian products. The declaration is checked:
    the four maps must be exactly bias-free ``nn.Linear`` (or parametrized
    ones) of matching widths, none of the involved modules may have hooks or an
    instance-level ``forward``, and the recorded output of every batch must
    equal the formula to rounding; otherwise the generic path is used, with a
    warning where the formula fails. A batch
    with padded positions (a dict batch whose ``attention_mask`` has zeros)
    takes its products from the model, which leaves padding out of its
    attention where the formula would not.

    Parameters
    ----------
    module : torch.nn.Module
        The parent.
    W_Q, W_K, W_V, W_O : str
        Names of the query, key, value and output maps (as in
        ``module.get_submodule``).
    input, output : str
        Names of the submodules whose outputs are the section's input and output.
    n_heads : int
        Number of heads.
    causal : bool, default=True
        Each position attends to itself and earlier positions only.

    Returns
    -------
    module : torch.nn.Module
        The same module, marked.

    Examples
    --------
    >>> from sklearn_lib import InteractionGraph, declare_attention
    >>> from sklearn_lib.datasets import load_modular_addition_transformer
    >>> from sklearn_lib.datasets import modular_addition_data
    >>> net = declare_attention(load_modular_addition_transformer(), "attn.W_Q", "attn.W_K",
    ...                         "attn.W_V", "attn.W_O", input="hook_resid_pre",
    ...                         output="hook_resid_mid", n_heads=4)
    >>> X = modular_addition_data()[0][:160]  # more rows than the 128 features
    >>> graph = InteractionGraph(verbose=False).fit_model(
    ...     net, ["hook_resid_pre", "hook_resid_mid[-1]"], X, sequence=True)
    >>> graph.fast_path_
    [True]
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
    names = {"W_Q": W_Q, "W_K": W_K, "W_V": W_V, "W_O": W_O, "input": input, "output": output}
    subs = {}
    for role, name in names.items():
        if not isinstance(name, str):
            raise TypeError(f"{role} must be the name of a submodule (a str), got {name!r}.")
        try:
            subs[role] = module.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{role}: the module has no submodule {name!r}.") from None
    for role in ("W_Q", "W_K", "W_V", "W_O"):
        if not linear_type(subs[role]) or subs[role].bias is not None:
            raise ValueError(
                f"{role} {names[role]!r} must be exactly an nn.Linear without bias, got "
                f"{type(subs[role]).__name__}"
                + ("" if not linear_type(subs[role]) else " with a bias") + "."
            )
    if input == output:
        raise ValueError(f"input and output must be different submodules, got {input!r} twice.")
    q, k, v, o = (subs[r] for r in ("W_Q", "W_K", "W_V", "W_O"))
    d, width = q.in_features, q.out_features
    if not isinstance(n_heads, int) or n_heads < 1 or width % n_heads:
        raise ValueError(
            f"n_heads must be a positive int dividing W_Q's {width} outputs, got {n_heads!r}."
        )
    shapes = [(m.in_features, m.out_features) for m in (q, k, v)] + [
        (o.out_features, o.in_features)]
    if any(shape != (d, width) for shape in shapes):
        raise ValueError(
            f"W_Q, W_K, W_V must map d -> n_heads * d_head and W_O back; got (in, out) "
            f"{shapes[:3]} and W_O {(o.in_features, o.out_features)}."
        )
    entry = (input, output, W_Q, W_K, W_V, W_O, n_heads, bool(causal))
    declared = tuple(e for e in getattr(module, ATTENTION_ATTRIBUTE, ()) if e[:2] != entry[:2])
    setattr(module, ATTENTION_ATTRIBUTE, declared + (entry,))
    return module


def _declared(model, a, b):
    """``(parent, entry)`` declaring the attention section ``a -> b``, or None."""
    if a.kind != "output" or b.kind != "output" or a.positions is not None:
        return None
    # A declared view of the axes may reorder what the formula reads as positions
    # and features.
    if a.axes is not None or b.axes is not None:
        return None
    for path, parent in model.named_modules():
        prefix = f"{path}." if path else ""
        for entry in getattr(parent, ATTENTION_ATTRIBUTE, ()):
            if (prefix + entry[0], prefix + entry[1]) == (a.name, b.name):
                return parent, entry
    return None


def detect_attention(model, a, b):
    """The :class:`CausalAttention` declared for section ``a -> b`` (parsed layers), or None.

    ``a`` must be the output of the declared input at all positions, ``b`` the
    output of the declared output (any selection); no involved module may
    compute something else than its class (:func:`~._overrides.override`). The
    caller checks the formula on recorded activations.
    """
    found = _declared_maps(model, a, b)
    if found is None:
        return None
    entry, maps = found
    if any(override(m) for m in (a.module, b.module)) or any(
        not is_linear(m) or m.bias is not None for m in maps
    ):
        return None
    with torch.no_grad():
        w_q, w_k, w_v, w_o = (m.weight.detach() for m in maps)
    return CausalAttention(w_q, w_k, w_v, w_o, n_heads=entry[6], causal=entry[7],
                           positions=b.positions)


def why_not_attention(model, a, b):
    """Why a declared attention section ``a -> b`` is not taken in closed form: the first
    involved module with an override (:func:`~._overrides.first_override`), or None."""
    found = _declared_maps(model, a, b)
    return None if found is None else first_override(model, [a.module, b.module, *found[1]])


def _declared_maps(model, a, b):
    """The declaration of section ``a -> b`` and its four linear maps (Q, K, V, O), or None."""
    declared = _declared(model, a, b)
    if declared is None:
        return None
    parent, entry = declared
    try:
        return entry, [parent.get_submodule(name) for name in entry[2:6]]
    except AttributeError:
        return None


def _position_index(positions, n_positions, device):
    if positions is None:
        index = list(range(n_positions))
    elif isinstance(positions, slice):
        index = list(range(n_positions))[positions]
    else:
        index = [i % n_positions for i in positions if -n_positions <= i < n_positions]
    return torch.tensor(index, dtype=torch.long, device=device)


@dataclass
class CausalAttention:
    """``y = x + attn(x)`` at the output ``positions``; weights in ``nn.Linear``'s layout."""

    w_q: torch.Tensor
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    n_heads: int
    causal: bool
    positions: object = None

    @property
    def d_head(self):
        return self.w_q.shape[0] // self.n_heads

    def _heads(self, w):
        """``(H, d_head, d)``: head h's rows of a ``(H d_head, d)`` weight."""
        return w.reshape(self.n_heads, self.d_head, w.shape[1])

    def _attend(self, X):
        """Per-head ``q, k, v`` (B, H, T, d_head), weights ``a`` (B, H, T, T) and ``z``."""
        B, T, _ = X.shape
        q, k, v = (
            torch.einsum("btd,hed->bhte", X, self._heads(w)) for w in (self.w_q, self.w_k, self.w_v)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
        if self.causal:
            future = torch.ones(T, T, dtype=torch.bool, device=X.device).triu_(1)
            scores = scores.masked_fill(future, float("-inf"))
        a = scores.softmax(dim=-1)
        return q, k, v, a, a @ v

    def forward(self, X):
        """The declared output at the selected positions for inputs ``X`` (B, T, d)."""
        index = _position_index(self.positions, X.shape[1], X.device)
        z = self._attend(X)[4]  # (B, H, T, d_head)
        o = torch.einsum("bhte,dhe->btd", z, self.w_o.reshape(-1, self.n_heads, self.d_head))
        return (X + o).index_select(1, index)

    def fits(self, shape_in, shape_out):
        """Whether recorded per-sample shapes (T, d) and (P, d) are this section's."""
        if len(shape_in) != 2 or len(shape_out) != 2 or shape_in[1] != self.w_q.shape[1]:
            return False
        n_out = len(_position_index(self.positions, shape_in[0], "cpu"))
        return shape_out == (n_out, shape_in[1]) and n_out > 0

    #: What the declaration says the section computes (for messages).
    claim = "was declared a residual attention (declare_attention), x + attention(x)"

    def mismatch(self, X, Y):
        """None if the recorded output ``Y`` (B, P, d) is the formula at ``X`` (B, T, d),
        else ``(error, allowed)`` (:func:`~sklearn_lib.models._fastpath.formula_mismatch`)."""
        return formula_mismatch(lambda t: self.forward(t.to(self.w_q.dtype)), X, Y)

    def verify(self, X, Y):
        """Whether the recorded output ``Y`` (B, P, d) is the formula at ``X`` (B, T, d)."""
        return self.mismatch(X, Y) is None

    def jacobian_scatter(self, X, V):
        """``sum (V^T J_ts)^T (V^T J_ts)`` over samples, selected ``t`` and all ``s``: (d, d).

        Written ``V^T J_ts = delta_ts V^T + sum_h U^h G^h_s = delta_ts (V^T + sum_h
        U^h K_t W_Q^h) + sum_h a_ts F^h + sum_h rho^h_s beta^T`` with the constant
        ``F^h = U^h W_V^h`` and ``rho^h_s = U^h alpha_s`` (``U^h = V^T W_O^h``, the
        rest as in :meth:`attributions`), the product at ``s = t`` is formed (one
        per sample and output position) and the others never are: their scatter is
        ``sum_{h,g} [N_hg F^h^T F^g + (F^h^T U^g Xi^hg + (.)^T)] + sum B^T C B``
        with the ``H x H`` Gram ``N`` of the attention weights, ``Xi^hg = sum
        (sum_s a^h_s alpha^g_s) beta^g^T`` and ``C_hg = sum_s rho^h_s . rho^g_s``
        (sums over ``s != t``), which cost ``O(H^2 d_head d)`` per sample instead
        of the ``T k d^2`` of a scatter of every product.
        """
        B, T, d = X.shape
        H, e = self.n_heads, self.d_head
        index = _position_index(self.positions, T, X.device)
        P, k = len(index), V.shape[1]
        q, keys, v, a, z = self._attend(X)
        a, q, z = (t.index_select(2, index) for t in (a, q, z))  # (B, H, P, ...)
        U = torch.einsum("dhe,dk->hke", self.w_o.reshape(d, H, e), V)  # (H, k, e)
        F = U @ self._heads(self.w_v)  # (H, k, d)
        dv = v[:, :, None] - z[:, :, :, None]  # v_s - z_t: (B, H, P, T, e)
        alpha = a[..., None] * dv / math.sqrt(e)
        beta = torch.einsum("hed,bhpe->bhpd", self._heads(self.w_k), q)
        K_t = torch.einsum("bhpu,bhpuf,bhue->bhpfe", a, dv, keys) / math.sqrt(e)
        # s = t: the whole product V^T + U G_t, with the head blocks of G_t
        # (H d_head, d) = a_tt W_V^h + alpha_t beta^T + K_t W_Q^h laid out (H, e, B P, d)
        # so that the product is one GEMM, (k, H e) @ (H e, B P d), and its scatter
        # another, over (column, sample, position) rows.
        at_t = torch.arange(P, device=X.device), index
        n = B * P
        G = torch.empty(H, e, n, d, dtype=X.dtype, device=X.device)
        K_rows = K_t.permute(1, 3, 0, 2, 4).reshape(H, e * n, e)  # (h, (f, b, p), key dim)
        torch.matmul(K_rows, self._heads(self.w_q), out=G.view(H, e * n, d))
        # In place, from broadcast views: no temporaries as large as G.
        a_tt = a[:, :, at_t[0], at_t[1]].permute(1, 0, 2).reshape(H, 1, n, 1)
        G.addcmul_(a_tt, self._heads(self.w_v)[:, :, None, :])
        alpha_t = alpha[:, :, at_t[0], at_t[1]].permute(1, 3, 0, 2).reshape(H, e, n, 1)
        G.addcmul_(alpha_t, beta.permute(1, 0, 2, 3).reshape(H, 1, n, d))
        product = (U.permute(1, 0, 2).reshape(k, H * e) @ G.view(H * e, n * d)).view(k, n, d)
        product = product.add_(V.T[:, None, :]).view(k * n, d)
        S = product.T @ product
        # s != t: the three structured terms, from weights with the s = t entries zeroed.
        a_o = a.clone()
        a_o[:, :, at_t[0], at_t[1]] = 0
        alpha_o = a_o[..., None] * dv / math.sqrt(e)
        N = torch.einsum("bhps,bgps->hg", a_o, a_o)
        S += torch.einsum("hg,hkd,gkf->df", N, F, F)
        Xi = torch.einsum("bhps,bgpse,bgpd->hged", a_o, alpha_o, beta)
        cross = torch.einsum("hkd,gke,hgef->df", F, U, Xi)
        S += cross + cross.T
        rho = torch.einsum("gke,bgpse->bpsgk", U, alpha_o)
        C = torch.einsum("bpshk,bpsgk->bphg", rho, rho)
        S += torch.einsum("bhpd,bphg,bgpf->df", beta, C, beta)
        return S

    def attributions(self, X, V, right, Z):
        """``sum_s (V^T J_ts right)[i, j] z_s[j]`` at inputs ``X`` (B, T, d): (B, P, k, r).

        ``right`` is ``C_pinv^T`` (d, r) and ``Z`` (B, T, r) the input layer's
        basis coordinates: the attributions the edges square (SPEC section 2),
        without forming the products. With ``U^h = V^T W_O^h`` and the head's
        part of ``J_ts``, ``G^h_s = a_ts W_V^h + alpha_s beta^T + delta_ts K_t
        W_Q^h`` (``alpha_s = scale a_ts (v_s - z_t)``, ``beta = W_K^h^T q_t``),
        the sum over source positions is ``V^T right diag(z_t) + sum_h U^h B^h``
        with the ``d_head x r`` matrix ``B^h = sum_s G^h_s right diag(z_s)``,
        whose three terms need ``W_V^h right`` and ``W_Q^h right`` once per
        layer: per sample, ``k d r`` flops instead of the ``T k d r`` of
        projecting the products, which are never written.
        """
        B, T, d = X.shape
        H, e = self.n_heads, self.d_head
        index = _position_index(self.positions, T, X.device)
        q, keys, v, a, z = self._attend(X)
        a, q, z = (t.index_select(2, index) for t in (a, q, z))  # (B, H, P, ...)
        Z_t = Z.index_select(1, index)  # (B, P, r)
        VC, QC = (self._heads(w) @ right for w in (self.w_v, self.w_q))  # (H, e, r)
        dv = v[:, :, None] - z[:, :, :, None]  # v_s - z_t: (B, H, P, T, e)
        # Value path: W_V^h right times sum_s a_ts z_s.
        Bh = VC[None, :, None] * torch.einsum("bhps,bsr->bhpr", a, Z)[:, :, :, None]
        # Key path: (sum_s alpha_s z_s) times beta^T right, summed over source positions.
        beta = torch.einsum("hed,bhpe->bhpd", self._heads(self.w_k), q) @ right
        alpha_z = torch.einsum("bhpse,bsr->bhper", a[..., None] * dv, Z)
        Bh += alpha_z.mul_(beta[:, :, :, None] / math.sqrt(e))
        # Query path at s = t: K_t (value x key dims) times W_Q^h right, times z_t.
        K_t = torch.einsum("bhpu,bhpuf,bhue->bhpfe", a, dv, keys) / math.sqrt(e)
        Bh += (K_t @ QC[None, :, None]).mul_(Z_t[:, None, :, None])
        U = torch.einsum("dhe,dk->khe", self.w_o.reshape(d, H, e), V).reshape(-1, H * e)
        # One GEMM over every (sample, position, column): (B P r, H e) @ (H e, k).
        Y = Bh.permute(0, 2, 4, 1, 3).reshape(-1, H * e) @ U.T
        Y = Y.view(B, len(index), -1, U.shape[0]).transpose(2, 3)
        return Y.add_((V.T @ right)[None, None] * Z_t[:, :, None])
