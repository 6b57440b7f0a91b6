"""TransformerLens bridges of transformers blocks: the closed forms of the blocks they wrap.

TransformerLens' ``TransformerBridge`` keeps each transformers block
(``blocks.<i>._original_component``) but replaces its submodules by bridge
components (``NormalizationBridge``, ``JointQKVAttentionBridge``,
``MLPBridge``, ``LinearBridge``) that hold the original module
(``original_component``) and add hook points. Their ``forward`` re-implements
parts of the computation (the attention from split queries, keys and values), so
no class says what a section computes. :func:`bridge_section` builds the
closed form of the transformers block from the original modules (an unwrapped
copy of the block: the same module objects, each bridge replaced by what it
wraps, :func:`_unwrapped`), matches the bridge's hook points to the ends of its
attention and MLP halves, and leaves the proof to the checks of every batch, as
for sections inferred from values (:mod:`._inferred`): the output, and one
vector-Jacobian product with a random cotangent.
"""

import copy

from torch import nn

from ._attention_detect import _layout, detect_attention_half
from ._block_detect import detect_block

__all__ = ["bridge_section"]

#: The child under which a TransformerLens bridge component holds what it wraps.
_ORIGINAL = "_original_component"


def _original(module):
    """The module a bridge component wraps, or None for any other module."""
    if type(module).__module__.startswith("transformer_lens"):
        wrapped = module._modules.get(_ORIGINAL)
        return wrapped if isinstance(wrapped, nn.Module) else None
    return None


def _unwrapped(module, memo):
    """``module`` with every bridge component below it replaced by what it wraps.

    A shallow copy where something changed (its other state, parameters and
    hooks are the original's objects), the module itself where nothing did.
    ``memo`` maps ``id`` of each original module to what stands for it, so that
    unwrapping a model and then one of its blocks gives the same object.
    """
    module = _original(module) or module
    if id(module) in memo:
        return memo[id(module)]
    children = {name: None if child is None else _unwrapped(child, memo)
                for name, child in module._modules.items()}
    if all(children[name] is child for name, child in module._modules.items()):
        memo[id(module)] = module
        return module
    proxy = copy.copy(module)
    proxy._modules = children
    memo[id(module)] = proxy
    return proxy


def bridge_section(model, a, b):
    """The closed form of section ``a -> b`` of a TransformerLens bridge block, or None.

    Returns ``(structure, claim)`` for the attention half, ``<block>.hook_in``
    (TransformerLens' ``hook_resid_pre``) or the previous block's
    ``hook_out`` to the input hook of the block's
    second norm (``hook_resid_mid``), all positions, and the MLP half, from
    there to ``<block>.hook_out`` (``hook_resid_post``), the same positions on
    both; None otherwise. The structure is what
    :func:`~._attention_detect.detect_attention_half` or
    :func:`~._block_detect.detect_block` finds in the unwrapped transformers
    block, with the bridge's ``original_model`` as the model that holds it. The
    caller checks the output and a vector-Jacobian product on every batch.
    """
    if a.kind != "output" or b.kind != "output" or a.axes is not None or b.axes is not None:
        return None
    named = dict(model.named_modules())
    if b.name.endswith(".hook_out"):  # the MLP half
        block_name = b.name[: -len(".hook_out")]
        original = named.get(f"{block_name}.{_ORIGINAL}")
        if original is None or a.positions != b.positions or _original(
                named[block_name]) is not original:
            return None
        match = detect_block(_unwrapped(original, {}))
        norm = match.input.rpartition(":")[0] if match else None
        if not match or norm is None or (
                a.name != f"{block_name}.{_ORIGINAL}.{norm}.hook_in"):
            return None
        return match.section, (f"is x + mlp(norm(x)) of the transformers block wrapped by "
                               f"the TransformerLens bridge {block_name!r}")
    if a.positions is not None or b.positions is not None:
        return None
    block_name = b.name.partition(f".{_ORIGINAL}.")[0]
    parent, _, index = block_name.rpartition(".")
    # The block's input, or the output of the block before it in the same list.
    previous = f"{parent}.{int(index) - 1}.hook_out" if index.isdigit() and int(index) else None
    if a.name in (f"{block_name}.hook_in", previous) and b.name != block_name:
        original = named.get(f"{block_name}.{_ORIGINAL}")
        if original is None or _original(named[block_name]) is not original:
            return None
        # The transformers model the bridge wraps, unwrapped too: it holds the block (and
        # the rotary embedding of the families that have one).
        memo = {}
        inner = getattr(model, "original_model", None)
        inner = None if inner is None else _unwrapped(inner, memo)
        block = _unwrapped(original, memo)
        layout = _layout(block)
        if layout is None or b.name != f"{block_name}.{_ORIGINAL}.{layout.norm2}.hook_in":
            return None
        match = detect_attention_half(block, inner)
        if match:
            return match.section, (f"is x + attention(norm(x)) of the transformers block "
                                   f"wrapped by the TransformerLens bridge {block_name!r}")
    return None
