"""The main job on a user's model: python -m sklearn_lib --model module:factory ..."""

import json

import numpy as np
import pytest
import torch

from sklearn_lib import InteractionGraph
from sklearn_lib.demo import _user_model as _demo_model
from sklearn_lib.demo import main
from sklearn_lib.evaluation import (
    compare_node_ablation,
    directions_to_keep,
    min_edges_to_keep,
)

FACTORY = '''
import torch

def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 12), torch.nn.ReLU(), torch.nn.Linear(12, 12), torch.nn.Tanh(),
        torch.nn.Linear(12, 3),
    )

def not_a_model():
    return "gpt2"
'''
LAYERS = ["1", "3", "4"]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "nets.py").write_text(FACTORY)
    X = np.random.default_rng(0).normal(size=(120, 4))
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", np.arange(120) % 3)
    return tmp_path, X


def _argv(tmp_path, *extra):
    return ["--model", f"{tmp_path / 'nets.py'}:make", "--layers", *LAYERS,
            "--data", str(tmp_path / "x.npy"), "--output", str(tmp_path / "out"), *extra]


def test_user_model_table_equals_the_ablations_on_module_slices(files, capsys):
    """Hooks on the model give what the evaluation gives on the Sequential's own slices."""
    tmp_path, X = files
    results = main(_argv(tmp_path, "--n-fit", "80", "--n-eval", "40"))
    table = capsys.readouterr().out
    assert "edges to keep 1->3" in table and "directions to keep 3" in table
    assert json.loads((tmp_path / "out" / "comparison.json").read_text()) == results

    model = _demo_model.load_factory(f"{tmp_path / 'nets.py'}:make").double().eval()
    X_fit, X_eval = X[:80], torch.from_numpy(X[80:])
    with torch.no_grad():
        y = model(X_eval).argmax(1).numpy()  # agreement with the model's own predictions
        acts = [model[:2](X_eval), model[:4](X_eval), model(X_eval)]
    graph = InteractionGraph(verbose=False).fit_model(model, LAYERS, X_fit)
    rest = [model[2:], model[4:], torch.nn.Identity()]
    section = [model[2:4], model[4:]]
    for l in range(2):
        curve = compare_node_ablation({"LIB": graph.bases_[l]}, acts[l], y, forward=rest[l])
        assert results["LIB"]["directions"][l] == directions_to_keep(curve, 0.001)
        kept = min_edges_to_keep(graph.bases_[l], graph.bases_[l + 1], acts[l], y,
                                 section=section[l], forward=rest[l + 1],
                                 edges=graph.edges_[l], tolerance=0.001)
        assert results["LIB"]["edges"][l] == kept.n_edges


@pytest.mark.parametrize("extra, message", [
    (["--model", "no_such_module_xyz:make"], "cannot import"),
    (["--layers", "1", "nope"], "unknown layer"),
    (["--layers", "1"], "at least 2 layers"),
    (["--n-fit", "100", "--n-eval", "30"], "together at most the 120"),
    (["--labels", "LABELS_BAD"], "one integer per sample"),
    (["--tolerance", "2"], "tolerance must be"),
])
def test_bad_arguments_are_refused_before_any_work(files, monkeypatch, capsys, extra, message):
    tmp_path, _ = files
    np.save(tmp_path / "bad.npy", np.zeros(7))
    extra = [str(tmp_path / "bad.npy") if e == "LABELS_BAD" else e for e in extra]
    monkeypatch.setattr(_demo_model, "_compare", lambda *a, **k: pytest.fail("work started"))
    argv = _argv(tmp_path)
    for flag in ("--model", "--layers"):
        if flag in extra:  # replace the flag's values
            i = argv.index(flag)
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            del argv[i:j]
    with pytest.raises(SystemExit):
        main(argv + extra)
    assert message in capsys.readouterr().err


def test_factory_must_build_a_module(files, capsys):
    tmp_path, _ = files
    argv = _argv(tmp_path)
    argv[1] = f"{tmp_path / 'nets.py'}:not_a_model"
    with pytest.raises(SystemExit):
        main(argv)
    assert "must be a torch.nn.Module" in capsys.readouterr().err


def test_labels_from_a_one_array_npz_or_a_npy(tmp_path):
    y = np.arange(10) % 3
    np.savez(tmp_path / "y.npz", labels=y)
    np.save(tmp_path / "y.npy", y)
    for name in ("y.npz", "y.npy"):
        np.testing.assert_array_equal(_demo_model.load_labels(str(tmp_path / name), 10, 5), y)
    np.save(tmp_path / "whole.npy", y.astype(float))  # whole numbers, but floats
    with pytest.raises(ValueError, match="integer class labels, got dtype float64"):
        _demo_model.load_labels(str(tmp_path / "whole.npy"), 10, 5)


def test_npz_keys_are_checked_against_forward_unless_it_takes_any(tmp_path):
    class Keywords(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x, **extra):
            return self.lin(x)

    data = {"x": np.zeros((4, 3)), "attention_mask": np.ones((4, 3))}
    _demo_model.check_model_runs(Keywords().double(), ["lin"], data)  # **extra takes any key
    strict = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match=r"\['x', 'attention_mask'\] are not parameters"):
        _demo_model.check_model_runs(strict, ["0"], data)


def test_nan_beyond_the_used_samples_is_not_refused():
    X = np.zeros((10, 2))
    X[9] = np.nan  # neither fitted nor scored
    _demo_model.check_data(X, 4, 8)
    with pytest.raises(ValueError, match="sample 7 .*evaluation part"):
        X[7] = np.inf
        _demo_model.check_data(X, 4, 8)
