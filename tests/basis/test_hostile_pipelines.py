"""Hostile battery, issue 20 class 3: Jacobians carried through pipelines, checked by brute force.

For ``y = x @ A + b`` the downstream's Jacobians with respect to ``y`` are
``J_y = J_x @ inv(A).T`` (row vectors: ``J_x = J_y @ A.T``). Every case that
must succeed is compared with a brute-force reference: the affine map of the
steps before the basis written out from their fitted attributes (never probed),
``Xt = X @ A + b``, ``Jt = J @ inv(A).T``, and the naive numpy basis of SPEC
section 1 (``_reference.reference_basis``) on ``(Xt, Jt)``. Every case that must
fail must do so with a message in our words that names the step and the fix,
and without scikit-learn's own warnings or errors leaking out.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
import sklearn
from _reference import random_invertible, reference_basis
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import FeatureUnion, Pipeline, make_pipeline
from sklearn.preprocessing import (
    FunctionTransformer,
    KBinsDiscretizer,
    Normalizer,
    PolynomialFeatures,
    QuantileTransformer,
    StandardScaler,
)

from sklearn_lib import PCA as RoutedPCA
from sklearn_lib import InteractionBasis, make_interaction_pipeline
from sklearn_lib.metrics import InteractionSparsityScorer, gini

N, D, O = 240, 4, 3


# --------------------------------------------------------------------------- helpers
def _affine_fn(x, A, b):
    return np.asarray(x) @ A + b


def _affine_inverse(z, A, b):
    return (np.asarray(z) - b) @ np.linalg.inv(A)


def _lin(seed, cond=10.0):
    """An invertible affine step whose map the reference reads from ``kw_args``."""
    A = random_invertible(seed, D, np.log(cond))
    b = np.arange(D) - 1.5
    return FunctionTransformer(_affine_fn, inverse_func=_affine_inverse, kw_args={"A": A, "b": b},
                               inv_kw_args={"A": A, "b": b}, feature_names_out="one-to-one")


def _bilinear(x, w):
    """``x + x0 * x1 * w``: the identity on the axes and wherever ``x0 = 0``, not affine."""
    x = np.asarray(x)
    return x + (x[:, :1] * x[:, 1:2]) * w


def _compose(first, second):
    """The affine map ``x -> (x @ A1 + b1) @ A2 + b2``; None is the identity."""
    if first is None or second is None:
        return second if first is None else first
    (A1, b1), (A2, b2) = first, second
    return A1 @ A2, b1 @ A2 + b2


def _affine_of(step):
    """The fitted affine map of a step, written out from its fitted attributes."""
    if step is None or (isinstance(step, str) and step == "passthrough"):
        return None
    if isinstance(step, Pipeline):
        total = None
        for _, sub in step.steps:
            total = _compose(total, _affine_of(sub))
        return total
    if isinstance(step, StandardScaler):
        A = np.diag(1 / step.scale_)
        return A, -step.mean_ @ A
    if isinstance(step, PCA):
        A = step.components_.T
        if step.whiten:
            A = A / np.sqrt(step.explained_variance_)
        return A, -step.mean_ @ A
    if isinstance(step, FunctionTransformer) and step.func is _affine_fn:
        return step.kw_args["A"], step.kw_args["b"]
    raise NotImplementedError(type(step).__name__)


def _basis_and_map(est, path):
    """The estimator at ``path`` (indices into steps / transformer lists) and the map before it."""
    total = None
    for i in path:
        if isinstance(est, Pipeline):
            for _, step in est.steps[:i]:
                total = _compose(total, _affine_of(step))
            est = est.steps[i][1]
        else:  # FeatureUnion: every transformer sees the union's input
            est = est.transformer_list[i][1]
    return est, total


def _reference_lambda(X, J, affine, sample_weight=None):
    A, b = affine if affine is not None else (np.eye(D), np.zeros(D))
    _, _, L, _ = reference_basis(X @ A + b, J @ np.linalg.inv(A).T, sample_weight=sample_weight)
    return L


def _reference_edges(X_train, J_train, X_test, J_test, affine, n_components=None):
    """Brute-force edge matrix of the reference basis, fitted on train, on the test rows."""
    A, b = affine if affine is not None else (np.eye(D), np.zeros(D))
    inv_T = np.linalg.inv(A).T
    C, C_pinv, _, mu = reference_basis(X_train @ A + b, J_train @ inv_T,
                                       n_components=n_components)
    Z = (X_test @ A + b - mu) @ C
    J_hat = J_test @ inv_T @ C_pinv.T
    return np.mean((J_hat * Z[:, None, :]) ** 2, axis=0)


def _assert_lambda(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-9 * expected.max())


@pytest.fixture
def data(rng):
    X = rng.normal(size=(N, D)) @ random_invertible(7, D, np.log(30.0)) * [1.0, 3.0, 0.5, 2.0]
    J = rng.normal(size=(N, O, D)) + rng.normal(size=(O, D))
    return X, J


@pytest.fixture
def no_foreign_warnings():
    """Any warning raised in the case fails it (scikit-learn's feature-name warning included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------------------- cases that must work
# id: (builder, path to the basis, non-routing key or None when only routing can pass it)
FIT_CASES = {
    "nested-plain": (
        lambda: make_interaction_pipeline(StandardScaler(), make_pipeline(_lin(1), InteractionBasis())),
        [1, 1], "pipeline__interactionbasis__jacobians"),
    "nested-plain-depth2": (
        lambda: make_interaction_pipeline(
            StandardScaler(), make_pipeline(_lin(1), make_pipeline(_lin(2), InteractionBasis()))),
        [1, 1, 1], "pipeline__pipeline__interactionbasis__jacobians"),
    "nested-plain-depth3-passthrough": (
        lambda: make_interaction_pipeline(
            _lin(3), make_pipeline("passthrough", make_pipeline(
                StandardScaler(), make_pipeline(_lin(4), InteractionBasis())))),
        [1, 1, 1, 1], "pipeline__pipeline__pipeline__interactionbasis__jacobians"),
    "nested-plain-named-steps": (
        lambda: make_interaction_pipeline(
            PCA(whiten=True), Pipeline([("lin", _lin(5)), ("basis", InteractionBasis())])),
        [1, 1], "pipeline__basis__jacobians"),
    "nested-interaction-pipeline": (
        lambda: make_interaction_pipeline(
            StandardScaler(), make_interaction_pipeline(_lin(6), InteractionBasis())),
        [1, 1], "interactionpipeline__interactionbasis__jacobians"),
    "nested-plain-as-prefix": (
        lambda: make_interaction_pipeline(make_pipeline(StandardScaler(), _lin(1)), InteractionBasis()),
        [1], "interactionbasis__jacobians"),
    "featureunion-of-basis": (
        lambda: make_interaction_pipeline(
            _lin(8), FeatureUnion([("ib", InteractionBasis()), ("pca", RoutedPCA())])),
        [1, 0], "featureunion__jacobians"),
    "featureunion-of-nested-plain": (
        lambda: make_interaction_pipeline(
            StandardScaler(), FeatureUnion([("p", make_pipeline(_lin(9), InteractionBasis())),
                                            ("pca", RoutedPCA())])),
        [1, 0, 1], None),
    "passthrough-and-none": (
        lambda: make_interaction_pipeline("passthrough", StandardScaler(), None, _lin(10),
                                          InteractionBasis()),
        [4], "interactionbasis__jacobians"),
    "pca-whiten-then-rotation": (
        lambda: make_interaction_pipeline(PCA(whiten=True), _lin(11, 1e3), InteractionBasis()),
        [2], "interactionbasis__jacobians"),
}


@pytest.mark.parametrize("routing_on", [True, False], ids=["routing", "no-routing"])
@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fitted_basis_equals_brute_force_on_converted_jacobians(data, case, routing_on):
    X, J = data
    build, path, key = FIT_CASES[case]
    if not routing_on and key is None:
        pytest.skip("this nesting passes Jacobians only with metadata routing")
    with sklearn.config_context(enable_metadata_routing=routing_on):
        pipe = build().fit(X, **{"jacobians" if routing_on else key: J})
    basis, affine = _basis_and_map(pipe, path)
    _assert_lambda(basis.interaction_strengths_, _reference_lambda(X, J, affine))


def test_columntransformer_prefix_that_permutes_and_scales_is_carried(routing, data):
    X, J = data
    ct = ColumnTransformer([("s", StandardScaler(), [2, 0]), ("rest", "passthrough", [3, 1])])
    pipe = make_interaction_pipeline(ct, InteractionBasis()).fit(X, jacobians=J)
    scaler = pipe[0].named_transformers_["s"]
    A = np.zeros((D, D))
    A[[2, 0], [0, 1]] = 1 / scaler.scale_
    A[[3, 1], [2, 3]] = 1.0
    b = np.r_[-scaler.mean_ / scaler.scale_, 0.0, 0.0]
    _assert_lambda(pipe[-1].interaction_strengths_, _reference_lambda(X, J, (A, b)))


def test_ill_scaled_features_are_not_refused(routing, rng):
    """Offsets of 1e6 and spreads of 1e-3: an affine scaler, however scaled, is accepted."""
    X = 1e6 + rng.normal(size=(N, D)) * [1e-3, 1.0, 1e3, 1e-2]
    J = rng.normal(size=(N, O, D))
    pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis()).fit(X, jacobians=J)
    A = np.diag(1 / pipe[0].scale_)
    _assert_lambda(pipe[-1].interaction_strengths_, _reference_lambda(X, J, (A, -pipe[0].mean_ @ A)))


