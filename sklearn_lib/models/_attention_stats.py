"""Statistics of the attention half's combined products without the products themselves.

With positions combined by signs ``r`` (one combination), the products of a
:class:`~._attention_half.NormAttention` section at input row ``s`` are (the
math of :class:`~._attention_half.AttentionProducts`)
``G_s = c r_s V^T + E W_s`` with ``E = V^T W_O`` (k, H d_head), ``c`` the
points' total weight (0 without the residual) and ``W_s = sum_p w_p (Y^p_s +
Yv^p_s) N^p_s`` (H d_head, d): ``Y_s`` stacks ``Z^h_s W_QK^h`` over the heads
(``Z^h_s = scale [r_s Zq_s R_s | Zk_s R_s] / sigma_s``, e x 2e, ``W_QK^h`` the
folded query and key weights, 2e x d), ``Yv_s`` stacks the value term ``a^h_s
W_V^h`` (``a^h_s = sum_t r_t A_ts / sigma_s``) and ``N_s = I - xhat_s
xhat_s^T / d`` is what is left of the norm's Jacobian (I without a norm).

The graph needs two things of them, computed here one chunk of input rows at
a time, so nothing scales as ``k T d`` per sample:

* :func:`combined_scatter`: ``S_j = sum_{b, s} G_s^T G_s`` per combination. ``E
  = Q R`` (reduced QR, ``R`` is ``k' x H d_head`` with ``k' = min(k, H
  d_head)``) gives ``G_s^T G_s = (R W_s)^T (R W_s) + c r_s (V Q R W_s + its
  transpose) + c^2 r_s^2 V V^T``: a row costs ``4 e d^2`` (``W_s``) plus ``4 k'
  d^2`` (``R W_s`` and the scatter), whatever ``k``. When ``k <= H d_head`` ``E``
  is used itself and the residual enters ``G_s`` directly.
* :func:`combined_attributions`: ``g = sum_s G_s right diag(z_s)``, through
  the head structure without ``G`` or ``W``: ``W_s right`` is ``Z^h_s (W_QK^h
  right) + a^h_s W_V^h right - u_s (xhat_s^T right) / d`` with ``u_s = (Y_s +
  Yv_s) xhat_s``, so a row costs ``O(H e^2 r + H e d)`` and ``E`` enters once
  per sample: ``g = E B + c V^T right diag(sum_s r_s z_s)``.
"""

import torch

from ._attention_half import AttentionProducts

__all__ = ["combined_attributions", "combined_scatter"]


def _products(section, points, V, weights, signs, key_mask, memory):
    """The section's :class:`AttentionProducts`: validation, folded weights, forward states."""
    if signs is None:
        raise ValueError("signs (B, m, T) are required: these statistics combine the output "
                         "positions; exact positions go through AttentionProducts.")
    if int(memory) < 1:
        raise ValueError(f"memory must be a positive number of bytes, got {memory!r}.")
    return AttentionProducts(section, points, V, weights=weights, signs=signs,
                             key_mask=key_mask, memory=memory)


def _row_step(products, memory, per_row):
    """Input rows per chunk: the temporaries of ``per_row`` elements each within ``memory``."""
    rows = int(memory) // (products._itemsize * per_row)
    return int(max(1, min(products.p_in, rows)))


def _factor_elements(products):
    """Elements per input row of :meth:`AttentionProducts._factors`' temporaries."""
    H, e = products.section.n_heads, products.section.d_head
    return H * e * products.p_in + 8 * H * e * e


def _value_weights(products, st, b, r):
    """``a^h_s = sum_t r_t A_ts / sigma_s`` (H, T): the value term's weights."""
    return torch.einsum("t,hts->hs", r, st["a"][b]).mul_(st["g"][b])


