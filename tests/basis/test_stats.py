"""Tests for sklearn_lib.basis._stats: mergeable statistics at any magnitude."""

import numpy as np
import pytest
import torch

from sklearn_lib import InteractionBasis
from sklearn_lib.basis._stats import InteractionStatistics, scale_by_power_of_two


def new_stats(d=3, o=2):
    return InteractionStatistics(d, o, center=True, device=torch.device("cpu"),
                                 dtype=torch.float64)


@pytest.mark.parametrize("k", [-2000, -1074, -5, 0, 7, 1023, 2000])
def test_scale_by_power_of_two_is_exact_and_invertible(k):
    x = torch.tensor([1.5, -3.0, 2.0**-20], dtype=torch.float64)
    y = scale_by_power_of_two(x, k)
    # Exact: multiplying by a power of two only changes the exponent while the
    # result stays a normal float; compare with numpy's ldexp, done in one step.
    if -1000 < k < 1000:
        np.testing.assert_array_equal(y.numpy(), np.ldexp(x.numpy(), k))
        np.testing.assert_array_equal(scale_by_power_of_two(y, -k).numpy(), x.numpy())


def log2_entries(matrix, exponent):
    """log2 of |entries| of ``matrix * 4**exponent``, finite even beyond the float range."""
    return np.log2(np.abs(matrix.numpy())) + 2 * exponent


@pytest.mark.parametrize("j_scale", [1e-200, 1e150, 1e200])
def test_squares_beyond_the_float_range_are_accumulated(j_scale):
    rng = np.random.default_rng(0)
    X, J = rng.normal(size=(40, 3)), rng.normal(size=(40, 2, 3))
    gram, jac, e_gram, e_jac = new_stats().update(X, J).scaled_moments()
    s_gram, s_jac, s_e_gram, s_e_jac = new_stats().update(X * 1e200, J * j_scale).scaled_moments()
    # G(c X) = c^2 G(X) and M'(c' J) = c'^2 M'(J), to the rounding of c X and c' J.
    np.testing.assert_allclose(log2_entries(s_gram, s_e_gram),
                               log2_entries(gram, e_gram) + 2 * np.log2(1e200), atol=1e-12)
    np.testing.assert_allclose(log2_entries(s_jac, s_e_jac),
                               log2_entries(jac, e_jac) + 2 * np.log2(j_scale), atol=1e-12)


def test_merging_differently_scaled_halves_equals_the_whole():
    """Chan's update across chunks whose squares differ by 1e400 (SPEC 1(e))."""
    rng = np.random.default_rng(1)
    X, J = rng.normal(size=(60, 3)), rng.normal(size=(60, 2, 3))
    J[30:] *= 1e-200
    X[30:] += 1e250  # the means differ by far more than the spreads
    whole = new_stats().update(X, J)
    halves = new_stats().update(X[:30], J[:30]) + new_stats().update(X[30:], J[30:])
    g_w, j_w, eg_w, ej_w = whole.scaled_moments()
    g_h, j_h, eg_h, ej_h = halves.scaled_moments()
    np.testing.assert_allclose(log2_entries(g_h, eg_h), log2_entries(g_w, eg_w), atol=1e-9)
    np.testing.assert_allclose(log2_entries(j_h, ej_h), log2_entries(j_w, ej_w), atol=1e-9)
    np.testing.assert_allclose(halves.mean.numpy(), whole.mean.numpy(), rtol=1e-15)


