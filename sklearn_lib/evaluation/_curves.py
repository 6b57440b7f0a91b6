"""Ablation curves: how few basis directions, and how few edges, keep a network's behaviour.

A basis is judged by what the network still does when everything outside a few
of its directions (node ablation) or a few of its interactions (edge ablation)
is removed. PCA and :class:`~sklearn_lib.InteractionBasis` are treated alike.

Conventions shared by every function here:

* **Bases** are fitted affine transformers with ``transform`` and
  ``inverse_transform``: an :class:`~sklearn_lib.InteractionBasis`, a PCA, a
  :class:`~sklearn.pipeline.Pipeline` of affine steps. Their maps
  ``transform(x) = x @ A + b`` and ``inverse_transform(z) = z @ P + c`` are read
  off once by probing (as :class:`~sklearn_lib.metrics.InteractionSparsityScorer`
  does) and then applied in float64 torch on the compute device, so every
  ablation is a few matrix products per batch. Coordinates are ordered by
  importance, and "removing" a coordinate sets it to 0, which
  ``inverse_transform`` maps to ``c`` - the mean, for centred bases.
* **The network** after the ablated layer is ``forward`` (and, for edges, the
  ``section`` between the two layers before it). A :class:`torch.nn.Module` is
  called with tensors in its own dtype and on its own device, in eval mode
  (restored afterwards) and without gradients; any other callable receives
  numpy arrays when ``X`` is numpy and float64 tensors on ``X``'s device when
  ``X`` is a tensor. Both must act **sample by sample**: sample ``x`` of the
  output depends on sample ``x`` of the input only, for any number of samples
  (ablations stack several ablated copies of a batch into one call, and edge
  ablation runs a row of the mask without edges on one sample). A
  section bound to one batch of model inputs
  (:func:`~sklearn_lib.collect.section_function` on a residual network) does
  not qualify.
* **Sequence layers**: activations ``X`` may be ``(n_samples, n_positions,
  n_features)``; bases act on the feature axis of every position alike, and
  ``forward`` and ``section`` receive the whole ``(batch, positions, features)``
  block, so a section may mix positions (attention) or pool them (a readout
  returning ``(batch, features)``). Removing an edge ``(i, j)`` removes input
  direction ``j`` at every position from output direction ``i`` at every
  position, the ablation that matches the edges of a section that mixes
  positions (SPEC section 2).
* **Scores**: ``"accuracy"`` (argmax of the outputs against integer labels
  ``y``; higher is better), ``"loss"`` (mean cross-entropy of the outputs as
  logits against ``y``; lower is better), ``"mse"`` (mean squared difference to
  the unablated outputs, no labels needed; lower is better) or a callable
  ``score(outputs, y, reference_outputs) -> float`` on numpy arrays (higher is
  better unless ``greater_is_better=False``). Outputs and scores must be finite:
  NaN or infinite outputs, of the unablated network or after any ablation, raise
  a ``ValueError`` that names the ablation, instead of being scored (the argmax
  of NaN is 0).
* **Results** of the curve functions are tidy: a :class:`pandas.DataFrame` when
  pandas is importable and ``as_frame=True``, else a dict of numpy arrays, with
  columns ``n_directions`` (or ``n_edges``), ``score``, ``reference`` (the score
  of the unablated network, the same on every row) and ``degradation`` (how
  much worse than the reference the score is: ``reference - score`` for scores
  where higher is better, ``score - reference`` otherwise). "Within tolerance"
  everywhere means ``degradation <= tolerance``: an ablation that happens to
  improve the score always qualifies.
"""

from collections import namedtuple

import numpy as np
import torch

from ..utils._backend import to_output
from ._ablation import (
    _N_PROBE_ROWS,
    _AffineBasis,
    _as_frame,
    _check_schedule,
    _check_X,
    _fewest_passing,
    _first_rows,
    _Network,
    _per_sample,
    _result,
    _Scorer,
    _threshold,
)
from ._edge_ablation import _EdgeAblation, _TopEdges

__all__ = [
    "MinEdgesResult",
    "compare_node_ablation",
    "directions_to_keep",
    "edge_ablated_outputs",
    "edge_ablation_curve",
    "min_edges_to_keep",
    "node_ablation_curve",
]

