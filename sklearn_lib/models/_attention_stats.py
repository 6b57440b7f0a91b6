"""Statistics of the attention half's combined products without the products themselves.

With positions combined by signs ``r`` (one combination), the products of a
:class:`~._attention_half.NormAttention` section at input row ``s`` are (the
math of :class:`~._attention_products.AttentionProducts`)
``G_s = c r_s V^T + E W_s`` with ``E = V^T W_O`` (k, H d_head), ``c`` the
points' total weight (0 without the residual) and ``W_s = sum_p w_p (Y^p_s +
Yv^p_s) N^p_s`` (H d_head, d): ``Y_s`` stacks ``Z^h_s W_QK^h`` over the heads
(``Z^h_s = scale [r_s Zq_s R_s | Zk_s R_s] / sigma_s``, e x 2e, ``W_QK^h`` the
folded query and key weights, 2e x d), ``Yv_s`` stacks the value term ``a^h_s
W_V^h`` (``a^h_s = sum_t r_t A_ts / sigma_s``) and ``N_s = I - xhat_s
xhat_s^T / d`` is what is left of the norm's Jacobian (I without a norm).

The graph needs two things of them, computed here one chunk of input rows at
a time, so nothing scales as ``k T d`` per sample:

* :func:`combined_scatter`: ``S_j = sum_{b, s} G_s^T G_s`` per combination.
  Forming ``G_s`` (``E W_s``, k x d) and its scatter costs ``2 k d (H e + d)``
  flops a row; through the head structure (``K = E^T E`` between the block
  diagonal factors, :func:`_scatter_heads`) about ``6 e (H e)^2`` a
  combination whatever ``k``, the query factors and blocks shared by the
  combinations (8x fewer for GPT-2 small at ``k = d``). The cheaper one is
  taken.
* :func:`combined_attributions`: ``g = sum_s G_s right diag(z_s)``, through
  the head structure without ``G`` or ``W``: ``W_s right`` is ``Z^h_s (W_QK^h
  right) + a^h_s W_V^h right - u_s (xhat_s^T right) / d`` with ``u_s = (Y_s +
  Yv_s) xhat_s``, and ``E`` enters once per sample: ``g = E B + c V^T right
  diag(sum_s r_s z_s)``. Without a rotary map ``B`` comes from GEMMs over
  positions with every combination as columns (:func:`_attributions_plain`,
  ``O(H T (r + e))`` a row); with one, from the factors of each row
  (:func:`_attributions_factors`, ``O(H e^2 (r + T) + H e d)``).
"""

import torch

from ._attention_products import AttentionProducts

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
    rows = int(memory) // (products.itemsize * per_row)
    return int(max(1, min(products.p_in, rows)))


def _factor_elements(products):
    """Elements per input row of :meth:`AttentionProducts.factors`' temporaries."""
    H, e = products.section.n_heads, products.section.d_head
    return H * e * products.p_in + 8 * H * e * e


def _value_weights(products, st, b, r):
    """``a^h_s = sum_t r_t A_ts / sigma_s`` (H, T): the value term's weights."""
    return torch.einsum("t,hts->hs", r, st["a"][b]).mul_(st["g"][b])


