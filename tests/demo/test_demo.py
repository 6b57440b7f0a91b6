"""The main job (python -m sklearn_lib) runs end to end at reduced size."""

import json
import os

import pytest

from sklearn_lib.demo import _main as demo
from sklearn_lib.demo import main, run
from sklearn_lib.demo._main import format_table
from sklearn_lib.demo._transformer import format_table as format_transformer_table


@pytest.fixture(scope="module")
def transformer_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("transformer") / "out"
    main(["--output", str(output), "--n-fit", "150", "--n-eval", "100", "--quiet"])
    return output


def test_default_run_compares_lib_and_pca_on_the_transformer(transformer_output):
    written = json.loads((transformer_output / "comparison.json").read_text())
    assert written["layers"] == ["hook_resid_pre", "hook_resid_mid[-1]",
                                 "hook_resid_post[-1]", "unembed"]
    assert written["accuracy"] == 1.0
    results = {m: written[m] for m in ("LIB", "PCA")}
    for row in results.values():
        assert len(row["directions"]) == len(row["edges"]) == 3
        fitted = row["n_directions_fitted"]
        assert len(fitted) == 4 and fitted[-1] <= 113
        # A count of directions is one the graph has; a count of edges fits the section.
        for k, r in zip(row["directions"], fitted):
            assert k is None or 1 <= k <= r
        for k, r_in, r_out in zip(row["edges"], fitted[:-1], fitted[1:]):
            assert 1 <= k <= r_in * r_out
        assert len(row["frequencies"]) == len(row["frequency_shares"]) == 16
        assert all(1 <= f <= 56 for f in row["frequencies"])
        assert row["single_frequency"] == sum(s >= 0.8 for s in row["frequency_shares"])
        assert set(row["seconds"]) == {"graph", "node ablation", "edge search"}
    # The embedding layer's LIB directions are Fourier modes of the token (the
    # reference work's finding): most of its top 16 carry one frequency.
    assert results["LIB"]["single_frequency"] >= 4
    table = format_transformer_table(results, 0.001)
    for label in ("directions to keep resid_pre", "directions to keep, total",
                  "edges to keep resid_pre->resid_mid", "edges to keep, total",
                  "LIB embedding frequencies", "PCA time"):
        assert label in table
    lines = {line[:36].strip(): line[36:].split() for line in table.splitlines()}
    lib, pca = (sum(results[m]["edges"]) for m in ("LIB", "PCA"))
    assert lines["edges to keep, total"] == [str(lib), str(pca), f"{lib / pca - 1:+.0%}"]
    for name in ("ablation.png", "fourier.png"):
        assert (transformer_output / name).stat().st_size > 0
    assert [p.name for p in transformer_output.parent.iterdir()] == ["out"]


