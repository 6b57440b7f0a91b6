"""Closed-form vector-Jacobian products of an attention half (:class:`AttentionProducts`).

The products ``V^T J`` of a :class:`~._attention_half.NormAttention` section,
computed from its forward quantities without autograd, with the interface of
:class:`~._vjp.SectionProducts`; :mod:`._attention_stats` builds on its folded
weights (``Wqk``, ``Wv``, ``E``, ``Vt``), forward ``states`` and per-row
``factors``.
"""

import numbers

import torch

__all__ = ["AttentionProducts"]


def _rotate_back(x, cos, sin, rot_dim):
    """``R^T x`` over the last axis, ``R`` the rotary map of :meth:`Rotary.apply` at ``cos, sin``.

    ``R = C + J S`` with ``J`` the rotation by a half turn of each pair of
    features ``(i, i + rot_dim / 2)``, which commutes with the diagonals ``C``,
    ``S`` and has ``J^T = -J``; so ``R^T x = x cos - J x sin``. ``x`` and
    ``cos, sin`` broadcast against each other.
    """
    half = rot_dim // 2
    x_rot = x[..., :rot_dim]
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], -1)
    head = x_rot * cos - rotated * sin  # broadcast: cos may hold more positions than x
    return torch.cat([head, x[..., rot_dim:].expand(*head.shape[:-1], -1)], -1)


def _outer_sum(A, x, y):
    """``sum_u A[h, s, u] x[h, u] y[h, u]^T`` (H, R, e, e); ``A`` (H, R, U), ``x, y`` (H, U, e).

    One batched GEMM per head on ``x`` scaled by each row of ``A`` (H, R, e,
    U): the outer products ``x_u y_u^T`` of all ``u`` would cost ``e / R``
    times more memory traffic for each chunk of rows ``R``.
    """
    H, R, U = A.shape
    e = x.shape[-1]
    scaled = torch.mul(x.transpose(1, 2)[:, None], A[:, :, None, :],
                       out=x.new_empty(H, R, e, U))
    return torch.bmm(scaled.view(H, R * e, U), y).view(H, R, e, e)


