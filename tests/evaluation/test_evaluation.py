"""Tests for sklearn_lib.evaluation: node and edge ablations of tiny torch MLPs."""

import builtins
import math

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from torch import nn

from sklearn_lib import PCA as RoutedPCA
from sklearn_lib import InteractionBasis
from sklearn_lib.evaluation import (
    compare_node_ablation,
    directions_to_keep,
    edge_ablated_outputs,
    edge_ablation_curve,
    min_edges_to_keep,
    node_ablation_curve,
)

N, D_IN, D_OUT, N_CLASSES = 200, 5, 6, 3


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def net():
    """Layer l (D_IN) -> tanh section -> layer l+1 (D_OUT) -> linear head -> logits."""
    torch.manual_seed(0)
    section = nn.Sequential(nn.Linear(D_IN, D_OUT), nn.Tanh()).double()
    head = nn.Linear(D_OUT, N_CLASSES).double()
    return section, head


@pytest.fixture
def data(rng, net):
    """Correlated, off-centre activations and the network's labels with 10% flipped."""
    section, head = net
    X = rng.normal(size=(N, D_IN)) @ rng.normal(size=(D_IN, D_IN)) + rng.normal(size=D_IN)
    y = run(nn.Sequential(section, head), X).argmax(1)
    flip = rng.random(N) < 0.1
    y[flip] = rng.integers(0, N_CLASSES, flip.sum())
    return X, y


def run(module, X):
    with torch.no_grad():
        return module(torch.as_tensor(X)).numpy()


def jacobians(fn, X):
    """Per-sample Jacobians (n, d_out, d_in) of a row-wise torch function."""
    return torch.func.vmap(torch.func.jacrev(fn))(torch.as_tensor(X)).detach().numpy()


def cross_entropy(logits, y):
    return float(nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(y)))


def make_basis(kind, X, fn):
    """A fitted full-rank basis of X; ``fn`` is the downstream map for InteractionBasis."""
    if kind == "pca":
        return PCA().fit(X)
    if kind == "routed_pca":
        return RoutedPCA().fit(X)
    if kind == "pipeline":
        return Pipeline([("scale", StandardScaler()), ("pca", PCA())]).fit(X)
    return InteractionBasis(truncation_threshold=1e-12).fit(X, jacobians=jacobians(fn, X))


BASES = ["pca", "routed_pca", "pipeline", "lib"]


def attribution_edges(basis_in, basis_out, section, X):
    """SPEC section 2: E[i, j] = mean_x (J_tilde_x[i, j] * Z[x, j])^2, brute force."""
    C_out = basis_out.components_.T
    C_pinv_in = getattr(basis_in, "inverse_components_", basis_in.components_)
    J_tilde = np.einsum("do,xde,re->xor", C_out, jacobians(section, X), C_pinv_in)
    return np.mean((J_tilde * basis_in.transform(X)[:, None, :]) ** 2, axis=0)


@pytest.fixture
def layer_pair(data, net):
    """Full-rank PCA bases of both layers, the edges between them, and the layer data."""
    X, y = data
    section, head = net
    H = run(section, X)
    basis_in, basis_out = PCA().fit(X), PCA().fit(H)
    E = attribution_edges(basis_in, basis_out, section, X)
    return dict(basis_in=basis_in, basis_out=basis_out, X=X, y=y, section=section,
                forward=head, edges=E)


# --------------------------------------------------------------------------- node ablation
@pytest.mark.parametrize("kind", BASES)
@pytest.mark.parametrize("score", ["accuracy", "loss", "mse"])
def test_all_directions_reproduce_reference(data, net, kind, score):
    X, y = data
    forward = nn.Sequential(*net)
    basis = make_basis(kind, X, forward)
    curve = node_ablation_curve(basis, X, y, forward=forward, score=score, schedule=[D_IN])
    expected = {"accuracy": np.mean(run(forward, X).argmax(1) == y),
                "loss": cross_entropy(run(forward, X), y), "mse": 0.0}[score]
    assert curve.reference.iloc[0] == pytest.approx(expected, rel=1e-12)
    assert curve.score.iloc[0] == pytest.approx(expected, rel=1e-9, abs=1e-20)
    assert abs(curve.degradation.iloc[0]) < 1e-9


