"""Recognition of the transformers modules whose MLP half has a closed form.

:func:`detect_block` reads a module's class and submodules and returns the
:class:`~sklearn_lib.models._blocks.NormMLP` it computes, with the layers the
section lies between, or the reason why not; :func:`block_section` matches it to
a pair of layers of the interaction graph. Nothing here imports transformers:
its classes are looked up in ``sys.modules``, so a model built with them has
already imported them.
"""

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ._blocks import NormMLP
from ._fastpath import ELEMENTWISE
from ._norms import Norm
from ._overrides import global_hooks

__all__ = ["BlockMatch", "block_section", "detect_block", "why_not_block"]


@dataclass
class BlockMatch:
    """What :func:`detect_block` found: the closed form and its layers, or why not.

    ``input`` and ``output`` name the section's layers relative to the module
    (``"ln_2:input"``: the input of the submodule ``ln_2``; ``":output"``: the
    module's own output), as ``collect`` spells layers after the module's path.
    ``section`` is None exactly when ``reason`` says why nothing was recognised.
    """

    section: NormMLP | None
    input: str | None = None
    output: str | None = None
    reason: str | None = None

    def __bool__(self):
        return self.section is not None


#: Why nothing is recognised while hooks are registered for every module.
GLOBAL_HOOKS = "global forward hooks are registered; they may change any module's values"


def _refuse(reason):
    return BlockMatch(None, reason=reason)


#: transformers' elementwise activation classes, by module and name (resolved lazily,
#: so that nothing here imports transformers).
_HF_ELEMENTWISE = ("GELUTanh", "NewGELUActivation", "GELUActivation", "SiLUActivation",
                   "FastGELUActivation", "QuickGELUActivation", "ClippedGELUActivation",
                   "AccurateGELUActivation", "LaplaceActivation", "LinearActivation",
                   "MishActivation", "ReLUSquaredActivation", "SqrtSoftplusActivation")


def _hf_class(module_name, name):
    module = sys.modules.get(module_name)
    return None if module is None else getattr(module, name, None)


def _is_elementwise(module):
    kind = type(module)
    if kind in ELEMENTWISE or kind is nn.Hardswish:
        return True
    return kind.__module__ == "transformers.activations" and kind.__name__ in _HF_ELEMENTWISE \
        and _hf_class("transformers.activations", kind.__name__) is kind


def _unsafe(module, name):
    """Why ``module`` (a part of the section, ``name``) may compute something else, or None."""
    if "forward" in module.__dict__ or "__call__" in module.__dict__:
        return f"{name} has an instance-level forward that replaces its class's"
    if (module._forward_hooks or module._forward_pre_hooks
            or getattr(module, "_forward_hooks_with_kwargs", None)):
        return f"{name} carries forward hooks, which may change the values it passes on"
    if torch.nn.utils.parametrize.is_parametrized(module):
        return f"{name} has parametrized weights, recomputed on every call"
    if isinstance(module, nn.Dropout) and module.training and module.p > 0:
        return f"{name} is a dropout in training mode (call model.eval())"
    return None


def _own_forward(module, owner_module, name):
    """Whether the class of ``module`` runs the forward its library defines."""
    forward = type(module).forward
    return (getattr(forward, "__module__", None) == owner_module
            and getattr(forward, "__qualname__", None) == f"{name}.forward")


def _linear(module, conv1d):
    """``(weight (out, in), bias)`` of an exact ``nn.Linear`` or transformers ``Conv1D``."""
    if type(module) is nn.Linear:
        return module.weight.detach(), _detached(module.bias)
    if conv1d is not None and type(module) is conv1d and _own_forward(
            module, "transformers.pytorch_utils", "Conv1D"):
        return module.weight.detach().T, _detached(module.bias)
    return None


def _detached(t):
    return None if t is None else t.detach()


def _norm(module):
    """The :class:`Norm` of an exact LayerNorm / RMSNorm module over one axis, or None."""
    kind = type(module)
    if kind in (nn.LayerNorm, nn.RMSNorm):
        if len(module.normalized_shape) != 1:
            return None
        return Norm("layer" if kind is nn.LayerNorm else "rms", _detached(module.weight),
                    _detached(getattr(module, "bias", None)), module.eps)
    llama = _hf_class("transformers.models.llama.modeling_llama", "LlamaRMSNorm")
    if llama is not None and kind is llama and _own_forward(
            module, "transformers.models.llama.modeling_llama", "LlamaRMSNorm"):
        return Norm("rms", module.weight.detach(), None, module.variance_epsilon,
                    compute_dtype=torch.float32)
    return None


