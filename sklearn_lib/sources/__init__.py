"""Where a graph's statistics and edges come from: cached arrays, a live model, Dask, torch.distributed.

Every source answers the same questions per layer (statistics, edges) for the
backward chain of :mod:`sklearn_lib.graph`. May import :mod:`~sklearn_lib.utils`,
:mod:`~sklearn_lib.metrics`, :mod:`~sklearn_lib.basis`, :mod:`~sklearn_lib.cache`
and :mod:`~sklearn_lib.models`.
"""
