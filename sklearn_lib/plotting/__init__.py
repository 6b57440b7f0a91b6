"""Figures: spectra, ablation curves, edge matrices and the layered graph (matplotlib, optional).

An outer room: may import any inner layer, and nothing imports it but the demo.
"""

from ._plots import (
    plot_ablation_curves,
    plot_edges,
    plot_interaction_graph,
    plot_layer_spectra,
    plot_spectrum,
)

__all__ = [
    "plot_ablation_curves",
    "plot_edges",
    "plot_interaction_graph",
    "plot_layer_spectra",
    "plot_spectrum",
]
