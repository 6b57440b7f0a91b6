"""The Jacobian half of the statistics (``basis._jacobian_part``), split out of ``_stats``."""

import torch

from sklearn_lib.basis._factors import Frame, scale_by_power_of_two
from sklearn_lib.basis._jacobian_part import JacobianPart


def _frame(d, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scale = torch.tensor([1.0, 2.0, 0.5, 4.0][:d], dtype=torch.float64)
    return Frame(scale, Q, torch.linspace(1.0, 1e-3, d, dtype=torch.float64))


def _scatter(part):
    """``sum J^T J`` of a part, its frame undone (independent of the class)."""
    gram = scale_by_power_of_two(part.gram, 2 * part.exponent)
    if part.frame is None:
        return gram
    Finv = part.frame.inverse()
    return Finv.T @ gram @ Finv


def test_parts_of_one_frame_add_across_exponents():
    d = 4
    g = torch.Generator().manual_seed(0)
    Ja, Jb = (torch.randn(30, d, generator=g, dtype=torch.float64) for _ in range(2))
    Jb = Jb * 2.0**-300  # squares 2**-600 below the other: added at a common exponent
    part = JacobianPart(d, "cpu", torch.float64)
    for J, e in ((Ja, 0), (Jb, -300)):
        Js = scale_by_power_of_two(J, -e)
        part.add(Js.T @ Js, e, (Js * Js).sum(0), None)
    expected = Ja.T @ Ja + Jb.T @ Jb
    torch.testing.assert_close(_scatter(part), expected, rtol=1e-13, atol=0)
    assert part.sums is None  # unknown sums stay unknown


def test_reframing_keeps_the_scatter_and_copies_are_independent():
    d = 4
    g = torch.Generator().manual_seed(1)
    J = torch.randn(50, d, generator=g, dtype=torch.float64)
    part = JacobianPart(d, "cpu", torch.float64)
    part.add(J.T @ J, 0, (J * J).sum(0), (J.sum(0)[:, None].repeat(1, 2), 0))
    copy = part.copy()
    part.reframe(_frame(d, 2), 50.0)
    part.reframe(_frame(d, 3), 50.0)
    torch.testing.assert_close(_scatter(part), J.T @ J, rtol=1e-10, atol=1e-10)
    # The copy kept its own tensors and frame.
    assert copy.frame is None
    torch.testing.assert_close(copy.gram, J.T @ J, rtol=1e-14, atol=0)


def _stats_of(X, J):
    from sklearn_lib.basis._stats import InteractionStatistics

    stats = InteractionStatistics(X.shape[1], J.shape[1], center=True, device="cpu",
                                  dtype=torch.float64)
    return stats.update_activations(X).update_jacobians(J)


def test_mixed_jacobian_scatters_are_the_weighted_sum_over_the_same_samples():
    """Groups of random sources: one activation half, the scatters mixed by share."""
    import pytest

    g = torch.Generator().manual_seed(4)
    # Badly scaled activations: every part squares in a whitening frame.
    X = torch.randn(40, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1e-4, 1e3],
                                                                            dtype=torch.float64)
    Js = [torch.randn(40, 2, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    parts = [_stats_of(X, J) for J in Js]
    shares = [0.5, 0.25, 0.25]
    mixed = parts[0].mix_jacobians_(parts[1:], shares)
    expected = sum(s * torch.einsum("xoi,xoj->ij", J, J) for s, J in zip(shares, Js)) / 40
    torch.testing.assert_close(mixed.jacobian_gram, expected, rtol=1e-10, atol=0)
    assert mixed.n_outputs == 6 and mixed.n_samples == 40
    torch.testing.assert_close(mixed.gram, _stats_of(X, Js[0]).gram, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="same samples"):
        parts[1].mix_jacobians_([_stats_of(X[:30], Js[2][:30])], [0.5, 0.5])