def test_float32_data_through_a_scaler_are_not_refused(routing, data):
    X, J = data
    X32 = X.astype(np.float32)
    pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis()).fit(X32, jacobians=J)
    A = np.diag(1 / pipe[0].scale_)
    expected = _reference_lambda(X32.astype(np.float64), J, (A, -pipe[0].mean_ @ A))
    np.testing.assert_allclose(pipe[-1].interaction_strengths_, expected, rtol=1e-4)


def test_sample_weight_routed_with_the_jacobians(routing, data, rng):
    X, J = data
    w = rng.uniform(0.1, 3.0, size=N)
    pipe = make_interaction_pipeline(StandardScaler().set_fit_request(sample_weight=True),
                                     _lin(12),
                                     InteractionBasis().set_fit_request(sample_weight=True))
    pipe.fit(X, jacobians=J, sample_weight=w)
    affine = _compose(_affine_of(pipe[0]), _affine_of(pipe[1]))
    _assert_lambda(pipe[-1].interaction_strengths_, _reference_lambda(X, J, affine, w))


# --------------------------------------------------------------------------- pandas
@pytest.mark.parametrize("set_output", [True, False], ids=["set_output-pandas", "dataframe-only"])
def test_dataframe_input_is_probed_without_feature_name_warnings(routing, data, set_output,
                                                                 no_foreign_warnings):
    X, J = data
    Xdf = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    pipe = make_interaction_pipeline(StandardScaler(), _lin(13), InteractionBasis())
    if set_output:
        pipe.set_output(transform="pandas")
    pipe.fit(Xdf, jacobians=J)
    affine = _compose(_affine_of(pipe[0]), _affine_of(pipe[1]))
    _assert_lambda(pipe[-1].interaction_strengths_, _reference_lambda(X, J, affine))
    assert np.isfinite(pipe.score(Xdf, jacobians=J))
    expected = gini(_reference_edges(X, J, X, J, affine))
    assert InteractionSparsityScorer()(pipe, Xdf, jacobians=J) == pytest.approx(expected, rel=1e-6)


