"""Recognition of the transformers blocks whose attention half has a closed form.

:func:`detect_attention_half` reads a block's class, submodules and config and
returns the :class:`~sklearn_lib.models._attention_half.NormAttention` its
attention half computes, ``x + attention(norm(x))`` from the block's input to
the input of its second norm, or the reason why not;
:func:`attention_half_section` matches it to a pair of layers of the interaction
graph. As in :mod:`._block_detect`, nothing here imports transformers: its
classes are looked up in ``sys.modules``.

What the classes cannot show is how the model is called: rotary positions are
``0 .. T - 1`` (what the models use without ``position_ids`` or a cache), and
the keys are those the causal mask and the batch's padding leave. A call with
other ``position_ids``, a cache of earlier tokens or a custom 4D mask computes
something else; the recorded rows show it (``NormAttention.mismatch``).
"""

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ._attention_half import NormAttention, Rotary
from ._block_detect import (
    GLOBAL_HOOKS,
    BlockMatch,
    _hf_class,
    _linear,
    _norm,
    _own_forward,
    _unsafe,
)
from ._norms import Norm
from ._overrides import global_hooks

__all__ = ["attention_half_section", "detect_attention_half", "why_not_attention_half"]

_GPT2 = "transformers.models.gpt2.modeling_gpt2"
_NEOX = "transformers.models.gpt_neox.modeling_gpt_neox"
_LLAMA = "transformers.models.llama.modeling_llama"
_MISTRAL = "transformers.models.mistral.modeling_mistral"
_QWEN2 = "transformers.models.qwen2.modeling_qwen2"


@dataclass(frozen=True)
class _Layout:
    """How a block class lays out its attention half (all names in the block's module)."""

    family: str  # "gpt2", "neox" or "llama" (Llama, Mistral, Qwen2: one attention code)
    norm1: str
    attn: str
    norm2: str
    attention: str  # class of the attention submodule
    model: str  # class of the model whose forward runs the blocks one after the other
    blocks: str  # that model's ModuleList of blocks
    rotary: str | None = None  # class of the model's ``rotary_emb``
    rms_norm: str | None = None  # the library's RMSNorm class (LlamaRMSNorm's code)


_BLOCKS = {
    (_GPT2, "GPT2Block"): _Layout("gpt2", "ln_1", "attn", "ln_2", "GPT2Attention",
                                  "GPT2Model", "h"),
    (_NEOX, "GPTNeoXLayer"): _Layout("neox", "input_layernorm", "attention",
                                     "post_attention_layernorm", "GPTNeoXAttention",
                                     "GPTNeoXModel", "layers", "GPTNeoXRotaryEmbedding"),
    **{(module, f"{prefix}DecoderLayer"): _Layout(
        "llama", "input_layernorm", "self_attn", "post_attention_layernorm",
        f"{prefix}Attention", f"{prefix}Model", "layers", f"{prefix}RotaryEmbedding",
        f"{prefix}RMSNorm") for module, prefix in ((_LLAMA, "Llama"), (_MISTRAL, "Mistral"),
                                                   (_QWEN2, "Qwen2"))},
}

#: Attention implementations whose arithmetic is the formula's (flash and flex kernels
#: and paged caches compute with other masks, dtypes or positions).
_IMPLEMENTATIONS = ("eager", "sdpa")

#: Rope types whose frequencies transformers computes once, at init; "dynamic" and
#: "longrope" recompute them from the sequence length in every forward.
_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "proportional")


def _refuse(reason):
    return BlockMatch(None, reason=reason)


def _layout(module):
    """The :class:`_Layout` of ``module``'s class name and library, whatever its state."""
    kind = type(module)
    return _BLOCKS.get((kind.__module__, kind.__name__))


def _exact(module, owner, name):
    """Whether ``module`` is exactly transformers' ``owner.name`` running its own forward."""
    return type(module) is _hf_class(owner, name) and _own_forward(module, owner, name)


def _holder(model, block, layout):
    """``(inner model, index)``: the recognised model whose block list holds ``block``."""
    if model is None:
        return None
    owner = type(block).__module__
    for module in model.modules():
        if not _exact(module, owner, layout.model):
            continue
        blocks = getattr(module, layout.blocks, None)
        if isinstance(blocks, nn.ModuleList):
            for i, candidate in enumerate(blocks):
                if candidate is block:
                    return module, i
    return None


