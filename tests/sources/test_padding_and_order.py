"""Real language-model data: shuffled, dynamically padded batches; positions left out; precision.

* A shuffling DataLoader that pads every batch to its own longest sequence gives
  the graph of the same sequences padded once, and data that really change
  between passes are still refused.
* ``stochastic_positions`` combines the real positions of padded batches (signs 0
  at padding), unbiased: checked against the exact sums of a brute-force Jacobian.
* A selection of positions such as ``"resid[1:]"`` leaves a first (BOS) position
  out of the statistics and edges: equal to statistics of the kept rows alone.
* ``model_dtype``: a bfloat16 model runs in bfloat16 while statistics are
  accumulated in float64.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_lib import InteractionGraph
from sklearn_lib.basis._stats import InteractionStatistics
from sklearn_lib.models._position_sources import PositionSources
from sklearn_lib.sources._model_source import ModelSource
from sklearn_lib.sources._passes import Fingerprint

VOCAB, D = 11, 5
CPU = torch.device("cpu")


class TokenMixer(nn.Module):
    """Embedding, a causal average over the real positions with a Tanh, per-position logits.

    Padded keys are left out of the average, as a Hugging Face model leaves them
    out of its attention, so a real position's values do not depend on padding.
    """

    def __init__(self):
        super().__init__()
        self.embed, self.resid = nn.Embedding(VOCAB, D), nn.Identity()
        self.fc, self.mid, self.head = nn.Linear(D, D), nn.Identity(), nn.Linear(D, 4)

    def mix(self, h, attention_mask=None):
        """``mid`` as a function of ``resid`` (the section the tests differentiate)."""
        width = h.shape[1]
        weights = torch.ones(width, width, dtype=h.dtype).tril()[None]
        if attention_mask is not None:
            weights = weights * attention_mask[:, None, :].to(h.dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1)
        return h + torch.tanh(self.fc(weights @ h))

    def forward(self, input_ids, attention_mask=None):
        h = self.resid(self.embed(input_ids))
        return self.head(self.mid(self.mix(h, attention_mask)))


def _mixer():
    torch.manual_seed(3)
    return TokenMixer().double()


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB,
                                     n_positions=16, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {
    "mixer": (_mixer, ["resid", "mid", "head"]),
    "gpt2": (_gpt2, ["transformer.h.0:input", "transformer.h.0", "lm_head"]),
}


def _sequences(n=14, seed=1, shortest=2, longest=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=g)
    lengths[0] = longest
    return [torch.randint(0, VOCAB, (int(k),), generator=g) for k in lengths]


def _pad(seqs, width=None, side="right"):
    """A dict batch: ``seqs`` padded to ``width`` (their longest) with a junk token."""
    width = max(len(s) for s in seqs) if width is None else width
    # The padding token changes with the width: it must not matter.
    ids = torch.full((len(seqs), width), width % VOCAB)
    mask = torch.zeros(len(seqs), width, dtype=torch.int64)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols], mask[i, cols] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def _loader(seqs, batch_size=4, seed=0):
    return torch.utils.data.DataLoader(seqs, batch_size=batch_size, shuffle=True,
                                       collate_fn=_pad,
                                       generator=torch.Generator().manual_seed(seed))


def _assert_graphs_close(a, b, tol=1e-9):
    np.testing.assert_array_equal(a.n_components_, b.n_components_)
    for E, E_ref in zip(a.edges_, b.edges_):
        np.testing.assert_allclose(E, E_ref, rtol=0, atol=tol * np.abs(E_ref).max())
    for basis, ref in zip(a.bases_, b.bases_):
        for name in ("jacobian_gram_", "gram_"):
            G, G_ref = getattr(basis, name), getattr(ref, name)
            np.testing.assert_allclose(G, G_ref, rtol=0, atol=tol * np.abs(G_ref).max())


# --------------------------------------------------------------------------- pass fingerprints
@pytest.mark.parametrize("model", sorted(MODELS))
def test_shuffled_dynamic_padding_gives_the_graph_of_one_padded_batch(model):
    """Every pass sees other batches, padded to other widths: the graph is that of the data."""
    build, layers = MODELS[model]
    net, seqs = build(), _sequences()
    params = dict(constant_node=True, verbose=False)
    shuffled = InteractionGraph(**params).fit_model(net, layers, _loader(seqs), sequence=True)
    once = InteractionGraph(**params).fit_model(net, layers, _pad(seqs), sequence=True)
    _assert_graphs_close(shuffled, once)
    assert shuffled.n_samples_seen_ == once.n_samples_seen_


class _Changing:
    """Re-iterable data that yield ``first`` and ``later`` in turn (any two passes in a row differ)."""

    def __init__(self, first, later):
        self.first, self.later, self.passes = first, later, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.first if self.passes % 2 else self.later)


@pytest.mark.parametrize("change", ["token", "swapped tokens", "other sample", "dropped sample",
                                    "tokens moved between samples"])
def test_data_that_change_between_passes_are_refused(change):
    seqs = _sequences()
    later = [s.clone() for s in seqs]
    if change == "token":
        later[3][1] = (later[3][1] + 1) % VOCAB
    elif change == "swapped tokens":
        later[0][[0, 1]] = later[0][[1, 0]]
        assert not torch.equal(later[0], seqs[0])
    elif change == "other sample":
        later[5] = torch.randint(0, VOCAB, (len(seqs[5]),),
                                 generator=torch.Generator().manual_seed(9))
    elif change == "dropped sample":
        later = later[1:]
    else:  # the same tokens at the same positions, in other samples
        a, b = later[0], later[1]
        a[0], b[0] = seqs[1][0].clone(), seqs[0][0].clone()
        assert not torch.equal(a, seqs[0])
    batches = lambda s: [_pad(s[i:i + 4]) for i in range(0, len(s), 4)]  # noqa: E731
    data = _Changing(batches(seqs), batches(later))
    expected = "saw 13 samples" if change == "dropped sample" else "other values"
    with pytest.raises(ValueError, match=f"data changed between passes.*{expected}"):
        InteractionGraph(verbose=False).fit_model(_mixer(), ["resid", "mid"], data,
                                                  sequence=True)


@pytest.mark.parametrize("side", ["right", "left"])
def test_fingerprints_see_real_positions_only(side):
    """Batching, order, padding width and side change nothing; a changed number does."""
    seqs = _sequences(n=9)

    def fingerprint(batches, perturb=None):
        inputs, layer = Fingerprint(), Fingerprint("values")
        for batch in batches:
            inputs.add(batch)
            mask = batch["attention_mask"] == 1
            # A layer: one value per token and feature, garbage at padding.
            values = torch.stack([batch["input_ids"].double() * (f + 1) for f in range(3)], -1)
            values = torch.where(mask[..., None], values, torch.nan)
            if perturb is not None:
                values = perturb(values, mask)
            layer.add(values, mask)
        return inputs, layer

    first = fingerprint([_pad(seqs)])
    order = [4, 0, 8, 2, 6, 1, 3, 7, 5]
    again = fingerprint([_pad([seqs[i] for i in order[:5]], 12, side),
                         _pad([seqs[i] for i in order[5:]], side=side)])
    for a, b in zip(first, again):
        assert a.difference(b, "first", "again") is None

    def nudge(values, mask):
        return values + 1e-9 * mask[..., None] * (values.isfinite() & (values > 3))

    changed = fingerprint([_pad(seqs)], perturb=nudge)[1]
    assert first[1].difference(changed, "first", "again") is not None


# --------------------------------------------------------------------------- stochastic positions
def _brute_force_scatter(net, seqs, V):
    """``sum_x sum_{t, s real} (V^T J_ts(x))^T (V^T J_ts(x))``, each sequence unpadded alone.

    ``J_ts = d mid[t] / d resid[s]`` of the model's own function, by
    ``torch.autograd.functional.jacobian``.
    """
    total = torch.zeros(D, D, dtype=torch.float64)
    for s in seqs:
        h = net.embed(s)[None].detach()
        J = torch.autograd.functional.jacobian(lambda a: net.mix(a)[0], h)[:, :, 0]  # t i s j
        A = torch.einsum("tisj,ik->tksj", J, V)
        total += torch.einsum("tksi,tksj->ij", A, A)
    return total


def _new_stats(l, n_outputs):
    return InteractionStatistics(D, n_outputs, center=True, device=CPU, dtype=torch.float64)


def _scatter(stats):
    """The Jacobian scatter the statistics hold (stored divided by a power of four)."""
    return stats.jacobian_scatter * 4.0 ** stats.jacobian_exponent


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_positions_are_combined_at_random_without_bias(side):
    """Signs 0 at padded outputs: random combinations of the real positions, averaging to exact.

    The exact sums come from each sequence alone, unpadded, by brute force. The
    data hold R copies of the sequences, each with signs of its own: a pass is
    the sum of R independent draws. Its mean differs from the exact sums (the
    positions were combined), and the mean of 20 passes (200 draws) is as close
    as an unbiased estimate's variance allows.
    """
    net, seqs, R = _mixer(), _sequences(n=10), 10
    V = torch.randn(D, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batches = [_pad(seqs[:5] * R, side=side), _pad(seqs[5:] * R, 9, side=side)]
    source = ModelSource(net, ["resid", "mid"], batches, sequence=True, batch_size=None,
                         device=None, dtype="float64", fast_path="auto", verbose=False)
    exact = _brute_force_scatter(net, seqs, V)
    n_rows = sum(len(s) for s in seqs)
    stats = source.jacobian_stats(0, V, _new_stats)
    torch.testing.assert_close(_scatter(stats) / R, exact, rtol=1e-12, atol=1e-12)
    assert stats.n_samples == R * n_rows
    draws = torch.stack([
        _scatter(source.jacobian_stats(0, V, _new_stats,
                                       position_sources=PositionSources(2, seed, CPU))) / R
        for seed in range(20)
    ])
    errors = (draws - exact).square().sum((1, 2))
    assert float(errors.min()) > 1e-6 * float(exact.square().sum())  # combined, not exact
    bias = float((draws.mean(0) - exact).square().sum())
    assert bias < 4 * float(errors.mean()) / len(draws)


@pytest.mark.parametrize("constant", [False, True])
def test_padded_edges_from_combined_positions_are_unbiased(constant):
    """The edges (and the constant node's, from ``Z_out``) of padded batches, over draws.

    R copies of the sequences: every pass averages R independent draws.
    """
    net, seqs, R = _mixer(), _sequences(n=10), 10
    batches = [_pad(seqs[:5] * R), _pad(seqs[5:] * R, 9)]
    graph = InteractionGraph(constant_node=constant, verbose=False).fit_model(
        net, ["resid", "mid"], batches, sequence=True)
    source = ModelSource(net, ["resid", "mid"], batches, sequence=True, batch_size=None,
                         device=None, dtype="float64", fast_path="auto", verbose=False)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    b0, b1 = graph.bases_
    args = (t(b1.components_.T), t(b0.mean_), t(b0.components_.T), t(b0.inverse_components_))
    kwargs = dict(edge_point="reconstructed", alphas=[1.0], weights=[1.0],
                  out_mean=t(b1.mean_) if constant else None)
    exact = source.edges(0, *args, **kwargs)
    np.testing.assert_allclose(exact.numpy(), graph.edges_[0][:exact.shape[0]], rtol=1e-10,
                               atol=1e-12)
    draws = torch.stack([source.edges(0, *args, **kwargs,
                                      position_sources=PositionSources(2, seed, CPU))
                         for seed in range(20)])
    errors = (draws - exact).square().sum((1, 2))
    assert float(errors.min()) > 1e-8 * float(exact.square().sum())
    assert float((draws.mean(0) - exact).square().sum()) < 4 * float(errors.mean()) / 20


# --------------------------------------------------------------------------- positions left out
@pytest.mark.parametrize("padded", [False, True])
def test_a_selection_leaves_the_first_position_out_like_fitting_the_kept_rows(padded):
    """``"resid[1:]"``/``"mid[1:]"``: statistics of positions 1.. only, BOS held at its value.

    The Gram matrix is that of the kept rows; the Jacobian scatter is the brute-force
    sum over kept output and input positions, ``M' = (1/N) sum_x sum_{t,s >= 1}
    (V^T J_ts)^T (V^T J_ts)`` with N the kept rows.
    """
    net = _mixer()
    seqs = _sequences(n=8, shortest=3) if padded else [s[:5] for s in _sequences(n=8, shortest=5)]
    data = _pad(seqs)
    source = ModelSource(net, ["resid[1:]", "mid[1:]"], data, sequence=True, batch_size=None,
                         device=None, dtype="float64", fast_path="auto", verbose=False)
    V = torch.randn(D, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stats = source.jacobian_stats(0, V, _new_stats)
    kept, scatter = [], torch.zeros(D, D, dtype=torch.float64)
    for s in seqs:
        h = net.embed(s)[None].detach()
        kept.append(h[0, 1:])
        J = torch.autograd.functional.jacobian(lambda a: net.mix(a)[0], h)[:, :, 0]
        A = torch.einsum("tisj,ik->tksj", J[1:, :, 1:], V)
        scatter += torch.einsum("tksi,tksj->ij", A, A)
    kept = torch.cat(kept)
    assert stats.n_samples == kept.shape[0]
    torch.testing.assert_close(_scatter(stats), scatter, rtol=1e-12, atol=1e-12)
    gram = torch.cov(kept.T, correction=0)
    fitted = InteractionGraph(verbose=False).fit_model(net, ["resid[1:]", "mid[1:]"], data,
                                                       sequence=True)
    np.testing.assert_allclose(fitted.bases_[0].gram_, gram.numpy(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- model precision
def _gpt2_stats(net, ids, model_dtype, V, position_sources=None):
    source = ModelSource(net, ["transformer.h.0:input", "transformer.h.0"], {"input_ids": ids},
                         sequence=True, batch_size=None, device=None, dtype="float64",
                         fast_path="auto", verbose=False, model_dtype=model_dtype)
    stats = source.jacobian_stats(0, V, lambda l, n: InteractionStatistics(
        8, n, center=True, device=CPU, dtype=torch.float64),
        position_sources=position_sources)
    return source, stats


@pytest.mark.parametrize("stochastic", [False, True])
def test_a_bfloat16_model_runs_in_bfloat16_with_float64_statistics(stochastic):
    """Products of the bfloat16 model, summed in float64: as accurate as the products are.

    The reference is the same weights in float64. Accumulated in float64, the
    scatter's relative error is below bfloat16's eps (its products' own error);
    the signs of stochastic positions are exact units in bfloat16.
    """
    net = copy.deepcopy(_gpt2()).to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (12, 6), generator=torch.Generator().manual_seed(1))
    V = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def sources():
        return PositionSources(2, 7, CPU) if stochastic else None

    low, stats = _gpt2_stats(net, ids, "model", V, sources())
    assert low.model_dtype == torch.bfloat16 and low.dtype == torch.float64
    assert next(low.model.parameters()).dtype == torch.bfloat16
    ref, ref_stats = _gpt2_stats(net, ids, None, V, sources())
    assert next(ref.model.parameters()).dtype == torch.float64
    eps = torch.finfo(torch.bfloat16).eps
    S, S_ref = _scatter(stats), _scatter(ref_stats)
    assert stats.jacobian_scatter.dtype == torch.float64
    assert float((S - S_ref).norm() / S_ref.norm()) < eps
    # The activations are the bfloat16 model's own values, summed in float64.
    G, G_ref = stats.gram, ref_stats.gram
    assert float((G - G_ref).norm() / G_ref.norm()) < eps


def test_model_dtype_of_a_float64_model_is_todays_path():
    """``model_dtype="model"``/``"float64"`` on a float64 model change no bit of the graph."""
    net = _mixer()
    data = _pad(_sequences())
    params = dict(stochastic_positions=2, random_state=0, constant_node=True, verbose=False)
    base = InteractionGraph(**params).fit_model(net, ["resid", "mid", "head"], data,
                                                sequence=True)
    for model_dtype in ("model", "float64"):
        other = InteractionGraph(model_dtype=model_dtype, **params).fit_model(
            net, ["resid", "mid", "head"], data, sequence=True)
        for E, E_ref in zip(other.edges_, base.edges_):
            np.testing.assert_array_equal(E, E_ref)
        for b, b_ref in zip(other.bases_, base.bases_):
            np.testing.assert_array_equal(b.components_, b_ref.components_)


def test_model_dtype_is_checked():
    net = _mixer().to(torch.bfloat16)
    data = _pad(_sequences())
    with pytest.raises(ValueError, match="fast_path=True needs the model in the statistics'"):
        InteractionGraph(model_dtype="model", fast_path=True, verbose=False).fit_model(
            net, ["resid", "mid"], data, sequence=True)
    with pytest.raises(ValueError, match="model_dtype"):
        InteractionGraph(model_dtype="int8", verbose=False).fit_model(
            net, ["resid", "mid"], data, sequence=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_in_other_batches_have_the_same_fingerprint(dtype):
    """Inputs of a float32 or bfloat16 model are projected in float64: batching changes nothing."""
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    whole, parts = Fingerprint(), Fingerprint()
    whole.add(x)
    for rows in (slice(40, 64), slice(0, 7), slice(7, 40)):
        parts.add(x[rows])
    assert whole.difference(parts, "first", "again") is None
    changed = x.clone()
    changed[3, 5] = -changed[3, 5] if changed[3, 5] != 0 else 1
    other = Fingerprint()
    other.add(changed)
    assert whole.difference(other, "first", "again") is not None


# --------------------------------------------------------------------------- selections
def test_a_last_position_that_is_padding_is_refused_not_dropped():
    """Right padding puts '[-1]' on padding for every shorter sequence: said, not dropped."""
    net = _gpt2()
    seqs = _sequences()
    layers = ["transformer.h.0:input", "transformer.h.0[-1]"]
    with pytest.raises(ValueError, match=r"selects positions that are padding in \d+ of the 14"):
        InteractionGraph().fit_model(net, layers, _pad(seqs), sequence=True)
    # Left padding puts every sequence's last token there: each sequence counts once.
    graph = InteractionGraph().fit_model(net, layers, _pad(seqs, side="left"), sequence=True)
    assert graph.bases_[1].n_samples_seen_ == len(seqs)
