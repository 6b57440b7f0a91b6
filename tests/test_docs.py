"""The documentation builds with warnings treated as errors (and runs the gallery)."""

import os
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_docs_build_without_warnings(tmp_path):
    env = dict(os.environ, SKLEARN_LIB_QUICK="1", MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert (tmp_path / "html" / "user_guide.html").exists()
    assert (tmp_path / "html" / "generated" / "sklearn_lib.InteractionBasis.html").exists()
