"""InteractionPipeline: routed Jacobians follow the chain rule through affine steps."""

import numpy as np
import pytest
import sklearn
from _reference import align_signs, random_invertible
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from sklearn_lib import PCA as RoutedPCA
from sklearn_lib import InteractionBasis, InteractionPipeline, make_interaction_pipeline
from sklearn_lib.metrics import InteractionSparsityScorer


@pytest.fixture
def data(rng):
    n, d, o = 200, 4, 3
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * [1.0, 10.0, 100.0, 0.1]
    J = rng.normal(size=(n, o, d)) + rng.normal(size=(o, d))
    return X, J


def _linear(A, b):
    """An affine step x -> x @ A + b whose Jacobians the pipeline must undo."""
    return FunctionTransformer(lambda x: x @ A + b, check_inverse=False,
                               inverse_func=lambda z: (z - b) @ np.linalg.pinv(A))


def _preceding_steps(case):
    if case == "scaler":
        return [StandardScaler()]
    A = random_invertible(3, 4, np.log(1e3))
    return [StandardScaler(), _linear(A, np.arange(4.0))]


@pytest.mark.parametrize("case", ["scaler", "scaler+rotation"])
@pytest.mark.parametrize("routing_on", [True, False])
def test_basis_after_affine_steps_equals_basis_on_raw_features(data, case, routing_on):
    """SPEC 1(d): the pipeline's basis is the raw fit's, because J becomes J @ inv(A).T."""
    X, J = data
    pipe = make_interaction_pipeline(*_preceding_steps(case), InteractionBasis())
    with sklearn.config_context(enable_metadata_routing=routing_on):
        pipe.fit(X, **{"jacobians" if routing_on else "interactionbasis__jacobians": J})
    raw = InteractionBasis().fit(X, jacobians=J)
    # Eigenvalues are perturbed by the rounding of the largest one times cond(A)^2
    # (the rotation has cond 1e3): a tolerance relative to the largest.
    Lambda = raw.interaction_strengths_
    np.testing.assert_allclose(pipe[-1].interaction_strengths_, Lambda, rtol=1e-7,
                               atol=1e-8 * Lambda.max())
    Z, Z_raw = pipe.transform(X), raw.transform(X)
    np.testing.assert_allclose(align_signs(Z_raw, Z), Z_raw, atol=1e-7 * np.abs(Z_raw).max())


def test_scores_match_the_raw_fit(routing, data):
    X, J = data
    pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis(3)).fit(X, jacobians=J)
    expected = InteractionBasis(3).fit(X, jacobians=J).score(X, jacobians=J)
    assert pipe.score(X, jacobians=J) == pytest.approx(expected, rel=1e-7)
    assert InteractionSparsityScorer()(pipe, X, jacobians=J) == pytest.approx(expected, rel=1e-7)


def test_fit_transform_matches_fit_then_transform(routing, data):
    X, J = data
    pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis(3))
    Z = pipe.fit_transform(X, jacobians=J)
    np.testing.assert_allclose(Z, pipe.transform(X), atol=1e-10 * np.abs(Z).max())
    assert not hasattr(pipe, "_fit_input")  # the training data are not kept


def test_grid_search_compares_pca_and_interaction_basis_after_a_scaler(routing, data):
    X, J = data
    grid = GridSearchCV(
        make_interaction_pipeline(StandardScaler(), InteractionBasis()),
        {"interactionbasis": [RoutedPCA(), InteractionBasis()],
         "interactionbasis__n_components": [2]},
        scoring=InteractionSparsityScorer(), cv=KFold(3), error_score="raise",
    ).fit(X, jacobians=J)
    train, test = next(KFold(3).split(X))
    by_hand = InteractionBasis(2).fit(X[train], jacobians=J[train]).score(X[test],
                                                                           jacobians=J[test])
    cell = [i for i, p in enumerate(grid.cv_results_["params"])
            if isinstance(p["interactionbasis"], InteractionBasis)][0]
    assert grid.cv_results_["split0_test_score"][cell] == pytest.approx(by_hand, rel=1e-7)


