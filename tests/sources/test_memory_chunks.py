"""Products streamed in chunks: the same graphs, chunks sized to ``memory_limit``.

The model source reduces the vector-Jacobian products of a batch chunk by
chunk of output directions (and positions) into the scatter and the edges, so
that a sample never holds all its products. Chunks of 3 or 5 directions (which
divide neither the columns nor the positions) must give the graph of one chunk
holding everything; the chunk sizes chosen under a ``memory_limit`` must fit it,
and the tensors alive during a pass (counted by
:class:`~sklearn_lib.utils._memory.LiveTensors`) must stay below it.
"""

import pytest
import torch
from _mixers import mixer
from _reference import assert_same_graph_statistics

from sklearn_lib import InteractionGraph
from sklearn_lib.models import _model
from sklearn_lib.models._vjp import SectionProducts
from sklearn_lib.sources import _products
from sklearn_lib.sources._model_source import ModelSource
from sklearn_lib.utils._memory import (
    LiveTensors,
    chunk_vectors,
    parse_memory_limit,
    plan_batch,
)

T, D_IN, D = 5, 2, 4


def _mixer():
    return mixer(D_IN, D)


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, D_IN, generator=g, dtype=torch.float64)


def _padded(X):
    mask = torch.ones(len(X), T, dtype=torch.int64)
    mask[::2, 3:] = 0
    mask[1::3, 4:] = 0
    half = len(X) // 2
    return [{"x": X[:half], "attention_mask": mask[:half]},
            {"x": X[half:], "attention_mask": mask[half:]}]


@pytest.fixture
def chunks(monkeypatch):
    """Force chunks of ``size`` directions; the sizes used are recorded in ``used``."""

    class Chunks:
        used = []

        def force(self, size):
            monkeypatch.setattr(_products, "chunk_vectors", lambda *args: size)

    original = SectionProducts.chunks

    def spy(self, max_vectors):
        for start, chunk in original(self, max_vectors):
            Chunks.used.append((len(chunk), self.n_vectors))
            yield start, chunk

    monkeypatch.setattr(SectionProducts, "chunks", spy)
    return Chunks()


def _chunked_and_whole(chunks, fit, size=3):
    chunks.force(size)
    chunked = fit()
    assert chunks.used and all(c <= size for c, _ in chunks.used)
    # Chunks that cut across columns and output positions.
    assert any(n > size and n % size for _, n in chunks.used), chunks.used
    chunks.used.clear()
    chunks.force(10**9)
    whole = fit()
    assert all(c == n for c, n in chunks.used)
    return chunked, whole


@pytest.mark.parametrize("params", [
    {},
    {"integration": "trapezoid", "n_alphas": 3, "constant_node": True},
    {"stochastic_positions": 2, "random_state": 0, "integration": "gauss-legendre",
     "n_alphas": 2, "constant_node": True},
    {"variant": "global", "constant_node": True},
], ids=["exact", "integration-constant", "stochastic-positions", "global"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_chunked_products_give_the_graph_of_whole_products(chunks, params, padded):
    net, X = _mixer(), _data()
    data = _padded(X) if padded else X
    layers = ["resid", "mid", "head"]

    def fit():
        return InteractionGraph(n_components=2, fast_path=False, edge_point="data",
                                **params).fit_model(net, layers, data, sequence=True)

    chunked, whole = _chunked_and_whole(chunks, fit)
    assert_same_graph_statistics(chunked, whole, tol=1e-12)


@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30,
                                     n_positions=8, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).eval()


GPT2_LAYERS = ["transformer.h.0:input", "transformer.h.0", "transformer.ln_f"]


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 30, (8, 6), generator=torch.Generator().manual_seed(1))


def test_chunked_products_of_gpt2_give_the_graph_of_whole_products(chunks, gpt2, tokens):
    """A real block (attention mixes positions), padded, with the constant node and a path."""
    mask = torch.ones_like(tokens)
    mask[::2, 4:] = 0
    data = [{"input_ids": tokens[:4], "attention_mask": mask[:4]},
            {"input_ids": tokens[4:], "attention_mask": mask[4:]}]

    def fit():
        return InteractionGraph(n_components=6, fast_path=False, constant_node=True,
                                integration="trapezoid", n_alphas=2).fit_model(
            gpt2, GPT2_LAYERS, data, sequence=True)

    chunked, whole = _chunked_and_whole(chunks, fit, size=5)
    assert_same_graph_statistics(chunked, whole, tol=1e-11)


