"""Degeneracy-invariant interaction bases, interaction graphs and modules for neural networks."""

from .basis import InteractionBasis
from .cluster import ModularityClustering
from .graph import InteractionGraph
from .pca import PCA

__all__ = ["InteractionBasis", "InteractionGraph", "ModularityClustering", "PCA"]
__version__ = "0.1.0.dev0"