def _attention_norm(module, layout, owner, where):
    """``(Norm, None)`` of the norm in front of the attention, or ``(None, reason)``."""
    norm = _norm(module)
    if norm is None and layout.rms_norm is not None and _exact(module, owner, layout.rms_norm):
        # The same code as LlamaRMSNorm: normalise in float32, cast back, times the gain.
        norm = Norm("rms", module.weight.detach(), None, module.variance_epsilon,
                    compute_dtype=torch.float32)
    if norm is None:
        return None, (f"{where} is a {type(module).__name__}, not an nn.LayerNorm, "
                      f"nn.RMSNorm or {layout.rms_norm or 'LlamaRMSNorm'} over one axis")
    return norm, None


def _implementation_name(attn, holder):
    """The attention implementation the block runs ("eager", "sdpa", ...)."""
    impl = getattr(attn.config, "_attn_implementation", None)
    if impl is None and holder is None:
        # A block built outside a model: transformers falls back to its eager function.
        impl = "eager"
    return impl


def _implementation(attn, holder, where):
    """Why the attention implementation may compute something else, or None."""
    impl = _implementation_name(attn, holder)
    if impl not in _IMPLEMENTATIONS:
        return (f"{where} uses the attention implementation {impl!r}; recognised are "
                f"{' and '.join(map(repr, _IMPLEMENTATIONS))} (load the model with "
                "attn_implementation='sdpa' or 'eager')")
    if holder is not None and holder.config._attn_implementation != impl:
        return (f"{where} uses the attention implementation {impl!r} but its model builds "
                f"masks for {holder.config._attn_implementation!r}")
    utils = sys.modules.get("transformers.modeling_utils")
    functions = getattr(utils, "ALL_ATTENTION_FUNCTIONS", None)
    sdpa = _hf_class("transformers.integrations.sdpa_attention", "sdpa_attention_forward")
    if functions is None or sdpa is None:
        return "transformers' attention functions could not be found"
    if impl == "eager" and "eager" in functions:
        return "a function registered as 'eager' attention replaces transformers' own"
    if impl == "sdpa" and functions.get("sdpa") is not sdpa:
        return "a function registered as 'sdpa' attention replaces transformers' own"
    return None


def _projections(attn, family, where):
    """``(weights dict, None)`` in NormAttention's layout, or ``(None, reason)``."""
    conv1d = _hf_class("transformers.pytorch_utils", "Conv1D")
    if family == "gpt2":
        names = ("c_attn", "c_proj")
    elif family == "neox":
        names = ("query_key_value", "dense")
    else:
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
    found = [_linear(attn.get_submodule(n), conv1d) for n in names]
    if any(p is None for p in found):
        return None, f"{where}'s projections are not exact nn.Linear / Conv1D modules"
    if family == "gpt2":
        (w, b), (w_o, b_o) = found
        n_heads = n_kv = attn.num_heads
        d_head = attn.head_dim
        # c_attn's outputs are [q | k | v], each H d_head wide.
        ws = w.split(attn.split_size)
        bs = (None,) * 3 if b is None else b.split(attn.split_size)
    elif family == "neox":
        (w, b), (w_o, b_o) = found
        d_head = attn.head_size
        n_heads = n_kv = w.shape[0] // (3 * d_head)
        if w.shape[0] != 3 * n_heads * d_head or (b is not None and b.shape != w.shape[:1]):
            return None, f"{where}'s projections have widths that do not make its heads"
        # query_key_value's outputs are per head [q_h | k_h | v_h] (view(..., H, 3 d_head)).
        ws = [p.reshape(n_heads * d_head, -1) for p in w.view(n_heads, 3, d_head, -1).unbind(1)]
        bs = ((None,) * 3 if b is None
              else [p.reshape(-1) for p in b.view(n_heads, 3, d_head).unbind(1)])
    else:
        (w_q, b_q), (w_k, b_k), (w_v, b_v), (w_o, b_o) = found
        d_head = attn.head_dim
        n_heads, n_kv = w_q.shape[0] // d_head, w_k.shape[0] // d_head
        if n_kv == 0 or n_heads % n_kv or n_heads // n_kv != attn.num_key_value_groups:
            return None, (f"{where} has {n_heads} query and {n_kv} key/value heads, which "
                          f"do not make its {attn.num_key_value_groups} groups")
        ws, bs = (w_q, w_k, w_v), (b_q, b_k, b_v)
    d = ws[0].shape[1]
    widths = (n_heads * d_head, n_kv * d_head, n_kv * d_head)
    if (len(ws) != 3 or tuple(p.shape[0] for p in ws) != widths
            or any(p.shape[1] != d for p in ws) or w_o.shape[1] != n_heads * d_head):
        return None, f"{where}'s projections have widths that do not make its heads"
    parts = {"w_q": ws[0], "b_q": bs[0], "w_k": ws[1], "b_k": bs[1], "w_v": ws[2],
             "b_v": bs[2], "w_o": w_o, "b_o": b_o, "n_heads": n_heads, "n_kv_heads": n_kv}
    return parts, None