MinEdgesResult = namedtuple("MinEdgesResult", ["n_edges", "score", "reference", "evaluations"])
MinEdgesResult.__doc__ = """Result of :func:`min_edges_to_keep`.

Attributes
----------
n_edges : int
    Fewest top edges whose ablation stays within tolerance.
score : float
    Score with those edges kept.
reference : float
    Score of the unablated network.
evaluations : dict of int to float
    Every edge count the bisection evaluated, with its score, in evaluation order.
"""


# --------------------------------------------------------------------------- nodes
def _node_setup(bases, X, y, forward, schedule, score, greater_is_better, batch_size):
    """Validate everything, then run the unablated network once.

    Returns the network, the scorer (holding the reference) and, per basis
    name, its probed affine map and checked schedule.
    """
    X = _check_X(X)
    net = _Network(X, forward, batch_size=batch_size)
    scorer = _Scorer(score, y, greater_is_better, X.shape[0])
    sample = _first_rows(X, _N_PROBE_ROWS)
    plans = {}
    for name, basis in bases.items():
        affine = _AffineBasis(basis, sample, net.device, name)
        plans[name] = affine, _check_schedule(schedule, affine.n_components, "n_directions")
    scorer.set_reference(net.outputs(lambda batch: batch, _per_sample(X)))
    return net, scorer, plans


def _node_scores(net, scorer, affine, counts):
    """Scores of keeping the top ``k`` directions, for each ``k`` in ``counts``.

    Several counts share a forward call: their ablated copies of a batch are
    stacked, so the rest of the network runs on large blocks of samples.
    """
    width = 2 * _per_sample(net.X)
    n = net.X.shape[0]
    batch_size = min(n, net.batch_size_for(width))
    # forward sees batch_size samples per call when the user chose it, else up to
    # the automatic size.
    per_call = 1 if net.batch_size else max(1, net.batch_size_for(batch_size * width))
    scores = []
    for start in range(0, len(counts), per_call):
        chunk = counts[start:start + per_call]
        keep = torch.as_tensor(np.arange(affine.n_components) < np.reshape(chunk, (-1, 1)),
                               dtype=torch.float64, device=net.device)
        parts = []
        with net.running():
            for _, batch in net.batches(batch_size):
                z = affine.transform(batch)
                stacked = affine.inverse(keep.reshape(len(chunk), *[1] * (z.ndim - 1), -1) * z)
                out = net.call("forward", stacked.reshape(-1, *stacked.shape[2:]))
                parts.append(out.reshape(len(chunk), batch.shape[0], *out.shape[1:]))
        outputs = torch.cat(parts, dim=1)
        scores += [scorer(outputs[c], f"with only the top {k} directions of {affine.name} kept")
                   for c, k in enumerate(chunk)]
    return scores


