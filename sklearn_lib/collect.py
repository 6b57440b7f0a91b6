"""Collecting activations and Jacobians from torch models (public path of :mod:`sklearn_lib.models`).

The functions live in :mod:`sklearn_lib.models`; this module keeps the
documented ``sklearn_lib.collect`` import path.
"""

from .models import (
    collect,
    prepare_model,
    record_activations,
    section_function,
    section_vjp_products,
    sequence_jacobians_to_rows,
)

__all__ = [
    "collect",
    "prepare_model",
    "record_activations",
    "section_function",
    "section_vjp_products",
    "sequence_jacobians_to_rows",
]