def test_grid_search_on_dataframes_with_pandas_output_warns_nothing(routing, data,
                                                                    no_foreign_warnings):
    X, J = data
    Xdf = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis()).set_output(
        transform="pandas")
    grid = GridSearchCV(pipe, {"interactionbasis__n_components": [2, 3]},
                        scoring=InteractionSparsityScorer(), cv=KFold(3), error_score="raise")
    assert np.all(np.isfinite(grid.fit(Xdf, jacobians=J).cv_results_["mean_test_score"]))


# --------------------------------------------------------------------------- must be refused
def _clip_few_rows(X):
    """Five rows, none of them among 64 rows spread evenly over the data, reach a clip."""
    X = np.clip(X, -2.5, 2.5)
    X[[2, 50, 111, 171, 233], 0] = 4.0
    return X, FunctionTransformer(np.clip, kw_args={"a_min": -3.0, "a_max": 3.0})


def _clip_beyond_data(X):
    """A clip just outside the data: the identity on every row, not around them."""
    return X, FunctionTransformer(np.clip, kw_args={"a_min": X.min() - 0.1, "a_max": X.max() + 0.1})


def _affine_on_a_subspace(X):
    """The data have x0 = 0, where ``x + x0 * x1 * w`` is the identity; its derivative is not."""
    X = X.copy()
    X[:, 0] = 0.0
    return X, FunctionTransformer(_bilinear, kw_args={"w": np.array([0.0, 1.0, 2.0, -1.0])})