# Each recognised class: (module, class name) -> how its MLP section is laid out.
_GPT2 = "transformers.models.gpt2.modeling_gpt2"
_NEOX = "transformers.models.gpt_neox.modeling_gpt_neox"
_LLAMA = "transformers.models.llama.modeling_llama"
# (norm, mlp) submodule names of the residual blocks, (in, activation, out) of the MLPs.
_BLOCKS = {
    (_GPT2, "GPT2Block"): ("ln_2", "mlp"),
    (_NEOX, "GPTNeoXLayer"): ("post_attention_layernorm", "mlp"),
    (_LLAMA, "LlamaDecoderLayer"): ("post_attention_layernorm", "mlp"),
}
_MLPS = {
    (_GPT2, "GPT2MLP"): ("c_fc", "act", "c_proj", ("dropout",)),
    (_NEOX, "GPTNeoXMLP"): ("dense_h_to_4h", "act", "dense_4h_to_h", ()),
    (_LLAMA, "LlamaMLP"): (("gate_proj", "up_proj"), "act_fn", "down_proj", ()),
}


def _recognised(module, table):
    kind = type(module)
    key = (kind.__module__, kind.__name__)
    if key in table and _hf_class(*key) is kind and _own_forward(module, *key):
        return table[key]
    return None


def _mlp(mlp, where):
    """``(NormMLP parts, None)`` of a recognised MLP module, or ``(None, reason)``."""
    layout = _recognised(mlp, _MLPS)
    if layout is None:
        return None, (f"{where} is a {type(mlp).__name__}, not one of "
                      f"{', '.join(n for _, n in _MLPS)} as transformers defines it")
    ins, act_name, out_name, others = layout
    gated = isinstance(ins, tuple)
    in_names = ins if gated else (ins,)
    for name in (*in_names, act_name, out_name, *others):
        reason = _unsafe(mlp.get_submodule(name), f"{where}.{name}")
        if reason is not None:
            return None, reason
    conv1d = _hf_class("transformers.pytorch_utils", "Conv1D")
    inputs = [_linear(mlp.get_submodule(name), conv1d) for name in in_names]
    output = _linear(mlp.get_submodule(out_name), conv1d)
    if output is None or any(p is None for p in inputs):
        return None, f"{where}'s projections are not exact nn.Linear / Conv1D modules"
    activation = mlp.get_submodule(act_name)
    if not _is_elementwise(activation):
        return None, (f"{where}.{act_name} is a {type(activation).__name__}, not a known "
                      "elementwise activation")
    w_out, b_out = output
    w_in = torch.cat([w for w, _ in inputs]) if gated else inputs[0][0]
    biases = [b for _, b in inputs]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        biases = [torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
                  for (w, _), b in zip(inputs, biases)]
    b_in = None if biases[0] is None else torch.cat(biases)
    d_hidden = w_in.shape[0] // (2 if gated else 1)
    if any(w.shape[1] != w_in.shape[1] for w, _ in inputs) or w_out.shape[1] != d_hidden:
        return None, f"{where}'s projections have widths that do not chain"
    parts = {"w_in": w_in, "b_in": b_in, "activation": activation, "w_out": w_out,
             "b_out": b_out, "gated": gated}
    return parts, None