@pytest.mark.parametrize("kind", BASES)
def test_top_k_matches_bruteforce(data, net, kind):
    """Zero coordinates k.. with the basis' own transform, map back, run forward, score."""
    X, y = data
    forward = nn.Sequential(*net)
    basis = make_basis(kind, X, forward)
    curve = node_ablation_curve(basis, X, y, forward=forward, score="loss", schedule=[3, 1])
    for k, score in zip(curve.n_directions, curve.score):
        Z = basis.transform(X)
        Z[:, k:] = 0
        expected = cross_entropy(run(forward, basis.inverse_transform(Z)), y)
        assert score == pytest.approx(expected, rel=1e-10)
    assert curve.n_directions.tolist() == [1, 3]


def test_pca_reaches_reference_at_the_rank(rng, net):
    rank = 3
    X = rng.normal(size=(N, rank)) @ rng.normal(size=(rank, D_IN)) + 1.0
    forward = nn.Sequential(*net)
    curve = node_ablation_curve(PCA().fit(X), X, forward=forward, score="mse")
    assert curve.n_directions.tolist() == list(range(1, D_IN + 1))
    assert (curve.score.iloc[: rank - 1] > 1e-6).all()
    assert (curve.score.iloc[rank - 1:] < 1e-24).all()
    assert directions_to_keep(curve, 1e-12) == rank


def test_tensor_input_and_numpy_callables_agree(data, net):
    X, y = data
    section, head = net
    W, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    # A numpy callable for numpy X, a torch callable for tensor X, and the module itself.
    numpy_forward = lambda a: np.tanh(run(section[0], a)) @ W.T + b  # noqa: E731
    basis = PCA().fit(X)
    expected = node_ablation_curve(basis, X, y, forward=nn.Sequential(section, head),
                                   score="loss")
    from_numpy = node_ablation_curve(basis, X, y, forward=numpy_forward, score="loss")
    from_tensor = node_ablation_curve(basis, torch.as_tensor(X), torch.as_tensor(y),
                                      forward=lambda t: head(section(t)), score="loss")
    np.testing.assert_allclose(from_numpy.score, expected.score, rtol=1e-12)
    np.testing.assert_allclose(from_tensor.score, expected.score, rtol=1e-12)


def test_batches_eval_mode_and_float32_modules(data, net):
    X, y = data
    section, head = net
    forward = nn.Sequential(section, nn.Dropout(0.5), head).train()
    basis = PCA().fit(X)
    whole = node_ablation_curve(basis, X, y, forward=forward, score="loss")
    batched = node_ablation_curve(basis, X, y, forward=forward, score="loss", batch_size=7)
    np.testing.assert_allclose(batched.score, whole.score, rtol=1e-12)
    assert all(module.training for module in forward.modules())  # mode restored
    single = node_ablation_curve(basis, X, y, forward=forward.float(), score="loss")
    np.testing.assert_allclose(single.score, whole.score, rtol=1e-5)


def test_default_schedule_is_log_spaced_beyond_64(rng):
    X = rng.normal(size=(150, 100))
    w = rng.normal(size=(100, 2))
    curve = node_ablation_curve(PCA().fit(X), X, forward=lambda a: a @ w, score="mse")
    counts = curve.n_directions.to_numpy()
    assert counts[0] == 1 and counts[-1] == 100 and len(counts) <= 64
    assert np.all(np.diff(counts) > 0)


def test_callable_score_and_direction(data, net):
    X, y = data
    forward = nn.Sequential(*net)
    seen = {}

    def errors(outputs, labels, reference_outputs):
        seen.update(types={type(outputs), type(labels), type(reference_outputs)})
        return float(np.mean(outputs.argmax(1) != labels))

    curve = node_ablation_curve(PCA().fit(X), X, y, forward=forward, score=errors,
                                greater_is_better=False)
    accuracy = node_ablation_curve(PCA().fit(X), X, y, forward=forward)
    assert seen["types"] == {np.ndarray}
    np.testing.assert_allclose(curve.score, 1 - accuracy.score, atol=1e-12)
    np.testing.assert_allclose(curve.degradation, accuracy.degradation, atol=1e-12)


def test_compare_node_ablation_long_frame(data, net):
    X, y = data
    forward = nn.Sequential(*net)
    bases = {"PCA": PCA(4).fit(X), "LIB": make_basis("lib", X, forward)}
    curves = compare_node_ablation(bases, X, y, forward=forward)
    assert curves.columns.tolist() == ["basis", "n_directions", "score", "reference",
                                       "degradation"]
    assert list(dict.fromkeys(curves.basis)) == ["PCA", "LIB"]
    assert curves.groupby("basis", sort=False).size().tolist() == [4, D_IN]
    assert curves.reference.nunique() == 1
    single = node_ablation_curve(bases["LIB"], X, y, forward=forward)
    np.testing.assert_allclose(curves[curves.basis == "LIB"].score, single.score)


