"""Small networks trained on modular addition, shipped with the package.

The reference comparison of the interaction basis with PCA (SPEC section 5)
uses a network trained to compute ``(a + b) % p`` for ``p = 113``.  This module
provides everything needed to reproduce such a comparison offline:

* :func:`modular_addition_data` - all ``p * p`` ordered pairs, split
  deterministically into train and test sets;
* :class:`ModularAdditionMLP` - a one-hidden-layer ReLU MLP on a shared token
  embedding, with named submodules for forward hooks;
* :func:`load_modular_addition_model` - the trained network shipped as
  ``sklearn_lib/data/modular_addition_p113.npz`` (no pickle; about 150 KB),
  which generalises to the held-out pairs;
* :func:`train_modular_addition` - the training run that produced those
  weights (``examples/train_modular_addition.py`` reruns it), and
  :func:`save_modular_addition_model` to store a model in the same format;
* :class:`ModularAdditionTransformer` - the reference work's one-layer
  transformer (input ``a b =``, 4 heads, ReLU MLP, no LayerNorm), with the
  residual stream hookable by name; :func:`load_modular_addition_transformer`
  loads its trained weights (``modular_addition_transformer_p113.npz``) and
  :func:`train_modular_addition_transformer` is the run that produced them
  (``examples/train_modular_addition_transformer.py``);
* :func:`dominant_frequency` - the dominant Fourier frequency of a function of
  one token, used to label interaction-basis directions with frequencies;
* :func:`train_digits_conv_net` - a small conv net on scikit-learn's 8x8 digits,
  trained in seconds, whose channels can be read as features.

Layer names
-----------
The transformer's node layers are :data:`TRANSFORMER_LAYERS`: the residual
stream ``hook_resid_pre`` (after the embeddings), ``hook_resid_mid`` (after
attention), ``hook_resid_post`` (after the MLP), each ``(n, 3, d_model)``, and
the logits ``unembed``, ``(n, p)``; see :class:`ModularAdditionTransformer`.

The MLP is ``embed`` followed by the ``nn.Sequential`` ``mlp``:

========= ====================== ================================================
name      module                 output
========= ====================== ================================================
``embed`` :class:`PairEmbedding` ``[E[a], E[b]]``, shape ``(n, 2 * d_embed)``
``mlp.0`` ``nn.Linear``          hidden pre-activations, ``(n, d_hidden)``
``mlp.1`` ``nn.ReLU``            hidden activations, ``(n, d_hidden)``
``mlp.2`` ``nn.Linear``          logits, ``(n, p)``
========= ====================== ================================================

so the layers to pass to :func:`sklearn_lib.collect.collect` are
``["embed", "mlp.1", "mlp.2"]`` (:data:`LAYERS`): the section ``embed -> mlp.1``
is exactly ``Linear`` then ``ReLU`` and ``mlp.1 -> mlp.2`` exactly ``Linear``.

The code lives in private modules by responsibility: ``_data`` (the pairs and
their split), ``_mlp`` (the MLP and its training), ``_storage`` (the
``.npz`` format and the shipped files), ``_transformer`` (the transformer and its
training), ``_training`` (the full-batch loop both share) and ``_fourier``
(frequency labels), ``_conv`` (the digits conv net).
"""

from ._conv import train_digits_conv_net
from ._data import modular_addition_data
from ._fourier import dominant_frequency
from ._mlp import LAYERS, ModularAdditionMLP, PairEmbedding, train_modular_addition
from ._storage import (
    load_modular_addition_model,
    load_modular_addition_transformer,
    save_modular_addition_model,
)
from ._transformer import (
    TRANSFORMER_LAYERS,
    Attention,
    ModularAdditionTransformer,
    train_modular_addition_transformer,
)

__all__ = [
    "LAYERS",
    "TRANSFORMER_LAYERS",
    "Attention",
    "ModularAdditionMLP",
    "ModularAdditionTransformer",
    "PairEmbedding",
    "dominant_frequency",
    "load_modular_addition_model",
    "load_modular_addition_transformer",
    "modular_addition_data",
    "save_modular_addition_model",
    "train_digits_conv_net",
    "train_modular_addition",
    "train_modular_addition_transformer",
]

