"""Edge ablation between two layers, computed one distinct row of the mask at a time.

Output direction ``i`` of layer l+1 depends on row ``i`` of the mask only::

    z_out[:, i] = basis_out.transform(section(basis_in.inverse(z_in * mask[i])))[:, i]

so an ablation is ``r_out`` columns, and a column is determined by ``i`` and the
contents of row ``i``. :class:`_EdgeAblation` keeps the columns it computed over all
samples, keyed by ``(i, row)``, and runs the section only for columns it does not
hold yet; a row shared by several outputs runs once for all of them, and a row
without edges runs on one sample (its input is the constant ``c_in`` for every
sample, and sections act sample by sample). The columns of each call are stacked
into few large section calls, then the outputs come from one forward pass.

This is what makes searches cheap: the top-``k`` mask of ``k`` and of ``k + 1``
differ in one row, so a scan of counts runs the section on one row per count, and
late bisection steps on a few. :class:`_TopEdges` turns counts into masks and
forgets columns that no later count of its search can use.
"""

import numpy as np
import torch
from sklearn.utils.validation import check_array

from ..utils._backend import as_tensor, is_tensor
from ._ablation import (
    _N_PROBE_ROWS,
    _AffineBasis,
    _check_X,
    _first_rows,
    _Network,
    _per_sample,
    _Scorer,
)


class _EdgeAblation:
    """A layer pair (bases, section, forward) on data X, validated once, ablated per mask."""

    def __init__(self, basis_in, basis_out, X, *, section, forward, batch_size):
        if section is None:
            raise TypeError("section must be a callable or a torch.nn.Module, got None.")
        X = _check_X(X)
        self.net = net = _Network(X, forward, section, batch_size)
        sample_in = _first_rows(X, _N_PROBE_ROWS)
        self.basis_in = _AffineBasis(basis_in, sample_in, net.device, "basis_in")
        # A few section outputs tell the width of layer l+1 and probe basis_out there.
        with net.running():
            probe = as_tensor(sample_in, device=net.device, dtype=torch.float64)
            sample_out = net.call("section", probe).cpu().numpy()
        if sample_out.ndim not in (2, 3):
            raise ValueError(
                "section must return activations of shape (n_samples, n_features) or "
                "(n_samples, n_positions, n_features), got "
                f"{sample_out.shape[1:]} per sample."
            )
        self.basis_out = _AffineBasis(basis_out, sample_out, net.device, "basis_out")
        self.shape = (self.basis_out.n_components, self.basis_in.n_components)
        self.out_shape = sample_out.shape[1:]
        # Per sample and stacked row, the section's input and output and the
        # coordinates z_in dominate memory.
        positions = X.shape[1] if X.ndim == 3 else 1
        self.width = max(_per_sample(X), _per_sample(sample_out), positions * self.shape[1])
        self._columns = {}

    def check_matrix(self, matrix, name):
        if is_tensor(matrix):
            matrix = matrix.detach().cpu().numpy()
        matrix = check_array(matrix, dtype=np.float64, input_name=name)
        if matrix.shape != self.shape:
            r_out, r_in = self.shape
            hint = (f"; with constant nodes (constant_node=True) pass "
                    f"edges_[l][:{r_out}, :{r_in}], the directions' edges"
                    if matrix.shape in ((r_out + 1, r_in + 1), (r_out, r_in + 1)) else "")
            raise ValueError(
                f"{name} must have shape (r_out, r_in) = {self.shape} (basis_out's and "
                f"basis_in's n_components), got {matrix.shape}{hint}."
            )
        return matrix

    def reference_outputs(self):
        return self.net.outputs(lambda batch: self.net.call("section", batch), self.width)

    @staticmethod
    def _keys(mask):
        return [(i, row.tobytes()) for i, row in enumerate(mask)]

    def outputs(self, mask):
        """Outputs with input direction j feeding output direction i scaled by mask[i, j]."""
        mask = np.ascontiguousarray(mask, dtype=np.float64)
        keys = self._keys(mask)
        # Rows still to run, each with the outputs that read it.
        todo = {}
        for i, key in keys:
            if (i, key) not in self._columns:
                todo.setdefault(key, (mask[i], []))[1].append(i)
        empty = todo.pop(np.zeros(self.shape[1]).tobytes(), None)
        if empty is not None:
            self._constant_columns(empty[1])
        if todo:
            self._run_rows(list(todo), *zip(*todo.values()))
        z_out = torch.stack([self._columns[key] for key in keys], dim=-1)
        return self.net.forward_rows(z_out, self.basis_out.inverse,
                                     max(_per_sample(z_out), int(np.prod(self.out_shape))))

    def retain(self, masks):
        """Forget every column that none of ``masks`` uses."""
        keep = {key for mask in masks for key in self._keys(np.asarray(mask, dtype=np.float64))}
        self._columns = {key: c for key, c in self._columns.items() if key in keep}

    def _constant_columns(self, outputs):
        """Columns of outputs fed by no edge: the section at ``c_in``, run on one sample."""
        net, r_in = self.net, self.shape[1]
        with net.running():
            c_in = self.basis_in.inverse(torch.zeros(1, *net.X.shape[1:-1], r_in,
                                                     dtype=torch.float64, device=net.device))
            h = net.call("section", c_in)
        z = h @ self.basis_out.A[:, outputs] + self.basis_out.b[outputs]
        key = np.zeros(r_in).tobytes()
        for k, i in enumerate(outputs):
            self._columns[i, key] = z[..., k].expand(net.X.shape[0], *z.shape[1:-1])

    def _run_rows(self, keys, rows, outputs):
        """Columns of the output directions ``outputs[r]`` fed by mask row ``rows[r]``.

        Batches of samples are stacked with a chunk of rows into one section call.
        """
        net, n = self.net, self.net.X.shape[0]
        rows = torch.as_tensor(np.stack(rows), device=net.device)
        # Column o is output direction cols[o], read from row job[o]; starts[r] is
        # the first column of row r.
        sizes = [len(o) for o in outputs]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        job = torch.as_tensor(np.repeat(np.arange(len(rows)), sizes), device=net.device)
        directions = np.concatenate(outputs)
        cols = torch.as_tensor(directions, device=net.device)
        A, b = self.basis_out.A[:, cols], self.basis_out.b[cols]
        z = torch.empty(len(cols), n, *self.out_shape[:-1], dtype=torch.float64,
                        device=net.device)
        batch_size = min(n, net.batch_size_for(self.width))
        # The section sees at most r_out times the samples of a batch, as in the unablated
        # network of r_out outputs, and within the automatic size when that is larger.
        per_call = max(1, min(len(rows), net.batch_size_for(batch_size * self.width)
                              if net.batch_size is None else self.shape[0]))
        with net.running():
            for samples, batch in net.batches(batch_size):
                z_in = self.basis_in.transform(batch)
                for start in range(0, len(rows), per_call):
                    chunk = rows[start:start + per_call]
                    kept = chunk.reshape(len(chunk), *[1] * (z_in.ndim - 1), -1)
                    stacked = self.basis_in.inverse(kept * z_in)
                    h = net.call("section", stacked.reshape(-1, *stacked.shape[2:]))
                    h = h.reshape(len(chunk), batch.shape[0], *self.out_shape)
                    o = slice(starts[start], starts[start + len(chunk)])
                    # z[o, x, t] = h[job[o], x, t] @ A[:, o] + b[o]: one product per column.
                    read = torch.einsum("ox...d,do->ox...", h[job[o] - start], A[:, o])
                    z[o, samples] = read + b[o].reshape(-1, *[1] * (read.ndim - 1))
        for r, key in enumerate(keys):
            for k in range(starts[r], starts[r + 1]):
                self._columns[int(directions[k]), key] = z[k]