def combined_scatter(section, X, V, signs, *, key_mask=None, memory=2**29):
    """Per combination, the scatter of the section's products over samples and input rows.

    Parameters
    ----------
    section : NormAttention
    X : torch.Tensor
        (B, T, d) inputs.
    V : torch.Tensor
        (d_out, k) cotangent directions.
    signs : torch.Tensor
        (B, m, T) combinations of the output positions (as
        :class:`~._attention_half.AttentionProducts` takes them: 0 at padded or
        unselected positions).
    key_mask : torch.Tensor, optional
        (B, T) bool, True at real positions.
    memory : int, default=2**29
        Bytes for the temporaries of a chunk of input rows (a target: one row's
        temporaries are always allowed).

    Returns
    -------
    S : torch.Tensor
        (m, d, d): ``S_j = sum_{b, s} G_s^T G_s`` with ``G_s`` (k, d) the
        products of combination ``j`` at input row ``s`` of sample ``b``
        (directions ``j k : (j + 1) k`` of ``AttentionProducts``).
    """
    prod = _products(section, [X], V, None, signs, key_mask, memory)
    B, T, d = prod.batch, prod.p_in, prod.d_in
    H, e = section.n_heads, section.d_head
    E, Vt, m = prod._E, prod._Vt, prod.signs.shape[1]
    k, He = E.shape
    reduced = k > He
    with torch.no_grad():
        if reduced:
            # E^T E = R^T R: the scatter of E W_s is that of R W_s, k' = H d_head rows.
            Q, E = torch.linalg.qr(E)
            VQ = Vt.T @ Q  # (d, k'): the residual's cross term V E W_s = V Q (R W_s)
        kk = E.shape[0]
        rows = _row_step(prod, memory, _factor_elements(prod) + He * d + kk * d + He)
        S = X.new_zeros(m, d, d)
        for j in range(m):
            cross = X.new_zeros(kk, d) if reduced else None
            for b in range(B):
                st, r = prod._states[0], prod.signs[b, j]
                a = _value_weights(prod, st, b, r)
                for s0 in range(0, T, rows):
                    s1 = min(s0 + rows, T)
                    R = s1 - s0
                    # W_s (H, e, R, d): Y, the value term, then the norm's projection.
                    Zt = prod._factors(st, b, r, s0, s1).transpose(1, 2)  # (H, e, R, 2e)
                    W = torch.bmm(Zt.reshape(H, e * R, 2 * e), prod._Wqk).view(H, e, R, d)
                    W.addcmul_(prod._Wv[:, :, None, :], a[:, None, s0:s1, None])
                    W = W.view(He, R, d)
                    if st["xhat"] is not None:
                        xhat = st["xhat"][b, s0:s1]
                        proj = torch.einsum("crd,rd->cr", W, xhat)
                        W.addcmul_(proj[..., None], xhat[None], value=-1.0 / d)
                    G = (E @ W.view(He, R * d)).view(kk, R, d)
                    if section.residual:
                        if reduced:
                            cross.add_(torch.einsum("crd,r->cd", G, r[s0:s1]))
                        else:
                            G.addcmul_(Vt[:, None, :], r[None, s0:s1, None])
                    flat = G.view(kk * R, d)
                    S[j].addmm_(flat.T, flat)
            if reduced and section.residual:
                C = VQ @ cross  # sum_s r_s V E W_s
                S[j].add_(C).add_(C.T)
                S[j].addmm_(Vt.T * float((prod.signs[:, j] ** 2).sum()), Vt)
    return S


