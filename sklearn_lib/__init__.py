"""Degeneracy-invariant interaction bases, interaction graphs and modules for neural networks."""

from .basis import InteractionBasis

__all__ = ["InteractionBasis"]
__version__ = "0.1.0.dev0"
