import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_lib import PCA as RoutedPCA
from sklearn_lib import InteractionBasis
from sklearn_lib.metrics import InteractionSparsityScorer, edges_to_reach, gini


@pytest.fixture
def data(rng):
    n, d, o = 120, 6, 3
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    J = rng.normal(size=(n, o, d))
    return X, J


def bruteforce_edges(transform, left_inverse, X, J):
    """E[i, j] = mean_x (J_x @ left_inverse.T)[i, j]**2 * Z[x, j]**2, one sample at a time."""
    Z = transform(X)
    E = np.zeros((J.shape[1], Z.shape[1]))
    for x in range(len(X)):
        E += (J[x] @ left_inverse.T * Z[x]) ** 2
    return E / len(X)


# --- sparsity metrics ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, expected",
    [([1, 1, 1, 1], 0.0), ([0, 0, 0, 1], 0.75), ([0, 1], 0.5), ([1, 2, 3], 2 / 9), ([0, 0], 0.0)],
)
def test_gini_known_values(values, expected):
    assert gini(values) == pytest.approx(expected)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_subnormal=False), min_size=1, max_size=40),
       st.floats(1e-3, 1e3))
def test_gini_scale_and_permutation_invariant(values, scale):
    values = np.array(values)
    assert 0 <= gini(values) < 1
    assert gini(values * scale) == pytest.approx(gini(values), abs=1e-9)
    assert gini(values[::-1]) == pytest.approx(gini(values), abs=1e-12)


def test_gini_matches_mean_absolute_difference_definition(rng):
    """G = sum_ij |v_i - v_j| / (2 N^2 mean(v)), the textbook form."""
    v = rng.exponential(size=30)
    expected = np.abs(v[:, None] - v[None, :]).sum() / (2 * len(v) ** 2 * v.mean())
    assert gini(v) == pytest.approx(expected, rel=1e-12)


def test_gini_rejects_bad_values():
    with pytest.raises(ValueError, match="non-negative"):
        gini([1.0, -1.0])
    with pytest.raises(ValueError, match="non-negative"):
        gini([1.0, np.nan])
    with pytest.raises(ValueError, match="empty"):
        gini([])


@pytest.mark.parametrize(
    "values, fraction, expected",
    [([5, 3, 1, 1], 0.5, 1), ([5, 3, 1, 1], 0.8, 2), ([5, 3, 1, 1], 1.0, 4), ([1, 1], 0.5, 1),
     ([0, 0], 0.9, 0)],
)
def test_edges_to_reach(values, fraction, expected):
    assert edges_to_reach(values, fraction) == expected


# --- the scorer ---------------------------------------------------------------------------


def test_scorer_on_interaction_basis_equals_its_score(data):
    X, J = data
    basis = InteractionBasis(4).fit(X[:80], jacobians=J[:80])
    scorer = InteractionSparsityScorer()
    assert scorer(basis, X[80:], jacobians=J[80:]) == pytest.approx(
        basis.score(X[80:], jacobians=J[80:]), rel=1e-9
    )


def test_scorer_on_pca_matches_bruteforce(data):
    X, J = data
    pca = PCA(4).fit(X[:80])
    expected = gini(bruteforce_edges(pca.transform, pca.components_, X[80:], J[80:]))
    assert InteractionSparsityScorer()(pca, X[80:], jacobians=J[80:]) == pytest.approx(
        expected, rel=1e-9
    )


def test_scorer_probes_pipelines_of_affine_steps(data):
    X, J = data
    pipe = Pipeline([("scale", StandardScaler()), ("pca", PCA(3))]).fit(X)
    # The pipeline's own left inverse: PCA's inverse, then the scaler's.
    left_inverse = pipe.named_steps["pca"].components_ * pipe.named_steps["scale"].scale_
    expected = gini(bruteforce_edges(pipe.transform, left_inverse, X, J))
    assert InteractionSparsityScorer()(pipe, X, jacobians=J) == pytest.approx(expected, rel=1e-8)


def test_scorer_edges_for_90_is_negated_count(data):
    X, J = data
    basis = InteractionBasis().fit(X, jacobians=J)
    expected = edges_to_reach(basis.edges(X, jacobians=J), 0.9)
    assert InteractionSparsityScorer("edges_for_90")(basis, X, jacobians=J) == -expected


