"""On-disk activations and Jacobians: :class:`ActivationCache`, its verified chunk store and reads.

May import :mod:`sklearn_lib.utils`, :mod:`sklearn_lib.metrics` and :mod:`sklearn_lib.basis`.
"""

from ._cache import ActivationCache

__all__ = ["ActivationCache"]