class _TopEdges:
    """Scores of keeping the top-k edges by value, against the unablated network."""

    def __init__(self, basis_in, basis_out, X, y, *, section, forward, edges, score,
                 greater_is_better, batch_size):
        self.ablation = _EdgeAblation(basis_in, basis_out, X, section=section,
                                      forward=forward, batch_size=batch_size)
        edges = self.ablation.check_matrix(edges, "edges")
        if edges.min() < 0:
            i, j = np.unravel_index(np.argmin(edges), edges.shape)
            raise ValueError(
                "edges must be non-negative (squared attributions, as in an "
                f"InteractionGraph's edges_), got edges[{i}, {j}] = {edges[i, j]:.6g}; "
                "rank signed values by their magnitude or square instead."
            )
        self.n_edges = edges.size
        # Strongest first; a stable sort breaks ties in row-major order, reproducibly.
        self.order = np.argsort(-edges.ravel(), kind="stable")
        self.scorer = _Scorer(score, y, greater_is_better, self.ablation.net.X.shape[0])
        self.scorer.set_reference(self.ablation.reference_outputs())

    def mask(self, k):
        mask = np.zeros(self.n_edges)
        mask[self.order[:k]] = 1.0
        return mask.reshape(self.ablation.shape)

    def __call__(self, k):
        return self.scorer(self.ablation.outputs(self.mask(k)),
                           f"with only the top {k} of {self.n_edges} edges kept")

    def retain(self, *counts):
        """Keep only the columns of these counts: a search that stays between two counts
        it evaluated can reuse no other (a row of the top-k mask only grows with k)."""
        self.ablation.retain([self.mask(k) for k in counts])