def _gpt2_scale(attn, where):
    """``(scale, None)`` of a GPT2Attention, or ``(None, reason)``."""
    if attn.config._attn_implementation == "eager" and attn.reorder_and_upcast_attn:
        return None, (f"{where} has reorder_and_upcast_attn, which computes the eager "
                      "attention's scores and softmax in float32")
    # The forward multiplies by attn.scaling, which __init__ derives from these flags;
    # a disagreement means the module was changed after construction.
    expected = attn.head_dim ** -0.5 if attn.scale_attn_weights else 1.0
    if attn.scale_attn_by_inverse_layer_idx:
        if attn.layer_idx is None:
            return None, f"{where} scales by its layer index but has none"
        expected /= float(attn.layer_idx + 1)
    if attn.scaling != expected:
        return None, (f"{where}.scaling is {attn.scaling}, not the {expected} that its "
                      "scale_attn_weights / scale_attn_by_inverse_layer_idx flags give")
    return expected, None


def _rotary(holder, layout, owner, d_head, where):
    """``(Rotary, None)`` of the model's ``rotary_emb``, or ``(None, reason)``."""
    rotary = getattr(holder, "rotary_emb", None)
    if rotary is None or not _exact(rotary, owner, layout.rotary):
        return None, (f"the model's rotary_emb is a {type(rotary).__name__}, not the "
                      f"{layout.rotary} that transformers defines")
    reason = _unsafe(rotary, f"{layout.model}.rotary_emb")
    if reason is not None:
        return None, reason
    rope_type = getattr(rotary, "rope_type", None)
    if rope_type not in _STATIC_ROPE:
        return None, (f"the model's rotary embedding has rope type {rope_type!r}, whose "
                      "frequencies depend on the sequence length; recognised are "
                      f"{', '.join(map(repr, _STATIC_ROPE))}")
    inv_freq = rotary.inv_freq.detach()
    rot_dim = 2 * inv_freq.numel()
    # NeoX rotates the first 2 len(inv_freq) features (cos's width); Llama's code all.
    if inv_freq.ndim != 1 or rot_dim > d_head or (layout.family == "llama" and rot_dim != d_head):
        return None, (f"the model's rotary embedding rotates {rot_dim} features, which "
                      f"{where}'s heads of width {d_head} do not take")
    # transformers computes the angles, cosines and sines in float32, times
    # attention_scaling, then casts them to the activations' dtype.
    return Rotary(inv_freq, rot_dim, float(rotary.attention_scaling), torch.float32), None


def _sliding_window(attn, holder, index, where):
    """Why a sliding window may drop keys, or None."""
    if getattr(attn, "sliding_window", None) is not None:
        return f"{where} attends through a sliding window of {attn.sliding_window} keys"
    config = holder.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        # Qwen2: the model masks each layer as its entry says.
        if index < len(layer_types) and layer_types[index] != "full_attention":
            return (f"the model's config.layer_types makes layer {index} a "
                    f"{layer_types[index]!r} layer")
        return None
    # Mistral: one window, in every layer's mask, whatever the sequence length.
    window = getattr(config, "sliding_window", None)
    if window is not None:
        return (f"{where} attends through a sliding window of {window} keys "
                "(config.sliding_window), which drops keys of longer sequences")
    return None