def combined_scatter(section, X, V, signs, *, key_mask=None, memory=2**29):
    """Per combination, the scatter of the section's products over samples and input rows.

    Two routes with the same result, the one with fewer flops per row taken:
    ``G_s`` formed (``4 e H e d + 2 k H e d + 2 k d^2``: few directions) or the
    head structure (about ``6 e (H e)^2`` a combination, whatever ``k``:
    :func:`_scatter_heads`).

    Parameters
    ----------
    section : NormAttention
    X : torch.Tensor
        (B, T, d) inputs.
    V : torch.Tensor
        (d_out, k) cotangent directions.
    signs : torch.Tensor
        (B, m, T) combinations of the output positions (as
        :class:`~._attention_products.AttentionProducts` takes them: 0 at padded or
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
    d, He, e, k = prod.d_in, section.n_heads * section.d_head, section.d_head, prod.k
    with torch.no_grad():
        if 6 * e * He * He < 4 * e * He * d + 2 * k * He * d + 2 * k * d * d:
            return _scatter_heads(prod, memory)
        return _scatter_direct(prod, memory)


def _scatter_direct(prod, memory):
    """:func:`combined_scatter` with ``G_s = c r_s V^T + E W_s`` formed, one GEMM per chunk."""
    section, B, T, d = prod.section, prod.batch, prod.p_in, prod.d_in
    E, Vt, m = prod.E, prod.Vt, prod.signs.shape[1]
    k, He = E.shape
    rows = _row_step(prod, memory, _factor_elements(prod) + He * d + k * d + He)
    S = E.new_zeros(m, d, d)
    for j in range(m):
        for b in range(B):
            st, r = prod.states[0], prod.signs[b, j]
            a = _value_weights(prod, st, b, r)
            for s0 in range(0, T, rows):
                s1 = min(s0 + rows, T)
                W = _chunk_w(prod, st, b, r, a, s0, s1)
                G = (E @ W.view(He, -1)).view(k, s1 - s0, d)
                if section.residual:
                    G.addcmul_(Vt[:, None, :], r[None, s0:s1, None])
                flat = G.view(-1, d)
                S[j].addmm_(flat.T, flat)
                del W, G, flat  # before the next chunk's: the budget holds one
    return S


def _chunk_w(prod, st, b, r, a, s0, s1):
    """``W_s`` (H e, R, d) of inputs s0:s1: ``Y_s``, the value term, the norm's projection."""
    section, d, R = prod.section, prod.d_in, s1 - s0
    H, e = section.n_heads, section.d_head
    Zt = prod.factors(st, b, r, s0, s1).transpose(1, 2)  # (H, e, R, 2e)
    W = torch.bmm(Zt.reshape(H, e * R, 2 * e), prod.Wqk).view(H, e, R, d)
    W.addcmul_(prod.Wv[:, :, None, :], a[:, None, s0:s1, None])
    W = W.view(H * e, R, d)
    if st["xhat"] is not None:
        xhat = st["xhat"][b, s0:s1]
        proj = torch.einsum("crd,rd->cr", W, xhat)
        W.addcmul_(proj[..., None], xhat[None], value=-1.0 / d)
    return W


