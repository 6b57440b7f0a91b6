"""The three kinds of degeneracy of arXiv 2405.10927, per layer (:class:`DegeneracyReport`),
and the local learning coefficient of a network (:class:`LocalLearningCoefficient`).

May import the layers up to :mod:`sklearn_lib.graph`, never
:mod:`~sklearn_lib.evaluation`, :mod:`~sklearn_lib.cluster` or the outer rooms.
"""

from ._llc import LocalLearningCoefficient
from ._report import DegeneracyReport

__all__ = ["DegeneracyReport", "LocalLearningCoefficient"]
