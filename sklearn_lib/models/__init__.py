"""Running live torch models: layer names and positions, hooks, VJPs, closed forms, adapters.

:func:`collect` records activations and Jacobians (into an
:class:`~sklearn_lib.cache.ActivationCache` if asked). May import the layers
below it: :mod:`~sklearn_lib.utils`, :mod:`~sklearn_lib.metrics`,
:mod:`~sklearn_lib.basis` and :mod:`~sklearn_lib.cache`.
"""

from ._attention import declare_attention
from ._axes import Layer
from ._collect import (
    collect,
    prepare_model,
    record_activations,
    section_function,
    section_vjp_products,
    sequence_jacobians_to_rows,
)
from ._fastpath import declare_residual_mlp

__all__ = [
    "Layer",
    "collect",
    "declare_attention",
    "declare_residual_mlp",
    "prepare_model",
    "record_activations",
    "section_function",
    "section_vjp_products",
    "sequence_jacobians_to_rows",
]
