"""The null space of one section's parameters on the data, exactly or as an estimate.

A section's parameters are one or more dense blocks ``Theta_b`` (a ``Linear``'s
weight with its bias, as a ``(k_b, m_b)`` matrix ``[W^T; b]``). To first order
the graph's output coordinates of sample ``x`` move by

``dy_x = sum_b F_bx (Theta_b^T u_bx)``

where ``u_bx`` (``k_b``) is the block's input row (with a trailing 1 for a
bias) and ``F_bx = A_x E_b diag(s_bx)`` (``o x m_b``) reads the block's output
into the output: ``A_x`` the Jacobian of the output coordinates with respect to
a layer (per sample, or one matrix for all), ``E_b`` a fixed matrix (the outgoing
weight of a residual block's hidden layer, else the identity) and ``s_bx`` an
elementwise activation's derivative (else 1). The stacked per-sample parameter
Jacobian ``K`` (``n o`` rows, ``p = sum_b k_b m_b`` columns) has the
Gauss-Newton matrix ``K^T K = sum_x sum_bb' (u_bx u_b'x^T) kron (F_bx^T F_b'x)``,
and the degenerate directions are its null space, ``p - rank K``.

Two exact reductions come first (they change nothing but the size):

* input side: a direction ``v`` with ``u_bx . v = 0`` for every sample frees
  ``v kron R^m_b``. The inputs are centred (the bias absorbs the mean, an
  invertible change of the parameters) and whitened with the library's rule
  for the activation rank (:func:`sklearn_lib.basis._linalg.gram_spectrum`:
  constant features dropped, eigenvalues of the Gram matrix above
  ``eps max(d, sqrt(n)) D_max``);
* output side: a direction ``w`` of the block's outputs with ``F_bx w = 0`` for
  every sample frees ``R^k_b kron w``; these are the null space of
  ``R_b = (1/n) sum_x F_bx^T F_bx``, and the kept range is whitened by
  ``R_b``'s eigenvalues (the same rule, ``n o`` outer products).

What is left is a ``p_r x p_r`` matrix, ``p_r = sum_b r_b^in r_b^out``, or its
``n o x n o`` dual ``K K^T`` when that is smaller. Its numerical rank counts the
eigenvalues above ``eps max(s, sqrt(t)) lambda_max`` (``s`` its order, ``t``
the outer products summed into it), the rule of the rest of the library.

Exact where ``min(p_r, n o)`` is at most ``exact_size_limit``. The Gauss-Newton
matrix is assembled as one matrix product per chunk of samples,
``(w_x kron w_x)^T (G_x^T G_x)`` (``n p_r^2`` operations rather than the
``n o p_r^2`` of ``K^T K``), and ``torch.linalg.eigvalsh`` decomposes it: on two
cores of a laptop 4,000 takes about 13 s, 6,000 about 40 s and 16,640 (the
shipped MLP's ``embed -> mlp.1``) 14 minutes, which is why larger sections get an
estimate instead. A single block read the same way on every sample (no
activation, an affine downstream: ``F_x = F``) needs no decomposition: its
reduced matrix is ``(sum_x w_x w_x^T) kron (F^T F)``, both factors of full rank.

The estimate is stochastic Lanczos quadrature on the matrix-vector product
``v -> K^T K v`` (two passes over the per-sample factors, never forming
``K``; the output whitening is applied to the parameters, once per product).
For each Rademacher probe ``z``, ``k`` Lanczos steps with full
reorthogonalisation give a Gauss quadrature of the spectral measure of ``z``;
its weight on Ritz values at most ``t = max(tolerance, 1e-8 lambda_max)`` (the
resolution of a few hundred steps) estimates ``|P_0 z|^2 / |z|^2``, so ``p_r``
times its mean over probes estimates the null space (Hutchinson). The stated
error is the standard error over probes plus, per probe, the mass at or below
``t`` that the steps have not excluded: the Gauss-Radau rule with a node
prescribed at ``t`` bounds the mass at or below ``t`` from above
(Chebyshev-Markov-Stieltjes), and its excess over the counted weight is added.
On the shipped MLP (2,000 pairs, 8 probes) the bound is 0.15 after 100 steps and
0.0008 after 160.
"""

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..basis._linalg import constant_feature_floor, gram_spectrum, rounding_tolerance
from ..utils._threads import lapack_threads