def test_dict_results_without_pandas(data, net, monkeypatch):
    X, y = data
    forward = nn.Sequential(*net)
    curve = node_ablation_curve(PCA().fit(X), X, y, forward=forward, as_frame=False)
    assert set(curve) == {"n_directions", "score", "reference", "degradation"}
    assert all(isinstance(v, np.ndarray) for v in curve.values())
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError("No module named 'pandas'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    curves = compare_node_ablation({"PCA": PCA().fit(X)}, X, y, forward=forward)
    assert isinstance(curves, dict) and curves["basis"].tolist() == ["PCA"] * D_IN


# --------------------------------------------------------------------------- directions_to_keep
def curve_dict(scores, reference=1.0, count="n_directions"):
    scores = np.asarray(scores, dtype=float)
    return {count: np.arange(1, len(scores) + 1), "score": scores,
            "reference": np.full(len(scores), reference), "degradation": reference - scores}


@pytest.mark.parametrize(
    "scores, tolerance, relative, expected",
    [([0.5, 0.9, 0.999, 1.0], 0.001, False, 3), ([0.5, 0.9, 0.999, 1.0], 0.0, False, 4),
     ([0.5, 0.9, 0.999, 1.0], 0.2, True, 2), ([0.5, 0.6], 0.1, False, None),
     ([0.5, 1.2, 0.9], 0.01, False, 2)],
)
def test_directions_to_keep(scores, tolerance, relative, expected):
    assert directions_to_keep(curve_dict(scores), tolerance, relative=relative) == expected


def test_directions_to_keep_errors():
    with pytest.raises(ValueError, match="non-negative"):
        directions_to_keep(curve_dict([1.0]), -0.1)
    with pytest.raises(ValueError, match="non-zero reference"):
        directions_to_keep(curve_dict([0.0], reference=0.0), 0.1, relative=True)
    with pytest.raises(ValueError, match="n_directions or n_edges"):
        directions_to_keep({"score": np.ones(2)}, 0.1)
    several = {**curve_dict([1.0, 1.0]), "basis": np.array(["a", "b"])}
    with pytest.raises(ValueError, match="several bases"):
        directions_to_keep(several, 0.1)


# --------------------------------------------------------------------------- edge ablation
@pytest.mark.parametrize("kind_in", BASES)
@pytest.mark.parametrize("kind_out", ["pca", "lib"])
def test_all_edges_reproduce_unablated_network(data, net, kind_in, kind_out):
    X, y = data
    section, head = net
    H = run(section, X)
    # The 3-class head sees only 3 directions of H; a full-rank basis needs a wider map.
    torch.manual_seed(3)
    basis_out = make_basis(kind_out, H, nn.Sequential(nn.Linear(D_OUT, D_OUT), nn.Tanh()).double())
    basis_in = make_basis(kind_in, X, section)
    mask = np.ones((D_OUT, D_IN))
    outputs = edge_ablated_outputs(basis_in, basis_out, X, mask, section=section, forward=head)
    np.testing.assert_allclose(outputs, run(head, H), rtol=1e-10, atol=1e-10)
    E = np.random.default_rng(1).random((D_OUT, D_IN))
    curve = edge_ablation_curve(basis_in, basis_out, X, y, section=section, forward=head,
                                edges=E, schedule=[D_OUT * D_IN], score="loss")
    assert curve.score.iloc[0] == pytest.approx(cross_entropy(run(head, H), y), rel=1e-10)


def test_zero_edges_run_the_section_at_the_mean(data, net):
    """No edge kept: every sample becomes c_in = mean, so outputs are one constant row."""
    X, _ = data
    section, head = net
    H = run(section, X)
    basis_in, basis_out = PCA(3).fit(X), PCA(4).fit(H)  # truncated: projections matter
    outputs = edge_ablated_outputs(basis_in, basis_out, X, np.zeros((4, 3)), section=section,
                                   forward=head)
    at_mean = run(section, basis_in.mean_[None])
    expected = run(head, basis_out.inverse_transform(basis_out.transform(at_mean)))
    np.testing.assert_allclose(outputs, np.repeat(expected, len(X), axis=0), rtol=1e-12)


@pytest.mark.parametrize("mask_kind", ["ones", "zeros", "random"])
def test_linear_section_closed_form(data, net, mask_kind):
    """With s(x) = x @ W.T + b0 the ablation is linear in the kept edges:
    z_out[:, i] = sum_j mask[i, j] z_in[:, j] T[j, i] + t[i], with T = P_in W.T A_out
    and t = (c_in W.T + b0) A_out + b_out; keeping all edges is the plain forward on the
    projected layers."""
    X, _ = data
    _, head = net
    torch.manual_seed(1)
    section = nn.Linear(D_IN, D_OUT).double()
    W, b0 = section.weight.detach().numpy(), section.bias.detach().numpy()
    H = run(section, X)
    basis_in, basis_out = PCA(4).fit(X), PCA(3).fit(H)
    A_out, P_in = basis_out.components_.T, basis_in.components_
    mask = {"ones": np.ones((3, 4)), "zeros": np.zeros((3, 4)),
            "random": (np.random.default_rng(2).random((3, 4)) < 0.5).astype(float)}[mask_kind]
    z_in = basis_in.transform(X)
    T = P_in @ W.T @ A_out
    t = (basis_in.mean_ @ W.T + b0 - basis_out.mean_) @ A_out
    z_out = np.einsum("xj,ij,ji->xi", z_in, mask, T) + t
    expected = run(head, basis_out.inverse_transform(z_out))
    outputs = edge_ablated_outputs(basis_in, basis_out, X, mask, section=section, forward=head)
    np.testing.assert_allclose(outputs, expected, rtol=1e-10, atol=1e-12)
    if mask_kind == "ones":
        projected = basis_in.inverse_transform(basis_in.transform(X))
        plain = run(head, basis_out.inverse_transform(basis_out.transform(run(section, projected))))
        np.testing.assert_allclose(outputs, plain, rtol=1e-10, atol=1e-12)


def test_edge_ablation_tensor_input_returns_tensor(layer_pair):
    p = layer_pair
    X = torch.as_tensor(p["X"])
    outputs = edge_ablated_outputs(p["basis_in"], p["basis_out"], X, np.ones((D_OUT, D_IN)),
                                   section=p["section"], forward=p["forward"], batch_size=16)
    assert isinstance(outputs, torch.Tensor) and outputs.dtype == torch.float64
    np.testing.assert_allclose(outputs.numpy(), run(p["forward"], run(p["section"], p["X"])),
                               rtol=1e-10, atol=1e-10)


def test_edge_curve_is_top_k_by_value(layer_pair):
    p = layer_pair
    curve = edge_ablation_curve(**p, schedule=[5, 1, 30], score="mse")
    assert curve.n_edges.tolist() == [1, 5, 30]
    for k, score in zip(curve.n_edges, curve.score):
        mask = np.zeros(p["edges"].size)
        mask[np.argsort(-p["edges"].ravel(), kind="stable")[:k]] = 1
        outputs = edge_ablated_outputs(p["basis_in"], p["basis_out"], p["X"],
                                       mask.reshape(p["edges"].shape), section=p["section"],
                                       forward=p["forward"])
        reference = run(p["forward"], run(p["section"], p["X"]))
        assert score == pytest.approx(np.mean((outputs - reference) ** 2), rel=1e-10, abs=1e-25)


@pytest.mark.parametrize("tolerance, expected", [(1e-9, 4), (0.2, 3), (0.5, 2), (1.0, 1)])
def test_bisection_matches_linear_scan_on_a_monotone_curve(rng, tolerance, expected):
    """Identity section and head with one PCA basis: the edges are diagonal (var_j) and
    the mse of keeping the top k is the mean variance of the dropped directions."""
    X = rng.normal(size=(N, 4)) * np.sqrt([4.0, 2.0, 1.0, 0.5])
    pca = PCA().fit(X)
    E = attribution_edges(pca, pca, nn.Identity(), X)
    np.testing.assert_allclose(E, np.diag(pca.explained_variance_ * (N - 1) / N), atol=1e-12)
    kwargs = dict(section=nn.Identity(), forward=nn.Identity(), edges=E, score="mse")
    curve = edge_ablation_curve(pca, pca, X, schedule=range(1, 17), **kwargs)
    assert np.all(np.diff(curve.score) <= 1e-15)
    assert directions_to_keep(curve, tolerance) == expected
    result = min_edges_to_keep(pca, pca, X, tolerance=tolerance, **kwargs)
    assert result.n_edges == expected
    assert result.score == pytest.approx(curve.score.iloc[expected - 1], rel=1e-12, abs=1e-25)


@pytest.mark.parametrize("score, tolerance", [("accuracy", 0.001), ("accuracy", 0.02),
                                              ("loss", 0.001), ("mse", 1e-3)])
def test_bisection_brackets_the_answer(layer_pair, score, tolerance):
    """On a noisy curve the search finds a k that passes while k - 1 fails, never fewer
    than the linear scan, within the promised number of evaluations, and every count it
    evaluated below k fails and every one above passes."""
    p = layer_pair
    n_edges = p["edges"].size
    curve = edge_ablation_curve(**p, score=score, schedule=range(1, n_edges + 1))
    result = min_edges_to_keep(**p, score=score, tolerance=tolerance)
    k = result.n_edges
    assert directions_to_keep(curve[curve.n_edges >= k], tolerance) == k
    assert k == 1 or directions_to_keep(curve[curve.n_edges == k - 1], tolerance) is None
    assert k >= directions_to_keep(curve, tolerance)
    assert result.score == pytest.approx(curve.score.iloc[k - 1], rel=1e-12)
    assert result.reference == pytest.approx(curve.reference.iloc[0])
    assert len(result.evaluations) <= 1 + 2 * math.ceil(math.log2(n_edges))
    sign = -1 if score == "accuracy" else 1
    for count, value in result.evaluations.items():
        assert (sign * (value - result.reference) <= tolerance + 1e-12) == (count >= k)
    assert result.evaluations[n_edges] == pytest.approx(curve.score.iloc[-1])


def test_bisection_endpoints(layer_pair):
    p = layer_pair
    # Everything passes a huge tolerance: one edge, found after checking both ends.
    result = min_edges_to_keep(**p, score="mse", tolerance=1e6)
    assert result.n_edges == 1 and list(result.evaluations) == [D_OUT * D_IN, 1]
    truncated = {**p, "basis_in": PCA(2).fit(p["X"]), "edges": p["edges"][:, :2]}
    with pytest.raises(ValueError, match="keeping all 12 edges"):
        min_edges_to_keep(**truncated, score="mse", tolerance=0.0)


# --------------------------------------------------------------------------- bad input
def test_schedule_out_of_range(data, layer_pair):
    X, y = data
    basis = PCA(3).fit(X)
    forward = layer_pair["forward"]
    node = lambda schedule: node_ablation_curve(  # noqa: E731
        basis, X, y, forward=nn.Sequential(layer_pair["section"], forward), schedule=schedule)
    for schedule in ([0, 1], [4], [-2]):
        with pytest.raises(ValueError, match=r"valid range 1\.\.3"):
            node(schedule)
    with pytest.raises(ValueError, match="integer"):
        node([1.5])
    with pytest.raises(ValueError, match="non-empty"):
        node([])
    with pytest.raises(ValueError, match=r"valid range 1\.\.30"):
        edge_ablation_curve(**layer_pair, schedule=[31])
    with pytest.raises(ValueError, match=r"valid range 1\.\.30"):
        edge_ablation_curve(**layer_pair, schedule=[0])


@pytest.mark.parametrize(
    "forward, score, match",
    [(lambda a: a[:-1, :3], "accuracy", "first axis must match"),
     (lambda a: a[:, 0], "accuracy", "logits of shape"),
     (lambda a: a[:, 0], "loss", "logits of shape"),
     (lambda a: np.float64(a.sum()), "mse", "first axis must match"),
     (lambda a: a[:, :2], "accuracy", r"labels in y must lie in 0\.\.1")],
)
def test_forward_output_shape_errors(data, forward, score, match):
    X, y = data
    with pytest.raises(ValueError, match=match):
        node_ablation_curve(PCA().fit(X), X, y, forward=forward, score=score)


def test_label_errors(data):
    X, y = data
    basis, forward = PCA().fit(X), lambda a: a[:, :3]
    with pytest.raises(ValueError, match="needs integer class labels"):
        node_ablation_curve(basis, X, forward=forward)
    with pytest.raises(ValueError, match="199 labels but X has 200"):
        node_ablation_curve(basis, X, y[1:], forward=forward)
    with pytest.raises(ValueError, match="integer class labels"):
        node_ablation_curve(basis, X, y + 0.5, forward=forward)
    # mse needs no labels, 1-D outputs are fine
    assert node_ablation_curve(basis, X, forward=lambda a: a[:, 0], score="mse").shape == (5, 4)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("row", [0, -1])  # in the rows that probe the bases, or later
def test_nan_in_X(data, layer_pair, as_tensor, row):
    X, y = data
    X = X.copy()
    X[row, 2] = np.nan
    X = torch.as_tensor(X) if as_tensor else X
    with pytest.raises(ValueError, match="NaN"):
        node_ablation_curve(PCA().fit(data[0]), X, y, forward=lambda a: a[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        edge_ablation_curve(**{**layer_pair, "X": X})


def test_unfitted_bases(data, layer_pair):
    X, y = data
    for basis in (PCA(), InteractionBasis(), Pipeline([("pca", PCA())])):
        with pytest.raises(NotFittedError):
            node_ablation_curve(basis, X, y, forward=lambda a: a[:, :3])
    with pytest.raises(NotFittedError):
        edge_ablation_curve(**{**layer_pair, "basis_out": InteractionBasis()})


def test_other_bad_input(data, layer_pair):
    X, y = data
    forward = lambda a: a[:, :3]  # noqa: E731
    with pytest.raises(ValueError, match="score must be one of"):
        node_ablation_curve(PCA().fit(X), X, y, forward=forward, score="f1")
    with pytest.raises(ValueError, match="callable scores only"):
        node_ablation_curve(PCA().fit(X), X, y, forward=forward, greater_is_better=False)
    with pytest.raises(ValueError, match="fitted on 4 features"):
        node_ablation_curve(PCA().fit(X[:, :4]), X, y, forward=forward)
    sine = FunctionTransformer(np.sin, inverse_func=np.arcsin, check_inverse=False).fit(X)
    with pytest.raises(ValueError, match="not affine"):
        node_ablation_curve(sine, X, y, forward=forward)
    with pytest.raises(TypeError, match="has no inverse_transform"):
        node_ablation_curve(Normalizer().fit(X), X, y, forward=forward)
    with pytest.raises(TypeError, match="forward must be a callable"):
        node_ablation_curve(PCA().fit(X), X, y, forward="head")
    with pytest.raises(ValueError, match="batch_size"):
        node_ablation_curve(PCA().fit(X), X, y, forward=forward, batch_size=0)
    with pytest.raises(ValueError, match=r"shape \(r_out, r_in\) = \(6, 5\)"):
        edge_ablation_curve(**{**layer_pair, "edges": layer_pair["edges"].T})
    with pytest.raises(ValueError, match=r"mask must have shape"):
        p = layer_pair
        edge_ablated_outputs(p["basis_in"], p["basis_out"], X, np.ones((3, 5)),
                             section=p["section"], forward=p["forward"])
    with pytest.raises(ValueError, match="fitted on 6 features"):
        edge_ablation_curve(**{**layer_pair, "section": lambda a: a})


# --------------------------------------------------------------------------- non-finite
class NaNOnCall:
    """A row-wise head whose outputs turn NaN from its ``n``-th call on (one call per ablation).

    It stands for a network that blows up only on some ablated activations.
    """

    def __init__(self, n, head=lambda a: a[:, :3]):
        self.n, self.calls, self.head = n, 0, head

    def __call__(self, a):
        self.calls += 1
        out = self.head(a)
        return out * np.nan if self.calls >= self.n else out


def curve_of(kind, layer_pair, **kwargs):
    p = layer_pair
    if kind == "node":
        return node_ablation_curve(p["basis_in"], p["X"], p["y"], **kwargs)
    if kind == "edges":
        return edge_ablation_curve(**{**p, **kwargs})
    return min_edges_to_keep(**{**p, **kwargs})


ABLATIONS = ["node", "edges", "bisection"]


@pytest.mark.parametrize("kind", ABLATIONS)
@pytest.mark.parametrize("score", ["accuracy", "loss", "mse", lambda out, y, ref: 1.0])
def test_nan_outputs_of_the_unablated_network_are_refused(layer_pair, kind, score):
    """Before: accuracy of NaN logits was the share of label 0 (argmax of NaN is 0)."""
    with pytest.raises(ValueError, match="forward returned NaN or infinity for the unablated"):
        curve_of(kind, layer_pair, forward=NaNOnCall(1), score=score)


@pytest.mark.parametrize(
    "kind, schedule, match",
    [("node", [1, 2, 4], "with only the top 2 directions of basis kept: 600 of 600"),
     ("edges", [1, 7, 30], "with only the top 7 of 30 edges kept: 600 of 600"),
     # The bisection evaluates all 30 edges, then 1: the second ablation fails.
     ("bisection", None, "with only the top 1 of 30 edges kept")],
)
def test_nan_that_appears_only_after_ablating_names_the_ablation(layer_pair, kind, schedule,
                                                                 match):
    schedule = {} if schedule is None else {"schedule": schedule}
    # Call 1 is the unablated network, call 2 the first ablation, call 3 the second.
    with pytest.raises(ValueError, match=match):
        curve_of(kind, layer_pair, forward=NaNOnCall(3), batch_size=N, **schedule)


def test_infinite_outputs_are_refused(data):
    X, y = data
    with pytest.raises(ValueError, match="NaN or infinity for the unablated"):
        node_ablation_curve(PCA().fit(X), X, y, forward=lambda a: a[:, :3] * np.inf)


def test_an_mse_that_overflows_is_refused(data):
    X, _ = data
    with pytest.raises(ValueError, match=r"score='mse' is inf .*overflow"):
        node_ablation_curve(PCA().fit(X), X, forward=lambda a: a[:, :3] * 1e200, score="mse",
                            schedule=[1])


@pytest.mark.parametrize(
    "score, error, match",
    [(lambda out, y, ref: float("nan"), ValueError, "the callable score is nan"),
     (lambda out, y, ref: np.ones(3), TypeError, r"one number, got ndarray of shape \(3,\)")],
)
def test_callable_scores_must_return_one_finite_number(data, score, error, match):
    X, y = data
    with pytest.raises(error, match=match):
        node_ablation_curve(PCA().fit(X), X, y, forward=lambda a: a[:, :3], score=score)


def test_negative_edges_are_refused(layer_pair):
    edges = layer_pair["edges"].copy()
    edges[2, 1] = -1e-3
    for kind in ("edges", "bisection"):
        with pytest.raises(ValueError, match=r"non-negative .* edges\[2, 1\] = -0\.001"):
            curve_of(kind, layer_pair, edges=edges)


def test_directions_to_keep_refuses_non_finite_degradation():
    curve = curve_dict([0.5, 1.0])
    curve["degradation"] = np.array([np.nan, 0.0])
    with pytest.raises(ValueError, match=r"non-finite degradation at n_directions \[1\]"):
        directions_to_keep(curve, 0.1)


def test_empty_tensor_and_boolean_batch_size_are_refused(data):
    X, y = data
    basis, forward = PCA().fit(X), lambda a: a[:, :3]
    with pytest.raises(ValueError, match=r"at least one sample, got shape \(0, 5\)"):
        node_ablation_curve(basis, torch.as_tensor(X[:0]), y[:0], forward=forward)
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None, got True"):
        node_ablation_curve(basis, X, y, forward=forward, batch_size=True)


# --------------------------------------------------------------------------- sequence layers
@pytest.fixture(scope="module")
def attention_case():
    """The tiny attention model, its embedding activations (n, P, d) and a fitted graph."""
    from _attention import N, P, TinyAttention

    from sklearn_lib import InteractionGraph

    model = TinyAttention().double().eval()
    x = torch.randn(4 * N, P, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    graph = InteractionGraph(edge_point="data").fit_model(
        model, ["embed", "out", "pool", "head"], x, sequence=True)
    with torch.no_grad():
        h = model.embed(x)
    y = run(model, x).argmax(1)
    return model, h, y, graph


def _project(basis, X, keep=None):
    """Brute force: basis coordinates of every position, optionally only the first ``keep``."""
    C, C_pinv, mu = (torch.as_tensor(a) for a in (
        basis.components_.T, basis.inverse_components_, basis.mean_))
    Z = (X - mu) @ C
    if keep is not None:
        Z[..., keep:] = 0
    return Z, lambda Z: Z @ C_pinv + mu


def test_node_ablation_of_a_sequence_layer(attention_case):
    model, h, y, graph = attention_case
    basis = graph.bases_[0]
    readout = lambda H: model.head(torch.tanh(model.mix(H)[:, -1]))  # noqa: E731
    curve = node_ablation_curve(basis, h, forward=readout, score="mse")
    assert curve.n_directions.tolist() == list(range(1, basis.n_components_ + 1))
    with torch.no_grad():
        reference = readout(h)
        for k, score in zip(curve.n_directions, curve.score):
            Z, inverse = _project(basis, h, keep=k)
            expected = ((readout(inverse(Z)) - reference) ** 2).mean().item()
            assert score == pytest.approx(expected, rel=1e-9, abs=1e-15)
    # numpy activations (n, P, d) and a numpy forward give the same curve.
    numpy_curve = node_ablation_curve(
        basis, h.numpy(), forward=lambda H: readout(torch.as_tensor(H)).numpy(), score="mse")
    np.testing.assert_allclose(numpy_curve.score, curve.score, rtol=1e-9, atol=1e-15)


def _brute_force_edge_ablation(basis_in, basis_out, X, mask, section, forward):
    """One section run per output direction, with only its kept input directions."""
    Z, inverse_in = _project(basis_in, X)
    outputs = []
    for i in range(mask.shape[0]):
        h = section(inverse_in(Z * torch.as_tensor(mask[i])))
        outputs.append(_project(basis_out, h)[0][..., i])
    return forward(_project(basis_out, X)[1](torch.stack(outputs, -1)))


@pytest.mark.parametrize("pair", ["attention", "readout"])
def test_edge_ablation_across_positions(attention_case, pair):
    model, h, y, graph = attention_case
    with torch.no_grad():
        out = model.mix(h)
    # Sections and readouts of sequence layers, written as a user would: no reshaping.
    if pair == "attention":  # (n, P, d) -> (n, P, d), mixing positions
        l, X, section = 0, h, model.mix
        forward = lambda Y: model.head(torch.tanh(Y[:, -1]))  # noqa: E731
    else:  # (n, P, d) -> (n, d), the last position only
        l, X, section, forward = 1, out, lambda Y: torch.tanh(Y[:, -1]), model.head
    basis_in, basis_out = graph.bases_[l], graph.bases_[l + 1]
    mask = np.random.default_rng(l).integers(0, 2, size=graph.edges_[l].shape).astype(float)
    got = edge_ablated_outputs(basis_in, basis_out, X, mask, section=section, forward=forward)
    with torch.no_grad():
        expected = _brute_force_edge_ablation(basis_in, basis_out, X, mask, section, forward)
        # Full bases and every edge: the network itself.
        full = edge_ablated_outputs(basis_in, basis_out, X, np.ones_like(mask),
                                    section=section, forward=forward)
        torch.testing.assert_close(full, forward(section(X)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, full)  # the mask matters
    # The curve and the bisection run on the same pair without glue.
    result = min_edges_to_keep(basis_in, basis_out, X, y, section=section, forward=forward,
                               edges=graph.edges_[l], tolerance=0.05)
    curve = edge_ablation_curve(basis_in, basis_out, X, y, section=section, forward=forward,
                                edges=graph.edges_[l], schedule=[result.n_edges])
    assert curve.score.iloc[0] == pytest.approx(result.score, abs=1e-12)
    assert result.reference - result.score <= 0.05 + 1e-12


def test_edges_with_constant_nodes_are_refused_with_the_slice_to_pass(attention_case):
    model, h, y, graph = attention_case
    E = np.pad(graph.edges_[0], ((0, 1), (0, 1)))
    with pytest.raises(ValueError, match=r"edges_\[l\]\[:\d+, :\d+\]"):
        min_edges_to_keep(graph.bases_[0], graph.bases_[1], h, y, section=model.mix,
                          forward=lambda Y: model.head(torch.tanh(Y[:, -1])), edges=E)


@pytest.mark.parametrize("batch_size", [None, 7])
@pytest.mark.parametrize("sequence", [False, True])
def test_node_ablation_outputs_match_one_forward_per_count(attention_case, data, net,
                                                           batch_size, sequence):
    """Counts stacked into one forward call give the outputs of one call per count."""
    if sequence:
        model, X, _, graph = attention_case
        basis = graph.bases_[0]
        forward = lambda H: model.head(torch.tanh(model.mix(H)[:, -1]))  # noqa: E731
    else:
        X, forward = torch.as_tensor(data[0]), nn.Sequential(*net)
        basis = make_basis("lib", data[0], net[0])
    seen = []

    def score(outputs, y, reference):
        seen.append(outputs)
        return 0.0

    curve = node_ablation_curve(basis, X, forward=forward, score=score, batch_size=batch_size)
    assert len(seen) == len(curve) + 1  # the reference first
    with torch.no_grad():
        np.testing.assert_allclose(seen[0], forward(X).numpy(), rtol=1e-10, atol=1e-12)
        for k, outputs in zip(curve.n_directions, seen[1:]):
            Z, inverse = _project(basis, X, keep=k)
            np.testing.assert_allclose(outputs, forward(inverse(Z)).numpy(), rtol=1e-10,
                                       atol=1e-12)