# --------------------------------------------------------------------------- sizing
def test_plan_and_chunks_fit_the_budget():
    # Whole samples when they fit, as many as fit.
    assert plan_batch(10_000, 100, 10, 50) == (16, 50)
    # Else one sample and the largest chunk that fits; then it is exactly full or less.
    n, c = plan_batch(10_000, 100, 10, 5_000)
    assert (n, c) == (1, 990) and 100 + c * 10 <= 10_000 < 100 + (c + 1) * 10
    assert plan_batch(10_000, 9_995, 10, 5) == (0, 0)
    for n in (1, 3, 7):
        c = chunk_vectors(10_000, n, 100, 10, 5_000)
        assert n * (100 + c * 10) <= 10_000 < n * (100 + (c + 1) * 10)
    assert chunk_vectors(10_000, 3, 100, 10, 20) == 20  # never more than there are
    assert chunk_vectors(10_000, 200, 100, 10, 20) == 0


@pytest.mark.parametrize("text, expected", [
    ("4GB", 4 * 10**9), ("4 gb", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5G", 1.5e9),
    (1e6, 10**6), (2**30, 2**30), (None, None),
])
def test_memory_limit_parses(text, expected):
    assert parse_memory_limit(text) == expected


@pytest.mark.parametrize("bad", ["4 parsecs", "GB", "-1GB", 0, -5, True])
def test_memory_limit_refuses_what_is_no_size(bad):
    with pytest.raises(ValueError, match="memory_limit must be"):
        parse_memory_limit(bad)


def _source(net, tokens, memory_limit):
    return ModelSource(net, GPT2_LAYERS[:2], tokens, sequence=True, batch_size=None,
                       device=None, dtype="float64", fast_path=False, verbose=False,
                       memory_limit=memory_limit)


def test_chunks_under_a_memory_limit_fit_it(gpt2, tokens):
    V = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    limit = 3 * 10**6
    source = _source(gpt2, tokens, limit)
    x = tokens[:2]
    act = _model._cast(_model._record_batch(source.model, [source.specs[0]], x)[
        source.specs[0].spec], torch.float64)
    per_sample, per_vector, _ = source._costs_of(0, 1, x, act, V)
    assert per_vector > 0 and per_sample > 0
    products, step = source._product_chunks(0, 1, x, [act], V, check=False)
    assert 1 <= step < products.n_vectors  # this limit needs chunks
    assert 2 * (per_sample + step * per_vector) <= limit < 2 * (per_sample + (step + 1)
                                                                  * per_vector)
    # Whole samples in as large batches as fit, when the budget allows.
    roomy = _source(gpt2, tokens, 10**9)
    assert roomy._plan_batches(0, 1, V) >= len(tokens)


def test_products_that_cannot_fit_are_refused_with_the_size_needed(gpt2, tokens):
    V = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = tokens[:1]
    probe = _source(gpt2, tokens, None)
    act = _model._cast(_model._record_batch(probe.model, [probe.specs[0]], x)[
        probe.specs[0].spec], torch.float64)
    per_sample, per_vector, _ = probe._costs_of(0, 1, x, act, V)
    fits = _source(gpt2, tokens, per_sample + per_vector)
    assert fits._product_chunks(0, 1, x, [act], V, check=False)[1] == 1
    tight = _source(gpt2, tokens, per_sample + per_vector - 1)
    with pytest.raises(ValueError, match=r"one sample with one product vector needs about "
                                         r".*Raise memory_limit to at least"):
        tight._product_chunks(0, 1, x, [act], V, check=False)


def test_too_small_a_memory_limit_says_what_is_needed(gpt2, tokens):
    with pytest.raises(ValueError, match=r"memory_limit=.* is too small .* needs about"):
        InteractionGraph(memory_limit="20kB").fit_model(gpt2, GPT2_LAYERS[:2], tokens,
                                                        sequence=True)
    with pytest.raises(ValueError, match="memory_limit must be"):
        InteractionGraph(memory_limit="lots").fit_model(gpt2, GPT2_LAYERS[:2], tokens,
                                                        sequence=True)


def test_a_pass_under_a_memory_limit_holds_less_than_it(gpt2, tokens):
    """Every tensor a statistics pass creates, counted while alive: below the limit.

    Without a limit the same pass holds more than the limit, so the bound is
    not vacuous; and the statistics are the same.
    """
    from sklearn_lib.basis._stats import InteractionStatistics

    V = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run(limit):
        source = _source(gpt2, tokens, limit)
        new = lambda l, n_outputs: InteractionStatistics(  # noqa: E731
            16, n_outputs, center=True, device=torch.device("cpu"), dtype=torch.float64)
        source.jacobian_stats(0, V, new)  # the costs are measured once, first
        with LiveTensors() as live:
            stats = source.jacobian_stats(0, V, new)
        return live.peak, stats.jacobian_scatter * 4.0 ** stats.jacobian_exponent

    limit = 2 * 10**6
    peak, scatter = run(limit)
    free_peak, free_scatter = run(None)
    assert peak <= limit < free_peak
    torch.testing.assert_close(scatter, free_scatter, rtol=1e-12, atol=0)