def _scatter_heads(prod, memory):
    """:func:`combined_scatter` through the head structure, without ``G_s`` or ``W_s``.

    With ``K = E^T E`` and ``Y_s = F_s W_all`` (``F_s`` block diagonal over the
    heads, block ``[Z^h_s | a^h_s I]``, ``W_all`` the stacked ``[W_QK^h;
    W_V^h]``), ``G_s^T G_s`` sums to ``W_all^T M W_all`` with ``M = sum_s F_s^T
    K F_s`` (its query/key blocks ``Z^{hT}_s K_hh' Z^{h'}_s``; the value blocks
    from ``sum_s a^{h'}_s Z^h_s`` and ``sum_s a_s a_s^T``), the norm's terms
    ``-(Q + Q^T) / d + sum_s (u_s^T K u_s) xhat_s xhat_s^T / d^2`` (``Q = sum_s
    Y_s^T K u_s xhat_s^T``) and the residual's ``C + C^T + c^2 sum_s r_s^2 V
    V^T`` (``C = c V E sum_s r_s W_s``). Everything but the last products is
    summed over rows and samples first (:class:`_Sums`).

    What does not depend on the combination is computed once: the query
    factors ``Zq_s`` of a chunk of rows serve every combination of a group
    (as many as their sums fit half of ``memory``), and the query-query blocks
    ``sum_s r_s^2 Zq^{hT}_s K_hh' Zq^{h'}_s`` depend on the signs only through
    ``r_s^2`` (``1 / m`` at every real position for random signs): one for
    each distinct pattern of ``r^2``. ``K Zq_s`` serves the query-key blocks
    of every combination too, in one GEMM per head with the combinations'
    ``r_s Zk_s`` as columns (:func:`_add_query_blocks`; ``2 e (H e)^2`` flops
    a row and combination, at the full GEMM rate), and the key-key blocks are
    symmetric (``K Zk_s`` and ``Zk_s^T K Zk_s`` for ``h <= h'`` only, about
    ``2 e (H e)^2`` each). Per combination and row that is about ``6 e (H
    e)^2`` flops and the key factors, instead of ``12 e (H e)^2`` and both
    factors.
    """
    section, B, T, d = prod.section, prod.batch, prod.p_in, prod.d_in
    H, e = section.n_heads, section.d_head
    He, m = H * e, prod.signs.shape[1]
    E = prod.E
    K = E.T @ E
    Kcols = K.view(He, H, e).permute(1, 0, 2).contiguous()  # (H', He, e): K[:, h']
    per_combination = 4 * He * He + 4 * He * d + d * d + 2 * H * e * e
    group = int(max(1, min(m, int(memory) // 2 // (prod.itemsize * per_combination))))
    # A chunk's temporaries per row: one head's factor temporaries (e T), K Zk and K Zq of
    # one head (H e^2 each), the factors and the query blocks' columns (H e^2 each).
    rows = _row_step(prod, int(memory) // 2, e * T + (14 + 4 * group) * H * e * e)
    Kblk = K.view(H, e, H, e).transpose(1, 2).contiguous()  # (H', H, e, e): K_h'h
    squares = prod.signs.square().transpose(0, 1).reshape(m, B * T)
    weights, pattern = torch.unique(squares, dim=0, return_inverse=True)
    weights = weights.view(-1, B, T)
    Mqq = E.new_zeros(weights.shape[0], H, H, e, e)
    S = E.new_zeros(m, d, d)
    st = prod.states[0]
    for j0 in range(0, m, group):
        sums = [_Sums(prod, j) for j in range(j0, min(m, j0 + group))]
        for b in range(B):
            for acc in sums:
                acc.start(b)
            for s0 in range(0, T, rows):
                s1 = min(s0 + rows, T)
                r = prod.signs[b, j0 : j0 + len(sums)]
                # The factors one head at a time: their temporaries are e T a row each.
                Zq = E.new_empty(H, s1 - s0, e, e)  # every combination's
                Zk = E.new_empty(len(sums), H, s1 - s0, e, e)
                for h in range(H):
                    heads = slice(h, h + 1)
                    Zq[heads] = prod.query_factors(st, b, s0, s1, heads)
                    Zk[:, heads] = prod.combined_key_factors(st, b, r, s0, s1, heads)
                for acc, Z in zip(sums, Zk):
                    acc.add_rows(Zq, Z, s0, s1, K, Kcols)
                _add_query_blocks(Mqq if j0 == 0 else None, sums, Zq, Zk,
                                  weights[:, b, s0:s1], Kblk)
        for acc in sums:
            S[acc.j] = acc.result(Mqq[int(pattern[acc.j])], K)
    return S


def _add_query_blocks(Mqq, sums, Zq, Zk, weights, Kblk):
    """Add the query rows' blocks of one chunk: query-query to ``Mqq``, query-key to ``sums``.

    ``sum_s w_s Zq^{hT}_s K_hh' Zq^{h'}_s`` (``w`` each pattern of ``r^2``; ``Mqq``
    (P, H', H, e, e), or None when already done) and every combination's ``sum_s
    r_s Zq^{hT}_s K_hh' Zk^{h'}_s``: for each head ``h'``, ``K_h'h Zq^h`` of
    every ``h`` (``Kblk`` (H', H, e, e) the blocks of ``K``), then one GEMM with
    every combination's (and pattern's) ``Zk^{h'}`` (``Zq^{h'}``) as columns.
    """
    H, R, e, _ = Zq.shape
    Zt = Zq.transpose(1, 2).contiguous()  # (H, e, R, e)
    cols = [] if Mqq is None else [Zt * w[:, None] for w in weights]
    cols += [Z.transpose(1, 2) * acc.r[acc.s0 : acc.s1, None] for acc, Z in zip(sums, Zk)]
    n = len(cols)
    cols = torch.stack(cols, 3).view(H, e * R, n * e)  # rows (i', s), columns (n, c')
    first = n - len(sums)
    for g in range(H):
        # KZq[(h, c), (i', s)] = sum_i K[h' i', h i] Zq^h_s[i, c] (h' = g).
        KZq = torch.bmm(Kblk[g], Zt.view(H, e, R * e)).view(H, e, R, e)
        KZq = KZq.permute(0, 3, 1, 2).reshape(H * e, e * R)
        out = (KZq @ cols[g]).view(H, e, n, e)  # (h, c, n, c')
        for p in range(first):
            Mqq[p, g] += out[:, :, p]
        for acc, c in zip(sums, range(first, n)):
            acc.Mqk[g] += out[:, :, c]


class _Sums:
    """One combination's sums over samples and rows for :func:`_scatter_heads`."""

    def __init__(self, prod, j):
        H, e, d = prod.section.n_heads, prod.section.d_head, prod.d_in
        new = prod.E.new_zeros
        self.prod, self.j = prod, j
        # Mqk[h', h] = sum_s r_s Zq^{hT}_s K_hh' Zk^h'_s (q rows of h, k columns of h'); Mkk
        # alike, its blocks h <= h' only (the others are their transposes).
        self.Mqk, self.Mkk = new(H, H, e, e), new(H, H, e, e)
        self.Za, self.Saa = new(H, H, e, 2 * e), new(H, H)
        self.Zr, self.ar, self.Ux, self.r2 = new(H, e, 2 * e), new(H), new(H * e, d), 0.0
        self.Q1, self.Q2, self.Xg = new(H, 2 * e, d), new(H, e, d), new(d, d)

    def start(self, b):
        """Sample b's signs and value weights."""
        prod = self.prod
        self.b, self.r = b, prod.signs[b, self.j]
        self.a_all = _value_weights(prod, prod.states[0], b, self.r)
        self.ar += self.a_all @ self.r
        self.r2 += float(self.r @ self.r)

    def add_rows(self, Zq, Zk, s0, s1, K, Kcols):
        """Add rows s0:s1 of sample ``b`` but the query-key blocks (:func:`_add_query_blocks`).

        ``Zq``, ``Zk`` (H, R, e, e) are the rows' query and key factors.
        """
        prod, b, r = self.prod, self.b, self.r
        section, st = prod.section, prod.states[0]
        H, e = section.n_heads, section.d_head
        He, R = H * e, s1 - s0
        self.s0, self.s1 = s0, s1
        a, rs = self.a_all[:, s0:s1], r[s0:s1]
        Zf = torch.cat([Zq * rs[:, None, None], Zk], -1)
        Zt = Zk.transpose(1, 2).contiguous()  # (H, e, R, e)
        # For h <= h' only: KZk[h, i, s] = sum_i' K[h i, h' i'] Zk^h'_s[i'] (h' + 1, e, R,
        # e), then Mkk[h', h] += sum_s Zk^{hT}_s K_hh' Zk^h'_s, one GEMM over (i, s) each,
        # batched over h: both operands as they lie.
        Zs = Zt.view(H, e * R, e).transpose(1, 2)
        for g in range(H):
            KZk = (Kcols[g, : (g + 1) * e] @ Zt[g].view(e, -1)).view(g + 1, e * R, e)
            self.Mkk[g, : g + 1].baddbmm_(Zs[: g + 1], KZk)
        del KZk  # before the norm's temporaries
        self.Za += torch.einsum("hsij,gs->hgij", Zf, a)
        self.Saa.addmm_(a, a.T)
        self.Zr += torch.einsum("hsij,s->hij", Zf, rs)
        if section.norm is None:
            return
        xhat = st["xhat"][b, s0:s1]
        # u_s = Y_s xhat_s (H, e, R) and p_s = K u_s.
        u = torch.einsum("hsij,hjs->his", Zf, prod.Wqk @ xhat.T)
        u.addcmul_(prod.Wv @ xhat.T, a[:, None, :])
        u = u.reshape(He, R)
        p = (K @ u).view(H, e, R)
        self.Q1.view(2 * He, -1).addmm_(
            torch.einsum("hsij,his->hjs", Zf, p).reshape(2 * He, R), xhat)
        self.Q2.view(He, -1).addmm_((p * a[:, None, :]).view(He, R), xhat)
        self.Xg.addmm_(xhat.T, xhat * (u * p.view(He, R)).sum(0)[:, None])
        self.Ux.addmm_(u, xhat * rs[:, None])

    def result(self, Mqq, K):
        """The combination's scatter (d, d); ``Mqq`` its query-query blocks (H', H, e, e)."""
        prod = self.prod
        section, E, Vt, d = prod.section, prod.E, prod.Vt, prod.d_in
        H, e = section.n_heads, section.d_head
        He = H * e
        Kb = K.view(H, e, H, e).transpose(1, 2)  # (H, H', e, e): the blocks K_hh'
        W_all = torch.cat([prod.Wqk, prod.Wv], 1).view(3 * He, d)  # rows (h, [q | k | v])
        # Mzz[h', h, j, j'] (h's [q | k] rows j, h''s columns j'): the key-query blocks
        # are the query-key blocks' transposes, as are the key-key blocks h > h'.
        Mzz = E.new_empty(H, H, 2 * e, 2 * e)
        Mzz[:, :, :e, :e] = Mqq
        Mzz[:, :, :e, e:] = self.Mqk
        Mzz[:, :, e:, :e] = self.Mqk.permute(1, 0, 3, 2)
        upper = torch.ones(H, H, dtype=torch.bool, device=E.device).triu_(1)  # h > h'
        Mzz[:, :, e:, e:] = torch.where(upper[:, :, None, None],
                                        self.Mkk.permute(1, 0, 3, 2), self.Mkk)
        # M over the rows (h, [q | k | v]) of W_all.
        M = E.new_empty(H, 3 * e, H, 3 * e)
        M[:, : 2 * e, :, : 2 * e] = Mzz.permute(1, 2, 0, 3)
        Mzv = torch.einsum("hgij,hgik->hjgk", self.Za, Kb)  # sum_s Z^{hT}_s K_hh' a^h'_s
        M[:, : 2 * e, :, 2 * e :] = Mzv
        M[:, 2 * e :, :, : 2 * e] = Mzv.permute(2, 3, 0, 1)
        M[:, 2 * e :, :, 2 * e :] = (self.Saa[:, :, None, None] * Kb).transpose(1, 2)
        S = W_all.T @ (M.view(3 * He, 3 * He) @ W_all)
        if section.norm is not None:
            Q = prod.Wqk.reshape(2 * He, d).T @ self.Q1.view(2 * He, d)
            Q.addmm_(prod.Wv.reshape(He, d).T, self.Q2.view(He, d))
            S.sub_(Q, alpha=1.0 / d).sub_(Q.T, alpha=1.0 / d).add_(self.Xg, alpha=1.0 / d**2)
        if section.residual:
            # sum_s r_s W_s = [Zr^h W_QK^h + ar^h W_V^h]_h - sum_s r_s u_s xhat_s^T / d.
            SW = torch.bmm(self.Zr, prod.Wqk).add_(prod.Wv * self.ar[:, None, None]).view(He, d)
            SW.sub_(self.Ux, alpha=1.0 / d)
            C = Vt.T @ (E @ SW)
            S.add_(C).add_(C.T).addmm_(Vt.T, Vt, alpha=self.r2)
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
    dtype, device = prod.E.dtype, prod.E.device
    right = torch.as_tensor(right, dtype=dtype, device=device)
    if right.ndim != 2 or right.shape[0] != d:
        raise ValueError(f"right must be (d, r) = ({d}, r), got shape {tuple(right.shape)}.")
    n_r = right.shape[1]
    Z = torch.as_tensor(Z, dtype=dtype, device=device)
    if tuple(Z.shape) != (B, T, n_r):
        raise ValueError(f"Z must be (B, T, r) = ({B}, {T}, {n_r}), got shape "
                         f"{tuple(Z.shape)}.")
    with torch.no_grad():
        if section.rotary is None:
            return _attributions_plain(prod, right, Z)
        return _attributions_factors(prod, right, Z)


def _attributions_factors(prod, right, Z):
    """:func:`combined_attributions` from the per-row factors (any rotary map), row chunks.

    ``W_s right`` is ``Z^h_s (W_QK^h right) + a^h_s W_V^h right - u_s (xhat_s^T
    right) / d``: one GEMM per head and chunk of rows over ``(s, 2e)``.
    """
    section, B, T, d = prod.section, prod.batch, prod.p_in, prod.d_in
    H, e = section.n_heads, section.d_head
    E, Vt, m = prod.E, prod.Vt, prod.signs.shape[1]
    n_r = right.shape[1]
    Wqk_r = prod.Wqk @ right  # (H, 2e, r): once, not per row
    Wv_r = prod.Wv @ right  # (H, e, r)
    Vt_r = Vt @ right if section.residual else None  # (k, r)
    rows = _row_step(prod, prod.memory, _factor_elements(prod) + 4 * e * n_r + 5 * H * e)
    out = E.new_zeros(B, m, E.shape[0], n_r)
    for b in range(B):
        z = Z[b]
        for j in range(m):
            r = prod.signs[b, j]
            acc = E.new_zeros(H, e, n_r)  # B_j = sum_s (W_s right) diag(z_s)
            for st, w in zip(prod.states, prod.weights):
                a = _value_weights(prod, st, b, r)
                # The value term: sum_s a^h_s W_V^h right diag(z_s).
                acc.addcmul_(Wv_r, (a @ z)[:, None, :], value=w)
                for s0 in range(0, T, rows):
                    s1 = min(s0 + rows, T)
                    R = s1 - s0
                    Zf = prod.factors(st, b, r, s0, s1)  # (H, R, e, 2e)
                    Zt = Zf.transpose(1, 2).reshape(H, e, R * 2 * e)
                    for h in range(H):
                        # sum_s Z^h_s (W_QK^h right) diag(z_s): one GEMM over (s, j).
                        Wz = Wqk_r[h, None] * z[s0:s1, None, :]  # (R, 2e, r)
                        acc[h].addmm_(Zt[h], Wz.view(R * 2 * e, n_r), alpha=w)
                    if st["xhat"] is not None:
                        # The norm's -u_s (xhat_s^T right) / d, u_s = (Y_s + Yv_s) xhat_s.
                        xhat = st["xhat"][b, s0:s1]
                        wx = torch.einsum("hjd,sd->hsj", prod.Wqk, xhat)
                        u = torch.einsum("hsij,hsj->hsi", Zf, wx)
                        u.add_(torch.einsum("hid,sd->hsi", prod.Wv, xhat)
                               * a[:, s0:s1, None])
                        coef = (xhat @ right).mul_(z[s0:s1])  # (R, r)
                        acc.sub_(torch.einsum("hsi,sr->hir", u, coef), alpha=w / d)
            g = E @ acc.view(H * e, n_r)
            if section.residual:
                g.addcmul_(Vt_r, (r @ z)[None, :], value=sum(prod.weights))
            out[b, j] = g
    return out


def _attributions_plain(prod, right, Z):
    """:func:`combined_attributions` without a rotary map: GEMMs over positions, no factors.

    Without rotation the factors' sums over rows factor through the weights
    ``A`` (query t, key s): with ``c_s = scale / sigma_s``, ``Qr = W_Q^h right``,
    ``Kr = W_K^h right``, the query and key terms of ``sum_s Z^h_s (W_QK^h right)
    diag(z_s)`` are ``v^T (k Qr * A^T (c r z)) - o^T (r (c kappa Qr z + q Kr * A (c
    z)))`` and ``v^T (c z * rho Kr)`` with ``rho = A^T (r q)``: two ``(T, T)``
    GEMMs per head, ``O(H T^2 (r + e))`` a combination instead of ``O(H T e^2
    (T + r))``. The norm's ``u_s`` alike: ``Zq_s W_Q xhat_s`` from ``(A * (W_Q
    xhat) k^T) v`` (the same for every combination) and ``Zk_s W_K xhat_s`` from
    ``v_s (rho_s . W_K xhat_s) - ((A * q (W_K xhat)^T)^T (r o))_s``. The
    combinations go together as columns of the GEMMs, as many as fit ``memory``.
    """
    section, B, T = prod.section, prod.batch, prod.p_in
    H, e, m = section.n_heads, section.d_head, prod.signs.shape[1]
    E, Vt = prod.E, prod.Vt
    n_r = right.shape[1]
    Qr, Kr = prod._Wq @ right, prod._Wk @ right  # (H, e, r)
    Wv_r = prod.Wv @ right
    # Combinations per group: about four (T, m, r) temporaries of one head within memory.
    step = max(1, min(m, prod.memory // (prod.itemsize * 4 * T * (n_r + 2 * e))))
    out = E.new_zeros(B, m, E.shape[0], n_r)
    for b in range(B):
        z = Z[b]
        for j0 in range(0, m, step):
            r = prod.signs[b, j0 : j0 + step]  # (mc, T)
            mc = r.shape[0]
            acc = E.new_zeros(mc, H, e, n_r)
            for st, w in zip(prod.states, prod.weights):
                _plain_point(prod, st, b, r, z, right, Qr, Kr, Wv_r, w, acc)
            g = (E @ acc.view(mc, H * e, n_r))
            if section.residual:
                g.addcmul_(Vt @ right, (r @ z)[:, None, :], value=sum(prod.weights))
            out[b, j0 : j0 + mc] = g
    return out


def _plain_point(prod, st, b, r, z, right, Qr, Kr, Wv_r, w, acc):
    """Add one point's share (weight ``w``) of :func:`_attributions_plain` to ``acc`` (m, H, e, r)."""
    section, T, d = prod.section, prod.p_in, prod.d_in
    mc, n_r = r.shape[0], z.shape[1]
    A, q, k, v, o, kappa = (st[n][b] for n in ("a", "q", "k", "v", "o", "kappa"))
    g = st["g"][b]
    c = g * section.scale
    cz = c[:, None] * z  # (T, r)
    rT = r.T.contiguous()  # (T, m)
    xhat = st["xhat"]
    if xhat is not None:
        xhat = xhat[b]
        coef = (xhat @ right).mul_(z)  # (T, r): xhat_s^T right z_s
    for h in range(section.n_heads):
        Ah = A[h]  # (T query, T key)
        # Query term: v^T (k Qr * A^T (c r z)) - o^T (r c kappa Qr z).
        Y1 = (Ah.T @ (rT[:, :, None] * cz[:, None, :]).reshape(T, mc * n_r)).view(T, mc, n_r)
        Y1.mul_((k[h] @ Qr[h])[:, None, :])
        part = (v[h].T @ Y1.view(T, -1)).view(-1, mc, n_r).transpose(0, 1)  # (m, e, r)
        # Key term: v^T (c z * rho Kr), rho = A^T (r q); - o^T (r q Kr * A (c z)).
        rho = (Ah.T @ (rT[:, :, None] * q[h][:, None, :]).reshape(T, -1)).view(T, mc, -1)
        Y = (rho @ Kr[h]).mul_(cz[:, None, :])  # (T, m, r)
        part.add_((v[h].T @ Y.view(T, -1)).view(-1, mc, n_r).transpose(0, 1))
        X = (kappa[h] @ Qr[h]).mul_(cz).addcmul_(q[h] @ Kr[h], Ah @ cz)  # (T, r)
        ro = r[:, None, :] * o[h].T[None]  # (m, e, T)
        part.sub_(ro @ X)
        # The value term: sum_s a_s W_V right z_s, a_s = sum_t r_t A_ts g_s.
        a = (r @ Ah).mul_(g)  # (m, T)
        part.addcmul_(Wv_r[h][None], (a @ z)[:, None, :])
        if xhat is not None:
            # The norm's -u_s (xhat_s^T right) z_s / d, u_s = (Y_s + Yv_s) xhat_s.
            xq, xk = xhat @ prod._Wq[h].T, xhat @ prod._Wk[h].T  # (T, e)
            uq = ((Ah * (xq @ k[h].T)) @ v[h]).sub_(o[h] * (kappa[h] * xq).sum(1, keepdim=True))
            Bk = Ah * (q[h] @ xk.T)  # Bk[t, s] = A_ts q_t . xk_s
            u = r[:, :, None] * uq[None]  # (m, T, e)
            u.addcmul_(v[h][None], (rho * xk[:, None, :]).sum(2).T[:, :, None])
            u.sub_((Bk.T @ (rT[:, :, None] * o[h][:, None, :]).reshape(T, -1))
                   .view(T, mc, -1).transpose(0, 1))
            u.mul_(c[None, :, None])
            u.addcmul_(a[:, :, None], (xhat @ prod.Wv[h].T)[None])
            part.sub_(u.transpose(1, 2) @ coef, alpha=1.0 / d)
        acc[:, h].add_(part, alpha=w)