__all__ = ["ParameterBlock", "SectionNullSpace", "section_null_space"]

# Numbers per work tensor of a chunk of samples (as the graph's sources use).
_CHUNK_NUMBERS = 2**23
# Per-sample downstream Jacobians (and their reduced products) up to this many
# numbers are kept in memory rather than recomputed chunk by chunk.
_MATERIALISE_NUMBERS = 2**26


@dataclass
class ParameterBlock:
    """One dense block of a section's parameters and how the output reads it.

    Attributes
    ----------
    inputs : torch.Tensor of shape (n, k)
        The rows ``u_x`` the block's weight multiplies (without the bias's 1).
    bias : bool
        Whether the block has a bias (a trailing input 1).
    downstream : torch.Tensor of shape (o, q) or callable
        ``A``: the output coordinates' Jacobian with respect to the layer the
        block writes into (through ``middle``), one matrix for every sample, or
        ``downstream(start, stop) -> (stop - start, o, q)`` per sample.
    middle : torch.Tensor of shape (q, m) or None
        ``E_b``; None is the identity (``q = m``).
    derivative : torch.Tensor of shape (n, m) or None
        ``s_x``; None means 1 (no activation).
    name : str
        What the block is, for messages (``"mlp.0"``, ``"w_in"``).
    """

    inputs: torch.Tensor
    bias: bool
    downstream: object
    middle: torch.Tensor | None = None
    derivative: torch.Tensor | None = None
    name: str = ""

    @property
    def n_parameters(self):
        return (self.inputs.shape[1] + self.bias) * self.width

    @property
    def width(self):
        """``m``: outputs of the block."""
        if self.middle is not None:
            return self.middle.shape[1]
        if self.derivative is not None:
            return self.derivative.shape[1]
        if callable(self.downstream):
            return self.downstream(0, 1).shape[2]
        return self.downstream.shape[1]

    def factor(self, start, stop):
        """``F_x = A_x E diag(s_x)`` for samples ``start:stop``: (c, o, m)."""
        A = self.downstream(start, stop) if callable(self.downstream) else self.downstream
        if self.middle is not None:
            A = A @ self.middle
        if self.derivative is not None:
            A = A * self.derivative[start:stop, None, :]
        elif A.ndim == 2:
            A = A.expand(stop - start, *A.shape)
        return A


@dataclass
class SectionNullSpace:
    """The degenerate directions of one section's parameters.

    ``degenerate`` is exact (an integer) when ``method == "exact"``, else the
    estimate, with ``error`` its stated standard error (0 when exact).
    """

    n_parameters: int
    degenerate: float
    error: float
    method: str
    reduced_size: int
    n_rows: int
    tolerance: float = 0.0
    eigenvalues: np.ndarray | None = field(default=None, repr=False)
    seconds: float = 0.0
    n_probes: int = 0
    n_steps: int = 0

    @property
    def rank(self):
        return self.n_parameters - self.degenerate


# --------------------------------------------------------------------------- reductions
@dataclass
class _Reduced:
    """A block in reduced, whitened coordinates: ``w_x`` (n, r_in) and ``F_x Q`` (o, r_out)."""

    block: ParameterBlock
    w: torch.Tensor
    Q: torch.Tensor

    @property
    def size(self):
        return self.w.shape[1] * self.Q.shape[1]

    def G(self, start, stop):
        return self.block.factor(start, stop) @ self.Q


