"""InteractionGraph: interaction bases of every layer of a network and the edges between them.

SPEC section 2. The bases are fitted backwards from the final layer: layer l's
basis is an :class:`~sklearn_lib.InteractionBasis` fitted on the layer's
activations with the Jacobians of the next layer's basis coordinates
(``J_hat_l = C_{l+1}^T J_l``), accumulated chunk by chunk into
:class:`~sklearn_lib.basis._stats.InteractionStatistics` and turned into a basis by
``InteractionBasis._fit_statistics`` - the one place where basis math happens.

Where the Jacobians come from - a cache, or a live model through vector-Jacobian
products or the closed form of :mod:`sklearn_lib.models._fastpath` - is the job of the
*sources* of :mod:`sklearn_lib.sources._cached` and :mod:`sklearn_lib.sources._model_source`, so the
backward chaining of :func:`sklearn_lib.graph._chain.build` is written once.
"""

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ..basis._basis import InteractionBasis
from ._adjacency import layered_adjacency
from ._array_fit import fit_from_arrays
from ._io import load_graph, save_graph
from ._layers import layer_index, per_position
from ._model_fit import fit_from_model

__all__ = ["InteractionGraph"]


class InteractionGraph(BaseEstimator):
    """Interaction bases of all layers of a network and the edges between them.

    Layers ``0..L`` are fitted backwards from the final layer. Layer ``l`` gets an
    :class:`~sklearn_lib.InteractionBasis` fitted on its activations ``X_l`` with
    the Jacobians ``J_hat_l = C_{l+1}^T J_l`` of the next layer's basis
    coordinates (``variant="local"``) or of the final layer's coordinates
    (``variant="global"``). The edge between direction ``j`` of layer ``l`` and
    direction ``i`` of layer ``l+1`` is the squared gradient-times-activation
    attribution ``E_l[i, j] = (1/n) sum_x (J_tilde_x[i, j] Z_l[x, j])^2`` with
    ``J_tilde_x = C_{l+1}^T J_l(x) C_pinv_l^T`` and ``Z_l = transform_l(X_l)``
    (SPEC section 2); for sequence layers, feature ``j`` is attributed through
    all source positions before squaring. The nodes (basis directions of all
    layers) and edges form an undirected weighted graph, see :meth:`adjacency`.
    Fit from cached activations and adjacent-layer Jacobians (:meth:`fit`, e.g.
    the output of :func:`sklearn_lib.collect.collect` or an
    :class:`~sklearn_lib.cache.ActivationCache`), or from a torch model and data
    (:meth:`fit_model` / :meth:`from_model`) with vectorised vector-Jacobian
    products or closed forms (SPEC section 5, see ``fast_path``), never forming
    full per-sample Jacobians. Read more in the :ref:`User Guide <graph-user-guide>`.

    Parameters
    ----------
    n_components : int, float, list of (int, float or None), or None, default=None
        Largest number of directions per layer, or a share of the interaction
        strength in (0, 1) (as in :class:`InteractionBasis`). One applies to every layer
        that is rotated (all but the final one when ``final_layer="identity"``);
        a list gives one entry per layer (with ``final_layer="identity"`` the
        last must be None). None keeps every direction that survives truncation.
    basis : {"interaction", "pca"}, default="interaction"
        ``"interaction"``: the (local) interaction basis described above.
        ``"pca"``: every layer gets PCA (an InteractionBasis fitted without
        Jacobians) - the baseline graph the reference work compares against;
        only the edges use Jacobians, and ``variant`` and
        ``stochastic_sources`` have no effect.
    final_layer : {"identity", "pca"}, default="identity"
        Basis of the final layer ``L``: ``"identity"`` leaves it unrotated
        (``C_L = I``, no centring; the reference setting for classifier logits),
        ``"pca"`` fits an interaction basis without Jacobians, i.e. PCA.
    variant : {"local", "global"}, default="local"
        ``"local"``: layer ``l`` is fitted with the Jacobians of layer ``l+1``'s
        basis coordinates. ``"global"``: with those of the final layer's
        coordinates (from cached adjacent Jacobians, the per-sample chain
        ``J_{L-1} ... J_l``; from a model, the section ``l -> L``). Edges always
        join adjacent layers.
    center : bool, default=True
        Centre activations before the Gram matrix. With a constant-1 feature in
        every layer and ``center=False`` this is the reference implementation's
        "uncentered" (bias-folded) basis.
    truncation_threshold : "auto" or float, default="auto"
        Eigenvalue threshold of both truncations, see
        :class:`~sklearn_lib.InteractionBasis`.
    batch_size : int, default=None
        Rows per chunk for cached arrays, samples per model batch for array
        data (a ``DataLoader`` keeps its own batches). None sizes every pass so
        that its largest work tensor (Jacobian chunk, products, edge Jacobians)
        holds about 2**23 numbers: memory does not grow with the number of
        samples, and passes that need only activations run in large batches.
    device : {"cpu", "cuda", "auto"} or torch.device, default="cpu"
        Where statistics, products and the model run. Data moves there one
        batch at a time.
    dtype : {"float64", "float32"}, default="float64"
        Precision of the model run, the statistics and the results.
    model_dtype : {"model", "float64", "float32", "bfloat16", "float16"} or None, default=None
        Precision the model runs in (:meth:`fit_model`). None: ``dtype``, in a
        converted copy when the model has another; ``"model"``: its own (a
        bfloat16 model runs in bfloat16, cheaper); a name: a copy in that
        precision. Activations and products are cast to ``dtype`` before any
        sum, so the statistics and edges carry only the rounding of the model's
        own values. Closed forms need the model in ``dtype``: otherwise every
        section takes the model's products (``fast_path=True`` is refused).
    edge_point : {"auto", "reconstructed", "data"}, default="auto"
        Where the edge Jacobian ``J_l`` is evaluated. ``"reconstructed"`` (the
        reference implementation's choice) uses ``inverse_transform(transform(X))``,
        which differs from ``X`` only when directions were truncated; ``"data"``
        uses ``X``. Cached Jacobians exist only at the data point, so :meth:`fit`
        supports ``"data"`` only; ``"auto"`` means ``"reconstructed"`` for a model
        and ``"data"`` for cached Jacobians.
    integration : {"trapezoid", "gauss-legendre"} or None, default=None
        Integrated-gradient edges (model only): ``J_tilde_x`` is replaced by its
        average over the straight path ``alpha * z``, ``alpha`` in [0, 1], from
        the mean (basis coordinates 0) to the edge point, with ``n_alphas``
        trapezoid or Gauss-Legendre nodes. None uses the edge point alone.
    n_alphas : int, default=10
        Number of quadrature nodes of the integration (at least 2 for the
        trapezoid rule, which includes both ends).
    stochastic_sources : int or None, default=None
        If set to ``k``, the cotangents ``C_{l+1}`` of the Jacobian second
        moment ``M'`` are replaced by ``C_{l+1} R / sqrt(k)``, ``R`` a random ±1
        matrix of shape (r_{l+1}, k) drawn from ``random_state``: an unbiased
        estimate of ``M'``, and so of the bases, from ``k`` instead of
        ``r_{l+1}`` vector-Jacobian products per sample (edges use the exact
        ``C_{l+1}``). With ``k >= 2`` the sources give error bars. See
        :ref:`Stochastic sources <graph-stochastic>` in the User Guide.
    stochastic_positions : int or None, default=None
        If set to ``m``, a section whose output layer has ``P > 1`` positions
        (``sequence=True``) takes ``m`` random ±1 combinations of its output
        positions per sample instead of every position, drawn from
        ``random_state``: ``m k`` vector-Jacobian products instead of ``P k``
        (``k`` cotangents). ``M'`` and the edges (the constant node's too) stay
        unbiased, with an error that shrinks as ``1 / m``. It applies to the
        products of live models (:meth:`fit_model`, padded batches included)
        and to the edges of the MLP halves of transformer blocks in closed
        form; the other closed forms, declared attention and cached Jacobians
        (:meth:`fit`) are exact. See :ref:`Stochastic sources
        <graph-stochastic>` in the User Guide.
    fast_path : "auto" or bool, default="auto"
        Use closed forms instead of vector-Jacobian products where a section has
        one: ``nn.Linear`` and/or elementwise activation modules of an
        ``nn.Sequential``, readouts, both halves of ``transformers`` blocks
        (GPT-2, GPT-NeoX, Llama, Mistral, Qwen2) and of TransformerLens
        bridges of them, residual MLP blocks and attention declared with
        :func:`~sklearn_lib.declare_residual_mlp` and
        :func:`~sklearn_lib.declare_attention` or found by their values in
        the model's own ``forward``. ``"auto"`` uses them wherever
        they apply, ``False`` never, ``True`` requires one for every pair of
        adjacent layers (ValueError otherwise); :meth:`fit` ignores it. See
        :ref:`Closed forms <graph-closed-forms>` in the User Guide.
    memory_limit : int, float or str, default=None
        Bytes that a batch of :meth:`fit_model`'s passes may hold (activations,
        vector-Jacobian products and their backward passes), as a number or a
        string such as ``"4GB"`` or ``"512MiB"``; the model, the data and the
        statistics come on top. None sizes batches automatically. See
        :ref:`Memory <graph-memory>` in the User Guide.
    constant_node : bool, default=False
        Give every layer but an unrotated final layer (``final_layer="identity"``)
        one more node, the last of the layer: the constant coordinate of its
        affine coordinates ``(z, 1)``, in which activations are ``x = z @
        inverse_components_ + 1 * mean_`` (the mean path, or with biases folded
        into a constant-1 feature the bias path). The reference work keeps it
        with ``center=True``; set this to compare graphs node for node with its.
        Its edges hold what the directions' attributions leave unexplained of the
        next layer's coordinates. ``n_components_`` and ``bases_`` count
        directions only; ``layer_offsets_`` and ``edges_`` include the constant
        nodes. See :ref:`The constant node <graph-constant-node>` in the User Guide.
    random_state : int, RandomState instance or None, default=None
        Seed of the stochastic sources.
    verbose : bool, default=False
        Show tqdm progress bars over layers and batches.

    Attributes
    ----------
    bases_ : list of InteractionBasis
        One fitted basis per layer. With ``final_layer="identity"`` the last one
        is an InteractionBasis fitted to the identity: ``components_`` and
        ``inverse_components_`` are ``I``, ``mean_`` is 0 (transform is the
        identity), ``interaction_strengths_`` are the mean squared activations of
        the features (the diagonal of ``Z^T Z / n``, in feature order),
        ``jacobian_gram_`` is ``I`` and ``gram_`` / ``gram_eigenvalues_`` describe
        the data as usual. A final layer wider than 2,048 features (a
        vocabulary's logits) is fitted without any ``d x d`` matrix: its
        ``gram_``, ``jacobian_gram_`` and ``gram_eigenvalues_`` are None
        (:ref:`Wide final layers <graph-wide-final>`). Every basis of a graph
        also has ``interaction_strengths_std_`` of shape (r_l,): the standard
        error of ``interaction_strengths_`` due to the random sources of a
        stochastic fit, None for an exact fit and for layers fitted without
        Jacobians, 0 where the section is exact, NaN where a fit cannot
        estimate it. Relative errors over about 10% also bias the strengths:
        take more sources (:ref:`Error bars <graph-error-bars>`).
    edges_ : list of ndarray of shape (r_{l+1}, r_l)
        Edge matrices between adjacent layers (one row and column more for
        constant nodes, see ``constant_node``; ``edges_[l][:r_{l+1}, :r_l]``
        are the directions' edges, e.g. for edge ablation).
    edges_std_ : list of ndarray (shapes of ``edges_``) or None
        Standard errors of ``edges_`` due to the random position combinations
        of ``stochastic_positions``, given the fitted bases (``stochastic_sources``
        adds none): 0 for exact sections and the carried constant, NaN where a
        fit cannot estimate them, None when ``stochastic_positions`` is None.
        Not saved by :meth:`save`. See :ref:`Error bars <graph-error-bars>`.
    layer_offsets_ : ndarray of int64 of shape (n_layers + 1,)
        Cumulative node counts: the nodes of layer ``l`` are
        ``layer_offsets_[l]:layer_offsets_[l + 1]`` of :meth:`adjacency`.
    n_components_ : ndarray of int64 of shape (n_layers,)
        Directions kept per layer ``r_l``.
    n_layers_ : int
        Number of layers ``L + 1``.
    layer_names_ : list of str
        The model's layer names (:meth:`fit_model`), the cache's (an
        ActivationCache given to :meth:`fit`), else ``"0"``, ``"1"``, ...
    n_samples_seen_ : int
        Number of samples (not positions) the graph was fitted on.
    checkpoint_log_ : list of dict
        Only after :meth:`fit_model` with a ``checkpoint``: one entry
        ``{"pass", "layer", "status"}`` per pass over the data, status
        ``"loaded"``, ``"computed"`` or ``"resumed"`` (with ``checkpoint_every``,
        whose ``"shards"`` hold each shard's status); a ``"reason"`` says why a
        pass was recomputed. See :ref:`checkpoints`.
    edge_point_ : {"data", "reconstructed"}
        Where the edge Jacobians were evaluated.
    fast_path_ : list of bool of length n_layers - 1
        Whether the closed form was used for each pair of adjacent layers.

    See Also
    --------
    sklearn_lib.InteractionBasis : The basis of one layer.
    sklearn_lib.collect.collect : Cached activations and Jacobians of a model.
    sklearn_lib.ModularityClustering : Modules of the graph from :meth:`adjacency`.

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.graph import InteractionGraph
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    >>> X = torch.randn(200, 4)
    >>> graph = InteractionGraph.from_model(net, [":input", "1", "2"], X)
    >>> graph.n_components_, graph.fast_path_
    (array([4, 3, 3]), [True, True])
    >>> [E.shape for E in graph.edges_]
    [(3, 4), (3, 3)]
    >>> A = graph.adjacency(norm="sqrt")
    >>> A.shape, bool((A != A.T).nnz == 0)
    ((10, 10), True)
    >>> graph.transform(1, torch.relu(net[0](X))).shape
    torch.Size([200, 3])
    """

    _parameter_constraints: dict = {
        "n_components": [*InteractionBasis._parameter_constraints["n_components"], list, tuple],
        "basis": [StrOptions({"interaction", "pca"})],
        "final_layer": [StrOptions({"identity", "pca"})],
        "variant": [StrOptions({"local", "global"})],
        # The per-layer basis settings are validated exactly as InteractionBasis does.
        **{
            name: InteractionBasis._parameter_constraints[name]
            for name in ("center", "truncation_threshold", "batch_size", "device", "dtype")
        },
        "edge_point": [StrOptions({"auto", "reconstructed", "data"})],
        "integration": [StrOptions({"trapezoid", "gauss-legendre"}), None],
        "n_alphas": [Interval(Integral, 1, None, closed="left")],
        "stochastic_sources": [Interval(Integral, 1, None, closed="left"), None],
        "stochastic_positions": [Interval(Integral, 1, None, closed="left"), None],
        "model_dtype": [StrOptions({"model", "float64", "float32", "bfloat16", "float16"}),
                        None],
        "fast_path": [StrOptions({"auto"}), "boolean"],
        "memory_limit": [Interval(Real, 0, None, closed="neither"), str, None],
        "constant_node": ["boolean"],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_components=None,
        *,
        basis="interaction",
        final_layer="identity",
        variant="local",
        center=True,
        truncation_threshold="auto",
        batch_size=None,
        device="cpu",
        dtype="float64",
        edge_point="auto",
        integration=None,
        n_alphas=10,
        stochastic_sources=None,
        stochastic_positions=None,
        fast_path="auto",
        memory_limit=None,
        constant_node=False,
        random_state=None,
        verbose=False,
        model_dtype=None,
    ):
        self.n_components = n_components
        self.basis = basis
        self.final_layer = final_layer
        self.variant = variant
        self.center = center
        self.truncation_threshold = truncation_threshold
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.edge_point = edge_point
        self.integration = integration
        self.n_alphas = n_alphas
        self.stochastic_sources = stochastic_sources
        self.stochastic_positions = stochastic_positions
        self.fast_path = fast_path
        self.memory_limit = memory_limit
        self.constant_node = constant_node
        self.random_state = random_state
        self.verbose = verbose
        self.model_dtype = model_dtype

    # ------------------------------------------------------------------ fitting
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, *, jacobians=None, sequence=False):
        """Fit from cached activations and the Jacobians between adjacent layers.

        Edge Jacobians are the cached ones, i.e. evaluated at the data point
        (``edge_point="data"``); integrated gradients need a model.

        Parameters
        ----------
        X : list of arrays of shape (n_rows_l, d_l), or ActivationCache
            Activations ``[X_0, ..., X_L]`` of the layers in forward order
            (ndarrays, memmaps, tensors or zarr arrays, read lazily chunk by
            chunk). An :class:`~sklearn_lib.cache.ActivationCache` supplies its
            layers, the Jacobians of adjacent layers and ``sequence`` itself.
            Dask arrays are fitted by Dask reductions (:ref:`dask-fit`).
        y : None
            Ignored.
        jacobians : list of arrays of shape (n_rows_l, d_{l+1}, d_l)
            ``jacobians[l][x] = d X_{l+1}[x] / d X_l[x]``, ``len(X) - 1`` of them.
        sequence : bool, default=False
            Rows are (sample, position) pairs in the row layout of
            :func:`sklearn_lib.collect.collect` with ``sequence=True``: layer ``l``
            has ``P_l`` rows per sample and ``jacobians[l]`` is
            ``(n P_l, P_{l+1} d_{l+1}, d_l)``; ``P_{l+1}`` is read off its shape.

        Returns
        -------
        self : InteractionGraph
            The fitted graph.
        """
        return self._set_fitted(fit_from_arrays(self, X, jacobians, sequence=sequence))

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_model(self, model, layers, data, *, sequence=False, distributed=False,
                  checkpoint=None, checkpoint_every=None):
        """Fit from a torch model, never forming full per-sample Jacobians.

        For each layer, ``C_{l+1}^T J_l`` is computed directly by vectorised
        vector-Jacobian products with the columns of ``C_{l+1}`` as cotangents
        (or in closed form, see ``fast_path``), batch by batch on the model's
        device. The data are read twice per layer plus once for the final layer,
        and must give the same samples on every pass, in any order and batching
        (a pass that differs raises; see :ref:`Data passes <graph-data-passes>`).

        Parameters
        ----------
        model : torch.nn.Module
            The network; never modified (it runs in eval mode, converted to
            ``dtype`` and ``device`` in a copy when needed).
        layers : list of str or Layer
            Layer names in forward order: ``model.named_modules()`` paths,
            optionally suffixed ``":input"`` / ``":output"`` (``":input"`` is the
            model's input) and a selection of positions such as ``"[-1]"``, as
            in :func:`sklearn_lib.collect.collect`; a :class:`~sklearn_lib.Layer`
            declares which axes are features (a conv's channels, heads).
        data : tensor, ndarray, DataFrame or re-iterable of batches (e.g. a DataLoader)
            Model inputs; arrays are split into batches of ``batch_size``. A
            pandas DataFrame is its array of numbers, one row per sample
            (columns that are not numbers are refused).
        sequence : bool, default=False
            Activations are (batch, position, feature) and positions count as
            samples (SPEC section 2).
        distributed : bool or torch.distributed.ProcessGroup, default=False
            ``True`` (the default group) or a process group: ``data`` is this
            rank's shard, every rank calls ``fit_model`` with its own, and every
            rank ends with the graph of all shards together, merged exactly
            (:ref:`distributed-fit`).
        checkpoint : str, os.PathLike or None, default=None
            A directory where every completed pass over the data is saved, and
            from which a rerun (after an interruption, or with other
            ``n_components`` or ``truncation_threshold``) loads the passes that
            still apply, with the same result (see ``checkpoint_log_``). Other
            data or another model are refused; stochastic fits reuse passes
            only with an int ``random_state``. Not with ``distributed``. See
            :ref:`checkpoints`.
        checkpoint_every : int or None, default=None
            With ``checkpoint``: make every pass in shards of this many samples
            and save each shard, so that a fit killed within a pass resumes
            from its last completed shard; the graph equals the unsharded fit
            to rounding. For array data without an ``attention_mask``; None
            makes one piece of each pass.

        Returns
        -------
        self : InteractionGraph
            The fitted graph.
        """
        return self._set_fitted(fit_from_model(
            self, model, layers, data, sequence=sequence,
            distributed=distributed, checkpoint=checkpoint, checkpoint_every=checkpoint_every))

    @classmethod
    def from_model(cls, model, layers, data, *, sequence=False, **params):
        """Construct a graph with ``params`` and :meth:`fit_model` it.

        Parameters
        ----------
        model : torch.nn.Module
        layers : list of str or Layer
        data : tensor, ndarray or re-iterable of batches
        sequence : bool, default=False
        **params
            Constructor parameters of :class:`InteractionGraph`.

        Returns
        -------
        graph : InteractionGraph
            The fitted graph.
        """
        return cls(**params).fit_model(model, layers, data, sequence=sequence)

    def _has_constant_node(self, l, n_layers):
        """Every layer has one with ``constant_node=True``, but an unrotated final layer."""
        return self.constant_node and not (
            l == n_layers - 1 and self.final_layer == "identity")

    def _layer_offsets(self, n_components):
        n_layers = len(n_components)
        nodes = [r + self._has_constant_node(l, n_layers) for l, r in enumerate(n_components)]
        return np.concatenate([[0], np.cumsum(nodes)]).astype(np.int64)

    def _set_fitted(self, result):
        for name, value in result.items():
            setattr(self, name, value)
        return self

    # ------------------------------------------------------------------ using
    def _layer_index(self, layer):
        return layer_index(self, layer)

    def transform(self, layer, X):
        """Basis coordinates ``(X - mean_l) @ C_l`` of activations of one layer.

        Parameters
        ----------
        layer : int or str
            Layer index (negative counts from the end) or name.
        X : array-like or tensor of shape (n_rows, d_layer) or (n_samples, P, d_layer)
            Rows, or the activations of a sequence layer with their position
            axis (every position is transformed alike).

        Returns
        -------
        Z : ndarray or tensor of shape (n_rows, r_layer) or (n_samples, P, r_layer)
            In the layout of ``X``.

        Examples
        --------
        >>> import torch
        >>> from sklearn_lib import InteractionGraph
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
        >>> X = torch.randn(20, 5, 3)  # 20 sequences of 5 positions
        >>> graph = InteractionGraph().fit_model(net, [":input", "1"], X, sequence=True)
        >>> graph.transform(0, X.double()).shape
        torch.Size([20, 5, 3])
        """
        return per_position(self.bases_[self._layer_index(layer)].transform, X)

    def inverse_transform(self, layer, Z):
        """Activations ``Z @ C_pinv_l + mean_l`` from basis coordinates of one layer.

        Parameters
        ----------
        layer : int or str
        Z : array-like or tensor of shape (n_rows, r_layer) or (n_samples, P, r_layer)

        Returns
        -------
        X : ndarray or tensor of shape (n_rows, d_layer) or (n_samples, P, d_layer)
            In the layout of ``Z``.
        """
        return per_position(self.bases_[self._layer_index(layer)].inverse_transform, Z)

    def adjacency(self, norm="identity", eps=None):
        """Symmetric sparse adjacency matrix over the nodes of all layers.

        Block ``(l+1, l)`` (rows ``layer_offsets_[l+1]:...``, columns
        ``layer_offsets_[l]:...``) holds the normalised ``edges_[l]``, block
        ``(l, l+1)`` its transpose; everything else is zero.

        Parameters
        ----------
        norm : {"identity", "sqrt", "log"}, default="identity"
            ``E``, ``sqrt(E)`` or ``max(0, log10(E / eps))`` (see
            :func:`sklearn_lib.cluster.normalize_edges`).
        eps : float, list of float or None, default=None
            Threshold of the log form: one value for all layer pairs or one per
            pair (``n_layers_ - 1``). None picks, per pair, a tenth of the
            smallest positive edge (every edge is kept and the weakest gets
            weight 1). Ignored by the other norms.

        Returns
        -------
        A : scipy.sparse.csr_array of shape (n_nodes, n_nodes)
            ``n_nodes = layer_offsets_[-1]``; explicit zeros are removed.
        """
        check_is_fitted(self)
        return layered_adjacency(self.edges_, self.layer_offsets_, norm, eps)

    # ------------------------------------------------------------------ persistence
    def save(self, path, *, overwrite=False):
        """Save the fitted graph to the directory ``path`` (JSON + .npz, no pickle).

        ``path/graph.json`` holds the parameters and per-layer scalars,
        ``path/arrays.npz`` the basis matrices and edges. The directory is
        written next to ``path`` and renamed into place, so a failed save
        leaves no partial graph behind (:ref:`saved-graphs`).

        Parameters
        ----------
        path : str or os.PathLike
        overwrite : bool, default=False
            Replace an existing graph saved at ``path``. Anything else at
            ``path``, and a symbolic link, is never replaced (pass the link's
            target instead).

        Returns
        -------
        self : InteractionGraph
            The graph, unchanged.
        """
        check_is_fitted(self)
        save_graph(self, path, overwrite=overwrite)
        return self

    @classmethod
    def load(cls, path, *, device=None):
        """Load a graph written by :meth:`save`.

        The bases transform exactly as when saved. Their running statistics are
        not stored, so ``bases_[l].partial_fit`` starts afresh.

        Parameters
        ----------
        path : str or os.PathLike
        device : {"cpu", "cuda", "auto"}, "cuda:<index>", torch.device or None, default=None
            Where the loaded graph and its bases compute. None keeps the device
            the graph was saved with if this machine has it, else the CPU with a
            warning. A device this machine lacks raises.

        Returns
        -------
        graph : InteractionGraph

        Raises
        ------
        FileNotFoundError
            If nothing is at ``path``.
        ValueError
            If ``path`` is not a saved graph, a file of it is damaged or was
            changed after it was saved, or its arrays break an invariant of a
            fitted graph (the message names the file, the invariant and what
            was found; see :ref:`saved-graphs`), or ``device`` is not
            available here.
        """
        return load_graph(cls, path, device=device)

    def set_params(self, **params):
        """Set parameters; a new ``device`` reaches the fitted bases too.

        The fitted bases move along, so ``transform`` runs where the graph's
        ``device`` says (e.g. a graph fitted on a GPU, used on a CPU).

        Parameters
        ----------
        **params : dict
            Estimator parameters.

        Returns
        -------
        self : InteractionGraph
        """
        super().set_params(**params)
        if "device" in params:
            for basis in getattr(self, "bases_", None) or []:
                basis.set_params(device=params["device"])
        return self
