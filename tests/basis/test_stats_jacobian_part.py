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
    torch.testing.assert_close(copy.gram, J.T @ J, rtol=0, atol=0)