def node_ablation_curve(
    basis, X, y=None, *, forward, schedule=None, score="accuracy", greater_is_better=None,
    batch_size=None, as_frame=True,
):
    """Score of the network when only the top ``k`` directions of a basis are kept.

    For each ``k`` in ``schedule`` the activations ``X`` are mapped to the basis,
    all coordinates but the first ``k`` are set to 0 (the mean, for centred
    bases), the result is mapped back with ``inverse_transform`` and the rest of
    the network ``forward`` is run on it and scored. Bases order their
    coordinates by importance (Lambda for :class:`~sklearn_lib.InteractionBasis`,
    variance for PCA), so the curve shows how many directions the network needs.

    Parameters
    ----------
    basis : fitted affine transformer
        Has ``transform`` and ``inverse_transform`` (InteractionBasis, PCA, a
        Pipeline of affine steps).
    X : array-like or tensor of shape (n_samples, n_features) or (n_samples, P, n_features)
        Activations of the layer the basis was fitted on (with a position axis
        for a sequence layer, see the module docstring).
    y : array-like of shape (n_samples,), default=None
        Integer class labels; needed for ``"accuracy"`` and ``"loss"``.
    forward : torch.nn.Module or callable
        The rest of the network: activations (n, n_features) -> outputs (n, c)
        (logits, or any outputs for ``"mse"`` and callable scores). See the
        module docstring for how it is called.
    schedule : iterable of int, default=None
        Numbers of directions to keep, each in 1..n_components. None evaluates
        every ``k`` when there are at most 64 components, else 64 log-spaced
        values from 1 to n_components (both included).
    score : {"accuracy", "loss", "mse"} or callable, default="accuracy"
        See the module docstring; a callable is ``score(outputs, y, reference_outputs)``.
    greater_is_better : bool, default=None
        Direction of a callable score (None means True). Named scores know their own.
    batch_size : int, default=None
        Samples per call of ``forward``. None picks a size whose activations hold
        about 2**22 numbers.
    as_frame : bool, default=True
        Return a DataFrame if pandas is importable, else a dict of arrays.

    Returns
    -------
    curve : DataFrame or dict of ndarray
        Columns ``n_directions``, ``score``, ``reference``, ``degradation``,
        one row per ``k`` in ascending order.

    Raises
    ------
    ValueError
        Schedule outside 1..n_components, NaN in X, outputs whose first axis
        does not match the samples, 1-D outputs with ``"accuracy"``/``"loss"``,
        NaN or infinite outputs or scores (the message names the ``k``).
    sklearn.exceptions.NotFittedError
        If the basis is not fitted.

    See Also
    --------
    compare_node_ablation : Curves of several bases in one frame.
    directions_to_keep : Fewest directions within a tolerance.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.decomposition import PCA
    >>> from sklearn_lib.evaluation import node_ablation_curve
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 6))  # rank 3
    >>> W = rng.normal(size=(6, 4))
    >>> y = (X @ W).argmax(1)
    >>> curve = node_ablation_curve(PCA().fit(X), X, y, forward=lambda a: a @ W)
    >>> curve.columns.tolist()
    ['n_directions', 'score', 'reference', 'degradation']
    >>> curve.score.tolist()[2:]  # three directions carry everything
    [1.0, 1.0, 1.0, 1.0]
    """
    net, scorer, plans = _node_setup({"basis": basis}, X, y, forward, schedule, score,
                                     greater_is_better, batch_size)
    affine, counts = plans["basis"]
    scores = _node_scores(net, scorer, affine, counts)
    return _as_frame(_result("n_directions", counts, scores, scorer), as_frame)


def compare_node_ablation(
    bases, X, y=None, *, forward, schedule=None, score="accuracy", greater_is_better=None,
    batch_size=None, as_frame=True,
):
    """Node ablation curves of several bases of the same layer, in one long table.

    The unablated network is run once and shared, so the curves of PCA and an
    interaction basis are directly comparable (and plot on one axis with
    :func:`~sklearn_lib.plotting.plot_ablation_curves`).

    Parameters
    ----------
    bases : dict of str to fitted affine transformer
        Name -> basis, e.g. ``{"PCA": pca, "LIB": interaction_basis}``.
    X, y, forward, schedule, score, greater_is_better, batch_size, as_frame
        As in :func:`node_ablation_curve`; ``schedule`` must be valid for every
        basis (None gives each basis its own default schedule).

    Returns
    -------
    curves : DataFrame or dict of ndarray
        The columns of :func:`node_ablation_curve` after a ``basis`` column
        holding the name, bases in the order of ``bases``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.decomposition import PCA
    >>> from sklearn_lib import InteractionBasis
    >>> from sklearn_lib.evaluation import compare_node_ablation
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(300, 5))
    >>> W = rng.normal(size=(5, 2))
    >>> J = np.broadcast_to(W.T, (300, 2, 5))  # Jacobians of the head X @ W
    >>> lib = InteractionBasis(truncation_threshold=1e-9).fit(X, jacobians=J)
    >>> bases = {"PCA": PCA().fit(X), "LIB": lib}
    >>> curves = compare_node_ablation(bases, X, forward=lambda a: a @ W, score="mse")
    >>> curves.groupby("basis", sort=False).size().to_dict()  # the head sees 2 directions
    {'PCA': 5, 'LIB': 2}
    >>> float(curves.score.iloc[-1]) < 1e-20  # LIB's 2 directions reproduce the outputs
    True
    """
    if not isinstance(bases, dict) or not bases:
        raise ValueError("bases must be a non-empty dict mapping names to fitted bases.")
    net, scorer, plans = _node_setup({f"bases[{name!r}]": basis for name, basis in bases.items()},
                                     X, y, forward, schedule, score, greater_is_better,
                                     batch_size)
    names, counts, scores = [], [], []
    for name, (affine, basis_counts) in zip(bases, plans.values()):
        names += [name] * len(basis_counts)
        counts.append(basis_counts)
        scores += _node_scores(net, scorer, affine, basis_counts)
    data = _result("n_directions", np.concatenate(counts), scores, scorer)
    return _as_frame({"basis": np.asarray(names, dtype=object), **data}, as_frame)