def combined_attributions(section, points, V, right, Z, signs, *, weights=None,
                          key_mask=None, memory=2**29):
    """Per sample and combination, ``g = sum_s G_s right diag(z_s)``, without the products.

    Parameters
    ----------
    section : NormAttention
    points : list of torch.Tensor
        Inputs (B, T, d) (e.g. the points of an integration path); the products
        are their weighted sum.
    V : torch.Tensor
        (d_out, k) cotangent directions.
    right : torch.Tensor
        (d, r) map from the input's coordinates to its basis (``C_pinv^T``).
    Z : torch.Tensor
        (B, T, r) the input layer's basis coordinates per row (0 at padded
        rows), the same for every point.
    signs : torch.Tensor
        (B, m, T) combinations of the output positions.
    weights : list of float, optional
        One per point; None means 1 each.
    key_mask : torch.Tensor, optional
        (B, T) bool, True at real positions.
    memory : int, default=2**29
        Bytes for the temporaries of a chunk of input rows (a target).

    Returns
    -------
    g : torch.Tensor
        (B, m, k, r): ``g[b, j] = sum_s G_s right diag(z_s)``, ``G_s`` the
        weighted products of combination ``j`` at row ``s`` of sample ``b``.
    """
    prod = _products(section, points, V, weights, signs, key_mask, memory)
    B, T, d = prod.batch, prod.p_in, prod.d_in
    H, e = section.n_heads, section.d_head
    E, Vt, m = prod._E, prod._Vt, prod.signs.shape[1]
    dtype, device = E.dtype, E.device
    right = torch.as_tensor(right, dtype=dtype, device=device)
    if right.ndim != 2 or right.shape[0] != d:
        raise ValueError(f"right must be (d, r) = ({d}, r), got shape {tuple(right.shape)}.")
    n_r = right.shape[1]
    Z = torch.as_tensor(Z, dtype=dtype, device=device)
    if tuple(Z.shape) != (B, T, n_r):
        raise ValueError(f"Z must be (B, T, r) = ({B}, {T}, {n_r}), got shape "
                         f"{tuple(Z.shape)}.")
    with torch.no_grad():
        Wqk_r = prod._Wqk @ right  # (H, 2e, r): once, not per row
        Wv_r = prod._Wv @ right  # (H, e, r)
        Vt_r = Vt @ right if section.residual else None  # (k, r)
        rows = _row_step(prod, memory, _factor_elements(prod) + 2 * H * e * n_r + 3 * H * e)
        out = E.new_zeros(B, m, E.shape[0], n_r)
        for b in range(B):
            z = Z[b]
            for j in range(m):
                r = prod.signs[b, j]
                acc = E.new_zeros(H, e, n_r)  # B_j = sum_s (W_s right) diag(z_s)
                for st, w in zip(prod._states, prod.weights):
                    a = _value_weights(prod, st, b, r)
                    # The value term: sum_s a^h_s W_V^h right diag(z_s).
                    acc.addcmul_(Wv_r, (a @ z)[:, None, :], value=w)
                    for s0 in range(0, T, rows):
                        s1 = min(s0 + rows, T)
                        R = s1 - s0
                        Zf = prod._factors(st, b, r, s0, s1)  # (H, R, e, 2e)
                        Yr = torch.bmm(Zf.view(H, R * e, 2 * e), Wqk_r).view(H, R, e, n_r)
                        acc.add_(torch.einsum("hsir,sr->hir", Yr, z[s0:s1]), alpha=w)
                        if st["xhat"] is not None:
                            # The norm's -u_s (xhat_s^T right) / d, u_s = (Y_s + Yv_s) xhat_s.
                            xhat = st["xhat"][b, s0:s1]
                            wx = torch.einsum("hjd,sd->hsj", prod._Wqk, xhat)
                            u = torch.einsum("hsij,hsj->hsi", Zf, wx)
                            u.add_(torch.einsum("hid,sd->hsi", prod._Wv, xhat)
                                   * a[:, s0:s1, None])
                            coef = (xhat @ right).mul_(z[s0:s1])  # (R, r)
                            acc.sub_(torch.einsum("hsi,sr->hir", u, coef), alpha=w / d)
                g = E @ acc.view(H * e, n_r)
                if section.residual:
                    g.addcmul_(Vt_r, (r @ z)[None, :], value=sum(prod.weights))
                out[b, j] = g
    return out