def test_non_finite_jacobians_still_refused():
    J = np.ones((4, 2, 3))
    J[1, 0, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        new_stats().update(np.ones((4, 3)), J)


# ------------------------------------------------------------------ square-root statistics
def scatter_of(X, w=None, center=True):
    """``sum_x w_x (x - mu)(x - mu)^T`` in float128 (brute force)."""
    X = X.astype(np.longdouble)
    w = np.ones(len(X), dtype=np.longdouble) if w is None else w.astype(np.longdouble)
    mu = (w @ X) / w.sum() if center else np.zeros(X.shape[1], dtype=np.longdouble)
    Xc = X - mu
    return ((Xc * w[:, None]).T @ Xc).astype(np.float64), mu.astype(np.float64)


def ill_conditioned(seed, n, d, o, cond):
    gen = np.random.default_rng(seed)
    Q1, Q2 = (np.linalg.qr(gen.normal(size=(d, d)))[0] for _ in range(2))
    A = Q1 @ np.diag(np.logspace(0, np.log10(cond), d)) @ Q2
    X = gen.normal(size=(n, d)) @ A + 5.0
    J = gen.normal(size=(n, o, d)) @ np.linalg.inv(A).T
    return X, J


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sizes", [(40,), (1, 1, 38), (13, 0, 27), (3,) * 13 + (1,)])
def test_r_factor_of_chunks_is_the_scatter_of_the_whole(center, weighted, sizes):
    """TSQR with Chan's mean correction: R^T R == sum w (x - mu)(x - mu)^T, any chunking."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 3)) * [1.0, 1e3, 1e-3] + 1e4
    w = rng.integers(0, 4, size=40).astype(float) if weighted else None
    stats = InteractionStatistics(3, None, center=center, device="cpu", dtype=torch.float64)
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        stats.update(X[rows], sample_weight=None if w is None else w[rows])
        start += size
    expected, mu = scatter_of(X, w, center)
    f = stats.factors()
    R = f.factor.numpy() * 2.0**f.factor_exponent
    np.testing.assert_allclose(R.T @ R, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    np.testing.assert_allclose(stats.mean.numpy(), mu, rtol=1e-14)
    assert stats.weight == (40.0 if w is None else w.sum())
    assert np.allclose(np.tril(R, -1), 0)


@pytest.mark.parametrize("n_parts", [2, 5])
def test_merging_parts_with_different_frames_is_exact(n_parts):
    """Statistics squared in different whitening frames merge to those of the whole."""
    X, J = ill_conditioned(3, 600, 5, 3, 1e6)
    bounds = np.linspace(0, 600, n_parts + 1).astype(int)
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        part = new_stats(5, 3).update_activations(X[a:b])
        parts.append(part.update_jacobians(J[a:b]))
    assert len({id(p._jacobians.frame) for p in parts}) == n_parts  # a frame each
    merged = parts[0]
    for part in parts[1:]:
        merged = merged + part
    whole = new_stats(5, 3).update_activations(X).update_jacobians(J)
    P = np.einsum("xoi,xoj->ij", J.astype(np.longdouble), J).astype(np.float64) / 600
    for stats in (merged, whole):
        # M' comes back through the frame: accurate to its rounding bound.
        bound = 100 * np.finfo(float).eps * stats.jacobian_rounding() * 4.0 ** (
            stats.scaled_moments()[3])
        np.testing.assert_allclose(stats.jacobian_gram.numpy(), P, rtol=0, atol=bound)
    # The whitened problem, which is what the basis reads, agrees to eps cond(A).
    L_merged = InteractionBasis()._fit_statistics(merged, name=None).interaction_strengths_
    L_whole = InteractionBasis()._fit_statistics(whole, name=None).interaction_strengths_
    np.testing.assert_allclose(L_merged, L_whole, rtol=1e-8)


def test_signed_sums_are_the_weighted_sums_of_the_jacobians():
    from sklearn_lib.basis._stats import output_weights

    rng = np.random.default_rng(4)
    X, J, w = rng.normal(size=(50, 3)), rng.normal(size=(50, 5, 3)), rng.random(50)
    stats = new_stats(3, 5)
    for rows in (slice(0, 20), slice(20, 50)):
        stats.update(X[rows], J[rows], w[rows])
    f = stats.factors()
    U = output_weights(5).numpy()
    np.testing.assert_allclose(f.signed_sums.numpy() * 2.0**f.sums_exponent,
                               np.einsum("x,xoi,ok->ik", w, J, U), rtol=1e-12)
    np.testing.assert_array_equal(U[:, 0], 1)
    np.testing.assert_array_equal(U[:, 1], [1, -1, 1, -1, 1])


def test_rounding_bound_holds_for_float32_statistics():
    """|Y^T Y (float32) - Y^T Y (exact)| <= c eps b b^T, entry by entry, in the frame."""
    X, J = ill_conditioned(5, 3000, 6, 4, 1e3)
    stats = InteractionStatistics(6, 4, center=True, device="cpu", dtype=torch.float32)
    stats.update_activations(X).update_jacobians(J)
    f = stats.factors()
    assert f.frame is not None
    F = f.frame.matrix().double().numpy()
    Y = J.reshape(-1, 6) @ F
    exact = (Y.astype(np.longdouble).T @ Y).astype(np.float64)
    got = f.jacobian_gram.double().numpy() * 4.0**f.jacobian_exponent
    b = np.sqrt(f.jacobian_bound.double().numpy() * 4.0**f.jacobian_exponent)
    c = max(6, np.sqrt(3000 * 4)) * np.finfo(np.float32).eps
    # F itself is rounded to float32: its own rounding enters as much as the sum's.
    assert (np.abs(got - exact) <= 2 * c * np.outer(b, b)).all()


def test_a_refused_chunk_leaves_the_statistics_unchanged():
    rng = np.random.default_rng(6)
    stats = new_stats(3, 2).update(rng.normal(size=(10, 3)), rng.normal(size=(10, 2, 3)))
    before = (stats.n_samples, stats.weight, stats.mean.clone(), stats.factors().factor.clone())
    J = rng.normal(size=(5, 2, 3))
    J[2, 1, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        stats.update(rng.normal(size=(5, 3)), J)
    assert (stats.n_samples, stats.weight) == before[:2]
    torch.testing.assert_close(stats.mean, before[2], rtol=0, atol=0)
    torch.testing.assert_close(stats.factors().factor, before[3], rtol=0, atol=0)


def test_pickling_folds_the_buffered_rows_in():
    import pickle

    rng = np.random.default_rng(7)
    stats = new_stats(3, 2).update(rng.normal(size=(10, 3)), rng.normal(size=(10, 2, 3)))
    stats.update(rng.normal(size=(2, 3)), rng.normal(size=(2, 2, 3)))
    assert stats._pending  # 2 rows < 4 d, and no new frame: still buffered
    copy = pickle.loads(pickle.dumps(stats))
    torch.testing.assert_close(copy.gram, stats.gram, rtol=1e-14, atol=0)
    torch.testing.assert_close(copy.jacobian_gram, stats.jacobian_gram, rtol=1e-14, atol=0)


_RANK_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import numpy as np, torch, torch.distributed as dist
from test_stats import ill_conditioned
from sklearn_lib import InteractionBasis
from sklearn_lib.basis._stats import InteractionStatistics
from sklearn_lib.sources._distributed import all_reduce_statistics
rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{{port}}", rank=rank,
                        world_size=world)
X, J = ill_conditioned(8, 900, 5, 3, 1e6)
bounds = [0, 100, 450, 900]
stats = InteractionStatistics(5, 3, center=True, device="cpu", dtype=torch.float64)
for start in range(bounds[rank], bounds[rank + 1], 64):  # streamed: frames renewed
    stop = min(start + 64, bounds[rank + 1])
    stats.update(X[start:stop], J[start:stop])
total = all_reduce_statistics(stats, None)
f = total.factors()
basis = InteractionBasis()._fit_statistics(total, name=None)
np.savez(f"{{out}}/rank{{rank}}.npz", R=f.factor.numpy(), e=f.factor_exponent,
         N=f.jacobian_gram.numpy(), mean=f.mean.numpy(), weight=f.weight, n=f.n_samples,
         L=basis.interaction_strengths_, C=basis.components_)
dist.destroy_process_group()
"""


def test_ranks_merge_square_roots_exactly(tmp_path):
    """all_reduce_statistics over 3 gloo ranks: the same statistics on every rank, and the
    basis of the whole data (ill-conditioned, streamed: the ranks' frames all differ)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "rank.py"
    here = Path(__file__).resolve().parent
    script.write_text(_RANK_SCRIPT.format(root=str(here.parents[1]), tests=str(here)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "3", str(port),
                               str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=env)
             for r in range(3)]
    logs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    results = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(3)]
    for other in results[1:]:
        for key in results[0]:
            np.testing.assert_array_equal(other[key], results[0][key])
    X, J = ill_conditioned(8, 900, 5, 3, 1e6)
    scatter, mu = scatter_of(X)
    R = results[0]["R"] * 2.0 ** int(results[0]["e"])
    np.testing.assert_allclose(R.T @ R, scatter, rtol=1e-8, atol=1e-12 * np.abs(scatter).max())
    np.testing.assert_allclose(results[0]["mean"], mu, rtol=1e-14)
    assert float(results[0]["weight"]) == 900 and int(results[0]["n"]) == 900
    whole = InteractionBasis().fit(X, jacobians=J)
    np.testing.assert_allclose(results[0]["L"], whole.interaction_strengths_, rtol=1e-8)
    np.testing.assert_allclose(results[0]["C"], whole.components_, rtol=1e-6,
                               atol=1e-9 * np.abs(whole.components_).max())


@pytest.mark.parametrize("framed", [False, True])
def test_float32_gram_rounds_like_blocks_not_like_one_long_sum(framed):
    """16000 x 8 float32 rows: 3e-6 relative error as one product; blocks keep it near eps."""
    from sklearn_lib.basis._factors import _gram

    gen = np.random.default_rng(9)
    rows = torch.from_numpy((gen.normal(size=(16000, 8)) + 0.5).astype(np.float32))
    F = torch.from_numpy(np.linalg.qr(gen.normal(size=(8, 8)))[0].astype(np.float32))
    Y = rows.double() @ F.double() if framed else rows.double()
    exact = Y.T @ Y
    got = _gram(rows, F if framed else None).double()
    assert float((got - exact).abs().max() / exact.abs().max()) < 4 * np.finfo(np.float32).eps
