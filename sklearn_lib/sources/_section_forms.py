"""Which sections of a live model take a closed form, mixed into the model source.

A section's closed form is found from its modules' types and the user's
declarations (:mod:`sklearn_lib.models._fastpath`, ``_attention``,
``_attention_detect``, ``_block_detect``), from a TransformerLens bridge's
wrapped block (``_bridge``), or by the values of the model's own ``forward``
(``_inferred``), in that order, and checked on every batch by
:func:`~._closed_forms.choose_closed_forms`; a readout (a module applied to a
recorded layer in a parent's ``forward``) is recognised by its input's values.
"""

import torch

from ..models import _model
from ..models._attention import CausalAttention, detect_attention, why_not_attention
from ..models._attention_detect import attention_half_section, why_not_attention_half
from ..models._attention_half import NormAttention
from ..models._block_detect import block_section, why_not_block
from ..models._bridge import bridge_section
from ..models._fastpath import (
    detect_section,
    fits_rows,
    readout_section,
    section_leaves,
    why_generic,
)
from ..models._inferred import infer_section
from ..utils._backend import eval_mode
from ._closed_forms import choose_closed_forms, same_values

__all__ = ["SectionForms"]

#: Samples of the first batch a readout is recognised on (batch_size=None).
_VERIFY_SAMPLES = 256


class SectionForms:
    """The closed form of each section, mixed into the model source.

    Uses the source's ``model``, ``specs``, ``sequence``, ``fast_path``,
    ``batch_size``, ``n_layers``, ``_shapes``, ``positions``, ``widths``,
    ``_inference_batch`` and ``_batches``; keeps ``_structures``, ``_leaves``,
    ``_readouts``, why a section takes the products in ``reasons`` and what
    was found by values in ``inferred``.
    """

    def structure(self, l, m):
        """The closed form of section l -> m, or None (generic products).

        Sections are chosen together (every adjacent pair, and every section
        into layer m): their closed forms are found from the modules' types and
        declarations, then checked against the model on every batch, in one
        pass over the data (:func:`~._closed_forms.choose_closed_forms`).
        """
        if self.fast_path is False:
            return None
        if (l, m) not in self._structures:
            pairs = [(l, m), *((i, i + 1) for i in range(self.n_layers - 1)),
                     *((i, m) for i in range(m))]
            pending = [p for p in dict.fromkeys(pairs) if p not in self._structures]
            with eval_mode(self.model):
                self._structures.update(choose_closed_forms(self, pending))
        return self._structures[(l, m)]

    def candidate(self, l, m):
        """The closed form that section l -> m should have, unchecked; or None.

        Records why a section that looks like one cannot take it in
        :attr:`reasons`.
        """
        a, b = self.specs[l], self.specs[m]
        found = detect_attention(self.model, a, b) if self.sequence else None
        if found is None and self.sequence:
            # A transformers block's attention half, recognised from its class.
            found = attention_half_section(self.model, a, b)
        if found is not None:
            return found if found.fits(self._shapes[l], self._shapes[m]) else None
        if self.readout(l, m) is not None:
            found = readout_section(b.module)
            if found is not None and not (self.positions[l] == self.positions[m]
                                          and found.fits(self.widths[l], self.widths[m])):
                found = None
        else:
            # A transformers block's MLP half, recognised from its class, when the
            # module types make no other closed form.
            found = detect_section(self.model, a, b) or block_section(self.model, a, b)
            if found is not None and not self._fits(found, l, m):
                found = None
        if found is None and self.readout(l, m) is None:
            found = self._infer(l, m)
        if found is None:
            reason = why_generic(self.model, a, b) or why_not_block(self.model, a, b) or (
                (why_not_attention(self.model, a, b) or why_not_attention_half(self.model, a, b))
                if self.sequence else None)
            if reason is not None:
                self.reasons[(l, m)] = reason
        return found

    def _infer(self, l, m):
        """The closed form of section l -> m found by its values: a TransformerLens bridge's
        block (:func:`~sklearn_lib.models._bridge.bridge_section`) or a residual section
        of the model's own ``forward`` inferred on the first samples
        (:func:`~sklearn_lib.models._inferred.infer_section`); or None. Either is checked
        by a vector-Jacobian product on every batch (``choose_closed_forms``)."""
        a, b = self.specs[l], self.specs[m]
        inferred = bridge_section(self.model, a, b) or infer_section(
            self.model, a, b, self._inference_batch)
        if inferred is None:
            return None
        found, claim = inferred
        fits = (found.fits(self._shapes[l], self._shapes[m])
                if isinstance(found, (CausalAttention, NormAttention))
                else self._fits(found, l, m))
        if not fits:
            return None
        self.inferred[(l, m)] = claim
        return found

    def leaves(self, l, m):
        """The modules of section l -> m to run from the recorded activation, or None.

        Without them, every product reruns the model from its inputs.
        """
        if (l, m) not in self._leaves:
            readout = self.readout(l, m)
            # A Linear or elementwise module acts on the last axis, so the recorded
            # activation may differ from its input by unit axes ("resid[-1]").
            self._leaves[(l, m)] = (
                section_leaves(self.model, self.specs[l], self.specs[m]) if readout is None
                else [readout.module]
            )
        return self._leaves[(l, m)]

    def readout(self, l, m):
        """The input of layer m's module (a parsed layer) when it is layer l's value; or None.

        A module applied to a recorded layer in a parent's ``forward``, like an
        unembedding ``logits = unembed(resid[:, -1])``, lies in no
        ``nn.Sequential``, so the section is recognised by the values instead:
        layer m is the whole output of an exact ``nn.Linear`` or elementwise
        module without hooks, whose input equals layer l's recorded activation
        on the first batch. Every pass that uses it checks the same again
        (:meth:`_activation`). The section is then that module alone, run from
        the recorded activation, or its closed form. ``fast_path=False`` turns
        this off like every other recognised section: the model then runs whole.
        """
        if self.fast_path is False:
            return None
        if (l, m) not in self._readouts:
            self._readouts[(l, m)] = self._find_readout(self.specs[l], self.specs[m])
        return self._readouts[(l, m)]

    def drop_readout(self, l, m):
        """Section l -> m is no readout after all (:func:`~._closed_forms.choose_closed_forms`)."""
        self._readouts[(l, m)] = None
        self._leaves.pop((l, m), None)

    def _find_readout(self, a, b):
        if (b.kind != "output" or b.positions is not None or a.axes is not None
                or b.axes is not None or readout_section(b.module) is None):
            return None
        module_input = _model._Layer(f"{b.name}:input", b.name, "input", b.module)
        if a.spec == module_input.spec:
            return module_input
        x = next(iter(self._batches(self.batch_size or _VERIFY_SAMPLES)), None)
        if x is None:  # data that ran dry: the pass says so
            return None
        with eval_mode(self.model), torch.no_grad():
            rec = _model._record_batch(self.model, [a, module_input], x)
        return module_input if same_values(rec[a.spec], rec[module_input.spec]) else None

    def _fits(self, st, l, m):
        """The closed form acts on rows: widths and positions must match the recording."""
        return fits_rows(st, self.specs[l], self.specs[m], self._shapes[l], self._shapes[m],
                         self.sequence)
