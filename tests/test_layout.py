"""The package layout: imports flow one way along the data path, with no circles.

import-linter's contracts (``[tool.importlinter]`` in ``pyproject.toml``) are
checked on the installed source; a change that climbs back up fails here with
the names of both modules.
"""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import sklearn_lib

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter")


def _lint_imports(config, cwd):
    """Run import-linter's command line on ``config``; (exit status, output)."""
    script = ("import sys; from importlinter.cli import lint_imports_command; "
              "sys.exit(lint_imports_command())")
    result = subprocess.run(
        [sys.executable, "-c", script, "--no-cache", str(config)],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )
    return result.returncode, result.stdout + result.stderr


def test_import_contracts_are_kept():
    status, output = _lint_imports(ROOT / "pyproject.toml", ROOT)
    assert status == 0, output
    assert "Imports flow one way along the data path KEPT" in output
    assert "No import circles KEPT" in output


def test_a_climbing_import_is_named(tmp_path):
    # The same checker with two layers swapped must fail and name both modules,
    # so the contract above is one that can fail.
    config = tmp_path / ".importlinter"
    config.write_text(
        "[importlinter]\nroot_package = sklearn_lib\n\n"
        "[importlinter:contract:swapped]\nname = swapped\ntype = layers\n"
        "containers = sklearn_lib\nlayers =\n    basis\n    graph\n"
    )
    status, output = _lint_imports(config, ROOT)
    assert status != 0
    assert "sklearn_lib.graph._graph -> sklearn_lib.basis" in output, output


def test_import_loads_no_optional_companion():
    optional = ("dask", "distributed", "zarr", "numcodecs", "networkit", "networkx",
                "matplotlib", "transformers", "transformer_lens", "nnsight", "devinterp")
    script = ("import sys, sklearn_lib; "
              f"print(' '.join(m for m in {optional!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, check=True)
    assert result.stdout.split() == [], (
        f"`import sklearn_lib` imported the optional {result.stdout.split()}: import them "
        "inside the functions that need them."
    )


SUBPACKAGES = sorted(m.name for m in pkgutil.iter_modules(sklearn_lib.__path__) if m.ispkg)


def test_subpackages_are_the_documented_stages():
    assert SUBPACKAGES == sorted([
        "basis", "cache", "cluster", "datasets", "degeneracy", "demo", "evaluation",
        "export", "graph", "metrics", "models", "plotting", "sources", "utils",
    ])


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_every_subpackage_says_what_it_holds(name):
    module = importlib.import_module(f"sklearn_lib.{name}")
    assert module.__doc__ and len(module.__doc__.strip()) > 40, name
    for public in getattr(module, "__all__", []):
        assert not public.startswith("_") and hasattr(module, public), (name, public)


@pytest.mark.parametrize("path, names", [
    ("sklearn_lib", ["InteractionBasis", "InteractionGraph", "PCA", "DegeneracyReport"]),
    ("sklearn_lib.cache", ["ActivationCache"]),
    ("sklearn_lib.collect", ["collect", "record_activations", "section_vjp_products"]),
    ("sklearn_lib.metrics", ["gini", "edges_to_reach", "InteractionSparsityScorer"]),
    ("sklearn_lib.evaluation", ["min_edges_to_keep", "node_ablation_curve"]),
    ("sklearn_lib.export", ["to_networkx", "write_graphml"]),
    ("sklearn_lib.plotting", ["plot_spectrum", "plot_interaction_graph"]),
    ("sklearn_lib.datasets", ["modular_addition_data", "load_modular_addition_model"]),
    ("sklearn_lib.degeneracy", ["DegeneracyReport"]),
    ("sklearn_lib.cluster", ["ModularityClustering", "modularity", "normalize_edges"]),
])
def test_documented_import_paths_keep_working(path, names):
    module = importlib.import_module(path)
    for name in names:
        assert hasattr(module, name), (path, name)
