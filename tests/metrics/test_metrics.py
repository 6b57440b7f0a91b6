import numpy as np
import pytest
from _reference import assert_same_up_to_rounding
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_lib import PCA as RoutedPCA
from sklearn_lib import InteractionBasis
from sklearn_lib.metrics import InteractionSparsityScorer, edges_to_reach, gini
from sklearn_lib.metrics._affine import _affine_map


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
    # Two fits of the same estimator: equal up to the rounding of their LAPACK calls.
    assert_same_up_to_rounding(RoutedPCA(3).fit(X, jacobians=J).transform(X),
                               PCA(3).fit(X).transform(X))
    assert_same_up_to_rounding(RoutedPCA(3).fit_transform(X, jacobians=J),
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


# --- misuse is refused (issue 8) ---------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
@pytest.mark.parametrize("metric", [edges_to_reach, gini])
def test_metrics_refuse_nan_infinite_and_negative_edges(metric, bad):
    with pytest.raises(ValueError, match="finite non-negative"):
        metric([5.0, bad, 1.0])


@pytest.mark.parametrize("values, match", [([1 + 1j, 2.0], "real numbers"),
                                           (["a", "b"], "got strings"),
                                           ([[1.0], [1.0, 2.0]], "ragged")])
@pytest.mark.parametrize("metric", [edges_to_reach, gini])
def test_metrics_refuse_values_that_are_not_real_numbers(metric, values, match):
    with pytest.raises(ValueError, match=match):
        metric(values)


def test_scorer_refuses_positional_jacobians(data):
    X, J = data
    basis = InteractionBasis(3).fit(X, jacobians=J)
    with pytest.raises(ValueError, match=r"scorer\(estimator, X, jacobians=J\)"):
        InteractionSparsityScorer()(basis, X, J)


def test_scorer_refuses_scoring_against_another_downstream_map(data):
    X, J = data
    basis = InteractionBasis(3).fit(X, jacobians=J)
    scorer = InteractionSparsityScorer()
    with pytest.raises(ValueError, match="fitted with Jacobians.*enable metadata routing"):
        scorer(basis, X)
    with pytest.raises(ValueError, match="6 outputs but this InteractionBasis was fitted"):
        scorer(basis, X, jacobians=np.concatenate([J, J], axis=1))
    with pytest.raises(ValueError, match="fitted without Jacobians.*sklearn_lib.PCA"):
        scorer(InteractionBasis(3).fit(X), X, jacobians=J)
    # PCA (scikit-learn's or ours) is legitimately scored against any map.
    for pca in (PCA(3).fit(X), RoutedPCA(3).fit(X, jacobians=J)):
        assert 0 <= scorer(pca, X, jacobians=J) < 1


def test_grid_with_sklearn_pca_as_initial_step_refuses_interaction_bases(routing, data):
    """The routed Jacobians reached only the scorer: every InteractionBasis was PCA."""
    X, J = data
    grid = GridSearchCV(Pipeline([("basis", PCA())]), {"basis": [PCA(), InteractionBasis()]},
                        scoring=InteractionSparsityScorer(), cv=KFold(3), error_score="raise")
    with pytest.raises(ValueError, match="initial step"):
        grid.fit(X, jacobians=J)


def test_grid_without_routing_refuses_scores_without_jacobians(data):
    """Without routing the fits get Jacobians but the scorer does not."""
    X, J = data
    grid = GridSearchCV(InteractionBasis(), {"n_components": [2, 3]},
                        scoring=InteractionSparsityScorer(), cv=KFold(3), error_score="raise")
    with pytest.raises(ValueError, match="enable metadata routing"):
        grid.fit(X, jacobians=J)
    with pytest.raises(ValueError, match="enable metadata routing"):
        cross_validate(InteractionBasis(3), X, params={"jacobians": J}, cv=KFold(3),
                       error_score="raise")


def test_scorer_refuses_basis_after_a_scaler_in_a_plain_pipeline(routing, data):
    X, J = data
    pipe = Pipeline([("scale", StandardScaler()), ("basis", InteractionBasis(3))])
    pipe.fit(X, jacobians=J)
    with pytest.raises(ValueError, match="make_interaction_pipeline"):
        InteractionSparsityScorer()(pipe, X, jacobians=J)


def test_scorer_accepts_basis_after_a_shift_in_a_plain_pipeline(routing, data):
    """A shift leaves Jacobians unchanged, so the plain pipeline is right."""
    X, J = data
    pipe = Pipeline([("center", StandardScaler(with_std=False)), ("basis", InteractionBasis(3))])
    pipe.fit(X, jacobians=J)
    expected = InteractionBasis(3).fit(X, jacobians=J).score(X, jacobians=J)
    assert InteractionSparsityScorer()(pipe, X, jacobians=J) == pytest.approx(expected, rel=1e-8)


def test_scorer_checks_affinity_on_rows_spread_over_the_data(data):
    """A clipped transform is affine on the first rows only; it used to pass."""
    from sklearn.preprocessing import FunctionTransformer

    X, J = data
    X = np.abs(X)
    X[-20:, 0] = -50.0
    clip = FunctionTransformer(lambda x: np.maximum(x, -5.0)).fit(X)
    with pytest.raises(ValueError, match="not affine"):
        InteractionSparsityScorer()(clip, X, jacobians=J)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, X, J: s(PCA(2).fit(X), X.astype(complex), jacobians=J), ValueError,
         "real numbers"),
        (lambda s, X, J: s(PCA(2).fit(X), X, jacobians=np.where(J > 2, np.nan, J)),
         ValueError, "jacobians contains NaN"),
    ],
)
def test_scorer_refuses_unusable_input(data, call, error, match):
    X, J = data
    with pytest.raises(error, match=match):
        call(InteractionSparsityScorer(), X, J)