def test_scorer_rejects_non_affine_transformers(data):
    from sklearn.preprocessing import PolynomialFeatures

    X, J = data
    with pytest.raises(ValueError, match="not affine"):
        InteractionSparsityScorer()(PolynomialFeatures(2).fit(X), X, jacobians=J)


def test_scorer_rejects_bad_metric_and_shapes(data):
    X, J = data
    with pytest.raises(ValueError, match="metric must be one of"):
        InteractionSparsityScorer("auc")
    with pytest.raises(ValueError, match="looks transposed"):
        InteractionSparsityScorer()(PCA(2).fit(X), X, jacobians=np.swapaxes(J, 1, 2))


# --- metadata routing through scikit-learn meta-estimators ----------------------------------


def test_jacobians_route_through_pipeline(routing, data):
    X, J = data
    pipe = Pipeline([("basis", InteractionBasis(3))]).fit(X, jacobians=J)
    direct = InteractionBasis(3).fit(X, jacobians=J)
    np.testing.assert_allclose(pipe.transform(X), direct.transform(X))
    assert pipe.named_steps["basis"].n_outputs_ == J.shape[1]


def test_grid_search_compares_pca_and_interaction_basis(routing, data):
    X, J = data
    pipe = Pipeline([("basis", RoutedPCA())])
    grid = GridSearchCV(
        pipe,
        {"basis": [RoutedPCA(), InteractionBasis()], "basis__n_components": [2, 4]},
        scoring=InteractionSparsityScorer(),
        cv=KFold(3),
    ).fit(X, jacobians=J)
    assert len(grid.cv_results_["mean_test_score"]) == 4
    # Recompute one cell by hand: InteractionBasis(2) on the first fold.
    train, test = next(KFold(3).split(X))
    by_hand = InteractionBasis(2).fit(X[train], jacobians=J[train]).score(X[test], jacobians=J[test])
    cell = [i for i, p in enumerate(grid.cv_results_["params"])
            if isinstance(p["basis"], InteractionBasis) and p["basis__n_components"] == 2][0]
    assert grid.cv_results_["split0_test_score"][cell] == pytest.approx(by_hand, rel=1e-9)
    pca_cell = [i for i, p in enumerate(grid.cv_results_["params"])
                if isinstance(p["basis"], PCA) and p["basis__n_components"] == 2][0]
    pca_by_hand = InteractionSparsityScorer()(PCA(2).fit(X[train]), X[test], jacobians=J[test])
    assert grid.cv_results_["split0_test_score"][pca_cell] == pytest.approx(pca_by_hand)


def test_sklearn_pca_as_grid_candidate_cannot_take_routed_jacobians(routing, data):
    """Why sklearn_lib.PCA exists: scikit-learn's PCA refuses the routed Jacobians."""
    X, J = data
    grid = GridSearchCV(Pipeline([("basis", InteractionBasis())]), {"basis": [PCA()]},
                        scoring=InteractionSparsityScorer(), cv=2, error_score="raise")
    with pytest.raises(TypeError, match="jacobians"):
        grid.fit(X, jacobians=J)


def test_routed_pca_is_sklearn_pca(data):
    X, J = data
    np.testing.assert_array_equal(RoutedPCA(3).fit(X, jacobians=J).transform(X),
                                  PCA(3).fit(X).transform(X))
    np.testing.assert_array_equal(RoutedPCA(3).fit_transform(X, jacobians=J),
                                  PCA(3).fit_transform(X))


def test_cross_validate_splits_jacobians_per_fold(routing, data):
    X, J = data
    result = cross_validate(
        InteractionBasis(3), X, params={"jacobians": J}, cv=KFold(4),
        scoring=InteractionSparsityScorer(), return_estimator=True,
    )
    for (train, test), est, score in zip(KFold(4).split(X), result["estimator"],
                                         result["test_score"]):
        assert est.n_samples_seen_ == len(train)
        expected = InteractionBasis(3).fit(X[train], jacobians=J[train])
        np.testing.assert_allclose(est.components_, expected.components_)
        assert score == pytest.approx(expected.score(X[test], jacobians=J[test]))


def test_cross_validate_default_score_uses_interaction_sparsity(routing, data):
    X, J = data
    result = cross_validate(InteractionBasis(3), X, params={"jacobians": J}, cv=KFold(3))
    assert np.all((result["test_score"] >= 0) & (result["test_score"] < 1))
