"""Degeneracy diagnostics: the three kinds of parameter degeneracy, per layer.

The interaction basis exists to be invariant to degenerate parameters (arXiv
2405.10927). :class:`DegeneracyReport` measures, for every layer of a network,
the three ways that paper finds parameters to be degenerate:

1. linear dependence of the activations (the null space of the Gram matrix),
2. linear dependence of the gradients passed back (the null space of the
   Jacobian second moment ``M'``), and jointly the directions the interaction
   basis drops (``d_l - r_l``),
3. synchronised nonlinearities: neurons of an elementwise activation that are
   switched off (``act'(z) ~ 0``) on exactly the same rows,

and the degenerate directions of each section's parameters (the null space of
their Gauss-Newton matrix on the data), as a table
(:meth:`DegeneracyReport.to_frame`) and a figure (:meth:`DegeneracyReport.plot`);
:class:`LocalLearningCoefficient` estimates the network's local learning
coefficient, singular learning theory's measure of the same degeneracy.
The statistics are those of an :class:`~sklearn_lib.InteractionGraph`, fitted
here or given (:meth:`DegeneracyReport.fit_graph`).
"""

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from ..graph._graph import InteractionGraph
from ..utils._backend import resolve_device, resolve_dtype
from ._counts import (
    layer_spectra,
    record_patterns,
    synchronised_directions,
)
from ._llc import LocalLearningCoefficient
from ._preactivations import array_patterns, check_pattern_inputs
from ._section_nulls import array_null_spaces, model_null_spaces
from ._table import report_frame, report_plot

__all__ = ["DegeneracyReport", "LocalLearningCoefficient"]


