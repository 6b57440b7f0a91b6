"""The main job (python -m sklearn_lib) runs end to end at reduced size."""

import json

import pytest

from sklearn_lib.demo import format_table, main, run


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo") / "out"
    main(["--output", str(output), "--n-fit", "300", "--n-eval", "200", "--quiet"])
    return output


def test_demo_writes_table_and_figures(demo_output):
    results = json.loads((demo_output / "comparison.json").read_text())
    assert set(results) == {"LIB", "PCA"}
    for row in results.values():
        assert len(row["directions"]) == len(row["edges"]) == 2
        assert 0 <= row["gini"] < 1
        assert all(k is None or k >= 1 for k in row["directions"])
    # The shipped network ignores the antisymmetric half of its embedding (tied
    # hidden weights): the interaction basis must drop it, PCA cannot.
    assert results["LIB"]["n_directions_fitted"][0] <= 32
    assert results["PCA"]["n_directions_fitted"][0] == 64
    for name in ("ablation.png", "graph_LIB.png", "graph_PCA.png", "edges_LIB.png"):
        assert (demo_output / name).stat().st_size > 0
    assert "edges to keep, total" in format_table(results, 0.001)


def test_demo_refuses_to_overwrite(demo_output):
    before = (demo_output / "comparison.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        run(demo_output, n_fit=50, n_eval=50, verbose=False)
    assert (demo_output / "comparison.json").read_text() == before