def directions_to_keep(curve, tolerance=0.001, *, relative=False):
    """Fewest directions (or edges) of an ablation curve that stay within tolerance.

    Parameters
    ----------
    curve : DataFrame or dict of ndarray
        A result of :func:`node_ablation_curve` or :func:`edge_ablation_curve`
        (or one basis' rows of :func:`compare_node_ablation`).
    tolerance : float, default=0.001
        Largest allowed ``degradation`` (0.001 is the reference work's 0.1%
        accuracy).
    relative : bool, default=False
        Read ``tolerance`` as a fraction of ``|reference|``.

    Returns
    -------
    k : int or None
        The smallest count on the curve whose score is within tolerance of the
        reference, or None when no count on the curve is.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_lib.evaluation import directions_to_keep
    >>> curve = {"n_directions": np.array([1, 2, 3]), "score": np.array([0.5, 0.95, 1.0]),
    ...          "reference": np.ones(3), "degradation": np.array([0.5, 0.05, 0.0])}
    >>> directions_to_keep(curve, 0.1)
    2
    >>> directions_to_keep(curve, 0.0)
    3
    """
    columns = list(curve.keys())
    count_name = next((c for c in ("n_directions", "n_edges") if c in columns), None)
    if count_name is None or "degradation" not in columns or "reference" not in columns:
        raise ValueError(
            "curve must be a result of node_ablation_curve or edge_ablation_curve (columns "
            f"n_directions or n_edges, score, reference, degradation), got columns {columns}."
        )
    if "basis" in columns and len(set(np.asarray(curve["basis"]))) > 1:
        raise ValueError(
            "curve holds several bases; pass one at a time, e.g. {name: "
            "directions_to_keep(rows, tolerance) for name, rows in curve.groupby('basis')}."
        )
    counts = np.asarray(curve[count_name])
    degradation = np.asarray(curve["degradation"], dtype=np.float64)
    if counts.size == 0:
        raise ValueError("curve is empty.")
    if not np.isfinite(degradation).all():
        raise ValueError(
            f"curve has non-finite degradation at {count_name} "
            f"{counts[~np.isfinite(degradation)].tolist()}; no count can be judged against "
            "a tolerance there."
        )
    threshold = _threshold(tolerance, relative, float(np.asarray(curve["reference"])[0]))
    within = counts[degradation <= threshold]
    return int(within.min()) if within.size else None