def detect_attention_half(block, model=None):
    """Recognise the attention half of a transformers pre-norm block.

    Recognised, by exact class (whose ``forward`` is the one transformers
    defines), submodule types and config: ``GPT2Block``, ``GPTNeoXLayer``
    (sequential residual), ``LlamaDecoderLayer``, ``MistralDecoderLayer`` and
    ``Qwen2DecoderLayer``, from the block's input to the input of its second
    norm (``ln_2`` / ``post_attention_layernorm``): ``x + attention(norm(x))``
    with the block's norm, projections (biases, grouped-query heads, ``head_dim``),
    scale (GPT-2's ``scale_attn_weights`` and ``scale_attn_by_inverse_layer_idx``)
    and, for GPT-NeoX and the Llama family, the rotary embedding of the model's
    ``rotary_emb`` (partial for GPT-NeoX's ``rotary_pct``), in float32 as
    transformers computes it.

    Parameters
    ----------
    block : torch.nn.Module
    model : torch.nn.Module or None, default=None
        The model that holds ``block``. Needed for rotary blocks, whose cos/sin
        the model's ``rotary_emb`` computes, and to check that the model builds
        masks for the attention implementation the block uses.

    Returns
    -------
    match : BlockMatch
        The :class:`NormAttention` with its layers relative to ``block``
        (``":input"`` and ``"<norm2>:input"``), or None with the reason.
        Refused: other classes; a ``forward`` replaced on the instance or the
        class; forward hooks (also global ones); parametrized weights; dropout
        in training mode; GPT-NeoX's parallel residual; GPT-2 cross-attention
        (``add_cross_attention``) and ``reorder_and_upcast_attn`` under eager
        attention (float32 scores); attention implementations other than eager
        and sdpa, or a replaced one; sliding windows; rope types whose
        frequencies depend on the length ("dynamic", "longrope"); a rotary
        block without its model; kernelized models. Under eager attention
        GPT-NeoX and the Llama family compute the softmax in float32: the
        formula does the same (``softmax_dtype``), and a float64 model matches
        it to float32 rounding.
    """
    if not isinstance(block, nn.Module):
        return _refuse(f"expected a torch.nn.Module, got {type(block).__name__}")
    if global_hooks():
        return _refuse(GLOBAL_HOOKS)
    name = type(block).__name__
    layout = _layout(block)
    owner = type(block).__module__
    if layout is None or not _exact(block, owner, name):
        return _refuse(f"{name} is not a recognised block: expected one of "
                       f"{', '.join(n for _, n in _BLOCKS)} as transformers defines them")
    if layout.family == "neox" and block.use_parallel_residual:
        return _refuse(f"{name} uses the parallel residual (x + attn(ln1(x)) + mlp(ln2(x))): "
                       "no layer holds x + attn(ln1(x))")
    if layout.family == "gpt2" and hasattr(block, "crossattention"):
        return _refuse(f"{name} has a cross-attention (add_cross_attention), which runs "
                       "between the attention and ln_2 when the model gets encoder states")
    attn = block.get_submodule(layout.attn)
    norm_module = block.get_submodule(layout.norm1)
    parts = [(block, name), (norm_module, f"{name}.{layout.norm1}")]
    parts += [(m, f"{name}.{layout.attn}.{n}".rstrip(".")) for n, m in attn.named_modules()]
    if layout.family == "neox":
        parts.append((block.post_attention_dropout, f"{name}.post_attention_dropout"))
    for module, where in parts:
        reason = _unsafe(module, where)
        if reason is not None:
            return _refuse(reason)
    where = f"{name}.{layout.attn}"
    if not _exact(attn, owner, layout.attention):
        return _refuse(f"{where} is a {type(attn).__name__}, not the {layout.attention} "
                       "that transformers defines")
    p = attn.attn_dropout.p if layout.family == "gpt2" else attn.attention_dropout
    if attn.training and p > 0:
        return _refuse(f"{where} drops attention weights in training mode (call model.eval())")
    if not getattr(attn, "is_causal", False):
        return _refuse(f"{where} is not causal")
    found = _holder(model, block, layout)
    holder, index = found if found is not None else (None, None)
    if model is not None and any(getattr(m, "_use_kernels", False) for m in model.modules()):
        return _refuse("the model is kernelized (use_kernels): hub kernels may replace "
                       "transformers' functions")
    reason = _implementation(attn, holder, where)
    if reason is not None:
        return _refuse(reason)
    norm, reason = _attention_norm(norm_module, layout, owner, f"{name}.{layout.norm1}")
    if norm is None:
        return _refuse(reason)
    weights, reason = _projections(attn, layout.family, where)
    if weights is None:
        return _refuse(reason)
    if norm.weight is not None and norm.weight.shape[0] != weights["w_q"].shape[1]:
        return _refuse(f"{name}.{layout.norm1} and {where} have different widths")
    rotary = None
    if layout.family == "gpt2":
        scale, reason = _gpt2_scale(attn, where)
        if scale is None:
            return _refuse(reason)
    else:
        scale = attn.scaling
        if holder is None:
            return _refuse(
                f"{name}'s rotary cos/sin come from its model's rotary_emb: pass the model "
                f"that holds the block (in a {layout.model}.{layout.blocks})")
        if index >= holder.config.num_hidden_layers:
            return _refuse(f"{name} is block {index} of its {layout.model}, which runs only "
                           f"the first {holder.config.num_hidden_layers}")
        d_head = weights["w_q"].shape[0] // weights["n_heads"]
        rotary, reason = _rotary(holder, layout, owner, d_head, where)
        if rotary is None:
            return _refuse(reason)
        if layout.family == "llama":
            reason = _sliding_window(attn, holder, index, where)
            if reason is not None:
                return _refuse(reason)
    # Their eager attention computes the softmax in float32 and casts it back.
    softmax_dtype = (torch.float32 if layout.family != "gpt2"
                     and _implementation_name(attn, holder) == "eager" else None)
    section = NormAttention(norm=norm, scale=float(scale), rotary=rotary, causal=True,
                            residual=True, softmax_dtype=softmax_dtype, **weights)
    return BlockMatch(section, input=":input", output=f"{layout.norm2}:input")