class AttentionProducts:
    """The products ``V^T J`` of a :class:`NormAttention` section, chunk by chunk.

    The interface of :class:`~sklearn_lib.models._vjp.SectionProducts`
    (direction ``q = t k + c`` is output position ``t`` times column ``c`` of
    ``V``; with ``signs`` (B, m, T), ``q = j k + c`` is combination ``j``'s
    signs over the output positions times column ``c``), computed from the
    forward quantities of :meth:`NormAttention.attend` without autograd.

    With the cotangent ``w_t = r_t c`` over the output positions, ``e^h =
    W_O^{hT} c``, head ``h``'s weights ``A`` and output ``o = A v``, and
    ``q, k`` after the rotary map, the cotangents of head ``h``'s inputs at
    position ``s`` are ``dv_s = a_s e`` (``a_s = sum_t r_t A_ts``), ``dq_s =
    r_s scale R_s^T Zq_s^T e`` with ``Zq_s = sum_u A_su v_u k_u^T - o_s
    kappa_s^T`` (``kappa_s = sum_u A_su k_u``) and ``dk_s = scale R_s^T Zk_s^T
    e`` with ``Zk_s = v_s rho_s^T - sum_t r_t A_ts o_t q_t^T`` (``rho_s = sum_t
    r_t A_ts q_t``). With ``E = V^T W_O`` (k, H d_head) and the norm's gain
    and centring folded into the weights (``W_c = W diag(gamma) (I - 1 1^T /
    d)``; no centring for RMSNorm), the products at input position ``s`` are
    ``r_s V^T + (E Y_s + sum_h a^h_s E^h W_V^h) (I - xhat_s xhat_s^T / d) /
    sigma_s`` where ``Y_s`` (H d_head, d) stacks ``scale (r_s Zq_s R_s W_Q +
    Zk_s R_s W_K)`` of every head: one GEMM ``E @ Y`` per chunk of input
    positions. For exact positions (``r`` one-hot at ``t``) ``Zk_s = A_ts (v_s
    - o_t) q_t^T`` has rank one and ``Zq`` enters at ``s = t`` only, so each
    input position costs ``O(H k d)`` per output position instead.

    Temporaries are bounded by half of ``memory`` bytes by processing the
    input positions of one sample at a time in chunks (at least one position);
    the other half keeps a combination's factors ``Zq``, ``Zk`` (``2 H T
    d_head^2`` numbers per sample and point) of as many samples as fit, across
    the chunks of its directions. A chunk of ``c`` directions then costs about
    ``2 c T d^2`` flops per sample and combination (``E Y``) plus ``4 d_head T
    d^2`` (``Y``), or, below ``c = 2 d_head d / (2 d_head + d)``, ``4 c T d^2``
    without the second term; factors that are not kept are recomputed for
    every chunk (``~2 T^2 H d_head^2`` more, in less efficient GEMMs), so long
    sequences want ``memory >= 4 H T d_head^2`` numbers per sample.

    Parameters
    ----------
    section : NormAttention
    points : list of torch.Tensor
        Inputs (B, T, d) at which to take the products (e.g. the points of an
        integration path); the products are their weighted sum.
    V : torch.Tensor
        (d_out, k) cotangent directions.
    weights : list of float, optional
        One per point; None means 1 each.
    signs : torch.Tensor, optional
        (B, m, T) combinations of output positions; None means exact positions.
    key_mask : torch.Tensor, optional
        (B, T) bool, True at real positions: padded keys get weight 0.
    memory : int, default=2**29
        Bytes for the temporaries of a chunk and the kept factors (a target:
        one input position's temporaries are always allowed).

    Attributes
    ----------
    n_vectors, k, p_in, d_in, p_out, d_out, batch : int
        Directions (``m k`` or ``T k``), columns of ``V``, positions and widths,
        samples.
    signs : torch.Tensor or None
    out_shape : tuple
        ``(T, d_out)``.
    """

    def __init__(self, section, points, V, *, weights=None, signs=None, key_mask=None,
                 memory=2**29):
        self.section = section
        points = list(points)
        if not points:
            raise ValueError("points must hold at least one tensor (B, T, d), got none.")
        X = points[0]
        if X.ndim != 3 or X.shape[2] != section.d_in:
            raise ValueError(f"points must be (B, T, {section.d_in}), got shape "
                             f"{tuple(X.shape)}.")
        for p in points[1:]:
            if p.shape != X.shape:
                raise ValueError(f"every point must have the first one's shape {tuple(X.shape)}"
                                 f", got {tuple(p.shape)}.")
        self.weights = [1.0] * len(points) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(points):
            raise ValueError(f"weights must hold one number per point ({len(points)}), got "
                             f"{len(self.weights)}.")
        self.batch, self.p_in, self.d_in = X.shape
        self.p_out, self.d_out = self.p_in, section.d_out
        self.out_shape = (self.p_out, self.d_out)
        dtype, device = X.dtype, X.device
        V = torch.as_tensor(V, dtype=dtype, device=device)
        if V.ndim != 2 or V.shape[0] != self.d_out:
            raise ValueError(f"V must be (d_out, k) = ({self.d_out}, k), got shape "
                             f"{tuple(V.shape)}.")
        self.k = V.shape[1]
        if signs is not None and (signs.ndim != 3 or signs.shape[0] != self.batch
                                  or signs.shape[2] != self.p_out):
            raise ValueError(f"signs must be (B, m, T) = ({self.batch}, m, {self.p_out}), got "
                             f"shape {tuple(signs.shape)}.")
        if key_mask is not None and tuple(key_mask.shape) != (self.batch, self.p_in):
            raise ValueError(f"key_mask must be (B, T) = ({self.batch}, {self.p_in}), got shape "
                             f"{tuple(key_mask.shape)}.")
        if section.residual and self.d_in != self.d_out:
            raise ValueError(f"a residual section needs d_in == d_out, got {self.d_in} and "
                             f"{self.d_out}.")
        self.signs = None if signs is None else signs.to(dtype=dtype, device=device)
        self.n_vectors = self.k * (self.p_out if signs is None else self.signs.shape[1])
        self.memory = int(memory)
        self._cache, self._cache_j = {}, None
        self.itemsize = torch.finfo(dtype).bits // 8
        self.Vt = V.T.contiguous()
        self.E = (self.Vt @ section.w_o).contiguous()  # (k, H d_head)
        with torch.no_grad():
            self._fold_weights()
            self.states = [self._state(p, key_mask) for p in points]

    def _fold_weights(self):
        """Per-head weights (H, d_head, d) with the norm's gain and centring folded in."""
        sec = self.section
        H, G, e = sec.n_heads, sec.n_kv_heads, sec.d_head
        rep = H // G

        def fold(w):
            if sec.norm is None:
                return w
            if sec.norm.weight is not None:
                w = w * sec.norm.weight[None, :]
            return w - w.mean(1, keepdim=True) if sec.norm.kind == "layer" else w

        self._Wq = fold(sec.w_q).reshape(H, e, -1)
        self._Wk = fold(sec.w_k).reshape(G, e, -1).repeat_interleave(rep, 0)
        self.Wv = fold(sec.w_v).reshape(G, e, -1).repeat_interleave(rep, 0)
        self.Wqk = torch.cat([self._Wq, self._Wk], 1)  # (H, 2 d_head, d)
        # The same rows as ([q | k], H d_head, d) for the narrow chunks' single GEMM.
        self._W2 = self.Wqk.view(H, 2, e, -1).transpose(0, 1).reshape(2 * H * e, -1)

    def _state(self, X, key_mask):
        """The forward quantities of one point, keys and values repeated to every query head."""
        sec = self.section
        st = sec.attend(X, key_mask)
        rep = sec.n_heads // sec.n_kv_heads
        for name in ("k", "v"):
            st[name] = st[name].repeat_interleave(rep, dim=1) if rep > 1 else st[name]
        del st["xt"]
        st["kappa"] = st["a"] @ st["k"]
        # The norm's 1 / sigma per position (1 without a norm), folded into the factors.
        st["g"] = st["a"].new_ones(X.shape[:2]) if st["inv"] is None else st["inv"]
        return st

    def costs(self):
        """Bytes per sample: ``(saved, backward, per_vector)`` as :func:`~._vjp.section_costs`.

        ``saved``: one point's forward quantities (:meth:`_state`); ``backward``: the
        temporaries of a chunk and the kept factors (one sample's input
        positions at a time, at most ``memory`` in all, whatever the number of
        samples); ``per_vector``: one direction's products and its share of the
        value term.
        """
        sec, T, d, size = self.section, self.p_in, self.d_in, self.itemsize
        H, e = sec.n_heads, sec.d_head
        saved = size * (H * T * T + 5 * H * T * e + T * d + T)
        backward = min(self.memory // 2, size * T * self._per_row(self.k))
        if self.signs is not None:
            backward += min(self.memory // 2, 2 * size * H * T * e * e * self.batch)
        return saved, backward, size * (T * d + H * d)

    def _per_row(self, c):
        """Elements of the temporaries per input position of a chunk of ``c`` directions."""
        H, e, d = self.section.n_heads, self.section.d_head, self.d_in
        if self.signs is None:
            return H * (d + 3 * c) + 3 * c * d
        return d * d + 8 * H * e * e + 3 * c * d + 2 * c * H * e + H * e * self.p_in

    def _row_step(self, c):
        # Half of ``memory``: the other half may keep the factors (_cached_factors).
        budget = self.memory // 2 // (self.itemsize * self._per_row(c))
        return int(max(1, min(self.p_in, budget)))

    def _segments(self, start, stop):
        """``(i, c0, c1, offset)``: directions of position or combination ``i``, columns c0:c1."""
        q = start
        while q < stop:
            i, c0 = divmod(q, self.k)
            c1 = min(self.k, c0 + stop - q)
            yield i, c0, c1, q - start
            q += c1 - c0

    def chunks(self, max_vectors):
        """Yield ``(start, products)``: directions ``start:start + c`` as ``(c, B * T, d_in)``.

        ``max_vectors`` directions per chunk (at least 1). Each chunk is a new
        tensor the caller may modify.
        """
        if not isinstance(max_vectors, numbers.Integral) or max_vectors < 1:
            raise ValueError(f"max_vectors must be a positive integer, got {max_vectors!r}.")
        B, T, d = self.batch, self.p_in, self.d_in
        X = self.states[0]["q"]
        with torch.no_grad():
            for start in range(0, self.n_vectors, int(max_vectors)):
                stop = min(start + int(max_vectors), self.n_vectors)
                out = X.new_zeros(stop - start, B, T, d)
                for i, c0, c1, off in self._segments(start, stop):
                    self._segment(out[off : off + c1 - c0], i, c0, c1)
                yield start, out.view(stop - start, B * T, d)
        self._cache, self._cache_j = {}, None

    def _segment(self, out, i, c0, c1):
        """Add the products of position or combination ``i``, columns c0:c1, to ``out``."""
        sec = self.section
        H, e = sec.n_heads, sec.d_head
        c = c1 - c0
        E = self.E[c0:c1]
        # The value term's E^h W_V^h (H, c, d): the same for every input position.
        F = E.view(c, H, e).transpose(0, 1) @ self.Wv
        rows = self._row_step(c)
        for p, (st, w) in enumerate(zip(self.states, self.weights)):
            for b in range(self.batch):
                if self.signs is None:
                    self._exact(out[:, b], st, b, i, E, F, w, rows)
                else:
                    self._combination(out[:, b], p, b, i, E, F, w, rows)
        if sec.residual:
            # r_s V^T of every point: the identity's products, once with the weights' sum.
            Vt = self.Vt[c0:c1, None, :] * sum(self.weights)
            if self.signs is None:
                out[:, :, i].add_(Vt)
            else:
                out.addcmul_(self.signs[None, :, i, :, None], Vt[:, None])

    def _finish(self, P, st, b, s0, s1, w, out, rows_first=False):
        """Project ``P`` (c, R, d), or (R, c, d), on the norm's tangent space; add it to ``out``.

        ``P`` holds ``(E Y_s + value term) / sigma_s`` at inputs s0:s1 (the
        norm's ``1 / sigma_s`` is folded into the factors); what is left of
        the norm's Jacobian is ``I - xhat_s xhat_s^T / d``.
        """
        if st["xhat"] is not None:
            xhat = st["xhat"][b, s0:s1]
            proj = torch.einsum("rcd,rd->rc" if rows_first else "crd,rd->cr", P, xhat)
            xhat = xhat[:, None] if rows_first else xhat[None]
            P.addcmul_(proj[..., None], xhat, value=-1.0 / self.d_in)
        out[:, s0:s1].add_(P.transpose(0, 1) if rows_first else P, alpha=w)

    def _combination(self, out, p, b, j, E, F, w, rows):
        """Combination ``j`` of the output positions, sample ``b``, at point ``p``."""
        sec, T, d = self.section, self.p_in, self.d_in
        H, e, c = sec.n_heads, sec.d_head, E.shape[0]
        st, r = self.states[p], self.signs[b, j]
        Z_all = self._cached_factors(p, b, j)
        a = torch.einsum("t,hts->hs", r, st["a"][b]).mul_(st["g"][b])
        for s0 in range(0, T, rows):
            s1 = min(s0 + rows, T)
            Z = self.factors(st, b, r, s0, s1) if Z_all is None else Z_all[:, s0:s1]
            Zt = Z.transpose(1, 2)  # (H, e, R, 2e)
            if c > 2 * e * d / (2 * e + d):
                # E @ Y with Y (H e, R d) the factors times the weights: the fewest flops
                # for wide chunks.
                Y = torch.bmm(Zt.reshape(H, -1, 2 * e), self.Wqk)
                P = (E @ Y.view(H * e, -1)).view(c, s1 - s0, d)
            else:
                # Narrow chunks: E^h Z^h first (c, R, [q|k], H e), then one GEMM with
                # the stacked weights (twice the flops per direction, no per-chunk term).
                M = torch.bmm(E.view(c, H, e).transpose(0, 1), Zt.reshape(H, e, -1))
                M = M.view(H, c, s1 - s0, 2, e).permute(1, 2, 3, 0, 4)
                P = (M.reshape(-1, 2 * H * e) @ self._W2).view(c, s1 - s0, d)
            # The value term sum_h a^h_s E^h W_V^h, in place.
            P.baddbmm_(a[:, s0:s1].T.expand(c, -1, -1), F.transpose(0, 1))
            self._finish(P, st, b, s0, s1, w, out)

    def _cached_factors(self, p, b, j):
        """:meth:`_factors` of all input positions, kept across the chunks of combination ``j``.

        Kept for as many (point, sample) pairs as fit half of ``memory``, and
        computed one head at a time; None for the others (recomputed in chunks
        of input positions for every chunk of directions).
        """
        if self._cache_j != j:
            self._cache, self._cache_j = {}, j
        if (p, b) not in self._cache:
            sec, T = self.section, self.p_in
            H, e = sec.n_heads, sec.d_head
            size = 2 * H * T * e * e * self.itemsize
            if (len(self._cache) + 1) * size > self.memory // 2:
                return None
            st, r = self.states[p], self.signs[b, j]
            Z = st["q"].new_empty(H, T, e, 2 * e)
            for h in range(H):
                Z[h : h + 1] = self.factors(st, b, r, 0, T, slice(h, h + 1))
            self._cache[p, b] = Z
        return self._cache[p, b]

    def factors(self, st, b, r, s0, s1, heads=slice(None)):
        """``scale [r_s Zq_s R_s | Zk_s R_s] / sigma_s`` (H, R, e, 2e), inputs s0:s1, signs r.

        For all positions, ``Phi`` and ``Psi`` are one GEMM per head on the
        outer products ``v_u k_u^T``, ``r_t o_t q_t^T`` (T, e^2); for a chunk of
        positions, GEMMs on the values scaled by the chunk's weights
        (:func:`_outer_sum`), which need no outer products of all positions.
        """
        Zq = self.query_factors(st, b, s0, s1, heads).mul_(r[s0:s1, None, None])
        return torch.cat([Zq, self.key_factors(st, b, r, s0, s1, heads)], -1)

    def query_factors(self, st, b, s0, s1, heads=slice(None)):
        """``scale Zq_s R_s / sigma_s`` (H, R, e, e), inputs s0:s1: the same for every combination."""
        sec, T = self.section, self.p_in
        A, v, k, o, kappa = (st[n][b, heads] for n in ("a", "v", "k", "o", "kappa"))
        if s1 - s0 == T:
            n, e = A.shape[0], v.shape[-1]
            Phi = (A @ (v[..., None] * k[..., None, :]).view(n, T, e * e)).view(n, T, e, e)
        else:
            # Causal: keys u <= s enter Phi.
            u1 = s1 if sec.causal else T
            Phi = _outer_sum(A[:, s0:s1, :u1], v[:, :u1], k[:, :u1])
        Zq = Phi.sub_(o[:, s0:s1, :, None] * kappa[:, s0:s1, None, :])
        return self._finish_factors(Zq, st, b, s0, s1)

    def key_factors(self, st, b, r, s0, s1, heads=slice(None)):
        """``scale Zk_s R_s / sigma_s`` (H, R, e, e), inputs s0:s1, signs r."""
        sec, T = self.section, self.p_in
        A, q, v, o = (st[n][b, heads] for n in ("a", "q", "v", "o"))
        rq, ro = r[:, None] * q, r[:, None] * o
        rho = A[:, :, s0:s1].transpose(1, 2) @ rq
        if s1 - s0 == T:
            n, e = A.shape[0], q.shape[-1]
            Psi = (A.transpose(1, 2) @ (ro[..., None] * q[..., None, :]).view(n, T, e * e))
            Psi = Psi.view(n, T, e, e)
        else:
            # Causal: queries t >= s enter Psi.
            t0 = s0 if sec.causal else 0
            Psi = _outer_sum(A[:, t0:, s0:s1].transpose(1, 2), ro[:, t0:], q[:, t0:])
        Zk = torch.sub(v[:, s0:s1, :, None] * rho[:, :, None, :], Psi)
        return self._finish_factors(Zk, st, b, s0, s1)

    def combined_key_factors(self, st, b, r, s0, s1, heads=slice(None)):
        """:meth:`key_factors` of several combinations ``r`` (m, T) at once: (m, H, R, e, e).

        ``Psi_s = sum_t r_t A_ts o_t q_t^T`` is ``(r o)^T`` times ``A_ts q_t``
        over ``t``: the second factor (U, R e) is the same for every
        combination, so one GEMM per head with the combinations' ``(r o)^T``
        as rows (m e, U) gives them all, and ``rho_s = sum_t r_t A_ts q_t`` is
        ``r`` times the same factor.
        """
        sec, T = self.section, self.p_in
        A, q, v, o = (st[n][b, heads] for n in ("a", "q", "v", "o"))
        H, e, m, R = A.shape[0], q.shape[-1], r.shape[0], s1 - s0
        # Causal: queries t >= s enter.
        t0 = s0 if sec.causal else 0
        U = T - t0
        Aq = (A[:, t0:, s0:s1, None] * q[:, t0:, None, :]).reshape(H, U, R * e)
        ro = o[:, t0:].transpose(1, 2)[:, None] * r[None, :, None, t0:]  # (H, m, e, U)
        Psi = torch.bmm(ro.reshape(H, m * e, U), Aq).view(H, m, e, R, e)
        rho = torch.matmul(r[:, t0:], Aq).view(H, m, R, e)
        Zk = (v[:, None, s0:s1, :, None] * rho[:, :, :, None, :]).sub_(Psi.transpose(2, 3))
        Zk = Zk.transpose(0, 1)  # (m, H, R, e, e)
        if sec.rotary is not None:
            cos, sin = st["cos"][s0:s1, None], st["sin"][s0:s1, None]
            Zk = _rotate_back(Zk, cos, sin, sec.rotary.rot_dim)
        return Zk.mul_(sec.scale * st["g"][b, s0:s1, None, None])

    def _finish_factors(self, Z, st, b, s0, s1):
        """``scale Z_s R_s / sigma_s``: the rotary map's transpose, the scale and the norm's."""
        sec = self.section
        if sec.rotary is not None:
            cos, sin = st["cos"][s0:s1, None], st["sin"][s0:s1, None]
            Z = _rotate_back(Z, cos, sin, sec.rotary.rot_dim)
        return Z.mul_(sec.scale * st["g"][b, s0:s1, None, None])

    def _exact(self, out, st, b, t, E, F, w, rows):
        """Output position ``t`` of sample ``b`` at one point (``r`` one-hot at ``t``)."""
        sec, T, d = self.section, self.p_in, self.d_in
        H, e, c = sec.n_heads, sec.d_head, E.shape[0]
        A, q, k, v, o, kappa, g = (st[n][b] for n in ("a", "q", "k", "v", "o", "kappa", "g"))
        At = A[:, t]  # (H, T)
        Ag = At * g  # the norm's 1 / sigma_s folded in
        # The query term, at s = t only: E Y_t with Y_t = scale Zq_t R_t W_Q / sigma_t.
        Zq = (v * At[..., None]).transpose(1, 2) @ k - o[:, t, :, None] * kappa[:, t, None, :]
        if sec.rotary is not None:
            Zq = _rotate_back(Zq, st["cos"][t], st["sin"][t], sec.rotary.rot_dim)
        query = E @ (Zq.mul_(sec.scale * g[t]) @ self._Wq).view(H * e, d)  # (c, d)
        Eh = E.view(c, H, e).transpose(0, 1)  # (H, c, e)
        qt = q[:, t, None]
        stop = t + 1 if sec.causal else T
        for s0 in range(0, stop, rows):
            s1 = min(s0 + rows, stop)
            # Key term: scale A_ts (E^h (v_s - o_t)) (W_K^T R_s^T q_t)^T, rank one per head.
            coef = (Eh @ (v[:, s0:s1] - o[:, t, None]).transpose(1, 2)).mul_(
                Ag[:, None, s0:s1] * sec.scale).permute(2, 1, 0)  # (R, c, H)
            if sec.rotary is None:
                u = (qt @ self._Wk)[:, 0]  # (H, d), the same at every s
                P = (coef.reshape(-1, H) @ u).view(s1 - s0, c, d)
            else:
                qs = _rotate_back(qt, st["cos"][s0:s1], st["sin"][s0:s1], sec.rotary.rot_dim)
                P = torch.bmm(coef, (qs @ self._Wk).transpose(0, 1))  # (R, c, d)
            # The value term sum_h A_ts E^h W_V^h, in place.
            P.view(s1 - s0, -1).addmm_(Ag[:, s0:s1].T, F.view(H, -1))
            if s0 <= t < s1:
                P[t - s0].add_(query)
            self._finish(P, st, b, s0, s1, w, out, rows_first=True)
