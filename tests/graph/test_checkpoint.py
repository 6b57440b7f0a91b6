"""fit_model(checkpoint=...): resumed and refitted graphs equal fits from scratch."""

import os
import re

import numpy as np
import pytest
import torch
from _mixers import mixer
from numpy.testing import assert_allclose

from sklearn_lib import InteractionGraph
from sklearn_lib.basis._stats import InteractionStatistics
from sklearn_lib.graph._chain import pass_plan
from sklearn_lib.graph._checkpoint import MANIFEST, Checkpoint, data_digest
from sklearn_lib.sources import _model_source

LAYERS = [":input", "1", "3", "4"]
RTOL = 1e-12
# The 3 outputs bound the downstream ranks below some n_components asked for.
pytestmark = pytest.mark.filterwarnings("ignore:n_components=.* is larger than:UserWarning")


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6), torch.nn.Tanh(),
        torch.nn.Linear(6, 3)).double()


def _data(n=120, seed=1):
    return torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _graph(**params):
    # The products (not closed forms) are what a checkpoint saves the cost of.
    params = {"n_components": [4, 3, 3, None], "fast_path": False, "batch_size": 40, **params}
    return InteractionGraph(**params)


def _assert_same(a, b, rtol=RTOL):
    assert list(a.n_components_) == list(b.n_components_)
    for Ea, Eb in zip(a.edges_, b.edges_):
        assert_allclose(Ea, Eb, rtol=rtol, atol=rtol * np.abs(Eb).max())
    for ba, bb in zip(a.bases_, b.bases_):
        assert_allclose(ba.components_, bb.components_, rtol=rtol, atol=rtol)
        assert_allclose(ba.interaction_strengths_, bb.interaction_strengths_, rtol=rtol)
        assert_allclose(ba.mean_, bb.mean_, rtol=rtol, atol=rtol)


@pytest.fixture
def counts(monkeypatch):
    """Calls of each kind of pass and of the vector-Jacobian products, while a test runs."""
    seen = {"activation_stats": 0, "jacobian_stats": 0, "edges": 0, "products": 0}
    for name in ("activation_stats", "jacobian_stats", "edges"):
        method = getattr(_model_source.ModelSource, name)

        def counted(self, *args, _method=method, _name=name, **kwargs):
            seen[_name] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(_model_source.ModelSource, name, counted)
    products = _model_source.ModelSource._product_chunks

    def counted_products(self, *args, **kwargs):
        # One call per batch of a pass's vector-Jacobian products.
        seen["products"] += 1
        return products(self, *args, **kwargs)

    monkeypatch.setattr(_model_source.ModelSource, "_product_chunks", counted_products)
    return seen


class _Interrupt(Exception):
    pass


def _interrupt_at(monkeypatch, name, call):
    """Make the ``call``-th call of ModelSource.``name`` raise (as a kill would stop it)."""
    method, n = getattr(_model_source.ModelSource, name), [0]

    def failing(self, *args, **kwargs):
        n[0] += 1
        if n[0] == call:
            raise _Interrupt(f"{name} #{call}")
        return method(self, *args, **kwargs)

    monkeypatch.setattr(_model_source.ModelSource, name, failing)


def _statuses(graph):
    return [(e["pass"], e["layer"], e["status"]) for e in graph.checkpoint_log_]


