"""The documentation builds with warnings treated as errors (and runs the gallery), offline."""

import os
import re
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS))
from inventories import cached_inventories  # noqa: E402

INVENTORY = (b"# Sphinx inventory version 2\n# Project: demo\n# Version: 1\n"
             b"# The remainder of this file is compressed using zlib.\n"
             + zlib.compress(b"demo.f py:function 1 api.html#$ -\n"))


def test_docs_build_without_warnings(tmp_path):
    env = dict(os.environ, SKLEARN_LIB_QUICK="1", MPLBACKEND="Agg",
               SKLEARN_LIB_DOCS_INVENTORIES=str(tmp_path / "inventories"))
    html = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(html)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert (html / "user_guide.html").exists()
    assert (html / "generated" / "sklearn_lib.InteractionBasis.html").exists()
    # Maths use the bundled MathJax and its fonts; no page loads a script or a
    # stylesheet from the web.
    assert 'src="_static/mathjax/tex-chtml.js' in (html / "user_guide.html").read_text()
    assert len(list((html / "_static/mathjax/output/chtml/fonts/woff-v2").glob("*.woff"))) == 23
    for page in html.rglob("*.html"):
        assert not re.search(r"<script[^>]*src=\"https?:|<link[^>]*href=\"https?:",
                             page.read_text()), page
    # The gallery shows the graph figure and the per-layer spectra.
    images = {p.name for p in (html / "_images").glob("sphx_glr_plot_modules_*.png")}
    assert len(images) >= 2, images


# --------------------------------------------------------------------------- inventories
def test_inventory_downloaded_cached_and_used_offline(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "objects.inv").write_bytes(INVENTORY)
    cache = tmp_path / "cache"
    mapping = cached_inventories({"demo": site.as_uri() + "/"}, cache, timeout=30)
    assert mapping == {"demo": (site.as_uri() + "/", str(cache / "demo.inv"))}
    assert (cache / "demo.inv").read_bytes() == INVENTORY
    (site / "objects.inv").unlink()  # gone from the web: the cached copy still serves
    assert cached_inventories({"demo": site.as_uri()}, cache, timeout=30) == {
        "demo": (site.as_uri(), str(cache / "demo.inv"))}
    assert cached_inventories({"demo": "https://example.invalid/"}, cache, offline=True)


@pytest.mark.parametrize("content", [b"<html>404</html>", INVENTORY[:-5]])
def test_error_pages_and_truncated_inventories_are_not_cached(tmp_path, content):
    (tmp_path / "objects.inv").write_bytes(content)
    cache = tmp_path / "cache"
    assert cached_inventories({"demo": tmp_path.as_uri()}, cache, timeout=30) == {}
    assert not list(cache.iterdir())


def test_unreachable_or_silent_servers_leave_the_project_out(tmp_path):
    silent = socket.socket()  # accepts connections (backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        projects = {"silent": f"http://127.0.0.1:{silent.getsockname()[1]}/",
                    "refused": f"http://127.0.0.1:{refused.getsockname()[1]}/"}
        start = time.monotonic()
        assert cached_inventories(projects, tmp_path, timeout=0.5) == {}
        # Liveness, not speed: the build must not wait on a silent server (margin 60x).
        assert time.monotonic() - start < 30
    finally:
        silent.close()
        refused.close()
