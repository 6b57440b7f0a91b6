"""Degeneracy-invariant interaction bases, interaction graphs and modules for neural networks."""

from ._attention import declare_attention
from ._axes import Layer
from ._fastpath import declare_residual_mlp
from .basis import InteractionBasis
from .cluster import ModularityClustering
from .degeneracy import DegeneracyReport
from .graph import InteractionGraph
from .pca import PCA
from .pipeline import InteractionPipeline, make_interaction_pipeline

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
