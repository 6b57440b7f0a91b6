"""Closed forms for the sections of a live model: found from the types, checked on every batch.

A section's closed form (:mod:`sklearn_lib.models._fastpath`,
:mod:`sklearn_lib.models._attention`, readouts, the MLP halves of transformers
blocks in :mod:`sklearn_lib.models._blocks`) is found from its modules'
types and the user's declarations, which say what the model *should* compute.
Before it is used, :func:`choose_closed_forms` runs the model over the whole
data once, records both ends of every candidate section and compares the
formula with the model's output on every batch: a term that appears only for
some inputs, or only at positions the first batches lack, shows up wherever it
appears. A section whose formula fails anywhere takes the generic
vector-Jacobian products, with a warning naming the batch. The check is one
pass for all sections together, up to the last layer involved; the passes that
then use the closed forms need no check of their own, since every pass must
see the same samples (:class:`~sklearn_lib.sources._passes.PassLog`), samples
are independent and the model deterministic
(:func:`~sklearn_lib.models._independence.check_independent`), and the formulas
act sample by sample.
"""

import warnings
from types import SimpleNamespace

import torch

from ..models import _adapters, _model
from ..models._attention import CausalAttention
from ..models._attention_half import NormAttention
from ..models._fastpath import warn_formula
from ..models._inferred import section_mismatch

__all__ = ["choose_closed_forms", "inferred_mismatch", "same_values"]


def _unit_free(shape):
    return tuple(s for s in shape if s != 1)


def same_values(a, b):
    """Whether two recorded tensors hold the same numbers, up to unit axes of a sample.

    Exact on purpose: a readout's input is the very value of the layer (a copy
    or a view), not a recomputation, so any difference means the module reads
    something else. A layer selected at one position (``"resid[-1]"``, per
    sample ``(1, d)``) is the module's ``(d,)`` input.
    """
    return (a.shape[0] == b.shape[0] and _unit_free(a.shape[1:]) == _unit_free(b.shape[1:])
            and a.dtype == b.dtype and torch.equal(a.reshape(b.shape), b))