REFUSED_STEPS = {
    "polynomial": lambda X: (X, PolynomialFeatures(2)),
    "quantile": lambda X: (X, QuantileTransformer(n_quantiles=50)),
    "tanh": lambda X: (X, FunctionTransformer(np.tanh)),
    "normalizer": lambda X: (X, Normalizer()),
    "kbins": lambda X: (X, KBinsDiscretizer(4, encode="ordinal", strategy="uniform")),
    "clip-few-rows": _clip_few_rows,
    "clip-beyond-data": _clip_beyond_data,
    "affine-on-subspace": _affine_on_a_subspace,
}


@pytest.mark.parametrize("case", list(REFUSED_STEPS))
def test_non_affine_step_before_the_basis_is_refused_by_name(routing, data, case):
    X, J = data
    X, step = REFUSED_STEPS[case](X)
    pipe = make_interaction_pipeline(step, StandardScaler(), InteractionBasis())
    name = pipe.steps[0][0]
    with pytest.raises(ValueError, match=rf"(?s){name}.*not affine.*InteractionBasis"):
        pipe.fit(X, jacobians=J)


def test_non_affine_step_inside_a_nested_prefix_is_named(routing, data):
    X, J = data
    pipe = make_interaction_pipeline(
        make_pipeline(StandardScaler(), FunctionTransformer(np.tanh)), InteractionBasis())
    with pytest.raises(ValueError, match="(?s)'functiontransformer'.*not affine"):
        pipe.fit(X, jacobians=J)


def test_non_affine_step_before_a_basis_inside_a_nested_plain_pipeline_is_refused(routing, data):
    X, J = data
    pipe = make_interaction_pipeline(
        StandardScaler(), make_pipeline(FunctionTransformer(np.tanh), InteractionBasis()))
    with pytest.raises(ValueError, match="(?s)functiontransformer.*not affine"):
        pipe.fit(X, jacobians=J)


@pytest.mark.parametrize("columns", [[1, 0, 2, 3], [1, 0]], ids=["permuted", "subset"])
def test_basis_inside_a_columntransformer_is_refused(routing, data, columns):
    X, J = data
    pipe = make_interaction_pipeline(
        StandardScaler(), ColumnTransformer([("ib", InteractionBasis(), columns)]))
    with pytest.raises(ValueError, match="(?s)ColumnTransformer.*columns"):
        pipe.fit(X, jacobians=J)


# --------------------------------------------------------------------------- messages
@pytest.mark.parametrize("routing_on", [True, False], ids=["routing", "no-routing"])
def test_transform_input_jacobians_is_refused_in_our_words(data, routing_on):
    X, J = data
    pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis(),
                                     transform_input=["jacobians"])
    with sklearn.config_context(enable_metadata_routing=routing_on), pytest.raises(
        ValueError, match="(?s)transform_input.*chain rule"
    ):
        pipe.fit(X, **{"jacobians" if routing_on else "interactionbasis__jacobians": J})


def test_unprefixed_jacobians_without_routing_say_what_to_do(data):
    X, J = data
    pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis())
    with pytest.raises(ValueError, match="(?s)interactionbasis__jacobians.*enable_metadata_routing"):
        pipe.fit(X, jacobians=J)


def test_grid_search_without_routing_says_what_to_do(data):
    X, J = data
    grid = GridSearchCV(make_interaction_pipeline(StandardScaler(), InteractionBasis()),
                        {"interactionbasis__n_components": [2]},
                        scoring=InteractionSparsityScorer(), cv=KFold(3), error_score="raise")
    with pytest.raises(ValueError, match="(?s)interactionbasis__jacobians.*enable_metadata_routing"):
        grid.fit(X, jacobians=J)


def test_cross_validation_without_routing_scores_nothing_silently(data):
    X, J = data
    pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis())
    with pytest.raises(ValueError, match="enable_metadata_routing"):
        cross_val_score(pipe, X, scoring=InteractionSparsityScorer(), cv=KFold(3),
                        params={"interactionbasis__jacobians": J}, error_score="raise")


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested-plain"])
def test_pipeline_score_takes_jacobians_without_routing(data, nested):
    X, J = data
    last = make_pipeline(_lin(14), InteractionBasis(3)) if nested else InteractionBasis(3)
    pipe = make_interaction_pipeline(StandardScaler(), last)
    key = "pipeline__interactionbasis__jacobians" if nested else "interactionbasis__jacobians"
    pipe.fit(X, **{key: J})
    _, affine = _basis_and_map(pipe, [1, 1] if nested else [1])
    expected = gini(_reference_edges(X, J, X, J, affine, n_components=3))
    assert pipe.score(X, jacobians=J) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- scoring
