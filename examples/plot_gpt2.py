"""
LIB of GPT-2: the residual stream of a language model, with error bars
======================================================================

The local interaction basis of a ``transformers`` GPT-2 over its residual
stream: the stream entering every block, after every block's attention and
after every block, and the logits over GPT-2's whole vocabulary of 50,257
tokens. The model is a GPT-2 built from a small config with random weights (no
download), so the
numbers say nothing about language; the code is the one a real checkpoint
takes (``GPT2LMHeadModel.from_pretrained("gpt2")``) and the tutorial
:doc:`/tutorial_gpt2` says how to scale it.

A real language model is too large for exact statistics: every position of
every sequence would need one backward pass per kept direction. The graph
therefore estimates them, without bias, from random combinations of the
output positions (``stochastic_positions``), and says how noisy the estimate
is: every layer's interaction strengths and edges come with standard errors
estimated from the same run.
"""

import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sklearn_lib import InteractionGraph

os.environ.setdefault("HF_HUB_OFFLINE", "1")
QUICK = os.environ.get("SKLEARN_LIB_QUICK") == "1"
N_SEQUENCES, N_TOKENS = (8, 16) if QUICK else (32, 64)

# %%
# The model and the data
# ----------------------
# Two blocks of width 64 with four heads and GPT-2's vocabulary of 50,257
# tokens, float64. Random token ids stand for a tokenised corpus.
torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=N_TOKENS,
                    bos_token_id=None, eos_token_id=None)
model = GPT2LMHeadModel(config).eval()
ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(N_SEQUENCES, N_TOKENS))

# %%
# The residual stream as node layers
# ----------------------------------
# ``"transformer.h.0:input"`` is the stream entering block 0,
# ``"transformer.h.0.ln_2:input"`` the stream after its attention (what the MLP
# half reads, and what the residual connection carries on), and
# ``"transformer.h.0"`` the block's output. The MLP half, from the stream after
# attention to the block's output, is recognised as GPT-2's own
# ``LayerNorm -> Conv1D -> GELU -> Conv1D`` plus the residual, and the attention
# half before it as GPT-2's own ``LayerNorm -> attention`` plus the residual: both
# take closed forms (checked against the model on every batch; ``fast_path_``
# says which sections did). The last layer, ``"lm_head"``, is the logits: a
# layer that wide is fitted without any vocabulary-by-vocabulary matrix (here a
# streamed randomized PCA keeping 32 directions), and the unembedding takes its
# closed form.
LAYERS = ["transformer.h.0:input"]
for b in range(config.n_layer):
    LAYERS += [f"transformer.h.{b}.ln_2:input", f"transformer.h.{b}"]
LAYERS += ["lm_head"]
NAMES = ["embed"] + [f"{half}{b}" for b in range(config.n_layer)
                     for half in ("attn", "mlp")] + ["logits"]

start = time.perf_counter()
graph = InteractionGraph(
    final_layer="pca", n_components=[None] * (len(LAYERS) - 1) + [32],
    stochastic_positions=8, random_state=0,
).fit_model(model, LAYERS, {"input_ids": ids}, sequence=True)
seconds = time.perf_counter() - start
print(f"{N_SEQUENCES} sequences of {N_TOKENS} tokens, {len(LAYERS)} layers: {seconds:.1f} s")
print("directions per layer:", dict(zip(NAMES, graph.n_components_.tolist())))

# %%
# Spectra with error bars
# -----------------------
# ``interaction_strengths_std_`` is the standard error of each strength due to
# the random position combinations, estimated from eight independent groups of
# them in the same run; an exact run has none, and the MLP halves' strengths are
# exact (a section that acts token by token has no cross terms between the
# positions it combines). The relative error of the strongest directions
# says whether more combinations are needed. It does not include the sampling
# of the data: more tokens shrink that.
fig, axes = plt.subplots(1, len(LAYERS) - 1, figsize=(3.2 * (len(LAYERS) - 1), 3),
                         sharey=True)
for ax, name, basis in zip(axes, NAMES, graph.bases_[:-1]):
    strengths = np.asarray(basis.interaction_strengths_)
    std = getattr(basis, "interaction_strengths_std_", None)
    top = slice(0, min(50, len(strengths)))
    x = np.arange(1, len(strengths) + 1)[top]
    ax.errorbar(x, strengths[top], yerr=None if std is None else np.asarray(std)[top],
                fmt="o", markersize=2, elinewidth=0.8)
    ax.set_yscale("log")
    ax.set_title(f"{name} ({len(strengths)} directions)")
    ax.set_xlabel("direction")
    if std is not None:
        relative = np.asarray(std)[top] / strengths[top]
        print(f"{name}: largest relative error of the top {len(x)} strengths "
              f"{relative.max():.1%}")
axes[0].set_ylabel("interaction strength")
fig.tight_layout()

# %%
# The strongest edges
# -------------------
# ``edges_[l]`` is the (directions of layer l+1, directions of layer l) matrix
# of squared attributions; the strongest edges of every section, with their
# standard errors where the run was stochastic.
for l, E in enumerate(graph.edges_):
    E = np.asarray(E)
    std = getattr(graph, "edges_std_", None)
    i, j = np.unravel_index(np.argsort(E, axis=None)[::-1][:3], E.shape)
    strongest = ", ".join(
        f"{NAMES[l]}[{b}] -> {NAMES[l + 1]}[{a}] {E[a, b]:.3g}"
        + ("" if std is None else f" ± {np.asarray(std[l])[a, b]:.2g}")
        for a, b in zip(i, j))
    print(f"{NAMES[l]} -> {NAMES[l + 1]}: {strongest}")

plt.show()
