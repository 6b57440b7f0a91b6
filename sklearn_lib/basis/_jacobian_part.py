"""The Jacobian half of a layer's statistics: a Gram matrix in a frame.

:class:`JacobianPart` holds ``Y^T Y`` for ``Y = J F`` (``F`` a whitening frame,
see :mod:`sklearn_lib.basis._stats`), the squared column scales of its rounding
bound and the signed Jacobian sums that orient the basis; it changes frame
exactly and adds parts of one frame with power-of-two scaling.
:class:`~sklearn_lib.basis._stats.InteractionStatistics` owns one.
"""

import torch

from ._factors import (
    _add_scaled,
    _change_frame,
    _frame_change,
    _normalised,
    scale_by_power_of_two,
)

__all__ = ["JacobianPart"]


class JacobianPart:
    """The Jacobian half of the statistics: a Gram matrix in a frame, its bound, signed sums.

    ``gram * 4**exponent = Y^T Y`` for ``Y = J F`` over the samples seen (``F`` is
    ``frame``, None for the identity); ``bound * 4**exponent`` holds the squared
    column scales of the rounding bound (module docstring); ``sums * 2**sums_exponent``
    is ``sum_x w_x J_x^T U``, or ``sums`` is None once a closed-form scatter was
    added. ``frame_weight`` is the activations' weight when the frame was made.
    """

    def __init__(self, d, device, dtype):
        self.frame, self.frame_weight, self.empty = None, 0.0, True
        self.gram = torch.zeros(d, d, device=device, dtype=dtype)
        self.exponent = 0
        self.bound = torch.zeros(d, device=device, dtype=dtype)
        self.sums = torch.zeros(d, 2, device=device, dtype=dtype)
        self.sums_exponent = 0

    def copy(self, device=None):
        new = JacobianPart.__new__(JacobianPart)
        new.__dict__.update(self.__dict__)
        for name in ("gram", "bound", "sums"):
            t = getattr(self, name)
            setattr(new, name, None if t is None else
                    (t.clone() if device is None else t.to(device)))
        if device is not None and self.frame is not None:
            new.frame = self.frame.to(device)
        return new

    def reframe(self, frame, weight):
        """Express the Gram matrix in ``frame`` (exact in exact arithmetic)."""
        if not self.empty and frame is not self.frame:
            T = _frame_change(self.frame, frame, self.gram)
            self.gram, self.exponent, self.bound = _change_frame(
                self.gram, self.exponent, self.bound, T)
        self.frame, self.frame_weight = frame, weight

    def add(self, gram, exponent, bound, sums):
        """Add a Gram matrix of the same frame, its bound and signed sums (None: unknown)."""
        if self.empty:
            self.gram, self.exponent, self.bound = gram, exponent, bound
        else:
            top = max(self.exponent, exponent)
            total = (scale_by_power_of_two(self.gram, 2 * (self.exponent - top))
                     + scale_by_power_of_two(gram, 2 * (exponent - top)))
            b = (scale_by_power_of_two(self.bound, 2 * (self.exponent - top))
                 + scale_by_power_of_two(bound, 2 * (exponent - top)))
            self.gram, self.exponent = _normalised(total, top)
            self.bound = scale_by_power_of_two(b, 2 * (top - self.exponent))
        if sums is None or self.sums is None:
            self.sums = None
        else:
            self.sums, self.sums_exponent = _add_scaled(self.sums, self.sums_exponent, *sums)
        self.empty = False