def test_cross_val_score_over_a_nested_plain_pipeline_matches_brute_force(routing, data):
    X, J = data
    pipe = make_interaction_pipeline(StandardScaler(), make_pipeline(_lin(15), InteractionBasis()))
    scores = cross_val_score(pipe, X, scoring=InteractionSparsityScorer(), cv=KFold(3),
                             params={"jacobians": J}, error_score="raise")
    train, test = next(KFold(3).split(X))
    fitted = pipe.fit(X[train], jacobians=J[train])
    _, affine = _basis_and_map(fitted, [1, 1])
    expected = gini(_reference_edges(X[train], J[train], X[test], J[test], affine))
    assert scores[0] == pytest.approx(expected, rel=1e-6)


def test_grid_search_over_nested_candidates_matches_brute_force(routing, data):
    X, J = data
    grid = GridSearchCV(
        make_interaction_pipeline(StandardScaler(), make_pipeline(_lin(16), InteractionBasis())),
        {"pipeline__interactionbasis": [RoutedPCA(), InteractionBasis()]},
        scoring=InteractionSparsityScorer(), cv=KFold(3), error_score="raise",
    ).fit(X, jacobians=J)
    cell = next(i for i, p in enumerate(grid.cv_results_["params"])
                if isinstance(p["pipeline__interactionbasis"], InteractionBasis))
    train, test = next(KFold(3).split(X))
    scaler = StandardScaler().fit(X[train])
    A = np.diag(1 / scaler.scale_)
    affine = _compose((A, -scaler.mean_ @ A), _affine_of(_lin(16)))
    expected = gini(_reference_edges(X[train], J[train], X[test], J[test], affine))
    assert grid.cv_results_["split0_test_score"][cell] == pytest.approx(expected, rel=1e-6)


def test_cross_val_score_with_routed_sample_weight_matches_brute_force(routing, data, rng):
    X, J = data
    w = rng.uniform(0.1, 3.0, size=N)
    pipe = make_interaction_pipeline(StandardScaler().set_fit_request(sample_weight=True),
                                     InteractionBasis().set_fit_request(sample_weight=True))
    scores = cross_val_score(pipe, X, scoring=InteractionSparsityScorer(), cv=KFold(3),
                             params={"jacobians": J, "sample_weight": w}, error_score="raise")
    train, test = next(KFold(3).split(X))
    scaler = StandardScaler().fit(X[train], sample_weight=w[train])
    A = np.diag(1 / scaler.scale_)
    inv_T = np.linalg.inv(A).T
    Xt = X @ A - scaler.mean_ @ A
    C, C_pinv, _, mu = reference_basis(Xt[train], J[train] @ inv_T, sample_weight=w[train])
    E = np.mean((J[test] @ inv_T @ C_pinv.T * ((Xt[test] - mu) @ C)[:, None, :]) ** 2, axis=0)
    assert scores[0] == pytest.approx(gini(E), rel=1e-6)


def test_scorer_refuses_a_basis_fitted_inside_a_nested_plain_pipeline_of_a_plain_pipeline(
        routing, data):
    """scikit-learn's Pipeline hands the nested basis Jacobians unconverted: the score would lie."""
    X, J = data
    pipe = Pipeline([("scale", StandardScaler()),
                     ("inner", make_pipeline(InteractionBasis()))]).fit(X, jacobians=J)
    with pytest.raises(ValueError, match="(?s)'inner'.*make_interaction_pipeline"):
        InteractionSparsityScorer()(pipe, X, jacobians=J)


def test_scorer_refuses_a_pipeline_that_is_not_affine_on_the_scored_rows(routing, data):
    X, J = data
    X_clipped, step = _clip_few_rows(X)
    pipe = make_pipeline(step, RoutedPCA()).fit(X_clipped[3:40], jacobians=J[3:40])
    with pytest.raises(ValueError, match="not affine"):
        InteractionSparsityScorer()(pipe, X_clipped, jacobians=J)


def test_scorer_refuses_an_inverse_transform_that_does_not_undo_the_transform(routing, data):
    """A FunctionTransformer without inverse_func has the identity as inverse: J @ P.T would lie."""
    X, J = data
    lin = _lin(17)
    lin.set_params(inverse_func=None, inv_kw_args=None)
    pipe = make_interaction_pipeline(lin, InteractionBasis()).fit(X, jacobians=J)
    with pytest.raises(ValueError, match="(?s)inverse_transform.*does not undo.*inverse_func"):
        InteractionSparsityScorer()(pipe, X, jacobians=J)