@pytest.mark.parametrize(
    "step, match",
    [
        (PCA(2), "map 4 features to 2"),
        (_linear(np.diag([1.0, 1.0, 1.0, 0.0]), 0.0), "singular"),
        (FunctionTransformer(np.tanh), "not affine"),
    ],
)
def test_steps_the_chain_rule_cannot_undo_are_refused(routing, data, step, match):
    X, J = data
    pipe = make_interaction_pipeline(step, InteractionBasis())
    with pytest.raises(ValueError, match=match):
        pipe.fit(X, jacobians=J)


def test_basis_first_needs_no_adaptation(routing, data):
    X, J = data
    pipe = make_interaction_pipeline(InteractionBasis(3), StandardScaler()).fit(X, jacobians=J)
    np.testing.assert_allclose(pipe[0].components_,
                               InteractionBasis(3).fit(X, jacobians=J).components_)


def test_is_a_scikit_learn_pipeline(data):
    pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis(2))
    assert isinstance(pipe, InteractionPipeline)
    assert [name for name, _ in pipe.steps] == [
        name for name, _ in make_pipeline(StandardScaler(), InteractionBasis(2)).steps
    ]
    assert clone(pipe).get_params()["interactionbasis__n_components"] == 2
    assert isinstance(clone(pipe), InteractionPipeline)


def test_nested_plain_pipeline_is_fitted_in_place_and_stays_plain(routing, data):
    """The nested Pipeline is fitted as an InteractionPipeline, then handed back as it was."""
    from sklearn.pipeline import Pipeline

    X, J = data
    A = random_invertible(5, 4, np.log(1e2))
    inner_steps = [("lin", _linear(A, np.ones(4))), ("basis", InteractionBasis())]
    inner = Pipeline(inner_steps)
    outer_steps = [("scale", StandardScaler()), ("inner", inner)]
    pipe = InteractionPipeline(outer_steps).fit(X, jacobians=J)
    assert pipe.steps[1][1] is inner and type(inner) is Pipeline
    assert [type(step) for _, step in outer_steps] == [StandardScaler, Pipeline]
    assert inner_steps[1][1] is inner[-1] and not hasattr(inner, "_fit_input")
    scaler = pipe[0]
    total = np.diag(1 / scaler.scale_) @ A
    raw = InteractionBasis().fit(X, jacobians=J)
    np.testing.assert_allclose(inner[-1].interaction_strengths_, raw.interaction_strengths_,
                               rtol=1e-7, atol=1e-9 * raw.interaction_strengths_.max())
    Z = pipe.fit_transform(X, jacobians=J)
    np.testing.assert_allclose(Z, pipe.transform(X), atol=1e-10 * np.abs(Z).max())
    assert np.linalg.cond(total) > 1  # the nested basis really is behind a non-trivial map
    # Scoring changes nothing: the very same lists and objects afterwards.
    outer_list, inner_list = pipe.steps, inner.steps
    assert np.isfinite(pipe.score(X, jacobians=J))
    assert pipe.steps is outer_list and inner.steps is inner_list and pipe.steps[1][1] is inner


def test_score_takes_jacobians_without_routing(data):
    X, J = data
    pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis(3))
    pipe.fit(X, interactionbasis__jacobians=J)
    expected = InteractionBasis(3).fit(X, jacobians=J).score(X, jacobians=J)
    assert pipe.score(X, jacobians=J) == pytest.approx(expected, rel=1e-7)
    with pytest.raises(TypeError, match="metadata routing"):
        pipe.score(X, jacobians=J, other=1)


def test_jacobians_are_converted_with_one_matrix_product(data):
    """J @ inv(A).T on (n, o, d) arrays is computed as one (n * o, d) product: same values."""
    X, J = data
    pipe = make_interaction_pipeline(StandardScaler(), InteractionBasis())
    pipe.fit(X, interactionbasis__jacobians=J)
    converted = pipe._jacobians_for_step(1, J, X)
    expected = np.einsum("nod,ed->noe", J, np.diag(pipe[0].scale_))
    np.testing.assert_allclose(converted, expected, rtol=1e-12)
