"""Every section's degenerate parameter directions, for a :class:`~sklearn_lib.DegeneracyReport`.

From cached arrays, a section is read as ``act(x W + b)`` (the pre-activations,
where given, supply ``act'``); from a live model, the sections it recognises
(``Linear`` + activation, residual MLP blocks) or a verified dense section.
Either way :func:`~._sections.null_spaces` does the math, with the report's
settings.
"""

import numpy as np
import torch

from ..utils._backend import resolve_device, resolve_dtype
from ._sections import (
    blocks_for_structure,
    dense_sections,
    derivative_of,
    null_spaces,
    verified_dense_section,
)

__all__ = ["array_null_spaces", "model_null_spaces"]


def _options(report):
    return {"exact_size_limit": report.exact_size_limit, "n_probes": report.n_probes,
            "n_steps": report.n_lanczos_steps, "random_state": report.random_state}


def array_null_spaces(report, graph, X, jacobians, sequence, preactivations, activation):
    """Null spaces of every section read as ``act(x W + b)`` from cached arrays."""
    from ..cache import ActivationCache
    from ..sources._cached import CachedSource

    if isinstance(X, ActivationCache):
        names = X.layers
        jacobians = [X.jacobians(a, b) for a, b in zip(names[:-1], names[1:])]
        sequence = sequence or any(r > 1 for r in X.rows_per_sample.values())
        X = [X.activations(name) for name in names]
    device, dtype = resolve_device(report.device), resolve_dtype(report.dtype)
    source = CachedSource(X, jacobians, sequence=sequence, batch_size=report.batch_size,
                          device=device, dtype=dtype, verbose=False)
    if source.n_samples != graph.n_samples_seen_ or source.n_layers != graph.n_layers_:
        raise ValueError(
            f"X and jacobians hold {source.n_layers} layers of {source.n_samples} samples; "
            f"the graph was fitted on {graph.n_layers_} layers of "
            f"{graph.n_samples_seen_}: pass the arrays the graph was fitted on."
        )
    derivatives = {}
    if preactivations is not None:
        act = torch.relu if activation is None else activation
        for key, z in preactivations.items():
            l = graph._layer_index(key)
            derivatives[l] = derivative_of(act, torch.as_tensor(
                np.asarray(z) if not isinstance(z, torch.Tensor) else z).to(
                    device=device, dtype=dtype))
    return null_spaces(source.acts, source.jacs, source.positions,
                       graph.bases_[-1].components_, dense_sections(graph.center, derivatives),
                       device=device, dtype=dtype, options=_options(report))


def model_null_spaces(report, graph, model, layers, data, sequence):
    """Null spaces of the model's recognised sections (Linear + activation, residual MLP)."""
    from ..models._collect import collect
    from ..sources._cached import CachedSource
    from ..sources._model_source import ModelSource

    device, dtype = resolve_device(report.device), resolve_dtype(report.dtype)
    acts, jacs = collect(model, layers, data, batch_size=report.batch_size or 256,
                         device=device, dtype=report.dtype, verbose=False, sequence=sequence)
    source = CachedSource(acts, jacs, sequence=sequence, batch_size=report.batch_size,
                          device=device, dtype=dtype, verbose=False)
    sections = ModelSource(model, layers, data, sequence=sequence,
                           batch_size=report.batch_size, device=device, dtype=report.dtype,
                           fast_path="auto", verbose=False)

    def blocks(l, inputs, downstream):
        structure = sections.structure(l - 1, l)
        if structure is None:
            structure = verified_dense_section(
                sections.model, sections.specs[l], inputs,
                torch.as_tensor(np.asarray(source.acts[l])).to(device=device, dtype=dtype))
        return blocks_for_structure(structure, inputs, downstream)

    return null_spaces(source.acts, source.jacs, source.positions,
                       graph.bases_[-1].components_, blocks, device=device, dtype=dtype,
                       options=_options(report))