def test_scorer_refuses_non_transformers(data):
    from sklearn.linear_model import LinearRegression

    X, J = data
    with pytest.raises(TypeError, match="has none"):
        InteractionSparsityScorer()(LinearRegression().fit(X, X[:, 0]), X, jacobians=J)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5])
def test_scorer_refuses_bad_batch_size_when_built(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        InteractionSparsityScorer(batch_size=batch_size)


# --- the affine probe ---------------------------------------------------------------------


@pytest.mark.parametrize("bend", [1e-6, 1e-3])
def test_affine_probe_refuses_small_curvature(data, bend):
    """x + bend * x**2 departs from affine far above rounding: refused, however slight."""
    from sklearn.preprocessing import FunctionTransformer

    X, _ = data
    curved = FunctionTransformer(lambda x: x + bend * x**2).fit(X)
    with pytest.raises(ValueError, match="not affine"):
        _affine_map(curved, X)


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (1e6, 1e-3), (-1e8, 1.0), (0.0, 1e-9)])
def test_affine_probe_reads_scalers_exactly_at_any_offset_and_scale(rng, offset, spread):
    X = offset + spread * rng.normal(size=(300, 5)) * [1.0, 2.0, 0.5, 3.0, 1.0]
    scaler = StandardScaler().fit(X)
    affine = _affine_map(scaler, X)
    np.testing.assert_allclose(affine.A, np.diag(1 / scaler.scale_), rtol=1e-9)
    np.testing.assert_allclose(affine.P, np.diag(scaler.scale_), rtol=1e-9)


def test_affine_probe_refuses_a_departure_on_one_row_among_many(rng):
    """Only row 7777 of 10000 reaches the clip; the probe looks at every row."""
    from sklearn.preprocessing import FunctionTransformer

    X = np.clip(rng.normal(size=(10_000, 3)), -3.0, 3.0)
    X[7777, 1] = 10.0
    clip = FunctionTransformer(np.clip, kw_args={"a_min": -1e3, "a_max": 9.0}).fit(X)
    with pytest.raises(ValueError, match=r"at X\[7777\]"):
        _affine_map(clip, X)


def test_affine_probe_accepts_float32_steps(data):
    X, _ = data
    X32 = X.astype(np.float32)
    scaler = StandardScaler().fit(X32)
    affine = _affine_map(scaler, X32)
    np.testing.assert_allclose(affine.A, np.diag(1 / scaler.scale_), rtol=1e-5)


@pytest.mark.parametrize("center", [True, False])
def test_scorer_reads_bases_with_and_without_an_offset(data, center):
    """center=False gives b = 0 exactly: the left-inverse check must allow b's own rounding."""
    X, J = data
    X = X + 5.0
    basis = InteractionBasis(4, center=center).fit(X, jacobians=J)
    expected = basis.score(X, jacobians=J)
    assert InteractionSparsityScorer()(basis, X, jacobians=J) == pytest.approx(expected, rel=1e-8)
