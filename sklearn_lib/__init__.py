"""Degeneracy-invariant interaction bases, interaction graphs and modules for neural networks.

The package is laid out along the data path, one subpackage per stage, and
imports flow one way (inner to outer): :mod:`~sklearn_lib.utils`,
:mod:`~sklearn_lib.metrics`, :mod:`~sklearn_lib.basis`, :mod:`~sklearn_lib.cache`,
:mod:`~sklearn_lib.models`, :mod:`~sklearn_lib.sources`, :mod:`~sklearn_lib.graph`,
then :mod:`~sklearn_lib.evaluation`, :mod:`~sklearn_lib.cluster` and
:mod:`~sklearn_lib.degeneracy`, then :mod:`~sklearn_lib.plotting`,
:mod:`~sklearn_lib.export`, :mod:`~sklearn_lib.datasets` and :mod:`~sklearn_lib.demo`
(import-linter's contracts in ``pyproject.toml`` hold this in CI).
"""

from .basis import PCA, InteractionBasis, InteractionPipeline, make_interaction_pipeline
from .cluster import ModularityClustering
from .degeneracy import DegeneracyReport
from .graph import InteractionGraph
from .models import Layer, declare_attention, declare_residual_mlp

__all__ = [
    "DegeneracyReport",
    "InteractionBasis",
    "InteractionGraph",
    "InteractionPipeline",
    "Layer",
    "ModularityClustering",
    "PCA",
    "declare_attention",
    "declare_residual_mlp",
    "make_interaction_pipeline",
]
__version__ = "0.1.0.dev0"