class DegeneracyReport(BaseEstimator):
    """Per-layer counts of the three kinds of degeneracy of arXiv 2405.10927.

    For layer ``l`` of width ``d_l`` (rows are samples, or (sample, position)
    pairs of sequence layers):

    * ``activation_null = d_l - rank(G_l)``: linear dependence of the centred
      activations (a constant feature, a duplicated neuron, a dead ReLU).
    * ``gradient_null = d_l - rank(M'_l)``: directions the next layer's
      interaction basis (the output, for the layer before the last) does not
      read, ``M'_l = (1/n) sum_x J_hat_x^T J_hat_x`` with ``J_hat = C_{l+1}^T J_l``
      as in :class:`~sklearn_lib.InteractionGraph`. The final layer is read
      whole (``gradient_null = 0``).
    * ``joint_null = d_l - r_l``: the directions the interaction basis drops,
      ``r_l`` (``effective_dim``) being the directions it keeps.
    * For a layer that is the output of an elementwise activation: ``dead``
      (neurons never on), ``always_on``, and the groups of at least two other
      neurons that are on for exactly the same rows (``sync_groups``, sizes
      ``sync_group_sizes``). A neuron is off on a row where
      ``|act'(z)| <= pattern_tol``; each neuron's binary pattern is hashed, so
      groups are found in one pass without storing the patterns.

    Numerical ranks follow the "auto" truncation of the basis (SPEC section 1,
    :mod:`sklearn_lib.basis._linalg`): a constant feature (one that varies by less
    than the rounding of its mean) is dropped, and eigenvalues of ``G`` count
    above ``eps max(d, sqrt(n)) D_max``; those of ``M'`` above
    ``eps max(d, sqrt(n o)) |M'|_2`` (``n o`` outer products summed), in the
    statistics' precision. ``activation_rank`` is therefore the number of
    directions the basis's first truncation keeps.

    **Degenerate parameter directions.** For the section into layer ``l`` (its
    own ``section_parameters`` ``theta_l``), ``degenerate_parameters`` is the
    dimension of the null space of the Gauss-Newton matrix of the network's
    output with respect to ``theta_l`` on the data,

    ``G_l = sum_x K_x^T K_x``,  ``K_x = d y_x / d theta_l``,

    that is ``p_l - rank`` of the per-sample parameter Jacobians stacked over
    the samples: the directions of the section's parameters along which no
    output moves, to first order, on any sample. The output ``y_x`` is the
    graph's final layer read through its basis ``C_L`` (``final_layer="identity"``:
    all its features, e.g. a classifier's logits; ``"pca"``: its principal
    directions), because degeneracy is a property of the loss landscape: a
    change of layer ``l + 1`` that nothing downstream reads is degenerate, a
    change the output sees is not. For a section ``act(x W + b)`` this is
    ``G_l = sum_x (x~ x~^T) kron (D_x A_x^T A_x D_x)`` with ``x~ = (x, 1)``,
    ``D_x = diag(act'(z_x))`` and ``A_x = C_L^T J_{L-1}(x) ... J_l(x)`` the
    output's Jacobian with respect to layer ``l``, the chain of the adjacent
    Jacobians. ``D_x`` and ``A_x`` vary from sample to sample: a direction ``u``
    of layer ``l`` that the average ``M'_l`` does not read (``gradient_null``)
    does not make ``u v~^T`` degenerate when ``A_x D_x u != 0`` on some samples,
    so the count is not a function of the ranks above (an earlier formula,
    ``(d_{l-1} + 1) d_l - (rank G_{l-1} + 1) rank M'_l``, was wrong for exactly
    that reason). A section's parameters are those of its ``nn.Linear``
    (``act(x W + b)`` or ``act(x) W + b`` inside an ``nn.Sequential``, or a
    Linear followed by an elementwise activation whose output reproduces the
    recorded layer) or both Linears of a block declared with
    :func:`~sklearn_lib.declare_residual_mlp`; other sections (attention,
    convolutions) are missing from the count. From cached arrays (:meth:`fit`,
    :meth:`fit_graph` with ``X`` and ``jacobians``) every section is read as
    ``act(x W + b)`` (``act`` the activation of the layers given
    ``preactivations``, else none; no bias with ``center=False``).

    The count is computed from the data's structure, never from the full
    Jacobian (:mod:`sklearn_lib.degeneracy._parameter_null`): the inputs' null space and the
    output's unread block outputs are removed exactly, then the remaining
    Gauss-Newton matrix (or its dual over the ``n o`` output rows, when
    smaller) is eigendecomposed, with the rank rule of the basis (eigenvalues
    above ``eps max(s, sqrt(t)) lambda_max``). That is exact up to
    ``exact_size_limit`` (6,000: about 40 s on two laptop cores; the shipped
    MLP's ``embed -> mlp.1``, 16,640 after the reductions, took 14 minutes).
    A section read the same way on every sample (an affine map into an affine
    downstream) is exact in closed form at any size. Larger sections get an
    estimate: stochastic Lanczos quadrature on the product with the
    Gauss-Newton matrix, ``n_probes`` Rademacher probes of
    ``n_lanczos_steps`` steps, counting eigenvalues below ``1e-8`` of the largest;
    ``degenerate_parameters_error`` is its stated error (the probes' standard
    error plus the mass below the threshold the steps have not yet excluded,
    a Gauss-Radau bound) and ``degenerate_parameters_method`` says
    ``"exact"`` or ``"estimate"``.

    Directions that need two sections' parameters at once are not in any
    section's count: ``sync_directions = sum_g k_g (k_g - 1) + k_on`` over the
    synchronised groups of layer ``l`` (``k`` neurons with one firing pattern
    can be mixed by any invertible ``k x k`` matrix near the identity, incoming
    weights times ``A`` and outgoing times ``A^-1``: ``k^2`` directions less the
    ``k`` rescalings every ReLU has; each of the ``k_on`` always-on neurons is
    affine on the data, so its bias passes to the next layer's bias). That
    argument needs ``act(z) = act'(z) z`` on every row (ReLU), which is checked;
    for other activations ``sync_directions`` is missing. The whole network's
    null space holds every section's, the synchronised directions and one
    rescaling per live ReLU (tested against brute force on small networks). The
    network-level measure of degeneracy is the local learning coefficient,
    :class:`LocalLearningCoefficient`. Layer 0 has no section into it.

    Parameters
    ----------
    center : bool, default=True
        Centre the activations, as :class:`~sklearn_lib.InteractionGraph` does
        (:meth:`fit_graph` follows the graph's own setting).
    final_layer : {"identity", "pca"}, default="identity"
        Basis of the final layer of the graph fitted by :meth:`fit` and
        :meth:`fit_model` (see :class:`~sklearn_lib.InteractionGraph`).
    pattern_tol : float, default=1e-6
        A neuron is off on a row where ``|act'(z)| <= pattern_tol``. ReLU's
        derivative is exactly 0 or 1; smooth activations (GELU, tanh) need a
        tolerance to be ever "off".
    exact_size_limit : int or None, default=6000
        Largest reduced Gauss-Newton matrix (or dual matrix) whose null space is
        computed exactly; larger sections get an estimate. None: always exact
        (the time grows as the cube of the size).
    n_probes : int, default=8
        Random probes of the estimate (its statistical error falls as
        ``1 / sqrt(n_probes)``).
    n_lanczos_steps : int, default=120
        Lanczos steps per probe of the estimate; more steps resolve smaller
        eigenvalues and shrink the bound on what is not yet resolved.
    random_state : int, RandomState instance or None, default=None
        Seeds the probes; None uses a fixed seed (0), so the estimate is
        reproducible either way.
    batch_size : int, default=None
        Rows (samples for a model) per chunk, as in
        :class:`~sklearn_lib.InteractionGraph`.
    device : {"cpu", "cuda", "auto"} or torch.device, default="cpu"
    dtype : {"float64", "float32"}, default="float64"
    verbose : bool, default=False

    Attributes
    ----------
    graph_ : InteractionGraph
        The fitted graph whose statistics were measured.
    layer_names_ : list of str
    n_features_ : ndarray of int64 of shape (n_layers,)
        ``d_l``.
    activation_rank_, gradient_rank_ : ndarray of int64 of shape (n_layers,)
        Numerical ranks of ``G_l`` and ``M'_l``.
    n_components_ : ndarray of int64 of shape (n_layers,)
        ``r_l``, the directions the graph's bases keep.
    gram_eigenvalues_ : list of ndarray
        Per layer, the spectrum of ``G_l`` (descending; constant features as 0).
    jacobian_eigenvalues_ : list of ndarray or None
        Per layer, the spectrum of ``M'_l``; None for the final layer.
    activation_tolerance_, gradient_tolerance_ : ndarray of shape (n_layers,)
        The eigenvalue thresholds of the two ranks (0 where there is no ``M'``).
    dead_neurons_, always_on_neurons_ : list of (ndarray or None)
        Per layer, indices of the neurons never / always on; None for a layer
        without pre-activations.
    synchronised_groups_ : list of (list of ndarray or None)
        Per layer, the groups of at least two neurons (not dead) with one firing
        pattern, largest first.
    synchronised_directions_ : ndarray of float64 of shape (n_layers,)
        ``sync_l``; NaN without patterns or when ``act(z) != act'(z) z``.
    section_parameters_ : ndarray of float64 of shape (n_layers,)
        ``p_l``: the section's parameters (from arrays ``(d_{l-1} + 1) d_l``, or
        ``d_{l-1} d_l`` for a graph fitted with ``center=False``); NaN for
        layer 0 and for a model's sections whose parameters are not known.
    degenerate_parameters_ : ndarray of float64 of shape (n_layers,)
        The null space of the section's Gauss-Newton matrix, exact (an integer)
        or estimated; NaN for layer 0 and for sections whose parameters are not
        known (see ``parameter_null_spaces_``).
    degenerate_parameters_error_ : ndarray of float64 of shape (n_layers,)
        0 for an exact count, the stated error of an estimate.
    degenerate_parameters_method_ : list of (str or None)
        ``"exact"`` or ``"estimate"`` per layer.
    parameter_null_spaces_ : list
        Per layer the details (a ``SectionNullSpace``: sizes, tolerance,
        spectrum of an exact count, seconds) or, where no count was made, the
        reason as a str; None for layer 0.

    See Also
    --------
    sklearn_lib.InteractionGraph : The bases and statistics measured here.

    Examples
    --------
    A ReLU layer with a dead neuron and two neurons with identical weights:

    >>> import torch
    >>> from sklearn_lib.degeneracy import DegeneracyReport
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 6))
    >>> with torch.no_grad():
    ...     net[0].bias[0] = -100.0           # neuron 0 never fires
    ...     net[0].weight[2] = net[0].weight[1]
    ...     net[0].bias[2] = net[0].bias[1]   # neuron 2 duplicates neuron 1
    >>> report = DegeneracyReport().fit_model(net, [":input", "1", "2"], torch.randn(500, 3))
    >>> report.activation_rank_.tolist(), report.dead_neurons_[1].tolist()
    ([3, 3, 3], [0])
    >>> [g.tolist() for g in report.synchronised_groups_[1]]
    [[1, 2]]
    >>> report.to_frame()[["activation_null", "gradient_null", "dead", "degenerate_parameters"]]
            activation_null  gradient_null  dead  degenerate_parameters
    layer
    :input                0              0  <NA>                   <NA>
    1                     2              0     1                      4
    2                     3              0  <NA>                     12

    The dead neuron's 3 + 1 incoming parameters are degenerate; the duplicated
    pair is two sections' business (``sync_directions``). Into the output, the 2
    dependent hidden directions (dead and duplicated) free their 6 outgoing
    weights each.
    """

    _parameter_constraints: dict = {
        **{
            name: InteractionGraph._parameter_constraints[name]
            for name in ("center", "final_layer", "batch_size", "device", "dtype", "verbose")
        },
        "pattern_tol": [Interval(Real, 0, None, closed="left")],
        "exact_size_limit": [Interval(Integral, 0, None, closed="left"), None],
        "n_probes": [Interval(Integral, 2, None, closed="left")],
        "n_lanczos_steps": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, *, center=True, final_layer="identity", pattern_tol=1e-6,
                 exact_size_limit=6000, n_probes=8, n_lanczos_steps=120, random_state=None,
                 batch_size=None, device="cpu", dtype="float64", verbose=False):
        self.center = center
        self.final_layer = final_layer
        self.pattern_tol = pattern_tol
        self.exact_size_limit = exact_size_limit
        self.n_probes = n_probes
        self.n_lanczos_steps = n_lanczos_steps
        self.random_state = random_state
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    def _graph(self):
        return InteractionGraph(
            center=self.center, final_layer=self.final_layer, batch_size=self.batch_size,
            device=self.device, dtype=self.dtype, verbose=self.verbose,
        )

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, *, jacobians=None, sequence=False, preactivations=None,
            activation=None):
        """Measure cached activations and the Jacobians between adjacent layers.

        Parameters
        ----------
        X : list of arrays of shape (n_rows_l, d_l), or ActivationCache
            Activations of the layers in forward order, as for
            :meth:`InteractionGraph.fit <sklearn_lib.InteractionGraph.fit>`.
        y : None
            Ignored.
        jacobians : list of arrays of shape (n_rows_l, d_{l+1}, d_l)
            ``d X_{l+1} / d X_l`` per row.
        sequence : bool, default=False
            Rows are (sample, position) pairs (see ``InteractionGraph.fit``).
        preactivations : dict of {int or str: array of shape (n_rows_l, d_l)}, default=None
            For layers that are an elementwise activation's output, its inputs
            ``z`` (``X_l = activation(z)``), keyed by layer index or name.
        activation : callable, default=None
            The elementwise activation of those layers (a torch module or
            function of a tensor); None means ReLU.

        Returns
        -------
        self : DegeneracyReport
        """
        check_pattern_inputs(preactivations, activation)
        graph = self._graph().fit(X, jacobians=jacobians, sequence=sequence)
        # The patterns check the pre-activations against the layers first.
        patterns = self._array_patterns(graph, preactivations, activation, X)
        nulls = array_null_spaces(self, graph, X, jacobians, sequence, preactivations,
                                  activation)
        return self._measure(graph, patterns, nulls)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_graph(self, graph, *, preactivations=None, activation=None, X=None,
                  jacobians=None, sequence=False):
        """Measure a fitted :class:`~sklearn_lib.InteractionGraph` (never refitted).

        Parameters
        ----------
        graph : InteractionGraph
            Fitted with ``basis="interaction"`` (a PCA graph has no Jacobians).
        preactivations : dict of {int or str: array of shape (n_rows_l, d_l)}, default=None
            Pre-activations of elementwise layers on the rows the graph was
            fitted on (see :meth:`fit`).
        activation : callable, default=None
            Their activation; None means ReLU.
        X : list of arrays or ActivationCache, default=None
            The activations the graph was fitted on (as for :meth:`fit`). With
            ``jacobians`` they give the degenerate parameter directions; without
            them (a loaded graph keeps only statistics) ``degenerate_parameters``
            is missing.
        jacobians : list of arrays, default=None
            The Jacobians between adjacent layers the graph was fitted on.
        sequence : bool, default=False
            Rows of ``X`` are (sample, position) pairs (see :meth:`fit`).

        Returns
        -------
        self : DegeneracyReport
        """
        if not isinstance(graph, InteractionGraph):
            raise TypeError(f"expected a fitted InteractionGraph, got {type(graph).__name__}.")
        check_is_fitted(graph)
        if graph.basis == "pca":
            raise ValueError(
                "the graph was fitted with basis='pca': its bases hold no Jacobian "
                "statistics, so the gradients' null spaces cannot be measured. Use a graph "
                "fitted with basis='interaction'."
            )
        check_pattern_inputs(preactivations, activation)
        patterns = self._array_patterns(graph, preactivations, activation, X)
        nulls = None
        if X is not None or jacobians is not None:
            nulls = array_null_spaces(self, graph, X, jacobians, sequence, preactivations,
                                      activation)
        return self._measure(graph, patterns, nulls)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_model(self, model, layers, data, *, sequence=False):
        """Measure a torch model on data, like :meth:`InteractionGraph.fit_model
        <sklearn_lib.InteractionGraph.fit_model>`.

        The inputs of recorded layers that are the output of an elementwise
        activation module (``nn.ReLU``, ``nn.GELU``, ...) are hooked in one more
        pass over the data, for the firing patterns.

        Parameters
        ----------
        model : torch.nn.Module
        layers : list of str
            Layer names in forward order (see ``InteractionGraph.fit_model``).
        data : tensor, ndarray or re-iterable of batches
        sequence : bool, default=False

        Returns
        -------
        self : DegeneracyReport
        """
        graph = self._graph().fit_model(model, layers, data, sequence=sequence)
        patterns = record_patterns(
            model, layers, data, sequence=sequence, tol=self.pattern_tol,
            batch_size=self.batch_size, device=resolve_device(self.device),
            dtype=resolve_dtype(self.dtype),
        )
        return self._measure(graph, patterns,
                             model_null_spaces(self, graph, model, layers, data, sequence))

    # ------------------------------------------------------------------ measuring
    def _array_patterns(self, graph, preactivations, activation, X=None):
        return array_patterns(graph, preactivations, activation, X, tol=self.pattern_tol,
                              batch_size=self.batch_size, dtype=resolve_dtype(self.dtype),
                              device=resolve_device(self.device))

    def _measure(self, graph, patterns, nulls=None):
        n_layers = graph.n_layers_
        spectra = [layer_spectra(b) for b in graph.bases_]
        for l, p in patterns.items():
            rows = graph.bases_[l].n_samples_seen_
            if p.n_rows != rows:
                raise ValueError(
                    f"the firing patterns of layer {graph.layer_names_[l]!r} cover {p.n_rows} "
                    f"rows, its statistics {rows}: the data changed between passes."
                )
        d = np.array([b.n_features_in_ for b in graph.bases_], dtype=np.int64)
        dead, on, groups = [None] * n_layers, [None] * n_layers, [None] * n_layers
        sync = np.full(n_layers, np.nan)
        for l, p in patterns.items():
            dead[l], on[l], groups[l] = p.groups()
            if p.piecewise_linear:
                sync[l] = synchronised_directions(groups[l], on[l])
        free, error = np.full(n_layers, np.nan), np.full(n_layers, np.nan)
        section, method = np.full(n_layers, np.nan), [None] * n_layers
        nulls = [None] * n_layers if nulls is None else nulls
        for l in range(1, n_layers):
            # Without a model the section is read as act(x W + b); the graph's
            # centring decides whether a bias is counted, not this report's.
            section[l] = (d[l - 1] + graph.center) * d[l]
            result = nulls[l]
            if isinstance(result, str):  # a model section whose parameters are not known
                section[l] = np.nan
            if result is None or isinstance(result, str):
                continue
            section[l] = result.n_parameters
            free[l], error[l], method[l] = result.degenerate, result.error, result.method
        self.graph_ = graph
        self.layer_names_ = list(graph.layer_names_)
        self.n_features_ = d
        self.activation_rank_ = np.array([s.activation_rank for s in spectra], dtype=np.int64)
        self.gradient_rank_ = np.array([s.gradient_rank for s in spectra], dtype=np.int64)
        self.n_components_ = np.asarray(graph.n_components_, dtype=np.int64).copy()
        self.gram_eigenvalues_ = [s.gram_eigenvalues for s in spectra]
        self.jacobian_eigenvalues_ = [s.jacobian_eigenvalues for s in spectra]
        self.activation_tolerance_ = np.array([s.activation_tolerance for s in spectra])
        self.gradient_tolerance_ = np.array([s.gradient_tolerance for s in spectra])
        self.dead_neurons_, self.always_on_neurons_ = dead, on
        self.synchronised_groups_ = groups
        self.synchronised_directions_ = sync
        self.section_parameters_ = section
        self.degenerate_parameters_ = free
        self.degenerate_parameters_error_ = error
        self.degenerate_parameters_method_ = method
        self.parameter_null_spaces_ = list(nulls)
        return self

    # ------------------------------------------------------------------ results
    def to_frame(self):
        """The per-layer table as a pandas DataFrame (pandas is an optional extra).

        Returns
        -------
        frame : pandas.DataFrame
            One row per layer (index ``layer``), the columns ``n_features``,
            ``activation_rank``, ``activation_null``, ``gradient_rank``,
            ``gradient_null``, ``effective_dim``, ``joint_null``, ``dead``,
            ``always_on``, ``sync_groups``, ``sync_group_sizes``,
            ``sync_directions``, ``section_parameters`` and
            ``degenerate_parameters`` (nullable integers: missing where a layer
            has no pre-activations or no map into it).
        """
        return report_frame(self)

    def plot(self, ax=None):
        """Bars of the null-space dimensions and synchronised neurons per layer.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Where to draw; a new figure's axes when None.

        Returns
        -------
        ax : matplotlib Axes
        """
        return report_plot(self, ax)
