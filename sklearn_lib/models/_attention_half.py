"""The attention half of a pre-norm transformer block, as a formula.

``y_t = rho x_t + b_O + sum_h W_O^h sum_s a^h_ts v^h_s`` with ``xt = norm(x)``,
``q^h_t = R_t (W_Q^h xt_t + b_Q^h)``, ``k^g_s = R_s (W_K^g xt_s + b_K^g)``,
``v^g_s = W_V^g xt_s + b_V^g`` (query head ``h`` reads key/value head
``g = h // (H / G)``: grouped-query attention when ``G < H``), ``R_t`` the
rotary embedding of position ``t`` (identity without one) and ``a^h_t =
softmax_s(scale q^h_t . k^g_s)`` over the keys ``s`` the causal mask and the
batch's padding leave. This covers the attention halves of GPT-2 (LayerNorm,
biases), GPT-NeoX (LayerNorm, biases, partial rotary) and Llama (RMSNorm, no
biases, rotary, grouped-query heads) as transformers computes them.

:meth:`NormAttention.products` gives the section's vector-Jacobian products
``V^T J`` in closed form (:class:`AttentionProducts`), with the interface of
:class:`~sklearn_lib.models._vjp.SectionProducts`.
"""

from dataclasses import dataclass

import torch

from ._attention_products import AttentionProducts
from ._elementwise import formula_mismatch
from ._norms import Norm

__all__ = ["AttentionProducts", "NormAttention", "Rotary"]


@dataclass
class Rotary:
    """Rotary position embedding of the first ``rot_dim`` features of every head.

    ``cos, sin = cos(t f), sin(t f)`` (times ``scaling``) with the frequencies
    ``f = inv_freq`` repeated twice, and ``q -> q cos + rotate_half(q) sin``,
    ``rotate_half([q1, q2]) = [-q2, q1]``, as transformers' Llama and GPT-NeoX
    apply it; the features past ``rot_dim`` pass unchanged. Positions are
    ``0 .. T - 1``.

    Parameters
    ----------
    inv_freq : torch.Tensor
        (rot_dim / 2,) frequencies.
    rot_dim : int
        Rotated features per head (even; the head width for full rotary).
    scaling : float, default=1.0
        Factor on ``cos`` and ``sin`` (transformers' ``attention_scaling``).
    compute_dtype : torch.dtype or None, default=None
        The dtype the angles and their cosines are computed in before they are
        cast to the activations' (transformers computes them in float32).
    """

    inv_freq: torch.Tensor
    rot_dim: int
    scaling: float = 1.0
    compute_dtype: torch.dtype | None = None

    def cos_sin(self, n_positions, dtype, device):
        """``(cos, sin)``, each (n_positions, rot_dim), in ``dtype``."""
        work = self.compute_dtype or dtype
        t = torch.arange(n_positions, device=device, dtype=work)
        freqs = t[:, None] * self.inv_freq.to(device=device, dtype=work)[None, :]
        emb = torch.cat([freqs, freqs], -1)
        return ((emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype))

    def apply(self, x, cos, sin):
        """Rotate ``x`` (..., T, d_head) with ``cos, sin`` of :meth:`cos_sin`."""
        r = self.rot_dim
        x_rot, x_pass = x[..., :r], x[..., r:]
        half = r // 2
        rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], -1)
        return torch.cat([x_rot * cos + rotated * sin, x_pass], -1)