def test_resume_after_an_interrupted_pass_loads_completed_passes(tmp_path, monkeypatch):
    net, X = _net(), _data()
    path = tmp_path / "ck"
    reference = _graph().fit_model(net, LAYERS, X)
    with monkeypatch.context() as m:
        # Killed in the Jacobian pass of layer 1, after the final layer's and layer 2's.
        _interrupt_at(m, "jacobian_stats", 2)
        with pytest.raises(_Interrupt):
            _graph().fit_model(net, LAYERS, X, checkpoint=path)
    names = sorted(p for p in os.listdir(path) if p != MANIFEST)
    assert [re.sub(r"-[0-9a-f]{32}", "", p) for p in names] == [
        "activations-3.npz", "jacobians-2.npz"]

    seen = {"jacobian_stats": 0, "activation_stats": 0}
    for name in seen:
        method = getattr(_model_source.ModelSource, name)

        def counted(self, *args, _method=method, _name=name, **kwargs):
            seen[_name] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(_model_source.ModelSource, name, counted)
    resumed = _graph().fit_model(net, LAYERS, X, checkpoint=path)
    # Only layers 1 and 0 are computed again; nothing of the final layer.
    assert seen == {"jacobian_stats": 2, "activation_stats": 0}
    assert _statuses(resumed)[:3] == [("activations", 3, "loaded"), ("jacobians", 2, "loaded"),
                                      ("jacobians", 1, "computed")]
    _assert_same(resumed, reference)
    assert resumed.n_samples_seen_ == reference.n_samples_seen_ == 120


