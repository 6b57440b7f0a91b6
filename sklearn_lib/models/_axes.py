"""Which axes of a layer's activation are features: any shape read as (batch, position, feature).

By default a layer's per-sample activation is one feature vector (``sequence=False``,
everything flattened) or ``(position, feature)`` (``sequence=True``). A
:class:`Layer` declares its feature axes instead: a convolution's channels are
features and its height x width are positions; an attention output
``(batch, position, head, head_dim)`` has heads x head dimension as features.
The activation is then read through the view

``value.permute(0, *position_axes, *feature_axes).reshape(batch, P, d)``

and a replacement written back through the inverse reshape and permutation,
both in the one place that reads and replaces activations
(``_model._hook``). So statistics, Jacobian products and edges all see the
same ``(batch, P, d)`` tensor, positions count as samples (SPEC section 2), and
a position selection such as ``"[-1]"`` selects among the ``P`` positions of the
view. Several axes of one kind are flattened in row-major order: row
``(x, p)`` of a ``(batch, C, H, W)`` layer with ``feature_axes=1`` is pixel
``(p // W, p % W)`` of sample ``x``.
"""

from math import prod
from numbers import Integral

__all__ = ["Layer"]


class Layer:
    """A layer of a live model whose declared axes are features; its other axes are positions.

    Pass it wherever a layer name is accepted (:meth:`InteractionGraph.fit_model
    <sklearn_lib.InteractionGraph.fit_model>`, :func:`sklearn_lib.collect.collect`,
    :func:`~sklearn_lib.collect.record_activations`, ...). Its activations are
    read as ``(batch, P, d)``: the feature axes, flattened, give the ``d``
    features and the remaining non-batch axes, flattened in their order, the
    ``P`` positions, which count as samples as in ``sequence=True``. The graph of
    such a layer equals the graph of a model whose module returns the
    ``permute``/``reshape`` of its activation to ``(batch, P, d)``, without
    wrapping modules by hand.

    Parameters
    ----------
    name : str
        The layer name, as a string would give it: a ``model.named_modules()``
        path, optionally suffixed ``":input"``/``":output"`` and a selection of
        positions such as ``"[-1]"`` (which selects among the ``P`` positions of
        the ``(batch, P, d)`` view).
    feature_axes : int or tuple of int
        Axes of the whole activation ``(batch, ...)`` that are features (axis 0
        is the batch and cannot be one; negative axes count from the end).
        ``1`` for the channels of ``(batch, C, H, W)``; ``(2, 3)`` for heads x
        head dimension of ``(batch, position, head, head_dim)``; ``-1`` for the
        last axis of any shape.

    Attributes
    ----------
    name : str
        The layer name.
    feature_axes : tuple of int
        The feature axes, as given.

    See Also
    --------
    sklearn_lib.InteractionGraph.fit_model : Graphs of live models.
    sklearn_lib.collect.collect : Activations and Jacobians in the row layout.

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib import Layer
    >>> from sklearn_lib.collect import record_activations
    >>> conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    >>> images = torch.randn(10, 3, 5, 5)
    >>> acts = record_activations(conv, [Layer("1", feature_axes=1)], images, verbose=False)
    >>> acts["1"].shape  # 25 pixels of 8 channels per image
    (10, 25, 8)
    """

    def __init__(self, name, *, feature_axes):
        if not isinstance(name, str):
            raise TypeError(f"Layer: name must be a string, got {name!r}.")
        axes = (feature_axes,) if isinstance(feature_axes, Integral) else feature_axes
        if not (isinstance(axes, (tuple, list)) and axes
                and all(isinstance(a, Integral) for a in axes)):
            raise TypeError(
                f"Layer {name!r}: feature_axes must be an int or a non-empty tuple of ints, "
                f"got {feature_axes!r}."
            )
        self.name = name
        self.feature_axes = tuple(int(a) for a in axes)

    def __repr__(self):
        return f"Layer({self.name!r}, feature_axes={self.feature_axes!r})"


def _split_axes(spec, feature_axes, shape):
    """(position axes, feature axes) of an activation of ``shape``, non-negative and sorted."""
    ndim = len(shape)
    where = (
        f"layer {spec!r} declares feature_axes={feature_axes} for an activation of shape "
        f"{tuple(shape)}"
    )
    if not all(-ndim <= a < ndim for a in feature_axes):
        raise ValueError(f"{where}: expected axes among 1..{ndim - 1} (or negative ones).")
    features = sorted(a % ndim for a in feature_axes)
    if 0 in features or len(set(features)) != len(features):
        raise ValueError(
            f"{where}: expected distinct axes other than the batch axis 0 (or {-ndim})."
        )
    positions = [a for a in range(1, ndim) if a not in features]
    return positions, features


def to_rows_view(spec, feature_axes, value):
    """``value`` (batch, ...) as (batch, P, d): positions first, then features, each flattened."""
    positions, features = _split_axes(spec, feature_axes, value.shape)
    shape = value.shape
    return value.permute(0, *positions, *features).reshape(
        shape[0], prod(shape[a] for a in positions), prod(shape[a] for a in features)
    )


def from_rows_view(spec, feature_axes, view, shape):
    """The inverse of :func:`to_rows_view` for an activation of ``shape``."""
    positions, features = _split_axes(spec, feature_axes, shape)
    order = [0, *positions, *features]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return view.reshape(shape[0], *(shape[a] for a in order[1:])).permute(*inverse)


def view_axes(spec, feature_axes, fn):
    """``fn`` called on the (batch, P, d) view; a result replaces the activation, mapped back."""
    if feature_axes is None:
        return fn

    def viewed(value):
        new = fn(to_rows_view(spec, feature_axes, value))
        return None if new is None else from_rows_view(spec, feature_axes, new, value.shape)

    return viewed