@dataclass
class NormAttention:
    """``y = rho x + attention(norm(x))`` over the positions of a sequence (module docstring).

    Weights in ``nn.Linear``'s layout (out, in); head ``h`` owns rows
    ``h d_head : (h + 1) d_head`` of ``w_q`` and columns of ``w_o``.

    Parameters
    ----------
    norm : Norm or None
        The norm in front of the attention (None: it reads ``x`` itself).
    w_q, b_q : torch.Tensor, torch.Tensor or None
        (H d_head, d), (H d_head,).
    w_k, b_k, w_v, b_v : torch.Tensor, torch.Tensor or None
        (G d_head, d), (G d_head,).
    w_o, b_o : torch.Tensor, torch.Tensor or None
        (d_out, H d_head), (d_out,).
    n_heads, n_kv_heads : int
        ``H`` and ``G`` (``G`` divides ``H``).
    scale : float
        Factor of the scores ``q . k``.
    rotary : Rotary or None
    causal : bool, default=True
    residual : bool, default=True
        Whether the section adds its input (``rho = 1``).
    softmax_dtype : torch.dtype or None, default=None
        The dtype the attention weights are computed in when it differs from
        the activations' (transformers' eager attention of GPT-NeoX and Llama
        computes the softmax in float32, then casts back). :meth:`forward`
        reproduces it, and :meth:`mismatch` allows its rounding; the products
        use these weights (their error is of that rounding, as the model's own
        autograd products are).
    """

    norm: Norm | None
    w_q: torch.Tensor
    b_q: torch.Tensor | None
    w_k: torch.Tensor
    b_k: torch.Tensor | None
    w_v: torch.Tensor
    b_v: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    n_heads: int
    n_kv_heads: int
    scale: float
    rotary: Rotary | None = None
    causal: bool = True
    residual: bool = True
    softmax_dtype: torch.dtype | None = None

    @property
    def d_in(self):
        return self.w_q.shape[1]

    @property
    def d_out(self):
        return self.w_o.shape[0]

    @property
    def d_head(self):
        return self.w_q.shape[0] // self.n_heads

    def _split(self, h, n):
        """(B, T, n d_head) -> (B, n, T, d_head)."""
        B, T, _ = h.shape
        return h.view(B, T, n, self.d_head).transpose(1, 2)

    def mask(self, n_positions, key_mask=None, device=None):
        """Allowed (query, key) pairs: (T, T) or, with ``key_mask`` (B, T) bool, (B, 1, T, T)."""
        allowed = torch.ones(n_positions, n_positions, dtype=torch.bool, device=device)
        if self.causal:
            allowed = allowed.tril_()
        if key_mask is not None:
            allowed = allowed[None, None] & key_mask[:, None, None, :].bool()
        return allowed

    def attend(self, X, key_mask=None):
        """The forward quantities at inputs ``X`` (B, T, d): a dict of tensors.

        ``xhat``, ``inv`` (the norm's parts; None without a norm), ``xt`` the
        attention's input, ``q`` (B, H, T, d_head), ``k``, ``v`` (B, G, T,
        d_head), rotated where there is a rotary embedding, ``cos``/``sin``
        (or None), ``a`` (B, H, T, T) the attention weights (0 where masked) and
        ``o`` (B, H, T, d_head) the heads' outputs.
        """
        B, T, _ = X.shape
        if self.norm is None:
            xhat = inv = None
            xt = X
        else:
            xhat, inv = self.norm.normalize(X)
            xt = self.norm.forward(X)
        q = self._split(torch.nn.functional.linear(xt, self.w_q, self.b_q), self.n_heads)
        k = self._split(torch.nn.functional.linear(xt, self.w_k, self.b_k), self.n_kv_heads)
        v = self._split(torch.nn.functional.linear(xt, self.w_v, self.b_v), self.n_kv_heads)
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(T, X.dtype, X.device)
            q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        k_h = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        v_h = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        scores = (q @ k_h.transpose(-1, -2)) * self.scale
        allowed = self.mask(T, key_mask, X.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        # A query with no allowed key (a padded row under left padding) gets weights 0.
        a = torch.nan_to_num(scores.softmax(-1, dtype=self.softmax_dtype).to(X.dtype), nan=0.0)
        return {"xhat": xhat, "inv": inv, "xt": xt, "q": q, "k": k, "v": v, "cos": cos,
                "sin": sin, "a": a, "o": a @ v_h}

    def forward(self, X, key_mask=None):
        """The section's output (B, T, d_out) at inputs ``X`` (B, T, d)."""
        o = self.attend(X, key_mask)["o"]
        B, H, T, e = o.shape
        y = torch.nn.functional.linear(o.transpose(1, 2).reshape(B, T, H * e), self.w_o,
                                       self.b_o)
        return X + y if self.residual else y

    def fits(self, shape_in, shape_out):
        """Whether recorded per-sample shapes (T, d) and (T, d_out) are this section's."""
        return (len(shape_in) == 2 and len(shape_out) == 2 and shape_in[1] == self.d_in
                and shape_out == (shape_in[0], self.d_out)
                and (not self.residual or self.d_in == self.d_out))

    @property
    def claim(self):
        """What the module types say the section computes (for messages)."""
        formula = "attention(norm(x))" if self.norm is not None else "attention(x)"
        return (f"is {'x + ' if self.residual else ''}{formula} by the class of its "
                "transformers block (a recognised pre-norm attention half)")

    def mismatch(self, X, Y, key_mask=None):
        """None if the recorded output ``Y`` (B, T, d_out) is the formula at ``X``, else
        ``(error, allowed)`` (:func:`~._elementwise.formula_mismatch`); padded rows
        (``key_mask`` False) are not compared."""
        eps = None
        if self.softmax_dtype is not None:
            eps = max(torch.finfo(Y.dtype).eps, torch.finfo(self.softmax_dtype).eps)
        if key_mask is not None:
            keep = key_mask.bool()
            return formula_mismatch(lambda t: self.forward(t, key_mask)[keep], X, Y[keep],
                                    eps)
        return formula_mismatch(self.forward, X, Y, eps)

    def products(self, points, V, *, weights=None, signs=None, key_mask=None,
                 memory=2**29):
        """The products ``V^T J`` at ``points``, in closed form: an :class:`AttentionProducts`."""
        return AttentionProducts(self, points, V, weights=weights, signs=signs,
                                 key_mask=key_mask, memory=memory)
