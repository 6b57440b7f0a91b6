"""Every example runs end to end at reduced size (SKLEARN_LIB_QUICK=1), headless."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Reproducing the shipped weights takes minutes; the training functions are tested
# at a few epochs in test_datasets.py instead.
SLOW = {"train_modular_addition.py", "train_modular_addition_transformer.py"}


@pytest.mark.parametrize(
    "script", sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in SLOW)
)
def test_example_runs(script, tmp_path):
    env = dict(os.environ, SKLEARN_LIB_QUICK="1", MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "an example should report what it found"