def _laid_out(model, a, b):
    """``(block, previous)`` when ``a -> b`` is laid out as a block's attention half.

    ``b`` is the input of the block's second norm, ``a`` the block's input
    (``previous`` False) or the output of the block before it in the same
    ModuleList (``previous`` True); None otherwise. Only names and classes count.
    """
    if b.kind != "input" or not b.name:
        return None
    block_name, _, norm_name = b.name.rpartition(".")
    block = model.get_submodule(block_name)
    layout = _layout(block)
    if layout is None or norm_name != layout.norm2:
        return None
    if (a.name, a.kind) == (block_name, "input"):
        return block, False
    parent, _, index = block_name.rpartition(".")
    if index.isdigit() and int(index) > 0 and a.kind == "output" \
            and a.name == (f"{parent}.{int(index) - 1}" if parent else str(int(index) - 1)):
        return block, True
    return None


def _chained(model, a, block):
    """Why the output of ``a``'s block may not be ``block``'s input, or None."""
    layout = _layout(block)
    found = _holder(model, block, layout)
    if found is None:
        return (f"the blocks are not in the {layout.blocks} of a {layout.model} as "
                "transformers defines it, whose forward passes each block's output to the "
                "next: start the section at the block's input instead")
    holder, index = found
    if getattr(holder, layout.blocks)[index - 1] is not a.module:
        return f"{a.name} is not the block before {type(block).__name__} {index}"
    if layout.family != "gpt2" and index >= holder.config.num_hidden_layers:
        return (f"{layout.model} runs only its first {holder.config.num_hidden_layers} "
                "blocks")
    return None


def _section(model, a, b):
    """``(NormAttention or None, reason or None)`` of a laid-out section; None if not laid out."""
    found = _laid_out(model, a, b)
    if found is None:
        return None
    block, previous = found
    if a.positions is not None or b.positions is not None or a.axes is not None \
            or b.axes is not None:
        return None, ("the attention mixes positions, so its section needs all positions of "
                      "both layers and their default layout (no selection, no declared axes)")
    match = detect_attention_half(block, model)
    if not match:
        return None, match.reason
    # The recorded ends: a hook there may change the value the next module receives.
    reason = _unsafe(b.module, b.name)
    if reason is None and previous:
        reason = _unsafe(a.module, a.name) or _chained(model, a, block)
    if reason is not None:
        return None, reason
    return match.section, None


def attention_half_section(model, a, b):
    """The :class:`NormAttention` of section ``a -> b`` (layers by ``_model._parse_layers``).

    ``b`` must be the input of a recognised block's second norm
    (``"<block>.ln_2:input"``, ``"<block>.post_attention_layernorm:input"``) and
    ``a`` the block's input or the output of the block before it in the block
    list of its model (``GPT2Model.h``, ``GPTNeoXModel.layers``,
    ``LlamaModel.layers``, ...: their forward passes each block's output to the
    next), both with all positions and no declared axes. None otherwise. The
    caller still checks widths (``fits``) and the formula on recorded rows
    (``mismatch``).
    """
    found = _section(model, a, b)
    return None if found is None else found[0]


def why_not_attention_half(model, a, b):
    """Why section ``a -> b``, laid out as a block's attention half, takes no closed form.

    The layers are those :func:`attention_half_section` expects for the class
    of ``b``'s block (by its name and library, whatever its state); the reason
    is :func:`detect_attention_half`'s (a hook, a replaced ``forward``, a
    parallel residual, ...), a selection of positions, or a previous block
    whose output the model does not pass on. None when the layers are not
    laid out so, or nothing stops it.
    """
    found = _section(model, a, b)
    return None if found is None else found[1]