def test_interrupted_within_a_pass_at_a_batch(tmp_path, monkeypatch, counts):
    """A kill in the middle of an edge pass: the completed statistics are all reused."""
    net, X = _net(), _data()
    path = tmp_path / "ck"
    reference = _graph().fit_model(net, LAYERS, X)
    calls = [0]
    products = _model_source.ModelSource._product_chunks

    def failing(self, *args, **kwargs):
        calls[0] += 1
        # 3 Jacobian passes of 3 batches each, then the first edge pass's second batch.
        if calls[0] == 3 * 3 + 2:
            raise _Interrupt("batch")
        return products(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(_model_source.ModelSource, "_product_chunks", failing)
        with pytest.raises(_Interrupt):
            _graph().fit_model(net, LAYERS, X, checkpoint=path)
    for key in counts:
        counts[key] = 0
    resumed = _graph().fit_model(net, LAYERS, X, checkpoint=path)
    assert counts["jacobian_stats"] == 0 and counts["activation_stats"] == 0
    assert counts["edges"] == 3
    assert counts["products"] == 3 * 3  # the edge passes' batches only
    _assert_same(resumed, reference)


def test_complete_checkpoint_computes_no_products(tmp_path, counts):
    net, X = _net(), _data()
    first = _graph().fit_model(net, LAYERS, X, checkpoint=tmp_path / "ck")
    assert {s for _, _, s in _statuses(first)} == {"computed"}
    assert counts["products"] > 0
    for key in counts:
        counts[key] = 0
    again = _graph().fit_model(net, LAYERS, X, checkpoint=tmp_path / "ck")
    assert counts == {"activation_stats": 0, "jacobian_stats": 0, "edges": 0, "products": 0}
    assert {s for _, _, s in _statuses(again)} == {"loaded"}
    # Loaded statistics are stored float for float: the same numbers exactly.
    _assert_same(again, first, rtol=0)


def test_refit_other_n_components_reuses_what_is_valid(tmp_path, counts):
    net, X = _net(), _data()
    path = tmp_path / "ck"
    _graph(n_components=[4, 4, 4, None]).fit_model(net, LAYERS, X, checkpoint=path)
    # Only layer 1 changes: the statistics of layers 3, 2 and 1 stay valid (their
    # downstream bases are unchanged); layer 0's were made with layer 1's old basis.
    for key in counts:
        counts[key] = 0
    refit = _graph(n_components=[4, 2, 4, None]).fit_model(net, LAYERS, X, checkpoint=path)
    log = refit.checkpoint_log_
    assert [(e["pass"], e["layer"], e["status"]) for e in log] == [
        ("activations", 3, "loaded"), ("jacobians", 2, "loaded"), ("jacobians", 1, "loaded"),
        ("jacobians", 0, "computed"), ("edges", 0, "computed"), ("edges", 1, "computed"),
        ("edges", 2, "loaded")]
    assert "downstream basis" in log[3]["reason"]
    assert counts["jacobian_stats"] == 1 and counts["edges"] == 2
    _assert_same(refit, _graph(n_components=[4, 2, 4, None]).fit_model(net, LAYERS, X))


def test_refit_of_the_last_rotated_layer_and_the_threshold(tmp_path):
    net, X = _net(), _data()
    path = tmp_path / "ck"
    params = {"final_layer": "pca", "n_components": [4, 3, 3, 3]}
    _graph(**params).fit_model(net, LAYERS, X, checkpoint=path)
    params = {"final_layer": "pca", "n_components": [4, 3, 3, 2], "truncation_threshold": 1e-8}
    refit = _graph(**params).fit_model(net, LAYERS, X, checkpoint=path)
    assert refit.checkpoint_log_[0]["status"] == "loaded"  # the final layer's PCA statistics
    assert refit.checkpoint_log_[1]["status"] == "computed"
    _assert_same(refit, _graph(**params).fit_model(net, LAYERS, X))


@pytest.mark.parametrize("params", [
    {"variant": "global"},
    {"basis": "pca"},
    {"stochastic_sources": 2, "random_state": 0, "constant_node": True},
    {"integration": "gauss-legendre", "n_alphas": 3, "edge_point": "data"},
])
def test_resume_equals_from_scratch_for_other_settings(tmp_path, monkeypatch, params):
    net, X = _net(), _data()
    path = tmp_path / "ck"
    reference = _graph(**params).fit_model(net, LAYERS, X)
    with monkeypatch.context() as m:
        _interrupt_at(m, "edges", 2)
        with pytest.raises(_Interrupt):
            _graph(**params).fit_model(net, LAYERS, X, checkpoint=path)
    resumed = _graph(**params).fit_model(net, LAYERS, X, checkpoint=path)
    statuses = [s for _, _, s in _statuses(resumed)]
    assert statuses[0] == "loaded" and statuses[-2:] == ["computed", "computed"]
    _assert_same(resumed, reference)


def test_unseeded_stochastic_passes_are_not_reused(tmp_path):
    net, X = _net(), _data()
    path = tmp_path / "ck"
    _graph(stochastic_sources=2).fit_model(net, LAYERS, X, checkpoint=path)
    again = _graph(stochastic_sources=2).fit_model(net, LAYERS, X, checkpoint=path)
    # Other random cotangents: the Jacobian statistics cannot be those saved.
    assert again.checkpoint_log_[1]["status"] == "computed"


def test_sequence_model_with_stochastic_positions(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GELU(),
                              torch.nn.Linear(6, 3)).double()
    X = torch.randn(30, 5, 4, dtype=torch.float64)
    layers = [":input", "1", "2"]
    params = {"n_components": [3, 3, None], "stochastic_positions": 2, "random_state": 3,
              "fast_path": False}
    reference = InteractionGraph(**params).fit_model(net, layers, X, sequence=True)
    first = InteractionGraph(**params).fit_model(net, layers, X, sequence=True,
                                                 checkpoint=tmp_path / "ck")
    again = InteractionGraph(**params).fit_model(net, layers, X, sequence=True,
                                                 checkpoint=tmp_path / "ck")
    assert {s for _, _, s in _statuses(again)} == {"loaded"}
    _assert_same(first, reference)
    _assert_same(again, reference)
    # Loaded passes keep the error bars of their random sources.
    assert reference.bases_[0].interaction_strengths_std_ is not None
    for ref, loaded in zip(reference.bases_, again.bases_):
        if ref.interaction_strengths_std_ is None:
            assert loaded.interaction_strengths_std_ is None
        else:
            np.testing.assert_allclose(loaded.interaction_strengths_std_,
                                       ref.interaction_strengths_std_, rtol=1e-12)
    for ref, loaded in zip(reference.edges_std_, again.edges_std_):
        np.testing.assert_allclose(loaded, ref, rtol=1e-12)


def test_sharded_stochastic_fit_keeps_its_error_bars(tmp_path):
    """Every shard draws its own combinations; their groups merge like their statistics."""
    net = mixer(2, 4)  # mixes positions: random combinations of them are noisy
    X = torch.randn(60, 5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layers = ["resid", "mid"]
    params = {"stochastic_positions": 8, "random_state": 3}
    whole = InteractionGraph(**params).fit_model(net, layers, X, sequence=True)
    sharded = InteractionGraph(**params).fit_model(net, layers, X, sequence=True,
                                                   checkpoint=tmp_path / "ck",
                                                   checkpoint_every=20)
    again = InteractionGraph(**params).fit_model(net, layers, X, sequence=True,
                                                 checkpoint=tmp_path / "ck", checkpoint_every=20)
    assert {s for _, _, s in _statuses(again)} == {"loaded"}
    _assert_same(again, sharded)
    np.testing.assert_allclose(again.edges_std_[0], sharded.edges_std_[0], rtol=1e-12)
    np.testing.assert_allclose(again.bases_[0].interaction_strengths_std_,
                               sharded.bases_[0].interaction_strengths_std_, rtol=1e-12)
    # Other draws than the unsharded fit's, but error bars of the whole data set:
    # the same size as the unsharded fit's (a shard's alone would be sqrt(3) larger).
    for fit in (sharded, whole):
        assert np.all(np.isfinite(fit.bases_[0].interaction_strengths_std_))
    ratio = (np.mean(sharded.bases_[0].interaction_strengths_std_
                     / sharded.bases_[0].interaction_strengths_)
             / np.mean(whole.bases_[0].interaction_strengths_std_
                       / whole.bases_[0].interaction_strengths_))
    assert 0.6 < ratio < 1.5, ratio
    edge_ratio = np.mean(sharded.edges_std_[0]) / np.mean(whole.edges_std_[0])
    assert 0.6 < edge_ratio < 1.5, edge_ratio


def test_other_data_or_model_are_refused(tmp_path):
    net, X = _net(), _data()
    path = tmp_path / "ck"
    _graph().fit_model(net, LAYERS, X, checkpoint=path)
    files = sorted(os.listdir(path))
    changed = X.clone()
    changed[17, 2] += 1e-12
    with pytest.raises(ValueError, match="holds passes over other data: 120 samples"):
        _graph().fit_model(net, LAYERS, changed, checkpoint=path)
    with pytest.raises(ValueError, match="over other data: 120 samples .* are 119 samples"):
        _graph().fit_model(net, LAYERS, X[:119], checkpoint=path)
    other = _net()
    with torch.no_grad():
        other[2].weight[0, 0] += 1e-12
    with pytest.raises(ValueError, match="holds passes of another model"):
        _graph().fit_model(other, LAYERS, X, checkpoint=path)
    buffered = _net()
    buffered.register_buffer("scale", torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="another model"):
        _graph().fit_model(buffered, LAYERS, X, checkpoint=path)
    assert sorted(os.listdir(path)) == files


def test_data_digest_is_order_free_and_exact():
    X = _data(50)
    digest, n = data_digest(X, 7, torch.float64)
    assert n == 50
    assert data_digest(X[torch.randperm(50)], 13, torch.float64) == (digest, 50)
    assert data_digest(X.numpy(), 50, torch.float64) == (digest, 50)
    Y = X.clone()
    Y[3, 1] = np.nextafter(Y[3, 1].item(), 2.0)
    assert data_digest(Y, 7, torch.float64)[0] != digest
    # Two samples swapping a number between them change the digest too.
    Z = X.clone()
    Z[0, 0], Z[1, 0] = X[1, 0], X[0, 0]
    assert data_digest(Z, 7, torch.float64)[0] != digest


def test_padding_does_not_change_the_data_digest():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    wider = {"input_ids": torch.cat([ids, torch.zeros(2, 2, dtype=ids.dtype)], 1),
             "attention_mask": torch.cat([mask, torch.zeros(2, 2, dtype=mask.dtype)], 1)}
    assert data_digest({"input_ids": ids, "attention_mask": mask}, 2, torch.float64) == \
        data_digest(wider, 2, torch.float64)


def test_foreign_files_are_never_touched(tmp_path):
    net, X = _net(), _data()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a checkpoint of sklearn_lib"):
        _graph().fit_model(net, LAYERS, X, checkpoint=folder)
    assert os.listdir(folder) == ["notes.txt"]
    (tmp_path / "file").write_text("mine")
    with pytest.raises(NotADirectoryError):
        _graph().fit_model(net, LAYERS, X, checkpoint=tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"

    path = tmp_path / "ck"
    _graph().fit_model(net, LAYERS, X, checkpoint=path)
    (path / "notes.txt").write_text("mine")
    saved = {p: (path / p).read_bytes() for p in os.listdir(path)}
    _graph(n_components=[2, 2, 2, None]).fit_model(net, LAYERS, X, checkpoint=path)
    for name, content in saved.items():
        assert (path / name).read_bytes() == content
    # A pass file that is not what its name says is refused and left alone.
    victim = next(p for p in saved if p.startswith("edges-2"))
    (path / victim).write_bytes(b"not a pass")
    with pytest.raises(ValueError, match="cannot be read as the pass it names"):
        _graph().fit_model(net, LAYERS, X, checkpoint=path)
    assert (path / victim).read_bytes() == b"not a pass"
    (path / MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match="has format None"):
        _graph().fit_model(net, LAYERS, X, checkpoint=path)
    with pytest.raises(ValueError, match="distributed"):
        _graph().fit_model(net, LAYERS, X, checkpoint=tmp_path / "d", distributed=True)


def test_statistics_are_stored_exactly(tmp_path):
    """Ill-conditioned activations (Jacobians squared in a frame) survive the round trip."""
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    X = rng.standard_normal((200, 6)) @ np.diag(10.0 ** np.arange(0, 12, 2)) @ Q
    J = rng.standard_normal((200, 3, 6))
    stats = InteractionStatistics(6, 3, center=True, device="cpu", dtype=torch.float64)
    for rows in np.array_split(np.arange(200), 5):
        stats.update(X[rows], J[rows])
    assert stats.factors().frame is not None
    identity = {"data": "0" * 32, "n_samples": 200, "model": "m"}
    store = Checkpoint(tmp_path / "ck", identity, {}, torch.device("cpu"))
    store.run("jacobians", 0, {"k": 1}, lambda: stats)
    loaded, was_loaded = Checkpoint(tmp_path / "ck", identity, {}, torch.device("cpu")).run(
        "jacobians", 0, {"k": 1}, lambda: pytest.fail("recomputed"))
    assert was_loaded
    a, b = stats.factors(), loaded.factors()
    for name in ("mean", "factor", "jacobian_gram", "jacobian_bound", "signed_sums"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.frame.matrix(), b.frame.matrix())
    assert (a.weight, a.n_samples, a.factor_exponent, a.jacobian_exponent) == \
        (b.weight, b.n_samples, b.factor_exponent, b.jacobian_exponent)
    # Loaded statistics merge like the originals (a copy of the frame is another
    # frame to the merge, which then changes frame: equal to rounding).
    merged, expected = loaded + stats, stats + stats
    M = expected.jacobian_gram.numpy()
    assert_allclose(merged.jacobian_gram.numpy(), M, rtol=0, atol=1e-12 * np.abs(M).max())
    assert_allclose(merged.gram.numpy(), expected.gram.numpy(), rtol=1e-12, atol=1e-12)


def test_pass_plan_counts_every_pass():
    assert pass_plan(InteractionGraph(), 4) == [
        ("activations", 3), ("jacobians", 2), ("jacobians", 1), ("jacobians", 0),
        ("edges", 0), ("edges", 1), ("edges", 2)]
    assert len(pass_plan(InteractionGraph(variant="global"), 4)) == 7
    assert pass_plan(InteractionGraph(basis="pca"), 2) == [("activations", 1),
                                                           ("activations", 0), ("edges", 0)]


def _final_bar(text):
    """``(n, total)`` of the whole fit's bar, as tqdm last drew it."""
    found = re.findall(r"InteractionGraph:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", text)
    return tuple(int(v) for v in found[-1])


def test_one_progress_bar_over_every_sample_of_every_pass(tmp_path, capsys):
    net, X = _net(), _data()
    _graph(verbose=True).fit_model(net, LAYERS, X)
    assert _final_bar(capsys.readouterr().err) == (7 * 120, 7 * 120)
    _graph(verbose=True).fit_model(net, LAYERS, X, checkpoint=tmp_path / "ck")
    capsys.readouterr()
    # A refit computes 3 passes: the bar's total (and its ETA) counts only those.
    _graph(verbose=True, n_components=[4, 2, 3, None]).fit_model(
        net, LAYERS, X, checkpoint=tmp_path / "ck")
    assert _final_bar(capsys.readouterr().err) == (3 * 120, 3 * 120)


def test_progress_of_a_data_loader(capsys):
    net, X = _net(), _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=32)
    _graph(verbose=True).fit_model(net, LAYERS, loader)
    assert _final_bar(capsys.readouterr().err) == (7 * 120, 7 * 120)


def test_checkpoint_every_resumes_within_a_pass(tmp_path, monkeypatch, counts):
    """Shards of 40 samples (batches of 40): killed in shard 2 of layer 1's Jacobian pass."""
    net, X = _net(), _data()
    params = {"batch_size": 40}
    unsharded = _graph(**params).fit_model(net, LAYERS, X)
    whole = _graph(**params).fit_model(net, LAYERS, X, checkpoint=tmp_path / "a",
                                       checkpoint_every=50)
    # Merged shards: the unsharded fit to rounding.
    _assert_same(whole, unsharded, rtol=1e-10)
    calls = [0]
    products = _model_source.ModelSource._product_chunks

    def failing(self, *args, **kwargs):
        calls[0] += 1
        # Layer 2's pass (3 shards of one batch), then layer 1's first shard.
        if calls[0] == 3 + 2:
            raise _Interrupt("shard")
        return products(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(_model_source.ModelSource, "_product_chunks", failing)
        with pytest.raises(_Interrupt):
            _graph(**params).fit_model(net, LAYERS, X, checkpoint=tmp_path / "b",
                                       checkpoint_every=50)
    counts["products"] = 0
    resumed = _graph(**params).fit_model(net, LAYERS, X, checkpoint=tmp_path / "b",
                                         checkpoint_every=50)
    # Two shards of layer 1 and every shard of layer 0 and of the 3 edge passes.
    assert counts["products"] == 2 + 3 + 3 * 3
    log = resumed.checkpoint_log_
    assert log[2]["status"] == "resumed"
    assert log[2]["shards"] == ["loaded", "computed", "computed"]
    _assert_same(resumed, whole, rtol=0)


def test_checkpoint_every_is_refused_where_it_cannot_shard(tmp_path):
    net, X = _net(), _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=32)
    with pytest.raises(ValueError, match="checkpoint_every needs array data"):
        _graph().fit_model(net, LAYERS, loader, checkpoint=tmp_path / "a", checkpoint_every=40)
    with pytest.raises(ValueError, match="with a checkpoint directory"):
        _graph().fit_model(net, LAYERS, X, checkpoint_every=40)
    with pytest.raises(ValueError, match="positive int"):
        _graph().fit_model(net, LAYERS, X, checkpoint=tmp_path / "a", checkpoint_every=0)
    assert not os.path.exists(tmp_path / "a")