def choose_closed_forms(source, pairs):
    """The closed form of each section ``(l, m)`` of ``pairs``, or None: a dict.

    Parameters
    ----------
    source : ModelSource
        The live model's source; ``source.candidate(l, m)`` finds a section's
        closed form from the types, and the check is a pass of the source over
        its data (run in eval mode by the caller).
    pairs : list of (int, int)
        Sections, as pairs of layer indices.
    """
    chosen = {pair: source.candidate(*pair) for pair in pairs}
    candidates = {pair: st for pair, st in chosen.items() if st is not None}
    if not candidates:
        return chosen
    layers = sorted({i for pair in candidates for i in pair})
    # A readout's module must read the layer's very value on every batch, too.
    readouts = {pair: source.readout(*pair) for pair in candidates}
    readouts = {pair: r for pair, r in readouts.items()
                if r is not None and r.spec != source.specs[pair[0]].spec}
    specs = list({layer.spec: layer for layer in [*(source.specs[i] for i in layers),
                                                  *readouts.values()]}.values())
    # The recorded copies of the layers and the formula's output.
    work = 2 * sum(source.positions[i] * source.widths[i] for i in layers)
    failed, start = {}, 0
    for x in source._pass("closed forms", source._footprint(layers[-1], work)):
        with torch.no_grad():
            recorded = _model._record_batch(source.model, specs, x, stop=True)
        values = {i: source.recorded(recorded[source.specs[i].spec], i, x) for i in layers}
        n = _adapters.n_samples(x)
        where = f"the batch of samples {start} to {start + n - 1}"
        for pair, st in candidates.items():
            if pair in failed:
                continue
            readout = readouts.get(pair)
            if readout is not None and not same_values(recorded[source.specs[pair[0]].spec],
                                                       recorded[readout.spec]):
                failed[pair] = (where, None)
                continue
            mismatch = _mismatch(source, st, pair, x, values)
            if mismatch is None and pair in source.inferred:
                act = recorded[source.specs[pair[0]].spec]
                found = inferred_mismatch(source, st, pair, x, act, start)
                if found is not None:
                    failed[pair] = (where, found[1:], "jacobian")
                    continue
            if mismatch is not None:
                failed[pair] = (where, mismatch)
        start += n
        if len(failed) == len(candidates):
            break  # nothing left to check
    for pair, (where, mismatch, *jacobian) in failed.items():
        a, b = (source.specs[i].spec for i in pair)
        if jacobian:
            err, allowed = mismatch
            warnings.warn(
                f"the section {a!r} -> {b!r} {source.inferred[pair]}, but in {where} a "
                f"vector-Jacobian product of the model differs from the formula's by up to "
                f"{err:.3g} (rounding allows {allowed:.3g}): the module's derivatives are not "
                "those of its values (a detach, a custom autograd function). Using generic "
                "vector-Jacobian products for this section instead.",
                UserWarning, stacklevel=5)
            source.reasons[pair] = (f"the model's Jacobian differs from the closed form in "
                                    f"{where} (by up to {err:.3g})")
        elif mismatch is None:
            # Neither the closed form nor the module alone computes this section.
            source.drop_readout(*pair)
            warnings.warn(
                f"the section {a!r} -> {b!r} looked like module {readouts[pair].name!r} "
                f"applied to layer {a!r} (a readout), but in {where} the module's input is "
                "not that layer's value; running the whole model for this section instead.",
                UserWarning, stacklevel=5)
            source.reasons[pair] = f"the module's input is not the layer's value in {where}"
        else:
            # What was found by values says so; the others' types say what they claim.
            claimed = (SimpleNamespace(claim=source.inferred[pair]) if pair in source.inferred
                       else candidates[pair])
            warn_formula(claimed, a, b, where, mismatch, stacklevel=5)
            source.reasons[pair] = (f"the model's output differs from the closed form in "
                                    f"{where} (by up to {mismatch[0]:.3g})")
        chosen[pair] = None
    return chosen


def _mismatch(source, st, pair, x, values):
    """``st.mismatch`` on the recorded values of batch ``x`` where the closed form applies."""
    l, m = pair
    a, b = values[l], values[m]
    if isinstance(st, CausalAttention):
        # A padded batch takes the model's own products (ModelSource.jacobian_stats).
        return None if _adapters.padding_mask(x) is not None else st.mismatch(a, b)
    if isinstance(st, NormAttention):
        # Padded keys are masked like the model masks them; padded rows are not compared.
        return st.mismatch(a, b, _adapters.padding_mask(x))
    # The closed forms act row by row on the real rows only.
    keep = source._real_rows(x, l, a.shape)
    X, Y = source._rows(a, l), source._rows(b, m)
    if keep is not None:
        X, Y = X[keep], Y[keep]
    return st.mismatch(X, Y)


def inferred_mismatch(source, st, pair, x, act_in, seed, values=False):
    """:func:`~sklearn_lib.models._inferred.section_mismatch` of a section found by its
    values, on batch ``x`` at layer l's value ``act_in`` (the model's dtype); None where
    the closed form is not used (a padded batch of a :class:`CausalAttention`)."""
    l, m = pair
    a, b = source.specs[l], source.specs[m]
    key_mask = _adapters.padding_mask(x)
    rows = None
    if isinstance(st, CausalAttention):
        if key_mask is not None:
            return None
        formula = st.forward
    elif isinstance(st, NormAttention):
        # Padded rows are not compared (NormAttention.mismatch): no cotangent there.
        rows = None if key_mask is None else key_mask.bool()

        def formula(act):
            return st.forward(act, key_mask)
    else:
        # A row-wise block: layer m has layer l's shape (ModelSource._fits).
        def formula(act):
            return st.forward(source._rows(act, l)).reshape(act.shape)
    return section_mismatch(source.model, a, b, x, act_in, formula, seed, rows=rows,
                            values=values)