# --------------------------------------------------------------------------- edges
def edge_ablated_outputs(basis_in, basis_out, X, mask, *, section, forward, batch_size=None):
    """Network outputs when only the edges selected by ``mask`` between two layers are kept.

    With ``z_in = basis_in.transform(X)``, output direction ``i`` of layer l+1 is
    computed from the input directions ``j`` with ``mask[i, j]`` set::

        z_out[:, i] = basis_out.transform(section(basis_in.inverse_transform(z_in * mask[i])))[:, i]

    and the outputs are ``forward(basis_out.inverse_transform(z_out))``. Rows
    of ``mask`` that are equal run through ``section`` once for all their output
    directions, a row without edges on one sample (its input is ``c`` below for
    every sample), and the ablated copies of a batch for several rows in one
    stacked call. ``z_out`` is held for all samples before ``forward`` runs.

    Keeping every edge gives ``forward(section(X))`` exactly when both bases
    keep all directions (otherwise both layers are projected onto their bases).
    Keeping none gives ``forward(basis_out.inverse_transform(basis_out.transform(
    section(c))))`` for every sample, with ``c = basis_in.inverse_transform(0)``
    (the mean, for a centred basis).

    Parameters
    ----------
    basis_in, basis_out : fitted affine transformers
        Bases of layer l and layer l+1, with ``transform`` and ``inverse_transform``.
    X : array-like or tensor of shape (n_samples, d_l) or (n_samples, P_l, d_l)
        Activations of layer l.
    mask : array-like of shape (r_out, r_in)
        1 for kept edges, 0 for removed ones (other values scale the edge).
    section : torch.nn.Module or callable
        Layer-l activations (n, [P_l,] d_l) -> layer-(l+1) activations
        (n, [P_{l+1},] d_{l+1}), sample by sample; it may mix or pool positions.
    forward : torch.nn.Module or callable
        Layer-(l+1) activations -> network outputs.
    batch_size : int, default=None
        Samples per batch (the section sees at most ``r_out`` times as many
        rows). None picks a size whose stacked activations hold about 2**22
        numbers.

    Returns
    -------
    outputs : ndarray or tensor of shape (n_samples, ...)
        float64; numpy for numpy ``X``, a tensor on the compute device for tensor ``X``.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.decomposition import PCA
    >>> from sklearn_lib.evaluation import edge_ablated_outputs
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(100, 3))
    >>> W = rng.normal(size=(3, 2))
    >>> out = edge_ablated_outputs(PCA().fit(X), PCA().fit(np.tanh(X)), X, np.ones((3, 3)),
    ...                            section=np.tanh, forward=lambda h: h @ W)
    >>> np.allclose(out, np.tanh(X) @ W)  # all edges of full bases: the network itself
    True
    """
    ablation = _EdgeAblation(basis_in, basis_out, X, section=section, forward=forward,
                             batch_size=batch_size)
    return to_output(ablation.outputs(ablation.check_matrix(mask, "mask")), X)


def edge_ablation_curve(
    basis_in, basis_out, X, y=None, *, section, forward, edges, schedule=None,
    score="accuracy", greater_is_better=None, batch_size=None, as_frame=True,
):
    """Score of the network when only the ``k`` strongest edges between two layers are kept.

    For each ``k`` the edges are ranked by value in ``edges`` (ties in row-major
    order) and the top ``k`` are kept (see :func:`edge_ablated_outputs`); the
    reference is the unablated network ``forward(section(X))``.

    Parameters
    ----------
    basis_in, basis_out : fitted affine transformers
        Bases of layer l and layer l+1 (InteractionBasis, PCA, ...).
    X : array-like or tensor of shape (n_samples, d_l) or (n_samples, P_l, d_l)
        Activations of layer l.
    y : array-like of shape (n_samples,), default=None
        Integer class labels; needed for ``"accuracy"`` and ``"loss"``.
    section : torch.nn.Module or callable
        Layer-l activations -> layer-(l+1) activations, sample by sample.
    forward : torch.nn.Module or callable
        Layer-(l+1) activations -> network outputs.
    edges : array-like of shape (r_out, r_in)
        Non-negative ``edges[i, j]`` between input direction ``j`` and output
        direction ``i``, e.g. an ``InteractionGraph``'s ``edges_[l]``.
    schedule : iterable of int, default=None
        Numbers of edges to keep, each in 1..r_out * r_in. None evaluates every
        count when there are at most 64 edges, else 64 log-spaced counts from 1
        to all edges (both included).
    score, greater_is_better, batch_size, as_frame
        As in :func:`node_ablation_curve`; ``batch_size`` as in
        :func:`edge_ablated_outputs`.

    Returns
    -------
    curve : DataFrame or dict of ndarray
        Columns ``n_edges``, ``score``, ``reference``, ``degradation``.

    See Also
    --------
    min_edges_to_keep : Search for the fewest edges within a tolerance.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.decomposition import PCA
    >>> from sklearn_lib.evaluation import edge_ablation_curve
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 3))
    >>> W = rng.normal(size=(3, 2))
    >>> E = np.eye(3)  # say only the diagonal edges matter
    >>> curve = edge_ablation_curve(PCA().fit(X), PCA().fit(np.tanh(X)), X, section=np.tanh,
    ...                             forward=lambda h: h @ W, edges=E, score="mse",
    ...                             schedule=[1, 9])
    >>> curve.n_edges.tolist(), bool(curve.score.iloc[-1] < 1e-20)
    ([1, 9], True)
    """
    top = _TopEdges(basis_in, basis_out, X, y, section=section, forward=forward, edges=edges,
                    score=score, greater_is_better=greater_is_better, batch_size=batch_size)
    counts = _check_schedule(schedule, top.n_edges, "n_edges")
    scores = []
    for k in counts:  # ascending: later counts can reuse only the columns of this one
        scores.append(top(k))
        top.retain(k)
    return _as_frame(_result("n_edges", counts, scores, top.scorer), as_frame)