def detect_block(module):
    """Recognise the MLP section of a transformers block or MLP module.

    Recognised, by exact class (whose ``forward`` is the one transformers
    defines) and by the types of the submodules the section uses:

    * ``GPT2Block``, ``GPTNeoXLayer`` (sequential residual), ``LlamaDecoderLayer``:
      the section from the input of the MLP's norm (the residual stream after
      attention) to the block's output, ``x + mlp(norm(x))``;
    * ``GPT2MLP``, ``GPTNeoXMLP``, ``LlamaMLP``: the MLP alone, from its input to
      its output.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    match : BlockMatch
        The closed form (:class:`NormMLP`) with its layers relative to
        ``module``, or None with the reason. Refused: other classes, a
        ``forward`` replaced on the instance or on the class, forward hooks
        (also global ones), parametrized weights, dropout in training mode,
        projections other than exact ``nn.Linear`` / ``Conv1D``, activations
        not known to be elementwise, norms other than ``nn.LayerNorm``,
        ``nn.RMSNorm`` and ``LlamaRMSNorm`` over one axis, GPT-NeoX's parallel
        residual (there the MLP's output is added together with the
        attention's, so no layer lies between them). TransformerLens' bridge
        components are refused too: their hook points may change the values
        (:mod:`._bridge` finds the transformers block they wrap and checks
        every batch instead).
    """
    if not isinstance(module, nn.Module):
        return _refuse(f"expected a torch.nn.Module, got {type(module).__name__}")
    if global_hooks():
        return _refuse(GLOBAL_HOOKS)
    if type(module).__module__.startswith("transformer_lens"):
        return _refuse(
            f"{type(module).__name__} is a TransformerLens component, whose hook points may "
            "change the values; recognise the transformers module it wraps "
            "(its original_component) instead")
    name = type(module).__name__
    reason = _unsafe(module, name)
    if reason is not None:
        return _refuse(reason)
    layout = _recognised(module, _BLOCKS)
    if layout is not None:
        if getattr(module, "use_parallel_residual", False):
            return _refuse(
                f"{name} uses the parallel residual (x + attn(ln1(x)) + mlp(ln2(x))): no "
                "layer lies between the attention and the MLP")
        norm_name, mlp_name = layout
        norm_module = module.get_submodule(norm_name)
        for sub, sub_name in ((norm_module, norm_name), (module.get_submodule(mlp_name),
                                                         mlp_name)):
            reason = _unsafe(sub, f"{name}.{sub_name}")
            if reason is not None:
                return _refuse(reason)
        if name == "GPTNeoXLayer":
            reason = _unsafe(module.post_mlp_dropout, f"{name}.post_mlp_dropout")
            if reason is not None:
                return _refuse(reason)
        norm = _norm(norm_module)
        if norm is None:
            return _refuse(f"{name}.{norm_name} is a {type(norm_module).__name__}, not an "
                           "nn.LayerNorm, nn.RMSNorm or LlamaRMSNorm over one axis")
        parts, reason = _mlp(module.get_submodule(mlp_name), f"{name}.{mlp_name}")
        if parts is None:
            return _refuse(reason)
        if norm.weight is not None and norm.weight.shape[0] != parts["w_in"].shape[1]:
            return _refuse(f"{name}.{norm_name} and {name}.{mlp_name} have different widths")
        return BlockMatch(NormMLP(norm=norm, residual=True, **parts),
                          input=f"{norm_name}:input", output=":output")
    if _recognised(module, _MLPS) is not None:
        parts, reason = _mlp(module, name)
        if parts is None:
            return _refuse(reason)
        return BlockMatch(NormMLP(norm=None, residual=False, **parts),
                          input=":input", output=":output")
    return _refuse(
        f"{name} is not a recognised block: expected one of "
        f"{', '.join(n for _, n in (*_BLOCKS, *_MLPS))} as transformers defines them")


def block_section(model, a, b):
    """The :class:`NormMLP` of section ``a -> b`` (layers parsed by ``_model._parse_layers``).

    ``b`` must be the output of a module that :func:`detect_block` recognises and
    ``a`` the layer its match names as input (``"<block>.ln_2:input"`` for a
    GPT-2 block, ``"<mlp>:input"`` for an MLP alone), both with the same
    selection of positions (the section acts row by row) and no declared axes.
    None otherwise. The caller still checks widths (``fits``) and the formula
    on recorded rows (``verify``).
    """
    if a.axes is not None or b.axes is not None or a.positions != b.positions:
        return None
    if b.kind != "output":
        return None
    match = detect_block(b.module)
    if not match:
        return None
    name, _, kind = match.input.rpartition(":")
    if name:
        name = f"{b.name}.{name}" if b.name else name
    else:
        name = b.name
    return match.section if (a.name, a.kind) == (name, kind) else None


def why_not_block(model, a, b):
    """Why section ``a -> b``, laid out as a transformers MLP half, takes no closed form.

    The layers are those :func:`block_section` expects for ``b``'s module class
    (by its name and library, whatever its state); the reason is
    :func:`detect_block`'s (a hook, a replaced ``forward``, a parallel
    residual, ...). None when the layers are not laid out so, or nothing stops it.
    """
    if b.kind != "output":
        return None
    kind = type(b.module)
    key = (kind.__module__, kind.__name__)
    if key in _BLOCKS:
        expected = (f"{b.name}.{_BLOCKS[key][0]}" if b.name else _BLOCKS[key][0], "input")
    elif key in _MLPS:
        expected = (b.name, "input")
    else:
        return None
    if (a.name, a.kind) != expected:
        return None
    return detect_block(b.module).reason