def test_format_transformer_table_marks_counts_never_within_tolerance():
    row = {"directions": [3, None, 2], "edges": [4, 5, 6], "frequencies": [1] * 16,
           "single_frequency": 0, "seconds": {"graph": 1.0}}
    table = format_transformer_table({"LIB": row, "PCA": dict(row, edges=[2, 5, 6])}, 0.01)
    lines = {line[:36].strip(): line[36:].split() for line in table.splitlines()}
    assert lines["directions to keep, total"] == ["-", "-", "-"]
    assert lines["edges to keep resid_pre->resid_mid"] == ["4", "2", "+100%"]
    assert lines["edges to keep, total"] == ["15", "13", "+15%"]


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo") / "out"
    main(["--output", str(output), "--network", "mlp", "--n-fit", "300", "--n-eval", "200",
          "--quiet"])
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
    degeneracy = (demo_output / "degeneracy.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in degeneracy] == ["layer", "embed", "mlp.1", "mlp.2"]
    # The sections' counts: estimated for embed -> mlp.1 (16,640 beyond the exact
    # limit), exact in closed form into the logits; none is degenerate.
    header, _, hidden, logits = (line.split(",") for line in degeneracy)
    column = {name: i for i, name in enumerate(header)}
    assert hidden[column["degenerate_parameters_method"]] == "estimate"
    assert logits[column["degenerate_parameters_method"]] == "exact"
    assert logits[column["degenerate_parameters"]] == "0"
    llc = json.loads((demo_output / "llc.json").read_text())
    assert llc["n_parameters"] == 49297 and llc["n_samples"] == 3831
    assert 0 < llc["llc"] < llc["n_parameters"] / 2 and llc["llc_sem"] > 0
    assert (demo_output / "llc_chains.png").stat().st_size > 0


def test_demo_marks_its_folder_and_leaves_no_siblings(demo_output):
    assert json.loads((demo_output / ".sklearn_lib_demo.json").read_text())["format"] == (
        "sklearn_lib.demo"
    )
    assert [p.name for p in demo_output.parent.iterdir()] == ["out"]


@pytest.fixture
def fake_work(monkeypatch):
    """Replace the expensive comparison by one that writes a file; records its arguments."""
    calls = []

    def compare(output, **kwargs):
        calls.append(kwargs)
        (output / "comparison.json").write_text(json.dumps({"run": len(calls)}))
        return {"run": len(calls)}

    monkeypatch.setattr(demo, "_compare", compare)
    return calls


@pytest.mark.parametrize("extra, network, n_fit", [
    ([], "transformer", 3831),
    (["--network", "mlp"], "mlp", 2000),
    (["--network", "mlp", "--n-fit", "10"], "mlp", 10),
])
def test_transformer_is_the_default_network(tmp_path, fake_work, extra, network, n_fit):
    main(["--output", str(tmp_path / "out"), "--quiet", *extra])
    assert [(call["network"], call["n_fit"]) for call in fake_work] == [(network, n_fit)]


def run_number(folder):
    return json.loads((folder / "comparison.json").read_text())["run"]


def test_second_run_keeps_the_first_and_writes_a_fresh_folder(tmp_path, fake_work):
    output = tmp_path / "out"
    for _ in range(3):
        main(["--output", str(output), "--quiet", "--no-plots"])
    assert [run_number(tmp_path / name) for name in ("out", "out-2", "out-3")] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out-2", "out-3"]


@pytest.mark.skipif(os.name != "posix", reason="symbolic links and process probes are POSIX")
def test_overwrite_replaces_only_the_demos_own_folder(tmp_path, fake_work, capsys):
    output = tmp_path / "out"
    main(["--output", str(output), "--quiet"])
    (output / "leftover.txt").write_text("from run 1")
    main(["--output", str(output), "--quiet", "--overwrite"])
    assert run_number(output) == 2 and not (output / "leftover.txt").exists()

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as info:
            main(["--output", str(precious), "--quiet", *extra])
        assert info.value.code == 2
        assert f"{str(precious)!r} exists and is not a sklearn_lib demo output folder" in (
            capsys.readouterr().err.replace("\n", " "))
        with pytest.raises(FileExistsError, match="not a sklearn_lib demo output folder"):
            run(precious, overwrite=bool(extra), verbose=False)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
    link = tmp_path / "link"
    link.symlink_to(output, target_is_directory=True)
    with pytest.raises(FileExistsError, match="symbolic link"):
        run(link, overwrite=True, verbose=False)
    assert len(fake_work) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "out", "precious"]


def test_failed_run_keeps_the_previous_output(tmp_path, fake_work, monkeypatch):
    output = tmp_path / "out"
    run(output, verbose=False)

    def broken(output, **kwargs):
        (output / "comparison.json").write_text("half")
        raise RuntimeError("boom")

    monkeypatch.setattr(demo, "_compare", broken)
    with pytest.raises(RuntimeError, match="boom"):
        run(output, overwrite=True, verbose=False)
    assert run_number(output) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n-fit", "0"], "--n-fit: must be an integer from 1 to 3831"),
        (["--n-fit", "-5"], "--n-fit: must be an integer from 1 to 3831"),
        (["--n-fit", "5000"], "--n-fit: must be an integer from 1 to 3831"),
        (["--n-fit", "ten"], "--n-fit: expected an integer, got 'ten'"),
        (["--n-eval", "0"], "--n-eval: must be an integer from 1 to 8938"),
        (["--n-eval", "1e3"], "--n-eval: expected an integer"),
        (["--tolerance", "-0.1"], "--tolerance: must be an accuracy drop in [0, 1)"),
        (["--tolerance", "nan"], "--tolerance: must be an accuracy drop in [0, 1)"),
        (["--tolerance", "1"], "--tolerance: must be an accuracy drop in [0, 1)"),
        (["--resolution", "0"], "--resolution: must be a positive finite number"),
        (["--resolution", "inf"], "--resolution: must be a positive finite number"),
        (["--network", "cnn"], "--network: invalid choice: 'cnn'"),
    ],
)
def test_cli_rejects_bad_arguments_before_any_work(tmp_path, fake_work, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["--output", str(tmp_path / "out"), "--quiet", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not fake_work and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_fit": 0}, "n_fit must be an integer from 1"),
        ({"n_fit": 2.5}, "n_fit must be an integer"),
        ({"n_eval": True}, "n_eval must be an integer"),
        ({"tolerance": float("nan")}, "tolerance must be"),
        ({"tolerance": "0.1"}, "tolerance must be"),
        ({"resolution": -1.0}, "resolution must be"),
        ({"network": "cnn"}, "network must be one of"),
    ],
)
def test_run_rejects_bad_arguments_before_any_work(tmp_path, fake_work, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(tmp_path / "out", verbose=False, **kwargs)
    assert not fake_work and list(tmp_path.iterdir()) == []