def _chunks(n, per_sample):
    step = max(1, _CHUNK_NUMBERS // max(1, per_sample))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _input_coordinates(u, bias):
    """Whitened coordinates of the range of the inputs (centred, with a 1 for a bias)."""
    n, k = u.shape
    if k:
        mean = u.mean(0) if bias else torch.zeros(k, dtype=u.dtype, device=u.device)
        uc = u - mean
        gram = uc.T @ uc / n
        exponent = 0
        floor = constant_feature_floor(mean, exponent) if bias else None
        _, D, U, tau = gram_spectrum(gram, n, floor)
        keep = D > tau
        w = uc @ (U[:, keep] / D[keep].sqrt())
    else:
        w = u.new_zeros(n, 0)
    if bias:
        w = torch.cat([w, w.new_ones(n, 1)], 1)
    return w


def _output_coordinates(block, n, o):
    """``Q`` (m, r_out): whitened basis of the range of ``R = (1/n) sum_x F_x^T F_x``."""
    m = block.width
    if not callable(block.downstream):
        # F_x = A E diag(s_x): R = (E^T A^T A E) * (S^T S / n), the closed form of SPEC 5.
        AE = block.downstream if block.middle is None else block.downstream @ block.middle
        R = AE.T @ AE
        if block.derivative is not None:
            R = R * (block.derivative.T @ block.derivative) / n
    else:
        R = torch.zeros(m, m, dtype=block.inputs.dtype, device=block.inputs.device)
        for start, stop in _chunks(n, o * m):
            F = block.factor(start, stop)
            R += torch.einsum("xki,xkj->ij", F, F)
        R /= n
    R = (R + R.T) / 2
    with lapack_threads(R):
        values, vectors = torch.linalg.eigh(R)
    largest = float(values[-1]) if m else 0.0
    tau = rounding_tolerance(largest, m, n * o, R.dtype)
    keep = values > tau
    return vectors[:, keep] / values[keep].sqrt()


def _reduce(blocks, n, o):
    return [
        _Reduced(b, _input_coordinates(b.inputs, b.bias), _output_coordinates(b, n, o))
        for b in blocks
    ]


# --------------------------------------------------------------------------- exact
def _primal(reduced, n):
    """``(1/n) K^T K`` in reduced coordinates, assembled per pair of blocks."""
    sizes = [r.size for r in reduced]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    p = int(offsets[-1])
    ref = reduced[0].w
    GN = torch.zeros(p, p, dtype=ref.dtype, device=ref.device)
    o = reduced[0].block.factor(0, 1).shape[1]
    widest = max(max(r.w.shape[1] ** 2, r.Q.shape[1] ** 2) for r in reduced)
    for start, stop in _chunks(n, o * max(r.Q.shape[1] for r in reduced) + widest):
        Gs = [r.G(start, stop) for r in reduced]
        for b, rb in enumerate(reduced):
            for c in range(b, len(reduced)):
                rc = reduced[c]
                wb, wc = rb.w[start:stop], rc.w[start:stop]
                ib, ic, jb, jc = wb.shape[1], wc.shape[1], rb.Q.shape[1], rc.Q.shape[1]
                Qx = (wb[:, :, None] * wc[:, None, :]).reshape(stop - start, ib * ic)
                Px = torch.einsum("xki,xkj->xij", Gs[b], Gs[c]).reshape(stop - start, jb * jc)
                part = (Qx.T @ Px).reshape(ib, ic, jb, jc).permute(0, 2, 1, 3)
                GN[offsets[b]:offsets[b + 1], offsets[c]:offsets[c + 1]] += part.reshape(
                    ib * jb, ic * jc)
    for b in range(len(reduced)):
        for c in range(b):
            GN[offsets[b]:offsets[b + 1], offsets[c]:offsets[c + 1]] = (
                GN[offsets[c]:offsets[c + 1], offsets[b]:offsets[b + 1]].T)
    return GN / n


def _dual(reduced, n, o):
    """``(1/n) K K^T`` (n o, n o): ``sum_b (w_bx . w_by) (G_bx G_by^T)``."""
    ref = reduced[0].w
    KK = torch.zeros(n * o, n * o, dtype=ref.dtype, device=ref.device)
    for r in reduced:
        G = r.G(0, n).reshape(n * o, -1)
        WW = r.w @ r.w.T
        KK += (G @ G.T) * WW.repeat_interleave(o, 0).repeat_interleave(o, 1)
    return KK / n


def _eigenvalues(A):
    A = (A + A.T) / 2
    with lapack_threads(A):
        return torch.linalg.eigvalsh(A).abs().flip(0)


# --------------------------------------------------------------------------- estimate
class _Operator:
    """``V -> (1/n) K^T K V`` on columns ``V`` (p_r, b), chunk by chunk of samples.

    A block read by one matrix for all samples (``F_x = A E diag(s_x)``) is applied
    factor by factor, as matrix products over the whole chunk; a block with
    per-sample ``A_x`` uses ``G_x = F_x Q``, kept in memory up to ``2**26``
    numbers and recomputed per chunk beyond.
    """

    def __init__(self, reduced, n, o):
        self.reduced, self.n, self.o = reduced, n, o
        sizes = [r.size for r in reduced]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.size = int(self.offsets[-1])
        self._fixed, self._cache = [], []
        for r in reduced:
            block = r.block
            if not callable(block.downstream):
                A = block.downstream if block.middle is None else block.downstream @ block.middle
                self._fixed.append(A)
                self._cache.append(None)
            else:
                self._fixed.append(None)
                keep = n * o * r.Q.shape[1] <= _MATERIALISE_NUMBERS
                self._cache.append(r.G(0, n) if keep else None)

    def _G(self, i, start, stop):
        cached = self._cache[i]
        return cached[start:stop] if cached is not None else self.reduced[i].G(start, stop)

    def __call__(self, V):
        b = V.shape[1]
        out = torch.zeros_like(V)
        parts, sums = [], []
        for i, r in enumerate(self.reduced):
            # Layout (r_in, b, width): a chunk's rows then meet the readout in one GEMM.
            P = V[self.offsets[i]:self.offsets[i + 1]].reshape(r.w.shape[1], r.Q.shape[1], b)
            if self._fixed[i] is not None:
                # The output whitening Q moves to the parameters: once, not per sample.
                P = torch.einsum("aib,mi->abm", P, r.Q)
            else:
                P = P.transpose(1, 2)
            parts.append(P.reshape(r.w.shape[1], -1))
            sums.append(torch.zeros_like(parts[-1]))
        per_sample = sum((self.o + r.block.width + r.Q.shape[1]) * b for r in self.reduced)
        for start, stop in _chunks(self.n, 2 * per_sample):
            c = stop - start
            y = 0
            for i, (r, P) in enumerate(zip(self.reduced, parts)):
                t = (r.w[start:stop] @ P).reshape(c, b, -1)
                y = y + self._forward(i, t, start, stop)
            for i, r in enumerate(self.reduced):
                back = self._adjoint(i, y, start, stop).reshape(c, -1)
                sums[i] += r.w[start:stop].T @ back
        for i, r in enumerate(self.reduced):
            S = sums[i].reshape(r.w.shape[1], b, -1)
            if self._fixed[i] is not None:
                S = torch.einsum("abm,mi->aib", S, r.Q)
            else:
                S = S.transpose(1, 2)
            out[self.offsets[i]:self.offsets[i + 1]] = S.reshape(-1, b)
        return out / self.n

    def _forward(self, i, t, start, stop):
        """``t`` (c, b, width) -> ``F_x t_x`` (fixed reading) or ``G_x t_x``: (c, b, o)."""
        A = self._fixed[i]
        if A is None:
            return torch.bmm(t, self._G(i, start, stop).transpose(1, 2))
        block = self.reduced[i].block
        if block.derivative is not None:
            t = t * block.derivative[start:stop, None, :]
        c, b, m = t.shape
        return (t.reshape(c * b, m) @ A.T).reshape(c, b, -1)

    def _adjoint(self, i, y, start, stop):
        """The transpose of :meth:`_forward`: ``y`` (c, b, o) -> (c, b, width)."""
        A = self._fixed[i]
        if A is None:
            return torch.bmm(y, self._G(i, start, stop))
        c, b, o = y.shape
        g = (y.reshape(c * b, o) @ A).reshape(c, b, -1)
        block = self.reduced[i].block
        if block.derivative is not None:
            g = g * block.derivative[start:stop, None, :]
        return g


def _lanczos(op, Z, n_steps):
    """Lanczos with full reorthogonalisation on the probes ``Z`` (p, b) side by side.

    Returns per probe the tridiagonal coefficients ``(alpha, beta)`` of the steps
    it took: a probe stops early when its Krylov space is invariant (``beta``
    below rounding), after which its quadrature is exact.
    """
    p, b = Z.shape
    k = min(n_steps, p)
    basis = Z.new_zeros(k, p, b)
    q = Z / Z.norm(dim=0)
    alpha, beta = Z.new_zeros(b, k), Z.new_zeros(b, k)
    steps = np.full(b, k)
    active = torch.ones(b, dtype=torch.bool, device=Z.device)
    scale = 0.0
    for j in range(k):
        basis[j] = q
        v = op(q)
        alpha[:, j] = (q * v).sum(0)
        # Full reorthogonalisation, twice (classical Gram-Schmidt "twice is enough").
        for _ in range(2):
            coeff = torch.einsum("jpb,pb->jb", basis[:j + 1], v)
            v = v - torch.einsum("jpb,jb->pb", basis[:j + 1], coeff)
        beta[:, j] = v.norm(dim=0)
        scale = max(scale, float(alpha[:, j].abs().max()), float(beta[:, j].max()))
        done = active & (beta[:, j] <= p * torch.finfo(Z.dtype).eps * scale)
        for i in torch.nonzero(done).flatten().tolist():
            steps[i] = j + 1
        active &= ~done
        if not bool(active.any()):
            break
        v[:, ~active] = 0
        q = v / beta[:, j].clamp_min(torch.finfo(v.dtype).tiny)
    return [(alpha[i, :steps[i]], beta[i, :steps[i]]) for i in range(b)]


def _quadrature(alpha, beta, t):
    """Gauss quadrature of one probe's Lanczos steps, and a bound on its mass below ``t``.

    Returns the Ritz values, their Gauss weights and the weight at ``t`` of the
    Gauss-Radau rule with a node prescribed at ``t``: by the Chebyshev-Markov-
    Stieltjes inequalities the probe's spectral mass at or below ``t`` is at most
    that weight when ``t`` is below the rule's other nodes (Golub and Meurant,
    "Matrices, Moments and Quadrature", 2010, ch. 6). A probe whose Krylov space
    became invariant has an exact Gauss rule (``beta_k = 0``, Radau weight 0).
    """
    k = len(alpha)
    T = torch.diag(alpha) + torch.diag(beta[:k - 1], 1) + torch.diag(beta[:k - 1], -1)
    theta, Y = torch.linalg.eigh(T)
    weights = Y[0] ** 2
    b = beta[k - 1]
    counted = float(weights[theta <= t].sum())
    if float(b) == 0.0:
        return theta, weights, counted
    e_k = torch.zeros(k, dtype=T.dtype, device=T.device)
    e_k[-1] = b
    try:
        x = torch.linalg.solve(T - t * torch.eye(k, dtype=T.dtype, device=T.device), e_k)
    except RuntimeError:  # t is a Ritz value to working precision: a node already
        return theta, weights, counted
    # The Radau matrix [[T, b e_k], [b e_k^T, t + b x_k]] has t as an eigenvalue.
    radau = torch.zeros(k + 1, k + 1, dtype=T.dtype, device=T.device)
    radau[:k, :k] = T
    radau[k, k - 1] = radau[k - 1, k] = b
    radau[k, k] = t + b * x[-1]
    nodes, Z = torch.linalg.eigh(radau)
    at_t = int((nodes - t).abs().argmin())
    return theta, weights, float((Z[0, :at_t + 1] ** 2).sum())


#: Gauss-Newton eigenvalues below this share of the largest count as null in the
#: estimate: what Lanczos resolves in a few hundred steps (the exact count uses
#: the rounding tolerance ``eps max(s, sqrt(t)) lambda_max``, about 1e-12 of it).
ESTIMATE_RESOLUTION = 1e-8


def _estimate(reduced, n, o, n_rows, dtype, *, n_probes, n_steps, generator):
    """``(null, error, threshold)`` by stochastic Lanczos quadrature (module docstring)."""
    op = _Operator(reduced, n, o)
    p = op.size
    Z = torch.randint(0, 2, (p, n_probes), generator=generator).to(
        dtype=reduced[0].w.dtype, device=reduced[0].w.device).mul_(2).sub_(1)
    runs = _lanczos(op, Z, n_steps)
    largest = max(float(torch.linalg.eigvalsh(
        torch.diag(a) + torch.diag(b[:-1], 1) + torch.diag(b[:-1], -1)).max()) for a, b in runs)
    t = max(rounding_tolerance(largest, p, n_rows, dtype), ESTIMATE_RESOLUTION * largest)
    null, missed = [], []
    for a, b in runs:
        theta, weights, radau = _quadrature(a, b, t)
        counted = float(weights[theta <= t].sum())
        null.append(counted * p)
        # Mass below t the rule may not have resolved yet (at most the Radau weight).
        missed.append(max(radau - counted, 0.0) * p)
    null = np.array(null)
    stat = float(null.std(ddof=1) / math.sqrt(n_probes))
    return float(null.mean()), stat + float(np.mean(missed)), t


# --------------------------------------------------------------------------- entry point
def section_null_space(blocks, *, n_outputs, dtype, exact_size_limit=6000, n_probes=8,
                       n_steps=120, random_state=None):
    """:class:`SectionNullSpace` of a section's parameter blocks (module docstring).

    Parameters
    ----------
    blocks : list of ParameterBlock
        The section's parameters; all blocks see the same ``n`` samples.
    n_outputs : int
        ``o``: output coordinates per sample.
    dtype : torch.dtype
        Precision whose rounding sets the rank tolerance.
    exact_size_limit : int or None
        Largest reduced Gauss-Newton matrix (or dual Gram matrix) decomposed
        exactly; None decomposes any size.
    n_probes, n_steps : int
        Probes and Lanczos steps of the estimate.
    random_state : int, Generator or None
        Seed of the probes.
    """
    start_time = time.perf_counter()
    blocks = [b for b in blocks if b.n_parameters]
    p = sum(b.n_parameters for b in blocks)
    if not blocks:
        return SectionNullSpace(0, 0, 0.0, "exact", 0, 0)
    n, o = blocks[0].inputs.shape[0], int(n_outputs)
    reduced = [r for r in _reduce(blocks, n, o) if r.size]
    p_r = sum(r.size for r in reduced)
    trivial = p - p_r
    n_rows = n * o
    if p_r == 0:
        return SectionNullSpace(p, p, 0.0, "exact", 0, n_rows,
                                seconds=time.perf_counter() - start_time)
    if len(reduced) == 1 and _fixed_reading(reduced[0].block):
        # F_x = F for every sample: K^T K = (sum_x w_x w_x^T) kron (F^T F), whose
        # reduced factors are both of full rank, so nothing more is degenerate.
        return SectionNullSpace(p, trivial, 0.0, "exact", p_r, n_rows,
                                seconds=time.perf_counter() - start_time)
    size = min(p_r, n_rows)
    if exact_size_limit is None or size <= exact_size_limit:
        matrix = _primal(reduced, n) if p_r <= n_rows else _dual(reduced, n, o)
        values = _eigenvalues(matrix)
        tau = rounding_tolerance(float(values[0]), p_r, n_rows, dtype)
        rank = int((values > tau).sum())
        return SectionNullSpace(
            p, trivial + p_r - rank, 0.0, "exact", p_r, n_rows, tolerance=tau,
            eigenvalues=values.cpu().numpy(), seconds=time.perf_counter() - start_time)
    generator = torch.Generator().manual_seed(_seed(random_state))
    null, error, tau = _estimate(reduced, n, o, n_rows, dtype, n_probes=n_probes,
                                 n_steps=n_steps, generator=generator)
    # The null space of the reduced matrix is at least max(0, p_r - n o).
    null = min(max(null, p_r - n_rows, 0.0), float(p_r))
    return SectionNullSpace(
        p, trivial + null, error, "estimate", p_r, n_rows, tolerance=tau,
        seconds=time.perf_counter() - start_time, n_probes=n_probes,
        n_steps=min(n_steps, p_r))


def _fixed_reading(block):
    """Whether ``F_x`` is one matrix for every sample (no activation, affine downstream)."""
    return block.derivative is None and not callable(block.downstream)


def _seed(random_state):
    if random_state is None:
        return 0
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**63 - 1))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(2**31 - 1))
    return int(random_state)


# --------------------------------------------------------------------------- inputs


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
