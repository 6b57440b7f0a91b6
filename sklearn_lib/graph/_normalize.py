"""Edge normalisation of an interaction graph, before clustering or drawing (SPEC section 3).

Edge weights can be normalised as ``"identity"``, ``"sqrt"`` (``sqrt(E)``) or
``"log"`` (``max(0, log10(E / eps))``). All three map 0 to 0, so they act on
the stored entries of sparse matrices only. The public path is
``sklearn_lib.cluster.normalize_edges``.
"""

import numbers

import numpy as np
import scipy.sparse as sp
from sklearn.utils._param_validation import Interval, StrOptions, validate_params
from sklearn.utils.validation import check_array

from ..utils._validation import check_edge_values

NORMS = ("identity", "sqrt", "log")


def normalize_values(values, norm, eps):
    """Apply ``norm`` to a 1-D array of non-negative edge values (a new array)."""
    if norm == "identity":
        return values.copy()
    if norm == "sqrt":
        return np.sqrt(values)
    # Only edges above eps get a positive weight; computing the log on those alone
    # avoids log10(0) warnings for the zeros of a dense matrix. The difference of
    # logs stays finite where the ratio E / eps would overflow (1e300 / 1e-300).
    out = np.zeros_like(values)
    above = values > eps
    out[above] = np.log10(values[above]) - np.log10(eps)
    return out


def _check_log_eps(norm, eps):
    if norm == "log" and eps is None:
        raise ValueError(
            "norm='log' computes max(0, log10(E / eps)) and needs a positive eps; "
            "got eps=None. Pick one per layer with select_log_eps."
        )


@validate_params(
    {
        "E": ["array-like", "sparse matrix"],
        "norm": [StrOptions(set(NORMS))],
        # inf is allowed: select_log_eps returns it for a layer that keeps nothing.
        "eps": [Interval(numbers.Real, 0, np.inf, closed="right"), None],
    },
    prefer_skip_nested_validation=True,
)
def normalize_edges(E, norm="identity", eps=None):
    """Normalise the non-negative edge weights of one edge matrix.

    Parameters
    ----------
    E : array-like or sparse matrix of shape (n_out, n_in)
        Non-negative, finite edge strengths, e.g. ``InteractionGraph.edges_[l]``.
    norm : {"identity", "sqrt", "log"}, default="identity"
        ``"identity"`` returns ``E``; ``"sqrt"`` returns ``sqrt(E)``; ``"log"``
        returns ``max(0, log10(E / eps))``, so edges at or below ``eps`` get
        weight 0 and the dynamic range of the rest is compressed.
    eps : float > 0, default=None
        Threshold of the log form; required when ``norm="log"``, ignored
        otherwise.

    Returns
    -------
    E_norm : ndarray or sparse matrix of the shape of ``E``
        Normalised weights as float64; sparse input gives a CSR sparse array
        with the same sparsity pattern (all three forms map 0 to 0).

    See Also
    --------
    select_log_eps : Pick ``eps`` per layer from an edge ablation.
    ModularityClustering : Cluster the normalised graph.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn_lib.cluster import normalize_edges
    >>> E = np.array([[0.0, 1.0], [100.0, 4.0]])
    >>> normalize_edges(E, "sqrt")
    array([[ 0.,  1.],
           [10.,  2.]])
    >>> normalize_edges(E, "log", eps=1.0)
    array([[0.     , 0.     ],
           [2.     , 0.60206]])
    """
    _check_log_eps(norm, eps)
    if sp.issparse(E):
        E = sp.csr_array(E, dtype=np.float64)
        values = E.data
    else:
        E = check_array(E, dtype=np.float64, input_name="E", ensure_all_finite=True)
        values = E.ravel()
    check_edge_values(values, "E")
    out = normalize_values(values, norm, eps)
    if sp.issparse(E):
        result = sp.csr_array((out, E.indices, E.indptr), shape=E.shape)
        result.eliminate_zeros()
        return result
    return out.reshape(E.shape)
