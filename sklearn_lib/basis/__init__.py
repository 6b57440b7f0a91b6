"""One layer's basis: :class:`InteractionBasis`, :class:`PCA`, pipelines, mergeable statistics.

Holds the linear algebra of SPEC section 1 and its Dask reduction. May import
:mod:`sklearn_lib.utils` and :mod:`sklearn_lib.metrics`.
"""

from ._basis import InteractionBasis
from ._pca import PCA
from ._pipeline import InteractionPipeline, make_interaction_pipeline

__all__ = ["PCA", "InteractionBasis", "InteractionPipeline", "make_interaction_pipeline"]