# --------------------------------------------------------------------------- more nesting and inputs
def test_nested_plain_pipeline_with_memory_is_carried(routing, data, tmp_path):
    """With memory, scikit-learn fits clones of the steps: the clones must carry too."""
    X, J = data
    pipe = make_interaction_pipeline(
        StandardScaler(), make_pipeline(_lin(18), InteractionBasis(), memory=str(tmp_path / "in")),
        memory=str(tmp_path / "out"))
    pipe.fit(X, jacobians=J)
    basis, affine = _basis_and_map(pipe, [1, 1])
    _assert_lambda(basis.interaction_strengths_, _reference_lambda(X, J, affine))


def test_nested_plain_pipeline_with_pandas_output(routing, data, no_foreign_warnings):
    X, J = data
    Xdf = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    pipe = make_interaction_pipeline(StandardScaler(), make_pipeline(_lin(19), InteractionBasis()))
    pipe.set_output(transform="pandas").fit(Xdf, jacobians=J)
    basis, affine = _basis_and_map(pipe, [1, 1])
    _assert_lambda(basis.interaction_strengths_, _reference_lambda(X, J, affine))


def test_torch_jacobians_are_carried(routing, data):
    torch = pytest.importorskip("torch")
    X, J = data
    pipe = make_interaction_pipeline(StandardScaler(), make_pipeline(_lin(20), InteractionBasis()))
    pipe.fit(X, jacobians=torch.from_numpy(J))
    basis, affine = _basis_and_map(pipe, [1, 1])
    _assert_lambda(basis.interaction_strengths_, _reference_lambda(X, J, affine))


@pytest.mark.parametrize("oddity", ["outlier-row", "constant-column", "float32-basis"])
def test_unusual_but_affine_inputs_are_not_refused(routing, data, oddity):
    X, J = data
    X = X.copy()
    basis = InteractionBasis(dtype="float32") if oddity == "float32-basis" else InteractionBasis()
    if oddity == "outlier-row":
        X[17] = 1e4
    if oddity == "constant-column":
        X[:, 2] = 5.0
    pipe = make_interaction_pipeline(StandardScaler(), _lin(21), basis).fit(X, jacobians=J)
    affine = _compose(_affine_of(pipe[0]), _affine_of(pipe[1]))
    expected = _reference_lambda(X, J, affine)
    if oddity == "float32-basis":  # float32 rounding, relative to the largest strength
        np.testing.assert_allclose(pipe[-1].interaction_strengths_, expected, rtol=1e-4,
                                   atol=1e-6 * expected.max())
    else:
        _assert_lambda(pipe[-1].interaction_strengths_, expected)


def test_log_step_is_refused_without_numpy_warnings(routing, data, no_foreign_warnings):
    """Probes off the data leave log's domain; the warnings that causes are not the user's."""
    X, J = data
    pipe = make_interaction_pipeline(FunctionTransformer(np.log), InteractionBasis())
    with pytest.raises(ValueError, match="(?s)functiontransformer.*not affine"):
        pipe.fit(np.abs(X) + 1.0, jacobians=J)


def test_feature_union_before_the_basis_cannot_be_undone(routing, data):
    X, J = data
    pipe = make_interaction_pipeline(FeatureUnion([("a", StandardScaler()), ("b", _lin(22))]),
                                     InteractionBasis())
    with pytest.raises(ValueError, match="map 4 features to 8"):
        pipe.fit(X, jacobians=J)


@pytest.mark.parametrize("inner", ["interaction-pipeline", "feature-union"])
def test_scorer_refuses_bases_a_plain_outer_pipeline_fed_unconverted(routing, data, inner):
    """A plain Pipeline around them passed the Jacobians unchanged past its scaler."""
    X, J = data
    if inner == "interaction-pipeline":
        part = make_interaction_pipeline(_lin(23), InteractionBasis())
    else:
        part = FeatureUnion([("ib", InteractionBasis())])
    pipe = Pipeline([("scale", StandardScaler()), ("inner", part)]).fit(X, jacobians=J)
    with pytest.raises(ValueError, match="(?s)'inner'.*make_interaction_pipeline"):
        InteractionSparsityScorer()(pipe, X, jacobians=J)