def min_edges_to_keep(
    basis_in, basis_out, X, y=None, *, section, forward, edges, tolerance=0.001,
    relative=False, score="accuracy", greater_is_better=None, batch_size=None,
):
    """Fewest top edges between two layers whose ablation stays within tolerance.

    Keeping all edges must pass (else ``ValueError``). The search then doubles
    the count from 1 (1, 2, 4, ...) until one passes and bisects between it and
    the last failing count. It reports a count ``k`` that passes while ``k - 1``
    fails; every count it evaluated below ``k`` failed and every one above
    passed (``evaluations`` lists them).

    **Which count, on a non-monotone curve.** When keeping more of the
    strongest edges never hurts, ``k`` is the smallest passing count. Ablation
    curves are not always monotone (a curve may pass at 77 edges, fail at 78
    and 79 and pass again at 80); then ``k`` is the first pass/fail boundary
    the search meets, found in ``O(log k)`` evaluations: a smaller count may
    pass in isolation below a failing one (77 when the search evaluated 78),
    and a count above ``k`` that the search skipped may fail. We report this
    boundary because it costs ``O(log k)`` ablations where the smallest passing
    count needs every count below it, and because doubling from 1 meets the
    lowest boundary among the counts it evaluates. For the smallest passing
    count, score every count up to ``k`` with :func:`edge_ablation_curve`
    (``schedule=range(1, k + 1)``) and :func:`directions_to_keep`: consecutive
    counts differ in one row of the mask, so such a scan runs the section on
    one row per count.

    Each ablation runs the section only for rows of the mask (one output
    direction's kept inputs) that it has not run before; at most ``1 + 2
    ceil(log2(n_edges))`` ablations are evaluated, plus one unablated run.

    Parameters
    ----------
    basis_in, basis_out, X, y, section, forward, edges
        As in :func:`edge_ablation_curve`.
    tolerance : float, default=0.001
        Largest allowed degradation of the score (0.001 is the reference work's
        0.1% accuracy).
    relative : bool, default=False
        Read ``tolerance`` as a fraction of ``|reference|``.
    score, greater_is_better, batch_size
        As in :func:`edge_ablation_curve`.

    Returns
    -------
    result : MinEdgesResult
        ``(n_edges, score, reference, evaluations)``.

    Raises
    ------
    ValueError
        If even keeping all edges is not within tolerance (e.g. truncated bases).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.decomposition import PCA
    >>> from sklearn_lib.evaluation import min_edges_to_keep
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 3))
    >>> W = rng.normal(size=(3, 2))
    >>> y = (X @ W).argmax(1)
    >>> pca = PCA().fit(X)
    >>> result = min_edges_to_keep(pca, pca, X, y, section=lambda x: x,
    ...                            forward=lambda h: h @ W, edges=np.eye(3))
    >>> result.n_edges, result.score  # the identity section needs its 3 diagonal edges
    (3, 1.0)
    """
    top = _TopEdges(basis_in, basis_out, X, y, section=section, forward=forward, edges=edges,
                    score=score, greater_is_better=greater_is_better, batch_size=batch_size)
    scorer = top.scorer
    threshold = _threshold(tolerance, relative, scorer.reference)
    evaluations = {}

    def passes(k):
        evaluations[k] = top(k)
        return scorer.degradation(evaluations[k]) <= threshold

    def result(k):
        return MinEdgesResult(int(k), evaluations[k], scorer.reference, evaluations)

    high = top.n_edges
    if not passes(high):
        raise ValueError(
            f"keeping all {high} edges scores {evaluations[high]:.6g}, already more than "
            f"the tolerance {threshold:.3g} from the unablated {scorer.reference:.6g}; "
            "the bases are probably truncated."
        )
    # Later counts lie between a failing and a passing count evaluated already, and a
    # row of the top-k mask only grows with k: no other count's columns can be reused.
    return result(_fewest_passing(passes, high, top.retain))
